"""The line protocol and the PZEM-017 register map: round trips and rejections."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.meter import lineproto as lp
from services.meter import registers as rg
from services.meter.errors import ProtocolError
from services.meter.physics import Counters

counters = st.builds(
    Counters,
    energy_wh=st.integers(0, 2**32 - 1),
    power_w=st.integers(0, 10**6).map(lambda x: x / 10),
    voltage_v=st.integers(0, 65535).map(lambda x: x / 100),
    current_a=st.integers(0, 65535).map(lambda x: x / 100),
    relay_closed=st.booleans(),
    export_wh=st.none() | st.integers(0, 2**32 - 1),
)


def test_checksum_matches_nmea_examples() -> None:
    # the XOR of "READ" is 0x52^0x45^0x41^0x44
    assert lp.checksum(b"READ") == 0x52 ^ 0x45 ^ 0x41 ^ 0x44
    assert lp.encode_read() == b"$READ*%02X\n" % (0x52 ^ 0x45 ^ 0x41 ^ 0x44)
    # a well-known NMEA sentence
    assert lp.checksum(b"GPGLL,5300.97914,N,00259.98174,E,125926,A") == 0x28


@given(counters)
def test_reading_round_trip(c: Counters) -> None:
    assert lp.decode_reply(lp.encode_reading(c)) == c


@given(st.booleans())
def test_requests_round_trip(closed: bool) -> None:
    assert lp.decode_request(lp.encode_relay(closed)) == lp.RelayRequest(closed)
    assert lp.decode_request(lp.encode_read()) == lp.ReadRequest()
    assert lp.decode_request(lp.encode_ping()) == lp.PingRequest()
    assert lp.decode_reply(lp.encode_relay_ack(closed)) == lp.RelayAck(closed)
    assert lp.decode_reply(lp.encode_error("checksum")) == lp.ErrorReply("checksum")


def test_noise_before_the_dollar_is_skipped_and_crlf_accepted() -> None:
    assert lp.decode_request(b"\x00\xff garbage " + lp.encode_read().replace(b"\n", b"\r\n")) == lp.ReadRequest()
    assert lp.decode_request(lp.encode_read().lower().replace(b"read", b"READ")) == lp.ReadRequest()


@pytest.mark.parametrize(("line", "reason"), [
    (b"READ*1F\n", "framing"),
    (b"$READ\n", "framing"),
    (b"$READ*ZZ\n", "framing"),
    (b"$READ*00\n", "checksum"),
    (b"$" + b"A" * 200 + b"*00\n", "too_long"),
    (lp.frame("FOO"), "unknown"),
    (lp.frame("RELAY", "2"), "syntax"),
    (lp.frame("READ", "x"), "syntax"),
])
def test_bad_requests_are_rejected_with_a_reason(line: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError) as e:
        lp.decode_request(line)
    assert e.value.reason == reason


@pytest.mark.parametrize("fields", [
    ("R", "12", "1.0", "12.00", "1.00"),  # short
    ("R", "12", "1.0", "12.00", "1.00", "2"),  # bad relay
    ("R", "-1", "1.0", "12.00", "1.00", "1"),  # negative counter
    ("R", "12", "1.00", "12.00", "1.00", "1"),  # wrong resolution
    ("R", "12", "nan", "12.00", "1.00", "1"),
    ("R", "12", "1.0", "12.00", "1.00", "1", "5", "6"),  # too long
    ("R", str(2**63), "1.0", "12.00", "1.00", "1"),
    ("OK", "RELAY"),
    ("WHAT",),
])
def test_bad_replies_are_rejected(fields: tuple[str, ...]) -> None:
    with pytest.raises(ProtocolError):
        lp.decode_reply(lp.frame(*fields))


@given(st.binary(max_size=200))
def test_random_bytes_never_decode_to_anything_but_protocol_errors(data: bytes) -> None:
    try:
        lp.decode_reply(data)
    except ProtocolError:
        pass


@given(counters)
def test_registers_round_trip(c: Counters) -> None:
    regs = rg.encode_counters(c, export=c.export_wh is not None)
    assert len(regs) == (10 if c.export_wh is not None else 8)
    assert all(0 <= r <= 0xFFFF for r in regs)
    out, _alarms = rg.decode_counters(regs, c.relay_closed)
    assert out == c


def test_registers_are_low_word_first() -> None:
    c = Counters(energy_wh=0x00012345, power_w=0x00010002 / 10, voltage_v=12.34, current_a=5.67, relay_closed=False)
    regs = rg.encode_counters(c, export=False)
    assert regs[:6] == [1234, 567, 0x0002, 0x0001, 0x2345, 0x0001]
    assert regs[6:] == [0, 0]


def test_alarms_follow_the_thresholds() -> None:
    low = Counters(energy_wh=0, power_w=0, voltage_v=10.5, current_a=0, relay_closed=False)
    regs = rg.encode_counters(low, export=False)
    assert rg.decode_counters(regs, False)[1] == {"high_voltage": False, "low_voltage": True}


@pytest.mark.parametrize("regs", [[0] * 7, [0] * 9, [0, 0, 0, 0, 0, 0, 5, 0], [0, 0, 0, 0, 0, 0x10000, 0, 0]])
def test_bad_register_blocks_are_rejected(regs: list[int]) -> None:
    with pytest.raises(ProtocolError):
        rg.decode_counters(regs, False)
