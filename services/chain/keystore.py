"""Keystore v3 files (scrypt) in ``<data_dir>/keystore/``: create, import, list, decrypt.

A passphrase or a private key is only ever held in memory; files hold the encrypted key.

Every account belongs to one site: the file records ``site`` beside ``name`` (plain
JSON fields next to the standard keystore v3 ones, which other tools ignore). A file
written before sites were recorded has none; :func:`owner` decides it: the first word of
its name when that is a known site (``gridtrade up`` named its demo accounts
``"<site> <label>"``), else the site of the keystore's own host (the market).
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import re
from collections.abc import Collection
from dataclasses import dataclass

from eth_account import Account
from eth_utils import is_hex_address, to_checksum_address

from .errors import BadPassphrase, KeystoreError, UnknownAccount


SITE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")  # a site name, as in BusSettings.site


@dataclass(frozen=True)
class KeyFile:
    address: str
    path: pathlib.Path
    name: str = ""
    site: str = ""
    """The site the account belongs to ("" in a file written before sites were recorded)."""


def owner(kf: KeyFile, *, known_sites: Collection[str], default: str) -> str:
    """The site an account belongs to: the one its file records; for an older file without
    one, the first word of its name if that is a known site, else ``default``."""
    if kf.site:
        return kf.site
    first = kf.name.split(" ", 1)[0] if kf.name else ""
    if first and first in known_sites:
        return first
    return default


def check_site(site: str) -> str:
    if not SITE.match(site):
        raise KeystoreError(f"not a site name: {site!r} (lower-case letters, digits, '-' and '_')"[:120])
    return site


def _checksum(address: str) -> str:
    if not isinstance(address, str) or not is_hex_address(address):
        raise UnknownAccount(f"not an address: {address!r}"[:80])
    return to_checksum_address(address)


class Keystore:
    """A folder of keystore v3 JSON files, one per account (geth's naming)."""

    def __init__(self, folder: pathlib.Path, *, scrypt_n: int = 2**18) -> None:
        if scrypt_n & (scrypt_n - 1):
            raise KeystoreError("scrypt_n must be a power of two")
        self.folder = pathlib.Path(folder)
        self.scrypt_n = scrypt_n

    def list(self) -> list[KeyFile]:
        if not self.folder.is_dir():
            return []
        out: dict[str, KeyFile] = {}
        for path in sorted(self.folder.iterdir()):
            if not path.is_file() or path.name.startswith("."):
                continue
            try:
                data = json.loads(path.read_text())
                address = _checksum("0x" + str(data["address"]).removeprefix("0x"))
            except (OSError, ValueError, KeyError, TypeError, UnknownAccount):
                continue  # not a keystore file
            site = str(data.get("site", ""))
            out.setdefault(address, KeyFile(address, path, str(data.get("name", ""))[:64],
                                            site if SITE.match(site) else ""))
        return list(out.values())

    def find(self, address: str) -> KeyFile:
        want = _checksum(address)
        for kf in self.list():
            if kf.address == want:
                return kf
        raise UnknownAccount(f"no keystore file for {want}")

    def new(self, passphrase: str, *, name: str = "", site: str = "") -> KeyFile:
        return self.add(Account.create().key, passphrase, name=name, site=site)

    def add(self, private_key: bytes | str, passphrase: str, *, name: str = "", site: str = "") -> KeyFile:
        """Encrypt and store a key; ``site`` is the site the account belongs to."""
        if site:
            check_site(site)
        if not passphrase:
            raise KeystoreError("an empty passphrase is not allowed")
        try:
            account = Account.from_key(private_key)
        except (ValueError, TypeError) as e:
            raise KeystoreError("not a valid private key (32 bytes, hex)") from e
        if any(kf.address == account.address for kf in self.list()):
            raise KeystoreError(f"{account.address} is already in the keystore")
        data = Account.encrypt(account.key, passphrase, kdf="scrypt", iterations=self.scrypt_n)
        if name:
            data["name"] = name[:64]
        if site:
            data["site"] = site
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H-%M-%S.%fZ")
        path = self.folder / f"UTC--{stamp}--{account.address[2:].lower()}"
        tmp = path.with_name("." + path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return KeyFile(account.address, path, name[:64], site)

    def decrypt(self, address: str, passphrase: str) -> bytes:
        """The private key, or :class:`BadPassphrase`. Slow on purpose (scrypt): run it in a thread."""
        kf = self.find(address)
        try:
            data = json.loads(kf.path.read_text())
        except (OSError, ValueError) as e:
            raise KeystoreError(f"cannot read keystore file for {kf.address}") from e
        try:
            key = Account.decrypt(data, passphrase)
        except ValueError:
            raise BadPassphrase(f"wrong passphrase for {kf.address}") from None
        return bytes(key)
