"""The double auction's order book (ListOrders): the store's listing helpers on a real
SQLite store, and the request answered by the running auction service."""

from __future__ import annotations

import asyncio
import sqlite3
import time

from services.auction import book, double
from services.bus import commands as cmd

from tests.support.auction import BUYERS, FakeChain, Running, key_of, order, settings
from tests.support.bus import Grid
from tests.support.poll import until
from tests.support.signing import account


def _order(order_id: str, side: str, wh: int, price: int, account_: str = "0x" + "1" * 40) -> double.Order:
    return double.Order(order_id=order_id, side=side, account=account_, site="s", wh=wh,  # type: ignore[arg-type]
                        limit_price_wei_per_kwh=price)


def _store() -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:")
    book.create(conn)
    return conn


def test_the_book_lists_asks_up_and_bids_down_with_fills_once_cleared() -> None:
    conn = _store()
    orders = [_order("d-3", "sell", 1000, 300), _order("d-1", "buy", 500, 200), _order("d-2", "sell", 800, 100),
              _order("d-4", "buy", 700, 500), _order("d-5", "buy", 100, 500), _order("d-0", "sell", 50, 100)]
    for i, o in enumerate(orders):
        book.insert_order(conn, o, 7, 1000.0 + i)
    book.insert_order(conn, _order("d-9", "buy", 1, 1), 8, 1100.0)  # another call: not in round 7's book
    listed = book.book_of_round(conn, 7)
    assert [o["order_id"] for o in listed] == ["d-0", "d-2", "d-3", "d-4", "d-5", "d-1"]
    assert all(o["state"] == "open" and o["filled_wh"] is None for o in listed)
    assert listed[0]["placed_at"] == 1005.0 and listed[0]["limit_price_wei_per_kwh"] == 100

    result = double.clear(book.orders_of_round(conn, 7))
    book.finish_round(conn, 7, result, 1200.0)
    after = {o["order_id"]: o for o in book.book_of_round(conn, 7)}
    filled = result.filled()
    assert {k: v["filled_wh"] for k, v in after.items()} == {o.order_id: filled.get(o.order_id, 0) for o in orders}
    assert after["d-4"]["state"] == "filled" and after["d-1"]["state"] == "partial" \
        and after["d-3"]["state"] == "expired"
    assert book.cleared_calls(conn) == [{"round": 7, "cleared_at": 1200.0,
                                         "price_wei_per_kwh": result.price_wei_per_kwh, "volume_wh": 850}]


def test_the_current_call_skips_cleared_calls_and_the_chart_keeps_the_latest() -> None:
    conn = _store()
    assert book.current_call(conn, 95.0, 10.0) == 9
    assert book.clears_at(9, 10.0) == 100.0
    nothing = double.Clearing(price_wei_per_kwh=None, volume_wh=0, fills=())
    for r in range(9, 70):
        book.finish_round(conn, r, nothing if r % 2 else double.Clearing(r, r * 10, ()), r * 10.0)
    assert book.current_call(conn, 95.0, 10.0) == 70  # the clock cleared 9..69 already
    calls = book.cleared_calls(conn, 50)
    assert [c["round"] for c in calls] == list(range(20, 70))  # the latest 50, oldest first
    assert calls[0] == {"round": 20, "cleared_at": 200.0, "price_wei_per_kwh": 20, "volume_wh": 200}
    assert calls[1]["price_wei_per_kwh"] is None and calls[1]["volume_wh"] == 0
    assert book.cleared_calls(conn, 0) == []


async def _just_after_a_call_starts(interval: float) -> None:
    """Orders placed now all land in one call (the boundary is a whole interval away)."""
    left = interval - time.time() % interval
    if left < interval * 0.7:
        await asyncio.sleep(left + 0.05)


async def test_list_orders_shows_the_current_call_then_its_clearing(grid: Grid, fake_chain: FakeChain) -> None:
    seller = account("seller-1")
    fake_chain.set(seller.address, tokens_wh=10_000)
    b1 = key_of(BUYERS[0])
    interval = 3.0
    async with Running(grid, settings(grid, fake_chain.endpoint, auction_market="both",
                                      auction_clear_interval_s=interval)) as m:
        empty = await m.call(cmd.ListOrders())
        assert isinstance(empty, cmd.OrderBook)
        assert (empty.market, empty.orders, empty.interval_s) == ("both", [], interval)
        assert empty.clears_at == (empty.round + 1) * interval and empty.clears_at - interval <= empty.now

        await _just_after_a_call_starts(interval)
        sell = await m.call(order("sell", seller, 1000, 100))
        buy = await m.call(order("buy", b1, 600, 300))
        bk = await m.call(cmd.ListOrders(), site="solar-1")  # public: any site may read it
        assert [(o.order_id, o.side, o.account, o.site, o.wh, o.limit_price_wei_per_kwh, o.filled_wh)
                for o in bk.orders] == [(sell.order_id, "sell", seller.address, "solar-1", 1000, 100, None),
                                        (buy.order_id, "buy", b1.address, "home-7", 600, 300, None)]
        assert all(bk.clears_at - interval <= o.placed_at <= bk.now for o in bk.orders)
        round_ = bk.round

        async def cleared() -> cmd.OrderBook | None:
            b = await m.call(cmd.ListOrders())
            return b if b.calls and b.calls[-1].round == round_ else None

        await until(lambda: m.service.cleared_rounds >= 1, timeout=3 * interval, what="the call cleared")
        after = await cleared()
        assert after is not None, "the cleared call is listed"
        assert after.round > round_ and all(o.order_id not in (sell.order_id, buy.order_id) for o in after.orders)
        last = after.calls[-1]
        # 400 Wh of supply is left over at 100: the price is the seller's limit
        assert (last.price_wei_per_kwh, last.volume_wh) == (100, 600) and last.cleared_at >= bk.clears_at
        assert {o.order_id: (o.state, o.filled_wh) for o in after.last_orders} == \
            {sell.order_id: ("partial", 600), buy.order_id: ("filled", 600)}
        assert (await m.call(cmd.ListOrders(calls=0))).calls == []
