"""The sites' agents and the utility in the double auction (a call every few seconds,
pay-as-clear, partial fills), nobody clicking: every trade is made at its call's one
price, within the tariffs, delivered and settled; the utility quotes the spread in each
call; the money adds up against the chain to the wei.

Real parts as in test_agents.py: every process of `gridtrade up`, on anvil."""

from __future__ import annotations

import pathlib

import pytest

from services.bus import commands as C

from .harness import start_grid, stop_grid
from .agents import AGENT_ENV, DEPOSIT, FEED_IN, MAX_TRADE_WH, RETAIL, money_adds_up, trades_at, utility_agent

DOUBLE_ENV = {**AGENT_ENV, "GRIDTRADE_AUCTION_MARKET": "double", "GRIDTRADE_AGENT_MARKET": "double",
              "GRIDTRADE_AUCTION_CLEAR_INTERVAL_S": "5"}


@pytest.mark.anvil
@pytest.mark.timeout(600)
async def test_agents_and_the_utility_trade_in_the_double_auction(tmp_path: pathlib.Path) -> None:
    grid = await start_grid(tmp_path, time_scale=1440.0, agents=True, service_env=DOUBLE_ENV)
    prod, cons = grid.producer, grid.consumer
    util = grid.options.utility_account.lower()
    p_, c_ = prod.address.lower(), cons.address.lower()
    parties = {p_, c_, util}
    try:
        await cons.call("POST", "/api/escrow/deposit", {"amount_wei": str(DEPOSIT)})

        def settled() -> list[dict]:
            return [t for t in trades_at(grid, grid.w3.eth.block_number) if t["delivered"]]

        await grid.until("trades from the calls, delivered and settled, the producer's surplus among them",
                         lambda: any(t["seller"] == p_ for t in settled()), timeout=240, every=1.0)

        # the utility quoted both sides of the spread, once a call, at its tariffs
        state: C.AgentState = await utility_agent(grid, C.GetAgent())
        orders = [a for a in state.actions if a.kind == "order" and a.ok]
        assert {a.price_wei_per_kwh for a in orders} == {FEED_IN, RETAIL}, state.actions
        assert all(a.wh <= MAX_TRADE_WH for a in orders)
        # the sites' agents placed orders only (no english offer or bid), within their limits
        for user in (prod, cons):
            acts = (await user.call("GET", "/api/agent"))["actions"]
            assert acts and all(a["kind"] == "order" and a["wh"] <= MAX_TRADE_WH for a in acts), acts
            assert all(FEED_IN <= int(a["price_wei_per_kwh"]) <= RETAIL for a in acts), acts

        # every trade at its call's one price, within the tariffs; the money against the chain
        block = grid.w3.eth.block_number
        trades = trades_at(grid, block)
        calls = {c["price_wei_per_kwh"] for c in (await prod.call("GET", "/api/orders"))["calls"]
                 if c["price_wei_per_kwh"] is not None}
        assert trades and all(t["seller"] in parties and t["buyer"] in parties and t["seller"] != t["buyer"]
                              for t in trades), trades
        for t in trades:
            assert FEED_IN <= t["price"] <= RETAIL and t["wh"] <= MAX_TRADE_WH, t
            assert str(t["price"]) in calls or t["price"] in calls, (t, calls)
            if t["buyer"] == util:
                assert t["price"] == FEED_IN, t  # the utility never pays more than its feed-in tariff
        money_adds_up(grid, trades, parties, block, consumer=c_)
        print("double-auction trades:", [(t["seller"][:8], t["buyer"][:8], t["wh"], t["delivered"], t["price"])
                                         for t in trades])
    finally:
        await stop_grid(grid)
