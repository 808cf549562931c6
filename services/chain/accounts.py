"""``gridtrade account new|list|import``: keystore v3 files of a site's wallet.

Keys live at their site: each site's wallet (the chain service in its site role) keeps
its keystore in ``<its data dir>/keystore``; the market keeps none (at most the operator
key). Which keystore: ``--keystore DIR``, else ``--grid DIR`` (the data folder of
``gridtrade up``: ``DIR/<site>/keystore``), else ``<--data-dir or GRIDTRADE_DATA_DIR>/keystore``.

Every account belongs to one site (``--site``; the site's wallet serves its own site
only). Without ``--site`` the account gets the site its name starts with when that is a
site on the allow-list (``--name "home-7 bob"``), else this host's own site
(``GRIDTRADE_SITE``). When the key is in hand (new, import) the file also gets the
account key's signed ownership claim for that site, which the wallet announces.

``import`` takes a raw private key (``--key-file`` or a prompt, never the command line,
where ``ps`` would show it) or a keystore v3 file made elsewhere, e.g. by geth
(``--keystore-file``: kept as it is, with its own passphrase, which opens it once here to
sign the claim). The passphrase comes from ``--passphrase-file``, else
``GRIDTRADE_PASSPHRASE``, else a prompt (asked twice for a new key).
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
    p = argparse.ArgumentParser(prog="gridtrade account", description="manage a site's Ethereum accounts")
    p.add_argument("--data-dir", type=pathlib.Path, default=None, help="the site's data dir (GRIDTRADE_DATA_DIR)")
    p.add_argument("--grid", type=pathlib.Path, default=None,
                   help="the data folder of `gridtrade up`: the keystore of --site is GRID/<site>/keystore")
    p.add_argument("--keystore", type=pathlib.Path, default=None, help="the keystore folder itself")
    sub = p.add_subparsers(dest="cmd", required=True)
    new = sub.add_parser("new", help="create an account (keystore v3, scrypt)")
    new.add_argument("--name", default="", help="a label shown on the login page")
    new.add_argument("--site", default=None, help="the site the account belongs to (default: the site its name "
                     "starts with if that is on the allow-list, else GRIDTRADE_SITE)")
    new.add_argument("--passphrase-file", type=pathlib.Path, default=None)
    ls = sub.add_parser("list", help="list the accounts in the keystore")
    ls.add_argument("--site", default=None, help="with --grid: whose keystore (default GRIDTRADE_SITE)")
    imp = sub.add_parser("import", help="import a private key or a keystore file (e.g. geth's) into the keystore")
    src = imp.add_mutually_exclusive_group()
    src.add_argument("--key-file", type=pathlib.Path, default=None, help="a file holding the hex private key")
    src.add_argument("--keystore-file", type=pathlib.Path, default=None,
                     help="a keystore v3 file made elsewhere (geth's keystore/UTC--...); its own passphrase")
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
        sites = known_sites(settings)
        site = args.site or (settings.site if args.cmd == "list" else
                             owner(KeyFile("", pathlib.Path(), args.name), known_sites=sites, default=settings.site))
        if args.keystore is not None:
            folder = args.keystore
        elif args.grid is not None:
            folder = args.grid / site / "keystore"
        else:
            folder = settings.keystore
        ks = Keystore(folder, scrypt_n=settings.scrypt_n)
        if args.cmd == "list":
            files = ks.list()
            for kf in files:
                print(f"{kf.address}\t{owner(kf, known_sites=sites, default=settings.site)}\t{kf.name}\t{kf.path}")
            if not files:
                print(f"no accounts in {ks.folder}", file=sys.stderr)
            return 0
        if args.cmd == "new":
            kf = ks.new(_passphrase(args, confirm=True), name=args.name, site=site)
        elif args.keystore_file is not None:
            kf = ks.import_file(args.keystore_file, _passphrase(args, confirm=False), name=args.name, site=site)
        else:
            key = _private_key(args)
            kf = ks.add(key, _passphrase(args, confirm=True), name=args.name, site=site)
        print(kf.address)
        print(f"keystore file: {kf.path} (belongs to site {kf.site}; its wallet announces it)", file=sys.stderr)
        return 0
    except (KeystoreError, OSError) as e:
        print(f"gridtrade account: {e}", file=sys.stderr)
        return 1
