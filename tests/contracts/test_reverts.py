"""Every refused open, settle, settleBatch, close and finalize reverts with its reason and
changes nothing: escrow, credit, tokens, the market's Ether, supply, the trade, the fills."""

from __future__ import annotations

import pytest

from services.bus import typed
from services.chain import bindings as c
from services.bus.prices import wei_for

from tests.support.contracts import DISPUTE_WINDOW_S, PRICE, Env, high_s, new_id

M = "EnergyMarket: "
WH = 2000


@pytest.fixture
async def opened(funded: Env) -> tuple[Env, str]:
    """Trade of WH at PRICE open, 500 Wh settled; the buyer has 1 Ether of escrow in all."""
    trade = await funded.open_trade(WH, PRICE)
    await funded.settle(trade, 500)
    return funded, trade


async def fills(env: Env, offer: typed.Offer, bid: typed.Bid) -> tuple[int, int]:
    return (await env.market.offerFilled(offer.seller, bytes.fromhex(offer.offer_id[2:])).call(),
            await env.market.bidFilled(bid.buyer, bytes.fromhex(bid.bid_id[2:])).call())


# ------------------------------------------------------------------ open


async def test_open_by_anyone_but_the_operator(funded: Env) -> None:
    env = funded
    offer, osig = await env.offer(1000)
    bid, bsig = await env.bid(offer, 1000)
    async with env.books_unchanged():
        for who in (env.admin, env.registrar, env.pauser, env.seller, env.buyer, env.other):
            reason = await env.open_reverts(offer, osig, bid, bsig, 1000, PRICE, sender=who)
            assert reason == M + "caller is not the operator"
    assert await fills(env, offer, bid) == (0, 0)


async def test_open_refusals(opened: tuple[Env, str]) -> None:
    env, trade = opened
    now = await env.now()
    offer, osig = await env.offer(1000, 1000, duration_s=600)
    bid, bsig = await env.bid(offer, 1000, 3000)
    other_offer, other_osig = await env.offer(1000, 1000)
    old_offer, old_osig = await env.offer(1000, 1000, expiry=now - 1)  # expired
    any_bid, any_bsig = await env.bid(None, 1000, 3000)  # a bid for any offer
    old_bid, old_bsig = await env.bid(offer, 1000, 3000, expiry=now - 1)
    self_bid, self_bsig = await env.bid(offer, 1000, 3000, buyer=env.seller)
    rich_bid = (await env.bid(offer, 1000))[0].model_copy(update={"max_price_wei_per_kwh": 2**256 - 1})
    rich_bsig = typed.sig_bytes(typed.sign_bid(env.keys[env.buyer], env.market_domain, rich_bid))
    zero_offer, zero_osig = await env.offer(1000, 0)
    zero_bid, zero_bsig = await env.bid(zero_offer, 1000, 0)
    t2 = new_id()
    cases = [
        ((trade, offer, osig, bid, bsig, 100, 2000), "trade exists"),
        ((t2, offer, osig[:64], bid, bsig, 100, 2000), "bad signature"),
        ((t2, offer, osig, bid, high_s(bsig), 100, 2000), "bad signature"),
        ((t2, offer, bsig, bid, bsig, 100, 2000), "offer not signed by seller"),
        ((t2, offer, osig, bid, osig, 100, 2000), "bid not signed by buyer"),
        ((t2, other_offer, other_osig, bid, bsig, 100, 2000), "bid is for another offer"),
        ((t2, old_offer, old_osig, any_bid, any_bsig, 100, 2000), "offer expired"),
        ((t2, offer, osig, old_bid, old_bsig, 100, 2000), "bid expired"),
        ((t2, offer, osig, self_bid, self_bsig, 100, 2000), "seller is buyer"),
        ((t2, offer, osig, bid, bsig, 0, 2000), "zero energy"),
        ((t2, offer, osig, bid, bsig, 2**64, 2000), "energy too large"),
        ((t2, offer, osig, bid, bsig, 1001, 2000), "offer overfilled"),
        ((t2, zero_offer, zero_osig, zero_bid, zero_bsig, 100, 0), "zero price"),
        ((t2, offer, osig, bid, bsig, 100, 999), "price below offer"),
        ((t2, offer, osig, bid, bsig, 100, 3001), "price above bid"),
        ((t2, offer, osig, rich_bid, rich_bsig, 100, 2**128), "price too large"),
    ]
    async with env.books_unchanged(trade):
        for args, expected in cases:
            reason = await env.reverts(env.open(*args), env.operator)
            assert reason == M + expected, (expected, reason)
        reason = await env.reverts(env.market.open(b"\0" * 32, offer.as_tuple(), osig, bid.as_tuple(), bsig, 100, 2000),
                                   env.operator)
        assert reason == M + "zero trade id"
    assert await fills(env, offer, bid) == (0, 0)


async def test_open_with_a_bid_over_what_is_left(funded: Env) -> None:
    env = funded
    offer, osig = await env.offer(3000)
    bid, bsig = await env.bid(offer, 1000)
    async with env.books_unchanged():
        assert await env.open_reverts(offer, osig, bid, bsig, 1001, PRICE) == M + "bid overfilled"


async def test_open_with_a_duration_beyond_uint64(funded: Env) -> None:
    """typed.py caps durations below 2**32 s; a hand-made offer may say more, and is refused."""
    env = funded
    offer, _ = await env.offer(1000)
    bid, bsig = await env.bid(offer, 1000)
    huge = offer.model_copy(update={"duration_s": 2**64 - 1})
    osig = typed.sig_bytes(typed.sign_offer(env.keys[env.seller], env.market_domain, huge))
    reason = await env.open_reverts(huge, osig, bid, bsig, 1000, PRICE)
    assert reason == M + "duration too large"


async def test_open_not_covered_by_escrow_or_tokens(opened: tuple[Env, str]) -> None:
    env, trade = opened
    free, reserved = (await env.escrow(env.buyer))[:2]
    price = free + reserved + 1  # one kWh at this price costs one wei more than the buyer has
    offer, osig = await env.offer(1000, 1)
    bid, bsig = await env.bid(offer, 1000, price)
    before = await env.books(trade)
    reason = await env.open_reverts(offer, osig, bid, bsig, 1000, price)
    assert reason == M + "escrow does not cover trade"
    assert await env.books(trade) == before
    assert await fills(env, offer, bid) == (0, 0)
    await env.tx(env.open(new_id(), offer, osig, bid, bsig, 1000, price - 1), env.operator)  # exactly covered
    assert (await env.escrow(env.buyer))[0] == 0

    await env.tx(env.market.deposit(), env.buyer, value=10**18)
    spare = await env.tokens(env.seller)
    offer, osig = await env.offer(spare + 1, 1)
    bid, bsig = await env.bid(offer, spare + 1, 1)
    async with env.books_unchanged(trade):
        reason = await env.open_reverts(offer, osig, bid, bsig, spare + 1, 1)
        assert reason == "ERC20: transfer amount exceeds balance"
        await env.tx(env.token.approve(env.d.market.address, 10), env.seller)
        reason = await env.open_reverts(offer, osig, bid, bsig, 11, 1)
        assert reason == "ERC20: insufficient allowance"
    assert await fills(env, offer, bid) == (0, 0)


# ------------------------------------------------------------------ settle


async def test_settle_refusals(opened: tuple[Env, str]) -> None:
    env, trade = opened
    key = typed.trade_key(trade)
    async with env.books_unchanged(trade):
        cases = [
            (key, 500, env.delivery(trade, 500), "reading not above settled"),
            (key, 499, env.delivery(trade, 499), "reading not above settled"),
            (key, 900, env.delivery(trade, 900)[:64], "bad signature"),
            (key, 900, high_s(env.delivery(trade, 900)), "bad signature"),
            (key, 900, env.delivery(trade, 900, env.seller_meter), "signer is not the buyer's meter"),
            (key, 900, env.delivery(trade, 800), "signer is not the buyer's meter"),
            (typed.trade_key("nope"), 900, env.delivery("nope", 900), "trade not open"),
        ]
        for trade_key, delivered, sig, expected in cases:
            for sender in (env.other, env.operator):
                reason = await env.reverts(env.market.settle(trade_key, delivered, sig), sender)
                assert reason == M + expected, expected


async def test_settle_after_the_dispute_window_or_the_end(opened: tuple[Env, str]) -> None:
    env, trade = opened
    key = typed.trade_key(trade)
    r = await env.tx(env.market.close(key), env.buyer)
    closed_at = (await env.w3.eth.get_block(r["blockNumber"]))["timestamp"]
    await env.at(closed_at + DISPUTE_WINDOW_S)
    async with env.books_unchanged(trade):
        reason = await env.reverts(env.market.settle(key, 900, env.delivery(trade, 900)), env.other)
        assert reason == M + "dispute window over"
        r = await env.tx(env.market.settleBatch([key], [900], [env.delivery(trade, 900)]), env.other)
        assert env.events(r, env.d.market, "Settled") == []  # skipped
    await env.tx(env.market.finalize(key), env.other)
    reason = await env.reverts(env.market.settle(key, 900, env.delivery(trade, 900)), env.other)
    assert reason == M + "trade not open"


async def test_settle_batch_reverts_whole_on_a_bad_signature(opened: tuple[Env, str]) -> None:
    env, trade = opened
    t2 = await env.open_trade(100)
    k1, k2 = typed.trade_key(trade), typed.trade_key(t2)
    async with env.books_unchanged(trade, t2):
        cases = [
            (([k1, k2], [600, 50], [env.delivery(trade, 600), env.delivery(t2, 50, env.seller_meter)]),
             "signer is not the buyer's meter"),
            (([k1, k2], [600, 50], [env.delivery(trade, 600), high_s(env.delivery(t2, 50))]), "bad signature"),
            (([k1], [600, 50], [env.delivery(trade, 600)]), "length mismatch"),
            (([k1, k2], [600, 50], [env.delivery(trade, 600)]), "length mismatch"),
        ]
        for args, expected in cases:
            assert await env.reverts(env.market.settleBatch(*args), env.other) == M + expected


# ------------------------------------------------------------------ close and finalize


async def test_close_refusals(opened: tuple[Env, str]) -> None:
    env, trade = opened
    key = typed.trade_key(trade)
    before = await env.books(trade)
    for who in (env.other, env.admin, env.registrar, env.pauser):
        assert await env.reverts(env.market.close(key), who) == M + "caller may not close before the deadline"
    assert await env.reverts(env.market.close(typed.trade_key("nope")), env.operator) == M + "trade not open"
    assert await env.reverts(env.market.finalize(key), env.other) == M + "trade not closing"
    assert await env.books(trade) == before

    await env.tx(env.market.close(key), env.seller)  # a party may close at any time
    async with env.books_unchanged(trade):
        assert await env.reverts(env.market.close(key), env.buyer) == M + "trade not open"
        assert await env.reverts(env.market.finalize(key), env.other) == M + "dispute window open"


async def test_the_operator_may_close_and_closing_locks_nothing_new(opened: tuple[Env, str]) -> None:
    env, trade = opened
    key = typed.trade_key(trade)
    free, _, _, locked, _ = await env.escrow(env.buyer)
    r = await env.tx(env.market.close(key), env.operator)
    assert env.events(r, env.d.market, "TradeClosing")[0]["closedBy"] == env.operator
    assert await env.escrow(env.buyer) == (free, 0, 0, locked, 0)  # nothing moves before finalize
    assert locked == wei_for(WH, PRICE) - wei_for(500, PRICE)
    assert (await env.trade(trade))[2] == c.STATUS_CLOSING
