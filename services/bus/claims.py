"""Which account belongs to which site, proven by the account key itself.

Keystores live at their sites: the market holds none, so it cannot look up whose an
account is. Instead, when an account is created or imported at a site (the key is in hand
then) the site's wallet signs :func:`claim_text` with the account key (EIP-191 personal
message) and keeps the signature beside the keystore file; it announces it on the bus as
:class:`~services.bus.events.WalletAccount` (publish policy SITE_NAMED: a site can only
announce claims naming itself). Whoever needs to know (the auction, the operator) checks
the signature and keeps the map in :class:`Claims`: the first valid claim of an address
binds it; a later claim naming another site is refused and counted.

A claim proves that the site held the key when it signed. Two sites that both hold one
key (a key copied between them) could both sign; the first announced wins.
"""

from __future__ import annotations

import logging
import sqlite3

from eth_account import Account
from eth_account.messages import encode_defunct
from eth_utils import is_hex_address, to_checksum_address

from .events import WalletAccount
from .retry import worth_logging

log = logging.getLogger(__name__)


def claim_text(site: str, address: str) -> str:
    return f"gridtrade: account {to_checksum_address(address)} belongs to site {site}"


def sign(private_key: bytes, site: str) -> str:
    """The claim of the account of ``private_key`` for ``site`` (0x-hex signature)."""
    acct = Account.from_key(private_key)
    signed = Account.sign_message(encode_defunct(text=claim_text(site, acct.address)), private_key)
    return "0x" + bytes(signed.signature).hex()


def valid(site: str, address: str, signature: str) -> bool:
    """Whether ``signature`` is the key of ``address`` signing that it belongs to ``site``."""
    if not is_hex_address(address):
        return False
    try:
        signer = Account.recover_message(encode_defunct(text=claim_text(site, address)), signature=signature)
    except Exception:  # noqa: BLE001 - any malformed signature is simply not valid
        return False
    return bool(signer == to_checksum_address(address))


SCHEMA = """
CREATE TABLE IF NOT EXISTS account_claims (address TEXT PRIMARY KEY, site TEXT NOT NULL, name TEXT NOT NULL,
                                           signature TEXT NOT NULL);
"""


class Claims:
    """address -> site from valid claims, kept in the owner's store (inside the subscriber's
    transaction that applies the claim), read from memory."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        conn.executescript(SCHEMA)
        self._site = {str(a): str(s) for a, s in conn.execute("SELECT address, site FROM account_claims")}
        self.refused: dict[str, int] = {}  # cause (bad_signature, other_site) -> count

    def site_of(self, address: str) -> str:
        """The site an address belongs to ("" if nobody claimed it)."""
        if not is_hex_address(address):
            return ""
        return self._site.get(to_checksum_address(address), "")

    def __len__(self) -> int:
        return len(self._site)

    def addresses(self, site: str | None = None) -> list[str]:
        return [a for a, s in self._site.items() if site is None or s == site]

    def apply(self, conn: sqlite3.Connection, claim: WalletAccount) -> bool:
        """Record a claim if it is valid and does not contradict an earlier one; True if it
        binds an address that was not bound before."""
        address = to_checksum_address(claim.address)
        if not valid(claim.site, address, claim.signature):
            self._refuse("bad_signature", f"claim of {address} for site {claim.site}: the signature is not the "
                                          "account key's")
            return False
        have = self._site.get(address)
        if have is not None and have != claim.site:
            self._refuse("other_site", f"site {claim.site} claims {address}, which belongs to site {have}")
            return False
        # also for a claim memory already has: the transaction that first applied it may
        # have rolled back, and this (redelivered) one must reach the store
        conn.execute("INSERT OR IGNORE INTO account_claims (address, site, name, signature) VALUES (?, ?, ?, ?)",
                     (address, claim.site, claim.name, claim.signature))
        self._site[address] = claim.site
        return have is None

    def _refuse(self, cause: str, detail: str) -> None:
        n = self.refused[cause] = self.refused.get(cause, 0) + 1
        if worth_logging(n):
            log.warning("refused an account claim (%s, %d so far): %s", cause, n, detail)
