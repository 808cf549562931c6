"""The gateway against the REAL services: one grid per test package (anvil, hub, the
market's operator, auction, each site's wallet and simulated meter: real subprocesses from
``launcher.plan()``, see realstack.py), and per test fresh in-process gateways joined to
it, each talking to its own site's wallet (their sessions, login throttle and metrics
start empty; the leak guard sees them stopped)."""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from services.gateway.config import GatewaySettings
from services.gateway.service import GatewayService

from .realstack import CONSUMER_SITE, Person, RealStack, attach_logs

__all__ = ["Person", "Stack", "http", "login", "stack"]

ETHER = 10**18
ESCROW = ETHER  # deposited once by the consumer and the third account
MIN_TOKENS_WH = 3_000  # minted from the producer's sunny morning before the first test
CLEAR_INTERVAL_S = 5.0  # the double auction's call interval on this grid
SERVICES = ("hub", "anvil", "chain", "auction", "wallet-solar-1", "meter-solar-1", "wallet-home-7", "meter-home-7")


@pytest.fixture(scope="package")
def real_grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealStack]:
    # the tests here fail logins on purpose to exercise each gateway's own throttle; the
    # wallet's throttle behind it (tests/chain/test_sites.py) gets room so later tests can log in
    grid = RealStack(tmp_path_factory.mktemp("gateway-grid"), chain_url="anvil", time_scale=1440,
                     meter_env={"meter-home-7": CONSUMER_SITE},
                     env={"GRIDTRADE_HEARTBEAT_S": "0.5", "GRIDTRADE_UNLOCK_MAX_FAILURES": "50",
                          # both markets: the english auction's tests and the double auction's (a call every 5 s)
                          "GRIDTRADE_AUCTION_MARKET": "both",
                          "GRIDTRADE_AUCTION_CLEAR_INTERVAL_S": str(CLEAR_INTERVAL_S)},
                     only=SERVICES, extra_accounts=[("third", "home-7 third")], scrypt_n=2**10)
    grid.start()
    grid.prepared = False  # type: ignore[attr-defined]
    try:
        yield grid
    finally:
        grid.stop()


def http() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True),  # cookies from 127.0.0.1
                                 timeout=aiohttp.ClientTimeout(total=30))


async def login(h: aiohttp.ClientSession, base: str, who: Person) -> dict[str, Any]:
    async with h.post(f"{base}/api/session", json={"address": who.address, "passphrase": who.passphrase}) as r:
        assert r.status == 200, await r.text()
        return dict(await r.json())


class Stack:
    """The real grid plus in-process gateways (real aiohttp servers on loopback)."""

    def __init__(self, grid: RealStack, root: pathlib.Path) -> None:
        self.grid, self.root = grid, root
        self.gateways: dict[str, GatewayService] = {}
        self.producer, self.consumer = grid.people["producer"], grid.people["consumer"]
        self.third = grid.people["third"]

    async def add_gateway(self, site: str, name: str | None = None, **kw: Any) -> GatewayService:
        env = self.grid.bus_env()
        base: dict[str, Any] = {
            "site": site, "data_dir": self.root / f"{name or site}-gw", "keys_dir": env["GRIDTRADE_KEYS_DIR"],
            "hub_pub": env["GRIDTRADE_HUB_PUB"], "hub_sub": env["GRIDTRADE_HUB_SUB"], "heartbeat_s": 0.5,
            "chain_rpc": env["GRIDTRADE_CHAIN_RPC"], "auction_rpc": env["GRIDTRADE_AUCTION_RPC"],
            "wallet_rpc": self.grid.wallet_rpc(site),
            "http_port": 0, "gateway_rpc_timeout_s": 5.0,
            "auction_market": "both", "auction_clear_interval_s": CLEAR_INTERVAL_S}
        base.update(kw)
        gw = GatewayService(GatewaySettings(**base))
        try:
            await gw.start()
        except BaseException:
            await gw.stop()
            raise
        self.gateways[name or site] = gw
        return gw

    def url(self, site: str) -> str:
        return self.gateways[site].url

    async def until(self, what: str, check: Any, timeout: float = 60) -> Any:
        return await self.grid.until(what, check, timeout=timeout)

    async def wallet(self, h: aiohttp.ClientSession, site: str) -> dict[str, Any]:
        async with h.get(self.url(site) + "/api/wallet") as r:
            assert r.status == 200, await r.text()
            return dict(await r.json())

    async def settled_wallet(self, h: aiohttp.ClientSession, site: str) -> dict[str, Any]:
        """The wallet once none of the account's transactions is pending."""
        async def quiet() -> dict[str, Any] | None:
            w = await self.wallet(h, site)
            return w if not w["pending"] else None
        return dict(await self.until(f"the transactions at {site} to be mined", quiet))

    async def prepare(self) -> None:
        """Once per grid: the consumer and the third account fund escrow; the producer has tokens."""
        async with http() as c, http() as t, http() as p:
            await login(c, self.url("home-7"), self.consumer)
            await login(t, self.url("home-7"), self.third)
            await login(p, self.url("solar-1"), self.producer)
            for h in (c, t):
                await self.settled_wallet(h, "home-7")  # the dev chain's funding of a new account
                async with h.post(self.url("home-7") + "/api/escrow/deposit", json={"amount_wei": str(ESCROW)}) as r:
                    assert r.status == 202, await r.text()
            for h in (c, t):
                w = await self.settled_wallet(h, "home-7")
                assert int(w["escrow_free_wei"]) >= ESCROW, w

            async def tokens() -> bool:
                return int((await self.wallet(p, "solar-1"))["tokens_wh"]) >= MIN_TOKENS_WH
            await self.until(f"the producer's meter to mint {MIN_TOKENS_WH} Wh of tokens", tokens, timeout=120)
            for h, site in ((c, "home-7"), (t, "home-7"), (p, "solar-1")):
                async with h.delete(self.url(site) + "/api/session") as r:
                    assert r.status == 200

    async def aclose(self) -> None:
        for gw in self.gateways.values():
            await gw.stop()


@pytest.fixture
async def stack(real_grid: RealStack, tmp_path: pathlib.Path) -> AsyncIterator[Stack]:
    s = Stack(real_grid, tmp_path)
    try:
        for site in ("solar-1", "home-7"):
            await s.add_gateway(site)
        if not real_grid.prepared:  # type: ignore[attr-defined]
            await s.prepare()
            real_grid.prepared = True  # type: ignore[attr-defined]
        yield s
    finally:
        await s.aclose()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    attach_logs(item, call, outcome.get_result())  # type: ignore[attr-defined]
