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
from dataclasses import dataclass
from typing import Any, TypeVar

import zmq
import zmq.asyncio
from pydantic import ValidationError

from . import commands, envelope, events
from .commands import Reply, ReplyEnvelope, Request
from .envelope import Envelope
from .errors import DecodeError, GridtradeError, RequestError
from .refusals import BadRequest, Busy, Failed, Internal, RequestTimeout, Unsupported
from .events import Authority, Heartbeat, Message
from .keys import Security, peer_site
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
    """Counts dropped frames by cause; logs the first of each cause only.

    Bounded whatever a peer sends: causes are a fixed set (never built from what a peer
    sent, beyond a known event type), and besides at most ``MAX_CAUSES`` distinct causes
    are kept (any further cause is counted as ``other``), a cause is cut to 60 characters
    and a logged detail to 300."""

    MAX_CAUSES = 64

    def __init__(self, what: str) -> None:
        self.what = what
        self.counts: Counter[str] = Counter()

    def drop(self, cause: str, detail: str = "") -> None:
        cause = str(cause)[:60]
        if cause not in self.counts and len(self.counts) >= self.MAX_CAUSES:
            cause = "other"
        self.counts[cause] += 1
        if self.counts[cause] == 1:
            log.warning("%s: dropped a frame (%s) %r; further drops of this cause are only counted",
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

    Trust: with CURVE on, the hub lets through only events whose source site is the
    sending key's site, so the source's site is the one thing believed about an event.
    Every event, live or replayed, passes its type's publish policy
    (:class:`~services.bus.events.Origin`, checked against ``authority``: who the market's
    auction and chain service are) before the handler sees it; one that fails is dropped
    (cause ``policy:<type>``) and never applied, but its seq still counts as read, so that
    source's stream goes on. Heartbeats pass the same check: a heartbeat speaks only for
    the node that sent it, and only its topics of its own site. Without CURVE
    (``insecure``) anyone can publish as any source, and the policy stops nobody.

    Offsets move only on what a publisher proves: events it returns from its outbox (a
    replay that starts past the offset means it pruned them: counted ``pruned``), or its
    replay head saying its committed ``last`` is not past the offset (nothing missing). A
    heartbeat's ``last`` only asks for a replay. Each source replays in its own task, from
    the endpoint its own heartbeat announced, with a bounded wait and a backoff after a
    replay that timed out or did not deliver; meanwhile that source's live events are left
    to the replay and the other sources' keep flowing.

    Batches: what the socket holds when the subscriber wakes (at most ``max_batch``
    frames), and each replayed chunk, is applied in one store transaction, the offsets in
    it, so a crash applies all of a batch or none of it. The handler stays per event (the
    batch is only the transaction boundary): each event runs in a savepoint of its own, so
    a handler that fails on one event undoes that event alone; the later events of the
    same (source, topic) in the batch are held back (in order, they are retried from the
    outbox like the failed one, on the source's next heartbeat) and the others commit,
    each applied once. Heartbeats in a batch are looked at after it commits, and replays
    start only then, so a replay never races the batch for the same events.
    """

    LATEST_LOOKBACK = 200
    MAX_SOURCES_PER_SITE = 32
    """A site speaks through at most this many sources (site/service); more are dropped
    (cause ``sources``) so that no site can grow a subscriber's state without bound."""
    REPLAY_BACKOFF_MAX_S = 60.0
    MAX_BATCH = 2048
    """Frames applied in one transaction at most: enough that a slow fsync (a busy disk: tens of
    ms) does not cap the rate (2048 events of 25 us hold the store about 50 ms)."""

    def __init__(self, ctx: zmq.asyncio.Context, security: Security, store: Store, *, hub_sub: str,
                 hub_site: str = "market", prefixes: Iterable[str], handler: Handler,
                 start: str = "earliest", replay_timeout_s: float = 3.0, name: str = "subscriber",
                 authority: Authority | None = None, max_batch: int | None = None) -> None:
        if start not in ("earliest", "latest"):
            raise ValueError("start is 'earliest' or 'latest'")
        self.ctx, self.security, self.store = ctx, security, store
        self.hub_sub, self.hub_site = hub_sub, hub_site
        self.authority = authority or Authority.of(hub_site)
        self.prefixes = [p for p in prefixes]
        self.handler = handler
        self.start_mode = start
        self.replay_timeout_s = replay_timeout_s
        self.max_batch = max(1, max_batch or self.MAX_BATCH)
        """Frames taken off the socket per wake-up (1: a transaction per event, as before batches)."""
        self.name = name
        self.batches = 0
        self.largest_batch = 0
        self.offsets = store.offsets()
        self.replay_at: dict[str, str] = {}
        """source -> the replay endpoint its own heartbeat announced"""
        self.drops = DropCounter(name)
        self.applied = 0
        self.failed = 0
        self._sources: dict[str, set[str]] = {}
        for source, _ in self.offsets:
            self._sources.setdefault(source.split("/", 1)[0], set()).add(source)
        self._want: dict[str, dict[str, int]] = {}  # source -> topic -> replay through this seq
        self._replays: dict[str, asyncio.Task[None]] = {}  # source -> its running replay
        self._backoff: dict[str, tuple[float, float]] = {}  # source -> (no replay before, last delay)
        self._failed_at: dict[str, str] = {}  # source -> the replay endpoint its backoff was earned at
        self._holding = False  # collecting a batch: replays asked for start after it commits
        self._pending: dict[tuple[str, str], int] = {}  # (source, topic) -> seq of the batch being collected
        self._wanted: dict[str, bool] = {}  # topic -> wants(topic)
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()
        self.since = time.time() if start == "latest" else 0.0

    def wants(self, topic: str) -> bool:
        return any(topic.startswith(p) for p in self.prefixes)

    @property
    def replaying(self) -> set[str]:
        """The sources whose replay is running now."""
        return set(self._replays)

    async def start(self) -> None:
        self.sub = _socket(self.ctx, zmq.SUB)
        self.sub.rcvhwm = 100_000
        self.security.connect_to(self.sub, self.hub_sub, self.hub_site)
        for p in [*self.prefixes, HEARTBEAT_TOPIC]:
            self.sub.subscribe(p.encode())
        self.sub.connect(self.hub_sub)
        # the same socket seen synchronously, to drain what it holds without a Future per
        # frame (the asyncio socket looks at the socket's events before it waits again)
        self._drain = zmq.Socket.shadow(self.sub.underlying)
        self._task = asyncio.create_task(self._run(), name=f"{self.name}-recv")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._replays.values()) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._task = None
        self._replays.clear()
        if hasattr(self, "sub"):
            self.sub.close(0)

    async def _run(self) -> None:
        recv, drain, NOBLOCK = self.sub.recv_multipart, self._drain.recv_multipart, zmq.NOBLOCK  # noqa: N806
        while True:
            received = [await recv()]
            try:
                while len(received) < self.max_batch:
                    received.append(drain(NOBLOCK))
            except zmq.Again:
                pass
            self._holding = True
            beats: list[Envelope] = []
            batch: list[tuple[Envelope, tuple[str, str]]] = []
            try:
                for frames in received:
                    try:
                        env = envelope.decode(frames)
                    except DecodeError as e:
                        self.drops.drop(e.cause, e.detail)
                        continue
                    if isinstance(env.body, Heartbeat):
                        beats.append(env)
                        continue
                    topic = env.topic
                    wanted = self._wanted.get(topic)
                    if wanted is None:
                        if len(self._wanted) >= 4096:  # topics are known types of allowed sites; bound it anyway
                            self._wanted.clear()
                        wanted = self._wanted[topic] = self.wants(topic)
                    try:
                        if wanted and self._on_event(env, key := (env.source, topic)):
                            batch.append((env, key))
                    except Exception:  # noqa: BLE001 - the subscriber keeps working
                        log.exception("%s: failed on %s seq %s", self.name, topic, env.seq)
                self._pending.clear()
                if batch:
                    await self._apply_batch(batch)
            finally:
                self._pending.clear()
                self._holding = False
            for env in beats:
                try:
                    self.connected.set()
                    self._on_heartbeat(env)
                except Exception:  # noqa: BLE001 - the subscriber keeps working
                    log.exception("%s: failed on a heartbeat of %s", self.name, env.source)
            self._start_replays()

    def _admit(self, source: str) -> bool:
        """A source within its site's bound (see MAX_SOURCES_PER_SITE)."""
        known = self._sources.setdefault(source.split("/", 1)[0], set())
        if source in known:
            return True
        if len(known) >= self.MAX_SOURCES_PER_SITE:
            self.drops.drop("sources", f"{source}: its site already has {len(known)} sources")
            return False
        known.add(source)
        return True

    def _on_heartbeat(self, env: Envelope) -> None:
        hb = env.body
        assert isinstance(hb, Heartbeat)
        if not events.permitted(hb, env.source, self.authority):
            self.drops.drop(f"policy:{hb.TYPE}", f"{env.source} beat for node {hb.node[:80]!r} of site {hb.site!r}")
            return
        if not self._admit(env.source):
            return
        failed_at = self._failed_at.get(env.source)
        if failed_at is not None and failed_at != hb.replay:
            # the source restarted at a new endpoint: the old one's backoff says nothing of it
            # (one replay at a time per source still bounds what a source can make us try)
            self._backoff.pop(env.source, None)
            self._failed_at.pop(env.source, None)
        self.replay_at[env.source] = hb.replay
        own = f".{env.site}"
        for topic, last in hb.last.items():
            # only this source's own topics (type.site of a known type), so a heartbeat
            # cannot make the subscriber track topics without bound
            if not (self.wants(topic) and topic.endswith(own) and topic[:-len(own)] in events.EVENTS):
                continue
            key = (env.source, topic)
            if key not in self.offsets and self.start_mode == "latest":
                self.offsets[key] = max(0, last - self.LATEST_LOOKBACK)
            if last > self.offsets.get(key, 0):
                self._want_replay(env.source, topic, last)

    def _on_event(self, env: Envelope, key: tuple[str, str]) -> bool:
        """True if ``env`` is the next event of its (source, topic), counting the batch
        being collected: it joins the batch. Otherwise it is a duplicate (dropped) or left
        to its source's replay. ``key`` is (source, topic) of ``env``."""
        if key not in self.offsets and key not in self._pending:
            if not self._admit(env.source):
                return False
            if self.start_mode == "latest":
                self.offsets[key] = max(0, env.seq - 1 - self.LATEST_LOOKBACK)
        if env.source in self._replays:  # its replay brings this one, in order
            self._want_replay(env.source, key[1], env.seq)
            return False
        have = self._pending.get(key) or self.offsets.get(key, 0)
        if env.seq <= have:
            self.drops.drop("duplicate", f"{key[1]} seq {env.seq}")
            return False
        if env.seq > have + 1:  # a gap: the publisher's outbox has them all, this one too
            self._want_replay(env.source, key[1], env.seq)
            return False
        self._pending[key] = env.seq
        return True

    def _want_replay(self, source: str, topic: str, upto: int) -> None:
        """Replay ``topic`` of ``source`` through ``upto``: in that source's own task,
        started once the batch being collected has committed."""
        want = self._want.setdefault(source, {})
        want[topic] = max(want.get(topic, 0), upto)
        if not self._holding:
            self._start_replay(source)

    def _start_replays(self) -> None:
        for source in list(self._want):
            self._start_replay(source)

    def _start_replay(self, source: str) -> None:
        if source in self._replays or source not in self._want:
            return  # the running replay takes it along
        if not self.replay_at.get(source) or time.monotonic() < self._backoff.get(source, (0.0, 0.0))[0]:
            del self._want[source]  # the source's next heartbeat (after the backoff) asks again
            return
        self._replays[source] = asyncio.create_task(self._replay_source(source), name=f"{self.name}-replay")

    async def _replay_source(self, source: str) -> None:
        endpoint = self.replay_at[source]
        sock: zmq.asyncio.Socket | None = None
        outcome = "done"
        try:
            sock = _socket(self.ctx, zmq.DEALER)
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
            self._replays.pop(source, None)
        if outcome == "done":
            self._backoff.pop(source, None)
            self._failed_at.pop(source, None)
        elif outcome != "failed":  # the handler failed: retried on the next heartbeat, as ever
            delay = min(max(self._backoff.get(source, (0.0, 0.0))[1] * 2, self.replay_timeout_s),
                        self.REPLAY_BACKOFF_MAX_S)
            if source not in self._backoff:
                log.warning("%s: replay from %s (%s) %s; retrying with backoff (now %.0f s)", self.name, source,
                            endpoint[:100], outcome.replace("_", " "), delay)
            self._backoff[source] = (time.monotonic() + delay, delay)
            self._failed_at[source] = endpoint
            if outcome == "timed_out" and self.replay_at.get(source) == endpoint:
                del self.replay_at[source]  # no more tries until the source beats again

    async def _replay(self, sock: zmq.asyncio.Socket, source: str, topic: str, upto: int) -> str:
        """Fetch and apply (offset, upto] of one topic of ``source``: ``done`` when the
        publisher proved it has nothing more up to ``upto``, else why not."""
        key = (source, topic)
        while (after := self.offsets.get(key, 0)) < upto:
            got = await self._fetch(sock, topic, after, upto)
            if got is None:
                self.drops.drop("replay_timeout", f"{source} {topic} after {after}")
                return "timed_out"
            last, rows = got
            if not rows:
                if last is not None and last <= after:
                    return "done"  # its own committed last: nothing is missing
                self.drops.drop("replay_unproven", f"{source} {topic}: nothing after {after}, last {last}")
                return "did_not_deliver"
            batch: list[tuple[Envelope, tuple[str, str]]] = []
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
                if await self._apply_batch(chunk) < len(chunk):
                    return "failed"
            if outcome:
                return outcome
            if self.offsets.get(key, 0) <= after:  # rows, but nothing new: no progress
                self.drops.drop("replay_unproven", f"{source} {topic}: no event after {after}")
                return "did_not_deliver"
        return "done"

    async def _fetch(self, sock: zmq.asyncio.Socket, topic: str, after: int,
                     upto: int) -> tuple[int | None, list[bytes]] | None:
        """One replay request: (the publisher's committed last, the rows), or None."""
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
            if isinstance(head, dict) and head.get("topic") == topic and head.get("after") == after:
                last = head.get("last")
                return (last if type(last) is int else None), frames[1:]
        return None

    async def _apply_batch(self, batch: list[tuple[Envelope, tuple[str, str]]]) -> int:
        """Apply ``batch`` (each event with its (source, topic), the next of it, in order) in one
        transaction that also stores the offsets; returns how many events were applied or
        read past. An event its publisher may not publish is only read past. A handler
        that fails undoes its own event (a savepoint) and holds back the later events of
        that (source, topic); if the transaction itself fails, none of the batch counts."""
        done: dict[tuple[str, str], int] = {}
        held: set[tuple[str, str]] = set()
        applied = held_back = 0
        handler = self.handler
        try:
            async with self.store.atomic() as conn:
                for env, key in batch:
                    if key in held:
                        held_back += 1
                        continue
                    if env.ts < self.since:  # "latest": what came before this subscriber started is skipped
                        done[key] = env.seq
                        continue
                    if not events.permitted(env.body, env.source, self.authority):
                        self.drops.drop(f"policy:{env.type}", f"{env.source} seq {env.seq}")
                        done[key] = env.seq
                        continue
                    try:
                        with self.store.savepoint(), envelope.caused_by(env.id):
                            # what the handler publishes was caused by env
                            result = handler(env, conn)
                            if result is not None and inspect.isawaitable(result):
                                await result
                    except asyncio.CancelledError:
                        raise
                    except Exception:  # noqa: BLE001 - not applied: retried from the outbox later
                        held.add(key)
                        held_back += 1
                        self.failed += 1
                        if self.failed < 20 or self.failed % 100 == 0:
                            log.exception("%s: handler failed on %s seq %s (will retry)", self.name, env.topic,
                                          env.seq)
                        continue
                    done[key] = env.seq
                    applied += 1
                conn.executemany("INSERT INTO bus_offsets (source, topic, seq) VALUES (?, ?, ?) "
                                 "ON CONFLICT (source, topic) DO UPDATE SET seq = excluded.seq",
                                 [(s, t, q) for (s, t), q in done.items()])
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - nothing of the batch was applied: retried from the outbox
            self.failed += 1
            log.exception("%s: a batch of %d events failed to commit (will retry)", self.name, len(batch))
            return 0
        self.offsets.update(done)
        self.applied += applied
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(batch))
        return len(batch) - held_back


# --- request / reply ------------------------------------------------------------------


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
        self.started = time.time()

    def handle(self, req_cls: type[Request], fn: RpcHandler, prefetch: Prefetch | None = None) -> None:
        """``fn(req, caller)`` runs inside the store transaction that remembers its reply. With
        ``prefetch``, ``fn(req, caller, await prefetch(req, caller))``: what the command must ask
        other services is asked before the transaction, so a slow peer holds up only this command."""
        self.handlers[req_cls.TYPE] = (fn, prefetch)

    async def start(self) -> None:
        self.sock = _socket(self.ctx, zmq.ROUTER)
        self.security.serve(self.sock, self.bind_to)
        self.sock.bind(self.bind_to)
        self.endpoint = self.sock.last_endpoint.decode()
        self._task = asyncio.create_task(self._run(), name=f"{self.name}-serve")
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
        if hasattr(self, "sock"):
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

    async def _run(self) -> None:
        while True:
            frames = await self.sock.recv_multipart(copy=False)
            if len(frames) < 2:
                self.drops.drop("frames")
                continue
            caller = Caller(peer_site(frames[-1]))
            ident, data = frames[0].bytes, frames[-1].bytes
            key = caller.site or ""
            if self.inflight[key] >= self.max_inflight_per_site:
                self._refuse_busy(ident, data, caller)
                continue
            self.inflight[key] += 1
            t = asyncio.create_task(self._serve(ident, data, caller))
            self._inflight.add(t)
            t.add_done_callback(self._inflight.discard)
            t.add_done_callback(lambda _t, k=key: self._done(k))

    def _done(self, key: str) -> None:
        self.inflight[key] -= 1
        if self.inflight[key] <= 0:
            del self.inflight[key]

    def _refuse_busy(self, ident: bytes, data: bytes, caller: Caller) -> None:
        key = caller.site or ""
        self.busy[key] += 1
        if self.busy[key] == 1 or self.busy[key] % 1000 == 0:
            log.warning("%s: site %s has %d requests running; refusing more with 'busy' (%d so far)",
                        self.name, caller, self.max_inflight_per_site, self.busy[key])
        cmd_id = ""
        with contextlib.suppress(ValueError, AttributeError, TypeError):
            cmd_id = str(json.loads(data).get("cmd_id", ""))[:128]
        rep = ReplyEnvelope(cmd_id=cmd_id, ok=False, error=commands.ErrorInfo(
            code=Busy.code, message=f"too many requests of this site at once (limit {self.max_inflight_per_site}); "
                                    "nothing was done: try again shortly"))
        with contextlib.suppress(zmq.ZMQError):
            self.sock.send_multipart([ident, rep.model_dump_json().encode()], flags=zmq.NOBLOCK)

    async def _serve(self, ident: bytes, data: bytes, caller: Caller) -> None:
        reply = await self.execute(data, caller)
        with contextlib.suppress(zmq.ZMQError):
            await self.sock.send_multipart([ident, reply.model_dump_json().encode()])

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
