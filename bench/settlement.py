"""Settlement throughput of the chain service on anvil, against a named baseline.

    .venv/bin/python bench/settlement.py [--trades 40] [--steps 4] [--block-time S] [--confirmations N]

Service: ``trades`` open trades of 1 kWh each; the buyer's meter reports ``steps``
cumulative deliveries per trade as bus events (published through a real hub); the chain
service settles them (batched: collected for ``settle_window_s``, then settleBatch).
Measured from the first Delivery event published to the last trade settled in full:
settlements (Settled events) per second, and gas per settled kWh (gas of every settle
transaction / kWh settled).

``--block-time S`` runs anvil with interval mining (a block every S seconds, as a real
chain) instead of a block per transaction; ``--confirmations N`` makes the service count
a transaction final only N blocks deep (default 0, as on any dev chain).

Baseline, same run, same node: as many pre-signed plain Ether transfers as there were
settlements, sent straight to anvil with eth_sendRawTransaction, until the last receipt.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import zmq.asyncio  # noqa: E402
from eth_account import Account  # noqa: E402
from web3 import AsyncHTTPProvider, AsyncWeb3  # noqa: E402

from services.bus import Publisher, RpcClient, Security, Subscriber, ensure_keys  # noqa: E402
from services.bus import commands as C  # noqa: E402
from services.bus import events as E  # noqa: E402
from services.bus.hub import Hub  # noqa: E402
from services.bus.store import Store  # noqa: E402
from services.chain import bindings  # noqa: E402
from services.chain.config import ChainSettings  # noqa: E402
from services.chain.keystore import Keystore  # noqa: E402
from services.chain.node import ANVIL_DEV_KEY  # noqa: E402
from services.chain.operator import OperatorService  # noqa: E402
from services.chain.wallet import WalletService  # noqa: E402
from tests.support.anvil import start_anvil, stop_anvil  # noqa: E402
from tests.support.poll import until  # noqa: E402
from tests.support.signing import Domains, Meter, agreed  # noqa: E402 - signed as the sites sign

ROOT = pathlib.Path(__file__).resolve().parent.parent
PASS = "bench passphrase"
PRICE = 10**16


async def step(done: Any) -> None:
    """Until the bench step is done (``done()`` true), for at most 300 s."""
    await until(done, what="the bench step", timeout=300, every=0.01)


async def baseline(url: str, n: int) -> float:
    """Seconds to get n pre-signed plain transfers mined on anvil, straight over JSON-RPC."""
    w3 = AsyncWeb3(AsyncHTTPProvider(url))
    try:
        src = Account.create()
        dev = Account.from_key(ANVIL_DEV_KEY)
        await w3.provider.make_request("anvil_setBalance", [src.address, hex(10**21)])  # type: ignore[arg-type]
        chain_id = await w3.eth.chain_id
        block = await w3.eth.get_block("latest")
        fee = 2 * int(block["baseFeePerGas"]) + 10**9
        raws = [src.sign_transaction({"to": dev.address, "value": 1, "nonce": i, "gas": 21000, "chainId": chain_id,
                                      "maxFeePerGas": fee, "maxPriorityFeePerGas": 10**9}).raw_transaction
                for i in range(n)]
        t0 = time.perf_counter()
        hashes = [await w3.eth.send_raw_transaction(r) for r in raws]
        for h in hashes:
            await w3.eth.wait_for_transaction_receipt(h, poll_latency=0.01)
        return time.perf_counter() - t0
    finally:
        await bindings.close_provider(w3)


@dataclass
class Result:
    """One measured run of the chain service's settlement on anvil, and its baseline."""

    trades: int
    steps: int
    opened_s: float
    """From the first TradeAgreed published to the last trade recorded on chain."""
    settled: int
    settle_txs: int
    settle_gas: int
    elapsed: float
    """From the first Delivery published to the last trade closed on chain."""
    baseline_s: float
    """As many pre-signed plain transfers as settlements, to the last receipt."""

    @property
    def kwh(self) -> float:
        return self.trades  # 1 kWh a trade

    @property
    def rate(self) -> float:
        return self.settled / self.elapsed

    @property
    def baseline_rate(self) -> float:
        return self.settled / self.baseline_s


async def run(trades: int, steps: int, block_time: float = 0.0, confirmations: int = 0) -> None:
    r = await measure(trades, steps, block_time, confirmations)
    settled, elapsed, base, kwh = r.settled, r.elapsed, r.baseline_s, r.kwh
    settle_txs, settle_gas = r.settle_txs, r.settle_gas
    svc_rate = settled / elapsed
    base_rate = settled / base
    mining = f"a block every {block_time:g} s" if block_time else "a block per transaction"
    print(f"trades: {trades} x 1 kWh, {steps} delivery readings each ({trades * steps} Delivery events); "
          f"anvil: {mining}; final at depth {confirmations}")
    print(f"service:  {settled} settlements in {settle_txs} settle transactions, {elapsed:.2f} s "
          f"-> {svc_rate:.1f} settlements/s, {kwh / elapsed:.2f} kWh/s")
    print(f"          gas per settled kWh: {settle_gas / kwh:,.0f} (settle gas {settle_gas:,} for {kwh:.0f} kWh)")
    print(f"baseline: {settled} pre-signed plain transfers straight to anvil, {base:.2f} s "
          f"-> {base_rate:.1f} tx/s, 21,000 gas each")
    print(f"ratio service/baseline (per-second rate): {svc_rate / base_rate:.3f}")
    print(f"ratio gas per settled kWh / gas per plain transfer: {settle_gas / kwh / 21000:.2f}")


async def measure(trades: int, steps: int, block_time: float = 0.0, confirmations: int = 0) -> Result:
    anvil, url = start_anvil(*(["--block-time", f"{block_time:g}"] if block_time else []))
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="gridtrade-bench-"))
    keys = tmp / "keys"
    for site in ("market", "bench"):
        ensure_keys(keys, site)
    hub = Hub(Security(keys, "market"), pub_bind="tcp://127.0.0.1:*", sub_bind="tcp://127.0.0.1:*")
    hub_pub, hub_sub = hub.start()
    common = dict(keys_dir=keys, hub_pub=hub_pub, hub_sub=hub_sub, chain_url=url, chain_bind="tcp://127.0.0.1:*",
                  scrypt_n=2**10, poll_s=0.05, settle_window_s=0.2, settle_max_batch=100, heartbeat_s=0.2,
                  log_level=os.environ.get("BENCH_LOG", "WARNING"), confirmation_depth=confirmations)
    settings = ChainSettings(site="market", data_dir=tmp / "chain", **common)  # type: ignore[arg-type]
    ks = Keystore(tmp / "bench" / "keystore", scrypt_n=settings.scrypt_n)  # the bench site's wallet
    seller, buyer = ks.new(PASS, site="bench").address, ks.new(PASS, site="bench").address
    seller_key, buyer_key = ks.decrypt(seller, PASS), ks.decrypt(buyer, PASS)
    for _ in range(100):
        try:
            w3 = AsyncWeb3(AsyncHTTPProvider(url))
            await w3.eth.chain_id
            await bindings.close_provider(w3)
            break
        except OSError:
            await bindings.close_provider(w3)
            await asyncio.sleep(0.1)
    svc = OperatorService(settings)
    await svc.start()
    await asyncio.wait_for(svc.connected.wait(), 60)
    wallet = WalletService(ChainSettings(site="bench", data_dir=tmp / "bench", chain_role="site",
                                         chain_rpc=svc.servers[0].endpoint, **common))  # type: ignore[arg-type]
    await wallet.start()
    await asyncio.wait_for(wallet.connected.wait(), 60)
    ctx = zmq.asyncio.Context()
    sec = Security(keys, "bench")
    sec.start(ctx)
    store = Store(tmp / "bench.sqlite")
    seen: list[Any] = []
    pub = Publisher(ctx, sec, store, source="bench/bench", hub_pub=hub_pub, heartbeat_s=0.2)
    sub = Subscriber(ctx, sec, store, hub_sub=hub_sub, prefixes=["chain."],
                     handler=lambda env, conn: seen.append(env.body))
    # trades come from the market's auction (the subscribers' publish policy): its own key and context
    actx = zmq.asyncio.Context()
    asec = Security(keys, "market")
    asec.start(actx)
    astore = Store(tmp / "auction.sqlite")
    auction = Publisher(actx, asec, astore, source="market/auction", hub_pub=hub_pub, heartbeat_s=0.2)
    await pub.start()
    await auction.start()
    await sub.start()
    client = RpcClient(ctx, sec, wallet.servers[0].endpoint, server_site="bench")
    of = lambda cls: [e for e in seen if isinstance(e, cls)]  # noqa: E731
    try:
        for a in (seller, buyer):
            await client.request(C.Unlock(address=a, passphrase=PASS), timeout=30)
        d = Domains.of(svc)
        solar, home = Meter("bench", seller), Meter("bench", buyer, name="m2")  # the bench site's two meters
        for m in (solar, home):
            await pub.publish(m.announce(d))
        await pub.publish(solar.production(d, trades * 1000))
        await step(lambda: sum(m.wh for m in of(E.Minted)) >= trades * 1000)
        await client.request(C.Escrow(account=buyer, action="deposit", amount_wei=trades * PRICE), timeout=30)
        await client.request(C.Approve(account=seller, wh=trades * 1000), timeout=30)
        await step(lambda: not svc.txm.pending() and not wallet.txm.pending())
        t_open = time.perf_counter()
        for i in range(trades):
            await auction.publish(agreed(d, f"t{i}", seller_key, buyer_key, 1000, PRICE, seller_site="bench",
                                         buyer_site="bench"))
        await step(lambda: len(of(E.TradeRecorded)) >= trades)
        opened_s = time.perf_counter() - t_open

        t0 = time.perf_counter()
        for k in range(1, steps + 1):
            for i in range(trades):
                await pub.publish(home.delivery(d, f"t{i}", 1000 * k // steps))
            await asyncio.sleep(0.05)  # the meter reports over time, not all at once
        await step(lambda: len(of(E.TradeClosed)) >= trades)
        elapsed = time.perf_counter() - t0
        settled = of(E.Settled)
        rows = svc.store.conn.execute(
            "SELECT COUNT(*), SUM(gas_used) FROM chain_txs WHERE kind = 'settle' AND status = 'confirmed'").fetchone()
        settle_txs, settle_gas = int(rows[0]), int(rows[1])
        base = await baseline(url, len(settled))
    finally:
        await client.close()
        await sub.stop()
        await pub.stop()
        await auction.stop()
        store.close()
        astore.close()
        sec.stop()
        asec.stop()
        ctx.destroy(0)
        actx.destroy(0)
        await wallet.stop()
        await svc.stop()
        hub.stop()
        stop_anvil(anvil)

    return Result(trades=trades, steps=steps, opened_s=opened_s, settled=len(settled), settle_txs=settle_txs,
                  settle_gas=settle_gas, elapsed=elapsed, baseline_s=base)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trades", type=int, default=40)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--block-time", type=float, default=0.0, help="interval mining: seconds per block (0: automine)")
    p.add_argument("--confirmations", type=int, default=0, help="blocks on top before a transaction is final")
    a = p.parse_args()
    asyncio.run(run(a.trades, a.steps, a.block_time, a.confirmations))


if __name__ == "__main__":
    main()
