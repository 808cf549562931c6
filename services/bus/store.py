"""A service's own SQLite store: one file per service, WAL, one writer."""

from __future__ import annotations

import asyncio
import contextlib
import json
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
CREATE TABLE IF NOT EXISTS bus_offset_log (id INTEGER PRIMARY KEY, offsets TEXT NOT NULL);
CREATE VIEW IF NOT EXISTS bus_offsets_logged AS
  SELECT json_extract(e.value, '$[0]') AS source, json_extract(e.value, '$[1]') AS topic,
         json_extract(e.value, '$[2]') AS seq
    FROM bus_offset_log AS l, json_each(l.offsets) AS e;
CREATE VIEW IF NOT EXISTS bus_offsets_now AS
  SELECT source, topic, MAX(seq) AS seq FROM (
    SELECT source, topic, seq FROM bus_offsets UNION ALL SELECT source, topic, seq FROM bus_offsets_logged)
  GROUP BY source, topic;
"""
_FOLD = """
INSERT INTO bus_offsets (source, topic, seq)
  SELECT source, topic, MAX(seq) FROM bus_offsets_logged GROUP BY source, topic
  ON CONFLICT (source, topic) DO UPDATE SET seq = excluded.seq WHERE excluded.seq > bus_offsets.seq
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

    Subscribers record the last applied seq per (source, topic) with ``log_offsets``: one
    row of ``bus_offset_log`` per applied batch, however many sources it moves (an upsert
    per source and batch was a tenth of a subscriber's time with 300 sites); every
    ``FOLD_EVERY`` rows are folded into ``bus_offsets``. A seq only grows, so the offsets
    are the highest seq of each (source, topic) in either (the view ``bus_offsets_now``,
    and ``offsets()``). The request server keeps the replies of executed command ids in
    ``bus_commands`` (keyed ``<calling site>|<cmd_id>``, pruned by age), inside the same
    transaction as the state change they go with.
    """

    FOLD_EVERY = 32
    """Rows of ``bus_offset_log`` written by this store before they are folded."""

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
        self._logged = int(self.conn.execute("SELECT COUNT(*) FROM bus_offset_log").fetchone()[0])  # folded in time

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

    def savepoint(self) -> _Savepoint:
        """A part of the current task's transaction that can fail alone: on an exception its
        writes are rolled back, the ``on_rollback`` callbacks registered inside it run (the
        last first), those of ``on_commit`` are forgotten, and the exception goes on; the
        enclosing transaction stays open. May await inside (the transaction is held)."""
        if not self.in_transaction:
            raise BusError("a savepoint needs the current task's open transaction")
        return _Savepoint(self)

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
        return {(s, t): q for s, t, q in self.conn.execute("SELECT source, topic, seq FROM bus_offsets_now")}

    def log_offsets(self, conn: sqlite3.Connection, moved: dict[tuple[str, str], int]) -> None:
        """Record, in the current transaction, the offsets a batch moved (each the seq its
        (source, topic) reached, never lower than before)."""
        if not moved:
            return
        conn.execute("INSERT INTO bus_offset_log (offsets) VALUES (?)",
                     (json.dumps([[s, t, q] for (s, t), q in moved.items()], separators=(",", ":")),))
        self._logged += 1
        if self._logged >= self.FOLD_EVERY:
            conn.execute(_FOLD)
            conn.execute("DELETE FROM bus_offset_log")
            self._logged = 0

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.conn.close()


class _Savepoint:
    """``Store.savepoint()``: a class, not a generator, as a subscriber opens one per event."""

    __slots__ = ("store", "name", "commits", "rollbacks")

    def __init__(self, store: Store) -> None:
        self.store = store

    def __enter__(self) -> sqlite3.Connection:
        st = self.store
        self.name = f"sp{st._depth}"
        self.commits, self.rollbacks = len(st._commit_hooks), len(st._rollback_hooks)
        st.conn.execute(f"SAVEPOINT {self.name}")
        st._depth += 1
        return st.conn

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        st = self.store
        st._depth -= 1
        if exc_type is None:
            st.conn.execute(f"RELEASE {self.name}")
            return
        st.conn.execute(f"ROLLBACK TO {self.name}")
        st.conn.execute(f"RELEASE {self.name}")
        undo = st._rollback_hooks[self.rollbacks:]
        del st._rollback_hooks[self.rollbacks:]
        del st._commit_hooks[self.commits:]
        for fn in reversed(undo):
            fn()
