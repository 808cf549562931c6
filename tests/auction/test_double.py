"""Property tests of the double auction (uniform price, pay-as-clear)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from services.auction import double
from services.auction.double import Order


@st.composite
def books(draw, max_orders=40):
    n = draw(st.integers(min_value=0, max_value=max_orders))
    orders = []
    for k in range(n):
        side = draw(st.sampled_from(["buy", "sell"]))
        orders.append(Order(order_id=f"o-{k:04d}", side=side, account=f"acct{k % 5}", site="s",
                            wh=draw(st.integers(min_value=1, max_value=5000)),
                            limit_price_wei_per_kwh=draw(st.integers(min_value=1, max_value=60))))
    return orders


def demand(orders, p):
    return sum(o.wh for o in orders if o.side == "buy" and o.limit_price_wei_per_kwh >= p)


def supply(orders, p):
    return sum(o.wh for o in orders if o.side == "sell" and o.limit_price_wei_per_kwh <= p)


def best_quantity(orders):
    """The largest quantity one price can clear, by trying every limit price."""
    prices = {o.limit_price_wei_per_kwh for o in orders}
    return max((min(demand(orders, p), supply(orders, p)) for p in prices), default=0)


@settings(max_examples=300, deadline=None)
@given(books())
def test_nobody_trades_worse_than_their_limit(orders):
    res = double.clear(orders)
    by_id = {o.order_id: o for o in orders}
    for f in res.fills:
        assert f.wh > 0
        assert by_id[f.buy_id].side == "buy" and by_id[f.sell_id].side == "sell"
        assert by_id[f.sell_id].limit_price_wei_per_kwh <= res.price_wei_per_kwh <= by_id[f.buy_id].limit_price_wei_per_kwh
    filled = res.filled()
    for oid, wh in filled.items():
        assert wh <= by_id[oid].wh
    assert res.volume_wh == sum(f.wh for f in res.fills)
    if not res.fills:
        assert res.price_wei_per_kwh is None and res.volume_wh == 0


@settings(max_examples=300, deadline=None)
@given(books())
def test_clears_the_largest_feasible_quantity_at_one_price(orders):
    res = double.clear(orders)
    assert res.volume_wh == best_quantity(orders)
    if res.fills:
        p = res.price_wei_per_kwh
        assert min(demand(orders, p), supply(orders, p)) >= res.volume_wh
        # Nobody left out would trade at that price: an unfilled buyer's limit is at most
        # the price, an unfilled seller's at least.
        filled = res.filled()
        for o in orders:
            if filled.get(o.order_id, 0) < o.wh:
                if o.side == "buy":
                    assert o.limit_price_wei_per_kwh <= p
                else:
                    assert o.limit_price_wei_per_kwh >= p


@settings(max_examples=200, deadline=None)
@given(books(), st.randoms(use_true_random=False))
def test_result_does_not_depend_on_arrival_order(orders, rnd):
    shuffled = list(orders)
    rnd.shuffle(shuffled)
    assert double.clear(shuffled) == double.clear(orders)


def test_ties_go_to_the_lower_order_id():
    orders = [
        Order("o-2", "buy", "b2", "s", 1000, 50),
        Order("o-1", "buy", "b1", "s", 1000, 50),
        Order("o-3", "sell", "s1", "s", 1500, 10),
    ]
    res = double.clear(orders)
    assert res.filled() == {"o-1": 1000, "o-2": 500, "o-3": 1500}
    # excess demand at 50: the price is the buyers' limit
    assert res.price_wei_per_kwh == 50


def test_trade_ids_are_unique_per_round():
    orders = [Order(f"b{k}", "buy", "b", "s", 100 + k, 50 + k) for k in range(5)]
    orders += [Order(f"s{k}", "sell", "s", "s", 90 + k, 10 + k) for k in range(5)]
    res = double.clear(orders)
    ids = [double.trade_id_for(3, f) for f in res.fills]
    assert len(ids) == len(set(ids)) > 1
