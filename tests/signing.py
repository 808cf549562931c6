"""Signed offers and bids of test accounts, as a site's wallet makes them (EIP-712, the
market domain of a deployment): one place for every test that needs one.

``account("seller")`` is a deterministic test account (its key derived from the name);
``acct.offer(...)`` and ``acct.bid(...)`` return the signed fact and its signature, in
``DOMAIN`` unless told otherwise. A test that forges or alters one builds it with the
keyword arguments (``seller=``, ``buyer=``, ``domain=``, ``key=``) or with
``model_copy(update=...)`` on the result.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cache

from eth_account import Account
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
