"""The double auction, as pure rules (no I/O): a periodic uniform-price call market.

Sellers and buyers send limit orders (Wh, price per kWh) for the next call. At each
call the book is cleared once, pay-as-clear:

1. buys sorted best first (highest limit, then order id), sells best first (lowest
   limit, then order id) — ties are broken by the order id, never by arrival;
2. walk both lists, matching the best remaining buy with the best remaining sell while
   the buy's limit reaches the sell's, each match filling ``min`` of what both have
   left (partial fills). This trades the largest quantity any single price can clear:
   the greedy walk stops exactly where the demand and supply curves cross;
3. one price for every fill, inside the band no participant objects to: at least the
   last matched sell's limit and any unmatched buy's limit, at most the last matched
   buy's limit and any unmatched sell's limit; the midpoint (rounded down) of the band.

Sorting is O(n log n); the walk and the fills are O(n).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Literal

Side = Literal["sell", "buy"]


@dataclasses.dataclass(frozen=True, slots=True)
class Order:
    order_id: str
    side: Side
    account: str
    site: str
    wh: int
    limit_price_wei_per_kwh: int


@dataclasses.dataclass(frozen=True, slots=True)
class Fill:
    buy_id: str
    sell_id: str
    wh: int


@dataclasses.dataclass(frozen=True, slots=True)
class Clearing:
    price_wei_per_kwh: int | None
    """The one price every fill pays; None when nothing crossed."""
    volume_wh: int
    fills: tuple[Fill, ...]

    def filled(self) -> dict[str, int]:
        """Wh filled per order id (both sides)."""
        out: dict[str, int] = {}
        for f in self.fills:
            out[f.buy_id] = out.get(f.buy_id, 0) + f.wh
            out[f.sell_id] = out.get(f.sell_id, 0) + f.wh
        return out


def _buy_key(o: Order) -> tuple[int, str]:
    return (-o.limit_price_wei_per_kwh, o.order_id)


def _sell_key(o: Order) -> tuple[int, str]:
    return (o.limit_price_wei_per_kwh, o.order_id)


def clear(orders: Iterable[Order]) -> Clearing:
    """Clear one call of the market. Order ids must be unique; amounts positive."""
    buys: list[Order] = []
    sells: list[Order] = []
    for o in orders:
        (buys if o.side == "buy" else sells).append(o)
    buys.sort(key=_buy_key)
    sells.sort(key=_sell_key)

    fills: list[Fill] = []
    i = j = 0
    buy_left = buys[0].wh if buys else 0
    sell_left = sells[0].wh if sells else 0
    last_buy = last_sell = None
    while i < len(buys) and j < len(sells):
        b, s = buys[i], sells[j]
        if b.limit_price_wei_per_kwh < s.limit_price_wei_per_kwh:
            break
        q = buy_left if buy_left < sell_left else sell_left
        fills.append(Fill(buy_id=b.order_id, sell_id=s.order_id, wh=q))
        last_buy, last_sell = b, s
        buy_left -= q
        sell_left -= q
        if buy_left == 0:
            i += 1
            if i < len(buys):
                buy_left = buys[i].wh
        if sell_left == 0:
            j += 1
            if j < len(sells):
                sell_left = sells[j].wh

    if last_buy is None or last_sell is None:
        return Clearing(price_wei_per_kwh=None, volume_wh=0, fills=())
    lo = last_sell.limit_price_wei_per_kwh
    hi = last_buy.limit_price_wei_per_kwh
    # The next unmatched orders (possibly the unfilled rest of the last matched one)
    # narrow the band: an excluded buyer must not be willing to pay more than the price,
    # an excluded seller must not accept less.
    if i < len(buys):
        lo = max(lo, buys[i].limit_price_wei_per_kwh)
    if j < len(sells):
        hi = min(hi, sells[j].limit_price_wei_per_kwh)
    price = (lo + hi) // 2
    return Clearing(price_wei_per_kwh=price, volume_wh=sum(f.wh for f in fills), fills=tuple(fills))


def trade_id_for(round_: int, fill: Fill) -> str:
    """Deterministic: a (buy, sell) pair is matched at most once (one of them is used up
    by the fill)."""
    return f"t-r{round_}-{fill.sell_id}-{fill.buy_id}"
