"""The gateway service: bus parts (a client of this site's wallet, one of the market's
auction, a live event feed, the history's durable feed) plus the aiohttp server that serves
the API, the websocket and the web UI, with its background work (:mod:`.background`)."""

from __future__ import annotations

import logging
import time
from typing import Any, ClassVar

from aiohttp import web

from services.bus import Envelope, Service, Subscriber
from services.bus import events as ev
from services.bus.store import Store

from . import background, feed, history
from .app import make_app
from .config import GatewaySettings
from .history import History
from .state import Gateway

log = logging.getLogger(__name__)


class GatewayService(Service):
    name: ClassVar[str] = "gateway"
    settings: GatewaySettings

    def __init__(self, settings: GatewaySettings) -> None:
        super().__init__(settings)
        s = settings
        # keys, passphrases and signatures go to this site's own wallet only, never to
        # another host's; the auction (at the market) only gets offers and bids
        wallet = self.client(s.wallet_rpc, s.wallet_site or s.site)
        auction = self.client(s.auction_rpc, s.auction_site)
        agent = self.client(s.agent_rpc, s.site) if s.agent_rpc else None  # this site's agent: its owner's limits
        # the pages' record in a store of its own (its subscription keeps its own offsets)
        self.history_store = Store(s.data_dir / "history.sqlite")
        self.gateway = Gateway(s, chain=wallet, auction=auction, agent=agent, registry=self.registry,
                               health=self.health, refresh=self.refresh_metrics,
                               store=self.store,  # sessions live in <data_dir>/gateway.sqlite
                               history=History(self.history_store, s.site))
        self.runner: web.AppRunner | None = None  # the web server, from start() until stopping()
        self.url = ""
        self.port = 0

    async def setup(self) -> None:
        s = self.settings
        # a live feed: what happened before this gateway started is read through the API
        self.subscribe([*feed.PREFIXES, f"{ev.MeterReading.TYPE}.{s.site}",
                        f"{ev.MeterRelay.TYPE}.{s.site}", f"{ev.WalletTx.TYPE}.{s.site}"],
                       self.on_event, start="latest")
        # the history: durable, so what happened while this gateway was down is replayed into it
        self.subscribers.append(Subscriber(self.ctx, self.security, self.history_store, hub_sub=s.hub_sub,
                                           hub_site=s.hub_site, prefixes=history.prefixes(s.site),
                                           handler=self.on_history, start="earliest",
                                           name=f"{self.source} history", authority=s.authority))

    def on_history(self, env: Envelope, conn: Any) -> None:
        self.gateway.history.apply(conn, env.ts, env.body)

    async def prune_sessions(self) -> int:
        return await background.prune_sessions(self.gateway)

    def on_event(self, env: Envelope, conn: Any) -> None:
        body = env.body
        if isinstance(body, ev.WalletTx):  # this site's wallet's transactions look like any other to the UI
            body = ev.ChainTx(**body.model_dump(exclude={"site"}))
            self.gateway.on_event(ev.ChainTx.TYPE, env.ts, body)
            return
        self.gateway.on_event(env.type, env.ts, body)

    async def start(self) -> None:
        await super().start()
        self.runner = web.AppRunner(make_app(self.gateway, background=background.BACKGROUND), access_log=None,
                                    shutdown_timeout=2.0)
        await self.runner.setup()  # the background work starts here (expired sessions pruned first)
        site = web.TCPSite(self.runner, self.settings.http_host, self.settings.http_port)
        await site.start()
        sockets = site._server.sockets if site._server is not None else []  # type: ignore[union-attr]
        self.port = sockets[0].getsockname()[1] if sockets else self.settings.http_port
        self.url = f"http://{self.settings.http_host}:{self.port}"
        log.info("gateway of site %s serving %s", self.settings.site, self.url)

    async def stopping(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()  # stops taking requests, closes the websockets, ends the background work
            self.runner = None

    async def teardown(self) -> None:
        self.history_store.close()

    def health(self) -> dict[str, Any]:
        h = super().health()
        h.update(url=self.url, sessions=self.gateway.sessions.live(time.time()), websockets=len(self.gateway.clients))
        return h
