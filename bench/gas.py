"""Gas of the energy market on a real anvil node, against the seed's way of paying.

    python bench/gas.py

The seed paid a seller with one plain Ether transfer per delivered kWh. Here a settlement
credits the seller from escrow and moves the kWh's tokens to the buyer. The baseline (a plain
transfer's gas) is measured in the same run by sending one and reading its receipt.

Reported:
- gas per delivered kWh: one settle per kWh on one trade, and settleBatch of 10/50/100 trades
  each advancing by one kWh (steady state: every trade already settled once, as during a
  running trade), with the ratio to the baseline;
- gas of each call (first and steady-state variants where storage makes them differ).
"""

from __future__ import annotations

import asyncio
import pathlib
import sys
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from eth_account import Account  # noqa: E402
from web3 import AsyncHTTPProvider, AsyncWeb3  # noqa: E402

from services.chain import contracts as c  # noqa: E402
from tests.chain_fixtures import start_anvil, stop_anvil  # noqa: E402

ETHER = 10**18
PRICE = 150 * 10**12  # wei per kWh
BATCH_SIZES = (10, 50, 100)
KWH = 1000  # Wh


class Bench:
    def __init__(self, w3: AsyncWeb3, accounts: list[str], d: c.Deployment) -> None:
        self.w3, self.a, self.d = w3, accounts, d
        self.calls: list[tuple[str, int]] = []
        self.n_trades = 0

    async def gas(self, label: str | None, call: Any, sender: str, value: int = 0) -> int:
        receipt = await c.send(self.w3, call, sender, value)
        if label:
            self.calls.append((label, receipt["gasUsed"]))
        return int(receipt["gasUsed"])

    async def open_trade(self, seller: str, buyer: str, wh: int, label: str | None = None) -> bytes:
        self.n_trades += 1
        tid = c.id32(f"bench-trade-{self.n_trades}")
        await self.gas(label, self.d.market.functions.open(tid, seller, buyer, wh, PRICE), self.a[0])
        return tid


async def measure(w3: AsyncWeb3) -> tuple[int, list[tuple[str, int]], list[tuple[str, int, int]]]:
    a = await w3.eth.accounts
    admin, sellers, buyers = a[0], a[1:5], a[5:10]
    d = await c.deploy(w3, admin)
    b = Bench(w3, a, d)
    tok, mkt = d.token.functions, d.market.functions

    # baseline: the seed's payment, one plain Ether transfer
    tx = await w3.eth.send_transaction({"from": buyers[0], "to": sellers[0], "value": PRICE})
    baseline = int((await w3.eth.wait_for_transaction_receipt(tx))["gasUsed"])

    # each call once, on a trade of 10 kWh between sellers[0] and buyers[0]
    await b.gas("mint (first to an account)", tok.mint(sellers[0], 500 * KWH, c.id32("m0")), admin)
    await b.gas("mint (next)", tok.mint(sellers[0], 500 * KWH, c.id32("m1")), admin)
    for s in sellers[1:]:
        await b.gas(None, tok.mint(s, 1000 * KWH, c.id32(f"m-{s}")), admin)
    for s in sellers:
        await b.gas("approve" if s == sellers[0] else None, tok.approve(d.market_address, 2**256 - 1), s)
    await b.gas("deposit (first)", mkt.deposit(), buyers[0], value=ETHER)
    await b.gas("deposit (next)", mkt.deposit(), buyers[0], value=ETHER)
    for buyer in buyers[1:]:
        await b.gas(None, mkt.deposit(), buyer, value=10 * ETHER)
    await b.gas("registerMeter", mkt.registerMeter(buyers[0], a[9]), admin)
    tid = await b.open_trade(sellers[0], buyers[0], 10 * KWH, label="open")
    await b.gas("settle (first kWh of a trade)", mkt.settle(tid, KWH), admin)
    single = await b.gas("settle (next kWh)", mkt.settle(tid, 2 * KWH), admin)
    await b.gas("close", mkt.close(tid, 2 * KWH + 500), buyers[0])
    await b.gas("withdrawCredit", mkt.withdrawCredit(), sellers[0])
    await b.gas("withdraw", mkt.withdraw(ETHER), buyers[0])

    # signed reading: the same settlement, submitted by anyone with the meter's signature
    meter = Account.from_key(b"\x07" * 32)
    await b.gas(None, mkt.registerMeter(buyers[0], meter.address), admin)
    tid = await b.open_trade(sellers[0], buyers[0], 10 * KWH)
    chain_id = await w3.eth.chain_id
    for k, label in ((1, None), (2, "settleSigned (next kWh)")):
        sig = c.sign_delivery(meter.key, chain_id, d.market_address, tid, k * KWH)
        await b.gas(label, mkt.settleSigned(tid, k * KWH, sig), sellers[0])

    # batches: n trades over rotating seller/buyer pairs, each settled once, then one more kWh each
    per_kwh = [("settle, one per kWh", 1, single)]
    for n in BATCH_SIZES:
        ids = [await b.open_trade(sellers[i % len(sellers)], buyers[i % len(buyers)], 10 * KWH) for i in range(n)]
        await b.gas(None, mkt.settleBatch(ids, [KWH] * n), admin)
        used = await b.gas(None, mkt.settleBatch(ids, [2 * KWH] * n), admin)
        per_kwh.append((f"settleBatch of {n} trades", n, used))
    return baseline, b.calls, per_kwh


def report(baseline: int, calls: list[tuple[str, int]], per_kwh: list[tuple[str, int, int]]) -> str:
    lines = [
        f"baseline (the seed's payment per kWh): plain Ether transfer = {baseline:,} gas, measured",
        "",
        "gas per delivered kWh settled (escrow -> seller credit, tokens -> buyer); batches over",
        "trades among 4 sellers and 5 buyers, each trade advancing one kWh, transaction base cost included",
        f"{'how':<28} {'kWh':>5} {'tx gas':>11} {'gas/kWh':>9} {'vs baseline':>12}",
    ]
    for how, kwh, used in per_kwh:
        lines.append(f"{how:<28} {kwh:>5} {used:>11,} {used // kwh:>9,} {used / kwh / baseline:>11.2f}x")
    lines += ["", "gas per call", f"{'call':<32} {'gas':>9}"]
    lines += [f"{label:<32} {used:>9,}" for label, used in calls]
    return "\n".join(lines)


async def run(url: str) -> str:
    w3 = AsyncWeb3(AsyncHTTPProvider(url))
    try:
        return report(*await measure(w3))
    finally:
        await c.close_provider(w3)


def main() -> None:
    proc, url = start_anvil()
    try:
        print(asyncio.run(run(url)))
    finally:
        stop_anvil(proc)


if __name__ == "__main__":
    main()
