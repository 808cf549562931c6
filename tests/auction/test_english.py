"""The english auction's rules, directly (no I/O)."""

from __future__ import annotations

import pytest

from services.auction import english
from services.auction.english import Rejected

SELLER = "0x" + "a" * 40
B1 = "0x" + "b" * 40
B2 = "0x" + "c" * 40


def offer(**kw):
    args = dict(offer_id="o-1", seller=SELLER, seller_site="solar-1", wh=2500, start_price_wei_per_kwh=1000,
                duration_s=60, now=100.0, tokens_free_wh=5000)
    args.update(kw)
    return english.open_offer(**args)


def bid(o, buyer=B1, price=1000, now=110.0, inc=10, bid_id=None):
    return english.place_bid(o, bid_id=bid_id or f"b-{o.bids + 1}", buyer=buyer, buyer_site="home-7",
                             price_wei_per_kwh=price, now=now, min_increment_wei_per_kwh=inc)


def test_cost_rounds_up():
    assert english.cost_wei(1000, 7) == 7
    assert english.cost_wei(1, 7) == 1  # 0.007 wei -> 1
    assert english.cost_wei(1500, 3) == 5  # 4.5 -> 5
    assert english.cost_wei(0, 10**18) == 0


def test_offer_deadline_is_absolute():
    o = offer()
    assert o.ends_at == 160.0 and o.opened_at == 100.0
    assert o.is_open(159.9) and not o.is_open(160.0) and o.due(160.0)


def test_offer_needs_tokens():
    with pytest.raises(Rejected) as e:
        offer(tokens_free_wh=2499)
    assert e.value.code == "no_tokens"
    for bad in (dict(wh=0), dict(start_price_wei_per_kwh=0), dict(duration_s=0)):
        with pytest.raises(Rejected) as e:
            offer(**bad)
        assert e.value.code == "invalid"


def test_first_bid_must_reach_start():
    o = offer()
    with pytest.raises(Rejected) as e:
        bid(o, price=999)
    assert e.value.code == "too_low" and "1000" in e.value.message
    o2, b = bid(o, price=1000)
    assert o2.highest == b and o2.bids == 1 and b.seq == 1


def test_next_bid_must_beat_by_increment():
    o, _ = bid(offer(), price=1000)
    with pytest.raises(Rejected) as e:
        bid(o, buyer=B2, price=1009, inc=10)
    assert e.value.code == "too_low"
    o, b = bid(o, buyer=B2, price=1010, inc=10)
    assert o.highest == b and o.highest.buyer == B2


def test_seller_cannot_bid_any_case():
    with pytest.raises(Rejected) as e:
        bid(offer(), buyer=SELLER.upper().replace("0X", "0x"))
    assert e.value.code == "own_offer"


def test_closed_offer_refuses_bids():
    o = offer()
    with pytest.raises(Rejected) as e:
        bid(o, now=160.0)
    assert e.value.code == "closed"
    with pytest.raises(Rejected) as e:
        bid(english.cancel(o, seller=SELLER, now=101), now=101)
    assert e.value.code == "closed"
    with pytest.raises(Rejected) as e:
        english.check_bid(None, buyer=B1, price_wei_per_kwh=5, now=0, min_increment_wei_per_kwh=1)
    assert e.value.code == "not_found"


def test_funds():
    english.check_funds(needed_wei=10, escrow_free_wei=10)
    with pytest.raises(Rejected) as e:
        english.check_funds(needed_wei=10, escrow_free_wei=9)
    assert e.value.code == "unfunded"
    with pytest.raises(Rejected) as e:
        english.check_funds(needed_wei=10, escrow_free_wei=15, reserved_wei=6)
    assert e.value.code == "unfunded" and "already held" in e.value.message


def test_highest_wins_earliest_on_tie():
    o = offer()
    o, first = bid(o, buyer=B1, price=1200, inc=0)
    o, second = bid(o, buyer=B2, price=1200, inc=0)  # zero increment: a tie is allowed
    assert o.highest == first
    assert english.winner([second, first]) == first
    o, third = bid(o, buyer=B2, price=1201, inc=0)
    assert o.highest == third
    done = english.settle(o, 160.0)
    assert done.state == "sold" and done.highest == third


def test_settle_only_after_deadline_and_once():
    o = offer()
    with pytest.raises(Rejected):
        english.settle(o, 159.0)
    done = english.settle(o, 1e9)
    assert done.state == "expired" and done.highest is None
    with pytest.raises(Rejected) as e:
        english.settle(done, 1e9)
    assert e.value.code == "closed"


def test_cancel_rules():
    o = offer()
    with pytest.raises(Rejected) as e:
        english.cancel(o, seller=B1, now=101)
    assert e.value.code == "not_allowed"
    o2, _ = bid(o)
    with pytest.raises(Rejected) as e:
        english.cancel(o2, seller=SELLER, now=111)
    assert e.value.code == "has_bids"
    assert english.cancel(o, seller=SELLER, now=101).state == "cancelled"


def test_trade_id_is_derived_from_offer():
    assert english.trade_id_for("o-7") == english.trade_id_for("o-7") != english.trade_id_for("o-8")
