"""The chain service's tables in its store (``<data_dir>/chain.sqlite``).

Plain functions over a sqlite3 connection, called inside the store's transactions so
that a state change, the transactions it causes and the events it publishes commit
together. Wei amounts are kept as decimal text (they exceed SQLite's 64-bit integers).
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS chain_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS chain_txs (
    tx_hash TEXT NOT NULL, chain TEXT NOT NULL, account TEXT NOT NULL, nonce INTEGER NOT NULL,
    kind TEXT NOT NULL, ref TEXT NOT NULL, raw BLOB NOT NULL, status TEXT NOT NULL,
    sent INTEGER NOT NULL DEFAULT 0, block INTEGER, reason TEXT NOT NULL DEFAULT '',
    meta TEXT NOT NULL DEFAULT '{}', gas_used INTEGER, created REAL NOT NULL, last_sent REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (chain, tx_hash));
CREATE INDEX IF NOT EXISTS chain_txs_status ON chain_txs (status, account, nonce);
CREATE TABLE IF NOT EXISTS chain_tx_attempts (
    chain TEXT NOT NULL, tx_hash TEXT NOT NULL, hash TEXT NOT NULL, raw BLOB NOT NULL, fees TEXT NOT NULL,
    noop INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL, PRIMARY KEY (chain, hash));
CREATE INDEX IF NOT EXISTS chain_tx_attempts_tx ON chain_tx_attempts (chain, tx_hash);
CREATE TABLE IF NOT EXISTS chain_nonces (chain TEXT NOT NULL, account TEXT NOT NULL, next INTEGER NOT NULL,
                                         PRIMARY KEY (chain, account));
CREATE TABLE IF NOT EXISTS chain_funded (chain TEXT NOT NULL, account TEXT NOT NULL, tx_hash TEXT NOT NULL,
                                         PRIMARY KEY (chain, account));
CREATE TABLE IF NOT EXISTS chain_generated (chain TEXT NOT NULL, account TEXT NOT NULL, wh INTEGER NOT NULL,
                                            PRIMARY KEY (chain, account));
"""
# The operator's job tables live with their jobs (services/chain/jobs); a store from
# contracts v1 keeps its old tables (chain_mints, chain_trades, chain_deliveries) unread.


TX_EXTRA = (  # columns added to chain_txs for real chains (a store from before gets them with defaults)
    ("intent", "TEXT NOT NULL DEFAULT '{}'"),  # the unsigned transaction (to, value, data, gas, chainId)
    ("current", "TEXT NOT NULL DEFAULT ''"),  # hash of the attempt to broadcast ('' = tx_hash)
    ("fees", "TEXT NOT NULL DEFAULT '{}'"),  # the current attempt's fee fields
    ("noop", "INTEGER NOT NULL DEFAULT 0"),  # the current attempt is a no-op self-transfer filling the nonce
    ("attempts", "INTEGER NOT NULL DEFAULT 1"),
    ("signed_at", "REAL NOT NULL DEFAULT 0"),
    ("signed_head", "INTEGER NOT NULL DEFAULT 0"),
    ("mined_hash", "TEXT NOT NULL DEFAULT ''"),  # the attempt that was mined
    ("block_hash", "TEXT NOT NULL DEFAULT ''"),
    ("ok", "INTEGER"),  # the mined receipt's status
    ("note", "TEXT NOT NULL DEFAULT ''"),  # the latest thing that happened to it (a refusal, a fee raise, a reorg)
    ("final_at", "REAL"),
)


def init(conn: sqlite3.Connection) -> None:
    conn.executescript(SCHEMA)
    have = {r[1] for r in conn.execute("PRAGMA table_info(chain_txs)")}
    for name, decl in TX_EXTRA:
        if name not in have:
            conn.execute(f"ALTER TABLE chain_txs ADD COLUMN {name} {decl}")


def get_meta(conn: sqlite3.Connection, key: str) -> str | None:
    row = conn.execute("SELECT value FROM chain_meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


def set_meta(conn: sqlite3.Connection, key: str, value: str) -> None:
    conn.execute("INSERT INTO chain_meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                 (key, value))


def next_seq(conn: sqlite3.Connection, table: str) -> int:
    row = conn.execute(f"SELECT COALESCE(MAX(seq), 0) + 1 FROM {table}").fetchone()  # noqa: S608 - fixed names
    return int(row[0])


# --- transactions ---------------------------------------------------------------------

TX_COLUMNS = ("tx_hash", "chain", "account", "nonce", "kind", "ref", "raw", "status", "sent", "block", "reason",
              "meta", "gas_used", "created", "last_sent") + tuple(name for name, _ in TX_EXTRA)

OPEN = ("pending", "mined")
"""A transaction's life: ``pending`` (signed, perhaps sent, not in a block we know of),
``mined`` (in a block, not yet ``confirmation_depth`` deep), then final: ``confirmed`` or
``failed``. A reorg turns ``mined`` back into ``pending``."""


def tx_row(row: tuple[Any, ...] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    d = dict(zip(TX_COLUMNS, row, strict=True))
    d["meta"] = json.loads(d["meta"])
    d["intent"] = json.loads(d["intent"])
    d["fees"] = json.loads(d["fees"])
    d["current"] = d["current"] or d["tx_hash"]
    return d


def get_tx(conn: sqlite3.Connection, tx_hash: str) -> dict[str, Any] | None:
    return tx_row(conn.execute(f"SELECT {', '.join(TX_COLUMNS)} FROM chain_txs WHERE tx_hash = ?", (tx_hash,)).fetchone())


def pending_txs(conn: sqlite3.Connection, account: str | None = None) -> list[dict[str, Any]]:
    q = f"SELECT {', '.join(TX_COLUMNS)} FROM chain_txs WHERE status IN ('pending', 'mined')"
    args: tuple[Any, ...] = ()
    if account is not None:
        q += " AND lower(account) = lower(?)"
        args = (account,)
    rows = conn.execute(q + " ORDER BY account, nonce", args).fetchall()
    return [r for r in (tx_row(x) for x in rows) if r is not None]


def count_pending(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT COUNT(*) FROM chain_txs WHERE status IN ('pending', 'mined')").fetchone()[0])


def recent_txs(conn: sqlite3.Connection, since: float, account: str | None = None) -> list[dict[str, Any]]:
    """Transactions that became final after ``since`` (a time.time())."""
    q = f"SELECT {', '.join(TX_COLUMNS)} FROM chain_txs WHERE status IN ('confirmed', 'failed') AND final_at >= ?"
    args: tuple[Any, ...] = (since,)
    if account is not None:
        q += " AND lower(account) = lower(?)"
        args += (account,)
    rows = conn.execute(q + " ORDER BY account, nonce", args).fetchall()
    return [r for r in (tx_row(x) for x in rows) if r is not None]


def attempts(conn: sqlite3.Connection, chain: str, tx_hash: str) -> list[dict[str, Any]]:
    """Every signed version of one transaction (same nonce), newest first."""
    rows = conn.execute("SELECT hash, raw, fees, noop, created FROM chain_tx_attempts WHERE chain = ? AND tx_hash = ? "
                        "ORDER BY created DESC, rowid DESC", (chain, tx_hash)).fetchall()
    return [{"hash": h, "raw": raw, "fees": json.loads(f), "noop": bool(n), "created": c} for h, raw, f, n, c in rows]
