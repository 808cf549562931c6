"""Unlock sessions: a decrypted key kept in memory until it is locked or its time is up.

Pure (no I/O): the clock is injected. A session's key is never part of a repr.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from eth_account import Account
from eth_account.signers.local import LocalAccount

from .errors import AccountLocked


@dataclass
class Session:
    address: str
    expires_at: float  # wall clock, for replies
    deadline: float  # monotonic
    account: LocalAccount = field(repr=False)


class Sessions:
    def __init__(self, *, clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self._clock, self._wall = clock, wall
        self._by_address: dict[str, Session] = {}

    def __repr__(self) -> str:
        return f"Sessions({len(self._by_address)} unlocked)"

    def unlock(self, private_key: bytes, ttl_s: float) -> Session:
        account: LocalAccount = Account.from_key(private_key)
        s = Session(account.address, self._wall() + ttl_s, self._clock() + ttl_s, account)
        self._by_address[account.address] = s
        return s

    def lock(self, address: str) -> bool:
        return self._by_address.pop(address, None) is not None

    def expire(self) -> list[str]:
        now = self._clock()
        gone = [a for a, s in self._by_address.items() if s.deadline <= now]
        for a in gone:
            del self._by_address[a]
        return gone

    def is_unlocked(self, address: str) -> bool:
        self.expire()
        return address in self._by_address

    def account(self, address: str) -> LocalAccount:
        self.expire()
        s = self._by_address.get(address)
        if s is None:
            raise AccountLocked(f"account {address} is locked: unlock it first")
        return s.account

    def unlocked(self) -> list[str]:
        self.expire()
        return list(self._by_address)

    def clear(self) -> None:
        self._by_address.clear()


class TooManyAttempts(Exception):
    """Refused before any work: ``retry_after_s`` until the next attempt may be made."""

    def __init__(self, what: str, retry_after_s: float) -> None:
        super().__init__(what)
        self.what, self.retry_after_s = what, retry_after_s


class UnlockThrottle:
    """Unlock attempts per account and per calling site, counted when they START.

    Each attempt takes a slot in both windows before the slow scrypt work runs, so a burst
    of parallel guesses cannot all run: at most ``per_account`` attempts per account and
    ``per_site`` per site in ``window_s`` that did not succeed (running ones included). A
    successful attempt gives its slots back. Memory is bounded by the keys it is asked
    about (accounts of the keystore, sites of the allow-list), each holding at most its
    limit of timestamps.
    """

    def __init__(self, *, per_account: int = 5, per_site: int = 30, window_s: float = 300.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.per_account, self.per_site, self.window_s, self._clock = per_account, per_site, window_s, clock
        self._slots: dict[str, list[float]] = {}
        self.refused = 0

    def _live(self, key: str, now: float) -> list[float]:
        slots = [t for t in self._slots.get(key, ()) if t > now - self.window_s]
        if slots:
            self._slots[key] = slots
        else:
            self._slots.pop(key, None)
        return slots

    def begin(self, account: str, site: str) -> tuple[tuple[str, float], ...]:
        """Take a slot for one attempt (or raise :class:`TooManyAttempts`); pass the result
        to :meth:`succeeded` if the passphrase was right."""
        now = self._clock()
        keys = ((f"account:{account}", self.per_account, "this account"),
                (f"site:{site}", self.per_site, "this site"))
        for key, limit, what in keys:
            slots = self._live(key, now)
            if len(slots) >= limit:
                self.refused += 1
                raise TooManyAttempts(what, max(0.0, slots[0] + self.window_s - now))
        for key, _, _ in keys:
            self._slots.setdefault(key, []).append(now)
        return tuple((key, now) for key, _, _ in keys)

    def succeeded(self, token: tuple[tuple[str, float], ...]) -> None:
        for key, at in token:
            slots = self._slots.get(key)
            if slots and at in slots:
                slots.remove(at)
                if not slots:
                    del self._slots[key]
