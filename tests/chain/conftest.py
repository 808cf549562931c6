"""Chain service fixtures: a real hub with CURVE keys, the chain service in-process in both
its roles (the market's operator and one wallet per site, on one embedded chain shared in
this process or on an anvil node), request clients per site and a bus listener."""

from __future__ import annotations

import asyncio
import pathlib
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import zmq.asyncio

from services.bus import Security
from services.bus.store import Store
from services.bus.transport import RpcClient, Subscriber
from services.bus import commands as C
from services.bus import events as E
from services.chain.config import ChainSettings
from services.chain.keystore import Keystore
from services.chain.operator import OperatorService
from services.chain.service import ChainBase
from services.chain.wallet import WalletService
from tests.support.bus import Grid, Sources

PASS = "correct horse battery staple"
TX = (E.TxUpdate, E.WalletTx)  # a transaction's progress: the operator's or a wallet's


Bus = Grid  # the shared hub of the root conftest; these tests call it `bus`


@pytest.fixture
def bus(grid: Grid) -> Grid:
    return grid


def chain_settings(bus: Bus, data_dir: pathlib.Path, url: str, **kw: Any) -> ChainSettings:
    opts: dict[str, Any] = dict(site="market", data_dir=data_dir, keys_dir=bus.keys, hub_pub=bus.hub_pub,
                                hub_sub=bus.hub_sub, heartbeat_s=0.2, chain_url=url, chain_bind="tcp://127.0.0.1:*",
                                scrypt_n=2**10, poll_s=0.05, settle_window_s=0.2, resend_after_s=0.5,
                                backoff_max_s=1.0)
    return ChainSettings(**(opts | kw))


async def start_chain(settings: ChainSettings, timeout: float = 60) -> ChainBase:
    svc: ChainBase = OperatorService(settings) if settings.role == "operator" else WalletService(settings)
    await svc.start()
    await asyncio.wait_for(svc.connected.wait(), timeout)
    return svc


def site_keystore(root: pathlib.Path, site: str) -> Keystore:
    """The keystore of ``site``'s wallet in a stack under ``root``."""
    return Keystore(root / site / "keystore", scrypt_n=2**10)


@dataclass
class Stack:
    """The market's operator and one wallet per site, in this process, on one chain."""

    root: pathlib.Path
    operator: OperatorService
    wallets: dict[str, WalletService]
    url: str

    def wallet(self, site: str) -> WalletService:
        return self.wallets[site]

    def pending(self) -> bool:
        assert self.operator.txm is not None
        return bool(self.operator.txm.pending()) or any(w.txm is not None and w.txm.pending()
                                                        for w in self.wallets.values())

    async def stop(self) -> None:
        for w in self.wallets.values():
            await w.stop()
        await self.operator.stop()


async def start_stack(bus: Bus, root: pathlib.Path, url: str, sites: tuple[str, ...] = ("tester",),
                      timeout: float = 60, **kw: Any) -> Stack:
    """``url``: 'embedded' is one embedded chain shared by the operator and the wallets."""
    if url == "embedded":
        url = f"embedded:{uuid.uuid4().hex}"
    op = await start_chain(chain_settings(bus, root / "market", url, **kw), timeout)
    assert isinstance(op, OperatorService)
    wallets: dict[str, WalletService] = {}
    try:
        for site in sites:
            ws = chain_settings(bus, root / site, url, site=site, chain_role="site",
                                chain_rpc=op.servers[0].endpoint, **kw)
            w = await start_chain(ws, timeout)
            assert isinstance(w, WalletService)
            wallets[site] = w
    except BaseException:
        for w in wallets.values():
            await w.stop()
        await op.stop()
        raise
    return Stack(root, op, wallets, url)


async def claimed(stack: Stack, *addresses: str, timeout: float = 30) -> None:
    """Until the operator knows whose each address is (from the wallets' announcements)."""
    await wait_until(lambda: all(stack.operator.claims.site_of(a) for a in addresses), timeout)


async def rounds(svc: Any, n: int = 2, timeout: float = 30) -> None:
    """Wait until the service's job worker has gone round ``n`` more times."""
    start = svc.job_rounds

    async def loop() -> None:
        while svc.job_rounds < start + n:
            await asyncio.sleep(0.02)
    await asyncio.wait_for(loop(), timeout)


@dataclass
class Listener:
    """Everything published on the bus with the given prefixes, as typed bodies."""

    events: list[Any] = field(default_factory=list)
    envelopes: list[Any] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def of(self, cls: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, cls)]

    async def wait_for(self, pred: Callable[[], Any], timeout: float = 60) -> Any:
        async def loop() -> Any:
            while not (r := pred()):
                self.changed.clear()
                await self.changed.wait()
            return r
        return await asyncio.wait_for(loop(), timeout)


WALLET_REQUESTS = (C.ListAccounts, C.Unlock, C.Lock, C.Transfer, C.Escrow, C.Approve)


@dataclass
class Peer:
    """A test participant on the bus: publishers (each event as its proper source: the
    meters of the site it names, the market's auction), a listener and clients, each with
    the key of the site it sends as.

    ``request(req, site=...)`` sends as ``site`` (default 'tester') to ``to``: a wallet's
    site or 'operator'; by default a wallet's request goes to the wallet of the site it is
    sent as, mining control and the market's own requests to the operator."""

    ctx: zmq.asyncio.Context
    pub: Sources
    sub: Subscriber
    listener: Listener
    stack: Stack | None
    store: Store
    keys: pathlib.Path | None = None
    clients: dict[tuple[str, str], RpcClient] = field(default_factory=dict)
    security: Any = None

    async def publish(self, body: Any) -> Any:
        return await self.pub.publish(body)

    endpoints: dict[str, tuple[str, str]] = field(default_factory=dict)
    """Where each part answers when it runs as a subprocess: 'operator' or a wallet's site
    -> (endpoint, server site)."""

    def endpoint_of(self, to: str) -> tuple[str, str]:
        if to in self.endpoints:
            return self.endpoints[to]
        assert self.stack is not None
        svc: ChainBase = self.stack.operator if to == "operator" else self.stack.wallet(to)
        return svc.servers[0].endpoint, svc.settings.site

    def client_of(self, as_site: str, to: str) -> RpcClient:
        if (as_site, to) not in self.clients:
            assert self.keys is not None
            endpoint, server_site = self.endpoint_of(to)
            self.clients[(as_site, to)] = RpcClient(self.ctx, Security(self.keys, as_site), endpoint,
                                                    server_site=server_site)
        return self.clients[(as_site, to)]

    def route(self, req: Any, site: str) -> str:
        wallets = set(self.stack.wallets if self.stack is not None else ()) | (set(self.endpoints) - {"operator"})
        if isinstance(req, WALLET_REQUESTS) or site not in ("market",):
            return site if site in wallets else "operator"
        return "operator"

    async def request(self, req: Any, *, site: str | None = None, to: str | None = None, **kw: Any) -> Any:
        as_site = site or "tester"
        return await self.client_of(as_site, to or self.route(req, as_site)).request(req, timeout=30, **kw)

    async def close_clients(self) -> None:
        for c in self.clients.values():
            await c.close()
        self.clients.clear()


@pytest.fixture
async def peer_factory(bus: Bus, tmp_path: pathlib.Path) -> AsyncIterator[Callable[..., Any]]:
    made: list[Peer] = []

    async def make(stack: Stack | None = None, site: str = "tester") -> Peer:
        ctx = zmq.asyncio.Context()
        sec = Security(bus.keys, site)
        sec.start(ctx)
        store = Store(tmp_path / f"peer-{site}-{len(made)}.sqlite")
        listener = Listener()

        def handler(env: Any, conn: Any) -> None:
            listener.events.append(env.body)
            listener.envelopes.append(env)
            listener.changed.set()

        pub = Sources(bus, tmp_path / f"peer-{len(made)}")
        sub = Subscriber(ctx, sec, store, hub_sub=bus.hub_sub, prefixes=["chain.", "wallet."], handler=handler)
        await sub.start()
        p = Peer(ctx, pub, sub, listener, stack, store, keys=bus.keys, security=sec)
        made.append(p)
        await asyncio.wait_for(sub.connected.wait(), 60)
        return p

    yield make
    for p in made:
        await p.close_clients()
        await p.sub.stop()
        await p.pub.stop()
        p.store.close()
        p.security.stop()
        p.ctx.destroy(linger=0)


async def wait_until(pred: Callable[[], Any], timeout: float = 60, every: float = 0.05) -> Any:
    async def loop() -> Any:
        while not (r := pred()):
            await asyncio.sleep(every)
        return r
    return await asyncio.wait_for(loop(), timeout)
