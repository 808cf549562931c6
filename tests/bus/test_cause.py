"""Every envelope names its cause: the event a subscriber applied or the command a
request handler ran when it was published (envelope v2; v1 envelopes still decode)."""

from __future__ import annotations

import json

import pytest
import zmq.asyncio

from services.bus import DecodeError, Publisher, RpcClient, RpcServer, Store, Subscriber, envelope
from services.bus.commands import CancelOffer, Ok, Ping, Pong
from services.bus.events import OfferClosed

from tests.support.bus import Grid, reading
from tests.support.poll import until


def outbox(store: Store) -> list[envelope.Envelope]:
    return [envelope.decode_json(r[0]) for r in store.conn.execute("SELECT data FROM bus_outbox ORDER BY topic, seq")]


def test_a_v1_envelope_still_decodes_without_a_cause() -> None:
    v1 = {"v": 1, "type": "meter.reading", "id": "r-1", "source": "solar-1/meter", "seq": 1, "ts": 1.0,
          "body": reading(3).model_dump(mode="json")}
    env = envelope.decode([b"meter.reading.solar-1", json.dumps(v1).encode()])
    assert env.v == 1 and env.cause is None and env.body == reading(3)


def test_a_v2_envelope_carries_its_cause() -> None:
    env = envelope.make(reading(3), source="solar-1/meter", seq=1, cause="b-42")
    frames = envelope.encode(env)
    assert json.loads(frames[1])["v"] == envelope.PROTOCOL_MAJOR == 2
    back = envelope.decode(frames)
    assert back.cause == "b-42" and back == env
    assert envelope.decode(envelope.encode(envelope.make(reading(3), source="solar-1/meter", seq=1))).cause is None


def test_a_v1_decoder_refuses_v2_as_a_newer_major(monkeypatch: pytest.MonkeyPatch) -> None:
    frames = envelope.encode(envelope.make(reading(3), source="solar-1/meter", seq=1, cause="x"))
    monkeypatch.setattr(envelope, "PROTOCOL_MAJOR", 1)
    with pytest.raises(DecodeError) as e:
        envelope.decode(frames)
    assert e.value.cause == "version"


async def test_the_publisher_stamps_the_current_cause_unless_given(grid: Grid, actx, secure, tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = Store(tmp_path / "pub.sqlite")
    pub = Publisher(actx, secure("solar-1", actx), store, source="solar-1/meter", hub_pub=grid.hub_pub)
    await pub.start()  # the group-commit flusher: publish outside a transaction
    assert (await pub.publish(reading(1))).cause is None
    with envelope.caused_by("ev-1"):
        assert (await pub.publish(reading(2))).cause == "ev-1"
        assert (await pub.publish(reading(3), cause="other")).cause == "other"
        assert (await pub.publish(reading(4), cause=None)).cause is None
        async with store.atomic():
            assert pub.stage(reading(5)).cause == "ev-1"
    assert [e.cause for e in outbox(store)] == [None, "ev-1", "other", None, "ev-1"]
    await pub.stop()
    store.close()


async def test_what_a_subscriber_handler_publishes_names_the_applied_event(grid: Grid, actx: zmq.asyncio.Context,
                                                                         secure, tmp_path) -> None:  # type: ignore[no-untyped-def]
    mctx = zmq.asyncio.Context()  # one ZAP handler per context: the meter's site runs its own
    meter = Publisher(mctx, secure("solar-1", mctx), Store(tmp_path / "meter.sqlite"), source="solar-1/meter",
                      hub_pub=grid.hub_pub, heartbeat_s=0.2)
    store = Store(tmp_path / "market.sqlite")
    market = Publisher(actx, secure("market", actx), store, source="market/auction", hub_pub=grid.hub_pub,
                       heartbeat_s=0.2)
    applied: list[str] = []

    async def handler(env: envelope.Envelope, conn: object) -> None:
        applied.append(env.id)
        await market.publish(OfferClosed(offer_id=f"o-{env.body.energy_wh}", outcome="expired"))  # type: ignore[attr-defined]

    sub = Subscriber(actx, grid.security("market"), store, hub_sub=grid.hub_sub, prefixes=["meter.reading"],
                     handler=handler, name="market-sub")
    await market.start()
    await meter.start()
    await sub.start()
    await until(sub.connected.is_set)
    first = await meter.publish(reading(1))
    second = await meter.publish(reading(2))
    await until(lambda: len(applied) == 2)
    assert applied == [first.id, second.id]
    assert [(e.body.offer_id, e.cause) for e in outbox(store)] == [("o-1", first.id), ("o-2", second.id)]  # type: ignore[attr-defined]
    assert first.cause is None  # a meter reading from a timer has no cause
    assert envelope.current_cause.get() is None  # nothing leaks out of the handler
    await sub.stop()
    await meter.stop()
    await market.stop()
    mctx.destroy(0)


async def test_what_a_request_handler_publishes_names_the_command(grid: Grid, actx: zmq.asyncio.Context,
                                                                 secure, tmp_path) -> None:  # type: ignore[no-untyped-def]
    sec = secure("market", actx)
    store = Store(tmp_path / "srv.sqlite")
    pub = Publisher(actx, sec, store, source="market/auction", hub_pub=grid.hub_pub, heartbeat_s=0.2)
    srv = RpcServer(actx, sec, store, bind="tcp://127.0.0.1:*")

    async def cancel(req: CancelOffer, caller: object) -> Ok:  # in the command's transaction
        await pub.publish(OfferClosed(offer_id=req.offer_id, outcome="cancelled"))
        return Ok()

    async def ping(req: Ping, caller: object) -> Pong:  # read-only: no transaction, published through the flusher
        await pub.publish(OfferClosed(offer_id="ping", outcome="expired"))
        return Pong(node="market/test", uptime_s=1.0)

    srv.handle(CancelOffer, cancel)
    srv.handle(Ping, ping)
    await pub.start()
    await srv.start()
    client = RpcClient(actx, grid.security("home-7"), srv.endpoint)
    await client.request(CancelOffer(offer_id="o-9", seller="0x" + "ab" * 20), cmd_id="cmd-77")
    await client.request(Ping(), cmd_id="cmd-78")
    assert [(e.body.offer_id, e.cause) for e in outbox(store)] == [("o-9", "cmd-77"), ("ping", "cmd-78")]  # type: ignore[attr-defined]
    await client.close()
    await srv.stop()
    await pub.stop()
