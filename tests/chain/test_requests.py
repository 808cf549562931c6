"""Requests at a site's wallet: clear errors that send nothing, mining control (the
market's operator only) with pending transactions, and secrets that never reach the
logs. On the embedded chain and on anvil."""

from __future__ import annotations

import logging
import pathlib
from typing import Any

import pytest
from eth_account import Account

from services.bus import commands as C
from services.bus import events as E
from services.bus.errors import RequestError
from services.chain import ledger
from tests.support.bus import Grid
from tests.support.chain import PASS, site_keystore, stack_with_two_accounts, start_stack


async def error_of(peer: Any, req: Any) -> str:
    with pytest.raises(RequestError) as ei:
        await peer.request(req)
    return ei.value.code


@pytest.mark.parametrize("backend", ["embedded", pytest.param("anvil", marks=pytest.mark.anvil)])
async def test_bad_requests_send_nothing_and_secrets_stay_out_of_logs(
        backend: str, request: pytest.FixtureRequest, grid: Grid, tmp_path: pathlib.Path, peer_factory: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    url = "embedded" if backend == "embedded" else request.getfixturevalue("anvil_url")
    ks = site_keystore(tmp_path, "tester")
    key = Account.create().key
    # the peer calls as site 'tester': its accounts are in that site's wallet
    alice = ks.add(key, PASS, name="alice", site="tester").address
    bob = ks.new(PASS, site="tester").address
    stranger = Account.create().address
    stack = await start_stack(grid, tmp_path, url)
    svc = stack.wallet("tester")
    try:
        peer = await peer_factory(stack)
        assert await error_of(peer, C.Unlock(address=alice, passphrase="not the passphrase")) == "bad_passphrase"
        assert await error_of(peer, C.Unlock(address=stranger, passphrase=PASS)) == "unknown_account"
        assert await error_of(peer, C.Transfer(sender=alice, to=bob, amount_wei=1)) == "locked"
        assert await error_of(peer, C.Transfer(sender=stranger, to=bob, amount_wei=1)) == "unknown_account"
        unlocked = await peer.request(C.Unlock(address=alice, passphrase=PASS, ttl_s=600))
        assert unlocked.address == alice
        listed = {a.address: a.unlocked for a in (await peer.request(C.ListAccounts())).accounts}
        assert listed == {alice: True, bob: False}
        await peer.funded(alice, bob)  # each claimed account is funded once on a dev chain
        before = await peer.request(C.GetBalances(address=alice))
        assert before.ether_wei == stack.operator.settings.dev_fund_wei and before.site == "tester"
        nonce_before = await svc.node.nonce(alice, "latest")

        # beyond the balance, absurd, negative, zero: refused, nothing sent
        assert await error_of(peer, C.Transfer(sender=alice, to=bob, amount_wei=before.ether_wei)) == "insufficient_funds"
        assert await error_of(peer, C.Transfer(sender=alice, to=bob, amount_wei=10**40)) == "insufficient_funds"
        for bad in (-1, 0, 2**256):
            req = C.Transfer.model_construct(sender=alice, to=bob, amount_wei=bad)
            assert await error_of(peer, req) == "bad_request"
        assert await error_of(peer, C.Escrow(account=alice, action="withdraw", amount_wei=1)) == "insufficient_escrow"
        assert await error_of(peer, C.Escrow(account=alice, action="withdraw_credit", amount_wei=1)) == "insufficient_credit"
        assert await error_of(peer, C.Approve(account=alice, wh=1)) == "insufficient_tokens"
        assert await error_of(peer, C.Escrow(account=alice, action="deposit", amount_wei=10**40)) == "insufficient_funds"

        assert await svc.node.nonce(alice, "latest") == nonce_before
        assert (await peer.request(C.ListPending(account=alice))).txs == []
        assert svc.store.conn.execute("SELECT COUNT(*) FROM chain_txs WHERE account = ?", (alice,)).fetchone()[0] == 0
        assert (await peer.request(C.GetBalances(address=alice))).ether_wei == before.ether_wei

        # locked again: refused
        await peer.request(C.Lock(address=alice))
        assert await error_of(peer, C.Transfer(sender=alice, to=bob, amount_wei=1)) == "locked"
    finally:
        await stack.stop()
    text = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert "alice" in text or alice in text  # the logs were captured
    assert PASS not in text and "not the passphrase" not in text
    assert key.hex() not in text.lower() and key.hex()[:16] not in text.lower()


@pytest.mark.parametrize("backend", ["embedded", pytest.param("anvil", marks=pytest.mark.anvil)])
async def test_mining_stop_keeps_transfers_pending(backend: str, request: pytest.FixtureRequest, grid: Grid,
                                                   tmp_path: pathlib.Path, peer_factory: Any) -> None:
    if backend == "anvil":  # mining is switched on this node: use one of our own
        from tests.support.anvil import start_anvil, stop_anvil
        proc, url = start_anvil()
    else:
        proc, url = None, "embedded"
    stack, alice, bob = await stack_with_two_accounts(grid, tmp_path, url)
    svc = stack.wallet("tester")
    try:
        peer = await peer_factory(stack)
        await peer.request(C.Unlock(address=alice, passphrase=PASS))
        await peer.funded(alice, bob)
        start = (await peer.request(C.GetBalances(address=bob))).ether_wei
        assert (await peer.request(C.SetMining(action="status"), site="market")).mining is True
        # a site's wallet shows the status and refuses to stop mining: the market's operator controls it
        assert await error_of(peer, C.SetMining(action="stop")) == "not_allowed"
        stopped = await peer.request(C.SetMining(action="stop"), site="market")
        assert (stopped.mining, stopped.supported) == (False, True)
        status = await peer.request(C.SetMining(action="status"))
        assert (status.mining, status.controllable) == (False, False) and "market" in status.detail
        hashes = [(await peer.request(C.Transfer(sender=alice, to=bob, amount_wei=n))).tx_hash for n in (5, 7)]
        pending = await peer.request(C.ListPending())
        assert [t.tx_hash for t in pending.txs] == hashes
        await peer.probe.wait_for(lambda: peer.probe.of(E.ChainMining))
        assert (await peer.request(C.GetBalances(address=bob))).ether_wei == start
        await peer.request(C.SetMining(action="start"), site="market")
        await peer.probe.wait_for(lambda: {u.tx_hash for u in peer.probe.of(E.WalletTx)
                                              if u.status == "confirmed"} >= set(hashes))
        assert (await peer.request(C.ListPending())).txs == []
        assert (await peer.request(C.GetBalances(address=bob))).ether_wei == start + 12
        assert [m.mining for m in peer.probe.of(E.ChainMining)] == [False, True]
        assert ledger.pending_txs(svc.store.conn) == []
        assert all(u.site == "tester" for u in peer.probe.of(E.WalletTx))
    finally:
        await stack.stop()
        if proc is not None:
            stop_anvil(proc)
