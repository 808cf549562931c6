"""Signed facts for tests: a meter key that signs like a site's meter, and trades signed
by their two parties, over the real EIP-712 code (services.bus.typed) the services use.

Tests that drive the chain service with bus events (no meter service, no wallet signing
request) use these to publish what a site would: ``MeterKey`` then signed
``EnergyProduced`` and ``Delivery``, and ``TradeAgreed`` carrying a signed offer and bid.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from eth_account import Account
from eth_account.signers.local import LocalAccount

from services.bus import events as E
from services.bus import typed


@dataclass(frozen=True)
class Domains:
    """What a site learns from ``chain.deployment``."""

    chain_id: int
    token: str
    market: str
    registry: str

    @classmethod
    def of(cls, dep: Any) -> Domains:
        """From an ``E.Deployment`` or a running operator service."""
        if isinstance(dep, E.Deployment):
            return cls(dep.chain_id, dep.token, dep.market, dep.registry)
        return cls(dep.chain_id, dep.dep.token_address, dep.dep.market_address, dep.dep.registry_address)

    @property
    def market_domain(self) -> typed.Domain:
        return typed.market_domain(self.chain_id, self.market)


@dataclass
class Meter:
    """A meter key at ``site``, crediting ``account``."""

    site: str
    account: str
    name: str = "m1"
    key: LocalAccount = field(default_factory=Account.create)

    @property
    def address(self) -> str:
        return str(self.key.address)

    def announce(self, d: Domains) -> E.MeterKey:
        return E.MeterKey(site=self.site, meter=self.name, address=self.address, account=self.account,
                          chain_id=d.chain_id, registry=d.registry,
                          signature=typed.sign_registration(bytes(self.key.key), typed.registry_domain(
                              d.chain_id, d.registry), self.account))

    def production(self, d: Domains, produced_wh: int) -> E.EnergyProduced:
        return E.EnergyProduced(site=self.site, meter=self.name, meter_address=self.address, produced_wh=produced_wh,
                                chain_id=d.chain_id, token=d.token,
                                signature=typed.sign_production(bytes(self.key.key), typed.token_domain(
                                    d.chain_id, d.token), produced_wh))

    def delivery(self, d: Domains, trade_id: str, wh: int, *, final: bool = False) -> E.Delivery:
        return E.Delivery(trade_id=trade_id, site=self.site, meter=self.name, role="consumer", delivered_wh=wh,
                          final=final, meter_address=self.address,
                          signature=typed.sign_delivery(bytes(self.key.key), d.market_domain, trade_id, wh))


def offer(d: Domains, seller_key: bytes, wh: int, min_price: int, *, expiry: int | None = None,
          duration_s: int = 3600) -> tuple[typed.Offer, str]:
    o = typed.Offer(offer_id=typed.new_id(), seller=Account.from_key(seller_key).address, wh=wh,
                    min_price_wei_per_kwh=min_price, expiry=expiry or int(time.time()) + 600, duration_s=duration_s)
    return o, typed.sign_offer(seller_key, d.market_domain, o)


def bid(d: Domains, buyer_key: bytes, o: typed.Offer | None, wh: int, max_price: int, *,
        expiry: int | None = None) -> tuple[typed.Bid, str]:
    b = typed.Bid(bid_id=typed.new_id(), offer_id=o.offer_id if o else typed.ZERO_ID,
                  buyer=Account.from_key(buyer_key).address, wh=wh, max_price_wei_per_kwh=max_price,
                  expiry=expiry or int(time.time()) + 600)
    return b, typed.sign_bid(buyer_key, d.market_domain, b)


def agreed(d: Domains, trade_id: str, seller_key: bytes, buyer_key: bytes, wh: int, price: int, *,
           seller_site: str, buyer_site: str, **kw: Any) -> E.TradeAgreed:
    """A TradeAgreed as the auction publishes it: the seller's offer and the buyer's bid, signed."""
    o, osig = offer(d, seller_key, wh, price, **kw)
    b, bsig = bid(d, buyer_key, o, wh, price)
    return E.TradeAgreed(trade_id=trade_id, offer_id=trade_id, seller=o.seller, buyer=b.buyer,
                         seller_site=seller_site, buyer_site=buyer_site, wh=wh, price_wei_per_kwh=price,
                         offer=o, offer_signature=osig, bid=b, bid_signature=bsig)
