"""Replay: a subscriber asks a publisher's outbox for the events it missed (zguide's Clone
pattern), over DEALER -> the publisher's ROUTER.

The wire, typed like every other message and versioned on its own (:data:`REPLAY_VERSION`,
apart from the events' ``envelope.PROTOCOL_MAJOR``):

- request: one frame, a :class:`ReplayRequest` (``topic``, ``(after, upto]``);
- reply: a :class:`ReplayHead` frame (what was asked, ``n`` rows, the publisher's committed
  ``last`` of the topic) then the ``n`` rows, each an event envelope as published (decoded
  and checked like a live event); or a single :class:`ReplayRefused` frame.

A message carries its envelope fields (``v``, ``type``, ``id``) beside its body's, so that a
publisher of before (version 1: untyped JSON, no ``v``) still answers, and its subscriber
learns why it is refused instead of waiting out a timeout. Anything else undecodable, of
another version, or not matching what was asked is refused and changes nothing: the
publisher answers a :class:`ReplayRefused`, the subscriber counts a drop and backs off.

:class:`ReplayServer` is the publisher's side, :class:`Replays` the subscriber's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal, Union

import zmq
import zmq.asyncio
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from . import envelope
from .envelope import Envelope
from .errors import DecodeError
from .keys import Security
from .outbox import Outbox
from .retry import Backoff, worth_logging
from .sockets import DropCounter, open_socket

log = logging.getLogger(__name__)

REPLAY_VERSION = 2
"""The replay protocol's own schema version. 1: the untyped JSON of before (no ``v``)."""

Seq = Annotated[int, Field(ge=0, lt=2**63)]


class ReplayMessage(BaseModel):
    """The envelope fields of every replay message."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    v: int = REPLAY_VERSION
    id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")

    def encode(self) -> bytes:
        return self.model_dump_json().encode()


class ReplayRequest(ReplayMessage):
    """Send the committed events of ``topic`` with seq in ``(after, upto]`` (the publisher may
    send fewer: at most a chunk, never past its committed last)."""

    type: Literal["bus.replay"] = "bus.replay"
    topic: str = Field(min_length=1, max_length=200)
    after: Seq
    upto: Seq


class ReplayHead(ReplayMessage):
    """The answer to a request (same ``id``, ``topic``, ``after``, ``upto``): ``n`` rows follow.
    ``last`` is the publisher's committed last seq of the topic (0: none)."""

    type: Literal["bus.replay_head"] = "bus.replay_head"
    topic: str = Field(min_length=1, max_length=200)
    after: Seq
    upto: Seq
    n: int = Field(ge=0)
    last: Seq


class ReplayRefused(ReplayMessage):
    """The request was not served: ``code`` is a drop cause (``garbage``, ``invalid``,
    ``version``...), ``message`` says it for people. ``id`` is the request's when it had one."""

    type: Literal["bus.replay_refused"] = "bus.replay_refused"
    id: str = Field(default="-", min_length=1, max_length=64)
    code: str = Field(max_length=60)
    message: str = Field(max_length=300)


REQUEST: TypeAdapter[ReplayRequest] = TypeAdapter(ReplayRequest)
REPLY: TypeAdapter[ReplayHead | ReplayRefused] = TypeAdapter(
    Annotated[Union[ReplayHead, ReplayRefused], Field(discriminator="type")])


def _decode(adapter: TypeAdapter[Any], data: bytes) -> Any:
    """Decode one replay frame or raise :class:`DecodeError` (cause ``version`` for another
    version of the protocol, such as the untyped replay of version 1)."""
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise DecodeError("garbage", f"not JSON: {bytes(data[:80])!r}") from None
    if not isinstance(raw, dict):
        raise DecodeError("garbage", f"not a JSON object: {bytes(data[:80])!r}")
    v = raw.get("v", 1)
    if v != REPLAY_VERSION:
        raise DecodeError("version", f"replay version {str(v)[:20]} (this side speaks version {REPLAY_VERSION}"
                                     f"{'; version 1 is the untyped replay of before: upgrade that side' if v == 1 else ''})")
    try:
        return adapter.validate_python(raw)
    except ValidationError as err:
        raise DecodeError(envelope.cause_of(err), str(err.errors(include_url=False, include_input=False)[:2])) from None


def decode_request(data: bytes) -> ReplayRequest:
    req: ReplayRequest = _decode(REQUEST, data)
    return req


def decode_reply(data: bytes) -> ReplayHead | ReplayRefused:
    rep: ReplayHead | ReplayRefused = _decode(REPLY, data)
    return rep


def _request_id(data: bytes) -> str:
    """The id of a request that did not decode, if it has a usable one (for the refusal)."""
    try:
        raw = json.loads(data)
        rid = raw.get("id") if isinstance(raw, dict) else None
        return ReplayRefused.model_validate({"id": rid, "code": "-", "message": "-"}).id
    except (ValueError, UnicodeDecodeError, ValidationError):
        return "-"


# --- the publisher's side -------------------------------------------------------------


class ReplayServer:
    """Serves ``outbox`` ranges on a ROUTER: each request answered with its head and rows,
    anything undecodable with a :class:`ReplayRefused` (and a counted drop)."""

    def __init__(self, sock: zmq.asyncio.Socket, outbox: Outbox, *, name: str) -> None:
        self.sock, self.outbox = sock, outbox
        self.drops = DropCounter(name)
        self.served = 0
        self.refused = 0

    def answer(self, data: bytes) -> list[bytes]:
        """The reply frames to one request frame."""
        try:
            req = decode_request(data)
        except DecodeError as e:
            self.drops.drop(e.cause, e.detail)
            self.refused += 1
            return [ReplayRefused(id=_request_id(data), code=e.cause, message=f"{e.cause}: {e.detail}"[:300]).encode()]
        rows = self.outbox.range(req.topic, req.after, req.upto)
        head = ReplayHead(id=req.id, topic=req.topic, after=req.after, upto=req.upto, n=len(rows),
                          last=self.outbox.committed.get(req.topic, 0))
        self.served += 1
        return [head.encode(), *rows]

    async def serve(self) -> None:
        while True:
            frames = await self.sock.recv_multipart()
            if len(frames) < 2:
                self.drops.drop("frames", f"{len(frames)} frames")
                continue
            await self.sock.send_multipart([frames[0], *self.answer(frames[-1])])


# --- the subscriber's side ------------------------------------------------------------

Batch = list[tuple[Envelope, tuple[str, str]]]


class Replays:
    """A subscriber's replays: what it wants replayed, per source, and one task per source
    fetching it from the endpoint that source's own heartbeat announced.

    Each fetch waits at most ``timeout_s``; a replay that timed out, was refused or did not
    deliver backs that source off (:class:`~.retry.Backoff` from ``timeout_s`` up to
    ``BACKOFF_MAX_S``) until its heartbeat after that; a source that restarts at a new
    endpoint starts afresh. Rows are applied through ``apply`` (the subscriber's batch
    apply: it returns how many of a batch it applied or read past) and move ``offsets``
    only so: a replay never moves an offset on the publisher's word alone.
    """

    BACKOFF_MAX_S = 60.0

    def __init__(self, ctx: zmq.asyncio.Context, security: Security, *, name: str, timeout_s: float,
                 offsets: dict[tuple[str, str], int], drops: DropCounter,
                 apply: Callable[[Batch], Awaitable[int]], max_batch: int) -> None:
        self.ctx, self.security, self.name, self.timeout_s = ctx, security, name, timeout_s
        self.offsets, self.drops, self.apply, self.max_batch = offsets, drops, apply, max_batch
        self.at: dict[str, str] = {}
        """source -> the replay endpoint its own heartbeat announced"""
        self.running: dict[str, asyncio.Task[None]] = {}  # source -> its running replay
        self.backoff: dict[str, Backoff] = {}  # source -> its backoff (only while backing off)
        self.failed_at: dict[str, str] = {}  # source -> the replay endpoint its backoff was earned at
        self.holding = False  # a batch is being collected: replays asked for start after it commits
        self._want: dict[str, dict[str, int]] = {}  # source -> topic -> replay through this seq

    def announce(self, source: str, endpoint: str) -> None:
        """``source``'s own heartbeat says where it replays."""
        failed_at = self.failed_at.get(source)
        if failed_at is not None and failed_at != endpoint:
            # the source restarted at a new endpoint: the old one's backoff says nothing of it
            # (one replay at a time per source still bounds what a source can make us try)
            self.backoff.pop(source, None)
            self.failed_at.pop(source, None)
        self.at[source] = endpoint

    def want(self, source: str, topic: str, upto: int) -> None:
        """Replay ``topic`` of ``source`` through ``upto``: in that source's own task,
        started once the batch being collected has committed."""
        want = self._want.setdefault(source, {})
        want[topic] = max(want.get(topic, 0), upto)
        if not self.holding:
            self._start(source)

    def start_wanted(self) -> None:
        for source in list(self._want):
            self._start(source)

    async def stop(self) -> None:
        tasks = list(self.running.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.running.clear()

    def _start(self, source: str) -> None:
        if source in self.running or source not in self._want:
            return  # the running replay takes it along
        backoff = self.backoff.get(source)
        if not self.at.get(source) or (backoff is not None and backoff.wait_left() > 0):
            del self._want[source]  # the source's next heartbeat (after the backoff) asks again
            return
        self.running[source] = asyncio.create_task(self._replay_source(source), name=f"{self.name}-replay")

    async def _replay_source(self, source: str) -> None:
        endpoint = self.at[source]
        sock: zmq.asyncio.Socket | None = None
        outcome = "done"
        try:
            sock = open_socket(self.ctx, zmq.DEALER)
            self.security.connect_to(sock, endpoint, source.split("/", 1)[0])
            sock.connect(endpoint)
            while outcome == "done" and (want := self._want.get(source)):
                topic = next(iter(want))
                upto = want[topic]
                outcome = await self._replay(sock, source, topic, upto)
                if outcome == "done" and want.get(topic) == upto:  # not asked for more meanwhile
                    del want[topic]
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - e.g. a site not on this side's allow-list
            self.drops.drop("replay_error", f"{source} at {endpoint[:100]!r}: {e}")
            outcome = "error"
        finally:
            if sock is not None:
                sock.close(0)
            self._want.pop(source, None)
            self.running.pop(source, None)
        if outcome == "done":
            self.backoff.pop(source, None)
            self.failed_at.pop(source, None)
        elif outcome != "failed":  # the handler failed: retried on the next heartbeat, as ever
            backoff = self.backoff.get(source)
            if backoff is None:
                backoff = self.backoff[source] = Backoff(self.timeout_s, self.BACKOFF_MAX_S)
            delay = backoff.failed()
            if worth_logging(backoff.failures):
                log.warning("%s: replay from %s (%s) %s; retrying with backoff (now %.0f s, %d failures in a row)",
                            self.name, source, endpoint[:100], outcome.replace("_", " "), delay, backoff.failures)
            self.failed_at[source] = endpoint
            if outcome == "timed_out" and self.at.get(source) == endpoint:
                del self.at[source]  # no more tries until the source beats again

    async def _replay(self, sock: zmq.asyncio.Socket, source: str, topic: str, upto: int) -> str:
        """Fetch and apply (offset, upto] of one topic of ``source``: ``done`` when the
        publisher proved it has nothing more up to ``upto``, else why not."""
        key = (source, topic)
        while (after := self.offsets.get(key, 0)) < upto:
            got = await self._fetch(sock, source, topic, after, upto)
            if isinstance(got, str):
                return got
            last, rows = got
            if not rows:
                if last <= after:
                    return "done"  # its own committed last: nothing is missing
                self.drops.drop("replay_unproven", f"{source} {topic}: nothing after {after}, last {last}")
                return "did_not_deliver"
            batch: Batch = []
            have = after
            outcome = ""
            for data in rows:
                try:
                    env = envelope.decode_json(data)
                except DecodeError as e:
                    self.drops.drop(e.cause, e.detail)
                    outcome = "sent_undecodable_events"
                    break
                if env.source != source or env.topic != topic:
                    self.drops.drop("replay_foreign", f"{source} {topic} returned {env.source} {env.topic}")
                    outcome = "sent_foreign_events"
                    break
                if env.seq <= have:
                    continue
                if env.seq > have + 1:  # the publisher pruned them
                    self.drops.drop("pruned", f"{topic} seqs {have + 1}..{env.seq - 1}")
                batch.append((env, key))
                have = env.seq
            for start in range(0, len(batch), self.max_batch):  # what came before a bad row still counts
                chunk = batch[start:start + self.max_batch]
                if await self.apply(chunk) < len(chunk):
                    return "failed"
            if outcome:
                return outcome
            if self.offsets.get(key, 0) <= after:  # rows, but nothing new: no progress
                self.drops.drop("replay_unproven", f"{source} {topic}: no event after {after}")
                return "did_not_deliver"
        return "done"

    async def _fetch(self, sock: zmq.asyncio.Socket, source: str, topic: str, after: int,
                     upto: int) -> tuple[int, list[bytes]] | str:
        """One replay request: (the publisher's committed last, the rows), or the outcome
        that ends this replay (``timed_out``, ``refused``, ``sent_an_invalid_reply``...)."""
        req = ReplayRequest(id=uuid.uuid4().hex, topic=topic, after=after, upto=upto)
        await sock.send(req.encode())
        deadline = time.monotonic() + self.timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if not await sock.poll(left * 1000):
                break
            frames = await sock.recv_multipart()
            try:
                head = decode_reply(frames[0])
            except DecodeError as e:
                self.drops.drop(f"replay_{e.cause}", f"{source}: {e.detail}")
                if e.cause == "version":
                    return f"speaks another replay version ({e.detail})"
                return "sent_an_invalid_reply"
            if head.id != req.id:
                continue  # the answer to an earlier request of this socket
            if isinstance(head, ReplayRefused):
                self.drops.drop("replay_refused", f"{source} {topic}: {head.code}: {head.message}")
                return f"refused ({head.code})"
            if (head.topic, head.after, head.upto) != (topic, after, upto) or head.n != len(frames) - 1:
                self.drops.drop("replay_invalid", f"{source} {topic}: asked ({after}, {upto}], answered "
                                                  f"{head.topic[:80]} ({head.after}, {head.upto}] with "
                                                  f"{len(frames) - 1} rows for n={head.n}")
                return "sent_an_invalid_reply"
            return head.last, frames[1:]
        self.drops.drop("replay_timeout", f"{source} {topic} after {after}")
        return "timed_out"
