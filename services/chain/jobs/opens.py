"""Agreed trades -> ``open`` with both parties' signatures. The auction's ``TradeAgreed``
carries the seller's signed offer and the buyer's signed bid; the market contract checks
both (and the price, the amounts, the expiries and what the offer and the bid have
filled already), so the operator cannot open a trade its parties did not sign. The
trades table here is also what the settlement and close jobs follow."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from web3 import AsyncWeb3

from services.bus import events as E
from services.bus import typed
from services.bus.envelope import caused_by

from .. import contracts
from ..node import guard
from . import Job

log = logging.getLogger(__name__)


class Opens(Job):
    kinds = ("open",)
    SCHEMA: ClassVar[str] = """
CREATE TABLE IF NOT EXISTS job_trades (
    trade_id TEXT PRIMARY KEY, seller TEXT NOT NULL, buyer TEXT NOT NULL, buyer_site TEXT NOT NULL,
    wh INTEGER NOT NULL, price TEXT NOT NULL, seq INTEGER NOT NULL,
    offer TEXT NOT NULL DEFAULT '', offer_sig TEXT NOT NULL DEFAULT '', bid TEXT NOT NULL DEFAULT '',
    bid_sig TEXT NOT NULL DEFAULT '',
    open_state TEXT NOT NULL DEFAULT 'queued', open_tx TEXT NOT NULL DEFAULT '', reason TEXT NOT NULL DEFAULT '',
    deadline INTEGER NOT NULL DEFAULT 0,
    settled_wh INTEGER NOT NULL DEFAULT 0, settle_tx TEXT NOT NULL DEFAULT '',
    close_state TEXT NOT NULL DEFAULT 'none', close_wh INTEGER NOT NULL DEFAULT 0, close_tx TEXT NOT NULL DEFAULT '',
    closed_published INTEGER NOT NULL DEFAULT 0, cause TEXT, close_cause TEXT);
"""
    # open_state: queued -> sent -> done | failed. close_state: none -> queued (the auction
    # closed it) -> sent -> closing (dispute window) -> finalizing -> done.

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
        for tid, buyer, wh, price, offer, offer_sig, bid, bid_sig, cause in rows:
            status, _, _, _ = await self.on_chain(tid)
            async with op.store.atomic() as conn, caused_by(cause):
                if status != contracts.STATUS_NONE:
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
                data = op.dep.market.encode_abi("open", args=[
                    typed.trade_key(tid), o.as_tuple(), typed.sig_bytes(offer_sig), b.as_tuple(),
                    typed.sig_bytes(bid_sig), int(wh), int(price)])
                h, refused = await self.send(op.operator, kind="open", ref=tid, to=op.dep.market_address, data=data,
                                             account=buyer)
                if h:
                    conn.execute("UPDATE job_trades SET open_state = 'sent', open_tx = ? WHERE trade_id = ?", (h, tid))
                elif refused:
                    conn.execute("UPDATE job_trades SET open_state = 'failed', reason = ? WHERE trade_id = ?",
                                 (refused[:500], tid))

    async def final(self, kind: str, row: dict[str, Any], receipt: Any, ok: bool, reason: str) -> None:
        op = self.op
        assert op.dep is not None
        tid = row["ref"]
        if ok:
            deadline = 0
            for ev in self.logs(op.dep.market, "TradeOpened", receipt):
                deadline = int(ev["args"]["deadline"])
            self.conn.execute("UPDATE job_trades SET open_state = 'done', deadline = ? WHERE trade_id = ?",
                              (deadline, tid))
            await op.publish(E.TradeRecorded(trade_id=tid, tx_hash=row["tx_hash"]))
        else:  # look at the chain again next round (a reverted open is refused there with its reason)
            self.conn.execute("UPDATE job_trades SET open_state = 'queued', reason = ? WHERE trade_id = ?",
                              (reason[:500], tid))
        op.store.on_commit(op.work.set)

    def tokens_locked(self, address: str) -> int:
        row = self.conn.execute(
            "SELECT COALESCE(SUM(wh - settled_wh), 0) FROM job_trades WHERE seller = ? AND open_state = 'done' "
            "AND close_state != 'done'", (address,)).fetchone()
        return int(row[0])


