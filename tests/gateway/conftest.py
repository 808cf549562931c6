"""The gateway against the REAL services: one grid per test package (anvil, hub, the
market's operator, auction, each site's wallet and simulated meter: real subprocesses from
``launcher.plan()``, see tests/support/plan.py), and per test fresh in-process gateways
joined to it (tests/support/gateway.py), each talking to its own site's wallet (their
sessions, login throttle and metrics start empty; the leak guard sees them stopped)."""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator, Iterator

import pytest

from tests.support.gateway import CLEAR_INTERVAL_S, SERVICES, Stack
from tests.support.plan import CONSUMER_SITE, RealStack


@pytest.fixture(scope="package")
def real_grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealStack]:
    # the tests here fail logins on purpose to exercise each gateway's own throttle; the
    # wallet's throttle behind it (tests/chain/test_sites.py) gets room so later tests can log in
    grid = RealStack(tmp_path_factory.mktemp("gateway-grid"), chain_url="anvil", time_scale=1440,
                     meter_env={"meter-home-7": CONSUMER_SITE},
                     env={"GRIDTRADE_HEARTBEAT_S": "0.5", "GRIDTRADE_UNLOCK_MAX_FAILURES": "50",
                          # both markets: the english auction's tests and the double auction's (a call every 5 s)
                          "GRIDTRADE_AUCTION_MARKET": "both",
                          "GRIDTRADE_AUCTION_CLEAR_INTERVAL_S": str(CLEAR_INTERVAL_S)},
                     only=SERVICES, extra_accounts=[("third", "home-7 third")], scrypt_n=2**10)
    grid.start()
    grid.prepared = False  # type: ignore[attr-defined]
    try:
        yield grid
    finally:
        grid.stop()


@pytest.fixture
async def stack(real_grid: RealStack, tmp_path: pathlib.Path) -> AsyncIterator[Stack]:
    s = Stack(real_grid, tmp_path)
    try:
        for site in ("solar-1", "home-7"):
            await s.add_gateway(site)
        if not real_grid.prepared:  # type: ignore[attr-defined]
            await s.prepare()
            real_grid.prepared = True  # type: ignore[attr-defined]
        yield s
    finally:
        await s.aclose()
