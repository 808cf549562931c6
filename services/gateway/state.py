"""What the gateway's handlers share, kept on the aiohttp app under :data:`GATEWAY`: this
site's settings, the clients of its wallet, the market's auction and its agent, the
sessions and the login throttle, the pages' history, the open websockets and the metrics;
with the few steps every area's handlers take (the session of a request, a command id, a
request to a backing service) and the fan-out of bus events and balances to the websockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge

from services.bus import RequestError, RpcClient
from services.bus import commands as cmd
from services.bus import events as ev
from services.bus.store import Store
from services.trader import Trader

from . import feed
from .config import GatewaySettings
from .errors import from_request_error
from .history import History
from .sessions import LoginThrottle, Session, SessionStore

log = logging.getLogger(__name__)

WS_QUEUE = 1000

BALANCE_FIELDS = ("ether_wei", "escrow_free_wei", "escrow_reserved_wei", "reserved_until", "escrow_locked_wei",
                  "credit_wei", "tokens_wh", "tokens_locked_wh", "generated_wh")


def cookie_name(site: str) -> str:
    return f"gridtrade_session_{site.replace('-', '_')}"


def balances_body(bal: cmd.Balances) -> dict[str, Any]:
    """A ``wallet.balances`` frame's body: wei as decimal strings, as everywhere on the wire."""
    return {k: (str(v) if k.endswith("_wei") else v) for k, v in bal.model_dump().items() if k in BALANCE_FIELDS}


@dataclass(eq=False)
class Client:
    """One open websocket of a logged-in page."""

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


class Gateway:
    """The gateway's state, independent of how the bus parts were made (a bare one, with
    stand-ins for the clients and stores in memory, serves the pages in tests)."""

    def __init__(self, settings: GatewaySettings, *, chain: RpcClient, auction: RpcClient,
                 registry: CollectorRegistry | None = None,
                 health: Callable[[], dict[str, Any]] | None = None,
                 refresh: Callable[[], None] | None = None,
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
        self.health = health or (lambda: {"service": "gateway", "site": self.site, "ready": True})
        self._refresh = refresh  # the service's own gauges, brought up to date with the gateway's
        # one cookie name per site: two gateways on one host (gridtrade up) share cookies across ports
        self.cookie = cookie_name(self.site)

    def refresh_metrics(self) -> None:
        if self._refresh is not None:
            self._refresh()
        self.metrics.sessions.set(self.sessions.live(self.clock()))
        self.metrics.ws_clients.set(len(self.clients))

    # --- what every area's handlers do ----------------------------------------------------

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

    async def is_unlocked(self, address: str) -> bool | None:
        """Whether the chain service holds ``address``'s key unlocked (None: it does not answer)."""
        try:
            reply: cmd.Accounts = await self.chain.request(cmd.ListAccounts(),
                                                           timeout=self.settings.gateway_rpc_timeout_s)
        except RequestError:
            return None
        return next((a.unlocked for a in reply.accounts if a.address.lower() == address.lower()), None)

    # --- pushed to the websockets ---------------------------------------------------------

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

    async def push_balances(self, last: dict[str, dict[str, Any]]) -> None:
        """The balances of each account with a page open; a change since ``last`` (Ether
        received from anyone, a payment, a mint) goes to that account's websockets."""
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

    async def close_websockets(self) -> None:
        for c in list(self.clients):
            with contextlib.suppress(Exception):
                await c.ws.close(code=1001, message=b"server shutting down")
        if self._bg:
            await asyncio.gather(*self._bg, return_exceptions=True)


GATEWAY = web.AppKey("gateway", Gateway)
"""The app's :class:`Gateway`: every handler's state."""
