"""The operator's tools: ``gridtrade bus tail`` and ``gridtrade bus publish`` as real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from .conftest import Grid

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
    assert "policy:chain.mining" in err


def test_publish_rejects_bad_input_clearly(grid: Grid) -> None:
    for args, words in ((["nope.type", "{}"], "no event type"), (["chain.mining", '{"mining": "perhaps"}'], "invalid"),
                        (["chain.mining", "{not json"], "invalid")):
        r = subprocess.run([*GT, "bus", "publish", *args], env=run_env(grid, "market"), capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 2 and words in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr
    assert not (grid.root / "market" / "cli.sqlite").exists()  # nothing was published or stored
