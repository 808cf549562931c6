"""The aiohttp application: REST API from the route table, the websocket feed, the web UI.

Security model:
- Sessions: ``POST /api/session`` asks this site's wallet to unlock the key (the keys,
  the passphrase and every signature stay at this site; ``chain`` below is the client of
  the site's own wallet, never of another host's); on success the
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
import contextlib
import json
import logging
import math
import pathlib
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
from pydantic import BaseModel, ValidationError

from services.bus import RequestError, RequestTimeout, RpcClient, refusals
from services.bus.store import Store
from services.bus import commands as cmd
from services.bus import states
from services.bus import events as ev

from . import feed, models as m, words
from .history import History
from .pages import Pages
from .config import GatewaySettings
from .openapi import ROUTES, Route, document, validation_message
from services.trader import Trader
from .sessions import Session, SessionStore, LoginThrottle

log = logging.getLogger(__name__)

STATIC = pathlib.Path(__file__).resolve().parent / "static"
WS_QUEUE = 1000
_ID = re.compile(m.ID_PATTERN)

# what the chain service answers an unlock of a wrong account or passphrase (to a person: wrong credentials)
WRONG_ACCOUNT = frozenset(r.code for r in (refusals.BadPassphrase, refusals.UnknownAccount, refusals.NotYourAccount,
                                           refusals.NotYourSite, refusals.Invalid, refusals.BadRequest,
                                           refusals.Keystore))

AGENT_TIMEOUT_S = 2.0  # the agent runs at this site: it answers at once or not at all

LOCKED_MESSAGE = ("your wallet restarted and locked your account's key: enter your passphrase again "
                  "(nothing was done)")

CONTENT_TYPES = {".html": "text/html", ".css": "text/css", ".js": "text/javascript", ".svg": "image/svg+xml",
                 ".png": "image/png", ".ico": "image/x-icon", ".json": "application/json", ".txt": "text/plain"}


TRADE_STATES_JS = "js/trade_states.js"  # served from services/bus/states.py, not from a file


def load_assets(root: pathlib.Path) -> dict[str, tuple[bytes, str]]:
    """Every file under ``root`` by its relative path (no path from a request touches the disk)."""
    out: dict[str, tuple[bytes, str]] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            ctype = CONTENT_TYPES.get(p.suffix, "text/plain" if "LICENSE" in p.name else "application/octet-stream")
            out[p.relative_to(root).as_posix()] = (p.read_bytes(), ctype)
    return out


def cookie_name(site: str) -> str:
    return f"gridtrade_session_{site.replace('-', '_')}"


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None,
                 fix: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}
        self.fix = fix or {}

    @classmethod
    def of(cls, refusal: type[refusals.Refusal], message: str, headers: dict[str, str] | None = None) -> ApiError:
        """The gateway's own refusal with a code the services use too: its declared status."""
        return cls(refusal.status, refusal.code, message, headers)


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None,
                   fix: dict[str, str] | None = None) -> web.Response:
    error: dict[str, Any] = {"code": code, "message": message}
    if fix:
        error["fix"] = fix
    return web.json_response({"error": error}, status=status, headers=headers)


# refusals reworded for the person (see words.py); others are the gateway's own words already
PERSONAL = {400, 403, 404, 409, 422}


def for_person(e: ApiError, route: str, body: Any, now: float) -> ApiError:
    """A service's refusal as the person at this wallet reads it: in Ether and kWh, to "you",
    with the fix the page can offer (e.g. the deposit that is missing)."""
    if e.status not in PERSONAL or e.code in ("not_found", "malformed_json", "unsupported_media_type"):
        return e
    said = words.for_person(e.code, e.message, route=route, body=body, now=now)
    return ApiError(e.status, e.code, said.message, e.headers, said.fix or e.fix)


def from_request_error(e: RequestError, service: str) -> ApiError:
    """A service's refusal as an HTTP error: the status its code is declared with (see
    :mod:`services.bus.refusals`); a service that cannot answer now is ``unavailable``."""
    if isinstance(e, RequestTimeout):
        return ApiError(refusals.Unavailable.status, refusals.Unavailable.code,
                        f"the {service} service does not answer; try again in a moment")
    if e.code == refusals.Locked.code:  # the key is locked in the wallet (it restarted, or its unlock ran out)
        return ApiError.of(refusals.Locked, LOCKED_MESSAGE)
    status = refusals.status_of(e.code)
    if status == 503:
        return ApiError(status, refusals.Unavailable.code, f"the {service} service cannot do this now: {e.message}")
    if e.code == refusals.Internal.code:
        return ApiError(status, "upstream_error", f"the {service} service failed: {e.message}")
    return ApiError(status, e.code, e.message)


@dataclass(eq=False)
class Client:
    ws: web.WebSocketResponse
    token: str
    address: str
    queue: asyncio.Queue[dict[str, Any]] = field(default_factory=lambda: asyncio.Queue(WS_QUEUE))


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter("gridtrade_gateway_http_requests", "HTTP requests", ["route", "status"],
                                registry=registry)
        self.logins = Counter("gridtrade_gateway_logins", "login attempts", ["outcome"], registry=registry)
        self.ws_clients = Gauge("gridtrade_gateway_ws_clients", "connected websockets", registry=registry)
        self.ws_sent = Counter("gridtrade_gateway_ws_messages", "events pushed to websockets", registry=registry)
        self.ws_dropped = Counter("gridtrade_gateway_ws_slow_clients", "websockets closed for being too slow",
                                  registry=registry)
        self.sessions = Gauge("gridtrade_gateway_sessions", "live sessions", registry=registry)


class Gateway(Pages):
    """The gateway's state and handlers, independent of how the bus parts were made."""

    def __init__(self, settings: GatewaySettings, *, chain: RpcClient, auction: RpcClient,
                 registry: CollectorRegistry | None = None,
                 health: Callable[[], dict[str, Any]] | None = None,
                 clock: Callable[[], float] = time.time, store: Store | None = None,
                 history: History | None = None, agent: RpcClient | None = None) -> None:
        self.settings = settings
        self.agent_client = agent
        self.site = settings.site
        self.chain, self.auction = chain, auction
        self.trader = Trader(chain, auction, self.site, timeout_s=settings.gateway_rpc_timeout_s,
                             reserve_timeout_s=settings.gateway_reserve_timeout_s,
                             offer_grace_s=settings.gateway_offer_grace_s, bid_grace_s=settings.gateway_bid_grace_s,
                             trade_duration_s=settings.gateway_trade_duration_s)
        self.clock = clock
        # the service's store (<data_dir>/gateway.sqlite); without one (a bare Gateway), memory
        self.sessions = SessionStore(store if store is not None else Store(":memory:"), settings.session_ttl_s)
        self.throttle = LoginThrottle(settings.login_max_failures, settings.login_window_s,
                                      settings.login_max_delay_s)
        self.parties = feed.Parties()
        # the record behind History, Prices and the trade cards (the service's: <data_dir>/history.sqlite)
        self.history = history if history is not None else History(Store(":memory:"), self.site, clock)
        self.clients: set[Client] = set()
        self._bg: set[asyncio.Future[Any]] = set()
        self.metrics = Metrics(registry or CollectorRegistry())
        self._health = health or (lambda: {"service": "gateway", "site": self.site, "ready": True})
        # one cookie name per site: two gateways on one host (gridtrade up) share cookies across ports
        self.cookie = cookie_name(self.site)
        self.openapi = document(cookie=self.cookie)
        self.assets = load_assets(STATIC)
        # the web UI's trade states, generated from the one enum (no copy of them to drift)
        self.assets[TRADE_STATES_JS] = (states.js_module().encode(), CONTENT_TYPES[".js"])
        self._handlers: dict[str, Callable[..., Awaitable[Any]]] = {
            "list_accounts": self.list_accounts, "login": self.login, "whoami": self.whoami, "logout": self.logout,
            "unlock": self.unlock,
            "wallet": self.wallet, "pending": self.pending, "transfer": self.transfer,
            "escrow_deposit": self.escrow_deposit, "escrow_withdraw": self.escrow_withdraw,
            "withdraw_credit": self.withdraw_credit,
            "mining": self.mining, "set_mining": self.set_mining, "list_offers": self.list_offers,
            "sell": self.sell, "bid": self.bid, "cancel_offer": self.cancel_offer,
            "list_trades": self.list_trades, "close_trade": self.close_trade,
            "list_orders": self.list_orders, "place_order": self.place_order,
            "agent": self.agent, "set_agent_limits": self.set_agent_limits,
            "site_info": self.site_info, "history": self.history_page, "prices": self.prices,
            "readings": self.readings, "figures": self.figures_page,
        }

    # --- the app ---------------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self.errors_middleware, self.headers_middleware],
                              client_max_size=64 * 1024)
        for r in ROUTES:
            app.router.add_route(r.method, r.path, self._endpoint(r), name=r.name)
        app.router.add_get("/api/openapi.json", self.openapi_json)
        app.router.add_get("/api/history.csv", self.history_csv, name="history_csv")
        app.router.add_get("/api/figures.csv", self.figures_csv, name="figures_csv")
        app.router.add_get("/api/ws", self.websocket)
        app.router.add_get("/metrics", self.metrics_endpoint)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/", self.index)
        app.router.add_get("/static/{path:.+}", self.static)
        app.on_shutdown.append(self._close_websockets)
        return app

    @web.middleware
    async def errors_middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
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
        self.metrics.requests.labels(route, str(resp.status)).inc()
        return resp

    @web.middleware
    async def headers_middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
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

    def _endpoint(self, route: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        handler = self._handlers[route.name]

        async def endpoint(request: web.Request) -> web.StreamResponse:
            session = self.session_of(request) if route.auth else None
            if route.auth and session is None:
                raise ApiError(401, "no_session", "log in first (no session, or it has expired)")
            args: list[Any] = [request]
            if route.auth:
                args.append(session)
            body = None
            try:
                if route.body is not None:
                    args.append(body := await self.parse_body(request, route.body))
                result = await handler(*args)
            except ApiError as e:
                raise for_person(e, route.name, body, self.clock()) from None
            if isinstance(result, web.StreamResponse):
                return result
            assert isinstance(result, route.response), f"{route.name} returned {type(result).__name__}"
            return web.json_response(text=result.model_dump_json(), status=route.status)

        return endpoint

    async def parse_body(self, request: web.Request, model: type[BaseModel]) -> Any:
        if request.content_type != "application/json":
            raise ApiError(415, "unsupported_media_type", "send the body as JSON with Content-Type: application/json")
        raw = await request.read()
        if not raw.strip() and model is m.Empty:
            return m.Empty()
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "malformed_json", "the body is not valid JSON") from None
        if not isinstance(data, dict):
            raise ApiError.of(refusals.Invalid, "the body must be a JSON object")
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise ApiError.of(refusals.Invalid, validation_message(e)) from None

    def session_of(self, request: web.Request) -> Session | None:
        return self.sessions.get(request.cookies.get(self.cookie), self.clock())

    def cmd_id(self, request: web.Request, session: Session, what: str) -> str:
        """An ``Idempotency-Key`` header makes a retried POST run once; otherwise a fresh id."""
        key = request.headers.get("Idempotency-Key", "")
        if key and len(key) <= 64 and key.isprintable():
            return f"gw:{self.site}:{session.address.lower()}:{what}:{key}"[:128]
        return uuid.uuid4().hex

    async def ask(self, client: RpcClient, service: str, req: cmd.Request, cmd_id: str | None = None,
                  timeout: float | None = None) -> Any:
        try:
            return await client.request(req, timeout=timeout or self.settings.gateway_rpc_timeout_s, cmd_id=cmd_id)
        except RequestError as e:
            raise from_request_error(e, service) from None

    async def ask_chain(self, req: cmd.Request, cmd_id: str | None = None, timeout: float | None = None) -> Any:
        return await self.ask(self.chain, "chain", req, cmd_id, timeout)

    async def ask_auction(self, req: cmd.Request, cmd_id: str | None = None) -> Any:
        return await self.ask(self.auction, "auction", req, cmd_id)

    # --- pages and plumbing ----------------------------------------------------------

    async def index(self, request: web.Request) -> web.StreamResponse:
        return self._asset("index.html")

    async def static(self, request: web.Request) -> web.StreamResponse:
        return self._asset(request.match_info["path"])

    def _asset(self, name: str) -> web.Response:
        """The UI's files, read once into memory (a few hundred kB; no executor threads)."""
        found = self.assets.get(name)
        if found is None:
            raise ApiError.of(refusals.NotFound, "no such page or file")
        body, ctype = found
        return web.Response(body=body, content_type=ctype, charset="utf-8" if ctype.startswith("text/")
                            or ctype.endswith("javascript") else None, headers={"Cache-Control": "no-cache"})

    async def openapi_json(self, request: web.Request) -> web.Response:
        return web.json_response(self.openapi)

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        self.metrics.sessions.set(self.sessions.live(self.clock()))
        self.metrics.ws_clients.set(len(self.clients))
        return web.Response(body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(self, request: web.Request) -> web.Response:
        h = self._health()
        return web.json_response(h, status=200 if h.get("ready") else 503)

    # --- session -----------------------------------------------------------------------

    async def list_accounts(self, request: web.Request) -> m.AccountsOut:
        reply: cmd.Accounts = await self.ask_chain(cmd.ListAccounts())
        return m.AccountsOut(accounts=[m.AccountOut(address=a.address, name=a.name, site=a.site)
                                       for a in reply.accounts])

    async def _unlock_at_chain(self, request: web.Request, address: str, passphrase: str, ttl_s: float,
                               wrong: str) -> cmd.Unlocked:
        """Unlock ``address`` in the chain service, behind this gateway's throttle (per address
        and per client IP; a failure counts, a success clears the address)."""
        now = self.clock()
        keys = [f"addr:{address.lower()}", f"ip:{request.remote or '?'}"]
        wait = self.throttle.retry_after(keys, now)
        if wait > 0:
            self.metrics.logins.labels("throttled").inc()
            raise ApiError.of(refusals.TooManyAttempts, f"too many failed logins; try again in {int(wait) + 1} s",
                              {"Retry-After": str(int(wait) + 1)})
        try:
            unlocked: cmd.Unlocked = await self.chain.request(
                cmd.Unlock(address=address, passphrase=passphrase, ttl_s=ttl_s),
                timeout=self.settings.gateway_rpc_timeout_s)
        except RequestError as e:
            # another site's account is refused by the chain service: to a person, a wrong account
            if e.code in WRONG_ACCOUNT:
                self.throttle.failed(keys, self.clock())
                self.metrics.logins.labels("failed").inc()
                raise ApiError(401, "bad_credentials", wrong) from None
            if e.code == refusals.TooManyAttempts.code:  # the chain service's own throttle
                self.metrics.logins.labels("throttled").inc()
                found = re.search(r"try again in (\d+) s", e.message)
                wait_s = found.group(1) if found else "60"
                raise ApiError.of(refusals.TooManyAttempts, f"too many failed logins; try again in {wait_s} s",
                                  {"Retry-After": wait_s}) from None
            raise from_request_error(e, "chain") from None
        self.throttle.succeeded([keys[0]])
        self.metrics.logins.labels("ok").inc()
        return unlocked

    async def login(self, request: web.Request, body: m.Login) -> web.StreamResponse:
        now = self.clock()
        unlocked = await self._unlock_at_chain(request, body.address, body.passphrase, self.settings.session_ttl_s,
                                               "wrong account or passphrase")
        token, session = await self.sessions.create(unlocked.address, now, unlocked.expires_at)
        resp = web.json_response(text=m.SessionOut(address=session.address, site=self.site,
                                                   expires_at=session.expires_at, unlocked=True).model_dump_json())
        resp.set_cookie(self.cookie, token, httponly=True, samesite="Strict", path="/",
                        max_age=int(session.expires_at - now), secure=self.settings.cookie_secure)
        log.info("login %s", session.address)
        return resp

    async def unlock(self, request: web.Request, session: Session, body: m.UnlockIn) -> m.SessionOut:
        """The session's account again (its wallet restarted): for the rest of the session."""
        ttl_s = session.expires_at - self.clock()
        if ttl_s <= 0:
            raise ApiError(401, "no_session", "log in first (no session, or it has expired)")
        await self._unlock_at_chain(request, session.address, body.passphrase, ttl_s, "wrong passphrase")
        log.info("unlocked %s again", session.address)
        return m.SessionOut(address=session.address, site=self.site, expires_at=session.expires_at, unlocked=True)

    async def is_unlocked(self, address: str) -> bool | None:
        """Whether the chain service holds ``address``'s key unlocked (None: it does not answer)."""
        try:
            reply: cmd.Accounts = await self.chain.request(cmd.ListAccounts(),
                                                           timeout=self.settings.gateway_rpc_timeout_s)
        except RequestError:
            return None
        return next((a.unlocked for a in reply.accounts if a.address.lower() == address.lower()), None)

    async def whoami(self, request: web.Request, session: Session) -> m.SessionOut:
        return m.SessionOut(address=session.address, site=self.site, expires_at=session.expires_at,
                            unlocked=await self.is_unlocked(session.address))

    async def logout(self, request: web.Request, session: Session) -> web.StreamResponse:
        token = request.cookies.get(self.cookie)
        await self.sessions.drop(token)
        if not self.sessions.others_of(session.address, self.clock()):
            try:
                await self.chain.request(cmd.Lock(address=session.address), timeout=self.settings.gateway_rpc_timeout_s)
            except RequestError as e:  # the session is gone here anyway; the key expires at the chain
                log.warning("could not lock %s at logout: %s", session.address, e)
        for c in [c for c in self.clients if c.token == token]:
            await c.ws.close(code=4401, message=b"logged out")
        resp = web.json_response(text=m.OkOut().model_dump_json())
        resp.del_cookie(self.cookie, path="/")
        log.info("logout %s", session.address)
        return resp

    # --- wallet ------------------------------------------------------------------------

    async def _pending(self, address: str) -> list[m.TxOut]:
        reply: cmd.Pending = await self.ask_chain(cmd.ListPending(account=address))
        return [m.TxOut(tx_hash=t.tx_hash, kind=t.kind, ref=t.ref, status=t.status, state=t.state, reason=t.reason,
                        nonce=t.nonce, current_hash=t.current_hash, depth=t.depth, depth_required=t.depth_required)
                for t in reply.txs]

    async def wallet(self, request: web.Request, session: Session) -> m.WalletOut:
        bal, pending, unlocked = await asyncio.gather(self.ask_chain(cmd.GetBalances(address=session.address)),
                                                      self._pending(session.address),
                                                      self.is_unlocked(session.address))
        return m.WalletOut(address=session.address, site=self.site, ether_wei=bal.ether_wei,
                           escrow_free_wei=bal.escrow_free_wei, escrow_reserved_wei=bal.escrow_reserved_wei,
                           reserved_until=bal.reserved_until, escrow_locked_wei=bal.escrow_locked_wei,
                           credit_wei=bal.credit_wei, tokens_wh=bal.tokens_wh, tokens_locked_wh=bal.tokens_locked_wh,
                           generated_wh=bal.generated_wh, pending=pending, unlocked=unlocked)

    async def pending(self, request: web.Request, session: Session) -> m.PendingOut:
        return m.PendingOut(txs=await self._pending(session.address))

    async def transfer(self, request: web.Request, session: Session, body: m.TransferIn) -> m.TxSentOut:
        if body.to.lower() == session.address.lower():
            raise ApiError.of(refusals.Invalid, "to: that is your own account")
        sent: cmd.TxSent = await self.ask_chain(
            cmd.Transfer(sender=session.address, to=body.to, amount_wei=body.amount_wei),
            self.cmd_id(request, session, "transfer"))
        await self.history.sent(account=session.address, kind="transfer", tx_hash=sent.tx_hash,
                                amount_wei=body.amount_wei, to=body.to)
        return m.TxSentOut(tx_hash=sent.tx_hash)

    async def _escrow(self, request: web.Request, session: Session, action: str, amount: int) -> m.TxSentOut:
        sent: cmd.TxSent = await self.ask_chain(
            cmd.Escrow(account=session.address, action=action, amount_wei=amount),  # type: ignore[arg-type]
            self.cmd_id(request, session, action))
        await self.history.sent(account=session.address, kind=action, tx_hash=sent.tx_hash, amount_wei=amount)
        return m.TxSentOut(tx_hash=sent.tx_hash)

    async def escrow_deposit(self, request: web.Request, session: Session, body: m.EscrowIn) -> m.TxSentOut:
        return await self._escrow(request, session, "deposit", body.amount_wei)

    async def escrow_withdraw(self, request: web.Request, session: Session, body: m.EscrowIn) -> m.TxSentOut:
        return await self._escrow(request, session, "withdraw", body.amount_wei)

    async def withdraw_credit(self, request: web.Request, session: Session, body: m.EscrowIn) -> m.TxSentOut:
        return await self._escrow(request, session, "withdraw_credit", body.amount_wei)

    async def mining(self, request: web.Request, session: Session) -> m.MiningOut:
        r: cmd.Mining = await self.ask_chain(cmd.SetMining(action="status"))
        return m.MiningOut(mining=r.mining, supported=r.supported, detail=r.detail, controllable=r.controllable)

    async def set_mining(self, request: web.Request, session: Session, body: m.MiningIn) -> m.MiningOut:
        r: cmd.Mining = await self.ask_chain(cmd.SetMining(action=body.action),
                                             self.cmd_id(request, session, "mining"))
        return m.MiningOut(mining=r.mining, supported=r.supported, detail=r.detail, controllable=r.controllable)

    # --- market ------------------------------------------------------------------------

    async def list_offers(self, request: web.Request, session: Session) -> m.OffersOut:
        r: cmd.Offers = await self.ask_auction(cmd.ListOffers())
        return m.OffersOut(offers=[m.OfferOut(**o.model_dump()) for o in r.offers], now=self.clock())

    async def sell(self, request: web.Request, session: Session, body: m.SellIn) -> m.OfferPlacedOut:
        """Approve the tokens for the market, have the wallet sign the offer (valid until the
        auction's end plus a grace period, for a trade of the configured duration), place it."""
        try:
            placed = await self.trader.sell(session.address, body.energy_wh, body.start_price_wei_per_kwh,
                                            body.duration_s, now=self.clock(),
                                            cmd_id=self.cmd_id(request, session, "sell"))
        except RequestError as e:
            raise from_request_error(e, e.service or "chain") from None
        return m.OfferPlacedOut(offer_id=placed.offer_id, ends_at=placed.ends_at, wh=body.energy_wh)

    async def _open_offer(self, offer_id: str, me: str, price: int) -> tuple[cmd.OfferView, list[cmd.OfferView]]:
        """The open english offer ``offer_id`` and every open offer, with the refusals the
        listing already tells (no escrow is reserved for a bid that cannot be placed)."""
        offers = (await self.ask_auction(cmd.ListOffers())).offers
        offer = next((o for o in offers if o.offer_id == offer_id and o.market == "english"), None)
        if offer is None:
            closed = next((o for o in (await self.ask_auction(cmd.ListOffers(include_closed=True))).offers
                           if o.offer_id == offer_id and o.market == "english"), None)
            if closed is None:
                raise ApiError.of(refusals.NotFound, "no such offer")
            raise ApiError.of(refusals.Closed, f"offer {offer_id} is {closed.state}")
        if offer.seller.lower() == me.lower():
            raise ApiError.of(refusals.OwnOffer, "a seller cannot bid on their own offer")
        floor = offer.highest_bid_wei_per_kwh or offer.start_price_wei_per_kwh
        if price < floor:
            words = (f"the highest bid is {offer.highest_bid_wei_per_kwh} wei/kWh" if offer.highest_bid_wei_per_kwh
                     else f"the start bid is {offer.start_price_wei_per_kwh} wei/kWh")
            raise ApiError.of(refusals.TooLow, f"{words}; nothing was done")
        if not offer.signed_offer_id:
            raise ApiError.of(refusals.Closed, f"offer {offer_id} carries no signed offer: it cannot be bid on")
        return offer, offers

    async def bid(self, request: web.Request, session: Session, body: m.BidIn) -> m.BidOut:
        """Reserve the escrow this bid and the account's other live bids need until the bid
        expires (the wallet tops up from free escrow and answers once in a block), have the
        wallet sign the bid, place it."""
        offer_id = self._id(request, "offer_id")
        offer, offers = await self._open_offer(offer_id, session.address, body.price_wei_per_kwh)
        try:
            r = await self.trader.bid(session.address, offer, offers, body.price_wei_per_kwh,
                                      cmd_id=self.cmd_id(request, session, "bid"))
        except RequestError as e:
            raise from_request_error(e, e.service or "chain") from None
        return m.BidOut(bid_id=r.bid_id)

    async def cancel_offer(self, request: web.Request, session: Session, body: m.Empty) -> m.OkOut:
        offer_id = self._id(request, "offer_id")
        await self.ask_auction(cmd.CancelOffer(offer_id=offer_id, seller=session.address),
                               self.cmd_id(request, session, "cancel"))
        return m.OkOut()

    async def list_orders(self, request: web.Request, session: Session) -> m.OrdersOut:
        r: cmd.OrderBook = await self.ask_auction(cmd.ListOrders())
        me = session.address.lower()

        def out(o: cmd.BookOrder) -> m.BookOrderOut:
            return m.BookOrderOut(**o.model_dump(), mine=o.account.lower() == me)

        return m.OrdersOut(market=r.market, round=r.round, clears_at=r.clears_at, interval_s=r.interval_s,
                           now=self.clock(), orders=[out(o) for o in r.orders],
                           last_orders=[out(o) for o in r.last_orders],
                           calls=[m.ClearedCallOut(**c.model_dump()) for c in r.calls])

    async def place_order(self, request: web.Request, session: Session, body: m.OrderIn) -> m.OrderPlacedOut:
        """An order for the double auction's current call: the wallet approves the tokens (a
        sell) or reserves the escrow (a buy) and signs it, valid past the call's clearing."""
        if self.settings.auction_market == "english":
            raise ApiError.of(refusals.Unsupported, "this market runs the english auction only: sell and bid on "
                                                    "offers instead; nothing was done")
        interval = self.settings.auction_clear_interval_s
        now = self.clock()
        # valid through the call being collected and the next one (the clock may just have cleared this one)
        duration = max(1, math.ceil((math.floor(now / interval) + 2) * interval - now))
        try:
            placed = await self.trader.order(session.address, body.side, body.energy_wh, body.limit_price_wei_per_kwh,
                                             now=now, duration_s=duration,
                                             cmd_id=self.cmd_id(request, session, f"order-{body.side}"))
        except RequestError as e:
            raise from_request_error(e, e.service or "chain") from None
        return m.OrderPlacedOut(order_id=placed.order_id, side=body.side, wh=body.energy_wh,
                                limit_price_wei_per_kwh=body.limit_price_wei_per_kwh)

    async def list_trades(self, request: web.Request, session: Session) -> m.TradesOut:
        r: cmd.Trades = await self.ask_auction(cmd.ListTrades())
        for t in r.trades:
            self.parties.learn(t.trade_id, t.seller, t.buyer)
        facts = self.history.facts([t.trade_id for t in r.trades])  # the cards' story
        return m.TradesOut(trades=[m.TradeOut(**{**t.model_dump(), **facts.get(t.trade_id, {})}) for t in r.trades])

    async def agent(self, request: web.Request, session: Session) -> m.AgentOut:
        return self._agent_out(await self._ask_agent(cmd.GetAgent(), session))

    async def set_agent_limits(self, request: web.Request, session: Session, body: m.AgentLimitsIn) -> m.AgentOut:
        limits = cmd.AgentLimits(**body.model_dump())
        return self._agent_out(await self._ask_agent(cmd.SetAgentLimits(limits=limits), session,
                                                     self.cmd_id(request, session, "agent-limits")))

    async def _ask_agent(self, req: cmd.Request, session: Session, cmd_id: str | None = None) -> cmd.AgentState:
        if self.agent_client is None:
            raise ApiError(404, "no_agent", "this site runs no agent: trade by hand on the Market page")
        st: cmd.AgentState = await self.ask(self.agent_client, "agent", req, cmd_id, timeout=AGENT_TIMEOUT_S)
        if st.account and st.account.lower() != session.address.lower():
            raise ApiError.of(refusals.NotYourAccount, "the site's agent trades for another account of this site")
        return st

    @staticmethod
    def _agent_out(st: cmd.AgentState) -> m.AgentOut:
        return m.AgentOut(**st.model_dump())

    async def close_trade(self, request: web.Request, session: Session, body: m.Empty) -> m.OkOut:
        trade_id = self._id(request, "trade_id")
        await self.ask_auction(cmd.CloseTrade(trade_id=trade_id, by=session.address),
                               self.cmd_id(request, session, "close"))
        await self.history.closing(trade_id, session.address)
        return m.OkOut()

    @staticmethod
    def _id(request: web.Request, name: str) -> str:
        value = request.match_info[name]
        if not _ID.match(value):
            raise ApiError.of(refusals.NotFound, f"no such {name.removesuffix('_id')}")
        return value

    # --- websocket ---------------------------------------------------------------------

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        token = request.cookies.get(self.cookie)
        session = self.sessions.get(token, self.clock())
        if session is None or token is None:
            raise ApiError(401, "no_session", "log in first (no session, or it has expired)")
        ws = web.WebSocketResponse(heartbeat=20, max_msg_size=4096)
        await ws.prepare(request)
        client = Client(ws=ws, token=token, address=session.address)
        self.clients.add(client)
        self.metrics.ws_clients.set(len(self.clients))
        reader = asyncio.create_task(self._ws_reader(client), name="gateway-ws-reader")
        getter: asyncio.Future[dict[str, Any]] | None = None
        try:
            await ws.send_json({"type": "hello", "ts": self.clock(),
                                "body": {"address": session.address, "site": self.site}})
            while not ws.closed:
                getter = asyncio.ensure_future(client.queue.get())
                done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await getter
                    break
                msg = getter.result()
                if self.sessions.get(token, self.clock()) is None:
                    await ws.close(code=4401, message=b"session expired")
                    break
                await ws.send_json(msg)
                self.metrics.ws_sent.inc()
        except (ConnectionError, RuntimeError):
            pass
        finally:
            self.clients.discard(client)
            self.metrics.ws_clients.set(len(self.clients))
            if getter is not None and not getter.done():  # the handler itself was cancelled while waiting
                getter.cancel()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            if not ws.closed:
                await ws.close()
        return ws

    async def _ws_reader(self, client: Client) -> None:
        """Incoming frames are only pings; the loop ends when the socket closes."""
        async for msg in client.ws:
            if msg.type == WSMsgType.TEXT and msg.data == "ping":
                await client.ws.send_json({"type": "pong", "ts": self.clock(), "body": {}})

    def on_event(self, type_: str, ts: float, body: ev.Message) -> None:
        """Fan one bus event out to the websockets allowed to see it (never blocks)."""
        self.parties.observe(body)
        if isinstance(body, ev.MeterReading) and body.site == self.site:
            self.history.reading(ts, body)
        frame: dict[str, Any] | None = None
        for c in list(self.clients):
            if not feed.visible(body, account=c.address, site=self.site, parties=self.parties):
                continue
            frame = frame or feed.message(type_, ts, body)
            try:
                c.queue.put_nowait(frame)
            except asyncio.QueueFull:
                self.metrics.ws_dropped.inc()
                self.clients.discard(c)
                t = asyncio.ensure_future(c.ws.close(code=4408, message=b"too slow: reload to catch up"))
                self._bg.add(t)
                t.add_done_callback(self._bg.discard)

    async def _close_websockets(self, app: web.Application) -> None:
        for c in list(self.clients):
            with contextlib.suppress(Exception):
                await c.ws.close(code=1001, message=b"server shutting down")
        if self._bg:
            await asyncio.gather(*self._bg, return_exceptions=True)
