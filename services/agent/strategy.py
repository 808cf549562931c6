"""How a site agent trades, as pure rules (no I/O, no clock reads, no randomness).

A site agent trades its site's energy within the limits its owner set. Every decision is
taken from a snapshot of the site and of the market; the agent's service carries it out.

What it sells. The site's energy position over the coming horizon (one hour by default)
is its forecast production minus consumption, plus the battery's energy above the reserve
the owner keeps for the site (20 % of the capacity by default), minus what it takes to
bring a battery below that reserve back up to it. When the position is a surplus the
agent offers it, but never more than the battery holds above the reserve now (a trade
delivers at once, from the battery), as far as the account's free energy tokens cover it and less what is
already on offer or sold: one offer at a time, at least 100 Wh, at most the owner's
largest trade (2 kWh by default). Selling never plans the battery below the reserve.
The offer starts at the owner's least selling price (the feed-in tariff by default): the
english auction lets the buyers bid it up, and the utility stands behind every offer that
starts at or below the feed-in tariff (see ``decide_utility``).

What it buys. When the position is a deficit the agent bids on other sites' offers of at
most the energy still missing (and at most the largest trade), cheapest first. It never
bids on its own offer, nor on an offer it already leads. A bid is always the least the
auction accepts (the start price, or the highest bid plus the minimum increment), and
only if that is within what the agent is willing to pay at that moment.

The price ramp. What the agent is willing to pay for an offer rises with the offer's
auction: when the auction opens it is the last clearing price (the feed-in tariff when
nothing has traded yet), and it rises in a straight line to the owner's most paid price,
reached three quarters into the auction (so that a bid at that price still lands before
the auction closes). So the agent pays a little over the going price when it can, and
up to its limit only when the auction is about to close.

The tariffs as bounds. Energy bought from the grid costs the retail tariff and energy fed
to the grid earns the feed-in tariff, so trading outside them gains nothing: the agent
never pays more than the retail tariff and never sells for less than the feed-in tariff,
even when the owner's limits allow it. Owner limits stricter than the tariffs are kept.
The ramp itself moves between the feed-in tariff and the most paid price (a clearing price
outside the tariffs is taken at the nearest tariff).

In the double auction (a call market) the agent sends one order per call: a sell order of
its surplus at its least selling price, or a buy order of its deficit at what the ramp
gives at that moment of the call's interval; orders of less than 100 Wh are not sent.

An agent its owner turned off does nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from services.bus import commands as cmd

if TYPE_CHECKING:
    from services.bus.config import BusSettings

__all__ = [
    "MIN_LOT_WH", "Action", "Limits", "MarketView", "OfferSeen", "PlaceBid", "PlaceOffer", "PlaceOrder",
    "SiteView", "Tariffs", "call_slot", "decide_double", "decide_english", "decide_utility",
    "decide_utility_double", "deficit_wh",
    "effective", "surplus_wh", "willing_to_pay",
]

#: The least energy the agent offers or orders at once (Wh).
MIN_LOT_WH = 100
#: The share of an auction after which the ramp is at the owner's cap (the rest is time for
#: a bid at the cap to be signed and placed before the auction closes).
RAMP_SHARE = 0.75


Limits = cmd.AgentLimits
"""The owner's limits: declared once, with the request that carries them to the agent."""


@dataclass(frozen=True, slots=True)
class Tariffs:
    """The micro-grid's tariffs (wei per kWh): the grid sells at retail, buys at feed-in."""

    retail_wei_per_kwh: int
    feed_in_wei_per_kwh: int

    def __post_init__(self) -> None:
        if not 0 < self.feed_in_wei_per_kwh <= self.retail_wei_per_kwh:
            raise ValueError(f"tariffs need 0 < feed-in ({self.feed_in_wei_per_kwh}) <= retail "
                             f"({self.retail_wei_per_kwh}) wei/kWh")

    @classmethod
    def of(cls, settings: BusSettings) -> Tariffs:
        return cls(retail_wei_per_kwh=settings.tariff_retail_wei_per_kwh,
                   feed_in_wei_per_kwh=settings.tariff_feed_in_wei_per_kwh)


@dataclass(frozen=True, slots=True)
class SiteView:
    soc: float | None
    """Battery state of charge 0..1 (None: no battery known)."""
    battery_wh: float
    """Battery capacity (0: none)."""
    forecast_net_wh: float
    """Forecast production minus consumption over the horizon (+ surplus, - deficit)."""
    tokens_free_wh: int
    """The account's tokens not already in an open offer or a live trade."""
    selling_wh: int
    """Wh already offered (open offers and sell orders) or in live trades as seller."""
    buying_wh: int
    """Wh in this account's leading bids and buy orders, and agreed or live trades as buyer."""


@dataclass(frozen=True, slots=True)
class OfferSeen:
    """An open english offer as the auction lists it (``commands.OfferView``)."""

    offer_id: str
    seller: str
    wh: int
    start_price_wei_per_kwh: int
    highest_bid_wei_per_kwh: int | None
    highest_bidder: str | None
    opened_at: float
    ends_at: float
    """Wall-clock Unix seconds."""


@dataclass(frozen=True, slots=True)
class MarketView:
    now: float
    """Wall-clock Unix seconds."""
    offers: tuple[OfferSeen, ...]
    last_clearing_wei_per_kwh: int | None
    """The last trade's price (or a double auction's clearing price)."""
    min_increment_wei_per_kwh: int


@dataclass(frozen=True, slots=True)
class PlaceOffer:
    wh: int
    start_price_wei_per_kwh: int


@dataclass(frozen=True, slots=True)
class PlaceBid:
    offer_id: str
    price_wei_per_kwh: int


@dataclass(frozen=True, slots=True)
class PlaceOrder:
    """An order for the double auction."""

    side: Literal["sell", "buy"]
    wh: int
    limit_price_wei_per_kwh: int


Action = PlaceOffer | PlaceBid | PlaceOrder


def effective(limits: Limits, tariffs: Tariffs) -> tuple[int, int]:
    """(most paid per kWh, least sold for per kWh): the owner's limits, defaulting to the
    tariffs, and never beyond them: buy cap <= retail, sell floor >= feed-in."""
    retail, feed_in = tariffs.retail_wei_per_kwh, tariffs.feed_in_wei_per_kwh
    buy = limits.max_buy_wei_per_kwh
    sell = limits.min_sell_wei_per_kwh
    cap = retail if buy is None else min(buy, retail)
    floor = feed_in if sell is None else max(sell, feed_in)
    return cap, floor


def _finite(x: float) -> float:
    return x if math.isfinite(x) else 0.0


def _battery_wh(site: SiteView, limits: Limits) -> float:
    """Battery energy above the reserve (+) or missing to reach it (-); 0 without a battery."""
    capacity = _finite(site.battery_wh)
    if site.soc is None or not capacity > 0:
        return 0.0
    soc = min(max(_finite(site.soc), 0.0), 1.0)
    return (soc - limits.reserve_soc) * capacity


def _position_wh(site: SiteView, limits: Limits) -> float:
    """The site's energy over the horizon: the forecast net plus the battery above (or
    minus the battery below) the reserve."""
    return round(_finite(site.forecast_net_wh) + _battery_wh(site, limits), 6)  # float noise off whole Wh


def surplus_wh(site: SiteView, limits: Limits) -> int:
    """Wh sellable now: the energy position less what is already being sold, as far as
    the free tokens cover it; >= 0. Never drains the battery below ``reserve_soc``: with a
    battery known, no more than it holds above the reserve (a trade delivers at once, from
    the battery; the forecast's later production is sold once it is there)."""
    position = _position_wh(site, limits)
    battery = _battery_wh(site, limits)
    if site.soc is not None and _finite(site.battery_wh) > 0:
        position = min(position, battery)
    left = math.floor(position) - max(site.selling_wh, 0)
    return max(min(site.tokens_free_wh, left), 0)


def deficit_wh(site: SiteView, limits: Limits) -> int:
    """Wh to buy: the forecast deficit (with what brings the battery up to the reserve,
    net of the battery above it) less what is already being bought; >= 0."""
    missing = math.ceil(-_position_wh(site, limits))
    return max(missing - max(site.buying_wh, 0), 0)


def _ramp_start(cap: int, tariffs: Tariffs, market: MarketView) -> int:
    """Where the ramp starts: the last clearing price (the feed-in tariff when none),
    taken within the tariffs, and never above the buy cap."""
    feed_in = tariffs.feed_in_wei_per_kwh
    last = market.last_clearing_wei_per_kwh
    base = feed_in if last is None else min(max(last, feed_in), tariffs.retail_wei_per_kwh)
    return min(base, cap)


def _elapsed(now: float, opened_at: float, ends_at: float) -> float:
    """How far ``now`` is into [opened_at, ends_at], clamped to [0, 1]."""
    span = ends_at - opened_at
    if not span > 0:
        return 1.0 if now >= ends_at else 0.0
    return min(max((now - opened_at) / span, 0.0), 1.0)


def _ramp(start: int, cap: int, fraction: float) -> int:
    if fraction >= 1.0:
        return cap
    return min(start + int((cap - start) * fraction), cap)


def willing_to_pay(limits: Limits, tariffs: Tariffs, market: MarketView, offer: OfferSeen) -> int:
    """The price ramp (see the module docstring): from the last clearing price (or the
    feed-in tariff when none) at the offer's opening to the owner's most-paid limit
    ``RAMP_SHARE`` into its auction, linear in time, then held. Never above the effective
    buy cap."""
    cap, _ = effective(limits, tariffs)
    start = _ramp_start(cap, tariffs, market)
    # the cap is reached RAMP_SHARE into the auction: a bid at the cap still lands before it closes
    full_at = offer.opened_at + RAMP_SHARE * (offer.ends_at - offer.opened_at)
    return _ramp(start, cap, _elapsed(market.now, offer.opened_at, full_at))


def _same(a: str | None, b: str) -> bool:
    return a is not None and a.lower() == b.lower()


def _place_offer(me: str, limits: Limits, tariffs: Tariffs, site: SiteView, market: MarketView) -> list[Action]:
    if any(_same(o.seller, me) for o in market.offers):
        return []
    surplus = surplus_wh(site, limits)
    if surplus < MIN_LOT_WH:
        return []
    _, floor = effective(limits, tariffs)  # an english auction: the buyers bid it up from the floor
    return [PlaceOffer(wh=min(surplus, limits.max_trade_wh), start_price_wei_per_kwh=floor)]


def _needed(offer: OfferSeen, market: MarketView) -> int:
    """The least the auction accepts as the next bid on ``offer``."""
    if offer.highest_bid_wei_per_kwh is None:
        return offer.start_price_wei_per_kwh
    return offer.highest_bid_wei_per_kwh + market.min_increment_wei_per_kwh


def _biddable(me: str, offer: OfferSeen, market: MarketView, limits: Limits) -> bool:
    return (not _same(offer.seller, me) and not _same(offer.highest_bidder, me)
            and market.now < offer.ends_at and 0 < offer.wh <= limits.max_trade_wh)


def _place_bids(me: str, limits: Limits, tariffs: Tariffs, site: SiteView, market: MarketView) -> list[Action]:
    left = deficit_wh(site, limits)
    candidates = [o for o in market.offers if _biddable(me, o, market, limits)]
    candidates.sort(key=lambda o: (_needed(o, market), o.ends_at, o.offer_id))
    bids: list[Action] = []
    for offer in candidates:
        needed = _needed(offer, market)
        if offer.wh <= left and 0 < needed <= willing_to_pay(limits, tariffs, market, offer):
            bids.append(PlaceBid(offer_id=offer.offer_id, price_wei_per_kwh=needed))
            left -= offer.wh
    return bids


def decide_english(me: str, limits: Limits, tariffs: Tariffs, site: SiteView, market: MarketView) -> list[Action]:
    """At most one PlaceOffer (when there is no open offer of ``me`` and surplus_wh >= a
    minimum lot of 100 Wh): wh = min(surplus, max_trade_wh), starting at the sell floor.
    Bids: on open offers not by ``me`` (case-insensitive addresses), not already led by
    ``me``, whose wh <= deficit left (deficit_wh minus the wh of bids placed in this same
    decision) and <= max_trade_wh, cheapest needed price first: needed = highest bid +
    min increment (or the start price when no bid); bid `needed` only if needed <=
    willing_to_pay(...). Returns [] when limits.enabled is False."""
    if not limits.enabled:
        return []
    return _place_offer(me, limits, tariffs, site, market) + _place_bids(me, limits, tariffs, site, market)


def decide_utility(me: str, limits: Limits, tariffs: Tariffs, site: SiteView, market: MarketView) -> list[Action]:
    """The utility grid as the counterparty of last resort, at its tariffs (english market).

    It buys any surplus offered at or below the feed-in tariff: on each open offer of
    another account, not led by a bid of at least the feed-in tariff, whose next acceptable
    bid is within the feed-in tariff, it bids the feed-in tariff. A site's buyer who pays more
    outbids it; nobody else needs to. It sells at the retail tariff: one standing offer of
    at most the largest trade (and its free tokens) whenever it has none open. It never pays
    more than the feed-in tariff nor sells for less than retail, whatever the limits say."""
    if not limits.enabled:
        return []
    feed_in, retail = tariffs.feed_in_wei_per_kwh, tariffs.retail_wei_per_kwh
    out: list[Action] = []
    if not any(_same(o.seller, me) for o in market.offers):
        wh = min(site.tokens_free_wh, limits.max_trade_wh)
        if wh >= MIN_LOT_WH:
            out.append(PlaceOffer(wh=wh, start_price_wei_per_kwh=retail))
    for offer in sorted(market.offers, key=lambda o: (o.ends_at, o.offer_id)):
        if not _biddable(me, offer, market, limits):
            continue
        if offer.highest_bid_wei_per_kwh is not None and offer.highest_bid_wei_per_kwh >= feed_in:
            continue
        if _needed(offer, market) <= feed_in:
            out.append(PlaceBid(offer_id=offer.offer_id, price_wei_per_kwh=feed_in))
    return out


def decide_utility_double(me: str, limits: Limits, tariffs: Tariffs, site: SiteView, *,
                          open_sides: frozenset[str] = frozenset()) -> list[Action]:
    """The utility in the double auction: it quotes the spread in every call, a buy order of
    the largest trade at the feed-in tariff and a sell order of the largest trade its free
    tokens cover at the retail tariff, each side once per call (``open_sides``: the sides it
    already has an order of in the current call). Whatever the call clears at between them,
    the sites' unmatched surplus and demand meet the grid at its tariffs."""
    if not limits.enabled:
        return []
    out: list[Action] = []
    if "sell" not in open_sides and min(site.tokens_free_wh, limits.max_trade_wh) >= MIN_LOT_WH:
        out.append(PlaceOrder(side="sell", wh=min(site.tokens_free_wh, limits.max_trade_wh),
                              limit_price_wei_per_kwh=tariffs.retail_wei_per_kwh))
    if "buy" not in open_sides:
        out.append(PlaceOrder(side="buy", wh=limits.max_trade_wh, limit_price_wei_per_kwh=tariffs.feed_in_wei_per_kwh))
    return out


def call_slot(now: float, interval_s: float) -> tuple[float, float]:
    """The double auction's call interval holding ``now``: calls are every ``interval_s``
    seconds, aligned to Unix time (``auction_clear_interval_s``)."""
    start = math.floor(now / interval_s) * interval_s
    return start, start + interval_s


def decide_double(me: str, limits: Limits, tariffs: Tariffs, site: SiteView, market: MarketView, *,
                  slot: tuple[float, float] | None = None) -> list[Action]:
    """One sell order (surplus, at the sell floor) or one buy order (deficit, at
    willing_to_pay of the slot — the slot [opened_at, ends_at] as a pseudo OfferSeen) —
    not both; [] when disabled or nothing to do; each wh <= max_trade_wh and >= 100 Wh.

    ``slot`` is the call's interval (:func:`call_slot`); without it the buy limit is the
    ramp's opening price."""
    if not limits.enabled:
        return []
    cap, floor = effective(limits, tariffs)
    surplus = surplus_wh(site, limits)
    if surplus >= MIN_LOT_WH:
        return [PlaceOrder(side="sell", wh=min(surplus, limits.max_trade_wh), limit_price_wei_per_kwh=floor)]
    deficit = deficit_wh(site, limits)
    if deficit < MIN_LOT_WH:
        return []
    if slot is None:
        price = _ramp_start(cap, tariffs, market)
    else:
        pseudo = OfferSeen(offer_id="", seller=me, wh=deficit, start_price_wei_per_kwh=floor,
                           highest_bid_wei_per_kwh=None, highest_bidder=None, opened_at=slot[0], ends_at=slot[1])
        price = willing_to_pay(limits, tariffs, market, pseudo)
    return [PlaceOrder(side="buy", wh=min(deficit, limits.max_trade_wh), limit_price_wei_per_kwh=price)]
