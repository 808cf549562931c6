"""A simulated day with the sites' agents on and nobody clicking Sell or Buy: the agents
trade within their owners' limits, the trades are delivered and settled on-chain, and the
money adds up against the chain to the wei.

Real parts: anvil, the hub, the auction, the operator's chain service, each site's wallet,
meter (simulated site), agent and gateway, as `gridtrade up` starts them. The owners' only
acts are the ones a person does once: log in (the wallet unlocks the key for the agent to
sign through) and put Ether in escrow for the consumer's bids."""

from __future__ import annotations

import pathlib

import pytest

from .flow import STATUS_CLOSED
from .harness import cost, start_grid, stop_grid

DEPOSIT = 10**18
MAX_TRADE_WH = 600
RETAIL, FEED_IN = 3_000_000_000_000_000, 500_000_000_000_000
AGENT_ENV = {
    "GRIDTRADE_AGENT_EVERY_S": "1", "GRIDTRADE_AGENT_OFFER_DURATION_S": "6",
    "GRIDTRADE_AGENT_MAX_TRADE_WH": str(MAX_TRADE_WH), "GRIDTRADE_AGENT_RESERVE_SOC": "0.2",
    "GRIDTRADE_TARIFF_RETAIL_WEI_PER_KWH": str(RETAIL), "GRIDTRADE_TARIFF_FEED_IN_WEI_PER_KWH": str(FEED_IN),
    "GRIDTRADE_DISPUTE_WINDOW_S": "2",
}


@pytest.mark.anvil
@pytest.mark.timeout(900)
async def test_agents_trade_a_simulated_day_without_a_click(tmp_path: pathlib.Path) -> None:
    grid = await start_grid(tmp_path, time_scale=1440.0, agents=True, service_env=AGENT_ENV)  # a day in a minute
    prod, cons = grid.producer, grid.consumer
    try:
        # the consumer's one act: escrow for its agent's bids
        await cons.call("POST", "/api/escrow/deposit", {"amount_wei": str(DEPOSIT)})
        await grid.until("the deposit in escrow", lambda: grid.onchain(cons.address)["free"] == DEPOSIT, timeout=60)

        # a seller (by hand, here) asks more than the consumer's agent may pay: no bid, ever
        await grid.until("tokens to offer by hand", lambda: grid.onchain(prod.address)["tokens"] >= 100, timeout=90)
        dear = await prod.call("POST", "/api/offers", {"wh": 100, "start_price_wei_per_kwh": str(RETAIL + 1),
                                                       "duration_s": 20})

        # the agents: a trade agreed, delivered and closed on-chain, nobody clicking
        def closed_trades() -> list[dict]:
            out = []
            for e in grid.market_events("TradeOpened"):
                t = grid.trade_by_key(e["tradeId"])
                if t["status"] == STATUS_CLOSED and t["delivered"] > 0:
                    out.append(t)
            return out

        await grid.until("the agents' first trade closed on-chain", closed_trades, timeout=240, every=1.0)
        agent_p = await prod.call("GET", "/api/agent")
        agent_c = await cons.call("GET", "/api/agent")
        assert agent_p["state"] == "trading" and agent_c["state"] == "trading", (agent_p, agent_c)
        assert any(a["kind"] == "offer" and a["ok"] for a in agent_p["actions"]), agent_p
        assert any(a["kind"] == "bid" and a["ok"] for a in agent_c["actions"]), agent_c
        # within the owners' limits and the tariffs
        for a in agent_c["actions"]:
            assert a["wh"] <= MAX_TRADE_WH and int(a["price_wei_per_kwh"]) <= RETAIL, a
            assert a["offer_id"] != dear["offer_id"], "the agent bid above its owner's limit"
        for a in agent_p["actions"]:
            assert a["wh"] <= MAX_TRADE_WH and int(a["price_wei_per_kwh"]) >= FEED_IN, a

        # the owner turns the producer's agent off: it offers nothing more
        off = {**agent_p["limits"], "enabled": False}
        out = await prod.call("PUT", "/api/agent/limits", off)
        assert out["state"] == "off" and out["limits"]["enabled"] is False, out
        offers_then = len([a for a in (await prod.call("GET", "/api/agent"))["actions"] if a["kind"] == "offer"])

        # let the trades under way finish, then check the money against the chain to the wei
        def all_final() -> bool:
            opened = grid.market_events("TradeOpened")
            return bool(opened) and all(grid.trade_by_key(e["tradeId"])["status"] == STATUS_CLOSED for e in opened)

        await grid.until("every trade the agents opened to be closed", all_final, timeout=240, every=1.0)
        after = await prod.call("GET", "/api/agent")
        assert len([a for a in after["actions"] if a["kind"] == "offer"]) == offers_then, after["actions"]

        trades = [grid.trade_by_key(e["tradeId"]) for e in grid.market_events("TradeOpened")]
        assert trades and all(t["seller"].lower() == prod.address.lower() and t["buyer"].lower() ==
                              cons.address.lower() for t in trades), trades
        assert all(t["wh"] <= MAX_TRADE_WH and FEED_IN <= t["price"] <= RETAIL for t in trades), trades
        delivered = sum(t["delivered"] for t in trades)
        paid = sum(cost(t["delivered"], t["price"]) for t in trades)
        settled = grid.market_events("Settled")
        assert sum(e["paidWei"] for e in settled) == paid and sum(e["deltaWh"] for e in settled) == delivered
        p, c = grid.onchain(prod.address), grid.onchain(cons.address)
        assert c["free"] + c["reserved"] + c["locked"] == DEPOSIT - paid, c
        assert p["credit"] == paid, p
        assert c["tokens"] == delivered, c
        assert grid.w3.eth.get_balance(grid.market.address) == c["free"] + c["reserved"] + c["locked"] + p["credit"]
        assert grid.token.functions.balanceOf(grid.market.address).call() == 0
    finally:
        await stop_grid(grid)
