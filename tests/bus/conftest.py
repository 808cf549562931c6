"""A real hub on random loopback ports with CURVE keys for a few sites."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import zmq.asyncio

from services.bus import BusSettings, Security, ensure_keys
from services.bus.hub import Hub

SITES = ("market", "solar-1", "home-7")


@dataclass
class Grid:
    keys: pathlib.Path
    hub_pub: str
    hub_sub: str
    root: pathlib.Path

    def settings(self, site: str, **kw: object) -> BusSettings:
        return BusSettings(site=site, data_dir=self.root / site, keys_dir=self.keys, hub_pub=self.hub_pub,
                           hub_sub=self.hub_sub, heartbeat_s=0.2, **kw)  # type: ignore[arg-type]

    def security(self, site: str) -> Security:
        return Security(self.keys, site)

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


@pytest.fixture
async def actx() -> object:
    ctx = zmq.asyncio.Context()
    yield ctx
    ctx.destroy(linger=0)
