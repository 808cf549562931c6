"""The publisher's durable log: every event is written here before it is sent, so a
subscriber that missed it (gap, restart, a publisher killed mid-send) can replay it."""

from __future__ import annotations

import sqlite3

from . import envelope
from .envelope import Envelope
from .events import Message
from .store import Store

_SCHEMA = """
CREATE TABLE IF NOT EXISTS bus_outbox (topic TEXT NOT NULL, seq INTEGER NOT NULL, data BLOB NOT NULL,
                                       PRIMARY KEY (topic, seq)) WITHOUT ROWID;
"""


class Outbox:
    """Assigns per-topic seqs (continuing after a restart) and keeps the encoded events."""

    def __init__(self, store: Store, source: str) -> None:
        self.store = store
        self.source = source
        store.conn.executescript(_SCHEMA)
        self.last: dict[str, int] = dict(store.conn.execute("SELECT topic, MAX(seq) FROM bus_outbox GROUP BY topic"))
        self.committed: dict[str, int] = dict(self.last)
        """The last seq per topic that is committed: the only ones heartbeats announce and
        replays serve (the store's connection would also see rows still in a transaction)."""

    def append(self, conn: sqlite3.Connection, body: Message,
               cause: str | None = None) -> tuple[Envelope, list[bytes]]:
        """Write one event inside the caller's open transaction; seqs roll back with it."""
        topic = envelope.topic_of(body.TYPE, self.source.split("/", 1)[0])
        seq = self.last.get(topic, 0) + 1
        env = envelope.make(body, source=self.source, seq=seq, cause=cause)
        frames = envelope.encode(env)
        conn.execute("INSERT INTO bus_outbox (topic, seq, data) VALUES (?, ?, ?)", (topic, seq, frames[1]))
        previous = self.last.get(topic)
        self.last[topic] = seq

        def undo() -> None:
            if previous is None:
                self.last.pop(topic, None)
            else:
                self.last[topic] = previous

        def done() -> None:
            if seq > self.committed.get(topic, 0):
                self.committed[topic] = seq

        self.store.on_rollback(undo)
        self.store.on_commit(done)
        return env, frames

    def prune(self, conn: sqlite3.Connection, keep: int) -> int:
        """Forget all but the last ``keep`` events of each topic; returns how many went.
        A subscriber further behind than that is told so by its replay (it counts a
        ``pruned`` drop) instead of waiting for events nobody has any more."""
        gone = 0
        for topic, last in self.committed.items():
            gone += conn.execute("DELETE FROM bus_outbox WHERE topic = ? AND seq <= ?", (topic, last - keep)).rowcount
        return gone

    def range(self, topic: str, after: int, upto: int, limit: int = 1000) -> list[bytes]:
        upto = min(upto, self.committed.get(topic, 0))
        rows = self.store.conn.execute(
            "SELECT data FROM bus_outbox WHERE topic = ? AND seq > ? AND seq <= ? ORDER BY seq LIMIT ?",
            (topic, after, upto, limit),
        )
        return [r[0] for r in rows]
