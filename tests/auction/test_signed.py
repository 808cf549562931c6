"""The auction's checks of contracts v2 on real sockets (real hub, the stand-in chain):
signed offers and bids that the market contract would refuse are refused at once and
change nothing; a bid must be covered by escrow reserved until its expiry; a winning bid
whose trade cannot be opened falls back to the next funded bid of another buyer; the
seller's site ends a trade its meter flags, or closes it itself."""

from __future__ import annotations

import pytest

from services.bus.refusals import Refusal
from services.auction.service import AuctionService
from services.bus import RequestError
from services.bus import commands as cmd
from services.bus import events as ev
from services.bus import typed
from tests.support.signing import CHAIN_ID, DOMAIN, MARKET, account, deployment, later, sign

from tests.support.auction import (BUYERS, SELLER, SELLER_ACCOUNT, FakeChain, Running, envelopes, key_of, offer,
                                   order, outbox, settings, snapshot)
from tests.support.bus import Grid, Sources
from tests.support.poll import until

B1, B2, B3 = BUYERS
OTHER_CHAIN = typed.market_domain(CHAIN_ID + 1, MARKET)
OTHER_MARKET = typed.market_domain(CHAIN_ID, "0x" + "11" * 20)


async def refused(m: Running, req: cmd.Request, site: str | None = None) -> tuple[str, str]:
    with pytest.raises(RequestError) as e:
        await m.call(req, site=site)
    assert e.value.message
    return e.value.code, e.value.message


def place_offer(o: typed.Offer, sig: str, *, wh: int | None = None, price: int | None = None, seller: str = SELLER,
                duration: float = 30.0) -> cmd.PlaceOffer:
    return cmd.PlaceOffer(seller=seller, seller_site="solar-1", wh=wh or o.wh,
                          start_price_wei_per_kwh=price or o.min_price_wei_per_kwh, duration_s=duration, offer=o,
                          signature=sig)


def place_bid(offer_id: str, b: typed.Bid, sig: str, *, price: int | None = None) -> cmd.PlaceBid:
    return cmd.PlaceBid(offer_id=offer_id, buyer=b.buyer, buyer_site="home-7",
                        price_wei_per_kwh=price or b.max_price_wei_per_kwh, bid=b, signature=sig)


async def test_forged_altered_replayed_expired_or_foreign_signatures_are_refused_and_change_nothing(
        grid: Grid, fake_chain: FakeChain) -> None:
    other_seller = account("seller-1")
    fake_chain.set(other_seller.address, tokens_wh=10_000)
    s = settings(grid, fake_chain.endpoint, auction_market="both", auction_clear_interval_s=3600,
                 auction_min_increment_wei_per_kwh=0)
    async with Running(grid, s) as m:
        live = (await m.call(offer(wh=2000, price=1000))).offer_id
        other = (await m.call(offer(wh=2000, price=1000))).offer_id
        first = m.bid(live, B1, 1000)
        await m.call(first)
        live_id, other_id = m.signed[live].offer_id, m.signed[other].offer_id
        before = snapshot(m)

        seller, b2 = SELLER_ACCOUNT, key_of(B2)
        o, sig = seller.offer(wh=2000, price=1000)
        b, bsig = b2.bid(offer_id=live_id, wh=2000, price=1100)
        soon = later(30 + 10)  # past the auction's end, not by the grace of 60 s
        forged_order, fsig = b2.bid(offer_id=typed.ZERO_ID, wh=10, price=10)
        foreign_order, osig = seller.offer(wh=10, price=10, domain=OTHER_CHAIN)
        cases: list[tuple[str, cmd.Request, str, str]] = [
            # offers
            ("forged: another key signs for the seller",
             place_offer(*seller.offer(wh=2000, price=1000, key=account("buyer-b").key)), "bad_signature", "forged"),
            ("altered price", place_offer(o.model_copy(update={"min_price_wei_per_kwh": 900}), sig), "bad_signature", ""),
            ("altered Wh", place_offer(o.model_copy(update={"wh": 3000}), sig), "bad_signature", ""),
            ("altered seller", place_offer(*other_seller.offer(wh=2000, price=1000, seller=SELLER)), "bad_signature",
             ""),
            ("another chain", place_offer(*seller.offer(wh=2000, price=1000, domain=OTHER_CHAIN)), "bad_signature",
             "another chain"),
            ("another market", place_offer(*seller.offer(wh=2000, price=1000, domain=OTHER_MARKET)), "bad_signature",
             ""),
            ("request says another Wh", place_offer(o, sig, wh=3000), "invalid", "2000 Wh"),
            ("request says another price", place_offer(o, sig, price=900), "invalid", "1000 wei/kWh"),
            ("the seller's offer, someone else's request", place_offer(o, sig, seller=B1), "invalid", ""),
            ("expires before the auction's end plus grace", place_offer(*seller.offer(wh=2000, price=1000,
                                                                                      expiry=soon)),
             "invalid", "expires at"),
            ("expired", place_offer(*seller.offer(wh=2000, price=1000, expiry=later(-5))), "invalid", "expires at"),
            ("the same signed offer again", place_offer(m.signed[live], _sig_of(m, live)), "replayed", live),
            # bids
            ("forged: another key signs for the buyer",
             place_bid(live, *b2.bid(offer_id=live_id, wh=2000, price=1100, key=account("buyer-d").key)),
             "bad_signature", ""),
            ("altered price", place_bid(live, b.model_copy(update={"max_price_wei_per_kwh": 1200}), bsig),
             "bad_signature", ""),
            ("altered Wh", place_bid(live, b.model_copy(update={"wh": 1000}), bsig), "bad_signature", ""),
            ("altered offer", place_bid(live, b.model_copy(update={"offer_id": other_id}), bsig), "bad_signature", ""),
            ("another chain", place_bid(live, *b2.bid(offer_id=live_id, wh=2000, price=1100, domain=OTHER_CHAIN)),
             "bad_signature", ""),
            ("another market", place_bid(live, *b2.bid(offer_id=live_id, wh=2000, price=1100, domain=OTHER_MARKET)),
             "bad_signature", ""),
            ("replayed onto another offer", place_bid(live, *b2.bid(offer_id=other_id, wh=2000, price=1100)),
             "invalid", other_id),
            ("a buy order's bid on an offer", place_bid(live, *b2.bid(offer_id=typed.ZERO_ID, wh=2000, price=1100)),
             "invalid", ""),
            ("request says another price", place_bid(live, b, bsig, price=1200), "invalid", "1100 wei/kWh"),
            ("signed for less than the offer's Wh", place_bid(live, *b2.bid(offer_id=live_id, wh=1000, price=1100)),
             "invalid", "2000 Wh"),
            ("expires before the auction's end plus grace",
             place_bid(live, *b2.bid(offer_id=live_id, wh=2000, price=1100, expiry=soon)), "invalid", "expires at"),
            ("the same signed bid again", first, "replayed", ""),
            # double-auction orders
            ("a sell order without its offer",
             cmd.PlaceOrder(side="sell", account=SELLER, site="solar-1", wh=10, limit_price_wei_per_kwh=10,
                            bid=b, signature=bsig), "invalid", "signed offer"),
            ("a buy order's bid for one offer",
             cmd.PlaceOrder(side="buy", account=B2, site="home-7", wh=2000, limit_price_wei_per_kwh=1100, bid=b,
                            signature=bsig), "invalid", "zero"),
            ("a forged buy order",
             cmd.PlaceOrder(side="buy", account=B2, site="home-7", wh=10, limit_price_wei_per_kwh=10,
                            bid=forged_order.model_copy(update={"wh": 20}), signature=fsig), "bad_signature", ""),
            ("a sell order signed for another chain",
             cmd.PlaceOrder(side="sell", account=SELLER, site="solar-1", wh=10, limit_price_wei_per_kwh=10,
                            offer=foreign_order, signature=osig),
             "bad_signature", ""),
        ]
        asked = fake_chain.asked
        for what, req, code, words in cases:
            got, msg = await refused(m, req)
            assert got == code, (what, got, msg)
            assert words in msg and "nothing was done" in msg, (what, msg)
        assert fake_chain.asked == asked + 2  # only the two replays got as far as the chain (checked in the store)
        assert snapshot(m) == before
        # the genuine ones still go through
        assert (await m.call(place_bid(live, b, bsig))).bid_id
        assert (await m.call(place_offer(o, sig))).offer_id


def _sig_of(m: Running, offer_id: str) -> str:
    """The signature the seller placed ``offer_id`` with (from the store)."""
    return str(m.db().execute("SELECT signature FROM offers WHERE offer_id = ?", (offer_id,)).fetchone()[0])


async def test_a_bid_needs_escrow_reserved_until_its_expiry(grid: Grid, fake_chain: FakeChain) -> None:
    s = settings(grid, fake_chain.endpoint, auction_market="both", auction_clear_interval_s=3600)
    async with Running(grid, s) as m:
        a = (await m.call(offer(wh=2000, price=1000))).offer_id  # a bid of 1000 wei/kWh costs 2000 wei
        b = (await m.call(offer(wh=2000, price=1000))).offer_id
        expiry = later(3600)
        fake_chain.set(B3, escrow_free_wei=10**18)  # free escrow is no cover: it can be withdrawn any time
        before = snapshot(m)
        code, msg = await refused(m, m.bid(a, B3, 1000, expiry=expiry))
        assert code == "unfunded" and f"reserve 2000 wei in all until {expiry}" in msg
        fake_chain.set(B3, escrow_reserved_wei=10**18, reserved_until=expiry - 1)  # ends before the bid does
        code, msg = await refused(m, m.bid(a, B3, 1000, expiry=expiry))
        assert code == "unfunded" and f"only until {expiry - 1}" in msg
        code, msg = await refused(m, order("buy", key_of(B3), 2000, 1000, expiry=expiry + 3700))  # past the call
        assert code == "unfunded" and "the buy order needs 2000 wei" in msg
        assert snapshot(m) == before

        fake_chain.set(B3, escrow_reserved_wei=3000, reserved_until=expiry)
        await m.call(m.bid(a, B3, 1000, expiry=expiry))  # holds 2000 of 3000
        code, msg = await refused(m, m.bid(b, B3, 1000, expiry=expiry))
        assert code == "unfunded" and "2000 wei held by the buyer's other bids" in msg
        assert f"reserve 4000 wei in all until {expiry}" in msg
        fake_chain.set(B3, escrow_reserved_wei=4000, reserved_until=expiry)  # the buyer reserved what it was told
        assert (await m.call(m.bid(b, B3, 1000, expiry=expiry))).bid_id


async def test_a_winning_bid_that_cannot_be_opened_falls_back_to_the_next_funded_bid(
        grid: Grid, fake_chain: FakeChain, chain_events: Sources) -> None:
    async with Running(grid, settings(grid, fake_chain.endpoint)) as m:
        db = m.settings.data_dir / "auction.sqlite"
        o = (await m.call(offer(wh=2000, price=1000, duration=4.0))).offer_id  # three bids within it, loaded
        b1 = m.bid(o, B1, 1000)
        for req in (b1, m.bid(o, B2, 1100), m.bid(o, B3, 1200)):
            await m.call(req)
        tid = f"t-{o}"
        await until(lambda: outbox(db, "trade.agreed"), what="the winner's trade agreed")
        assert outbox(db, "trade.agreed")[0]["buyer"] == B3
        fake_chain.set(B2, escrow_reserved_wei=0)  # B2 withdrew: its bid is no longer funded

        def states(trade_id: str) -> list[str]:
            return [s["state"] for s in outbox(db, "trade.status") if s["trade_id"] == trade_id]

        failed = await chain_events.publish(ev.ChainTx(tx_hash="", kind="open", ref=tid, account=B3, status="failed",
                                                        reason="EnergyMarket: bid expired"))
        await until(lambda: len(outbox(db, "trade.agreed")) == 2, what="the next funded bid's trade agreed")
        agreed = outbox(db, "trade.agreed")[1]
        assert (agreed["trade_id"], agreed["buyer"], agreed["price_wei_per_kwh"], agreed["wh"]) == \
            (f"{tid}-2", B1, 1000, 2000)  # B2 is skipped: not funded
        assert agreed["bid"] == b1.bid.model_dump() and agreed["bid_signature"] == b1.signature
        assert agreed["offer"] == m.signed[o].model_dump()
        assert states(tid) == ["agreed", "failed"] and states(f"{tid}-2") == ["agreed"]
        every = (await m.call(cmd.ListTrades())).trades
        trades = {t.trade_id: t for t in every}
        assert (trades[tid].state, trades[tid].reason) == ("failed", "EnergyMarket: bid expired")
        # the latest only (an agent's last clearing price), and one account's, oldest first
        assert [t.trade_id for t in every] == [tid, f"{tid}-2"]
        assert (await m.call(cmd.ListTrades(last=1))).trades == every[-1:]
        assert (await m.call(cmd.ListTrades(last=5))).trades == every
        assert [t.trade_id for t in (await m.call(cmd.ListTrades(account=B3, last=1))).trades] == [tid]
        assert trades[f"{tid}-2"].state == "agreed"
        [env] = [e for e in envelopes(db, "trade.agreed") if e["body"]["trade_id"] == f"{tid}-2"]
        assert env["cause"] == failed.id  # the failure led to it

        # that one fails too: B3 and B1 were tried, B2 is not funded: nothing more
        await chain_events.publish(ev.ChainTx(tx_hash="", kind="open", ref=f"{tid}-2", account=B1, status="failed",
                                               reason="EnergyMarket: insufficient escrow"))
        await until(lambda: m.db().execute("SELECT fallback FROM trades WHERE trade_id = ?",
                                           (f"{tid}-2",)).fetchone()[0].startswith("none"), what="no bid left")
        assert len(outbox(db, "trade.agreed")) == 2 and states(f"{tid}-2") == ["agreed", "failed"]


async def test_the_sellers_site_closes_a_trade_its_meter_flags_with_the_reason(
        grid: Grid, fake_chain: FakeChain, chain_events: Sources) -> None:
    async with Running(grid, settings(grid, fake_chain.endpoint)) as m:
        db = m.settings.data_dir / "auction.sqlite"
        tid = await m.agreed()
        await chain_events.publish(ev.TradeRecorded(trade_id=tid, tx_hash="0x01"))

        def statuses() -> list[tuple[str, str]]:
            return [(s["state"], s["reason"]) for s in outbox(db, "trade.status") if s["trade_id"] == tid]

        await until(lambda: statuses()[-1][0] == "delivering", what="delivering")
        # the buyer's site and a stranger cannot end it so, whatever they claim in the body
        applied = m.service.health()["applied"]
        for source in ("home-7/meter", "probe/meter"):
            await chain_events.publish(ev.MeterMismatch(trade_id=tid, buyer_wh=10, seller_wh=900, tolerance=0.05,
                                                           site="solar-1", reason="made up"), source=source)
        await until(lambda: m.service.health()["applied"] >= applied + 2, what="both mismatches heard")
        assert statuses()[-1][0] == "delivering"
        await chain_events.publish(ev.MeterMismatch(
            trade_id=tid, buyer_wh=400, seller_wh=900, tolerance=0.05, site="solar-1",
            reason="exported 900 Wh, the buyer's meter signed 400 Wh"), source="solar-1/meter")
        await until(lambda: statuses()[-1][0] == "closed", what="closed by the seller's site")
        reason = "closed by the seller's site: exported 900 Wh, the buyer's meter signed 400 Wh"
        assert statuses() == [("agreed", ""), ("recorded", ""), ("delivering", ""), ("closed", reason)]
        trade = (await m.call(cmd.ListTrades())).trades[0]
        assert (trade.state, trade.reason) == ("closed", reason)


async def test_the_seller_may_close_its_own_trade(grid: Grid, fake_chain: FakeChain) -> None:
    async with Running(grid, settings(grid, fake_chain.endpoint)) as m:
        db = m.settings.data_dir / "auction.sqlite"
        tid = await m.agreed()
        # only from the seller's own site
        assert (await refused(m, cmd.CloseTrade(trade_id=tid, by=SELLER), site="home-7"))[0] == "not_allowed"
        assert (await refused(m, cmd.CloseTrade(trade_id=tid, by=SELLER), site="probe"))[0] == "not_allowed"
        assert await m.call(cmd.CloseTrade(trade_id=tid, by=SELLER), site="solar-1") == cmd.Ok()
        closed = [s for s in outbox(db, "trade.status") if s["state"] == "closed"]
        assert [(c["trade_id"], c["reason"]) for c in closed] == [(tid, "closed by the seller")]


def test_the_signing_helper_signs_what_it_is_given() -> None:
    o, sig = SELLER_ACCOUNT.offer(wh=10, price=10)
    assert typed.recover_offer(DOMAIN, o, sig) == SELLER
    assert sign(o, SELLER_ACCOUNT.key) == sig


async def test_without_the_operators_deployment_nothing_signed_is_taken(grid: Grid, fake_chain: FakeChain) -> None:
    """Until the auction has heard which market the signatures are for, it refuses them
    (and says why); a restart keeps the deployment it heard."""
    s = settings(grid, fake_chain.endpoint)
    async with Running(grid, s) as m:
        assert (await m.call(offer())).offer_id
    kept = m.db().execute("SELECT value FROM auction_meta WHERE key = 'deployment'").fetchone()
    assert kept is not None and deployment().model_dump_json() == kept[0]  # what a restart starts from
    svc = AuctionService(settings(grid, fake_chain.endpoint, data_dir=grid.root / "market-fresh"))
    try:
        with pytest.raises(Refusal) as e:
            svc._domain()
        assert e.value.code == "unavailable" and "chain.deployment" in e.value.message
    finally:
        svc.store.close()
        svc.ctx.term()
    async with Running(grid, s) as m:
        assert m.service._domain() == DOMAIN
