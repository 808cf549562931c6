"""Pub/sub through a real hub over CURVE: delivery, restarts, SIGKILL, bad frames."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import zmq
import zmq.asyncio

from services.bus import Publisher, Store, envelope

from tests.support.bus import Applied, Grid, raw_socket, reading
from tests.support.poll import until


async def started(*parts: object) -> None:
    for p in parts:
        sec = p.security  # type: ignore[attr-defined]
        await p.start()  # type: ignore[attr-defined]
        del sec


async def test_events_arrive_in_order_over_curve(grid: Grid, actx: zmq.asyncio.Context, secure, tmp_path) -> None:  # type: ignore[no-untyped-def]
    sec = secure("solar-1", actx)
    rec = Applied(Store(tmp_path / "sub.sqlite"))
    sub = rec.subscriber(actx, grid)
    pub = Publisher(actx, sec, Store(tmp_path / "pub.sqlite"), source="solar-1/meter", hub_pub=grid.hub_pub,
                    heartbeat_s=0.2)
    await sub.start()
    await pub.start()
    await until(sub.connected.is_set)
    for i in range(200):
        await pub.publish(reading(i))
    await until(lambda: len(rec.values()) == 200)
    assert rec.values() == list(range(200))
    await pub.stop()
    await sub.stop()


async def test_subscriber_restarted_mid_stream_applies_each_event_once(grid: Grid, actx, secure, tmp_path) -> None:  # type: ignore[no-untyped-def]
    sec = secure("solar-1", actx)
    pub = Publisher(actx, sec, Store(tmp_path / "pub.sqlite"), source="solar-1/meter", hub_pub=grid.hub_pub,
                    heartbeat_s=0.2)
    await pub.start()
    sub_store = tmp_path / "sub.sqlite"

    async def run_sub():  # type: ignore[no-untyped-def]
        rec = Applied(Store(sub_store))
        sub = rec.subscriber(actx, grid, prefixes=["meter.reading.solar-1"])
        await sub.start()
        return rec, sub

    rec, sub = await run_sub()
    await until(sub.connected.is_set)
    for i in range(100):
        await pub.publish(reading(i))
        if i == 40:  # the subscriber goes away mid-stream ...
            await until(lambda: len(rec.values()) >= 20)
            await sub.stop()
            rec.store.close()
        if i == 70:  # ... and comes back with its stored offsets
            rec, sub = await run_sub()
    await until(lambda: len(rec.values()) == 100)
    await asyncio.sleep(0.6)  # a few more heartbeats: nothing may be applied twice
    assert rec.values() == list(range(100))
    await sub.stop()
    await pub.stop()


PUBLISHER = textwrap.dedent("""
    import asyncio, sys, zmq.asyncio
    from services.bus import Publisher, Security, Store
    from services.bus.events import MeterReading
    keys, hub_pub, path, total = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    import pathlib
    async def main():
        ctx = zmq.asyncio.Context()
        sec = Security(pathlib.Path(keys), "solar-1"); sec.start(ctx)
        store = Store(path)
        store.conn.execute("CREATE TABLE IF NOT EXISTS progress (n INTEGER)")
        pub = Publisher(ctx, sec, store, source="solar-1/meter", hub_pub=hub_pub, heartbeat_s=0.2)
        await pub.start()
        n = (store.conn.execute("SELECT MAX(n) FROM progress").fetchone()[0] or 0)
        print("start", n, flush=True)
        while n < total:
            async with store.atomic() as conn:  # the event and the progress commit together
                pub.stage(MeterReading(site="solar-1", meter="m1", role="producer", energy_wh=n, power_w=1.0,
                                       voltage_v=12.0, current_a=0.1, relay_closed=False))
                n += 1
                conn.execute("INSERT INTO progress VALUES (?)", (n,))
            await asyncio.sleep(0.002)
        print("done", flush=True)
        await asyncio.sleep(3600)
    asyncio.run(main())
""")


async def test_publisher_sigkilled_and_restarted_loses_and_doubles_nothing(grid: Grid, actx, tmp_path) -> None:  # type: ignore[no-untyped-def]
    rec = Applied(Store(tmp_path / "sub.sqlite"))
    sub = rec.subscriber(actx, grid)
    await sub.start()
    args = [sys.executable, "-c", PUBLISHER, str(grid.keys), grid.hub_pub, str(tmp_path / "pub.sqlite"), "600"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    try:
        await until(lambda: len(rec.values()) >= 150)
        os.kill(proc.pid, signal.SIGKILL)  # mid-stream, wherever it is
        proc.wait()
        killed_at = len(rec.values())
        assert killed_at < 600
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
        await until(lambda: len(rec.values()) >= 600, timeout=60)
        await asyncio.sleep(0.6)
        assert rec.values() == list(range(600))
        seqs = [r[0] for r in rec.store.conn.execute("SELECT seq FROM applied ORDER BY rowid")]
        assert seqs == list(range(1, 601))
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]
        await sub.stop()


BAD_FRAMES = [
    ("garbage", [b"meter.reading.solar-1", b"\x00\xffnot json"]),
    ("garbage", [b"meter.reading.solar-1", b'{"v":1,"type":"meter.reading","id":"x","sou']),
    ("unknown_type", [b"meter.readingz.solar-1", json.dumps({"v": 1, "type": "meter.readingz", "id": "x",
                                                             "source": "solar-1/x", "seq": 1, "ts": 0, "body": {}}).encode()]),
    ("version", [b"meter.reading.solar-1", json.dumps({"v": 9, "type": "meter.reading", "id": "x", "source": "solar-1/x",
                                                      "seq": 1, "ts": 0, "body": reading(1).model_dump()}).encode()]),
    ("invalid", [b"meter.reading.solar-1", json.dumps({"v": 1, "type": "meter.reading", "id": "x", "source": "solar-1/x",
                                                      "seq": 1, "ts": 0, "body": {**reading(1).model_dump(), "energy_wh": -5}}).encode()]),
    # passes the hub (solar-1's key, solar-1's topic) but speaks for another site
    ("topic", [b"meter.reading.solar-1", envelope.encode(envelope.make(reading(1), source="home-7/x", seq=1))[1]]),
]
"""What the hub forwards (the sender's own topic, two frames) but subscribers refuse; the
hub's own drops (other site's topic, frame count) are in test_hub_identity.py."""


async def test_bad_frames_are_dropped_and_counted_and_the_subscriber_keeps_working(grid: Grid, actx, secure, tmp_path) -> None:  # type: ignore[no-untyped-def]
    rec = Applied(Store(tmp_path / "sub.sqlite"))
    sub = rec.subscriber(actx, grid)
    await sub.start()
    raw = raw_socket(actx, grid, "solar-1", zmq.PUB, grid.hub_pub)
    sec = secure("solar-1", actx)
    pub = Publisher(actx, sec, Store(tmp_path / "pub.sqlite"), source="solar-1/meter", hub_pub=grid.hub_pub, heartbeat_s=0.2)
    await pub.start()
    await until(sub.connected.is_set)
    await pub.publish(reading(0))
    await until(lambda: rec.values() == [0])
    for _ in range(3):
        for _, frames in BAD_FRAMES:
            await raw.send_multipart(frames)
    await pub.publish(reading(1))
    await until(lambda: rec.values() == [0, 1])
    expected: dict[str, int] = {}
    for cause, _ in BAD_FRAMES:
        expected[cause] = expected.get(cause, 0) + 3
    await until(lambda: all(sub.drops.counts[c] >= n for c, n in expected.items()))
    assert {c: sub.drops.counts[c] for c in expected} == expected
    raw.close(0)
    await pub.stop()
    await sub.stop()


async def test_events_of_an_open_transaction_are_neither_announced_nor_replayed(grid: Grid, actx, secure, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A publisher that awaits inside a transaction (a command asking another service)
    heartbeats meanwhile: a subscriber must not see its staged events until COMMIT, must
    never see them after a ROLLBACK, and must apply the event that reuses their seq."""
    sec = secure("solar-1", actx)
    store = Store(tmp_path / "pub.sqlite")
    pub = Publisher(actx, sec, store, source="solar-1/meter", hub_pub=grid.hub_pub, heartbeat_s=0.1)
    rec = Applied(Store(tmp_path / "sub.sqlite"))
    sub = rec.subscriber(actx, grid)
    await sub.start()
    await pub.start()
    await until(sub.connected.is_set)
    await pub.publish(reading(0))
    await until(lambda: rec.values() == [0])
    with pytest.raises(RuntimeError):
        async with store.atomic():
            await pub.publish(reading(666))  # staged into the open transaction
            await asyncio.sleep(1.0)  # ten heartbeats go out meanwhile
            assert rec.values() == [0]
            raise RuntimeError("the command fails: roll back")
    async with store.atomic():
        await pub.publish(reading(1))  # takes the seq the rolled-back event had
        await asyncio.sleep(0.5)
        assert rec.values() == [0]
    await until(lambda: rec.values() == [0, 1])
    await asyncio.sleep(0.5)
    assert rec.values() == [0, 1]
    await pub.stop()
    await sub.stop()


async def test_a_subscriber_behind_a_pruned_outbox_is_told_and_carries_on(grid: Grid, actx, secure, tmp_path) -> None:  # type: ignore[no-untyped-def]
    sec = secure("solar-1", actx)
    store = Store(tmp_path / "pub.sqlite")
    pub = Publisher(actx, sec, store, source="solar-1/meter", hub_pub=grid.hub_pub, heartbeat_s=0.2, keep=100)
    await pub.start()
    for i in range(300):  # published while nobody listens
        await pub.publish(reading(i))
    with store.transaction() as conn:
        assert pub.outbox.prune(conn, 100) == 200
    rec = Applied(Store(tmp_path / "sub.sqlite"))
    sub = rec.subscriber(actx, grid)
    await sub.start()
    await until(lambda: len(rec.values()) == 100)
    await pub.publish(reading(300))
    await until(lambda: len(rec.values()) == 101)
    assert rec.values() == list(range(200, 301))
    assert sub.drops.counts["pruned"] == 1
    await pub.stop()
    await sub.stop()
