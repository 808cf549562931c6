"""The embedded chain lives in the process: a restart is a fresh chain. The store notices
(chain id + genesis hash + code at the stored addresses), redeploys, and fails what was
pending on the chain that is gone instead of trusting it."""

from __future__ import annotations

import pathlib
from typing import Any

from services.bus import commands as C
from services.bus import events as E
from services.chain import ledger
from services.chain.keystore import Keystore

from .conftest import PASS, Bus, chain_settings, start_chain, wait_until


async def test_embedded_restart_is_a_fresh_chain(bus: Bus, tmp_path: pathlib.Path, peer_factory: Any) -> None:
    settings = chain_settings(bus, tmp_path / "chain", "embedded")
    ks = Keystore(settings.keystore, scrypt_n=settings.scrypt_n)
    alice, bob = ks.new(PASS, site="tester").address, ks.new(PASS, site="tester").address
    svc = await start_chain(settings)
    try:
        peer = await peer_factory(svc.servers[0].endpoint)
        await peer.request(C.Unlock(address=alice, passphrase=PASS))
        await wait_until(lambda: not svc.txm.pending())
        first = ledger.get_meta(svc.store.conn, "deployment")
        await peer.request(C.SetMining(action="stop"), site="market")
        stale = (await peer.request(C.Transfer(sender=alice, to=bob, amount_wei=1))).tx_hash
    finally:
        await svc.stop()
    svc = await start_chain(settings)
    try:
        assert ledger.get_meta(svc.store.conn, "deployment") != first  # redeployed, not trusted
        await peer.listener.wait_for(lambda: [u for u in peer.listener.of(E.TxUpdate)
                                              if u.tx_hash == stale and u.status == "failed"])
        failed = [u for u in peer.listener.of(E.TxUpdate) if u.tx_hash == stale and u.status != "pending"]
        assert len(failed) == 1 and "chain reset" in failed[0].reason
        await peer.client.close()
        peer.client = type(peer.client)(peer.ctx, peer.security, svc.servers[0].endpoint, server_site="market")
        await peer.request(C.Unlock(address=alice, passphrase=PASS))  # funded again on the new chain
        await wait_until(lambda: not svc.txm.pending())
        assert (await peer.request(C.GetBalances(address=alice))).ether_wei == settings.dev_fund_wei
        h = (await peer.request(C.Transfer(sender=alice, to=bob, amount_wei=2))).tx_hash
        await peer.listener.wait_for(lambda: any(u.tx_hash == h and u.status == "confirmed"
                                                 for u in peer.listener.of(E.TxUpdate)))
    finally:
        await svc.stop()
