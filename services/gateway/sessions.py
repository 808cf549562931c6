"""Login sessions, kept in the gateway's own store, and the failed-login throttle.

A session is a random 32-byte token (``secrets.token_urlsafe(32)``); the browser holds it
in an HttpOnly, SameSite=Strict cookie. The store (table ``gateway_sessions`` of
``<data_dir>/gateway.sqlite``) keeps only the token's SHA-256 with the account and the
expiry, so sessions survive a gateway restart while the file never holds a token a
browser could present. A lookup goes by the digest (indexed) and the found digest is
compared again in constant time. Expired rows are refused on lookup and pruned.

The clock is passed in by the caller; the throttle is pure (memory only: a restart
forgets failed attempts, the chain service's own unlock throttle does not).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import secrets
from collections import deque

from services.bus.store import Store

MAX_TOKEN = 256

_SCHEMA = """
CREATE TABLE IF NOT EXISTS gateway_sessions (digest TEXT PRIMARY KEY, address TEXT NOT NULL,
                                             expires_at REAL NOT NULL, created_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS gateway_sessions_expiry ON gateway_sessions (expires_at);
CREATE INDEX IF NOT EXISTS gateway_sessions_address ON gateway_sessions (address COLLATE NOCASE);
"""


@dataclasses.dataclass(frozen=True)
class Session:
    address: str
    expires_at: float


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


class SessionStore:
    """Token -> session, with expiry, in ``store`` (the gateway service's SQLite store).
    Writes run in the store's transactions; ``now`` comes from the caller."""

    def __init__(self, store: Store, ttl_s: float) -> None:
        self.store, self.ttl_s = store, ttl_s
        store.conn.executescript(_SCHEMA)

    async def create(self, address: str, now: float, expires_at: float | None = None) -> tuple[str, Session]:
        token = secrets.token_urlsafe(32)
        s = Session(address=address, expires_at=min(expires_at or now + self.ttl_s, now + self.ttl_s))
        async with self.store.atomic() as conn:
            conn.execute("INSERT INTO gateway_sessions (digest, address, expires_at, created_at) VALUES (?, ?, ?, ?)",
                         (digest(token), s.address, s.expires_at, now))
        return token, s

    def get(self, token: str | None, now: float) -> Session | None:
        """The live session of ``token`` (an expired one is no session; pruning removes it)."""
        if not token or len(token) > MAX_TOKEN:
            return None
        key = digest(token)
        row = self.store.conn.execute("SELECT digest, address, expires_at FROM gateway_sessions WHERE digest = ?",
                                      (key,)).fetchone()
        if row is None or not hmac.compare_digest(row[0], key) or row[2] <= now:
            return None
        return Session(address=row[1], expires_at=row[2])

    async def drop(self, token: str | None) -> bool:
        if not token or len(token) > MAX_TOKEN:
            return False
        async with self.store.atomic() as conn:
            return conn.execute("DELETE FROM gateway_sessions WHERE digest = ?", (digest(token),)).rowcount > 0

    def others_of(self, address: str, now: float) -> int:
        """Live sessions of ``address`` (to keep the key unlocked while one remains)."""
        row = self.store.conn.execute("SELECT COUNT(*) FROM gateway_sessions WHERE address = ? COLLATE NOCASE "
                                      "AND expires_at > ?", (address, now)).fetchone()
        return int(row[0])

    async def purge(self, now: float) -> int:
        """Delete the expired sessions; returns how many."""
        async with self.store.atomic() as conn:
            return int(conn.execute("DELETE FROM gateway_sessions WHERE expires_at <= ?", (now,)).rowcount)

    def live(self, now: float) -> int:
        row = self.store.conn.execute("SELECT COUNT(*) FROM gateway_sessions WHERE expires_at > ?", (now,)).fetchone()
        return int(row[0])

    def __len__(self) -> int:
        """Stored sessions (expired ones count until they are pruned)."""
        return int(self.store.conn.execute("SELECT COUNT(*) FROM gateway_sessions").fetchone()[0])


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
