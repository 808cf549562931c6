"""Contract tests run on both chains (``w3``, from tests/support, is parametrized over
embedded py-evm and anvil): ``env`` deploys the three v2 contracts with a key per role
(:class:`tests.support.contracts.Env`); ``funded`` also gives the seller tokens and the
buyer free escrow."""

from __future__ import annotations

import pytest
from web3 import AsyncWeb3

from tests.support.contracts import Env, make_env


@pytest.fixture
async def env(w3: AsyncWeb3) -> Env:
    return await make_env(w3)


@pytest.fixture
async def funded(env: Env) -> Env:
    await env.fund()
    return env
