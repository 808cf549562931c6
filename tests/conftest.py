"""Shared test fixtures: real sockets on loopback, per-test data dirs, and a guard that
fails a test which leaves asyncio tasks or threads running."""

from __future__ import annotations

import asyncio
import os
import pathlib
import random
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import zmq.asyncio

from services.bus import BusSettings, Publisher, Security, Store, ensure_keys
from services.bus.events import Authority, Message, Origin
from services.bus.hub import Hub

ROOT = pathlib.Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_block(size: int = 48) -> int:
    """A base port p with p .. p+size-1 free on loopback (``gridtrade up``'s plan uses
    p..p+45 for the bus, the services and anvil; put the two wallets at p+46, p+47)."""
    # below the kernel's ephemeral range: ports bound as tcp://...:* (replay endpoints) and
    # outgoing connections come from there, and could take a port of the block meanwhile
    try:
        low = int(pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(200):
        p = random.randrange(10000, max(10001, low - size), 50)
        if all(_port_free(q) for q in range(p, p + size)):
            return p
    raise RuntimeError(f"no block of {size} free loopback ports found")


SITES = ("market", "solar-1", "home-7", "probe", "tester")


@dataclass
class Grid:
    """A real hub on random loopback ports, with CURVE keys for a few sites."""

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


class Sources:
    """Publishes each event as the source its publish policy allows, with that site's own
    key: meter events as ``<body.site>/meter``, market and trade events as the market's
    auction, chain events as the market's chain service (one publisher per source, made
    on first use). ``publish(body, source=...)`` publishes as any source instead."""

    def __init__(self, grid: Grid, root: pathlib.Path, authority: Authority = Authority()) -> None:
        self.grid, self.root, self.authority = grid, root, authority
        self.pubs: dict[str, tuple[zmq.asyncio.Context, Security, Publisher]] = {}

    def source_of(self, body: Message) -> str:
        if body.ORIGIN is Origin.SITE_NAMED:
            return f"{body.site}/meter"  # type: ignore[attr-defined]
        if body.ORIGIN is Origin.AUCTION:
            return self.authority.auction
        if body.ORIGIN is Origin.CHAIN:
            return self.authority.chain
        raise ValueError(f"no proper source for {body.TYPE}")

    async def publisher(self, source: str) -> Publisher:
        if source not in self.pubs:
            ctx = zmq.asyncio.Context()  # one ZAP authenticator per context: one context per site key
            sec = self.grid.security(source.split("/", 1)[0])
            sec.start(ctx)
            store = Store(self.root / f"pub-{source.replace('/', '-')}.sqlite")
            pub = Publisher(ctx, sec, store, source=source, hub_pub=self.grid.hub_pub, heartbeat_s=0.2)
            await pub.start()
            self.pubs[source] = (ctx, sec, pub)
        return self.pubs[source][2]

    async def publish(self, body: Message, source: str | None = None) -> object:
        return await (await self.publisher(source or self.source_of(body))).publish(body)

    async def stop(self) -> None:
        for ctx, sec, pub in self.pubs.values():
            await pub.stop()
            pub.store.close()
            sec.stop()
            ctx.destroy(linger=0)
        self.pubs.clear()


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
def data_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


@pytest.fixture
def artifacts_dir() -> pathlib.Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(autouse=True)
async def no_leaked_tasks():
    """Fail a test that leaves asyncio tasks behind (threads are checked after it)."""
    before_threads = {t.ident for t in threading.enumerate()}
    yield
    current = asyncio.current_task()
    leftover = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
    for t in leftover:
        t.cancel()
    if leftover:
        await asyncio.gather(*leftover, return_exceptions=True)
        pytest.fail(f"test left {len(leftover)} asyncio task(s) running: {[t.get_coro() for t in leftover][:3]}")
    await asyncio.sleep(0)
    extra = [t for t in threading.enumerate() if t.ident not in before_threads and t.is_alive() and not t.daemon]
    if extra:
        pytest.fail(f"test left thread(s) running: {extra}")


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("GRIDTRADE_LOG_LEVEL", "INFO")


# The suite runs on 3 workers (pytest-xdist; the scheduler below): most of its time is spent
# waiting for simulated time, blocks and browsers, not computing. A file stays on one worker, so
# its module fixtures are built once. The files that start a whole grid of processes run in two
# streams, one file at a time each, so that a 2-core machine never runs more than two grids at
# once; the Docker and network-namespace files (machine-wide resources) are in the same stream.
HEAVY_GROUPS = {
    "tests/deploy/": "grids-a", "tests/e2e/test_two_hosts.py": "grids-a", "tests/e2e/test_kill.py": "grids-a",
    "tests/launcher/": "grids-a",
    "tests/e2e/": "grids-b", "tests/browser/": "grids-b",
}
# handed out first, so that the two streams start at once and no worker is left alone with a
# long file at the end
LONG_FIRST = ("tests/deploy/", "tests/e2e/", "tests/contracts/test_invariants.py", "tests/browser/",
              "tests/launcher/", "tests/adversarial/", "tests/chain/test_real_chain.py", "tests/chain/")


def _file_of(nodeid: str) -> str:
    return nodeid.split("::")[0]


def _group_of(nodeid: str) -> str:
    path = _file_of(nodeid)
    return next((g for prefix, g in HEAVY_GROUPS.items() if path.startswith(prefix)), path)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {prefix: i for i, prefix in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: next((i for prefix, i in rank.items() if item.nodeid.startswith(prefix)), len(rank)))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """Scopes are the groups above (xdist's own ``xdist_group`` marker rewrites node ids, which
    pytest 9 no longer lets a plugin do); handed out in collection order."""
    from xdist.scheduler import LoadScopeScheduling

    class GridScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group_of(nodeid)

    return GridScheduling(config, log)
