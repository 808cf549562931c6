"""Property-based stateful test: random sequences of registry, token and market calls, valid and
invalid, signed, unsigned, forged, tampered and replayed, by the parties, the operator and a
stranger, with time travel; on anvil and on the embedded chain (synchronous Web3; each example
starts from a snapshot).

A plain-Python model predicts every call's outcome (success, or the exact revert reason) at the
exact block time the call runs at (every transaction's timestamp is set), and the resulting
balances. After every step, against the chain:
- Ether held by the market == Σ free + Σ reserved + Σ locked + Σ credit, and each account's
  five balances and its tokens equal the model's;
- tokens minted == Σ of the signed production deltas (== Σ of the meters' signed counters
  minted), and they are conserved: totalSupply == Σ balances, the market holding exactly the
  undelivered Wh of its open and closing trades;
- each trade is the model's, its fills too, and its seller was paid exactly
  floor(delivered × price / 1000) (the sum of its Settled events), where delivered is at most
  what the buyer's registered meter signed for it;
- a stranger's calls that carry no party's valid signature and complete no trade move no
  party's Ether or tokens (read from the chain before and after each such call).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_abi import decode as abi_decode
from eth_utils import keccak, to_checksum_address
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test
from web3 import EthereumTesterProvider, Web3
from web3.logs import EventLogErrorFlags

from services.bus import typed
from services.chain import bindings as c
from services.bus.prices import wei_for

from tests.support.contracts import ANVIL_MNEMONIC, high_s

N_TRADE_IDS = 10
MAX_WH = 3000
MAX_PRICE = 10**16  # wei per kWh
WINDOW = 1000  # dispute window, s
GAS = 3_000_000
M = "EnergyMarket: "
T = "EnergyToken: "
MAX256 = 2**256 - 1

Account.enable_unaudited_hdwallet_features()


# ---------------------------------------------------------------------- the chain


@dataclass
class Chain:
    """Deployed contracts, the dev accounts' roles and keys, the meters."""

    w3: Web3
    anvil: bool
    registry: Any
    token: Any
    market: Any
    operator: str
    registrar: str
    pauser: str
    sellers: list[str]
    buyers: list[str]
    other: str
    keys: dict[str, bytes]
    meters: dict[str, LocalAccount]  # party -> its registered meter key
    revoked: LocalAccount  # once registered for buyers[1], revoked
    forger: LocalAccount  # never registered
    chain_id: int

    @property
    def parties(self) -> list[str]:
        return sorted(set(self.sellers + self.buyers))

    @property
    def everyone(self) -> list[str]:
        return [*self.parties, self.other, self.operator]

    def set_time(self, timestamp: int) -> None:
        """The next transaction runs in a block with exactly this timestamp."""
        if self.anvil:
            assert self.w3.provider.make_request("evm_setNextBlockTimestamp", [timestamp]).get("error") is None
        else:
            self.w3.provider.ethereum_tester.time_travel(timestamp)

    def send(self, call: Any, sender: str, value: int = 0) -> tuple[Any, str | None]:
        """(receipt, None) when the call succeeds, (None, reason) when it reverts."""
        if not self.anvil:  # the pending block carries the time set: a call there is the transaction's dry run
            try:
                call.call({"from": sender, "value": value}, block_identifier="pending")
            except Exception as exc:
                reason = c.revert_reason(exc)
                if reason is None:
                    raise
                return None, reason
        tx_hash = call.transact({"from": sender, "value": value, "gas": GAS})
        receipt = self.w3.eth.wait_for_transaction_receipt(tx_hash)
        if receipt["status"] == 1:
            return receipt, None
        assert self.anvil
        trace = self.w3.provider.make_request("debug_traceTransaction", [tx_hash.to_0x_hex(), {"tracer": "callTracer"}])
        return None, str(trace["result"].get("revertReason", ""))

    def read(self, calls: list[tuple[Any, str, tuple[Any, ...]]]) -> list[Any]:
        """The results of many view calls (contract, function, args): one JSON-RPC batch on anvil.
        A single output comes back as itself, several as a tuple."""
        if not self.anvil:
            out = [getattr(contract.functions, fn)(*args).call() for contract, fn, args in calls]
            return [tuple(r) if isinstance(r, list) else r for r in out]
        requests = [("eth_call", [{"to": contract.address, "data": contract.encode_abi(fn, args=list(args))}, "latest"])
                    for contract, fn, args in calls]
        results = []
        for (contract, fn, args), answer in zip(calls, self.w3.provider.make_batch_request(requests)):
            types = [o["type"] for o in contract.get_function_by_name(fn).abi["outputs"]]
            values = abi_decode(types, bytes.fromhex(answer["result"][2:]))
            values = tuple(to_checksum_address(v) if t == "address" else v for t, v in zip(types, values))
            results.append(values[0] if len(values) == 1 else values)
        return results

    def snapshot(self) -> Any:
        if self.anvil:
            return self.w3.provider.make_request("evm_snapshot", [])["result"]
        return self.w3.provider.ethereum_tester.take_snapshot()

    def revert(self, snap: Any) -> None:
        if self.anvil:
            assert self.w3.provider.make_request("evm_revert", [snap])["result"] is True
        else:
            self.w3.provider.ethereum_tester.revert_to_snapshot(snap)

    def market_domain(self) -> typed.Domain:
        return typed.market_domain(self.chain_id, self.market.address)

    def token_domain(self) -> typed.Domain:
        return typed.token_domain(self.chain_id, self.token.address)


def deploy(w3: Web3, anvil: bool) -> Chain:
    accounts = w3.eth.accounts
    admin, operator, registrar, pauser = accounts[:4]
    sellers, buyers, other = accounts[4:7], accounts[6:9], accounts[9]  # accounts[6] sells and buys
    if anvil:
        keys = [bytes(Account.from_mnemonic(ANVIL_MNEMONIC, account_path=f"m/44'/60'/0'/0/{i}").key) for i in range(10)]
    else:
        keys = [k.to_bytes() for k in w3.provider.ethereum_tester.backend.account_keys[:10]]
    keys_by = {Account.from_key(k).address: k for k in keys}

    def new(name: str, *args: Any) -> Any:
        art = c.load_artifact(name)
        tx = w3.eth.contract(abi=art["abi"], bytecode=art["bytecode"]).constructor(*args).transact({"from": admin})
        return w3.eth.contract(address=w3.eth.wait_for_transaction_receipt(tx)["contractAddress"], abi=art["abi"])

    def mined(call: Any, sender: str) -> None:
        assert w3.eth.wait_for_transaction_receipt(call.transact({"from": sender}))["status"] == 1

    registry = new(c.REGISTRY, admin, registrar)
    token = new(c.TOKEN, registry.address, admin, pauser)
    market = new(c.MARKET, token.address, registry.address, admin, operator, pauser, WINDOW)
    chain_id = w3.eth.chain_id
    reg_domain = typed.registry_domain(chain_id, registry.address)
    meters = {p: Account.from_key(keccak(text=f"invariants/meter/{p}")) for p in sorted(set(sellers + buyers))}
    revoked = Account.from_key(keccak(text="invariants/revoked"))
    for meter, account in [*((m, p) for p, m in meters.items()), (revoked, buyers[1])]:
        sig = typed.sig_bytes(typed.sign_registration(meter.key, reg_domain, account))
        mined(registry.functions.register(meter.address, account, sig), registrar)
    mined(registry.functions.revoke(revoked.address), registrar)
    return Chain(w3=w3, anvil=anvil, registry=registry, token=token, market=market, operator=operator,
                 registrar=registrar, pauser=pauser, sellers=sellers, buyers=buyers, other=other, keys=keys_by,
                 meters=meters, revoked=revoked, forger=Account.from_key(keccak(text="invariants/forger")),
                 chain_id=chain_id)


# ---------------------------------------------------------------------- the model


@dataclass
class Trade:
    seller: str
    buyer: str
    wh: int
    price: int
    deadline: int
    delivered: int = 0
    status: int = c.STATUS_OPEN
    closing_at: int = 0


@dataclass
class Model:
    """What the contracts should hold. Accounts are checksummed addresses."""

    free: dict[str, int] = field(default_factory=dict)
    reserved: dict[str, int] = field(default_factory=dict)
    until: dict[str, int] = field(default_factory=dict)
    locked: dict[str, int] = field(default_factory=dict)
    credit: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    allowance: dict[str, int] = field(default_factory=dict)
    minted: dict[str, int] = field(default_factory=dict)  # meter -> highest signed counter minted
    trades: dict[int, Trade] = field(default_factory=dict)
    offer_filled: dict[tuple[str, str], int] = field(default_factory=dict)
    bid_filled: dict[tuple[str, str], int] = field(default_factory=dict)
    market_paused: bool = False
    token_paused: bool = False

    def add(self, book: str, account: str, amount: int) -> None:
        d = getattr(self, book)
        d[account] = d.get(account, 0) + amount
        assert d[account] >= 0, (book, account)

    def settleable(self, t: Trade | None, now: int) -> bool:
        return t is not None and (t.status == c.STATUS_OPEN or
                                  (t.status == c.STATUS_CLOSING and now < t.closing_at + WINDOW))

    def settle(self, tid: int, target: int, market: str) -> None:
        """Move trade `tid` to `target` Wh (checked by the caller)."""
        t = self.trades[tid]
        paid = wei_for(target, t.price) - wei_for(t.delivered, t.price)
        self.add("locked", t.buyer, -paid)
        self.add("credit", t.seller, paid)
        self.add("tokens", market, -(target - t.delivered))
        self.add("tokens", t.buyer, target - t.delivered)
        t.delivered = target
        if target == t.wh:
            t.status = c.STATUS_CLOSED


@dataclass
class Signed:
    """An offer or a bid signed off-chain, as the auction would hold it."""

    terms: Any
    sig: bytes


class MarketMachine(RuleBasedStateMachine):
    def __init__(self, chain: Chain) -> None:
        super().__init__()
        self.chain = chain
        self.model = Model()
        self.snap = chain.snapshot()
        # py-evm dates its pending block by the wall clock and cannot go back: the model's clock
        # starts a day ahead, so that a slow run's wall clock never overtakes it
        self.now = int(chain.w3.eth.get_block("pending")["timestamp"]) + 1 + (0 if chain.anvil else 86400)
        self.offers: list[Signed] = []
        self.bids: list[Signed] = []
        self.paid: dict[int, int] = {}  # Σ Settled.paidWei per trade, from the receipts
        self.signed_max: dict[int, int] = {}  # highest delivery the buyer's registered meter signed, per trade

    def teardown(self) -> None:
        self.chain.revert(self.snap)

    # -------------------------------------------------------------- helpers

    tid_of = {typed.trade_key(f"trade-{i}"): i for i in range(N_TRADE_IDS)}

    def call(self, call: Any, sender: str, expected: str | None, value: int = 0,
             moves_parties: bool = True) -> Any:
        """Run `call` at the model's time and check its outcome. A stranger's call that reverts,
        or that touches only the stranger's own escrow (`moves_parties` False), is checked
        against the parties' books on the chain, read before and after: it moved nothing of theirs."""
        ch = self.chain
        guard = sender == ch.other and (expected is not None or not moves_parties)
        before = self.party_funds() if guard else None
        ch.set_time(self.now)
        receipt, reason = ch.send(call, sender, value)
        self.now += 1
        event(f"{call.fn_name}: {reason or 'ok'}")
        assert reason == expected, (call.fn_name, reason, expected)
        if guard:
            assert self.party_funds() == before, call.fn_name
        if receipt is not None:
            for e in ch.market.events.Settled().process_receipt(receipt, errors=EventLogErrorFlags.Discard):
                tid = self.tid_of[bytes(e["args"]["tradeId"])]
                self.paid[tid] = self.paid.get(tid, 0) + e["args"]["paidWei"]
        return receipt

    def party_funds(self) -> list[Any]:
        ch = self.chain
        return ch.read([(ch.market, "escrowOf", (p,)) for p in ch.parties] +
                       [(ch.token, "balanceOf", (p,)) for p in ch.parties])

    def pick_tid(self, data: st.DataObject, *statuses: int) -> int:
        """Mostly a trade in one of `statuses` (any known trade if none is), sometimes any id."""
        known = sorted(self.model.trades)
        preferred = [t for t in known if self.model.trades[t].status in statuses] or known
        ids = st.integers(0, N_TRADE_IDS - 1)
        if not preferred:
            return data.draw(ids, label="tid")
        return data.draw(st.sampled_from(preferred) | st.sampled_from(preferred) | ids, label="tid")

    def reading(self, data: st.DataObject, tid: int) -> int:
        """Mostly forward within the trade; sometimes the same, backwards, complete or beyond."""
        t = self.model.trades.get(tid)
        if t is None:
            return data.draw(st.integers(0, MAX_WH), label="delivered")
        return data.draw(st.integers(t.delivered, t.wh) | st.integers(0, t.wh + 2) |
                         st.sampled_from([t.delivered, t.wh, t.wh + 1000]), label="delivered")

    def delivery_sig(self, data: st.DataObject, tid: int, delivered: int) -> tuple[bytes, str | None, bool]:
        """(signature, the revert reason it earns if the entry is looked at, whether it is the
        buyer meter's valid signature)."""
        ch, t = self.chain, self.model.trades.get(tid)
        kind = data.draw(st.sampled_from(["buyer"] * 5 + ["seller", "forger", "revoked", "cross-trade", "high-s"]),
                         label="signer")
        name = f"trade-{tid}"
        buyer_meter = ch.meters[t.buyer] if t else ch.forger
        key = {"buyer": buyer_meter, "high-s": buyer_meter, "cross-trade": buyer_meter, "forger": ch.forger,
               "revoked": ch.revoked, "seller": ch.meters[t.seller] if t else ch.forger}[kind]
        signed_name = f"trade-{(tid + 1) % N_TRADE_IDS}" if kind == "cross-trade" else name
        sig = typed.sig_bytes(typed.sign_delivery(key.key, ch.market_domain(), signed_name, delivered))
        if kind == "high-s":
            return high_s(sig), M + "bad signature", False
        valid = kind == "buyer" and t is not None
        return sig, None if valid else M + "signer is not the buyer's meter", valid

    # -------------------------------------------------------------- set-up

    @initialize(deposits=st.lists(st.integers(10**16, 10**18), min_size=3, max_size=3),
                mints=st.lists(st.integers(1, 2 * MAX_WH), min_size=3, max_size=3))
    def fund(self, deposits: list[int], mints: list[int]) -> None:
        """Start with escrow for every buyer and approved tokens for every seller, so that many
        trades open; the rules move away from there."""
        ch = self.chain
        for acct, amount in zip(ch.buyers, deposits):
            self.do_deposit(acct, amount)
        for acct, amount in zip(ch.sellers, mints):
            self.do_mint(ch.meters[acct], amount, "meter", ch.other)
            self.do_approve(acct, MAX256)

    # -------------------------------------------------------------- escrow

    def account(self, data: st.DataObject) -> str:
        return data.draw(st.sampled_from([*self.chain.parties, self.chain.other]), label="account")

    def amount(self, data: st.DataObject, around: int) -> int:
        return data.draw(st.sampled_from([0, 1, around, around + 1]) | st.integers(0, 10**18), label="amount")

    def until(self, data: st.DataObject) -> int:
        return self.now + data.draw(st.sampled_from([-100, 0, 30, 500, 5000]), label="until")

    @rule(op=st.sampled_from(["deposit", "deposit_and_reserve", "reserve", "release", "withdraw",
                              "withdraw_credit", "approve"]), data=st.data())
    def escrow(self, op: str, data: st.DataObject) -> None:
        """One escrow call by a party or the stranger, or a seller's approval (one rule, so that
        trades get their share of the steps)."""
        if op == "approve":
            seller = data.draw(st.sampled_from(self.chain.sellers), label="seller")
            self.do_approve(seller, data.draw(st.sampled_from([0, 500, MAX256]) | st.integers(0, 2 * MAX_WH),
                                              label="allow"))
        elif op == "deposit":
            self.do_deposit(self.account(data), data.draw(st.integers(0, 10**18) | st.just(0), label="value"))
        else:
            getattr(self, op)(data)

    def do_deposit(self, acct: str, value: int) -> None:
        expected = M + "zero deposit" if value == 0 else None
        self.call(self.chain.market.functions.deposit(), acct, expected, value=value, moves_parties=False)
        if expected is None:
            self.model.add("free", acct, value)

    def deposit_and_reserve(self, data: st.DataObject) -> None:
        acct, until = self.account(data), self.until(data)
        value = data.draw(st.integers(0, 10**18) | st.just(0), label="value")
        m = self.model
        expected = M + "paused" if m.market_paused else (M + "zero deposit" if value == 0 else None)
        self.call(self.chain.market.functions.depositAndReserve(until), acct, expected, value=value,
                  moves_parties=False)
        if expected is None:
            m.add("reserved", acct, value)
            m.until[acct] = max(m.until.get(acct, 0), until)

    def reserve(self, data: st.DataObject) -> None:
        acct, m = self.account(data), self.model
        amount, until = self.amount(data, m.free.get(acct, 0)), self.until(data)
        if m.market_paused:
            expected = M + "paused"
        elif amount > m.free.get(acct, 0):
            expected = M + "amount exceeds free escrow"
        else:
            expected = None
        self.call(self.chain.market.functions.reserve(amount, until), acct, expected, moves_parties=False)
        if expected is None:
            m.add("free", acct, -amount)
            m.add("reserved", acct, amount)
            m.until[acct] = max(m.until.get(acct, 0), until)

    def release(self, data: st.DataObject) -> None:
        acct, m = self.account(data), self.model
        amount = self.amount(data, m.reserved.get(acct, 0))
        if amount == 0:
            expected = M + "zero amount"
        elif self.now < m.until.get(acct, 0):
            expected = M + "escrow reserved until later"
        elif amount > m.reserved.get(acct, 0):
            expected = M + "amount exceeds reserved escrow"
        else:
            expected = None
        self.call(self.chain.market.functions.release(amount), acct, expected, moves_parties=False)
        if expected is None:
            m.add("reserved", acct, -amount)
            m.add("free", acct, amount)

    def withdraw(self, data: st.DataObject) -> None:
        acct, m = self.account(data), self.model
        free, reserved = m.free.get(acct, 0), m.reserved.get(acct, 0)
        amount = self.amount(data, free + reserved)
        if amount == 0:
            expected = M + "zero amount"
        elif amount > free and (self.now < m.until.get(acct, 0) or amount - free > reserved):
            expected = M + "amount exceeds withdrawable escrow"
        else:
            expected = None
        self.call(self.chain.market.functions.withdraw(amount), acct, expected, moves_parties=False)
        if expected is None:
            from_free = min(amount, free)
            m.add("free", acct, -from_free)
            m.add("reserved", acct, -(amount - from_free))

    def withdraw_credit(self, data: st.DataObject) -> None:
        acct = self.account(data)
        expected = None if self.model.credit.get(acct, 0) else M + "no credit"
        self.call(self.chain.market.functions.withdrawCredit(), acct, expected, moves_parties=False)
        if expected is None:
            self.model.credit[acct] = 0

    # -------------------------------------------------------------- minting

    def mint_entry(self, data: st.DataObject) -> tuple[LocalAccount, int, str]:
        ch = self.chain
        meter = data.draw(st.sampled_from([ch.meters[s] for s in ch.sellers] * 3 + [ch.meters[ch.buyers[2]],
                                                                                     ch.revoked, ch.forger]),
                          label="meter")
        minted = self.model.minted.get(meter.address, 0)
        produced = data.draw(st.integers(minted + 1, minted + MAX_WH) | st.sampled_from([0, minted, max(minted - 1, 0)]),
                             label="produced")
        kind = data.draw(st.sampled_from(["meter"] * 4 + ["forged", "high-s"]), label="sig")
        return meter, produced, kind

    def production_sig(self, meter: LocalAccount, produced: int, kind: str) -> bytes:
        key = self.chain.forger if kind == "forged" else meter
        sig = typed.sig_bytes(typed.sign_production(key.key, self.chain.token_domain(), produced))
        if kind == "forged" and meter is self.chain.forger:  # the forger's own key is its meter's: still unregistered
            return sig
        return high_s(sig) if kind == "high-s" else sig

    def account_of(self, meter: LocalAccount) -> str | None:
        return next((p for p, m in self.chain.meters.items() if m is meter), None)

    def mint_check(self, meter: LocalAccount, produced: int, kind: str) -> str | None:
        valid_sig = kind == "meter" or (kind == "forged" and meter is self.chain.forger)
        if not valid_sig:
            return T + "bad signature"
        if self.account_of(meter) is None:
            return T + "meter not registered"
        return None

    @rule(data=st.data())
    def mint(self, data: st.DataObject) -> None:
        meter, produced, kind = self.mint_entry(data)
        submitter = data.draw(st.sampled_from([self.chain.other, self.chain.operator, *self.chain.parties]),
                              label="submitter")
        self.do_mint(meter, produced, kind, submitter)

    def do_mint(self, meter: LocalAccount, produced: int, kind: str, submitter: str) -> None:
        m = self.model
        if m.token_paused:
            expected = T + "paused"
        else:
            expected = self.mint_check(meter, produced, kind)
            if expected is None and produced <= m.minted.get(meter.address, 0):
                expected = T + "reading not above minted"
        sig = self.production_sig(meter, produced, kind)
        self.call(self.chain.token.functions.mint(meter.address, produced, sig), submitter, expected)
        if expected is None:
            m.add("tokens", self.account_of(meter), produced - m.minted.get(meter.address, 0))
            m.minted[meter.address] = produced

    @rule(n=st.integers(0, 4), data=st.data())
    def mint_batch(self, n: int, data: st.DataObject) -> None:
        entries = [self.mint_entry(data) for _ in range(n)]
        trial = copy.deepcopy(self.model)
        expected = T + "paused" if trial.token_paused else None
        for meter, produced, kind in entries:
            if expected is not None:
                break
            if produced <= trial.minted.get(meter.address, 0):
                continue  # skipped before its signature is looked at
            expected = self.mint_check(meter, produced, kind)
            if expected is None:
                trial.add("tokens", self.account_of(meter), produced - trial.minted.get(meter.address, 0))
                trial.minted[meter.address] = produced
        call = self.chain.token.functions.mintBatch([e[0].address for e in entries], [e[1] for e in entries],
                                                    [self.production_sig(*e) for e in entries])
        submitter = data.draw(st.sampled_from([self.chain.other, self.chain.operator]), label="submitter")
        self.call(call, submitter, expected)
        if expected is None:
            self.model = trial

    def do_approve(self, acct: str, amount: int) -> None:
        self.call(self.chain.token.functions.approve(self.chain.market.address, amount), acct, None)
        self.model.allowance[acct] = amount

    # -------------------------------------------------------------- offers, bids, open

    def make_offer(self, data: st.DataObject) -> Signed:
        seller = data.draw(st.sampled_from(self.chain.sellers), label="seller")
        offer = typed.Offer(offer_id=typed.new_id(), seller=seller, wh=data.draw(st.integers(1, MAX_WH), label="wh"),
                            min_price_wei_per_kwh=data.draw(st.sampled_from([0, 1, 999]) | st.integers(0, MAX_PRICE // 2),
                                                            label="min price"),
                            expiry=self.now + data.draw(st.sampled_from([-100, 5, 600, 600, 5000]), label="expiry"),
                            duration_s=data.draw(st.sampled_from([1, 60, 3000, 3000]), label="duration"))
        signed = Signed(offer, typed.sig_bytes(typed.sign_offer(self.chain.keys[seller], self.chain.market_domain(),
                                                                offer)))
        self.offers = [*self.offers[-5:], signed]
        return signed

    def make_bid(self, data: st.DataObject, offer: typed.Offer) -> Signed:
        buyer = data.draw(st.sampled_from(self.chain.buyers), label="buyer")
        offer_id = data.draw(st.sampled_from([offer.offer_id] * 3 + [typed.ZERO_ID, typed.new_id()]), label="for")
        lo = offer.min_price_wei_per_kwh
        bid = typed.Bid(bid_id=typed.new_id(), offer_id=offer_id, buyer=buyer,
                        wh=data.draw(st.integers(1, MAX_WH), label="wh"),
                        max_price_wei_per_kwh=data.draw(st.integers(lo, MAX_PRICE) | st.sampled_from([0, lo, lo + 1]),
                                                        label="max price"),
                        expiry=self.now + data.draw(st.sampled_from([-100, 5, 600, 600, 5000]), label="expiry"))
        signed = Signed(bid, typed.sig_bytes(typed.sign_bid(self.chain.keys[buyer], self.chain.market_domain(), bid)))
        self.bids = [*self.bids[-5:], signed]
        return signed

    @rule(data=st.data())
    def open_fresh(self, data: st.DataObject) -> None:
        """The auction's usual case: a new offer, a bid on it (or for any offer), a trade; mostly
        terms that open, sometimes anything."""
        if data.draw(st.integers(0, 9), label="clean") >= 7:
            o = self.make_offer(data)
            self.do_open(data, o, self.make_bid(data, o.terms))
            return
        ch, m = self.chain, self.model
        seller = data.draw(st.sampled_from(ch.sellers), label="seller")
        buyer = data.draw(st.sampled_from([b for b in ch.buyers if b != seller]), label="buyer")
        wh = data.draw(st.integers(1, max(1, min(MAX_WH, m.tokens.get(seller, 0)))), label="wh")
        lo = data.draw(st.integers(0, MAX_PRICE // 2), label="min price")
        hi = data.draw(st.integers(lo, MAX_PRICE), label="max price")
        offer = typed.Offer(offer_id=typed.new_id(), seller=seller, wh=wh + data.draw(st.integers(0, 500)),
                            min_price_wei_per_kwh=lo, expiry=self.now + 600, duration_s=3000)
        bid = typed.Bid(bid_id=typed.new_id(), offer_id=data.draw(st.sampled_from([offer.offer_id, typed.ZERO_ID])),
                        buyer=buyer, wh=wh + data.draw(st.integers(0, 500)), max_price_wei_per_kwh=hi,
                        expiry=self.now + 600)
        o = Signed(offer, typed.sig_bytes(typed.sign_offer(ch.keys[seller], ch.market_domain(), offer)))
        b = Signed(bid, typed.sig_bytes(typed.sign_bid(ch.keys[buyer], ch.market_domain(), bid)))
        self.offers, self.bids = [*self.offers[-5:], o], [*self.bids[-5:], b]
        self.do_open(data, o, b, wh=wh, price=data.draw(st.integers(lo, hi), label="price"), trick="none")

    @precondition(lambda self: self.offers and self.bids)
    @rule(data=st.data())
    def open_stored(self, data: st.DataObject) -> None:
        """An offer and a bid signed earlier: what is left of them, an expired one, a mismatch."""
        self.do_open(data, data.draw(st.sampled_from(self.offers), label="offer"),
                     data.draw(st.sampled_from(self.bids), label="bid"))

    def do_open(self, data: st.DataObject, o: Signed, b: Signed, wh: int | None = None, price: int | None = None,
                trick: str | None = None) -> None:
        ch, m = self.chain, self.model
        trick = trick or data.draw(st.sampled_from(["none"] * 12 + ["offer-tampered", "bid-tampered", "offer-by-buyer",
                                                          "bid-high-s", "stranger"]), label="trick")
        sender = ch.other if trick == "stranger" else ch.operator
        entry, expected, apply = self.plan_open(data, m, o, b, wh, price, trick)
        checks = [(sender != ch.operator, M + "caller is not the operator"), (m.market_paused, M + "paused")]
        expected = next((reason for failed, reason in checks if failed), expected)
        self.call(ch.market.functions.open(*entry), sender, expected)
        if expected is None:
            apply()

    @rule(n=st.integers(0, 4), data=st.data())
    def open_batch(self, n: int, data: st.DataObject) -> None:
        """The operator's batch of opens (or a stranger's try): fresh and stored offers and bids,
        mostly good, sometimes one bad entry, which must revert the whole batch with its reason
        (entries after the first see what the earlier ones filled and locked)."""
        ch = self.chain
        trial, expected, entries = copy.deepcopy(self.model), None, []
        for _ in range(n):
            if self.offers and self.bids and data.draw(st.booleans(), label="stored"):
                o, b = data.draw(st.sampled_from(self.offers), label="offer"), data.draw(st.sampled_from(self.bids),
                                                                                          label="bid")
            else:
                o = self.make_offer(data)
                b = self.make_bid(data, o.terms)
            trick = data.draw(st.sampled_from(["none"] * 12 + ["offer-tampered", "bid-tampered", "offer-by-buyer",
                                                                "bid-high-s"]), label="trick")
            entry, bad, apply = self.plan_open(data, trial, o, b, None, None, trick)
            entries.append(entry)
            if bad is None and expected is None:
                apply()
            elif expected is None:
                expected = bad
        sender = data.draw(st.sampled_from([ch.operator] * 4 + [ch.other]), label="submitter")
        checks = [(sender != ch.operator, M + "caller is not the operator"), (self.model.market_paused, M + "paused")]
        expected = next((reason for failed, reason in checks if failed), expected)
        self.call(ch.market.functions.openBatch(entries), sender, expected)
        if expected is None:
            self.model = trial

    def plan_open(self, data: st.DataObject, m: Model, o: Signed, b: Signed, wh: int | None, price: int | None,
                  trick: str) -> tuple[tuple[Any, ...], str | None, Any]:
        """One open's arguments (an Opening), the reason the market refuses it on model `m` (None:
        it opens), and what opening it does to `m`. The caller checks the caller and the pause."""
        ch = self.chain
        offer, bid, osig, bsig = o.terms, b.terms, o.sig, b.sig
        free_ids = [i for i in range(N_TRADE_IDS) if i not in m.trades]
        tid = data.draw(st.sampled_from(free_ids) | st.integers(0, N_TRADE_IDS - 1) if free_ids
                        else st.integers(0, N_TRADE_IDS - 1), label="tid")
        left = min(offer.wh - m.offer_filled.get((offer.seller, offer.offer_id), 0),
                   bid.wh - m.bid_filled.get((bid.buyer, bid.bid_id), 0))
        lo, hi = offer.min_price_wei_per_kwh, bid.max_price_wei_per_kwh
        if wh is None:
            wh = data.draw(st.integers(0, max(left, 0) + 1) | st.integers(0, MAX_WH), label="wh")
        if price is None:
            price = data.draw(st.integers(min(lo, hi), max(lo, hi)) | st.sampled_from([0, lo, hi, hi + 1, max(lo - 1, 0)]),
                              label="price")
        if trick == "offer-tampered":
            offer = offer.model_copy(update={"wh": offer.wh + 1000})
        elif trick == "bid-tampered":
            bid = bid.model_copy(update={"max_price_wei_per_kwh": bid.max_price_wei_per_kwh + 1})
        elif trick == "offer-by-buyer":
            osig = typed.sig_bytes(typed.sign_offer(ch.keys[bid.buyer], ch.market_domain(), offer))
        elif trick == "bid-high-s":
            bsig = high_s(bsig)

        t_now, free, reserved = self.now, m.free.get(bid.buyer, 0), m.reserved.get(bid.buyer, 0)
        due = wei_for(wh, price)
        offer_sig_ok = trick != "offer-tampered" and (trick != "offer-by-buyer" or offer.seller == bid.buyer)
        checks = [
            (tid in m.trades, M + "trade exists"),
            (not offer_sig_ok, M + "offer not signed by seller"),
            (trick == "bid-high-s", M + "bad signature"),
            (trick == "bid-tampered", M + "bid not signed by buyer"),
            (bid.offer_id not in (offer.offer_id, typed.ZERO_ID), M + "bid is for another offer"),
            (t_now > offer.expiry, M + "offer expired"),
            (t_now > bid.expiry, M + "bid expired"),
            (offer.seller == bid.buyer, M + "seller is buyer"),
            (wh == 0, M + "zero energy"),
            (m.offer_filled.get((offer.seller, offer.offer_id), 0) + wh > offer.wh, M + "offer overfilled"),
            (m.bid_filled.get((bid.buyer, bid.bid_id), 0) + wh > bid.wh, M + "bid overfilled"),
            (price == 0, M + "zero price"),
            (price < offer.min_price_wei_per_kwh, M + "price below offer"),
            (price > bid.max_price_wei_per_kwh, M + "price above bid"),
            (due - min(due, reserved) > free, M + "escrow does not cover trade"),
            (m.allowance.get(offer.seller, 0) != MAX256 and m.allowance.get(offer.seller, 0) < wh,
             "ERC20: insufficient allowance"),
            (m.tokens.get(offer.seller, 0) < wh, "ERC20: transfer amount exceeds balance"),
        ]
        expected = next((reason for failed, reason in checks if failed), None)
        entry = (typed.trade_key(f"trade-{tid}"), offer.as_tuple(), osig, bid.as_tuple(), bsig, wh, price)

        def apply() -> None:
            m.offer_filled[(offer.seller, offer.offer_id)] = m.offer_filled.get((offer.seller, offer.offer_id), 0) + wh
            m.bid_filled[(bid.buyer, bid.bid_id)] = m.bid_filled.get((bid.buyer, bid.bid_id), 0) + wh
            m.trades[tid] = Trade(seller=offer.seller, buyer=bid.buyer, wh=wh, price=price,
                                  deadline=t_now + offer.duration_s)
            from_reserved = min(due, reserved)
            m.add("reserved", bid.buyer, -from_reserved)
            m.add("free", bid.buyer, -(due - from_reserved))
            m.add("locked", bid.buyer, due)
            m.add("tokens", offer.seller, -wh)
            m.add("tokens", ch.market.address, wh)
            if m.allowance.get(offer.seller, 0) != MAX256:
                m.allowance[offer.seller] -= wh

        return entry, expected, apply

    # -------------------------------------------------------------- settle, close, finalize

    @precondition(lambda self: self.model.trades)
    @rule(data=st.data())
    def settle(self, data: st.DataObject, tid: int | None = None) -> None:
        m = self.model
        tid = self.pick_tid(data, c.STATUS_OPEN, c.STATUS_CLOSING) if tid is None else tid
        delivered = self.reading(data, tid)
        sig, bad, valid = self.delivery_sig(data, tid, delivered)
        t = m.trades.get(tid)
        if t is None or t.status in (c.STATUS_NONE, c.STATUS_CLOSED):
            expected = M + "trade not open"
        elif not m.settleable(t, self.now):
            expected = M + "dispute window over"
        elif min(delivered, t.wh) <= t.delivered:
            expected = M + "reading not above settled"
        else:
            expected = bad
        submitter = data.draw(st.sampled_from([self.chain.other, self.chain.operator, *self.chain.parties]),
                              label="submitter")
        self.call(self.chain.market.functions.settle(typed.trade_key(f"trade-{tid}"), delivered, sig), submitter,
                  expected)
        if valid:
            self.signed_max[tid] = max(self.signed_max.get(tid, 0), delivered)
        if expected is None:
            m.settle(tid, min(delivered, t.wh), self.chain.market.address)

    @precondition(lambda self: self.model.trades)
    @rule(n=st.integers(0, 4), data=st.data())
    def settle_batch(self, n: int, data: st.DataObject) -> None:
        entries = []
        for _ in range(n):
            tid = self.pick_tid(data, c.STATUS_OPEN, c.STATUS_CLOSING)
            delivered = self.reading(data, tid)
            entries.append((tid, delivered, *self.delivery_sig(data, tid, delivered)))
        trial, expected = copy.deepcopy(self.model), None
        for tid, delivered, _sig, bad, _valid in entries:
            t = trial.trades.get(tid)
            if not trial.settleable(t, self.now) or min(delivered, t.wh) <= t.delivered:
                continue
            if bad is not None:
                expected = bad
                break
            trial.settle(tid, min(delivered, t.wh), self.chain.market.address)
        call = self.chain.market.functions.settleBatch([typed.trade_key(f"trade-{e[0]}") for e in entries],
                                                       [e[1] for e in entries], [e[2] for e in entries])
        submitter = data.draw(st.sampled_from([self.chain.other, self.chain.operator]), label="submitter")
        self.call(call, submitter, expected)
        for tid, delivered, _sig, _bad, valid in entries:
            if valid:
                self.signed_max[tid] = max(self.signed_max.get(tid, 0), delivered)
        if expected is None:
            self.model = trial

    @precondition(lambda self: any(t.status == c.STATUS_OPEN for t in self.model.trades.values()))
    @rule(by=st.sampled_from(["buyer", "seller", "operator", "other"]), data=st.data())
    def close(self, by: str, data: st.DataObject) -> None:
        m, ch, tid = self.model, self.chain, self.pick_tid(data, c.STATUS_OPEN)
        t = m.trades.get(tid)
        if t is None or t.status != c.STATUS_OPEN:
            sender, expected = {"operator": ch.operator}.get(by, ch.other), M + "trade not open"
        else:
            sender = {"buyer": t.buyer, "seller": t.seller, "operator": ch.operator, "other": ch.other}[by]
            expected = None if (by != "other" or self.now >= t.deadline) else (
                M + "caller may not close before the deadline")
        t_now = self.now
        # a close moves nobody's funds (finalize does): checked against the chain when the stranger closes
        self.call(ch.market.functions.close(typed.trade_key(f"trade-{tid}")), sender, expected, moves_parties=False)
        if expected is None:
            t.status, t.closing_at = c.STATUS_CLOSING, t_now

    @precondition(lambda self: any(t.status == c.STATUS_CLOSING for t in self.model.trades.values()))
    @rule(data=st.data())
    def finalize(self, data: st.DataObject, tid: int | None = None) -> None:
        m, ch = self.model, self.chain
        tid = self.pick_tid(data, c.STATUS_CLOSING) if tid is None else tid
        t = m.trades.get(tid)
        if t is None or t.status != c.STATUS_CLOSING:
            expected = M + "trade not closing"
        elif self.now < t.closing_at + WINDOW:
            expected = M + "dispute window open"
        else:
            expected = None
        sender = data.draw(st.sampled_from([ch.other, ch.operator, *ch.parties]), label="sender")
        self.call(ch.market.functions.finalize(typed.trade_key(f"trade-{tid}")), sender, expected)
        if expected is None:
            refund = wei_for(t.wh, t.price) - wei_for(t.delivered, t.price)
            m.add("locked", t.buyer, -refund)
            m.add("free", t.buyer, refund)
            m.add("tokens", ch.market.address, -(t.wh - t.delivered))
            m.add("tokens", t.seller, t.wh - t.delivered)
            t.status = c.STATUS_CLOSED

    @precondition(lambda self: any(t.status == c.STATUS_OPEN for t in self.model.trades.values()))
    @rule(data=st.data())
    def dispute(self, data: st.DataObject) -> None:
        """A whole ending: a party closes an open trade, time passes (within or past the dispute
        window), a signed reading is submitted, time passes again, anyone finalizes."""
        tid = data.draw(st.sampled_from([i for i, t in self.model.trades.items() if t.status == c.STATUS_OPEN]),
                        label="tid")
        t = self.model.trades[tid]
        by = data.draw(st.sampled_from([t.buyer, t.seller, self.chain.operator]), label="by")
        self.call(self.chain.market.functions.close(typed.trade_key(f"trade-{tid}")), by, None)
        t.status, t.closing_at = c.STATUS_CLOSING, self.now - 1
        self.travel(data.draw(st.sampled_from([1, WINDOW // 2, WINDOW - 2, WINDOW + 5]), label="wait"))
        self.settle(data, tid)
        self.travel(data.draw(st.sampled_from([0, WINDOW]), label="wait"))
        self.finalize(data, tid)

    # -------------------------------------------------------------- time and pausing

    @rule(seconds=st.sampled_from([1, 30, 400, WINDOW, WINDOW, 3000]) | st.integers(1, 2 * WINDOW))
    def travel(self, seconds: int) -> None:
        """Time passes: the next call runs `seconds` later."""
        self.now += seconds

    @rule(which=st.sampled_from(["market", "token"]), by_pauser=st.booleans(), go=st.integers(0, 3))
    def toggle_pause(self, which: str, by_pauser: bool, go: int) -> None:
        """Pause now and then (one time in four); the next toggle resumes, so pauses stay short."""
        m, ch = self.model, self.chain
        contract, prefix = (ch.market, M) if which == "market" else (ch.token, T)
        paused = m.market_paused if which == "market" else m.token_paused
        if not paused and go:
            return
        fn = "unpause" if paused else "pause"
        expected = None if by_pauser else prefix + "caller is not the pauser"
        self.call(getattr(contract.functions, fn)(), ch.pauser if by_pauser else ch.other, expected)
        if expected is None:
            setattr(m, f"{which}_paused", not paused)

    # -------------------------------------------------------------- invariants

    @invariant()
    def books_balance(self) -> None:
        """Every invariant, from one batched read of the chain."""
        ch, m = self.chain, self.model
        accounts = [*ch.everyone, ch.market.address]
        meters = [*ch.meters.values(), ch.revoked, ch.forger]
        offers, bids = sorted(m.offer_filled), sorted(m.bid_filled)
        calls = ([(ch.market, "escrowOf", (a,)) for a in ch.everyone] +
                 [(ch.token, "balanceOf", (a,)) for a in accounts] +
                 [(ch.token, "totalSupply", ())] +
                 [(ch.token, "mintedOf", (meter.address,)) for meter in meters] +
                 [(ch.market, "trades", (typed.trade_key(f"trade-{tid}"),)) for tid in range(N_TRADE_IDS)] +
                 [(ch.market, "offerFilled", (s, bytes.fromhex(o[2:]))) for s, o in offers] +
                 [(ch.market, "bidFilled", (b, bytes.fromhex(i[2:]))) for b, i in bids])
        results = iter(ch.read(calls))
        escrow = {a: next(results) for a in ch.everyone}
        tokens = {a: next(results) for a in accounts}
        supply = next(results)
        minted = {meter.address: next(results) for meter in meters}
        trades = [next(results) for _ in range(N_TRADE_IDS)]
        offer_filled = [next(results) for _ in offers]
        bid_filled = [next(results) for _ in bids]

        # Ether: the market holds exactly Σ free + reserved + locked + credit, each as modelled
        assert ch.w3.eth.get_balance(ch.market.address) == sum(f + r + lk + cr for f, r, _, lk, cr in escrow.values())
        for a, row in escrow.items():
            assert row == (m.free.get(a, 0), m.reserved.get(a, 0), m.until.get(a, 0), m.locked.get(a, 0),
                           m.credit.get(a, 0)), a
        for a in accounts:
            assert tokens[a] == m.tokens.get(a, 0), a

        # tokens: minted == Σ signed production deltas, conserved, the market holds the undelivered Wh
        assert supply == sum(m.minted.values()) == sum(tokens.values())
        assert minted == {meter: m.minted.get(meter, 0) for meter in minted}
        live = (c.STATUS_OPEN, c.STATUS_CLOSING)
        assert tokens[ch.market.address] == sum(t.wh - t.delivered for t in m.trades.values() if t.status in live)

        # trades: as modelled; each seller paid exactly floor(delivered * price / 1000), for no
        # more than the buyer's registered meter signed
        for tid, got in enumerate(trades):
            t = m.trades.get(tid)
            if t is None:
                assert got[2] == c.STATUS_NONE
                continue
            assert got == (t.seller, t.wh, t.status, t.buyer, t.delivered, t.price, t.deadline, t.closing_at), tid
            assert self.paid.get(tid, 0) == wei_for(t.delivered, t.price)
            assert t.delivered <= self.signed_max.get(tid, 0)
        assert offer_filled == [m.offer_filled[k] for k in offers]
        assert bid_filled == [m.bid_filled[k] for k in bids]


def run_machine(chain: Chain, examples: int, steps: int) -> None:
    run_state_machine_as_test(
        lambda: MarketMachine(chain),
        settings=settings(max_examples=examples, stateful_step_count=steps, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]),
    )


@pytest.mark.anvil
@pytest.mark.timeout(900)  # 12 sequences of 50 calls on anvil: minutes on a busy 2-core machine
def test_random_call_sequences_keep_the_books_on_anvil(sync_anvil_w3: Web3) -> None:
    # 12, not 20: the suite's time goes to the agents' whole days now; the embedded chain's
    # sequences and the contracts' own unit tests cover the same rules
    run_machine(deploy(sync_anvil_w3, anvil=True), examples=12, steps=50)


@pytest.mark.timeout(900)  # py-evm is slower per call than anvil: fewer sequences
def test_random_call_sequences_keep_the_books_on_the_embedded_chain() -> None:
    run_machine(deploy(Web3(EthereumTesterProvider()), anvil=False), examples=3, steps=40)
