"""Ending trades: ``close`` starts the dispute window, ``finalize`` ends the trade.

A trade the auction closed (Close Connection, a flagged mismatch, the operator) or one
past its on-chain deadline is closed on-chain once the buyer meter's last signed reading
is in (or a grace period passed); the contract then waits ``disputeWindow`` seconds in
which a higher signed delivery still settles (so a buyer cannot close on an old reading
to pay less), and only then may anyone ``finalize``: the unspent escrow goes back to the
buyer's free escrow and the undelivered tokens to the seller. A trade delivered in full
is closed by its last settlement and needs neither."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from services.bus import events as E
from services.bus import typed
from services.bus.envelope import caused_by
from services.bus.prices import wei_for
from services.bus.states import TradeState

from .. import bindings
from . import Job
from .opens import Opens

log = logging.getLogger(__name__)

WINDOW_OPEN = ("dispute window", "window open", "not yet")
"""Refusal reasons that mean "later": the dispute window has not passed yet."""


class Closes(Job):
    kinds = ("close", "finalize")

    def __init__(self, op: Any) -> None:
        super().__init__(op)
        self._seen: dict[str, float] = {}  # trade id -> when its early close was first seen

    def record(self, env: Any, conn: Any) -> bool:
        body = env.body
        if not isinstance(body, E.TradeStatus) or body.state not in (TradeState.CLOSED, TradeState.FULFILLED):
            return False
        Opens.insert(conn, body, env.id)
        conn.execute("UPDATE job_trades SET close_state = 'queued', close_wh = MAX(close_wh, ?), close_cause = ? "
                     "WHERE trade_id = ? AND close_state = 'none'", (body.delivered_wh, env.id, body.trade_id))
        return True

    async def step(self) -> None:
        await self._past_deadline()
        await self._closes()
        await self._finalizes()

    async def _past_deadline(self) -> None:
        """Trades whose on-chain deadline passed are closed like any other (a write only when
        there is one: this runs every round)."""
        due = "close_state = 'none' AND open_state = 'done' AND deadline > 0 AND deadline <= ?"
        now = int(time.time())
        if self.conn.execute(f"SELECT 1 FROM job_trades WHERE {due} LIMIT 1", (now,)).fetchone() is None:
            return
        async with self.op.store.atomic() as conn:
            conn.execute(f"UPDATE job_trades SET close_state = 'queued' WHERE {due}", (now,))

    async def _closes(self) -> None:
        op = self.op
        assert op.dep is not None and op.txm is not None and op.operator is not None
        rows = self.conn.execute(
            "SELECT trade_id, wh, buyer_site, open_state, close_wh, close_cause FROM job_trades "
            "WHERE close_state = 'queued' AND open_state IN ('done', 'failed') AND settle_tx = '' "
            "ORDER BY seq LIMIT 100").fetchall()
        for tid, wh, buyer_site, open_state, close_wh, cause in rows:
            with caused_by(cause):  # what closing publishes names the status that closed the trade
                if open_state == "failed":  # never opened: nothing to close on-chain
                    async with op.store.atomic() as conn:
                        conn.execute("UPDATE job_trades SET close_state = 'done' WHERE trade_id = ?", (tid,))
                    continue
                delivered, final = op.settlements.last_delivery(tid, buyer_site)
                if max(delivered, int(close_wh)) < int(wh) and not final:  # wait for the buyer meter's last reading
                    first = self._seen.setdefault(tid, time.monotonic())
                    left = first + op.settings.close_grace_s - time.monotonic()
                    if left > 0:
                        asyncio.get_running_loop().call_later(left, op.work.set)
                        continue
                status, on_chain, _, _ = await op.opens.on_chain(tid)
                if status != bindings.STATUS_OPEN:
                    await self.sync(tid, status, on_chain)
                    continue
                async with op.store.atomic() as conn:
                    h, refused = await self.send(op.operator, kind="close", ref=tid, to=op.dep.market_address,
                                                 data=op.dep.market.encode_abi("close", args=[typed.trade_key(tid)]))
                    if h:
                        conn.execute("UPDATE job_trades SET close_state = 'sent' WHERE trade_id = ?", (tid,))
                    elif refused:
                        conn.execute("UPDATE job_trades SET close_state = 'failed', reason = ? WHERE trade_id = ?",
                                     (refused[:500], tid))

    async def _finalizes(self) -> None:
        op = self.op
        assert op.dep is not None and op.txm is not None and op.operator is not None
        rows = self.conn.execute("SELECT trade_id, close_cause FROM job_trades WHERE close_state = 'closing' "
                                 "AND settle_tx = '' ORDER BY seq LIMIT 100").fetchall()
        window = op.dispute_window_s
        for tid, cause in rows:
            with caused_by(cause):
                status, on_chain, _, closing_at = await op.opens.on_chain(tid)
                if status != bindings.STATUS_CLOSING:
                    await self.sync(tid, status, on_chain)
                    continue
                end = closing_at + window
                if await op.node.clock_behind(end):  # a higher signed delivery may still come: settle it first
                    asyncio.get_running_loop().call_later(min(max(end - time.time(), 0.0) + 0.5, 60.0), op.work.set)
                    continue
                async with op.store.atomic() as conn:
                    h, refused = await self.send(op.operator, kind="finalize", ref=tid, to=op.dep.market_address,
                                                 data=op.dep.market.encode_abi("finalize", args=[typed.trade_key(tid)]),
                                                 later_if=WINDOW_OPEN)
                    if h:
                        conn.execute("UPDATE job_trades SET close_state = 'finalizing' WHERE trade_id = ?", (tid,))
                    elif refused:
                        conn.execute("UPDATE job_trades SET close_state = 'failed', reason = ? WHERE trade_id = ?",
                                     (refused[:500], tid))
                    else:
                        asyncio.get_running_loop().call_later(1.0, op.work.set)

    async def sync(self, tid: str, status: int, on_chain: int) -> None:
        """The chain is ahead of us (an earlier run, a party closed on-chain, someone else
        submitted): catch up."""
        async with self.op.store.atomic() as conn:
            conn.execute("UPDATE job_trades SET settled_wh = MAX(settled_wh, ?) WHERE trade_id = ?", (on_chain, tid))
            if status == bindings.STATUS_CLOSING:
                conn.execute("UPDATE job_trades SET close_state = 'closing' WHERE trade_id = ? "
                             "AND close_state IN ('none', 'queued', 'sent')", (tid,))
                self.op.store.on_commit(self.op.work.set)
            elif status == bindings.STATUS_CLOSED:
                await self.closed(conn, tid, on_chain, "")

    async def closed(self, conn: Any, tid: str, delivered: int, tx_hash: str, refunded: int | None = None) -> None:
        row = conn.execute("SELECT wh, price, closed_published FROM job_trades WHERE trade_id = ?", (tid,)).fetchone()
        if row is None:
            return
        wh, price, published = int(row[0]), int(row[1]), int(row[2])
        conn.execute("UPDATE job_trades SET close_state = 'done', closed_published = 1, settled_wh = MAX(settled_wh, ?)"
                     " WHERE trade_id = ?", (delivered, tid))
        if not published:
            paid = wei_for(delivered, price)
            await self.op.publish(E.TradeClosed(
                trade_id=tid, delivered_wh=delivered, paid_wei=paid, tx_hash=tx_hash,
                refunded_wei=refunded if refunded is not None else wei_for(wh, price) - paid))

    async def final(self, kind: str, row: dict[str, Any], receipt: Any, ok: bool, reason: str) -> None:
        op = self.op
        assert op.dep is not None
        conn, tid = self.conn, row["ref"]
        if kind == "close":
            conn.execute("UPDATE job_trades SET close_state = ? WHERE trade_id = ?",
                         ("closing" if ok else "queued", tid))
        elif not ok:
            conn.execute("UPDATE job_trades SET close_state = 'closing' WHERE trade_id = ?", (tid,))
        else:
            for ev in self.logs(op.dep.market, "TradeClosed", receipt):
                await self.closed(conn, tid, int(ev["args"]["deliveredWh"]), row["tx_hash"],
                                  refunded=int(ev["args"]["refundedWei"]))
        op.store.on_commit(op.work.set)
