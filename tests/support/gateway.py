"""The gateway in a test's process, joined to a real grid (:class:`Stack`: in-process
gateways, real aiohttp servers on loopback, each talking to its own site's wallet), and a
person's HTTP session with it (:func:`http`, :func:`login`)."""

from __future__ import annotations

import pathlib
from decimal import Decimal
from typing import Any

import aiohttp

from services.gateway.config import GatewaySettings
from services.gateway.service import GatewayService

from .plan import Person, RealStack

ETHER = 10**18
ESCROW = ETHER  # deposited once by the consumer and the third account
MIN_TOKENS_WH = 3_000  # minted from the producer's sunny morning before the first test
CLEAR_INTERVAL_S = 5.0  # the double auction's call interval on this grid
SERVICES = ("hub", "anvil", "chain", "auction", "wallet-solar-1", "meter-solar-1", "wallet-home-7", "meter-home-7")


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

    async def sell_and_bid(self, seller: aiohttp.ClientSession, buyer: aiohttp.ClientSession, bid_wei_per_kwh: int,
                           duration_s: int = 3) -> str:
        """The producer (``seller``, at solar-1) offers 1 kWh from 5000 wei/kWh for ``duration_s``
        seconds and the consumer (``buyer``, at home-7) bids ``bid_wei_per_kwh`` on it; both
        accepted (201). Returns the offer's id."""
        async with seller.post(self.url("solar-1") + "/api/offers",
                               json={"wh": 1000, "start_price_wei_per_kwh": "5000", "duration_s": duration_s}) as r:
            assert r.status == 201, await r.text()
            oid: str = (await r.json())["offer_id"]
        async with buyer.post(self.url("home-7") + f"/api/offers/{oid}/bids",
                              json={"price_wei_per_kwh": str(bid_wei_per_kwh)}) as r:
            assert r.status == 201, await r.text()
        return oid

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


async def error_of(r: aiohttp.ClientResponse) -> dict[str, Any]:
    """The error of a refused request, checked to have the gateway's one shape: a code, a
    message (never a traceback) and perhaps a fix."""
    assert r.content_type == "application/json", await r.text()
    body = await r.json()
    assert set(body) == {"error"} and set(body["error"]) - {"fix"} == {"code", "message"}, body
    assert body["error"]["message"] and "Traceback" not in body["error"]["message"]
    return body["error"]


def balance_closes(d: dict[str, Any]) -> bool:
    """A figures row of the API closes its energy balance, to the mWh."""
    def mwh(key: str) -> int:
        return int(Decimal(str(d[key])) * 1000)
    return (mwh("produced_wh") + mwh("bought_local_wh") + mwh("bought_utility_wh") + mwh("unmatched_import_wh")
            == mwh("consumed_wh") + mwh("sold_local_wh") + mwh("sold_utility_wh") + mwh("unmatched_export_wh"))
