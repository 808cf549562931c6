"""The english auction's rules, directly (no I/O)."""

from __future__ import annotations

import pytest

from services.auction import english
from services.bus import typed
from services.bus.prices import wei_for
from services.bus.refusals import Refusal

SELLER = "0x" + "a" * 40
B1 = "0x" + "b" * 40
B2 = "0x" + "c" * 40
B3 = "0x" + "d" * 40
B4 = "0x" + "e" * 40


def offer(**kw):
    args = dict(offer_id="o-1", seller=SELLER, seller_site="solar-1", wh=2500, start_price_wei_per_kwh=1000,
                duration_s=60, now=100.0, tokens_free_wh=5000)
    args.update(kw)
    return english.open_offer(**args)


def bid(o, buyer=B1, price=1000, now=110.0, inc=10, bid_id=None):
    return english.place_bid(o, bid_id=bid_id or f"b-{o.bids + 1}", buyer=buyer, buyer_site="home-7",
                             price_wei_per_kwh=price, now=now, min_increment_wei_per_kwh=inc)


def test_cost_rounds_up():
    assert wei_for(1000, 7, round_up=True) == 7
    assert wei_for(1, 7, round_up=True) == 1  # 0.007 wei -> 1
    assert wei_for(1500, 3, round_up=True) == 5  # 4.5 -> 5
    assert wei_for(0, 10**18, round_up=True) == 0


def test_offer_deadline_is_absolute():
    o = offer()
    assert o.ends_at == 160.0 and o.opened_at == 100.0
    assert o.is_open(159.9) and not o.is_open(160.0) and o.due(160.0)


def test_offer_needs_tokens():
    with pytest.raises(Refusal) as e:
        offer(tokens_free_wh=2499)
    assert e.value.code == "no_tokens"
    for bad in (dict(wh=0), dict(start_price_wei_per_kwh=0), dict(duration_s=0)):
        with pytest.raises(Refusal) as e:
            offer(**bad)
        assert e.value.code == "invalid"


def test_first_bid_must_reach_start():
    o = offer()
    with pytest.raises(Refusal) as e:
        bid(o, price=999)
    assert e.value.code == "too_low" and "1000" in e.value.message
    o2, b = bid(o, price=1000)
    assert o2.highest == b and o2.bids == 1 and b.seq == 1


def test_next_bid_must_beat_by_increment():
    o, _ = bid(offer(), price=1000)
    with pytest.raises(Refusal) as e:
        bid(o, buyer=B2, price=1009, inc=10)
    assert e.value.code == "too_low"
    o, b = bid(o, buyer=B2, price=1010, inc=10)
    assert o.highest == b and o.highest.buyer == B2


def test_seller_cannot_bid_any_case():
    with pytest.raises(Refusal) as e:
        bid(offer(), buyer=SELLER.upper().replace("0X", "0x"))
    assert e.value.code == "own_offer"


def test_closed_offer_refuses_bids():
    o = offer()
    with pytest.raises(Refusal) as e:
        bid(o, now=160.0)
    assert e.value.code == "closed"
    with pytest.raises(Refusal) as e:
        bid(english.cancel(o, seller=SELLER, now=101), now=101)
    assert e.value.code == "closed"
    with pytest.raises(Refusal) as e:
        english.check_bid(None, buyer=B1, price_wei_per_kwh=5, now=0, min_increment_wei_per_kwh=1)
    assert e.value.code == "not_found"


def test_reserved_escrow_until_the_bids_expiry_covers_it():
    english.check_reserve(needed_wei=10, reserved_wei=10, reserved_until=500, expiry=500)
    with pytest.raises(Refusal) as e:
        english.check_reserve(needed_wei=10, reserved_wei=9, reserved_until=500, expiry=500)
    assert e.value.code == "unfunded" and "reserve 10 wei in all until 500" in e.value.message
    with pytest.raises(Refusal) as e:  # other bids and trades hold part of it
        english.check_reserve(needed_wei=10, reserved_wei=15, reserved_until=500, expiry=500, held_wei=6)
    assert e.value.code == "unfunded" and "6 wei held" in e.value.message and "reserve 16 wei" in e.value.message
    with pytest.raises(Refusal) as e:  # enough, but it could be withdrawn before the bid expires
        english.check_reserve(needed_wei=10, reserved_wei=100, reserved_until=499, expiry=500)
    assert e.value.code == "unfunded" and "only until 499" in e.value.message


def test_the_next_bids_after_a_failed_trade():
    o = offer()
    signed = typed.Bid(bid_id="0x" + "01" * 32, offer_id="0x" + "02" * 32, buyer=B1, wh=2500,
                       max_price_wei_per_kwh=1, expiry=1000)
    bids = [english.Bid(bid_id=f"b-{n}", offer_id=o.offer_id, buyer=buyer, buyer_site="home-7",
                        price_wei_per_kwh=price, placed_at=100 + n, seq=n,
                        signed=signed.model_copy(update={"expiry": expiry}))
            for n, (buyer, price, expiry) in enumerate([(B1, 1000, 1000), (B2, 1100, 1000), (B1, 1200, 1000),
                                                        (B3, 1050, 1000), (B4, 1150, 990)], 1)]
    # B1 won (1200) and failed: B4's bid runs out within the margin; B2 then B3, one bid each
    got = english.fallbacks(bids, tried={B1.lower()}, now=980, margin_s=10)
    assert [b.bid_id for b in got] == ["b-2", "b-4"]
    assert english.trade_id_for("o-1") == "t-o-1" and english.trade_id_for("o-1", 2) == "t-o-1-2"


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
    with pytest.raises(Refusal):
        english.settle(o, 159.0)
    done = english.settle(o, 1e9)
    assert done.state == "expired" and done.highest is None
    with pytest.raises(Refusal) as e:
        english.settle(done, 1e9)
    assert e.value.code == "closed"


def test_cancel_rules():
    o = offer()
    with pytest.raises(Refusal) as e:
        english.cancel(o, seller=B1, now=101)
    assert e.value.code == "not_allowed"
    o2, _ = bid(o)
    with pytest.raises(Refusal) as e:
        english.cancel(o2, seller=SELLER, now=111)
    assert e.value.code == "has_bids"
    assert english.cancel(o, seller=SELLER, now=101).state == "cancelled"


def test_trade_id_is_derived_from_offer():
    assert english.trade_id_for("o-7") == english.trade_id_for("o-7") != english.trade_id_for("o-8")
