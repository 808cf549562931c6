"""A site's figures per day and for a range: energy produced, consumed, traded locally and
with the utility, self-sufficiency and money saved (pure: no I/O).

Inputs (kept by :mod:`services.gateway.history`):

- **energy buckets**: per 15 minutes of the site's clock (``BUCKET_S``), the energy the
  site's meters counted: ``produced`` (a producer meter's signed counter of PV energy into
  its batteries; a meter without one: its ``pv_w`` over time) and ``consumed`` (the
  readings' ``load_w`` over time);
- **settlements**: the increments of the chain's ``chain.settled`` / ``chain.trade_closed``
  of the account's trades (cumulative delivered Wh and paid wei per trade, turned into
  what each settlement added), placed in the bucket of the settlement's site time, each
  with the site of the trade's other party.

**Local or utility**: the utility grid is a market participant of its own, a site named
``utility_site`` (``GRIDTRADE_UTILITY_SITE``, default ``utility``) whose agent buys at the
feed-in and sells at the retail tariff. A settled trade whose other party is on that site is
the micro-grid's exchange with the grid (``bought_utility`` / ``sold_utility``); every other
settled trade is local (``bought_local`` / ``sold_local``). Both are counted from the
chain's settlements, Wh and wei.

All energy is counted in whole milli-Wh (mWh) here, so every sum is exact; the API shows Wh
with three decimals. Days are days of the site's clock (Unix seconds of the simulated clock,
shifted by ``tz_offset_s``, a multiple of 15 minutes).

**The energy balance**, per bucket::

    net               = produced + bought_local + bought_utility - sold_local - sold_utility - consumed
    unmatched_import  = max(0, -net)
    unmatched_export  = max(0,  net)

so for every bucket, and therefore for every day and range (sums of buckets), exactly::

    produced + bought_local + bought_utility + unmatched_import
        == consumed + sold_local + sold_utility + unmatched_export

The unmatched energy is what neither production nor any settled trade accounts for: in the
simulated sites, what the site's own battery gave (import) or stored (export), and energy
curtailed or load shed; a trade delivered in one quarter hour and settled in another; at a
real site, also a grid connection outside the market. A day's unmatched import and export
are the sums of its buckets' (a surplus at noon does not cancel the evening's deficit).

**Self-sufficiency**: the share of consumption covered by the site's own production and
local trades, not by the utility nor the unmatched import. Per bucket, production and what
was bought locally cover consumption first: ``covered = min(consumed, produced +
bought_local)``; the rest, ``consumed - covered``, came from the utility or the unmatched
import (the balance guarantees that much of them). A day's (or range's) self-sufficiency is
``sum(covered) / sum(consumed)`` over its buckets (None when nothing was consumed). Energy
sold out of a battery in a bucket does not count as consumption covered from outside.

**Money** (wei; ``cost(e, tariff) = e_mWh * tariff_wei_per_kWh // 10**6``, rounded down):

- baseline (utility only): ``cost(consumed, retail) - cost(produced, feed_in)``: everything
  consumed bought at the retail tariff, everything produced sold at the feed-in tariff;
- actual: ``bought_utility_wei - sold_utility_wei`` (what was paid to and earned from the
  utility in its trades, as the chain settled them) ``+ bought_local_wei - sold_local_wei``,
  plus the day's NET unmatched energy at the tariffs: ``cost(max(0, unmatched_import -
  unmatched_export), retail) - cost(max(0, unmatched_export - unmatched_import),
  feed_in)``. The unmatched flows of a day are mostly the site's battery charging in one
  quarter hour and giving it back in another; pricing both ways would count energy bought
  once twice. What the day took out of the battery (net) is valued as if bought back at
  retail, what it left there as if sold at feed-in;
- saved = baseline - actual (negative: the site did worse than with the utility alone).

Each day's money is computed from that day's sums; the total row's money is the sum of the
days' (so the CSV's columns add up).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import time
from collections.abc import Iterable

BUCKET_S = 900
DAY_S = 86400
MAX_DAYS = 366
MWH_PER_WH = 1000


@dataclasses.dataclass(frozen=True)
class Tariffs:
    retail_wei_per_kwh: int
    feed_in_wei_per_kwh: int


@dataclasses.dataclass(frozen=True)
class Settlement:
    """What one settlement of a trade of the account added."""

    sim_at: float
    wh: int
    wei: int
    sold: bool  # the account is the trade's seller (else its buyer)
    utility: bool = False  # the other party is on the utility's site


ENERGY = ("produced_mwh", "consumed_mwh", "bought_local_mwh", "sold_local_mwh", "bought_local_wei", "sold_local_wei",
          "bought_utility_mwh", "sold_utility_mwh", "bought_utility_wei", "sold_utility_wei", "unmatched_import_mwh",
          "unmatched_export_mwh", "covered_mwh")


@dataclasses.dataclass
class Row:
    day: str  # YYYY-MM-DD of the site's clock, or "total"
    start: int  # site time, Unix s (inclusive)
    end: int  # site time, Unix s (exclusive)
    produced_mwh: int = 0
    consumed_mwh: int = 0
    bought_local_mwh: int = 0
    sold_local_mwh: int = 0
    bought_local_wei: int = 0
    sold_local_wei: int = 0
    bought_utility_mwh: int = 0
    sold_utility_mwh: int = 0
    bought_utility_wei: int = 0
    sold_utility_wei: int = 0
    unmatched_import_mwh: int = 0
    unmatched_export_mwh: int = 0
    covered_mwh: int = 0  # consumption covered by production and local trades, per bucket
    baseline_cost_wei: int = 0
    actual_cost_wei: int = 0
    saved_wei: int = 0

    @property
    def self_sufficiency(self) -> float | None:
        if self.consumed_mwh <= 0:
            return None
        return self.covered_mwh / self.consumed_mwh

    def add_energy(self, other: Row) -> None:
        for f in ENERGY:
            setattr(self, f, getattr(self, f) + getattr(other, f))


class RangeError(ValueError):
    """A range the figures cannot be computed for (its message is for people)."""


def check_range(start: int, end: int, tz_offset_s: int = 0) -> None:
    if tz_offset_s % BUCKET_S or abs(tz_offset_s) > 14 * 3600:
        raise RangeError("tz_offset_s is a whole number of quarter hours between -14 and +14 hours, in seconds")
    if end <= start:
        raise RangeError("'to' must be after 'from'")
    if end - start > MAX_DAYS * DAY_S:
        raise RangeError(f"a range covers at most {MAX_DAYS} days")


def day_of(sim: float, tz_offset_s: int = 0) -> int:
    """The start (site time, Unix s) of the day that holds ``sim``."""
    return int((sim + tz_offset_s) // DAY_S) * DAY_S - tz_offset_s


def bucket_of(sim: float) -> int:
    return int(sim // BUCKET_S) * BUCKET_S


def balance(produced: int, consumed: int, bought: int, sold: int) -> tuple[int, int]:
    """(unmatched_import, unmatched_export) of one bucket: the residual of the balance above
    (``bought``/``sold``: local and utility trades together)."""
    net = produced + bought - sold - consumed
    return max(0, -net), max(0, net)


def cost_wei(mwh: int, wei_per_kwh: int) -> int:
    return mwh * wei_per_kwh // 1_000_000


def money(row: Row, t: Tariffs) -> None:
    """Fill in a row's baseline, actual cost and savings from its sums."""
    row.baseline_cost_wei = cost_wei(row.consumed_mwh, t.retail_wei_per_kwh) - cost_wei(row.produced_mwh,
                                                                                         t.feed_in_wei_per_kwh)
    net = row.unmatched_import_mwh - row.unmatched_export_mwh  # what the day took from the battery (or shed)
    row.actual_cost_wei = (row.bought_utility_wei - row.sold_utility_wei
                           + row.bought_local_wei - row.sold_local_wei
                           + cost_wei(max(net, 0), t.retail_wei_per_kwh)
                           - cost_wei(max(-net, 0), t.feed_in_wei_per_kwh))
    row.saved_wei = row.baseline_cost_wei - row.actual_cost_wei


# a bucket's sums, by index
PRODUCED, CONSUMED, BOUGHT_L, SOLD_L, BOUGHT_L_WEI, SOLD_L_WEI, BOUGHT_U, SOLD_U, BOUGHT_U_WEI, SOLD_U_WEI = range(10)


def compute(buckets: Iterable[tuple[int, int, int]], settlements: Iterable[Settlement], start: int, end: int,
            tariffs: Tariffs, tz_offset_s: int = 0) -> tuple[list[Row], Row]:
    """Per-day rows (each day that meets ``[start, end)``, clipped to it) and the total row.

    ``buckets``: (bucket start in site time, produced mWh, consumed mWh). A bucket or a
    settlement belongs to the range when its time is in ``[start, end)``."""
    check_range(start, end, tz_offset_s)
    per: dict[int, list[int]] = {}

    def slot(b: int) -> list[int]:
        return per.setdefault(b, [0] * 10)

    for b, produced, consumed in buckets:
        if start <= b < end:
            s = slot(bucket_of(b))
            s[PRODUCED] += produced
            s[CONSUMED] += consumed
    for st in settlements:
        if start <= st.sim_at < end:
            s = slot(bucket_of(st.sim_at))
            if st.sold:
                e, w = (SOLD_U, SOLD_U_WEI) if st.utility else (SOLD_L, SOLD_L_WEI)
            else:
                e, w = (BOUGHT_U, BOUGHT_U_WEI) if st.utility else (BOUGHT_L, BOUGHT_L_WEI)
            s[e] += st.wh * MWH_PER_WH
            s[w] += st.wei
    days: dict[int, Row] = {}
    d = day_of(start, tz_offset_s)
    while d < end:
        days[d] = Row(day=day_name(d, tz_offset_s), start=max(d, start), end=min(d + DAY_S, end))
        d += DAY_S
    for b, s in sorted(per.items()):
        row = days[day_of(max(b, start), tz_offset_s)]
        imp, exp = balance(s[PRODUCED], s[CONSUMED], s[BOUGHT_L] + s[BOUGHT_U], s[SOLD_L] + s[SOLD_U])
        row.produced_mwh += s[PRODUCED]
        row.consumed_mwh += s[CONSUMED]
        row.bought_local_mwh += s[BOUGHT_L]
        row.sold_local_mwh += s[SOLD_L]
        row.bought_local_wei += s[BOUGHT_L_WEI]
        row.sold_local_wei += s[SOLD_L_WEI]
        row.bought_utility_mwh += s[BOUGHT_U]
        row.sold_utility_mwh += s[SOLD_U]
        row.bought_utility_wei += s[BOUGHT_U_WEI]
        row.sold_utility_wei += s[SOLD_U_WEI]
        row.unmatched_import_mwh += imp
        row.unmatched_export_mwh += exp
        row.covered_mwh += min(s[CONSUMED], s[PRODUCED] + s[BOUGHT_L])
    total = Row(day="total", start=start, end=end)
    for row in days.values():
        money(row, tariffs)
        total.add_energy(row)
        total.baseline_cost_wei += row.baseline_cost_wei
        total.actual_cost_wei += row.actual_cost_wei
        total.saved_wei += row.saved_wei
    return list(days.values()), total


def day_name(day_start: int, tz_offset_s: int = 0) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(day_start + tz_offset_s))


def wh(mwh: int) -> float:
    """mWh as Wh (three decimals, exact in a float up to 2**53 mWh)."""
    return mwh / MWH_PER_WH


# --- integrating readings into buckets (the history feeds this) ---------------------------------


def spread(t0: float, t1: float, wh_: float) -> list[tuple[int, float]]:
    """``wh_`` that flowed evenly in ``(t0, t1]`` of site time, split over the buckets it spans."""
    if t1 <= t0:
        return [(bucket_of(t1), wh_)] if wh_ else []
    out: list[tuple[int, float]] = []
    t = t0
    while t < t1:
        b = bucket_of(t)
        nxt = min(b + BUCKET_S, t1)
        out.append((b, wh_ * (nxt - t) / (t1 - t0)))
        t = nxt
    return out


# --- as CSV -----------------------------------------------------------------------------------

CSV_HEADER = ["day (site time)", "from (site time, UTC)", "to (site time, UTC)", "produced (kWh)", "consumed (kWh)",
              "bought locally (kWh)", "sold locally (kWh)", "bought from the utility (kWh)",
              "sold to the utility (kWh)", "unmatched import (kWh)", "unmatched export (kWh)",
              "paid locally (Ether)", "earned locally (Ether)", "paid to the utility (Ether)",
              "earned from the utility (Ether)", "self-sufficiency (%)", "utility-only cost (Ether)",
              "actual cost (Ether)", "saved (Ether)"]


def _kwh(mwh: int) -> str:
    """mWh as kWh, every digit (6 decimals at most)."""
    neg, a = mwh < 0, abs(mwh)
    whole, frac = divmod(a, 1_000_000)
    text = f"{whole}.{frac:06d}".rstrip("0").rstrip(".")
    return ("-" if neg else "") + text


def _ether(wei: int) -> str:
    neg, a = wei < 0, abs(wei)
    whole, frac = divmod(a, 10**18)
    text = f"{whole}.{frac:018d}".rstrip("0").rstrip(".")
    return ("-" if neg else "") + text


def _iso(ts: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def to_csv(days: list[Row], total: Row) -> str:
    """The figures as CSV: one line per day and the total; exact kWh and Ether."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerow(CSV_HEADER)
    for r in [*days, total]:
        w.writerow(csv_row(r))
    return buf.getvalue()


def csv_row(r: Row) -> list[str]:
    """One row's CSV fields (:data:`CSV_HEADER`)."""
    ss = r.self_sufficiency
    return [r.day, _iso(r.start), _iso(r.end), _kwh(r.produced_mwh), _kwh(r.consumed_mwh),
            _kwh(r.bought_local_mwh), _kwh(r.sold_local_mwh), _kwh(r.bought_utility_mwh),
            _kwh(r.sold_utility_mwh), _kwh(r.unmatched_import_mwh), _kwh(r.unmatched_export_mwh),
            _ether(r.bought_local_wei), _ether(r.sold_local_wei), _ether(r.bought_utility_wei),
            _ether(r.sold_utility_wei), "" if ss is None else f"{ss * 100:.1f}",
            _ether(r.baseline_cost_wei), _ether(r.actual_cost_wei), _ether(r.saved_wei)]
