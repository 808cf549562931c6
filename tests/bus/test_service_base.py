"""The service base, run for real: the hub as a process with /healthz, /metrics and
signal handling; insecure mode only by an explicit setting, with a warning."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request

import pytest

from services.bus import BusError, Security
from services.bus.service import GC_THRESHOLD

from tests.support.bus import Grid
from tests.support.poll import wait
from tests.support.ports import free_port


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_for(url: str, proc: subprocess.Popen) -> tuple[int, bytes]:  # type: ignore[type-arg]
    def answer() -> tuple[int, bytes]:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        return get(url)

    return wait(answer, what=f"{url} to answer", timeout=30, every=0.1,  # type: ignore[no-any-return]
                retry_on=(OSError,))


def test_hub_process_health_metrics_and_clean_stop(grid: Grid) -> None:
    mport, p1, p2 = free_port(), free_port(), free_port()
    env = {**os.environ, **grid.env("market"), "GRIDTRADE_METRICS_PORT": str(mport),
           "GRIDTRADE_PUB_BIND": f"tcp://127.0.0.1:{p1}", "GRIDTRADE_SUB_BIND": f"tcp://127.0.0.1:{p2}"}
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "bus", "hub"], env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        status, body = wait_for(f"http://127.0.0.1:{mport}/healthz", proc)
        health = json.loads(body)
        assert status == 200 and health["ready"] and health["service"] == "hub"
        assert health["endpoints"] == [f"tcp://127.0.0.1:{p1}", f"tcp://127.0.0.1:{p2}"]
        assert health["identity_checked"] is True and health["hub_dropped"] == {}
        # a service process collects cyclic garbage less often than Python's default (700, 10, 10)
        assert health["gc"]["threshold"] == list(GC_THRESHOLD) != [700, 10, 10]
        status, metrics = get(f"http://127.0.0.1:{mport}/metrics")
        assert status == 200 and b"gridtrade_up 1.0" in metrics and b"gridtrade_hub_forwarded_total" in metrics
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGTERM)  # a second signal changes nothing
        assert proc.wait(timeout=30) == 0
        assert "Traceback" not in proc.stderr.read()  # type: ignore[union-attr]
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()  # type: ignore[union-attr]


def test_insecure_only_when_asked_and_with_a_warning(grid: Grid, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(BusError, match="no CURVE key"):
        Security(grid.keys, "nobody")
    with caplog.at_level("WARNING"):
        Security(grid.keys, "nobody", insecure=True)
    assert "CURVE is OFF" in caplog.text


def test_an_insecure_hub_says_so_once_at_start(grid: Grid) -> None:
    mport, p1, p2 = free_port(), free_port(), free_port()
    env = {**os.environ, **grid.env("market"), "GRIDTRADE_METRICS_PORT": str(mport), "GRIDTRADE_INSECURE": "1",
           "GRIDTRADE_PUB_BIND": f"tcp://127.0.0.1:{p1}", "GRIDTRADE_SUB_BIND": f"tcp://127.0.0.1:{p2}"}
    proc = subprocess.Popen([sys.executable, "-m", "services.bus"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        status, body = wait_for(f"http://127.0.0.1:{mport}/healthz", proc)
        assert status == 200 and json.loads(body)["identity_checked"] is False
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        err = proc.stderr.read()  # type: ignore[union-attr]
        assert err.count("ERROR services.bus.keys: INSECURE: CURVE is OFF") == 1, err
        assert err.count("ERROR services.bus.hub: hub: NO IDENTITY") == 1, err
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()  # type: ignore[union-attr]


def test_a_service_without_its_key_refuses_to_start(grid: Grid) -> None:
    env = {**os.environ, **grid.env("stranger-site"), "GRIDTRADE_PUB_BIND": "tcp://127.0.0.1:0"}
    r = subprocess.run([sys.executable, "-m", "services.bus"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no CURVE key for site 'stranger-site'" in r.stderr
    assert "Traceback" not in r.stderr
