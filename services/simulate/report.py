"""What a run shows: each site's figures and the micro-grid's totals, the clearing prices.

:class:`Collector` (the I/O edge) follows the bus as a subscriber of its own: every site's
meter readings and the market's trade and settlement events go into one
:class:`services.gateway.history.History` per site (in memory), the record a site's gateway
keeps, so a site's figures here are the ones its wallet page would show
(:mod:`services.gateway.figures`). The rest is pure: the table, the CSV and two PNG charts
(matplotlib).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import statistics
import time
from typing import Any

import zmq.asyncio

from services.bus import Security, Subscriber
from services.bus import events as ev
from services.bus.events import Authority
from services.bus.states import FINAL, TradeState
from services.bus.store import Store
from services.gateway import figures
from services.gateway.history import History

log = logging.getLogger(__name__)

TRADE_EVENTS = (ev.TradeAgreed, ev.TradeStatus, ev.TradeRecorded, ev.Settled, ev.TradeClosed,
                ev.MeterMismatch)


@dataclasses.dataclass(frozen=True)
class Price:
    sim_at: float | None
    price_wei_per_kwh: int
    wh: int


class Collector:
    """Follows the run on the bus with the key of ``site`` (a key of its own on the allow-list)."""

    def __init__(self, keys, site: str, hub_sub: str, sites: dict[str, str], *, market: str = "english",
                 market_site: str = "market") -> None:
        """``sites``: site -> its account (the utility's among them)."""
        self.sites, self.market = sites, market
        self.ctx = zmq.asyncio.Context()
        self.security = Security(keys, site)
        self.store = Store(":memory:")
        self.histories = {s: History(Store(":memory:"), s) for s in sites}
        self.last: dict[str, tuple[float, float, float]] = {}  # site -> (wall, sim, scale) of its latest reading
        self.trade_state: dict[str, str] = {}
        self.trade_sites: dict[str, tuple[str, str]] = {}
        self.agreed: list[ev.TradeAgreed] = []
        self.prices: list[Price] = []
        self.latest_wall = 0.0  # the wall time of the latest event heard
        self.sub = Subscriber(self.ctx, self.security, self.store, hub_sub=hub_sub, hub_site=market_site,
                              prefixes=[ev.MeterReading.TYPE, *(c.TYPE for c in TRADE_EVENTS), ev.MarketCleared.TYPE],
                              handler=self.handle, start="earliest", name="simulate report",
                              authority=Authority.of(market_site))

    async def start(self) -> None:
        self.security.start(self.ctx)
        await self.sub.start()

    async def stop(self) -> None:
        await self.sub.stop()
        self.security.stop()
        self.store.close()
        for h in self.histories.values():
            h.store.close()
        self.ctx.destroy(0)

    # --- the bus -------------------------------------------------------------------------

    def handle(self, env: Any, conn: Any) -> None:
        b, ts = env.body, env.ts
        self.latest_wall = max(self.latest_wall, ts)
        if isinstance(b, ev.MeterReading):
            h = self.histories.get(b.site)
            if h is not None:
                h.reading(ts, b)
                if b.sim_ts is not None:
                    self.last[b.site] = (ts, b.sim_ts, b.time_scale or 1.0)
            return
        if isinstance(b, ev.MarketCleared):
            if b.price_wei_per_kwh is not None and b.volume_wh:
                self.prices.append(Price(self.sim_of(ts), b.price_wei_per_kwh, b.volume_wh))
            return
        if isinstance(b, (ev.TradeAgreed, ev.TradeStatus)):
            self.trade_sites.setdefault(b.trade_id, (b.seller_site, b.buyer_site))
            if isinstance(b, ev.TradeAgreed):
                self.agreed.append(b)
                self.trade_state.setdefault(b.trade_id, TradeState.AGREED)
                if self.market == "english":  # each trade its own price (a call market's: its clearing)
                    self.prices.append(Price(self.sim_of(ts), b.price_wei_per_kwh, b.wh))
            elif self.trade_state.get(b.trade_id) not in FINAL or b.state in FINAL:
                self.trade_state[b.trade_id] = b.state
        trade_id = getattr(b, "trade_id", None)
        for site in self.trade_sites.get(trade_id, ()) if trade_id else ():
            h = self.histories.get(site)
            if h is not None:
                with h.store.transaction() as c:
                    h.apply(c, ts, b)

    # --- what the run looks like now ----------------------------------------------------------

    def sim_of(self, wall: float) -> float | None:
        """The earliest site clock at ``wall`` (None before any reading)."""
        clocks = [sim + (wall - w) * scale for s, (w, sim, scale) in self.last.items()]
        return min(clocks) if clocks else None

    def sim_now(self, sites: list[str]) -> float | None:
        """The slowest of ``sites``' clocks now (None until each has read once)."""
        now = time.time()
        if any(s not in self.last for s in sites):
            return None
        return min(sim + (now - w) * scale for w, sim, scale in (self.last[s] for s in sites))

    def live_trades(self) -> int:
        return sum(1 for s in self.trade_state.values() if s not in FINAL)

    def local_wh(self, utility: str) -> int:
        """Wh agreed between sites (not with the utility) so far."""
        return sum(a.wh for a in self.agreed if utility not in (a.seller_site, a.buyer_site))

    def figures(self, start: int, end: int, tariffs: figures.Tariffs, tz_offset_s: int,
                utility: str) -> dict[str, figures.Row]:
        """Each site's total row over ``[start, end)`` of site time."""
        out = {}
        for site, account in self.sites.items():
            _, total = self.histories[site].figures(account, start, end, tariffs, tz_offset_s, utility_site=utility)
            out[site] = total
        return out


# --- the report (pure) -------------------------------------------------------------------------


@dataclasses.dataclass
class Report:
    name: str
    start: int
    end: int
    roles: dict[str, str]
    rows: dict[str, figures.Row]  # site -> its total row (the utility's among them)
    utility: str
    prices: list[Price]
    trades: int
    wall_s: float
    tz_offset_s: int = 0

    @property
    def total(self) -> figures.Row:
        """The sites' sums (the utility's own figures apart)."""
        t = figures.Row(day="total", start=self.start, end=self.end)
        for site, r in self.rows.items():
            if site == self.utility:
                continue
            t.add_energy(r)
            t.baseline_cost_wei += r.baseline_cost_wei
            t.actual_cost_wei += r.actual_cost_wei
            t.saved_wei += r.saved_wei
        return t


def price_stats(prices: list[Price]) -> dict[str, float | int] | None:
    if not prices:
        return None
    ps = [p.price_wei_per_kwh for p in prices]
    volume = sum(p.wh for p in prices)
    return {"n": len(ps), "min": min(ps), "median": statistics.median(ps), "max": max(ps),
            "mean_by_volume": sum(p.price_wei_per_kwh * p.wh for p in prices) / volume if volume else 0,
            "volume_wh": volume}


def _k(mwh: int) -> str:
    return f"{mwh / 1e6:9.2f}"


def _eth(wei: int) -> str:
    return f"{wei / 1e18:10.5f}"


def table(r: Report) -> str:
    """The figures as a table of text (kWh, ETH)."""
    head = (f"{'site':<12} {'role':<8} {'produced':>9} {'consumed':>9} {'bought':>9} {'sold':>9} {'from util':>9} "
            f"{'to util':>9} {'self-suff':>9} {'saved ETH':>10}")
    lines = [f"{r.name}: {figures.day_name(r.start, r.tz_offset_s)} .. {figures.day_name(r.end - 1, r.tz_offset_s)} "
             "(local site time), "
             f"{len(r.rows) - (r.utility in r.rows)} sites, {r.trades} trades, {r.wall_s:.0f} s wall time",
             "energy in kWh; bought/sold: locally, between sites; from/to util: with the utility", "", head,
             "-" * len(head)]

    def line(name: str, role: str, x: figures.Row) -> str:
        ss = x.self_sufficiency
        return (f"{name:<12} {role:<8} {_k(x.produced_mwh)} {_k(x.consumed_mwh)} {_k(x.bought_local_mwh)} "
                f"{_k(x.sold_local_mwh)} {_k(x.bought_utility_mwh)} {_k(x.sold_utility_mwh)} "
                f"{'-' if ss is None else f'{ss * 100:.1f} %':>9} {_eth(x.saved_wei)}")

    for site, x in r.rows.items():
        if site != r.utility:
            lines.append(line(site, r.roles.get(site, ""), x))
    lines += ["-" * len(head), line("total", "", r.total)]
    if r.utility in r.rows:
        u = r.rows[r.utility]
        lines.append(f"{r.utility:<12} {'grid':<8} sold {u.sold_local_mwh / 1e6:.2f} kWh to the sites for "
                     f"{u.sold_local_wei / 1e18:.5f} ETH, bought {u.bought_local_mwh / 1e6:.2f} kWh for "
                     f"{u.bought_local_wei / 1e18:.5f} ETH")
    st = price_stats(r.prices)
    lines.append("")
    if st is None:
        lines.append("clearing prices: no trade")
    else:
        lines.append(f"clearing prices ({st['n']} trades, {st['volume_wh'] / 1000:.1f} kWh), wei per kWh: min "
                     f"{st['min']:.4g}, median {st['median']:.4g}, max {st['max']:.4g}, by volume "
                     f"{st['mean_by_volume']:.4g}")
    return "\n".join(lines)


def to_csv(r: Report) -> str:
    """One line per site (its total over the run) and the sites' total: exact kWh and Ether."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerow(["site", "role", *figures.CSV_HEADER])
    for site, x in r.rows.items():
        w.writerow([site, "grid" if site == r.utility else r.roles.get(site, ""), *figures.csv_row(x)])
    w.writerow(["total (sites)", "", *figures.csv_row(r.total)])
    return buf.getvalue()


def prices_csv(r: Report) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerow(["site time (UTC)", "price (wei per kWh)", "energy (Wh)"])
    for p in r.prices:
        w.writerow(["" if p.sim_at is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(p.sim_at)),
                    p.price_wei_per_kwh, p.wh])
    return buf.getvalue()


# --- charts, as PNG (matplotlib, headless) -------------------------------------------------------

COLOURS = {"produced": "#f2b705", "consumed": "#555555", "bought locally": "#2a9d8f", "sold locally": "#8ecae6",
           "from the utility": "#e76f51", "to the utility": "#f4a261"}


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def energy_png(r: Report) -> bytes:
    """Per site: grouped bars of its kWh (produced, consumed, local and utility trades)."""
    from matplotlib.figure import Figure  # the object API: no pyplot state, no display

    sites = [s for s in r.rows if s != r.utility]
    values = [[x.produced_mwh, x.consumed_mwh, x.bought_local_mwh, x.sold_local_mwh, x.bought_utility_mwh,
               x.sold_utility_mwh] for x in (r.rows[s] for s in sites)]
    fig = Figure(figsize=(max(6.4, 0.45 * len(sites) + 2), 4.2))
    ax = fig.add_subplot()
    width = 0.8 / len(COLOURS)
    for k, (label, colour) in enumerate(COLOURS.items()):
        ax.bar([j + k * width for j in range(len(sites))], [v[k] / 1e6 for v in values], width, label=label,
               color=colour)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sites))], sites, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("kWh")
    ax.set_title(f"{r.name}: energy per site")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars, not over them
    ax.grid(axis="y", color="#ddd")
    return _png(fig)


def prices_png(r: Report) -> bytes:
    """The clearing prices over site time (a dot per trade or call, its area the energy)."""
    from matplotlib.figure import Figure

    pts = [p for p in r.prices if p.sim_at is not None]
    fig = Figure(figsize=(7.2, 3.8))
    ax = fig.add_subplot()
    ax.scatter([(p.sim_at - r.start) / 3600 for p in pts], [p.price_wei_per_kwh / 1e15 for p in pts],
               s=[4 + p.wh / 25 for p in pts], color="#2a9d8f", alpha=0.6)
    ax.set_xlim(0, max(r.end - r.start, 3600) / 3600)
    ax.set_xlabel(f"site hours since {figures.day_name(r.start, r.tz_offset_s)} 00:00 (local)")
    ax.set_ylabel("price (10^15 wei per kWh)")
    ax.set_title(f"{r.name}: clearing prices" + ("" if pts else " (no trade)"))
    ax.grid(color="#ddd")
    return _png(fig)
