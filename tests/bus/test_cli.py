"""The operator's tools: ``gridtrade bus tail`` and ``gridtrade bus publish`` as real processes."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import zmq.asyncio

from services.bus import Publisher, Store, envelope
from services.bus.events import ChainMining
from services.cli import Follow

from tests.support.bus import Grid

GT = [sys.executable, "-m", "services.cli"]


def run_env(grid: Grid, site: str) -> dict[str, str]:
    return {**os.environ, **grid.env(site)}


READING = {"site": "solar-1", "meter": "m1", "role": "producer", "energy_wh": 5, "power_w": 1.0, "voltage_v": 12.0,
           "current_a": 0.1, "relay_closed": False}


def test_publish_then_tail_shows_the_event(grid: Grid) -> None:
    tail = subprocess.Popen([*GT, "bus", "tail", "chain.mining", "meter.reading", "--count", "1"],
                            env=run_env(grid, "home-7"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)  # let the tail subscribe before the events go out
        # a chain event from a site's cli is not the chain service's: published (with a
        # warning), but no subscriber shows or applies it
        forged = subprocess.run([*GT, "bus", "publish", "chain.mining", '{"mining": false}'],
                                env=run_env(grid, "solar-1"), capture_output=True, text=True, timeout=60)
        assert forged.returncode == 0, forged.stderr
        assert "subscribers drop chain.mining" in forged.stderr
        pub = subprocess.run([*GT, "bus", "publish", "meter.reading", json.dumps(READING)],
                             env=run_env(grid, "solar-1"), capture_output=True, text=True, timeout=60)
        assert pub.returncode == 0, pub.stderr
        assert "warning" not in pub.stderr
        out, err = tail.communicate(timeout=60)
    finally:
        tail.kill()
    line = json.loads(out.strip().splitlines()[0])
    assert line["type"] == "meter.reading" and line["body"]["energy_wh"] == 5
    assert line["source"] == "solar-1/cli" and line["seq"] >= 1
    assert line["v"] == 2 and "cause" in line and line["cause"] is None  # published by hand: no cause
    assert "policy:chain.mining" in err


def test_publish_rejects_bad_input_clearly(grid: Grid) -> None:
    for args, words in ((["nope.type", "{}"], "no event type"), (["chain.mining", '{"mining": "perhaps"}'], "invalid"),
                        (["chain.mining", "{not json"], "invalid")):
        r = subprocess.run([*GT, "bus", "publish", *args], env=run_env(grid, "market"), capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 2 and words in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr
    assert not (grid.root / "market" / "cli.sqlite").exists()  # nothing was published or stored


def _env(id_: str, cause: str | None) -> envelope.Envelope:
    return envelope.make(ChainMining(mining=True), source="market/chain", seq=1, id=id_, cause=cause)


def test_follow_keeps_what_an_id_led_to_even_out_of_order() -> None:
    f = Follow("cmd-1")
    assert [e.id for e in f.feed(_env("c", "b"))] == []  # its cause is not known yet: waits
    assert [e.id for e in f.feed(_env("x", None))] == []
    assert [e.id for e in f.feed(_env("a", "cmd-1"))] == ["a"]
    assert [e.id for e in f.feed(_env("y", "x"))] == []
    assert [e.id for e in f.feed(_env("b", "a"))] == ["b", "c"]  # and what waited for it
    assert [e.id for e in f.feed(_env("d", "c"))] == ["d"]
    assert f.ids == {"cmd-1", "a", "b", "c", "d"}


async def test_tail_follow_prints_one_chain_of_causes(grid: Grid, secure, tmp_path) -> None:  # type: ignore[no-untyped-def]
    ctx = zmq.asyncio.Context()
    store = Store(tmp_path / "pub.sqlite")
    pub = Publisher(ctx, secure("market", ctx), store, source="market/chain", hub_pub=grid.hub_pub, heartbeat_s=0.2)
    await pub.start()
    root = await pub.publish(ChainMining(mining=True))
    other = await pub.publish(ChainMining(mining=False))
    child = await pub.publish(ChainMining(mining=False), cause=root.id)
    await pub.publish(ChainMining(mining=True), cause=other.id)
    grandchild = await pub.publish(ChainMining(mining=True), cause=child.id)
    tail = await asyncio.create_subprocess_exec(*GT, "bus", "tail", "--follow", root.id, "--count", "3",
                                                env=run_env(grid, "home-7"), stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(tail.communicate(), 60)
    finally:
        if tail.returncode is None:
            tail.kill()
            await tail.wait()
        await pub.stop()
        store.close()
        ctx.destroy(0)
    lines = [json.loads(x) for x in out.decode().splitlines()]
    assert [(x["id"], x["cause"]) for x in lines] == [(root.id, None), (child.id, root.id), (grandchild.id, child.id)]
