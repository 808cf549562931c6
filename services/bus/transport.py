"""Pub/sub through the hub with no loss, and request/reply with exactly-once commands.

Publisher: each event is written to the outbox (group commit) before it is sent; a
heartbeat carries the last seq of each topic and the publisher's replay endpoint.
Subscriber: applies each event inside a store transaction that also records the last
applied seq per (source, topic); on a gap, a heartbeat ahead of it, or a restart it asks
the publisher's replay endpoint (ROUTER) for what it missed (zguide's Clone pattern).
Request/reply: DEALER -> ROUTER with typed requests; the server remembers the reply of
every executed command id in the same transaction as the command's effects.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import zmq
import zmq.asyncio
from pydantic import ValidationError

from . import commands, envelope
from .commands import Reply, ReplyEnvelope, Request
from .envelope import Envelope
from .errors import DecodeError, GridtradeError, RequestError, RequestTimeout
from .events import Heartbeat, Message
from .keys import Security
from .outbox import Outbox
from .store import Store

log = logging.getLogger(__name__)

HEARTBEAT_TOPIC = "bus.heartbeat"
R = TypeVar("R", bound=Reply)


class _Unset:
    """``cause`` not given: take ``envelope.current_cause``."""


_FROM_CONTEXT = _Unset()


def _socket(ctx: zmq.asyncio.Context, kind: int) -> zmq.asyncio.Socket:
    sock = ctx.socket(kind)
    sock.linger = 0
    return sock


class DropCounter:
    """Counts dropped frames by cause; logs the first of each cause only."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.counts: Counter[str] = Counter()

    def drop(self, cause: str, detail: str = "") -> None:
        self.counts[cause] += 1
        if self.counts[cause] == 1:
            log.warning("%s: dropped a frame (%s) %s; further drops of this cause are only counted",
                        self.what, cause, detail[:300])


# --- publisher ------------------------------------------------------------------------


class Publisher:
    """``await publish(body)`` returns once the event is durable in the outbox.

    Inside a store transaction the event joins that transaction (it is sent when it
    commits, and vanishes if it rolls back), so state and events change together.
    """

    def __init__(self, ctx: zmq.asyncio.Context, security: Security, store: Store, *, source: str,
                 hub_pub: str, hub_site: str = "market", replay_bind: str = "tcp://127.0.0.1:*",
                 advertise_host: str | None = None, heartbeat_s: float = 1.0, keep: int = 100_000) -> None:
        self.ctx, self.security, self.store, self.source = ctx, security, store, source
        self.site = source.split("/", 1)[0]
        self.outbox = Outbox(store, source)
        self.hub_pub, self.hub_site = hub_pub, hub_site
        self.replay_bind, self.advertise_host = replay_bind, advertise_host
        self.heartbeat_s = heartbeat_s
        self.keep = keep
        self.replay_endpoint = ""
        self._queue: list[tuple[Message, str | None, asyncio.Future[Envelope]]] = []
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._hb_seq = 0
        self.sent = 0

    async def start(self) -> None:
        self.pub = _socket(self.ctx, zmq.PUB)
        self.pub.sndhwm = 100_000
        self.security.connect_to(self.pub, self.hub_pub, self.hub_site)
        self.pub.connect(self.hub_pub)
        self.router = _socket(self.ctx, zmq.ROUTER)
        self.security.serve(self.router, self.replay_bind)
        self.router.bind(self.replay_bind)
        endpoint = self.router.last_endpoint.decode()
        if self.advertise_host and endpoint.startswith("tcp://"):
            endpoint = f"tcp://{self.advertise_host}:{endpoint.rsplit(':', 1)[1]}"
        self.replay_endpoint = endpoint
        self._tasks = [asyncio.create_task(self._flusher(), name="bus-flush"),
                       asyncio.create_task(self._heartbeats(), name="bus-heartbeat"),
                       asyncio.create_task(self._replayer(), name="bus-replay")]

    async def stop(self) -> None:
        """Flush what is queued, then stop. Closing twice is harmless."""
        if self._queue:
            self._wake.set()
            await asyncio.sleep(0)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.gather(*(f for _, _, f in list(self._queue))), 5)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for s in ("pub", "router"):
            if hasattr(self, s):
                getattr(self, s).close(0)

    def stage(self, body: Message, cause: str | None | _Unset = _FROM_CONTEXT) -> Envelope:
        """Write ``body`` into the current task's open transaction; sent after COMMIT.
        Its envelope's ``cause`` is ``envelope.current_cause`` unless given."""
        if isinstance(cause, _Unset):
            cause = envelope.current_cause.get()
        env, frames = self.outbox.append(self.store.conn, body, cause)
        self.store.on_commit(lambda: self._send(frames))
        return env

    async def publish(self, body: Message, cause: str | None | _Unset = _FROM_CONTEXT) -> Envelope:
        if isinstance(cause, _Unset):
            cause = envelope.current_cause.get()
        if self.store.in_transaction:
            return self.stage(body, cause)
        fut: asyncio.Future[Envelope] = asyncio.get_running_loop().create_future()
        self._queue.append((body, cause, fut))
        self._wake.set()
        return await fut

    def _send(self, frames: list[bytes]) -> None:
        try:
            self.pub.send_multipart(frames, flags=zmq.NOBLOCK)
            self.sent += 1
        except zmq.Again:  # the outbox has it: subscribers replay on the next heartbeat
            pass

    async def _flusher(self) -> None:
        """Group commit: everything queued since the last commit goes in one transaction."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._queue = self._queue, []
            if not batch:
                continue
            done: list[tuple[asyncio.Future[Envelope], Envelope]] = []
            try:
                async with self.store.atomic():
                    for body, cause, fut in batch:
                        done.append((fut, self.stage(body, cause)))
            except Exception as e:  # noqa: BLE001 - handed to every waiter
                for _, _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            for fut, env in done:
                if not fut.done():
                    fut.set_result(env)

    async def _heartbeats(self) -> None:
        beats = 0
        while True:
            self.beat()
            beats += 1
            if beats % 600 == 1:
                async with self.store.atomic() as conn:
                    self.outbox.prune(conn, self.keep)
            await asyncio.sleep(self.heartbeat_s)

    def beat(self) -> None:
        self._hb_seq += 1
        hb = Heartbeat(node=self.source, replay=self.replay_endpoint, site=self.site, last=dict(self.outbox.committed))
        self._send(envelope.encode(envelope.make(hb, source=self.source, seq=self._hb_seq)))

    async def _replayer(self) -> None:
        drops = DropCounter(f"replay {self.source}")
        while True:
            frames = await self.router.recv_multipart()
            ident, payload = frames[0], frames[-1]
            try:
                req = json.loads(payload)
                topic, after, upto = str(req["topic"]), int(req["after"]), int(req["upto"])
            except (ValueError, KeyError, TypeError) as e:
                drops.drop("invalid", str(e))
                continue
            rows = self.outbox.range(topic, after, upto)
            head = json.dumps({"topic": topic, "after": after, "upto": upto, "n": len(rows),
                               "last": self.outbox.committed.get(topic, 0)}).encode()
            await self.router.send_multipart([ident, head, *rows])


# --- subscriber -----------------------------------------------------------------------

Handler = Callable[[Envelope, Any], "Awaitable[None] | None"]


class Subscriber:
    """Applies events matching ``prefixes`` exactly once, in order per (source, topic).

    ``start="latest"`` (live views such as a websocket feed or ``bus tail``) applies only
    events stamped after the subscriber started, still replaying those it missed.
    """

    LATEST_LOOKBACK = 200

    def __init__(self, ctx: zmq.asyncio.Context, security: Security, store: Store, *, hub_sub: str,
                 hub_site: str = "market", prefixes: Iterable[str], handler: Handler,
                 start: str = "earliest", replay_timeout_s: float = 3.0, name: str = "subscriber") -> None:
        if start not in ("earliest", "latest"):
            raise ValueError("start is 'earliest' or 'latest'")
        self.ctx, self.security, self.store = ctx, security, store
        self.hub_sub, self.hub_site = hub_sub, hub_site
        self.prefixes = [p for p in prefixes]
        self.handler = handler
        self.start_mode = start
        self.replay_timeout_s = replay_timeout_s
        self.name = name
        self.offsets = store.offsets()
        self.replay_at: dict[str, str] = {}
        self.drops = DropCounter(name)
        self.applied = 0
        self.failed = 0
        self._replay_socks: dict[str, zmq.asyncio.Socket] = {}
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()
        self.since = time.time() if start == "latest" else 0.0

    def wants(self, topic: str) -> bool:
        return any(topic.startswith(p) for p in self.prefixes)

    async def start(self) -> None:
        self.sub = _socket(self.ctx, zmq.SUB)
        self.sub.rcvhwm = 100_000
        self.security.connect_to(self.sub, self.hub_sub, self.hub_site)
        for p in [*self.prefixes, HEARTBEAT_TOPIC]:
            self.sub.subscribe(p.encode())
        self.sub.connect(self.hub_sub)
        self._task = asyncio.create_task(self._run(), name=f"{self.name}-recv")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for s in self._replay_socks.values():
            s.close(0)
        self._replay_socks.clear()
        if hasattr(self, "sub"):
            self.sub.close(0)

    async def _run(self) -> None:
        while True:
            frames = await self.sub.recv_multipart()
            try:
                env = envelope.decode(frames)
            except DecodeError as e:
                self.drops.drop(e.cause, e.detail)
                continue
            try:
                if isinstance(env.body, Heartbeat):
                    self.connected.set()
                    await self._on_heartbeat(env.body)
                elif self.wants(env.topic):
                    await self._on_event(env)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the subscriber keeps working
                log.exception("%s: failed on %s seq %s", self.name, env.topic, env.seq)

    async def _on_heartbeat(self, hb: Heartbeat) -> None:
        self.replay_at[hb.node] = hb.replay
        for topic, last in hb.last.items():
            if not self.wants(topic):
                continue
            key = (hb.node, topic)
            if key not in self.offsets and self.start_mode == "latest":
                self.offsets[key] = max(0, last - self.LATEST_LOOKBACK)
            if last > self.offsets.get(key, 0):
                await self._replay(hb.node, topic, last)

    async def _on_event(self, env: Envelope) -> None:
        key = (env.source, env.topic)
        if key not in self.offsets and self.start_mode == "latest":
            self.offsets[key] = max(0, env.seq - 1 - self.LATEST_LOOKBACK)
        have = self.offsets.get(key, 0)
        if env.seq <= have:
            self.drops.drop("duplicate", f"{env.topic} seq {env.seq}")
            return
        if env.seq > have + 1 and not await self._replay(env.source, env.topic, env.seq - 1):
            return  # the outbox keeps it: the next heartbeat brings it back in order
        await self._apply(env)

    async def _replay(self, source: str, topic: str, upto: int) -> bool:
        """Fetch and apply (offset, upto] from the source's outbox; True if complete."""
        endpoint = self.replay_at.get(source)
        if not endpoint:
            return False
        while self.offsets.get((source, topic), 0) < upto:
            after = self.offsets.get((source, topic), 0)
            rows = await self._fetch(source, endpoint, topic, after, upto)
            if rows is None:
                return False
            if not rows:  # nothing stored in that range: the gap was never written
                self.offsets[(source, topic)] = upto
                return True
            for data in rows:
                try:
                    env = envelope.decode_json(data)
                except DecodeError as e:
                    self.drops.drop(e.cause, e.detail)
                    return False
                if env.seq > self.offsets.get((source, topic), 0) + 1:  # the publisher pruned them
                    self.drops.drop("pruned", f"{topic} seqs {self.offsets.get((source, topic), 0) + 1}..{env.seq - 1}")
                if env.seq > self.offsets.get((source, topic), 0):
                    if not await self._apply(env):
                        return False
        return True

    async def _fetch(self, source: str, endpoint: str, topic: str, after: int, upto: int) -> list[bytes] | None:
        sock = self._replay_socks.get(endpoint)
        if sock is None:
            sock = _socket(self.ctx, zmq.DEALER)
            self.security.connect_to(sock, endpoint, source.split("/", 1)[0])
            sock.connect(endpoint)
            self._replay_socks[endpoint] = sock
        await sock.send(json.dumps({"topic": topic, "after": after, "upto": upto}).encode())
        deadline = time.monotonic() + self.replay_timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if not await sock.poll(left * 1000):
                break
            frames = await sock.recv_multipart()
            try:
                head = json.loads(frames[0])
            except ValueError:
                continue
            if head.get("topic") == topic and head.get("after") == after:
                return frames[1:]
        log.warning("%s: replay of %s from %s timed out; will retry on the next heartbeat", self.name, topic, endpoint)
        sock.close(0)
        self._replay_socks.pop(endpoint, None)
        if self.replay_at.get(source) == endpoint:  # no more tries until the source beats again
            del self.replay_at[source]
        return None

    async def _apply(self, env: Envelope) -> bool:
        key = (env.source, env.topic)
        if env.ts < self.since:  # "latest": what came before this subscriber started is skipped
            self.offsets[key] = env.seq
            return True
        try:
            async with self.store.atomic() as conn:
                with envelope.caused_by(env.id):  # what the handler publishes was caused by env
                    result = self.handler(env, conn)
                    if inspect.isawaitable(result):
                        await result
                conn.execute("INSERT INTO bus_offsets (source, topic, seq) VALUES (?, ?, ?) "
                             "ON CONFLICT (source, topic) DO UPDATE SET seq = excluded.seq",
                             (env.source, env.topic, env.seq))
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - not applied: retried from the outbox later
            self.failed += 1
            if self.failed < 20 or self.failed % 100 == 0:
                log.exception("%s: handler failed on %s seq %s (will retry)", self.name, env.topic, env.seq)
            return False
        self.offsets[key] = env.seq
        self.applied += 1
        return True


# --- request / reply ------------------------------------------------------------------

RpcHandler = Callable[[Any], Awaitable[Reply]]


class RpcServer:
    """ROUTER: typed requests, one handler each; a command id executes at most once."""

    def __init__(self, ctx: zmq.asyncio.Context, security: Security, store: Store, *, bind: str,
                 name: str = "rpc") -> None:
        self.ctx, self.security, self.store, self.bind_to, self.name = ctx, security, store, bind, name
        self.handlers: dict[str, tuple[RpcHandler, Callable[[Any], Awaitable[Any]] | None]] = {}
        self.drops = DropCounter(name)
        self.executed = 0
        self._task: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self.started = time.time()

    def handle(self, req_cls: type[Request], fn: RpcHandler,
               prefetch: Callable[[Any], Awaitable[Any]] | None = None) -> None:
        """``fn(req)`` runs inside the store transaction that remembers its reply. With
        ``prefetch``, ``fn(req, await prefetch(req))``: what the command must ask other
        services is asked before the transaction, so a slow peer holds up only this command."""
        self.handlers[req_cls.TYPE] = (fn, prefetch)

    async def start(self) -> None:
        self.sock = _socket(self.ctx, zmq.ROUTER)
        self.security.serve(self.sock, self.bind_to)
        self.sock.bind(self.bind_to)
        self.endpoint = self.sock.last_endpoint.decode()
        self._task = asyncio.create_task(self._run(), name=f"{self.name}-serve")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._inflight:
            await asyncio.wait(self._inflight, timeout=5)
            for t in self._inflight:
                t.cancel()
            await asyncio.gather(*self._inflight, return_exceptions=True)
        if hasattr(self, "sock"):
            self.sock.close(0)

    async def _run(self) -> None:
        while True:
            frames = await self.sock.recv_multipart()
            if len(frames) < 2:
                self.drops.drop("frames")
                continue
            t = asyncio.create_task(self._serve(frames[0], frames[-1]))
            self._inflight.add(t)
            t.add_done_callback(self._inflight.discard)

    async def _serve(self, ident: bytes, data: bytes) -> None:
        reply = await self.execute(data)
        with contextlib.suppress(zmq.ZMQError):
            await self.sock.send_multipart([ident, reply.model_dump_json().encode()])

    async def execute(self, data: bytes) -> ReplyEnvelope:
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
                                 error=commands.ErrorInfo(code="bad_request", message=f"{e.cause}: {e.detail}"[:2000]))
        fn, prefetch = self.handlers.get(env.type, (None, None))
        if fn is None:
            return ReplyEnvelope(cmd_id=env.cmd_id, ok=False,
                                 error=commands.ErrorInfo(code="unsupported", message=f"{self.name} does not serve {env.type}"))
        cause = envelope.current_cause.set(env.cmd_id)  # what the handler publishes was caused by this command
        try:
            if env.body.READ_ONLY:
                result = await fn(env.body)  # type: ignore[misc]
            else:
                args: tuple[Any, ...] = ()
                if prefetch is not None:
                    if (done := self._remembered(env.cmd_id)) is not None:
                        return done
                    args = (await prefetch(env.body),)
                async with self.store.atomic() as conn:
                    if (done := self._remembered(env.cmd_id)) is not None:
                        return done
                    result = await fn(env.body, *args)
                    out = self._ok(env, result)
                    conn.execute("INSERT INTO bus_commands (cmd_id, type, reply, ts) VALUES (?, ?, ?, ?)",
                                 (env.cmd_id, env.type, out.model_dump_json(), time.time()))
                    self.executed += 1
                    return out
        except RequestError as e:
            return ReplyEnvelope(cmd_id=env.cmd_id, ok=False, error=commands.ErrorInfo(code=e.code, message=e.message))
        except GridtradeError as e:
            return ReplyEnvelope(cmd_id=env.cmd_id, ok=False, error=commands.ErrorInfo(code="failed", message=str(e)))
        except Exception:  # noqa: BLE001 - a bug must not take the server down
            log.exception("%s: %s failed", self.name, env.type)
            return ReplyEnvelope(cmd_id=env.cmd_id, ok=False,
                                 error=commands.ErrorInfo(code="internal", message="internal error; see the service log"))
        finally:
            envelope.current_cause.reset(cause)
        self.executed += 1
        return self._ok(env, result)

    def _remembered(self, cmd_id: str) -> ReplyEnvelope | None:
        row = self.store.conn.execute("SELECT reply FROM bus_commands WHERE cmd_id = ?", (cmd_id,)).fetchone()
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
            self.sock = _socket(self.ctx, zmq.DEALER)
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

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None

    async def request(self, req: R | Request, *, timeout: float | None = None, cmd_id: str | None = None,
                      retries: int = 0) -> Any:
        """Send ``req`` and return its typed reply; a retry reuses the same command id."""
        cmd_id = cmd_id or uuid.uuid4().hex
        data = commands.wrap(req, cmd_id).model_dump_json().encode()
        if cmd_id in self._waiting:  # the same command is already on its way: share its reply
            rep = await asyncio.wait_for(asyncio.shield(self._waiting[cmd_id]), timeout or self.timeout_s)
            return self._result(req, rep)
        fut: asyncio.Future[ReplyEnvelope] = asyncio.get_running_loop().create_future()
        self._waiting[cmd_id] = fut
        try:
            for attempt in range(retries + 1):
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
