"""The seed's demo end to end: every service a real subprocess from ``launcher.plan()`` on a
real anvil node, two users at their own gateways' REST APIs, the chain read with web3."""

from __future__ import annotations

import pathlib

import pytest

from services.bus import events as E

from .flow import PRICE, check_final, relay_audit, run_trade
from .harness import cost, start_grid, stop_grid

# the consumer site has no PV and a low battery, so it takes what the line brings;
# a delivery is published every 100 Wh, so the seller is paid in visible steps
CONSUMER_METER = {"GRIDTRADE_SIM__PANEL__AREA_M2": "0", "GRIDTRADE_SIM__BATTERY__SOC": "0.1",
                  "GRIDTRADE_DELIVERY_GRANULARITY_WH": "100"}


@pytest.mark.slow
@pytest.mark.anvil
@pytest.mark.timeout(600)
async def test_trade_end_to_end(tmp_path: pathlib.Path) -> None:
    grid = await start_grid(tmp_path, time_scale=1440, meter_env={"meter-home-7": CONSUMER_METER})
    try:
        out = await run_trade(grid)
        final = await check_final(grid, out)
        relay_audit(grid, {out.trade_id})
        # the bus told the same story, each step once
        statuses = [s.state for s in grid.watch.of(E.TradeStatus, trade_id=out.trade_id)]
        assert statuses == ["agreed", "recorded", "delivering", "closed", "settled"], statuses
        assert len(grid.watch.of(E.TradeAgreed, trade_id=out.trade_id)) == 1
        assert len(grid.watch.of(E.TradeRecorded, trade_id=out.trade_id)) == 1
        closed = grid.watch.of(E.TradeClosedOnChain, trade_id=out.trade_id)
        assert len(closed) == 1 and closed[0].delivered_wh == final["delivered"], closed
        assert closed[0].paid_wei == cost(final["delivered"], PRICE)
    finally:
        await stop_grid(grid)
