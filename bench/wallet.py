"""Wallet reads during a burst of writes, against the same reads on an idle wallet.

    .venv/bin/python bench/wallet.py [--chain embedded|anvil] [--seconds 5] [--readers 8]

The site's wallet (the chain service in its site role, here beside the market's operator
on one chain) answers balance reads (``chain.balances``: Ether,
escrow, credit, tokens and the Wh ever minted to the account) over its real request
socket. Measured twice in one run, on the same service and chain:

- baseline: ``readers`` concurrent clients read balances for ``seconds`` on an idle wallet;
- burst: the same reads while other clients send transfers, escrow deposits and unlock
  attempts (scrypt) as fast as the wallet takes them, and the chain holds a few hundred
  mints (a long log to index).

Printed: reads/s and the slowest read in each phase, and the ratio burst/baseline. A
wallet whose reads wait behind writes, scrypt or the node shows a ratio far below 1 and
a slowest read of seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import zmq.asyncio  # noqa: E402

from services.bus import Publisher, RpcClient, Security, ensure_keys  # noqa: E402
from services.bus import commands as C  # noqa: E402
from services.bus.hub import Hub  # noqa: E402
from services.bus.store import Store  # noqa: E402
from services.chain.config import ChainSettings  # noqa: E402
from services.chain.keystore import Keystore  # noqa: E402
from services.chain.operator import OperatorService  # noqa: E402
from services.chain.wallet import WalletService  # noqa: E402
from tests.support.anvil import start_anvil, stop_anvil  # noqa: E402
from tests.support.poll import until  # noqa: E402
from tests.support.signing import Domains, Meter  # noqa: E402 - signed as the site's meter signs

PASS = "bench passphrase"
SITE = "solar-1"


async def reads(clients: list[RpcClient], address: str, seconds: float) -> tuple[int, float]:
    """(reads done, slowest read in s) by every client reading in a loop for ``seconds``."""
    done, slowest = 0, 0.0
    end = time.perf_counter() + seconds

    async def reader(c: RpcClient) -> None:
        nonlocal done, slowest
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            await c.request(C.GetBalances(address=address), timeout=60)
            slowest = max(slowest, time.perf_counter() - t0)
            done += 1

    await asyncio.gather(*(reader(c) for c in clients))
    return done, slowest


async def writes(client: RpcClient, sender: str, other: str, stop: asyncio.Event) -> int:
    n = 0
    while not stop.is_set():
        try:
            if n % 3 == 0:
                await client.request(C.Transfer(sender=sender, to=other, amount_wei=1), timeout=60)
            elif n % 3 == 1:
                await client.request(C.Escrow(account=sender, action="deposit", amount_wei=1), timeout=60)
            else:
                await client.request(C.Unlock(address=other, passphrase="a wrong guess"), timeout=60)
        except Exception:  # noqa: BLE001 - refusals count as writes handled too
            pass
        n += 1
    return n


async def run(chain: str, seconds: float, readers: int, mints: int) -> None:
    anvil, url = start_anvil() if chain == "anvil" else (None, "embedded:bench")  # one chain for both roles
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="gridtrade-bench-"))
    keys = tmp / "keys"
    for site in ("market", SITE):
        ensure_keys(keys, site)
    hub = Hub(Security(keys, "market"), pub_bind="tcp://127.0.0.1:*", sub_bind="tcp://127.0.0.1:*")
    hub_pub, hub_sub = hub.start()
    common = dict(keys_dir=keys, hub_pub=hub_pub, hub_sub=hub_sub, chain_url=url, chain_bind="tcp://127.0.0.1:*",
                  scrypt_n=2**14, poll_s=0.05, heartbeat_s=0.2, log_level="WARNING")
    op = OperatorService(ChainSettings(site="market", data_dir=tmp / "market", **common))  # type: ignore[arg-type]
    await op.start()
    await asyncio.wait_for(op.connected.wait(), 120)
    settings = ChainSettings(site=SITE, data_dir=tmp / SITE, chain_role="site", chain_rpc=op.servers[0].endpoint,
                             **common)  # type: ignore[arg-type]
    ks = Keystore(settings.keystore, scrypt_n=settings.scrypt_n)
    holder = ks.new(PASS, name=f"{SITE} holder", site=SITE).address
    other = ks.new(PASS, name=f"{SITE} other", site=SITE).address
    svc = WalletService(settings)
    await svc.start()
    await asyncio.wait_for(svc.connected.wait(), 120)
    ctx = zmq.asyncio.Context()
    sec = Security(keys, SITE)
    sec.start(ctx)
    store = Store(tmp / "bench.sqlite")
    pub = Publisher(ctx, sec, store, source=f"{SITE}/meter", hub_pub=hub_pub, heartbeat_s=0.2)
    await pub.start()
    endpoint = svc.servers[0].endpoint
    clients = [RpcClient(ctx, sec, endpoint, server_site=SITE) for _ in range(readers + 1)]
    writer = clients.pop()
    try:
        await writer.request(C.Unlock(address=holder, passphrase=PASS), timeout=60)
        d, meter = Domains.of(op), Meter(SITE, holder)
        await pub.publish(meter.announce(d))
        for i in range(1, mints + 1):  # one mint each: the next counter once the last is minted
            await pub.publish(meter.production(d, i * 1000))
            await until(lambda i=i: op.store.conn.execute(
                "SELECT COALESCE(MAX(minted_wh), 0) FROM job_production").fetchone()[0] >= i * 1000,
                what=f"mint {i}", timeout=600, every=0.01)
        await reads(clients, holder, 1.0)  # warm up
        base_n, base_slow = await reads(clients, holder, seconds)
        stop = asyncio.Event()
        burst = asyncio.create_task(writes(writer, holder, other, stop))
        burst_n, burst_slow = await reads(clients, holder, seconds)
        stop.set()
        n_writes = await burst
    finally:
        for c in [*clients, writer]:
            await c.close()
        await pub.stop()
        store.close()
        sec.stop()
        ctx.destroy(0)
        await svc.stop()
        await op.stop()
        hub.stop()
        if anvil is not None:
            stop_anvil(anvil)

    base_rate, burst_rate = base_n / seconds, burst_n / seconds
    print(f"chain: {chain}, {mints} mints on it, {readers} concurrent readers, {seconds:g} s per phase")
    print(f"baseline (idle wallet):   {base_rate:8.1f} reads/s, slowest read {base_slow * 1000:7.1f} ms")
    print(f"burst ({n_writes} writes: transfers, deposits, unlock attempts):")
    print(f"                          {burst_rate:8.1f} reads/s, slowest read {burst_slow * 1000:7.1f} ms")
    print(f"ratio reads/s during the burst / idle: {burst_rate / base_rate:.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chain", choices=("embedded", "anvil"), default="embedded")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--readers", type=int, default=8)
    p.add_argument("--mints", type=int, default=200)
    a = p.parse_args()
    asyncio.run(run(a.chain, a.seconds, a.readers, a.mints))


if __name__ == "__main__":
    main()
