"""Every forbidden call reverts with its reason and changes nothing."""

from __future__ import annotations

import pytest

from services.chain import contracts as c
from services.chain.contracts import cost, id32

from .conftest import ETHER, Env

PRICE = 2 * 10**15  # wei per kWh
WH = 2000
TRADE = id32("trade")


@pytest.fixture
async def opened(env: Env) -> Env:
    """A trade TRADE of WH at PRICE is open; the buyer has 1 Ether escrow in all, the seller
    3000 Wh of which WH are locked."""
    await env.tx(env.token.mint(env.seller, 3000, id32("reading")), env.meter)
    await env.tx(env.token.approve(env.d.market.address, WH), env.seller)
    await env.tx(env.market.deposit(), env.buyer, value=ETHER)
    await env.tx(env.market.open(TRADE, env.seller, env.buyer, WH, PRICE), env.admin)
    await env.tx(env.market.settle(TRADE, 500), env.admin)
    return env


async def snapshot(env: Env) -> tuple:
    m = env.d.market.address
    return (
        await env.escrow(env.buyer),
        await env.market.credit(env.seller).call(),
        await env.tokens(env.seller),
        await env.tokens(env.buyer),
        await env.tokens(m),
        await env.eth(m),
        await env.market.trades(TRADE).call(),
        await env.token.totalSupply().call(),
    )


# ------------------------------------------------------------------ token


async def test_mint_by_non_meter(env: Env) -> None:
    for who in (env.seller, env.other):
        assert await env.reverts(env.token.mint(who, 1000, id32("x")), who) == "EnergyToken: caller is not a meter"
    assert await env.token.totalSupply().call() == 0
    assert not await env.token.minted(id32("x")).call()


async def test_second_mint_of_a_reading(env: Env) -> None:
    await env.tx(env.token.mint(env.seller, 1000, id32("solar-1/7")), env.meter)
    assert await env.token.minted(id32("solar-1/7")).call()
    reason = await env.reverts(env.token.mint(env.seller, 1000, id32("solar-1/7")), env.meter)
    assert reason == "EnergyToken: reading already minted"
    reason = await env.reverts(env.token.mint(env.other, 5, id32("solar-1/7")), env.meter)
    assert reason == "EnergyToken: reading already minted"
    assert await env.token.totalSupply().call() == 1000
    assert await env.tokens(env.seller) == 1000


async def test_bad_mints(env: Env) -> None:
    zero = "0x" + "00" * 20
    assert await env.reverts(env.token.mint(zero, 1, id32("a")), env.meter) == "EnergyToken: mint to the zero address"
    assert await env.reverts(env.token.mint(env.seller, 0, id32("a")), env.meter) == "EnergyToken: zero amount"


async def test_token_transfers_beyond_balance_or_allowance(env: Env) -> None:
    await env.tx(env.token.mint(env.seller, 100, id32("a")), env.meter)
    reason = await env.reverts(env.token.transfer(env.buyer, 101), env.seller)
    assert reason == "ERC20: transfer amount exceeds balance"
    await env.tx(env.token.approve(env.other, 50), env.seller)
    reason = await env.reverts(env.token.transferFrom(env.seller, env.other, 51), env.other)
    assert reason == "ERC20: insufficient allowance"
    await env.tx(env.token.transferFrom(env.seller, env.other, 50), env.other)
    assert await env.token.allowance(env.seller, env.other).call() == 0
    assert (await env.tokens(env.seller), await env.tokens(env.other)) == (50, 50)


async def test_roles_are_granted_by_admins_only(env: Env) -> None:
    reason = await env.reverts(env.token.grantRole(c.METER_ROLE, env.other), env.other)
    assert reason == "AccessControl: caller is not an admin"
    reason = await env.reverts(env.market.grantRole(c.OPERATOR_ROLE, env.other), env.meter)
    assert reason == "AccessControl: caller is not an admin"
    await env.tx(env.market.grantRole(c.OPERATOR_ROLE, env.other), env.admin)
    assert await env.market.hasRole(c.OPERATOR_ROLE, env.other).call()
    await env.tx(env.token.revokeRole(c.METER_ROLE, env.meter), env.admin)
    reason = await env.reverts(env.token.mint(env.seller, 1, id32("late")), env.meter)
    assert reason == "EnergyToken: caller is not a meter"


# ------------------------------------------------------------------ escrow


async def test_withdrawing_locked_or_more_than_free(opened: Env) -> None:
    env = opened
    before = await snapshot(env)
    free, locked = await env.escrow(env.buyer)
    assert locked > 0
    reason = await env.reverts(env.market.withdraw(free + 1), env.buyer)
    assert reason == "EnergyMarket: amount exceeds free escrow"
    reason = await env.reverts(env.market.withdraw(free + locked), env.buyer)
    assert reason == "EnergyMarket: amount exceeds free escrow"
    assert await env.reverts(env.market.withdraw(1), env.other) == "EnergyMarket: amount exceeds free escrow"
    assert await env.reverts(env.market.withdraw(0), env.buyer) == "EnergyMarket: zero amount"
    assert await snapshot(env) == before
    await env.tx(env.market.withdraw(free), env.buyer)  # the free part is still withdrawable
    assert await env.escrow(env.buyer) == (0, locked)


async def test_zero_deposit_and_credit_without_credit(env: Env) -> None:
    assert await env.reverts(env.market.deposit(), env.buyer, value=0) == "EnergyMarket: zero deposit"
    assert await env.reverts(env.market.withdrawCredit(), env.seller) == "EnergyMarket: no credit"


async def test_plain_ether_to_the_market_is_refused(env: Env) -> None:
    with pytest.raises(Exception) as info:
        await env.w3.eth.send_transaction({"from": env.other, "to": env.d.market.address, "value": 1})
    assert "revert" in str(info.value)
    assert await env.eth(env.d.market.address) == 0


# ------------------------------------------------------------------ open


async def test_open_by_non_operator(opened: Env) -> None:
    env = opened
    for who in (env.buyer, env.seller, env.other):
        reason = await env.reverts(env.market.open(id32("t2"), env.seller, env.buyer, 10, PRICE), who)
        assert reason == "EnergyMarket: caller is not the operator"


async def test_open_not_covered_by_escrow(opened: Env) -> None:
    env = opened
    await env.tx(env.token.approve(env.d.market.address, 1000), env.seller)
    free, _ = await env.escrow(env.buyer)
    price = free + 1  # 1000 Wh (one kWh) at this price cost one wei more than the free escrow
    assert cost(1000, price) == free + 1
    before = await snapshot(env)
    reason = await env.reverts(env.market.open(id32("t2"), env.seller, env.buyer, 1000, price), env.admin)
    assert reason == "EnergyMarket: escrow does not cover trade"
    assert await snapshot(env) == before
    await env.tx(env.market.open(id32("t2"), env.seller, env.buyer, 1000, price - 1), env.admin)  # exactly covered
    assert await env.escrow(env.buyer) == (0, cost(WH, PRICE) - cost(500, PRICE) + free)


async def test_open_not_covered_by_seller_tokens(opened: Env) -> None:
    env = opened
    spare = await env.tokens(env.seller)
    await env.tx(env.token.approve(env.d.market.address, spare + 1), env.seller)
    before = await snapshot(env)
    reason = await env.reverts(env.market.open(id32("t2"), env.seller, env.buyer, spare + 1, 1000), env.admin)
    assert reason == "EnergyMarket: seller tokens do not cover trade"
    assert await snapshot(env) == before


async def test_open_without_approval(opened: Env) -> None:
    env = opened  # the approval was used up by TRADE
    reason = await env.reverts(env.market.open(id32("t2"), env.seller, env.buyer, 10, 1000), env.admin)
    assert reason == "EnergyMarket: token allowance too low"


async def test_open_with_bad_arguments(opened: Env) -> None:
    env = opened
    await env.tx(env.token.approve(env.d.market.address, 1000), env.seller)
    zero = "0x" + "00" * 20
    cases = [
        ((TRADE, env.seller, env.buyer, 10, 1000), "EnergyMarket: trade exists"),
        ((b"\0" * 32, env.seller, env.buyer, 10, 1000), "EnergyMarket: zero trade id"),
        ((id32("t2"), zero, env.buyer, 10, 1000), "EnergyMarket: zero address"),
        ((id32("t2"), env.seller, env.seller, 10, 1000), "EnergyMarket: seller is buyer"),
        ((id32("t2"), env.seller, env.buyer, 0, 1000), "EnergyMarket: zero energy"),
        ((id32("t2"), env.seller, env.buyer, 2**64, 1000), "EnergyMarket: energy too large"),
        ((id32("t2"), env.seller, env.buyer, 10, 0), "EnergyMarket: zero price"),
        ((id32("t2"), env.seller, env.buyer, 10, 2**128), "EnergyMarket: price too large"),
    ]
    for args, expected in cases:
        assert await env.reverts(env.market.open(*args), env.admin) == expected, args


# ------------------------------------------------------------------ settle and close


async def test_settle_beyond_the_trade_or_backwards(opened: Env) -> None:
    env = opened
    before = await snapshot(env)
    assert await env.reverts(env.market.settle(TRADE, WH + 1), env.admin) == "EnergyMarket: delivery exceeds trade"
    assert await env.reverts(env.market.settle(TRADE, 499), env.admin) == "EnergyMarket: delivery goes backwards"
    assert await env.reverts(env.market.close(TRADE, 499), env.buyer) == "EnergyMarket: delivery goes backwards"
    assert await env.reverts(env.market.close(TRADE, WH + 1), env.admin) == "EnergyMarket: delivery exceeds trade"
    assert await env.reverts(env.market.settle(id32("nope"), 1), env.admin) == "EnergyMarket: trade not open"
    assert await snapshot(env) == before


async def test_settle_by_non_operator(opened: Env) -> None:
    env = opened
    for who in (env.buyer, env.seller, env.other):
        assert await env.reverts(env.market.settle(TRADE, 600), who) == "EnergyMarket: caller is not the operator"
        reason = await env.reverts(env.market.settleBatch([TRADE], [600]), who)
        assert reason == "EnergyMarket: caller is not the operator"


async def test_settle_batch_is_all_or_nothing(opened: Env) -> None:
    env = opened
    await env.tx(env.token.approve(env.d.market.address, 100), env.seller)
    await env.tx(env.market.open(id32("t2"), env.seller, env.buyer, 100, PRICE), env.admin)
    before = await snapshot(env)
    reason = await env.reverts(env.market.settleBatch([TRADE, id32("t2")], [600, 101]), env.admin)
    assert reason == "EnergyMarket: delivery exceeds trade"
    assert await env.reverts(env.market.settleBatch([TRADE], [600, 50]), env.admin) == "EnergyMarket: length mismatch"
    reason = await env.reverts(env.market.settleBatch([TRADE, TRADE], [700, 600]), env.admin)
    assert reason == "EnergyMarket: delivery goes backwards"
    assert await snapshot(env) == before


async def test_closing_someone_elses_trade(opened: Env) -> None:
    env = opened
    before = await snapshot(env)
    for who in (env.seller, env.other, env.meter):
        reason = await env.reverts(env.market.close(TRADE, 600), who)
        assert reason == "EnergyMarket: caller is not the buyer or operator"
    assert await snapshot(env) == before
    await env.tx(env.market.close(TRADE, 600), env.admin)  # the operator may
    assert await env.reverts(env.market.close(TRADE, 600), env.buyer) == "EnergyMarket: trade not open"
    assert await env.reverts(env.market.settle(TRADE, 700), env.admin) == "EnergyMarket: trade not open"


async def test_register_meter_by_non_operator(env: Env) -> None:
    reason = await env.reverts(env.market.registerMeter(env.buyer, env.other), env.buyer)
    assert reason == "EnergyMarket: caller is not the operator"
    assert await env.market.meterOf(env.buyer).call() == "0x" + "00" * 20
