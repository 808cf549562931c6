"""A real hub with CURVE keys (tests/bus), the STAND-IN chain and meters
(tests/gateway/standins.py), the real auction service, and gateways on loopback."""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from services.auction.config import AuctionSettings
from services.auction.service import AuctionService
from services.gateway.config import GatewaySettings
from services.gateway.service import GatewayService
from tests.bus.conftest import Grid, grid  # noqa: F401 - the shared hub fixture

from .standins import CONSUMER, PRODUCER, THIRD, ChainStandIn, MeterStandIn

__all__ = ["CONSUMER", "PRODUCER", "THIRD", "Stack", "stack", "until"]


class Stack:
    """Chain stand-in + real auction + one gateway per site, all on real sockets."""

    def __init__(self, grid: Grid, *, meters: bool = False, **gateway_kw: Any) -> None:
        self.grid, self.meters_on, self.gateway_kw = grid, meters, gateway_kw
        self.gateways: dict[str, GatewayService] = {}

    async def __aenter__(self) -> Stack:
        try:
            return await self._start()
        except BaseException:
            await self.__aexit__()
            raise

    async def _start(self) -> Stack:
        g = self.grid
        self.chain = self.auction = self.meters = None  # type: ignore[assignment]
        self.chain = ChainStandIn(keys=g.keys, hub_pub=g.hub_pub, hub_sub=g.hub_sub, root=g.root)
        await self.chain.start()
        self.auction = AuctionService(AuctionSettings(
            site="market", data_dir=g.root / "market", keys_dir=g.keys, hub_pub=g.hub_pub, hub_sub=g.hub_sub,
            heartbeat_s=0.2, chain_rpc=self.chain.endpoint, auction_bind="tcp://127.0.0.1:*",
            auction_balance_timeout_s=2.0))
        await self.auction.start()
        if self.meters_on:
            self.meters = MeterStandIn(keys=g.keys, hub_pub=g.hub_pub, hub_sub=g.hub_sub, root=g.root)
            await self.meters.start()
        for site in ("solar-1", "home-7"):
            await self.add_gateway(site, **self.gateway_kw)
        return self

    async def add_gateway(self, site: str, name: str | None = None, **kw: Any) -> GatewayService:
        g = self.grid
        base: dict[str, Any] = dict(site=site, data_dir=g.root / f"{name or site}-gw", keys_dir=g.keys,
                                    hub_pub=g.hub_pub, hub_sub=g.hub_sub, heartbeat_s=0.2,
                                    chain_rpc=self.chain.endpoint, auction_rpc=self.auction.rpc.endpoint,
                                    http_port=0, gateway_rpc_timeout_s=3.0)
        base.update(kw)
        gw = GatewayService(GatewaySettings(**base))
        await gw.start()
        self.gateways[name or site] = gw
        return gw

    def url(self, site: str) -> str:
        return self.gateways[site].url

    async def __aexit__(self, *exc: object) -> None:
        for gw in self.gateways.values():
            await gw.stop()
        if self.meters:
            await self.meters.stop()
        if self.auction:
            await self.auction.stop()
        if self.chain:
            await self.chain.stop()


@pytest.fixture
async def stack(grid: Grid) -> AsyncIterator[Stack]:  # noqa: F811
    async with Stack(grid) as s:
        yield s


async def until(cond: Any, timeout: float = 30.0, what: str = "condition") -> None:
    """Wait for ``cond()`` (a deadline only so a broken run fails instead of hanging)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        r = cond()
        if asyncio.iscoroutine(r):
            r = await r
        if r:
            return
        if loop.time() > end:
            raise AssertionError(f"{what} not met within {timeout} s")
        await asyncio.sleep(0.05)


async def login(http: aiohttp.ClientSession, base: str, who: Any) -> dict[str, Any]:
    async with http.post(f"{base}/api/session", json={"address": who.address, "passphrase": who.passphrase}) as r:
        assert r.status == 200, await r.text()
        return await r.json()
