"""Freshly deployed contracts for the contract tests (:class:`Env`, made by :func:`make_env`;
the ``env`` and ``funded`` fixtures are in tests/contracts/conftest.py), run on both chains
(``w3`` is parametrized over embedded py-evm and anvil).

`env` deploys the three v2 contracts with a key per role (admin, operator, registrar, pauser,
each a dev account), and names a seller and a buyer (dev accounts whose keys sign offers and
bids), a stranger (`other`), and one registered meter key per party (local keys: a meter never
sends transactions, it only signs).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import keccak
from web3 import AsyncWeb3
from web3.logs import EventLogErrorFlags
from web3.providers.eth_tester import AsyncEthereumTesterProvider
from web3.types import TxReceipt

from services.bus import typed
from services.chain import bindings as c

ETHER = 10**18
DISPUTE_WINDOW_S = 3600
DURATION_S = 7200
PRICE = 2 * 10**15  # wei per kWh
ANVIL_MNEMONIC = "test test test test test test test test test test test junk"
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141

Account.enable_unaudited_hdwallet_features()
_ids = itertools.count()


def dev_keys(w3: AsyncWeb3, accounts: list[str]) -> dict[str, bytes]:
    """Private keys of the node's unlocked dev accounts (eth-tester's, or anvil's default mnemonic)."""
    if isinstance(w3.provider, AsyncEthereumTesterProvider):
        keys = [k.to_bytes() for k in w3.provider.ethereum_tester.backend.account_keys]
    else:
        keys = [bytes(Account.from_mnemonic(ANVIL_MNEMONIC, account_path=f"m/44'/60'/0'/0/{i}").key)
                for i in range(len(accounts))]
    out = {Account.from_key(k).address: k for k in keys}
    assert all(a in out for a in accounts)
    return out


def meter_key(label: str) -> LocalAccount:
    """A meter's key, fixed per label so failures reproduce."""
    return Account.from_key(keccak(text=f"meter/{label}"))


def high_s(sig: bytes) -> bytes:
    """The other valid encoding of a signature (s -> n - s, v flipped): what EIP-2 refuses."""
    r, s, v = sig[:32], int.from_bytes(sig[32:64], "big"), sig[64]
    return r + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - v])


def new_id() -> str:
    """A fresh off-chain id (offer, bid or trade)."""
    return f"t-{next(_ids)}-{typed.new_id()[2:10]}"


async def constructor_reverts(w3: AsyncWeb3, name: str, args: tuple[Any, ...], sender: str) -> str | None:
    """Deploy the contract ``name`` with constructor ``args``, which must revert: the revert
    reason (None when none can be read)."""
    art = c.load_artifact(name)
    factory = w3.eth.contract(abi=art["abi"], bytecode=art["bytecode"])
    try:
        await c.send(w3, factory.constructor(*args), sender)
    except Exception as exc:  # the backend decides the exception type; revert_reason reads both
        return c.revert_reason(exc)
    pytest.fail("deployed")


@dataclass
class Env:
    """Freshly deployed contracts, a dev account per role and party, and the parties' meter keys."""

    w3: AsyncWeb3
    d: c.Deployment
    chain_id: int
    admin: str
    operator: str
    registrar: str
    pauser: str
    seller: str
    buyer: str
    other: str
    keys: dict[str, bytes]
    seller_meter: LocalAccount
    buyer_meter: LocalAccount

    # ------------------------------------------------------------ contracts

    @property
    def registry(self) -> Any:
        return self.d.registry.functions

    @property
    def token(self) -> Any:
        return self.d.token.functions

    @property
    def market(self) -> Any:
        return self.d.market.functions

    @property
    def market_domain(self) -> typed.Domain:
        return self.d.market_domain(self.chain_id)

    @property
    def token_domain(self) -> typed.Domain:
        return self.d.token_domain(self.chain_id)

    @property
    def registry_domain(self) -> typed.Domain:
        return self.d.registry_domain(self.chain_id)

    async def tx(self, call: Any, sender: str, value: int = 0) -> TxReceipt:
        """Send and return the receipt (status 1)."""
        return await c.send(self.w3, call, sender, value)

    async def reverts(self, call: Any, sender: str, value: int = 0) -> str:
        """Send a call that must revert; return its revert reason."""
        try:
            await c.send(self.w3, call, sender, value)
        except Exception as exc:  # the backend decides the exception type; revert_reason reads both
            reason = c.revert_reason(exc)
            if reason is None:
                raise
            return reason
        pytest.fail("call did not revert")

    def events(self, receipt: TxReceipt, contract: Any, name: str) -> list[dict[str, Any]]:
        """Decoded `name` events emitted by `contract` in `receipt`."""
        event = getattr(contract.events, name)()
        return [dict(e["args"]) for e in event.process_receipt(receipt, errors=EventLogErrorFlags.Discard)
                if e["address"] == contract.address]

    # ------------------------------------------------------------ balances

    async def eth(self, address: str) -> int:
        return await self.w3.eth.get_balance(address)

    async def escrow(self, account: str) -> tuple[int, int, int, int, int]:
        """(free, reserved, reservedUntil, locked, credit) of `account`."""
        return tuple(await self.market.escrowOf(account).call())

    async def tokens(self, account: str) -> int:
        return await self.token.balanceOf(account).call()

    async def trade(self, trade_id: str) -> list[Any]:
        """trades(id): [seller, wh, status, buyer, deliveredWh, price, deadline, closingAt]."""
        return await self.market.trades(typed.trade_key(trade_id)).call()

    async def books(self, *trade_ids: str) -> tuple:
        """Everything a party owns here, and the given trades: equal before and after a refused call."""
        m = self.d.market.address
        parties = (self.seller, self.buyer, self.other, self.operator, m)
        return (
            [await self.escrow(a) for a in parties],
            [await self.tokens(a) for a in parties],
            await self.eth(m),
            await self.token.totalSupply().call(),
            [await self.trade(t) for t in trade_ids],
        )

    @contextlib.asynccontextmanager
    async def books_unchanged(self, *trade_ids: str) -> AsyncIterator[None]:
        """What runs inside moves nothing: :meth:`books` (of these trades) reads the same after as before."""
        before = await self.books(*trade_ids)
        yield
        after = await self.books(*trade_ids)
        assert after == before, (before, after)

    # ------------------------------------------------------------ time

    async def now(self) -> int:
        return int((await self.w3.eth.get_block("latest"))["timestamp"])

    async def at(self, timestamp: int) -> None:
        """The next transaction runs at `timestamp` (later than the latest block's): exactly on the
        embedded chain; on anvil a block is mined at `timestamp` first (anvil's gas estimate, which
        is where a revert is seen, runs on the latest block), so the transaction runs a little later."""
        if isinstance(self.w3.provider, AsyncEthereumTesterProvider):
            self.w3.provider.ethereum_tester.time_travel(timestamp)
        else:
            await self.w3.provider.make_request("evm_setNextBlockTimestamp", [timestamp])
            await self.w3.provider.make_request("evm_mine", [])

    async def advance(self, seconds: int) -> int:
        """Move the chain's time `seconds` past the latest block; return the new time."""
        target = await self.now() + seconds
        await self.at(target)
        return target

    # ------------------------------------------------------------ signed facts

    async def register(self, meter: LocalAccount, account: str) -> TxReceipt:
        sig = typed.sign_registration(meter.key, self.registry_domain, account)
        return await self.tx(self.registry.register(meter.address, account, typed.sig_bytes(sig)), self.registrar)

    def production(self, meter: LocalAccount, produced_wh: int) -> bytes:
        return typed.sig_bytes(typed.sign_production(meter.key, self.token_domain, produced_wh))

    async def mint(self, meter: LocalAccount, produced_wh: int) -> TxReceipt:
        return await self.tx(self.token.mint(meter.address, produced_wh, self.production(meter, produced_wh)), self.other)

    def delivery(self, trade_id: str, delivered_wh: int, meter: LocalAccount | None = None,
                 domain: typed.Domain | None = None) -> bytes:
        key = (meter or self.buyer_meter).key
        return typed.sig_bytes(typed.sign_delivery(key, domain or self.market_domain, trade_id, delivered_wh))

    async def offer(self, wh: int = 2000, price: int = PRICE, *, seller: str | None = None, expiry: int | None = None,
                    duration_s: int = DURATION_S, offer_id: str | None = None,
                    key: bytes | None = None) -> tuple[typed.Offer, bytes]:
        seller = seller or self.seller
        offer = typed.Offer(offer_id=offer_id or typed.new_id(), seller=seller, wh=wh, min_price_wei_per_kwh=price,
                            expiry=expiry if expiry is not None else await self.now() + 3600, duration_s=duration_s)
        return offer, typed.sig_bytes(typed.sign_offer(key or self.keys[seller], self.market_domain, offer))

    async def bid(self, offer: typed.Offer | None, wh: int = 2000, price: int = PRICE, *, buyer: str | None = None,
                  expiry: int | None = None, bid_id: str | None = None,
                  key: bytes | None = None) -> tuple[typed.Bid, bytes]:
        buyer = buyer or self.buyer
        bid = typed.Bid(bid_id=bid_id or typed.new_id(), offer_id=offer.offer_id if offer else typed.ZERO_ID,
                        buyer=buyer, wh=wh, max_price_wei_per_kwh=price,
                        expiry=expiry if expiry is not None else await self.now() + 3600)
        return bid, typed.sig_bytes(typed.sign_bid(key or self.keys[buyer], self.market_domain, bid))

    def open(self, trade_id: str, offer: typed.Offer, offer_sig: bytes, bid: typed.Bid, bid_sig: bytes,
             wh: int, price: int) -> Any:
        return self.market.open(typed.trade_key(trade_id), offer.as_tuple(), offer_sig, bid.as_tuple(), bid_sig,
                                wh, price)

    async def open_reverts(self, offer: typed.Offer, offer_sig: bytes, bid: typed.Bid, bid_sig: bytes, wh: int,
                           price: int, sender: str | None = None) -> str:
        """Open a trade of a new id, sent by the operator unless ``sender``; it must revert:
        return its revert reason."""
        return await self.reverts(self.open(new_id(), offer, offer_sig, bid, bid_sig, wh, price),
                                  sender or self.operator)

    async def fund(self, seller_wh: int = 10_000, buyer_wei: int = ETHER) -> None:
        """The seller holds `seller_wh` tokens (minted by its meter) and approved the market for
        all; the buyer has `buyer_wei` of free escrow."""
        minted = await self.token.mintedOf(self.seller_meter.address).call()
        await self.mint(self.seller_meter, minted + seller_wh)
        await self.tx(self.token.approve(self.d.market.address, 2**256 - 1), self.seller)
        await self.tx(self.market.deposit(), self.buyer, value=buyer_wei)

    async def open_trade(self, wh: int = 2000, price: int = PRICE, trade_id: str | None = None) -> str:
        """Open a trade of `wh` at `price` from a fresh offer and bid of exactly that size."""
        trade_id = trade_id or new_id()
        offer, osig = await self.offer(wh, price)
        bid, bsig = await self.bid(offer, wh, price)
        await self.tx(self.open(trade_id, offer, osig, bid, bsig, wh, price), self.operator)
        return trade_id

    async def settle(self, trade_id: str, delivered_wh: int, sender: str | None = None) -> TxReceipt:
        sig = self.delivery(trade_id, delivered_wh)
        return await self.tx(self.market.settle(typed.trade_key(trade_id), delivered_wh, sig), sender or self.other)


def fee(receipt: TxReceipt) -> int:
    """Ether the sender paid for gas."""
    return receipt["gasUsed"] * receipt["effectiveGasPrice"]


async def make_env(w3: AsyncWeb3, *, register: bool = True) -> Env:
    accounts = await w3.eth.accounts
    admin, operator, registrar, pauser, seller, buyer, other = accounts[:7]
    d = await c.deploy(w3, admin, operator=operator, registrar=registrar, pauser=pauser,
                       dispute_window_s=DISPUTE_WINDOW_S)
    env = Env(w3=w3, d=d, chain_id=await w3.eth.chain_id, admin=admin, operator=operator, registrar=registrar,
              pauser=pauser, seller=seller, buyer=buyer, other=other, keys=dev_keys(w3, accounts[:7]),
              seller_meter=meter_key(f"seller-{d.registry_address}"), buyer_meter=meter_key(f"buyer-{d.registry_address}"))
    if register:
        await env.register(env.seller_meter, seller)
        await env.register(env.buyer_meter, buyer)
    return env
