"""Crash and outage: SIGKILL of the chain service in both roles (the market's operator and
a site's wallet, subprocesses on anvil) while their transactions are pending, and the
anvil node stopped and started again."""

from __future__ import annotations

import asyncio
import pathlib
import subprocess
from typing import Any

import pytest
from web3 import AsyncHTTPProvider, AsyncWeb3

from services.bus import commands as C
from services.bus import events as E
from services.bus.errors import RequestError
from services.bus.prices import wei_for
from services.chain import bindings
from services.chain.keystore import Keystore
from tests.support.anvil import answers_rpc, start_anvil, stop_anvil
from tests.support.paths import ROOT
from tests.support.ports import free_port

from tests.support.signing import Domains, Meter, agreed

from tests.support.bus import Grid
from tests.support.chain import PASS, TX, ChainProcess, stack_with_two_accounts, up
from tests.support.poll import until

pytestmark = pytest.mark.anvil
PRICE = 10**16


async def txpool_size(w3: AsyncWeb3) -> int:
    pool = (await w3.provider.make_request("txpool_content", []))["result"]["pending"]  # type: ignore[arg-type]
    return sum(len(v) for v in pool.values())


async def test_sigkill_while_transactions_pending(grid: Grid, tmp_path: pathlib.Path, peer_factory: Any) -> None:
    anvil, url = start_anvil()
    data = tmp_path / "chain"
    solar_ks = Keystore(tmp_path / "solar-1" / "keystore", scrypt_n=1024)
    seller = solar_ks.new(PASS, site="solar-1").address
    home = Keystore(tmp_path / "home-7" / "keystore", scrypt_n=1024)
    buyer, bob = home.new(PASS, site="home-7").address, home.new(PASS, site="home-7").address
    seller_key, buyer_key = solar_ks.decrypt(seller, PASS), home.decrypt(buyer, PASS)
    svc = ChainProcess(grid, data, url, tmp_path / "chain.log")
    wallets = {site: ChainProcess(grid, tmp_path / site, url, tmp_path / f"wallet-{site}.log", site=site,
                                  operator=svc.endpoint) for site in ("solar-1", "home-7")}
    w3 = AsyncWeb3(AsyncHTTPProvider(url))
    try:
        svc.start()
        for w in wallets.values():
            w.start()
        peer = await peer_factory()
        peer.endpoints = {"operator": (svc.endpoint, "market"),
                          **{site: (w.endpoint, site) for site, w in wallets.items()}}
        await up(peer)
        for site in wallets:
            await up(peer, site, site)
        ev = peer.probe
        for a, site in ((seller, "solar-1"), (buyer, "home-7")):
            await peer.request(C.Unlock(address=a, passphrase=PASS), site=site)
        deployment = await ev.wait_for(lambda: ev.of(E.Deployment))
        d = Domains.of(deployment[-1])
        solar, meter2 = Meter("solar-1", seller), Meter("home-7", buyer, name="m2")
        for m in (solar, meter2):
            await peer.publish(m.announce(d))
        await peer.publish(solar.production(d, 1000))
        await ev.wait_for(lambda: ev.of(E.Minted))
        await ev.wait_for(lambda: len([u for u in ev.of(E.ChainTx) if u.kind == "fund" and u.status == "confirmed"])
                          == 3)
        dep = await peer.request(C.Escrow(account=buyer, action="deposit", amount_wei=10**18), site="home-7")
        appr = await peer.request(C.Approve(account=seller, wh=1000), site="solar-1")
        await ev.wait_for(lambda: {dep.tx_hash, appr.tx_hash} <= {u.tx_hash for u in ev.of(TX)
                                                                 if u.status == "confirmed"})
        bob_start = await w3.eth.get_balance(bob)

        # 1) mining stopped: a mint, an open and a transfer are sent and stay pending; SIGKILL
        await peer.request(C.SetMining(action="stop"), site="market")
        await peer.publish(solar.production(d, 2000))
        trade = dict(trade_id="t-1", seller=seller, buyer=buyer, seller_site="solar-1", buyer_site="home-7",
                     wh=1000, price_wei_per_kwh=PRICE)
        await peer.publish(agreed(d, "t-1", seller_key, buyer_key, 1000, PRICE, seller_site="solar-1",
                                  buyer_site="home-7"))
        await peer.request(C.Transfer(sender=seller, to=bob, amount_wei=1), site="solar-1")
        for _ in range(600):
            if await txpool_size(w3) == 3:
                break
            await asyncio.sleep(0.05)
        assert await txpool_size(w3) == 3
        svc.kill()
        wallets["solar-1"].kill()

        svc.start()
        wallets["solar-1"].start()
        await up(peer)
        await up(peer, "solar-1", "solar-1")
        assert len((await peer.request(C.ListPending(), site="market")).txs) == 2  # the operator's own
        assert len((await peer.request(C.ListPending(), site="solar-1")).txs) == 1  # the wallet's own
        await peer.request(C.SetMining(action="start"), site="market")
        await ev.wait_for(lambda: ev.of(E.TradeRecorded) and len(ev.of(E.Minted)) == 2)

        # 2) a settlement pending at the kill; then the close
        await peer.request(C.SetMining(action="stop"), site="market")
        await peer.publish(meter2.delivery(d, "t-1", 600, final=True))
        for _ in range(600):
            if await txpool_size(w3) == 1:
                break
            await asyncio.sleep(0.05)
        assert await txpool_size(w3) == 1
        svc.kill()
        svc.start()
        await up(peer)
        await peer.request(C.SetMining(action="start"), site="market")
        await ev.wait_for(lambda: ev.of(E.Settled))
        await peer.publish(E.TradeStatus(state="closed", delivered_wh=600, **trade))
        await ev.wait_for(lambda: ev.of(E.TradeClosed))
        await until(lambda: all(
            any(u.tx_hash == p.tx_hash and u.status != "pending" for u in ev.of(TX))
            for p in ev.of(TX) if p.status == "pending"), timeout=60)
    except BaseException:
        print(svc.log.read_text()[-6000:])
        for w in wallets.values():
            print(w.log.read_text()[-3000:])
        raise
    finally:
        svc.stop()
        for w in wallets.values():
            w.stop()

    try:
        ups = ev.of(TX)
        sent = [u.tx_hash for u in ups if u.status == "pending"]
        assert len(sent) == len(set(sent))
        for h in sent:  # confirmed and published once each
            assert [u.status for u in ups if u.tx_hash == h and u.status != "pending"] == ["confirmed"], h
        assert [(m.produced_wh, m.wh) for m in ev.of(E.Minted)] == [(1000, 1000), (2000, 1000)]
        assert len(ev.of(E.TradeRecorded)) == 1
        assert [(s.delivered_wh, s.paid_wei) for s in ev.of(E.Settled)] == [(600, wei_for(600, PRICE))]
        assert len(ev.of(E.TradeClosed)) == 1

        import sqlite3
        db = sqlite3.connect(data / "chain.sqlite")
        token, market, registry = (db.execute("SELECT value FROM chain_meta WHERE key = ?", (k,)).fetchone()[0]
                                   for k in ("token", "market", "registry"))
        op_rows = db.execute("SELECT account, COUNT(*) FROM chain_txs GROUP BY account").fetchall()
        db.close()
        for site in wallets:
            db = sqlite3.connect(tmp_path / site / "wallet.sqlite")
            op_rows += db.execute("SELECT account, COUNT(*) FROM chain_txs GROUP BY account").fetchall()
            db.close()
        d = bindings.attach(w3, token, market, registry)
        t, m = d.token.functions, d.market.functions
        assert await t.totalSupply().call() == 2000
        assert await t.balanceOf(seller).call() == 2000 - 600
        assert await t.balanceOf(buyer).call() == 600
        assert await m.credit(seller).call() == wei_for(600, PRICE)
        assert await m.freeEscrow(buyer).call() == 10**18 - wei_for(600, PRICE)
        assert await m.lockedEscrow(buyer).call() == 0
        assert await w3.eth.get_balance(bob) == bob_start + 1
        for account, n in op_rows:  # nothing sent beyond what the store knows (the admin key deploys)
            assert await w3.eth.get_transaction_count(account) == n
    finally:
        await bindings.close_provider(w3)
        stop_anvil(anvil)


async def test_anvil_restart_reconnects_with_backoff(grid: Grid, tmp_path: pathlib.Path, peer_factory: Any) -> None:
    state = tmp_path / "anvil-state.json"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    anvil_bin = ROOT / "node_modules" / ".bin" / "anvil"

    def run_anvil() -> subprocess.Popen[bytes]:
        p = subprocess.Popen([str(anvil_bin), "--port", str(port), "--silent", "--state", str(state)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        for _ in range(300):
            if answers_rpc(url):
                return p
            import time
            time.sleep(0.05)
        raise AssertionError("anvil did not start")

    anvil = run_anvil()
    stack, alice, bob = await stack_with_two_accounts(grid, tmp_path, url)
    svc = stack.wallet("tester")
    try:
        peer = await peer_factory(stack)
        await peer.request(C.Unlock(address=alice, passphrase=PASS))
        await until(lambda: len(stack.operator.store.conn.execute("SELECT * FROM chain_funded").fetchall()) == 2
                         and not stack.pending(), timeout=60)
        market = svc.dep.market_address
        h1 = (await peer.request(C.Transfer(sender=alice, to=bob, amount_wei=3))).tx_hash
        await peer.probe.wait_for(lambda: any(u.tx_hash == h1 and u.status == "confirmed"
                                                 for u in peer.probe.of(E.WalletTx)))
        stop_anvil(anvil)  # SIGTERM: anvil dumps its state to the file
        await until(lambda: not svc.connected.is_set() and not stack.operator.connected.is_set(), timeout=60)
        with pytest.raises(RequestError) as ei:
            await peer.request(C.GetBalances(address=alice))
        assert ei.value.code == "chain_unavailable"
        await asyncio.sleep(1.5)  # a few backoff rounds against a closed port
        anvil = run_anvil()
        await asyncio.wait_for(svc.connected.wait(), 60)
        await asyncio.wait_for(stack.operator.connected.wait(), 60)
        assert svc.dep.market_address == market  # same chain (state kept): same contracts
        assert stack.operator.dep.market_address == market
        h2 = (await peer.request(C.Transfer(sender=alice, to=bob, amount_wei=4))).tx_hash
        await peer.probe.wait_for(lambda: any(u.tx_hash == h2 and u.status == "confirmed"
                                                 for u in peer.probe.of(E.WalletTx)))
        assert (await peer.request(C.GetBalances(address=bob))).ether_wei == 100 * 10**18 + 7
        assert svc.reconnects >= 1
    finally:
        await stack.stop()
        stop_anvil(anvil)
