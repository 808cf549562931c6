"""The subscriber applies events in batches (one store transaction per batch, offsets
included), through a real hub over CURVE: all of a batch or none of it across a SIGKILL,
order per source, a handler failing on one event, and a hostile source flooding."""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import sqlite3
import sys
import textwrap
from collections import Counter

import pytest
import zmq
import zmq.asyncio

from services.bus import Publisher, Store, Subscriber, envelope

from tests.support.bus import Applied, Grid, reading
from tests.support.poll import until


class Counting(Applied):
    """What a subscriber applied (in its store, in the bus transaction) and every call of
    its handler (in memory: what a handler does outside the store); it may be slow on the
    first event, fail once on one, or fail on every event of some sources."""

    def __init__(self, store: Store, slow_first_s: float = 0.0, fail_once: tuple[str, int] | None = None,
                 fail_sources: tuple[str, ...] = ()) -> None:
        super().__init__(store)
        self.calls: Counter[tuple[str, int]] = Counter()
        self.committed: Counter[tuple[str, int]] = Counter()  # what the handler did through a commit hook
        self.slow_first_s, self.fail_once, self.fail_sources = slow_first_s, fail_once, fail_sources

    async def handler(self, env: envelope.Envelope, conn: sqlite3.Connection) -> None:  # type: ignore[override]
        key = (env.source, env.seq)
        self.calls[key] += 1
        super().handler(env, conn)
        self.store.on_commit(lambda: self.committed.update([key]))
        if self.slow_first_s and sum(self.calls.values()) == 1:
            await asyncio.sleep(self.slow_first_s)  # the others queue up meanwhile: the next batch is large
        if self.fail_once == (env.source, env.seq) and self.calls[(env.source, env.seq)] == 1:
            raise RuntimeError("a handler failing once on this event")
        if env.source.split("/", 1)[0] in self.fail_sources:
            raise ValueError("a handler failing on this source's events")


@pytest.fixture
async def publishers(grid: Grid, tmp_path: pathlib.Path):  # type: ignore[no-untyped-def]
    made: list[tuple[zmq.asyncio.Context, object, Publisher]] = []

    async def make(site: str) -> Publisher:
        ctx = zmq.asyncio.Context()  # one ZAP authenticator per context: one context per site key
        sec = grid.security(site)
        sec.start(ctx)
        pub = Publisher(ctx, sec, Store(tmp_path / f"pub-{site}.sqlite"), source=f"{site}/meter",
                        hub_pub=grid.hub_pub, heartbeat_s=0.2)
        await pub.start()
        made.append((ctx, sec, pub))
        return pub

    yield make
    for ctx, sec, pub in made:
        await pub.stop()
        pub.store.close()
        sec.stop()  # type: ignore[attr-defined]
        ctx.destroy(linger=0)


def subscriber(grid: Grid, actx: zmq.asyncio.Context, applied: Counting, replayable: bool = False) -> Subscriber:
    return Subscriber(actx, grid.security("market"), applied.store, hub_sub=grid.hub_sub, prefixes=["meter.reading"],
                      handler=applied.handler, name="market-sub", replay_timeout_s=2.0, replayable=replayable)


async def publish(pub: Publisher, site: str, first: int, n: int) -> None:
    await asyncio.gather(*(pub.publish(reading(i, site)) for i in range(first, first + n)))


def test_a_failed_savepoint_undoes_its_own_writes_and_staged_events_only(tmp_path: pathlib.Path) -> None:
    store = Store(tmp_path / "s.sqlite")
    from services.bus.outbox import Outbox
    outbox = Outbox(store, "solar-1/meter")
    store.conn.execute("CREATE TABLE t (x INTEGER)")
    sent: list[int] = []
    with store.transaction() as conn:
        outbox.append(conn, reading(0, "solar-1"))
        store.on_commit(lambda: sent.append(1))
        with pytest.raises(RuntimeError), store.savepoint():
            conn.execute("INSERT INTO t VALUES (2)")
            outbox.append(conn, reading(1, "solar-1"))  # two events of one topic: undone last first
            outbox.append(conn, reading(2, "solar-1"))
            store.on_commit(lambda: sent.append(2))
            raise RuntimeError
        conn.execute("INSERT INTO t VALUES (3)")
    assert [x for (x,) in store.conn.execute("SELECT x FROM t")] == [3]
    assert sent == [1]
    assert outbox.last == outbox.committed == {"meter.reading.solar-1": 1}
    assert [q for (q,) in store.conn.execute("SELECT seq FROM bus_outbox")] == [1]
    with pytest.raises(RuntimeError), store.transaction() as conn:  # a whole transaction too, last first
        outbox.append(conn, reading(3, "solar-1"))
        outbox.append(conn, reading(4, "solar-1"))
        raise RuntimeError
    assert outbox.last == {"meter.reading.solar-1": 1}
    store.close()


def test_offsets_logged_per_batch_are_folded_and_survive_a_reopen_and_a_rolled_back_batch(
        tmp_path: pathlib.Path) -> None:
    """A batch's offsets are one row of the log; every FOLD_EVERY rows go into bus_offsets. The
    offsets read (by a subscriber starting, or through the view) are the highest of either, a
    rolled-back batch's are not there, and one row never moves an offset back."""
    path = tmp_path / "sub.sqlite"
    store = Store(path)
    want: dict[tuple[str, str], int] = {}
    for k in range(Store.FOLD_EVERY * 2 + 5):  # two folds and some rows after them
        moved = {(f"site-{i}/meter", f"meter.reading.site-{i}"): k + 1 for i in range(k % 7, k % 7 + 3)}
        with store.transaction() as conn:
            store.log_offsets(conn, moved)
        want.update(moved)
    with store.transaction() as conn:
        store.log_offsets(conn, {("site-0/meter", "meter.reading.site-0"): 1})  # behind: moves nothing
    with pytest.raises(RuntimeError), store.transaction() as conn:
        store.log_offsets(conn, {("site-9/meter", "meter.reading.site-9"): 10**6})
        raise RuntimeError("the batch fails to commit")
    logged = store.conn.execute("SELECT COUNT(*) FROM bus_offset_log").fetchone()[0]
    assert 0 < logged < Store.FOLD_EVERY  # folded twice, the rows since then still in the log
    assert store.offsets() == want
    folded = dict(((s, t), q) for s, t, q in store.conn.execute("SELECT source, topic, seq FROM bus_offsets"))
    assert folded and all(q <= want[k] for k, q in folded.items())
    store.close()
    again = Store(path)
    assert again.offsets() == want
    assert dict(((s, t), q) for s, t, q in again.conn.execute("SELECT * FROM bus_offsets_now")) == want
    again.close()


async def test_each_sources_events_are_applied_in_order_and_once_in_large_batches(
        grid: Grid, actx: zmq.asyncio.Context, publishers, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    pubs = {site: await publishers(site) for site in ("solar-1", "home-7", "tester")}
    applied = Counting(Store(tmp_path / "sub.sqlite"), slow_first_s=0.5)
    sub = subscriber(grid, actx, applied)
    await sub.start()
    await until(sub.connected.is_set, what="subscribed", timeout=60)
    for k in range(6):  # interleaved bursts of the three sources
        await asyncio.gather(*(publish(pub, site, 50 * k, 50) for site, pub in pubs.items()))
    await until(lambda: sum(len(applied.seqs(f"{s}/meter")) for s in pubs) >= 900, what="all applied", timeout=60)
    await asyncio.sleep(0.6)  # a few more heartbeats: nothing may be applied twice
    for site in pubs:
        assert applied.seqs(f"{site}/meter") == list(range(1, 301)), site
    assert set(applied.calls.values()) == {1}
    assert sub.largest_batch > 50  # the events really went in batches, interleaved sources in one
    assert sub.batches < 900
    await sub.stop()


async def test_a_handler_failing_on_one_event_of_a_batch_loses_and_doubles_none_of_the_others(
        grid: Grid, actx: zmq.asyncio.Context, publishers, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    solar, home = await publishers("solar-1"), await publishers("home-7")
    applied = Counting(Store(tmp_path / "sub.sqlite"), slow_first_s=0.5, fail_once=("solar-1/meter", 50))
    sub = subscriber(grid, actx, applied)
    await sub.start()
    await until(sub.connected.is_set, what="subscribed", timeout=60)
    await asyncio.gather(publish(solar, "solar-1", 0, 100), publish(home, "home-7", 0, 100))
    await until(lambda: len(applied.seqs("solar-1/meter")) + len(applied.seqs("home-7/meter")) >= 200,
                what="all applied", timeout=60)
    await asyncio.sleep(0.6)
    assert applied.seqs("solar-1/meter") == list(range(1, 101))
    assert applied.seqs("home-7/meter") == list(range(1, 101))
    assert sub.failed == 1
    # the failed event ran twice (failed, then retried from the outbox); every other event
    # of its batch ran once: none was undone and run again, none held back was run early
    twice = {k for k, n in applied.calls.items() if n != 1}
    assert twice == {("solar-1/meter", 50)} and applied.calls[("solar-1/meter", 50)] == 2
    assert sub.largest_batch >= 100  # the failure was in the middle of a batch
    await sub.stop()


async def test_a_replayable_handler_failing_in_a_batch_runs_it_again_and_each_event_counts_once(
        grid: Grid, actx: zmq.asyncio.Context, publishers, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    """Without a savepoint per event, a failure rolls the whole batch back; it is applied again,
    each event in its own savepoint: the store and the commit hooks see every event once, and a
    source whose handler always fails is held back alone, as with savepoints."""
    solar, home, probe = await publishers("solar-1"), await publishers("home-7"), await publishers("probe")
    applied = Counting(Store(tmp_path / "sub.sqlite"), slow_first_s=0.5, fail_once=("solar-1/meter", 50),
                       fail_sources=("probe",))
    sub = subscriber(grid, actx, applied, replayable=True)
    await sub.start()
    await until(sub.connected.is_set, what="subscribed", timeout=60)
    await asyncio.gather(publish(solar, "solar-1", 0, 100), publish(home, "home-7", 0, 100))
    await until(lambda: len(applied.seqs("solar-1/meter")) + len(applied.seqs("home-7/meter")) >= 200,
                what="all applied", timeout=60)
    await publish(probe, "probe", 0, 3)
    await publish(home, "home-7", 100, 20)
    await until(lambda: len(applied.seqs("home-7/meter")) >= 120, what="home-7's later events", timeout=60)
    await asyncio.sleep(0.6)
    assert applied.seqs("solar-1/meter") == list(range(1, 101))
    assert applied.seqs("home-7/meter") == list(range(1, 121))
    assert applied.seqs("probe/meter") == []
    good = {k: n for k, n in applied.committed.items() if not k[0].startswith("probe/")}
    assert len(good) == 220 and set(good.values()) == {1}  # every hook once: none from a rolled-back run
    assert not any(k[0].startswith("probe/") for k in applied.committed)
    assert applied.calls[("solar-1/meter", 50)] == 2  # failed once, then applied in the batch's second run
    assert max(applied.calls.values()) >= 2 and sub.failed > 0  # the probe's events: held back, each time
    assert sub.largest_batch >= 100
    await sub.stop()


async def test_a_hostile_source_flooding_cannot_make_the_subscriber_skip_another_sources_events(
        grid: Grid, actx: zmq.asyncio.Context, publishers, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    solar = await publishers("solar-1")
    applied = Counting(Store(tmp_path / "sub.sqlite"), fail_sources=("probe",))
    sub = subscriber(grid, actx, applied)
    await sub.start()
    await until(sub.connected.is_set, what="subscribed", timeout=60)
    # the probe site, with its own valid key: its own events in order (its handler fails on
    # each), gaps, duplicates, seqs far ahead, and readings naming another site
    hctx = zmq.asyncio.Context()
    hsec = grid.security("probe")
    hsec.start(hctx)
    raw = hctx.socket(zmq.PUB)
    raw.linger = 0
    raw.sndhwm = 0
    hsec.connect_to(raw, grid.hub_pub, "market")
    raw.connect(grid.hub_pub)
    mine = [envelope.encode(envelope.make(reading(i, "probe"), source="probe/meter", seq=i + 1)) for i in range(500)]
    odd = [envelope.encode(envelope.make(reading(i, "probe"), source=f"probe/x{i % 5}", seq=q))
           for i, q in enumerate((1, 1, 10**9, 7, 3, 2, 10**6))]
    forged = [envelope.encode(envelope.make(reading(i, "solar-1"), source="probe/forge", seq=i + 1))
              for i in range(100)]
    flood = [*mine, *odd * 200, *forged]

    async def flood_forever() -> None:
        while True:
            for frames in flood:
                await raw.send_multipart(frames)
            await asyncio.sleep(0)

    flooding = asyncio.create_task(flood_forever())
    try:
        for k in range(6):
            await publish(solar, "solar-1", 50 * k, 50)
            await asyncio.sleep(0.05)
        await until(lambda: len(applied.seqs("solar-1/meter")) >= 300, what="solar-1's events applied", timeout=60)
    finally:
        flooding.cancel()
        await asyncio.gather(flooding, return_exceptions=True)
        raw.close(0)
        hsec.stop()
        hctx.destroy(linger=0)
    await asyncio.sleep(0.6)
    assert applied.seqs("solar-1/meter") == list(range(1, 301))
    assert all(applied.calls[("solar-1/meter", q)] == 1 for q in range(1, 301))
    assert applied.seqs("probe/meter") == []  # its handler failed on each: none applied
    assert sub.failed > 0 and sub.drops.counts["policy:meter.reading"] > 0
    assert sub.largest_batch > 1
    await sub.stop()


SUBSCRIBER = textwrap.dedent("""
    import asyncio, pathlib, sys, zmq.asyncio
    from services.bus import Security, Store, Subscriber
    keys, hub_sub, path, stall = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    calls = 0
    async def handler(env, conn):
        global calls
        conn.execute("INSERT INTO applied VALUES (?, ?)", (env.source, env.seq))
        calls += 1
        if env.seq == stall:  # in the middle of a batch: wait here to be killed
            print("stalled", calls, flush=True)
            await asyncio.sleep(3600)
    async def main():
        ctx = zmq.asyncio.Context()
        sec = Security(pathlib.Path(keys), "home-7"); sec.start(ctx)
        store = Store(path)
        store.conn.execute("CREATE TABLE IF NOT EXISTS applied (source TEXT, seq INTEGER)")
        sub = Subscriber(ctx, sec, store, hub_sub=hub_sub, prefixes=["meter.reading"], handler=handler)
        await sub.start()
        print("started", flush=True)
        await asyncio.sleep(3600)
    asyncio.run(main())
""")


def stored(path: pathlib.Path) -> list[int]:
    conn = sqlite3.connect(path)
    try:
        return [q for (q,) in conn.execute("SELECT seq FROM applied ORDER BY rowid")]
    except sqlite3.OperationalError:  # not created yet
        return []
    finally:
        conn.close()


async def test_a_subscriber_sigkilled_mid_batch_applies_all_of_it_or_none_and_each_event_once(
        grid: Grid, publishers, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    solar = await publishers("solar-1")
    for k in range(6):  # published before the subscriber runs: it replays them, in batches
        await publish(solar, "solar-1", 100 * k, 100)
    db = tmp_path / "sub.sqlite"
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[2])}

    async def spawn(stall: int) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-c", SUBSCRIBER, str(grid.keys), grid.hub_sub, str(db), str(stall),
            stdout=asyncio.subprocess.PIPE, env=env)

    proc = await spawn(300)
    try:
        assert proc.stdout is not None
        line = b""
        while not line.startswith(b"stalled"):
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            assert line, "the subscriber exited"
        calls = int(line.split()[1])
        os.kill(proc.pid, signal.SIGKILL)  # inside the batch's open transaction
        await proc.wait()
        committed = stored(db)
        # the handler had run on `calls` events; the killed batch left none of them behind
        assert calls >= 2 and len(committed) <= calls - 2
        assert committed == list(range(1, len(committed) + 1))
        proc = await spawn(0)
        await until(lambda: len(stored(db)) >= 600, what="all replayed after the restart", timeout=60)
        await publish(solar, "solar-1", 600, 100)  # and live ones after it
        await until(lambda: len(stored(db)) >= 700, what="live events applied", timeout=60)
        await asyncio.sleep(0.6)
        assert stored(db) == list(range(1, 701))
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
