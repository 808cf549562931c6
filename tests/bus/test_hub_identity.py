"""The hub knows who speaks: a site's key may publish under its own topics only.

Real hubs on loopback, real CURVE keys (the ``grid`` fixture's), raw PUB/SUB sockets so
the tests send exactly the frames they mean."""

from __future__ import annotations

import asyncio
import logging

import pytest
import zmq
import zmq.asyncio

from services.bus import Security, envelope
from services.bus.hub import Hub

from tests.support.bus import Grid, reading
from tests.support.poll import until


def frames_of(site: str, topic_site: str | None = None) -> list[bytes]:
    """A valid meter reading of ``site``, under the topic of ``topic_site``."""
    env = envelope.make(reading(1, site=site), source=f"{site}/meter", seq=1)
    topic, data = envelope.encode(env)
    if topic_site is not None:
        topic = envelope.topic_of(env.type, topic_site).encode()
    return [topic, data]


@pytest.fixture
def hub(grid: Grid):  # type: ignore[no-untyped-def]
    """A hub of its own on the grid's keys, so the test can read its counts."""
    made: list[Hub] = []

    def make(insecure: bool = False) -> Hub:
        h = Hub(Security(grid.keys, "market", insecure=insecure), pub_bind="tcp://127.0.0.1:*",
                sub_bind="tcp://127.0.0.1:*")
        h.start()
        made.append(h)
        return h

    yield make
    for h in made:
        h.stop()


def connect(actx: zmq.asyncio.Context, grid: Grid, hub: Hub, site: str | None) -> tuple[zmq.asyncio.Socket, zmq.asyncio.Socket]:
    """A PUB with ``site``'s key and a SUB of everything (None: no CURVE)."""
    pub, sub = actx.socket(zmq.PUB), actx.socket(zmq.SUB)
    for s in (pub, sub):
        s.linger = 0
    if site is not None:
        grid.security(site).connect_to(pub, hub.endpoints[0], "market")
        grid.security("home-7").connect_to(sub, hub.endpoints[1], "market")
    sub.subscribe(b"")
    pub.connect(hub.endpoints[0])
    sub.connect(hub.endpoints[1])
    return pub, sub


async def joined(pub: zmq.asyncio.Socket, sub: zmq.asyncio.Socket, probe: list[bytes]) -> None:
    """Send ``probe`` until it comes through (the subscription has reached the publisher)."""
    for _ in range(200):
        await pub.send_multipart(probe)
        if await sub.poll(50):
            while await sub.poll(100):
                await sub.recv_multipart()
            return
    raise AssertionError("the subscription never reached the publisher")


async def received(sub: zmq.asyncio.Socket, wait_ms: int = 500) -> list[list[bytes]]:
    got = []
    while await sub.poll(wait_ms):
        got.append(await sub.recv_multipart())
    return got


async def test_a_site_publishes_under_its_own_topic_only(grid: Grid, hub, actx, caplog) -> None:  # type: ignore[no-untyped-def]
    h = hub()
    pub, sub = connect(actx, grid, h, "solar-1")
    own = frames_of("solar-1")
    await joined(pub, sub, own)
    forged = frames_of("home-7")  # solar-1's key, home-7's topic and source
    disguised = frames_of("solar-1", topic_site="home-7")  # home-7's topic over solar-1's envelope
    with caplog.at_level(logging.WARNING, logger="services.bus.hub"):
        for _ in range(3):
            await pub.send_multipart(forged)
            await pub.send_multipart(disguised)
            await pub.send_multipart([*own, b"third frame"])
            await pub.send_multipart(own[:1])
            await pub.send_multipart([b"meter", own[1]])  # a topic without a site
            await pub.send_multipart(own)
        got = await received(sub)
        await until(lambda: sum(h.drops.values()) >= 15)
    assert got == [own, own, own]
    assert dict(h.drops) == {("site", "solar-1"): 6, ("frames", "solar-1"): 6, ("no_site", "solar-1"): 3}
    warnings = [r for r in caplog.records if r.name == "services.bus.hub" and r.levelno == logging.WARNING]
    assert len(warnings) == 3  # once per (cause, site)
    assert h.forwarded >= 4  # the probe and the three own messages
    pub.close(0)
    sub.close(0)


async def test_each_site_is_checked_against_its_own_key(grid: Grid, hub, actx) -> None:  # type: ignore[no-untyped-def]
    h = hub()
    solar, sub = connect(actx, grid, h, "solar-1")
    home, sub2 = connect(actx, grid, h, "home-7")
    sub2.close(0)
    await joined(solar, sub, frames_of("solar-1"))
    await joined(home, sub, frames_of("home-7"))
    await home.send_multipart(frames_of("solar-1"))  # home-7 speaking for solar-1
    await home.send_multipart(frames_of("home-7"))
    await solar.send_multipart(frames_of("solar-1"))
    got = await received(sub)
    assert sorted(g[0] for g in got) == [b"meter.reading.home-7", b"meter.reading.solar-1"]
    await until(lambda: h.drops[("site", "home-7")] == 1)
    assert dict(h.drops) == {("site", "home-7"): 1}
    for s in (solar, home, sub):
        s.close(0)


async def test_an_insecure_hub_forwards_everything_and_says_so(grid: Grid, hub, actx, caplog) -> None:  # type: ignore[no-untyped-def]
    with caplog.at_level(logging.ERROR):
        h = hub(insecure=True)
    assert any("NO IDENTITY" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
    assert any("INSECURE" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
    pub, sub = connect(actx, grid, h, None)
    await joined(pub, sub, frames_of("solar-1"))
    sent = [frames_of("home-7"), frames_of("solar-1", topic_site="home-7"), [*frames_of("solar-1"), b"x"]]
    for f in sent:
        await pub.send_multipart(f)
    assert await received(sub) == sent
    assert not h.drops
    pub.close(0)
    sub.close(0)


async def test_the_hub_stops_promptly_while_messages_flow(grid: Grid, hub, actx) -> None:  # type: ignore[no-untyped-def]
    h = hub()
    pub, sub = connect(actx, grid, h, "solar-1")
    own = frames_of("solar-1")
    await joined(pub, sub, own)
    for _ in range(20_000):
        await pub.send_multipart(own)
    await asyncio.sleep(0.01)
    h.stop()  # returns once its thread has ended (the test's timeout bounds it)
    assert h._thread is None
    pub.close(0)
    sub.close(0)
