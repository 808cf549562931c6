"""The auction service in a test's process, and what it is asked: offers and bids signed by
test accounts (:mod:`tests.support.signing`) in the market domain of the deployment the
stand-in chain service (:class:`FakeChain`) announces, and clients per site
(:class:`Running`)."""

from __future__ import annotations

import asyncio
import json
import pathlib
import sqlite3
from dataclasses import dataclass, field

import zmq.asyncio

from services.auction.config import AuctionSettings
from services.auction.service import AuctionService
from services.bus import Caller, RpcClient
from services.bus import commands as cmd
from services.bus import typed

from .bus import Grid
from .poll import until
from .signing import TestAccount, account, later

SELLER_ACCOUNT = account("seller")
BUYER_ACCOUNTS = [account(f"buyer-{c}") for c in "bcd"]
SELLER = SELLER_ACCOUNT.address
BUYERS = [a.address for a in BUYER_ACCOUNTS]
OPERATOR = "0x" + "f" * 40
# each account belongs to one site (the chain service says whose, with its balances)
SITES = {SELLER.lower(): "solar-1", OPERATOR.lower(): "market", **{b.lower(): "home-7" for b in BUYERS}}
FOREVER = 2**40
"""A reservation that outlasts every bid of a test."""


def key_of(address: str) -> TestAccount:
    """The test account of ``address`` (the seller, a buyer or one made by ``account``)."""
    for name in ("seller", "buyer-b", "buyer-c", "buyer-d", "probe", "stranger", "seller-1", "seller-2"):
        if account(name).address.lower() == address.lower():
            return account(name)
    raise KeyError(f"no test account {address}")


def offer(wh: int = 2000, price: int = 1000, duration: float = 30.0, *, seller: TestAccount = SELLER_ACCOUNT,
          site: str = "solar-1", expiry: int | None = None) -> cmd.PlaceOffer:
    """The seller's request with its signed offer (valid 10 minutes past the auction's end)."""
    o, sig = seller.offer(wh=wh, price=price, expiry=expiry if expiry is not None else later(duration + 600))
    return cmd.PlaceOffer(seller=seller.address, seller_site=site, wh=wh, start_price_wei_per_kwh=price,
                          duration_s=duration, offer=o, signature=sig)


def order(side: str, who: TestAccount, wh: int, price: int, site: str = "", expiry: int | None = None) -> cmd.PlaceOrder:
    """A double-auction order with its signed offer (sell) or its signed bid for any offer (buy)."""
    site = site or ("home-7" if side == "buy" else "solar-1")
    expiry = expiry if expiry is not None else later(7200)
    if side == "sell":
        o, sig = who.offer(wh=wh, price=price, expiry=expiry)
        return cmd.PlaceOrder(side="sell", account=who.address, site=site, wh=wh, limit_price_wei_per_kwh=price,
                              offer=o, signature=sig)
    b, sig = who.bid(offer_id=typed.ZERO_ID, wh=wh, price=price, expiry=expiry)
    return cmd.PlaceOrder(side="buy", account=who.address, site=site, wh=wh, limit_price_wei_per_kwh=price, bid=b,
                          signature=sig)


def site_of(address: str) -> str:
    return SITES.get(address.lower(), "")


def acting_site(req: cmd.Request) -> str:
    """The site that sends ``req`` in these tests: the one it acts for."""
    if isinstance(req, cmd.PlaceOffer):
        return req.seller_site
    if isinstance(req, cmd.PlaceBid):
        return req.buyer_site
    if isinstance(req, cmd.PlaceOrder):
        return req.site
    if isinstance(req, cmd.CancelOffer):
        return site_of(req.seller) or "solar-1"
    if isinstance(req, cmd.CloseTrade):
        return site_of(req.by) or "home-7"
    return "home-7"


@dataclass
class FakeChain:
    """STAND-IN for the chain service: a real RpcServer on a real socket that answers
    GetBalances (with the site each account belongs to) from a dict and nothing else."""

    balances: dict[str, cmd.Balances] = field(default_factory=dict)
    asked: int = 0
    endpoint: str = ""
    gate: asyncio.Event | None = None
    """While set to a closed gate, GetBalances waits: a slow chain."""

    def set(self, address: str, *, escrow_reserved_wei: int = 0, reserved_until: int = FOREVER, tokens_wh: int = 0,
            site: str | None = None, escrow_free_wei: int = 0) -> None:
        """``site``: default the one in SITES, else solar-1 for an account with tokens, home-7 without."""
        site = site if site is not None else site_of(address) or ("solar-1" if tokens_wh else "home-7")
        self.balances[address.lower()] = cmd.Balances(
            address=address, ether_wei=10**18, escrow_free_wei=escrow_free_wei, escrow_reserved_wei=escrow_reserved_wei,
            reserved_until=reserved_until if escrow_reserved_wei else 0, tokens_wh=tokens_wh, site=site)

    async def get_balances(self, req: cmd.GetBalances, caller: Caller) -> cmd.Balances:
        self.asked += 1
        if self.gate is not None:
            await self.gate.wait()
        bal = self.balances.get(req.address.lower())
        if bal is None:  # as the chain service: public balances, and no site for an account it does not hold
            return cmd.Balances(address=req.address, ether_wei=0)
        return bal


def settings(grid: Grid, chain_rpc: str, **kw: object) -> AuctionSettings:
    base: dict[str, object] = dict(site="market", data_dir=grid.root / "market", keys_dir=grid.keys,
                                   hub_pub=grid.hub_pub, hub_sub=grid.hub_sub, heartbeat_s=0.2,
                                   chain_rpc=chain_rpc, auction_bind="tcp://127.0.0.1:*",
                                   auction_balance_timeout_s=1.0, auction_operator=OPERATOR)
    base.update(kw)
    return AuctionSettings(**base)  # type: ignore[arg-type]


class Running:
    """An in-process auction service and clients of it, one per site (each with its site's
    keys): ``call(req)`` sends as the site the request acts for (``acting_site``), or as
    ``site=...``."""

    def __init__(self, grid: Grid, s: AuctionSettings) -> None:
        self.grid, self.settings = grid, s
        self.service = AuctionService(s)
        self.ctx = zmq.asyncio.Context()
        self.clients: dict[str, RpcClient] = {}
        self.signed: dict[str, typed.Offer] = {}  # auction offer id -> the signed offer placed with it

    async def __aenter__(self) -> Running:
        await self.service.start()
        self.endpoint = self.service.rpc.endpoint
        await until(lambda: self.service.deployment is not None, what="the auction to learn the deployment")
        return self

    def client(self, site: str) -> RpcClient:
        if site not in self.clients:
            self.clients[site] = RpcClient(self.ctx, self.grid.security(site), self.endpoint, server_site="market",
                                           timeout_s=10)
        return self.clients[site]

    async def __aexit__(self, *exc: object) -> None:
        for c in self.clients.values():
            await c.close()
        await self.service.stop()
        self.ctx.destroy(linger=0)

    async def call(self, req: cmd.Request, *, site: str | None = None, **kw: object) -> cmd.Reply:
        reply = await self.client(site or acting_site(req)).request(req, **kw)  # type: ignore[arg-type]
        if isinstance(req, cmd.PlaceOffer) and isinstance(reply, cmd.OfferPlaced):
            self.signed[reply.offer_id] = req.offer
        return reply

    def bid(self, offer_id: str, buyer: str, price: int, *, site: str = "home-7", expiry: int | None = None,
            wh: int | None = None) -> cmd.PlaceBid:
        """``buyer``'s request with its signed bid for the signed offer placed as ``offer_id``
        (an offer this test did not place: a made-up signed offer id)."""
        so = self.signed.get(offer_id)
        b, sig = key_of(buyer).bid(offer_id=so.offer_id if so else typed.new_id(), wh=wh or (so.wh if so else 1000),
                                   price=price, expiry=expiry if expiry is not None else later(3600), buyer=buyer)
        return cmd.PlaceBid(offer_id=offer_id, buyer=buyer, buyer_site=site, price_wei_per_kwh=price, bid=b,
                            signature=sig)

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.settings.data_dir / "auction.sqlite")

    async def agreed(self) -> str:
        """A 1 kWh offer of 0.3 s and the first buyer's bid on it, until the trade is agreed:
        the trade's id."""
        o = (await self.call(offer(wh=1000, duration=0.3))).offer_id
        await self.call(self.bid(o, BUYERS[0], 1000))
        await until(lambda: outbox(self.settings.data_dir / "auction.sqlite", "trade.agreed"), what="trade agreed")
        return f"t-{o}"


def envelopes(db_path: pathlib.Path, type_: str) -> list[dict]:  # type: ignore[type-arg]
    """The envelopes of the events of one type in the service's durable outbox, in order."""
    with sqlite3.connect(db_path) as c:
        rows = c.execute("SELECT data FROM bus_outbox WHERE topic LIKE ? ORDER BY seq", (type_ + ".%",)).fetchall()
    c.close()
    return [json.loads(r[0]) for r in rows]


def outbox(db_path: pathlib.Path, type_: str) -> list[dict]:  # type: ignore[type-arg]
    """The bodies of the events of one type in the service's durable outbox, in order."""
    return [e["body"] for e in envelopes(db_path, type_)]


def snapshot(m: Running) -> dict[str, list]:  # type: ignore[type-arg]
    """Every table of the service's store, the outbox without the heartbeats (they tick on
    their own, whatever the commands do): what must not change when a command is refused."""
    with m.db() as c:
        tables = [r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        out = {t: sorted(map(repr, c.execute(f"SELECT * FROM {t}"))) for t in tables}
        out["bus_outbox"] = sorted(map(repr, c.execute(
            "SELECT * FROM bus_outbox WHERE topic NOT LIKE 'trade.heartbeat.%'")))
    c.close()
    return out
