"""The pure bookkeeping: counter deltas, whole kWh, relay decisions, the cross-check."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from services.meter.accounting import (KwhState, TradeView, counter_delta, interpolate, mismatch, relay_decision,
                                       whole_kwh)


@given(st.lists(st.integers(0, 5000), max_size=50), st.lists(st.booleans(), max_size=50))
def test_whole_kwh_announces_each_index_once_and_in_order(deltas: list[int], accounts: list[bool]) -> None:
    state, announced = KwhState(), []
    for i, d in enumerate(deltas):
        can = accounts[i] if i < len(accounts) else True
        state, idx = whole_kwh(state, d, can_announce=can)
        announced += idx
    state, idx = whole_kwh(state, 0)  # an account at last: the held kWh come out
    announced += idx
    assert announced == list(range(len(announced)))
    assert len(announced) == sum(deltas) // 1000
    assert state.accum_wh == sum(deltas) % 1000 and state.next_index == len(announced)


def test_counter_delta_handles_first_reading_and_resets() -> None:
    assert counter_delta(None, 500) == (0, False)
    assert counter_delta(500, 750) == (250, False)
    assert counter_delta(2**32 - 10, 5) == (5, True)  # a 32-bit register wrapped / was reset


def view(tid: str, state: str, heard: float, omitted: bool = False, seller: str = "solar-1",
         buyer: str = "home-7") -> TradeView:
    return TradeView(tid, state, seller, buyer, heard, omitted)


def test_relay_closes_only_for_a_fresh_live_trade_of_this_site() -> None:
    now = 1000.0
    assert relay_decision([], "home-7", now, 5).closed is False
    assert relay_decision([view("t1", "agreed", now)], "home-7", now, 5).closed is False
    d = relay_decision([view("t1", "recorded", now - 1)], "home-7", now, 5)
    assert d.closed and d.trade_id == "t1"
    assert relay_decision([view("t1", "delivering", now - 1)], "solar-1", now, 5).closed
    assert not relay_decision([view("t1", "delivering", now - 1)], "other", now, 5).closed
    stale = relay_decision([view("t1", "delivering", now - 6)], "home-7", now, 5)
    assert not stale.closed and "heartbeat" in stale.reason and stale.trade_id == "t1"
    gone = relay_decision([view("t1", "delivering", now, omitted=True)], "home-7", now, 5)
    assert not gone.closed and "no longer live" in gone.reason
    for ended in ("fulfilled", "closed", "settled", "failed"):
        assert not relay_decision([view("t1", ended, now)], "home-7", now, 5).closed


def test_mismatch_tolerance_and_slack() -> None:
    assert not mismatch(970, 1000, 0.05, 0)
    assert mismatch(900, 1000, 0.05, 0)
    assert not mismatch(900, 1000, 0.05, 60)
    assert mismatch(1200, 1000, 0.05, 20)  # a buyer measuring more than was sold is flagged too
    assert not mismatch(0, 10, 0.05, 20)


def test_interpolate() -> None:
    s = [(0.0, 0), (10.0, 100), (20.0, 100)]
    assert interpolate([], 1) is None
    assert interpolate(s, 5) == 50 and interpolate(s, 15) == 100
    assert interpolate(s, -1) == 0 and interpolate(s, 99) == 100
