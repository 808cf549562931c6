"""SIGKILL the meter service while it signs its production, start it again: the announced
cumulative production goes 1000, 2000, 3000, ... with no step twice and none skipped, in the
outbox and on the bus, and the meter key is announced once and stays the same."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import sqlite3
import subprocess
import sys

from services.bus import envelope, typed

from tests.support.bus import BusProbe, Grid
from tests.support.meter import ACCOUNT, deploy
from tests.support.paths import ROOT
from tests.support.poll import until


def in_outbox(db: pathlib.Path, topic: str) -> list:
    if not db.exists():
        return []
    with sqlite3.connect(db) as conn:
        try:
            rows = conn.execute("SELECT data FROM bus_outbox WHERE topic = ? ORDER BY seq", (topic,)).fetchall()
        except sqlite3.OperationalError:
            return []
    return [envelope.decode_json(r[0]).body for r in rows]


def produced_in_outbox(db: pathlib.Path) -> list[int]:
    return [b.produced_wh for b in in_outbox(db, "meter.energy_produced.solar-1")]


async def test_sigkill_and_restart_never_announces_a_step_twice_or_skips_one(grid: Grid, bus: BusProbe) -> None:
    dep = await deploy(bus)
    env = {**os.environ, **grid.env("solar-1"), "GRIDTRADE_ACCOUNT": ACCOUNT,
           "GRIDTRADE_METERS": json.dumps([{"name": "pv", "role": "producer"}]),
           "GRIDTRADE_SIM": json.dumps({"time_scale": 20000, "start": "2024-06-21T08:00:00Z",
                                        "battery": {"capacity_wh": 500000, "soc": 0.05}}),
           "GRIDTRADE_READING_INTERVAL_S": "0.03", "GRIDTRADE_LOG_LEVEL": "WARNING",
           "GRIDTRADE_METER_SCRYPT_N": "1024"}
    db = grid.root / "solar-1" / "meter.sqlite"
    kills, upto = 0, 0
    for round_ in range(4):
        before = len(produced_in_outbox(db))
        proc = subprocess.Popen([sys.executable, "-m", "services.meter"], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            await until(lambda: len(produced_in_outbox(db)) >= before + 2 + round_, timeout=60,
                        what="more production announced")
            if round_ < 3:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            else:
                # the bus hears what the kills interrupted (replayed from the outbox) while
                # the service is up to serve it; what is sent as it stops waits for its next start
                upto = len(produced_in_outbox(db))
                await until(lambda: len(bus.of("meter.energy_produced")) >= upto, timeout=30, what="bus caught up")
                proc.send_signal(signal.SIGTERM)
            await until(lambda: proc.poll() is not None, timeout=60, what="the service exited")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            assert proc.stderr is not None
            err = proc.stderr.read().decode()
            proc.stderr.close()
        assert "Traceback" not in err, err
    assert kills == 3
    announced = produced_in_outbox(db)
    # steps of 1000 Wh, each once, in order (the first may catch up with what was counted
    # before the deployment was heard)
    assert all(v % 1000 == 0 for v in announced)
    assert all(b - a == 1000 for a, b in zip(announced, announced[1:])), announced
    # nothing skipped: the highest step the production passed is announced, the rest is counted
    with sqlite3.connect(db) as conn:
        produced, last_announced, token, last, first, resets, key = conn.execute(
            "SELECT produced_wh, announced_wh, announced_token, last_energy, first_energy, resets, key_address"
            " FROM meter_counters WHERE meter = 'pv'").fetchone()
    assert last_announced == announced[-1] and token == dep.token and resets == 0
    assert 0 <= produced - last_announced < 1000
    # the sim's counters survived the kills with the production, in the same transactions
    assert produced == last - first
    # one key, made at the first start, announced once for the deployment, signing every step
    (announcement,) = in_outbox(db, "meter.key.solar-1")
    assert announcement.address == key
    assert len(list((grid.root / "solar-1" / "meter-keys" / "pv").iterdir())) == 1
    domain = typed.token_domain(dep.chain_id, dep.token)
    # and the bus delivered each step once, in order (replayed from the outbox after a kill)
    heard = bus.of("meter.energy_produced")
    assert len(heard) >= upto and [p.produced_wh for p in heard] == announced[:len(heard)]
    assert all(typed.recover_production(domain, key, p.produced_wh, p.signature) == key for p in heard)
