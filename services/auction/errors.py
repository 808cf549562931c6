"""The auction's refusals: a stable ``code`` and a message for people."""

from __future__ import annotations

from services.bus.errors import GridtradeError


class Rejected(GridtradeError, ValueError):
    """A command the rules refuse. ``code`` is stable and goes on the wire as the
    ``RequestError`` code: too_low, unfunded, closed, own_offer, not_found, not_allowed,
    invalid, has_bids, no_tokens, unavailable, bad_signature (a signed offer or bid that
    does not recover to its account in the market's domain), replayed (a signed offer or
    bid taken already)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
