"""The meter service's exceptions: one root, subclasses that also inherit the builtin."""

from __future__ import annotations

from services.bus.errors import GridtradeError


class MeterError(GridtradeError):
    """Root of the meter service's errors."""


class ProtocolError(MeterError, ValueError):
    """Bytes from a meter (or to an emulator) that do not decode. ``reason`` is a short,
    stable word used to count them: ``framing``, ``checksum``, ``syntax``, ``unknown``,
    ``range``, ``too_long``, ``crc``, ``exception``, ``timeout``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class DriverError(MeterError, ConnectionError):
    """The meter cannot be reached (port missing, unplugged, not answering)."""


class MeterKeyError(MeterError, RuntimeError):
    """A meter's key could not be created, found or unlocked (the service cannot start)."""
