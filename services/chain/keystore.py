"""Keystore v3 files (scrypt) in ``<data_dir>/keystore/``: create, import, list, decrypt.

A passphrase or a private key is only ever held in memory; files hold the encrypted key.
The keystore of a site lives at that site, with its wallet; the market holds none.

Beside the encrypted key a file keeps the account's ownership claim (``claim``: the
account key's EIP-191 signature that the account belongs to its site, see
:mod:`services.bus.claims`), made when the key is in hand: on creation, on import, or at
the first unlock of a file that has none (an older file, or one copied in from geth).

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

from services.bus import claims

from .errors import BadPassphrase, KeystoreError, UnknownAccount


SITE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")  # a site name, as in BusSettings.site


@dataclass(frozen=True)
class KeyFile:
    address: str
    path: pathlib.Path
    name: str = ""
    site: str = ""
    """The site the account belongs to ("" in a file written before sites were recorded)."""
    claim: str = ""
    """The account key's signature that it belongs to ``site`` ("" until it is made)."""


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
        self._listed: tuple[tuple[tuple[str, int, int], ...], list[KeyFile]] | None = None

    def list(self) -> list[KeyFile]:
        """The folder's accounts. The files are parsed again only when one was added,
        removed or changed (name, size and mtime of each: a stat, not a read), so a view
        that asks on every request does not read every keystore file each time."""
        seen = []
        try:
            with os.scandir(self.folder) as it:
                for e in it:
                    try:
                        st = e.stat()
                    except OSError:  # gone meanwhile (a temporary file renamed into place)
                        continue
                    seen.append((e.name, st.st_size, st.st_mtime_ns))
        except OSError:
            return []
        stamp = tuple(sorted(seen))
        if self._listed is not None and self._listed[0] == stamp:
            return list(self._listed[1])
        listed = self._read()
        self._listed = (stamp, listed)
        return list(listed)

    def _read(self) -> list[KeyFile]:
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
            claim = str(data.get("claim", ""))
            out.setdefault(address, KeyFile(address, path, str(data.get("name", ""))[:64],
                                            site if SITE.match(site) else "", claim if len(claim) == 132 else ""))
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
        return self._store(dict(data), bytes(account.key), account.address, name=name, site=site)

    def import_file(self, source: pathlib.Path, passphrase: str, *, name: str = "", site: str = "") -> KeyFile:
        """Take in a keystore v3 file made elsewhere (geth, another wallet) as it is (its own
        encryption and passphrase), adding the site, the name and the ownership claim; the
        passphrase opens it once here to sign the claim."""
        if site:
            check_site(site)
        try:
            data = json.loads(pathlib.Path(source).read_text())
            address = _checksum("0x" + str(data["address"]).removeprefix("0x"))
        except (OSError, ValueError, KeyError, TypeError, UnknownAccount) as e:
            raise KeystoreError(f"{source} is not a keystore v3 file") from e
        try:
            key = bytes(Account.decrypt(data, passphrase))
        except ValueError:
            raise BadPassphrase(f"wrong passphrase for {address}") from None
        if Account.from_key(key).address != address:
            raise KeystoreError(f"{source}: the key does not match the address it names")
        if any(kf.address == address for kf in self.list()):
            raise KeystoreError(f"{address} is already in the keystore")
        for k in ("name", "site", "claim"):
            data.pop(k, None)
        return self._store(data, key, address, name=name or str(data.get("name", "")), site=site)

    def _store(self, data: dict[str, object], key: bytes, address: str, *, name: str, site: str) -> KeyFile:
        if name:
            data["name"] = name[:64]
        claim = ""
        if site:
            data["site"] = site
            data["claim"] = claim = claims.sign(key, site)
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H-%M-%S.%fZ")
        path = self.folder / f"UTC--{stamp}--{address[2:].lower()}"
        self._write(path, data)
        return KeyFile(address, path, name[:64], site, claim)

    @staticmethod
    def _write(path: pathlib.Path, data: dict[str, object]) -> None:
        tmp = path.with_name("." + path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def set_claim(self, address: str, site: str, claim: str) -> KeyFile:
        """Record the site and the ownership claim in an account's file (made at its first unlock)."""
        kf = self.find(address)
        try:
            data = json.loads(kf.path.read_text())
        except (OSError, ValueError) as e:
            raise KeystoreError(f"cannot read keystore file for {kf.address}") from e
        data["site"], data["claim"] = check_site(site), claim
        self._write(kf.path, data)
        return KeyFile(kf.address, kf.path, kf.name, site, claim)

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
