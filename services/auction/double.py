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
from operator import attrgetter
from typing import Literal, NamedTuple

from services.bus import typed

Side = Literal["sell", "buy"]


@dataclasses.dataclass(frozen=True, slots=True)
class Order:
    order_id: str
    side: Side
    account: str
    site: str
    wh: int
    limit_price_wei_per_kwh: int
    signed: typed.Offer | typed.Bid | None = None
    """A sell order's signed offer, a buy order's signed bid (for the trades it fills)."""
    signature: str = ""


class Fill(NamedTuple):
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


_by_id = attrgetter("order_id")
_by_price = attrgetter("limit_price_wei_per_kwh")


def clear(orders: Iterable[Order]) -> Clearing:
    """Clear one call of the market. Order ids must be unique; amounts positive."""
    # Best first, ties by lowest order id: sort everything by id once, then each side by
    # price with a stable sort (descending for buys: ``reverse`` keeps stability, so ids
    # stay ascending among equal prices).
    ordered = sorted(orders, key=_by_id)
    buys = [o for o in ordered if o.side == "buy"]
    sells = [o for o in ordered if o.side != "buy"]
    buys.sort(key=_by_price, reverse=True)
    sells.sort(key=_by_price)

    nb, ns = len(buys), len(sells)
    if not nb or not ns:
        return Clearing(price_wei_per_kwh=None, volume_wh=0, fills=())
    bp = [o.limit_price_wei_per_kwh for o in buys]
    sp = [o.limit_price_wei_per_kwh for o in sells]
    fills: list[Fill] = []
    append, make = fills.append, Fill._make
    i = j = 0
    buy_left, sell_left = buys[0].wh, sells[0].wh
    volume = 0
    while bp[i] >= sp[j]:
        q = buy_left if buy_left < sell_left else sell_left
        append(make((buys[i].order_id, sells[j].order_id, q)))
        volume += q
        buy_left -= q
        sell_left -= q
        if not buy_left:
            i += 1
            if i == nb:
                break
            buy_left = buys[i].wh
        if not sell_left:
            j += 1
            if j == ns:
                break
            sell_left = sells[j].wh

    if not fills:
        return Clearing(price_wei_per_kwh=None, volume_wh=0, fills=())
    last = fills[-1]
    # the last fill's orders are the marginal ones; the next unmatched orders (possibly
    # the unfilled rest of a marginal one) narrow the band: an excluded buyer must not be
    # willing to pay more than the price, an excluded seller must not accept less.
    lo = sp[j] if j < ns and sells[j].order_id == last.sell_id else sp[j - 1]
    hi = bp[i] if i < nb and buys[i].order_id == last.buy_id else bp[i - 1]
    if i < nb:
        lo = max(lo, bp[i])
    if j < ns:
        hi = min(hi, sp[j])
    price = (lo + hi) // 2
    return Clearing(price_wei_per_kwh=price, volume_wh=volume, fills=tuple(fills))


def trade_id_for(round_: int, fill: Fill) -> str:
    """Deterministic: a (buy, sell) pair is matched at most once (one of them is used up
    by the fill)."""
    return f"t-r{round_}-{fill.sell_id}-{fill.buy_id}"
