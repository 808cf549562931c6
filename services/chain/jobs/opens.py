"""Agreed trades -> ``open`` with both parties' signatures. The auction's ``TradeAgreed``
carries the seller's signed offer and the buyer's signed bid; the market contract checks
both (and the price, the amounts, the expiries and what the offer and the bid have
filled already), so the operator cannot open a trade its parties did not sign. The
agreements that arrive within ``open_window_s`` (an auction round agrees many trades at
once) are opened together in one ``openBatch``, which shares the transaction's base cost
and the contract's cold reads; the contract opens all of a batch or none, so when the chain
refuses a batch its trades are opened one by one, each refused alone with its own reason.
The trades table here is also what the settlement and close jobs follow."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from web3 import AsyncWeb3

from services.bus import events as E
from services.bus import typed
from services.bus.envelope import caused_by

from .. import bindings
from ..errors import TxRejected
from ..node import guard
from . import Job

log = logging.getLogger(__name__)


class Opens(Job):
    kinds = ("open", "open_batch")
    SCHEMA: ClassVar[str] = """
CREATE TABLE IF NOT EXISTS job_trades (
    trade_id TEXT PRIMARY KEY, seller TEXT NOT NULL, buyer TEXT NOT NULL, buyer_site TEXT NOT NULL,
    wh INTEGER NOT NULL, price TEXT NOT NULL, seq INTEGER NOT NULL,
    offer TEXT NOT NULL DEFAULT '', offer_sig TEXT NOT NULL DEFAULT '', bid TEXT NOT NULL DEFAULT '',
    bid_sig TEXT NOT NULL DEFAULT '',
    open_state TEXT NOT NULL DEFAULT 'queued', reason TEXT NOT NULL DEFAULT '',
    deadline INTEGER NOT NULL DEFAULT 0,
    settled_wh INTEGER NOT NULL DEFAULT 0, settle_tx TEXT NOT NULL DEFAULT '',
    close_state TEXT NOT NULL DEFAULT 'none', close_wh INTEGER NOT NULL DEFAULT 0,
    closed_published INTEGER NOT NULL DEFAULT 0, cause TEXT, close_cause TEXT);
"""
    # A trade's transactions are in chain_txs (ref: its id, or a batch's ids); a store made before they
    # were dropped here keeps the unread open_tx and close_tx columns, filled by their defaults.
    # open_state: queued -> sent -> done | failed. close_state: none -> queued (the auction
    # closed it) -> sent -> closing (dispute window) -> finalizing -> done.

    def __init__(self, op: Any) -> None:
        super().__init__(op)
        self._alone: set[str] = set()  # trade ids whose batch reverted once mined: opened one by one

    def record(self, env: Any, conn: Any) -> bool:
        body = env.body
        if isinstance(body, E.TradeAgreed):
            self.insert(conn, body, env.id)
            return True
        return False

    @staticmethod
    def insert(conn: Any, t: E.TradeAgreed | E.TradeStatus, cause: str) -> None:
        offer = getattr(t, "offer", None)
        bid = getattr(t, "bid", None)
        seq = int(conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM job_trades").fetchone()[0])
        conn.execute(
            "INSERT OR IGNORE INTO job_trades (trade_id, seller, buyer, buyer_site, wh, price, seq, offer, offer_sig, "
            "bid, bid_sig, cause) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (t.trade_id, AsyncWeb3.to_checksum_address(t.seller), AsyncWeb3.to_checksum_address(t.buyer),
             t.buyer_site, t.wh, str(t.price_wei_per_kwh), seq, offer.model_dump_json() if offer else "",
             getattr(t, "offer_signature", None) or "", bid.model_dump_json() if bid else "",
             getattr(t, "bid_signature", None) or "", cause))

    async def on_chain(self, trade_id: str) -> tuple[int, int, int, int]:
        """(status, settled Wh, deadline, closingAt) of a trade in the market contract."""
        op = self.op
        assert op.dep is not None
        async with guard():
            t = await op.dep.market.functions.trades(typed.trade_key(trade_id)).call(
                block_identifier=op.txm.final_block if op.txm else "latest")
        return int(t[2]), int(t[4]), int(t[6]), int(t[7])

    async def step(self) -> None:
        op = self.op
        assert op.dep is not None and op.txm is not None and op.operator is not None
        rows = self.conn.execute(
            "SELECT trade_id, buyer, wh, price, offer, offer_sig, bid, bid_sig, cause FROM job_trades "
            "WHERE open_state = 'queued' ORDER BY seq LIMIT 100").fetchall()
        if self.collecting(bool(rows), op.settings.open_window_s):
            return  # nothing to open, or an auction round's trades still coming: opened together
        ready: list[tuple[str, str, tuple[Any, ...], str | None]] = []  # (trade id, buyer, Opening, cause)
        for tid, buyer, wh, price, offer, offer_sig, bid, bid_sig, cause in rows:
            status, _, _, _ = await self.on_chain(tid)
            async with op.store.atomic() as conn, caused_by(cause):
                if status != bindings.STATUS_NONE:
                    conn.execute("UPDATE job_trades SET open_state = 'done' WHERE trade_id = ?", (tid,))
                    await op.publish(E.TradeRecorded(trade_id=tid, tx_hash=""))
                    continue
                if not (offer and offer_sig and bid and bid_sig):
                    why = "the trade carries no signed offer and bid: the market opens only what both parties signed"
                    conn.execute("UPDATE job_trades SET open_state = 'failed', reason = ? WHERE trade_id = ?",
                                 (why, tid))
                    await op.fail_job("open", tid, buyer, why)
                    continue
            o, b = typed.Offer.model_validate_json(offer), typed.Bid.model_validate_json(bid)
            ready.append((tid, buyer, bindings.opening(tid, o, offer_sig, b, bid_sig, int(wh), int(price)), cause))
        batch = [r for r in ready if r[0] not in self._alone][: op.settings.open_max_batch]
        if len(batch) > 1 and await self._open_batch(batch):
            opened = {r[0] for r in batch}
            ready = [r for r in ready if r[0] in self._alone and r[0] not in opened]
        for tid, buyer, entry, cause in ready:  # one by one: a refused entry is refused alone, with its reason
            await self._open_one(tid, buyer, entry, cause)

    async def _open_batch(self, batch: list[tuple[str, str, tuple[Any, ...], str | None]]) -> bool:
        """One openBatch for many agreed trades (all or nothing in the contract). False when the
        chain refuses it: the caller then opens them one by one, so that a bad entry is refused
        alone and the others open."""
        op = self.op
        assert op.dep is not None and op.txm is not None and op.operator is not None
        data = op.dep.market.encode_abi("openBatch", args=[[entry for _, _, entry, _ in batch]])
        try:
            tx = await op.txm.build(op.operator.address, to=op.dep.market_address, data=data)
        except TxRejected as e:
            log.info("a batch of %d opens refused (%s): opening them one by one", len(batch), e.reason)
            return False
        tids = [tid for tid, _, _, _ in batch]
        causes = {tid: cause for tid, _, _, cause in batch}
        async with op.store.atomic() as conn, caused_by(batch[0][3]):  # a batch: its first trade's agreement
            await op.txm.prepare(op.operator, tx, kind="open_batch", ref=",".join(tids)[:500],
                                 meta={"trades": tids, "causes": causes})
            conn.executemany("UPDATE job_trades SET open_state = 'sent' WHERE trade_id = ?", [(tid,) for tid in tids])
        return True

    async def _open_one(self, tid: str, buyer: str, entry: tuple[Any, ...], cause: str | None) -> None:
        op = self.op
        assert op.dep is not None
        data = op.dep.market.encode_abi("open", args=list(entry))
        async with op.store.atomic() as conn, caused_by(cause):
            h, refused = await self.send(op.operator, kind="open", ref=tid, to=op.dep.market_address, data=data,
                                         account=buyer)
            if h:
                conn.execute("UPDATE job_trades SET open_state = 'sent' WHERE trade_id = ?", (tid,))
            elif refused:
                conn.execute("UPDATE job_trades SET open_state = 'failed', reason = ? WHERE trade_id = ?",
                             (refused[:500], tid))

    async def final(self, kind: str, row: dict[str, Any], receipt: Any, ok: bool, reason: str) -> None:
        op = self.op
        assert op.dep is not None
        if kind == "open_batch":
            tids = list(row["meta"].get("trades", []))
            causes = row["meta"].get("causes", {})
        else:
            tids, causes = [row["ref"]], {}
        if ok:
            deadlines = {bytes(ev["args"]["tradeId"]): int(ev["args"]["deadline"])
                         for ev in self.logs(op.dep.market, "TradeOpened", receipt)}
            for tid in tids:
                self.conn.execute("UPDATE job_trades SET open_state = 'done', deadline = ? WHERE trade_id = ?",
                                  (deadlines.get(typed.trade_key(tid), 0), tid))
                if kind == "open_batch":
                    with caused_by(causes.get(tid)):  # each trade's own agreement
                        await op.publish(E.TradeRecorded(trade_id=tid, tx_hash=row["tx_hash"]))
                else:
                    await op.publish(E.TradeRecorded(trade_id=tid, tx_hash=row["tx_hash"]))
        else:  # look at the chain again next round (a reverted open is refused there with its reason)
            for tid in tids:
                self.conn.execute("UPDATE job_trades SET open_state = 'queued', reason = ? WHERE trade_id = ?",
                                  (reason[:500], tid))
            if kind == "open_batch":
                self._alone.update(tids)  # the batch failed once mined: these go one by one
        op.store.on_commit(op.work.set)

    def tokens_locked(self, address: str) -> int:
        row = self.conn.execute(
            "SELECT COALESCE(SUM(wh - settled_wh), 0) FROM job_trades WHERE seller = ? AND open_state = 'done' "
            "AND close_state != 'done'", (address,)).fetchone()
        return int(row[0])


