"""The one backoff and the one log-throttling rule (moved here from tests/meter/test_drivers.py
with the backoff itself)."""

from __future__ import annotations

import random

from services.bus.retry import Backoff, LogThrottle, worth_logging


def test_backoff_doubles_and_caps() -> None:
    now = [0.0]
    b = Backoff(0.1, 1.0, clock=lambda: now[0])
    assert [b.failed() for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert b.wait_left() == 1.0
    now[0] = 0.5
    assert b.wait_left() == 0.5
    b.reset()
    assert b.wait_left() == 0 and b.failed() == 0.1


def test_backoff_starts_at_the_cap_when_the_first_wait_is_longer() -> None:
    assert [Backoff(90.0, 60.0).failed() for _ in range(2)] == [60.0, 60.0]


def test_backoff_jitter_spreads_each_wait_around_the_doubling() -> None:
    random.seed(7)
    b = Backoff(0.2, 5.0, jitter=0.25)
    for delay in (0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0):
        wait = b.failed()
        assert b.delay == delay and 0.75 * delay <= wait <= 1.25 * delay


def test_the_first_then_each_power_of_ten_is_logged() -> None:
    assert [n for n in range(1, 2001) if worth_logging(n)] == [1, 10, 100, 1000]
    assert not worth_logging(0)


def test_log_throttle_counts_by_kind_and_starts_afresh_after_a_reset() -> None:
    t = LogThrottle(max_kinds=2)
    assert [t.hit("a") for _ in range(10)] == [True] + [False] * 8 + [True]
    assert t.hit("b") and t.hit("c") and not t.hit("d")  # beyond the bound: one kind "other"
    assert t.count("other") == 2 and "c" not in t.counts
    r = LogThrottle()
    for _ in range(10):
        r.hit()
    assert r.reset() == 10 and r.reset() == 0
    assert r.hit() and r.count() == 1
