"""The english auction, as pure rules (no I/O): one offer, ascending bids, a deadline.

A seller offers ``wh`` of energy backed by tokens at a start price per kWh for a
duration. A bid must reach the start price, beat the current highest by the minimum
increment and be covered by the buyer's free escrow. At the deadline the highest bid
wins; among equal prices (possible only with a zero increment) the earliest wins. No
bid: the offer expires. A seller may cancel an offer that has no bids.

Everything here takes plain values (``now`` included) and either returns a result or
raises :class:`Rejected` with a stable ``code``; the service turns that into a
``RequestError``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Literal

from .errors import Rejected

__all__ = ["Bid", "Offer", "Rejected", "cost_wei"]

OfferState = Literal["open", "sold", "expired", "cancelled", "filled"]


def cost_wei(wh: int, price_wei_per_kwh: int) -> int:
    """What ``wh`` costs at a price per kWh, rounded up to whole wei (never under-covered)."""
    return -(-(wh * price_wei_per_kwh) // 1000)


@dataclasses.dataclass(frozen=True, slots=True)
class Bid:
    bid_id: str
    offer_id: str
    buyer: str
    buyer_site: str
    price_wei_per_kwh: int
    placed_at: float
    seq: int
    """Order of acceptance within the offer (1, 2, ...): breaks ties, earliest wins."""


@dataclasses.dataclass(frozen=True, slots=True)
class Offer:
    offer_id: str
    seller: str
    seller_site: str
    wh: int
    start_price_wei_per_kwh: int
    opened_at: float
    ends_at: float
    state: OfferState = "open"
    highest: Bid | None = None
    bids: int = 0

    def is_open(self, now: float) -> bool:
        """Taking bids: open and its deadline not reached."""
        return self.state == "open" and now < self.ends_at

    def due(self, now: float) -> bool:
        """Open but past its deadline: waiting to be closed by the market clock."""
        return self.state == "open" and now >= self.ends_at


def same_account(a: str, b: str) -> bool:
    return a.lower() == b.lower()


def open_offer(*, offer_id: str, seller: str, seller_site: str, wh: int, start_price_wei_per_kwh: int,
               duration_s: float, now: float, tokens_free_wh: int) -> Offer:
    """A new offer, if the seller's free tokens cover it."""
    if wh <= 0:
        raise Rejected("invalid", "an offer needs a positive amount of energy (Wh)")
    if start_price_wei_per_kwh <= 0:
        raise Rejected("invalid", "the start price must be positive")
    if not duration_s > 0:
        raise Rejected("invalid", "the duration must be positive")
    if tokens_free_wh < wh:
        raise Rejected("no_tokens", f"the seller has {tokens_free_wh} Wh of free tokens, the offer needs {wh} Wh")
    return Offer(offer_id=offer_id, seller=seller, seller_site=seller_site, wh=wh,
                 start_price_wei_per_kwh=start_price_wei_per_kwh, opened_at=now, ends_at=now + duration_s)


def min_next_bid(offer: Offer, min_increment_wei_per_kwh: int) -> int:
    """The lowest price per kWh the next bid may have."""
    if offer.highest is None:
        return offer.start_price_wei_per_kwh
    return offer.highest.price_wei_per_kwh + min_increment_wei_per_kwh


def check_bid(offer: Offer | None, *, buyer: str, price_wei_per_kwh: int, now: float,
              min_increment_wei_per_kwh: int) -> int:
    """Check everything about a bid except money; returns the escrow it needs (wei).

    The funding check comes after (it needs a round trip to the chain), through
    :func:`check_funds`, so a bid that is refused for a plain reason costs nothing.
    """
    if offer is None:
        raise Rejected("not_found", "no such offer")
    if price_wei_per_kwh <= 0:
        raise Rejected("invalid", "the price must be positive")
    if not offer.is_open(now):
        raise Rejected("closed", f"offer {offer.offer_id} is {'past its deadline' if offer.state == 'open' else offer.state}")
    if same_account(buyer, offer.seller):
        raise Rejected("own_offer", "a seller cannot bid on their own offer")
    floor = min_next_bid(offer, min_increment_wei_per_kwh)
    if price_wei_per_kwh < floor:
        if offer.highest is None:
            raise Rejected("too_low", f"the start bid is {floor} wei/kWh")
        raise Rejected("too_low", f"the highest bid is {offer.highest.price_wei_per_kwh} wei/kWh; "
                                  f"bid at least {floor} wei/kWh")
    return cost_wei(offer.wh, price_wei_per_kwh)


def check_funds(*, needed_wei: int, escrow_free_wei: int, reserved_wei: int = 0) -> None:
    """The buyer's free escrow, less what their other winning bids and unrecorded trades
    already claim, must cover the bid."""
    available = escrow_free_wei - reserved_wei
    if available < needed_wei:
        raise Rejected("unfunded", f"the bid needs {needed_wei} wei of free escrow; the buyer has {max(available, 0)}"
                                   + (f" ({reserved_wei} wei already held by other bids and trades)" if reserved_wei else ""))


def place_bid(offer: Offer, *, bid_id: str, buyer: str, buyer_site: str, price_wei_per_kwh: int,
              now: float, min_increment_wei_per_kwh: int) -> tuple[Offer, Bid]:
    """Accept a bid (after :func:`check_bid` and :func:`check_funds` passed)."""
    check_bid(offer, buyer=buyer, price_wei_per_kwh=price_wei_per_kwh, now=now,
              min_increment_wei_per_kwh=min_increment_wei_per_kwh)
    bid = Bid(bid_id=bid_id, offer_id=offer.offer_id, buyer=buyer, buyer_site=buyer_site,
              price_wei_per_kwh=price_wei_per_kwh, placed_at=now, seq=offer.bids + 1)
    highest = offer.highest
    if highest is None or winner_key(bid) < winner_key(highest):
        highest = bid
    return dataclasses.replace(offer, highest=highest, bids=offer.bids + 1), bid


def winner_key(bid: Bid) -> tuple[int, int]:
    """Sorts the winner first: highest price, then earliest accepted."""
    return (-bid.price_wei_per_kwh, bid.seq)


def winner(bids: Iterable[Bid]) -> Bid | None:
    return min(bids, key=winner_key, default=None)


def cancel(offer: Offer | None, *, seller: str, now: float) -> Offer:
    if offer is None:
        raise Rejected("not_found", "no such offer")
    if not same_account(seller, offer.seller):
        raise Rejected("not_allowed", "only the seller can cancel an offer")
    if offer.state != "open":
        raise Rejected("closed", f"offer {offer.offer_id} is already {offer.state}")
    if offer.bids:
        raise Rejected("has_bids", "an offer with bids cannot be cancelled")
    return dataclasses.replace(offer, state="cancelled")


def settle(offer: Offer, now: float) -> Offer:
    """Close an offer whose deadline passed: sold to the highest bid, or expired."""
    if offer.state != "open":
        raise Rejected("closed", f"offer {offer.offer_id} is already {offer.state}")
    if now < offer.ends_at:
        raise Rejected("invalid", f"offer {offer.offer_id} runs until {offer.ends_at}")
    return dataclasses.replace(offer, state="sold" if offer.highest is not None else "expired")


def trade_id_for(offer_id: str) -> str:
    """One offer, at most one trade: the trade id is derived from the offer id."""
    return f"t-{offer_id}"
