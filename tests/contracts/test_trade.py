"""Whole trades, exact to the wei and the Wh: meters registered, production minted from signed
counters, an open from a signed offer and bid, signed deliveries settled (single, batched, a
replayed reading skipped), a close, the dispute window, finalize, and the withdrawals."""

from __future__ import annotations

from services.bus import typed
from services.chain import bindings as c
from services.bus.prices import wei_for

from tests.support.contracts import DISPUTE_WINDOW_S, DURATION_S, ETHER, Env, fee, new_id

PRICE = 123_456_789_012_345  # wei per kWh: not a multiple of 1000, so rounding matters
WH = 4321


async def test_whole_trade_balances_are_exact(env: Env) -> None:
    m = env.d.market
    seller_eth0, buyer_eth0 = await env.eth(env.seller), await env.eth(env.buyer)

    # production: the seller's meter signs cumulative counters; anyone submits; only the delta mints
    r = await env.mint(env.seller_meter, 5000)
    assert env.events(r, env.d.token, "Minted") == [
        {"to": env.seller, "meter": env.seller_meter.address, "producedWh": 5000, "amountWh": 5000}
    ]
    r = await env.mint(env.seller_meter, 5300)
    assert env.events(r, env.d.token, "Minted")[0]["amountWh"] == 300
    assert await env.token.totalSupply().call() == 5300
    assert await env.token.mintedOf(env.seller_meter.address).call() == 5300

    deposit = ETHER
    r_dep = await env.tx(env.market.deposit(), env.buyer, value=deposit)
    assert env.events(r_dep, m, "Deposited") == [{"account": env.buyer, "amountWei": deposit}]
    assert await env.escrow(env.buyer) == (deposit, 0, 0, 0, 0)
    r_appr = await env.tx(env.token.approve(m.address, WH), env.seller)

    # open from the seller's signed offer and the buyer's signed bid
    offer, osig = await env.offer(5000, PRICE - 1)
    bid, bsig = await env.bid(offer, WH, PRICE + 1)
    trade = new_id()
    r = await env.tx(env.open(trade, offer, osig, bid, bsig, WH, PRICE), env.operator)
    opened_at = (await env.w3.eth.get_block(r["blockNumber"]))["timestamp"]
    locked = wei_for(WH, PRICE)
    assert locked == WH * PRICE // 1000
    assert env.events(r, m, "TradeOpened") == [{
        "tradeId": typed.trade_key(trade), "seller": env.seller, "buyer": env.buyer, "wh": WH,
        "priceWeiPerKwh": PRICE, "lockedWei": locked, "offerId": bytes.fromhex(offer.offer_id[2:]),
        "bidId": bytes.fromhex(bid.bid_id[2:]), "deadline": opened_at + DURATION_S,
    }]
    assert await env.escrow(env.buyer) == (deposit - locked, 0, 0, locked, 0)
    assert await env.tokens(env.seller) == 5300 - WH
    assert await env.tokens(m.address) == WH
    assert await env.trade(trade) == [env.seller, WH, c.STATUS_OPEN, env.buyer, 0, PRICE, opened_at + DURATION_S, 0]
    assert await env.market.offerFilled(env.seller, bytes.fromhex(offer.offer_id[2:])).call() == WH
    assert await env.market.bidFilled(env.buyer, bytes.fromhex(bid.bid_id[2:])).call() == WH

    # signed cumulative deliveries, submitted by anyone; each pays wei_for(new) - wei_for(old)
    paid = []
    r = await env.settle(trade, 1000)
    assert env.events(r, m, "Settled") == [
        {"tradeId": typed.trade_key(trade), "deliveredWh": 1000, "deltaWh": 1000, "paidWei": wei_for(1000, PRICE)}
    ]
    paid += [e["paidWei"] for e in env.events(r, m, "Settled")]
    r_seller = await env.settle(trade, 1999, sender=env.seller)  # the seller may submit the buyer meter's reading
    paid += [e["paidWei"] for e in env.events(r_seller, m, "Settled")]
    assert paid[-1] == wei_for(1999, PRICE) - wei_for(1000, PRICE)
    key = typed.trade_key(trade)
    r = await env.tx(env.market.settleBatch([key], [2500], [env.delivery(trade, 2500)]), env.operator)
    paid += [e["paidWei"] for e in env.events(r, m, "Settled")]
    # the same reading again, in a batch: skipped, nothing paid
    r = await env.tx(env.market.settleBatch([key], [2500], [env.delivery(trade, 2500)]), env.operator)
    assert env.events(r, m, "Settled") == []
    assert await env.market.credit(env.seller).call() == wei_for(2500, PRICE) == sum(paid)
    assert await env.tokens(env.buyer) == 2500
    assert await env.escrow(env.buyer) == (deposit - locked, 0, 0, locked - wei_for(2500, PRICE), wei_for(0, 0))

    # the buyer closes; during the dispute window a later signed reading still settles
    r_close = await env.tx(env.market.close(key), env.buyer)
    closed_at = (await env.w3.eth.get_block(r_close["blockNumber"]))["timestamp"]
    assert env.events(r_close, m, "TradeClosing") == [
        {"tradeId": key, "closedBy": env.buyer, "deliveredWh": 2500, "disputeEndsAt": closed_at + DISPUTE_WINDOW_S}
    ]
    assert (await env.trade(trade))[2:] == [c.STATUS_CLOSING, env.buyer, 2500, PRICE, opened_at + DURATION_S, closed_at]
    r = await env.settle(trade, 3333)
    paid += [e["paidWei"] for e in env.events(r, m, "Settled")]
    assert (await env.trade(trade))[4] == 3333
    assert await env.reverts(env.market.finalize(key), env.other) == "EnergyMarket: dispute window open"

    await env.at(closed_at + DISPUTE_WINDOW_S)
    r = await env.tx(env.market.finalize(key), env.other)
    refund = locked - wei_for(3333, PRICE)
    assert env.events(r, m, "TradeClosed") == [
        {"tradeId": key, "closedBy": env.other, "deliveredWh": 3333, "refundedWei": refund, "returnedWh": WH - 3333}
    ]
    credited = wei_for(3333, PRICE)
    assert sum(paid) == credited
    assert await env.escrow(env.seller) == (0, 0, 0, 0, credited)
    assert await env.escrow(env.buyer) == (deposit - credited, 0, 0, 0, 0)
    assert await env.tokens(env.buyer) == 3333
    assert await env.tokens(env.seller) == 5300 - 3333
    assert await env.tokens(m.address) == 0
    assert await env.token.totalSupply().call() == 5300
    assert (await env.trade(trade))[2] == c.STATUS_CLOSED
    assert await env.eth(m.address) == deposit  # free escrow + seller credit

    r_cw = await env.tx(env.market.withdrawCredit(), env.seller)
    assert env.events(r_cw, m, "CreditWithdrawn") == [{"seller": env.seller, "amountWei": credited}]
    r_wd = await env.tx(env.market.withdraw(deposit - credited), env.buyer)
    assert env.events(r_wd, m, "Withdrawn") == [{"account": env.buyer, "amountWei": deposit - credited}]
    assert await env.escrow(env.buyer) == (0, 0, 0, 0, 0)
    assert await env.eth(m.address) == 0

    # Ether, to the wei: the seller gained exactly the price of 3333 Wh, the buyer lost it
    assert await env.eth(env.seller) == seller_eth0 + credited - fee(r_appr) - fee(r_seller) - fee(r_cw)
    assert await env.eth(env.buyer) == buyer_eth0 - credited - fee(r_dep) - fee(r_close) - fee(r_wd)


async def test_full_delivery_closes_the_trade_at_once(funded: Env) -> None:
    env = funded
    trade = await env.open_trade(1000, 999)
    free0 = (await env.escrow(env.buyer))[0]
    r = await env.settle(trade, 1500)  # a reading beyond the trade settles the trade's energy
    key = typed.trade_key(trade)
    assert env.events(r, env.d.market, "Settled") == [
        {"tradeId": key, "deliveredWh": 1000, "deltaWh": 1000, "paidWei": 999}
    ]
    assert env.events(r, env.d.market, "TradeClosed") == [
        {"tradeId": key, "closedBy": env.other, "deliveredWh": 1000, "refundedWei": 0, "returnedWh": 0}
    ]
    assert (await env.trade(trade))[2] == c.STATUS_CLOSED
    assert await env.escrow(env.buyer) == (free0, 0, 0, 0, 0)
    assert await env.market.credit(env.seller).call() == 999
    assert await env.tokens(env.buyer) == 1000
    assert await env.reverts(env.market.close(key), env.buyer) == "EnergyMarket: trade not open"
    assert await env.reverts(env.market.finalize(key), env.buyer) == "EnergyMarket: trade not closing"


async def test_settle_batch_settles_every_trade(funded: Env) -> None:
    env = funded
    n = 5
    prices = [10**12 + 7 * i for i in range(n)]
    trades = [await env.open_trade(1000, p) for p in prices]
    delivered = [100 * (i + 1) for i in range(n)]
    keys = [typed.trade_key(t) for t in trades]
    sigs = [env.delivery(t, w) for t, w in zip(trades, delivered)]
    r = await env.tx(env.market.settleBatch(keys, delivered, sigs), env.other)
    assert [(e["tradeId"], e["deliveredWh"]) for e in env.events(r, env.d.market, "Settled")] == list(zip(keys, delivered))
    assert await env.market.credit(env.seller).call() == sum(wei_for(w, p) for w, p in zip(delivered, prices))
    assert await env.tokens(env.buyer) == sum(delivered)
    for t, w in zip(trades, delivered):
        assert (await env.trade(t))[4] == w


async def test_one_offer_fills_several_trades_and_an_open_bid_any_offer(funded: Env) -> None:
    """A double-auction buy order (bid.offerId == 0) fills from two offers; one offer feeds two bids."""
    env = funded
    offer1, osig1 = await env.offer(3000, 1000)
    offer2, osig2 = await env.offer(3000, 1000)
    order, order_sig = await env.bid(None, 2500, 2000)
    await env.tx(env.open(new_id(), offer1, osig1, order, order_sig, 1500, 1500), env.operator)
    await env.tx(env.open(new_id(), offer2, osig2, order, order_sig, 1000, 1200), env.operator)
    bid, bsig = await env.bid(offer1, 1500, 1000)
    await env.tx(env.open(new_id(), offer1, osig1, bid, bsig, 1500, 1000), env.operator)
    assert await env.market.offerFilled(env.seller, bytes.fromhex(offer1.offer_id[2:])).call() == 3000
    assert await env.market.offerFilled(env.seller, bytes.fromhex(offer2.offer_id[2:])).call() == 1000
    assert await env.market.bidFilled(env.buyer, bytes.fromhex(order.bid_id[2:])).call() == 2500
    assert (await env.escrow(env.buyer))[3] == wei_for(1500, 1500) + wei_for(1000, 1200) + wei_for(1500, 1000)


async def test_open_takes_reserved_escrow_first(env: Env) -> None:
    await env.fund(buyer_wei=1000)
    until = await env.now() + 600
    r = await env.tx(env.market.depositAndReserve(until), env.buyer, value=700)
    assert env.events(r, env.d.market, "Deposited") == [{"account": env.buyer, "amountWei": 700}]
    assert env.events(r, env.d.market, "Reserved") == [{"account": env.buyer, "amountWei": 700, "until": until}]
    offer, osig = await env.offer(1000, 1000)
    bid, bsig = await env.bid(offer, 1000, 1000)
    r = await env.tx(env.open(new_id(), offer, osig, bid, bsig, 900, 1000), env.operator)  # costs 900
    assert env.events(r, env.d.market, "Released") == [{"account": env.buyer, "amountWei": 700}]
    assert await env.escrow(env.buyer) == (800, 0, until, 900, 0)


async def test_anyone_closes_after_the_deadline_and_finalizes_after_the_window(funded: Env) -> None:
    env = funded
    trade = await env.open_trade(2000)
    key = typed.trade_key(trade)
    await env.settle(trade, 500)
    deadline = (await env.trade(trade))[6]
    await env.at(deadline)
    r = await env.tx(env.market.close(key), env.other)
    assert env.events(r, env.d.market, "TradeClosing")[0]["closedBy"] == env.other
    # the window runs from the close's own block (on anvil a little after the deadline)
    closing_at = (await env.trade(trade))[7]
    assert closing_at >= deadline
    await env.at(closing_at + DISPUTE_WINDOW_S)
    r = await env.tx(env.market.finalize(key), env.other)
    assert env.events(r, env.d.market, "TradeClosed")[0]["returnedWh"] == 1500
    assert await env.tokens(env.d.market.address) == 0
