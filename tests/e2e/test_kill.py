"""The end-to-end trade while every service in turn is killed with SIGKILL and started
again (``Runner.start`` of the same ``Proc``): the trade still completes with exact
balances, no mint, trade or payment is lost or doubled, and no relay is closed without a
live trade (watched on the bus by a real subscriber)."""

from __future__ import annotations

import asyncio
import collections
import pathlib

import pytest

from services.bus import events as E

from .flow import AUCTION_S, PRICE, check_final, relay_audit, run_trade
from .harness import SERVICES, Grid, cost, start_grid, stop_grid

# a slow line (100 W instead of 500 W) so delivery lasts long enough to restart services in it.
# The simulated meter's "hardware" lives in the meter process: while one site's meter is
# killed its sim counts no flow, while the other site's goes on counting, so the seller's
# cross-check would (rightly, by what it sees) flag the gap as a loss and close the trade.
# A real meter keeps counting while its service restarts; these tests are about nothing
# being lost or doubled across restarts, so the cross-check is loosened here (it is tested
# in tests/meter and tests/adversarial).
LINE = {"GRIDTRADE_SIM__LINE_W": "100", "GRIDTRADE_MISMATCH_TOLERANCE": "1", "GRIDTRADE_LAG_S": "600"}
CONSUMER_METER = {**LINE, "GRIDTRADE_SIM__PANEL__AREA_M2": "0", "GRIDTRADE_SIM__BATTERY__SOC": "0.1",
                  "GRIDTRADE_DELIVERY_GRANULARITY_WH": "50"}

# which services die at which point of the trade
PLAN = {
    "produced": ["hub"],  # tokens minted; nothing funded yet
    "funded": ["chain", "wallet-home-7"],  # escrow in; the consumer's unlock is lost with its wallet
    "bid": ["auction"],  # down past the auction's deadline: settled when it is back
    "recorded": ["meter-solar-1", "wallet-solar-1"],  # the trade is on-chain, relays about to close
    "delivering": ["meter-home-7", "gateway-solar-1", "gateway-home-7", "hub"],
}


@pytest.mark.slow
@pytest.mark.anvil
@pytest.mark.timeout(600)
async def test_trade_survives_sigkill_of_each_service(tmp_path: pathlib.Path) -> None:
    grid = await start_grid(tmp_path, time_scale=1440,
                            meter_env={"meter-home-7": CONSUMER_METER, "meter-solar-1": LINE},
                            service_env={"GRIDTRADE_SETTLE_EVERY_WH": "50"})  # paid in steps, as in test_trade
    try:
        async def between(stage: str) -> None:
            for name in PLAN.get(stage, []):
                await grid.kill(name)
                if name == "auction":  # the offer's deadline passes while the auction is down
                    await asyncio.sleep(AUCTION_S + 1)
                await grid.start(name)

        # close soon after the restarts during delivery, well before the 2 kWh are through
        out = await run_trade(grid, between=between, close_at_wh=300)
        assert set(grid.kills) == set(SERVICES), grid.kills
        final = await check_final(grid, out)
        relay_audit(grid, {out.trade_id})
        _nothing_twice(grid, out.trade_id, final["delivered"])
    finally:
        await stop_grid(grid)


def _nothing_twice(grid: Grid, trade_id: str, delivered: int) -> None:
    w = grid.watch
    # one offer, one trade, recorded once, opened once on-chain, closed once
    assert len(w.of(E.OfferOpened)) == 1
    sold = [c for c in w.of(E.OfferClosed) if c.outcome == "sold"]
    assert len(sold) == 1 and sold[0].price_wei_per_kwh == PRICE, w.of(E.OfferClosed)
    assert [a.trade_id for a in w.of(E.TradeAgreed)] == [trade_id]
    assert len(w.of(E.TradeRecorded, trade_id=trade_id)) == 1
    assert len(grid.market_events("TradeOpened")) == 1
    assert len(grid.market_events("TradeClosed")) == 1
    closed = w.of(E.TradeClosed, trade_id=trade_id)
    assert len(closed) == 1 and closed[0].delivered_wh == delivered and closed[0].paid_wei == cost(delivered, PRICE)
    # the trade's states, each once and in order
    states = [s.state for s in w.of(E.TradeStatus, trade_id=trade_id)]
    assert states == ["agreed", "recorded", "delivering", "closed", "settled"], states
    # each signed production counter announced once and minted once (on the bus and on-chain)
    produced = collections.Counter(e.produced_wh for e in w.of(E.EnergyProduced))
    assert all(n == 1 for n in produced.values()), [r for r, n in produced.items() if n > 1]
    minted = collections.Counter(e.produced_wh for e in w.of(E.Minted))
    assert all(n == 1 for n in minted.values()), [r for r, n in minted.items() if n > 1]
    assert sum(e.wh for e in w.of(E.Minted)) == max(minted), "minted more than the meter signed"
    # settlements only go up, and end at what was delivered
    paid = [s.delivered_wh for s in w.of(E.Settled, trade_id=trade_id)]
    assert paid == sorted(paid) and paid[-1] == delivered, paid
    assert all(s.paid_wei == cost(s.delivered_wh, PRICE) for s in w.of(E.Settled, trade_id=trade_id))
