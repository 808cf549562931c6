"""Delivery readings signed (EIP-712) by the buyer site's registered meter key: anyone may
submit one; a forged, replayed, malformed or foreign reading reverts."""

from __future__ import annotations

import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_utils import keccak

from services.chain import contracts as c
from services.chain.contracts import cost, id32

from .conftest import ETHER, Env

PRICE = 10**15
WH = 3000
TRADE = id32("signed-trade")
METER_KEY = Account.from_key(b"\x11" * 32)
FORGER_KEY = Account.from_key(b"\x22" * 32)
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


@pytest.fixture
async def signed_env(env: Env) -> Env:
    await env.tx(env.token.mint(env.seller, WH, id32("r")), env.meter)
    await env.tx(env.token.approve(env.d.market.address, WH), env.seller)
    await env.tx(env.market.deposit(), env.buyer, value=ETHER)
    await env.tx(env.market.open(TRADE, env.seller, env.buyer, WH, PRICE), env.admin)
    r = await env.tx(env.market.registerMeter(env.buyer, METER_KEY.address), env.admin)
    assert env.events(r, env.d.market, "MeterRegistered") == [{"account": env.buyer, "meter": METER_KEY.address}]
    assert await env.market.meterOf(env.buyer).call() == METER_KEY.address
    return env


async def sign(env: Env, key: Account, delivered: int, trade: bytes = TRADE, market: str | None = None) -> bytes:
    chain_id = await env.w3.eth.chain_id
    return c.sign_delivery(key.key, chain_id, market or env.d.market.address, trade, delivered)


async def test_typed_data_digest_matches_the_contract(signed_env: Env) -> None:
    env = signed_env
    typed = c.delivery_typed_data(await env.w3.eth.chain_id, env.d.market.address, TRADE, 1234)
    signable = encode_typed_data(full_message=typed)
    expected = b"\x19\x01" + signable.header + signable.body
    assert await env.market.deliveryDigest(TRADE, 1234).call() == keccak(expected)
    assert await env.market.domainSeparator().call() == signable.header


async def test_anyone_submits_a_signed_reading(signed_env: Env) -> None:
    env = signed_env
    r = await env.tx(env.market.settleSigned(TRADE, 1200, await sign(env, METER_KEY, 1200)), env.other)
    assert env.events(r, env.d.market, "Settled") == [
        {"tradeId": TRADE, "deliveredWh": 1200, "deltaWh": 1200, "paidWei": cost(1200, PRICE)}
    ]
    await env.tx(env.market.settleSigned(TRADE, 2000, await sign(env, METER_KEY, 2000)), env.seller)
    assert await env.market.credit(env.seller).call() == cost(2000, PRICE)
    assert await env.tokens(env.buyer) == 2000


async def test_forged_reading(signed_env: Env) -> None:
    env = signed_env
    reason = await env.reverts(env.market.settleSigned(TRADE, 1200, await sign(env, FORGER_KEY, 1200)), env.seller)
    assert reason == "EnergyMarket: signer is not the buyer's meter"
    # the meter's signature over another value does not cover this one
    reason = await env.reverts(env.market.settleSigned(TRADE, 2999, await sign(env, METER_KEY, 1200)), env.seller)
    assert reason == "EnergyMarket: signer is not the buyer's meter"
    assert (await env.market.trades(TRADE).call())[4] == 0


async def test_reading_for_another_market_is_refused(signed_env: Env) -> None:
    env = signed_env
    other = await c.deploy(env.w3, env.admin)
    sig = await sign(env, METER_KEY, 1200, market=other.market_address)
    reason = await env.reverts(env.market.settleSigned(TRADE, 1200, sig), env.seller)
    assert reason == "EnergyMarket: signer is not the buyer's meter"


async def test_replayed_reading(signed_env: Env) -> None:
    env = signed_env
    old = await sign(env, METER_KEY, 1000)
    await env.tx(env.market.settleSigned(TRADE, 1000, old), env.other)
    assert await env.reverts(env.market.settleSigned(TRADE, 1000, old), env.other) == (
        "EnergyMarket: reading not above settled"
    )
    await env.tx(env.market.settleSigned(TRADE, 1500, await sign(env, METER_KEY, 1500)), env.other)
    assert await env.reverts(env.market.settleSigned(TRADE, 1000, old), env.other) == (
        "EnergyMarket: reading not above settled"
    )
    assert await env.market.credit(env.seller).call() == cost(1500, PRICE)


async def test_signed_reading_beyond_the_trade_or_on_a_closed_trade(signed_env: Env) -> None:
    env = signed_env
    reason = await env.reverts(env.market.settleSigned(TRADE, WH + 1, await sign(env, METER_KEY, WH + 1)), env.other)
    assert reason == "EnergyMarket: delivery exceeds trade"
    await env.tx(env.market.close(TRADE, 10), env.buyer)
    reason = await env.reverts(env.market.settleSigned(TRADE, 20, await sign(env, METER_KEY, 20)), env.other)
    assert reason == "EnergyMarket: trade not open"


async def test_malformed_signatures(signed_env: Env) -> None:
    env = signed_env
    sig = await sign(env, METER_KEY, 1200)
    r, s, v = sig[:32], int.from_bytes(sig[32:64], "big"), sig[64]
    high_s = r + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - v])  # the same signature, malleated
    for bad in (sig[:64], sig + b"\0", high_s, r + sig[32:64] + bytes([v - 27])):
        reason = await env.reverts(env.market.settleSigned(TRADE, 1200, bad), env.other)
        assert reason == "EnergyMarket: bad signature", bad.hex()
    await env.tx(env.market.settleSigned(TRADE, 1200, sig), env.other)


async def test_meter_can_be_replaced_and_unregistered(signed_env: Env) -> None:
    env = signed_env
    await env.tx(env.market.registerMeter(env.buyer, FORGER_KEY.address), env.admin)
    reason = await env.reverts(env.market.settleSigned(TRADE, 100, await sign(env, METER_KEY, 100)), env.other)
    assert reason == "EnergyMarket: signer is not the buyer's meter"
    await env.tx(env.market.settleSigned(TRADE, 100, await sign(env, FORGER_KEY, 100)), env.other)
    await env.tx(env.market.registerMeter(env.buyer, "0x" + "00" * 20), env.admin)
    reason = await env.reverts(env.market.settleSigned(TRADE, 200, await sign(env, FORGER_KEY, 200)), env.other)
    assert reason == "EnergyMarket: signer is not the buyer's meter"
