"""How often to try again, and how often to say so: the one backoff and the one rule for
repeated log lines, shared by every service that talks to something flaky.

- :class:`Backoff`: exponential, doubling from ``initial`` up to ``cap`` (optionally spread
  by a jitter), reset after a success.
- :class:`LogThrottle`: log the first occurrence of a kind, then only its 10th, 100th,
  1000th... (with the count so far); the rest are counted. A burst says itself once, a
  lasting fault is still heard from now and then, and the log stays bounded.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable, Hashable


class Backoff:
    """Exponential backoff: ``initial``, doubling, capped at ``cap``; ``reset()`` on success.

    ``failed()`` returns the wait before the next try (and sets :attr:`not_before`);
    ``jitter`` spreads each wait by up to that fraction either way (0.25: 0.75x to 1.25x),
    so that many clients of one server do not retry in step."""

    def __init__(self, initial: float = 0.2, cap: float = 10.0, *, jitter: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.initial, self.cap, self.jitter, self._clock = initial, cap, jitter, clock
        self.delay = 0.0
        """the last wait before jitter (0 before the first failure)"""
        self.not_before = 0.0
        self.failures = 0

    def failed(self) -> float:
        self.failures += 1
        self.delay = min(self.initial if self.delay == 0 else self.delay * 2, self.cap)
        wait = self.delay * (1 + self.jitter * (2 * random.random() - 1)) if self.jitter else self.delay
        self.not_before = self._clock() + wait
        return wait

    def reset(self) -> None:
        self.delay, self.not_before, self.failures = 0.0, 0.0, 0

    def wait_left(self) -> float:
        return max(0.0, self.not_before - self._clock())


def worth_logging(n: int) -> bool:
    """The rule: the ``n``-th occurrence of something is logged if it is the first or a power
    of ten (1, 10, 100, 1000...)."""
    if n < 1:
        return False
    while n % 10 == 0:
        n //= 10
    return n == 1


class LogThrottle:
    """Counts occurrences by kind; :meth:`hit` says whether this one is worth a log line
    (see :func:`worth_logging`). ``reset(kind)`` after a recovery starts the kind afresh.

    Bounded: at most ``max_kinds`` kinds are kept; any further kind is counted as ``other``."""

    def __init__(self, max_kinds: int = 64) -> None:
        self.counts: Counter[Hashable] = Counter()
        self.max_kinds = max_kinds

    def kind(self, kind: Hashable) -> Hashable:
        """The kind ``kind`` is counted as (``other`` once the bound is reached)."""
        if kind not in self.counts and len(self.counts) >= self.max_kinds:
            return "other"
        return kind

    def hit(self, kind: Hashable = "") -> bool:
        kind = self.kind(kind)
        self.counts[kind] += 1
        return worth_logging(self.counts[kind])

    def count(self, kind: Hashable = "") -> int:
        return self.counts.get(kind, 0)

    def reset(self, kind: Hashable = "") -> int:
        """Forget ``kind``; returns how many there had been (0: nothing to recover from)."""
        return self.counts.pop(kind, 0)
