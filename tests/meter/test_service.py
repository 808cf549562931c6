"""The meter service on a real hub: signed production, relays that follow trades and fail
safe, signed delivery accounting and the seller's cross-check."""

from __future__ import annotations

import asyncio
import pathlib

import pytest

from services.bus import typed
from services.bus.events import Delivery, EnergyProduced, MeterKey, MeterReading
from services.meter.emulator import LineEmulator, make_emulator
from services.meter.sim import SimParams, SimSite

from tests.support.bus import BusProbe, Grid
from tests.support.meter import (ACCOUNT, BUYER, NOON, SELLER, Heartbeats, consumer_settings, deploy,
                                 in_a_live_trade, running, settings, status)
from tests.support.poll import until


def steps_in_order(produced: list[EnergyProduced], step: int = 1000) -> bool:
    """Multiples of the step, each the one after the one before (the first may catch up)."""
    values = [p.produced_wh for p in produced]
    return all(v % step == 0 for v in values) and all(b - a == step for a, b in zip(values, values[1:]))


def signed_by_the_key(produced: list[EnergyProduced], key: MeterKey) -> bool:
    return all(p.meter_address == key.address and typed.recover_production(
        typed.token_domain(p.chain_id, p.token), p.meter_address, p.produced_wh, p.signature) == key.address
               for p in produced)


async def test_producer_signs_its_production_at_each_step(grid: Grid, bus: BusProbe) -> None:
    sim = SimParams(time_scale=20000, start=NOON, battery={"capacity_wh": 200000, "soc": 0.1})
    s = settings(grid, "solar-1", account=ACCOUNT, meters=[{"name": "pv", "role": "producer"}], sim=sim)
    dep = await deploy(bus)
    async with running(s) as svc:
        await until(lambda: len(bus.of("meter.energy_produced")) >= 5, what="5 kWh announced")
        await until(lambda: bus.of("meter.reading"), what="a reading")
        health = svc.health()
    (key,) = bus.of("meter.key")
    assert (key.site, key.meter, key.account, key.chain_id, key.registry) == ("solar-1", "pv", ACCOUNT, 31337,
                                                                              dep.registry)
    assert key.address == health["meters"]["pv"]["key"]
    assert typed.recover_registration(typed.registry_domain(31337, dep.registry), key.address, ACCOUNT,
                                      key.signature) == key.address
    produced: list[EnergyProduced] = bus.of("meter.energy_produced")
    assert steps_in_order(produced) and signed_by_the_key(produced, key)
    assert all(p.token == dep.token and p.chain_id == 31337 and p.site == "solar-1" for p in produced)
    readings: list[MeterReading] = bus.of("meter.reading", meter="pv")
    # the counter the production was announced from covers all of it
    assert readings[-1].energy_wh >= produced[-1].produced_wh
    assert readings[-1].soc is not None and readings[-1].pv_w is not None and readings[-1].pv_w > 0
    assert health["meters"]["pv"]["connected"] is True and health["deployment"] == "d1"
    # each production step names the reading it was counted from as its cause; readings come from a timer
    reading_ids = {e.id for e in bus.events if e.type == "meter.reading"}
    assert all(e.cause is None for e in bus.events if e.type == "meter.reading")
    assert all(e.cause in reading_ids for e in bus.events if e.type == "meter.energy_produced")


async def test_production_counts_before_the_deployment_and_each_deployment_hears_the_key_once(
        grid: Grid, bus: BusProbe) -> None:
    """No deployment known: production is counted, nothing is signed. Once it is known the
    key is announced and the production caught up in one signed step; a restart announces
    the key no more; a new deployment hears it again, and the same cumulative production
    signed for its token."""
    sim = SimParams(time_scale=20000, start=NOON, battery={"capacity_wh": 200000, "soc": 0.1})
    s = settings(grid, "solar-1", account=ACCOUNT, meters=[{"name": "pv", "role": "producer"}], sim=sim)
    async with running(s):
        await until(lambda: any(r.energy_wh > 2500 for r in bus.of("meter.reading")), what="2.5 kWh counted")
    assert bus.of("meter.energy_produced") == [] and bus.of("meter.key") == []
    counted = bus.of("meter.reading")[-1].energy_wh
    d1 = await deploy(bus, 1)
    async with running(s):
        await until(lambda: len(bus.of("meter.energy_produced")) >= 2, what="the production caught up")
    first = bus.of("meter.energy_produced")[0]
    assert first.produced_wh >= counted // 1000 * 1000 >= 2000
    async with running(s):
        n = len(bus.of("meter.energy_produced"))
        await until(lambda: len(bus.of("meter.energy_produced")) >= n + 2, what="more after a restart")
        assert len(bus.of("meter.key")) == 1
        d2 = await deploy(bus, 2)
        await until(lambda: len(bus.of("meter.key")) == 2, what="the key announced to the new deployment")
        await until(lambda: len(bus.of("meter.energy_produced", token=d2.token)) >= 2, what="production for d2")
    k1, k2 = bus.of("meter.key")
    assert (k1.registry, k2.registry) == (d1.registry, d2.registry) and k1.address == k2.address
    old = bus.of("meter.energy_produced", token=d1.token)
    new = bus.of("meter.energy_produced", token=d2.token)
    assert steps_in_order(old) and steps_in_order(new) and signed_by_the_key(old + new, k1)
    # cumulative since the key was made: the new token hears the same counter, caught up
    assert new[0].produced_wh >= old[-1].produced_wh


@pytest.mark.parametrize("kind", ["line", "modbus"])
async def test_consumer_relay_follows_the_trade_and_fails_safe(
        kind: str, grid: Grid, bus: BusProbe, tmp_path: pathlib.Path) -> None:
    """A consumer meter on a real serial protocol (emulator on a pty): the relay closes while
    the trade is live, opens when its heartbeat stops, closes again when it is back, opens
    when the trade ends; Delivery counts exactly what the meter measured."""
    model = SimSite(SimParams(time_scale=3600, start=NOON, line_w=500), "consumer")
    emu = await make_emulator(kind, model, link=tmp_path / "home.tty").start()
    s = consumer_settings(grid, emu.path, driver=kind, delivery_granularity_wh=10)
    hb = Heartbeats(bus, ["t1"])
    dep = await deploy(bus)
    try:
        async with running(s) as svc:
            await until(lambda: bus.of("meter.reading", meter="grid"), what="a reading")
            assert model.site.state.relay_closed is False
            await bus.publish(status("t1", "recorded"))
            await until(lambda: bus.of("meter.relay", closed=True), what="relay closed")
            assert model.site.state.relay_closed is True
            assert bus.of("meter.relay", closed=True)[0].trade_id == "t1"
            await until(lambda: len(bus.of("meter.delivery", trade_id="t1")) >= 3, what="deliveries")
            # the trade's heartbeat stops: the relay opens by itself
            hb.on = False
            await until(lambda: bus.of("meter.relay", closed=False), what="fail-safe open")
            assert "heartbeat" in bus.of("meter.relay", closed=False)[0].reason
            assert model.site.state.relay_closed is False
            hb.on = True
            await until(lambda: len(bus.of("meter.relay", closed=True)) >= 2, what="closed again")
            await bus.publish(status("t1", "fulfilled", delivered_wh=0))
            await until(lambda: len(bus.of("meter.relay", closed=False)) >= 2, what="open at the end")
            await asyncio.sleep(0.5)
            assert model.site.state.relay_closed is False
            assert svc.health()["meters"]["grid"]["relay_wanted"] is False
            key = svc.health()["meters"]["grid"]["key"]
    finally:
        await hb.stop()
        await emu.close()
    deliveries: list[Delivery] = bus.of("meter.delivery", trade_id="t1")
    # each signed by the buyer's meter key (EIP-712 Delivery, the market's domain)
    market = typed.market_domain(dep.chain_id, dep.market)
    assert all(d.meter_address == key and typed.recover_delivery(market, "t1", d.delivered_wh, d.signature) == key
               for d in deliveries)
    values = [d.delivered_wh for d in deliveries]
    assert values == sorted(values)
    # a count is published once, except that the relay opening marks it final (again)
    assert all(b.final for a, b in zip(deliveries, deliveries[1:]) if a.delivered_wh == b.delivered_wh)
    assert all(d.role == "consumer" and d.site == "home-7" for d in deliveries)
    # the consumer imports only through the closed relay, only during t1: the meter's
    # counter is exactly what was delivered
    assert values[-1] == model.site.energy_wh > 0
    # each time the relay opened, the count it had then was marked final; the last one too
    assert deliveries[-1].final and 1 <= sum(d.final for d in deliveries) <= 2
    # granularity 10 Wh, except the last count each time the relay opened (twice)
    small = [b - a for a, b in zip(values, values[1:]) if b - a < 10]
    assert len(small) <= 2


async def test_seller_cross_checks_the_buyer(grid: Grid, bus: BusProbe) -> None:
    """Two sites, two meter services: matching ends raise no flag; a buyer that measures
    far less than the seller gave is flagged once, at the seller."""
    common = dict(time_scale=360, start=NOON, line_loss=0.03)
    seller = settings(grid, "solar-1", account=SELLER, meters=[{"name": "out", "role": "producer", "mint": False}],
                      sim=SimParams(**common, line_w=500, battery={"capacity_wh": 50000, "soc": 0.9}),
                      delivery_granularity_wh=0)
    buyer = settings(grid, "home-7", account=BUYER, meters=[{"name": "in", "role": "consumer"}],
                     sim=SimParams(**common, line_w=500), delivery_granularity_wh=0)
    hb = Heartbeats(bus, ["t1", "t2"])
    dep = await deploy(bus)
    try:
        async with running(seller), running(buyer) as b:
            await bus.publish(status("t1", "recorded"))
            await until(lambda: len(bus.of("meter.delivery", trade_id="t1", site="home-7")) >= 15
                        and len(bus.of("meter.delivery", trade_id="t1", site="solar-1")) >= 15, what="deliveries")
            assert bus.of("meter.mismatch") == []
            await bus.publish(status("t1", "closed"))
            await until(lambda: len(bus.of("meter.relay", site="home-7", closed=False)) >= 1, what="buyer open")
            # the buyer now draws twice what the seller gives
            for r in b.runners:
                r.driver.sim.site.line_w = 1000  # type: ignore[attr-defined]
            await bus.publish(status("t2", "recorded"))
            await until(lambda: bus.of("meter.mismatch", trade_id="t2"), what="mismatch flagged")
            await asyncio.sleep(0.5)
            await bus.publish(status("t2", "closed"))
    finally:
        await hb.stop()
    assert bus.of("meter.mismatch", trade_id="t1") == []
    flags = bus.of("meter.mismatch", trade_id="t2")
    assert len(flags) == 1
    assert flags[0].buyer_wh > flags[0].seller_wh
    assert flags[0].site == "solar-1" and flags[0].reason.startswith("mismatch: the buyer's meter signed")
    seller_t1 = [d.delivered_wh for d in bus.of("meter.delivery", trade_id="t1", site="solar-1")]
    buyer_t1 = [d.delivered_wh for d in bus.of("meter.delivery", trade_id="t1", site="home-7")]
    assert seller_t1[-1] > 0 and buyer_t1[-1] > 0
    # the seller's meter signs its export (EIP-712 Export), the buyer's its delivery
    market = typed.market_domain(dep.chain_id, dep.market)
    assert all(typed.recover_export(market, d.trade_id, d.delivered_wh, d.signature) == d.meter_address
               for d in bus.of("meter.delivery", site="solar-1"))
    assert all(typed.recover_delivery(market, d.trade_id, d.delivered_wh, d.signature) == d.meter_address
               for d in bus.of("meter.delivery", site="home-7"))


async def test_a_failing_meter_publishes_nothing_wrong_and_keeps_the_relay_safe(
        grid: Grid, bus: BusProbe, tmp_path: pathlib.Path) -> None:
    """During a live trade: damaged replies make the service command the relay open; an
    unplugged port leaves it to the meter's watchdog; once the meter answers again the
    relay follows the trade again. Readings stay exact and the service stays up."""
    model = SimSite(SimParams(time_scale=3600, start=NOON, line_w=500), "consumer")
    emu = await LineEmulator(model, link=tmp_path / "home.tty", watchdog_s=0.6).start()
    s = consumer_settings(grid, emu.path, timeout_s=0.2)
    async with in_a_live_trade(bus, s, emu, lambda: model.site.state.relay_closed) as svc:
        # every reply damaged for a while: after 3 failed reads the relay is commanded open
        emu.corrupt("checksum", 3)
        await until(lambda: any("meter errors" in r.reason for r in bus.of("meter.relay", closed=False)),
                    what="relay opened on errors")
        await until(lambda: len(bus.of("meter.relay", closed=True)) >= 2, what="closed again after recovery")
        # the port disappears: nobody can command the meter, its watchdog opens the relay
        emu.unplug()
        await until(lambda: not model.site.state.relay_closed, what="watchdog opened the relay")
        await asyncio.sleep(0.5)
        assert svc.health()["meters"]["grid"]["connected"] is False
        emu.replug()
        await until(lambda: model.site.state.relay_closed, timeout=10, what="closed again after replug")
        health = svc.health()["meters"]["grid"]
        assert health["errors"]["checksum"] >= 3 and health["errors"]["io"] >= 1
        assert health["connects"] >= 2
    readings = [r.energy_wh for r in bus.of("meter.reading", meter="grid")]
    assert readings == sorted(readings)
    deliveries = [d.delivered_wh for d in bus.of("meter.delivery", trade_id="t1")]
    assert deliveries == sorted(deliveries) and deliveries[-1] <= model.site.energy_wh
