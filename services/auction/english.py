"""The english auction, as pure rules (no I/O): one offer, ascending bids, a deadline.

A seller offers ``wh`` of energy backed by tokens at a start price per kWh for a
duration. A bid must reach the start price, beat the current highest by the minimum
increment and be covered by the buyer's escrow reserved on-chain until the bid's expiry
(contracts v2: reserved escrow cannot be withdrawn under a live bid). At the deadline
the highest bid wins; among equal prices (possible only with a zero increment) the
earliest wins. No bid: the offer expires. A seller may cancel an offer that has no bids.

Each offer and bid carries the seller's or buyer's signed fact (:mod:`services.bus.typed`,
checked by :mod:`services.auction.signed` before it gets here): the trade is opened
on-chain from the two.

Everything here takes plain values (``now`` included) and either returns a result or
raises one of the refusals of :mod:`services.bus.refusals` (a stable ``code``), which the
service answers the request with.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Literal

from services.bus import refusals, typed
from services.bus.prices import wei_for

__all__ = ["Bid", "Offer"]

OfferState = Literal["open", "sold", "expired", "cancelled", "filled"]


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
    signed: typed.Bid | None = None
    """The buyer's signed bid (None only in a store from before signed bids)."""
    signature: str = ""


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
    signed: typed.Offer | None = None
    """The seller's signed offer (None only in a store from before signed offers)."""
    signature: str = ""

    def is_open(self, now: float) -> bool:
        """Taking bids: open and its deadline not reached."""
        return self.state == "open" and now < self.ends_at

    def due(self, now: float) -> bool:
        """Open but past its deadline: waiting to be closed by the market clock."""
        return self.state == "open" and now >= self.ends_at


def same_account(a: str, b: str) -> bool:
    return a.lower() == b.lower()


def open_offer(*, offer_id: str, seller: str, seller_site: str, wh: int, start_price_wei_per_kwh: int,
               duration_s: float, now: float, tokens_free_wh: int, signed: typed.Offer | None = None,
               signature: str = "") -> Offer:
    """A new offer, if the seller's free tokens cover it."""
    if wh <= 0:
        raise refusals.Invalid("an offer needs a positive amount of energy (Wh)")
    if start_price_wei_per_kwh <= 0:
        raise refusals.Invalid("the start price must be positive")
    if not duration_s > 0:
        raise refusals.Invalid("the duration must be positive")
    if tokens_free_wh < wh:
        raise refusals.NoTokens(f"the seller has {tokens_free_wh} Wh of free tokens, the offer needs {wh} Wh")
    return Offer(offer_id=offer_id, seller=seller, seller_site=seller_site, wh=wh,
                 start_price_wei_per_kwh=start_price_wei_per_kwh, opened_at=now, ends_at=now + duration_s,
                 signed=signed, signature=signature)


def min_next_bid(offer: Offer, min_increment_wei_per_kwh: int) -> int:
    """The lowest price per kWh the next bid may have."""
    if offer.highest is None:
        return offer.start_price_wei_per_kwh
    return offer.highest.price_wei_per_kwh + min_increment_wei_per_kwh


def check_bid(offer: Offer | None, *, buyer: str, price_wei_per_kwh: int, now: float,
              min_increment_wei_per_kwh: int) -> int:
    """Check everything about a bid except money; returns the escrow it needs (wei).

    The funding check comes after (it needs a round trip to the chain), through
    :func:`check_reserve`, so a bid that is refused for a plain reason costs nothing.
    """
    if offer is None:
        raise refusals.NotFound("no such offer")
    if price_wei_per_kwh <= 0:
        raise refusals.Invalid("the price must be positive")
    if not offer.is_open(now):
        raise refusals.Closed(f"offer {offer.offer_id} is {'past its deadline' if offer.state == 'open' else offer.state}")
    if same_account(buyer, offer.seller):
        raise refusals.OwnOffer("a seller cannot bid on their own offer")
    floor = min_next_bid(offer, min_increment_wei_per_kwh)
    if price_wei_per_kwh < floor:
        if offer.highest is None:
            raise refusals.TooLow(f"the start bid is {floor} wei/kWh")
        raise refusals.TooLow(f"the highest bid is {offer.highest.price_wei_per_kwh} wei/kWh; "
                              f"bid at least {floor} wei/kWh")
    return wei_for(offer.wh, price_wei_per_kwh, round_up=True)


def check_reserve(*, needed_wei: int, reserved_wei: int, reserved_until: int, expiry: int, held_wei: int = 0,
                  what: str = "bid") -> None:
    """The buyer's escrow reserved on-chain until at least the bid's ``expiry`` must cover
    the bid plus what the buyer's other winning bids, buy orders and not yet opened trades
    hold already (``held_wei``). A reservation that ends before the bid's expiry covers
    nothing: the buyer could withdraw it under the bid. The refusal says how much to
    reserve, until when."""
    covered = reserved_wei if reserved_until >= expiry else 0
    total = needed_wei + held_wei
    if covered >= total:
        return
    if reserved_wei and reserved_until < expiry:
        has = f"{reserved_wei} wei reserved only until {reserved_until}, before the {what}'s expiry"
    else:
        has = f"{reserved_wei} wei reserved"
    others = f", on top of {held_wei} wei held by the buyer's other bids, orders and trades" if held_wei else ""
    raise refusals.Unfunded(f"the {what} needs {needed_wei} wei of escrow reserved until {expiry}{others}; the "
                            f"buyer has {has}: reserve {total} wei in all until {expiry} (nothing was done)")


def place_bid(offer: Offer, *, bid_id: str, buyer: str, buyer_site: str, price_wei_per_kwh: int,
              now: float, min_increment_wei_per_kwh: int, signed: typed.Bid | None = None,
              signature: str = "") -> tuple[Offer, Bid]:
    """Accept a bid (after :func:`check_bid` and :func:`check_reserve` passed)."""
    check_bid(offer, buyer=buyer, price_wei_per_kwh=price_wei_per_kwh, now=now,
              min_increment_wei_per_kwh=min_increment_wei_per_kwh)
    bid = Bid(bid_id=bid_id, offer_id=offer.offer_id, buyer=buyer, buyer_site=buyer_site,
              price_wei_per_kwh=price_wei_per_kwh, placed_at=now, seq=offer.bids + 1, signed=signed,
              signature=signature)
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
        raise refusals.NotFound("no such offer")
    if not same_account(seller, offer.seller):
        raise refusals.NotAllowed("only the seller can cancel an offer")
    if offer.state != "open":
        raise refusals.Closed(f"offer {offer.offer_id} is already {offer.state}")
    if offer.bids:
        raise refusals.HasBids("an offer with bids cannot be cancelled")
    return dataclasses.replace(offer, state="cancelled")


def settle(offer: Offer, now: float) -> Offer:
    """Close an offer whose deadline passed: sold to the highest bid, or expired."""
    if offer.state != "open":
        raise refusals.Closed(f"offer {offer.offer_id} is already {offer.state}")
    if now < offer.ends_at:
        raise refusals.Invalid(f"offer {offer.offer_id} runs until {offer.ends_at}")
    return dataclasses.replace(offer, state="sold" if offer.highest is not None else "expired")


def trade_id_for(offer_id: str, attempt: int = 1) -> str:
    """The trade id is derived from the offer id: ``t-<offer>`` for the winning bid, and
    ``t-<offer>-<n>`` for the n-th try when the trades of the bids before could not be
    opened on-chain (see :func:`fallbacks`)."""
    return f"t-{offer_id}" if attempt <= 1 else f"t-{offer_id}-{attempt}"


def fallbacks(bids: Iterable[Bid], *, tried: set[str], now: float, margin_s: float) -> list[Bid]:
    """The bids to open a trade from when the winner's trade could not be: the best bid
    of each buyer not ``tried`` yet (lowercase addresses), best first, whose signed bid
    stays valid at least ``margin_s`` more."""
    best: dict[str, Bid] = {}
    for b in sorted(bids, key=winner_key):
        who = b.buyer.lower()
        if who in tried or who in best:
            continue
        best[who] = b
    return [b for b in best.values() if b.signed is not None and b.signed.expiry > now + margin_s]
