"""A simulated day with the sites' agents on and nobody clicking Sell or Buy: the agents
trade within their owners' limits, the utility stands behind them at its tariffs, the
trades are delivered and settled on-chain, and the money adds up against the chain to the
wei.

Real parts: anvil, the hub, the auction, the operator's chain service, each site's wallet,
meter (simulated site), agent and gateway, and the utility's wallet, meters and agent, as
`gridtrade up` starts them. The owners' only acts are the ones a person does once: log in
(the wallet unlocks the key for the agent to sign through) and put Ether in escrow for the
consumer's bids."""

from __future__ import annotations

import pathlib
from typing import Any

import pytest


from .harness import Grid, cost, start_grid, stop_grid

DEPOSIT = 10**18
MAX_TRADE_WH = 600
RETAIL, FEED_IN = 3_000_000_000_000_000, 500_000_000_000_000
AGENT_ENV = {
    "GRIDTRADE_AGENT_EVERY_S": "1", "GRIDTRADE_AGENT_OFFER_DURATION_S": "6",
    "GRIDTRADE_AGENT_MAX_TRADE_WH": str(MAX_TRADE_WH), "GRIDTRADE_AGENT_RESERVE_SOC": "0.2",
    "GRIDTRADE_TARIFF_RETAIL_WEI_PER_KWH": str(RETAIL), "GRIDTRADE_TARIFF_FEED_IN_WEI_PER_KWH": str(FEED_IN),
    "GRIDTRADE_DISPUTE_WINDOW_S": "2",
}
DAY_S = 86400


def trades_at(grid: Grid, block: int) -> list[dict[str, Any]]:
    """Every trade opened up to ``block``, as the contract holds it then."""
    out = []
    for e in grid.market_events("TradeOpened", to_block=block):
        seller, wh, status, buyer, delivered, price, _, _ = grid.market.functions.trades(e["tradeId"]).call(
            block_identifier=block)
        out.append({"id": e["tradeId"], "seller": seller.lower(), "buyer": buyer.lower(), "wh": wh, "status": status,
                    "delivered": delivered, "price": price})
    return out


@pytest.mark.anvil
@pytest.mark.timeout(900)
async def test_agents_trade_a_simulated_day_without_a_click(tmp_path: pathlib.Path) -> None:
    grid = await start_grid(tmp_path, time_scale=1440.0, agents=True, service_env=AGENT_ENV)  # a day in a minute
    prod, cons = grid.producer, grid.consumer
    util = grid.options.utility_account.lower()
    p_, c_ = prod.address.lower(), cons.address.lower()
    try:
        day0 = (await prod.call("GET", "/api/site"))["clock"]["sim"]
        # the consumer's one act: escrow for its agent's bids
        await cons.call("POST", "/api/escrow/deposit", {"amount_wei": str(DEPOSIT)})
        await grid.until("the deposit in escrow", lambda: grid.onchain(cons.address)["free"] >= DEPOSIT, timeout=60)

        # a seller (by hand, here) asks more than the consumer's agent may pay: no bid, ever
        await grid.until("tokens to offer by hand", lambda: grid.onchain(prod.address)["tokens"] >= 100, timeout=90)
        dear = await prod.call("POST", "/api/offers", {"wh": 100, "start_price_wei_per_kwh": str(RETAIL + 1),
                                                       "duration_s": 20})

        # the agents trade, nobody clicking: between the two sites, and with the utility
        def settled_between() -> set[tuple[str, str]]:
            return {(t["seller"], t["buyer"]) for t in trades_at(grid, grid.w3.eth.block_number) if t["delivered"]}

        await grid.until("a trade between the sites and one with the utility, each delivered and settled",
                         lambda: (p_, c_) in settled_between() and any(util in pair for pair in settled_between()),
                         timeout=300, every=1.0)
        agent_p = await prod.call("GET", "/api/agent")
        agent_c = await cons.call("GET", "/api/agent")
        assert agent_p["state"] == "trading" and agent_c["state"] == "trading", (agent_p, agent_c)
        # within the owners' limits and the tariffs
        for a in agent_c["actions"]:
            assert a["wh"] <= MAX_TRADE_WH and int(a["price_wei_per_kwh"]) <= RETAIL, a
            assert a["offer_id"] != dear["offer_id"], "the agent bid above its owner's limit"
        for a in agent_p["actions"]:
            assert a["wh"] <= MAX_TRADE_WH and int(a["price_wei_per_kwh"]) >= FEED_IN, a

        # the owner turns the producer's agent off: it places nothing more
        out = await prod.call("PUT", "/api/agent/limits", {**agent_p["limits"], "enabled": False})
        assert out["state"] == "off" and out["limits"]["enabled"] is False, out
        placed = len((await prod.call("GET", "/api/agent"))["actions"])

        # the rest of the simulated day
        async def day_over() -> bool:
            return (await prod.call("GET", "/api/site"))["clock"]["sim"] >= day0 + DAY_S
        await grid.until("a whole simulated day", day_over, timeout=180, every=1.0)
        assert len((await prod.call("GET", "/api/agent"))["actions"]) == placed

        # the money, against the chain at one block, to the wei
        block = grid.w3.eth.block_number
        trades = trades_at(grid, block)
        parties = {p_, c_, util}
        assert trades and all(t["seller"] in parties and t["buyer"] in parties and t["seller"] != t["buyer"]
                              for t in trades), trades
        for t in trades:
            assert t["wh"] <= max(MAX_TRADE_WH, 2000) and FEED_IN <= t["price"] <= RETAIL, t
            if t["buyer"] == util:
                assert t["price"] == FEED_IN, t  # the utility pays its feed-in tariff, no more
            if t["seller"] == util:
                assert t["price"] >= RETAIL, t  # and sells at retail, no less
        settled = grid.market_events("Settled", to_block=block)
        paid_of = {t["id"]: sum(e["paidWei"] for e in settled if e["tradeId"] == t["id"]) for t in trades}
        for t in trades:
            assert paid_of[t["id"]] == cost(t["delivered"], t["price"]), t
        deposits = grid.market_events("Deposited", to_block=block)
        for who in parties:
            on = grid.onchain(who, block)
            put_in = sum(e["amountWei"] for e in deposits if e["account"].lower() == who)
            paid = sum(paid_of[t["id"]] for t in trades if t["buyer"] == who)
            earned = sum(paid_of[t["id"]] for t in trades if t["seller"] == who)
            assert on["free"] + on["reserved"] + on["locked"] == put_in - paid, (who, on, put_in, paid)
            assert on["credit"] == earned, (who, on, earned)
        cons_on = grid.onchain(cons.address, block)
        assert cons_on["tokens"] == sum(t["delivered"] for t in trades if t["buyer"] == c_), cons_on
        all_escrow = sum(sum(grid.onchain(w, block)[k] for k in ("free", "reserved", "locked", "credit"))
                         for w in parties)
        assert grid.w3.eth.get_balance(grid.market.address, block) == all_escrow
        print("trades of the day:", [(t["seller"][:8], t["buyer"][:8], t["wh"], t["delivered"], t["price"])
                                     for t in trades])
    finally:
        await stop_grid(grid)
