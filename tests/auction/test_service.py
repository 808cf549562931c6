"""The auction service on real sockets: a real hub, a stand-in chain (FakeChain) on a
real RpcServer, the service's own SQLite file."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time

import pytest
import zmq
import zmq.asyncio

from services.bus import RequestError, Store, Subscriber
from services.bus import commands as cmd
from services.bus import events as ev
from services.bus import typed

from tests.support.signing import DOMAIN, later as later_s

from tests.support.auction import (BUYERS, OPERATOR, SELLER, FakeChain, Running, envelopes, key_of, offer, order,
                                   outbox, settings, snapshot)
from tests.support.bus import Grid, Sources, raw_socket
from tests.support.poll import until
from tests.support.signing import account

B1, B2, B3 = BUYERS


class Watcher:
    """What a marketplace page sees: every market and trade event through the hub."""

    def __init__(self, grid: Grid, ctx: zmq.asyncio.Context, store: Store) -> None:
        self.seen: list[ev.Message] = []
        self.sub = Subscriber(ctx, grid.security("home-7"), store, hub_sub=grid.hub_sub,
                              prefixes=["market.", "trade."], handler=self.handler, name="page")

    def handler(self, env, conn) -> None:  # type: ignore[no-untyped-def]
        self.seen.append(env.body)

    def of(self, cls: type) -> list:  # type: ignore[type-arg]
        return [b for b in self.seen if isinstance(b, cls)]


async def test_english_auction_live_on_the_bus(grid: Grid, fake_chain: FakeChain, tmp_path) -> None:
    ctx = zmq.asyncio.Context()
    sec = grid.security("home-7")
    sec.start(ctx)
    page = Watcher(grid, ctx, Store(tmp_path / "page.sqlite"))
    await page.sub.start()
    try:
        async with Running(grid, settings(grid, fake_chain.endpoint, auction_min_increment_wei_per_kwh=10)) as m:
            placed = await m.call(offer(wh=2500, price=1000, duration=4.0))  # three calls within it, loaded
            await m.call(m.bid(placed.offer_id, B1, 1000))
            await m.call(m.bid(placed.offer_id, B2, 1010))
            listed = (await m.call(cmd.ListOffers())).offers
            assert [(o.offer_id, o.highest_bidder, o.highest_bid_wei_per_kwh, o.bids) for o in listed] == \
                [(placed.offer_id, B2, 1010, 2)]
            await until(lambda: page.of(ev.TradeAgreed), what="trade agreed on the bus")
            agreed = page.of(ev.TradeAgreed)
            assert [(a.trade_id, a.buyer, a.price_wei_per_kwh, a.wh) for a in agreed] == \
                [(f"t-{placed.offer_id}", B2, 1010, 2500)]
            # the agreement carries what the operator opens the trade from: both signed facts
            signed_offer, a = m.signed[placed.offer_id], agreed[0]
            assert listed[0].signed_offer_id == signed_offer.offer_id
            assert a.offer == signed_offer and a.offer_signature and a.bid is not None and a.bid_signature
            assert typed.recover_offer(DOMAIN, a.offer, a.offer_signature) == SELLER
            assert (a.bid.buyer, a.bid.offer_id, a.bid.max_price_wei_per_kwh, a.bid.wh) == \
                (B2, signed_offer.offer_id, 1010, 2500)
            assert typed.recover_bid(DOMAIN, a.bid, a.bid_signature) == B2
            assert [(c.outcome, c.winner) for c in page.of(ev.OfferClosed)] == [("sold", B2)]
            assert [b.buyer for b in page.of(ev.BidPlaced)] == [B1, B2]
            assert page.of(ev.OfferOpened)[0].ends_at == pytest.approx(placed.ends_at)
            trades = (await m.call(cmd.ListTrades(account=B2))).trades
            assert [(t.trade_id, t.state) for t in trades] == [(f"t-{placed.offer_id}", "agreed")]
            assert (await m.call(cmd.ListTrades(account=B1))).trades == []
            assert (await m.call(cmd.ListOffers())).offers == []
            assert (await m.call(cmd.ListOffers(include_closed=True))).offers[0].state == "sold"
    finally:
        await page.sub.stop()
        page.sub.store.close()
        sec.stop()
        ctx.destroy(linger=0)


async def raw(endpoint: str, grid: Grid, data: bytes) -> dict:  # type: ignore[type-arg]
    """Send bytes that no typed client would send; return the decoded reply."""
    ctx = zmq.asyncio.Context()
    sock = raw_socket(ctx, grid, "home-7", zmq.DEALER, endpoint)
    try:
        await sock.send(data)
        assert await sock.poll(10_000), "no reply to a malformed request"
        return json.loads(await sock.recv())
    finally:
        sock.close(0)
        ctx.destroy(linger=0)


async def test_every_invalid_bid_gets_a_reason_and_changes_nothing(grid: Grid, fake_chain: FakeChain) -> None:
    fake_chain.set(B3, escrow_reserved_wei=1999)  # 2000 Wh at 1000 wei/kWh costs 2000 wei
    async with Running(grid, settings(grid, fake_chain.endpoint, auction_min_increment_wei_per_kwh=10,
                                      auction_max_duration_s=3600)) as m:
        live = (await m.call(offer(wh=2000, price=1000))).offer_id
        await m.call(m.bid(live, B1, 1000))
        cancelled = (await m.call(offer(wh=10))).offer_id
        await m.call(cmd.CancelOffer(offer_id=cancelled, seller=SELLER))
        expired = (await m.call(offer(wh=10, duration=0.2))).offer_id
        await until(lambda: any(o["outcome"] == "expired" for o in outbox(m.settings.data_dir / "auction.sqlite",
                                                                          "market.offer_closed")))
        before = snapshot(m)
        cases = [
            (m.bid(live, B2, 1009), "too_low", "1010"),
            (m.bid(live, B2, 999), "too_low", ""),
            (m.bid(live, B3, 1000 + 10), "unfunded", "2020"),
            (m.bid(cancelled, B2, 5000), "closed", "cancelled"),
            (m.bid(expired, B2, 5000), "closed", "expired"),
            (m.bid(live, SELLER, 5000), "own_offer", ""),
            (m.bid(live, SELLER.upper().replace("0X", "0x"), 5000), "own_offer", ""),
            (m.bid("o-999", B2, 5000), "not_found", ""),
            (cmd.CancelOffer(offer_id=live, seller=SELLER), "has_bids", ""),
            (cmd.CancelOffer(offer_id=live, seller=B1), "not_allowed", ""),
            (offer(wh=200_000), "no_tokens", ""),
            (offer(duration=3601), "invalid", "longest"),
            (cmd.CloseTrade(trade_id="t-nope", by=B1), "not_found", ""),
        ]
        for req, code, words in cases:
            with pytest.raises(RequestError) as e:
                await m.call(req)
            assert e.value.code == code, (req, e.value)
            assert words in e.value.message and e.value.message
        # malformed: bad price, missing field, unknown field, not JSON at all
        good = cmd.wrap(m.bid(live, B2, 2000), "c1").model_dump(mode="json")
        for mutate in (lambda d: d["body"].update(price_wei_per_kwh=-5), lambda d: d["body"].pop("buyer"),
                       lambda d: d["body"].update(extra=1), lambda d: d["body"].update(buyer="0x12")):
            d = json.loads(json.dumps(good))
            mutate(d)
            rep = await raw(m.endpoint, grid, json.dumps(d).encode())
            assert rep["ok"] is False and rep["error"]["code"] == "bad_request" and rep["error"]["message"]
        rep = await raw(m.endpoint, grid, b"\xff not json")
        assert rep["ok"] is False and rep["error"]["code"] == "bad_request"
        assert snapshot(m) == before
        # and a valid bid after all that still works
        assert (await m.call(m.bid(live, B2, 1010))).bid_id


async def test_escrow_held_by_other_leading_bids_counts(grid: Grid, fake_chain: FakeChain) -> None:
    fake_chain.set(B3, escrow_reserved_wei=3000)
    async with Running(grid, settings(grid, fake_chain.endpoint)) as m:
        a = (await m.call(offer(wh=2000, price=1000))).offer_id
        b = (await m.call(offer(wh=2000, price=1000))).offer_id
        await m.call(m.bid(a, B3, 1000))  # holds 2000 of 3000
        with pytest.raises(RequestError) as e:
            await m.call(m.bid(b, B3, 1000))
        assert e.value.code == "unfunded" and "reserve 4000 wei in all" in e.value.message
        await m.call(m.bid(a, B3, 1500))  # raising one's own bid replaces what it holds: 3000 of 3000
        await m.call(m.bid(a, B1, 1600))  # outbid: B3's escrow is free again
        assert (await m.call(m.bid(b, B3, 1000))).bid_id
        # the seller's tokens: 100 000 Wh, 4000 held by the two offers
        with pytest.raises(RequestError) as e:
            await m.call(offer(wh=96_001))
        assert e.value.code == "no_tokens" and "4000 Wh already held" in e.value.message
        assert (await m.call(offer(wh=96_000))).offer_id


async def test_a_chain_that_does_not_answer_is_a_clear_error(grid: Grid, fake_chain: FakeChain) -> None:
    async with Running(grid, settings(grid, fake_chain.endpoint)) as m:
        live = (await m.call(offer())).offer_id
        await fake_chain.server.stop()  # type: ignore[attr-defined]
        before = snapshot(m)
        with pytest.raises(RequestError) as e:
            await m.call(m.bid(live, B1, 1000))
        assert e.value.code == "unavailable" and "cannot check escrow now" in e.value.message
        with pytest.raises(RequestError) as e:
            await m.call(offer())
        assert e.value.code == "unavailable" and "cannot check tokens now" in e.value.message
        assert snapshot(m) == before


async def test_seller_cancels_an_offer_without_bids(grid: Grid, fake_chain: FakeChain) -> None:
    async with Running(grid, settings(grid, fake_chain.endpoint)) as m:
        o = (await m.call(offer())).offer_id
        assert await m.call(cmd.CancelOffer(offer_id=o, seller=SELLER)) == cmd.Ok()
        with pytest.raises(RequestError) as e:
            await m.call(cmd.CancelOffer(offer_id=o, seller=SELLER))
        assert e.value.code == "closed"
        closed = outbox(m.settings.data_dir / "auction.sqlite", "market.offer_closed")
        assert closed == [{"offer_id": o, "outcome": "cancelled", "winner": None, "price_wei_per_kwh": None}]


async def test_a_retried_command_id_runs_once(grid: Grid, fake_chain: FakeChain) -> None:
    async with Running(grid, settings(grid, fake_chain.endpoint)) as m:
        o = (await m.call(offer())).offer_id
        first = await m.call(m.bid(o, B1, 1000), cmd_id="same")
        again = await m.call(m.bid(o, B1, 1000), cmd_id="same")
        assert first == again
        assert len(outbox(m.settings.data_dir / "auction.sqlite", "market.bid_placed")) == 1


async def test_trade_lifecycle_follows_chain_and_meter_events(grid: Grid, fake_chain: FakeChain,
                                                              chain_events: Sources) -> None:
    # events as the chain service and the buyer's meter would publish them
    async with Running(grid, settings(grid, fake_chain.endpoint, auction_trade_heartbeat_s=0.1)) as m:
        db = m.settings.data_dir / "auction.sqlite"
        o = (await m.call(offer(wh=2000, duration=1.5))).offer_id
        await m.call(m.bid(o, B1, 1000))
        tid = f"t-{o}"
        await until(lambda: outbox(db, "trade.agreed"))

        def states() -> list[str]:
            return [s["state"] for s in outbox(db, "trade.status") if s["trade_id"] == tid]

        def heard_live() -> bool:
            return any(tid in h["live"] for h in outbox(db, "trade.heartbeat"))

        assert states() == ["agreed"] and not heard_live()
        with pytest.raises(RequestError) as e:  # not a party to it
            await m.call(cmd.CloseTrade(trade_id=tid, by=B2))
        assert e.value.code == "not_allowed"
        await chain_events.publish(ev.TradeRecorded(trade_id=tid, tx_hash="0x01"))
        await until(lambda: states() == ["agreed", "recorded", "delivering"], what="recorded")
        await until(heard_live, what="heartbeat lists the live trade")
        hb = [h for h in outbox(db, "trade.heartbeat") if tid in h["live"]][-1]
        assert hb["sites"][tid] == ["solar-1", "home-7"]
        await chain_events.publish(ev.Delivery(trade_id=tid, site="solar-1", meter="m1", role="producer", delivered_wh=900))
        await chain_events.publish(ev.Delivery(trade_id=tid, site="home-7", meter="m1", role="consumer", delivered_wh=800))
        await until(lambda: (m.db().execute("SELECT delivered_wh FROM trades").fetchone() or [0])[0] == 800)
        await m.call(cmd.CloseTrade(trade_id=tid, by=B1))
        assert states()[-1] == "closed"
        with pytest.raises(RequestError) as e:
            await m.call(cmd.CloseTrade(trade_id=tid, by=B1))
        assert e.value.code == "closed"
        await chain_events.publish(ev.TradeClosed(trade_id=tid, delivered_wh=850, paid_wei=850, refunded_wei=1150,
                                                  tx_hash="0x02"))
        await until(lambda: states()[-1] == "settled", what="settled")
        trade = (await m.call(cmd.ListTrades())).trades[0]
        assert (trade.state, trade.delivered_wh, trade.paid_wei) == ("settled", 850, 850)
        await chain_events.publish(ev.TradeRecorded(trade_id=tid, tx_hash="0x01"))  # late repeat: a no-op
        await asyncio.sleep(0.5)
        assert states() == ["agreed", "recorded", "delivering", "closed", "settled"]
        last = outbox(db, "trade.heartbeat")[-1]
        assert tid not in last["live"]


async def test_delivery_fulfils_and_operator_may_close(grid: Grid, fake_chain: FakeChain,
                                                      chain_events: Sources) -> None:
    async with Running(grid, settings(grid, fake_chain.endpoint)) as m:
        db = m.settings.data_dir / "auction.sqlite"
        # long enough for both bids to come in on a loaded machine
        o1 = (await m.call(offer(wh=1000, duration=3.0))).offer_id
        o2 = (await m.call(offer(wh=1000, duration=3.0))).offer_id
        await m.call(m.bid(o1, B1, 1000))
        await m.call(m.bid(o2, B2, 1000))
        await until(lambda: len(outbox(db, "trade.agreed")) == 2)
        for o in (o1, o2):
            await chain_events.publish(ev.TradeRecorded(trade_id=f"t-{o}", tx_hash="0x01"))

        def state(tid: str) -> str:
            return [s["state"] for s in outbox(db, "trade.status") if s["trade_id"] == tid][-1]

        # the buyer's meter is another source than the chain: it counts once the trade runs
        await until(lambda: state(f"t-{o1}") == "delivering", what="recorded")
        await chain_events.publish(ev.Delivery(trade_id=f"t-{o1}", site="home-7", meter="m1", role="consumer",
                                        delivered_wh=1000))
        await until(lambda: state(f"t-{o1}") == "fulfilled", what="fulfilled")
        await until(lambda: state(f"t-{o2}") == "delivering")
        await m.call(cmd.CloseTrade(trade_id=f"t-{o2}", by=OPERATOR))
        closed = [s for s in outbox(db, "trade.status") if s["state"] == "closed"]
        assert [(c["trade_id"], c["reason"]) for c in closed] == [(f"t-{o2}", "closed by the operator")]


async def test_deadlines_survive_a_restart(grid: Grid, fake_chain: FakeChain) -> None:
    s = settings(grid, fake_chain.endpoint)
    db = s.data_dir / "auction.sqlite"
    async with Running(grid, s) as m:
        # long enough for the calls and the stop below on a loaded machine (at 1 s, once not)
        short = await m.call(offer(duration=4.0))
        long = await m.call(offer(duration=120.0))
        await m.call(m.bid(short.offer_id, B1, 1200))
        await m.call(m.bid(long.offer_id, B2, 1300))
    assert outbox(db, "trade.agreed") == []  # stopped before the first deadline
    while time.time() < short.ends_at + 0.2:  # the deadline passes while the service is down
        await asyncio.sleep(0.05)
    async with Running(grid, s) as m:
        await until(lambda: len(outbox(db, "trade.agreed")) == 1, what="overdue auction settled on start")
        offers = {o.offer_id: o for o in (await m.call(cmd.ListOffers(include_closed=True))).offers}
        assert offers[short.offer_id].state == "sold"
        assert offers[long.offer_id].state == "open"
        assert offers[long.offer_id].ends_at == long.ends_at  # keeps its remaining time
    async with Running(grid, s) as m:  # and a second restart settles nothing again
        await m.call(cmd.Ping())
        assert (await m.call(cmd.ListOffers())).offers[0].offer_id == long.offer_id
    agreed = outbox(db, "trade.agreed")
    assert [(a["trade_id"], a["buyer"], a["price_wei_per_kwh"]) for a in agreed] == \
        [(f"t-{short.offer_id}", B1, 1200)]
    assert [c["offer_id"] for c in outbox(db, "market.offer_closed")] == [short.offer_id]


async def test_double_auction_clears_each_call(grid: Grid, fake_chain: FakeChain) -> None:
    sellers = [account("seller-1"), account("seller-2")]
    for a in sellers:  # with escrow: its buy order is taken when a call boundary falls between its two orders
        fake_chain.set(a.address, tokens_wh=10_000, escrow_reserved_wei=10**15)
    b1, b2, b3 = (key_of(b) for b in BUYERS)
    s = settings(grid, fake_chain.endpoint, auction_market="double", auction_clear_interval_s=2.0)
    db = s.data_dir / "auction.sqlite"
    async with Running(grid, s) as m:
        with pytest.raises(RequestError) as e:
            await m.call(offer())
        assert e.value.code == "unsupported"

        ids = [(await m.call(order("sell", sellers[0], 3000, 100))).order_id,
               (await m.call(order("sell", sellers[1], 3000, 300))).order_id,
               (await m.call(order("buy", b1, 2000, 500))).order_id,
               (await m.call(order("buy", b2, 2500, 200))).order_id]
        try:
            await m.call(order("buy", sellers[0], 10, 500, site="solar-1"))  # the seller's own site buys
        except RequestError as e:
            assert e.code == "own_offer"
        else:  # only possible if a call boundary fell between the two orders
            placed = outbox(db, "market.order_placed")
            assert placed[-1]["account"] == sellers[0].address and placed[-1]["round"] != placed[0]["round"]
        with pytest.raises(RequestError) as e:
            await m.call(order("sell", sellers[1], 10_001, 100))  # 3000 of its 10 000 Wh are in its order
        assert e.value.code == "no_tokens"
        with pytest.raises(RequestError) as e:
            await m.call(order("buy", b3, 10**9, 10**10))
        assert e.value.code == "unfunded"
        await until(lambda: outbox(db, "market.cleared"), what="a call cleared")
        cleared = outbox(db, "market.cleared")
        rounds = {o["order_id"]: o["round"] for o in outbox(db, "market.order_placed") if o["order_id"] in ids}
        if len(set(rounds.values())) == 1 and len(outbox(db, "market.order_placed")) == 4:  # all four orders landed in one call
            assert len(cleared) == 1
            c = cleared[0]
            # buys 500 (2000 Wh), 200 (2500 Wh); sells 100 (3000 Wh), 300 (3000 Wh):
            # seller 1 fills buyer 1 and 1000 Wh of buyer 2 at a price in [200, 300]
            assert c["volume_wh"] == 3000 and 200 <= c["price_wei_per_kwh"] <= 300
            agreed = outbox(db, "trade.agreed")
            assert sorted((a["buyer"], a["wh"]) for a in agreed) == sorted([(B1, 2000), (B2, 1000)])
            assert {a["trade_id"] for a in agreed} == set(c["trade_ids"])
            assert all(a["price_wei_per_kwh"] == c["price_wei_per_kwh"] and a["offer_id"] == ids[0] for a in agreed)
            # each trade carries the sell order's signed offer and the buy order's signed bid
            assert all(a["offer"]["seller"] == sellers[0].address and a["bid"]["buyer"] == a["buyer"]
                       and a["bid"]["offer_id"] == typed.ZERO_ID and a["offer_signature"] and a["bid_signature"]
                       for a in agreed)
        else:  # the call boundary fell between the orders: each call still cleared once
            await until(lambda: len(outbox(db, "market.cleared")) == len(set(rounds.values())))
            assert sorted(c["round"] for c in outbox(db, "market.cleared")) == sorted(set(rounds.values()))


async def test_a_call_due_while_down_is_cleared_once_on_restart(grid: Grid, fake_chain: FakeChain) -> None:
    seller_account = account("seller-1")
    seller = seller_account.address
    fake_chain.set(seller, tokens_wh=10_000)
    s = settings(grid, fake_chain.endpoint, auction_market="double", auction_clear_interval_s=3600)
    db = s.data_dir / "auction.sqlite"
    async with Running(grid, s) as m:
        await m.call(order("sell", seller_account, 1000, 10))
        await m.call(order("buy", key_of(B1), 600, 30))
    assert outbox(db, "market.cleared") == []
    # the call's end passes while the service is down
    placed = outbox(db, "market.order_placed")
    assert placed[0]["round"] == placed[1]["round"]
    with sqlite3.connect(db) as c:  # move the orders to a call that ended long ago
        c.execute("UPDATE orders SET round = 5")
    c.close()
    for _ in range(2):
        async with Running(grid, s) as m:
            await until(lambda: outbox(db, "market.cleared"), what="the overdue call cleared on start")
            await m.call(cmd.Ping())
    cleared = outbox(db, "market.cleared")
    # 400 Wh of supply is left over at 10: the price is the seller's limit
    assert [(c["round"], c["volume_wh"], c["price_wei_per_kwh"]) for c in cleared] == [(5, 600, 10)]
    agreed = outbox(db, "trade.agreed")
    assert [(a["trade_id"], a["seller"], a["buyer"], a["wh"]) for a in agreed] == \
        [(cleared[0]["trade_ids"][0], seller, B1, 600)]


async def test_a_trade_the_chain_refuses_fails(grid: Grid, fake_chain: FakeChain, chain_events: Sources) -> None:
    async with Running(grid, settings(grid, fake_chain.endpoint)) as m:
        db = m.settings.data_dir / "auction.sqlite"
        fake_chain.set(B1, escrow_reserved_wei=2000)  # exactly one 2000 Wh trade at 1000 wei/kWh
        o = (await m.call(offer(wh=2000, duration=1.5))).offer_id
        await m.call(m.bid(o, B1, 1000))
        await until(lambda: outbox(db, "trade.agreed"))
        later = (await m.call(offer(wh=2000))).offer_id
        with pytest.raises(RequestError) as e:  # the agreed trade holds the escrow until recorded
            await m.call(m.bid(later, B1, 1000))
        assert e.value.code == "unfunded"
        await chain_events.publish(ev.ChainTx(tx_hash="", kind="open", ref=f"t-{o}", account=B1, status="failed",
                                        reason="insufficient escrow"))
        await until(lambda: outbox(db, "trade.status")[-1]["state"] == "failed", what="failed")
        assert outbox(db, "trade.status")[-1]["reason"] == "insufficient escrow"
        assert (await m.call(m.bid(later, B1, 1000))).bid_id  # a failed trade holds nothing


async def test_a_slow_chain_holds_up_only_the_bid_that_waits_for_it(grid: Grid, fake_chain: FakeChain) -> None:
    """The escrow check is asked before the bid's transaction: while the chain does not
    answer, other commands and the market clock go on."""
    fake_chain.set(B1, escrow_reserved_wei=10**6)
    async with Running(grid, settings(grid, fake_chain.endpoint)) as m:
        waiting = (await m.call(offer())).offer_id
        other = (await m.call(offer(wh=10))).offer_id
        ending = (await m.call(offer(wh=10, duration=0.3))).offer_id
        fake_chain.gate = asyncio.Event()  # the chain stops answering
        slow = asyncio.create_task(m.call(m.bid(waiting, B1, 1000), timeout=60))
        await until(lambda: fake_chain.asked >= 4, what="the bid asking the chain")
        assert await m.call(cmd.CancelOffer(offer_id=other, seller=SELLER)) == cmd.Ok()
        await until(lambda: any(o["offer_id"] == ending and o["outcome"] == "expired"
                                for o in outbox(m.settings.data_dir / "auction.sqlite", "market.offer_closed")),
                    what="the clock closing an offer meanwhile")
        assert not slow.done()
        fake_chain.gate.set()
        assert (await slow).bid_id
        offers = {o.offer_id: o for o in (await m.call(cmd.ListOffers(include_closed=True))).offers}
        assert (offers[waiting].highest_bidder, offers[other].state) == (B1, "cancelled")


async def test_each_step_names_its_cause(grid: Grid, fake_chain: FakeChain) -> None:
    """Commands cause what they publish; the clock's close of an offer is caused by the
    winning bid (or the opening when nobody bid), though it runs long after that command."""
    s = settings(grid, fake_chain.endpoint, auction_min_increment_wei_per_kwh=10)
    db = s.data_dir / "auction.sqlite"
    async with Running(grid, s) as m:
        sold = await m.call(offer(duration=3.0), cmd_id="cmd-offer")  # three calls within it
        unsold = await m.call(offer(wh=1000, duration=1.0), cmd_id="cmd-offer-2")
        await m.call(m.bid(sold.offer_id, B1, 1000), cmd_id="cmd-bid-1")
        await m.call(m.bid(sold.offer_id, B2, 1010), cmd_id="cmd-bid-2")
        await until(lambda: len(envelopes(db, "market.offer_closed")) == 2, what="both offers closed")
    opened = {e["body"]["offer_id"]: e for e in envelopes(db, "market.offer_opened")}
    bids = {e["body"]["buyer"]: e for e in envelopes(db, "market.bid_placed")}
    assert opened[sold.offer_id]["cause"] == "cmd-offer" and opened[unsold.offer_id]["cause"] == "cmd-offer-2"
    assert bids[B1]["cause"] == "cmd-bid-1" and bids[B2]["cause"] == "cmd-bid-2"
    closed = {e["body"]["offer_id"]: e for e in envelopes(db, "market.offer_closed")}
    assert closed[sold.offer_id]["cause"] == bids[B2]["id"]
    assert closed[unsold.offer_id]["cause"] == opened[unsold.offer_id]["id"]
    [agreed] = envelopes(db, "trade.agreed")
    assert agreed["cause"] == bids[B2]["id"] and agreed["v"] == 2
    assert all(e["cause"] is None for e in envelopes(db, "trade.heartbeat"))  # a timer's own beat


async def test_a_market_maker_quotes_a_spread_in_one_call_but_never_crosses_itself(
        grid: Grid, fake_chain: FakeChain) -> None:
    """The utility buys at the feed-in and sells at the retail tariff in the same call: its
    buy below its own sell can never trade with it, so both are taken; an order that would
    meet its own other side is refused and changes nothing."""
    maker = account("utility")
    fake_chain.set(maker.address, tokens_wh=10_000, escrow_reserved_wei=10**16)
    s = settings(grid, fake_chain.endpoint, auction_market="double", auction_clear_interval_s=86400.0)
    exp = later_s(2 * 86400)  # valid past the call's end (a day's call: the whole test is in one)
    async with Running(grid, s) as m:
        sell = await m.call(order("sell", maker, 2000, 300, site="solar-1", expiry=exp))
        buy = await m.call(order("buy", maker, 2000, 100, site="solar-1", expiry=exp))  # under its own sell
        for side, price in (("buy", 300), ("buy", 301), ("sell", 100), ("sell", 99)):
            with pytest.raises(RequestError) as e:
                await m.call(order(side, maker, 100, price, site="solar-1", expiry=exp))
            assert e.value.code == "own_offer" and "trade with itself" in e.value.message
        book = await m.call(cmd.ListOrders(calls=0))
        assert sorted((o.order_id, o.side, o.limit_price_wei_per_kwh) for o in book.orders) == sorted(
            [(sell.order_id, "sell", 300), (buy.order_id, "buy", 100)])
