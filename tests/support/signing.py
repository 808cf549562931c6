"""Signed facts for tests, as the sites make them (EIP-712 over services.bus.typed, the
code the services use): one place for every test that needs one.

- Offers and bids of test accounts, as a site's wallet signs them.
- A meter key (:class:`Meter`) that announces itself and signs production and deliveries
  like a site's meter, and :func:`agreed`, a trade signed by both parties, for tests that
  drive the chain service with bus events.

``account("seller")`` is a deterministic test account (its key derived from the name);
``acct.offer(...)`` and ``acct.bid(...)`` return the signed fact and its signature, in
``DOMAIN`` unless told otherwise. A test that forges or alters one builds it with the
keyword arguments (``seller=``, ``buyer=``, ``domain=``, ``key=``) or with
``model_copy(update=...)`` on the result.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import keccak

from services.bus import events as E
from services.bus import typed

CHAIN_ID = 31337
MARKET = "0x" + "4d" * 20
DOMAIN = typed.market_domain(CHAIN_ID, MARKET)


def deployment(chain_id: int = CHAIN_ID, market: str = MARKET, deployment_id: str = "test-deployment") -> E.Deployment:
    """What the operator announces on ``chain.deployment``: its market's domain is ``DOMAIN``."""
    return E.Deployment(chain_id=chain_id, genesis="0x" + "00" * 32, token="0x" + "70" * 20, market=market,
                        registry="0x" + "7e" * 20, deploy_block=0, deployment=deployment_id)


def later(s: float = 3600) -> int:
    """A Unix time ``s`` seconds from now (an expiry)."""
    return int(time.time() + s)


@dataclass(frozen=True)
class TestAccount:
    __test__ = False  # not a pytest test class
    name: str
    key: bytes

    @property
    def address(self) -> str:
        return str(Account.from_key(self.key).address)

    def offer(self, *, wh: int, price: int, expiry: int | None = None, duration_s: int = 3600,
              offer_id: str | None = None, seller: str | None = None, domain: typed.Domain = DOMAIN,
              key: bytes | None = None) -> tuple[typed.Offer, str]:
        """This account's signed offer (``seller``/``key``: another seller named, another key
        signing: forgeries)."""
        o = typed.Offer(offer_id=offer_id or typed.new_id(), seller=seller or self.address, wh=wh,
                        min_price_wei_per_kwh=price, expiry=expiry if expiry is not None else later(),
                        duration_s=duration_s)
        return o, typed.sign_offer(key or self.key, domain, o)

    def bid(self, *, offer_id: str, wh: int, price: int, expiry: int | None = None, bid_id: str | None = None,
            buyer: str | None = None, domain: typed.Domain = DOMAIN, key: bytes | None = None) -> tuple[typed.Bid, str]:
        """This account's signed bid for the signed offer ``offer_id`` (``typed.ZERO_ID``: a
        double-auction buy order)."""
        b = typed.Bid(bid_id=bid_id or typed.new_id(), offer_id=offer_id, buyer=buyer or self.address, wh=wh,
                      max_price_wei_per_kwh=price, expiry=expiry if expiry is not None else later())
        return b, typed.sign_bid(key or self.key, domain, b)


@cache
def account(name: str) -> TestAccount:
    return TestAccount(name=name, key=keccak(text=f"gridtrade test account {name}"))


def sign(fact: typed.Offer | typed.Bid, key: bytes, domain: typed.Domain = DOMAIN) -> str:
    """A signature of an offer or bid as given (e.g. one altered after signing)."""
    return typed.sign_offer(key, domain, fact) if isinstance(fact, typed.Offer) else typed.sign_bid(key, domain, fact)


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


def agreed(d: Domains, trade_id: str, seller_key: bytes, buyer_key: bytes, wh: int, price: int, *,
           seller_site: str, buyer_site: str, **kw: Any) -> E.TradeAgreed:
    """A TradeAgreed as the auction publishes it: the seller's offer and the buyer's bid, signed."""
    seller, buyer = TestAccount("seller", seller_key), TestAccount("buyer", buyer_key)
    o, osig = seller.offer(wh=wh, price=price, domain=d.market_domain, **kw)
    b, bsig = buyer.bid(offer_id=o.offer_id, wh=wh, price=price, domain=d.market_domain)
    return E.TradeAgreed(trade_id=trade_id, offer_id=trade_id, seller=o.seller, buyer=b.buyer,
                         seller_site=seller_site, buyer_site=buyer_site, wh=wh, price_wei_per_kwh=price,
                         offer=o, offer_signature=osig, bid=b, bid_signature=bsig)
