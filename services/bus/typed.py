"""The signed facts of contracts v2 (EIP-712 typed data), in one place.

Who signs what (see docs/architecture and the contracts):

- a meter key signs its meter's registration (``MeterKey``, registry domain), its cumulative
  production (``Production``, token domain), a buyer meter's cumulative delivery on a trade
  (``Delivery``, market domain) and a seller meter's cumulative export (``Export``, market
  domain; checked by the seller's own site, never on-chain);
- an account key signs an offer (``Offer``) or a bid (``Bid``), market domain.

Every struct field is a 256-bit word on-chain, so the Python models carry plain ints and
0x-hex strings. Signing and recovery use eth-account's ``encode_typed_data`` (the well-kept
implementation of EIP-712), so the digests are the ones the contracts compute; signatures
are 65 bytes r ‖ s ‖ v with v in {27, 28} and a low s (what eth-account produces and
the contracts demand).
"""

from __future__ import annotations

import os
from typing import Any

from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_utils import keccak, to_checksum_address
from pydantic import BaseModel, ConfigDict, Field

ZERO_ID = "0x" + "00" * 32
"""A bid for no offer in particular: a double-auction buy order."""

VERSION = "2"
TOKEN_NAME = "GridTrade EnergyToken"
MARKET_NAME = "GridTrade EnergyMarket"
REGISTRY_NAME = "GridTrade MeterRegistry"

TYPES: dict[str, list[dict[str, str]]] = {
    "MeterKey": [{"name": "meter", "type": "address"}, {"name": "account", "type": "address"}],
    "Production": [{"name": "meter", "type": "address"}, {"name": "producedWh", "type": "uint256"}],
    "Delivery": [{"name": "tradeId", "type": "bytes32"}, {"name": "deliveredWh", "type": "uint256"}],
    "Export": [{"name": "tradeId", "type": "bytes32"}, {"name": "exportedWh", "type": "uint256"}],
    "Offer": [{"name": "offerId", "type": "bytes32"}, {"name": "seller", "type": "address"},
              {"name": "wh", "type": "uint256"}, {"name": "minPriceWeiPerKwh", "type": "uint256"},
              {"name": "expiry", "type": "uint256"}, {"name": "durationS", "type": "uint256"}],
    "Bid": [{"name": "bidId", "type": "bytes32"}, {"name": "offerId", "type": "bytes32"},
            {"name": "buyer", "type": "address"}, {"name": "wh", "type": "uint256"},
            {"name": "maxPriceWeiPerKwh", "type": "uint256"}, {"name": "expiry", "type": "uint256"}],
}

Hex32 = Field(pattern=r"^0x[0-9a-fA-F]{64}$")
Sig = Field(pattern=r"^0x[0-9a-fA-F]{130}$")
Addr = Field(pattern=r"^0x[0-9a-fA-F]{40}$")
U64 = Field(ge=0, lt=2**64)
U128 = Field(ge=0, lt=2**128)


class Domain(BaseModel):
    """An EIP-712 domain: which contract on which chain a signature is for."""

    model_config = ConfigDict(frozen=True)
    name: str
    chain_id: int = Field(ge=0)
    contract: str = Addr

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": VERSION, "chainId": self.chain_id,
                "verifyingContract": to_checksum_address(self.contract)}


def token_domain(chain_id: int, token: str) -> Domain:
    return Domain(name=TOKEN_NAME, chain_id=chain_id, contract=token)


def market_domain(chain_id: int, market: str) -> Domain:
    return Domain(name=MARKET_NAME, chain_id=chain_id, contract=market)


def registry_domain(chain_id: int, registry: str) -> Domain:
    return Domain(name=REGISTRY_NAME, chain_id=chain_id, contract=registry)


class Offer(BaseModel):
    """A seller's signed offer: up to ``wh`` Wh at ``min_price_wei_per_kwh`` or more,
    openable until ``expiry`` (Unix s); a trade opened from it runs ``duration_s`` at most."""

    model_config = ConfigDict(frozen=True)
    offer_id: str = Hex32
    seller: str = Addr
    wh: int = Field(gt=0, lt=2**64)
    min_price_wei_per_kwh: int = U128
    expiry: int = U64
    duration_s: int = Field(gt=0, lt=2**32)

    def message(self) -> dict[str, Any]:
        return {"offerId": bytes.fromhex(self.offer_id[2:]), "seller": to_checksum_address(self.seller),
                "wh": self.wh, "minPriceWeiPerKwh": self.min_price_wei_per_kwh, "expiry": self.expiry,
                "durationS": self.duration_s}

    def as_tuple(self) -> tuple[Any, ...]:
        """The contract's ``Offer`` struct argument."""
        return tuple(self.message().values())


class Bid(BaseModel):
    """A buyer's signed bid: up to ``wh`` Wh of ``offer_id`` (ZERO_ID: of any offer) at
    ``max_price_wei_per_kwh`` or less, until ``expiry``."""

    model_config = ConfigDict(frozen=True)
    bid_id: str = Hex32
    offer_id: str = Hex32
    buyer: str = Addr
    wh: int = Field(gt=0, lt=2**64)
    max_price_wei_per_kwh: int = U128
    expiry: int = U64

    def message(self) -> dict[str, Any]:
        return {"bidId": bytes.fromhex(self.bid_id[2:]), "offerId": bytes.fromhex(self.offer_id[2:]),
                "buyer": to_checksum_address(self.buyer), "wh": self.wh,
                "maxPriceWeiPerKwh": self.max_price_wei_per_kwh, "expiry": self.expiry}

    def as_tuple(self) -> tuple[Any, ...]:
        return tuple(self.message().values())


def new_id() -> str:
    """A fresh random 32-byte id for an offer or a bid."""
    return "0x" + os.urandom(32).hex()


def trade_key(trade_id: str) -> bytes:
    """The bytes32 a trade has on-chain: keccak256 of its off-chain id."""
    return keccak(text=trade_id)


def _typed(domain: Domain, primary: str, message: dict[str, Any]) -> Any:
    return encode_typed_data(full_message={
        "types": {"EIP712Domain": [{"name": "name", "type": "string"}, {"name": "version", "type": "string"},
                                   {"name": "chainId", "type": "uint256"},
                                   {"name": "verifyingContract", "type": "address"}],
                  primary: TYPES[primary]},
        "primaryType": primary, "domain": domain.as_dict(), "message": message})


def _sign(key: bytes, domain: Domain, primary: str, message: dict[str, Any]) -> str:
    signed = Account.sign_message(_typed(domain, primary, message), key)
    return "0x" + bytes(signed.signature).hex()


def _recover(domain: Domain, primary: str, message: dict[str, Any], signature: str) -> str | None:
    """The signer, or None for a malformed or high-s signature."""
    try:
        raw = bytes.fromhex(signature.removeprefix("0x"))
        if len(raw) != 65 or raw[64] not in (27, 28) or int.from_bytes(raw[32:64], "big") > _HALF_ORDER:
            return None
        return str(Account.recover_message(_typed(domain, primary, message), signature=raw))
    except Exception:  # noqa: BLE001 - any malformed signature simply recovers nobody
        return None


_HALF_ORDER = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0


def _registration(meter: str, account: str) -> dict[str, Any]:
    return {"meter": to_checksum_address(meter), "account": to_checksum_address(account)}


def _production(meter: str, produced_wh: int) -> dict[str, Any]:
    return {"meter": to_checksum_address(meter), "producedWh": produced_wh}


def _delivery(trade_id: str, wh: int, field: str = "deliveredWh") -> dict[str, Any]:
    return {"tradeId": trade_key(trade_id), field: wh}


def sign_registration(key: bytes, domain: Domain, account: str) -> str:
    """The meter key of ``key`` asks to be registered for ``account``."""
    return _sign(key, domain, "MeterKey", _registration(Account.from_key(key).address, account))


def recover_registration(domain: Domain, meter: str, account: str, signature: str) -> str | None:
    return _recover(domain, "MeterKey", _registration(meter, account), signature)


def sign_production(key: bytes, domain: Domain, produced_wh: int) -> str:
    return _sign(key, domain, "Production", _production(Account.from_key(key).address, produced_wh))


def recover_production(domain: Domain, meter: str, produced_wh: int, signature: str) -> str | None:
    return _recover(domain, "Production", _production(meter, produced_wh), signature)


def sign_delivery(key: bytes, domain: Domain, trade_id: str, delivered_wh: int) -> str:
    return _sign(key, domain, "Delivery", _delivery(trade_id, delivered_wh))


def recover_delivery(domain: Domain, trade_id: str, delivered_wh: int, signature: str) -> str | None:
    return _recover(domain, "Delivery", _delivery(trade_id, delivered_wh), signature)


def sign_export(key: bytes, domain: Domain, trade_id: str, exported_wh: int) -> str:
    return _sign(key, domain, "Export", _delivery(trade_id, exported_wh, "exportedWh"))


def recover_export(domain: Domain, trade_id: str, exported_wh: int, signature: str) -> str | None:
    return _recover(domain, "Export", _delivery(trade_id, exported_wh, "exportedWh"), signature)


def sign_offer(key: bytes, domain: Domain, offer: Offer) -> str:
    return _sign(key, domain, "Offer", offer.message())


def recover_offer(domain: Domain, offer: Offer, signature: str) -> str | None:
    return _recover(domain, "Offer", offer.message(), signature)


def sign_bid(key: bytes, domain: Domain, bid: Bid) -> str:
    return _sign(key, domain, "Bid", bid.message())


def recover_bid(domain: Domain, bid: Bid, signature: str) -> str | None:
    return _recover(domain, "Bid", bid.message(), signature)


def sig_bytes(signature: str) -> bytes:
    return bytes.fromhex(signature.removeprefix("0x"))
