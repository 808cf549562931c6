"""Meter test fixtures: ``bus``, a probe on the ``grid`` hub with the market's key that
records the meters' and trades' events and speaks for the market (its auction and its
chain service); the meter services are run in-process by the tests."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from tests.support.bus import BusProbe


@pytest.fixture
async def bus(probes: Callable[..., Awaitable[BusProbe]]) -> BusProbe:
    return await probes("market", ["meter.", "trade."], speaks_as=("market/auction", "market/chain"))
