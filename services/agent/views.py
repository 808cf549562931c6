"""What the agent decides from, built from the services' replies: pure (no I/O).

The auction's listings and the wallet's balances become the strategy's
:class:`~services.agent.strategy.SiteView` and :class:`~services.agent.strategy.MarketView`.
"""

from __future__ import annotations

from collections.abc import Sequence

from services.bus import commands as cmd
from services.bus.states import OPEN

from .strategy import Action, MarketView, OfferSeen, PlaceOffer, PlaceOrder, SiteView

def _is(a: str | None, b: str) -> bool:
    return (a or "").lower() == b.lower()


def market_view(me: str, offers: list[cmd.OfferView], trades: list[cmd.TradeView], *, now: float,
                min_increment: int) -> MarketView:
    """The open english offers, and the last trade's price as the last clearing price."""
    seen = tuple(OfferSeen(offer_id=o.offer_id, seller=o.seller, wh=o.wh,
                           start_price_wei_per_kwh=o.start_price_wei_per_kwh,
                           highest_bid_wei_per_kwh=o.highest_bid_wei_per_kwh, highest_bidder=o.highest_bidder,
                           opened_at=o.opened_at, ends_at=o.ends_at)
                 for o in offers if o.market == "english" and o.state == "open" and o.signed_offer_id)
    last = trades[-1].price_wei_per_kwh if trades else None
    return MarketView(now=now, offers=seen, last_clearing_wei_per_kwh=last, min_increment_wei_per_kwh=min_increment)


def site_view(me: str, bal: cmd.Balances, offers: list[cmd.OfferView], trades: list[cmd.TradeView], *,
              soc: float | None, battery_wh: float, forecast_net_wh: float,
              orders: Sequence[cmd.BookOrder] = ()) -> SiteView:
    """The account's energy already committed: Wh in its open offers and sell orders and
    the undelivered rest of its trades as seller (selling); Wh under its leading bids, its
    open buy orders and the undelivered rest of its trades as buyer (buying). Its free
    tokens: balance minus open offers and sell orders. ``orders``: the double auction's
    book of the current call (``ListOrders``); a sell order the offers list already holds
    is counted once."""
    mine_open = [o for o in offers if o.state == "open" and _is(o.seller, me)]
    leading = [o for o in offers if o.state == "open" and _is(o.highest_bidder, me)]
    live = [t for t in trades if t.state in OPEN]
    listed = {o.offer_id for o in mine_open}
    my_orders = [o for o in orders if o.state == "open" and _is(o.account, me) and o.order_id not in listed]
    sell_orders = sum(o.wh for o in my_orders if o.side == "sell")
    buy_orders = sum(o.wh for o in my_orders if o.side == "buy")
    selling = sum(o.wh for o in mine_open) + sell_orders + sum(t.wh - t.delivered_wh for t in live if _is(t.seller, me))
    buying = sum(o.wh for o in leading) + buy_orders + sum(t.wh - t.delivered_wh for t in live if _is(t.buyer, me))
    return SiteView(soc=soc, battery_wh=battery_wh if soc is not None else 0.0, forecast_net_wh=forecast_net_wh,
                    tokens_free_wh=max(0, bal.tokens_wh - sum(o.wh for o in mine_open) - sell_orders),
                    selling_wh=max(0, selling), buying_wh=max(0, buying))


def doable(actions: list[Action], roles: set[str]) -> list[Action]:
    """What the site's meters let it do: energy sold leaves through a producer meter (it
    counts the export), energy bought arrives through a consumer meter (it signs the
    delivery the seller is paid for). A site with only one of them trades only that way."""
    def ok(a: Action) -> bool:
        sells = isinstance(a, PlaceOffer) or (isinstance(a, PlaceOrder) and a.side == "sell")
        return ("producer" if sells else "consumer") in roles
    return [a for a in actions if ok(a)]
