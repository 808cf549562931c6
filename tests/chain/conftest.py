"""Chain service fixtures: ``peer_factory`` makes test participants on the ``grid`` hub
(:class:`tests.support.chain.Peer`: a bus probe with a site's key and request clients), the
chain service itself is started by the tests (:func:`tests.support.chain.start_stack`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from tests.support.bus import BusProbe, Grid
from tests.support.chain import Peer, Stack


@pytest.fixture
async def peer_factory(grid: Grid, probes: Callable[..., Awaitable[BusProbe]]) -> AsyncIterator[Callable[..., Any]]:
    made: list[Peer] = []

    async def make(stack: Stack | None = None, site: str = "tester") -> Peer:
        p = Peer(await probes(site, ["chain.", "wallet."]), stack, keys=grid.keys)
        made.append(p)
        return p

    yield make
    for p in made:
        await p.close_clients()
