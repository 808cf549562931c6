"""Every refusal a service can answer a request with, declared once.

A refusal is a :class:`~services.bus.errors.RequestError` whose class says two things: the
stable ``code`` that goes on the wire (the bus reply's ``error.code``, the gateway's JSON
``error.code``; tests and the web UI rely on these words) and the HTTP ``status`` the
gateway answers it with. A service raises the class with a message for people::

    raise refusals.TooLow(f"the highest bid is {price} wei/kWh")

The RPC server sends ``code`` and ``message``; the caller gets a ``RequestError`` with that
code, and the gateway turns it into an HTTP status with :func:`status_of`. Each class is
named after its code (``too_low`` is ``TooLow``); a code nobody declared is answered 409.
"""

from __future__ import annotations

from typing import ClassVar

from .errors import RequestError

__all__ = ["REFUSALS", "Refusal", "status_of"]

# every declared refusal by its wire code
REFUSALS: dict[str, type[Refusal]] = {}

UNDECLARED_STATUS = 409  # what the gateway answers a code no class declares


class Refusal(RequestError):
    """A request refused with a stable code (``code``) and an HTTP status (``status``)."""

    code: ClassVar[str] = ""  # an instance's ``code`` is always its class's
    status: ClassVar[int] = UNDECLARED_STATUS

    def __init__(self, message: str) -> None:
        super().__init__(self.code, message)

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        code = cls.__dict__.get("code")
        if code:
            if code in REFUSALS:
                raise TypeError(f"refusal code {code!r} is declared twice ({REFUSALS[code].__name__}, {cls.__name__})")
            REFUSALS[code] = cls


def status_of(code: str) -> int:
    """The HTTP status the gateway answers a refusal ``code`` with."""
    cls = REFUSALS.get(code)
    return cls.status if cls is not None else UNDECLARED_STATUS


# --- 401, 403, 404, 422, 429: the caller must change something ---------------------------


class Locked(Refusal):
    """The account's key is not unlocked in its wallet (the wallet restarted, or the unlock ran out)."""
    code, status = "locked", 401


class NotAllowed(Refusal):
    """The caller may not do this (e.g. cancel another seller's offer, start mining at a wallet)."""
    code, status = "not_allowed", 403


class NotYourAccount(Refusal):
    """The request names an account of another site."""
    code, status = "not_your_account", 403


class NotYourSite(Refusal):
    """The request came from another site than the one this service serves."""
    code, status = "not_your_site", 403


class NotFound(Refusal):
    """No such offer, trade or order."""
    code, status = "not_found", 404


class UnknownAccount(Refusal):
    """No keystore (or no owning site) is known for the account."""
    code, status = "unknown_account", 404


class Invalid(Refusal):
    """The request is well-formed but its values are not acceptable."""
    code, status = "invalid", 422


class BadRequest(Refusal):
    """The request could not be decoded into a known command."""
    code, status = "bad_request", 422


class BadAmount(Refusal):
    """An amount that must be positive is not."""
    code, status = "bad_amount", 422


class TooManyAttempts(Refusal):
    """Too many failed unlocks of one account: try again later (the message says when)."""
    code, status = "too_many_attempts", 429


# --- 409: the request conflicts with the state of the market, the escrow or the chain ----


class TooLow(Refusal):
    """The bid or order price is below what the offer or the round accepts."""
    code, status = "too_low", 409


class Closed(Refusal):
    """The offer or trade is closed (or past its deadline)."""
    code, status = "closed", 409


class HasBids(Refusal):
    """An offer with bids cannot be cancelled."""
    code, status = "has_bids", 409


class Unfunded(Refusal):
    """The bid or order needs more escrow reserved (for longer) than the buyer has."""
    code, status = "unfunded", 409


class NoTokens(Refusal):
    """The seller has fewer free energy tokens than the offer or order needs."""
    code, status = "no_tokens", 409


class OwnOffer(Refusal):
    """A seller bidding on their own offer (or crossing their own order)."""
    code, status = "own_offer", 409


class BadSignature(Refusal):
    """A signed offer or bid does not recover to its account in the market's domain."""
    code, status = "bad_signature", 409


class Replayed(Refusal):
    """A signed offer or bid that was placed already."""
    code, status = "replayed", 409


class InvalidTransition(Refusal):
    """A trade asked to move between states its lifecycle does not allow."""
    code, status = "invalid_transition", 409


class Unsupported(Refusal):
    """This market (or this service) does not serve that request."""
    code, status = "unsupported", 409


class NotSupported(Refusal):
    """This chain does not support what was asked (e.g. mining control)."""
    code, status = "not_supported", 409


class InsufficientEscrow(Refusal):
    """The escrow holds less than the withdrawal or reservation asks."""
    code, status = "insufficient_escrow", 409


class InsufficientCredit(Refusal):
    """The credit holds less than the withdrawal asks."""
    code, status = "insufficient_credit", 409


class InsufficientTokens(Refusal):
    """The account holds fewer energy tokens than the approval asks."""
    code, status = "insufficient_tokens", 409


class InsufficientFunds(Refusal):
    """The account's Ether does not pay for the transaction (value plus gas)."""
    code, status = "insufficient_funds", 409


class Rejected(Refusal):
    """The node or the contract refused the transaction; nothing was sent."""
    code, status = "rejected", 409


class BadPassphrase(Refusal):
    """The passphrase does not decrypt the account's keystore."""
    code, status = "bad_passphrase", 409


class Keystore(Refusal):
    """A keystore file could not be written or read."""
    code, status = "keystore", 409


class Failed(Refusal):
    """The service raised one of its own errors while handling the request."""
    code, status = "failed", 409


# --- 502, 503: the service cannot answer now ----------------------------------------------


class Internal(Refusal):
    """A bug in the handler (the service logged it)."""
    code, status = "internal", 502


class Unavailable(Refusal):
    """Something the service needs cannot be asked now (e.g. the chain service for a balance)."""
    code, status = "unavailable", 503


class ChainUnavailable(Refusal):
    """The chain node cannot be reached right now."""
    code, status = "chain_unavailable", 503


class Busy(Refusal):
    """Too many requests of one site at once."""
    code, status = "busy", 503


class RequestTimeout(Refusal, TimeoutError):
    """No reply came within the request's timeout (or, from a wallet, no block in time)."""
    code, status = "timeout", 503

    def __init__(self, message: str = "no reply in time") -> None:
        super().__init__(message)
