"""The naive site forecast (pure): same as yesterday, else the present."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.agent.forecast import BUCKET_S, DAY_S, KEEP_BUCKETS, Forecast, Naive

T0 = 1_800_000_000 - 1_800_000_000 % DAY_S  # a midnight
PROPS = settings(max_examples=200, deadline=None)


def test_naive_is_a_forecast() -> None:
    assert isinstance(Naive(), Forecast)


def test_nothing_observed_forecasts_nothing() -> None:
    f = Naive()
    assert f.net_wh(T0, 3600) == 0.0
    f.observe(T0, 500.0, 200.0)
    assert f.net_wh(T0, 0) == 0.0
    assert f.net_wh(T0, -60) == 0.0


def test_without_yesterday_the_present_goes_on() -> None:
    f = Naive()
    f.observe(T0, 1_000.0, 400.0)
    f.observe(T0 + 30, 1_200.0, 200.0)  # the latest: +1000 W
    assert f.net_wh(T0 + 60, 3600) == pytest.approx(1_000.0)
    assert f.net_wh(T0 + 60, 1800) == pytest.approx(500.0)


def test_yesterday_at_the_same_time_of_day_wins_over_the_present() -> None:
    f = Naive()
    # yesterday 12:00-12:30: 2 kW of surplus (two readings per bucket, averaged); the rest unobserved
    for k in range(60):
        f.observe(T0 + 12 * 3600 + k * 30, 2_500.0 + (k % 2) * 100, 500.0 + (k % 2) * 100)
    f.observe(T0 + DAY_S + 11 * 3600, 0.0, 300.0)  # now: -300 W
    now = T0 + DAY_S + 11 * 3600 + 1800  # 11:30 today
    # 11:30-12:00 from the present (-300 W), 12:00-12:30 from yesterday (+2000 W)
    assert f.net_wh(now, 3600) == pytest.approx(-150.0 + 1_000.0)


def test_the_current_minute_is_forecast_from_yesterday_not_from_itself() -> None:
    f = Naive()
    f.observe(T0 + 10 * 3600, 1_000.0, 0.0)  # yesterday 10:00
    f.observe(T0 + DAY_S + 10 * 3600, 0.0, 500.0)  # today 10:00, the latest
    assert f.net_wh(T0 + DAY_S + 10 * 3600, 60) == pytest.approx(1_000.0 / 60)
    assert f.net_wh(T0 + DAY_S + 10 * 3600 + 60, 60) == pytest.approx(-500.0 / 60)


def test_partial_buckets_are_integrated_by_time() -> None:
    f = Naive()
    f.observe(T0, 600.0, 0.0)
    assert f.net_wh(T0 + 10, 20) == pytest.approx(600.0 * 20 / 3600)


def test_older_than_two_days_is_forgotten() -> None:
    f = Naive()
    f.observe(T0, 3_000.0, 0.0)
    f.observe(T0 + DAY_S, 0.0, 0.0)
    assert f.net_wh(T0 + 2 * DAY_S, 60) == pytest.approx(0.0)  # yesterday (T0 + 1 day) was 0 W
    f.observe(T0 + 2 * DAY_S + 120, 1_000.0, 0.0)
    assert len(f) == 2  # the bucket at T0 is gone
    assert f.net_wh(T0 + 3 * DAY_S, 60) == pytest.approx(1_000.0 / 60)  # not the 3 kW of 3 days ago
    f.observe(T0, 9_000.0, 0.0)  # too old to keep
    assert len(f) == 2


def test_a_horizon_past_a_day_looks_back_whole_days() -> None:
    f = Naive()
    f.observe(T0 + 600, 1_200.0, 0.0)  # yesterday 00:10
    f.observe(T0 + DAY_S, 0.0, 0.0)  # today 00:00, the latest
    # tomorrow 00:10 looks back to yesterday 00:10 (today's 00:10 is not observed yet)
    assert f.net_wh(T0 + 2 * DAY_S + 600, 60) == pytest.approx(20.0)
    # a week ahead (the longest horizon): 1.2 kW for one minute of each day, 0 W the rest
    assert f.net_wh(T0 + DAY_S, 7 * DAY_S) == pytest.approx(7 * 20.0)


OBS = st.lists(st.tuples(st.floats(0, 4 * DAY_S), st.floats(0, 10_000), st.floats(0, 10_000)), max_size=60)


@PROPS
@given(OBS, st.floats(0, 4 * DAY_S), st.floats(0, DAY_S / 2), st.floats(0, DAY_S / 2))
def test_prop_the_forecast_is_additive_over_the_horizon(obs: list[tuple[float, float, float]], now: float,
                                                        a: float, b: float) -> None:
    f = Naive()
    for ts, pv, load in obs:
        f.observe(T0 + ts, pv, load)
    whole = f.net_wh(T0 + now, a + b)
    parts = f.net_wh(T0 + now, a) + f.net_wh(T0 + now + a, b)
    assert whole == pytest.approx(parts, rel=1e-6, abs=1e-3)


@PROPS
@given(OBS, st.floats(0, 4 * DAY_S), st.floats(0, DAY_S))
def test_prop_the_forecast_stays_within_what_was_observed(obs: list[tuple[float, float, float]], now: float,
                                                          horizon: float) -> None:
    f = Naive()
    for ts, pv, load in obs:
        f.observe(T0 + ts, pv, load)
    nets = [pv - load for _, pv, load in obs] or [0.0]
    wh = f.net_wh(T0 + now, horizon)
    assert min(min(nets), 0.0) * horizon / 3600 - 1e-6 <= wh <= max(max(nets), 0.0) * horizon / 3600 + 1e-6


@PROPS
@given(st.floats(-10_000, 10_000), st.floats(0, 4 * DAY_S), st.floats(0, DAY_S))
def test_prop_a_steady_site_forecasts_its_steady_net(net: float, ts: float, horizon: float) -> None:
    f = Naive()
    f.observe(T0 + ts, max(net, 0.0), max(-net, 0.0))
    assert f.net_wh(T0 + ts, horizon) == pytest.approx(net * horizon / 3600, rel=1e-9, abs=1e-6)


@settings(max_examples=20, deadline=None)
@given(st.lists(st.floats(0, 10 * DAY_S), min_size=1, max_size=50), st.integers(0, 4 * DAY_S // 30))
def test_prop_memory_is_bounded_to_two_days(jumps: list[float], steady: int) -> None:
    f = Naive()
    for k in range(steady):  # one reading each 30 s
        f.observe(T0 + k * 30, 100.0, 0.0)
    assert len(f) <= KEEP_BUCKETS
    for ts in jumps:
        f.observe(T0 + ts, 1.0, 0.0)
        assert len(f) <= KEEP_BUCKETS
    newest = max([T0 + ts for ts in jumps] + [T0 + (steady - 1) * 30])
    f.observe(newest, 1.0, 0.0)
    assert len(f) <= KEEP_BUCKETS
    assert all(b > newest // BUCKET_S - KEEP_BUCKETS for b in f._buckets)
