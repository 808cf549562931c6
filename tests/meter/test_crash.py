"""SIGKILL the meter service while it announces kWh, start it again: the EnergyProduced
ids are 0, 1, 2, ... with no duplicate and no gap, in the outbox and on the bus."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import sqlite3
import subprocess
import sys

from services.bus import envelope

from .conftest import ACCOUNT, ROOT_DIR, Bus, Grid, until


def produced_in_outbox(db: pathlib.Path) -> list[int]:
    if not db.exists():
        return []
    with sqlite3.connect(db) as conn:
        try:
            rows = conn.execute("SELECT data FROM bus_outbox WHERE topic = 'meter.energy_produced.solar-1' "
                                "ORDER BY seq").fetchall()
        except sqlite3.OperationalError:
            return []
    return [envelope.decode_json(r[0]).body.kwh_index for r in rows]  # type: ignore[attr-defined]


async def test_sigkill_and_restart_never_announces_a_kwh_twice_or_skips_one(grid: Grid, bus: Bus) -> None:
    env = {**os.environ, **grid.env("solar-1"), "GRIDTRADE_ACCOUNT": ACCOUNT,
           "GRIDTRADE_METERS": json.dumps([{"name": "pv", "role": "producer"}]),
           "GRIDTRADE_SIM": json.dumps({"time_scale": 20000, "start": "2024-06-21T08:00:00Z",
                                        "battery": {"capacity_wh": 500000, "soc": 0.05}}),
           "GRIDTRADE_READING_INTERVAL_S": "0.03", "GRIDTRADE_LOG_LEVEL": "WARNING"}
    db = grid.root / "solar-1" / "meter.sqlite"
    kills = 0
    for round_ in range(4):
        before = len(produced_in_outbox(db))
        proc = subprocess.Popen([sys.executable, "-m", "services.meter"], cwd=ROOT_DIR, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            await until(lambda: len(produced_in_outbox(db)) >= before + 2 + round_, timeout=60,
                        what="more kWh announced")
            if round_ < 3:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            else:
                proc.send_signal(signal.SIGTERM)
            await until(lambda: proc.poll() is not None, timeout=20, what="the service exited")
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
    assert announced == list(range(len(announced)))
    # nothing skipped: every whole kWh the counter passed was announced, the rest is counted
    with sqlite3.connect(db) as conn:
        index, accum, last, first, resets = conn.execute(
            "SELECT kwh_index, accum_wh, last_energy, first_energy, resets FROM meter_counters"
            " WHERE meter = 'pv'").fetchone()
    assert index == len(announced) and resets == 0
    # the sim's counters survived the kills with the kWh bookkeeping, in the same transactions
    assert 0 <= accum < 1000 and index * 1000 + accum == last - first
    # and the bus delivered each id once, in order (replayed from the outbox after a kill)
    await until(lambda: len(bus.of("meter.energy_produced")) >= len(announced), timeout=30, what="bus caught up")
    ids = [p.reading_id for p in bus.of("meter.energy_produced")]
    assert ids == [f"solar-1/pv/{i}" for i in range(len(announced))]
