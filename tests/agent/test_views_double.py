"""The agent's view of its site in the double auction: its open orders of the current call
count as committed, so it sends one order per call (pure)."""

from __future__ import annotations

from services.agent import strategy, views
from services.bus import commands as cmd

ME = "0x" + "a" * 40
OTHER = "0x" + "b" * 40
TARIFFS = strategy.Tariffs(retail_wei_per_kwh=300, feed_in_wei_per_kwh=100)
LIMITS = cmd.AgentLimits(reserve_soc=0.2, max_trade_wh=2000)


def _order(order_id: str, side: str, wh: int, account: str = ME, state: str = "open") -> cmd.BookOrder:
    return cmd.BookOrder(order_id=order_id, side=side, account=account, site="s", wh=wh,  # type: ignore[arg-type]
                         limit_price_wei_per_kwh=200, placed_at=1.0, state=state,  # type: ignore[arg-type]
                         filled_wh=None if state == "open" else 0)


def _sell_listed(order_id: str, wh: int) -> cmd.OfferView:
    """A sell order as the auction's offers listing shows it too."""
    return cmd.OfferView(offer_id=order_id, market="double", seller=ME, seller_site="s", wh=wh,
                         start_price_wei_per_kwh=200, opened_at=1.0, ends_at=15.0, state="open")


def _view(orders: list[cmd.BookOrder], offers: list[cmd.OfferView] = (), net: float = 0.0,  # type: ignore[assignment]
          tokens: int = 5000) -> strategy.SiteView:
    bal = cmd.Balances(address=ME, ether_wei=0, tokens_wh=tokens)
    return views.site_view(ME, bal, list(offers), [], soc=None, battery_wh=0, forecast_net_wh=net, orders=orders)


def test_open_orders_of_the_call_count_once_and_others_not() -> None:
    book = [_order("d-1", "buy", 700), _order("d-2", "buy", 300, account=OTHER), _order("d-3", "sell", 400),
            _order("d-4", "buy", 900, state="expired")]
    v = _view(book)
    assert (v.buying_wh, v.selling_wh, v.tokens_free_wh) == (700, 400, 4600)
    # the sell order the offers listing holds already is counted once
    v = _view(book, offers=[_sell_listed("d-3", 400)])
    assert (v.buying_wh, v.selling_wh, v.tokens_free_wh) == (700, 400, 4600)
    assert _view([]).buying_wh == 0


def test_one_buy_order_per_call_not_one_per_decision() -> None:
    market = strategy.MarketView(now=5.0, offers=(), last_clearing_wei_per_kwh=None, min_increment_wei_per_kwh=1)
    first = strategy.decide_double(ME, LIMITS, TARIFFS, _view([], net=-1500), market, slot=(0.0, 15.0))
    assert [(a.side, a.wh) for a in first] == [("buy", 1500)]  # type: ignore[union-attr]
    placed = _order("d-9", "buy", 1500)
    assert strategy.decide_double(ME, LIMITS, TARIFFS, _view([placed], net=-1500), market, slot=(0.0, 15.0)) == []
    # the next call: the order is gone from the book (filled into a trade, or expired) and the agent decides anew
    again = strategy.decide_double(ME, LIMITS, TARIFFS, _view([], net=-1500), market, slot=(15.0, 30.0))
    assert len(again) == 1
