"""The gateway's routes by area, each handler bound to its route where it is written.

- :mod:`.session`: this site's accounts, logging in and out, unlocking again;
- :mod:`.wallet`: balances, pending transactions, Ether sent, escrow and credit, mining;
- :mod:`.market`: offers and bids, the double auction's orders, trades;
- :mod:`.agent`: this site's agent and its limits;
- :mod:`.figures`: the site's facts and clock, history, prices, readings, figures, CSV files;
- :mod:`.ws`: the websocket; :mod:`.assets`: the web UI's files and the OpenAPI document.

:mod:`.api` holds how an API route is declared (``@api(Route(...))``).
"""

from __future__ import annotations

from aiohttp import web

from ..openapi import Route
from . import agent, assets, figures, market, session, wallet, ws

AREAS = (session.api, wallet.api, market.api, agent.api, figures.api)

ROUTES: tuple[Route, ...] = tuple(r for area in AREAS for r in area.routes)
"""Every API route, in the OpenAPI document's order."""

TABLES: tuple[web.RouteTableDef, ...] = (*(area.table for area in AREAS), figures.downloads, ws.routes,
                                         assets.routes)
"""Every route the app serves but ``/healthz`` and ``/metrics`` (the service base's)."""
