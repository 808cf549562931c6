"""The chain service on a chain that behaves like a real one, not an instant dev chain:
blocks every second (interval mining), a confirmation depth, a base fee that jumps,
transactions the node refuses (for their fees, or for good), dropped from its pool or
taken away by a reorg, and a JSON-RPC endpoint that rate-limits and answers late.
Each runs against its own anvil (node_modules/.bin/anvil) behind a proxy in the test, with
the market's operator and the sites' wallets (their own transactions, their own view)."""

from __future__ import annotations

import asyncio
import pathlib
import sqlite3
from typing import Any

import pytest
from eth_account import Account
from eth_utils import keccak
from web3 import AsyncHTTPProvider, AsyncWeb3

from services.bus import commands as C
from services.bus import events as E
from services.bus.prices import wei_for
from services.chain import bindings
from services.chain.keystore import Keystore
from services.chain.node import ANVIL_DEV_KEY, connect
from tests.support.anvil import start_anvil, stop_anvil

from tests.support.signing import Domains, Meter, agreed

from tests.support.bus import Grid
from tests.support.chain import PASS, TX, ChainProcess, chain_settings, site_keystore, start_chain, start_stack, up
from tests.support.poll import until
from .rpc_proxy import RpcProxy, rpc, txpool

pytestmark = pytest.mark.anvil
PRICE = 10**16
GWEI = 10**9


async def blocks_every_second(w3: AsyncWeb3) -> None:
    await rpc(w3, "evm_setAutomine", False)
    await rpc(w3, "evm_setIntervalMining", 1)


async def no_blocks(w3: AsyncWeb3) -> None:
    await rpc(w3, "evm_setIntervalMining", 0)
    await rpc(w3, "evm_setAutomine", False)


async def pool_holds(w3: AsyncWeb3, n: int, timeout: float = 30) -> list[dict[str, Any]]:
    async def loop() -> list[dict[str, Any]]:
        while len(pool := await txpool(w3)) < n:
            await asyncio.sleep(0.05)
        return pool
    return await asyncio.wait_for(loop(), timeout)


def all_final(ev: Any) -> bool:
    ups = ev.of(TX)
    return all(any(u.tx_hash == p.tx_hash and u.status != "pending" for u in ups)
               for p in ups if p.status == "pending")


async def assert_no_gaps(w3: AsyncWeb3, db_paths: list[pathlib.Path], deployed: dict[str, int]) -> None:
    """Every nonce of every account the services (the operator, the wallets) sent from is
    used on-chain, once, by a transaction their stores know; nothing is left in the node's
    pool."""
    rows: list[tuple[str, int, str]] = []
    nexts: dict[str, int] = {}
    for db_path in db_paths:
        db = sqlite3.connect(db_path)
        try:
            rows += db.execute("SELECT account, nonce, status FROM chain_txs ORDER BY account, nonce").fetchall()
            nexts |= dict(db.execute("SELECT account, next FROM chain_nonces").fetchall())
        finally:
            db.close()
    rows.sort(key=lambda r: (r[0], r[1]))
    assert not await txpool(w3)
    by_account: dict[str, list[int]] = {}
    for account, nonce, status in rows:
        assert status in ("confirmed", "failed"), (account, nonce, status)
        by_account.setdefault(account, []).append(nonce)
    for account, nonces in by_account.items():
        first = deployed.get(account, 0)
        count = await w3.eth.get_transaction_count(account)
        assert nonces == list(range(first, count)), (account, nonces, count)
        assert nexts[account] == count, (account, nexts[account], count)


async def test_interval_mining_fees_drops_reorg_and_rate_limits(grid: Grid, tmp_path: pathlib.Path,
                                                                peer_factory: Any) -> None:
    anvil, url = start_anvil()
    proxy = RpcProxy(url)
    purl = await proxy.start()
    w3 = AsyncWeb3(AsyncHTTPProvider(url))  # the test's own line to anvil, past the proxy
    solar_ks, home_ks = site_keystore(tmp_path, "solar-1"), site_keystore(tmp_path, "home-7")
    seller = solar_ks.new(PASS, site="solar-1").address
    buyer = home_ks.new(PASS, site="home-7").address
    seller_key, buyer_key = solar_ks.decrypt(seller, PASS), home_ks.decrypt(buyer, PASS)
    stack = await start_stack(grid, tmp_path, purl, sites=("solar-1", "home-7"), confirmation_depth=2,
                              replace_after_s=1.0, rpc_timeout_s=1.0, rpc_retries=8, close_grace_s=0.0,
                              dispute_window_s=2)
    svc = stack.operator
    meters = [Meter("solar-1", seller, name=f"m{i}") for i in range(3)]
    home = Meter("home-7", buyer, name="m2")
    mint_gone, open_cheap = bytes.fromhex(meters[1].address[2:]), bindings.id32("t-1")
    mint_call = keccak(text="mint(address,uint256,bytes)")[:4]
    refused: set[bytes] = set()

    def refuse(raw: bytes) -> str | None:
        """Like geth's pool, once each: the second mint for good, the trade's open for its fees."""
        for key, msg in ((mint_gone, "exceeds block gas limit"), (open_cheap, "transaction underpriced")):
            if key in raw and key not in refused and (key != mint_gone or mint_call in raw):
                refused.add(key)
                return msg
        return None

    try:
        peer = await peer_factory(stack)
        ev = peer.probe
        await blocks_every_second(w3)
        proxy.fault_rate = 0.06
        proxy.refuse = refuse
        for a, site in ((seller, "solar-1"), (buyer, "home-7")):
            await peer.request(C.Unlock(address=a, passphrase=PASS), site=site)

        # three meters' mints at three operator nonces; the node refuses the second for good: its
        # nonce is filled by a no-op (the third is not held up), the mint is done again later, once
        d = Domains.of(svc)
        for m in (*meters, home):
            await peer.publish(m.announce(d))
        await until(lambda: len(svc.meters.accounts_of(svc.dep.registry_address)) == 4, timeout=90)
        for i, m in enumerate(meters):
            await peer.publish(m.production(d, 1000))
            await ev.wait_for(lambda i=i: len([u for u in ev.of(E.ChainTx) if u.kind == "mint"
                                               and u.status == "pending"]) > i, timeout=60)
        await ev.wait_for(lambda: len({m.meter for m in ev.of(E.Minted)}) == 3, timeout=90)
        dep = await peer.request(C.Escrow(account=buyer, action="deposit", amount_wei=10**18), site="home-7")
        appr = await peer.request(C.Approve(account=seller, wh=3000), site="solar-1")
        await ev.wait_for(lambda: {dep.tx_hash, appr.tx_hash} <= {u.tx_hash for u in ev.of(E.WalletTx)
                                                                 if u.status == "confirmed"}, timeout=90)

        # the open is signed under a 1 gwei base fee, refused once as underpriced (signed again),
        # then the base fee jumps to 50 gwei while it waits: it is replaced with higher fees
        await no_blocks(w3)
        trade = dict(trade_id="t-1", seller=seller, buyer=buyer, seller_site="solar-1", buyer_site="home-7",
                     wh=1000, price_wei_per_kwh=PRICE)
        await peer.publish(agreed(d, "t-1", seller_key, buyer_key, 1000, PRICE, seller_site="solar-1",
                                  buyer_site="home-7"))
        await pool_holds(w3, 1)
        await rpc(w3, "anvil_setNextBlockBaseFeePerGas", hex(50 * GWEI))
        await rpc(w3, "evm_mine")  # a 50 gwei block the open cannot be in; then more of them
        await rpc(w3, "anvil_setNextBlockBaseFeePerGas", hex(50 * GWEI))
        await blocks_every_second(w3)
        await ev.wait_for(lambda: ev.of(E.TradeRecorded), timeout=90)

        # a settlement dropped from the node's pool: sent again
        await no_blocks(w3)
        await peer.publish(home.delivery(d, "t-1", 600, final=True))
        pool = await pool_holds(w3, 1)
        await rpc(w3, "anvil_dropTransaction", pool[0]["hash"])
        await blocks_every_second(w3)

        # ... and once mined, its block is taken away by a reorg before it is 2 blocks deep
        def mined_settle() -> Any:
            return svc.store.conn.execute("SELECT block FROM chain_txs WHERE kind = 'settle' AND status = 'mined'"
                                          ).fetchone()
        row = await until(mined_settle, timeout=60, every=0.01)
        head = await w3.eth.block_number
        await rpc(w3, "anvil_reorg", head - row[0] + 1, [])
        await ev.wait_for(lambda: ev.of(E.Settled), timeout=90)

        await peer.publish(E.TradeStatus(state="closed", delivered_wh=600, **trade))
        await ev.wait_for(lambda: ev.of(E.TradeClosed), timeout=90)
        await ev.wait_for(lambda: all_final(ev), timeout=90)
        await until(lambda: not stack.pending(), timeout=60)
        proxy.fault_rate = 0.0
        stats = dict(svc.txm.stats)
        injected = dict(proxy.injected)
        retried = svc.node.transient
    except BaseException:
        print("tx stats", dict(svc.txm.stats) if svc.txm else None, "proxy", dict(proxy.injected))
        raise
    finally:
        await stack.stop()
        await proxy.stop()

    try:
        print("tx stats", stats, "injected", injected, "retried", retried)
        assert injected["http429"] and injected["limit"] and injected["late"] and injected["refused"] == 2
        assert retried.get("rate_limit") and retried.get("timeout")
        assert stats.get("noop", 0) >= 1 and stats.get("replaced", 0) >= 2 and stats.get("reorged", 0) >= 1
        assert stats.get("resent", 0) >= 1

        ups = ev.of(E.ChainTx)
        sent = [u.tx_hash for u in ups if u.status == "pending"]
        assert len(sent) == len(set(sent))
        finals = {h: [u for u in ups if u.tx_hash == h and u.status != "pending"] for h in sent}
        assert all(len(f) == 1 for f in finals.values()), finals
        failed = [f[0] for f in finals.values() if f[0].status == "failed"]
        # the only failure: the mint refused for good (its nonce filled by a no-op), with the node's reason
        assert [(u.kind, u.ref) for u in failed] == [("mint", meters[1].address)]
        assert "no-op" in failed[0].reason  # (the node's refusal, or its never being mined since)
        assert not [u for u in ev.of(TX) if "limit exceeded" in u.reason or "429" in u.reason
                    or "timeout" in u.reason]
        wallet_finals = [u for u in ev.of(E.WalletTx) if u.status != "pending"]  # the sites' own, once each
        assert sorted((u.site, u.kind, u.status) for u in wallet_finals) == [
            ("home-7", "deposit", "confirmed"), ("solar-1", "approve", "confirmed")]
        opens = [f[0] for f in finals.values() if f[0].kind == "open"]
        assert len(opens) == 1 and opens[0].status == "confirmed" and opens[0].mined_hash  # a later version mined

        assert sorted((m.meter, m.wh) for m in ev.of(E.Minted)) == sorted((m.address, 1000) for m in meters)
        assert len(ev.of(E.TradeRecorded)) == 1
        assert [(s.delivered_wh, s.paid_wei) for s in ev.of(E.Settled)] == [(600, wei_for(600, PRICE))]
        assert [(c.delivered_wh, c.paid_wei) for c in ev.of(E.TradeClosed)] == [
            (600, wei_for(600, PRICE))]

        await assert_no_gaps(w3, [tmp_path / "market" / "chain.sqlite",
                                  *(tmp_path / site / "wallet.sqlite" for site in ("solar-1", "home-7"))],
                             {})
        d = bindings.attach(w3, svc.dep.token_address, svc.dep.market_address, svc.dep.registry_address)
        t, m = d.token.functions, d.market.functions
        assert await t.totalSupply().call() == 3000
        assert await t.balanceOf(seller).call() == 3000 - 600
        assert await t.balanceOf(buyer).call() == 600
        assert await t.balanceOf(d.market_address).call() == 0
        assert await m.credit(seller).call() == wei_for(600, PRICE)
        assert await m.freeEscrow(buyer).call() == 10**18 - wei_for(600, PRICE)
        assert await m.lockedEscrow(buyer).call() == 0
    finally:
        await bindings.close_provider(w3)
        stop_anvil(anvil)


async def test_sigkill_with_pending_nonces_then_restart_under_a_higher_base_fee(
        grid: Grid, tmp_path: pathlib.Path, peer_factory: Any) -> None:
    anvil, url = start_anvil()
    w3 = AsyncWeb3(AsyncHTTPProvider(url))
    data = tmp_path / "chain"
    seller = Keystore(tmp_path / "solar-1" / "keystore", scrypt_n=1024).new(PASS, site="solar-1").address
    bob = Keystore(tmp_path / "home-7" / "keystore", scrypt_n=1024).new(PASS, site="home-7").address
    svc = ChainProcess(grid, data, url, tmp_path / "chain.log")
    wallet = ChainProcess(grid, tmp_path / "solar-1", url, tmp_path / "wallet-solar-1.log", site="solar-1",
                          operator=svc.endpoint)
    for p in (svc, wallet):
        p.env.update(GRIDTRADE_CONFIRMATION_DEPTH="1", GRIDTRADE_REPLACE_AFTER_S="1")
    congestion: asyncio.Task[None] | None = None

    async def congested() -> None:  # every block's base fee is 80 gwei
        while True:
            await rpc(w3, "anvil_setNextBlockBaseFeePerGas", hex(80 * GWEI))
            await asyncio.sleep(0.2)

    try:
        svc.start()
        wallet.start()
        peer = await peer_factory()
        peer.endpoints = {"operator": (svc.endpoint, "market"), "solar-1": (wallet.endpoint, "solar-1")}
        await up(peer)
        await up(peer, "solar-1", "solar-1")
        ev = peer.probe
        await blocks_every_second(w3)
        await peer.request(C.Unlock(address=seller, passphrase=PASS), site="solar-1")
        d = Domains.of((await ev.wait_for(lambda: ev.of(E.Deployment)))[-1])
        meters = [Meter("solar-1", seller, name=f"m{i}") for i in range(4)]
        for m in meters:
            await peer.publish(m.announce(d))
        await peer.publish(meters[0].production(d, 1000))
        await ev.wait_for(lambda: ev.of(E.Minted), timeout=60)
        await ev.wait_for(lambda: all_final(ev), timeout=60)  # the dev funding too
        bob_start = await w3.eth.get_balance(bob)

        # no blocks: three mints (operator nonces n, n+1, n+2) and the wallet's transfer wait in the
        # pool; SIGKILL of both
        await no_blocks(w3)
        for i in (1, 2, 3):  # one meter each, so each is its own mint
            await peer.publish(meters[i].production(d, 1000))
            await pool_holds(w3, i)
        await peer.request(C.Transfer(sender=seller, to=bob, amount_wei=1), site="solar-1")
        await pool_holds(w3, 4)
        svc.kill()
        wallet.kill()

        # the base fee goes from ~1 to 80 gwei: none of them can be mined as signed
        congestion = asyncio.create_task(congested())
        await asyncio.sleep(0.3)
        await blocks_every_second(w3)
        svc.start()
        wallet.start()
        await up(peer)
        await up(peer, "solar-1", "solar-1")
        # the operator's are re-signed with higher fees; the transfer waits for its account's key,
        # which is at its site's wallet only

        async def seller_waits() -> bool:
            txs = (await peer.request(C.ListPending(account=seller), site="solar-1")).txs
            return bool(txs) and all("unlocked" in t.reason for t in txs)
        for _ in range(300):
            if await seller_waits():
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the locked account's stuck transfer does not say it waits for a key")
        await peer.request(C.Unlock(address=seller, passphrase=PASS), site="solar-1")
        await ev.wait_for(lambda: len(ev.of(E.Minted)) == 4, timeout=90)
        await ev.wait_for(lambda: all_final(ev), timeout=90)
        pending = (await peer.request(C.ListPending(recent_s=600), site="market")).txs
        own = (await peer.request(C.ListPending(recent_s=600), site="solar-1")).txs
    except BaseException:
        print(svc.log.read_text()[-8000:])
        print(wallet.log.read_text()[-4000:])
        raise
    finally:
        if congestion is not None:
            congestion.cancel()
            await asyncio.gather(congestion, return_exceptions=True)
        svc.stop()
        wallet.stop()

    try:
        assert [m.meter for m in ev.of(E.Minted)] == [m.address for m in meters]  # in order, once
        ups = ev.of(E.ChainTx)
        sent = [u.tx_hash for u in ups if u.status == "pending"]
        assert len(sent) == len(set(sent))
        finals = [u for u in ups if u.status != "pending"]
        assert sorted(u.tx_hash for u in finals) == sorted(sent) and all(u.status == "confirmed" for u in finals)
        replaced = [u for u in finals if u.mined_hash]
        assert {(u.kind, u.ref) for u in replaced} >= {("mint", meters[i].address) for i in (1, 2, 3)}
        for u in replaced:  # what was mined is the version signed for the new base fee
            assert (await w3.eth.get_transaction(u.mined_hash))["maxFeePerGas"] >= 80 * GWEI
        shown = {t.tx_hash: t for t in pending}
        assert all(shown[u.tx_hash].state == "confirmed" and shown[u.tx_hash].depth >= 1 for u in finals)
        assert all(shown[u.tx_hash].attempts >= 2 for u in replaced)
        # the wallet's transfer: re-signed at its site once unlocked, published there as wallet.tx
        transfers = [u for u in ev.of(E.WalletTx) if u.kind == "transfer"]
        assert [(u.site, u.status) for u in transfers] == [("solar-1", "pending"), ("solar-1", "confirmed")]
        assert transfers[1].mined_hash and transfers[1].mined_hash != transfers[1].tx_hash
        assert (await w3.eth.get_transaction(transfers[1].mined_hash))["maxFeePerGas"] >= 80 * GWEI
        mine = {t.tx_hash: t for t in own}
        assert mine[transfers[0].tx_hash].state == "confirmed" and mine[transfers[0].tx_hash].attempts >= 2
        assert transfers[0].tx_hash not in shown  # the operator lists its own only
        await assert_no_gaps(w3, [data / "chain.sqlite", tmp_path / "solar-1" / "wallet.sqlite"], {})
        db = sqlite3.connect(data / "chain.sqlite")
        token, market, registry = (db.execute("SELECT value FROM chain_meta WHERE key = ?", (k,)).fetchone()[0]
                                   for k in ("token", "market", "registry"))
        db.close()
        d = bindings.attach(w3, token, market, registry)
        assert await d.token.functions.totalSupply().call() == 4000
        assert await d.token.functions.balanceOf(seller).call() == 4000
        assert await w3.eth.get_balance(bob) == bob_start + 1
    finally:
        await bindings.close_provider(w3)
        stop_anvil(anvil)


async def test_wallet_view_on_a_long_chain_reads_logs_in_bounded_ranges(grid: Grid, tmp_path: pathlib.Path,
                                                                        peer_factory: Any) -> None:
    anvil, url = start_anvil()
    proxy = RpcProxy(url)
    purl = await proxy.start()
    w3 = AsyncWeb3(AsyncHTTPProvider(url, request_kwargs={"timeout": 120}))
    seller = site_keystore(tmp_path, "solar-1").new(PASS, site="solar-1").address
    # the operator on its own line to anvil; the site's wallet (whose view is measured) behind the proxy
    op = await start_chain(chain_settings(grid, tmp_path / "market", url, logs_range=250))
    settings = chain_settings(grid, tmp_path / "solar-1", purl, site="solar-1", chain_role="site",
                              chain_rpc=op.servers[0].endpoint, logs_range=250)
    svc = await start_chain(settings)
    svc2 = None
    n = 0

    meter = Meter("solar-1", seller)

    async def mint(count: int) -> None:  # as the meter of solar-1 (one publisher throughout)
        nonlocal n
        d = Domains.of(op)
        if not n:
            await meters.publish(meter.announce(d))
        for _ in range(count):
            n += 1
            await meters.publish(meter.production(d, n * 1000))
            await meters.probe.wait_for(lambda: max(m.produced_wh for m in meters.probe.of(E.Minted)) >= n * 1000
                                           if meters.probe.of(E.Minted) else False, timeout=120)

    async def generated(peer: Any) -> int:
        return int((await peer.request(C.GetBalances(address=seller), site="solar-1")).generated_wh)

    try:
        peer = meters = await peer_factory()
        peer.endpoints = {"operator": (op.servers[0].endpoint, "market"),
                          "solar-1": (svc.servers[0].endpoint, "solar-1")}
        await peer.request(C.Unlock(address=seller, passphrase=PASS), site="solar-1")
        for _ in range(3):  # many mints among thousands of blocks
            await mint(10)
            for _ in range(3):
                await rpc(w3, "anvil_mine", hex(250), hex(1))
        assert await generated(peer) == n * 1000
        await svc.minted.save()
        ranges = list(proxy.log_ranges)
        assert ranges and all(b - a + 1 <= 250 for a, b in ranges)
        assert sum(b - a + 1 for a, b in ranges) <= await w3.eth.block_number  # no block read twice
        # a site's wallet reads the mints to its own accounts only (the node filters by the
        # indexed recipient): with a hundred sites, each wallet decoded every site's mints
        mine = "0x" + seller.lower().removeprefix("0x").rjust(64, "0")
        assert proxy.log_topics and all(len(t) >= 2 and mine in (t[1] if isinstance(t[1], list) else [t[1]])
                                        for t in proxy.log_topics), proxy.log_topics[:3]
        await svc.stop()

        # a restart after 1500 blocks more: the view goes on from the stored block, in bounded ranges
        indexed = svc.minted.block
        for _ in range(6):
            await rpc(w3, "anvil_mine", hex(250), hex(1))
        head = await w3.eth.block_number
        before = len(proxy.log_ranges)  # (its background indexer may start before the first view)
        svc2 = await start_chain(settings.model_copy(update={"chain_bind": "tcp://127.0.0.1:*"}))
        peer = await peer_factory()
        peer.endpoints = {"operator": (op.servers[0].endpoint, "market"),
                          "solar-1": (svc2.servers[0].endpoint, "solar-1")}
        assert await generated(peer) == n * 1000
        new = proxy.log_ranges[before:]
        assert min(a for a, _ in new) == indexed + 1 and max(b for _, b in new) >= head
        assert all(b - a + 1 <= 250 for a, b in new)
        assert len(new) <= -(-(head - indexed) // 250) + 2, new  # + a block or two mined meanwhile
        calls = proxy.calls["eth_getLogs"]
        for _ in range(5):  # nothing new: no logs read again
            assert await generated(peer) == n * 1000
        assert proxy.calls["eth_getLogs"] - calls <= 1

        # a reorg takes blocks with a mint away: the view rewinds (block hashes), and the operator's
        # nonce that went with it is filled, so its next mints are not held up; the meter's next
        # (cumulative) reading mints what the reorg took too
        await peer.request(C.Unlock(address=seller, passphrase=PASS), site="solar-1")
        snap = await rpc(w3, "evm_snapshot")
        await rpc(w3, "anvil_mine", hex(5), hex(1))
        await mint(1)
        assert await generated(peer) == n * 1000
        await rpc(w3, "evm_revert", snap)
        await rpc(w3, "anvil_mine", hex(8), hex(3))
        assert await generated(peer) == (n - 1) * 1000
        assert svc2.minted.rewinds >= 1
        await mint(2)
        await until(lambda: not op.txm.pending(), timeout=60)
        assert await generated(peer) == n * 1000
        token = bindings.attach(w3, op.dep.token_address, op.dep.market_address, op.dep.registry_address).token
        assert await token.functions.balanceOf(seller).call() == n * 1000
        assert not await txpool(w3)
    finally:
        if svc2 is not None:
            await svc2.stop()
        elif svc.connected.is_set():
            await svc.stop()
        await op.stop()
        await proxy.stop()
        await bindings.close_provider(w3)
        stop_anvil(anvil)


async def test_a_read_is_one_request_to_the_node() -> None:
    """web3's default validation layer asks the node its chain id before every eth_call and
    estimate: twice the requests for every balance a wallet reads (a 100-site run's wallets
    could not answer their agents in time). The chain id is known from the node's identity;
    the node itself refuses a transaction signed for another chain."""
    anvil, url = start_anvil()
    proxy = RpcProxy(url)
    purl = await proxy.start()
    node = await connect(purl)
    try:
        await node.identity()
        before = proxy.calls["eth_chainId"]
        dev = Account.from_key(ANVIL_DEV_KEY)
        for _ in range(5):
            assert await node.w3.eth.call({"to": dev.address, "data": "0x"}) == b""
        assert await node.w3.eth.estimate_gas({"from": dev.address, "to": dev.address, "value": 1}) == 21000
        assert proxy.calls["eth_call"] == 5 and proxy.calls["eth_estimateGas"] == 1
        assert proxy.calls["eth_chainId"] == before, proxy.calls
        # a transaction for another chain is still refused, by the node
        w3 = node.w3
        tx = {"to": dev.address, "value": 1, "gas": 21000, "nonce": await w3.eth.get_transaction_count(dev.address),
              "maxFeePerGas": 10**10, "maxPriorityFeePerGas": 1, "chainId": 1}
        with pytest.raises(Exception, match="(?i)chain"):
            await w3.eth.send_raw_transaction(dev.sign_transaction(tx).raw_transaction)
    finally:
        await node.close()
        await proxy.stop()
        stop_anvil(anvil)
