"""Chain state read from events, incrementally and reorg-aware: the Wh minted per account.

The ``Minted`` logs are read from the block after the last one indexed, in ranges of at
most ``logs_range`` blocks, and only up to ``head - confirmation_depth`` (what counts as
final), so a view never scans from the deployment and never shows a mint a reorg may
take back. The hash of the last indexed block is kept; when the chain no longer has
that block (a reorg deeper than the confirmation depth, or any reorg at depth 0), the
index rewinds to the newest checkpoint whose block is still in the chain (a few are kept
in memory), else reads again from the deployment. Totals and their block live in
memory (a read never waits for the store's writers); :meth:`MintedIndex.save` stores
them with their block and hash in one transaction, and a restart goes on from there.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import hashlib
import logging
import time
from collections.abc import Sequence
from typing import Any

from web3 import AsyncWeb3

from services.bus.store import Store

from . import ledger
from .node import Node, guard

log = logging.getLogger(__name__)

CHECKPOINTS = 16


class MintedIndex:
    def __init__(self, store: Store, *, logs_range: int) -> None:
        self.store = store
        self.logs_range = logs_range
        self.lock = asyncio.Lock()
        self.key = ""
        self.totals: dict[str, int] = {}  # account -> Wh minted to it, complete up to ``block``
        self.block = 0
        self.hash = ""
        self.calls = 0  # eth_getLogs calls
        self.rewinds = 0
        self._checkpoints: collections.deque[tuple[int, str, dict[str, int]]] = collections.deque(maxlen=CHECKPOINTS)
        self._verified: tuple[int, str] | None = None  # the head at the last reorg check
        self._verified_at = 0.0

    @staticmethod
    @functools.lru_cache(maxsize=64)
    def _accounts_key(wanted: tuple[str, ...]) -> str:
        """A short, stable name of a set of accounts (made once per set: asked on every read)."""
        return hashlib.sha256(",".join(wanted).encode()).hexdigest()[:16]

    def _load(self, key: str, deploy_block: int) -> None:
        conn = self.store.conn
        self.totals = dict(conn.execute("SELECT account, wh FROM chain_generated WHERE chain = ?", (key,)).fetchall())
        self.block = int(ledger.get_meta(conn, f"minted_block:{key}") or deploy_block - 1)
        self.hash = ledger.get_meta(conn, f"minted_hash:{key}") or ""
        self.key = key
        self._checkpoints.clear()
        self._verified = None

    async def catch_up(self, node: Node, token: Any, *, key: str, deploy_block: int, depth: int,
                       accounts: Sequence[str] | None = None) -> int:
        """Index up to ``head - depth``; returns the block the totals are complete to.
        ``accounts``: index only the mints to these (the node filters by the indexed
        recipient; a site's wallet needs its own, not every site's); another set of accounts
        is another index, read from the deployment (or from what was stored for that set)."""
        if accounts is not None:
            wanted = sorted({AsyncWeb3.to_checksum_address(a) for a in accounts})
            key = f"{key}:{self._accounts_key(tuple(wanted))}"
        async with self.lock:  # one catch-up at a time; the others then find it done
            if self.key != key:  # first use on this chain (or for these accounts): from what is stored
                self._load(key, deploy_block)
            head, head_hash = await node.head()
            if self.hash and (self._verified != (head, head_hash) or time.monotonic() - self._verified_at > 5.0):
                if await node.block_hash(self.block) != self.hash:
                    await self._rewind(node, deploy_block)
                self._verified, self._verified_at = (head, head_hash), time.monotonic()
            target = head - depth
            if self.block >= target:
                return self.block
            while self.block < target:
                upto = min(target, self.block + self.logs_range)
                if accounts is not None and not wanted:
                    self.block = upto  # no account: nothing of it to read
                    continue
                filters = {"argument_filters": {"to": wanted}} if accounts is not None else {}
                async with guard():
                    logs = await token.events.Minted().get_logs(from_block=self.block + 1, to_block=upto, **filters)
                self.calls += 1
                for ev in logs:
                    to = str(ev["args"]["to"])
                    self.totals[to] = self.totals.get(to, 0) + int(ev["args"]["amountWh"])
                self.block = upto
            self.hash = head_hash if self.block == head else (await node.block_hash(self.block) or "")
            self._checkpoints.append((self.block, self.hash, dict(self.totals)))
            return self.block

    async def _rewind(self, node: Node, deploy_block: int) -> None:
        self.rewinds += 1
        while self._checkpoints:
            block, bhash, totals = self._checkpoints.pop()
            if block < self.block and await node.block_hash(block) == bhash:
                log.warning("minted index: block %d was reorged away; back to block %d", self.block, block)
                self.block, self.hash, self.totals = block, bhash, dict(totals)
                self._checkpoints.append((block, bhash, dict(totals)))
                return
        log.warning("minted index: block %d was reorged away and no checkpoint is left; reading from the deployment "
                    "(block %d) again", self.block, deploy_block)
        self.block, self.hash, self.totals = deploy_block - 1, "", {}

    async def save(self) -> None:
        """Store the totals with their block and its hash (if they moved)."""
        async with self.lock:
            key, block, bhash, totals = self.key, self.block, self.hash, dict(self.totals)
        if not key or (ledger.get_meta(self.store.conn, f"minted_block:{key}") == str(block)
                       and ledger.get_meta(self.store.conn, f"minted_hash:{key}") == bhash):
            return
        async with self.store.atomic() as conn:
            conn.execute("DELETE FROM chain_generated WHERE chain = ?", (key,))
            conn.executemany("INSERT INTO chain_generated (chain, account, wh) VALUES (?, ?, ?)",
                             [(key, a, wh) for a, wh in totals.items()])
            ledger.set_meta(conn, f"minted_block:{key}", str(block))
            ledger.set_meta(conn, f"minted_hash:{key}", bhash)
