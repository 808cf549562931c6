"""A service's own SQLite store: one file per service, WAL, one writer."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator

from .errors import BusError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS bus_offsets (source TEXT NOT NULL, topic TEXT NOT NULL, seq INTEGER NOT NULL,
                                        PRIMARY KEY (source, topic));
CREATE TABLE IF NOT EXISTS bus_commands (cmd_id TEXT PRIMARY KEY, type TEXT NOT NULL, reply TEXT NOT NULL,
                                         ts REAL NOT NULL);
CREATE INDEX IF NOT EXISTS bus_commands_ts ON bus_commands (ts);
"""


class Store:
    """``async with store.atomic() as conn:`` runs one BEGIN IMMEDIATE ... COMMIT that may
    await inside (other tasks wait for it); ``with store.transaction()`` is the same for
    code that does not await. Either joins a transaction the current task already holds.
    ``on_commit`` callbacks run after the outermost COMMIT (the publisher sends staged
    events there), ``on_rollback`` callbacks after a ROLLBACK, the last registered first
    (each undoes its own step, as an undo log). ``with store.savepoint():`` inside a
    transaction is a part of it that can fail alone: its writes and its callbacks are
    undone, the rest of the transaction goes on (the subscriber applies a batch of events
    so, one savepoint per event).

    Subscribers record the last applied seq per (source, topic) in ``bus_offsets``, and
    the request server keeps the replies of executed command ids in ``bus_commands``
    (keyed ``<calling site>|<cmd_id>``, pruned by age), inside the same transaction as
    the state change they go with.
    """

    def __init__(self, path: pathlib.Path | str) -> None:
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as e:
            raise BusError(f"cannot open store {self.path}: {e}") from e
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute("PRAGMA busy_timeout=5000")
        self.conn.executescript(_SCHEMA)
        self._lock = asyncio.Lock()
        self._owner: object | None = None
        self._depth = 0
        self._commit_hooks: list[Callable[[], None]] = []
        self._rollback_hooks: list[Callable[[], None]] = []

    @staticmethod
    def _me() -> object:
        try:
            return asyncio.current_task() or "sync"
        except RuntimeError:
            return "sync"

    @property
    def in_transaction(self) -> bool:
        """True when the current task holds the open transaction."""
        return self._depth > 0 and self._owner is self._me()

    def on_commit(self, fn: Callable[[], None]) -> None:
        if not self._depth:
            fn()
        else:
            self._commit_hooks.append(fn)

    def on_rollback(self, fn: Callable[[], None]) -> None:
        if self._depth:
            self._rollback_hooks.append(fn)

    @contextlib.contextmanager
    def _run(self) -> Iterator[sqlite3.Connection]:
        if self._depth:
            self._depth += 1
            try:
                yield self.conn
            finally:
                self._depth -= 1
            return
        self.conn.execute("BEGIN IMMEDIATE")
        self._depth, self._owner = 1, self._me()
        try:
            yield self.conn
        except BaseException:
            self._depth, self._owner = 0, None
            self.conn.execute("ROLLBACK")
            hooks, self._rollback_hooks, self._commit_hooks = self._rollback_hooks, [], []
            for fn in reversed(hooks):
                fn()
            raise
        self._depth, self._owner = 0, None
        self.conn.execute("COMMIT")
        hooks, self._commit_hooks, self._rollback_hooks = self._commit_hooks, [], []
        for fn in hooks:
            fn()

    @contextlib.contextmanager
    def savepoint(self) -> Iterator[sqlite3.Connection]:
        """A part of the current task's transaction that can fail alone: on an exception its
        writes are rolled back, the ``on_rollback`` callbacks registered inside it run (the
        last first), those of ``on_commit`` are forgotten, and the exception goes on; the
        enclosing transaction stays open. May await inside (the transaction is held)."""
        if not self.in_transaction:
            raise BusError("a savepoint needs the current task's open transaction")
        name = f"sp{self._depth}"
        commits, rollbacks = len(self._commit_hooks), len(self._rollback_hooks)
        self.conn.execute(f"SAVEPOINT {name}")
        self._depth += 1
        try:
            yield self.conn
        except BaseException:
            self._depth -= 1
            self.conn.execute(f"ROLLBACK TO {name}")
            self.conn.execute(f"RELEASE {name}")
            undo = self._rollback_hooks[rollbacks:]
            del self._rollback_hooks[rollbacks:]
            del self._commit_hooks[commits:]
            for fn in reversed(undo):
                fn()
            raise
        self._depth -= 1
        self.conn.execute(f"RELEASE {name}")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A transaction for code that does not await inside it."""
        if self._depth and not self.in_transaction:
            raise BusError("a synchronous transaction cannot wait for another task's transaction")
        with self._run() as conn:
            yield conn

    @contextlib.asynccontextmanager
    async def atomic(self) -> AsyncIterator[sqlite3.Connection]:
        """A transaction that may await inside; other tasks' transactions wait for it."""
        if self.in_transaction:
            with self._run() as conn:
                yield conn
            return
        async with self._lock:
            with self._run() as conn:
                yield conn

    def offsets(self) -> dict[tuple[str, str], int]:
        return {(s, t): q for s, t, q in self.conn.execute("SELECT source, topic, seq FROM bus_offsets")}

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.conn.close()
