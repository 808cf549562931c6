"""The gateway service: bus parts (chain and auction clients, a live event feed) plus the
aiohttp server that serves the API, the websocket and the web UI."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, ClassVar

from aiohttp import web

from services.bus import Envelope, Service
from services.bus import events as ev

from . import feed
from .app import Gateway
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
        chain = self.client(s.chain_rpc, s.chain_site)
        auction = self.client(s.auction_rpc, s.auction_site)
        self.gateway = Gateway(s, chain=chain, auction=auction, registry=self.registry, health=self.health,
                               store=self.store)  # sessions live in <data_dir>/gateway.sqlite
        await self.prune_sessions()
        self.spawn(self._prune_forever(), name="gateway-session-prune")
        # a live feed: what happened before this gateway started is read through the API
        self.feed = self.subscribe([*feed.PREFIXES, f"{ev.MeterReading.TYPE}.{s.site}"], self.on_event,
                                   start="latest")

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
        self.gateway.on_event(env.type, env.ts, env.body)

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

    def health(self) -> dict[str, Any]:
        h = super().health()
        if hasattr(self, "gateway"):
            h.update(url=self.url, sessions=self.gateway.sessions.live(time.time()), websockets=len(self.gateway.clients))
        return h
