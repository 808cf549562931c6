"""The meter service: reads each meter, announces whole kWh, drives relays from trades,
accounts delivery and cross-checks it.

Per meter, every ``reading_interval_s``: the relay is decided from the trades heard and
driven from the reading, then one store transaction holds the counters believed, the kWh
index and counter baselines, the trade's delivered Wh, and the events they cause
(``MeterReading``, ``EnergyProduced``, ``Delivery``, ``DeliveryMismatch``,
``RelayChanged``) staged in the outbox. A SIGKILL at any point therefore either keeps
all of it or none of it: no kWh is announced twice or skipped. A reading that implies
more than the meter's rated power, or a counter that went back and is not confirmed yet,
counts nothing (:mod:`services.meter.accounting`).
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

from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge

from services.bus.envelope import Envelope, caused_by
from services.bus.events import (Delivery, DeliveryMismatch, EnergyProduced, MeterReading, RelayChanged,
                                 TradeHeartbeat, TradeStatus)
from services.bus.service import Service

from .accounting import (LIVE, CounterState, KwhState, ReadingJudgement, RelayDecision, TradeView, interpolate,
                         judge_reading, mismatch, relay_decision, whole_kwh)
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
    last_energy INTEGER,                      -- counter baseline: the last energy_wh believed
    first_energy INTEGER,                     -- the counter when this store first saw the meter
    last_export INTEGER,                      -- the last export_wh believed
    last_ts REAL,                             -- when the read of those baselines started (wall clock)
    relay_closed INTEGER,                     -- the relay state last announced
    current_trade TEXT,                       -- the trade delivery is counted for
    resets INTEGER NOT NULL DEFAULT 0,        -- counter resets and jumps confirmed (re-based, nothing counted)
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

COLUMNS_ADDED = {"meter_counters": {"last_ts": "REAL"}}
"""Columns added since the first version of the schema: added to an older store at start."""


def migrate(conn: sqlite3.Connection) -> None:
    conn.executescript(SCHEMA)
    for table, cols in COLUMNS_ADDED.items():
        have = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
        for col, kind in cols.items():
            if col not in have:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {col} {kind}")


def _one(conn: sqlite3.Connection, sql: str, args: tuple) -> dict[str, Any] | None:
    """One row as a dict (the store's connection is shared: its row factory stays as is)."""
    cur = conn.execute(sql, args)
    row = cur.fetchone()
    return None if row is None else dict(zip([d[0] for d in cur.description], row))


class MeterRunner:
    """One meter: its driver, its loop, its bookkeeping.

    Each tick: decide what the relay should be (from the trades heard), read the meter,
    judge the reading (:func:`~services.meter.accounting.judge_reading`, in memory),
    drive the relay, and only then do the bookkeeping in one store transaction. The relay
    never waits for the bookkeeping to succeed; failures of reads, readings refused as
    implausible and failed bookkeeping all count towards ``fail_open_after`` failures in
    a row, after which the relay opens while a trade would keep it closed.
    """

    def __init__(self, svc: MeterService, cfg: MeterConfig, driver: Driver) -> None:
        self.svc, self.cfg, self.driver = svc, cfg, driver
        s = svc.settings
        self.rate_w = cfg.rating(s.sim)
        self.fails = 0
        self.fail_why = ""
        self.reads = 0
        self.last: Counters | None = None
        self.relay_state: bool | None = None  # as last read or commanded; None: unknown
        self.decision = RelayDecision(False, None, "starting")
        self.samples: dict[str, collections.deque[tuple[float, int]]] = {}
        self.counters: dict[str, CounterState] = {}
        self.notes: collections.deque[tuple[bool, str | None, str]] = collections.deque(maxlen=100)
        self.refused: collections.Counter[str] = collections.Counter()
        self.confirmed: collections.Counter[str] = collections.Counter()
        self.book_failures = 0
        self._load()

    def _load(self) -> None:
        """The counters' baselines as the store kept them (what the next reading is judged against)."""
        row = _one(self.svc.store.conn, "SELECT last_energy, last_export, last_ts FROM meter_counters WHERE meter = ?",
                   (self.cfg.name,))
        row = row or {"last_energy": None, "last_export": None, "last_ts": None}
        self.counters = {"energy": CounterState(row["last_energy"], row["last_ts"]),
                         "export": CounterState(row["last_export"], row["last_ts"])}

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
                await self.fail("tick failed", "see the log")
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    def _decide(self, now: float) -> RelayDecision:
        s = self.svc.settings
        try:
            return relay_decision(self.svc.trade_views(), s.site, now, s.trade_timeout_s)
        except Exception as e:  # noqa: BLE001 - the store could not say: fail safe
            log.warning("meter %s: cannot read the trades (%s): relay opens", self.cfg.name, e)
            return RelayDecision(False, self.decision.trade_id, "trades unreadable")

    @property
    def want_closed(self) -> bool:
        """What the relay should be now: closed for a live trade, unless failing."""
        return self.cfg.trade and self.decision.closed and self.fails < self.svc.settings.fail_open_after

    async def tick(self) -> None:
        s = self.svc.settings
        t_start = time.time()
        if self.cfg.trade:
            self.decision = self._decide(t_start)
        try:
            c = await self.driver.read()
        except MeterError as e:
            self.relay_state = None
            await self.fail("meter errors", e)
            return
        t_end = time.time()
        self.reads += 1
        self.last = c
        self.relay_state = c.relay_closed
        j = judge_reading(self.counters, {"energy": c.energy_wh, "export": c.export_wh}, t_start, t_end,
                          self.rate_w, s.confirm_reads)
        if not j.believed:
            self.counters = j.states  # the suspects only: the baselines stay
            for reason in j.refused.values():
                self.refused[reason] += 1
                self.svc.m_refused.labels(self.cfg.name, reason).inc()
            log.log(logging.WARNING if self.refused.total() <= 10 else logging.DEBUG,
                    "meter %s: reading refused (%s): energy %s, export %s", self.cfg.name,
                    ", ".join(f"{k} {v}" for k, v in j.refused.items()), c.energy_wh, c.export_wh)
            await self.fail("implausible reading", ", ".join(sorted(set(j.refused.values()))))
        # the relay first: it never waits for the bookkeeping
        await self.drive()
        try:
            await asyncio.wait_for(self.record(c, t_start, j), timeout=max(2.0, 5 * s.reading_interval_s))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - bookkeeping failed: counted, the relay stays safe
            self.book_failures += 1
            self.svc.m_book_failures.labels(self.cfg.name).inc()
            log.warning("meter %s: bookkeeping failed: %s", self.cfg.name, e or type(e).__name__)
            await self.fail("bookkeeping failed", e or type(e).__name__)
            return
        if j.believed:
            self.fails = 0
        self.svc.update_metrics(self, c)

    async def drive(self) -> None:
        """Command the relay to what it should be when the last reading shows otherwise."""
        if not self.cfg.trade or self.relay_state is None:
            return
        want = self.want_closed
        if self.relay_state == want:
            return
        reason = self.decision.reason if want or not self.decision.closed else self.fail_why
        try:
            await self.driver.set_relay(want)
        except MeterError as e:
            self.relay_state = None
            await self.fail("meter errors", e)
            return
        self.relay_state = want
        self.notes.append((want, self.decision.trade_id, reason))

    async def fail(self, kind: str, detail: object) -> None:
        """One more failure in a row; at ``fail_open_after`` the relay is commanded open."""
        n = self.svc.settings.fail_open_after
        self.fails += 1
        self.fail_why = f"{kind}: {detail}"
        self.svc.update_metrics(self, None)
        log.debug("meter %s: %s (%d in a row)", self.cfg.name, self.fail_why, self.fails)
        if not self.cfg.trade or self.fails < n:
            return
        # fail safe: a meter we cannot read or account for must not keep energy flowing.
        # Closed as far as we know: open it now; unknown: every n-th failure (a dead port
        # is not hammered)
        if self.relay_state is False or (self.relay_state is None and self.fails % n):
            return
        try:
            await self.driver.set_relay(False)
        except MeterError:
            self.relay_state = None
            return
        self.relay_state = False
        self.notes.append((False, self.decision.trade_id, self.fail_why))
        with contextlib.suppress(Exception):
            await self.flush_notes()

    # --- bookkeeping in one transaction ---------------------------------------------

    def _row(self, conn: sqlite3.Connection) -> dict[str, Any]:
        conn.execute("INSERT OR IGNORE INTO meter_counters (meter) VALUES (?)", (self.cfg.name,))
        return _one(conn, "SELECT * FROM meter_counters WHERE meter = ?", (self.cfg.name,))

    async def note_relay(self, closed: bool, trade_id: str | None, reason: str) -> None:
        self.notes.append((closed, trade_id, reason))
        await self.flush_notes()

    async def flush_notes(self) -> None:
        """Announce the relay changes not announced yet (a failed transaction keeps them)."""
        if not self.notes:
            return
        async with self.svc.store.atomic() as conn:
            self._apply_notes(conn)

    def _apply_notes(self, conn: sqlite3.Connection) -> None:
        notes = list(self.notes)
        for closed, trade_id, reason in notes:
            self._relay_changed(conn, closed, trade_id, reason)
        # gone once committed; a rollback leaves them for the next transaction
        self.svc.store.on_commit(lambda: [self.notes.popleft() for _ in notes if self.notes])

    def _relay_changed(self, conn: sqlite3.Connection, closed: bool, trade_id: str | None, reason: str) -> None:
        row = self._row(conn)
        if row["relay_closed"] is not None and bool(row["relay_closed"]) == closed:
            return
        conn.execute("UPDATE meter_counters SET relay_closed = ? WHERE meter = ?", (int(closed), self.cfg.name))
        self.svc.stage(RelayChanged(site=self.svc.settings.site, meter=self.cfg.name, closed=closed,
                                    trade_id=trade_id, reason=reason[:200]))
        log.info("meter %s: relay %s (%s)", self.cfg.name, "closed" if closed else "open", reason)

    async def record(self, c: Counters, t_start: float, j: ReadingJudgement) -> None:
        """Persist a believed reading with what it counts and the events it causes; for a
        refused one only the relay changes waiting to be announced."""
        if not j.believed:
            await self.flush_notes()
            return
        s = self.svc.settings
        site, name = s.site, self.cfg.name
        async with self.svc.store.atomic() as conn:
            # the reading first: what it leads to (energy produced, a delivery, a relay that
            # moved by itself) names it as its cause
            reading = self.svc.stage(MeterReading(
                site=site, meter=name, role=self.cfg.role, energy_wh=c.energy_wh, power_w=c.power_w,
                voltage_v=c.voltage_v, current_a=c.current_a, relay_closed=c.relay_closed,
                soc=c.soc, load_w=c.load_w, pv_w=c.pv_w))
            with caused_by(reading.id):
                row = self._row(conn)
                for counter, verdict in j.confirmed.items():
                    log.warning("meter %s: %s counter %s confirmed by %d readings: counting on from %s",
                                name, counter, "reset" if verdict == "reset" else "jump",
                                s.confirm_reads, c.energy_wh if counter == "energy" else c.export_wh)
                d_energy = j.counted.get("energy", 0)
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
                        d_flow = j.counted.get("export", 0)
                    else:
                        d_flow = d_energy
                    current = self._deliver(conn, current, d_flow, t_start, c.relay_closed)
                # a relay that moved by itself (the meter's watchdog, a hand on the switch)
                # after the changes this service commanded
                self._apply_notes(conn)
                row = self._row(conn)
                if row["relay_closed"] is not None and bool(row["relay_closed"]) != c.relay_closed \
                        and self.relay_state == c.relay_closed:
                    self._relay_changed(conn, c.relay_closed, self.decision.trade_id, "changed at the meter")
                elif row["relay_closed"] is None:
                    conn.execute("UPDATE meter_counters SET relay_closed = ? WHERE meter = ?",
                                 (int(c.relay_closed), name))
                sim_state = self.driver.state_json() if isinstance(self.driver, SimDriver) else None
                conn.execute(
                    "UPDATE meter_counters SET kwh_index = ?, accum_wh = ?, last_energy = ?, last_export = ?,"
                    " last_ts = ?, first_energy = COALESCE(first_energy, ?), current_trade = ?, resets = resets + ?,"
                    " sim_state = COALESCE(?, sim_state) WHERE meter = ?",
                    (kwh.next_index, kwh.accum_wh, c.energy_wh, c.export_wh, t_start, c.energy_wh, current,
                     len(j.confirmed), sim_state, name))
        # committed: the new baselines hold
        self.counters = j.states
        for verdict in j.confirmed.values():
            self.confirmed[verdict] += 1

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
                "failure": self.fail_why if self.fails else "",
                "relay_closed": self.relay_state,
                "relay_wanted": self.want_closed, "trade": self.decision.trade_id,
                "why": self.decision.reason if self.want_closed or not self.decision.closed else self.fail_why,
                "energy_wh": self.last.energy_wh if self.last else None,
                "rated_wh_per_h": self.rate_w, "refused": dict(self.refused), "confirmed": dict(self.confirmed),
                "bookkeeping_failures": self.book_failures}


class MeterService(Service):
    name = "meter"
    settings: MeterSettings

    async def setup(self) -> None:
        s = self.settings
        self.deliveries_refused: dict[str, int] = {}  # site -> its Delivery for a trade it is not the buyer of
        migrate(self.store.conn)
        self.publisher()
        self.subscribe(["trade.status.", "trade.heartbeat.", "meter.delivery."], self.on_event)
        self.g_errors = Gauge("gridtrade_meter_errors", "driver errors by reason", ["meter", "reason"],
                              registry=self.registry)
        self.g_energy = Gauge("gridtrade_meter_energy_wh", "energy counter", ["meter"], registry=self.registry)
        self.g_relay = Gauge("gridtrade_meter_relay_closed", "1 while the relay is closed", ["meter"],
                             registry=self.registry)
        self.m_refused = PromCounter("gridtrade_meter_readings_refused", "readings refused, by meter and reason "
                                     "(backwards: not confirmed yet; too_fast: beyond the rated power)",
                                     ["meter", "reason"], registry=self.registry)
        self.m_book_failures = PromCounter("gridtrade_meter_bookkeeping_failures", "store transactions of a reading "
                                           "that failed", ["meter"], registry=self.registry)
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
