"""A real hub with CURVE keys, a stand-in chain service answering GetBalances on a real
socket, and the auction service itself (in-process or as a subprocess)."""

from __future__ import annotations

import asyncio
import pathlib
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import zmq.asyncio

from services.auction.config import AuctionSettings
from services.auction.service import AuctionService
from services.bus import Caller, RpcClient, RpcServer, Store
from services.bus import commands as cmd
from services.bus.errors import RequestError
from tests.conftest import Grid, Sources  # noqa: F401 - the shared hub fixture `grid` builds it

SELLER = "0x" + "5e" * 20
BUYERS = ["0x" + c * 40 for c in "bcd"]
OPERATOR = "0x" + "f" * 40
# each account belongs to one site (the chain service says whose, with its balances)
SITES = {SELLER.lower(): "solar-1", OPERATOR.lower(): "market", **{b.lower(): "home-7" for b in BUYERS}}


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

    def set(self, address: str, *, escrow_free_wei: int = 0, tokens_wh: int = 0, site: str | None = None) -> None:
        """``site``: default the one in SITES, else solar-1 for an account with tokens, home-7 without."""
        site = site if site is not None else site_of(address) or ("solar-1" if tokens_wh else "home-7")
        self.balances[address.lower()] = cmd.Balances(address=address, ether_wei=10**18,
                                                      escrow_free_wei=escrow_free_wei, tokens_wh=tokens_wh, site=site)

    async def get_balances(self, req: cmd.GetBalances, caller: Caller) -> cmd.Balances:
        self.asked += 1
        if self.gate is not None:
            await self.gate.wait()
        bal = self.balances.get(req.address.lower())
        if bal is None:  # as the chain service: public balances, and no site for an account it does not hold
            return cmd.Balances(address=req.address, ether_wei=0)
        return bal


@pytest.fixture
async def fake_chain(grid: Grid, tmp_path: pathlib.Path) -> AsyncIterator[FakeChain]:
    ctx = zmq.asyncio.Context()
    sec = grid.security("market")
    sec.start(ctx)
    store = Store(tmp_path / "fake-chain.sqlite")
    chain = FakeChain()
    server = RpcServer(ctx, sec, store, bind="tcp://127.0.0.1:*", name="fake-chain")
    server.handle(cmd.GetBalances, chain.get_balances)
    await server.start()
    chain.endpoint = server.endpoint
    chain.set(SELLER, tokens_wh=100_000)
    for b in BUYERS:
        chain.set(b, escrow_free_wei=10**15)
    chain.server = server  # type: ignore[attr-defined]
    yield chain
    await server.stop()
    sec.stop()
    store.close()
    ctx.destroy(linger=0)


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

    async def __aenter__(self) -> Running:
        await self.service.start()
        self.endpoint = self.service.rpc.endpoint
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
        return await self.client(site or acting_site(req)).request(req, **kw)  # type: ignore[arg-type]

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.settings.data_dir / "auction.sqlite")


def outbox(db_path: pathlib.Path, type_: str) -> list[dict]:  # type: ignore[type-arg]
    """The bodies of the events of one type in the service's durable outbox, in order."""
    import json

    with sqlite3.connect(db_path) as c:
        rows = c.execute("SELECT data FROM bus_outbox WHERE topic LIKE ? ORDER BY seq", (type_ + ".%",)).fetchall()
    c.close()
    return [json.loads(r[0])["body"] for r in rows]


async def until(cond, timeout: float = 30.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise AssertionError(f"{what} not met within {timeout} s")
        await asyncio.sleep(0.05)


@pytest.fixture
async def chain_events(grid: Grid, tmp_path: pathlib.Path) -> AsyncIterator[Sources]:
    """Events as the chain service (``market/chain``) and the meters (``<site>/meter``)
    publish them, each with its own site's key, for the trade lifecycle tests."""
    sources = Sources(grid, tmp_path / "sources")
    yield sources
    await sources.stop()
