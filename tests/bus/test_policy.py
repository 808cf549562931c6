"""A hostile site with its own valid key, through the real hub: the publish policy of each
event type, replays that prove what they skip, a replay endpoint that never answers, and
malformed replay requests and replies (refused, changing nothing).

The hostile site ('probe') publishes only under its own site name, so these tests hold
with the hub's identity check as well as without it.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import time
from collections import Counter
from collections.abc import AsyncIterator

import pytest
import zmq
import zmq.asyncio

from services.bus import Store, Subscriber, envelope, replay
from services.bus import events as ev
from services.bus.events import Authority, Heartbeat

from tests.support.bus import Applied, Grid, Sources, reading
from tests.support.poll import until

SELLER, BUYER, THIEF = "0x" + "5e" * 20, "0x" + "b0" * 20, "0x" + "66" * 20
PREFIXES = ["meter.", "trade.", "market.", "chain."]


TRADE = dict(trade_id="t-1", seller=SELLER, buyer=BUYER, seller_site="solar-1", buyer_site="home-7", wh=1000,
             price_wei_per_kwh=10**16)


class Hostile:
    """The probe site's own raw sockets: a PUB on the hub (its key), and a replay ROUTER
    (its key) that answers as told: ``silent``, ``empty`` (no rows, a huge ``last``) or
    ``foreign`` (another source's events)."""

    def __init__(self, grid: Grid) -> None:
        self.ctx = zmq.asyncio.Context()
        self.sec = grid.security("probe")
        self.sec.start(self.ctx)
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.linger = 0
        self.sec.connect_to(self.pub, grid.hub_pub, "market")
        self.pub.connect(grid.hub_pub)
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.linger = 0
        self.sec.serve(self.router, "tcp://127.0.0.1:*")
        self.router.bind("tcp://127.0.0.1:*")
        self.endpoint = self.router.last_endpoint.decode()
        self.mode = "silent"
        self.asked: list[dict] = []  # type: ignore[type-arg]
        self.foreign: list[bytes] = []
        self._seq = 0
        self._tasks = [asyncio.create_task(self._serve())]

    async def _serve(self) -> None:
        while True:
            frames = await self.router.recv_multipart()
            self.asked.append(json.loads(frames[-1]))
            if self.mode != "silent":
                await self.router.send_multipart([frames[0], *self.answer(replay.decode_request(frames[-1]))])

    def answer(self, req: replay.ReplayRequest) -> list[bytes]:
        asked = dict(id=req.id, topic=req.topic, after=req.after, upto=req.upto)
        if self.mode == "empty":
            return [replay.ReplayHead(**asked, n=0, last=10**9).encode()]
        if self.mode == "foreign":
            return [replay.ReplayHead(**asked, n=len(self.foreign), last=10**9).encode(), *self.foreign]
        if self.mode == "garbage":
            return [b"\xff not json"]
        if self.mode == "version 1":  # the untyped replay of before
            return [json.dumps({"topic": req.topic, "after": req.after, "upto": req.upto, "n": 0, "last": 0}).encode()]
        if self.mode == "refused":
            return [replay.ReplayRefused(id=req.id, code="invalid", message="no").encode()]
        if self.mode == "other range":  # a head for what was not asked, with an event of the range asked
            return [replay.ReplayHead(**{**asked, "after": req.after + 1}, n=1, last=10**9).encode(), *self.foreign]
        if self.mode == "short":  # says two rows, sends one
            return [replay.ReplayHead(**asked, n=2, last=10**9).encode(), *self.foreign]
        raise AssertionError(self.mode)

    async def send(self, body: ev.Message, source: str, seq: int | None = None) -> None:
        self._seq += 1
        await self.pub.send_multipart(envelope.encode(envelope.make(body, source=source, seq=seq or self._seq)))

    def beat_forever(self, source: str, node: str, site: str, last: dict[str, int], every: float = 0.05) -> None:
        async def loop() -> None:
            while True:
                await self.send(Heartbeat(node=node, replay=self.endpoint, site=site, last=last), source)
                await asyncio.sleep(every)
        self._tasks.append(asyncio.create_task(loop()))

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.pub.close(0)
        self.router.close(0)
        self.sec.stop()
        self.ctx.destroy(linger=0)


@pytest.fixture
async def hostile(grid: Grid) -> AsyncIterator[Hostile]:
    h = Hostile(grid)
    yield h
    await h.close()


@pytest.fixture
async def sources(grid: Grid, tmp_path: pathlib.Path) -> AsyncIterator[Sources]:
    s = Sources(grid, tmp_path / "sources")
    yield s
    await s.stop()


@pytest.fixture
async def honest(grid: Grid, actx: zmq.asyncio.Context, tmp_path: pathlib.Path,
                 sources: Sources) -> AsyncIterator[tuple[Subscriber, Applied]]:
    await sources.publisher("market/auction")  # its heartbeats tell the subscriber it is connected
    rec = Applied(Store(tmp_path / "honest.sqlite"))
    sub = Subscriber(actx, grid.security("home-7"), rec.store, hub_sub=grid.hub_sub, prefixes=PREFIXES,
                     handler=rec.handler, name="home-7 sub", replay_timeout_s=2.0)
    await sub.start()
    await until(sub.connected.is_set, what="subscribed")
    yield sub, rec
    await sub.stop()
    rec.store.close()


SIG = "0x" + "11" * 65


def produced(site: str) -> ev.EnergyProduced:
    """A production reading naming ``site`` (its signature is the operator's to check)."""
    return ev.EnergyProduced(site=site, meter="m1", meter_address=SELLER, produced_wh=1000, chain_id=1, token=SELLER,
                             signature=SIG)


FORGERIES: list[tuple[str, ev.Message, str]] = [
    # meter events naming another site: mint for it, pay from another's escrow, its relay
    ("probe/meter", reading(1, "solar-1"), "policy:meter.reading"),
    ("probe/meter", produced("solar-1"), "policy:meter.energy_produced"),
    ("probe/meter", ev.MeterKey(site="solar-1", meter="m1", address=THIEF, account=THIEF, chain_id=1,
                                registry=THIEF, signature=SIG), "policy:meter.key"),
    ("probe/meter", ev.Delivery(trade_id="t-1", site="home-7", meter="m2", role="consumer", delivered_wh=1000),
     "policy:meter.delivery"),
    ("probe/meter", ev.MeterRelay(site="home-7", meter="m2", closed=True, trade_id="t-1"), "policy:meter.relay"),
    # trade and market events from anyone but the market's auction
    ("probe/auction", ev.TradeAgreed(offer_id="o-1", **TRADE), "policy:trade.agreed"),
    ("probe/auction", ev.TradeStatus(state="delivering", **TRADE), "policy:trade.status"),
    ("probe/auction", ev.TradeHeartbeat(live=["t-1"], sites={"t-1": ["solar-1", "home-7"]}), "policy:trade.heartbeat"),
    ("probe/auction", ev.OfferOpened(offer_id="o-1", seller=THIEF, seller_site="probe", wh=1, start_price_wei_per_kwh=1,
                                     opened_at=0, ends_at=1), "policy:market.offer_opened"),
    # chain events from anyone but the operator's chain service
    ("probe/chain", ev.Settled(trade_id="t-1", delivered_wh=1000, paid_wei=10**16, tx_hash="0x1"),
     "policy:chain.settled"),
    ("probe/chain", ev.Minted(account=THIEF, meter=THIEF, produced_wh=10**6, wh=10**6, tx_hash="0x2"),
     "policy:chain.minted"),
]

HONEST: list[tuple[str, ev.Message]] = [
    ("market/auction", ev.TradeAgreed(offer_id="o-1", **TRADE)),
    ("market/auction", ev.TradeStatus(state="recorded", **TRADE)),
    ("market/auction", ev.TradeHeartbeat(live=["t-1"], sites={"t-1": ["solar-1", "home-7"]})),
    ("solar-1/meter", reading(5, "solar-1")),
    ("solar-1/meter", produced("solar-1")),
    ("home-7/meter", ev.Delivery(trade_id="t-1", site="home-7", meter="m2", role="consumer", delivered_wh=400)),
    ("market/chain", ev.Settled(trade_id="t-1", delivered_wh=400, paid_wei=4 * 10**15, tx_hash="0x3")),
    ("market/auction", ev.TradeStatus(state="delivering", delivered_wh=400, **TRADE)),
]


async def test_forgeries_of_a_site_with_a_valid_key_are_counted_and_never_applied(
        grid: Grid, honest: tuple[Subscriber, Applied], sources: Sources, hostile: Hostile) -> None:
    sub, rec = honest
    # a heartbeat for the market's auction (a huge last, to make the subscriber skip its
    # events) and one of the probe's own node claiming the market's site
    hostile.beat_forever("probe/x", node="market/auction", site="market", last={"trade.agreed.market": 10**9})
    hostile.beat_forever("probe/y", node="probe/y", site="market", last={"trade.agreed.probe": 10**9})
    for source, body, _ in FORGERIES:
        await sources.publish(body, source=source)
    await sources.publish(reading(7, "probe"), source="probe/meter")  # its own reading, after a refused one
    for source, body in HONEST:
        await sources.publish(body, source=source)

    expected = Counter(cause for _, _, cause in FORGERIES)
    await until(lambda: all(sub.drops.counts[c] >= n for c, n in expected.items())
                and sub.drops.counts["policy:bus.heartbeat"] >= 4, what="every forgery refused")
    want = Counter(source for source, _ in HONEST) + Counter({"probe/meter": 1})
    await until(lambda: Counter(s for s, _, _ in rec.rows()) == want, what="every honest event applied")
    await asyncio.sleep(1.0)  # more heartbeats and replays: nothing more, nothing twice

    assert {c: sub.drops.counts[c] for c in expected} == dict(expected)
    assert Counter(s for s, _, _ in rec.rows()) == want
    for source in ("market/auction", "solar-1/meter", "home-7/meter", "market/chain"):
        got = rec.of(source)
        sent = [b.TYPE for s, b in HONEST if s == source]
        assert sorted(t for t, _ in got) == sorted(sent), source
        for t in set(sent):  # in order per topic, none lost: seqs 1..n
            assert [q for ty, q in got if ty == t] == list(range(1, sent.count(t) + 1))
    # the refused reading was read past: the probe's own next reading (seq 2) was applied
    assert rec.of("probe/meter") == [("meter.reading", 2)]
    # a refused heartbeat announces nothing: no replay endpoint learned from it
    assert "probe/x" not in sub.replay_at and "probe/y" not in sub.replay_at
    assert not any(c.startswith("policy:") and c.split(":", 1)[1] not in ev.EVENTS for c in sub.drops.counts)


async def test_the_policy_holds_for_replayed_events_too(grid: Grid, actx: zmq.asyncio.Context, sources: Sources,
                                                        tmp_path: pathlib.Path) -> None:
    """Published while the subscriber was away: they come through replay, and are refused there."""
    for source, body, _ in FORGERIES:
        await sources.publish(body, source=source)
    for source, body in HONEST:
        await sources.publish(body, source=source)
    rec = Applied(Store(tmp_path / "late.sqlite"))
    sub = Subscriber(actx, grid.security("home-7"), rec.store, hub_sub=grid.hub_sub, prefixes=PREFIXES,
                     handler=rec.handler, name="late sub")
    await sub.start()
    try:
        expected = Counter(cause for _, _, cause in FORGERIES)
        await until(lambda: len(rec.rows()) == len(HONEST)
                    and all(sub.drops.counts[c] >= n for c, n in expected.items()), what="replayed")
        await asyncio.sleep(0.6)
        assert {c: sub.drops.counts[c] for c in expected} == dict(expected)
        assert sorted(s for s, _, _ in rec.rows()) == sorted(s for s, _ in HONEST)
        # the refused events' seqs are stored: a restart does not fetch them again
        offsets = rec.store.offsets()
        assert offsets[("probe/auction", "trade.agreed.probe")] == 1
        assert offsets[("probe/meter", "meter.energy_produced.probe")] == 1
        assert offsets[("probe/meter", "meter.key.probe")] == 1
    finally:
        await sub.stop()
        rec.store.close()


async def test_a_silent_replay_endpoint_stalls_no_other_source(
        grid: Grid, honest: tuple[Subscriber, Applied], sources: Sources, hostile: Hostile) -> None:
    sub, rec = honest
    hostile.mode = "silent"
    # the probe's own node, with a huge last and a replay endpoint that never answers
    hostile.beat_forever("probe/auction", node="probe/auction", site="probe",
                         last={"trade.agreed.probe": 10**9, "meter.reading.probe": 10**9})
    await until(lambda: "probe/auction" in sub.replaying, what="the probe's replay under way")
    for i in range(30):
        await sources.publish(ev.TradeStatus(state="delivering", delivered_wh=i, **TRADE))
        await sources.publish(reading(i, "solar-1"))
    # every event of the others applied while the probe's replay is still hanging (a state, not a time)
    await until(lambda: len(rec.of("market/auction")) == 30 and len(rec.of("solar-1/meter")) == 30
                and "probe/auction" in sub.replaying, timeout=sub.replay_timeout_s * 0.9,
                what="other sources flowing while a replay hangs")
    assert [q for _, q in rec.of("market/auction")] == list(range(1, 31))
    # the silent endpoint is asked with a backoff, not on every heartbeat (20 a second)
    await asyncio.sleep(3 * sub.replay_timeout_s)
    assert sub.drops.counts["replay_timeout"] >= 1
    assert len(hostile.asked) <= 4, hostile.asked
    # and nothing of the probe was applied on its word
    assert rec.of("probe/auction") == []


async def test_a_restarted_source_is_replayed_at_its_new_endpoint_without_the_old_backoff(
        grid: Grid, honest: tuple[Subscriber, Applied], hostile: Hostile) -> None:
    """A publisher that restarts beats with a new replay endpoint: the backoff earned by
    the endpoint that went silent must not hold back the replay from the new one."""
    sub, _ = honest
    last = {"meter.reading.probe": 10**9}
    hostile.mode = "silent"
    hostile.beat_forever("probe/meter", node="probe/meter", site="probe", last=last)
    await until(lambda: sub.drops.counts["replay_timeout"] >= 2, timeout=10 * sub.replay_timeout_s,
                what="two timed-out replays from the silent endpoint")
    for t in hostile._tasks[1:]:
        t.cancel()
    backoff = sub.replays.backoff["probe/meter"]  # backing off from the silent endpoint
    # as after a long outage: the backoff the old endpoint earned would hold a replay for an hour
    backoff.delay, backoff.not_before = 3600.0, time.monotonic() + 3600
    restarted = Hostile(grid)
    try:
        restarted.mode = "empty"
        restarted.beat_forever("probe/meter", node="probe/meter", site="probe", last=last)
        # asked at all within the bound means the old endpoint's backoff did not hold it back
        await until(lambda: restarted.asked, timeout=10 * sub.replay_timeout_s, what="a replay from the new endpoint")
    finally:
        await restarted.close()


async def test_a_heartbeats_last_alone_never_skips_events(
        grid: Grid, honest: tuple[Subscriber, Applied], hostile: Hostile) -> None:
    """A replay that returns nothing while its head says there is more proves nothing:
    the offset stays, and the events that do come are applied (not taken as duplicates)."""
    sub, rec = honest
    hostile.mode = "empty"
    hostile.beat_forever("probe/meter", node="probe/meter", site="probe", last={"meter.reading.probe": 10**9})
    await until(lambda: sub.drops.counts["replay_unproven"] >= 1, what="the empty replay")
    assert sub.offsets.get(("probe/meter", "meter.reading.probe"), 0) == 0
    await hostile.send(reading(1, "probe"), "probe/meter", seq=1)  # in order: applied
    await until(lambda: rec.of("probe/meter") == [("meter.reading", 1)], what="seq 1 applied")


async def test_a_replay_serving_another_sources_events_is_refused(
        grid: Grid, honest: tuple[Subscriber, Applied], sources: Sources, hostile: Hostile) -> None:
    """Replay data is not vouched for by the hub: rows must be the asked source's own."""
    sub, rec = honest
    hostile.mode = "foreign"
    hostile.foreign = [envelope.encode(envelope.make(ev.TradeAgreed(offer_id="o-9", **TRADE), source="market/auction",
                                                     seq=1))[1]]
    hostile.beat_forever("probe/meter", node="probe/meter", site="probe", last={"trade.agreed.probe": 5})
    await until(lambda: sub.drops.counts["replay_foreign"] >= 1, what="the foreign rows refused")
    assert rec.rows() == []
    await sources.publish(ev.TradeAgreed(offer_id="o-1", **TRADE))  # the real market/auction seq 1
    await until(lambda: rec.of("market/auction") == [("trade.agreed", 1)], what="the real event applied")


@pytest.mark.parametrize(("mode", "cause"), [
    ("garbage", "replay_garbage"), ("version 1", "replay_version"), ("refused", "replay_refused"),
    ("other range", "replay_invalid"), ("short", "replay_invalid"),
])
async def test_a_malformed_replay_reply_is_refused_and_changes_nothing(
        grid: Grid, honest: tuple[Subscriber, Applied], hostile: Hostile, mode: str, cause: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """An answer that does not decode, speaks the untyped replay of version 1, refuses, or
    does not match what was asked applies nothing (even a valid row that came with it) and
    moves no offset; the source is backed off, and its live events in order still apply."""
    sub, rec = honest
    hostile.mode = mode
    hostile.foreign = [envelope.encode(envelope.make(reading(1, "probe"), source="probe/meter", seq=1))[1]]
    with caplog.at_level("WARNING"):
        hostile.beat_forever("probe/meter", node="probe/meter", site="probe", last={"meter.reading.probe": 5})
        await until(lambda: sub.drops.counts[cause] >= 1, what=f"the {mode} reply refused")
        await until(lambda: "probe/meter" in sub.replays.backoff, what="backing off")
    assert rec.of("probe/meter") == []
    assert sub.offsets.get(("probe/meter", "meter.reading.probe"), 0) == 0
    if mode == "version 1":
        assert any("replay version 1" in r.getMessage() and "upgrade" in r.getMessage() for r in caplog.records)
    await hostile.send(reading(1, "probe"), "probe/meter", seq=1)
    await until(lambda: rec.of("probe/meter") == [("meter.reading", 1)], what="seq 1 applied live")


@pytest.mark.parametrize(("request_frame", "code"), [
    pytest.param(b"\x00garbage", "garbage", id="not-json"),
    pytest.param(b"[1, 2]", "garbage", id="not-an-object"),
    pytest.param(json.dumps({"topic": "meter.reading.solar-1", "after": 0, "upto": 9}).encode(), "version",
                 id="untyped-version-1"),
    pytest.param(json.dumps({"v": 3, "type": "bus.replay", "id": "a", "topic": "t", "after": 0, "upto": 1}).encode(),
                 "version", id="newer-version"),
    pytest.param(json.dumps({"v": 2, "type": "bus.replay", "id": "a", "topic": "t", "after": -1, "upto": 1}).encode(),
                 "invalid", id="negative-seq"),
    pytest.param(json.dumps({"v": 2, "type": "bus.replay", "id": "a", "topic": "x" * 10_000, "after": 0,
                             "upto": 1}).encode(), "invalid", id="huge-topic"),
    pytest.param(json.dumps({"v": 2, "type": "bus.replay", "id": "a", "topic": "t", "after": 0, "upto": 1,
                             "sql": "1"}).encode(), "invalid", id="unknown-field"),
    pytest.param(json.dumps({"v": 2, "type": "bus.replay_head", "id": "a", "topic": "t", "after": 0, "upto": 1,
                             "n": 0, "last": 0}).encode(), "invalid", id="a-head-as-request"),
])
async def test_a_malformed_replay_request_is_refused_and_changes_nothing(
        grid: Grid, sources: Sources, actx: zmq.asyncio.Context, request_frame: bytes, code: str) -> None:
    """A publisher answers a request it cannot serve with a typed refusal (and counts it),
    serves nothing, and goes on serving well-formed requests."""
    pub = await sources.publisher("solar-1/meter")
    for i in range(3):
        await pub.publish(reading(i, "solar-1"))
    outbox = list(pub.store.conn.execute("SELECT topic, seq, data FROM bus_outbox ORDER BY topic, seq"))
    sec = grid.security("probe")
    sec.start(actx)
    sock = actx.socket(zmq.DEALER)
    sock.linger = 0
    try:
        sec.connect_to(sock, pub.replay_endpoint, "solar-1")
        sock.connect(pub.replay_endpoint)
        await sock.send(request_frame)
        frames = await asyncio.wait_for(sock.recv_multipart(), 10)
        refusal = replay.decode_reply(frames[0])
        assert isinstance(refusal, replay.ReplayRefused) and refusal.code == code and len(frames) == 1
        assert pub.replays is not None and pub.replays.drops.counts[code] == 1
        assert list(pub.store.conn.execute("SELECT topic, seq, data FROM bus_outbox ORDER BY topic, seq")) == outbox
        good = replay.ReplayRequest(id="b", topic="meter.reading.solar-1", after=1, upto=9)
        await sock.send(good.encode())
        frames = await asyncio.wait_for(sock.recv_multipart(), 10)
        head = replay.decode_reply(frames[0])
        assert isinstance(head, replay.ReplayHead) and (head.id, head.n, head.last) == ("b", 2, 3)
        assert [envelope.decode_json(f).seq for f in frames[1:]] == [2, 3]
    finally:
        sock.close(0)
        sec.stop()


def test_every_event_type_declares_who_may_publish_it() -> None:
    auth = Authority.of("market")
    assert all(isinstance(cls.ORIGIN, ev.Origin) for cls in ev.EVENTS.values())
    assert ev.permitted(ev.TradeAgreed(offer_id="o", **TRADE), "market/auction", auth)
    assert not ev.permitted(ev.TradeAgreed(offer_id="o", **TRADE), "market/chain", auth)
    assert ev.permitted(ev.ChainMining(mining=True), "market/chain", auth)
    assert not ev.permitted(ev.ChainMining(mining=True), "probe/chain", auth)
    assert ev.permitted(reading(1, "solar-1"), "solar-1/gateway", auth)
    assert not ev.permitted(reading(1, "solar-1"), "home-7/meter", auth)
    hb = Heartbeat(node="solar-1/meter", replay="tcp://x:1", site="solar-1", last={})
    assert ev.permitted(hb, "solar-1/meter", auth) and not ev.permitted(hb, "solar-1/cli", auth)
    # the market's parts may run at other sites
    elsewhere = Authority.of("market", auction_site="auct", chain_site="ops")
    assert ev.permitted(ev.ChainMining(mining=True), "ops/chain", elsewhere)
    assert not ev.permitted(ev.ChainMining(mining=True), "market/chain", elsewhere)
    with pytest.raises(TypeError, match="ORIGIN"):
        @ev.event
        class Undeclared(ev.Message):
            TYPE = "test.undeclared"
