"""Meter keys: each meter that mints or trades has its own secp256k1 key, made at its
first start and kept at its site, encrypted at rest as a keystore v3 file (scrypt), one
folder per meter under ``<data_dir>/meter-keys/<meter>/``. The files are written and read
by :class:`services.chain.keystore.Keystore`, the one keystore of the project.

The passphrase comes from ``GRIDTRADE_METER_PASSPHRASE_FILE`` (its first line), like the
operator's. Without that setting the service makes a random one on its first start in
``<data_dir>/meter-passphrase`` (mode 0600), so an unattended site starts on its own; a
site that keeps its passphrase elsewhere (a secret mount) points the setting at it. The
key and the passphrase are only ever held in memory and never logged.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import secrets

from eth_account import Account

from services.chain.errors import KeystoreError
from services.chain.keystore import Keystore

from .errors import MeterKeyError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class MeterKey:
    """One meter's unlocked key (``key`` stays out of ``repr``)."""

    meter: str
    address: str
    path: pathlib.Path
    key: bytes = dataclasses.field(repr=False)


def passphrase(file: pathlib.Path | None, data_dir: pathlib.Path) -> str:
    """The meter keys' passphrase: the first line of ``file``; without one, of
    ``<data_dir>/meter-passphrase``, made at random the first time."""
    if file is None:
        file = data_dir / "meter-passphrase"
        if not file.exists():
            file.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "w") as f:
                    f.write(secrets.token_urlsafe(32) + "\n")
                log.warning("meter keys: a new random passphrase is kept in %s; set GRIDTRADE_METER_PASSPHRASE_FILE "
                            "to keep it elsewhere", file)
    try:
        lines = file.read_text().splitlines()
    except OSError as e:
        raise MeterKeyError(f"cannot read the meter passphrase file {file}: {e.strerror}") from None
    if not lines or not lines[0]:
        raise MeterKeyError(f"the meter passphrase file {file} is empty")
    return lines[0]


def load_or_create(folder: pathlib.Path, meter: str, secret: str, *, scrypt_n: int = 2**18) -> MeterKey:
    """The key of ``meter`` in ``folder``: made and stored encrypted the first time, else
    decrypted. Slow on purpose (scrypt): run it in a thread."""
    ks = Keystore(folder, scrypt_n=scrypt_n)
    files = ks.list()
    if len(files) > 1:
        raise MeterKeyError(f"meter {meter}: {len(files)} keys in {folder}; keep the one its registration names")
    try:
        if not files:
            account = Account.create()
            kf = ks.add(account.key, secret, name=f"meter {meter}")
            log.info("meter %s: new key %s in %s", meter, kf.address, kf.path)
            return MeterKey(meter, kf.address, kf.path, bytes(account.key))
        kf = files[0]
        key = ks.decrypt(kf.address, secret)
    except KeystoreError as e:
        raise MeterKeyError(f"meter {meter}: {e}") from None
    if Account.from_key(key).address != kf.address:
        raise MeterKeyError(f"meter {meter}: the key in {kf.path} does not match the address it names")
    return MeterKey(meter, kf.address, kf.path, key)
