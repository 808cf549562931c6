"""Each account belongs to one site, and its keys live at that site's wallet: a hostile
site with its own valid bus key ('probe') cannot make any wallet act or sign for an
account that is not its own (real sockets, real CURVE keys, the operator and three
wallets on one embedded chain), nor bind another site's account to itself with a forged
ownership claim, nor have energy minted to it; unlock guessing is throttled before the
scrypt work; a flood from one site gets 'busy' while another site is served."""

from __future__ import annotations

import asyncio
import pathlib
import threading
from typing import Any

import pytest
from eth_account import Account

from services.bus import claims
from services.bus import commands as C
from services.bus import events as E
from services.bus.errors import RequestError
from services.chain.keystore import KeyFile, Keystore, owner

from tests.support.signing import Domains, Meter

from tests.support.bus import Grid
from tests.support.chain import PASS, claimed, site_keystore, start_stack
from tests.support.poll import until


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


async def refused_at(peer: Any, req: Any, site: str, to: str) -> str:
    with pytest.raises(RequestError) as ei:
        await peer.request(req, site=site, to=to)
    return ei.value.code


async def test_a_site_cannot_make_any_wallet_act_for_another_sites_account(grid: Grid, tmp_path: pathlib.Path,
                                                                          peer_factory: Any) -> None:
    solar = site_keystore(tmp_path, "solar-1").new(PASS, name="solar-1 producer", site="solar-1").address
    home = site_keystore(tmp_path, "home-7").new(PASS, name="home-7 consumer", site="home-7").address
    mine = site_keystore(tmp_path, "probe").new(PASS, name="probe's own", site="probe").address
    stack = await start_stack(grid, tmp_path, "embedded", sites=("solar-1", "home-7", "probe"))
    try:
        peer = await peer_factory(stack)
        wallet = stack.wallet("solar-1")
        decrypts = wallet.keystore.decrypt = CountingDecrypt(wallet.keystore)  # type: ignore[method-assign]
        # solar-1's user logs in at solar-1's wallet, gets funded, escrows
        await peer.request(C.Unlock(address=solar, passphrase=PASS), site="solar-1")
        await peer.request(C.Unlock(address=mine, passphrase=PASS), site="probe")
        assert decrypts.calls == 1
        await claimed(stack, solar, home, mine)
        await until(lambda: not stack.pending() and len(stack.operator.store.conn.execute(
            "SELECT * FROM chain_funded").fetchall()) == 3, timeout=60)
        await peer.request(C.Escrow(account=solar, action="deposit", amount_wei=10**15), site="solar-1")
        await until(lambda: not stack.pending(), timeout=60)
        nonce = await wallet.node.nonce(solar, "latest")
        before = await peer.request(C.GetBalances(address=solar), site="solar-1")
        txs_before = [w.store.conn.execute("SELECT COUNT(*) FROM chain_txs").fetchone()[0]
                      for w in stack.wallets.values()]

        # probe, with its own valid key, tries everything for solar-1's (unlocked) account,
        # at solar-1's wallet and at its own
        attacks = [
            C.Unlock(address=solar, passphrase=PASS),  # even with the right passphrase
            C.Unlock(address=solar, passphrase="a guess"),
            C.Transfer(sender=solar, to=mine, amount_wei=10**15),
            C.Escrow(account=solar, action="withdraw", amount_wei=10**15),
            C.Escrow(account=solar, action="deposit", amount_wei=1),
            C.Approve(account=solar, wh=1),
            C.Lock(address=solar),
            C.ListPending(account=solar),
        ]
        for req in attacks:
            assert await refused_at(peer, req, "probe", "solar-1") == "not_your_site", req
            assert await refused_at(peer, req, "probe", "probe") == "unknown_account", req
        for req in (C.ListAccounts(), C.GetBalances(address=solar), C.SetMining(action="status"), C.ListPending()):
            assert await refused_at(peer, req, "probe", "solar-1") == "not_your_site", req
        # and under solar-1's own command ids: still refused (ids are per site)
        assert await refused_at(peer, C.Transfer(sender=solar, to=mine, amount_wei=1), "probe", "solar-1") \
            == "not_your_site"
        # the market's operator holds no user key and signs for nobody but itself
        for req in (C.Unlock(address=solar, passphrase=PASS), C.Transfer(sender=solar, to=mine, amount_wei=1)):
            assert await refused_at(peer, req, "probe", "operator") == "unsupported", req
        # a site that is not the market cannot stop mining, at the operator or at a wallet
        assert await refused_at(peer, C.SetMining(action="stop"), "probe", "operator") == "not_allowed"
        assert await refused_at(peer, C.SetMining(action="stop"), "probe", "probe") == "not_allowed"
        status = await peer.request(C.SetMining(action="status"), site="probe", to="operator")
        assert (status.mining, status.supported, status.controllable) == (True, True, False)

        # forged ownership claims: another site's account for itself (no valid signature),
        # or a claim in another site's name (dropped by the publish policy)
        fake = Account.create()
        forged = [E.WalletAccount(site="probe", address=solar, signature=claims.sign(fake.key, "probe")),
                  E.WalletAccount(site="probe", address=home, signature="0x" + "11" * 65)]
        for n, body in enumerate(forged, 1):
            await peer.probe.publish(body, source="probe/forger")
            await until(lambda n=n: stack.operator.claims.refused.get("bad_signature", 0) >= n, timeout=60)
        await peer.probe.publish(E.WalletAccount(site="solar-1", address=fake.address,
                                                signature=claims.sign(fake.key, "solar-1")), source="probe/forger")
        await until(lambda: stack.operator.health()["dropped"].get("policy:wallet.account"), timeout=60)
        assert stack.operator.claims.site_of(solar) == "solar-1" and stack.operator.claims.site_of(home) == "home-7"
        assert stack.operator.claims.site_of(fake.address) == ""
        # a meter key of probe's registered for solar-1's account: refused (the account is
        # solar-1's), so its production mints nothing; probe's meter for its own account mints
        d = Domains.of(stack.operator)
        thief, own = Meter("probe", solar), Meter("probe", mine, name="m2")
        for m in (thief, own):
            await peer.publish(m.announce(d))
        await peer.publish(thief.production(d, 5000))
        await peer.publish(own.production(d, 1000))
        await peer.probe.wait_for(lambda: peer.probe.of(E.Minted))
        assert [(m.account, m.wh) for m in peer.probe.of(E.Minted)] == [(mine, 1000)]
        assert stack.operator.store.conn.execute(
            "SELECT state, reason FROM job_meters WHERE meter = ?", (thief.address,)).fetchone()[0] == "failed"

        # nothing happened: no scrypt run for probe's tries, no transaction, still unlocked
        assert decrypts.calls == 1
        assert await wallet.node.nonce(solar, "latest") == nonce
        assert [w.store.conn.execute("SELECT COUNT(*) FROM chain_txs").fetchone()[0]
                for w in stack.wallets.values()] == txs_before
        after = await peer.request(C.GetBalances(address=solar), site="probe", to="operator")  # public
        assert (after.ether_wei, after.escrow_free_wei, after.site) == (before.ether_wei, before.escrow_free_wei,
                                                                         "solar-1")
        assert (await peer.request(C.GetBalances(address=Account.create().address), site="probe",
                                   to="operator")).site == ""
        assert wallet.sessions.is_unlocked(solar)
        assert wallet.refused["probe"] == len(attacks) + 5

        # each wallet lists its own site's accounts only
        def listed(reply: Any) -> dict[str, str]:
            return {a.address: a.site for a in reply.accounts}

        assert listed(await peer.request(C.ListAccounts(), site="probe")) == {mine: "probe"}
        assert listed(await peer.request(C.ListAccounts(), site="solar-1")) == {solar: "solar-1"}
        assert listed(await peer.request(C.ListAccounts(), site="home-7")) == {home: "home-7"}

        # solar-1 itself still acts for its account
        sent = await peer.request(C.Transfer(sender=solar, to=home, amount_wei=5), site="solar-1")
        assert [t.tx_hash for t in (await peer.request(C.ListPending(), site="solar-1")).txs] in ([sent.tx_hash], [])
        await peer.request(C.Lock(address=solar), site="solar-1")
        assert not wallet.sessions.is_unlocked(solar)
    finally:
        await stack.stop()


async def test_unlock_guessing_is_throttled_before_scrypt(grid: Grid, tmp_path: pathlib.Path,
                                                          peer_factory: Any) -> None:
    ks = site_keystore(tmp_path, "probe")
    first, second = ks.new(PASS, site="probe").address, ks.new(PASS, site="probe").address
    stack = await start_stack(grid, tmp_path, "embedded", sites=("probe",), unlock_max_failures=5,
                              unlock_site_max_failures=8, unlock_window_s=300)
    svc = stack.wallet("probe")
    try:
        peer = await peer_factory(stack)
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
        assert not svc.sessions.is_unlocked(first) and not svc.sessions.is_unlocked(second)
        assert svc.unlock_throttle.refused == 17
    finally:
        await stack.stop()


async def test_a_flood_from_one_site_is_busy_while_another_site_is_served(grid: Grid, tmp_path: pathlib.Path,
                                                                          peer_factory: Any) -> None:
    mine = site_keystore(tmp_path, "probe").new(PASS, site="probe").address
    solar = site_keystore(tmp_path, "solar-1").new(PASS, site="solar-1").address
    stack = await start_stack(grid, tmp_path, "embedded", sites=("probe", "solar-1"), rpc_max_inflight_per_site=3,
                              unlock_max_failures=100, unlock_site_max_failures=100)
    svc = stack.wallet("probe")
    gate = threading.Event()
    try:
        peer = await peer_factory(stack)
        # probe's unlock attempts hang in the (gated) scrypt work and hold its request slots
        decrypts = svc.keystore.decrypt = CountingDecrypt(svc.keystore, gate)  # type: ignore[method-assign]
        flood = [asyncio.create_task(peer.request(C.Unlock(address=mine, passphrase=f"g{i}"), site="probe"))
                 for i in range(40)]
        while sum(t.done() for t in flood) < 37:
            await asyncio.sleep(0.02)
        busy = [t for t in flood if t.done()]
        assert len(busy) == 37 and {t.exception().code for t in busy} == {"busy"}  # type: ignore[union-attr]
        # solar-1 is served meanwhile, at its wallet and at the market's operator
        for _ in range(5):
            assert (await peer.request(C.GetBalances(address=solar), site="solar-1")).site == "solar-1"
            assert (await peer.request(C.GetBalances(address=solar), site="solar-1", to="operator")).ether_wei >= 0
        assert [a.address for a in (await peer.request(C.ListAccounts(), site="solar-1")).accounts] == [solar]
        assert svc.health()["rpc_busy"] == {"probe": 37}
        gate.set()
        rest = await asyncio.gather(*(t for t in flood if t not in busy), return_exceptions=True)
        assert [e.code for e in rest] == ["bad_passphrase"] * 3  # type: ignore[union-attr]
        assert decrypts.calls == 3
    finally:
        gate.set()
        await stack.stop()


def test_an_account_file_without_a_site_belongs_to_the_site_its_name_starts_with() -> None:
    sites = {"market", "solar-1", "home-7"}

    def of(name: str, site: str = "") -> str:
        return owner(KeyFile("0x", pathlib.Path("x"), name, site), known_sites=sites, default="market")

    assert of("solar-1 producer") == "solar-1" and of("home-7 consumer") == "home-7"
    assert of("alice") == "market" and of("") == "market" and of("elsewhere-9 x") == "market"
    assert of("solar-1 producer", site="home-7") == "home-7"  # a recorded site wins


def test_an_ownership_claim_is_the_account_keys_and_binds_once(tmp_path: pathlib.Path) -> None:
    import sqlite3

    acct, other = Account.create(), Account.create()
    ks = Keystore(tmp_path / "ks", scrypt_n=2**10)
    kf = ks.add(acct.key, PASS, name="a", site="home-7")
    assert kf.claim and claims.valid("home-7", acct.address, kf.claim)
    assert not claims.valid("solar-1", acct.address, kf.claim)  # it names its site
    assert not claims.valid("home-7", other.address, kf.claim)  # and its account
    assert not claims.valid("home-7", acct.address, "0x" + "00" * 65)
    conn = sqlite3.connect(":memory:")
    book = claims.Claims(conn)
    assert book.apply(conn, E.WalletAccount(site="home-7", address=acct.address, signature=kf.claim))
    assert not book.apply(conn, E.WalletAccount(site="home-7", address=acct.address, signature=kf.claim))
    # the same key signing for another site later: refused, the first binds
    assert not book.apply(conn, E.WalletAccount(site="solar-1", address=acct.address,
                                                 signature=claims.sign(acct.key, "solar-1")))
    assert book.site_of(acct.address.lower()) == "home-7" and book.refused == {"other_site": 1}
    assert claims.Claims(conn).site_of(acct.address) == "home-7"  # kept in the store
