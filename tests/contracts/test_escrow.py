"""Escrow: free, reserved (until a time), locked and credit, and the Ether that moves between
them. Reserved escrow cannot be released or withdrawn before its time; pausing stops new
reservations but never a withdrawal. Every refused call changes nothing."""

from __future__ import annotations

import pytest
from eth_tester import EthereumTester, PyEVMBackend
from web3 import AsyncWeb3
from web3.providers.eth_tester import AsyncEthereumTesterProvider

from services.bus import typed
from services.chain import bindings as c

from tests.support.contracts import Env, constructor_reverts, fee, make_env

M = "EnergyMarket: "


async def test_deposit_and_withdraw(env: Env) -> None:
    eth0 = await env.eth(env.buyer)
    r1 = await env.tx(env.market.deposit(), env.buyer, value=1000)
    assert env.events(r1, env.d.market, "Deposited") == [{"account": env.buyer, "amountWei": 1000}]
    r2 = await env.tx(env.market.withdraw(400), env.buyer)
    assert env.events(r2, env.d.market, "Withdrawn") == [{"account": env.buyer, "amountWei": 400}]
    assert env.events(r2, env.d.market, "Released") == []
    assert await env.escrow(env.buyer) == (600, 0, 0, 0, 0)
    assert await env.eth(env.buyer) == eth0 - 600 - fee(r1) - fee(r2)
    assert await env.eth(env.d.market.address) == 600


async def test_reserve_extends_and_never_shortens(env: Env) -> None:
    now = await env.now()
    await env.tx(env.market.deposit(), env.buyer, value=1000)
    r = await env.tx(env.market.reserve(300, now + 100), env.buyer)
    assert env.events(r, env.d.market, "Reserved") == [{"account": env.buyer, "amountWei": 300, "until": now + 100}]
    r = await env.tx(env.market.reserve(200, now + 50), env.buyer)  # an earlier time keeps the later one
    assert env.events(r, env.d.market, "Reserved") == [{"account": env.buyer, "amountWei": 200, "until": now + 100}]
    r = await env.tx(env.market.reserve(0, now + 500), env.buyer)  # 0: extend only
    assert env.events(r, env.d.market, "Reserved") == [{"account": env.buyer, "amountWei": 0, "until": now + 500}]
    assert await env.escrow(env.buyer) == (500, 500, now + 500, 0, 0)
    r = await env.tx(env.market.depositAndReserve(now + 400), env.buyer, value=50)
    assert env.events(r, env.d.market, "Reserved") == [{"account": env.buyer, "amountWei": 50, "until": now + 500}]
    assert await env.escrow(env.buyer) == (500, 550, now + 500, 0, 0)


async def test_reserved_escrow_stays_until_its_time(env: Env) -> None:
    until = await env.now() + 1000
    await env.tx(env.market.deposit(), env.buyer, value=100)
    await env.tx(env.market.depositAndReserve(until), env.buyer, value=900)
    async with env.books_unchanged():
        assert await env.reverts(env.market.release(1), env.buyer) == M + "escrow reserved until later"
        assert await env.reverts(env.market.withdraw(101), env.buyer) == M + "amount exceeds withdrawable escrow"
        assert await env.reverts(env.market.withdraw(1000), env.buyer) == M + "amount exceeds withdrawable escrow"
    await env.tx(env.market.withdraw(100), env.buyer)  # the free part is always withdrawable

    await env.at(until)
    assert await env.reverts(env.market.release(901), env.buyer) == M + "amount exceeds reserved escrow"
    assert await env.reverts(env.market.release(0), env.buyer) == M + "zero amount"
    r = await env.tx(env.market.release(400), env.buyer)
    assert env.events(r, env.d.market, "Released") == [{"account": env.buyer, "amountWei": 400}]
    assert await env.escrow(env.buyer) == (400, 500, until, 0, 0)
    assert await env.reverts(env.market.withdraw(901), env.buyer) == M + "amount exceeds withdrawable escrow"
    r = await env.tx(env.market.withdraw(900), env.buyer)  # free first, then reserved (its time has passed)
    assert env.events(r, env.d.market, "Released") == [{"account": env.buyer, "amountWei": 500}]
    assert env.events(r, env.d.market, "Withdrawn") == [{"account": env.buyer, "amountWei": 900}]
    assert await env.escrow(env.buyer) == (0, 0, until, 0, 0)


async def test_escrow_refusals(env: Env) -> None:
    await env.tx(env.market.deposit(), env.buyer, value=100)
    async with env.books_unchanged():
        assert await env.reverts(env.market.deposit(), env.buyer, value=0) == M + "zero deposit"
        assert await env.reverts(env.market.depositAndReserve(0), env.buyer, value=0) == M + "zero deposit"
        assert await env.reverts(env.market.withdraw(0), env.buyer) == M + "zero amount"
        assert await env.reverts(env.market.withdraw(1), env.other) == M + "amount exceeds withdrawable escrow"
        assert await env.reverts(env.market.reserve(101, 0), env.buyer) == M + "amount exceeds free escrow"
        assert await env.reverts(env.market.withdrawCredit(), env.seller) == M + "no credit"


async def test_plain_ether_to_the_market_is_refused(env: Env) -> None:
    with pytest.raises(Exception) as info:
        await env.w3.eth.send_transaction({"from": env.other, "to": env.d.market.address, "value": 1})
    assert "revert" in str(info.value)
    assert await env.eth(env.d.market.address) == 0


async def test_pause_stops_new_commitments_never_a_withdrawal(funded: Env) -> None:
    env = funded
    trade = await env.open_trade(1000)
    await env.settle(trade, 400)
    until = await env.now() + 10
    await env.tx(env.market.depositAndReserve(until), env.buyer, value=500)

    for who in (env.admin, env.operator, env.other):
        assert await env.reverts(env.market.pause(), who) == M + "caller is not the pauser"
    assert await env.reverts(env.market.unpause(), env.pauser) == M + "not paused"
    r = await env.tx(env.market.pause(), env.pauser)
    assert env.events(r, env.d.market, "Paused") == [{"account": env.pauser}]
    assert await env.reverts(env.market.pause(), env.pauser) == M + "paused"
    async with env.books_unchanged(trade):
        assert await env.reverts(env.market.reserve(1, 0), env.buyer) == M + "paused"
        assert await env.reverts(env.market.depositAndReserve(0), env.buyer, value=1) == M + "paused"
        offer, osig = await env.offer(1000)
        bid, bsig = await env.bid(offer, 1000)
        assert await env.reverts(env.open("p-1", offer, osig, bid, bsig, 1000, offer.min_price_wei_per_kwh),
                                 env.operator) == M + "paused"

    # what is already committed runs its course, and everyone can take their Ether out
    await env.tx(env.market.deposit(), env.buyer, value=1)
    await env.settle(trade, 600)
    await env.tx(env.market.close(typed.trade_key(trade)), env.buyer)
    await env.at(await env.now() + 3600)
    await env.tx(env.market.finalize(typed.trade_key(trade)), env.other)
    free, reserved = (await env.escrow(env.buyer))[:2]
    await env.tx(env.market.withdraw(free + reserved), env.buyer)
    await env.tx(env.market.withdrawCredit(), env.seller)
    assert await env.escrow(env.buyer) == (0, 0, until, 0, 0)
    assert await env.eth(env.d.market.address) == 0
    assert await env.reverts(env.market.unpause(), env.other) == M + "caller is not the pauser"
    r = await env.tx(env.market.unpause(), env.pauser)
    assert env.events(r, env.d.market, "Unpaused") == [{"account": env.pauser}]


async def test_escrow_amounts_beyond_uint128_are_refused() -> None:
    """Only a chain whose accounts hold more than 2**128 wei can try (an embedded chain with
    such a genesis; anvil refuses values that large itself)."""
    backend = PyEVMBackend(genesis_state=PyEVMBackend.generate_genesis_state(overrides={"balance": 2**130},
                                                                             num_accounts=8))
    provider = AsyncEthereumTesterProvider()
    provider.ethereum_tester = EthereumTester(backend)
    env = await make_env(AsyncWeb3(provider))
    assert await env.reverts(env.market.deposit(), env.other, value=2**128) == M + "amount too large"
    assert await env.reverts(env.market.depositAndReserve(0), env.other, value=2**128) == M + "amount too large"
    await env.tx(env.market.deposit(), env.other, value=2**128 - 1)
    with pytest.raises(Exception) as info:  # the sum would overflow uint128: a panic, never a silent wrap
        await env.tx(env.market.deposit(), env.other, value=1)
    assert c.revert_reason(info.value) != M + "amount too large"
    assert (await env.escrow(env.other))[0] == 2**128 - 1
    await env.tx(env.market.withdraw(2**128 - 1), env.other)


async def test_constructor_refuses_zero_addresses(env: Env) -> None:
    w3, dev, zero = env.w3, env.admin, "0x" + "00" * 20
    t, r = env.d.token_address, env.d.registry_address
    cases = [((zero, r, dev, dev, dev, 1), M + "zero contract"), ((t, zero, dev, dev, dev, 1), M + "zero contract"),
             ((t, r, zero, dev, dev, 1), M + "zero address"), ((t, r, dev, zero, dev, 1), M + "zero address"),
             ((t, r, dev, dev, zero, 1), M + "zero address")]
    for args, expected in cases:
        assert await constructor_reverts(w3, c.MARKET, args, dev) == expected
