"""services.chain.contracts: deploy from a local key, attach, artifacts on chain, revert reasons."""

from __future__ import annotations

import asyncio

import pytest
from eth_abi import encode as abi_encode
from eth_account import Account
from web3 import AsyncWeb3
from web3.exceptions import ContractLogicError

from services.chain import contracts as c
from services.chain.contracts import id32

from .conftest import ETHER, Env


async def test_deploy_from_a_local_key_and_attach(w3: AsyncWeb3) -> None:
    dev = (await w3.eth.accounts)[0]
    key = Account.from_key(b"\x42" * 32)
    await w3.eth.wait_for_transaction_receipt(await w3.eth.send_transaction({"from": dev, "to": key.address, "value": ETHER}))
    operator, minter = (await w3.eth.accounts)[6:8]

    d = await c.deploy(w3, key, operator=operator, minter=minter)
    for contract, role in ((d.token, c.METER_ROLE), (d.market, c.OPERATOR_ROLE)):
        assert await contract.functions.hasRole(c.DEFAULT_ADMIN_ROLE, key.address).call()
        assert await contract.functions.hasRole(role, key.address).call()
    assert await d.token.functions.hasRole(c.METER_ROLE, minter).call()
    assert not await d.token.functions.hasRole(c.METER_ROLE, operator).call()
    assert await d.market.functions.hasRole(c.OPERATOR_ROLE, operator).call()
    assert await d.market.functions.token().call() == d.token_address

    # the token has no immutables: its runtime code is the artifact's deployedBytecode
    assert (await w3.eth.get_code(d.token_address)).to_0x_hex() == c.load_artifact(c.TOKEN)["deployedBytecode"]

    attached = c.attach(w3, d.token_address.lower(), d.market_address.lower())
    assert attached.market_address == d.market_address
    await c.send(w3, attached.token.functions.mint(operator, 7, id32("x")), minter)
    assert await d.token.functions.balanceOf(operator).call() == 7
    assert await attached.token.functions.decimals().call() == 3


def test_cost_rounds_down_like_the_contract() -> None:
    assert c.cost(1, 999) == 0
    assert c.cost(1, 1000) == 1
    assert c.cost(1500, 3) == 4


async def test_cost_matches_the_contract(env: Env) -> None:
    for wh, price in ((1, 999), (1500, 3), (4321, 123_456_789_012_345), (2**64 - 1, 2**128 - 1)):
        assert await env.market.costOf(wh, price).call() == c.cost(wh, price)


def test_revert_reason_reads_error_strings_and_ignores_other_errors() -> None:
    data = "0x08c379a0" + abi_encode(["string"], ["EnergyMarket: trade not open"]).hex()
    assert c.revert_reason(ContractLogicError("execution reverted: garbled", data=data)) == "EnergyMarket: trade not open"
    assert c.revert_reason(ContractLogicError("execution reverted: EnergyMarket: x")) == "EnergyMarket: x"
    assert c.revert_reason(ContractLogicError("execution reverted")) == ""
    assert c.revert_reason(ValueError("execution reverted: no")) is None


@pytest.mark.parametrize("w3", ["anvil"], indirect=True)  # needs anvil's automine switch
async def test_mined_revert_raises_transaction_reverted(env: Env) -> None:
    """Two withdrawals of the whole free escrow both pass the pre-flight estimate when they sit
    in the same block; the second is mined with status 0."""
    w3 = env.w3
    await env.tx(env.market.deposit(), env.buyer, value=1000)
    await w3.provider.make_request("evm_setAutomine", [False])
    try:
        first = asyncio.create_task(c.send(w3, env.market.withdraw(1000), env.buyer))
        second = asyncio.create_task(c.send(w3, env.market.withdraw(1000), env.buyer))
        while (await w3.provider.make_request("txpool_status", []))["result"]["pending"] != "0x2":
            await asyncio.sleep(0.01)
        await w3.provider.make_request("evm_mine", [])
        results = await asyncio.gather(first, second, return_exceptions=True)
    finally:
        await w3.provider.make_request("evm_setAutomine", [True])
    statuses = sorted(isinstance(r, c.TransactionReverted) for r in results)
    assert statuses == [False, True]
    reverted = next(r for r in results if isinstance(r, c.TransactionReverted))
    assert reverted.receipt["status"] == 0
    assert await env.escrow(env.buyer) == (0, 0)
