"""Property-based stateful test: random sequences of market and token calls, valid and invalid,
against a real anvil node (synchronous Web3; each example starts from an EVM snapshot).

A plain-Python model predicts every call's outcome (success, or the exact revert reason) and
the resulting balances; after every step these invariants are checked against the chain:
- the market's Ether == free escrow + locked escrow + unpaid seller credit (summed over everyone);
- each account's free, locked, credit and token balance equals the model's;
- tokens are conserved: totalSupply == sum of balances, and the market holds exactly the
  undelivered Wh of open trades;
- nothing is paid twice: the Settled events of a trade sum to floor(delivered * price / 1000).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import pytest
from eth_abi import decode as abi_decode
from eth_account import Account
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test
from web3 import Web3
from web3.logs import EventLogErrorFlags

from services.chain import contracts as c
from services.chain.contracts import cost, id32

pytestmark = pytest.mark.anvil

N_TRADE_IDS = 8
N_READINGS = 12
MAX_WH = 3000
MAX_PRICE = 10**16  # wei per kWh
M = "EnergyMarket: "


@dataclass
class Chain:
    """A deployed market on anvil and the roles of its dev accounts."""

    w3: Web3
    token: Any
    market: Any
    admin: str
    meter: str
    sellers: list[str]
    buyers: list[str]
    other: str
    meter_keys: dict[str, Any]  # buyer -> meter key registered for it
    forger: Any

    @property
    def everyone(self) -> list[str]:
        return sorted({self.admin, self.meter, self.other, *self.sellers, *self.buyers})


def send(chain: Chain, call: Any, sender: str, value: int = 0) -> tuple[Any, str | None]:
    """(receipt, None) when mined with success, (None, reason) when the call reverts."""
    try:
        tx_hash = call.transact({"from": sender, "value": value})
    except Exception as exc:
        reason = c.revert_reason(exc)
        if reason is None:
            raise
        return None, reason
    receipt = chain.w3.eth.wait_for_transaction_receipt(tx_hash)
    assert receipt["status"] == 1
    return receipt, None


@dataclass
class Trade:
    seller: str
    buyer: str
    wh: int
    price: int
    delivered: int = 0
    status: int = c.STATUS_OPEN


@dataclass
class Model:
    free: dict[str, int] = field(default_factory=dict)
    locked: dict[str, int] = field(default_factory=dict)
    credit: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    allowance: dict[str, int] = field(default_factory=dict)
    minted: set[int] = field(default_factory=set)
    trades: dict[int, Trade] = field(default_factory=dict)

    def settle(self, tid: int, delivered: int) -> str | None:
        """Apply EnergyMarket._settle; return the revert reason instead when it would revert."""
        t = self.trades.get(tid)
        if t is None or t.status != c.STATUS_OPEN:
            return M + "trade not open"
        if delivered < t.delivered:
            return M + "delivery goes backwards"
        if delivered > t.wh:
            return M + "delivery exceeds trade"
        paid = cost(delivered, t.price) - cost(t.delivered, t.price)
        self.locked[t.buyer] -= paid
        self.credit[t.seller] = self.credit.get(t.seller, 0) + paid
        self.tokens[t.buyer] = self.tokens.get(t.buyer, 0) + delivered - t.delivered
        t.delivered = delivered
        if delivered == t.wh:
            t.status = c.STATUS_CLOSED
        return None


class MarketMachine(RuleBasedStateMachine):
    def __init__(self, chain: Chain) -> None:
        super().__init__()
        self.chain = chain
        self.model = Model()
        self.paid: dict[int, int] = {}  # sum of Settled.paidWei per trade, read from the receipts
        self.snapshot = chain.w3.provider.make_request("evm_snapshot", [])["result"]

    def teardown(self) -> None:
        assert self.chain.w3.provider.make_request("evm_revert", [self.snapshot])["result"] is True

    # -------------------------------------------------------------- helpers

    def call(self, call: Any, sender: str, expected: str | None, value: int = 0) -> None:
        receipt, reason = send(self.chain, call, sender, value)
        event(f"{call.fn_name}: {reason or 'ok'}")
        assert reason == expected
        if receipt is not None:
            settled = self.chain.market.events.Settled().process_receipt(receipt, errors=EventLogErrorFlags.Discard)
            for e in settled:
                tid = self.tid_of[bytes(e["args"]["tradeId"])]
                self.paid[tid] = self.paid.get(tid, 0) + e["args"]["paidWei"]

    tid_of = {id32(f"trade-{i}"): i for i in range(N_TRADE_IDS)}

    def delivered_strategy(self, data: st.DataObject, tid: int) -> int:
        """Mostly forward within the trade; sometimes the same, backwards, complete or beyond."""
        t = self.model.trades.get(tid)
        if t is None:
            return data.draw(st.integers(0, MAX_WH), label="delivered")
        forward = st.integers(t.delivered, t.wh)
        return data.draw(forward | st.integers(0, t.wh + 2) | st.sampled_from([t.delivered, t.wh]), label="delivered")

    def pick_tid(self, data: st.DataObject) -> int:
        """Mostly a trade that exists, sometimes any id."""
        known = sorted(self.model.trades)
        ids = st.integers(0, N_TRADE_IDS - 1)
        return data.draw(st.sampled_from(known) | ids if known else ids, label="tid")

    # -------------------------------------------------------------- rules

    @initialize(
        deposits=st.lists(st.integers(1, 10**18), min_size=3, max_size=3),
        mints=st.lists(st.integers(1, 2 * MAX_WH), min_size=3, max_size=3),
    )
    def fund(self, deposits: list[int], mints: list[int]) -> None:
        """Start with escrow for every buyer and approved tokens for every seller, so that many
        trades open; the rules below move away from there."""
        for acct, amount in zip(self.chain.buyers, deposits):
            self.do_deposit(acct, amount)
        for acct, amount, reading in zip(self.chain.sellers, mints, range(N_READINGS, N_READINGS + 3)):
            self.do_mint(True, acct, amount, reading)
            self.do_approve(acct, amount)

    @rule(who=st.integers(0, 3), amount=st.integers(0, 10**18) | st.just(0))
    def deposit(self, who: int, amount: int) -> None:
        self.do_deposit((self.chain.buyers + [self.chain.other])[who], amount)

    def do_deposit(self, acct: str, amount: int) -> None:
        expected = M + "zero deposit" if amount == 0 else None
        self.call(self.chain.market.functions.deposit(), acct, expected, value=amount)
        if expected is None:
            self.model.free[acct] = self.model.free.get(acct, 0) + amount

    @rule(who=st.integers(0, 3), data=st.data())
    def withdraw(self, who: int, data: st.DataObject) -> None:
        acct = (self.chain.buyers + [self.chain.other])[who]
        free = self.model.free.get(acct, 0)
        amount = data.draw(st.sampled_from([0, 1, free, free + 1]) | st.integers(0, 10**18), label="amount")
        if amount == 0:
            expected = M + "zero amount"
        elif amount > free:
            expected = M + "amount exceeds free escrow"
        else:
            expected = None
        self.call(self.chain.market.functions.withdraw(amount), acct, expected)
        if expected is None:
            self.model.free[acct] = free - amount

    @precondition(lambda self: any(self.model.credit.values()))
    @rule(who=st.integers(0, 3))
    def withdraw_credit(self, who: int) -> None:
        acct = (self.chain.sellers + [self.chain.other])[who]
        expected = None if self.model.credit.get(acct, 0) else M + "no credit"
        self.call(self.chain.market.functions.withdrawCredit(), acct, expected)
        if expected is None:
            self.model.credit[acct] = 0

    @rule(
        by_meter=st.booleans(),
        to=st.integers(0, 2),
        amount=st.integers(0, MAX_WH),
        reading=st.integers(0, N_READINGS - 1),
    )
    def mint(self, by_meter: bool, to: int, amount: int, reading: int) -> None:
        self.do_mint(by_meter, self.chain.sellers[to], amount, reading)

    def do_mint(self, by_meter: bool, acct: str, amount: int, reading: int) -> None:
        if not by_meter:
            expected = "EnergyToken: caller is not a meter"
        elif reading in self.model.minted:
            expected = "EnergyToken: reading already minted"
        elif amount == 0:
            expected = "EnergyToken: zero amount"
        else:
            expected = None
        sender = self.chain.meter if by_meter else self.chain.other
        self.call(self.chain.token.functions.mint(acct, amount, id32(f"reading-{reading}")), sender, expected)
        if expected is None:
            self.model.minted.add(reading)
            self.model.tokens[acct] = self.model.tokens.get(acct, 0) + amount

    @rule(who=st.integers(0, 2), amount=st.integers(0, 2 * MAX_WH))
    def approve(self, who: int, amount: int) -> None:
        self.do_approve(self.chain.sellers[who], amount)

    def do_approve(self, acct: str, amount: int) -> None:
        self.call(self.chain.token.functions.approve(self.chain.market.address, amount), acct, None)
        self.model.allowance[acct] = amount

    @rule(
        by_operator=st.sampled_from([True, True, True, False]),
        tid=st.integers(0, N_TRADE_IDS - 1),
        seller=st.integers(0, 2),
        buyer=st.integers(0, 2),
        data=st.data(),
    )
    def open(self, by_operator: bool, tid: int, seller: int, buyer: int, data: st.DataObject) -> None:
        s, b, m = self.chain.sellers[seller], self.chain.buyers[buyer], self.model
        held = m.tokens.get(s, 0)
        wh = data.draw(st.integers(0, held + 1) | st.integers(0, MAX_WH), label="wh")
        price = data.draw(st.integers(0, MAX_PRICE) | st.sampled_from([0, 1, 999, 1001]), label="price")
        if not by_operator:
            expected = M + "caller is not the operator"
        elif tid in m.trades:
            expected = M + "trade exists"
        elif s == b:
            expected = M + "seller is buyer"
        elif wh == 0:
            expected = M + "zero energy"
        elif price == 0:
            expected = M + "zero price"
        elif m.free.get(b, 0) < cost(wh, price):
            expected = M + "escrow does not cover trade"
        elif m.tokens.get(s, 0) < wh:
            expected = M + "seller tokens do not cover trade"
        elif m.allowance.get(s, 0) < wh:
            expected = M + "token allowance too low"
        else:
            expected = None
        sender = self.chain.admin if by_operator else self.chain.other
        self.call(self.chain.market.functions.open(id32(f"trade-{tid}"), s, b, wh, price), sender, expected)
        if expected is None:
            m.trades[tid] = Trade(seller=s, buyer=b, wh=wh, price=price)
            m.free[b] -= cost(wh, price)
            m.locked[b] = m.locked.get(b, 0) + cost(wh, price)
            m.tokens[s] -= wh
            m.allowance[s] -= wh

    @precondition(lambda self: self.model.trades)
    @rule(by_operator=st.sampled_from([True, True, True, False]), data=st.data())
    def settle(self, by_operator: bool, data: st.DataObject) -> None:
        tid = self.pick_tid(data)
        delivered = self.delivered_strategy(data, tid)
        trial = copy.deepcopy(self.model)
        expected = trial.settle(tid, delivered) if by_operator else M + "caller is not the operator"
        sender = self.chain.admin if by_operator else self.chain.other
        self.call(self.chain.market.functions.settle(id32(f"trade-{tid}"), delivered), sender, expected)
        if expected is None:
            self.model = trial

    @precondition(lambda self: self.model.trades)
    @rule(n=st.integers(0, 4), data=st.data())
    def settle_batch(self, n: int, data: st.DataObject) -> None:
        tids = [self.pick_tid(data) for _ in range(n)]
        delivered = [self.delivered_strategy(data, tid) for tid in tids]
        trial = copy.deepcopy(self.model)
        expected = next((r for r in (trial.settle(t, d) for t, d in zip(tids, delivered)) if r), None)
        ids = [id32(f"trade-{t}") for t in tids]
        self.call(self.chain.market.functions.settleBatch(ids, delivered), self.chain.admin, expected)
        if expected is None:
            self.model = trial

    @precondition(lambda self: self.model.trades)
    @rule(forged=st.sampled_from([False, False, True]), data=st.data())
    def settle_signed(self, forged: bool, data: st.DataObject) -> None:
        tid = self.pick_tid(data)
        delivered = self.delivered_strategy(data, tid)
        t = self.model.trades.get(tid)
        if t is None or t.status != c.STATUS_OPEN:
            key, expected = self.chain.forger, M + "trade not open"
        else:
            key = self.chain.forger if forged else self.chain.meter_keys[t.buyer]
            if forged:
                expected = M + "signer is not the buyer's meter"
            elif delivered <= t.delivered:
                expected = M + "reading not above settled"
            else:
                expected = copy.deepcopy(self.model).settle(tid, delivered)
        sig = c.sign_delivery(
            key.key, self.chain.w3.eth.chain_id, self.chain.market.address, id32(f"trade-{tid}"), delivered
        )
        call = self.chain.market.functions.settleSigned(id32(f"trade-{tid}"), delivered, sig)
        self.call(call, self.chain.other, expected)
        if expected is None:
            assert self.model.settle(tid, delivered) is None

    @precondition(lambda self: self.model.trades)
    @rule(by=st.sampled_from(["buyer", "operator", "seller"]), data=st.data())
    def close(self, by: str, data: st.DataObject) -> None:
        tid = self.pick_tid(data)
        delivered = self.delivered_strategy(data, tid)
        t = self.model.trades.get(tid)
        trial = copy.deepcopy(self.model)
        if t is None or t.status != c.STATUS_OPEN:
            sender, expected = self.chain.admin, M + "trade not open"
        else:
            sender = {"buyer": t.buyer, "operator": self.chain.admin, "seller": t.seller}[by]
            if by == "seller":
                expected = M + "caller is not the buyer or operator"
            else:
                expected = trial.settle(tid, delivered)
                tt = trial.trades[tid]
                if expected is None and tt.status == c.STATUS_OPEN:
                    refund = cost(tt.wh, tt.price) - cost(tt.delivered, tt.price)
                    trial.locked[tt.buyer] -= refund
                    trial.free[tt.buyer] = trial.free.get(tt.buyer, 0) + refund
                    trial.tokens[tt.seller] = trial.tokens.get(tt.seller, 0) + tt.wh - tt.delivered
                    tt.status = c.STATUS_CLOSED
        self.call(self.chain.market.functions.close(id32(f"trade-{tid}"), delivered), sender, expected)
        if expected is None:
            self.model = trial

    # -------------------------------------------------------------- invariants

    @invariant()
    def books_balance(self) -> None:
        """All three invariants from one batched read of the chain's state."""
        ch, everyone = self.chain, self.chain.everyone
        tids = sorted(self.model.trades)
        m, t = ch.market.address, ch.token.address
        queries = [("eth_getBalance", [m, "latest"])]
        for a in everyone:
            for contract, fn in ((ch.market, "freeEscrow"), (ch.market, "lockedEscrow"), (ch.market, "credit")):
                queries.append(_eth_call(contract, fn, a))
            queries.append(_eth_call(ch.token, "balanceOf", a))
        queries += [_eth_call(ch.token, "balanceOf", m), _eth_call(ch.token, "totalSupply")]
        queries += [_eth_call(ch.market, "trades", id32(f"trade-{tid}")) for tid in tids]
        results = [r["result"] for r in ch.w3.provider.make_batch_request(queries)]
        market_eth, results = int(results[0], 16), results[1:]
        rows = {a: [int(x, 16) for x in results[4 * i : 4 * i + 4]] for i, a in enumerate(everyone)}
        results = results[4 * len(everyone) :]
        in_market, supply = int(results[0], 16), int(results[1], 16)
        trades = [abi_decode(TRADE_TYPES, bytes.fromhex(r[2:])) for r in results[2:]]

        # Ether: the market holds exactly free + locked escrow + unpaid credit, and each matches the model
        assert market_eth == sum(free + locked + credit for free, locked, credit, _ in rows.values())
        for a, (free, locked, credit, tokens) in rows.items():
            model = self.model
            assert (free, locked, credit, tokens) == (
                model.free.get(a, 0),
                model.locked.get(a, 0),
                model.credit.get(a, 0),
                model.tokens.get(a, 0),
            ), a
        # tokens are conserved; the market holds exactly the undelivered Wh of open trades
        assert supply == sum(row[3] for row in rows.values()) + in_market
        assert in_market == sum(t.wh - t.delivered for t in self.model.trades.values() if t.status == c.STATUS_OPEN)
        # every trade matches the model and its seller was paid exactly floor(delivered * price / 1000)
        for tid, (seller, wh, status, buyer, delivered, price) in zip(tids, trades):
            t = self.model.trades[tid]
            assert (seller, buyer, wh, price, delivered, status) == (
                t.seller.lower(), t.buyer.lower(), t.wh, t.price, t.delivered, t.status
            )
            assert self.paid.get(tid, 0) == cost(delivered, price)


TRADE_TYPES = ["address", "uint64", "uint8", "address", "uint64", "uint128"]


def _eth_call(contract: Any, fn: str, *args: Any) -> tuple[str, list[Any]]:
    return ("eth_call", [{"to": contract.address, "data": contract.encode_abi(fn, args=list(args))}, "latest"])


@pytest.fixture
def chain(sync_anvil_w3: Web3) -> Chain:
    """Deploy once per test; every hypothesis example reverts to a snapshot taken after this."""
    w3 = sync_anvil_w3
    accounts = w3.eth.accounts
    admin, meter, other = accounts[0], accounts[1], accounts[9]
    sellers = [accounts[2], accounts[3], accounts[4]]
    buyers = [accounts[4], accounts[5], accounts[6]]  # accounts[4] both sells and buys

    def deploy(name: str, *args: Any) -> Any:
        art = c.load_artifact(name)
        tx = w3.eth.contract(abi=art["abi"], bytecode=art["bytecode"]).constructor(*args).transact({"from": admin})
        return w3.eth.contract(address=w3.eth.wait_for_transaction_receipt(tx)["contractAddress"], abi=art["abi"])

    token = deploy(c.TOKEN, admin)
    market = deploy(c.MARKET, token.address, admin)
    w3.eth.wait_for_transaction_receipt(token.functions.grantRole(c.METER_ROLE, meter).transact({"from": admin}))
    meter_keys = {b: Account.from_key(bytes([i + 1]) * 32) for i, b in enumerate(buyers)}
    for b, key in meter_keys.items():
        w3.eth.wait_for_transaction_receipt(market.functions.registerMeter(b, key.address).transact({"from": admin}))
    return Chain(
        w3=w3,
        token=token,
        market=market,
        admin=admin,
        meter=meter,
        sellers=sellers,
        buyers=buyers,
        other=other,
        meter_keys=meter_keys,
        forger=Account.from_key(b"\x99" * 32),
    )


@pytest.mark.timeout(900)  # 30 sequences of 40 calls on anvil: minutes on a busy 2-core machine
def test_random_call_sequences_keep_the_books(chain: Chain) -> None:
    run_state_machine_as_test(
        lambda: MarketMachine(chain),
        settings=settings(
            max_examples=30,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
