"""The wallet pages' own routes (history, prices, readings, figures, the site's facts) and the
balance watch that pushes changed balances to open pages: a mixin of
:class:`services.gateway.app.Gateway`, kept apart from the trading routes."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from aiohttp import web

from services.bus import RequestError
from services.bus import commands as cmd

from . import figures as fig
from . import models as m
from .history import History, to_csv

if TYPE_CHECKING:
    from .app import Gateway

log = logging.getLogger(__name__)

BALANCE_FIELDS = ("ether_wei", "escrow_free_wei", "escrow_reserved_wei", "reserved_until", "escrow_locked_wei",
                  "credit_wei", "tokens_wh", "tokens_locked_wh", "generated_wh")


def balances_body(bal: cmd.Balances) -> dict[str, Any]:
    """A ``wallet.balances`` frame's body: wei as decimal strings, as everywhere on the wire."""
    return {k: (str(v) if k.endswith("_wei") else v) for k, v in bal.model_dump().items() if k in BALANCE_FIELDS}


class Pages:
    """Handlers and background work for the pages; ``self`` is the Gateway."""

    history: History

    def clock_out(self: Gateway) -> m.ClockOut:
        return m.ClockOut(**self.history.clock())

    async def site_info(self: Gateway, request: web.Request) -> m.SiteOut:
        role = self.history.role if self.history.role in ("producer", "consumer") else None
        return m.SiteOut(site=self.site, role=role, clock=self.clock_out(),  # type: ignore[arg-type]
                         explorer_tx_url=self.settings.explorer_tx_url,
                         min_increment_wei_per_kwh=self.settings.auction_min_increment_wei_per_kwh,
                         auction_market=self.settings.auction_market,
                         clear_interval_s=self.settings.auction_clear_interval_s)

    async def history_page(self: Gateway, request: web.Request, session: Any) -> m.HistoryOut:
        return m.HistoryOut(rows=[m.HistoryRow(**r) for r in self.history.rows(session.address)],
                            clock=self.clock_out())

    async def history_csv(self: Gateway, request: web.Request) -> web.Response:
        session = self.session_of(request)
        if session is None:
            from .app import ApiError
            raise ApiError(401, "no_session", "log in first (no session, or it has expired)")
        name = f"gridtrade-{self.site}-{session.address[:10].lower()}-history.csv"
        return web.Response(text=to_csv(self.history.rows(session.address, limit=100_000)), content_type="text/csv",
                            charset="utf-8", headers={"Content-Disposition": f'attachment; filename="{name}"',
                                                      "Cache-Control": "no-store"})

    async def prices(self: Gateway, request: web.Request, session: Any) -> m.PricesOut:
        return m.PricesOut(points=[m.PricePoint(**p) for p in self.history.prices()], clock=self.clock_out())

    async def readings(self: Gateway, request: web.Request, session: Any) -> m.ReadingsOut:
        return m.ReadingsOut(readings=[m.ReadingPoint(**r) for r in self.history.recent_readings()],
                             clock=self.clock_out())

    def _figures(self: Gateway, request: web.Request, session: Any) -> tuple[int, int, int, list[fig.Row], fig.Row]:
        """The figures ``?from=&to=&tz_offset_s=`` ask for (site time, Unix s; default: the
        site's current day); a 400 with words for a bad range."""
        from .app import ApiError
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
            today = self.history.today(tz)
            start = parsed.get("from", today[0] if "to" not in parsed else parsed["to"] - fig.DAY_S)
            end = parsed.get("to", start + fig.DAY_S if "from" in parsed else today[1])
            tariffs = fig.Tariffs(self.settings.tariff_retail_wei_per_kwh, self.settings.tariff_feed_in_wei_per_kwh)
            days, total = self.history.figures(session.address, start, end, tariffs, tz,
                                                utility_site=self.settings.utility_site)
        except fig.RangeError as e:
            raise ApiError(400, "bad_range", str(e)) from None
        return start, end, tz, days, total

    async def figures_page(self: Gateway, request: web.Request, session: Any) -> m.FiguresOut:
        start, end, tz, days, total = self._figures(request, session)

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

        s = self.settings
        return m.FiguresOut(start=start, end=end, tz_offset_s=tz, days=[row(d) for d in days], total=row(total),
                            tariffs=m.TariffsOut(retail_wei_per_kwh=s.tariff_retail_wei_per_kwh,
                                                 feed_in_wei_per_kwh=s.tariff_feed_in_wei_per_kwh),
                            clock=self.clock_out())

    async def figures_csv(self: Gateway, request: web.Request) -> web.Response:
        session = self.session_of(request)
        if session is None:
            from .app import ApiError
            raise ApiError(401, "no_session", "log in first (no session, or it has expired)")
        start, end, _, days, total = self._figures(request, session)
        name = f"gridtrade-{self.site}-{session.address[:10].lower()}-figures-{fig.day_name(start)}.csv"
        return web.Response(text=fig.to_csv(days, total), content_type="text/csv", charset="utf-8",
                            headers={"Content-Disposition": f'attachment; filename="{name}"',
                                     "Cache-Control": "no-store"})

    # --- balances pushed to the pages ------------------------------------------------------

    async def watch_balances(self: Gateway, every_s: float) -> None:
        """Every ``every_s``: the balances of each account with a page open; a change (Ether
        received from anyone, a payment, a mint) goes to that account's websockets."""
        last: dict[str, dict[str, Any]] = {}
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.push_balances(last)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the next round tries again
                log.exception("reading balances for the pages failed")

    async def push_balances(self: Gateway, last: dict[str, dict[str, Any]]) -> None:
        addresses = {c.address.lower(): c.address for c in self.clients}
        for key in list(last):
            if key not in addresses:
                del last[key]
        for key, address in addresses.items():
            try:
                bal: cmd.Balances = await self.chain.request(cmd.GetBalances(address=address),
                                                             timeout=self.settings.gateway_rpc_timeout_s)
            except RequestError:
                continue
            body = balances_body(bal)
            if last.get(key) == body:
                continue
            last[key] = body
            frame = {"type": "wallet.balances", "ts": self.clock(), "body": {"address": address, **body}}
            for c in list(self.clients):
                if c.address.lower() == key:
                    try:
                        c.queue.put_nowait(frame)
                    except asyncio.QueueFull:
                        pass  # the feed's own overflow handling closes a client that slow
