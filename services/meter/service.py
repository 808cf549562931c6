"""The meter service: reads each meter, signs and announces its production, drives relays
from trades, accounts delivery (signed) and cross-checks it at the seller.

Per meter, every ``reading_interval_s``: the relay is decided from the trades heard and
driven from the reading, then one store transaction holds the counters believed, the
meter's cumulative production and what of it was announced, the trade's delivered Wh, and
the events they cause (``MeterReading``, ``EnergyProduced``, ``Delivery``,
``MeterMismatch``, ``MeterRelay``) staged in the outbox. A SIGKILL at any point
therefore either keeps all of it or none of it: no production step is announced twice or
skipped. A reading that implies more than the meter's rated power, or a counter that went
back and is not confirmed yet, counts nothing (:mod:`services.meter.accounting`).

Each meter that mints or trades has its own key (:mod:`services.meter.keys`). Once the
operator's ``chain.deployment`` is heard, the service announces each key (``MeterKey``,
once per deployment and key) and signs what it publishes: production (token domain),
a buyer's delivery and a seller's export (market domain). Before that it counts on and
publishes the first signed event once the deployment is known.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import logging
import sqlite3
import time
from typing import Any

from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge

from services.bus import typed
from services.bus.envelope import Envelope, caused_by
from services.bus.events import (Delivery, Deployment, EnergyProduced, MeterKey, MeterMismatch, MeterReading,
                                 MeterRelay, TradeHeartbeat, TradeStatus)
from services.bus.retry import Backoff
from services.bus.service import Service
from services.bus.states import ENDED, LIVE, sql_list

from .accounting import (CounterState, ReadingJudgement, RelayDecision, MeteredTrade, interpolate, judge_reading,
                         lagging, mismatch, production_steps, relay_decision)
from .config import MeterConfig, MeterSettings
from .drivers import Driver, SimDriver, make_driver
from .errors import MeterError
from .keys import MeterKey as Key
from .keys import load_or_create, passphrase
from .physics import Counters

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meter_counters (
    meter TEXT PRIMARY KEY,
    last_energy INTEGER,                      -- counter baseline: the last energy_wh believed
    first_energy INTEGER,                     -- the counter when this store first saw the meter
    last_export INTEGER,                      -- the last export_wh believed
    last_ts REAL,                             -- when the read of those baselines started (wall clock)
    key_address TEXT,                         -- the meter key production is counted for
    produced_wh INTEGER NOT NULL DEFAULT 0,   -- cumulative production since that key was made
    announced_wh INTEGER NOT NULL DEFAULT 0,  -- the last produced_wh signed and announced ...
    announced_token TEXT,                     -- ... for this token (another deployment: none yet)
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
    published_wh INTEGER NOT NULL DEFAULT 0,
    final INTEGER NOT NULL DEFAULT 0,             -- the meter stopped counting for the trade
    published_final INTEGER NOT NULL DEFAULT 0,   -- and said so
    PRIMARY KEY (trade_id, meter)
);
CREATE TABLE IF NOT EXISTS meter_peer (
    trade_id TEXT PRIMARY KEY, buyer_wh INTEGER NOT NULL, buyer_ts REAL NOT NULL,
    flagged INTEGER NOT NULL DEFAULT 0,
    site TEXT,                                -- the site whose signed Delivery it is
    heard_at REAL,                            -- when this host heard it (the lag check)
    reason TEXT                               -- why the trade was flagged
);
CREATE TABLE IF NOT EXISTS meter_deployment (
    id INTEGER PRIMARY KEY CHECK (id = 1), deployment TEXT NOT NULL, chain_id INTEGER NOT NULL,
    token TEXT NOT NULL, market TEXT NOT NULL, registry TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meter_keys_announced (
    deployment TEXT NOT NULL, meter TEXT NOT NULL, address TEXT NOT NULL, account TEXT NOT NULL,
    PRIMARY KEY (deployment, meter, address)
);
CREATE TABLE IF NOT EXISTS meter_peer_keys (
    site TEXT NOT NULL, address TEXT NOT NULL, meter TEXT NOT NULL, PRIMARY KEY (site, address)
);
"""

COLUMNS_ADDED = {
    "meter_counters": {"last_ts": "REAL", "key_address": "TEXT", "produced_wh": "INTEGER NOT NULL DEFAULT 0",
                       "announced_wh": "INTEGER NOT NULL DEFAULT 0", "announced_token": "TEXT"},
    "meter_delivery": {"final": "INTEGER NOT NULL DEFAULT 0", "published_final": "INTEGER NOT NULL DEFAULT 0"},
    "meter_peer": {"site": "TEXT", "heard_at": "REAL", "reason": "TEXT"},
}
"""Columns added since the first version of the schema: added to an older store at start."""


def migrate(conn: sqlite3.Connection) -> None:
    conn.executescript(SCHEMA)
    for table, cols in COLUMNS_ADDED.items():
        have = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
        for col, kind in cols.items():
            if col not in have:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {col} {kind}")


@dataclasses.dataclass(frozen=True)
class Deployed:
    """The contracts this site's meters sign for (from ``chain.deployment``)."""

    deployment: str
    chain_id: int
    token: str
    market: str
    registry: str

    @property
    def market_domain(self) -> typed.Domain:
        return typed.market_domain(self.chain_id, self.market)


def deployed(conn: sqlite3.Connection) -> Deployed | None:
    row = conn.execute("SELECT deployment, chain_id, token, market, registry FROM meter_deployment").fetchone()
    return Deployed(*row) if row else None


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

    def __init__(self, svc: MeterService, cfg: MeterConfig, driver: Driver, key: Key | None = None) -> None:
        self.svc, self.cfg, self.driver, self.key = svc, cfg, driver, key
        s = svc.settings
        self.rate_w = cfg.rating(s.sim)
        self.fails = 0
        self.fail_why = ""
        self.reads = 0
        self.stopped = False  # set by the service's stop: the loop ends at its next turn
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
        while not self.stopped:
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
            return relay_decision(self.svc.metered_trades(), s.site, now, s.trade_timeout_s, role=self.cfg.role)
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
        self.svc.stage(MeterRelay(site=self.svc.settings.site, meter=self.cfg.name, closed=closed,
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
            sim = self.driver.sim_clock()  # a simulated site's own clock, for the charts' time axes
            reading = self.svc.stage(MeterReading(
                site=site, meter=name, role=self.cfg.role, energy_wh=c.energy_wh, power_w=c.power_w,
                voltage_v=c.voltage_v, current_a=c.current_a, relay_closed=c.relay_closed,
                soc=c.soc, load_w=c.load_w, pv_w=c.pv_w, sim_ts=sim[0] if sim else None,
                time_scale=sim[1] if sim else None))
            with caused_by(reading.id):
                row = self._row(conn)
                for counter, verdict in j.confirmed.items():
                    log.warning("meter %s: %s counter %s confirmed by %d readings: counting on from %s",
                                name, counter, "reset" if verdict == "reset" else "jump",
                                s.confirm_reads, c.energy_wh if counter == "energy" else c.export_wh)
                d_energy = j.counted.get("energy", 0)
                dep = deployed(conn)
                # the producer's cumulative production, signed at each step of the granularity
                produced, announced, token = row["produced_wh"], row["announced_wh"], row["announced_token"]
                if self.cfg.mints:
                    produced += d_energy
                    if dep is not None and self.key is not None:
                        # a new deployment: nothing announced to its token yet, the highest step catches up
                        fresh = token != dep.token
                        steps = production_steps(produced, 0 if fresh else announced, s.production_granularity_wh,
                                                 catch_up=fresh)
                        domain = typed.token_domain(dep.chain_id, dep.token)
                        for step in steps:
                            self.svc.stage(EnergyProduced(
                                site=site, meter=name, meter_address=self.key.address, produced_wh=step,
                                chain_id=dep.chain_id, token=dep.token,
                                signature=typed.sign_production(self.key.key, domain, step)))
                        if steps:
                            announced, token = steps[-1], dep.token
                # delivery for the trade the relay follows
                current = row["current_trade"]
                if self.cfg.trade:
                    if c.export_wh is not None and self.cfg.role == "producer":
                        d_flow = j.counted.get("export", 0)
                    else:
                        d_flow = d_energy
                    current = self._deliver(conn, dep, current, d_flow, t_start, c.relay_closed)
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
                    "UPDATE meter_counters SET produced_wh = ?, announced_wh = ?, announced_token = ?,"
                    " last_energy = ?, last_export = ?, last_ts = ?, first_energy = COALESCE(first_energy, ?),"
                    " current_trade = ?, resets = resets + ?, sim_state = COALESCE(?, sim_state) WHERE meter = ?",
                    (produced, announced, token, c.energy_wh, c.export_wh, t_start, c.energy_wh, current,
                     len(j.confirmed), sim_state, name))
        # committed: the new baselines hold
        self.counters = j.states
        for verdict in j.confirmed.values():
            self.confirmed[verdict] += 1

    def _deliver(self, conn: sqlite3.Connection, dep: Deployed | None, current: str | None, d_flow: int,
                 now: float, relay_closed: bool) -> str | None:
        """Count ``d_flow`` for the trade being delivered; switch trades; publish Delivery.

        A trade that ended keeps the meter until a reading shows the relay open, so the
        energy that flowed between the last reading and the relay opening is counted too."""
        name = self.cfg.name
        active = self.decision.trade_id if self.decision.closed else None
        if current is not None and active is None and relay_closed:
            active = current
        if current is not None:
            conn.execute("INSERT OR IGNORE INTO meter_delivery (trade_id, meter) VALUES (?, ?)", (current, name))
            conn.execute("UPDATE meter_delivery SET delivered_wh = delivered_wh + ?, final = ?"
                         " WHERE trade_id = ? AND meter = ?", (d_flow, int(current != active), current, name))
            self._publish_delivery(conn, dep, current, now=now)
        if active is not None and active != current:
            conn.execute("INSERT OR IGNORE INTO meter_delivery (trade_id, meter) VALUES (?, ?)", (active, name))
            log.info("meter %s: counting delivery for trade %s", name, active)
        if dep is not None:
            # the last word on trades that ended before the deployment was known
            for (trade_id,) in conn.execute(
                    "SELECT trade_id FROM meter_delivery WHERE meter = ? AND final = 1 AND published_final = 0"
                    " AND trade_id IS NOT ?", (name, current)).fetchall():
                self._publish_delivery(conn, dep, trade_id, now=now)
        return active

    def _publish_delivery(self, conn: sqlite3.Connection, dep: Deployed | None, trade_id: str, *,
                          now: float) -> None:
        """Sign and publish the trade's cumulative Wh when due: a buyer's meter its
        delivery, a seller's its export (market domain). Held until the deployment is known."""
        s = self.svc.settings
        delivered, published, final, published_final = conn.execute(
            "SELECT delivered_wh, published_wh, final, published_final FROM meter_delivery"
            " WHERE trade_id = ? AND meter = ?", (trade_id, self.cfg.name)).fetchone()
        step = s.delivery_granularity_wh
        due = (final and not published_final) or (
            delivered > published and (step == 0 or delivered - published >= step))
        if due and dep is not None and self.key is not None:
            conn.execute("UPDATE meter_delivery SET published_wh = ?, published_final = ? WHERE trade_id = ? AND meter = ?",
                         (delivered, final, trade_id, self.cfg.name))
            sign = typed.sign_export if self.cfg.role == "producer" else typed.sign_delivery
            self.svc.stage(Delivery(trade_id=trade_id, site=s.site, meter=self.cfg.name, role=self.cfg.role,
                                    delivered_wh=delivered, final=bool(final), meter_address=self.key.address,
                                    signature=sign(self.key.key, dep.market_domain, trade_id, delivered)))
        if self.cfg.role == "producer" and not final:
            self._cross_check(conn, trade_id, delivered, now)
        elif final:
            self.samples.pop(trade_id, None)  # done counting for it: its samples are not needed

    def _cross_check(self, conn: sqlite3.Connection, trade_id: str, seller_wh: int, now: float) -> None:
        """At the seller: the buyer's latest signed cumulative Delivery against our own
        outflow at the same moment (interpolated between our readings), and whether the
        buyer's meter went silent while we kept exporting."""
        s = self.svc.settings
        trade = _one(conn, "SELECT seller_site, buyer_site FROM meter_trades WHERE trade_id = ?", (trade_id,))
        if trade is None or trade["seller_site"] != s.site:
            return
        samples = self.samples.setdefault(trade_id, collections.deque(maxlen=1000))
        samples.append((now, seller_wh))
        peer = _one(conn, "SELECT buyer_wh, buyer_ts, flagged, site, heard_at FROM meter_peer WHERE trade_id = ?",
                    (trade_id,))
        if peer is not None and peer["site"] not in (None, trade["buyer_site"]):
            peer = None  # heard before the trade was: not its buyer's word
        if peer is not None and peer["flagged"]:
            return
        # lag: nothing signed heard from the buyer for lag_s while we kept exporting
        buyer_wh = peer["buyer_wh"] if peer is not None else 0
        since_t, since_wh = samples[0]
        if peer is not None and peer["heard_at"] is not None and peer["heard_at"] > since_t:
            at_heard = interpolate(list(samples), peer["heard_at"])
            since_t, since_wh = peer["heard_at"], since_wh if at_heard is None else at_heard
        if lagging(now, since_t, seller_wh - since_wh, s.lag_s, s.lag_slack_wh):
            self._flag(conn, trade_id, buyer_wh, seller_wh,
                       f"lag: no signed delivery from the buyer's meter for {now - since_t:.0f} s while the seller "
                       f"exported {seller_wh - since_wh:.0f} Wh")
            return
        if peer is None or not samples[0][0] <= peer["buyer_ts"] <= samples[-1][0]:
            return
        at = interpolate(list(samples), peer["buyer_ts"])
        assert at is not None
        # the two ends read at different moments, and each relay closed on its own meter's
        # reading loop (up to a reading late, at either end): two readings' worth of flow is
        # timing, not loss (at a high time scale a reading carries many Wh)
        recent = list(samples)[-10:]
        step = max((b[1] - a[1] for a, b in zip(recent, recent[1:])), default=0)
        if mismatch(peer["buyer_wh"], round(at), s.mismatch_tolerance, s.mismatch_slack_wh + 2 * step):
            self._flag(conn, trade_id, peer["buyer_wh"], round(at),
                       f"mismatch: the buyer's meter signed {peer['buyer_wh']} Wh, the seller exported {round(at)} Wh,"
                       f" beyond the {100 * s.mismatch_tolerance:.0f} % tolerance")

    def _flag(self, conn: sqlite3.Connection, trade_id: str, buyer_wh: int, seller_wh: int, reason: str) -> None:
        """Flag the trade once: its relay opens here, and the auction hears why."""
        s = self.svc.settings
        conn.execute("INSERT INTO meter_peer (trade_id, buyer_wh, buyer_ts, flagged, reason) VALUES (?, ?, 0, 1, ?)"
                     " ON CONFLICT (trade_id) DO UPDATE SET flagged = 1, reason = excluded.reason",
                     (trade_id, buyer_wh, reason))
        self.svc.stage(MeterMismatch(trade_id=trade_id, buyer_wh=buyer_wh, seller_wh=max(seller_wh, 0),
                                        tolerance=s.mismatch_tolerance, site=s.site, reason=reason[:300]))
        log.warning("trade %s flagged: %s", trade_id, reason)

    def health(self) -> dict[str, Any]:
        return {**self.driver.health(), "role": self.cfg.role, "reads": self.reads, "failing": self.fails,
                "failure": self.fail_why if self.fails else "",
                "relay_closed": self.relay_state,
                "relay_wanted": self.want_closed, "trade": self.decision.trade_id,
                "why": self.decision.reason if self.want_closed or not self.decision.closed else self.fail_why,
                "energy_wh": self.last.energy_wh if self.last else None,
                "rated_wh_per_h": self.rate_w, "refused": dict(self.refused), "confirmed": dict(self.confirmed),
                "bookkeeping_failures": self.book_failures, "key": self.key.address if self.key else None}


class MeterService(Service):
    name = "meter"
    settings: MeterSettings

    def __init__(self, settings: MeterSettings) -> None:
        super().__init__(settings)
        self.runners: list[MeterRunner] = []  # one per configured meter, made in setup()
        self._loops: list[asyncio.Task[None]] = []  # their reading loops, from start() until stopping()
        # site -> its Deliveries not believed (not the trade's buyer, unsigned, a key it did not announce);
        # and the same by reason
        self.deliveries_refused: dict[str, int] = {}
        self.deliveries_refused_why: collections.Counter[str] = collections.Counter()
        self.keys_refused: dict[str, int] = {}  # site -> its MeterKey announcements with a bad signature
        self.deployment: Deployed | None = None  # read from the store in setup()

    async def setup(self) -> None:
        s = self.settings
        migrate(self.store.conn)
        self.deployment = deployed(self.store.conn)
        keys = await self._keys()
        self.publisher()
        self.subscribe(["trade.status.", "trade.heartbeat.", "meter.delivery.", "meter.key.", "chain.deployment."],
                       self.on_event)
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
        if s.account is None and keys:
            log.warning("no GRIDTRADE_ACCOUNT: the meter keys are not announced for registration until one is set "
                        "(production is counted and signed meanwhile)")
        for cfg in s.meters:
            state = None
            if cfg.driver == "sim":
                row = _one(self.store.conn, "SELECT sim_state FROM meter_counters WHERE meter = ?", (cfg.name,))
                state = json.loads(row["sim_state"]) if row and row["sim_state"] else None
            driver = make_driver(cfg, s.sim, state=state, backoff=Backoff(s.backoff_initial_s, s.backoff_max_s))
            self.runners.append(MeterRunner(self, cfg, driver, keys.get(cfg.name)))

    async def _keys(self) -> dict[str, Key]:
        """Each keyed meter's key, made on its first start; production is counted for one
        key: a meter whose key changed (its file lost) counts from zero for the new one."""
        s = self.settings
        keyed = [m.name for m in s.meters if m.keyed]
        if not keyed:
            return {}
        loop = asyncio.get_running_loop()
        keys = {}
        # scrypt is slow on purpose: in a thread of its own, gone once the keys are unlocked
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="meter-keys") as pool:
            secret = await loop.run_in_executor(pool, passphrase, s.meter_passphrase_file, s.data_dir)
            for name in keyed:
                keys[name] = await loop.run_in_executor(pool, functools.partial(
                    load_or_create, s.keys_folder / name, name, secret, scrypt_n=s.meter_scrypt_n))
        with self.store.transaction() as conn:
            for name, key in keys.items():
                conn.execute("INSERT OR IGNORE INTO meter_counters (meter) VALUES (?)", (name,))
                (was,) = conn.execute("SELECT key_address FROM meter_counters WHERE meter = ?", (name,)).fetchone()
                if was is not None and was != key.address:
                    log.warning("meter %s: its key changed from %s to %s: production counts from 0 for the new key",
                                name, was, key.address)
                    conn.execute("UPDATE meter_counters SET produced_wh = 0, announced_wh = 0, announced_token = NULL"
                                 " WHERE meter = ?", (name,))
                conn.execute("UPDATE meter_counters SET key_address = ? WHERE meter = ?", (key.address, name))
        return keys

    async def start(self) -> None:
        await super().start()  # the publisher is up before the first reading is staged
        async with self.store.atomic() as conn:  # a deployment known already, an account set since
            self.announce_keys(conn, deployed(conn))
        self._loops = [asyncio.create_task(r.run(), name=f"meter-{r.cfg.name}") for r in self.runners]

    def announce_keys(self, conn: sqlite3.Connection, dep: Deployed | None) -> None:
        """``MeterKey`` for each meter key, once per deployment (and key), in the caller's
        transaction: the registrar registers it for the site's account."""
        s = self.settings
        if dep is None or s.account is None:
            return
        domain = typed.registry_domain(dep.chain_id, dep.registry)
        for r in self.runners:
            if r.key is None:
                continue
            cur = conn.execute("INSERT OR IGNORE INTO meter_keys_announced (deployment, meter, address, account)"
                               " VALUES (?, ?, ?, ?)", (dep.deployment, r.cfg.name, r.key.address, s.account))
            if cur.rowcount:
                self.stage(MeterKey(site=s.site, meter=r.cfg.name, address=r.key.address, account=s.account,
                                    chain_id=dep.chain_id, registry=dep.registry,
                                    signature=typed.sign_registration(r.key.key, domain, s.account)))
                log.info("meter %s: key %s announced for %s (deployment %s)", r.cfg.name, r.key.address,
                         s.account, dep.deployment)

    def stage(self, body: Any) -> Envelope:
        assert self.pub is not None
        return self.pub.stage(body)

    async def stopping(self) -> None:
        for r in self.runners:
            r.stopped = True
        pending = set(self._loops)
        for t in pending:
            t.cancel()
        while pending:
            # cancelled again until it ends: Python 3.11's wait_for can swallow a cancellation
            # that meets its inner task's end (the tick's bookkeeping), and the stop waited for ever
            _, pending = await asyncio.wait(pending, timeout=0.5)
            for t in pending:
                t.cancel()
        for r in self.runners:  # a clean stop leaves no relay closed
            if r.cfg.trade:
                with contextlib.suppress(MeterError, Exception):
                    await asyncio.wait_for(r.driver.set_relay(False), 2)
                    await r.note_relay(False, None, "meter service stopping")

    async def teardown(self) -> None:
        for r in self.runners:
            await r.driver.close()

    # --- what we hear ---------------------------------------------------------------

    def metered_trades(self) -> list[MeteredTrade]:
        rows = self.store.conn.execute(
            "SELECT t.trade_id, t.state, t.seller_site, t.buyer_site, t.heard, t.omitted, COALESCE(p.flagged, 0)"
            " FROM meter_trades t LEFT JOIN meter_peer p ON p.trade_id = t.trade_id"
            f" WHERE t.state NOT IN {sql_list(ENDED)}")
        return [MeteredTrade(r[0], r[1], r[2], r[3], r[4], bool(r[5]), bool(r[6])) for r in rows]

    async def on_event(self, env: Envelope, conn: sqlite3.Connection) -> None:
        body, site = env.body, self.settings.site
        if isinstance(body, TradeStatus):
            if site not in (body.seller_site, body.buyer_site):
                return
            conn.execute(
                "INSERT INTO meter_trades (trade_id, state, seller_site, buyer_site, wh, heard) VALUES (?,?,?,?,?,?)"
                " ON CONFLICT (trade_id) DO UPDATE SET state = excluded.state, heard = MAX(heard, excluded.heard),"
                f" omitted = CASE WHEN excluded.state IN {sql_list(LIVE)} THEN 0 ELSE omitted END",
                (body.trade_id, body.state, body.seller_site, body.buyer_site, body.wh,
                 env.ts if body.state in LIVE else 0.0))
        elif isinstance(body, TradeHeartbeat):
            live = set(body.live)
            for trade_id, state in conn.execute(
                    "SELECT trade_id, state FROM meter_trades"
                    f" WHERE state NOT IN {sql_list(ENDED)}").fetchall():
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
                self._refuse_delivery(body, "not_the_buyer")
                return
            why = self._unbelieved(conn, body)
            if why:
                self._refuse_delivery(body, why)
                return
            conn.execute(
                "INSERT INTO meter_peer (trade_id, buyer_wh, buyer_ts, site, heard_at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (trade_id) DO UPDATE SET buyer_wh = MAX(buyer_wh, excluded.buyer_wh),"
                " buyer_ts = CASE WHEN excluded.buyer_wh >= buyer_wh THEN excluded.buyer_ts ELSE buyer_ts END,"
                " heard_at = CASE WHEN excluded.buyer_wh >= buyer_wh THEN excluded.heard_at ELSE heard_at END,"
                " site = excluded.site",
                (body.trade_id, body.delivered_wh, env.ts, body.site, time.time()))
        elif isinstance(body, MeterKey):
            if body.site == site:
                return
            domain = typed.registry_domain(body.chain_id, body.registry)
            signer = typed.recover_registration(domain, body.address, body.account, body.signature)
            if signer is None or signer.lower() != body.address.lower():
                self.keys_refused[body.site] = self.keys_refused.get(body.site, 0) + 1
                return
            conn.execute("INSERT OR IGNORE INTO meter_peer_keys (site, address, meter) VALUES (?, ?, ?)",
                         (body.site, body.address.lower(), body.meter))
        elif isinstance(body, Deployment):
            known = deployed(conn)
            if known is not None and known.deployment == body.deployment:
                return
            dep = Deployed(body.deployment, body.chain_id, body.token, body.market, body.registry)
            conn.execute("INSERT OR REPLACE INTO meter_deployment (id, deployment, chain_id, token, market, registry)"
                         " VALUES (1, ?, ?, ?, ?, ?)", (dep.deployment, dep.chain_id, dep.token, dep.market,
                                                        dep.registry))
            log.info("deployment %s on chain %s: token %s, market %s, registry %s", dep.deployment, dep.chain_id,
                     dep.token, dep.market, dep.registry)
            self.announce_keys(conn, dep)
            self.store.on_commit(lambda: setattr(self, "deployment", dep))

    def _unbelieved(self, conn: sqlite3.Connection, body: Delivery) -> str:
        """Why a buyer's Delivery is not believed ("" if it is): it must be signed (EIP-712
        Delivery, the market of the deployment known here) by a meter key its site announced."""
        dep = deployed(conn)
        if dep is None:
            return "no_deployment"
        if body.signature is None or body.meter_address is None:
            return "unsigned"
        signer = typed.recover_delivery(dep.market_domain, body.trade_id, body.delivered_wh, body.signature)
        if signer is None or signer.lower() != body.meter_address.lower():
            return "bad_signature"
        if conn.execute("SELECT 1 FROM meter_peer_keys WHERE site = ? AND address = ?",
                        (body.site, signer.lower())).fetchone() is None:
            return "unknown_key"
        return ""

    def _refuse_delivery(self, body: Delivery, why: str) -> None:
        self.deliveries_refused[body.site] = self.deliveries_refused.get(body.site, 0) + 1
        self.deliveries_refused_why[why] += 1
        log.debug("delivery %s Wh for trade %s from site %s not believed: %s", body.delivered_wh, body.trade_id,
                  body.site, why)

    # --- health and metrics ---------------------------------------------------------

    def update_metrics(self, r: MeterRunner, c: Counters | None) -> None:
        if c is not None:
            self.g_energy.labels(r.cfg.name).set(c.energy_wh)
            self.g_relay.labels(r.cfg.name).set(int(c.relay_closed))
        self.g_connected.labels(r.cfg.name).set(int(r.driver.connected))
        for reason, n in r.driver.errors.items():
            self.g_errors.labels(r.cfg.name, reason).set(n)

    def health(self) -> dict[str, Any]:
        dep = self.deployment
        return {**super().health(), "meters": {r.cfg.name: r.health() for r in self.runners},
                "deployment": dep.deployment if dep else None,
                "deliveries_refused": dict(self.deliveries_refused),
                "deliveries_refused_why": dict(self.deliveries_refused_why),
                "meter_keys_refused": dict(self.keys_refused)}
