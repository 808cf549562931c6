"""One root exception for the project; each package subclasses it."""

from __future__ import annotations


class GridtradeError(Exception):
    """Root of every error gridtrade raises on purpose."""


class BusError(GridtradeError, RuntimeError):
    """The bus could not do what was asked (socket, store, configuration)."""


class DecodeError(GridtradeError, ValueError):
    """A frame could not be decoded into a known message.

    ``cause`` is a short, stable word used to count drops: ``garbage``, ``frames``,
    ``version``, ``unknown_type``, ``invalid``, ``topic``.
    """

    def __init__(self, cause: str, detail: str = "") -> None:
        super().__init__(f"{cause}: {detail}" if detail else cause)
        self.cause = cause
        self.detail = detail


class RequestError(GridtradeError, RuntimeError):
    """A request was answered with an error (``code`` is stable, ``message`` is for people).

    A service raises one of the classes in :mod:`services.bus.refusals`, which declare each
    code once with its HTTP status; a caller gets this class with the code from the wire."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.service = ""  # which service answered, where a caller asked several (set by that caller)

