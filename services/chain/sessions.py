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
