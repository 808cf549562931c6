"""The wire, directly: one adapter, countable causes, additive changes within a major."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.bus import DecodeError, envelope
from services.bus.events import Delivery, Heartbeat


def frame(body: dict, **env: object) -> bytes:
    return json.dumps({"v": 1, "type": "meter.delivery", "id": "x", "source": "home-7/meter", "seq": 3, "ts": 1.0,
                       "body": body, **env}).encode()


DELIVERY = {"trade_id": "t-1", "site": "home-7", "meter": "main", "role": "consumer", "delivered_wh": 120}


def test_round_trip_keeps_the_typed_body() -> None:
    env = envelope.make(Delivery(**DELIVERY, final=True), source="home-7/meter", seq=7)
    back = envelope.decode(envelope.encode(env))
    assert back == env and isinstance(back.body, Delivery) and back.topic == "meter.delivery.home-7"


def test_fields_added_by_a_newer_minor_are_ignored_but_bad_values_are_not() -> None:
    env = envelope.decode_json(frame({**DELIVERY, "phase": "L2", "certified_by": "lab"}))
    assert env.body == Delivery(**DELIVERY)
    with pytest.raises(DecodeError) as e:  # an unknown field next to a bad value: still invalid
        envelope.decode_json(frame({**DELIVERY, "phase": "L2", "delivered_wh": -1}))
    assert e.value.cause == "invalid"
    with pytest.raises(DecodeError) as e:  # unknown envelope fields are not a body's business
        envelope.decode_json(frame(DELIVERY, extra="x"))
    assert e.value.cause == "invalid"
    with pytest.raises(DecodeError) as e:
        envelope.parse_body("meter.delivery", {**DELIVERY, "phase": "L2"})  # what we build stays strict
    assert e.value.cause == "invalid"


@given(st.binary(max_size=300))
def test_any_bytes_decode_or_raise_a_countable_cause(data: bytes) -> None:
    try:
        env = envelope.decode_json(data)
    except DecodeError as e:
        assert e.cause in {"garbage", "invalid", "unknown_type", "version"}
    else:  # the rare bytes that are a valid envelope survive a round trip
        assert envelope.decode_json(env.model_dump_json()) == env


def test_a_heartbeat_is_decoded_once_per_process_whatever_the_number_of_subscribers() -> None:
    """Every subscriber gets every source's heartbeat each second: a process hosting many
    sites' services (a simulation's site host) would decode the same frames once per
    subscriber, O(sites^2) on the machine. The same heartbeat frames give the same (frozen)
    envelope; events and a changed byte are decoded anew, and a bad frame is never kept."""
    beat = envelope.make(Heartbeat(node="n-1", replay="tcp://127.0.0.1:1", site="home-7",
                                   last={"meter.delivery.home-7": 3}), source="home-7/meter", seq=9)
    frames = envelope.encode(beat)
    first = envelope.decode(frames)
    assert first == beat and envelope.decode(list(frames)) is first
    again = envelope.encode(envelope.make(beat.body, source="home-7/meter", seq=10))
    assert envelope.decode(again) is not first and envelope.decode(again).seq == 10
    ev = envelope.encode(envelope.make(Delivery(**DELIVERY), source="home-7/meter", seq=7))
    assert envelope.decode(ev) is not envelope.decode(ev)  # a handler's event is its own
    with pytest.raises(DecodeError):  # the same envelope under another site's topic: still refused
        envelope.decode([b"bus.heartbeat.solar-1", frames[1]])
    bad = [frames[0], frames[1].replace(b'"seq":9', b'"seq":0')]
    for _ in range(2):
        with pytest.raises(DecodeError):
            envelope.decode(bad)
    many = [envelope.encode(envelope.make(beat.body, source="home-7/meter", seq=s)) for s in range(11, 11 + 5000)]
    for f in many:
        envelope.decode(f)
    assert envelope.decode(frames) is not first  # bounded: the oldest are forgotten
