"""Gas of whole v2 trades on a real anvil node, against the seed's way, per traded kWh.

    python bench/gas.py [--trades 50] [--kwh 5] [--settle-every-kwh 1]

A grid of ``trades`` producers and as many consumers (each party its own account and meter,
the least favourable case: no storage slot is shared between trades) runs ``trades``
concurrent trades of ``kwh`` kWh each, twice: a first round on fresh accounts and meters, then
a second, steady-state round on the same ones (where balances, credit and counters already
exist, as on a running grid).

v2, per round, as the services would drive it:
- minting: each producer's meter signs its cumulative production counter once per trade's
  worth of energy; the counters are submitted in one mintBatch;
- open: the operator's chain service collects the trades an auction round agrees and opens
  them in one openBatch (up to its ``open_max_batch``, 50), each from the seller's signed
  offer and the buyer's signed bid;
- settlement: the buyer's meter signs its cumulative delivery (every 10 Wh); the operator
  settles a trade's latest reading once it is ``settle_every_wh`` above what is settled
  (default 1000 Wh: every kWh, ``--settle-every-kwh``) and the reading that ends the trade, in
  one settleBatch across all trades; the last kWh ends each trade on its own ("delivered in
  full"). A third round settles each trade once, at the end (``settle_every_wh`` of the
  trade's size or more). A fourth round ends each trade, one kWh larger than what it
  delivers, with its buyer's close before the last reading, that reading settled inside the
  dispute window, then finalize (the unused kWh goes back).
Meter registration (once per meter, ever) and the sellers' one-time approval are reported
apart; so are the escrow deposit and credit withdrawal, which the seed had no equivalent of
(it paid straight from the buyer's account), shown as an extra line once per trade.

The seed's way, same run, same node (a minimal baseline contract deployed here): one plain
ERC-20-style mint transaction per kWh, one transaction recording the trade (seller, buyer,
price), and one plain Ether transfer from the buyer to the seller per kWh.

Printed: gas per call, total gas and gas per traded kWh of each way, and the ratio v2 / seed.
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import solcx  # noqa: E402
from eth_account import Account  # noqa: E402
from eth_account.signers.local import LocalAccount  # noqa: E402
from eth_utils import keccak  # noqa: E402
from web3 import AsyncHTTPProvider, AsyncWeb3  # noqa: E402

from contracts import build  # noqa: E402
from services.bus import typed  # noqa: E402
from services.bus.prices import wei_for  # noqa: E402
from services.chain import bindings as c  # noqa: E402
from tests.support.anvil import start_anvil, stop_anvil  # noqa: E402

ETHER = 10**18
PRICE = 150 * 10**12  # wei per kWh
KWH = 1000  # Wh
DISPUTE_WINDOW_S = 600
OPEN_MAX_BATCH = 50  # the operator's open_max_batch

SEED_BASELINE = """// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

/// The seed's way, kept minimal (so as cheap as it can be): a plain ERC-20-style mint and a
/// record of each trade (seller, buyer, price in one packed pair of slots).
contract SeedBaseline {
    struct Trade { address seller; uint96 price; address buyer; }
    uint256 public totalSupply;
    mapping(address => uint256) public balanceOf;
    mapping(uint256 => Trade) public trades;
    event Transfer(address indexed from, address indexed to, uint256 value);
    event TradeRecorded(uint256 indexed id, address indexed seller, address indexed buyer, uint256 price);

    function mint(address to, uint256 amount) external {
        totalSupply += amount;
        balanceOf[to] += amount;
        emit Transfer(address(0), to, amount);
    }

    function record(uint256 id, address seller, address buyer, uint96 price) external {
        trades[id] = Trade(seller, price, buyer);
        emit TradeRecorded(id, seller, buyer, price);
    }
}
"""


def key(label: str) -> LocalAccount:
    return Account.from_key(keccak(text=f"bench/{label}"))


@dataclass
class Tally:
    """Gas by step of one way of trading, and the calls behind it."""

    steps: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    calls: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))

    def add(self, step: str, call: str, gas: int, per: int = 1) -> None:
        self.steps[step] += gas
        self.calls[call].append(gas // per)

    @property
    def total(self) -> int:
        return sum(self.steps.values())


class Bench:
    def __init__(self, w3: AsyncWeb3, n: int, kwh: int) -> None:
        self.w3, self.n, self.kwh = w3, n, kwh
        self.sellers = [key(f"seller-{i}") for i in range(n)]
        self.buyers = [key(f"buyer-{i}") for i in range(n)]
        self.seller_meters = [key(f"seller-meter-{i}") for i in range(n)]
        self.buyer_meters = [key(f"buyer-meter-{i}") for i in range(n)]
        self.trade_no = 0

    async def rpc(self, method: str, params: list[Any]) -> Any:
        return (await self.w3.provider.make_request(method, params))["result"]

    async def gas(self, call: Any, sender: str, value: int = 0) -> int:
        return int((await c.send(self.w3, call, sender, value))["gasUsed"])

    async def gas_many(self, sends: list[tuple[Any, str, Any]]) -> list[int]:
        """Gas of each of many independent transactions: each sender's in order, senders side by
        side (a transaction's gas does not depend on what else is in flight: warm slots do not
        outlive their transaction). A send whose call is None is a plain transfer of value[1] to value[0]."""
        by_sender: dict[str, list[int]] = defaultdict(list)
        for i, (_, sender, _) in enumerate(sends):
            by_sender[sender].append(i)
        gas = [0] * len(sends)

        async def one_sender(indexes: list[int]) -> None:
            for i in indexes:
                call, sender, value = sends[i]
                if call is None:
                    tx = await self.w3.eth.send_transaction({"from": sender, "to": value[0], "value": value[1]})
                    gas[i] = int((await self.w3.eth.wait_for_transaction_receipt(tx))["gasUsed"])
                else:
                    gas[i] = await self.gas(call, sender, value)

        await asyncio.gather(*(one_sender(ix) for ix in by_sender.values()))
        return gas

    async def setup(self) -> None:
        dev = await self.w3.eth.accounts
        self.admin, self.operator, self.registrar, self.pauser = dev[:4]
        self.d = await c.deploy(self.w3, self.admin, operator=self.operator, registrar=self.registrar,
                                pauser=self.pauser, dispute_window_s=DISPUTE_WINDOW_S)
        self.chain_id = await self.w3.eth.chain_id
        for acct in self.sellers + self.buyers:  # parties send their own transactions, keys stay here
            await self.rpc("anvil_setBalance", [acct.address, hex(10**6 * ETHER)])
            await self.rpc("anvil_impersonateAccount", [acct.address])
        out = solcx.compile_standard({
            "language": "Solidity", "sources": {"SeedBaseline.sol": {"content": SEED_BASELINE}},
            "settings": {"optimizer": build.OPTIMIZER, "evmVersion": build.EVM_VERSION,
                         "outputSelection": {"*": {"*": ["abi", "evm.bytecode.object"]}}},
        }, solc_binary=build.SOLC)["contracts"]["SeedBaseline.sol"]["SeedBaseline"]
        factory = self.w3.eth.contract(abi=out["abi"], bytecode="0x" + out["evm"]["bytecode"]["object"])
        receipt = await c.send(self.w3, factory.constructor(), self.admin)
        self.seed = self.w3.eth.contract(address=receipt["contractAddress"], abi=out["abi"]).functions

    # ------------------------------------------------------------------ once per meter / account

    async def onboarding(self) -> Tally:
        t = Tally()
        reg = self.d.registry.functions
        domain = self.d.registry_domain(self.chain_id)
        sends = []
        for meter, acct in zip(self.seller_meters + self.buyer_meters, self.sellers + self.buyers):
            sig = typed.sig_bytes(typed.sign_registration(meter.key, domain, acct.address))
            sends.append((reg.register(meter.address, acct.address, sig), self.registrar, 0))
        for gas in await self.gas_many(sends):
            t.add("register meters", "register", gas)
        approve = self.d.token.functions.approve(self.d.market_address, 2**256 - 1)
        for gas in await self.gas_many([(approve, s.address, 0) for s in self.sellers]):
            t.add("approve the market", "approve (max)", gas)
        return t

    # ------------------------------------------------------------------ v2 trades

    async def v2_round(self, close_early: bool, every: int) -> tuple[Tally, Tally]:
        """One round of n concurrent trades; returns (trade lifecycle, escrow in/out)."""
        t, escrow = Tally(), Tally()
        tok, mkt = self.d.token.functions, self.d.market.functions
        # a trade closed by its buyer is one kWh larger than what it delivers: that kWh goes back
        n, delivered_wh = self.n, self.kwh * KWH
        wh = delivered_wh + (KWH if close_early else 0)
        # the producers' meters sign their cumulative counters; anyone submits them in one batch
        produced = [(await tok.mintedOf(m.address).call()) + wh for m in self.seller_meters]
        tdom, mdom = self.d.token_domain(self.chain_id), self.d.market_domain(self.chain_id)
        sigs = [typed.sig_bytes(typed.sign_production(m.key, tdom, p)) for m, p in zip(self.seller_meters, produced)]
        t.add("mint", "mintBatch, per meter",
              await self.gas(tok.mintBatch([m.address for m in self.seller_meters], produced, sigs), self.operator), n)
        # each buyer deposits what its trade costs (reserved at bid time), as a site's wallet would
        until = (await self.w3.eth.get_block("latest"))["timestamp"] + 3600
        for gas in await self.gas_many([(mkt.depositAndReserve(until), b.address, wei_for(wh, PRICE))
                                        for b in self.buyers]):
            escrow.add("deposit", "depositAndReserve", gas)
        # open: the operator's chain service opens the trades an auction round agreed in one
        # openBatch (up to open_max_batch, 50), each from the seller's signed offer and the buyer's signed bid
        now = (await self.w3.eth.get_block("latest"))["timestamp"]
        ids, entries = [], []
        for s, b in zip(self.sellers, self.buyers):
            self.trade_no += 1
            trade_id = f"bench-{self.trade_no}"
            offer = typed.Offer(offer_id=typed.new_id(), seller=s.address, wh=wh, min_price_wei_per_kwh=PRICE,
                                expiry=now + 3600, duration_s=7200)
            bid = typed.Bid(bid_id=typed.new_id(), offer_id=offer.offer_id, buyer=b.address, wh=wh,
                            max_price_wei_per_kwh=PRICE, expiry=now + 3600)
            entries.append(c.opening(trade_id, offer, typed.sign_offer(s.key, mdom, offer), bid,
                                     typed.sign_bid(b.key, mdom, bid), wh, PRICE))
            ids.append(trade_id)
        for i in range(0, n, OPEN_MAX_BATCH):
            batch = entries[i:i + OPEN_MAX_BATCH]
            t.add("open", "openBatch, per trade", await self.gas(mkt.openBatch(batch), self.operator), len(batch))
        keys = [typed.trade_key(i) for i in ids]

        async def settle_all(k: int) -> None:
            delivered = [k * KWH] * n
            sigs = [typed.sig_bytes(typed.sign_delivery(m.key, mdom, i, k * KWH))
                    for m, i in zip(self.buyer_meters, ids)]
            label = "settleBatch, per trade" + (" (ends the trade)" if k * KWH == wh else "")
            t.add("settle", label, await self.gas(mkt.settleBatch(keys, delivered, sigs), self.operator), n)

        # the operator settles a trade's held reading every `every` kWh (settle_every_wh), and the one that
        # ends it, batched across the trades
        points = sorted({*range(every, self.kwh, every), self.kwh})
        for k in points[:-1] if close_early else points:
            await settle_all(k)
        if close_early:
            for gas in await self.gas_many([(mkt.close(k), b.address, 0) for k, b in zip(keys, self.buyers)]):
                t.add("close + finalize", "close", gas)
            await settle_all(self.kwh)  # in the dispute window: the buyer meter's last reading still pays
            await self.rpc("evm_increaseTime", [DISPUTE_WINDOW_S])
            await self.rpc("evm_mine", [])
            for gas in await self.gas_many([(mkt.finalize(k), self.operator, 0) for k in keys]):
                t.add("close + finalize", "finalize", gas)
        for gas in await self.gas_many([(mkt.withdrawCredit(), s.address, 0) for s in self.sellers]):
            escrow.add("withdraw credit", "withdrawCredit", gas)
        return t, escrow

    # ------------------------------------------------------------------ the seed's way

    async def seed_round(self) -> Tally:
        t = Tally()
        records = []
        for s, b in zip(self.sellers, self.buyers):
            self.trade_no += 1
            records.append((self.seed.record(self.trade_no, s.address, b.address, PRICE), self.operator, 0))
        for gas in await self.gas_many(records):
            t.add("record the trade", "seed: record", gas)
        for _ in range(self.kwh):
            # the seed's producer node sent the mint of each of its kWh itself
            mints = await self.gas_many([(self.seed.mint(s.address, KWH), s.address, 0) for s in self.sellers])
            pays = await self.gas_many([(None, b.address, (s.address, PRICE)) for s, b in zip(self.sellers, self.buyers)])
            for gas in mints:
                t.add("mint", "seed: mint (1 kWh)", gas)
            for gas in pays:
                t.add("pay", "seed: Ether transfer (1 kWh)", gas)
        return t


def report(n: int, kwh: int, every: int, onboarding: Tally, rounds: list[tuple[str, Tally, Tally, Tally]]) -> str:
    traded = n * kwh
    lines = [f"{n} concurrent trades of {kwh} kWh ({traded} kWh a round), {n} producers and {n} consumers,",
             "every party its own account and meter; the trades opened in openBatch transactions of up to",
             f"{OPEN_MAX_BATCH}; signed deliveries settled every {every} kWh (the operator's settle_every_wh "
             f"{every * KWH}) or once at the end,",
             "batched across the trades; anvil, same run, same node", ""]
    lines.append("once per meter / account (not in the totals below)")
    for step, gas in onboarding.steps.items():
        per = gas // (2 * n if step == "register meters" else n)
        lines.append(f"  {step:<34} {gas:>12,} gas  ({per:,} each)")
    for name, v2, escrow, seed in rounds:
        lines += ["", f"{name}", f"  {'v2 step':<34} {'gas':>12} {'gas/kWh':>9}"]
        for step, gas in v2.steps.items():
            lines.append(f"  {step:<34} {gas:>12,} {gas // traded:>9,}")
        lines.append(f"  {'v2 trade lifecycle':<34} {v2.total:>12,} {v2.total // traded:>9,}")
        with_escrow = v2.total + escrow.total
        lines.append(f"  {'  + deposit and withdraw credit':<34} {with_escrow:>12,} {with_escrow // traded:>9,}")
        lines.append(f"  {'seed step':<34}")
        for step, gas in seed.steps.items():
            lines.append(f"  {step:<34} {gas:>12,} {gas // traded:>9,}")
        lines.append(f"  {'seed total':<34} {seed.total:>12,} {seed.total // traded:>9,}")
        lines.append(f"  ratio v2 / seed: {v2.total / seed.total:.3f} (trade lifecycle), "
                     f"{with_escrow / seed.total:.3f} (with deposit and credit withdrawal)")
    lines += ["", "gas per call (mean over the run; batch entries: the batch's gas / its entries)",
              f"  {'call':<44} {'gas':>9} {'calls':>6}"]
    calls: dict[str, list[int]] = defaultdict(list)
    for tally in [onboarding] + [x for r in rounds for x in r[1:]]:
        for call, gases in tally.calls.items():
            calls[call] += gases
    for call, gases in calls.items():
        lines.append(f"  {call:<44} {sum(gases) // len(gases):>9,} {len(gases):>6}")
    return "\n".join(lines)


async def run(url: str, n: int, kwh: int, every: int = 1) -> str:
    w3 = AsyncWeb3(AsyncHTTPProvider(url))
    try:
        b = Bench(w3, n, kwh)
        await b.setup()
        onboarding = await b.onboarding()
        rounds = []
        for name, close_early, settle_every in (
                (f"round 1, fresh accounts and meters, delivered in full, settled every {every} kWh", False, every),
                (f"round 2, steady state, delivered in full, settled every {every} kWh", False, every),
                ("round 3, steady state, delivered in full, settled once, at the end", False, kwh),
                (f"round 4, steady state, trades of {kwh + 1} kWh closed by the buyer before the reading of kWh "
                 f"{kwh}, settled every {every} kWh and in the dispute window, then finalized", True, every)):
            v2, escrow = await b.v2_round(close_early, settle_every)
            seed = await b.seed_round()
            rounds.append((name, v2, escrow, seed))
        return report(n, kwh, every, onboarding, rounds)
    finally:
        await c.close_provider(w3)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trades", type=int, default=50, help="concurrent trades (default 50)")
    parser.add_argument("--kwh", type=int, default=5, help="kWh per trade (default 5)")
    parser.add_argument("--settle-every-kwh", type=int, default=1, dest="every",
                        help="kWh between two settlements of a trade (default 1: the operator's settle_every_wh 1000)")
    args = parser.parse_args(argv)
    proc, url = start_anvil()
    try:
        print(asyncio.run(run(url, args.trades, args.kwh, args.every)))
    finally:
        stop_anvil(proc)


if __name__ == "__main__":
    main()
