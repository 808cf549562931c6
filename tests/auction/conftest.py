"""Auction fixtures: a real hub with CURVE keys (``grid``), a stand-in chain service
answering GetBalances on a real socket and announcing its deployment on the bus, as the
operator does (``fake_chain``), and its publishers (``chain_events``); the auction service
itself runs in-process (:class:`tests.support.auction.Running`) or as a subprocess."""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator

import pytest
import zmq.asyncio

from services.bus import RpcServer, Store
from services.bus import commands as cmd
from tests.support.auction import BUYERS, SELLER, FakeChain
from tests.support.bus import Grid, Sources
from tests.support.signing import deployment


@pytest.fixture
async def fake_chain(grid: Grid, tmp_path: pathlib.Path) -> AsyncIterator[FakeChain]:
    """The stand-in chain service; its ``events`` publish as the market's chain service (and
    as meters), and have announced the deployment whose market domain the tests sign in."""
    ctx = zmq.asyncio.Context()
    sec = grid.security("market")
    sec.start(ctx)
    store = Store(tmp_path / "fake-chain.sqlite")
    chain = FakeChain()
    server = RpcServer(ctx, sec, store, bind="tcp://127.0.0.1:*", name="fake-chain")
    server.handle(cmd.GetBalances, chain.get_balances)
    await server.start()
    chain.endpoint = server.endpoint
    chain.set(SELLER, tokens_wh=100_000)
    for b in BUYERS:
        chain.set(b, escrow_reserved_wei=10**15)
    chain.server = server  # type: ignore[attr-defined]
    chain.events = Sources(grid, tmp_path / "sources")  # type: ignore[attr-defined]
    await chain.events.publish(deployment())  # type: ignore[attr-defined]
    yield chain
    await chain.events.stop()  # type: ignore[attr-defined]
    await server.stop()
    sec.stop()
    store.close()
    ctx.destroy(linger=0)


@pytest.fixture
def chain_events(fake_chain: FakeChain) -> Sources:
    """Events as the chain service (``market/chain``) and the meters (``<site>/meter``)
    publish them, each with its own site's key, for the trade lifecycle tests (the stand-in
    chain's publishers: one per source)."""
    return fake_chain.events  # type: ignore[attr-defined,no-any-return]
