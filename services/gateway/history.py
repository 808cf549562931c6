"""The site's record behind the wallet's History, Prices and trade cards.

The gateway keeps it in a store of its own (``<data_dir>/history.sqlite``) fed by a
durable subscription (``start="earliest"``: what happened while the gateway was down is
replayed from the publishers' outboxes when it starts again):

- trades (any site's: the trade cards tell their story) from ``trade.*``, ``chain.settled``,
  ``chain.trade_recorded``, ``chain.trade_closed`` and ``meter.mismatch``: when they were
  agreed, recorded, closed (by whom, why) and settled; Wh delivered, Ether paid and refunded;
- offers (``market.offer_opened``/``offer_closed``): an offer that ended without a trade
  stays in its seller's history;
- this site's accounts' transactions (``wallet.tx.<site>``), with what the gateway itself
  knows of the ones it sent (the recipient and amount of a transfer);
- market prices (start bids, bids, trades, double-auction clearings) for the Prices chart;
- for the site figures (:mod:`services.gateway.figures`): what each chain settlement of a
  trade of this site added (Wh delivered, wei paid), with the trade's parties and their
  sites (a trade with the utility's site is told from a local one by them), and per 15
  minutes of site time the energy this site's meters counted (``hist_energy``, from the
  live readings: a producer meter's signed counter, or ``pv_w``, for production;
  ``load_w`` for consumption), written with the clock every few seconds. Readings that
  came while the gateway was down are not counted.

It also follows the site's simulated clock from the meter readings the live feed brings
(``sim_ts``/``time_scale``): anchors (wall time, site time, scale) are kept so that any
wall time, even of a replayed event, can be shown in site time; and the last readings in
memory, for the charts of a page that just loaded.

Times are Unix seconds of the wall clock (an event's envelope time) unless named ``sim``.
Rows are plain dicts; :mod:`services.gateway.models` gives them their API shape.
"""

from __future__ import annotations

import bisect
import collections
import csv
import io
import json
import sqlite3
import time
from typing import Any

from services.bus import events as ev
from services.bus.states import OPEN
from services.bus.states import TradeState as S
from services.bus.store import Store

from . import figures, words

SCHEMA = """
CREATE TABLE IF NOT EXISTS hist_trades (
    trade_id TEXT PRIMARY KEY, offer_id TEXT NOT NULL DEFAULT '', seller TEXT NOT NULL, buyer TEXT NOT NULL,
    seller_site TEXT NOT NULL, buyer_site TEXT NOT NULL, wh INTEGER NOT NULL, price TEXT NOT NULL,
    state TEXT NOT NULL, agreed_at REAL, recorded_at REAL, closed_at REAL, closed_reason TEXT NOT NULL DEFAULT '',
    closing_by TEXT NOT NULL DEFAULT '', settled_at REAL, failed_reason TEXT NOT NULL DEFAULT '',
    delivered_wh INTEGER NOT NULL DEFAULT 0, paid_wei TEXT NOT NULL DEFAULT '0', refunded_wei TEXT,
    mismatch TEXT);
CREATE INDEX IF NOT EXISTS hist_trades_seller ON hist_trades (seller COLLATE NOCASE);
CREATE INDEX IF NOT EXISTS hist_trades_buyer ON hist_trades (buyer COLLATE NOCASE);
CREATE TABLE IF NOT EXISTS hist_offers (
    offer_id TEXT PRIMARY KEY, seller TEXT NOT NULL, seller_site TEXT NOT NULL, wh INTEGER NOT NULL,
    start_price TEXT NOT NULL, opened_at REAL NOT NULL, ends_at REAL NOT NULL, outcome TEXT NOT NULL DEFAULT '',
    closed_at REAL);
CREATE TABLE IF NOT EXISTS hist_txs (
    tx_hash TEXT PRIMARY KEY, account TEXT NOT NULL, kind TEXT NOT NULL, ref TEXT NOT NULL DEFAULT '',
    to_addr TEXT, amount_wei TEXT, status TEXT NOT NULL DEFAULT 'pending', block INTEGER,
    reason TEXT NOT NULL DEFAULT '', mined_hash TEXT NOT NULL DEFAULT '', sent_at REAL NOT NULL, final_at REAL);
CREATE INDEX IF NOT EXISTS hist_txs_account ON hist_txs (account COLLATE NOCASE);
CREATE INDEX IF NOT EXISTS hist_txs_to ON hist_txs (to_addr COLLATE NOCASE);
CREATE TABLE IF NOT EXISTS hist_prices (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, kind TEXT NOT NULL, price TEXT NOT NULL,
    ref TEXT NOT NULL DEFAULT '', wh INTEGER, who TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS hist_clock (wall REAL PRIMARY KEY, sim REAL NOT NULL, scale REAL NOT NULL);
CREATE TABLE IF NOT EXISTS hist_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS hist_energy (
    bucket INTEGER PRIMARY KEY, produced_wh REAL NOT NULL DEFAULT 0, consumed_wh REAL NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS hist_meter_last (meter TEXT PRIMARY KEY, sim REAL NOT NULL, energy_wh INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS hist_settlements (
    id INTEGER PRIMARY KEY AUTOINCREMENT, trade_id TEXT NOT NULL, at REAL NOT NULL, delivered_wh INTEGER NOT NULL,
    paid_wei TEXT NOT NULL, d_wh INTEGER NOT NULL, d_wei TEXT NOT NULL, seller TEXT, buyer TEXT,
    seller_site TEXT, buyer_site TEXT);
CREATE INDEX IF NOT EXISTS hist_settlements_trade ON hist_settlements (trade_id);
"""

SETTLEMENT_PARTIES = ("seller", "buyer", "seller_site", "buyer_site")
KEEP_PRICES = 5000
KEEP_BUCKETS = 400 * 96  # 15-minute buckets of site time: 400 site days (at 720x, 80 hours of wall time)
KEEP_SETTLEMENTS = 100_000
MAX_LOAD_GAP_S = 3600.0  # site seconds: a longer gap between readings is not filled with a guess of the power
MAX_COUNTER_GAP_S = 2 * 86400.0  # site seconds: a producer counter's rise over a longer gap is not counted
READINGS = 2000  # in memory: at 720x one a second is more than a fortnight of site time
ANCHOR_EVERY_S = 30.0
ANCHOR_DRIFT_S = 60.0  # site seconds: a meter that restarted its clock starts a new segment
SHOWN_TX_KINDS = ("transfer", "deposit", "withdraw", "withdraw_credit")
TX_WORDS = {"deposit": "escrow deposit", "withdraw": "escrow withdrawal", "withdraw_credit": "earnings withdrawn"}


def prefixes(site: str) -> list[str]:
    """What the history subscribes to (durably)."""
    return [ev.OfferOpened.TYPE, ev.BidPlaced.TYPE, ev.OfferClosed.TYPE, ev.MarketCleared.TYPE,
            ev.TradeAgreed.TYPE, ev.TradeStatus.TYPE, ev.TradeRecorded.TYPE, ev.Settled.TYPE,
            ev.TradeClosed.TYPE, ev.MeterMismatch.TYPE, f"{ev.WalletTx.TYPE}.{site}"]


def closed_by(reason: str, state: str) -> str:
    """Who ended a trade, from the auction's reason: buyer, seller, operator, chain, delivered."""
    low = reason.lower()
    for who in ("buyer", "seller", "operator"):
        if f"by the {who}" in low or f"by its {who}" in low:
            return who
    if "mismatch" in low:
        return "mismatch"
    if "on chain" in low or "deadline" in low:
        return "chain"
    return "delivered" if state == S.FULFILLED else ""


class History:
    def __init__(self, store: Store, site: str, clock: Any = time.time) -> None:
        self.store, self.site, self.now = store, site, clock
        store.conn.executescript(SCHEMA)
        have = {r[1] for r in store.conn.execute("PRAGMA table_info(hist_settlements)")}
        for col in SETTLEMENT_PARTIES:  # a store from before the settlements named their parties
            if col not in have:
                store.conn.execute(f"ALTER TABLE hist_settlements ADD COLUMN {col} TEXT")
        self.anchors: list[tuple[float, float, float]] = [
            (w, s, k) for w, s, k in store.conn.execute("SELECT wall, sim, scale FROM hist_clock ORDER BY wall")]
        self._walls = [a[0] for a in self.anchors]
        self._pending_anchor: tuple[float, float, float] | None = None
        self.live: tuple[float, float, float] | None = self.anchors[-1] if self.anchors else None
        row = store.conn.execute("SELECT value FROM hist_meta WHERE key = 'role'").fetchone()
        self.role: str | None = row[0] if row else None
        self._role_saved = self.role
        self.readings: collections.deque[dict[str, Any]] = collections.deque(maxlen=READINGS)
        # the figures' energy: the last reading of each meter (its sim time and counter) and
        # the buckets' energy not yet written (Wh: [produced, consumed])
        self.meter_last: dict[str, tuple[float, int]] = {
            m: (sim, e) for m, sim, e in store.conn.execute("SELECT meter, sim, energy_wh FROM hist_meter_last")}
        self._meter_dirty: set[str] = set()
        self._energy: dict[int, list[float]] = {}
        self._flushing: dict[int, list[float]] = {}

    # --- the site's clock ---------------------------------------------------------------

    def reading(self, ts: float, body: ev.MeterReading) -> None:
        """A meter reading of this site (live feed): the clock, the role, the charts' memory."""
        self.role = body.role if self.role != "producer" else self.role  # a producer meter makes a producer site
        if body.sim_ts is not None and body.time_scale:
            anchor = (ts, body.sim_ts, body.time_scale)
            last = self.live
            drift = abs(self._project(last, ts) - body.sim_ts) if last else float("inf")
            if last is None or drift > ANCHOR_DRIFT_S or last[2] != body.time_scale or ts - last[0] >= ANCHOR_EVERY_S:
                self._pending_anchor = anchor
                self.live = anchor
        self.readings.append({"at": ts, "sim_at": body.sim_ts if body.sim_ts is not None else ts,
                              "meter": body.meter, "role": body.role, "power_w": body.power_w, "pv_w": body.pv_w,
                              "load_w": body.load_w, "soc": body.soc, "energy_wh": body.energy_wh,
                              "relay_closed": body.relay_closed})
        self._count_energy(ts, body)

    def _count_energy(self, ts: float, body: ev.MeterReading) -> None:
        """The energy since the meter's previous reading, into the 15-minute buckets it spans."""
        sim = body.sim_ts if body.sim_ts is not None else ts
        last = self.meter_last.get(body.meter)
        self.meter_last[body.meter] = (sim, body.energy_wh)
        self._meter_dirty.add(body.meter)
        if last is None:
            return
        t0, e0 = last
        dt = sim - t0
        if dt <= 0:
            return  # the same instant again, or a clock that went back: a new baseline
        # powers are the averages of the meter's last step: held over the gap only if it is short
        # (an hour of site time, or ten wall seconds of a fast simulated clock)
        short = dt <= max(MAX_LOAD_GAP_S, 10.0 * (body.time_scale or 1.0))
        produced = 0.0
        if body.role == "producer":
            if body.energy_wh >= e0 and dt <= MAX_COUNTER_GAP_S:
                produced = float(body.energy_wh - e0)
        elif body.pv_w is not None and short:
            produced = max(0.0, body.pv_w) * dt / 3600.0
        consumed = max(0.0, body.load_w) * dt / 3600.0 if body.load_w is not None and short else 0.0
        for i, wh in ((0, produced), (1, consumed)):
            if wh > 0:
                for b, part in figures.spread(t0, sim, wh):
                    self._energy.setdefault(b, [0.0, 0.0])[i] += part

    async def persist(self) -> None:
        """Write the clock anchor, the role and the figures' energy the live feed brought (called
        now and then)."""
        anchor, self._pending_anchor = self._pending_anchor, None
        role = self.role if self.role != self._role_saved else None
        energy, self._energy = self._energy, {}
        self._flushing = energy  # still counted by the figures while it is written
        meters, self._meter_dirty = {m: self.meter_last[m] for m in self._meter_dirty}, set()
        if anchor is None and role is None and not energy and not meters:
            return
        try:
            async with self.store.atomic() as conn:
                self._write_energy(conn, energy, meters)
                if anchor is not None:
                    conn.execute("INSERT OR REPLACE INTO hist_clock (wall, sim, scale) VALUES (?, ?, ?)", anchor)
                if role is not None:
                    conn.execute("INSERT OR REPLACE INTO hist_meta (key, value) VALUES ('role', ?)", (role,))
        except BaseException:
            # kept for the next round (and counted in the figures meanwhile)
            for b, (p, c) in energy.items():
                acc = self._energy.setdefault(b, [0.0, 0.0])
                acc[0] += p
                acc[1] += c
            self._meter_dirty |= set(meters)
            if anchor is not None and self._pending_anchor is None:
                self._pending_anchor = anchor
            raise
        finally:
            self._flushing = {}
        if anchor is not None:
            i = bisect.bisect(self._walls, anchor[0])
            self._walls.insert(i, anchor[0])
            self.anchors.insert(i, anchor)
        if role is not None:
            self._role_saved = role

    @staticmethod
    def _write_energy(conn: sqlite3.Connection, energy: dict[int, list[float]],
                      meters: dict[str, tuple[float, int]]) -> None:
        conn.executemany(
            "INSERT INTO hist_energy (bucket, produced_wh, consumed_wh) VALUES (?, ?, ?) ON CONFLICT (bucket) DO "
            "UPDATE SET produced_wh = produced_wh + excluded.produced_wh, "
            "consumed_wh = consumed_wh + excluded.consumed_wh",
            [(b, p, c) for b, (p, c) in energy.items()])
        conn.executemany("INSERT OR REPLACE INTO hist_meter_last (meter, sim, energy_wh) VALUES (?, ?, ?)",
                         [(m, sim, e) for m, (sim, e) in meters.items()])
        if energy:
            conn.execute("DELETE FROM hist_energy WHERE bucket < (SELECT bucket FROM hist_energy ORDER BY bucket DESC "
                         "LIMIT 1 OFFSET ?)", (KEEP_BUCKETS - 1,))

    @staticmethod
    def _project(anchor: tuple[float, float, float] | None, wall: float) -> float:
        return wall if anchor is None else anchor[1] + (wall - anchor[0]) * anchor[2]

    def sim_of(self, wall: float | None) -> float | None:
        """The site's (simulated) time at wall time ``wall``; the wall time itself without a simulated meter."""
        if wall is None:
            return None
        if self.live is not None and wall >= self.live[0]:
            return self._project(self.live, wall)
        if not self.anchors:
            return self._project(self.live, wall)
        i = bisect.bisect_right(self._walls, wall) - 1
        return self._project(self.anchors[max(i, 0)], wall)

    def clock(self) -> dict[str, Any]:
        now = self.now()
        return {"wall": now, "sim": self.sim_of(now), "scale": self.live[2] if self.live else 1.0,
                "simulated": self.live is not None}

    # --- events (in the subscriber's transaction) ----------------------------------------

    def apply(self, conn: sqlite3.Connection, ts: float, body: ev.Message) -> None:
        if isinstance(body, ev.TradeAgreed):
            self._trade(conn, body, S.AGREED, ts)
            conn.execute("UPDATE hist_trades SET agreed_at = COALESCE(agreed_at, ?) WHERE trade_id = ?",
                         (ts, body.trade_id))
            self._price(conn, ts, "trade", body.price_wei_per_kwh, body.trade_id, body.wh, body.buyer)
        elif isinstance(body, ev.TradeStatus):
            self._trade(conn, body, body.state, ts)
            sets = {S.RECORDED: "recorded_at = COALESCE(recorded_at, :ts)",
                    S.CLOSED: "closed_at = COALESCE(closed_at, :ts), closed_reason = :reason",
                    S.FULFILLED: "closed_at = COALESCE(closed_at, :ts), closed_reason = :reason",
                    S.SETTLED: "settled_at = COALESCE(settled_at, :ts), closed_at = COALESCE(closed_at, :ts), "
                               "closed_reason = CASE WHEN closed_reason = '' THEN :reason ELSE closed_reason END",
                    S.FAILED: "failed_reason = :reason, closed_at = COALESCE(closed_at, :ts)"}.get(body.state)
            if sets:
                conn.execute(f"UPDATE hist_trades SET {sets} WHERE trade_id = :id",
                             {"ts": ts, "reason": body.reason or ("all delivered" if body.state == S.FULFILLED else ""),
                              "id": body.trade_id})
        elif isinstance(body, ev.TradeRecorded):
            conn.execute("UPDATE hist_trades SET recorded_at = COALESCE(recorded_at, ?) WHERE trade_id = ?",
                         (ts, body.trade_id))
        elif isinstance(body, ev.Settled):
            self._settlement(conn, ts, body.trade_id, body.delivered_wh, body.paid_wei)
            self._paid(conn, body.trade_id, body.delivered_wh, body.paid_wei)
        elif isinstance(body, ev.TradeClosed):
            self._settlement(conn, ts, body.trade_id, body.delivered_wh, body.paid_wei)
            self._paid(conn, body.trade_id, body.delivered_wh, body.paid_wei)
            conn.execute("UPDATE hist_trades SET refunded_wei = ?, settled_at = COALESCE(settled_at, ?) "
                         "WHERE trade_id = ?", (str(body.refunded_wei), ts, body.trade_id))
        elif isinstance(body, ev.MeterMismatch):
            conn.execute("UPDATE hist_trades SET mismatch = ? WHERE trade_id = ?",
                         (json.dumps({"buyer_wh": body.buyer_wh, "seller_wh": body.seller_wh,
                                      "tolerance": body.tolerance, "reason": body.reason, "at": ts}),
                          body.trade_id))
        elif isinstance(body, ev.OfferOpened):
            conn.execute("INSERT OR IGNORE INTO hist_offers (offer_id, seller, seller_site, wh, start_price, opened_at, "
                         "ends_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (body.offer_id, body.seller, body.seller_site, body.wh, str(body.start_price_wei_per_kwh),
                          body.opened_at, body.ends_at))
            self._price(conn, ts, "start", body.start_price_wei_per_kwh, body.offer_id, body.wh, body.seller)
        elif isinstance(body, ev.OfferClosed):
            conn.execute("UPDATE hist_offers SET outcome = ?, closed_at = ? WHERE offer_id = ?",
                         (body.outcome, ts, body.offer_id))
        elif isinstance(body, ev.BidPlaced):
            self._price(conn, ts, "bid", body.price_wei_per_kwh, body.offer_id, body.wh, body.buyer)
        elif isinstance(body, ev.MarketCleared):
            if body.price_wei_per_kwh is not None:
                self._price(conn, ts, "clear", body.price_wei_per_kwh, f"round {body.round}", body.volume_wh, "")
        elif isinstance(body, ev.WalletTx) and body.site == self.site:
            self._tx(conn, ts, account=body.account, tx_hash=body.tx_hash, kind=body.kind, ref=body.ref,
                     status=body.status, block=body.block, reason=body.reason, mined_hash=body.mined_hash)

    def _trade(self, conn: sqlite3.Connection, b: ev.TradeAgreed | ev.TradeStatus, state: str, ts: float) -> None:
        conn.execute(
            "INSERT INTO hist_trades (trade_id, offer_id, seller, buyer, seller_site, buyer_site, wh, price, state, "
            "delivered_wh, agreed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (trade_id) DO UPDATE SET "
            f"state = CASE WHEN excluded.state = '{S.AGREED}' THEN hist_trades.state ELSE excluded.state END, "
            "delivered_wh = MAX(hist_trades.delivered_wh, excluded.delivered_wh)",
            (b.trade_id, getattr(b, "offer_id", ""), b.seller, b.buyer, b.seller_site, b.buyer_site, b.wh,
             str(b.price_wei_per_kwh), state, getattr(b, "delivered_wh", 0), ts))

    def _settlement(self, conn: sqlite3.Connection, ts: float, trade_id: str, delivered_wh: int,
                    paid_wei: int) -> None:
        """What this settlement added to a trade of this site (the chain's numbers are cumulative)."""
        parties = conn.execute("SELECT seller, buyer, seller_site, buyer_site FROM hist_trades WHERE trade_id = ? "
                               "AND (seller_site = ? OR buyer_site = ?)", (trade_id, self.site, self.site)).fetchone()
        if parties is None:
            return
        last = conn.execute("SELECT delivered_wh, paid_wei FROM hist_settlements WHERE trade_id = ? "
                            "ORDER BY id DESC LIMIT 1", (trade_id,)).fetchone()
        wh0, wei0 = (last[0], int(last[1])) if last else (0, 0)
        d_wh, d_wei = max(0, delivered_wh - wh0), max(0, paid_wei - wei0)
        if not d_wh and not d_wei:
            return
        # each increment names the trade's parties and their sites: the figures tell trades with
        # the utility from local ones by the other party's site
        conn.execute("INSERT INTO hist_settlements (trade_id, at, delivered_wh, paid_wei, d_wh, d_wei, seller, buyer, "
                     "seller_site, buyer_site) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                     (trade_id, ts, max(delivered_wh, wh0), str(max(paid_wei, wei0)), d_wh, str(d_wei), *parties))
        conn.execute("DELETE FROM hist_settlements WHERE id <= (SELECT MAX(id) FROM hist_settlements) - ?",
                     (KEEP_SETTLEMENTS,))

    @staticmethod
    def _paid(conn: sqlite3.Connection, trade_id: str, delivered_wh: int, paid_wei: int) -> None:
        row = conn.execute("SELECT paid_wei FROM hist_trades WHERE trade_id = ?", (trade_id,)).fetchone()
        if row is None:
            return
        conn.execute("UPDATE hist_trades SET delivered_wh = MAX(delivered_wh, ?), paid_wei = ? WHERE trade_id = ?",
                     (delivered_wh, str(max(int(row[0]), paid_wei)), trade_id))

    @staticmethod
    def _price(conn: sqlite3.Connection, ts: float, kind: str, price: int, ref: str, wh: int | None, who: str) -> None:
        conn.execute("INSERT INTO hist_prices (at, kind, price, ref, wh, who) VALUES (?, ?, ?, ?, ?, ?)",
                     (ts, kind, str(price), ref, wh, who))
        conn.execute("DELETE FROM hist_prices WHERE id <= (SELECT MAX(id) FROM hist_prices) - ?", (KEEP_PRICES,))

    @staticmethod
    def _tx(conn: sqlite3.Connection, ts: float, *, account: str, tx_hash: str, kind: str, ref: str = "",
            to: str | None = None, amount_wei: int | None = None, status: str | None = None,
            block: int | None = None, reason: str = "", mined_hash: str = "") -> None:
        if amount_wei is None and kind in ("deposit", "withdraw", "withdraw_credit") and ref.isdigit():
            amount_wei = int(ref)  # the wallet names the amount of an escrow transaction in its ref
        if to is None and kind == "transfer" and ref.startswith("0x"):
            to = ref
        final = ts if status in ("confirmed", "failed") else None
        conn.execute(
            "INSERT INTO hist_txs (tx_hash, account, kind, ref, to_addr, amount_wei, status, block, reason, "
            "mined_hash, sent_at, final_at) VALUES (?, ?, ?, ?, ?, ?, COALESCE(?, 'pending'), ?, ?, ?, ?, ?) "
            "ON CONFLICT (tx_hash) DO UPDATE SET "
            "to_addr = COALESCE(hist_txs.to_addr, excluded.to_addr), "
            "amount_wei = COALESCE(hist_txs.amount_wei, excluded.amount_wei), "
            "ref = CASE WHEN excluded.ref != '' THEN excluded.ref ELSE hist_txs.ref END, "
            "status = CASE WHEN ? IS NULL OR hist_txs.status IN ('confirmed', 'failed') AND ? = 'pending' "
            "THEN hist_txs.status ELSE excluded.status END, "
            "block = COALESCE(excluded.block, hist_txs.block), "
            "reason = CASE WHEN excluded.reason != '' THEN excluded.reason ELSE hist_txs.reason END, "
            "mined_hash = CASE WHEN excluded.mined_hash != '' THEN excluded.mined_hash ELSE hist_txs.mined_hash END, "
            "sent_at = MIN(hist_txs.sent_at, excluded.sent_at), "
            "final_at = COALESCE(hist_txs.final_at, excluded.final_at)",
            (tx_hash, account, kind, ref, to, None if amount_wei is None else str(amount_wei), status, block, reason,
             mined_hash, ts, final, status, status))

    # --- what the gateway itself did ----------------------------------------------------

    async def sent(self, *, account: str, kind: str, tx_hash: str, amount_wei: int, to: str | None = None) -> None:
        """A transaction this gateway had the wallet send (its amount and recipient are known here)."""
        async with self.store.atomic() as conn:
            self._tx(conn, self.now(), account=account, tx_hash=tx_hash, kind=kind, to=to, amount_wei=amount_wei)

    async def closing(self, trade_id: str, by: str) -> None:
        """The person pressed Close Connection on ``trade_id`` (before the auction's own word of it)."""
        async with self.store.atomic() as conn:
            conn.execute("UPDATE hist_trades SET closing_by = ? WHERE trade_id = ?", (by, trade_id))

    # --- reading it ----------------------------------------------------------------------

    def facts(self, trade_ids: list[str]) -> dict[str, dict[str, Any]]:
        """What the trade cards tell beyond the auction's listing, by trade id."""
        out: dict[str, dict[str, Any]] = {}
        conn = self.store.conn
        for i in range(0, len(trade_ids), 500):
            chunk = trade_ids[i:i + 500]
            cur = conn.execute(
                "SELECT trade_id, agreed_at, recorded_at, closed_at, closed_reason, closing_by, settled_at, "
                f"failed_reason, refunded_wei, mismatch, state FROM hist_trades WHERE trade_id IN "
                f"({','.join('?' * len(chunk))})", chunk)
            for (tid, agreed, recorded, closed, reason, closing_by, settled, failed, refunded, mismatch,
                 state) in cur:
                who = closed_by(reason, state) or ("buyer" if closing_by else "")
                out[tid] = {"agreed_at": agreed, "recorded_at": recorded, "closed_at": closed,
                            "closed_by": who, "close_reason": reason or failed, "settled_at": settled,
                            "refunded_wei": None if refunded is None else int(refunded),
                            "mismatch": json.loads(mismatch) if mismatch else None,
                            "sim_agreed_at": self.sim_of(agreed), "sim_closed_at": self.sim_of(closed)}
        return out

    def rows(self, account: str, limit: int = 500) -> list[dict[str, Any]]:
        """The account's history, newest first: trades it bought or sold, offers that ended
        without a trade, and its Ether transfers, deposits and withdrawals."""
        me = account.lower()
        conn = self.store.conn
        rows: list[dict[str, Any]] = []
        for r in conn.execute(
                "SELECT trade_id, offer_id, seller, buyer, seller_site, buyer_site, wh, price, state, agreed_at, "
                "closed_at, closed_reason, delivered_wh, paid_wei, refunded_wei, mismatch, failed_reason, closing_by "
                "FROM hist_trades WHERE seller = ? COLLATE NOCASE OR buyer = ? COLLATE NOCASE "
                "ORDER BY agreed_at DESC LIMIT ?", (me, me, limit)):
            (tid, oid, seller, buyer, s_site, b_site, wh, price, state, agreed, closed, reason, delivered, paid,
             refunded, mismatch, failed, closing_by) = r
            sold = seller.lower() == me
            rows.append({
                "at": agreed, "sim_at": self.sim_of(agreed), "kind": "sold" if sold else "bought", "id": tid,
                "counterparty": buyer if sold else seller, "counterparty_site": b_site if sold else s_site,
                "wh": wh, "delivered_wh": delivered, "price_wei_per_kwh": int(price), "amount_wei": int(paid),
                "refunded_wei": None if refunded is None else int(refunded), "status": state,
                "detail": self._trade_words(state, reason or failed, closing_by, mismatch, closed, sold)})
        for r in conn.execute(
                "SELECT offer_id, wh, start_price, opened_at, outcome, closed_at FROM hist_offers "
                "WHERE seller = ? COLLATE NOCASE AND outcome IN ('expired', 'cancelled') "
                "ORDER BY opened_at DESC LIMIT ?", (me, limit)):
            oid, wh, start, opened, outcome, closed = r
            rows.append({"at": closed or opened, "sim_at": self.sim_of(closed or opened), "kind": "offer", "id": oid,
                         "counterparty": "", "counterparty_site": "", "wh": wh, "delivered_wh": 0,
                         "price_wei_per_kwh": int(start), "amount_wei": 0, "refunded_wei": None, "status": outcome,
                         "detail": "your offer expired without a bid" if outcome == "expired"
                         else "you cancelled your offer"})
        kinds = ",".join(f"'{k}'" for k in SHOWN_TX_KINDS)
        for r in conn.execute(
                f"SELECT tx_hash, account, kind, to_addr, amount_wei, status, reason, sent_at, final_at, block "
                f"FROM hist_txs WHERE kind IN ({kinds}) AND (account = ? COLLATE NOCASE OR "
                f"(kind = 'transfer' AND to_addr = ? COLLATE NOCASE AND status = 'confirmed')) "
                f"ORDER BY sent_at DESC LIMIT ?", (me, me, limit)):
            tx_hash, sender, kind, to, amount, status, reason, sent_at, final_at, block = r
            mine = sender.lower() == me
            kind_shown = kind if kind != "transfer" else ("sent" if mine else "received")
            detail = TX_WORDS.get(kind, "Ether sent" if mine else "Ether received")
            if status == "failed":
                detail += f": failed ({reason or 'no reason given'})"
            rows.append({"at": sent_at, "sim_at": self.sim_of(sent_at), "kind": kind_shown, "id": tx_hash,
                         "counterparty": (to or "") if mine else sender, "counterparty_site": "",
                         "wh": None, "delivered_wh": None, "price_wei_per_kwh": None,
                         "amount_wei": None if amount is None else int(amount), "refunded_wei": None,
                         "status": status, "detail": detail})
        rows.sort(key=lambda x: x["at"] or 0, reverse=True)
        return rows[:limit]

    @staticmethod
    def _trade_words(state: str, reason: str, closing_by: str, mismatch: str | None, closed: float | None,
                     sold: bool) -> str:
        if state == "failed":
            return f"could not be opened on the chain: {reason or 'no reason given'}"
        who = closed_by(reason, state)
        if not who and closing_by:
            who = "buyer"
        you = "buyer" if not sold else "seller"
        text = {"buyer": "closed by you" if you == "buyer" else "closed by the buyer",
                "seller": "closed by you" if you == "seller" else "closed by the seller",
                "operator": "closed by the market", "chain": "closed on the chain",
                "mismatch": "closed: the meters disagreed",
                "delivered": "all delivered"}.get(who, "running" if state in OPEN
                                                  else state)
        if mismatch:
            mm = json.loads(mismatch)
            text += f"; meters disagree (buyer {words.energy(mm['buyer_wh'])}, seller {words.energy(mm['seller_wh'])})"
        return text

    def prices(self, limit: int = 1000) -> list[dict[str, Any]]:
        out = [{"at": at, "sim_at": self.sim_of(at), "kind": kind, "price_wei_per_kwh": int(price), "ref": ref,
                "wh": wh, "who": who}
               for at, kind, price, ref, wh, who in self.store.conn.execute(
                   "SELECT at, kind, price, ref, wh, who FROM hist_prices ORDER BY id DESC LIMIT ?", (limit,))]
        out.reverse()
        return out

    def figures(self, account: str, start: int, end: int, tariffs: figures.Tariffs, tz_offset_s: int = 0,
                utility_site: str = "utility") -> tuple[list[figures.Row], figures.Row]:
        """The account's figures per day of site time in ``[start, end)`` and their total
        (raises :class:`figures.RangeError` for a range it cannot give); a trade whose other
        party is on ``utility_site`` counts as bought from or sold to the utility."""
        figures.check_range(start, end, tz_offset_s)
        wh: dict[int, list[float]] = {}
        lo, hi = figures.bucket_of(start), end
        for b, p, c in self.store.conn.execute(
                "SELECT bucket, produced_wh, consumed_wh FROM hist_energy WHERE bucket >= ? AND bucket < ?", (lo, hi)):
            wh[b] = [p, c]
        for pending in (self._flushing, self._energy):
            for b, (p, c) in pending.items():
                if lo <= b < hi:
                    acc = wh.setdefault(b, [0.0, 0.0])
                    acc[0] += p
                    acc[1] += c
        buckets = [(b, round(p * figures.MWH_PER_WH), round(c * figures.MWH_PER_WH)) for b, (p, c) in wh.items()]
        me = account.lower()
        settlements = []
        for at, d_wh, d_wei, seller, seller_site, buyer_site in self.store.conn.execute(
                "SELECT at, d_wh, d_wei, seller, seller_site, buyer_site FROM (SELECT s.id, s.at, s.d_wh, s.d_wei, "
                "COALESCE(s.seller, t.seller) AS seller, COALESCE(s.buyer, t.buyer) AS buyer, "
                "COALESCE(s.seller_site, t.seller_site) AS seller_site, "
                "COALESCE(s.buyer_site, t.buyer_site) AS buyer_site "
                "FROM hist_settlements s LEFT JOIN hist_trades t USING (trade_id)) "
                "WHERE seller = ? COLLATE NOCASE OR buyer = ? COLLATE NOCASE ORDER BY id", (me, me)):
            sim = self.sim_of(at)
            assert sim is not None
            sold = seller.lower() == me
            other_site = buyer_site if sold else seller_site
            settlements.append(figures.Settlement(sim_at=sim, wh=d_wh, wei=int(d_wei), sold=sold,
                                                  utility=other_site == utility_site))
        return figures.compute(buckets, settlements, start, end, tariffs, tz_offset_s)

    def today(self, tz_offset_s: int = 0) -> tuple[int, int]:
        """The current day of the site's clock: (start, end) in site time."""
        now = self.sim_of(self.now())
        d = figures.day_of(now if now is not None else self.now(), tz_offset_s)
        return d, d + figures.DAY_S

    def recent_readings(self, limit: int = 720) -> list[dict[str, Any]]:
        return list(self.readings)[-limit:]


CSV_HEADER = ["time (UTC)", "site time (UTC)", "what", "counterparty", "counterparty site", "energy traded (kWh)",
              "energy delivered (kWh)", "price (Ether/kWh)", "amount (Ether)", "refunded (Ether)", "status", "detail",
              "id"]
WHAT = {"bought": "you bought", "sold": "you sold", "sent": "you sent Ether", "received": "you received Ether",
        "deposit": "escrow deposit", "withdraw": "escrow withdrawal", "withdraw_credit": "earnings withdrawn",
        "offer": "your offer"}


def _iso(ts: float | None) -> str:
    if ts is None:
        return ""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def to_csv(rows: list[dict[str, Any]]) -> str:
    """The history as CSV: exact amounts (every wei, every Wh), times in UTC."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerow(CSV_HEADER)

    def opt(value: int | None, fmt: Any) -> str:
        return "" if value is None else fmt(value)

    for r in rows:
        w.writerow([_iso(r["at"]), _iso(r["sim_at"]), WHAT.get(r["kind"], r["kind"]), r["counterparty"],
                    r["counterparty_site"], opt(r["wh"], words.kwh), opt(r["delivered_wh"], words.kwh),
                    opt(r["price_wei_per_kwh"], words.ether_exact), opt(r["amount_wei"], words.ether_exact),
                    opt(r["refunded_wei"], words.ether_exact), r["status"], r["detail"], r["id"]])
    return buf.getvalue()
