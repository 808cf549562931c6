"""services/bus/typed.py and the contracts agree on every signed fact: the digests the Python
side signs are the ones each contract computes (registrationDigest, productionDigest,
offerDigest, bidDigest, deliveryDigest), over edge values and random ones; so do the domain
separators. What typed.py recovers, the contracts accept, and a signature made by typed.py
for one domain recovers another key in every other domain."""

from __future__ import annotations

import random

from eth_account.messages import encode_typed_data
from eth_utils import keccak, to_checksum_address

from services.bus import typed

from tests.support.contracts import Env, meter_key

EDGES_256 = [0, 1, 999, 1000, 2**64 - 1, 2**64, 2**128 - 1, 2**255, 2**256 - 1]
EDGES_64 = [0, 1, 2**32, 2**64 - 1]


def digest(domain: typed.Domain, primary: str, message: dict) -> bytes:
    """EIP-712 digest as eth-account computes it: keccak256(0x1901 ‖ domainSeparator ‖ hashStruct)."""
    signable = typed._typed(domain, primary, message)  # the exact structure typed.py signs
    return keccak(b"\x19\x01" + signable.header + signable.body)


def addresses(rng: random.Random) -> list[str]:
    raw = ["00" * 20, "ff" * 20] + [rng.randbytes(20).hex() for _ in range(3)]
    return [to_checksum_address("0x" + a) for a in raw]


async def test_domain_separators_match(env: Env) -> None:
    for domain, contract in ((env.registry_domain, env.registry), (env.token_domain, env.token),
                             (env.market_domain, env.market)):
        signable = encode_typed_data(domain.as_dict(), {"X": [{"name": "x", "type": "uint256"}]}, {"x": 0})
        assert await contract.domainSeparator().call() == signable.header


async def test_registration_and_production_digests_match(env: Env) -> None:
    rng = random.Random(1)
    for meter in addresses(rng):
        for account in addresses(rng)[:3]:
            expected = digest(env.registry_domain, "MeterKey", typed._registration(meter, account))
            assert await env.registry.registrationDigest(meter, account).call() == expected
        for produced in EDGES_256 + [rng.randrange(2**256) for _ in range(3)]:
            expected = digest(env.token_domain, "Production", typed._production(meter, produced))
            assert await env.token.productionDigest(meter, produced).call() == expected


async def test_delivery_digests_match(env: Env) -> None:
    rng = random.Random(2)
    for trade_id in ["t-1", "", "ünïcode trade", rng.randbytes(8).hex()]:
        for delivered in EDGES_256 + [rng.randrange(2**64)]:
            expected = digest(env.market_domain, "Delivery", typed._delivery(trade_id, delivered))
            assert await env.market.deliveryDigest(typed.trade_key(trade_id), delivered).call() == expected


async def test_offer_and_bid_digests_match(env: Env) -> None:
    rng = random.Random(3)
    for i in range(12):
        edge = i < 4
        offer = typed.Offer(
            offer_id=typed.new_id() if i % 3 else "0x" + "ff" * 32,
            seller=rng.choice(addresses(rng)[1:]),
            wh=rng.choice([1, 2**64 - 1]) if edge else rng.randrange(1, 2**64),
            min_price_wei_per_kwh=rng.choice([0, 2**128 - 1]) if edge else rng.randrange(2**128),
            expiry=rng.choice(EDGES_64) if edge else rng.randrange(2**64),
            duration_s=rng.choice([1, 2**32 - 1]) if edge else rng.randrange(1, 2**32),
        )
        bid = typed.Bid(
            bid_id=typed.new_id(), offer_id=typed.ZERO_ID if i % 2 else offer.offer_id,
            buyer=rng.choice(addresses(rng)), wh=offer.wh, max_price_wei_per_kwh=offer.min_price_wei_per_kwh,
            expiry=offer.expiry,
        )
        assert await env.market.offerDigest(offer.as_tuple()).call() == digest(env.market_domain, "Offer",
                                                                               offer.message())
        assert await env.market.bidDigest(bid.as_tuple()).call() == digest(env.market_domain, "Bid", bid.message())


async def test_typehashes_are_the_types_typed_py_signs(env: Env) -> None:
    def typehash(primary: str) -> bytes:
        fields = ",".join(f"{f['type']} {f['name']}" for f in typed.TYPES[primary])
        return keccak(text=f"{primary}({fields})")

    assert await env.registry.METER_KEY_TYPEHASH().call() == typehash("MeterKey")
    assert await env.token.PRODUCTION_TYPEHASH().call() == typehash("Production")
    assert await env.market.DELIVERY_TYPEHASH().call() == typehash("Delivery")
    assert await env.market.OFFER_TYPEHASH().call() == typehash("Offer")
    assert await env.market.BID_TYPEHASH().call() == typehash("Bid")


async def test_a_signature_counts_only_in_its_own_domain(env: Env) -> None:
    """typed.py's recovery agrees with the contracts: the right key in the right domain, any
    other key in any other domain (another chain id, another contract)."""
    meter = meter_key("digests")
    sig = typed.sign_delivery(meter.key, env.market_domain, "t-9", 1234)
    assert typed.recover_delivery(env.market_domain, "t-9", 1234, sig) == meter.address
    others = [typed.market_domain(env.chain_id + 1, env.d.market_address),
              typed.market_domain(env.chain_id, env.d.token_address),
              typed.token_domain(env.chain_id, env.d.market_address)]
    for domain in others:
        assert typed.recover_delivery(domain, "t-9", 1234, sig) != meter.address
    assert typed.recover_delivery(env.market_domain, "t-10", 1234, sig) != meter.address
    assert typed.recover_delivery(env.market_domain, "t-9", 1235, sig) != meter.address
