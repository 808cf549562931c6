"""Pure bookkeeping of the meter service: which readings are believed and what they count,
when production is announced, which trade the relay follows, and the seller's cross-check
(loss beyond a tolerance, or a buyer that goes silent while energy flows). No
I/O: the service persists the results in its store, in the same transaction as the events
they cause.

Plausibility (:func:`judge`, :func:`judge_reading`): a counter may grow by at most what
the meter's rated power gives over the time between two readings. The window is measured
from the start of the baseline's read request to the end of this one, so it always covers
the time between the two samples, wherever inside its request the meter took each. Unused
allowance is carried up to one counter step (:data:`COUNTER_STEP_WH`, which absorbs the
whole-Wh rounding of a truthful counter), so over any run the Wh counted never exceed
``COUNTER_STEP_WH + rated power x the summed windows``. A truthful meter is never refused
while below its rated power, except that right after a re-base (which carries nothing) a
reading may wait for the next one to be counted; its energy is counted then. A reading that implies more, or a
counter that went backwards, counts nothing. Only when ``confirm`` consecutive readings
agree with each other (each plausible after the one before) is the new value believed:
it becomes the baseline and counting goes on from there; the jump itself counts nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from services.bus.states import LIVE


def counter_delta(last: int | None, now: int) -> tuple[int, bool]:
    """The raw step of a counter: Wh since the last reading, and whether it went backwards
    (reset or wrapped; the step then reads as counting on from zero). Whether a step is
    believed is :func:`judge`'s call, not this one's."""
    if last is None:
        return 0, False
    if now < last:
        return now, True
    return now - last, False


COUNTER_STEP_WH = 1
"""The resolution of a meter's counters: a truthful whole-Wh counter may show one step more
than its power gave over a window (it rounds down at both ends)."""
CONFIRM_READS = 3
"""Consecutive readings, consistent with each other, that make a backwards or implausible
counter value believed (a reset, a wrap, a replaced meter)."""

BELIEVED = frozenset({"ok", "first", "reset", "jump"})
"""Verdicts of a believed value: counted from (``ok``), a first baseline (``first``), or a
reset (``reset``: it went back) or jump (``jump``: it leapt forward) confirmed by
consecutive readings. The others refuse a value: ``backwards``, ``too_fast``."""


def allowance_wh(rate_w: float, window_s: float) -> float:
    """Wh a meter of ``rate_w`` (rated power x its time scale) can count in ``window_s`` wall seconds."""
    return rate_w * max(window_s, 0.0) / 3600.0


@dataclasses.dataclass(frozen=True)
class Suspect:
    """A counter value not believed yet: the latest of ``n`` consecutive readings that agree
    with each other, and when its read started."""

    value: int
    t: float
    n: int


@dataclasses.dataclass(frozen=True)
class CounterState:
    """One counter's baseline: the value last believed (``None``: none yet), when its read
    started (``None``: unknown, e.g. a store from before times were kept), the allowance
    carried from earlier windows, and a value waiting for confirmation."""

    value: int | None = None
    t: float | None = None
    credit_wh: float = float(COUNTER_STEP_WH)
    suspect: Suspect | None = None


@dataclasses.dataclass(frozen=True)
class Judgement:
    state: CounterState
    counted: int
    verdict: str

    @property
    def believed(self) -> bool:
        return self.verdict in BELIEVED


def judge(state: CounterState, value: int, t_start: float, t_end: float, rate_w: float,
          confirm: int = CONFIRM_READS) -> Judgement:
    """Judge one counter value read between ``t_start`` and ``t_end`` (wall seconds) against
    its baseline. ``rate_w``: the most Wh per hour of wall time the meter can count (rated
    power x the meter's time scale)."""
    if state.value is None or state.t is None:
        return Judgement(CounterState(value, t_start), 0, "first")
    delta, back = counter_delta(state.value, value)
    if not back:
        avail = min(state.credit_wh, COUNTER_STEP_WH) + allowance_wh(rate_w, t_end - state.t)
        if delta <= avail:
            return Judgement(CounterState(value, t_start, min(avail - delta, COUNTER_STEP_WH)), delta, "ok")
        if delta <= avail + COUNTER_STEP_WH and state.suspect is None:
            # one whole-Wh step more than the time allows: the counter's rounding (a step
            # crossed just after the baseline, as after a re-base, which carries no credit).
            # Counted later, not now: the baseline stays, so the next reading counts it
            # within its longer window, and nothing is ever counted beyond the allowance.
            return Judgement(state, 0, "ok")
    # not believed (yet): one more reading of a run that agrees with itself?
    s = state.suspect
    if s is not None and 0 <= value - s.value <= COUNTER_STEP_WH + allowance_wh(rate_w, t_end - s.t):
        s = Suspect(value, t_start, s.n + 1)
    else:
        s = Suspect(value, t_start, 1)
    if s.n >= confirm:
        # believed: the new baseline, with no allowance carried (each re-base handing out a
        # counter step would let a meter that resets on purpose count more than its power)
        return Judgement(CounterState(value, t_start, 0.0), 0, "reset" if back else "jump")
    return Judgement(dataclasses.replace(state, suspect=s), 0, "backwards" if back else "too_fast")


@dataclasses.dataclass(frozen=True)
class ReadingJudgement:
    """A whole reading: believed only when every counter it carries is. ``states`` is what
    to keep: the new baselines if believed (persist them with what they count); if not,
    the old baselines with the suspects updated (nothing to persist). ``counted`` is
    per counter (all 0 when refused), ``refused`` the reasons of the counters that were
    not believed, ``confirmed`` the verdicts of counters re-based (reset or jump)."""

    states: dict[str, CounterState]
    counted: dict[str, int]
    believed: bool
    refused: dict[str, str]
    confirmed: dict[str, str]


def judge_reading(states: Mapping[str, CounterState], values: Mapping[str, int | None], t_start: float,
                  t_end: float, rate_w: float, confirm: int = CONFIRM_READS) -> ReadingJudgement:
    """Judge every counter of one reading (``None``: the meter does not report it)."""
    judged = {k: judge(states.get(k, CounterState()), v, t_start, t_end, rate_w, confirm)
              for k, v in values.items() if v is not None}
    refused = {k: j.verdict for k, j in judged.items() if not j.believed}
    confirmed = {k: j.verdict for k, j in judged.items() if j.verdict in ("reset", "jump")}
    if not refused:
        new = {**states, **{k: j.state for k, j in judged.items()}}
        return ReadingJudgement(new, {k: j.counted for k, j in judged.items()}, True, {}, confirmed)
    kept = dict(states)
    for k, j in judged.items():
        old = states.get(k, CounterState())
        if not j.believed:
            kept[k] = j.state
        elif j.verdict in ("reset", "jump"):
            # confirmed, but the reading is not believed as a whole: the run stays confirmed
            # and the next consistent reading re-bases it
            kept[k] = dataclasses.replace(old, suspect=Suspect(values[k], t_start, confirm - 1))  # type: ignore[arg-type]
        else:
            kept[k] = dataclasses.replace(old, suspect=None)
    return ReadingJudgement(kept, {k: 0 for k in judged}, False, refused, {})


MAX_STEPS = 100
"""Most production steps one reading announces one by one (more, after a long pause: the highest only)."""


def production_steps(produced_wh: int, announced_wh: int, granularity_wh: int, *, catch_up: bool = False,
                     max_steps: int = MAX_STEPS) -> list[int]:
    """The cumulative production values to sign and announce now: each multiple of the
    granularity the counter passed since the last one announced, in order. A catch-up (the
    first announcement for a deployment's token, or more than ``max_steps`` at once)
    announces the highest only: the token mints the difference to its last mint, so one
    covers the ones below it."""
    top = produced_wh // granularity_wh * granularity_wh
    if top <= announced_wh:
        return []
    if catch_up or (top - announced_wh) // granularity_wh > max_steps:
        return [top]
    first = (announced_wh // granularity_wh + 1) * granularity_wh
    return list(range(first, top + 1, granularity_wh))


@dataclasses.dataclass(frozen=True)
class MeteredTrade:
    trade_id: str
    state: str
    seller_site: str
    buyer_site: str
    heard: float  # when we last heard it is live (status or heartbeat), publisher's clock
    omitted: bool = False  # the latest trade heartbeat did not list it
    flagged: bool = False  # this site, its seller, flagged it (mismatch or lag): its relay stays open


@dataclasses.dataclass(frozen=True)
class RelayDecision:
    closed: bool
    trade_id: str | None
    reason: str


def relay_decision(trades: Iterable[MeteredTrade], site: str, now: float, timeout_s: float,
                   role: str | None = None) -> RelayDecision:
    """Closed while a trade involving ``site`` is live, heard within ``timeout_s`` and not
    flagged; the lowest such trade id is the one followed. Otherwise open, with why.

    With ``role``, only the trades this meter's side of the site takes part in: a producer
    meter's where the site sells, a consumer meter's where it buys (a site with one meter
    of each, such as the utility's connection, sells and buys at once)."""
    mine = [t for t in trades if (site == t.seller_site and role != "consumer")
            or (site == t.buyer_site and role != "producer")]
    live = [t for t in mine if t.state in LIVE]
    fresh = [t for t in live if not t.flagged and not t.omitted and now - t.heard <= timeout_s]
    if fresh:
        t = sorted(fresh, key=lambda t: t.trade_id)[0]
        return RelayDecision(True, t.trade_id, f"trade {t.state}")
    if live:
        t = sorted(live, key=lambda t: (not t.flagged, t.trade_id))[0]
        why = ("trade flagged: the buyer's delivery does not match the export" if t.flagged else
               "trade no longer live in heartbeat" if t.omitted else f"no trade heartbeat for {timeout_s:g} s")
        return RelayDecision(False, t.trade_id, why)
    return RelayDecision(False, None, "no live trade")


def mismatch(buyer_wh: int, seller_wh: int, tolerance: float, slack_wh: int) -> bool:
    """True when the two ends of a trade differ by more than the loss tolerance (a share
    of what the seller gave) plus an absolute slack."""
    return abs(seller_wh - buyer_wh) > tolerance * max(seller_wh, buyer_wh) + slack_wh


def lagging(now: float, heard_at: float, exported_since_wh: float, lag_s: float, slack_wh: float) -> bool:
    """True when the buyer's signed delivery was last heard (or, none heard, the seller
    started counting) more than ``lag_s`` ago while the seller exported more than
    ``slack_wh`` since then: the buyer's meter is silent while energy flows."""
    return now - heard_at > lag_s and exported_since_wh > slack_wh


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
