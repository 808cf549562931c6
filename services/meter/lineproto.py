"""The gridtrade line protocol between the meter service and a meter's microcontroller.

Pure codec: functions from values to bytes and back, no I/O.

Framing (NMEA-style)
--------------------
Every frame is one ASCII line::

    $<payload>*<CS>\\n

``<payload>`` is comma-separated fields of printable ASCII (0x20-0x7E, no ``$`` or
``*``); ``<CS>`` is the XOR of every payload byte (the bytes between ``$`` and ``*``),
written as two upper-case hex digits (lower case is accepted). A ``\\r`` before the
``\\n`` is ignored. A line is at most 128 bytes; bytes before a ``$`` are noise and
skipped. Serial settings: 9600 baud, 8N1 by default (any rate works on a pty).

Requests (host -> meter) and replies (meter -> host)
----------------------------------------------------
========================  ================================================================
``$READ*CS``              ``$R,<energy_wh>,<power_w>,<voltage_v>,<current_a>,<relay>[,<export_wh>]*CS``
``$RELAY,<0|1>*CS``       ``$OK,RELAY,<0|1>*CS`` once the relay is open (0) or closed (1)
``$PING*CS``              ``$OK,PONG*CS``
anything malformed        ``$ERR,<reason>*CS``: ``checksum``, ``syntax``, ``unknown``, ``too_long``
========================  ================================================================

Fields of ``$R``: ``energy_wh`` is the cumulative energy counter in whole Wh (unsigned,
< 2**63); ``power_w`` has one decimal (0.1 W), ``voltage_v`` and ``current_a`` two
(0.01 V, 0.01 A); ``relay`` is ``1`` closed, ``0`` open; the optional ``export_wh`` is a
producer's cumulative outflow through the relay in whole Wh.

Example: ``$READ*1F`` -> ``$R,1234,512.3,12.41,41.28,1,88*..``.

The microcontroller opens its relay by itself when it has not heard a valid frame for
its watchdog time (the emulator's ``--watchdog``), so a dead host never leaves it closed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Union

from .errors import ProtocolError
from .physics import Counters

MAX_LINE = 128
_MAX_WH = 2**63


def checksum(payload: bytes) -> int:
    """XOR of the payload bytes (NMEA 0183 style)."""
    cs = 0
    for b in payload:
        cs ^= b
    return cs


def frame(*fields: str) -> bytes:
    """``$f1,f2,...*CS\\n``."""
    payload = ",".join(fields).encode("ascii")
    if b"$" in payload or b"*" in payload or b"\n" in payload or b"\r" in payload:
        raise ValueError("fields must not contain $, *, CR or LF")
    out = b"$" + payload + b"*" + f"{checksum(payload):02X}".encode() + b"\n"
    if len(out) > MAX_LINE:
        raise ValueError("frame too long")
    return out


def unframe(line: bytes) -> list[str]:
    """Check a line's framing and checksum and return its fields, or raise
    :class:`ProtocolError` (``framing``, ``checksum``, ``too_long``)."""
    line = line.rstrip(b"\r\n")
    if len(line) > MAX_LINE:
        raise ProtocolError("too_long", f"{len(line)} bytes")
    start = line.rfind(b"$")
    if start < 0:
        raise ProtocolError("framing", "no $")
    line = line[start:]
    star = line.rfind(b"*")
    if star < 0 or len(line) - star != 3:
        raise ProtocolError("framing", "no *CS at the end")
    payload, cs_text = line[1:star], line[star + 1:]
    try:
        cs = int(cs_text.decode("ascii"), 16)
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError("framing", f"checksum {cs_text!r} is not hex") from None
    if cs != checksum(payload):
        raise ProtocolError("checksum", f"got {cs:02X}, computed {checksum(payload):02X}")
    if any(b < 0x20 or b > 0x7E for b in payload) or b"*" in payload:
        raise ProtocolError("framing", "non-printable payload")
    return payload.decode("ascii").split(",")


# --- requests -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ReadRequest:
    pass


@dataclasses.dataclass(frozen=True)
class RelayRequest:
    closed: bool


@dataclasses.dataclass(frozen=True)
class PingRequest:
    pass


Request = Union[ReadRequest, RelayRequest, PingRequest]


def encode_read() -> bytes:
    return frame("READ")


def encode_relay(closed: bool) -> bytes:
    return frame("RELAY", "1" if closed else "0")


def encode_ping() -> bytes:
    return frame("PING")


def decode_request(line: bytes) -> Request:
    fields = unframe(line)
    match fields:
        case ["READ"]:
            return ReadRequest()
        case ["PING"]:
            return PingRequest()
        case ["RELAY", "0" | "1" as v]:
            return RelayRequest(v == "1")
        case ["READ" | "PING" | "RELAY", *_]:
            raise ProtocolError("syntax", ",".join(fields)[:40])
    raise ProtocolError("unknown", fields[0][:20])


# --- replies --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RelayAck:
    closed: bool


@dataclasses.dataclass(frozen=True)
class Pong:
    pass


@dataclasses.dataclass(frozen=True)
class ErrorReply:
    reason: str


Reply = Union[Counters, RelayAck, Pong, ErrorReply]


def encode_reading(c: Counters) -> bytes:
    fields = [str(int(c.energy_wh)), f"{c.power_w:.1f}", f"{c.voltage_v:.2f}", f"{c.current_a:.2f}",
              "1" if c.relay_closed else "0"]
    if c.export_wh is not None:
        fields.append(str(int(c.export_wh)))
    return frame("R", *fields)


def encode_relay_ack(closed: bool) -> bytes:
    return frame("OK", "RELAY", "1" if closed else "0")


def encode_pong() -> bytes:
    return frame("OK", "PONG")


def encode_error(reason: str) -> bytes:
    return frame("ERR", reason)


def _wh(text: str) -> int:
    if not text.isdigit():
        raise ProtocolError("syntax", f"counter {text[:20]!r}")
    v = int(text)
    if v >= _MAX_WH:
        raise ProtocolError("range", "counter too large")
    return v


def _num(text: str, decimals: int) -> float:
    """A decimal with exactly ``decimals`` digits after the point (optionally signed)."""
    body = text[1:] if text[:1] == "-" else text
    whole, dot, frac = body.partition(".")
    if not whole.isdigit() or not dot or len(frac) != decimals or not frac.isdigit():
        raise ProtocolError("syntax", f"number {text[:20]!r}")
    v = float(text)
    if not math.isfinite(v) or abs(v) > 1e9:
        raise ProtocolError("range", f"number {text[:20]!r}")
    return v


def decode_reply(line: bytes) -> Reply:
    """Decode a meter's reply line, or raise :class:`ProtocolError`."""
    fields = unframe(line)
    match fields:
        case ["R", energy, power, voltage, current, "0" | "1" as relay, *rest] if len(rest) <= 1:
            return Counters(
                energy_wh=_wh(energy), power_w=_num(power, 1), voltage_v=_num(voltage, 2),
                current_a=_num(current, 2), relay_closed=relay == "1",
                export_wh=_wh(rest[0]) if rest else None,
            )
        case ["OK", "RELAY", "0" | "1" as v]:
            return RelayAck(v == "1")
        case ["OK", "PONG"]:
            return Pong()
        case ["ERR", reason]:
            return ErrorReply(reason[:40])
    raise ProtocolError("syntax", ",".join(fields)[:40])
