"""Pub/sub through the hub with no loss.

Publisher: each event is written to the outbox (group commit) before it is sent; a
heartbeat carries the last seq of each topic and the publisher's replay endpoint, where
its :class:`~.replay.ReplayServer` serves the outbox.
Subscriber: applies each event inside a store transaction that also records the last
applied seq per (source, topic); on a gap, a heartbeat ahead of it, or a restart it asks
the publisher's replay endpoint for what it missed (:class:`~.replay.Replays`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import zmq
import zmq.asyncio

from . import envelope, events
from .envelope import Envelope
from .errors import DecodeError
from .events import Authority, Heartbeat, Message
from .keys import Security
from .outbox import Outbox
from .replay import Replays, ReplayServer
from .retry import worth_logging
from .sockets import DropCounter, open_socket
from .store import Store

log = logging.getLogger(__name__)

HEARTBEAT_TOPIC = "bus.heartbeat"


class _Unset:
    """``cause`` not given: take ``envelope.current_cause``."""


_FROM_CONTEXT = _Unset()


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
        self.pub: zmq.asyncio.Socket | None = None
        self.router: zmq.asyncio.Socket | None = None
        self.replays: ReplayServer | None = None
        self._queue: list[tuple[Message, str | None, asyncio.Future[Envelope]]] = []
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._hb_seq = 0
        self.sent = 0

    async def start(self) -> None:
        self.pub = pub = open_socket(self.ctx, zmq.PUB)
        pub.sndhwm = 100_000
        self.security.connect_to(pub, self.hub_pub, self.hub_site)
        pub.connect(self.hub_pub)
        self.router = router = open_socket(self.ctx, zmq.ROUTER)
        self.security.serve(router, self.replay_bind)
        router.bind(self.replay_bind)
        endpoint = router.last_endpoint.decode()
        if self.advertise_host and endpoint.startswith("tcp://"):
            endpoint = f"tcp://{self.advertise_host}:{endpoint.rsplit(':', 1)[1]}"
        self.replay_endpoint = endpoint
        self.replays = ReplayServer(router, self.outbox, name=f"replay {self.source}")
        self._tasks = [asyncio.create_task(self._flusher(), name="bus-flush"),
                       asyncio.create_task(self._heartbeats(), name="bus-heartbeat"),
                       asyncio.create_task(self.replays.serve(), name="bus-replay")]

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
        for sock in (self.pub, self.router):
            if sock is not None:
                sock.close(0)

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
        assert self.pub is not None, "publisher not started"
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
    replay that timed out, was refused or malformed, or did not deliver (:attr:`replays`,
    a :class:`~.replay.Replays`); meanwhile that source's live events are left to the
    replay and the other sources' keep flowing.

    Batches: what the socket holds when the subscriber wakes (at most ``max_batch``
    frames), and each replayed chunk, is applied in one store transaction, the offsets in
    it, so a crash applies all of a batch or none of it. The handler stays per event (the
    batch is only the transaction boundary): each event runs in a savepoint of its own, so
    a handler that fails on one event undoes that event alone; the later events of the
    same (source, topic) in the batch are held back (in order, they are retried from the
    outbox like the failed one, on the source's next heartbeat) and the others commit,
    each applied once. Heartbeats in a batch are looked at after it commits, and replays
    start only then, so a replay never races the batch for the same events.

    ``replayable=True`` says that the handler's effects are all in the store or in the
    store's commit and rollback hooks (nothing sent, pushed or counted directly), so that it
    may run again on an event whose effects were rolled back. A batch is then applied
    without a savepoint per event; if a handler fails, the whole batch is rolled back and
    applied again, each event in its own savepoint as above. Same outcome, fewer statements
    (a savepoint per event was a tenth of a subscriber's CPU).
    """

    LATEST_LOOKBACK = 200
    MAX_SOURCES_PER_SITE = 32
    """A site speaks through at most this many sources (site/service); more are dropped
    (cause ``sources``) so that no site can grow a subscriber's state without bound."""
    MAX_BATCH = 2048
    """Frames applied in one transaction at most: enough that a slow fsync (a busy disk: tens of
    ms) does not cap the rate (2048 events of 25 us hold the store about 50 ms)."""

    def __init__(self, ctx: zmq.asyncio.Context, security: Security, store: Store, *, hub_sub: str,
                 hub_site: str = "market", prefixes: Iterable[str], handler: Handler,
                 start: str = "earliest", replay_timeout_s: float = 3.0, name: str = "subscriber",
                 authority: Authority | None = None, max_batch: int | None = None,
                 replayable: bool = False) -> None:
        if start not in ("earliest", "latest"):
            raise ValueError("start is 'earliest' or 'latest'")
        self.ctx, self.security, self.store = ctx, security, store
        self.hub_sub, self.hub_site = hub_sub, hub_site
        self.authority = authority or Authority.of(hub_site)
        self.prefixes = [p for p in prefixes]
        self.handler = handler
        self.replayable = replayable
        self.start_mode = start
        self.replay_timeout_s = replay_timeout_s
        self.max_batch = max(1, max_batch or self.MAX_BATCH)
        """Frames taken off the socket per wake-up (1: a transaction per event, as before batches)."""
        self.name = name
        self.batches = 0
        self.largest_batch = 0
        self.offsets = store.offsets()
        self.drops = DropCounter(name)
        self.replays = Replays(ctx, security, name=name, timeout_s=replay_timeout_s, offsets=self.offsets,
                               drops=self.drops, apply=self._apply_batch, max_batch=self.max_batch)
        """what this subscriber missed, asked of each source's replay endpoint"""
        self.applied = 0
        self.failed = 0
        self._sources: dict[str, set[str]] = {}
        for source, _ in self.offsets:
            self._sources.setdefault(source.split("/", 1)[0], set()).add(source)
        self._pending: dict[tuple[str, str], int] = {}  # (source, topic) -> seq of the batch being collected
        self._wanted: dict[str, bool] = {}  # topic -> wants(topic)
        self._task: asyncio.Task[None] | None = None
        self.sub: zmq.asyncio.Socket | None = None
        self._drain: zmq.Socket[bytes] | None = None
        self.connected = asyncio.Event()
        self.since = time.time() if start == "latest" else 0.0

    def wants(self, topic: str) -> bool:
        return any(topic.startswith(p) for p in self.prefixes)

    @property
    def replaying(self) -> set[str]:
        """The sources whose replay is running now."""
        return set(self.replays.running)

    @property
    def replay_at(self) -> dict[str, str]:
        """source -> the replay endpoint its own heartbeat announced"""
        return self.replays.at

    async def start(self) -> None:
        self.sub = sub = open_socket(self.ctx, zmq.SUB)
        sub.rcvhwm = 100_000
        self.security.connect_to(sub, self.hub_sub, self.hub_site)
        for p in [*self.prefixes, HEARTBEAT_TOPIC]:
            sub.subscribe(p.encode())
        sub.connect(self.hub_sub)
        # the same socket seen synchronously, to drain what it holds without a Future per
        # frame (the asyncio socket looks at the socket's events before it waits again)
        self._drain = zmq.Socket.shadow(sub.underlying)
        self._task = asyncio.create_task(self._run(sub, self._drain), name=f"{self.name}-recv")

    async def stop(self) -> None:
        if self._task is not None:  # first: it starts replays
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self.replays.stop()
        if self.sub is not None:
            self.sub.close(0)

    async def _run(self, sub: zmq.asyncio.Socket, shadow: zmq.Socket[bytes]) -> None:
        recv, drain, NOBLOCK = sub.recv_multipart, shadow.recv_multipart, zmq.NOBLOCK  # noqa: N806
        while True:
            received = [await recv()]
            try:
                while len(received) < self.max_batch:
                    received.append(drain(NOBLOCK))
            except zmq.Again:
                pass
            self.replays.holding = True
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
                self.replays.holding = False
            for env in beats:
                try:
                    self.connected.set()
                    self._on_heartbeat(env)
                except Exception:  # noqa: BLE001 - the subscriber keeps working
                    log.exception("%s: failed on a heartbeat of %s", self.name, env.source)
            self.replays.start_wanted()

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
        self.replays.announce(env.source, hb.replay)
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
                self.replays.want(env.source, topic, last)

    def _on_event(self, env: Envelope, key: tuple[str, str]) -> bool:
        """True if ``env`` is the next event of its (source, topic), counting the batch
        being collected: it joins the batch. Otherwise it is a duplicate (dropped) or left
        to its source's replay. ``key`` is (source, topic) of ``env``."""
        if key not in self.offsets and key not in self._pending:
            if not self._admit(env.source):
                return False
            if self.start_mode == "latest":
                self.offsets[key] = max(0, env.seq - 1 - self.LATEST_LOOKBACK)
        if env.source in self.replays.running:  # its replay brings this one, in order
            self.replays.want(env.source, key[1], env.seq)
            return False
        have = self._pending.get(key) or self.offsets.get(key, 0)
        if env.seq <= have:
            self.drops.drop("duplicate", f"{key[1]} seq {env.seq}")
            return False
        if env.seq > have + 1:  # a gap: the publisher's outbox has them all, this one too
            self.replays.want(env.source, key[1], env.seq)
            return False
        self._pending[key] = env.seq
        return True

    async def _apply_batch(self, batch: list[tuple[Envelope, tuple[str, str]]]) -> int:
        """Apply ``batch`` (each event with its (source, topic), the next of it, in order) in one
        transaction that also stores the offsets; returns how many events were applied or
        read past. An event its publisher may not publish is only read past. A handler
        that fails undoes its own event (a savepoint) and holds back the later events of
        that (source, topic); if the transaction itself fails, none of the batch counts."""
        if self.replayable:
            try:
                return await self._apply(batch, isolate=False)
            except _Failed:
                pass  # nothing of the batch was kept: again, each event on its own
        return await self._apply(batch, isolate=True)

    async def _apply(self, batch: list[tuple[Envelope, tuple[str, str]]], *, isolate: bool) -> int:
        done: dict[tuple[str, str], int] = {}
        held: set[tuple[str, str]] = set()
        applied = held_back = 0
        handler = self.handler
        savepoint = self.store.savepoint if isolate else _no_savepoint
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
                        # counted once the batch commits (a replayable batch may be read twice)
                        self.store.on_commit(functools.partial(self.drops.drop, f"policy:{env.type}",
                                                               f"{env.source} seq {env.seq}"))
                        done[key] = env.seq
                        continue
                    try:
                        with savepoint(), envelope.caused_by(env.id):
                            # what the handler publishes was caused by env
                            result = handler(env, conn)
                            if result is not None and inspect.isawaitable(result):
                                await result
                    except asyncio.CancelledError:
                        raise
                    except Exception as e:  # noqa: BLE001 - not applied: retried from the outbox later
                        if not isolate:
                            raise _Failed from e
                        held.add(key)
                        held_back += 1
                        self.failed += 1
                        if worth_logging(self.failed):
                            log.exception("%s: handler failed on %s seq %s (will retry; %d failures so far)",
                                          self.name, env.topic, env.seq, self.failed)
                        continue
                    done[key] = env.seq
                    applied += 1
                self.store.log_offsets(conn, done)
        except (asyncio.CancelledError, _Failed):
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


class _Failed(Exception):
    """A handler failed in a batch applied without savepoints: the batch was rolled back."""


_NO_SAVEPOINT = contextlib.nullcontext()


def _no_savepoint() -> contextlib.nullcontext[None]:
    return _NO_SAVEPOINT
