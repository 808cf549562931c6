"""Events per second through the hub, as ratios against raw pyzmq in the same run.

Baseline: raw pyzmq PUB -> hub (XSUB/XPUB, CURVE) -> SUB, sending the same bytes our
envelopes encode to, counting frames. Against it:
  typed:    envelope.make + encode on the publisher, decode + validate on the subscriber;
  outbox:   Publisher.publish (durable outbox, group commit) -> decode + validate;
  applied:  Publisher.publish -> Subscriber applying each event exactly once (offset
            stored in a SQLite transaction per event).
Run: python bench/bus.py [N]
"""

from __future__ import annotations

import asyncio
import pathlib
import sys
import tempfile
import time

import zmq
import zmq.asyncio

from services.bus import Publisher, Security, Store, Subscriber, ensure_keys, envelope
from services.bus.events import MeterReading
from services.bus.hub import Hub


def body(i: int) -> MeterReading:
    return MeterReading(site="solar-1", meter="m1", role="producer", energy_wh=i, power_w=812.5, voltage_v=12.6,
                        current_a=64.5, relay_closed=True, soc=0.5)


async def drain(sock: zmq.asyncio.Socket, n: int, decode: bool) -> None:
    got = 0
    while got < n:
        frames = await sock.recv_multipart()
        if decode:
            envelope.decode(frames)
        got += 1


async def run(n: int) -> None:
    root = pathlib.Path(tempfile.mkdtemp())
    keys = root / "keys"
    for site in ("market", "solar-1", "home-7"):
        ensure_keys(keys, site)
    hub = Hub(Security(keys, "market"), pub_bind="tcp://127.0.0.1:*", sub_bind="tcp://127.0.0.1:*")
    hub_pub, hub_sub = hub.start()
    ctx = zmq.asyncio.Context()
    sec = Security(keys, "solar-1")
    sec.start(ctx)
    frames = [envelope.encode(envelope.make(body(i), source="solar-1/meter", seq=i + 1)) for i in range(n)]

    def sockets() -> tuple[zmq.asyncio.Socket, zmq.asyncio.Socket]:
        sub = ctx.socket(zmq.SUB)
        sub.rcvhwm = n * 2
        Security(keys, "home-7").connect_to(sub, hub_sub, "market")
        sub.subscribe(b"meter.reading")
        sub.connect(hub_sub)
        pub = ctx.socket(zmq.PUB)
        pub.sndhwm = n * 2
        sec.connect_to(pub, hub_pub, "market")
        pub.connect(hub_pub)
        return pub, sub

    async def settle(pub: zmq.asyncio.Socket, sub: zmq.asyncio.Socket) -> None:
        probe = envelope.encode(envelope.make(body(-0 + 1), source="solar-1/probe", seq=1))
        while True:  # wait until the subscription has reached the publisher
            await pub.send_multipart(probe)
            if await sub.poll(100):
                while await sub.poll(50):
                    await sub.recv_multipart()
                return

    results: dict[str, float] = {}

    async def raw(decode: bool, typed: bool) -> float:
        pub, sub = sockets()
        await settle(pub, sub)
        t0 = time.perf_counter()
        reader = asyncio.create_task(drain(sub, n, decode))
        for i in range(n):
            f = envelope.encode(envelope.make(body(i), source="solar-1/meter", seq=i + 1)) if typed else frames[i]
            await pub.send_multipart(f)
        await reader
        dt = time.perf_counter() - t0
        pub.close(0)
        sub.close(0)
        return n / dt

    results["raw pyzmq (baseline)"] = await raw(False, False)
    results["typed: encode + decode/validate"] = await raw(True, True)

    async def with_outbox(apply: bool) -> float:
        store = Store(root / f"pub-{apply}.sqlite")
        pub = Publisher(ctx, sec, store, source=f"solar-1/{'a' if apply else 'o'}", hub_pub=hub_pub, heartbeat_s=0.5)
        await pub.start()
        if apply:
            count = 0
            done = asyncio.Event()

            def handler(env: envelope.Envelope, conn: object) -> None:
                nonlocal count
                count += 1
                if count >= n:
                    done.set()

            sub = Subscriber(ctx, Security(keys, "home-7"), Store(root / "sub.sqlite"), hub_sub=hub_sub,
                             prefixes=["meter.reading"], handler=handler)
            await sub.start()
            await sub.connected.wait()
            t0 = time.perf_counter()
            for start in range(0, n, 500):
                await asyncio.gather(*(pub.publish(body(i)) for i in range(start, min(n, start + 500))))
            await asyncio.wait_for(done.wait(), 600)
            dt = time.perf_counter() - t0
            await sub.stop()
        else:
            raw_pub, sub_sock = sockets()
            raw_pub.close(0)
            await asyncio.sleep(0.5)
            t0 = time.perf_counter()
            reader = asyncio.create_task(drain(sub_sock, n, True))
            for start in range(0, n, 500):
                await asyncio.gather(*(pub.publish(body(i)) for i in range(start, min(n, start + 500))))
            await asyncio.wait_for(reader, 600)
            dt = time.perf_counter() - t0
            sub_sock.close(0)
        await pub.stop()
        store.close()
        return n / dt

    results["outbox publish -> decode/validate"] = await with_outbox(False)
    results["outbox publish -> exactly-once apply"] = await with_outbox(True)
    base = results["raw pyzmq (baseline)"]
    print(f"{n} events of {len(frames[0][1])} bytes through the hub (CURVE on), one run")
    print(f"{'path':40} {'events/s':>12} {'ratio to raw':>13}")
    for name, rate in results.items():
        print(f"{name:40} {rate:12,.0f} {rate / base:13.3f}")
    sec.stop()
    ctx.destroy(0)
    hub.stop()


if __name__ == "__main__":
    asyncio.run(run(int(sys.argv[1]) if len(sys.argv) > 1 else 20000))
