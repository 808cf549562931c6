"""The gateway's refusals: :class:`ApiError`, its JSON body, the request-error codes of the
chain and auction services mapped to HTTP statuses (one table, one function), and the
rewording of a refusal for the person at this wallet (see words.py).

Every error is JSON ``{"error": {"code", "message"}}`` (``fix`` added when the page can
offer one).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from services.bus import RequestError, RequestTimeout

from . import words

# request-error codes of the chain and auction services -> HTTP status
STATUS_OF_CODE: dict[str, int] = {
    "not_found": 404, "unknown_account": 404,
    "not_allowed": 403, "not_your_account": 403, "not_your_site": 403,
    "too_many_attempts": 429,
    "invalid": 422, "bad_request": 422, "bad_amount": 422,
    "locked": 401,
    "timeout": 503, "unavailable": 503, "chain_unavailable": 503, "busy": 503,
}
CONFLICT = {"too_low", "closed", "has_bids", "unfunded", "no_tokens", "own_offer", "insufficient_escrow",
            "insufficient_credit", "insufficient_tokens", "insufficient_funds", "rejected", "invalid_transition",
            "not_supported", "unsupported", "bad_signature", "replayed"}

LOCKED_MESSAGE = ("your wallet restarted and locked your account's key: enter your passphrase again "
                  "(nothing was done)")

NO_SESSION_MESSAGE = "log in first (no session, or it has expired)"


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None,
                 fix: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}
        self.fix = fix or {}


def no_session() -> ApiError:
    """The 401 of a route that needs a session, without one (or with an expired one)."""
    return ApiError(401, "no_session", NO_SESSION_MESSAGE)


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None,
                   fix: dict[str, str] | None = None) -> web.Response:
    error: dict[str, Any] = {"code": code, "message": message}
    if fix:
        error["fix"] = fix
    return web.json_response({"error": error}, status=status, headers=headers)


# refusals reworded for the person (see words.py); others are the gateway's own words already
PERSONAL = {400, 403, 404, 409, 422}


def for_person(e: ApiError, route: str, body: Any, now: float) -> ApiError:
    """A service's refusal as the person at this wallet reads it: in Ether and kWh, to "you",
    with the fix the page can offer (e.g. the deposit that is missing)."""
    if e.status not in PERSONAL or e.code in ("not_found", "malformed_json", "unsupported_media_type"):
        return e
    said = words.for_person(e.code, e.message, route=route, body=body, now=now)
    return ApiError(e.status, e.code, said.message, e.headers, said.fix or e.fix)


def from_request_error(e: RequestError, service: str) -> ApiError:
    if isinstance(e, RequestTimeout):
        return ApiError(503, "unavailable", f"the {service} service does not answer; try again in a moment")
    if e.code == "locked":  # the key is locked in the wallet (it restarted, or its unlock ran out)
        return ApiError(401, "locked", LOCKED_MESSAGE)
    if e.code in STATUS_OF_CODE:
        status = STATUS_OF_CODE[e.code]
        if status == 503:
            return ApiError(503, "unavailable", f"the {service} service cannot do this now: {e.message}")
        return ApiError(status, e.code, e.message)
    if e.code in CONFLICT:
        return ApiError(409, e.code, e.message)
    if e.code == "internal":
        return ApiError(502, "upstream_error", f"the {service} service failed: {e.message}")
    return ApiError(409, e.code, e.message)
