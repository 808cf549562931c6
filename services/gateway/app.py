"""The aiohttp application: the routes of every area (:mod:`services.gateway.routes`), the
middlewares, ``/healthz`` and ``/metrics`` (the service base's), and the background work.

Security model:
- Sessions: ``POST /api/session`` asks this site's wallet to unlock the key (the keys,
  the passphrase and every signature stay at this site; ``Gateway.chain`` is the client
  of the site's own wallet, never of another host's); on success the
  browser gets an HttpOnly, SameSite=Strict, Path=/ cookie holding a random token. Every
  state-changing route needs it (401 without) and acts only for the session's account:
  no request body can name the acting account (unknown fields are refused). Sessions are
  kept in the gateway's store (only the token's SHA-256), so they survive a restart.
- The key is unlocked in the chain service's memory only: after that service restarts, a
  request that signs answers 401 with code ``locked`` while the session stays;
  ``POST /api/session/unlock`` with the passphrase unlocks the session's account again
  (throttled like a login). ``GET /api/session`` and ``GET /api/wallet`` say ``unlocked``.
- CSRF: SameSite=Strict keeps the cookie off cross-site requests, and every POST must
  say ``Content-Type: application/json`` (a cross-site HTML form cannot send that without
  a CORS preflight, which this server never grants). That is enough here; no CSRF token.
- Failed logins are throttled per address and per client IP (429 with Retry-After).
- Every error is JSON ``{"error": {"code", "message"}}``; a middleware turns anything
  unexpected into a 500 with a generic message and logs the trace (never sent).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from aiohttp import web

from services.bus.service import health_routes

from .errors import ApiError, error_response
from .openapi import document
from .routes import ROUTES, TABLES
from .routes.assets import ASSETS, OPENAPI, STATIC, load_assets
from .state import GATEWAY, Gateway

log = logging.getLogger(__name__)

CleanupCtx = Callable[[web.Application], AsyncIterator[None]]


def make_app(gw: Gateway, *, background: Iterable[CleanupCtx] = ()) -> web.Application:
    """The app serving ``gw``; ``background``: the work started with it and cancelled when it
    stops (:data:`services.gateway.background.BACKGROUND` for the service)."""
    app = web.Application(middlewares=[errors_middleware, headers_middleware], client_max_size=64 * 1024)
    app[GATEWAY] = gw
    app[ASSETS] = load_assets(STATIC)
    app[OPENAPI] = document(ROUTES, cookie=gw.cookie)
    for table in TABLES:
        app.add_routes(table)
    app.add_routes(health_routes(gw.health, gw.metrics.registry, gw.refresh_metrics))
    app.cleanup_ctx.extend(background)
    app.on_shutdown.append(_close_websockets)
    return app


@web.middleware
async def errors_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    route = request.match_info.route.name or ("static" if request.path.startswith("/static/") else "other")
    try:
        resp = await handler(request)
    except ApiError as e:
        resp = error_response(e.status, e.code, e.message, e.headers, e.fix)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(e.status, "http_error")
        msg = {404: "no such page or API route", 405: f"{request.method} is not allowed here",
               413: "the request body is too large"}.get(e.status, e.reason)
        resp = error_response(e.status, code, msg)
    except asyncio.CancelledError:
        raise
    except Exception:  # noqa: BLE001 - the person gets words, the log gets the trace
        log.exception("unexpected error on %s %s", request.method, request.path)
        resp = error_response(500, "internal", "something went wrong inside the gateway; it has been logged")
    request.app[GATEWAY].metrics.requests.labels(route, str(resp.status)).inc()
    return resp


@web.middleware
async def headers_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    resp = await handler(request)
    if not resp.prepared:
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("X-Frame-Options", "DENY")
        resp.headers.setdefault("Referrer-Policy", "same-origin")
        resp.headers.setdefault("Content-Security-Policy",
                                "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
                                "connect-src 'self'; frame-ancestors 'none'")
        if request.path.startswith("/api/"):
            resp.headers.setdefault("Cache-Control", "no-store")
    return resp


async def _close_websockets(app: web.Application) -> None:
    await app[GATEWAY].close_websockets()
