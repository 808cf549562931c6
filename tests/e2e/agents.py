"""The site agents' end-to-end pieces: the grid's agent settings and tariffs, the trades
and the money as the chain holds them at a block, and the utility's agent over the bus."""

from __future__ import annotations

from typing import Any

import zmq.asyncio

from services import launcher
from services.bus import RpcClient, Security
from services.bus import commands as C

from .harness import Grid, cost

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
CLOSED = 3  # EnergyMarket.Status.Closed


def trades_at(grid: Grid, block: int) -> list[dict[str, Any]]:
    """Every trade opened up to ``block``, as the contract holds it then."""
    out = []
    for e in grid.market_events("TradeOpened", to_block=block):
        seller, wh, status, buyer, delivered, price, _, _ = grid.market.functions.trades(e["tradeId"]).call(
            block_identifier=block)
        out.append({"id": e["tradeId"], "seller": seller.lower(), "buyer": buyer.lower(), "wh": wh, "status": status,
                    "delivered": delivered, "price": price})
    return out


def money_adds_up(grid: Grid, trades: list[dict[str, Any]], parties: set[str], block: int, *, consumer: str) -> None:
    """Against the chain at ``block``, to the wei: each trade paid exactly for what was
    delivered; each party's escrow is what it put in less what it paid, its credit what it
    earned; the consumer holds the tokens delivered to it; the market holds exactly the
    parties' escrow and credit."""
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
    cons_on = grid.onchain(consumer, block)
    assert cons_on["tokens"] == sum(t["delivered"] for t in trades if t["buyer"] == consumer), cons_on
    all_escrow = sum(sum(grid.onchain(w, block)[k] for k in ("free", "reserved", "locked", "credit"))
                     for w in parties)
    assert grid.w3.eth.get_balance(grid.market.address, block) == all_escrow


async def utility_agent(grid: Grid, req: C.Request) -> C.AgentState:
    """A request to the utility's agent over the bus, as its own site (the launcher's
    hand_over talks to the utility's wallet the same way)."""
    o = grid.options
    ctx = zmq.asyncio.Context()
    sec = Security(o.data.resolve() / "keys", launcher.UTILITY)
    sec.start(ctx)
    agent = RpcClient(ctx, sec, f"tcp://{o.host}:{o.base_port + 17}", server_site=launcher.UTILITY, timeout_s=30)
    try:
        state: C.AgentState = await agent.request(req)
        return state
    finally:
        await agent.close()
        sec.stop()
        ctx.destroy(0)


async def utility_agent_off(grid: Grid) -> C.AgentState:
    state = await utility_agent(grid, C.GetAgent())
    return await utility_agent(grid, C.SetAgentLimits(limits=state.limits.model_copy(update={"enabled": False})))
