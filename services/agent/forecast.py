"""A site's energy forecast, as pure rules (no I/O, no clock reads, no randomness).

Times are the site's (simulated) Unix seconds; powers are W; energies Wh. A forecast is
told what the site measured (:meth:`Forecast.observe`) and asked for the site's net
energy, production minus consumption, over a coming horizon (:meth:`Forecast.net_wh`).
"""

from __future__ import annotations

import heapq
import math
from typing import Protocol, runtime_checkable

__all__ = ["BUCKET_S", "DAY_S", "KEEP_BUCKETS", "Forecast", "Naive"]

#: Observations are averaged per bucket of this many site seconds.
BUCKET_S = 60
DAY_S = 86400
_DAY_BUCKETS = DAY_S // BUCKET_S
#: Buckets kept: two days.
KEEP_BUCKETS = 2 * _DAY_BUCKETS


@runtime_checkable
class Forecast(Protocol):
    def net_wh(self, now_sim: float, horizon_s: float) -> float:
        """Forecast production minus consumption over [now_sim, now_sim + horizon_s) (Wh)."""
        ...

    def observe(self, sim_ts: float, pv_w: float, load_w: float) -> None:
        """What the site produced (``pv_w``) and consumed (``load_w``) at ``sim_ts``."""
        ...


class Naive:
    """"Same as yesterday, else clear-sky / the present".

    Keeps observations (bounded: 2 days at <= 1 per 60 sim-s buckets). net_wh over
    [now, now+horizon): for each bucket, yesterday's mean (pv - load) at the same time of
    day if observed, else the latest observation's (pv - load), integrated in Wh. Buckets
    more than a day ahead look back whole days to the last one observed (the day before
    yesterday, ...). With no observation at all the forecast is 0.
    """

    def __init__(self) -> None:
        self._buckets: dict[int, tuple[float, int]] = {}  # bucket -> (sum of net W, count)
        self._heap: list[int] = []  # the same buckets, oldest first
        self._latest: tuple[float, float] | None = None  # (sim_ts, net W) of the latest observation

    def __len__(self) -> int:
        """Buckets held."""
        return len(self._buckets)

    def observe(self, sim_ts: float, pv_w: float, load_w: float) -> None:
        net = pv_w - load_w
        if not (math.isfinite(sim_ts) and math.isfinite(net)):
            return
        if self._latest is None or sim_ts >= self._latest[0]:
            self._latest = (sim_ts, net)
        bucket = math.floor(sim_ts / BUCKET_S)
        newest = math.floor(self._latest[0] / BUCKET_S)
        if bucket <= newest - KEEP_BUCKETS:
            return
        total, count = self._buckets.get(bucket, (0.0, 0))
        if count == 0:
            heapq.heappush(self._heap, bucket)
        self._buckets[bucket] = (total + net, count + 1)
        self._forget(newest)

    def _forget(self, newest: int) -> None:
        while self._heap and self._heap[0] <= newest - KEEP_BUCKETS:
            del self._buckets[heapq.heappop(self._heap)]

    def _mean_w(self, bucket: int) -> float | None:
        entry = self._buckets.get(bucket)
        return None if entry is None else entry[0] / entry[1]

    def _bucket_w(self, bucket: int, present_w: float, newest: int) -> float:
        """Net W expected in ``bucket``: the same time of day on the latest day observed
        before it, else ``present_w``."""
        past = bucket - _DAY_BUCKETS
        while past > newest:
            past -= _DAY_BUCKETS
        mean = self._mean_w(past)
        return present_w if mean is None else mean

    def net_wh(self, now_sim: float, horizon_s: float) -> float:
        if self._latest is None or not (horizon_s > 0 and math.isfinite(now_sim) and math.isfinite(horizon_s)):
            return 0.0
        present_w = self._latest[1]
        newest = math.floor(self._latest[0] / BUCKET_S)
        end = now_sim + horizon_s
        total, t = 0.0, now_sim
        while t < end:
            bucket = math.floor(t / BUCKET_S)
            upto = min((bucket + 1) * BUCKET_S, end)
            total += self._bucket_w(bucket, present_w, newest) * (upto - t) / 3600
            t = upto
        return total
