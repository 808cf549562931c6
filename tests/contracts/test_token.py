"""EnergyToken v2: minted only from a registered meter's signed cumulative production, to the
meter's account, whoever submits; batches skip stale counters; pausing stops minting only;
ERC-20 transfers. Every refused call changes nothing."""

from __future__ import annotations

from web3 import AsyncWeb3

from services.bus import typed
from services.chain import bindings as c

from tests.support.contracts import Env, constructor_reverts, high_s, meter_key

ZERO = "0x" + "00" * 20


async def supply(env: Env) -> tuple:
    return (await env.token.totalSupply().call(), await env.tokens(env.seller), await env.tokens(env.buyer),
            await env.tokens(env.other), await env.token.mintedOf(env.seller_meter.address).call())


async def test_anyone_submits_a_signed_counter_and_only_the_increase_mints(env: Env) -> None:
    m = env.seller_meter
    for submitter in (env.other, env.buyer, env.operator):
        minted = await env.token.mintedOf(m.address).call()
        r = await env.tx(env.token.mint(m.address, minted + 700, env.production(m, minted + 700)), submitter)
        assert env.events(r, env.d.token, "Minted") == [
            {"to": env.seller, "meter": m.address, "producedWh": minted + 700, "amountWh": 700}]
        assert env.events(r, env.d.token, "Transfer") == [{"from": ZERO, "to": env.seller, "value": 700}]
    assert await supply(env) == (2100, 2100, 0, 0, 2100)


async def test_mint_refusals(env: Env) -> None:
    m = env.seller_meter
    await env.mint(m, 1000)
    before = await supply(env)
    cases = [
        (m.address, 1000, env.production(m, 1000), "EnergyToken: reading not above minted"),  # a replay
        (m.address, 999, env.production(m, 999), "EnergyToken: reading not above minted"),  # an older reading
        (m.address, 2000, env.production(env.buyer_meter, 2000), "EnergyToken: bad signature"),  # another meter's
        (m.address, 2000, env.production(m, 1999), "EnergyToken: bad signature"),  # not this counter
        (m.address, 2000, high_s(env.production(m, 2000)), "EnergyToken: bad signature"),
        (m.address, 2000, b"", "EnergyToken: bad signature"),
        (ZERO, 2000, b"\x00" * 65, "EnergyToken: bad signature"),
    ]
    foreign = [typed.token_domain(env.chain_id + 1, env.d.token_address),  # another chain
               typed.token_domain(env.chain_id, env.d.market_address)]  # another contract
    for domain in foreign:
        cases.append((m.address, 2000, typed.sig_bytes(typed.sign_production(m.key, domain, 2000)),
                      "EnergyToken: bad signature"))
    stranger = meter_key("token-unregistered")  # a key that signs, but is no registered meter
    cases.append((stranger.address, 2000, env.production(stranger, 2000), "EnergyToken: meter not registered"))
    for meter, produced, sig, expected in cases:
        assert await env.reverts(env.token.mint(meter, produced, sig), env.other) == expected, (produced, expected)
    assert await supply(env) == before


async def test_a_revoked_meter_mints_nothing_more(env: Env) -> None:
    m = env.seller_meter
    await env.mint(m, 1000)
    signed_before_revocation = env.production(m, 5000)
    await env.tx(env.registry.revoke(m.address), env.registrar)
    reason = await env.reverts(env.token.mint(m.address, 5000, signed_before_revocation), env.other)
    assert reason == "EnergyToken: meter not registered"
    reason = await env.reverts(env.token.mintBatch([m.address], [5000], [signed_before_revocation]), env.other)
    assert reason == "EnergyToken: meter not registered"
    assert await env.token.totalSupply().call() == 1000


async def test_mint_batch_skips_stale_counters_and_mints_the_rest(env: Env) -> None:
    s, b = env.seller_meter, env.buyer_meter
    await env.mint(s, 1000)
    meters = [s.address, b.address, s.address, b.address]
    produced = [900, 300, 1500, 300]  # stale; new; new; the same counter again (stale by then)
    sigs = [env.production(s, 900), env.production(b, 300), env.production(s, 1500), env.production(b, 300)]
    r = await env.tx(env.token.mintBatch(meters, produced, sigs), env.other)
    assert [(e["meter"], e["amountWh"]) for e in env.events(r, env.d.token, "Minted")] == [
        (b.address, 300), (s.address, 500)]
    assert await env.token.totalSupply().call() == 1800
    assert (await env.tokens(env.seller), await env.tokens(env.buyer)) == (1500, 300)
    # submitted again by someone else: everything is stale, nothing happens, nothing reverts
    r = await env.tx(env.token.mintBatch(meters, produced, sigs), env.operator)
    assert env.events(r, env.d.token, "Minted") == []
    assert await env.token.totalSupply().call() == 1800


async def test_mint_batch_refusals(env: Env) -> None:
    s, b = env.seller_meter, env.buyer_meter
    await env.mint(s, 100)
    before = await supply(env)
    stranger = meter_key("token-batch-stranger")
    good = (s.address, 200, env.production(s, 200))
    cases = [
        ([good, (b.address, 50, env.production(s, 50))], "EnergyToken: bad signature"),
        ([good, (b.address, 50, high_s(env.production(b, 50)))], "EnergyToken: bad signature"),
        ([good, (stranger.address, 50, env.production(stranger, 50))], "EnergyToken: meter not registered"),
    ]
    for entries, expected in cases:
        meters, produced, sigs = (list(x) for x in zip(*entries))
        assert await env.reverts(env.token.mintBatch(meters, produced, sigs), env.other) == expected
    for meters, produced, sigs in (([s.address], [200, 300], [good[2]]), ([s.address], [200], []),
                                   ([], [200], [good[2]])):
        reason = await env.reverts(env.token.mintBatch(meters, produced, sigs), env.other)
        assert reason == "EnergyToken: length mismatch"
    assert await supply(env) == before
    # a stale entry is skipped before its signature is looked at: its signature does not matter
    await env.tx(env.token.mintBatch([s.address], [100], [b"junk"]), env.other)
    assert await supply(env) == before


async def test_pause_stops_minting_not_transfers(env: Env) -> None:
    s = env.seller_meter
    await env.mint(s, 1000)
    for who in (env.admin, env.operator, env.other):
        assert await env.reverts(env.token.pause(), who) == "EnergyToken: caller is not the pauser"
    assert await env.reverts(env.token.unpause(), env.pauser) == "EnergyToken: not paused"
    r = await env.tx(env.token.pause(), env.pauser)
    assert env.events(r, env.d.token, "Paused") == [{"account": env.pauser}]
    assert await env.token.paused().call()
    assert await env.reverts(env.token.pause(), env.pauser) == "EnergyToken: paused"
    assert await env.reverts(env.token.mint(s.address, 2000, env.production(s, 2000)), env.other) == "EnergyToken: paused"
    reason = await env.reverts(env.token.mintBatch([s.address], [2000], [env.production(s, 2000)]), env.other)
    assert reason == "EnergyToken: paused"
    await env.tx(env.token.transfer(env.buyer, 10), env.seller)
    assert await env.reverts(env.token.unpause(), env.other) == "EnergyToken: caller is not the pauser"
    r = await env.tx(env.token.unpause(), env.pauser)
    assert env.events(r, env.d.token, "Unpaused") == [{"account": env.pauser}]
    await env.mint(s, 2000)  # the counter signed while paused mints once resumed
    assert await env.token.totalSupply().call() == 2000


async def test_nobody_mints_any_other_way(env: Env) -> None:
    """No role mints: the ABI has no mint but mint/mintBatch with a meter's signature, and the
    admin's roles are about roles."""
    abi_functions = {f["name"] for f in c.load_artifact(c.TOKEN)["abi"] if f["type"] == "function"}
    assert {f for f in abi_functions if "mint" in f.lower()} == {"mint", "mintBatch", "mintedOf"}
    for who in (env.admin, env.operator, env.registrar, env.pauser):
        # a signature by the caller's own key, for a meter that is not registered, mints nothing
        reason = await env.reverts(env.token.mint(who, 10**9, env.production(meter_key("x"), 10**9)), who)
        assert reason == "EnergyToken: bad signature"
    assert await env.token.totalSupply().call() == 0


async def test_erc20_transfers_and_allowances(env: Env) -> None:
    await env.mint(env.seller_meter, 100)
    assert await env.token.decimals().call() == 3
    assert await env.reverts(env.token.transfer(env.buyer, 101), env.seller) == "ERC20: transfer amount exceeds balance"
    assert await env.reverts(env.token.transfer(ZERO, 1), env.seller) == "ERC20: transfer to the zero address"
    assert await env.reverts(env.token.approve(ZERO, 1), env.seller) == "ERC20: approve to the zero address"
    await env.tx(env.token.approve(env.other, 50), env.seller)
    reason = await env.reverts(env.token.transferFrom(env.seller, env.other, 51), env.other)
    assert reason == "ERC20: insufficient allowance"
    await env.tx(env.token.transferFrom(env.seller, env.other, 50), env.other)
    assert await env.token.allowance(env.seller, env.other).call() == 0
    assert (await env.tokens(env.seller), await env.tokens(env.other)) == (50, 50)
    await env.tx(env.token.approve(env.other, 2**256 - 1), env.seller)
    await env.tx(env.token.transferFrom(env.seller, env.buyer, 20), env.other)
    assert await env.token.allowance(env.seller, env.other).call() == 2**256 - 1  # unlimited stays


async def test_constructor_refuses_zero_addresses(w3: AsyncWeb3) -> None:
    dev = (await w3.eth.accounts)[0]
    for args, expected in (((ZERO, dev, dev), "EnergyToken: zero registry"),
                           ((dev, ZERO, dev), "EnergyToken: zero address"),
                           ((dev, dev, ZERO), "EnergyToken: zero address")):
        assert await constructor_reverts(w3, c.TOKEN, args, dev) == expected
