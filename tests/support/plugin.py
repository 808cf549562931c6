"""The toolkit's fixtures, registered as a pytest plugin by tests/conftest.py.

- ``grid``: a real hub on random loopback ports with CURVE keys for :data:`~.bus.SITES`.
- ``probes``: makes started :class:`~.bus.BusProbe`\\ s on that hub, stopped at teardown.
- ``actx``: an asyncio ZeroMQ context, destroyed at teardown.
- ``anvil_url`` (session): a real anvil node; ``anvil_w3`` and ``sync_anvil_w3`` over it;
  ``embedded_w3``: a fresh eth-tester (py-evm) chain per test; ``w3``: parametrized over
  both, so a test using it runs on each. Tests share the session's node: they deploy their
  own contracts and measure balance changes rather than absolute balances.
- ``data_dir``, ``artifacts_dir``; and, for every test, a guard that fails a test which
  leaves asyncio tasks or threads running.

A failed test that used a grid of plan processes (:class:`~.plan.PlanGrid`, or a holder of
one as ``.stack``, or of that as ``.g``) gets the tails of its service logs in its report.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
import requests
import zmq.asyncio
from web3 import AsyncHTTPProvider, AsyncWeb3, HTTPProvider, Web3
from web3.providers.eth_tester import AsyncEthereumTesterProvider

from services.bus import Security, ensure_keys
from services.bus.hub import Hub
from services.chain.bindings import close_provider

from .anvil import start_anvil, stop_anvil
from .bus import SITES, BusProbe, Grid
from .paths import ARTIFACTS
from .plan import PlanGrid


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("GRIDTRADE_LOG_LEVEL", "INFO")


# --- the bus ------------------------------------------------------------------------------


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
async def probes(grid: Grid, tmp_path: pathlib.Path) -> AsyncIterator[Callable[..., Awaitable[BusProbe]]]:
    """``await probes(site, prefixes, speaks_as=...)``: a started probe with ``site``'s key
    (see :class:`~tests.support.bus.BusProbe`)."""
    made: list[BusProbe] = []

    async def make(site: str, prefixes: list[str] | tuple[str, ...], timeout: float = 60,
                   speaks_as: tuple[str, ...] = ()) -> BusProbe:
        p = BusProbe(grid, tmp_path / f"probe-{site}-{len(made)}", site=site, prefixes=prefixes,
                     speaks_as=speaks_as)
        made.append(p)
        return await p.start(timeout)

    yield make
    for p in made:
        await p.stop()


@pytest.fixture
def secure(grid: Grid) -> Iterator[Callable[[str, zmq.asyncio.Context], Security]]:
    """``secure(site, ctx)``: ``site``'s Security with its ZAP handler running on ``ctx``
    (stopped at teardown)."""
    made: list[Security] = []

    def make(site: str, ctx: zmq.asyncio.Context) -> Security:
        s = grid.security(site)
        s.start(ctx)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()


@pytest.fixture
async def actx() -> AsyncIterator[zmq.asyncio.Context]:
    ctx = zmq.asyncio.Context()
    yield ctx
    ctx.destroy(linger=0)


# --- chains -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def anvil_url() -> Iterator[str]:
    proc, url = start_anvil()
    try:
        yield url
    finally:
        stop_anvil(proc)


@pytest.fixture
async def anvil_w3(anvil_url: str) -> AsyncIterator[AsyncWeb3]:
    w3 = AsyncWeb3(AsyncHTTPProvider(anvil_url))
    try:
        yield w3
    finally:
        await close_provider(w3)


@pytest.fixture
def sync_anvil_w3(anvil_url: str) -> Iterator[Web3]:
    """Synchronous Web3 over HTTP to the same node, for code that cannot await (hypothesis
    state machines)."""
    with requests.Session() as session:
        yield Web3(HTTPProvider(anvil_url, session=session))


@pytest.fixture
def embedded_w3() -> AsyncWeb3:
    """In-process chain: no connection, thread or task to clean up."""
    return AsyncWeb3(AsyncEthereumTesterProvider())


@pytest.fixture(params=["embedded", pytest.param("anvil", marks=pytest.mark.anvil)])
def w3(request: pytest.FixtureRequest) -> AsyncWeb3:
    """The same test on the embedded chain and on a real anvil node."""
    return request.getfixturevalue(f"{request.param}_w3")  # type: ignore[no-any-return]


# --- folders and the leak guard -----------------------------------------------------------


@pytest.fixture
def data_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


@pytest.fixture
def artifacts_dir() -> pathlib.Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for value in getattr(item, "funcargs", {}).values():
            grid = getattr(getattr(value, "g", value), "stack", getattr(value, "g", value))
            if isinstance(grid, PlanGrid):
                report.sections.append(("service log tails", grid.log_tails()))
                break


@pytest.fixture(autouse=True)
async def no_leaked_tasks():  # type: ignore[no-untyped-def]
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
