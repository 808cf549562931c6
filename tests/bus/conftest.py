"""Bus test fixtures: the hub (``grid``) comes from the root conftest; an asyncio context."""

from __future__ import annotations

import pytest
import zmq.asyncio

from tests.conftest import Grid  # noqa: F401 - re-exported for the tests of this folder


@pytest.fixture
async def actx() -> object:
    ctx = zmq.asyncio.Context()
    yield ctx
    ctx.destroy(linger=0)
