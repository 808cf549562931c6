"""A contract that re-enters the market from its receive() is stopped by the reentrancy guard,
not merely by the balance bookkeeping: it holds enough free escrow for the second withdrawal.
The guard lives in transient storage and is cleared after each call: two withdrawals one after
the other in one transaction both go through."""

from __future__ import annotations

import pytest
import solcx

from contracts import build
from services.chain import bindings as c

from tests.support.contracts import Env

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
    bool private armed;

    constructor(IMarket market_) { market = market_; }

    function depositAndWithdraw(uint256 amountWei) external payable {
        armed = true;
        market.deposit{value: msg.value}();
        market.withdraw(amountWei);
        armed = false;
    }

    function depositAndWithdrawTwice(uint256 amountWei) external payable {
        market.deposit{value: msg.value}();
        market.withdraw(amountWei);
        market.withdraw(amountWei);
    }

    receive() external payable {
        if (!armed || msg.sender != address(market) || reentered || bytes(lastReason).length > 0) return;
        try market.withdraw(msg.value) { reentered = true; } catch Error(string memory reason) { lastReason = reason; }
    }
}
"""


REFUSER = """// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

interface IMarket {
    function deposit() external payable;
    function withdraw(uint256 amountWei) external;
}

/// Test double: an account that cannot receive Ether (no receive function).
contract Refuser {
    function depositAndWithdraw(IMarket market, uint256 amountWei) external payable {
        market.deposit{value: msg.value}();
        market.withdraw(amountWei);
    }

    function deposit(IMarket market) external payable {
        market.deposit{value: msg.value}();
    }
}
"""


def compile_one(name: str, source: str) -> dict:
    out = solcx.compile_standard(
        {
            "language": "Solidity",
            "sources": {f"{name}.sol": {"content": source}},
            "settings": {
                "evmVersion": build.EVM_VERSION,
                "outputSelection": {"*": {"*": ["abi", "evm.bytecode.object"]}},
            },
        },
        solc_binary=build.SOLC,
    )["contracts"][f"{name}.sol"][name]
    return {"abi": out["abi"], "bytecode": "0x" + out["evm"]["bytecode"]["object"]}


@pytest.fixture(scope="module")
def reenterer_artifact() -> dict:
    return compile_one("Reenterer", REENTERER)


async def test_reentrant_withdraw_is_refused(env: Env, reenterer_artifact: dict) -> None:
    factory = env.w3.eth.contract(**reenterer_artifact)
    receipt = await c.send(env.w3, factory.constructor(env.d.market.address), env.other)
    attacker = env.w3.eth.contract(address=receipt["contractAddress"], abi=reenterer_artifact["abi"])

    await env.tx(attacker.functions.depositAndWithdraw(100), env.other, value=300)

    assert await attacker.functions.lastReason().call() == "EnergyMarket: reentrant call"
    assert not await attacker.functions.reentered().call()
    assert await env.escrow(attacker.address) == (200, 0, 0, 0, 0)
    assert await env.eth(attacker.address) == 100
    assert await env.eth(env.d.market.address) == 200


async def test_the_guard_is_cleared_after_each_call(env: Env, reenterer_artifact: dict) -> None:
    factory = env.w3.eth.contract(**reenterer_artifact)
    receipt = await c.send(env.w3, factory.constructor(env.d.market.address), env.other)
    caller = env.w3.eth.contract(address=receipt["contractAddress"], abi=reenterer_artifact["abi"])

    await env.tx(caller.functions.depositAndWithdrawTwice(100), env.other, value=300)

    assert await env.escrow(caller.address) == (100, 0, 0, 0, 0)
    assert await env.eth(caller.address) == 200
    assert await caller.functions.lastReason().call() == ""


async def test_a_payee_refusing_ether_keeps_its_escrow(env: Env) -> None:
    art = compile_one("Refuser", REFUSER)
    receipt = await c.send(env.w3, env.w3.eth.contract(**art).constructor(), env.other)
    refuser = env.w3.eth.contract(address=receipt["contractAddress"], abi=art["abi"])
    await env.tx(refuser.functions.deposit(env.d.market.address), env.other, value=300)
    reason = await env.reverts(refuser.functions.depositAndWithdraw(env.d.market.address, 100), env.other, value=1)
    assert reason == "EnergyMarket: Ether transfer failed"
    assert await env.escrow(refuser.address) == (300, 0, 0, 0, 0)
    assert await env.eth(env.d.market.address) == 300
