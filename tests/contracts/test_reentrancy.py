"""A contract that re-enters the market from its receive() is stopped by the reentrancy guard,
not merely by the balance bookkeeping: it holds enough free escrow for the second withdrawal."""

from __future__ import annotations

import pytest
import solcx

from contracts import build
from services.chain import contracts as c

from .conftest import Env

REENTERER = """// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

interface IMarket {
    function deposit() external payable;
    function withdraw(uint256 amountWei) external;
}

/// Test double: withdraws from the market and, when paid, tries to withdraw again.
contract Reenterer {
    IMarket public immutable market;
    string public lastReason;
    bool public reentered;

    constructor(IMarket market_) { market = market_; }

    function depositAndWithdraw(uint256 amountWei) external payable {
        market.deposit{value: msg.value}();
        market.withdraw(amountWei);
    }

    receive() external payable {
        if (msg.sender != address(market) || reentered || bytes(lastReason).length > 0) return;
        try market.withdraw(msg.value) { reentered = true; } catch Error(string memory reason) { lastReason = reason; }
    }
}
"""


@pytest.fixture(scope="module")
def reenterer_artifact() -> dict:
    out = solcx.compile_standard(
        {
            "language": "Solidity",
            "sources": {"Reenterer.sol": {"content": REENTERER}},
            "settings": {
                "evmVersion": build.EVM_VERSION,
                "outputSelection": {"*": {"*": ["abi", "evm.bytecode.object"]}},
            },
        },
        solc_binary=build.SOLC,
    )["contracts"]["Reenterer.sol"]["Reenterer"]
    return {"abi": out["abi"], "bytecode": "0x" + out["evm"]["bytecode"]["object"]}


async def test_reentrant_withdraw_is_refused(env: Env, reenterer_artifact: dict) -> None:
    factory = env.w3.eth.contract(**reenterer_artifact)
    receipt = await c.send(env.w3, factory.constructor(env.d.market.address), env.other)
    attacker = env.w3.eth.contract(address=receipt["contractAddress"], abi=reenterer_artifact["abi"])

    await env.tx(attacker.functions.depositAndWithdraw(100), env.other, value=300)

    assert await attacker.functions.lastReason().call() == "EnergyMarket: reentrant call"
    assert not await attacker.functions.reentered().call()
    assert await env.escrow(attacker.address) == (200, 0)
    assert await env.eth(attacker.address) == 100
    assert await env.eth(env.d.market.address) == 200
