"""A hostile site as a process of its own: ``python -m tests.adversarial.hostile ATTACK SPEC``.

It holds one site's valid CURVE key (``--site``, default ``probe``, on the grid's
allow-list) and nothing else: it connects to the real hub and the real request servers
with that key, does what ``ATTACK`` says and prints what it got back as one JSON object on
stdout. ``SPEC`` is a JSON object:

- ``publish``: ``{"frames": [{"type", "source", "body", "topic_site"?}, ...]}`` publishes
  each event as ``source`` (under the topic of ``topic_site`` if given: the hub's check is
  on the topic). Seqs continue per (source, topic) across runs (``--state``), so what a
  subscriber refuses is refused by the policy, never skipped as a gap or a duplicate.
  Waits until the hub has passed it a subscription for every topic first.
- ``beat``: ``{"source", "node", "site", "last", "seconds", "every", "replay"?,
  "topic_site"?}`` sends heartbeats for ``seconds``; ``"replay": "silent"`` announces a
  replay endpoint of its own that takes requests and never answers, ``"dead"`` a port
  where nothing listens.
- ``rpc``: ``{"server": "chain"|"auction"|"wallet:<site>", "requests": [{"type", "body"}, ...]}``
  sends (to the market's operator, the auction or that site's wallet, ``--wallet-rpc``)
  each request in turn; prints each reply's code (or ``ok``) and how long it took. A
  request with ``"retry_on": [codes], "retry_s": s`` is sent again while it is refused with
  one of those codes, for at most ``s`` seconds (a site waiting for its deposit to be mined).

``--insecure`` connects without CURVE (``GRIDTRADE_INSECURE``): no key, no identity.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import socket
import sys
import time
from typing import Any

import zmq
import zmq.asyncio

from services.bus import RequestError, RequestTimeout, RpcClient, Security, envelope
from services.bus import commands as C
from services.bus import events as E


def _state(path: pathlib.Path | None) -> dict[str, int]:
    if path is None or not path.exists():
        return {}
    return dict(json.loads(path.read_text()))


def _save(path: pathlib.Path | None, state: dict[str, int]) -> None:
    if path is not None:
        path.write_text(json.dumps(state))


async def _xpub(ctx: zmq.asyncio.Context, sec: Security, hub_pub: str, hub_site: str) -> zmq.asyncio.Socket:
    """An XPUB on the hub's publisher side: like a PUB, but it sees the subscriptions."""
    sock = ctx.socket(zmq.XPUB)
    sock.linger = 3000
    sec.connect_to(sock, hub_pub, hub_site)
    sock.connect(hub_pub)
    return sock


async def _wait_subscribed(sock: zmq.asyncio.Socket, topics: list[bytes], timeout: float = 10.0) -> list[str]:
    """Read subscriptions until each topic matches one; returns the topics still unmatched."""
    subs: set[bytes] = set()
    deadline = time.monotonic() + timeout

    def missing() -> list[bytes]:
        return [t for t in topics if not any(t.startswith(s) for s in subs)]

    while missing() and (left := deadline - time.monotonic()) > 0:
        if await sock.poll(left * 1000):
            msg = await sock.recv()
            if msg[:1] == b"\x01":
                subs.add(msg[1:])
    return [t.decode() for t in missing()]


def _frames(spec: dict[str, Any], state: dict[str, int]) -> tuple[list[list[bytes]], list[str]]:
    out, ids = [], []
    for f in spec["frames"]:
        body = E.EVENTS[f["type"]].model_validate(f["body"])
        topic_site = f.get("topic_site") or f["source"].split("/", 1)[0]
        topic = envelope.topic_of(f["type"], topic_site)
        key = f"{f['source']}|{topic}"
        state[key] = seq = state.get(key, 0) + 1
        env = envelope.make(body, source=f["source"], seq=seq)
        out.append([topic.encode(), env.model_dump_json().encode()])
        ids.append(env.id)
    return out, ids


async def publish(ctx: zmq.asyncio.Context, sec: Security, a: argparse.Namespace, spec: dict[str, Any]) -> dict[str, Any]:
    state = _state(a.state)
    frames, ids = _frames(spec, state)
    sock = await _xpub(ctx, sec, a.hub_pub, a.hub_site)
    unmatched = await _wait_subscribed(sock, [f[0] for f in frames])
    for f in frames:
        await sock.send_multipart(f)
    _save(a.state, state)
    await asyncio.sleep(0.3)
    sock.close()
    return {"sent": len(frames), "ids": ids, "unsubscribed": unmatched}


async def beat(ctx: zmq.asyncio.Context, sec: Security, a: argparse.Namespace, spec: dict[str, Any]) -> dict[str, Any]:
    asked: list[dict[str, Any]] = []
    router = None
    replay = spec.get("replay_endpoint", "")
    tasks = []
    if spec.get("replay") == "silent":  # takes every request, answers none
        router = ctx.socket(zmq.ROUTER)
        router.linger = 0
        sec.serve(router, "tcp://127.0.0.1:*")
        router.bind("tcp://127.0.0.1:*")
        replay = router.last_endpoint.decode()

        async def swallow() -> None:
            while True:
                frames = await router.recv_multipart()
                asked.append(json.loads(frames[-1]))

        tasks.append(asyncio.create_task(swallow()))
    elif spec.get("replay") == "dead":  # a port where nothing listens
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            replay = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    topic = envelope.topic_of(E.Heartbeat.TYPE, spec.get("topic_site") or spec["source"].split("/", 1)[0])
    sock = await _xpub(ctx, sec, a.hub_pub, a.hub_site)
    unmatched = await _wait_subscribed(sock, [topic.encode()])
    hb = E.Heartbeat(node=spec["node"], replay=replay, site=spec["site"], last=spec["last"])
    n, end = 0, time.monotonic() + float(spec["seconds"])
    while time.monotonic() < end:
        n += 1
        env = envelope.make(hb, source=spec["source"], seq=n)
        await sock.send_multipart([topic.encode(), env.model_dump_json().encode()])
        await asyncio.sleep(float(spec.get("every", 0.2)))
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if router is not None:
        router.close(0)
    sock.close()
    return {"beats": n, "replay": replay, "replay_asked": len(asked), "unsubscribed": unmatched}


async def rpc(ctx: zmq.asyncio.Context, sec: Security, a: argparse.Namespace, spec: dict[str, Any]) -> dict[str, Any]:
    server = spec["server"]
    if server.startswith("wallet:"):  # a site's wallet serves with that site's key
        server_site = server.split(":", 1)[1]
        endpoint = dict(w.split("=", 1) for w in a.wallet_rpc)[server_site]
    else:
        server_site, endpoint = a.hub_site, a.chain_rpc if server == "chain" else a.auction_rpc
    client = RpcClient(ctx, sec, endpoint, server_site=server_site, timeout_s=float(spec.get("timeout", 20)))
    replies = []
    try:
        for r in spec["requests"]:
            req = C.REQUESTS[r["type"]].model_validate(r["body"])
            retry_on, until = set(r.get("retry_on", ())), time.monotonic() + float(r.get("retry_s", 0))
            while True:
                t0 = time.monotonic()
                try:
                    result = await client.request(req)
                    out = {"type": r["type"], "ok": True, "code": "ok",
                           "result": result.model_dump(mode="json") if hasattr(result, "model_dump") else None}
                except RequestError as e:
                    out = {"type": r["type"], "ok": False, "code": e.code, "message": e.message}
                except RequestTimeout as e:
                    out = {"type": r["type"], "ok": False, "code": "timeout", "message": str(e)}
                out["s"] = round(time.monotonic() - t0, 4)
                if out["code"] not in retry_on or time.monotonic() > until:
                    break
                await asyncio.sleep(0.3)  # e.g. a deposit not mined yet: the site tries again
            replies.append(out)
    finally:
        await client.close()
    return {"replies": replies}


async def main_async(a: argparse.Namespace) -> dict[str, Any]:
    spec = json.loads(a.spec)
    ctx = zmq.asyncio.Context()
    sec = Security(a.keys, a.site, insecure=a.insecure)
    sec.start(ctx)
    try:
        return await {"publish": publish, "beat": beat, "rpc": rpc}[a.attack](ctx, sec, a, spec)
    finally:
        sec.stop()
        ctx.destroy(linger=0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hostile", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("attack", choices=["publish", "beat", "rpc"])
    p.add_argument("spec", help="JSON: what to send (see above)")
    p.add_argument("--keys", type=pathlib.Path, required=True, help="the keys folder holding this site's key pair")
    p.add_argument("--site", default="probe")
    p.add_argument("--hub-pub", required=True)
    p.add_argument("--hub-site", default="market")
    p.add_argument("--chain-rpc", default="")
    p.add_argument("--auction-rpc", default="")
    p.add_argument("--wallet-rpc", action="append", default=[], metavar="SITE=ENDPOINT", help="a site's wallet")
    p.add_argument("--state", type=pathlib.Path, default=None, help="seqs per (source, topic), kept across runs")
    p.add_argument("--insecure", action="store_true", help="no CURVE: no key, no identity")
    a = p.parse_args(argv)
    out = asyncio.run(main_async(a))
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
