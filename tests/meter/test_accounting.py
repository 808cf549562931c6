"""The pure bookkeeping: plausible readings, counter resets, production steps, relay decisions, the
cross-check (loss and lag)."""

from __future__ import annotations

import itertools
import math

from hypothesis import given
from hypothesis import strategies as st

from services.meter.accounting import (CONFIRM_READS, COUNTER_STEP_WH, CounterState, MeteredTrade, counter_delta,
                                       interpolate, judge_reading, lagging, mismatch, production_steps,
                                       relay_decision)


@given(st.lists(st.integers(0, 5000), max_size=50), st.lists(st.booleans(), max_size=50),
       st.sampled_from([1, 10, 1000]))
def test_production_is_announced_at_each_step_once_and_in_order(deltas: list[int], known: list[bool],
                                                                 step: int) -> None:
    """Steps of the granularity, each once, in order; while no deployment is known nothing
    is announced, and the first announcement catches up with the highest step only."""
    produced, announced, values, caught_up = 0, 0, [], False
    for i, d in enumerate(deltas):
        produced += d
        if i < len(known) and not known[i] and not caught_up:
            continue  # no deployment yet: counted, not announced
        new = production_steps(produced, announced, step, catch_up=not caught_up, max_steps=10**9)
        caught_up = caught_up or bool(new)
        if new:
            announced = new[-1]
        values += new
    assert all(v % step == 0 for v in values) and values == sorted(set(values))
    assert all(b - a == step for a, b in zip(values, values[1:]))
    assert announced == (produced // step * step if caught_up else 0) or produced < step


def test_production_steps() -> None:
    assert production_steps(999, 0, 1000) == []
    assert production_steps(3500, 1000, 1000) == [2000, 3000]
    assert production_steps(3500, 1000, 1000, catch_up=True) == [3000]
    assert production_steps(3500, 3000, 1000) == []
    assert production_steps(10**6, 0, 1000, max_steps=100) == [10**6]  # after a long pause: the highest only


def test_lag() -> None:
    assert lagging(now=10.0, heard_at=8.0, exported_since_wh=100, lag_s=1.0, slack_wh=50)
    assert not lagging(now=10.0, heard_at=9.5, exported_since_wh=100, lag_s=1.0, slack_wh=50)  # heard lately
    assert not lagging(now=10.0, heard_at=0.0, exported_since_wh=40, lag_s=1.0, slack_wh=50)  # nothing flowed


def test_counter_delta_handles_first_reading_and_resets() -> None:
    assert counter_delta(None, 500) == (0, False)
    assert counter_delta(500, 750) == (250, False)
    assert counter_delta(2**32 - 10, 5) == (5, True)  # a 32-bit register wrapped / was reset


def view(tid: str, state: str, heard: float, omitted: bool = False, seller: str = "solar-1",
         buyer: str = "home-7") -> MeteredTrade:
    return MeteredTrade(tid, state, seller, buyer, heard, omitted)


def test_relay_closes_only_for_a_fresh_live_trade_of_this_site() -> None:
    now = 1000.0
    assert relay_decision([], "home-7", now, 5).closed is False
    # a meter follows the trades of its own side of the site: the seller's producer, the buyer's consumer
    sale = view("t1", "delivering", now - 1)
    assert relay_decision([sale], "solar-1", now, 5, role="producer").closed
    assert not relay_decision([sale], "solar-1", now, 5, role="consumer").closed
    assert relay_decision([sale], "home-7", now, 5, role="consumer").closed
    assert not relay_decision([sale], "home-7", now, 5, role="producer").closed
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
    # a trade its seller flagged: the relay opens for it, another live trade is followed
    flagged = MeteredTrade("t1", "delivering", "solar-1", "home-7", now, flagged=True)
    d = relay_decision([flagged], "solar-1", now, 5)
    assert not d.closed and d.trade_id == "t1" and "flagged" in d.reason
    d = relay_decision([flagged, view("t2", "recorded", now)], "solar-1", now, 5)
    assert d.closed and d.trade_id == "t2"


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


# --- plausibility: rated power, resets and jumps -----------------------------------------

RATE = 3600.0  # W: one Wh per second


def run(values: list[int], times: list[float], rate: float = RATE, confirm: int = CONFIRM_READS,
        durations: list[float] | None = None) -> tuple[list[int], list[str], CounterState]:
    """Judge a counter's readings in turn as the service does; what each counted, each verdict."""
    state, counted, verdicts = CounterState(), [], []
    for i, (v, t) in enumerate(zip(values, times)):
        d = durations[i] if durations else 0.0
        j = judge_reading({"energy": state}, {"energy": v}, t, t + d, rate, confirm)
        state = j.states["energy"]
        counted.append(j.counted["energy"])
        verdicts.append("ok" if j.believed and not j.confirmed else
                        next(iter(j.confirmed.values()), None) or next(iter(j.refused.values())))
    return counted, verdicts, state


readings = st.lists(st.tuples(st.floats(0, 30), st.one_of(st.integers(0, 2**63 - 1), st.integers(0, 5000))),
                    min_size=1, max_size=60)


@given(readings, st.floats(1, 1e7), st.integers(1, 5))
def test_never_more_than_rated_power_times_elapsed(seq: list[tuple[float, int]], rate: float, confirm: int) -> None:
    """Whatever a meter says, resets, jumps and all: the Wh counted never exceed its rated
    power over the time its readings span (plus one counter step of rounding)."""
    times = list(itertools.accumulate(dt for dt, _ in seq))
    counted, _, _ = run([v for _, v in seq], times, rate, confirm)
    assert all(c >= 0 for c in counted)
    assert sum(counted) <= COUNTER_STEP_WH + rate * (times[-1] - times[0]) / 3600 + 1e-6


@given(readings, st.lists(st.floats(0, 2), min_size=60, max_size=60), st.floats(1, 1e7))
def test_each_reading_within_its_window(seq: list[tuple[float, int]], durations: list[float], rate: float) -> None:
    """With reads that take time, each window runs from the start of the baseline's read to
    the end of this one: still bounded by the summed windows."""
    starts = list(itertools.accumulate(dt + d for (dt, _), d in zip(seq, durations)))
    counted, _, _ = run([v for _, v in seq], starts, rate, durations=durations)
    windows = sum(starts[i] + durations[i] - starts[i - 1] for i in range(1, len(starts)))
    assert sum(counted) <= COUNTER_STEP_WH + rate * windows / 3600 + 1e-6


def truthful(powers: list[float], dts: list[float], offsets: list[int]) -> tuple[list[int], list[float], list[float]]:
    """A meter below its rated power: whole-Wh counter = floor(true energy) + the offset of the moment."""
    e, t, values, times, energy = 0.0, 0.0, [], [], []
    for p, dt, off in zip(powers, dts, offsets):
        t += dt
        e += p * dt / 3600
        values.append(math.floor(e) + off)
        times.append(t)
        energy.append(e)
    return values, times, energy


@st.composite
def with_reset(draw: st.DrawFn) -> tuple[list[float], list[float], int, int]:
    n = draw(st.integers(8, 40))
    powers = draw(st.lists(st.floats(0, RATE), min_size=n, max_size=n))
    dts = draw(st.lists(st.floats(0.05, 5), min_size=n, max_size=n))
    k = draw(st.integers(1, n - CONFIRM_READS))
    return powers, dts, k, draw(st.sampled_from(["reset", "back", "jump"]))


@given(with_reset(), st.integers(0, 10**6))
def test_a_reset_or_jump_never_produces_a_burst(case: tuple[list[float], list[float], int, str], low: int) -> None:
    """A truthful meter whose counter is reset (to a low value), steps back, or jumps to
    2^63 - 1 at reading k: the jump counts nothing, every other step is counted once the
    new value is confirmed, and never more than the energy that really flowed."""
    powers, dts, k, kind = case
    high = 10**9  # the counter before: above anything the reset or step lands on
    after = {"reset": low, "back": high - 50 - 10**5, "jump": 2**63 - 1 - 10**6}[kind]
    offsets = [high if i < k else after for i in range(len(powers))]
    values, times, energy = truthful(powers, dts, offsets)
    counted, verdicts, state = run(values, times)
    confirmed_at = k + CONFIRM_READS - 1
    assert verdicts[:k] == ["ok"] * k  # a truthful meter below its rating: all believed
    assert all(c == 0 for c in counted[k:confirmed_at + 1])
    assert verdicts[confirmed_at] == ("jump" if kind == "jump" else "reset")
    assert verdicts[k] == ("too_fast" if kind == "jump" else "backwards")
    # never more than what flowed, the jump included
    assert sum(counted) <= energy[-1] - energy[0] + COUNTER_STEP_WH
    # nothing lost but the readings that confirmed the new value: what is not counted yet
    # is the rest above the baseline
    assert state.value is not None and state.value <= values[-1]
    assert sum(counted) + (values[-1] - state.value) == \
        (values[k - 1] - values[0]) + (values[-1] - values[confirmed_at])


def test_a_lone_glitch_counts_nothing_and_loses_nothing() -> None:
    times = [0.0, 1.0, 2.0, 3.0, 4.0]
    counted, verdicts, _ = run([100, 101, 2**63 - 1, 102, 103], times)
    assert counted == [0, 1, 0, 1, 1] and verdicts[2] == "too_fast"
    counted, verdicts, _ = run([100, 101, 7, 102, 103], times)
    assert counted == [0, 1, 0, 1, 1] and verdicts[2] == "backwards"


def test_a_counter_racing_past_its_rating_is_never_confirmed() -> None:
    """Each reading too far above the one before: no run of consistent readings, nothing counted."""
    times = [float(i) for i in range(10)]
    counted, verdicts, state = run([1000 * i for i in range(10)], times)
    assert sum(counted) == 0 and set(verdicts[1:]) == {"too_fast"} and state.value == 0


def test_the_whole_reading_is_refused_when_one_counter_is() -> None:
    states = {"energy": CounterState(100, 0.0), "export": CounterState(50, 0.0)}
    j = judge_reading(states, {"energy": 101, "export": 10}, 1.0, 1.0, RATE)
    assert not j.believed and j.counted == {"energy": 0, "export": 0} and j.refused == {"export": "backwards"}
    assert j.states["energy"] == states["energy"]  # not counted: the next reading counts it
    for t in (2.0, 3.0):
        j = judge_reading(j.states, {"energy": 101 + int(t), "export": 10 + int(t)}, t, t, RATE)
    assert j.believed and j.confirmed == {"export": "reset"}
    assert j.counted == {"energy": 4, "export": 0}
    assert j.states["export"].value == 13 and j.states["energy"].value == 104
