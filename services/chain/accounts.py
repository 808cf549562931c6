"""``gridtrade account new|list|import``: keystore v3 files in the site's data dir.

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

from .config import ChainSettings
from .errors import KeystoreError
from .keystore import Keystore


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
    new.add_argument("--passphrase-file", type=pathlib.Path, default=None)
    sub.add_parser("list", help="list the accounts in the keystore")
    imp = sub.add_parser("import", help="import a private key into the keystore")
    imp.add_argument("--key-file", type=pathlib.Path, default=None, help="a file holding the hex private key")
    imp.add_argument("--name", default="")
    imp.add_argument("--passphrase-file", type=pathlib.Path, default=None)
    return p


def keystore_from(data_dir: pathlib.Path | None) -> Keystore:
    settings = ChainSettings() if data_dir is None else ChainSettings(data_dir=data_dir)
    return Keystore(settings.keystore, scrypt_n=settings.scrypt_n)


def account_main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        ks = keystore_from(args.data_dir)
        if args.cmd == "list":
            files = ks.list()
            for kf in files:
                print(f"{kf.address}\t{kf.name}\t{kf.path}")
            if not files:
                print(f"no accounts in {ks.folder}", file=sys.stderr)
            return 0
        if args.cmd == "new":
            kf = ks.new(_passphrase(args, confirm=True), name=args.name)
        else:
            key = _private_key(args)
            kf = ks.add(key, _passphrase(args, confirm=True), name=args.name)
        print(kf.address)
        print(f"keystore file: {kf.path}", file=sys.stderr)
        return 0
    except (KeystoreError, OSError) as e:
        print(f"gridtrade account: {e}", file=sys.stderr)
        return 1
