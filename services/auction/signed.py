"""The signed offers and bids of contracts v2, as the auction checks them (pure, no I/O).

The operator opens a trade on-chain from the seller's signed offer and the buyer's
signed bid, and the market contract checks both signatures, ids, amounts, prices and
expiries again. The auction checks them first, when it takes an offer, a bid or an
order, so that one the contract would refuse is refused at once with a reason and
changes nothing:

- the signature recovers to the account the request names (EIP-712 in the market
  domain of the operator's deployment: a signature for another chain or another market
  contract recovers someone else, as does an altered field);
- the signed fact says what the request says: the seller's Wh and minimum price are the
  offer's Wh and start price (the limit, for a sell order); a bid names the offer's
  signed id (the zero id for a double-auction buy order), its Wh and the bid price;
- it stays valid long enough for the trade to be opened: until at least the auction's
  end (or the call's clearing) plus a grace period.

A signed fact is taken once (the caller checks that against its store): the same signed
offer or bid placed again is ``replayed``.
"""

from __future__ import annotations

import math

from services.bus import refusals, typed



def _same(a: str, b: str) -> bool:
    return a.lower() == b.lower()


def check_expiry(expiry: int, min_expiry: float, what: str, grace_s: float) -> None:
    if expiry < min_expiry:
        raise refusals.Invalid(f"the signed {what} expires at {expiry}; it must stay valid until at least "
                               f"{math.ceil(min_expiry)} (the auction's end plus {grace_s:g} s for the trade to be "
                               "opened on-chain); nothing was done")


def _signed_by(domain: typed.Domain, signer: str | None, party: str, what: str) -> None:
    """The recovered ``signer`` of a signed offer or bid must be ``party``."""
    if signer is None or not _same(signer, party):
        raise refusals.BadSignature(f"the {what}'s signature is not {party}'s for this market (chain "
                                    f"{domain.chain_id}, market {domain.contract}): forged, altered, or signed "
                                    "for another chain or market; nothing was done")


def check_offer(domain: typed.Domain, offer: typed.Offer, signature: str, *, seller: str, wh: int,
                min_price_wei_per_kwh: int, min_expiry: float, grace_s: float) -> None:
    """An offer signed by ``seller`` that says what the request says."""
    if not _same(offer.seller, seller):
        raise refusals.Invalid(f"the signed offer is {offer.seller}'s, the request is {seller}'s; nothing was done")
    _signed_by(domain, typed.recover_offer(domain, offer, signature), seller, "offer")
    if offer.wh != wh:
        raise refusals.Invalid(f"the signed offer is for {offer.wh} Wh, the request for {wh} Wh; nothing was done")
    if offer.min_price_wei_per_kwh != min_price_wei_per_kwh:
        raise refusals.Invalid(f"the signed offer's minimum price is {offer.min_price_wei_per_kwh} wei/kWh, the "
                               f"request's {min_price_wei_per_kwh} wei/kWh; nothing was done")
    if offer.duration_s <= 0:
        raise refusals.Invalid("the signed offer's trade duration must be positive; nothing was done")
    check_expiry(offer.expiry, min_expiry, "offer", grace_s)


def check_bid(domain: typed.Domain, bid: typed.Bid, signature: str, *, buyer: str, offer_id: str, wh: int,
              max_price_wei_per_kwh: int, min_expiry: float, grace_s: float) -> None:
    """A bid signed by ``buyer`` for the signed offer ``offer_id`` (the zero id: a buy order
    for any offer) that says what the request says."""
    if not _same(bid.buyer, buyer):
        raise refusals.Invalid(f"the signed bid is {bid.buyer}'s, the request is {buyer}'s; nothing was done")
    _signed_by(domain, typed.recover_bid(domain, bid, signature), buyer, "bid")
    if not _same(bid.offer_id, offer_id):
        what = "a buy order must name no offer (the zero id)" if offer_id == typed.ZERO_ID else \
            f"it must name offer {offer_id}"
        raise refusals.Invalid(f"the signed bid is for offer {bid.offer_id}: {what}; nothing was done")
    if bid.wh != wh:
        raise refusals.Invalid(f"the signed bid is for {bid.wh} Wh, the offer has {wh} Wh; nothing was done")
    if bid.max_price_wei_per_kwh != max_price_wei_per_kwh:
        raise refusals.Invalid(f"the signed bid's price is {bid.max_price_wei_per_kwh} wei/kWh, the request's "
                               f"{max_price_wei_per_kwh} wei/kWh; nothing was done")
    check_expiry(bid.expiry, min_expiry, "bid", grace_s)
