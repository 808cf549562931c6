"""Attacks on the v2 contracts, each by someone holding a real key (the operator's, a party's,
a stranger's) and each followed by the same check: nothing changed (escrow, credit, tokens,
the market's Ether, supply, the trades, the fills).

The victims are ready to be robbed: the seller holds tokens and approved the market for all of
them, the buyer holds escrow, both have registered meters.
"""

from __future__ import annotations

import pytest
from web3 import AsyncWeb3

from services.bus import typed
from services.chain import bindings as c
from services.bus.prices import wei_for

from tests.support.contracts import DISPUTE_WINDOW_S, PRICE, Env, high_s, make_env, meter_key, new_id

M = "EnergyMarket: "


async def fills(env: Env, offer: typed.Offer, bid: typed.Bid) -> tuple[int, int]:
    return (await env.market.offerFilled(offer.seller, bytes.fromhex(offer.offer_id[2:])).call(),
            await env.market.bidFilled(bid.buyer, bytes.fromhex(bid.bid_id[2:])).call())


# ------------------------------------------------------------------ the operator opens what nobody signed


async def test_operator_cannot_open_an_unsigned_trade(funded: Env) -> None:
    env = funded
    await env.tx(env.market.deposit(), env.other, value=10**18)  # a second buyer to charge, too
    offer, osig = await env.offer(1000)
    bid, bsig = await env.bid(offer, 1000)
    async with env.books_unchanged():
        for o_sig, b_sig in ((b"", b""), (b"\0" * 65, b"\0" * 65), (osig, b""), (b"", bsig)):
            reason = await env.open_reverts(offer, o_sig, bid, b_sig, 1000, PRICE)
            assert reason == M + "bad signature"
        # signed by the operator's own key, as if it were the parties'
        op_key = env.keys[env.operator]
        forged_o = typed.sig_bytes(typed.sign_offer(op_key, env.market_domain, offer))
        forged_b = typed.sig_bytes(typed.sign_bid(op_key, env.market_domain, bid))
        assert await env.open_reverts(offer, forged_o, bid, bsig, 1000, PRICE) == M + "offer not signed by seller"
        assert await env.open_reverts(offer, osig, bid, forged_b, 1000, PRICE) == M + "bid not signed by buyer"
    assert await fills(env, offer, bid) == (0, 0)


@pytest.mark.parametrize("field", ["wh", "price", "seller", "buyer", "expiry", "duration", "offer id"])
async def test_operator_cannot_alter_a_signed_offer_or_bid(funded: Env, field: str) -> None:
    """The operator keeps both signatures and changes one term: more energy, a better price for
    one side, another seller or buyer (one who also approved or deposited), a later expiry, a
    longer trade, another offer for the bid."""
    env = funded
    await env.tx(env.market.deposit(), env.other, value=10**18)
    await env.tx(env.token.approve(env.d.market.address, 2**256 - 1), env.other)
    offer, osig = await env.offer(1000, PRICE, expiry=await env.now() + 60)
    bid, bsig = await env.bid(offer, 1000, PRICE, expiry=await env.now() + 60)
    altered_offer, altered_bid, wh, price = offer, bid, 1000, PRICE
    if field == "wh":
        altered_offer = offer.model_copy(update={"wh": 5000})
        altered_bid, wh = bid.model_copy(update={"wh": 5000}), 5000
    elif field == "price":
        altered_offer, price = offer.model_copy(update={"min_price_wei_per_kwh": 1}), 1
    elif field == "seller":
        altered_offer = offer.model_copy(update={"seller": env.other})
    elif field == "buyer":
        altered_bid = bid.model_copy(update={"buyer": env.other})
    elif field == "expiry":
        altered_bid = bid.model_copy(update={"expiry": 2**63})
    elif field == "duration":
        altered_offer = offer.model_copy(update={"duration_s": 10**9})
    else:
        altered_bid = bid.model_copy(update={"offer_id": typed.ZERO_ID})
    async with env.books_unchanged():
        reason = await env.open_reverts(altered_offer, osig, altered_bid, bsig, wh, price)
        expected = "offer not signed by seller" if altered_offer is not offer else "bid not signed by buyer"
        assert reason == M + expected
    assert await fills(env, offer, bid) == (0, 0)


async def test_signed_terms_for_another_market_or_chain_do_not_open_here(funded: Env) -> None:
    env = funded
    elsewhere = [typed.market_domain(env.chain_id, env.d.token_address),
                 typed.market_domain(env.chain_id + 1, env.d.market_address)]
    offer, osig = await env.offer(1000)
    bid, bsig = await env.bid(offer, 1000)
    async with env.books_unchanged():
        for domain in elsewhere:
            o = typed.sig_bytes(typed.sign_offer(env.keys[env.seller], domain, offer))
            b = typed.sig_bytes(typed.sign_bid(env.keys[env.buyer], domain, bid))
            assert await env.open_reverts(offer, o, bid, bsig, 1000, PRICE) == M + "offer not signed by seller"
            assert await env.open_reverts(offer, osig, bid, b, 1000, PRICE) == M + "bid not signed by buyer"


async def test_expired_offer_or_bid(funded: Env) -> None:
    env = funded
    now = await env.now()
    offer, osig = await env.offer(1000, expiry=now + 100)
    any_bid, any_bsig = await env.bid(None, 1000, expiry=now + 1000)
    later_offer, later_osig = await env.offer(1000, expiry=now + 1000)
    bid, bsig = await env.bid(later_offer, 1000, expiry=now + 200)
    await env.at(now + 150)
    async with env.books_unchanged():
        assert await env.open_reverts(offer, osig, any_bid, any_bsig, 1000, PRICE) == M + "offer expired"
        await env.at(now + 250)
        assert await env.open_reverts(later_offer, later_osig, bid, bsig, 1000, PRICE) == M + "bid expired"


async def test_an_offer_or_a_bid_is_never_over_filled_across_trades(funded: Env) -> None:
    env = funded
    offer, osig = await env.offer(1500)
    bid_a, bsig_a = await env.bid(offer, 1000)
    bid_b, bsig_b = await env.bid(offer, 1000)
    t1 = new_id()
    await env.tx(env.open(t1, offer, osig, bid_a, bsig_a, 1000, PRICE), env.operator)
    before = await env.books(t1)
    # the offer has 500 Wh left: 501 over-fills it, whichever bid
    reason = await env.open_reverts(offer, osig, bid_b, bsig_b, 501, PRICE)
    assert reason == M + "offer overfilled"
    # bid_a is used up: reusing it on another offer over-fills it
    offer2, osig2 = await env.offer(1000)
    any_bid, any_bsig = await env.bid(None, 1200)
    await env.tx(env.open(new_id(), offer2, osig2, any_bid, any_bsig, 700, PRICE), env.operator)
    mid = await env.books(t1)
    offer3, osig3 = await env.offer(1000)  # room on the offer side; the bid has 500 Wh left
    reason = await env.open_reverts(offer3, osig3, any_bid, any_bsig, 501, PRICE)
    assert reason == M + "bid overfilled"
    reason = await env.open_reverts(offer, osig, bid_a, bsig_a, 1, PRICE)
    assert reason == M + "bid overfilled"
    # a retried open of the same trade id cannot take a second share
    reason = await env.reverts(env.open(t1, offer, osig, bid_b, bsig_b, 500, PRICE), env.operator)
    assert reason == M + "trade exists"
    assert await env.books(t1) == mid
    assert await fills(env, offer, bid_a) == (1000, 1000)
    assert before != mid  # the honest second trade did lock its share


# ------------------------------------------------------------------ minting


async def test_mint_without_a_registered_meters_fresh_signature(env: Env) -> None:
    s, stranger = env.seller_meter, meter_key("adv-stranger")
    await env.mint(s, 1000)
    old = env.production(s, 1000)
    before = await env.books()
    forged_by_operator = typed.sig_bytes(typed.sign_production(env.keys[env.operator], env.token_domain, 9000))
    attempts = [
        (s.address, 9000, b"", "EnergyToken: bad signature"),  # no signature
        (s.address, 9000, forged_by_operator, "EnergyToken: bad signature"),  # someone else's key
        (s.address, 9000, env.production(stranger, 9000), "EnergyToken: bad signature"),
        (stranger.address, 9000, env.production(stranger, 9000), "EnergyToken: meter not registered"),
        (s.address, 1000, old, "EnergyToken: reading not above minted"),  # the replay mints nothing
        (s.address, 9000, high_s(env.production(s, 9000)), "EnergyToken: bad signature"),
    ]
    for who in (env.operator, env.admin, env.other, env.seller):
        for meter, produced, sig, expected in attempts:
            assert await env.reverts(env.token.mint(meter, produced, sig), who) == expected
    r = await env.tx(env.token.mintBatch([s.address], [1000], [old]), env.other)  # replayed in a batch: skipped
    assert env.events(r, env.d.token, "Minted") == []
    assert await env.books() == before

    await env.tx(env.registry.revoke(s.address), env.registrar)
    signed_earlier = env.production(s, 9000)
    assert await env.reverts(env.token.mint(s.address, 9000, signed_earlier), env.other) == (
        "EnergyToken: meter not registered")
    assert await env.books() == before


# ------------------------------------------------------------------ deliveries


@pytest.fixture
async def delivering(funded: Env) -> tuple[Env, str, str]:
    """Two open trades between the same parties, the first settled to 400 Wh."""
    env = funded
    t1, t2 = await env.open_trade(2000), await env.open_trade(2000)
    await env.settle(t1, 400)
    return env, t1, t2


async def test_forged_replayed_and_foreign_deliveries(delivering: tuple[Env, str, str]) -> None:
    env, t1, t2 = delivering
    k1 = typed.trade_key(t1)
    other_market = await make_env(env.w3, register=False)  # the same parties, another deployment
    before = await env.books(t1, t2)
    attempts = [
        (env.delivery(t1, 1500, env.seller_meter), "signer is not the buyer's meter"),  # the seller's meter
        (env.delivery(t2, 1500), "signer is not the buyer's meter"),  # the buyer meter's reading of another trade
        (env.delivery(t1, 1500, domain=typed.market_domain(env.chain_id + 1, env.d.market_address)),
         "signer is not the buyer's meter"),  # another chain id
        (env.delivery(t1, 1500, domain=other_market.market_domain), "signer is not the buyer's meter"),
        (env.delivery(t1, 1500, meter_key("unregistered")), "signer is not the buyer's meter"),
        (high_s(env.delivery(t1, 1500)), "bad signature"),  # the malleated twin of the real reading
        (env.delivery(t1, 1500)[:64] + b"\x1d", "bad signature"),
    ]
    for sig, expected in attempts:
        for who in (env.seller, env.operator, env.other):
            assert await env.reverts(env.market.settle(k1, 1500, sig), who) == M + expected
            assert await env.reverts(env.market.settleBatch([k1], [1500], [sig]), who) == M + expected
    # the buyer meter's real, older reading again: nothing to settle
    assert await env.reverts(env.market.settle(k1, 400, env.delivery(t1, 400)), env.seller) == (
        M + "reading not above settled")
    assert await env.books(t1, t2) == before

    # a revoked buyer meter's readings, even ones signed before, settle nothing more
    signed_before = env.delivery(t1, 1500)
    await env.tx(env.registry.revoke(env.buyer_meter.address), env.registrar)
    async with env.books_unchanged(t1, t2):
        assert await env.reverts(env.market.settle(k1, 1500, signed_before), env.seller) == (
            M + "signer is not the buyer's meter")


async def test_closing_on_an_old_reading_does_not_pay_less(delivering: tuple[Env, str, str]) -> None:
    """The buyer closes at 400 Wh settled; its meter had signed 1500 Wh. In the dispute window
    anyone (the seller) submits the 1500 Wh reading and the seller is paid for it; once the
    window is over, nothing more settles and finalize frees only the rest."""
    env, t1, _ = delivering
    k1 = typed.trade_key(t1)
    latest = env.delivery(t1, 1500)
    credit0 = await env.market.credit(env.seller).call()
    r = await env.tx(env.market.close(k1), env.buyer)
    closed_at = (await env.w3.eth.get_block(r["blockNumber"]))["timestamp"]
    await env.at(closed_at + DISPUTE_WINDOW_S - 10)
    r = await env.tx(env.market.settle(k1, 1500, latest), env.seller)
    assert env.events(r, env.d.market, "Settled")[0]["paidWei"] == wei_for(1500, PRICE) - wei_for(400, PRICE)
    assert await env.market.credit(env.seller).call() == credit0 + wei_for(1500, PRICE) - wei_for(400, PRICE)
    assert await env.reverts(env.market.finalize(k1), env.other) == M + "dispute window open"

    later = env.delivery(t1, 1800)
    await env.at(closed_at + DISPUTE_WINDOW_S)
    async with env.books_unchanged(t1):
        assert await env.reverts(env.market.settle(k1, 1800, later), env.seller) == M + "dispute window over"
        r = await env.tx(env.market.settleBatch([k1], [1800], [later]), env.seller)
        assert env.events(r, env.d.market, "Settled") == []
    r = await env.tx(env.market.finalize(k1), env.buyer)
    assert env.events(r, env.d.market, "TradeClosed") == [{
        "tradeId": k1, "closedBy": env.buyer, "deliveredWh": 1500,
        "refundedWei": wei_for(2000, PRICE) - wei_for(1500, PRICE), "returnedWh": 500}]
    assert await env.market.credit(env.seller).call() == credit0 + wei_for(1500, PRICE) - wei_for(400, PRICE)


async def test_nothing_settles_after_finalize_or_full_delivery(delivering: tuple[Env, str, str]) -> None:
    env, t1, t2 = delivering
    await env.settle(t2, 2000)  # full delivery ends t2
    k1 = typed.trade_key(t1)
    await env.tx(env.market.close(k1), env.buyer)
    await env.advance(DISPUTE_WINDOW_S)
    await env.tx(env.market.finalize(k1), env.other)
    async with env.books_unchanged(t1, t2):
        for t in (t1, t2):
            key = typed.trade_key(t)
            assert await env.reverts(env.market.settle(key, 2000, env.delivery(t, 2000)), env.seller) == (
                M + "trade not open")
            assert await env.reverts(env.market.close(key), env.buyer) == M + "trade not open"
            assert await env.reverts(env.market.finalize(key), env.other) == M + "trade not closing"


# ------------------------------------------------------------------ escrow and closing


async def test_reserved_escrow_cannot_leave_before_its_time(funded: Env) -> None:
    env = funded
    free = (await env.escrow(env.buyer))[0]
    until = await env.now() + 1000
    await env.tx(env.market.reserve(free, until), env.buyer)  # a bid's escrow
    async with env.books_unchanged():
        assert await env.reverts(env.market.withdraw(1), env.buyer) == M + "amount exceeds withdrawable escrow"
        assert await env.reverts(env.market.release(1), env.buyer) == M + "escrow reserved until later"
        await env.tx(env.market.reserve(0, 0), env.buyer)  # an earlier time never shortens the reservation
    assert (await env.escrow(env.buyer))[2] == until


async def test_a_stranger_cannot_close_before_the_deadline(funded: Env) -> None:
    env = funded
    trade = await env.open_trade(2000)
    key = typed.trade_key(trade)
    before = await env.books(trade)
    for who in (env.other, env.admin, env.registrar, env.pauser):
        assert await env.reverts(env.market.close(key), who) == M + "caller may not close before the deadline"
    assert await env.books(trade) == before
    deadline = (await env.trade(trade))[6]
    await env.at(deadline)
    await env.tx(env.market.close(key), env.other)  # from the deadline on, anyone may
    assert (await env.trade(trade))[2] == c.STATUS_CLOSING


async def test_pause_blocks_open_and_mint_but_not_withdraw(funded: Env) -> None:
    env = funded
    trade = await env.open_trade(1000)
    await env.settle(trade, 1000)  # credit for the seller
    await env.tx(env.market.pause(), env.pauser)
    await env.tx(env.token.pause(), env.pauser)
    offer, osig = await env.offer(1000)
    bid, bsig = await env.bid(offer, 1000)
    async with env.books_unchanged(trade):
        assert await env.open_reverts(offer, osig, bid, bsig, 1000, PRICE) == M + "paused"
        minted = await env.token.mintedOf(env.seller_meter.address).call()
        reason = await env.reverts(env.token.mint(env.seller_meter.address, minted + 1,
                                                  env.production(env.seller_meter, minted + 1)), env.other)
        assert reason == "EnergyToken: paused"
    free = (await env.escrow(env.buyer))[0]
    await env.tx(env.market.withdraw(free), env.buyer)
    await env.tx(env.market.withdrawCredit(), env.seller)
    assert (await env.escrow(env.buyer))[0] == 0 and await env.market.credit(env.seller).call() == 0


# ------------------------------------------------------------------ many trades opened at once


async def test_only_the_operator_opens_a_batch(funded: Env) -> None:
    env = funded
    offer, osig = await env.offer(1000)
    bid, bsig = await env.bid(offer, 1000)
    entry = c.opening(new_id(), offer, osig, bid, bsig, 1000, PRICE)
    async with env.books_unchanged():
        for who in (env.seller, env.buyer, env.other, env.admin, env.pauser):
            assert await env.reverts(env.market.openBatch([entry]), who) == M + "caller is not the operator"
        await env.tx(env.market.pause(), env.pauser)
        assert await env.reverts(env.market.openBatch([entry]), env.operator) == M + "paused"
    assert await fills(env, offer, bid) == (0, 0)


@pytest.mark.parametrize("bad", ["unsigned", "forged by the operator", "altered terms", "another chain",
                                 "replayed", "over-filled across entries", "same trade twice",
                                 "escrow spent by an earlier entry", "bid of a stranger"])
async def test_a_bad_entry_reverts_the_whole_batch(funded: Env, bad: str) -> None:
    """The operator puts one entry nobody signed for (or that over-fills what was signed, or
    replays a trade) next to honest ones: nothing opens, no fill moves, and the batch's reason
    is the bad entry's."""
    env = funded
    honest = []
    for wh in (1000, 500):
        offer, osig = await env.offer(wh)
        bid, bsig = await env.bid(offer, wh)
        honest.append((offer, osig, bid, bsig, wh))
    entries = [c.opening(new_id(), o, os_, b, bs, wh, PRICE) for o, os_, b, bs, wh in honest]
    offer, osig = await env.offer(1000)
    bid, bsig = await env.bid(offer, 1000)
    op_key = env.keys[env.operator]
    elsewhere = typed.market_domain(env.chain_id + 1, env.d.market_address)
    if bad == "unsigned":
        extra, reason = [c.opening(new_id(), offer, b"\0" * 65, bid, bsig, 1000, PRICE)], "bad signature"
    elif bad == "forged by the operator":
        forged = typed.sig_bytes(typed.sign_bid(op_key, env.market_domain, bid))
        extra, reason = [c.opening(new_id(), offer, osig, bid, forged, 1000, PRICE)], "bid not signed by buyer"
    elif bad == "altered terms":
        more = offer.model_copy(update={"wh": 5000})
        extra, reason = [c.opening(new_id(), more, osig, bid, bsig, 1000, PRICE)], "offer not signed by seller"
    elif bad == "another chain":
        other = typed.sig_bytes(typed.sign_offer(env.keys[env.seller], elsewhere, offer))
        extra, reason = [c.opening(new_id(), offer, other, bid, bsig, 1000, PRICE)], "offer not signed by seller"
    elif bad == "replayed":  # the first honest entry's offer and bid again, under a new trade id
        o, os_, b, bs, wh = honest[0]
        extra, reason = [c.opening(new_id(), o, os_, b, bs, wh, PRICE)], "offer overfilled"
    elif bad == "over-filled across entries":  # two halves that fit alone and not together
        extra = [c.opening(new_id(), offer, osig, bid, bsig, 600, PRICE),
                 c.opening(new_id(), offer, osig, bid, bsig, 600, PRICE)]
        reason = "offer overfilled"
    elif bad == "same trade twice":
        tid = new_id()
        extra = [c.opening(tid, offer, osig, bid, bsig, 500, PRICE), c.opening(tid, offer, osig, bid, bsig, 500, PRICE)]
        reason = "trade exists"
    elif bad == "escrow spent by an earlier entry":  # each fits the buyer's escrow, not all of them
        free = (await env.escrow(env.buyer))[0]
        dear = free - wei_for(500, PRICE)  # wei per kWh: 1000 Wh of it fits the escrow alone, not after the first entry
        big, big_sig = await env.offer(1000, dear)
        big_bid, big_bsig = await env.bid(big, 1000, dear)
        extra = [c.opening(new_id(), big, big_sig, big_bid, big_bsig, 1000, dear)]
        reason = "escrow does not cover trade"
    else:  # a bid signed by a stranger with escrow, for the buyer's account
        stranger_bid = bid.model_copy(update={"buyer": env.other})
        await env.tx(env.market.deposit(), env.other, value=10**18)
        extra, reason = [c.opening(new_id(), offer, osig, stranger_bid, bsig, 1000, PRICE)], "bid not signed by buyer"
    before = await env.books()
    fills_before = [await fills(env, o, b) for o, _, b, _, _ in honest] + [await fills(env, offer, bid)]
    for batch in (entries + extra, extra + entries, entries[:1] + extra + entries[1:]):
        assert await env.reverts(env.market.openBatch(batch), env.operator) == M + reason
        assert await env.books() == before
        assert [await fills(env, o, b) for o, _, b, _, _ in honest] + [await fills(env, offer, bid)] == fills_before
    # the honest entries alone open, exactly as one open each would
    r = await env.tx(env.market.openBatch(entries), env.operator)
    opened = env.events(r, env.d.market, "TradeOpened")
    assert [e["tradeId"] for e in opened] == [e[0] for e in entries]
    assert [await fills(env, o, b) for o, _, b, _, _ in honest] == [(1000, 1000), (500, 500)]
    assert (await env.escrow(env.buyer))[3] == wei_for(1000, PRICE) + wei_for(500, PRICE)
    assert await env.tokens(env.d.market.address) == 1500
    for e, (o, _, b, _, wh) in zip(entries, honest):
        t = await env.market.trades(e[0]).call()
        assert (t[0], t[1], t[2], t[3], t[5]) == (o.seller, wh, c.STATUS_OPEN, b.buyer, PRICE)


async def test_a_batch_opens_what_the_same_opens_one_by_one_would(w3: AsyncWeb3) -> None:
    """Two deployments side by side: one open per trade on one, one openBatch on the other; the
    books come out the same (escrow taken reserved first, fills shared by entries of one offer)."""
    one, many = await make_env(w3), await make_env(w3)
    results = []
    for env, batched in ((one, False), (many, True)):
        await env.fund(seller_wh=10_000, buyer_wei=10**18)
        await env.tx(env.market.depositAndReserve(await env.now() + 3600), env.buyer, value=wei_for(1500, PRICE))
        offer, osig = await env.offer(3000, PRICE, offer_id="0x" + "11" * 32)
        any_bid, any_bsig = await env.bid(None, 2500, PRICE, bid_id="0x" + "22" * 32)
        rows = [("a", 1000), ("b", 1200)]
        entries = [c.opening(tid, offer, osig, any_bid, any_bsig, wh, PRICE) for tid, wh in rows]
        if batched:
            await env.tx(env.market.openBatch(entries), env.operator)
        else:
            for e in entries:
                await env.tx(env.market.open(*e), env.operator)
        results.append(([await env.escrow(a) for a in (env.buyer, env.seller)],
                         [await env.tokens(a) for a in (env.buyer, env.seller, env.d.market.address)],
                         await fills(env, offer, any_bid),
                         [(await env.trade(tid))[:6] for tid, _ in rows]))
    # the deployments differ only in their addresses; the accounts are the same dev accounts
    assert results[0][1:] == results[1][1:]
    assert [e[:2] + e[3:] for e in results[0][0]] == [e[:2] + e[3:] for e in results[1][0]]
    assert results[1][2] == (2200, 2200)
