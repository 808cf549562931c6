"""Pure bookkeeping of the meter service: counter deltas, whole-kWh announcements, which
trade the relay follows, and the seller's cross-check. No I/O: the service persists the
results in its store, in the same transaction as the events they cause."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

LIVE = frozenset({"recorded", "delivering"})
ENDED = frozenset({"fulfilled", "closed", "settled", "failed"})


def counter_delta(last: int | None, now: int) -> tuple[int, bool]:
    """Wh since the last reading; a counter that went backwards was reset (or wrapped):
    it counts on from zero. Returns (delta, reset)."""
    if last is None:
        return 0, False
    if now < last:
        return now, True
    return now - last, False


@dataclasses.dataclass(frozen=True)
class KwhState:
    """``next_index``: the index the next whole kWh gets; ``accum_wh``: Wh counted
    towards it (may exceed 1000 while no account is configured to credit)."""

    next_index: int = 0
    accum_wh: int = 0


def whole_kwh(state: KwhState, delta_wh: int, *, can_announce: bool = True) -> tuple[KwhState, list[int]]:
    """Add ``delta_wh``; return the new state and the kWh indexes to announce now."""
    accum = state.accum_wh + max(delta_wh, 0)
    if not can_announce:
        return KwhState(state.next_index, accum), []
    n = accum // 1000
    return KwhState(state.next_index + n, accum - 1000 * n), list(range(state.next_index, state.next_index + n))


@dataclasses.dataclass(frozen=True)
class TradeView:
    trade_id: str
    state: str
    seller_site: str
    buyer_site: str
    heard: float  # when we last heard it is live (status or heartbeat), publisher's clock
    omitted: bool = False  # the latest trade heartbeat did not list it


@dataclasses.dataclass(frozen=True)
class RelayDecision:
    closed: bool
    trade_id: str | None
    reason: str


def relay_decision(trades: Iterable[TradeView], site: str, now: float, timeout_s: float) -> RelayDecision:
    """Closed while a trade involving ``site`` is live and heard within ``timeout_s``;
    the earliest-heard such trade is the one followed. Otherwise open, with why."""
    mine = [t for t in trades if site in (t.seller_site, t.buyer_site)]
    live = [t for t in mine if t.state in LIVE]
    fresh = [t for t in live if not t.omitted and now - t.heard <= timeout_s]
    if fresh:
        t = sorted(fresh, key=lambda t: t.trade_id)[0]
        return RelayDecision(True, t.trade_id, f"trade {t.state}")
    if live:
        t = live[0]
        why = "trade no longer live in heartbeat" if t.omitted else f"no trade heartbeat for {timeout_s:g} s"
        return RelayDecision(False, t.trade_id, why)
    return RelayDecision(False, None, "no live trade")


def mismatch(buyer_wh: int, seller_wh: int, tolerance: float, slack_wh: int) -> bool:
    """True when the two ends of a trade differ by more than the loss tolerance (a share
    of what the seller gave) plus an absolute slack."""
    return abs(seller_wh - buyer_wh) > tolerance * max(seller_wh, buyer_wh) + slack_wh


def interpolate(samples: list[tuple[float, int]], t: float) -> float | None:
    """The value of a cumulative series of (time, Wh) samples at time ``t``."""
    if not samples:
        return None
    if t <= samples[0][0]:
        return float(samples[0][1])
    for (t0, v0), (t1, v1) in zip(samples, samples[1:]):
        if t0 <= t <= t1:
            return v0 + (v1 - v0) * ((t - t0) / (t1 - t0) if t1 > t0 else 1.0)
    return float(samples[-1][1])
