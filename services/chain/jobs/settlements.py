"""Signed deliveries -> payment. The buyer's meter signs its cumulative delivery on a
trade; the market pays the seller for what that signature says (capped at the trade's
energy), from the buyer's locked escrow. Anyone may submit; the operator keeps the
highest signed reading per trade and settles many trades in one ``settleBatch`` after a
short collection window. A reading whose signer is not the registered meter of the
trade's buyer is never kept: the highest reading held per trade is the highest the buyer's
meter signed, so no forged one (not even a higher one from the buyer's own site) can take
its place and keep the meter's real readings from being settled; nor is such a reading
ever put in a batch (one bad signature would revert the others).

How often: the readings are cumulative, so one settlement pays for every Wh since the last
one, and each costs about a signature check and a few storage writes whatever it covers.
A trade's held reading is settled once it is ``settle_every_wh`` above what is settled
(0: every reading), and at once when it ends the trade (it reaches the trade's energy, or
it is the meter's final reading), when the trade is being closed (by the auction, past its
deadline, or on-chain by anyone: the market's ``TradeClosing`` logs are followed while a
reading is held back), so the dispute window never passes with a held reading unpaid, and
everything held when the service starts (it may have missed a close while it was down).
Until then the buyer's Ether for the trade stays locked in the market: holding a reading
back delays the seller's credit, and changes neither what is paid nor who may submit it
(the seller's site holds the same signed reading)."""

from __future__ import annotations

import logging
import time
from typing import Any, ClassVar

from web3 import AsyncWeb3

from services.bus import events as E
from services.bus import typed
from services.bus.envelope import caused_by
from services.bus.prices import wei_for

from .. import bindings
from ..node import guard
from . import Job

log = logging.getLogger(__name__)

REORG_OVERLAP = 16
"""Blocks read again each time the market's TradeClosing logs are followed."""


class Settlements(Job):
    kinds = ("settle",)
    SCHEMA: ClassVar[str] = """
CREATE TABLE IF NOT EXISTS job_deliveries (
    trade_id TEXT NOT NULL, site TEXT NOT NULL, delivered_wh INTEGER NOT NULL, signature TEXT NOT NULL,
    meter TEXT NOT NULL, final INTEGER NOT NULL DEFAULT 0, cause TEXT, PRIMARY KEY (trade_id, site));
"""

    def __init__(self, op: Any) -> None:
        super().__init__(op)
        self._skip: dict[str, int] = {}  # trade id -> signed Wh not settleable (until the meter moves on)
        self.refused: dict[str, int] = {}  # site -> deliveries not signed by the buyer's registered meter
        self._started = False
        self._unseen: set[str] = set()  # trades held at the first round: settled at once (a close may have passed
        # unseen while the service was down)
        self._closing: set[str] = set()  # trade ids whose TradeClosing log was seen: settled without waiting
        self._closing_block: int | None = None  # the market's logs are followed from here
        self._closings_read = 0.0  # when they were last read (monotonic)
        self.held_back = 0  # readings held back in the last round (their trade not due yet)

    def record(self, env: Any, conn: Any) -> bool:
        body = env.body
        if not isinstance(body, E.Delivery) or body.role != "consumer":
            return False  # the seller's meter only cross-checks; the buyer's meter pays
        why = self._unbelieved(conn, body)
        if why:
            self.count(self.refused, env.site)
            log.warning("trade %s: a delivery of %s Wh from site %s is not kept: %s", body.trade_id,
                        body.delivered_wh, env.site, why)
            return False
        conn.execute(
            "INSERT INTO job_deliveries (trade_id, site, delivered_wh, signature, meter, final, cause) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (trade_id, site) DO UPDATE SET "
            "delivered_wh = excluded.delivered_wh, signature = excluded.signature, meter = excluded.meter, "
            "cause = excluded.cause, final = excluded.final WHERE excluded.delivered_wh >= job_deliveries.delivered_wh",
            (body.trade_id, body.site, body.delivered_wh, body.signature,
             AsyncWeb3.to_checksum_address(body.meter_address), int(body.final), env.id))
        return True

    def _unbelieved(self, conn: Any, body: E.Delivery) -> str:
        """Why a buyer's delivery is not kept ("" if it is): it must be the trade's buyer's
        site's, signed (EIP-712 Delivery, this market) by a meter registered for the trade's
        buyer. Before the contracts are known a signed one is kept, and checked before it is
        paid (see :meth:`step`)."""
        if not body.signature or not body.meter_address:
            return "unsigned"
        op = self.op
        if op.dep is None:
            return ""
        trade = conn.execute("SELECT buyer, buyer_site FROM job_trades WHERE trade_id = ?", (body.trade_id,)).fetchone()
        if trade is None:
            return "no such trade"
        buyer, buyer_site = trade
        if body.site != buyer_site:
            return f"not the trade's buyer's site ({buyer_site})"
        signer = typed.recover_delivery(typed.market_domain(op.chain_id, op.dep.market_address), body.trade_id,
                                        body.delivered_wh, body.signature)
        if signer is None or signer != AsyncWeb3.to_checksum_address(body.meter_address):
            return "not signed by the meter it names"
        row = conn.execute("SELECT account FROM job_meters WHERE registry = ? AND meter = ? AND state = 'done'",
                           (op.dep.registry_address, signer)).fetchone()
        if row is None or str(row[0]).lower() != str(buyer).lower():
            return "not signed by a meter registered for the trade's buyer"
        return ""

    def last_delivery(self, trade_id: str, site: str) -> tuple[int, bool]:
        row = self.conn.execute("SELECT delivered_wh, final FROM job_deliveries WHERE trade_id = ? AND site = ?",
                                (trade_id, site)).fetchone()
        return (0, False) if row is None else (int(row[0]), bool(row[1]))

    def _held(self) -> list[tuple[str, str, int, int, int, str, str, str | None, bool, str]]:
        """Every trade's reading above what is settled: (trade id, buyer, wh, settled, delivered,
        signature, meter, cause, whether it is final, the trade's close state)."""
        rows = self.conn.execute(
            "SELECT t.trade_id, t.buyer, t.wh, t.settled_wh, d.delivered_wh, d.signature, d.meter, d.cause, d.final, "
            "t.close_state FROM job_trades t JOIN job_deliveries d ON d.trade_id = t.trade_id "
            "AND d.site = t.buyer_site WHERE t.open_state = 'done' AND t.close_state != 'done' AND t.settle_tx = '' "
            "AND MIN(d.delivered_wh, t.wh) > t.settled_wh ORDER BY t.seq").fetchall()
        out = []
        for tid, buyer, wh, settled, d, sig, meter, cause, final, close_state in rows:
            if self._skip.get(tid) == int(d):
                continue
            if not self._started:
                self._unseen.add(tid)
            out.append((tid, buyer, int(wh), int(settled), int(d), sig, meter, cause, bool(final), close_state))
        return out

    def _is_due(self, h: tuple[str, str, int, int, int, str, str, str | None, bool, str]) -> bool:
        tid, _, wh, settled, delivered, _, _, _, final, close_state = h
        every = self.op.settings.settle_every_wh
        target = min(delivered, wh)
        return (every == 0 or tid in self._unseen or final or target >= wh or close_state != "none"
                or tid in self._closing or target - settled >= every)

    async def _follow_closings(self) -> None:
        """While a reading is held back, the market's TradeClosing logs since the last look (a
        few blocks again each time: a reorg may move a close to a block already read) make
        that trade's reading due: a party may close on-chain without the auction."""
        op = self.op
        assert op.dep is not None and op.node is not None
        now = time.monotonic()
        if now - self._closings_read < min(1.0, op.dispute_window_s / 4):
            return  # not every round: a node's logs once a second are soon enough for any dispute window
        self._closings_read = now
        async with guard():
            head = int(await op.node.w3.eth.block_number)
        if self._closing_block is None:
            self._closing_block = head  # from the start: the first round settles everything held
            return
        start = max(0, self._closing_block - REORG_OVERLAP)
        while start <= head:
            upto = min(head, start + op.settings.logs_range - 1)
            async with guard():
                logs = await op.dep.market.events.TradeClosing().get_logs(from_block=start, to_block=upto)
            keys = {bytes(ev["args"]["tradeId"]) for ev in logs}
            if keys:
                for (tid,) in self.conn.execute("SELECT trade_id FROM job_trades WHERE close_state != 'done'"):
                    if typed.trade_key(tid) in keys:
                        self._closing.add(tid)
            start = upto + 1
        self._closing_block = head

    async def step(self) -> None:
        op = self.op
        assert op.dep is not None and op.txm is not None and op.operator is not None
        held = self._held()  # read once a round: what is due is decided in memory
        if not all(self._is_due(h) for h in held) or self._closing_block is None:
            await self._follow_closings()  # a close seen there makes its trade's reading due
        due = [h[:8] for h in held if self._is_due(h)]
        self.held_back = len(held) - len(due)
        self._started = True
        if self.collecting(bool(due), op.settings.settle_window_s):
            return  # nothing to settle, or more readings still coming: settled together
        domain = typed.market_domain(op.chain_id, op.dep.market_address)
        meters = op.meters.accounts_of(op.dep.registry_address)
        batch: list[tuple[str, int, str]] = []
        causes: dict[str, str | None] = {}
        for tid, buyer, _wh, _settled, delivered, sig, meter, cause in due[: op.settings.settle_max_batch]:
            signer = typed.recover_delivery(domain, tid, delivered, sig)
            if signer is None or signer != meter or meters.get(signer, "").lower() != buyer.lower():
                # (kept before the contracts were known): dropped, so the meter's next reading takes its place
                async with op.store.atomic() as conn:
                    conn.execute("DELETE FROM job_deliveries WHERE trade_id = ? AND delivered_wh = ? AND signature = ?",
                                 (tid, delivered, sig))
                self.refused["not the buyer's meter"] = self.refused.get("not the buyer's meter", 0) + 1
                log.warning("trade %s: the delivery of %s Wh is not signed by the buyer's registered meter; "
                            "not settled", tid, delivered)
                continue
            status, on_chain, _, _ = await op.opens.on_chain(tid)
            if status not in (bindings.STATUS_OPEN, bindings.STATUS_CLOSING) or on_chain >= min(delivered, _wh):
                with caused_by(cause):
                    await op.closes.sync(tid, status, on_chain)
                continue
            batch.append((tid, delivered, sig))
            causes[tid] = cause
        if not batch:
            return
        m = op.dep.market
        data = m.encode_abi("settleBatch", args=[[typed.trade_key(t) for t, _, _ in batch], [w for _, w, _ in batch],
                                                 [typed.sig_bytes(s) for _, _, s in batch]])
        async with op.store.atomic() as conn, caused_by(causes[batch[0][0]]):  # a batch: its first delivery
            ref = ",".join(t for t, _, _ in batch)[:500]
            h, refused = await self.send(op.operator, kind="settle", ref=ref, to=op.dep.market_address, data=data,
                                         meta={"targets": [[t, w] for t, w, _ in batch], "causes": causes})
            if h:
                conn.executemany("UPDATE job_trades SET settle_tx = ? WHERE trade_id = ?", [(h, t) for t, _, _ in batch])
            elif refused:
                for tid, w, _ in batch:
                    self._skip[tid] = w  # until the meter moves on
                log.warning("settlement of %s refused: %s", ref, refused)

    async def final(self, kind: str, row: dict[str, Any], receipt: Any, ok: bool, reason: str) -> None:
        op = self.op
        assert op.dep is not None
        conn = self.conn
        conn.execute("UPDATE job_trades SET settle_tx = '' WHERE settle_tx = ?", (row["tx_hash"],))
        causes = row["meta"].get("causes", {})
        keys = {typed.trade_key(t): t for t, _ in row["meta"]["targets"]}
        for ev in self.logs(op.dep.market, "Settled", receipt) if ok else []:
            tid = keys.get(bytes(ev["args"]["tradeId"]))
            if tid is None:
                continue
            self._unseen.discard(tid)
            r = conn.execute("SELECT price, settled_wh FROM job_trades WHERE trade_id = ?", (tid,)).fetchone()
            delivered = int(ev["args"]["deliveredWh"])
            with caused_by(causes.get(tid)):  # each trade's own delivery, not the batch's first
                if r is not None and delivered > int(r[1]):
                    conn.execute("UPDATE job_trades SET settled_wh = ? WHERE trade_id = ?", (delivered, tid))
                    await op.publish(E.Settled(trade_id=tid, delivered_wh=delivered,
                                               paid_wei=wei_for(delivered, int(r[0])), tx_hash=row["tx_hash"]))
        for ev in self.logs(op.dep.market, "TradeClosed", receipt) if ok else []:
            tid = keys.get(bytes(ev["args"]["tradeId"]))
            if tid is not None:  # a full delivery closes the trade in the contract
                with caused_by(causes.get(tid)):
                    await op.closes.closed(conn, tid, int(ev["args"]["deliveredWh"]), row["tx_hash"],
                                           refunded=int(ev["args"]["refundedWei"]))
        op.store.on_commit(op.work.set)

    def health(self) -> dict[str, Any]:
        return {"deliveries_refused": dict(self.refused), "deliveries_held_back": self.held_back}
