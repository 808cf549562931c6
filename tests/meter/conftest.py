"""Meter test fixtures: a real hub on loopback with CURVE keys, a bus recorder, and
meter services run in-process."""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import pytest
import zmq.asyncio

from services.bus import Publisher, Security, Store, Subscriber, ensure_keys
from services.bus.envelope import Envelope
from services.bus.hub import Hub

SITES = ("market", "solar-1", "home-7", "probe")
ACCOUNT = "0x" + "ab" * 20


@dataclass
class Grid:
    keys: pathlib.Path
    hub_pub: str
    hub_sub: str
    root: pathlib.Path

    def env(self, site: str) -> dict[str, str]:
        return {"GRIDTRADE_SITE": site, "GRIDTRADE_DATA_DIR": str(self.root / site),
                "GRIDTRADE_KEYS_DIR": str(self.keys), "GRIDTRADE_HUB_PUB": self.hub_pub,
                "GRIDTRADE_HUB_SUB": self.hub_sub, "GRIDTRADE_HEARTBEAT_S": "0.2"}


@pytest.fixture
def grid(tmp_path: pathlib.Path) -> Iterator[Grid]:
    keys = tmp_path / "keys"
    for site in SITES:
        ensure_keys(keys, site)
    hub = Hub(Security(keys, "market"), pub_bind="tcp://127.0.0.1:*", sub_bind="tcp://127.0.0.1:*")
    pub, sub = hub.start()
    yield Grid(keys=keys, hub_pub=pub, hub_sub=sub, root=tmp_path)
    hub.stop()


@dataclass
class Bus:
    """A probe on the bus: records every event it hears, publishes as the market."""

    events: list[Envelope] = field(default_factory=list)
    pub: Publisher | None = None

    def of(self, type_: str, **match: object) -> list:
        return [e.body for e in self.events
                if e.type == type_ and all(getattr(e.body, k) == v for k, v in match.items())]


@pytest.fixture
async def bus(grid: Grid, tmp_path: pathlib.Path) -> AsyncIterator[Bus]:
    ctx = zmq.asyncio.Context()
    rec = Bus()
    sub_store = Store(tmp_path / "probe-sub.sqlite")
    pub_store = Store(tmp_path / "probe-pub.sqlite")
    sec = Security(grid.keys, "market")  # one authenticator per context: the probe is the market
    sec.start(ctx)

    def handler(env: Envelope, conn: object) -> None:
        rec.events.append(env)

    sub = Subscriber(ctx, sec, sub_store, hub_sub=grid.hub_sub,
                     prefixes=["meter.", "trade."], handler=handler, name="probe")
    rec.pub = Publisher(ctx, sec, pub_store, source="market/auction", hub_pub=grid.hub_pub, heartbeat_s=0.2)
    try:
        await sub.start()
        await rec.pub.start()
        await until(sub.connected.is_set)
        yield rec
    finally:
        await sub.stop()
        await rec.pub.stop()
        sec.stop()
        sub_store.close()
        pub_store.close()
        ctx.destroy(linger=0)


async def until(cond: Callable[[], object], timeout: float = 30.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"{what} not met in {timeout} s")
        await asyncio.sleep(0.05)


ROOT_DIR = pathlib.Path(__file__).resolve().parents[2]
