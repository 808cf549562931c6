"""Each account belongs to one site: a hostile site with its own valid bus key ('probe')
cannot act for another site's account through the real chain service (embedded chain,
real sockets, real CURVE keys), not even while that account is unlocked by its own site;
unlock guessing is throttled before the scrypt work; a flood from one site gets 'busy'
while another site is served."""

from __future__ import annotations

import asyncio
import pathlib
import threading
from typing import Any

import pytest
from eth_account import Account

from services.bus import commands as C
from services.bus.errors import RequestError
from services.chain.keystore import KeyFile, Keystore, owner

from .conftest import PASS, Bus, chain_settings, start_chain


async def refused(peer: Any, req: Any, site: str) -> str:
    with pytest.raises(RequestError) as ei:
        await peer.request(req, site=site)
    return ei.value.code


class CountingDecrypt:
    """Wraps the keystore's decrypt (the scrypt work) to count the calls that reach it."""

    def __init__(self, ks: Keystore, gate: threading.Event | None = None) -> None:
        self.inner, self.gate, self.calls, self.lock = ks.decrypt, gate, 0, threading.Lock()
        self.started = threading.Event()

    def __call__(self, address: str, passphrase: str) -> bytes:
        with self.lock:
            self.calls += 1
        self.started.set()
        if self.gate is not None:
            self.gate.wait(30)
        return self.inner(address, passphrase)


async def test_a_site_cannot_act_for_another_sites_account(bus: Bus, tmp_path: pathlib.Path,
                                                            peer_factory: Any) -> None:
    settings = chain_settings(bus, tmp_path / "chain", "embedded")
    ks = Keystore(settings.keystore, scrypt_n=settings.scrypt_n)
    solar = ks.new(PASS, name="solar-1 producer", site="solar-1").address
    home = ks.new(PASS, name="home-7 consumer", site="home-7").address
    mine = ks.new(PASS, name="probe's own", site="probe").address
    legacy = ks.new(PASS, name="home-7 old").address  # a file from before sites were recorded
    svc = await start_chain(settings)
    try:
        peer = await peer_factory(svc.servers[0].endpoint)
        decrypts = svc.keystore.decrypt = CountingDecrypt(svc.keystore)  # type: ignore[method-assign]
        # solar-1's user logs in at solar-1's gateway, gets funded, escrows and holds tokens
        await peer.request(C.Unlock(address=solar, passphrase=PASS), site="solar-1")
        await peer.request(C.Unlock(address=mine, passphrase=PASS), site="probe")
        assert decrypts.calls == 2
        await peer.listener.wait_for(lambda: not svc.txm.pending())
        await peer.request(C.Escrow(account=solar, action="deposit", amount_wei=10**15), site="solar-1")
        await peer.listener.wait_for(lambda: not svc.txm.pending())
        nonce = await svc.node.nonce(solar, "latest")
        before = await peer.request(C.GetBalances(address=solar), site="solar-1")
        txs_before = svc.store.conn.execute("SELECT COUNT(*) FROM chain_txs").fetchone()[0]

        # probe, with its own valid key, tries everything for solar-1's (unlocked) account
        attacks = [
            C.Unlock(address=solar, passphrase=PASS),  # even with the right passphrase
            C.Unlock(address=solar, passphrase="a guess"),
            C.Transfer(sender=solar, to=mine, amount_wei=10**15),
            C.Escrow(account=solar, action="withdraw", amount_wei=10**15),
            C.Escrow(account=solar, action="deposit", amount_wei=1),
            C.Approve(account=solar, wh=1),
            C.Lock(address=solar),
            C.ListPending(account=solar),
            C.Unlock(address=legacy, passphrase=PASS),  # named "home-7 ...": home-7's
        ]
        for req in attacks:
            assert await refused(peer, req, "probe") == "not_your_account", req
        # and the same commands under solar-1's own command ids: still refused (ids are per site)
        with pytest.raises(RequestError) as ei:
            await peer.request(C.Transfer(sender=solar, to=mine, amount_wei=1), site="probe", cmd_id="solar-cmd")
        assert ei.value.code == "not_your_account"
        # a site that is not the market cannot stop mining (status: not controllable there)
        assert await refused(peer, C.SetMining(action="stop"), "probe") == "not_allowed"
        status = await peer.request(C.SetMining(action="status"), site="probe")
        assert (status.mining, status.supported, status.controllable) == (True, True, False)
        assert "market" in status.detail
        assert (await peer.request(C.SetMining(action="status"), site="market")).controllable is True

        # nothing happened: no scrypt run for probe's tries, no transaction, still unlocked
        assert decrypts.calls == 2
        assert await svc.node.nonce(solar, "latest") == nonce
        assert svc.store.conn.execute("SELECT COUNT(*) FROM chain_txs").fetchone()[0] == txs_before
        after = await peer.request(C.GetBalances(address=solar), site="probe")  # balances are public
        assert (after.ether_wei, after.escrow_free_wei, after.site) == (before.ether_wei, before.escrow_free_wei,
                                                                         "solar-1")
        assert (await peer.request(C.GetBalances(address=Account.create().address), site="probe")).site == ""
        assert svc.sessions.is_unlocked(solar)
        assert (await peer.request(C.ListPending(), site="probe")).txs == []
        assert svc.refused["probe"] == len(attacks) + 1

        # each site lists its own accounts; the market (the operator's site) lists all
        def listed(reply: Any) -> dict[str, str]:
            return {a.address: a.site for a in reply.accounts}

        assert listed(await peer.request(C.ListAccounts(), site="probe")) == {mine: "probe"}
        assert listed(await peer.request(C.ListAccounts(), site="solar-1")) == {solar: "solar-1"}
        assert listed(await peer.request(C.ListAccounts(), site="home-7")) == {home: "home-7", legacy: "home-7"}
        assert listed(await peer.request(C.ListAccounts(), site="market")) == {
            solar: "solar-1", home: "home-7", mine: "probe", legacy: "home-7"}

        # solar-1 itself still acts for its account
        sent = await peer.request(C.Transfer(sender=solar, to=home, amount_wei=5), site="solar-1")
        assert [t.tx_hash for t in (await peer.request(C.ListPending(), site="solar-1")).txs] in ([sent.tx_hash], [])
        await peer.request(C.Lock(address=solar), site="solar-1")
        assert not svc.sessions.is_unlocked(solar)
    finally:
        await svc.stop()


async def test_unlock_guessing_is_throttled_before_scrypt(bus: Bus, tmp_path: pathlib.Path,
                                                          peer_factory: Any) -> None:
    settings = chain_settings(bus, tmp_path / "chain", "embedded", unlock_max_failures=5,
                              unlock_site_max_failures=8, unlock_window_s=300)
    ks = Keystore(settings.keystore, scrypt_n=settings.scrypt_n)
    first, second = ks.new(PASS, site="probe").address, ks.new(PASS, site="probe").address
    solar = ks.new(PASS, site="solar-1").address
    svc = await start_chain(settings)
    try:
        peer = await peer_factory(svc.servers[0].endpoint)
        decrypts = svc.keystore.decrypt = CountingDecrypt(svc.keystore)  # type: ignore[method-assign]
        # a burst of 20 parallel guesses for one account: 5 reach scrypt, the rest are refused at once
        burst = await asyncio.gather(*(peer.request(C.Unlock(address=first, passphrase=f"guess {i}"), site="probe")
                                       for i in range(20)), return_exceptions=True)
        codes = sorted(e.code for e in burst if isinstance(e, RequestError))
        assert codes == ["bad_passphrase"] * 5 + ["too_many_attempts"] * 15
        assert decrypts.calls == 5
        throttled = next(e for e in burst if isinstance(e, RequestError) and e.code == "too_many_attempts")
        assert "try again in" in throttled.message and "nothing was tried" in throttled.message
        # now even the right passphrase waits
        assert await refused(peer, C.Unlock(address=first, passphrase=PASS), "probe") == "too_many_attempts"
        # another account of the same site: the site's limit (8) leaves 3 more tries
        for _ in range(3):
            assert await refused(peer, C.Unlock(address=second, passphrase="guess"), "probe") == "bad_passphrase"
        assert await refused(peer, C.Unlock(address=second, passphrase=PASS), "probe") == "too_many_attempts"
        assert decrypts.calls == 8
        # other sites are not held up by probe's guessing; a correct unlock gives its slot back
        for _ in range(10):
            await peer.request(C.Unlock(address=solar, passphrase=PASS), site="solar-1")
        assert decrypts.calls == 18 and svc.sessions.is_unlocked(solar)
        assert not svc.sessions.is_unlocked(first) and not svc.sessions.is_unlocked(second)
        assert svc.unlock_throttle.refused == 17
    finally:
        await svc.stop()


async def test_a_flood_from_one_site_is_busy_while_another_site_is_served(bus: Bus, tmp_path: pathlib.Path,
                                                                          peer_factory: Any) -> None:
    settings = chain_settings(bus, tmp_path / "chain", "embedded", rpc_max_inflight_per_site=3,
                              unlock_max_failures=100, unlock_site_max_failures=100)
    ks = Keystore(settings.keystore, scrypt_n=settings.scrypt_n)
    mine = ks.new(PASS, site="probe").address
    solar = ks.new(PASS, site="solar-1").address
    svc = await start_chain(settings)
    gate = threading.Event()
    try:
        peer = await peer_factory(svc.servers[0].endpoint)
        # probe's unlock attempts hang in the (gated) scrypt work and hold its request slots
        decrypts = svc.keystore.decrypt = CountingDecrypt(svc.keystore, gate)  # type: ignore[method-assign]
        flood = [asyncio.create_task(peer.request(C.Unlock(address=mine, passphrase=f"g{i}"), site="probe"))
                 for i in range(40)]
        while sum(t.done() for t in flood) < 37:
            await asyncio.sleep(0.02)
        busy = [t for t in flood if t.done()]
        assert len(busy) == 37 and {t.exception().code for t in busy} == {"busy"}  # type: ignore[union-attr]
        # solar-1 is served meanwhile: its balances and its account list
        for _ in range(5):
            assert (await peer.request(C.GetBalances(address=solar), site="solar-1")).site == "solar-1"
        assert [a.address for a in (await peer.request(C.ListAccounts(), site="solar-1")).accounts] == [solar]
        assert svc.health()["rpc_busy"] == {"probe": 37}
        gate.set()
        rest = await asyncio.gather(*(t for t in flood if t not in busy), return_exceptions=True)
        assert [e.code for e in rest] == ["bad_passphrase"] * 3  # type: ignore[union-attr]
        assert decrypts.calls == 3
    finally:
        gate.set()
        await svc.stop()


def test_an_account_file_without_a_site_belongs_to_the_site_its_name_starts_with() -> None:
    sites = {"market", "solar-1", "home-7"}

    def of(name: str, site: str = "") -> str:
        return owner(KeyFile("0x", pathlib.Path("x"), name, site), known_sites=sites, default="market")

    assert of("solar-1 producer") == "solar-1" and of("home-7 consumer") == "home-7"
    assert of("alice") == "market" and of("") == "market" and of("elsewhere-9 x") == "market"
    assert of("solar-1 producer", site="home-7") == "home-7"  # a recorded site wins
