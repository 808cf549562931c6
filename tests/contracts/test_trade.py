"""A whole trade, exact to the wei and the Wh: mint, deposit, approve, open, settle in steps
(single, batched, a no-op retry), close, withdraw credit and free escrow."""

from __future__ import annotations

from services.chain import contracts as c
from services.chain.contracts import cost, id32

from .conftest import ETHER, Env, fee

PRICE = 123_456_789_012_345  # wei per kWh: not a multiple of 1000, so rounding matters
WH = 4321


async def test_whole_trade_balances_are_exact(env: Env) -> None:
    m = env.d.market
    seller_eth0, buyer_eth0 = await env.eth(env.seller), await env.eth(env.buyer)

    r = await env.tx(env.token.mint(env.seller, 5000, id32("solar-1/kwh/0")), env.meter)
    assert env.events(r, env.d.token, "Minted") == [
        {"to": env.seller, "amountWh": 5000, "readingId": id32("solar-1/kwh/0")}
    ]
    await env.tx(env.token.mint(env.seller, 300, id32("solar-1/kwh/1")), env.meter)
    assert await env.token.totalSupply().call() == 5300

    deposit = ETHER
    r_dep = await env.tx(env.market.deposit(), env.buyer, value=deposit)
    assert env.events(r_dep, m, "Deposited") == [{"account": env.buyer, "amountWei": deposit}]
    assert await env.escrow(env.buyer) == (deposit, 0)

    r_appr = await env.tx(env.token.approve(m.address, WH), env.seller)
    trade = id32("auction/offer/1")
    r = await env.tx(env.market.open(trade, env.seller, env.buyer, WH, PRICE), env.admin)
    locked = cost(WH, PRICE)
    assert locked == WH * PRICE // 1000
    assert env.events(r, m, "TradeOpened") == [
        {"tradeId": trade, "seller": env.seller, "buyer": env.buyer, "wh": WH, "priceWeiPerKwh": PRICE, "lockedWei": locked}
    ]
    assert await env.escrow(env.buyer) == (deposit - locked, locked)
    assert await env.tokens(env.seller) == 5300 - WH
    assert await env.tokens(m.address) == WH
    assert await env.market.trades(trade).call() == [env.seller, WH, c.STATUS_OPEN, env.buyer, 0, PRICE]

    # settle cumulative deliveries in steps; each pays cost(new) - cost(old)
    paid = []
    r = await env.tx(env.market.settle(trade, 1000), env.admin)
    paid += [e["paidWei"] for e in env.events(r, m, "Settled")]
    assert env.events(r, m, "Settled") == [
        {"tradeId": trade, "deliveredWh": 1000, "deltaWh": 1000, "paidWei": cost(1000, PRICE)}
    ]
    r = await env.tx(env.market.settle(trade, 1999), env.admin)
    paid += [e["paidWei"] for e in env.events(r, m, "Settled")]
    assert paid[-1] == cost(1999, PRICE) - cost(1000, PRICE)
    r = await env.tx(env.market.settleBatch([trade], [2500]), env.admin)
    paid += [e["paidWei"] for e in env.events(r, m, "Settled")]
    r = await env.tx(env.market.settle(trade, 2500), env.admin)  # a retry of the same reading
    assert env.events(r, m, "Settled") == []
    assert await env.market.credit(env.seller).call() == cost(2500, PRICE) == sum(paid)
    assert await env.tokens(env.buyer) == 2500
    assert await env.escrow(env.buyer) == (deposit - locked, locked - cost(2500, PRICE))

    # the buyer closes at 3333 Wh: the last delivery is settled, the rest freed
    r = await env.tx(env.market.close(trade, 3333), env.buyer)
    paid += [e["paidWei"] for e in env.events(r, m, "Settled")]
    refund = locked - cost(3333, PRICE)
    assert env.events(r, m, "TradeClosed") == [
        {"tradeId": trade, "closedBy": env.buyer, "deliveredWh": 3333, "refundedWei": refund, "returnedWh": WH - 3333}
    ]
    r_close = r
    credited = cost(3333, PRICE)
    assert sum(paid) == credited
    assert await env.market.credit(env.seller).call() == credited
    assert await env.escrow(env.buyer) == (deposit - credited, 0)
    assert await env.tokens(env.buyer) == 3333
    assert await env.tokens(env.seller) == 5300 - 3333
    assert await env.tokens(m.address) == 0
    assert await env.token.totalSupply().call() == 5300
    assert (await env.market.trades(trade).call())[2] == c.STATUS_CLOSED
    assert await env.eth(m.address) == deposit  # free escrow + seller credit

    r_cw = await env.tx(env.market.withdrawCredit(), env.seller)
    assert env.events(r_cw, m, "CreditWithdrawn") == [{"seller": env.seller, "amountWei": credited}]
    assert await env.market.credit(env.seller).call() == 0
    r_wd = await env.tx(env.market.withdraw(deposit - credited), env.buyer)
    assert env.events(r_wd, m, "Withdrawn") == [{"account": env.buyer, "amountWei": deposit - credited}]
    assert await env.escrow(env.buyer) == (0, 0)
    assert await env.eth(m.address) == 0

    # Ether, to the wei: the seller gained exactly the price of 3333 Wh, the buyer lost it
    assert await env.eth(env.seller) == seller_eth0 + credited - fee(r_appr) - fee(r_cw)
    assert await env.eth(env.buyer) == buyer_eth0 - credited - fee(r_dep) - fee(r_close) - fee(r_wd)


async def test_full_delivery_closes_the_trade(env: Env) -> None:
    await env.tx(env.token.mint(env.seller, 1000, id32("r")), env.meter)
    await env.tx(env.token.approve(env.d.market.address, 1000), env.seller)
    await env.tx(env.market.deposit(), env.buyer, value=ETHER)
    trade = id32("t")
    await env.tx(env.market.open(trade, env.seller, env.buyer, 1000, 999), env.admin)

    r = await env.tx(env.market.settle(trade, 1000), env.admin)
    assert env.events(r, env.d.market, "TradeClosed") == [
        {"tradeId": trade, "closedBy": env.admin, "deliveredWh": 1000, "refundedWei": 0, "returnedWh": 0}
    ]
    assert (await env.market.trades(trade).call())[2] == c.STATUS_CLOSED
    assert await env.escrow(env.buyer) == (ETHER - 999, 0)
    assert await env.market.credit(env.seller).call() == 999
    assert await env.tokens(env.buyer) == 1000
    assert await env.reverts(env.market.close(trade, 1000), env.buyer) == "EnergyMarket: trade not open"


async def test_settle_batch_settles_every_trade(env: Env) -> None:
    n = 5
    await env.tx(env.token.mint(env.seller, 1000 * n, id32("r")), env.meter)
    await env.tx(env.token.approve(env.d.market.address, 2**256 - 1), env.seller)
    await env.tx(env.market.deposit(), env.buyer, value=ETHER)
    ids = [id32(f"t{i}") for i in range(n)]
    prices = [10**12 + 7 * i for i in range(n)]
    for i, price in zip(ids, prices):
        await env.tx(env.market.open(i, env.seller, env.buyer, 1000, price), env.admin)
    assert await env.token.allowance(env.seller, env.d.market.address).call() == 2**256 - 1  # unlimited stays

    delivered = [100 * (i + 1) for i in range(n)]
    r = await env.tx(env.market.settleBatch(ids, delivered), env.admin)
    assert [(e["tradeId"], e["deliveredWh"]) for e in env.events(r, env.d.market, "Settled")] == list(zip(ids, delivered))
    assert await env.market.credit(env.seller).call() == sum(cost(w, p) for w, p in zip(delivered, prices))
    assert await env.tokens(env.buyer) == sum(delivered)
    for i, w in zip(ids, delivered):
        assert (await env.market.trades(i).call())[4] == w
