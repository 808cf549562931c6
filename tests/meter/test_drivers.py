"""The line and Modbus drivers against their emulators over real pseudo-terminals."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import random

import pytest

from services.meter.config import MeterConfig
from services.bus.retry import Backoff
from services.meter.drivers import make_driver
from services.meter.emulator import LineEmulator, make_emulator
from services.meter.errors import DriverError, MeterError, ProtocolError
from services.meter.physics import Counters
from services.meter.sim import SimParams, SimSite

NOON = "2024-06-21T10:00:00Z"


def model(role: str = "producer", scale: float = 3600) -> SimSite:
    return SimSite(SimParams(time_scale=scale, start=NOON, battery={"capacity_wh": 100000, "soc": 0.5}), role)


@contextlib.asynccontextmanager
async def paired(kind: str, tmp_path: pathlib.Path, role: str = "producer", **cfg: object):  # type: ignore[no-untyped-def]
    """A simulated site's meter emulated on a pty and a driver of ``kind`` for it:
    ``(model, emulator, driver)``, the driver and then the emulator closed on leaving."""
    m = model(role)
    # the link's folder need not exist yet (a site's data dir on its first start)
    emu = await make_emulator(kind, m, link=tmp_path / "site" / f"{kind}.tty").start()
    conf = {"name": "m", "role": role, "driver": kind, "port": emu.path, "timeout_s": 0.3,
            "export_registers": True, **cfg}
    drv = make_driver(MeterConfig(**conf), m.params, backoff=Backoff(0.05, 0.4))  # type: ignore[arg-type]
    try:
        yield m, emu, drv
    finally:
        await drv.close()
        await emu.close()


def wire(c: Counters, export: bool = True) -> Counters:
    return Counters(energy_wh=c.energy_wh, power_w=c.power_w, voltage_v=c.voltage_v, current_a=c.current_a,
                    relay_closed=c.relay_closed, export_wh=c.export_wh if export else None)


@pytest.mark.parametrize(("kind", "role", "export"), [
    ("line", "producer", True), ("line", "consumer", True),
    ("modbus", "producer", True), ("modbus", "producer", False), ("modbus", "consumer", False)])
async def test_readings_are_decoded_exactly(kind: str, role: str, export: bool, tmp_path: pathlib.Path) -> None:
    async with paired(kind, tmp_path, role, export_registers=export) as (m, emu, drv):
        m.set_relay(True)  # energy flows through both kinds of meter
        seen = set()
        for _ in range(5):
            c = await drv.read()
            assert emu.served is not None
            expected = wire(emu.served, export=(kind == "line" or export) and role == "producer")
            assert c == expected
            seen.add(c.energy_wh)
            await asyncio.sleep(0.05)
        assert len(seen) > 1  # the model moved on between reads: these are live values
        assert pathlib.Path(emu.path).resolve() == pathlib.Path(emu.device)
        assert emu.device.startswith("/dev/pts/")


@pytest.mark.parametrize("kind", ["line", "modbus"])
async def test_relay_commands_take_effect(kind: str, tmp_path: pathlib.Path) -> None:
    async with paired(kind, tmp_path, "consumer") as (m, emu, drv):
        assert (await drv.read()).relay_closed is False
        await drv.set_relay(True)
        assert m.site.state.relay_closed is True
        assert (await drv.read()).relay_closed is True
        await asyncio.sleep(0.1)
        assert (await drv.read()).power_w == pytest.approx(m.params.line_w, abs=0.1)  # the load draws
        await drv.set_relay(False)
        assert m.site.state.relay_closed is False
        assert (await drv.read()).relay_closed is False


@pytest.mark.parametrize("kind", ["line", "modbus"])
async def test_port_unplugged_and_back_reconnects_with_capped_backoff(kind: str, tmp_path: pathlib.Path) -> None:
    async with paired(kind, tmp_path) as (m, emu, drv):
        await drv.read()
        first_device = emu.device
        emu.unplug()
        assert not os.path.exists(emu.path)
        delays = []
        for _ in range(7):
            with pytest.raises(DriverError):
                await drv.read()
            delays.append(drv.backoff.delay)  # type: ignore[attr-defined]
            with pytest.raises(DriverError, match="reconnect in"):
                await drv.read()  # within the backoff: no attempt, a quick clean error
            await asyncio.sleep(drv.backoff.wait_left() + 0.01)  # type: ignore[attr-defined]
        assert drv.connected is False
        assert drv.errors["io"] == 1 and drv.errors["open"] >= 2
        failures = [d for d in delays if d]
        assert failures == [0.05, 0.1, 0.2, 0.4, 0.4, 0.4, 0.4]  # doubling, capped
        with pytest.raises(DriverError):
            await drv.set_relay(False)  # a relay command fails cleanly too
        emu.replug()
        assert emu.device != first_device or os.path.exists(emu.path)
        await asyncio.sleep(0.45)
        c = await drv.read()
        assert c == wire(emu.served)  # type: ignore[arg-type]
        assert drv.connected and drv.connects == 2 and drv.backoff.delay == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", ["line", "modbus"])
@pytest.mark.parametrize("fault", ["checksum", "short", "garbage", "drop"])
async def test_damaged_replies_are_counted_and_never_returned(kind: str, fault: str, tmp_path: pathlib.Path) -> None:
    async with paired(kind, tmp_path) as (m, emu, drv):
        await drv.read()
        emu.corrupt(fault)
        with pytest.raises(ProtocolError):
            await drv.read()
        assert sum(drv.errors.values()) >= 1
        assert drv.connected  # a bad frame is not a reason to drop the port
        c = await drv.read()
        assert c == wire(emu.served)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["line", "modbus"])
async def test_noise_on_the_line_never_turns_into_a_reading(kind: str, tmp_path: pathlib.Path) -> None:
    async with paired(kind, tmp_path) as (m, emu, drv):
        rng = random.Random(7)
        good = bad = 0
        for i in range(30):
            if i % 3 == 0:
                emu.inject(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40))))
            if i % 5 == 1:
                emu.corrupt(rng.choice(["checksum", "short", "garbage"]))
            if kind == "line" and i % 7 == 2:
                emu.inject(b"$R,99999,1.0,12.00,1.00,1*00\n")  # a plausible reading with a bad checksum
            try:
                c = await drv.read()
            except MeterError:
                bad += 1
                continue
            good += 1
            assert c == wire(emu.served)  # type: ignore[arg-type]
    assert good >= 10 and bad >= 1
    assert sum(drv.errors.values()) >= bad


async def test_line_meter_answers_malformed_requests_with_err(tmp_path: pathlib.Path) -> None:
    """The emulator side of the protocol, byte for byte over the pty."""
    import serial

    m = model()
    emu = await LineEmulator(m).start()
    port = serial.Serial(emu.path, timeout=0)
    try:
        async def ask(data: bytes) -> bytes:
            port.write(data)
            out = b""
            for _ in range(100):
                await asyncio.sleep(0.01)
                out += port.read(256)
                if out.endswith(b"\n"):
                    return out
            raise AssertionError(f"no reply to {data!r}")

        assert await ask(b"$READ*00\n") == b"$ERR,checksum*%02X\n" % (ord("E") ^ ord("R") ^ ord("R") ^ ord(",")
                                                                      ^ 0x63 ^ 0x68 ^ 0x65 ^ 0x63 ^ 0x6B ^ 0x73 ^ 0x75 ^ 0x6D)
        assert (await ask(b"$FOO*%02X\n" % (ord("F") ^ ord("O") ^ ord("O")))).startswith(b"$ERR,unknown*")
        assert (await ask(b"$PING*%02X\n" % (ord("P") ^ ord("I") ^ ord("N") ^ ord("G")))).startswith(b"$OK,PONG*")
        assert emu.errors["checksum"] == 1 and emu.errors["unknown"] == 1
    finally:
        port.close()
        await emu.close()


async def test_line_meter_watchdog_opens_the_relay_when_the_host_goes_quiet(tmp_path: pathlib.Path) -> None:
    m = model("consumer")
    emu = await LineEmulator(m, watchdog_s=0.3).start()
    drv = make_driver(MeterConfig(name="m", role="consumer", driver="line", port=emu.path, timeout_s=0.3), m.params)
    try:
        await drv.set_relay(True)
        for _ in range(4):  # a host that keeps talking keeps it closed
            await asyncio.sleep(0.1)
            assert (await drv.read()).relay_closed is True
        await asyncio.sleep(0.9)
        assert m.site.state.relay_closed is False
    finally:
        await drv.close()
        await emu.close()
