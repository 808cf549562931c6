"""Request/reply over DEALER -> ROUTER: typed requests, exactly-once commands.

The server remembers the reply of every executed command id in the same transaction as
the command's effects, so a retry is answered from the store, never executed twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import zmq
import zmq.asyncio
from pydantic import ValidationError

from . import commands, envelope
from .commands import Reply, ReplyEnvelope, Request
from .errors import DecodeError, GridtradeError, RequestError
from .refusals import BadRequest, Busy, Failed, Internal, RequestTimeout, Unsupported
from .keys import Security, peer_site
from .retry import worth_logging
from .sockets import DropCounter, open_socket
from .store import Store

log = logging.getLogger(__name__)

R = TypeVar("R", bound=Reply)


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the site whose CURVE key the frame came with (its ZAP User-Id).

    ``site`` is None when the socket carries no identity (``GRIDTRADE_INSECURE``, or a
    local ``ipc://``/``inproc://`` endpoint): there is then nobody to check, and handlers
    treat the caller as the machine's own (see :meth:`may_act_for`). Never taken from a
    request body.
    """

    site: str | None = None

    def may_act_for(self, site: str) -> bool:
        """True if this caller may act for something that belongs to ``site``."""
        return self.site is None or self.site == site

    def __str__(self) -> str:
        return self.site if self.site is not None else "(no identity)"


LOCAL = Caller(None)

RpcHandler = Callable[..., Awaitable[Reply]]
Prefetch = Callable[[Any, Caller], Awaitable[Any]]


class RpcServer:
    """ROUTER: typed requests, one handler each; a command id executes at most once.

    Every handler is called as ``fn(req, caller)`` (``fn(req, caller, prefetched)`` with a
    prefetch): ``caller`` is the :class:`Caller` read from the frame's User-Id.

    Bounded under a flood from an allowed peer: at most ``max_inflight_per_site`` requests
    of one site run at once (more are answered at once with the error ``busy``, counted in
    ``busy``); stored replies of executed commands are kept ``commands_keep_s`` (a retry
    within that window is still answered from the store, never executed twice) and pruned
    every ``prune_every_s``. A command id is remembered per calling site, so one site can
    neither read nor pre-empt another site's command ids.
    """

    def __init__(self, ctx: zmq.asyncio.Context, security: Security, store: Store, *, bind: str,
                 name: str = "rpc", max_inflight_per_site: int = 32, commands_keep_s: float = 86400.0,
                 prune_every_s: float = 600.0) -> None:
        self.ctx, self.security, self.store, self.bind_to, self.name = ctx, security, store, bind, name
        self.handlers: dict[str, tuple[RpcHandler, Prefetch | None]] = {}
        self.drops = DropCounter(name)
        self.executed = 0
        self.max_inflight_per_site = max_inflight_per_site
        self.commands_keep_s, self.prune_every_s = commands_keep_s, prune_every_s
        self.inflight: Counter[str] = Counter()  # site ("" without identity) -> requests running
        self.busy: Counter[str] = Counter()  # site -> requests refused with "busy"
        self.pruned = 0
        self._task: asyncio.Task[None] | None = None
        self._pruner: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self.sock: zmq.asyncio.Socket | None = None
        self.endpoint = ""
        self.started = time.time()

    def handle(self, req_cls: type[Request], fn: RpcHandler, prefetch: Prefetch | None = None) -> None:
        """``fn(req, caller)`` runs inside the store transaction that remembers its reply. With
        ``prefetch``, ``fn(req, caller, await prefetch(req, caller))``: what the command must ask
        other services is asked before the transaction, so a slow peer holds up only this command."""
        self.handlers[req_cls.TYPE] = (fn, prefetch)

    async def start(self) -> None:
        self.sock = sock = open_socket(self.ctx, zmq.ROUTER)
        self.security.serve(sock, self.bind_to)
        sock.bind(self.bind_to)
        self.endpoint = sock.last_endpoint.decode()
        self._task = asyncio.create_task(self._run(sock), name=f"{self.name}-serve")
        self._pruner = asyncio.create_task(self._prune_forever(), name=f"{self.name}-prune")

    async def stop(self) -> None:
        for attr in ("_task", "_pruner"):
            task = getattr(self, attr)
            if task:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                setattr(self, attr, None)
        if self._inflight:
            await asyncio.wait(self._inflight, timeout=5)
            for t in self._inflight:
                t.cancel()
            await asyncio.gather(*self._inflight, return_exceptions=True)
        if self.sock is not None:
            self.sock.close(0)

    async def prune(self, now: float | None = None) -> int:
        """Forget the replies of commands older than ``commands_keep_s``; returns how many."""
        cutoff = (time.time() if now is None else now) - self.commands_keep_s
        async with self.store.atomic() as conn:
            n = int(conn.execute("DELETE FROM bus_commands WHERE ts < ?", (cutoff,)).rowcount)
        self.pruned += n
        return n

    async def _prune_forever(self) -> None:
        while True:
            try:
                await self.prune()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - tried again next round
                log.exception("%s: pruning stored replies failed", self.name)
            await asyncio.sleep(self.prune_every_s)

    async def _run(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sock.recv_multipart(copy=False)
            if len(frames) < 2:
                self.drops.drop("frames")
                continue
            caller = Caller(peer_site(frames[-1]))
            ident, data = frames[0].bytes, frames[-1].bytes
            key = caller.site or ""
            if self.inflight[key] >= self.max_inflight_per_site:
                self._refuse_busy(sock, ident, data, caller)
                continue
            self.inflight[key] += 1
            t = asyncio.create_task(self._serve(sock, ident, data, caller))
            self._inflight.add(t)
            t.add_done_callback(self._inflight.discard)
            t.add_done_callback(lambda _t, k=key: self._done(k))

    def _done(self, key: str) -> None:
        self.inflight[key] -= 1
        if self.inflight[key] <= 0:
            del self.inflight[key]

    def _refuse_busy(self, sock: zmq.asyncio.Socket, ident: bytes, data: bytes, caller: Caller) -> None:
        key = caller.site or ""
        self.busy[key] += 1
        if worth_logging(self.busy[key]):
            log.warning("%s: site %s has %d requests running; refusing more with 'busy' (%d so far)",
                        self.name, caller, self.max_inflight_per_site, self.busy[key])
        cmd_id = ""
        with contextlib.suppress(ValueError, AttributeError, TypeError):
            cmd_id = str(json.loads(data).get("cmd_id", ""))[:128]
        rep = ReplyEnvelope(cmd_id=cmd_id, ok=False, error=commands.ErrorInfo(
            code=Busy.code, message=f"too many requests of this site at once (limit {self.max_inflight_per_site}); "
                                 "nothing was done: try again shortly"))
        with contextlib.suppress(zmq.ZMQError):
            sock.send_multipart([ident, rep.model_dump_json().encode()], flags=zmq.NOBLOCK)

    async def _serve(self, sock: zmq.asyncio.Socket, ident: bytes, data: bytes, caller: Caller) -> None:
        reply = await self.execute(data, caller)
        with contextlib.suppress(zmq.ZMQError):
            await sock.send_multipart([ident, reply.model_dump_json().encode()])

    @staticmethod
    def _key(cmd_id: str, caller: Caller) -> str:
        """The stored key of a command: its id within the calling site."""
        return cmd_id if caller.site is None else f"{caller.site}|{cmd_id}"

    async def execute(self, data: bytes, caller: Caller = LOCAL) -> ReplyEnvelope:
        cmd_id = ""
        try:
            try:
                cmd_id = str(json.loads(data).get("cmd_id", ""))[:128]
            except (ValueError, AttributeError):
                pass
            env = commands.decode_request(data)
        except DecodeError as e:
            self.drops.drop(e.cause, e.detail)
            return ReplyEnvelope(cmd_id=cmd_id, ok=False,
                                 error=commands.ErrorInfo(code=BadRequest.code, message=f"{e.cause}: {e.detail}"[:2000]))
        fn, prefetch = self.handlers.get(env.type, (None, None))
        if fn is None:
            return ReplyEnvelope(cmd_id=env.cmd_id, ok=False,
                                 error=commands.ErrorInfo(code=Unsupported.code, message=f"{self.name} does not serve {env.type}"))
        key = self._key(env.cmd_id, caller)
        cause = envelope.current_cause.set(env.cmd_id)  # what the handler publishes was caused by this command
        try:
            if env.body.READ_ONLY:
                result = await fn(env.body, caller)
            else:
                args: tuple[Any, ...] = ()
                if prefetch is not None:
                    if (done := self._remembered(key, env.cmd_id)) is not None:
                        return done
                    args = (await prefetch(env.body, caller),)
                async with self.store.atomic() as conn:
                    if (done := self._remembered(key, env.cmd_id)) is not None:
                        return done
                    result = await fn(env.body, caller, *args)
                    out = self._ok(env, result)
                    conn.execute("INSERT INTO bus_commands (cmd_id, type, reply, ts) VALUES (?, ?, ?, ?)",
                                 (key, env.type, out.model_dump_json(), time.time()))
                    self.executed += 1
                    return out
        except RequestError as e:
            return ReplyEnvelope(cmd_id=env.cmd_id, ok=False, error=commands.ErrorInfo(code=e.code, message=e.message))
        except GridtradeError as e:
            return ReplyEnvelope(cmd_id=env.cmd_id, ok=False, error=commands.ErrorInfo(code=Failed.code, message=str(e)))
        except Exception:  # noqa: BLE001 - a bug must not take the server down
            log.exception("%s: %s failed", self.name, env.type)
            return ReplyEnvelope(cmd_id=env.cmd_id, ok=False,
                                 error=commands.ErrorInfo(code=Internal.code, message="internal error; see the service log"))
        finally:
            envelope.current_cause.reset(cause)
        self.executed += 1
        return self._ok(env, result)

    def _remembered(self, key: str, cmd_id: str) -> ReplyEnvelope | None:
        row = self.store.conn.execute("SELECT reply FROM bus_commands WHERE cmd_id = ?", (key,)).fetchone()
        return None if row is None else ReplyEnvelope.model_validate_json(row[0])

    @staticmethod
    def _ok(env: commands.RequestEnvelope, result: Reply) -> ReplyEnvelope:
        expected = type(env.body).Reply
        if not isinstance(result, expected):
            raise TypeError(f"handler for {env.type} returned {type(result).__name__}, not {expected.__name__}")
        return ReplyEnvelope(cmd_id=env.cmd_id, ok=True, result=result.model_dump(mode="json"))


class RpcClient:
    """DEALER to one server; concurrent requests matched by command id."""

    def __init__(self, ctx: zmq.asyncio.Context, security: Security, endpoint: str, *, server_site: str = "market",
                 timeout_s: float = 5.0) -> None:
        self.ctx, self.security, self.endpoint = ctx, security, endpoint
        self.server_site, self.timeout_s = server_site, timeout_s
        self._waiting: dict[str, asyncio.Future[ReplyEnvelope]] = {}
        self._task: asyncio.Task[None] | None = None
        self.sock: zmq.asyncio.Socket | None = None

    def _open(self) -> zmq.asyncio.Socket:
        if self.sock is None:
            self.sock = open_socket(self.ctx, zmq.DEALER)
            self.security.connect_to(self.sock, self.endpoint, self.server_site)
            self.sock.connect(self.endpoint)
            self._task = asyncio.create_task(self._reader(self.sock), name="rpc-client")
        return self.sock

    async def _reader(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sock.recv_multipart()
            try:
                rep = ReplyEnvelope.model_validate_json(frames[-1])
            except ValidationError:
                continue
            fut = self._waiting.get(rep.cmd_id)
            if fut is not None and not fut.done():
                fut.set_result(rep)

    async def _drop_connection(self) -> None:
        """Close the socket (the next request opens another); the replies waited for stay
        waited for, by command id."""
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None

    async def close(self) -> None:
        await self._drop_connection()

    async def request(self, req: R | Request, *, timeout: float | None = None, cmd_id: str | None = None,
                      retries: int = 0) -> Any:
        """Send ``req`` and return its typed reply; a retry reuses the same command id (the
        command executes once) on a new connection: a reply goes back on the connection its
        request came in on, and one that broke and was made again meanwhile loses it, as
        it may lose what follows. ``retries`` is for a client used by one caller at a
        time: a reconnection also drops the replies other requests still wait for."""
        cmd_id = cmd_id or uuid.uuid4().hex
        data = commands.wrap(req, cmd_id).model_dump_json().encode()
        if cmd_id in self._waiting:  # the same command is already on its way: share its reply
            rep = await asyncio.wait_for(asyncio.shield(self._waiting[cmd_id]), timeout or self.timeout_s)
            return self._result(req, rep)
        fut: asyncio.Future[ReplyEnvelope] = asyncio.get_running_loop().create_future()
        self._waiting[cmd_id] = fut
        try:
            for attempt in range(retries + 1):
                if attempt:
                    await self._drop_connection()
                await self._open().send(data)
                try:
                    rep = await asyncio.wait_for(asyncio.shield(fut), timeout or self.timeout_s)
                    break
                except asyncio.TimeoutError:
                    if attempt == retries:
                        raise RequestTimeout(f"{req.TYPE}: no reply from {self.endpoint} in time") from None
        finally:
            self._waiting.pop(cmd_id, None)
            if not fut.done():
                fut.cancel()
        return self._result(req, rep)

    @staticmethod
    def _result(req: Request, rep: ReplyEnvelope) -> Any:
        if not rep.ok:
            assert rep.error is not None
            raise RequestError(rep.error.code, rep.error.message)
        return type(req).Reply.model_validate(rep.result)
