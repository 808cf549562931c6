"""The trade lifecycle state machine, directly."""

from __future__ import annotations

import pytest

from services.auction import lifecycle as lc
from services.bus.refusals import Refusal

SELLER = "0x" + "a" * 40
BUYER = "0x" + "b" * 40
OPERATOR = "0x" + "f" * 40


def trade(**kw):
    args = dict(trade_id="t-o-1", offer_id="o-1", seller=SELLER, buyer=BUYER, seller_site="solar-1",
                buyer_site="home-7", wh=2000, price_wei_per_kwh=1000)
    args.update(kw)
    return lc.Trade(**args)


def states(steps):
    return [s.state for s in steps]


def test_happy_path_to_fulfilled_and_settled():
    t = trade()
    assert not t.live
    t, steps = lc.recorded(t)
    assert states(steps) == ["recorded", "delivering"] and t.live
    t, steps = lc.delivery(t, 1500)
    assert steps == [] and t.delivered_wh == 1500 and t.state == "delivering"
    t, steps = lc.delivery(t, 1200)  # older reading: count never goes back
    assert t.delivered_wh == 1500 and steps == []
    t, steps = lc.delivery(t, 2000)
    assert states(steps) == ["fulfilled"] and not t.live
    t, steps = lc.closed_on_chain(t, delivered_wh=2000, paid_wei=2000)
    assert states(steps) == ["settled"] and t.paid_wei == 2000
    assert lc.closed_on_chain(t, delivered_wh=2000, paid_wei=2000) == (t, [])  # repeated event


def test_repeated_recorded_is_a_no_op():
    t, _ = lc.recorded(trade())
    assert lc.recorded(t) == (t, [])


def test_buyer_seller_or_operator_closes():
    t, _ = lc.recorded(trade())
    with pytest.raises(Refusal) as e:
        lc.close(t, by="0x" + "9" * 40, operator=OPERATOR)
    assert e.value.code == "not_allowed"
    by_seller, steps = lc.close(t, by=SELLER, reason="closed by the seller's site: its meter saw no export")
    assert [(s.state, s.reason) for s in steps] == [("closed", "closed by the seller's site: its meter saw no export")]
    assert by_seller.reason == "closed by the seller's site: its meter saw no export"
    t2, steps = lc.close(t, by=BUYER.upper().replace("0X", "0x"))
    assert states(steps) == ["closed"] and not t2.live
    t3, steps = lc.close(t, by=OPERATOR, operator=OPERATOR, reason="operator")
    assert states(steps) == ["closed"]
    with pytest.raises(Refusal) as e:
        lc.close(t2, by=BUYER)
    assert e.value.code == "closed"
    t4, steps = lc.closed_on_chain(t2, delivered_wh=700, paid_wei=700)
    assert states(steps) == ["settled"] and t4.delivered_wh == 700


def test_invalid_transitions_rejected():
    t = trade()
    with pytest.raises(lc.InvalidTransition):
        lc.delivery(t, 10)  # not recorded yet
    f, steps = lc.failed(t, "reverted")
    assert states(steps) == ["failed"]
    with pytest.raises(lc.InvalidTransition):
        lc.recorded(f)
    with pytest.raises(Refusal):
        lc.close(f, by=BUYER)
    t, _ = lc.recorded(t)
    with pytest.raises(lc.InvalidTransition):
        lc.failed(t, "late")


def test_chain_closing_a_live_trade_goes_through_closed():
    t, _ = lc.recorded(trade())
    t, steps = lc.closed_on_chain(t, delivered_wh=10, paid_wei=10)
    assert states(steps) == ["closed", "settled"]


def test_transition_table_is_closed():
    for src, dsts in lc.TRANSITIONS.items():
        assert dsts <= set(lc.TRANSITIONS), src
    assert all(not lc.TRANSITIONS[s] for s in lc.FINAL)


def test_energy_past_the_trade_is_not_counted_and_the_chain_has_the_last_word():
    """The relay takes a moment to open: what the buyer's meter counts past the trade's
    Wh is not part of the trade, and the settled figure is the contract's."""
    t, _ = lc.recorded(trade())
    t, steps = lc.delivery(t, 2021)
    assert states(steps) == ["fulfilled"] and t.delivered_wh == 2000
    t, _ = lc.delivery(t, 2040)
    assert t.delivered_wh == 2000
    t, steps = lc.closed_on_chain(t, delivered_wh=2000, paid_wei=2000)
    assert states(steps) == ["settled"] and t.delivered_wh == 2000
    closed, _ = lc.recorded(trade(trade_id="t-o-2"))
    closed, _ = lc.delivery(closed, 900)
    closed, _ = lc.closed_on_chain(closed, delivered_wh=880, paid_wei=880)  # settled what the chain saw
    assert closed.delivered_wh == 880 and closed.paid_wei == 880
