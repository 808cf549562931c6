"""A site acts only for itself at the auction: a hostile site with its own valid key
('probe') cannot offer, bid, order, cancel or close for another site's accounts, offers
and trades. Real hub, real sockets, the stand-in chain telling whose each account is."""

from __future__ import annotations

import pytest

from services.bus import RequestError
from services.bus import commands as cmd

from tests.support.signing import account

from tests.support.auction import (BUYERS, OPERATOR, SELLER, FakeChain, Running, key_of, offer, order, outbox, settings,
                                   snapshot)
from tests.support.bus import Grid
from tests.support.poll import until

B1, B2, _ = BUYERS
PROBE = account("probe").address  # probe's own account


async def refused(m: Running, req: cmd.Request, site: str) -> str:
    with pytest.raises(RequestError) as e:
        await m.call(req, site=site)
    assert e.value.message
    return e.value.code


async def test_a_site_cannot_act_for_another_sites_accounts_offers_or_trades(grid: Grid, fake_chain: FakeChain) -> None:
    fake_chain.set(PROBE, escrow_reserved_wei=10**15, tokens_wh=10_000, site="probe")
    async with Running(grid, settings(grid, fake_chain.endpoint, auction_market="both",
                                      auction_clear_interval_s=3600)) as m:
        db = m.settings.data_dir / "auction.sqlite"
        live = (await m.call(offer())).offer_id  # solar-1's offer
        ending = (await m.call(offer(wh=1000, duration=1.5))).offer_id
        await m.call(m.bid(ending, B1, 1000))  # home-7's bid wins: a trade of home-7's
        await until(lambda: outbox(db, "trade.agreed"), what="trade agreed")
        trade_id = f"t-{ending}"
        before, asked = snapshot(m), fake_chain.asked

        attacks: list[tuple[cmd.Request, str]] = [
            # naming the other site: refused before the chain is even asked
            (offer(), "not_your_account"),
            (m.bid(live, B1, 5000), "not_your_account"),
            (order("buy", key_of(B1), 10, 10),
             "not_your_account"),
            (order("sell", key_of(SELLER), 10, 10),
             "not_your_account"),
            # the other site's offer and trade
            (cmd.CancelOffer(offer_id=live, seller=SELLER), "not_allowed"),
            (cmd.CloseTrade(trade_id=trade_id, by=B1), "not_allowed"),
            (cmd.CloseTrade(trade_id=trade_id, by=OPERATOR), "not_allowed"),
        ]
        for req, code in attacks:
            assert await refused(m, req, "probe") == code, req
        assert fake_chain.asked == asked
        # naming itself but another site's account: the chain says whose it is
        # (even with the account's own signature, replayed: the signature is not who may use it)
        for req in (offer(wh=10, price=1, site="probe"), m.bid(live, B2, 5000, site="probe"),
                    order("buy", key_of(B2), 10, 10, site="probe")):
            assert await refused(m, req, "probe") == "not_your_account", req
        # an account the chain service does not hold
        stranger = account("stranger").address
        assert await refused(m, m.bid(live, stranger, 5000, site="probe"), "probe") == "unknown_account"
        # the buyer's own site cannot close as the operator either
        assert await refused(m, cmd.CloseTrade(trade_id=trade_id, by=OPERATOR), "home-7") == "not_allowed"
        assert snapshot(m) == before  # nothing changed, nothing published

        # probe acts for its own account; the rightful sites still act for theirs
        assert (await m.call(m.bid(live, PROBE, 1500, site="probe"), site="probe")).bid_id
        assert (await m.call(m.bid(live, B1, 2000))).bid_id
        assert await m.call(cmd.CloseTrade(trade_id=trade_id, by=B1)) == cmd.Ok()
        assert [s["state"] for s in outbox(db, "trade.status") if s["trade_id"] == trade_id][-1] == "closed"


async def test_the_market_site_may_close_a_trade_as_the_operator(grid: Grid, fake_chain: FakeChain) -> None:
    async with Running(grid, settings(grid, fake_chain.endpoint)) as m:
        db = m.settings.data_dir / "auction.sqlite"
        tid = await m.agreed()
        assert await m.call(cmd.CloseTrade(trade_id=tid, by=OPERATOR), site="market") == cmd.Ok()
        closed = [s for s in outbox(db, "trade.status") if s["state"] == "closed"]
        assert [c["reason"] for c in closed] == ["closed by the operator"]
