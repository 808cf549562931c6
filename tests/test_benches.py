"""The benchmarks still run: each one, at its smallest, on the real parts it measures (a bench
is never a test of speed; this only keeps them from rotting when the code they drive changes)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.anvil


def bench(*argv: str) -> str:
    out = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=170,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_the_scale_bench_runs_a_small_grid() -> None:
    out = bench("bench/scale.py", "--sites", "4", "--slots", "4", "--trades", "4", "--quick", "--repeat", "1")
    for part in ("== bus:", "== market:", "== chain:", "== gas per traded kWh", "== goals"):
        assert part in out, out


def test_the_gas_bench_runs_a_small_grid() -> None:
    out = bench("bench/gas.py", "--trades", "2", "--kwh", "2")
    assert "ratio v2 / seed" in out and "openBatch, per trade" in out, out
