"""Sell and Buy through the gateway's HTTP API with contracts v2's signed offers and bids,
on real sockets: a real hub with CURVE keys, the real auction, in-process gateways of two
sites, and STAND-INs for the chain: each site's wallet (it signs with the test accounts'
keys and keeps the escrow books a Reserve changes, by the wallet's own reserve plan) and
the market's chain service answering the auction's balance reads from the same books.

The real wallet's signing and reserving are tested in tests/chain/test_wallet_v2.py, the
whole real grid in test_api.py."""

from __future__ import annotations

import asyncio
import pathlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import zmq.asyncio

from services.auction.config import AuctionSettings
from services.auction.service import AuctionService
from services.bus import Caller, RpcServer, Store
from services.bus import commands as cmd
from services.bus import typed
from services.bus.errors import RequestError
from services.chain.wallet import reserve_plan
from services.gateway.config import GatewaySettings
from services.gateway.service import GatewayService
from tests.conftest import Grid, Sources
from tests.signing import DOMAIN, TestAccount, account, deployment

from .conftest import http

PW = "the passphrase"
SELLER, BUYER, OTHER = account("gw-seller"), account("gw-buyer"), account("gw-other")
SITE_OF = {SELLER.address: "solar-1", BUYER.address: "home-7", OTHER.address: "home-7"}
TX = "0x" + "ab" * 32


@dataclass
class Books:
    """The chain as the stand-ins tell it: escrow and tokens per account."""

    free: dict[str, int] = field(default_factory=dict)
    reserved: dict[str, tuple[int, int]] = field(default_factory=dict)  # account -> (wei, until)
    tokens: dict[str, int] = field(default_factory=dict)
    asked: list[cmd.Request] = field(default_factory=list)  # what the wallets were asked, in order

    def balances(self, address: str) -> cmd.Balances:
        a = next((x for x in SITE_OF if x.lower() == address.lower()), address)
        wei, until = self.reserved.get(a, (0, 0))
        return cmd.Balances(address=a, ether_wei=10**18, escrow_free_wei=self.free.get(a, 0), escrow_reserved_wei=wei,
                            reserved_until=until, tokens_wh=self.tokens.get(a, 0), site=SITE_OF.get(a, ""))

    def of(self, cls: type) -> list[Any]:
        return [r for r in self.asked if isinstance(r, cls)]


class StandInWallet:
    """STAND-IN for a site's wallet: its accounts' unlock, balances, approval, signatures and
    reservations (the books change at once: 'in a block')."""

    def __init__(self, site: str, books: Books) -> None:
        self.site, self.books = site, books
        self.accounts: dict[str, TestAccount] = {a.address: a for a in (SELLER, BUYER, OTHER)
                                                  if SITE_OF[a.address] == site}

    def handle(self, srv: RpcServer) -> None:
        for req, fn in ((cmd.ListAccounts, self.list_accounts), (cmd.Unlock, self.unlock), (cmd.Lock, self.ok),
                        (cmd.GetBalances, self.get_balances), (cmd.ListPending, self.pending),
                        (cmd.Approve, self.approve), (cmd.SignOffer, self.sign_offer), (cmd.SignBid, self.sign_bid),
                        (cmd.Reserve, self.reserve)):
            srv.handle(req, fn)

    def key(self, address: str) -> TestAccount:
        acct = self.accounts.get(address)
        if acct is None:
            raise RequestError("unknown_account", f"no account {address} at the wallet of site {self.site}")
        return acct

    async def list_accounts(self, req: cmd.ListAccounts, caller: Caller) -> cmd.Accounts:
        return cmd.Accounts(accounts=[cmd.AccountInfo(address=a, site=self.site, unlocked=True) for a in self.accounts])

    async def unlock(self, req: cmd.Unlock, caller: Caller) -> cmd.Unlocked:
        self.key(req.address)
        if req.passphrase.get_secret_value() != PW:
            raise RequestError("bad_passphrase", "wrong passphrase")
        return cmd.Unlocked(address=req.address, expires_at=time.time() + req.ttl_s)

    async def ok(self, req: cmd.Request, caller: Caller) -> cmd.Ok:
        return cmd.Ok()

    async def get_balances(self, req: cmd.GetBalances, caller: Caller) -> cmd.Balances:
        return self.books.balances(req.address)

    async def pending(self, req: cmd.ListPending, caller: Caller) -> cmd.Pending:
        return cmd.Pending(txs=[])

    async def approve(self, req: cmd.Approve, caller: Caller) -> cmd.TxSent:
        self.books.asked.append(req)
        return cmd.TxSent(tx_hash=TX)

    async def sign_offer(self, req: cmd.SignOffer, caller: Caller) -> cmd.SignedOffer:
        self.books.asked.append(req)
        o, sig = self.key(req.account).offer(wh=req.wh, price=req.min_price_wei_per_kwh, expiry=req.expiry,
                                             duration_s=req.duration_s)
        return cmd.SignedOffer(offer=o, signature=sig)

    async def sign_bid(self, req: cmd.SignBid, caller: Caller) -> cmd.SignedBid:
        self.books.asked.append(req)
        b, sig = self.key(req.account).bid(offer_id=req.offer_id, wh=req.wh, price=req.max_price_wei_per_kwh,
                                           expiry=req.expiry)
        return cmd.SignedBid(bid=b, signature=sig)

    async def reserve(self, req: cmd.Reserve, caller: Caller) -> cmd.TxSent:
        self.books.asked.append(req)
        a = self.key(req.account).address
        wei, until = self.books.reserved.get(a, (0, 0))
        amount = reserve_plan(total_wei=req.total_wei, until=req.until, reserved_wei=wei, reserved_until=until,
                              free_wei=self.books.free.get(a, 0))
        if amount is None:
            return cmd.TxSent(tx_hash="")
        self.books.free[a] = self.books.free.get(a, 0) - amount
        self.books.reserved[a] = (wei + amount, max(until, req.until))
        return cmd.TxSent(tx_hash=TX)


@dataclass
class Market:
    books: Books
    auction: AuctionService
    gateways: dict[str, GatewayService]

    def url(self, site: str) -> str:
        return self.gateways[site].url


@pytest.fixture
async def market(grid: Grid, tmp_path: pathlib.Path) -> AsyncIterator[Market]:
    books = Books(free={BUYER.address: 10_000, OTHER.address: 100}, tokens={SELLER.address: 100_000})
    contexts, securities, servers, stores = [], [], [], []
    started: list[Any] = []
    sources = Sources(grid, tmp_path / "sources")

    async def serve(site: str, name: str) -> RpcServer:
        ctx = zmq.asyncio.Context()  # one ZAP authenticator per context: one context per site key
        contexts.append(ctx)
        sec = grid.security(site)
        sec.start(ctx)
        store = Store(tmp_path / f"{name}.sqlite")
        srv = RpcServer(ctx, sec, store, bind="tcp://127.0.0.1:*", name=name)
        securities.append(sec)
        stores.append(store)
        servers.append(srv)
        return srv

    try:
        operator = await serve("market", "stand-in-operator")
        operator.handle(cmd.GetBalances, StandInWallet("market", books).get_balances)
        wallets = {}
        for site in ("solar-1", "home-7"):
            wallets[site] = await serve(site, f"stand-in-wallet-{site}")
            StandInWallet(site, books).handle(wallets[site])
        for srv in servers:
            await srv.start()
        await sources.publish(deployment())
        auction = AuctionService(AuctionSettings(
            site="market", data_dir=tmp_path / "market", keys_dir=grid.keys, hub_pub=grid.hub_pub,
            hub_sub=grid.hub_sub, heartbeat_s=0.2, chain_rpc=operator.endpoint, auction_bind="tcp://127.0.0.1:*"))
        await auction.start()
        started.append(auction)
        for _ in range(600):
            if auction.deployment is not None:
                break
            await asyncio.sleep(0.05)
        assert auction.deployment is not None, "the auction did not hear the deployment"
        gateways = {}
        for site in ("solar-1", "home-7"):
            gw = GatewayService(GatewaySettings(
                site=site, data_dir=tmp_path / f"{site}-gw", keys_dir=grid.keys, hub_pub=grid.hub_pub,
                hub_sub=grid.hub_sub, heartbeat_s=0.5, auction_rpc=auction.rpc.endpoint,
                wallet_rpc=wallets[site].endpoint, http_port=0, gateway_rpc_timeout_s=5.0))
            await gw.start()
            started.append(gw)
            gateways[site] = gw
        yield Market(books, auction, gateways)
    finally:
        for svc in reversed(started):
            await svc.stop()
        for srv in servers:
            await srv.stop()
        await sources.stop()
        for sec in securities:
            sec.stop()
        for store in stores:
            store.close()
        for ctx in contexts:
            ctx.destroy(linger=0)


async def login(h: aiohttp.ClientSession, base: str, who: TestAccount) -> None:
    async with h.post(f"{base}/api/session", json={"address": who.address, "passphrase": PW}) as r:
        assert r.status == 200, await r.text()


async def post(h: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async with h.post(url, json=body) as r:
        return r.status, dict(await r.json())


async def test_sell_signs_the_offer_and_buy_reserves_then_signs_the_bid(market: Market) -> None:
    books = market.books
    async with http() as seller, http() as buyer:
        await login(seller, market.url("solar-1"), SELLER)
        await login(buyer, market.url("home-7"), BUYER)
        t0 = time.time()
        status, a = await post(seller, market.url("solar-1") + "/api/offers",
                               {"wh": 1500, "start_price_wei_per_kwh": "1000", "duration_s": 3})
        assert status == 201, a
        status, b = await post(seller, market.url("solar-1") + "/api/offers",
                               {"wh": 1000, "start_price_wei_per_kwh": "500", "duration_s": 30})
        assert status == 201, b
        # each offer: tokens approved, then the offer signed by the wallet (valid past the auction's end plus
        # the grace of 600 s, for a trade of 3600 s), then placed with its signature
        assert [type(r).__name__ for r in books.asked] == ["Approve", "SignOffer", "Approve", "SignOffer"]
        signed = books.of(cmd.SignOffer)[0]
        assert (signed.account, signed.wh, signed.min_price_wei_per_kwh, signed.duration_s) == \
            (SELLER.address, 1500, 1000, 3600)
        assert t0 + 3 + 600 - 1 <= signed.expiry <= time.time() + 3 + 600
        async with buyer.get(market.url("home-7") + "/api/offers") as r:
            offers = {o["offer_id"]: o for o in (await r.json())["offers"]}
        assert offers[a["offer_id"]]["signed_offer_id"] and offers[b["offer_id"]]["signed_offer_id"]

        # a bid: the escrow it needs reserved until it expires, then the signed bid, then placed
        status, got = await post(buyer, market.url("home-7") + f"/api/offers/{a['offer_id']}/bids",
                                 {"price_wei_per_kwh": "2000"})
        assert status == 201, got
        [reserve] = books.of(cmd.Reserve)
        [sb] = books.of(cmd.SignBid)
        expiry = int(a["ends_at"] + 600)
        assert (reserve.account, reserve.total_wei, reserve.until) == (BUYER.address, 3000, expiry)
        assert (sb.offer_id, sb.wh, sb.max_price_wei_per_kwh, sb.expiry) == \
            (offers[a["offer_id"]]["signed_offer_id"], 1500, 2000, expiry)
        assert books.reserved[BUYER.address] == (3000, expiry) and books.free[BUYER.address] == 7000
        # a second bid: it and the winning bid on the first offer, in all
        status, got = await post(buyer, market.url("home-7") + f"/api/offers/{b['offer_id']}/bids",
                                 {"price_wei_per_kwh": "600"})
        assert status == 201, got
        assert books.of(cmd.Reserve)[-1].total_wei == 600 + 3000
        assert books.reserved[BUYER.address] == (3600, int(b["ends_at"] + 600))
        # raising one's own bid replaces what it held
        status, got = await post(buyer, market.url("home-7") + f"/api/offers/{a['offer_id']}/bids",
                                 {"price_wei_per_kwh": "2500"})
        assert status == 201, got
        assert books.of(cmd.Reserve)[-1].total_wei == 3750 + 600
        async with buyer.get(market.url("home-7") + "/api/wallet") as r:
            w = await r.json()
        assert (w["escrow_reserved_wei"], w["reserved_until"], w["escrow_free_wei"]) == \
            ("4350", int(b["ends_at"] + 600), "5650")

        # the auction ends: the trade is agreed from the signed offer and the signed bid
        async def agreed() -> dict[str, Any] | None:
            async with buyer.get(market.url("home-7") + "/api/trades") as r:
                ts = [t for t in (await r.json())["trades"] if t["offer_id"] == a["offer_id"]]
            return ts[0] if ts else None

        for _ in range(200):
            if (trade := await agreed()) is not None:
                break
            await asyncio.sleep(0.05)
        assert trade is not None and (trade["buyer"], trade["price_wei_per_kwh"], trade["state"], trade["reason"]) == \
            (BUYER.address, "2500", "agreed", "")


async def test_bids_the_listing_or_the_escrow_rules_out_are_refused_with_words(market: Market) -> None:
    books = market.books
    async with http() as seller, http() as buyer, http() as poor:
        await login(seller, market.url("solar-1"), SELLER)
        await login(buyer, market.url("home-7"), BUYER)
        await login(poor, market.url("home-7"), OTHER)
        status, a = await post(seller, market.url("solar-1") + "/api/offers",
                               {"wh": 1500, "start_price_wei_per_kwh": "1000", "duration_s": 30})
        assert status == 201
        base = market.url("home-7")
        asked = len(books.asked)
        cases = [
            (seller, market.url("solar-1"), a["offer_id"], "2000", 409, "own_offer"),
            (buyer, base, a["offer_id"], "999", 409, "too_low"),
            (buyer, base, "o-404", "2000", 404, "not_found"),
        ]
        for h, url, oid, price, code_status, code in cases:
            status, err = await post(h, f"{url}/api/offers/{oid}/bids", {"price_wei_per_kwh": price})
            assert (status, err["error"]["code"]) == (code_status, code), err
        assert len(books.asked) == asked  # nothing reserved, nothing signed
        # 100 wei of free escrow cannot cover 1500 Wh at 1000 wei/kWh: the wallet says what is missing
        status, err = await post(poor, f"{base}/api/offers/{a['offer_id']}/bids", {"price_wei_per_kwh": "1000"})
        assert status == 409 and err["error"]["code"] == "insufficient_escrow"
        assert "deposit at least 1400 wei more" in err["error"]["message"]
        assert books.of(cmd.SignBid) == []  # refused before anything was signed
        async with buyer.get(f"{base}/api/offers") as r:
            assert [o["bids"] for o in (await r.json())["offers"]] == [0]
        # a cancelled offer is closed
        async with seller.post(market.url("solar-1") + f"/api/offers/{a['offer_id']}/cancel", json={}) as r:
            assert r.status == 200
        status, err = await post(buyer, f"{base}/api/offers/{a['offer_id']}/bids", {"price_wei_per_kwh": "2000"})
        assert (status, err["error"]["code"]) == (409, "closed")


def test_the_stand_in_signs_in_the_tests_domain() -> None:
    o, sig = SELLER.offer(wh=1, price=1)
    assert typed.recover_offer(DOMAIN, o, sig) == SELLER.address
