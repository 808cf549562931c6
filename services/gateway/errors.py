"""The gateway's refusals: :class:`ApiError`, its JSON body, a service's refusal as an HTTP
error (its status is the one its code is declared with in :mod:`services.bus.refusals`), and the
rewording of a refusal for the person at this wallet (see words.py).

Every error is JSON ``{"error": {"code", "message"}}`` (``fix`` added when the page can
offer one).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from aiohttp import web

from services.bus import RequestError, RequestTimeout, refusals

from . import words

LOCKED_MESSAGE = ("your wallet restarted and locked your account's key: enter your passphrase again "
                  "(nothing was done)")

NO_SESSION_MESSAGE = "log in first (no session, or it has expired)"


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None,
                 fix: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}
        self.fix = fix or {}

    @classmethod
    def of(cls, refusal: type[refusals.Refusal], message: str, headers: dict[str, str] | None = None) -> ApiError:
        """The gateway's own refusal with a code the services use too: its declared status."""
        return cls(refusal.status, refusal.code, message, headers)


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
    """A service's refusal as an HTTP error: the status its code is declared with (see
    :mod:`services.bus.refusals`); a service that cannot answer now is ``unavailable``."""
    if isinstance(e, RequestTimeout):
        return ApiError(refusals.Unavailable.status, refusals.Unavailable.code,
                        f"the {service} service does not answer; try again in a moment")
    if e.code == refusals.Locked.code:  # the key is locked in the wallet (it restarted, or its unlock ran out)
        return ApiError.of(refusals.Locked, LOCKED_MESSAGE)
    status = refusals.status_of(e.code)
    if status == 503:
        return ApiError(status, refusals.Unavailable.code, f"the {service} service cannot do this now: {e.message}")
    if e.code == refusals.Internal.code:
        return ApiError(status, "upstream_error", f"the {service} service failed: {e.message}")
    return ApiError(status, e.code, e.message)


@contextlib.contextmanager
def refused_by(service: str) -> Iterator[None]:
    """Around requests to other services: a refusal as the HTTP error :func:`from_request_error`
    makes of it, named for the service that refused (``service`` when the refusal does not say)."""
    try:
        yield
    except RequestError as e:
        raise from_request_error(e, e.service or service) from None
