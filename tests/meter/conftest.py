"""Meter test fixtures: a real hub on loopback with CURVE keys, a bus recorder that also
speaks for the market (its auction and its chain service), and meter services run
in-process."""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
import zmq.asyncio

from services.bus import Publisher, Security, Store, Subscriber
from services.bus.envelope import Envelope
from services.bus.events import Deployment
from tests.support.bus import Grid

ACCOUNT = "0x" + "ab" * 20


def deployment(n: int = 1) -> Deployment:
    """The operator's contracts, as ``chain.deployment`` announces them (the ``n``-th deployment)."""
    return Deployment(chain_id=31337, genesis="0x" + "00" * 32, token="0x" + f"{0xa0 + n:02x}" * 20,
                      market="0x" + f"{0xb0 + n:02x}" * 20, registry="0x" + f"{0xc0 + n:02x}" * 20, deploy_block=n,
                      deployment=f"d{n}")


@dataclass
class Bus:
    """A probe on the bus: records every event it hears, publishes as the market's auction
    (``pub``) and its chain service (``chain``)."""

    events: list[Envelope] = field(default_factory=list)
    pub: Publisher | None = None
    chain: Publisher | None = None

    async def deploy(self, n: int = 1) -> Deployment:
        assert self.chain is not None
        dep = deployment(n)
        await self.chain.publish(dep)
        return dep

    def of(self, type_: str, **match: object) -> list:
        return [e.body for e in self.events
                if e.type == type_ and all(getattr(e.body, k) == v for k, v in match.items())]


@pytest.fixture
async def bus(grid: Grid, tmp_path: pathlib.Path) -> AsyncIterator[Bus]:
    ctx = zmq.asyncio.Context()
    rec = Bus()
    sub_store = Store(tmp_path / "probe-sub.sqlite")
    pub_store = Store(tmp_path / "probe-pub.sqlite")
    chain_store = Store(tmp_path / "probe-chain.sqlite")
    sec = Security(grid.keys, "market")  # one authenticator per context: the probe is the market
    sec.start(ctx)

    def handler(env: Envelope, conn: object) -> None:
        rec.events.append(env)

    sub = Subscriber(ctx, sec, sub_store, hub_sub=grid.hub_sub,
                     prefixes=["meter.", "trade."], handler=handler, name="probe")
    rec.pub = Publisher(ctx, sec, pub_store, source="market/auction", hub_pub=grid.hub_pub, heartbeat_s=0.2)
    rec.chain = Publisher(ctx, sec, chain_store, source="market/chain", hub_pub=grid.hub_pub, heartbeat_s=0.2)
    try:
        await sub.start()
        await rec.pub.start()
        await rec.chain.start()
        await until(sub.connected.is_set)
        yield rec
    finally:
        await sub.stop()
        await rec.pub.stop()
        await rec.chain.stop()
        sec.stop()
        sub_store.close()
        pub_store.close()
        chain_store.close()
        ctx.destroy(linger=0)


async def until(cond: Callable[[], object], timeout: float = 30.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"{what} not met in {timeout} s")
        await asyncio.sleep(0.05)


ROOT_DIR = pathlib.Path(__file__).resolve().parents[2]
