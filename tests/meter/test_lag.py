"""The seller's cross-check beyond the loss tolerance: a buyer whose signed delivery is not
heard while the seller keeps exporting (its meter silent, or signing with a key its site
never announced) is flagged, and the seller's relay opens for the trade."""

from __future__ import annotations

import asyncio

from services.meter.sim import SimParams

from tests.support.bus import BusProbe, Grid
from tests.support.meter import BUYER, NOON, SELLER, Heartbeats, deploy, running, settings, status
from tests.support.poll import until

COMMON = dict(time_scale=360, start=NOON, line_loss=0.03)  # 500 W over the line: 50 Wh a second


def sites(grid: Grid, *, buyer_account: str | None):  # type: ignore[no-untyped-def]
    seller = settings(grid, "solar-1", account=SELLER, meters=[{"name": "out", "role": "producer", "mint": False}],
                      sim=SimParams(**COMMON, line_w=500, battery={"capacity_wh": 50000, "soc": 0.9}),
                      delivery_granularity_wh=0, lag_s=3.0, lag_slack_wh=150)
    buyer = settings(grid, "home-7", account=buyer_account, meters=[{"name": "in", "role": "consumer"}],
                     sim=SimParams(**COMMON, line_w=500), delivery_granularity_wh=0)
    return seller, buyer


def seller_opened(bus: BusProbe) -> list:
    return [r for r in bus.of("meter.relay", site="solar-1", closed=False) if "flagged" in r.reason]


async def test_a_silent_buyer_is_flagged_and_the_sellers_relay_opens(grid: Grid, bus: BusProbe) -> None:
    seller, buyer = sites(grid, buyer_account=BUYER)
    hb = Heartbeats(bus, ["t1"])
    await deploy(bus)
    try:
        async with running(seller) as s, running(buyer) as b:
            await until(lambda: len(bus.of("meter.key", site="home-7")) == 1, what="the buyer's key announced")
            await bus.publish(status("t1", "recorded"))
            await until(lambda: len(bus.of("meter.delivery", trade_id="t1", site="home-7")) >= 20
                        and len(bus.of("meter.delivery", trade_id="t1", site="solar-1")) >= 20, what="deliveries")
            await asyncio.sleep(4)  # longer than lag_s: a buyer that is heard is never late
            assert bus.of("meter.mismatch") == [] and seller_opened(bus) == []
            # the buyer's meter service goes away; the trade stays live, the seller exports on
            await b.stop()
            await until(lambda: bus.of("meter.mismatch", trade_id="t1"), what="the lag flagged")
            await until(lambda: seller_opened(bus), what="the seller's relay opened for it")
            health = s.health()["meters"]["out"]
            assert health["relay_wanted"] is False and health["relay_closed"] is False
            assert "flagged" in health["why"]
            await asyncio.sleep(0.5)
    finally:
        await hb.stop()
    (flag,) = bus.of("meter.mismatch", trade_id="t1")
    assert flag.site == "solar-1" and flag.reason.startswith("lag: no signed delivery from the buyer's meter")
    assert flag.seller_wh > flag.buyer_wh > 0
    # once open the seller's relay stays open for the flagged trade, though it is still live
    assert [r.closed for r in bus.of("meter.relay", site="solar-1")][-2:] == [True, False]


async def test_a_delivery_signed_by_a_key_never_announced_is_not_believed(grid: Grid, bus: BusProbe) -> None:
    """The buyer has no account configured, so its meter key was never announced: its
    deliveries are signed but not believed at the seller, which flags the lag."""
    seller, buyer = sites(grid, buyer_account=None)
    hb = Heartbeats(bus, ["t1"])
    await deploy(bus)
    try:
        async with running(seller) as s, running(buyer):
            await bus.publish(status("t1", "recorded"))
            await until(lambda: bus.of("meter.mismatch", trade_id="t1"), what="the lag flagged")
            await until(lambda: seller_opened(bus), what="the seller's relay opened for it")
            health = s.health()
    finally:
        await hb.stop()
    assert bus.of("meter.key", site="home-7") == []
    assert len(bus.of("meter.delivery", trade_id="t1", site="home-7")) >= 3  # the buyer did sign and publish
    assert health["deliveries_refused"]["home-7"] >= 3 and health["deliveries_refused_why"]["unknown_key"] >= 3
    (flag,) = bus.of("meter.mismatch", trade_id="t1")
    assert flag.buyer_wh == 0 and flag.reason.startswith("lag:")
