"""The chain service's errors: one root, subclasses that also inherit the builtin."""

from __future__ import annotations

from services.bus.errors import GridtradeError


class ChainError(GridtradeError, RuntimeError):
    """Root of the chain service's errors."""


class KeystoreError(ChainError):
    """A keystore file could not be written or read."""


class UnknownAccount(KeystoreError, LookupError):
    """No keystore file holds this address."""


class BadPassphrase(KeystoreError, PermissionError):
    """The passphrase does not decrypt the keystore file."""


class AccountLocked(ChainError, PermissionError):
    """The account has no unlocked session."""


class ChainUnavailable(ChainError, ConnectionError):
    """The chain node cannot be reached right now."""


class TxRejected(ChainError, ValueError):
    """The node or the contract refused a transaction (``reason`` says why)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NotSupported(ChainError, NotImplementedError):
    """This chain does not support what was asked (e.g. mining control)."""


class RateLimited(ChainUnavailable):
    """The node (or the provider in front of it) asked us to slow down: HTTP 429 or a
    JSON-RPC 'limit exceeded' error. Retried with backoff; never a refusal."""


class RpcTimeout(ChainUnavailable):
    """The node did not answer in time. Retried with backoff; never a refusal."""
