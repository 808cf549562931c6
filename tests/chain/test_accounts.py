"""Keystore files, the account CLI and unlock sessions (no chain needed)."""

from __future__ import annotations

import json
import pathlib
import stat
import tempfile

import pytest
from eth_account import Account

from services.chain.__main__ import main
from services.chain.errors import AccountLocked, BadPassphrase, KeystoreError, UnknownAccount
from services.chain.keystore import Keystore
from services.chain.unlocks import Sessions


def test_keystore_roundtrip_scrypt_and_errors(tmp_path: pathlib.Path) -> None:
    ks = Keystore(tmp_path / "ks", scrypt_n=2**10)
    key = Account.create().key
    kf = ks.add(key, "pw", name="alice", site="home-7")
    data = json.loads(kf.path.read_text())
    assert data["version"] == 3 and data["crypto"]["kdf"] == "scrypt" and data["site"] == "home-7"
    assert key.hex() not in kf.path.read_text()
    assert stat.S_IMODE(kf.path.stat().st_mode) == 0o600
    assert ks.decrypt(kf.address, "pw") == bytes(key)
    with pytest.raises(BadPassphrase):
        ks.decrypt(kf.address, "wrong")
    with pytest.raises(UnknownAccount):
        ks.decrypt(Account.create().address, "pw")
    with pytest.raises(KeystoreError):
        ks.add(key, "pw")  # already there
    with pytest.raises(KeystoreError):
        ks.add("0x1234", "pw")
    assert [(k.address, k.name, k.site) for k in ks.list()] == [(kf.address, "alice", "home-7")]


def test_account_cli_new_import_list(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("GRIDTRADE_SCRYPT_N", "1024")
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    assert main(["account", "--data-dir", str(tmp_path), "new", "--name", "bob", "--passphrase-file", str(pw)]) == 0
    created = capsys.readouterr().out.strip()
    key = Account.create().key
    kfile = tmp_path / "key"
    kfile.write_text(key.hex())
    monkeypatch.setenv("GRIDTRADE_PASSPHRASE", "env-secret")
    assert main(["account", "--data-dir", str(tmp_path), "import", "--key-file", str(kfile)]) == 0
    imported = capsys.readouterr().out.strip()
    assert imported == Account.from_key(key).address
    assert main(["account", "--data-dir", str(tmp_path), "list"]) == 0
    listed = {line.split("\t")[0] for line in capsys.readouterr().out.splitlines()}
    assert listed == {created, imported}
    ks = Keystore(tmp_path / "keystore")
    assert ks.decrypt(created, "s3cret") and ks.decrypt(imported, "env-secret") == bytes(key)
    assert main(["account", "--data-dir", str(tmp_path), "import", "--key-file", str(kfile)]) == 1  # twice
    # every account belongs to a site: --site, else the site its name starts with, else this host's
    (tmp_path / "keys" / "allowed").mkdir(parents=True)
    (tmp_path / "keys" / "allowed" / "home-7.key").write_text(zmq_public_key())
    assert main(["account", "--data-dir", str(tmp_path), "new", "--site", "solar-1", "--passphrase-file", str(pw)]) == 0
    solar = capsys.readouterr().out.strip()
    assert main(["account", "--data-dir", str(tmp_path), "new", "--name", "home-7 carol",
                 "--passphrase-file", str(pw)]) == 0
    carol = capsys.readouterr().out.strip()
    assert main(["account", "--data-dir", str(tmp_path), "new", "--site", "Not A Site",
                 "--passphrase-file", str(pw)]) == 1
    assert "not a site name" in capsys.readouterr().err
    assert main(["account", "--data-dir", str(tmp_path), "list"]) == 0
    sites = {line.split("\t")[0]: line.split("\t")[1] for line in capsys.readouterr().out.splitlines()}
    assert sites == {created: "market", imported: "market", solar: "solar-1", carol: "home-7"}
    assert {kf.address: kf.site for kf in ks.list()}[solar] == "solar-1"


def zmq_public_key() -> str:
    import zmq.auth

    with tempfile.TemporaryDirectory() as d:
        public, _ = zmq.auth.create_certificates(d, "k")
        return pathlib.Path(public).read_text()


def test_sessions_expire_and_lock() -> None:
    now = [100.0]
    s = Sessions(clock=lambda: now[0], wall=lambda: 1000 + now[0])
    acct = Account.create()
    sess = s.unlock(bytes(acct.key), ttl_s=10)
    assert sess.address == acct.address and sess.expires_at == 1110
    assert acct.key.hex() not in repr(sess) and s.account(acct.address).address == acct.address
    now[0] = 109.9
    assert s.is_unlocked(acct.address)
    now[0] = 110.0
    with pytest.raises(AccountLocked):
        s.account(acct.address)
    s.unlock(bytes(acct.key), ttl_s=10)
    assert s.lock(acct.address) and not s.is_unlocked(acct.address) and not s.lock(acct.address)


def test_account_cli_per_site_and_geth_import(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Keys go to their own site's keystore (``--grid`` is the folder of ``gridtrade up``),
    each with the account key's ownership claim; a keystore file made by geth (its own
    scrypt parameters and passphrase) is taken in as it is, claimed for its new site."""
    from services.bus import claims

    monkeypatch.setenv("GRIDTRADE_SCRYPT_N", "1024")
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    grid = tmp_path / "grid"
    assert main(["account", "--grid", str(grid), "new", "--site", "home-7", "--name", "home-7 dora",
                 "--passphrase-file", str(pw)]) == 0
    dora = capsys.readouterr().out.strip()
    [kf] = Keystore(grid / "home-7" / "keystore").list()
    assert (kf.address, kf.site) == (dora, "home-7") and claims.valid("home-7", dora, kf.claim)
    assert not (grid / "market").exists() and not (grid / "solar-1").exists()

    # a geth keystore file (geth writes keystore v3 with scrypt n=2**18; a cheap n here)
    key = Account.create().key
    geth = Account.encrypt(key, "geth-pass", kdf="scrypt", iterations=2**12)
    gfile = tmp_path / f"UTC--2024-01-01T00-00-00.000000000Z--{geth['address']}"
    gfile.write_text(json.dumps(geth))
    (tmp_path / "wrong").write_text("nope\n")
    assert main(["account", "--grid", str(grid), "import", "--site", "solar-1", "--keystore-file", str(gfile),
                 "--passphrase-file", str(tmp_path / "wrong")]) == 1
    assert "wrong passphrase" in capsys.readouterr().err
    (tmp_path / "gpw").write_text("geth-pass\n")
    assert main(["account", "--grid", str(grid), "import", "--site", "solar-1", "--name", "from geth",
                 "--keystore-file", str(gfile), "--passphrase-file", str(tmp_path / "gpw")]) == 0
    imported = capsys.readouterr().out.strip()
    assert imported == Account.from_key(key).address
    ks = Keystore(grid / "solar-1" / "keystore")
    [kf] = ks.list()
    data = json.loads(kf.path.read_text())
    assert data["crypto"] == geth["crypto"] and data["site"] == "solar-1" and kf.name == "from geth"
    assert claims.valid("solar-1", imported, kf.claim) and ks.decrypt(imported, "geth-pass") == bytes(key)
    assert main(["account", "--grid", str(grid), "list", "--site", "solar-1"]) == 0
    assert capsys.readouterr().out.split("\t")[:2] == [imported, "solar-1"]
    # a file without a claim (an older one) is claimed once the key is in hand again
    old = Keystore(tmp_path / "old", scrypt_n=2**10)
    legacy = old.add(Account.create().key, "pw", name="legacy")
    assert legacy.claim == ""
    claim = claims.sign(old.decrypt(legacy.address, "pw"), "home-7")
    assert old.set_claim(legacy.address, "home-7", claim).claim == claim
    assert [(k.site, k.claim) for k in old.list()] == [("home-7", claim)]


def test_signatures_are_made_and_checked_in_c() -> None:
    """Every meter reading, offer, bid and delivery is signed and recovered; pure-Python
    secp256k1 took 9 ms a signature on this machine (coincurve: 1.4 ms), which a
    simulation of a hundred sites' meters felt."""
    from eth_keys.backends import get_backend

    assert type(get_backend()).__name__ == "CoinCurveECCBackend"
