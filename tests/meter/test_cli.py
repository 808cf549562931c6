"""``gridtrade meter emulate`` as a person runs it: a subprocess that prints the pty."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from services.meter.config import MeterConfig, MeterSettings
from services.meter.drivers import make_driver
from services.meter.sim import SimParams

from tests.support.paths import ROOT


@pytest.mark.parametrize("kind", ["line", "modbus"])
async def test_emulate_prints_a_pty_a_meter_can_read(kind: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    link = tmp_path / "meter.tty"
    env = {**os.environ, "GRIDTRADE_LOG_LEVEL": "WARNING", "GRIDTRADE_SIM__TIME_SCALE": "720"}
    proc = subprocess.Popen([sys.executable, "-m", "services.meter", "emulate", "--driver", kind, "--role",
                             "consumer", "--link", str(link)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline()
        path = proc.stdout.readline().strip()
        assert "/dev/pts/" in banner and path == str(link)
        drv = make_driver(MeterConfig(name="m", role="consumer", driver=kind, port=path, timeout_s=1.0),
                          SimParams())
        try:
            await drv.set_relay(True)
            c = await drv.read()
            assert c.relay_closed is True and 11.0 < c.voltage_v < 13.5
        finally:
            await drv.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for f in (proc.stdout, proc.stderr):
            if f:
                f.close()


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRIDTRADE_SITE", "home-7")
    monkeypatch.setenv("GRIDTRADE_METERS", '[{"name": "in", "role": "consumer", "driver": "line", "port": "/dev/x"}]')
    monkeypatch.setenv("GRIDTRADE_SIM__TIME_SCALE", "720")
    monkeypatch.setenv("GRIDTRADE_SIM__BATTERY", '{"capacity_wh": 1200}')
    monkeypatch.setenv("GRIDTRADE_ACCOUNT", "0x" + "cd" * 20)
    s = MeterSettings()
    assert s.meters[0].driver == "line" and s.meters[0].mints is False
    assert s.sim.time_scale == 720 and s.sim.battery.capacity_wh == 1200
    assert s.account == "0x" + "cd" * 20
    monkeypatch.delenv("GRIDTRADE_METERS")
    monkeypatch.setenv("GRIDTRADE_ROLE", "producer")
    assert [(m.name, m.role, m.driver, m.mints) for m in MeterSettings().meters] == [("main", "producer", "sim", True)]
    monkeypatch.setenv("GRIDTRADE_METERS", '[{"name": "x", "role": "consumer", "driver": "modbus"}]')
    with pytest.raises(ValueError, match="needs a port"):
        MeterSettings()
