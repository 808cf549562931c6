"""The wallet pages' record: this site's facts and clock, the account's history, the
market's prices, the meter's readings and the site's figures per day (JSON, and the
history and figures as CSV downloads)."""

from __future__ import annotations

from aiohttp import web

from .. import figures as fig
from .. import models as m
from ..errors import ApiError, no_session
from ..history import to_csv
from ..openapi import Route
from ..sessions import Session
from ..state import GATEWAY, Gateway
from .api import Api

api = Api()
downloads = web.RouteTableDef()  # the CSV files (not in the OpenAPI document)


def clock_out(gw: Gateway) -> m.ClockOut:
    return m.ClockOut(**gw.history.clock())


@api(Route("GET", "/api/site", "site_info", "This site: its role, its (simulated) clock, the block explorer, the "
           "auction's minimum increment, which markets run", m.SiteOut, auth=False, tag="history"))
async def site_info(gw: Gateway, request: web.Request) -> m.SiteOut:
    role = gw.history.role if gw.history.role in ("producer", "consumer") else None
    return m.SiteOut(site=gw.site, role=role, clock=clock_out(gw),  # type: ignore[arg-type]
                     explorer_tx_url=gw.settings.explorer_tx_url,
                     min_increment_wei_per_kwh=gw.settings.auction_min_increment_wei_per_kwh,
                     auction_market=gw.settings.auction_market,
                     clear_interval_s=gw.settings.auction_clear_interval_s)


@api(Route("GET", "/api/history", "history", "Your trades, ended offers and Ether transactions, newest first (the "
           "same as CSV: GET /api/history.csv)", m.HistoryOut, errors=(401,), tag="history"))
async def history(gw: Gateway, request: web.Request, session: Session) -> m.HistoryOut:
    return m.HistoryOut(rows=[m.HistoryRow(**r) for r in gw.history.rows(session.address)], clock=clock_out(gw))


@api(Route("GET", "/api/prices", "prices", "The market's start bids, bids, trade and clearing prices over time",
           m.PricesOut, errors=(401,), tag="history"))
async def prices(gw: Gateway, request: web.Request, session: Session) -> m.PricesOut:
    return m.PricesOut(points=[m.PricePoint(**p) for p in gw.history.prices()], clock=clock_out(gw))


def _figures(gw: Gateway, request: web.Request, session: Session) -> tuple[int, int, int, list[fig.Row], fig.Row]:
    """The figures ``?from=&to=&tz_offset_s=`` ask for (site time, Unix s; default: the
    site's current day); a 400 with words for a bad range."""
    q = request.query
    try:
        tz = int(q.get("tz_offset_s", "0"))
    except ValueError:
        raise ApiError(400, "bad_range", "tz_offset_s must be whole seconds (e.g. 3600)") from None
    parsed: dict[str, int] = {}
    for key in ("from", "to"):
        text = q.get(key, "").strip()
        if not text:
            continue
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not value == value or abs(value) > 2**40:  # NaN, inf, or no time at all
            raise ApiError(400, "bad_range", f"'{key}' must be a time in Unix seconds of the site's clock "
                                             "(e.g. 1718000000)")
        parsed[key] = int(value)
    try:
        fig.check_range(0, 1, tz)
        today = gw.history.today(tz)
        start = parsed.get("from", today[0] if "to" not in parsed else parsed["to"] - fig.DAY_S)
        end = parsed.get("to", start + fig.DAY_S if "from" in parsed else today[1])
        tariffs = fig.Tariffs(gw.settings.tariff_retail_wei_per_kwh, gw.settings.tariff_feed_in_wei_per_kwh)
        days, total = gw.history.figures(session.address, start, end, tariffs, tz,
                                         utility_site=gw.settings.utility_site)
    except fig.RangeError as e:
        raise ApiError(400, "bad_range", str(e)) from None
    return start, end, tz, days, total


@api(Route("GET", "/api/figures", "figures",
           "Your site's figures per day of site time and in total: energy produced, consumed, traded locally (as "
           "the chain settled it) and exchanged with the utility, self-sufficiency and money saved against the "
           "utility's tariffs. Query: from, to (site time, Unix s; default the site's current day), tz_offset_s "
           "(days start at midnight shifted by it; default 0). The same as CSV: GET /api/figures.csv",
           m.FiguresOut, errors=(400, 401), tag="history",
           query=(("from", "the range's start, site time (Unix s)"), ("to", "the range's end (exclusive), site time"),
                  ("tz_offset_s", "days begin at midnight shifted by this many seconds (quarter hours)"))))
async def figures(gw: Gateway, request: web.Request, session: Session) -> m.FiguresOut:
    start, end, tz, days, total = _figures(gw, request, session)

    def row(r: fig.Row) -> m.FiguresRow:
        return m.FiguresRow(
            day=r.day, start=r.start, end=r.end, produced_wh=fig.wh(r.produced_mwh),
            consumed_wh=fig.wh(r.consumed_mwh), bought_local_wh=fig.wh(r.bought_local_mwh),
            sold_local_wh=fig.wh(r.sold_local_mwh), bought_local_wei=r.bought_local_wei,
            sold_local_wei=r.sold_local_wei, bought_utility_wh=fig.wh(r.bought_utility_mwh),
            sold_utility_wh=fig.wh(r.sold_utility_mwh), bought_utility_wei=r.bought_utility_wei,
            sold_utility_wei=r.sold_utility_wei, unmatched_import_wh=fig.wh(r.unmatched_import_mwh),
            unmatched_export_wh=fig.wh(r.unmatched_export_mwh), self_sufficiency=r.self_sufficiency,
            baseline_cost_wei=r.baseline_cost_wei, actual_cost_wei=r.actual_cost_wei, saved_wei=r.saved_wei)

    s = gw.settings
    return m.FiguresOut(start=start, end=end, tz_offset_s=tz, days=[row(d) for d in days], total=row(total),
                        tariffs=m.TariffsOut(retail_wei_per_kwh=s.tariff_retail_wei_per_kwh,
                                             feed_in_wei_per_kwh=s.tariff_feed_in_wei_per_kwh),
                        clock=clock_out(gw))


@api(Route("GET", "/api/readings", "readings", "This site's latest meter readings (for the charts)", m.ReadingsOut,
           errors=(401,), tag="history"))
async def readings(gw: Gateway, request: web.Request, session: Session) -> m.ReadingsOut:
    return m.ReadingsOut(readings=[m.ReadingPoint(**r) for r in gw.history.recent_readings()], clock=clock_out(gw))


def _download(text: str, name: str) -> web.Response:
    return web.Response(text=text, content_type="text/csv", charset="utf-8",
                        headers={"Content-Disposition": f'attachment; filename="{name}"', "Cache-Control": "no-store"})


def _session(request: web.Request) -> tuple[Gateway, Session]:
    gw = request.app[GATEWAY]
    session = gw.session_of(request)
    if session is None:
        raise no_session()
    return gw, session


@downloads.get("/api/history.csv", name="history_csv")
async def history_csv(request: web.Request) -> web.Response:
    gw, session = _session(request)
    name = f"gridtrade-{gw.site}-{session.address[:10].lower()}-history.csv"
    return _download(to_csv(gw.history.rows(session.address, limit=100_000)), name)


@downloads.get("/api/figures.csv", name="figures_csv")
async def figures_csv(request: web.Request) -> web.Response:
    gw, session = _session(request)
    start, end, _, days, total = _figures(gw, request, session)
    name = f"gridtrade-{gw.site}-{session.address[:10].lower()}-figures-{fig.day_name(start)}.csv"
    return _download(fig.to_csv(days, total), name)

