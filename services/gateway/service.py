"""The gateway service: bus parts (a client of this site's wallet, one of the market's
auction, a live event feed) plus the aiohttp server that serves the API, the websocket and
the web UI."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, ClassVar

from aiohttp import web

from services.bus import Envelope, Service
from services.bus import events as ev
from services.bus.store import Store
from services.bus.transport import Subscriber

from . import feed, history
from .app import Gateway
from .history import History
from .config import GatewaySettings

log = logging.getLogger(__name__)

PRUNE_EVERY_S = 60.0


class GatewayService(Service):
    name: ClassVar[str] = "gateway"
    settings: GatewaySettings

    def __init__(self, settings: GatewaySettings) -> None:
        super().__init__(settings)
        self.url = ""
        self.port = 0

    async def setup(self) -> None:
        s = self.settings
        # keys, passphrases and signatures go to this site's own wallet only, never to
        # another host's; the auction (at the market) only gets offers and bids
        wallet = self.client(s.wallet_rpc, s.wallet_site or s.site)
        auction = self.client(s.auction_rpc, s.auction_site)
        # the pages' record in a store of its own (its subscription keeps its own offsets)
        self.history_store = Store(s.data_dir / "history.sqlite")
        agent = self.client(s.agent_rpc, s.site) if s.agent_rpc else None  # this site's agent: its owner's limits
        self.gateway = Gateway(s, chain=wallet, auction=auction, agent=agent, registry=self.registry,
                               health=self.health,
                               store=self.store,  # sessions live in <data_dir>/gateway.sqlite
                               history=History(self.history_store, s.site))
        await self.prune_sessions()
        self.spawn(self._prune_forever(), name="gateway-session-prune")
        # a live feed: what happened before this gateway started is read through the API
        self.feed = self.subscribe([*feed.PREFIXES, f"{ev.MeterReading.TYPE}.{s.site}",
                                    f"{ev.MeterRelay.TYPE}.{s.site}", f"{ev.WalletTx.TYPE}.{s.site}"],
                                   self.on_event, start="latest")
        # the history: durable, so what happened while this gateway was down is replayed into it
        self.history_feed = Subscriber(self.ctx, self.security, self.history_store, hub_sub=s.hub_sub,
                                       hub_site=s.hub_site, prefixes=history.prefixes(s.site),
                                       handler=self.on_history, start="earliest", name=f"{self.source} history",
                                       authority=s.authority)
        self.subscribers.append(self.history_feed)
        self.spawn(self.gateway.watch_balances(s.gateway_balance_poll_s), name="gateway-balances")
        self.spawn(self._persist_history(), name="gateway-history-clock")

    def on_history(self, env: Envelope, conn: Any) -> None:
        self.gateway.history.apply(conn, env.ts, env.body)

    async def _persist_history(self) -> None:
        while True:
            await asyncio.sleep(5.0)
            try:
                await self.gateway.history.persist()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - tried again next round
                log.exception("saving the site's clock failed")

    async def prune_sessions(self) -> int:
        n = await self.gateway.sessions.purge(time.time())
        if n:
            log.info("pruned %d expired session(s)", n)
        return n

    async def _prune_forever(self) -> None:
        while True:
            await asyncio.sleep(PRUNE_EVERY_S)
            try:
                await self.prune_sessions()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - tried again next round
                log.exception("pruning expired sessions failed")

    def on_event(self, env: Envelope, conn: Any) -> None:
        body = env.body
        if isinstance(body, ev.WalletTx):  # this site's wallet's transactions look like any other to the UI
            body = ev.ChainTx(**body.model_dump(exclude={"site"}))
            self.gateway.on_event(ev.ChainTx.TYPE, env.ts, body)
            return
        self.gateway.on_event(env.type, env.ts, body)

    async def start(self) -> None:
        await super().start()
        self.runner = web.AppRunner(self.gateway.make_app(), access_log=None, shutdown_timeout=2.0)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.settings.http_host, self.settings.http_port)
        await site.start()
        sockets = site._server.sockets if site._server is not None else []  # type: ignore[union-attr]
        self.port = sockets[0].getsockname()[1] if sockets else self.settings.http_port
        self.url = f"http://{self.settings.http_host}:{self.port}"
        log.info("gateway of site %s serving %s", self.settings.site, self.url)

    async def stopping(self) -> None:
        if hasattr(self, "runner"):
            await self.runner.cleanup()

    async def teardown(self) -> None:
        if hasattr(self, "history_store"):
            self.history_store.close()

    def health(self) -> dict[str, Any]:
        h = super().health()
        if hasattr(self, "gateway"):
            h.update(url=self.url, sessions=self.gateway.sessions.live(time.time()), websockets=len(self.gateway.clients))
        return h
