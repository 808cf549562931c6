"""Login sessions and the failed-login throttle (pure: the clock is passed in).

A session is a random token (``secrets.token_urlsafe``) kept in memory with its account
and expiry; the browser holds it in an HttpOnly, SameSite=Strict cookie. Tokens are
compared by dictionary lookup of their SHA-256, so the store never holds the cookie
value itself and a lookup does not leak timing about a token's prefix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
from collections import deque


@dataclasses.dataclass(frozen=True)
class Session:
    address: str
    expires_at: float


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


class SessionStore:
    """Token -> session, with expiry. ``now`` comes from the caller."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._by_digest: dict[str, Session] = {}

    def create(self, address: str, now: float, expires_at: float | None = None) -> tuple[str, Session]:
        token = secrets.token_urlsafe(32)
        s = Session(address=address, expires_at=min(expires_at or now + self.ttl_s, now + self.ttl_s))
        self._by_digest[_digest(token)] = s
        return token, s

    def get(self, token: str | None, now: float) -> Session | None:
        if not token or len(token) > 256:
            return None
        key = _digest(token)
        s = self._by_digest.get(key)
        if s is None:
            return None
        if s.expires_at <= now:
            del self._by_digest[key]
            return None
        return s

    def drop(self, token: str | None) -> Session | None:
        if not token or len(token) > 256:
            return None
        return self._by_digest.pop(_digest(token), None)

    def others_of(self, address: str, now: float) -> int:
        """Live sessions of ``address`` (to keep the key unlocked while one remains)."""
        return sum(1 for s in self._by_digest.values() if s.address.lower() == address.lower() and s.expires_at > now)

    def purge(self, now: float) -> int:
        dead = [k for k, s in self._by_digest.items() if s.expires_at <= now]
        for k in dead:
            del self._by_digest[k]
        return len(dead)

    def __len__(self) -> int:
        return len(self._by_digest)


class LoginThrottle:
    """Failed logins per key (an address, a client IP) within a window.

    Up to ``max_failures`` in ``window_s`` are free; then each further attempt must wait
    ``window_s * 2 ** (failures - max_failures)`` seconds after the last failure (failures
    counted over the last ``max_delay_s``), capped at ``max_delay_s``. A success clears the key.
    """

    def __init__(self, max_failures: int = 5, window_s: float = 60.0, max_delay_s: float = 300.0) -> None:
        self.max_failures, self.window_s, self.max_delay_s = max_failures, window_s, max_delay_s
        self._fails: dict[str, deque[float]] = {}

    def _recent(self, key: str, now: float) -> deque[float]:
        q = self._fails.get(key)
        if q is None:
            return deque()
        horizon = now - max(self.window_s, self.max_delay_s)
        while q and q[0] < horizon:
            q.popleft()
        if not q:
            del self._fails[key]
        return q

    def retry_after(self, keys: list[str], now: float) -> float:
        """Seconds to wait before another attempt is allowed (0: go ahead)."""
        wait = 0.0
        for key in keys:
            q = self._recent(key, now)
            in_window = [t for t in q if t >= now - self.window_s]
            n = len(q)
            if len(in_window) < self.max_failures and (n < self.max_failures or q[-1] < now - self.window_s):
                continue
            delay = min(self.max_delay_s, self.window_s * 2.0 ** max(0, n - self.max_failures))
            wait = max(wait, q[-1] + delay - now)
        return max(0.0, wait)

    def failed(self, keys: list[str], now: float) -> None:
        for key in keys:
            self._fails.setdefault(key, deque(maxlen=64)).append(now)

    def succeeded(self, keys: list[str]) -> None:
        for key in keys:
            self._fails.pop(key, None)
