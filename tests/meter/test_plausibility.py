"""A broken or hostile meter on a real serial line (emulators on pseudo-terminals): a counter
that is reset, steps back, jumps to 2^63 or races past the meter's rating counts nothing
it did not measure, and the relay opens when the readings or the bookkeeping fail."""

from __future__ import annotations

import asyncio
import dataclasses
import pathlib
import sqlite3

from services.meter.emulator import LineEmulator, make_emulator
from services.meter.physics import Counters
from services.meter.sim import SimParams, SimSite

from tests.support.bus import BusProbe, Grid
from tests.support.meter import (ACCOUNT, NOON, Heartbeats, consumer_settings, deploy, in_a_live_trade, running,
                                 settings, status)
from tests.support.poll import until


class Tampered:
    """A simulated site behind a meter whose energy counter can be reset, stepped back,
    made to jump or race, or wrap like a 32-bit register."""

    def __init__(self, sim: SimSite, *, offset: int = 0, wrap: int | None = None) -> None:
        self.sim, self.offset, self.wrap = sim, offset, wrap
        self.race_wh = 0
        self.fixed: int | None = None

    @property
    def true_wh(self) -> int:
        """What the meter really measured."""
        return self.sim.site.energy_wh

    @property
    def relay_closed(self) -> bool:
        return self.sim.site.state.relay_closed

    def read(self) -> Counters:
        c = self.sim.read()
        self.offset += self.race_wh
        energy = self.fixed if self.fixed is not None else c.energy_wh + self.offset
        if self.wrap:
            energy %= self.wrap
        return dataclasses.replace(c, energy_wh=energy)

    def set_relay(self, closed: bool) -> None:
        self.sim.set_relay(closed)

    def shown(self) -> int:
        return self.true_wh + self.offset

    def reset(self) -> None:
        """The counter starts again from 0."""
        self.offset -= self.shown()

    def jump_to(self, wh: int) -> None:
        self.offset += wh - self.shown()


def meter_health(svc, name: str) -> dict:  # type: ignore[no-untyped-def]
    return svc.health()["meters"][name]


async def test_a_reset_a_step_back_and_a_jump_deliver_no_burst(grid: Grid, bus: BusProbe, tmp_path: pathlib.Path) -> None:
    """During a live trade the buyer's counter is reset to 0, then steps back 200 Wh, then
    jumps to near 2^63: each is confirmed by consecutive readings and counting goes on from
    there; the delivery never exceeds what really came in over the line, and the relay
    stays closed (a confirmed reset is no failure)."""
    meter = Tampered(SimSite(SimParams(time_scale=3600, start=NOON, line_w=500), "consumer"), offset=50_000)
    emu = await LineEmulator(meter, link=tmp_path / "home.tty").start()
    s = consumer_settings(grid, emu.path, delivery_granularity_wh=0)
    async with in_a_live_trade(bus, s, emu, lambda: meter.relay_closed) as svc:
        def delivered() -> int:
            d = bus.of("meter.delivery", trade_id="t1")
            return d[-1].delivered_wh if d else 0

        await until(lambda: delivered() > 300, what="delivery counted")
        for change, verdict, n in ((meter.reset, "reset", 1), (lambda: meter.jump_to(meter.shown() - 200), "reset", 2),
                                   (lambda: meter.jump_to(2**63 - 1 - 10**9), "jump", 1)):
            change()
            await until(lambda: meter_health(svc, "grid")["confirmed"].get(verdict, 0) >= n,
                        what=f"{verdict} confirmed")
            before = delivered()
            await until(lambda: delivered() > before + 200, what=f"counting on after the {verdict}")
        health = meter_health(svc, "grid")
        assert health["refused"]["backwards"] >= 4 and health["refused"]["too_fast"] >= 2
        assert bus.of("meter.relay", closed=False) == []
        assert meter.relay_closed
        await bus.publish(status("t1", "fulfilled"))
        await until(lambda: bus.of("meter.relay", closed=False), what="relay open at the end")
        await until(lambda: any(d.final for d in bus.of("meter.delivery", trade_id="t1")), what="final delivery")
    values = [d.delivered_wh for d in bus.of("meter.delivery", trade_id="t1")]
    assert values == sorted(values)
    # no burst: never more than the energy that came in over the line (the true counter);
    # what the three changes cost is the few readings that confirmed each
    assert values[-1] <= meter.true_wh + 1
    assert values[-1] >= meter.true_wh * 0.5
    # the readings published show the counter as believed: back twice (the resets), up once
    shown = [r.energy_wh for r in bus.of("meter.reading", meter="grid")]
    assert sum(b < a for a, b in zip(shown, shown[1:])) == 2
    assert sum(b - a > 10**6 for a, b in zip(shown, shown[1:])) == 1


async def test_a_jump_to_2_63_mints_nothing_and_the_kwh_go_on(grid: Grid, bus: BusProbe, tmp_path: pathlib.Path) -> None:
    """A producer's counter leaps to 2^63 - 1 - 10^9: its production does not leap (not a
    mountain of tokens), nor grow on every tick; once confirmed it is the new baseline and
    the production goes on in steps. The counter at 2^63 itself is refused by the line
    protocol (a read error)."""
    site = SimSite(SimParams(time_scale=3600, start=NOON, battery={"capacity_wh": 10**6, "soc": 0.1}), "producer")
    meter = Tampered(site)
    emu = await LineEmulator(meter, link=tmp_path / "pv.tty").start()
    s = settings(grid, "solar-1", account=ACCOUNT, meters=[{"name": "pv", "role": "producer", "driver": "line",
                                                            "port": emu.path, "timeout_s": 0.5, "trade": False,
                                                            "time_scale": 3600}])
    await deploy(bus)
    try:
        async with running(s) as svc:
            await until(lambda: len(bus.of("meter.energy_produced")) >= 2, what="kWh announced")
            meter.jump_to(2**63 - 1 - 10**9)
            await until(lambda: meter_health(svc, "pv")["confirmed"].get("jump", 0) >= 1, what="jump confirmed")
            after_jump = len(bus.of("meter.energy_produced"))
            await until(lambda: len(bus.of("meter.energy_produced")) >= after_jump + 2, what="kWh go on")
            meter.fixed = 2**63
            errors = meter_health(svc, "pv")["errors"].get("range", 0)
            await until(lambda: meter_health(svc, "pv")["errors"].get("range", 0) >= errors + 3, what="range errors")
            meter.fixed = None
            await until(lambda: meter_health(svc, "pv")["failing"] == 0, what="reading again")
            await asyncio.sleep(0.3)
    finally:
        await emu.close()
    produced = [p.produced_wh for p in bus.of("meter.energy_produced")]
    assert all(b - a == 1000 for a, b in zip(produced, produced[1:])), produced
    # every announced Wh went into the batteries (the true PV counter covers them all)
    assert produced[-1] <= meter.true_wh + 1


async def test_the_relay_opens_on_implausible_readings_and_on_read_errors(
        grid: Grid, bus: BusProbe, tmp_path: pathlib.Path) -> None:
    """A live trade; the buyer's counter races far past the meter's rating (each reading
    another 100 kWh on): refused, never confirmed, the relay opens; once the readings are
    plausible again (the new level confirmed) the relay closes. A counter the protocol
    cannot carry (2^63) fails the reads: the relay opens again."""
    meter = Tampered(SimSite(SimParams(time_scale=3600, start=NOON, line_w=500), "consumer"))
    emu = await make_emulator("line", meter, link=tmp_path / "home.tty").start()
    s = consumer_settings(grid, emu.path, delivery_granularity_wh=0)
    async with in_a_live_trade(bus, s, emu, lambda: meter.relay_closed) as svc:
        await until(lambda: bus.of("meter.delivery", trade_id="t1"), what="delivery counted")
        meter.race_wh = 100_000
        await until(lambda: any("implausible" in r.reason for r in bus.of("meter.relay", closed=False)),
                    what="relay opened on implausible readings")
        assert not meter.relay_closed
        racing = [d.delivered_wh for d in bus.of("meter.delivery", trade_id="t1")]
        meter.race_wh = 0
        await until(lambda: len(bus.of("meter.relay", closed=True)) >= 2, what="closed again")
        assert meter_health(svc, "grid")["confirmed"].get("jump", 0) >= 1
        meter.fixed = 2**63
        await until(lambda: any("meter errors" in r.reason for r in bus.of("meter.relay", closed=False)),
                    what="relay opened on read errors")
        assert not meter.relay_closed
        meter.fixed = None
        await until(lambda: len(bus.of("meter.relay", closed=True)) >= 3, what="closed again after errors")
    values = [d.delivered_wh for d in bus.of("meter.delivery", trade_id="t1")]
    assert values == sorted(values) and values[-1] <= meter.true_wh + 1
    assert racing and racing[-1] <= meter.true_wh + 1


async def test_failed_bookkeeping_opens_the_relay_and_never_holds_it(
        grid: Grid, bus: BusProbe, tmp_path: pathlib.Path) -> None:
    """The meter's store refuses every update of its counters (a trigger, from another
    connection to the same file): the reads go on, the relay is still driven, and after
    three failed transactions in a row it opens. Once the store works again the relay
    follows the trade again, and the changes it missed are announced."""
    meter = Tampered(SimSite(SimParams(time_scale=3600, start=NOON, line_w=500), "consumer"))
    emu = await LineEmulator(meter, link=tmp_path / "home.tty").start()
    s = consumer_settings(grid, emu.path)
    hb = Heartbeats(bus, ["t1"])
    db: sqlite3.Connection | None = None
    try:
        async with running(s) as svc:
            db = sqlite3.connect(grid.root / "home-7" / "meter.sqlite", isolation_level=None)
            await bus.publish(status("t1", "recorded"))
            await until(lambda: meter.relay_closed, what="relay closed")
            db.execute("CREATE TRIGGER broken BEFORE UPDATE ON meter_counters"
                       " BEGIN SELECT RAISE(ABORT, 'disk trouble'); END")
            await until(lambda: not meter.relay_closed, what="relay opened")
            health = meter_health(svc, "grid")
            assert health["bookkeeping_failures"] >= 3 and "bookkeeping failed" in health["failure"]
            assert health["relay_wanted"] is False
            db.execute("DROP TRIGGER broken")
            await until(lambda: meter.relay_closed, what="closed again")
            await until(lambda: len(bus.of("meter.relay", closed=True)) >= 2, what="the close announced")
    finally:
        if db is not None:
            db.close()
        await hb.stop()
        await emu.close()
    relay = [(r.closed, r.reason) for r in bus.of("meter.relay")]
    # the opening happened while nothing could be written: announced once the store worked
    assert [c for c, _ in relay][:3] == [True, False, True]
    assert "bookkeeping failed" in relay[1][1] and "disk trouble" in relay[1][1]
