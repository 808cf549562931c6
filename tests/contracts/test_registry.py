"""MeterRegistry: a meter key is registered once ever, by the registrar, with its own signature
of the binding; a revoked meter stays revoked. Every refused call changes nothing."""

from __future__ import annotations

import pytest
from eth_account.signers.local import LocalAccount
from web3 import AsyncWeb3

from services.bus import typed
from services.chain import bindings as c

from tests.support.contracts import Env, constructor_reverts, high_s, make_env, meter_key

ZERO = "0x" + "00" * 20


@pytest.fixture
async def bare(w3: AsyncWeb3) -> Env:
    """Deployed, no meter registered yet."""
    return await make_env(w3, register=False)


def reg_sig(env: Env, meter: LocalAccount, account: str, domain: typed.Domain | None = None) -> bytes:
    return typed.sig_bytes(typed.sign_registration(meter.key, domain or env.registry_domain, account))


async def state(env: Env, meter: str) -> tuple:
    return tuple(await env.registry.meterOf(meter).call()), await env.registry.accountOf(meter).call()


async def test_register_and_revoke(bare: Env) -> None:
    env, meter = bare, meter_key("reg-1")
    assert await state(env, meter.address) == ((c.METER_UNKNOWN, ZERO), ZERO)
    r = await env.tx(env.registry.register(meter.address, env.seller, reg_sig(env, meter, env.seller)), env.registrar)
    assert env.events(r, env.d.registry, "MeterRegistered") == [{"meter": meter.address, "account": env.seller}]
    assert await state(env, meter.address) == ((c.METER_ACTIVE, env.seller), env.seller)

    r = await env.tx(env.registry.revoke(meter.address), env.registrar)
    assert env.events(r, env.d.registry, "MeterRevoked") == [{"meter": meter.address}]
    assert await state(env, meter.address) == ((c.METER_REVOKED, env.seller), ZERO)


async def test_only_the_registrar_registers_or_revokes(bare: Env) -> None:
    env, meter = bare, meter_key("reg-2")
    sig = reg_sig(env, meter, env.seller)
    for who in (env.admin, env.operator, env.pauser, env.seller, env.other):
        reason = await env.reverts(env.registry.register(meter.address, env.seller, sig), who)
        assert reason == "MeterRegistry: caller is not the registrar"
    await env.tx(env.registry.register(meter.address, env.seller, sig), env.registrar)
    for who in (env.admin, env.operator, env.seller):
        assert await env.reverts(env.registry.revoke(meter.address), who) == "MeterRegistry: caller is not the registrar"
    assert await state(env, meter.address) == ((c.METER_ACTIVE, env.seller), env.seller)


async def test_zero_addresses(bare: Env) -> None:
    env, meter = bare, meter_key("reg-3")
    reason = await env.reverts(env.registry.register(ZERO, env.seller, reg_sig(env, meter, env.seller)), env.registrar)
    assert reason == "MeterRegistry: zero address"
    reason = await env.reverts(env.registry.register(meter.address, ZERO, reg_sig(env, meter, ZERO)), env.registrar)
    assert reason == "MeterRegistry: zero address"
    # refused before the signature is looked at: a malformed one recovers the zero address
    reason = await env.reverts(env.registry.register(ZERO, env.seller, b"\x00" * 65), env.registrar)
    assert reason == "MeterRegistry: zero address"


async def test_a_key_must_sign_its_own_registration_for_that_account(bare: Env) -> None:
    """The registrar cannot register a key nobody proved to hold, nor bind a meter to an account
    its key did not name, nor reuse a registration signed for another registry or chain."""
    env, meter, thief = bare, meter_key("reg-4"), meter_key("reg-4-thief")
    other_registry = typed.registry_domain(env.chain_id, env.d.market_address)
    other_chain = typed.registry_domain(env.chain_id + 1, env.d.registry_address)
    bad = [
        reg_sig(env, thief, env.seller),  # someone else's key
        reg_sig(env, meter, env.buyer),  # the meter named another account
        reg_sig(env, meter, env.seller, other_registry),
        reg_sig(env, meter, env.seller, other_chain),
        high_s(reg_sig(env, meter, env.seller)),  # the malleated twin of a good signature
        reg_sig(env, meter, env.seller)[:64],
        b"",
    ]
    for sig in bad:
        reason = await env.reverts(env.registry.register(meter.address, env.seller, sig), env.registrar)
        assert reason == "MeterRegistry: bad signature", sig.hex()
    assert await state(env, meter.address) == ((c.METER_UNKNOWN, ZERO), ZERO)


async def test_a_meter_is_registered_once_ever(bare: Env) -> None:
    env, meter = bare, meter_key("reg-5")
    await env.tx(env.registry.register(meter.address, env.seller, reg_sig(env, meter, env.seller)), env.registrar)
    for account in (env.seller, env.buyer):
        reason = await env.reverts(env.registry.register(meter.address, account, reg_sig(env, meter, account)),
                                   env.registrar)
        assert reason == "MeterRegistry: meter known"
    await env.tx(env.registry.revoke(meter.address), env.registrar)
    for account in (env.seller, env.buyer):  # a revoked meter cannot come back, for anyone
        reason = await env.reverts(env.registry.register(meter.address, account, reg_sig(env, meter, account)),
                                   env.registrar)
        assert reason == "MeterRegistry: meter known"
    assert await state(env, meter.address) == ((c.METER_REVOKED, env.seller), ZERO)


async def test_revoke_needs_an_active_meter(bare: Env) -> None:
    env, meter = bare, meter_key("reg-6")
    assert await env.reverts(env.registry.revoke(meter.address), env.registrar) == "MeterRegistry: meter not active"
    await env.tx(env.registry.register(meter.address, env.seller, reg_sig(env, meter, env.seller)), env.registrar)
    await env.tx(env.registry.revoke(meter.address), env.registrar)
    assert await env.reverts(env.registry.revoke(meter.address), env.registrar) == "MeterRegistry: meter not active"


async def test_an_account_may_have_several_meters(bare: Env) -> None:
    env = bare
    meters = [meter_key(f"reg-7-{i}") for i in range(3)]
    for m in meters:
        await env.tx(env.registry.register(m.address, env.seller, reg_sig(env, m, env.seller)), env.registrar)
    assert [await env.registry.accountOf(m.address).call() for m in meters] == [env.seller] * 3


async def test_the_admin_grants_the_registrar_role_and_nothing_else_registers(bare: Env) -> None:
    env, meter = bare, meter_key("reg-8")
    sig = reg_sig(env, meter, env.seller)
    assert await env.reverts(env.registry.grantRole(c.REGISTRAR_ROLE, env.other), env.registrar) == (
        "AccessControl: caller is not an admin")
    await env.tx(env.registry.grantRole(c.REGISTRAR_ROLE, env.other), env.admin)
    await env.tx(env.registry.revokeRole(c.REGISTRAR_ROLE, env.registrar), env.admin)
    assert await env.reverts(env.registry.register(meter.address, env.seller, sig), env.registrar) == (
        "MeterRegistry: caller is not the registrar")
    await env.tx(env.registry.register(meter.address, env.seller, sig), env.other)
    reason = await env.reverts(env.registry.grantRole(c.REGISTRAR_ROLE, ZERO), env.admin)
    assert reason == "AccessControl: zero account"


async def test_constructor_refuses_zero_addresses(w3: AsyncWeb3) -> None:
    dev = (await w3.eth.accounts)[0]
    for args in ((ZERO, dev), (dev, ZERO)):
        assert await constructor_reverts(w3, c.REGISTRY, args, dev) == "MeterRegistry: zero address"
