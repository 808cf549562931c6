"""The embedded chain lives in the process: a restart is a fresh chain. The operator's
store notices (chain id + genesis hash + code at the stored addresses), redeploys and
announces it; the site's wallet follows the announcement and fails what was pending on
the chain that is gone instead of trusting it."""

from __future__ import annotations

import pathlib
import uuid
from typing import Any

from services.bus import commands as C
from services.bus import events as E
from services.chain import ledger

from tests.support.bus import Grid
from tests.support.chain import PASS, stack_with_two_accounts, start_stack
from tests.support.poll import until


async def test_embedded_restart_is_a_fresh_chain(grid: Grid, tmp_path: pathlib.Path, peer_factory: Any) -> None:
    stack, alice, bob = await stack_with_two_accounts(grid, tmp_path, f"embedded:{uuid.uuid4().hex}")
    try:
        peer = await peer_factory(stack)
        await peer.request(C.Unlock(address=alice, passphrase=PASS))
        await peer.funded(alice, bob)
        first = ledger.get_meta(stack.operator.store.conn, "deployment")
        await peer.request(C.SetMining(action="stop"), site="market")
        stale = (await peer.request(C.Transfer(sender=alice, to=bob, amount_wei=1))).tx_hash
    finally:
        await peer.close_clients()
        await stack.stop()
    stack = await start_stack(grid, tmp_path, f"embedded:{uuid.uuid4().hex}")  # the same stores, a new chain
    peer.stack = stack
    try:
        assert ledger.get_meta(stack.operator.store.conn, "deployment") != first  # redeployed, not trusted
        await until(lambda: stack.wallet("tester").deployment.deployment != first, timeout=60)
        await peer.probe.wait_for(lambda: [u for u in peer.probe.of(E.WalletTx)
                                              if u.tx_hash == stale and u.status == "failed"])
        failed = [u for u in peer.probe.of(E.WalletTx) if u.tx_hash == stale and u.status != "pending"]
        assert len(failed) == 1 and "chain reset" in failed[0].reason
        await peer.request(C.Unlock(address=alice, passphrase=PASS))  # the wallet restarted: locked
        # funded again on the new chain (the operator knows the claims from its store)
        await until(lambda: len(stack.operator.store.conn.execute(
            "SELECT * FROM chain_funded WHERE chain = ?", (stack.operator.chain_key,)).fetchall()) == 2, timeout=60)
        await until(lambda: not stack.pending(), timeout=60)
        assert (await peer.request(C.GetBalances(address=alice))).ether_wei == stack.operator.settings.dev_fund_wei
        h = (await peer.request(C.Transfer(sender=alice, to=bob, amount_wei=2))).tx_hash
        await peer.probe.wait_for(lambda: any(u.tx_hash == h and u.status == "confirmed"
                                                 for u in peer.probe.of(E.WalletTx)))
    finally:
        await stack.stop()
