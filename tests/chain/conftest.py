"""Chain service fixtures: a real hub with CURVE keys, the chain service in-process (embedded
chain or the session's anvil node), a request client and a bus listener."""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import zmq.asyncio

from services.bus import Security
from services.bus.store import Store
from services.bus.transport import RpcClient, Subscriber
from services.chain.config import ChainSettings
from services.chain.service import ChainService
from tests.chain_fixtures import anvil_url, start_anvil, stop_anvil  # noqa: F401 - fixtures
from tests.conftest import Grid, Sources

PASS = "correct horse battery staple"


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


async def start_chain(settings: ChainSettings, timeout: float = 60) -> ChainService:
    svc = ChainService(settings)
    await svc.start()
    await asyncio.wait_for(svc.connected.wait(), timeout)
    return svc


async def rounds(svc: ChainService, n: int = 2, timeout: float = 30) -> None:
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


@dataclass
class Peer:
    """A test participant on the bus: publishers (each event as its proper source: the
    meters of the site it names, the market's auction), a listener and a client (as site
    'tester').

    ``request(req, site=...)`` sends as another site (with that site's key): an account
    is only acted for when its own site asks, mining is controlled by the market."""

    ctx: zmq.asyncio.Context
    pub: Sources
    sub: Subscriber
    listener: Listener
    client: RpcClient
    store: Store
    keys: pathlib.Path | None = None
    others: dict[str, RpcClient] = field(default_factory=dict)

    async def publish(self, body: Any) -> Any:
        return await self.pub.publish(body)

    def client_of(self, site: str) -> RpcClient:
        if site not in self.others:
            assert self.keys is not None
            self.others[site] = RpcClient(self.ctx, Security(self.keys, site), self.client.endpoint,
                                          server_site="market")
        return self.others[site]

    async def request(self, req: Any, *, site: str | None = None, **kw: Any) -> Any:
        client = self.client if site is None else self.client_of(site)
        return await client.request(req, timeout=30, **kw)

    async def close_clients(self) -> None:
        await self.client.close()
        for c in self.others.values():
            await c.close()
        self.others.clear()


@pytest.fixture
async def peer_factory(bus: Bus, tmp_path: pathlib.Path) -> AsyncIterator[Callable[..., Any]]:
    made: list[Peer] = []

    async def make(endpoint: str, site: str = "tester") -> Peer:
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
        sub = Subscriber(ctx, sec, store, hub_sub=bus.hub_sub, prefixes=["chain."], handler=handler)
        await sub.start()
        client = RpcClient(ctx, sec, endpoint, server_site="market")
        p = Peer(ctx, pub, sub, listener, client, store, keys=bus.keys)
        p.security = sec  # type: ignore[attr-defined]
        made.append(p)
        await asyncio.wait_for(sub.connected.wait(), 10)
        return p

    yield make
    for p in made:
        await p.close_clients()
        await p.sub.stop()
        await p.pub.stop()
        p.store.close()
        p.security.stop()  # type: ignore[attr-defined]
        p.ctx.destroy(linger=0)


async def wait_until(pred: Callable[[], Any], timeout: float = 60, every: float = 0.05) -> Any:
    async def loop() -> Any:
        while not (r := pred()):
            await asyncio.sleep(every)
        return r
    return await asyncio.wait_for(loop(), timeout)
