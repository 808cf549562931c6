"""The agent's view of its site and market, from the services' replies (pure)."""

from __future__ import annotations

from services.agent import views
from services.agent.strategy import PlaceBid, PlaceOffer, PlaceOrder
from services.bus import commands as cmd

ME, OTHER = "0x" + "ab" * 20, "0x" + "cd" * 20


def offer(oid: str, seller: str, wh: int, bidder: str | None = None, state: str = "open") -> cmd.OfferView:
    return cmd.OfferView(offer_id=oid, seller=seller, seller_site="s", wh=wh, start_price_wei_per_kwh=5,
                         opened_at=0, ends_at=10, state=state, highest_bid_wei_per_kwh=6 if bidder else None,
                         highest_bidder=bidder, signed_offer_id="0x" + "11" * 32)


def trade(tid: str, seller: str, buyer: str, wh: int, delivered: int, state: str) -> cmd.TradeView:
    return cmd.TradeView(trade_id=tid, offer_id="o", seller=seller, buyer=buyer, seller_site="a", buyer_site="b",
                         wh=wh, price_wei_per_kwh=7, state=state, delivered_wh=delivered)


def test_committed_energy_counts_open_offers_leading_bids_and_what_live_trades_still_owe() -> None:
    offers = [offer("o1", ME.upper().replace("0X", "0x"), 300), offer("o2", OTHER, 200, bidder=ME),
              offer("o3", OTHER, 900, bidder=OTHER), offer("o4", ME, 50, state="sold")]
    trades = [trade("t1", ME, OTHER, 1000, 400, "delivering"), trade("t2", OTHER, ME, 500, 100, "agreed"),
              trade("t3", ME, OTHER, 700, 700, "closed")]
    bal = cmd.Balances(address=ME, ether_wei=0, tokens_wh=1000)
    v = views.site_view(ME, bal, offers, trades, soc=0.5, battery_wh=1000.0, forecast_net_wh=-10.0)
    assert (v.selling_wh, v.buying_wh, v.tokens_free_wh) == (300 + 600, 200 + 400, 1000 - 300)
    assert views.site_view(ME, bal, offers, trades, soc=None, battery_wh=1000.0, forecast_net_wh=0).battery_wh == 0


def test_a_site_sells_only_through_a_producer_meter_and_buys_only_through_a_consumer_meter() -> None:
    acts = [PlaceOffer(wh=100, start_price_wei_per_kwh=1), PlaceBid(offer_id="o", price_wei_per_kwh=1),
            PlaceOrder(side="sell", wh=100, limit_price_wei_per_kwh=1),
            PlaceOrder(side="buy", wh=100, limit_price_wei_per_kwh=1)]
    assert views.doable(acts, {"producer"}) == [acts[0], acts[2]]
    assert views.doable(acts, {"consumer"}) == [acts[1], acts[3]]
    assert views.doable(acts, {"producer", "consumer"}) == acts
    assert views.doable(acts, set()) == []
