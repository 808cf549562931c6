"""The meter service: reads each meter, announces whole kWh, drives relays from trades,
accounts delivery and cross-checks it.

Per meter, every ``reading_interval_s``, one store transaction holds: the counters read,
the kWh index and counter baseline, the trade's delivered Wh, and the events they cause
(``MeterReading``, ``EnergyProduced``, ``Delivery``, ``DeliveryMismatch``,
``RelayChanged``) staged in the outbox. A SIGKILL at any point therefore either keeps
all of it or none of it: no kWh is announced twice or skipped.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import sqlite3
import time
from typing import Any

from prometheus_client import Gauge

from services.bus.envelope import Envelope, caused_by
from services.bus.events import (Delivery, DeliveryMismatch, EnergyProduced, MeterReading, RelayChanged,
                                 TradeHeartbeat, TradeStatus)
from services.bus.service import Service

from .accounting import (LIVE, KwhState, RelayDecision, TradeView, counter_delta, interpolate, mismatch,
                         relay_decision, whole_kwh)
from .config import MeterConfig, MeterSettings
from .drivers import Backoff, Driver, SimDriver, make_driver
from .errors import MeterError
from .models import Counters

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meter_counters (
    meter TEXT PRIMARY KEY,
    kwh_index INTEGER NOT NULL DEFAULT 0,     -- index the next whole kWh gets
    accum_wh INTEGER NOT NULL DEFAULT 0,      -- Wh counted towards it
    last_energy INTEGER,                      -- counter baseline: the last energy_wh read
    first_energy INTEGER,                     -- the counter when this store first saw the meter
    last_export INTEGER,                      -- the last export_wh read
    relay_closed INTEGER,                     -- the relay state last announced
    current_trade TEXT,                       -- the trade delivery is counted for
    resets INTEGER NOT NULL DEFAULT 0,
    sim_state TEXT
);
CREATE TABLE IF NOT EXISTS meter_trades (
    trade_id TEXT PRIMARY KEY, state TEXT NOT NULL, seller_site TEXT NOT NULL, buyer_site TEXT NOT NULL,
    wh INTEGER NOT NULL, heard REAL NOT NULL, omitted INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS meter_delivery (
    trade_id TEXT NOT NULL, meter TEXT NOT NULL, delivered_wh INTEGER NOT NULL DEFAULT 0,
    published_wh INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (trade_id, meter)
);
CREATE TABLE IF NOT EXISTS meter_peer (
    trade_id TEXT PRIMARY KEY, buyer_wh INTEGER NOT NULL, buyer_ts REAL NOT NULL,
    flagged INTEGER NOT NULL DEFAULT 0
);
"""

def _one(conn: sqlite3.Connection, sql: str, args: tuple) -> dict[str, Any] | None:
    """One row as a dict (the store's connection is shared: its row factory stays as is)."""
    cur = conn.execute(sql, args)
    row = cur.fetchone()
    return None if row is None else dict(zip([d[0] for d in cur.description], row))


FAIL_OPEN_AFTER = 3
"""Consecutive failed reads after which the relay is commanded open."""


class MeterRunner:
    """One meter: its driver, its loop, its bookkeeping."""

    def __init__(self, svc: MeterService, cfg: MeterConfig, driver: Driver) -> None:
        self.svc, self.cfg, self.driver = svc, cfg, driver
        self.fails = 0
        self.reads = 0
        self.last: Counters | None = None
        self.decision = RelayDecision(False, None, "starting")
        self.samples: dict[str, collections.deque[tuple[float, int]]] = {}

    # --- the loop -------------------------------------------------------------------

    async def run(self) -> None:
        interval = self.svc.settings.reading_interval_s
        while True:
            started = time.monotonic()
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a meter loop never dies
                log.exception("meter %s: tick failed", self.cfg.name)
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    async def tick(self) -> None:
        s = self.svc.settings
        now = time.time()
        if self.cfg.trade:
            self.decision = relay_decision(self.svc.trade_views(), s.site, now, s.trade_timeout_s)
        try:
            c = await self.driver.read()
        except MeterError as e:
            await self.failed(e)
            return
        self.fails = 0
        self.reads += 1
        self.last = c
        await self.record(c, now)
        if self.cfg.trade and c.relay_closed != self.decision.closed:
            try:
                await self.driver.set_relay(self.decision.closed)
            except MeterError as e:
                await self.failed(e)
                return
            await self.note_relay(self.decision.closed, self.decision.trade_id, self.decision.reason)

    async def failed(self, e: MeterError) -> None:
        self.fails += 1
        self.svc.update_metrics(self, None)
        log.debug("meter %s: read failed (%d in a row): %s", self.cfg.name, self.fails, e)
        if self.fails >= FAIL_OPEN_AFTER and self.cfg.trade and self.fails % FAIL_OPEN_AFTER == 0:
            # fail safe: a meter we cannot read must not keep energy flowing
            with contextlib.suppress(MeterError):
                await self.driver.set_relay(False)
                await self.note_relay(False, self.decision.trade_id, f"meter errors: {e}")

    # --- bookkeeping in one transaction ---------------------------------------------

    def _row(self, conn: sqlite3.Connection) -> dict[str, Any]:
        conn.execute("INSERT OR IGNORE INTO meter_counters (meter) VALUES (?)", (self.cfg.name,))
        return _one(conn, "SELECT * FROM meter_counters WHERE meter = ?", (self.cfg.name,))

    async def note_relay(self, closed: bool, trade_id: str | None, reason: str) -> None:
        async with self.svc.store.atomic() as conn:
            self._relay_changed(conn, closed, trade_id, reason)

    def _relay_changed(self, conn: sqlite3.Connection, closed: bool, trade_id: str | None, reason: str) -> None:
        row = self._row(conn)
        if row["relay_closed"] is not None and bool(row["relay_closed"]) == closed:
            return
        conn.execute("UPDATE meter_counters SET relay_closed = ? WHERE meter = ?", (int(closed), self.cfg.name))
        self.svc.stage(RelayChanged(site=self.svc.settings.site, meter=self.cfg.name, closed=closed,
                                    trade_id=trade_id, reason=reason[:200]))
        log.info("meter %s: relay %s (%s)", self.cfg.name, "closed" if closed else "open", reason)

    async def record(self, c: Counters, now: float) -> None:
        s = self.svc.settings
        site, name = s.site, self.cfg.name
        async with self.svc.store.atomic() as conn:
            # the reading first: what it leads to (energy produced, a delivery, a relay that
            # moved by itself) names it as its cause
            sim = self.driver.sim_clock()  # a simulated site's own clock, for the charts' time axes
            reading = self.svc.stage(MeterReading(
                site=site, meter=name, role=self.cfg.role, energy_wh=c.energy_wh, power_w=c.power_w,
                voltage_v=c.voltage_v, current_a=c.current_a, relay_closed=c.relay_closed,
                soc=c.soc, load_w=c.load_w, pv_w=c.pv_w, sim_ts=sim[0] if sim else None,
                time_scale=sim[1] if sim else None))
            with caused_by(reading.id):
                row = self._row(conn)
                d_energy, reset = counter_delta(row["last_energy"], c.energy_wh)
                if reset:
                    log.warning("meter %s: energy counter went back from %s to %s: counting on from there",
                                name, row["last_energy"], c.energy_wh)
                # whole kWh into the producer's batteries -> EnergyProduced, exactly once each
                kwh = KwhState(row["kwh_index"], row["accum_wh"])
                if self.cfg.mints:
                    kwh, indexes = whole_kwh(kwh, d_energy, can_announce=s.account is not None)
                    for i in indexes:
                        self.svc.stage(EnergyProduced(reading_id=f"{site}/{name}/{i}", site=site, meter=name,
                                                      account=s.account, kwh_index=i))
                # delivery for the trade the relay follows
                current = row["current_trade"]
                if self.cfg.trade:
                    if c.export_wh is not None and self.cfg.role == "producer":
                        d_flow, _ = counter_delta(row["last_export"], c.export_wh)
                    else:
                        d_flow = d_energy
                    current = self._deliver(conn, current, d_flow, now, c.relay_closed)
                # a relay that moved by itself (the meter's watchdog, a hand on the switch)
                if row["relay_closed"] is not None and bool(row["relay_closed"]) != c.relay_closed:
                    self._relay_changed(conn, c.relay_closed, self.decision.trade_id, "changed at the meter")
                elif row["relay_closed"] is None:
                    conn.execute("UPDATE meter_counters SET relay_closed = ? WHERE meter = ?",
                                 (int(c.relay_closed), name))
                sim_state = self.driver.state_json() if isinstance(self.driver, SimDriver) else None
                conn.execute(
                    "UPDATE meter_counters SET kwh_index = ?, accum_wh = ?, last_energy = ?, last_export = ?,"
                    " first_energy = COALESCE(first_energy, ?), current_trade = ?, resets = resets + ?,"
                    " sim_state = COALESCE(?, sim_state) WHERE meter = ?",
                    (kwh.next_index, kwh.accum_wh, c.energy_wh, c.export_wh, c.energy_wh, current, int(reset),
                     sim_state, name))
        self.svc.update_metrics(self, c)

    def _deliver(self, conn: sqlite3.Connection, current: str | None, d_flow: int, now: float,
                 relay_closed: bool) -> str | None:
        """Count ``d_flow`` for the trade being delivered; switch trades; publish Delivery.

        A trade that ended keeps the meter until a reading shows the relay open, so the
        energy that flowed between the last reading and the relay opening is counted too."""
        active = self.decision.trade_id if self.decision.closed else None
        if current is not None and active is None and relay_closed:
            active = current
        if current is not None:
            conn.execute("INSERT OR IGNORE INTO meter_delivery (trade_id, meter) VALUES (?, ?)", (current, self.cfg.name))
            conn.execute("UPDATE meter_delivery SET delivered_wh = delivered_wh + ? WHERE trade_id = ? AND meter = ?",
                         (d_flow, current, self.cfg.name))
            self._publish_delivery(conn, current, final=current != active, now=now)
        if active is not None and active != current:
            conn.execute("INSERT OR IGNORE INTO meter_delivery (trade_id, meter) VALUES (?, ?)", (active, self.cfg.name))
            log.info("meter %s: counting delivery for trade %s", self.cfg.name, active)
        return active

    def _publish_delivery(self, conn: sqlite3.Connection, trade_id: str, *, final: bool, now: float) -> None:
        s = self.svc.settings
        delivered, published = conn.execute(
            "SELECT delivered_wh, published_wh FROM meter_delivery WHERE trade_id = ? AND meter = ?",
            (trade_id, self.cfg.name)).fetchone()
        step = s.delivery_granularity_wh
        due = final or (delivered > published and (step == 0 or delivered - published >= step))
        if due:
            conn.execute("UPDATE meter_delivery SET published_wh = ? WHERE trade_id = ? AND meter = ?",
                         (delivered, trade_id, self.cfg.name))
            self.svc.stage(Delivery(trade_id=trade_id, site=s.site, meter=self.cfg.name, role=self.cfg.role,
                                    delivered_wh=delivered, final=final))
        if self.cfg.role == "producer":
            self._cross_check(conn, trade_id, delivered, now)

    def _cross_check(self, conn: sqlite3.Connection, trade_id: str, seller_wh: int, now: float) -> None:
        """At the seller: the buyer's latest cumulative Delivery against our own outflow at
        the same moment (interpolated between our readings)."""
        s = self.svc.settings
        trade = _one(conn, "SELECT seller_site FROM meter_trades WHERE trade_id = ?", (trade_id,))
        if trade is None or trade["seller_site"] != s.site:
            return
        samples = self.samples.setdefault(trade_id, collections.deque(maxlen=1000))
        samples.append((now, seller_wh))
        peer = _one(conn, "SELECT buyer_wh, buyer_ts, flagged FROM meter_peer WHERE trade_id = ?", (trade_id,))
        if peer is None or peer["flagged"] or not samples[0][0] <= peer["buyer_ts"] <= samples[-1][0]:
            return
        at = interpolate(list(samples), peer["buyer_ts"])
        assert at is not None
        # the two ends read at different moments and their relays closed a reading apart:
        # one reading's worth of flow is timing, not loss
        recent = list(samples)[-10:]
        step = max((b[1] - a[1] for a, b in zip(recent, recent[1:])), default=0)
        if mismatch(peer["buyer_wh"], round(at), s.mismatch_tolerance, s.mismatch_slack_wh + step):
            conn.execute("UPDATE meter_peer SET flagged = 1 WHERE trade_id = ?", (trade_id,))
            self.svc.stage(DeliveryMismatch(trade_id=trade_id, buyer_wh=peer["buyer_wh"], seller_wh=round(at),
                                            tolerance=s.mismatch_tolerance))
            log.warning("trade %s: buyer measured %s Wh, seller gave %s Wh: beyond the %.0f %% tolerance",
                        trade_id, peer["buyer_wh"], round(at), 100 * s.mismatch_tolerance)

    def health(self) -> dict[str, Any]:
        return {**self.driver.health(), "role": self.cfg.role, "reads": self.reads, "failing": self.fails,
                "relay_closed": self.last.relay_closed if self.last else None,
                "relay_wanted": self.decision.closed, "trade": self.decision.trade_id,
                "why": self.decision.reason, "energy_wh": self.last.energy_wh if self.last else None}


class MeterService(Service):
    name = "meter"
    settings: MeterSettings

    async def setup(self) -> None:
        s = self.settings
        self.deliveries_refused: dict[str, int] = {}  # site -> its Delivery for a trade it is not the buyer of
        self.store.conn.executescript(SCHEMA)
        self.publisher()
        self.subscribe(["trade.status.", "trade.heartbeat.", "meter.delivery."], self.on_event)
        self.g_errors = Gauge("gridtrade_meter_errors", "driver errors by reason", ["meter", "reason"],
                              registry=self.registry)
        self.g_energy = Gauge("gridtrade_meter_energy_wh", "energy counter", ["meter"], registry=self.registry)
        self.g_relay = Gauge("gridtrade_meter_relay_closed", "1 while the relay is closed", ["meter"],
                             registry=self.registry)
        self.g_connected = Gauge("gridtrade_meter_connected", "1 while the port is open", ["meter"],
                                 registry=self.registry)
        if s.account is None and any(m.mints for m in s.meters):
            log.warning("no GRIDTRADE_ACCOUNT: whole kWh are counted but not announced until one is set")
        self.runners: list[MeterRunner] = []
        for cfg in s.meters:
            state = None
            if cfg.driver == "sim":
                row = _one(self.store.conn, "SELECT sim_state FROM meter_counters WHERE meter = ?", (cfg.name,))
                state = json.loads(row["sim_state"]) if row and row["sim_state"] else None
            driver = make_driver(cfg, s.sim, state=state, backoff=Backoff(s.backoff_initial_s, s.backoff_max_s))
            self.runners.append(MeterRunner(self, cfg, driver))
        self._loops: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await super().start()  # the publisher is up before the first reading is staged
        self._loops = [asyncio.create_task(r.run(), name=f"meter-{r.cfg.name}") for r in self.runners]

    def stage(self, body: Any) -> Envelope:
        assert self.pub is not None
        return self.pub.stage(body)

    async def stopping(self) -> None:
        loops = getattr(self, "_loops", [])
        for t in loops:
            t.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        for r in getattr(self, "runners", []):  # a clean stop leaves no relay closed
            if r.cfg.trade:
                with contextlib.suppress(MeterError, Exception):
                    await asyncio.wait_for(r.driver.set_relay(False), 2)
                    await r.note_relay(False, None, "meter service stopping")

    async def teardown(self) -> None:
        for r in getattr(self, "runners", []):
            await r.driver.close()

    # --- what we hear ---------------------------------------------------------------

    def trade_views(self) -> list[TradeView]:
        rows = self.store.conn.execute(
            "SELECT trade_id, state, seller_site, buyer_site, heard, omitted FROM meter_trades"
            " WHERE state NOT IN ('fulfilled', 'closed', 'settled', 'failed')")
        return [TradeView(r[0], r[1], r[2], r[3], r[4], bool(r[5])) for r in rows]

    async def on_event(self, env: Envelope, conn: sqlite3.Connection) -> None:
        body, site = env.body, self.settings.site
        if isinstance(body, TradeStatus):
            if site not in (body.seller_site, body.buyer_site):
                return
            conn.execute(
                "INSERT INTO meter_trades (trade_id, state, seller_site, buyer_site, wh, heard) VALUES (?,?,?,?,?,?)"
                " ON CONFLICT (trade_id) DO UPDATE SET state = excluded.state, heard = MAX(heard, excluded.heard),"
                " omitted = CASE WHEN excluded.state IN ('recorded', 'delivering') THEN 0 ELSE omitted END",
                (body.trade_id, body.state, body.seller_site, body.buyer_site, body.wh,
                 env.ts if body.state in LIVE else 0.0))
        elif isinstance(body, TradeHeartbeat):
            live = set(body.live)
            for trade_id, state in conn.execute(
                    "SELECT trade_id, state FROM meter_trades"
                    " WHERE state NOT IN ('fulfilled', 'closed', 'settled', 'failed')").fetchall():
                if trade_id in live:
                    conn.execute("UPDATE meter_trades SET heard = MAX(heard, ?), omitted = 0 WHERE trade_id = ?",
                                 (env.ts, trade_id))
                elif state in LIVE:
                    conn.execute("UPDATE meter_trades SET omitted = 1 WHERE trade_id = ?", (trade_id,))
        elif isinstance(body, Delivery):
            if body.role != "consumer" or body.site == site:
                return
            trade = _one(conn, "SELECT buyer_site FROM meter_trades WHERE trade_id = ?", (body.trade_id,))
            if trade is not None and trade["buyer_site"] != body.site:
                # only the trade's buyer's meter says what arrived: another site's word would
                # raise a false mismatch here (and its flag would hide a real one)
                self.deliveries_refused[body.site] = self.deliveries_refused.get(body.site, 0) + 1
                return
            conn.execute(
                "INSERT INTO meter_peer (trade_id, buyer_wh, buyer_ts) VALUES (?, ?, ?) ON CONFLICT (trade_id)"
                " DO UPDATE SET buyer_wh = MAX(buyer_wh, excluded.buyer_wh),"
                " buyer_ts = CASE WHEN excluded.buyer_wh >= buyer_wh THEN excluded.buyer_ts ELSE buyer_ts END",
                (body.trade_id, body.delivered_wh, env.ts))

    # --- health and metrics ---------------------------------------------------------

    def update_metrics(self, r: MeterRunner, c: Counters | None) -> None:
        if c is not None:
            self.g_energy.labels(r.cfg.name).set(c.energy_wh)
            self.g_relay.labels(r.cfg.name).set(int(c.relay_closed))
        self.g_connected.labels(r.cfg.name).set(int(r.driver.connected))
        for reason, n in r.driver.errors.items():
            self.g_errors.labels(r.cfg.name, reason).set(n)

    def health(self) -> dict[str, Any]:
        return {**super().health(), "meters": {r.cfg.name: r.health() for r in getattr(self, "runners", [])},
                "deliveries_refused": dict(getattr(self, "deliveries_refused", {}))}
