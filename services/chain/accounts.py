"""``gridtrade account new|list|import``: keystore v3 files in the site's data dir.

Every account belongs to one site (``--site``; the chain service acts for an account only
when that site's key asks). Without ``--site`` the account gets the site its name starts
with when that is a site on the allow-list (``--name "home-7 bob"``), else this host's own
site (``GRIDTRADE_SITE``, the market's).

The passphrase comes from ``--passphrase-file``, else ``GRIDTRADE_PASSPHRASE``, else a
prompt (asked twice for a new key). A private key to import is read from ``--key-file``
or a prompt, never from the command line (where ``ps`` would show it).
"""

from __future__ import annotations

import argparse
import getpass
import os
import pathlib
import sys

from services.bus.keys import key_sites

from .config import ChainSettings
from .errors import KeystoreError
from .keystore import KeyFile, Keystore, owner


def _passphrase(args: argparse.Namespace, *, confirm: bool) -> str:
    if args.passphrase_file is not None:
        text = pathlib.Path(args.passphrase_file).read_text()
        value = text.splitlines()[0] if text.splitlines() else ""
    elif os.environ.get("GRIDTRADE_PASSPHRASE"):
        value = os.environ["GRIDTRADE_PASSPHRASE"]
    else:
        value = getpass.getpass("Passphrase: ")
        if confirm and getpass.getpass("Repeat passphrase: ") != value:
            raise KeystoreError("the passphrases do not match")
    if not value:
        raise KeystoreError("an empty passphrase is not allowed")
    return value


def _private_key(args: argparse.Namespace) -> str:
    if args.key_file is not None:
        text = pathlib.Path(args.key_file).read_text().strip()
    else:
        text = getpass.getpass("Private key (hex): ").strip()
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gridtrade account", description="manage the site's Ethereum accounts")
    p.add_argument("--data-dir", type=pathlib.Path, default=None, help="the site's data dir (GRIDTRADE_DATA_DIR)")
    sub = p.add_subparsers(dest="cmd", required=True)
    new = sub.add_parser("new", help="create an account (keystore v3, scrypt)")
    new.add_argument("--name", default="", help="a label shown on the login page")
    new.add_argument("--site", default=None, help="the site the account belongs to (default: the site its name "
                     "starts with if that is on the allow-list, else GRIDTRADE_SITE)")
    new.add_argument("--passphrase-file", type=pathlib.Path, default=None)
    sub.add_parser("list", help="list the accounts in the keystore")
    imp = sub.add_parser("import", help="import a private key into the keystore")
    imp.add_argument("--key-file", type=pathlib.Path, default=None, help="a file holding the hex private key")
    imp.add_argument("--name", default="")
    imp.add_argument("--site", default=None, help="the site the account belongs to (default as for `new`)")
    imp.add_argument("--passphrase-file", type=pathlib.Path, default=None)
    return p


def settings_from(data_dir: pathlib.Path | None) -> ChainSettings:
    return ChainSettings() if data_dir is None else ChainSettings(data_dir=data_dir)


def keystore_from(data_dir: pathlib.Path | None) -> Keystore:
    settings = settings_from(data_dir)
    return Keystore(settings.keystore, scrypt_n=settings.scrypt_n)


def known_sites(settings: ChainSettings) -> set[str]:
    """The sites on this host's allow-list (empty without keys)."""
    try:
        return set(key_sites(settings.keys / "allowed").values())
    except Exception:  # noqa: BLE001 - no usable keys folder: no known sites
        return set()


def account_main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from(args.data_dir)
        ks = Keystore(settings.keystore, scrypt_n=settings.scrypt_n)
        sites = known_sites(settings)
        if args.cmd == "list":
            files = ks.list()
            for kf in files:
                print(f"{kf.address}\t{owner(kf, known_sites=sites, default=settings.site)}\t{kf.name}\t{kf.path}")
            if not files:
                print(f"no accounts in {ks.folder}", file=sys.stderr)
            return 0
        site = args.site or owner(KeyFile("", pathlib.Path(), args.name), known_sites=sites, default=settings.site)
        if args.cmd == "new":
            kf = ks.new(_passphrase(args, confirm=True), name=args.name, site=site)
        else:
            key = _private_key(args)
            kf = ks.add(key, _passphrase(args, confirm=True), name=args.name, site=site)
        print(kf.address)
        print(f"keystore file: {kf.path} (belongs to site {kf.site})", file=sys.stderr)
        return 0
    except (KeystoreError, OSError) as e:
        print(f"gridtrade account: {e}", file=sys.stderr)
        return 1
