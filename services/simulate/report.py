"""What a run shows: each site's figures and the micro-grid's totals, the clearing prices.

:class:`Collector` (the I/O edge) follows the bus as a subscriber of its own: every site's
meter readings and the market's trade and settlement events go into one
:class:`services.gateway.history.History` per site (in memory), the record a site's gateway
keeps, so a site's figures here are the ones its wallet page would show
(:mod:`services.gateway.figures`). The rest is pure: the table, the CSV and two SVG charts
(drawn here: matplotlib is not a dependency).
"""

from __future__ import annotations

import csv
import dataclasses
import html
import io
import logging
import statistics
import time
from typing import Any

import zmq.asyncio

from services.bus import Security
from services.bus import events as ev
from services.bus.events import Authority
from services.bus.store import Store
from services.bus.transport import Subscriber
from services.gateway import figures
from services.gateway.history import History

log = logging.getLogger(__name__)

FINAL = ("settled", "failed")
TRADE_EVENTS = (ev.TradeAgreed, ev.TradeStatus, ev.TradeRecorded, ev.Settled, ev.TradeClosedOnChain,
                ev.DeliveryMismatch)


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
                self.trade_state.setdefault(b.trade_id, "agreed")
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


# --- charts, as SVG ------------------------------------------------------------------------------

COLOURS = {"produced": "#f2b705", "consumed": "#555555", "bought locally": "#2a9d8f", "sold locally": "#8ecae6",
           "from the utility": "#e76f51", "to the utility": "#f4a261"}


def _svg(width: int, height: int, body: list[str], title: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">\n'
            f'<title>{html.escape(title)}</title><rect width="100%" height="100%" fill="white"/>\n'
            f'<text x="{width / 2}" y="18" text-anchor="middle" font-size="14">{html.escape(title)}</text>\n'
            + "\n".join(body) + "\n</svg>\n")


def energy_svg(r: Report) -> str:
    """Per site: grouped bars of its kWh (produced, consumed, local and utility trades)."""
    sites = [s for s in r.rows if s != r.utility]
    keys = list(COLOURS)
    values = {s: [r.rows[s].produced_mwh, r.rows[s].consumed_mwh, r.rows[s].bought_local_mwh,
                  r.rows[s].sold_local_mwh, r.rows[s].bought_utility_mwh, r.rows[s].sold_utility_mwh] for s in sites}
    top = max([v for vs in values.values() for v in vs] + [1])
    group, bar = len(keys) * 5 + 10, 5
    left, plot_h, bottom = 60, 300, 90
    width, height = max(640, left + 20 + group * len(sites)), 40 + plot_h + bottom
    body = []
    for i in range(5):  # the scale
        v = top * i / 4
        y = 40 + plot_h - plot_h * i / 4
        body.append(f'<line x1="{left}" x2="{width - 10}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
                    f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{v / 1e6:.1f}</text>')
    body.append(f'<text x="14" y="{40 + plot_h / 2}" transform="rotate(-90 14 {40 + plot_h / 2})" '
                f'text-anchor="middle">kWh</text>')
    for j, s in enumerate(sites):
        x0 = left + 10 + j * group
        for k, v in enumerate(values[s]):
            h = plot_h * v / top
            body.append(f'<rect x="{x0 + k * bar}" y="{40 + plot_h - h:.1f}" width="{bar}" height="{h:.1f}" '
                        f'fill="{COLOURS[keys[k]]}"><title>{html.escape(s)}: {keys[k]} {v / 1e6:.2f} kWh</title>'
                        '</rect>')
        body.append(f'<text x="{x0 + 12}" y="{40 + plot_h + 8}" transform="rotate(60 {x0 + 12} {40 + plot_h + 8})">'
                    f'{html.escape(s)}</text>')
    for k, key in enumerate(keys):  # the legend
        x = left + k * 100
        body.append(f'<rect x="{x}" y="{height - 16}" width="10" height="10" fill="{COLOURS[key]}"/>'
                    f'<text x="{x + 14}" y="{height - 7}">{key}</text>')
    return _svg(width, height, body, f"{r.name}: energy per site")


def prices_svg(r: Report) -> str:
    """The clearing prices over site time (a dot per trade or call, its area the energy)."""
    width, height, left, plot_h, plot_w = 720, 380, 80, 280, 600
    body = []
    pts = [p for p in r.prices if p.sim_at is not None]
    lo = min([p.price_wei_per_kwh for p in pts], default=0)
    hi = max([p.price_wei_per_kwh for p in pts], default=1)
    lo, hi = (lo * 0.95, hi * 1.05) if hi > lo else (lo * 0.5, hi * 1.5 + 1)
    span = max(r.end - r.start, 1)
    for i in range(5):
        v = lo + (hi - lo) * i / 4
        y = 40 + plot_h - plot_h * i / 4
        body.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
                    f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{v / 1e15:.3f}</text>')
    hours = max(1, round(span / 3600))
    step = max(1, hours // 8)
    for hh in range(0, hours + 1, step):
        x = left + plot_w * hh * 3600 / span
        body.append(f'<text x="{x:.1f}" y="{40 + plot_h + 16}" text-anchor="middle">{hh} h</text>')
    body.append(f'<text x="16" y="{40 + plot_h / 2}" transform="rotate(-90 16 {40 + plot_h / 2})" '
                f'text-anchor="middle">price (10^15 wei per kWh)</text>')
    for p in pts:
        x = left + plot_w * min(max((p.sim_at - r.start) / span, 0), 1)
        y = 40 + plot_h - plot_h * (p.price_wei_per_kwh - lo) / (hi - lo)
        rad = 1.5 + min(6.0, (p.wh / 250) ** 0.5)
        body.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{rad:.1f}" fill="#2a9d8f" fill-opacity="0.6"/>')
    body.append(f'<text x="{left + plot_w / 2}" y="{height - 12}" text-anchor="middle">site time since '
                f'{figures.day_name(r.start, r.tz_offset_s)} 00:00 (local)</text>')
    return _svg(width, height, body, f"{r.name}: clearing prices")
