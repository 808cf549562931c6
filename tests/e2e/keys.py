"""Keys stay at their site, checked on a running grid of real processes: where key
material lies on disk, and what a hostile site with valid bus keys gets from the wallets
and the operator when it asks them to sign for accounts that are not its own."""

from __future__ import annotations

import asyncio
import json
import pathlib
from collections.abc import Callable
from typing import Any

import zmq.asyncio
from eth_account import Account

from services import launcher
from services.bus import Publisher, RequestError, RpcClient, Security
from services.bus import claims
from services.bus import commands as C
from services.bus import events as E
from services.bus.store import Store
from services.chain.keystore import Keystore


def key_material(data: pathlib.Path, passphrases: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Per site: its accounts (address -> private key hex, decrypted here with the printed
    passphrases) and what identifies them on disk."""
    out: dict[str, dict[str, Any]] = {}
    for site in launcher.SITES:
        ks = Keystore(launcher.keystore_of(data, site))
        files = ks.list()
        keys = {}
        for kf in files:
            pw = passphrases[kf.name]
            keys[kf.address] = ks.decrypt(kf.address, pw).hex()
        out[site] = {"keys": keys, "files": [kf.path for kf in files],
                     "ciphertexts": [json.loads(kf.path.read_text())["crypto"]["ciphertext"] for kf in files]}
    return out


def files_under(root: pathlib.Path) -> list[pathlib.Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def assert_keys_stay_home(data: pathlib.Path, passphrases: dict[str, str]) -> None:
    """The market's folder holds no user keystore and no user key material; each site's
    folder only its own; no private key or passphrase anywhere in plain text."""
    data = data.resolve()
    mat = key_material(data, passphrases)
    assert all(m["keys"] for m in mat.values()), mat
    secrets = [pw.encode() for pw in passphrases.values()]
    for m in mat.values():
        secrets += [k.encode() for k in m["keys"].values()]
    for f in files_under(data):  # no private key and no passphrase in plain text, anywhere
        blob = f.read_bytes().lower()
        for s in secrets:
            assert s.lower() not in blob, (f, "holds a secret in plain text")
    market = files_under(data / launcher.MARKET)
    assert market, "the market's folder is empty: wrong folder?"
    assert not (data / launcher.MARKET / "keystore").exists() or not Keystore(
        data / launcher.MARKET / "keystore").list(), "the market holds a keystore"
    for f in market:  # no keystore file, no user's encrypted key under the market's folder
        blob = f.read_bytes()
        assert b'"ciphertext"' not in blob, (f, "looks like a keystore file")
        for m in mat.values():
            for c in m["ciphertexts"]:
                assert c.encode() not in blob, (f, "holds a user's encrypted key")
    for site in launcher.SITES:  # a site's folder: its own keystores only
        mine = files_under(data / site)
        for other in launcher.SITES:
            if other == site:
                continue
            for f in mine:
                blob = f.read_bytes()
                for c in mat[other]["ciphertexts"]:
                    assert c.encode() not in blob, (f, f"holds a keystore of {other}")
        assert {Keystore(launcher.keystore_of(data, site)).list()[0].site} == {site}


async def hostile_site_gets_nothing(keys: pathlib.Path, hostile: str, wallets: dict[str, str], operator: str,
                                    hub_pub: str, store_dir: pathlib.Path, accounts: dict[str, str],
                                    passphrases: dict[str, str],
                                    claims_refused: Callable[[], int]) -> dict[str, list[str]]:
    """``hostile`` (a site whose key is on every allow-list) asks every wallet and the
    operator to unlock, pay, withdraw, approve and list for each site's account (with the
    right passphrases), and announces forged ownership claims for them. Returns the
    error codes per target; raises if anything was served."""
    ctx = zmq.asyncio.Context()
    sec = Security(keys, hostile)
    sec.start(ctx)
    codes: dict[str, list[str]] = {}
    me = Account.create()
    try:
        targets = {**{site: (ep, site) for site, ep in wallets.items()}, "operator": (operator, launcher.MARKET)}
        for name, (endpoint, server_site) in targets.items():
            client = RpcClient(ctx, sec, endpoint, server_site=server_site, timeout_s=10)
            try:
                for label, address in accounts.items():
                    pw = passphrases[label]
                    for req in (C.Unlock(address=address, passphrase=pw),
                                C.Transfer(sender=address, to=me.address, amount_wei=1),
                                C.Escrow(account=address, action="withdraw", amount_wei=1),
                                C.Escrow(account=address, action="withdraw_credit", amount_wei=1),
                                C.Approve(account=address, wh=1), C.Lock(address=address),
                                C.ListAccounts(), C.ListPending(account=address)):
                        try:
                            reply = await client.request(req)
                        except RequestError as e:
                            codes.setdefault(name, []).append(e.code)
                        else:
                            if isinstance(req, C.ListPending) and name == "operator" and not reply.txs:
                                codes.setdefault(name, []).append("empty")  # the operator's own: none shown
                                continue
                            raise AssertionError(f"{name} served {hostile}'s {req.TYPE} for {label}: {reply}")
            finally:
                await client.close()
        # forged ownership claims for the sites' accounts (a signature by another key)
        pub = Publisher(ctx, sec, Store(store_dir / f"{hostile}-forger.sqlite"), source=f"{hostile}/forger",
                        hub_pub=hub_pub, heartbeat_s=0.2)
        await pub.start()
        try:
            for address in accounts.values():
                await pub.publish(E.WalletAccount(site=hostile, address=address,
                                                   signature=claims.sign(me.key, hostile)))
            deadline = asyncio.get_running_loop().time() + 60
            while claims_refused() < len(accounts):  # the operator saw and refused each
                assert asyncio.get_running_loop().time() < deadline, "the operator never saw the forged claims"
                await asyncio.sleep(0.3)
        finally:
            await pub.stop()
            pub.store.close()
    finally:
        sec.stop()
        ctx.destroy(0)
    return codes
