"""Events per second through the hub, as ratios against raw pyzmq in the same run.

Baseline: raw pyzmq PUB -> hub (XSUB/XPUB, CURVE) -> SUB, sending the same bytes our
envelopes encode to, counting frames. Against it:
  typed:    envelope.make + encode on the publisher, decode + validate on the subscriber;
  outbox:   Publisher.publish (durable outbox, group commit) -> decode + validate;
  applied:  Publisher.publish -> Subscriber applying each event exactly once (offset
            stored in a SQLite transaction per event).

The hub's cost of knowing who speaks, as a ratio against the hub as it was: libzmq's own
proxy (``zmq.proxy_steerable`` between the same XSUB/XPUB, CURVE on both sides; kept here
only, as the named baseline) and the hub that checks every message's topic against its
sender's key, each in a process of its own, fed by a publisher process sending the same
pre-encoded envelopes as fast as it can, read by a plain SUB here.

Run: python bench/bus.py [N]          (N events per path; the hub comparison sends 5 N)
     python bench/bus.py --hub-only [N]
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import pathlib
import sys
import tempfile
import threading
import time
import uuid

import zmq
import zmq.asyncio

from services.bus import Publisher, Security, Store, Subscriber, ensure_keys, envelope
from services.bus.events import MeterReading
from services.bus.hub import Hub


# --- the hub's identity check against libzmq's proxy ------------------------------------


class LibzmqProxyHub:
    """BASELINE (bench only): the hub before it checked identity, libzmq's proxy between
    the same XSUB/XPUB with the same CURVE setup and high-water marks."""

    def __init__(self, security: Security, *, pub_bind: str, sub_bind: str) -> None:
        self.security, self.pub_bind, self.sub_bind = security, pub_bind, sub_bind
        self.ctx = zmq.Context()
        self._ctl = f"inproc://bench-proxy-{uuid.uuid4().hex}"

    def start(self) -> tuple[str, str]:
        self.security.start(self.ctx)
        self.xsub, self.xpub = self.ctx.socket(zmq.XSUB), self.ctx.socket(zmq.XPUB)
        for sock, ep in ((self.xsub, self.pub_bind), (self.xpub, self.sub_bind)):
            sock.linger = 0
            sock.sndhwm = sock.rcvhwm = 200_000
            self.security.serve(sock, ep)
            sock.bind(ep)
        ctl = self.ctx.socket(zmq.PAIR)
        ctl.bind(self._ctl)
        self._ctl_sock = self.ctx.socket(zmq.PAIR)
        self._ctl_sock.connect(self._ctl)
        self._thread = threading.Thread(target=zmq.proxy_steerable, args=(self.xsub, self.xpub, None, ctl), daemon=True)
        self._thread.start()
        return self.xsub.last_endpoint.decode(), self.xpub.last_endpoint.decode()

    def stop(self) -> None:
        self._ctl_sock.send(b"TERMINATE")
        self._thread.join(5)
        for sock in (self._ctl_sock, self.xsub, self.xpub):
            sock.close(0)
        self.security.stop()
        self.ctx.term()


def _hub_process(kind: str, keys: pathlib.Path, endpoints: mp.Queue, stop: mp.Event) -> None:  # type: ignore[type-arg]
    cls = LibzmqProxyHub if kind == "libzmq" else Hub
    hub = cls(Security(keys, "market"), pub_bind="tcp://127.0.0.1:*", sub_bind="tcp://127.0.0.1:*")
    endpoints.put(hub.start())
    cpu = time.process_time()  # every thread of the hub: its loop and libzmq's (CURVE) I/O thread
    stop.wait()
    cpu = time.process_time() - cpu
    endpoints.put((cpu, dict(hub.drops) if isinstance(hub, Hub) else {}))
    hub.stop()


def _publisher_process(keys: pathlib.Path, hub_pub: str, n: int, go: mp.Event, done: mp.Event) -> None:  # type: ignore[type-arg]
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.sndhwm = 0  # nothing dropped on this side: the hub is what is measured
    pub.linger = 0
    Security(keys, "solar-1").connect_to(pub, hub_pub, "market")
    pub.connect(hub_pub)
    topic = b"meter.reading.solar-1"
    probe = [topic, b"probe"]
    while not go.is_set():  # until the subscriber has seen a probe
        pub.send_multipart(probe)
        go.wait(0.01)
    msgs = [envelope.encode(envelope.make(body(i), source="solar-1/meter", seq=i + 1)) for i in range(1000)]
    send = pub.send_multipart
    for i in range(n):
        send(msgs[i % 1000])
    done.wait(120)
    pub.close(0)
    ctx.term()


def hub_rate(kind: str, keys: pathlib.Path, n: int) -> tuple[float, int, float]:
    """Messages/s from a publisher process through a hub process to a SUB here, how many
    came through, and the hub process's CPU seconds per message."""
    mpc = mp.get_context("spawn")
    q, stop, go, done = mpc.Queue(), mpc.Event(), mpc.Event(), mpc.Event()
    hub = mpc.Process(target=_hub_process, args=(kind, keys, q, stop), daemon=True)
    hub.start()
    hub_pub, hub_sub = q.get(timeout=60)
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.rcvhwm = 0
    sub.linger = 0
    Security(keys, "home-7").connect_to(sub, hub_sub, "market")
    sub.subscribe(b"meter.reading")
    sub.connect(hub_sub)
    pub = mpc.Process(target=_publisher_process, args=(keys, hub_pub, n, go, done), daemon=True)
    pub.start()
    recv = sub.recv_multipart
    recv()  # a probe: the subscription has reached the publisher
    go.set()
    t0 = time.perf_counter()
    got = 0
    while got < n:
        if not sub.poll(10_000):
            break  # something was dropped: report what came through
        if recv()[1] != b"probe":
            got += 1
    dt = time.perf_counter() - t0
    done.set()
    pub.join(30)
    stop.set()
    cpu, drops = q.get(timeout=30)
    assert not drops, drops
    hub.join(30)
    sub.close(0)
    ctx.term()
    return got / dt, got, cpu / max(got, 1)


def hub_check_cost(n: int, repeat: int = 3) -> None:
    root = pathlib.Path(tempfile.mkdtemp())
    keys = root / "keys"
    for site in ("market", "solar-1", "home-7"):
        ensure_keys(keys, site)
    size = len(envelope.encode(envelope.make(body(0), source="solar-1/meter", seq=1))[1])
    best: dict[str, float] = {"libzmq": 0.0, "checked": 0.0}
    cpu: dict[str, float] = {"libzmq": float("inf"), "checked": float("inf")}
    for _ in range(repeat):  # alternating, the best of each: the least disturbed run on a shared machine
        for kind in best:
            rate, got, per_msg = hub_rate(kind, keys, n)
            if got < n:
                print(f"  ({kind}: only {got} of {n} came through)")
            best[kind] = max(best[kind], rate)
            cpu[kind] = min(cpu[kind], per_msg)
    base = best["libzmq"]
    print(f"{n} events of {size} bytes, publisher process -> hub process -> SUB, CURVE on, best of {repeat}")
    print(f"{'hub':48} {'events/s':>10} {'ratio':>7} {'hub CPU us/event':>17} {'ratio':>7}")
    for kind, name in (("libzmq", "libzmq proxy_steerable, no identity (baseline)"), ("checked", "identity-checking hub")):
        print(f"{name:48} {best[kind]:10,.0f} {best[kind] / base:7.3f} {cpu[kind] * 1e6:17.2f} "
              f"{cpu[kind] / cpu['libzmq']:7.2f}")


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
    args = [a for a in sys.argv[1:] if a != "--hub-only"]
    n = int(args[0]) if args else 20000
    if "--hub-only" not in sys.argv:
        asyncio.run(run(n))
        print()
    hub_check_cost(5 * n)
