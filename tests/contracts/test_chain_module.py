"""services.chain.bindings: deploy with a key per role (from a local key too), attach and
discover, artifacts on chain, costs, revert reasons."""

from __future__ import annotations

import asyncio

import pytest
from eth_abi import encode as abi_encode
from eth_account import Account
from web3 import AsyncWeb3
from web3.exceptions import ContractLogicError

from services.bus import typed
from services.bus.prices import wei_for
from services.chain import bindings as c

from tests.support.contracts import ETHER, Env, new_id

ROLES = {"admin": c.DEFAULT_ADMIN_ROLE, "registrar": c.REGISTRAR_ROLE, "operator": c.OPERATOR_ROLE,
         "pauser": c.PAUSER_ROLE}


async def test_deploy_from_a_local_key_gives_each_role_to_its_holder_only(w3: AsyncWeb3) -> None:
    dev = await w3.eth.accounts
    key = Account.from_key(b"\x42" * 32)
    await w3.eth.wait_for_transaction_receipt(await w3.eth.send_transaction({"from": dev[0], "to": key.address,
                                                                             "value": ETHER}))
    operator, registrar, pauser = dev[6:9]
    d = await c.deploy(w3, key, operator=operator, registrar=registrar, pauser=pauser, dispute_window_s=77)
    holders = {"admin": key.address, "registrar": registrar, "operator": operator, "pauser": pauser}
    where = {"admin": (d.registry, d.token, d.market), "registrar": (d.registry,), "operator": (d.market,),
             "pauser": (d.token, d.market)}
    for role_name, role in ROLES.items():
        for contract in (d.registry, d.token, d.market):
            for holder_name, holder in holders.items():
                expected = holder_name == role_name and contract in where[role_name]
                assert await contract.functions.hasRole(role, holder).call() == expected, (role_name, holder_name)
    m = d.market.functions
    assert await m.token().call() == d.token_address
    assert await m.registry().call() == d.registry_address
    assert await d.token.functions.registry().call() == d.registry_address
    assert await m.disputeWindow().call() == 77

    # each runtime code is the artifact's deployedBytecode, but for the immutables (zeros in the artifact)
    for contract, name in ((d.registry, c.REGISTRY), (d.token, c.TOKEN), (d.market, c.MARKET)):
        code = bytes(await w3.eth.get_code(contract.address))
        artifact = bytes.fromhex(c.load_artifact(name)["deployedBytecode"][2:])
        assert len(code) == len(artifact)
        assert all(a == 0 for a, b in zip(artifact, code) if a != b), name

    attached = c.attach(w3, d.token_address.lower(), d.market_address.lower(), d.registry_address.lower())
    assert (attached.token_address, attached.market_address, attached.registry_address) == (
        d.token_address, d.market_address, d.registry_address)
    found = await c.discover(w3, d.market_address)
    assert (found.token_address, found.registry_address) == (d.token_address, d.registry_address)
    assert await found.token.functions.decimals().call() == 3


async def test_domains_name_each_contract_on_this_chain(env: Env) -> None:
    chain_id = await env.w3.eth.chain_id
    assert env.d.market_domain(chain_id) == typed.market_domain(chain_id, env.d.market_address)
    assert env.d.token_domain(chain_id) == typed.token_domain(chain_id, env.d.token_address)
    assert env.d.registry_domain(chain_id) == typed.registry_domain(chain_id, env.d.registry_address)


async def test_open_args_build_an_open(env: Env) -> None:
    await env.fund()
    offer, osig = await env.offer(1000)
    bid, bsig = await env.bid(offer, 1000)
    trade_id = new_id()
    args = c.open_args(trade_id, offer, "0x" + osig.hex(), bid, "0x" + bsig.hex(), 1000, offer.min_price_wei_per_kwh)
    await env.tx(env.market.open(*args), env.operator)
    assert (await env.trade(trade_id))[2] == c.STATUS_OPEN
    assert c.id32(trade_id) == typed.trade_key(trade_id)


def test_cost_rounds_down_like_the_contract() -> None:
    assert wei_for(1, 999) == 0
    assert wei_for(1, 1000) == 1
    assert wei_for(1500, 3) == 4


async def test_cost_matches_the_contract(env: Env) -> None:
    for wh, price in ((1, 999), (1500, 3), (4321, 123_456_789_012_345), (2**64 - 1, 2**128 - 1)):
        assert await env.market.costOf(wh, price).call() == wei_for(wh, price)


def test_revert_reason_reads_error_strings_and_ignores_other_errors() -> None:
    data = "0x08c379a0" + abi_encode(["string"], ["EnergyMarket: trade not open"]).hex()
    assert c.revert_reason(ContractLogicError("execution reverted: garbled", data=data)) == "EnergyMarket: trade not open"
    assert c.revert_reason(ContractLogicError("execution reverted: EnergyMarket: x")) == "EnergyMarket: x"
    assert c.revert_reason(ContractLogicError("execution reverted")) == ""
    assert c.revert_reason(ValueError("execution reverted: no")) is None


async def test_revert_reasons_come_through_from_both_chains(env: Env) -> None:
    assert await env.reverts(env.market.withdraw(0), env.buyer) == "EnergyMarket: zero amount"
    assert await env.reverts(env.registry.revoke(env.other), env.registrar) == "MeterRegistry: meter not active"
    # a reason raised inside the token, during an open, reaches the operator as the token's
    offer, osig = await env.offer(1000)
    bid, bsig = await env.bid(offer, 1000)
    await env.tx(env.market.deposit(), env.buyer, value=ETHER)
    reason = await env.reverts(env.open(new_id(), offer, osig, bid, bsig, 1000, offer.min_price_wei_per_kwh),
                               env.operator)
    assert reason == "ERC20: insufficient allowance"


@pytest.mark.parametrize("w3", ["anvil"], indirect=True)  # needs anvil's automine switch
async def test_mined_revert_raises_transaction_reverted(env: Env) -> None:
    """Two withdrawals of the whole free escrow both pass the pre-flight estimate (both made
    before either is sent) and sit in the same block; the second is mined with status 0."""
    w3 = env.w3
    await env.tx(env.market.deposit(), env.buyer, value=1000)
    gas = [await env.market.withdraw(1000).estimate_gas({"from": env.buyer}) for _ in range(2)]
    await w3.provider.make_request("evm_setAutomine", [False])
    try:
        sends: list[asyncio.Task[object]] = []
        for k in range(2):  # one after the other into the pool: sent at once, the node gave both the same nonce
            sends.append(asyncio.create_task(c.send(w3, env.market.withdraw(1000), env.buyer, gas=gas[k])))
            while (await w3.provider.make_request("txpool_status", []))["result"]["pending"] != hex(k + 1):
                for t in sends:  # a send that failed before the block would leave this waiting
                    if t.done() and t.exception() is not None:
                        raise t.exception()  # type: ignore[misc]
                await asyncio.sleep(0.01)
        first, second = sends
        await w3.provider.make_request("evm_mine", [])
        results = await asyncio.gather(first, second, return_exceptions=True)
    finally:
        await w3.provider.make_request("evm_setAutomine", [True])
    statuses = sorted(isinstance(r, c.TransactionReverted) for r in results)
    assert statuses == [False, True]
    reverted = next(r for r in results if isinstance(r, c.TransactionReverted))
    assert reverted.receipt["status"] == 0
    assert (await env.escrow(env.buyer))[0] == 0


async def test_a_new_market_next_to_an_existing_token_and_registry(env: Env) -> None:
    """The move to a later market: a new EnergyMarket on the same token and registry. The tokens,
    the mint counters and the meter registrations carry over; the old market keeps its own
    escrow and trades until they are withdrawn and ended; the new one opens batches."""
    await env.fund()
    old_trade = await env.open_trade(1000)
    d = await c.deploy_market(env.w3, env.admin, env.d.token_address, env.d.registry_address,
                              operator=env.operator, pauser=env.pauser, dispute_window_s=60)
    assert d.market_address != env.d.market_address
    assert (d.token_address, d.registry_address) == (env.d.token_address, env.d.registry_address)
    m = d.market.functions
    assert (await m.token().call(), await m.registry().call()) == (env.d.token_address, env.d.registry_address)
    assert await m.hasRole(c.OPERATOR_ROLE, env.operator).call() and await m.disputeWindow().call() == 60
    # the seller moves its approval, the buyer its free escrow
    await env.tx(env.token.approve(d.market_address, 2**256 - 1), env.seller)
    free = (await env.escrow(env.buyer))[0]
    await env.tx(env.market.withdraw(free), env.buyer)
    await env.tx(m.deposit(), env.buyer, value=free)
    dom = d.market_domain(env.chain_id)
    entries = []
    for i in range(2):
        offer = typed.Offer(offer_id=typed.new_id(), seller=env.seller, wh=1000, min_price_wei_per_kwh=10**15,
                            expiry=await env.now() + 600, duration_s=600)
        bid = typed.Bid(bid_id=typed.new_id(), offer_id=offer.offer_id, buyer=env.buyer, wh=1000,
                        max_price_wei_per_kwh=10**15, expiry=await env.now() + 600)
        entries.append(c.opening(f"moved-{i}", offer, typed.sig_bytes(typed.sign_offer(env.keys[env.seller], dom, offer)),
                                 bid, typed.sig_bytes(typed.sign_bid(env.keys[env.buyer], dom, bid)), 1000, 10**15))
    await env.tx(m.openBatch(entries), env.operator)
    # the buyer's meter, registered once in the shared registry, pays on the new market
    sig = typed.sig_bytes(typed.sign_delivery(env.buyer_meter.key, dom, "moved-0", 1000))
    await env.tx(m.settle(typed.trade_key("moved-0"), 1000, sig), env.other)
    assert (await m.trades(typed.trade_key("moved-0")).call())[2] == c.STATUS_CLOSED
    assert await m.credit(env.seller).call() == wei_for(1000, 10**15)
    # the old market's trade is untouched, and still settles there
    assert (await env.trade(old_trade))[2] == c.STATUS_OPEN
    await env.settle(old_trade, 1000)
    assert (await env.trade(old_trade))[2] == c.STATUS_CLOSED
