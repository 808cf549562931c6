"""``gridtrade``: one command for every part.

    gridtrade up                      the whole demo on this machine
    gridtrade simulate SCENARIO       a scenario of many sites on the real services, then its report
    gridtrade keys [--site S ...]     create CURVE key pairs (and allow them)
    gridtrade bus hub                 run the hub (XSUB/XPUB proxy)
    gridtrade bus tail [PREFIX ...]   print events as JSON lines (with their cause)
    gridtrade bus tail --follow ID    only what ID (an event or command id) led to
    gridtrade bus publish TYPE JSON   publish one event (validated)
    gridtrade meter|auction|chain|gateway|agent [...]   run a service
    gridtrade account new|list|import [...]       keystore accounts
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import signal
import sys
from typing import Any

SERVICES = ("meter", "auction", "chain", "gateway", "agent")


def _keys(argv: list[str]) -> int:
    from services.bus import BusSettings, ensure_keys

    settings = BusSettings()
    p = argparse.ArgumentParser(prog="gridtrade keys", description="Create CURVE key pairs and put their public "
                                "keys on the allow-list (existing keys are kept).")
    p.add_argument("--site", action="append", help="site name (repeatable); default GRIDTRADE_SITE")
    p.add_argument("--keys-dir", default=str(settings.keys), help="default: GRIDTRADE_KEYS_DIR or <data_dir>/keys")
    a = p.parse_args(argv)
    import pathlib

    for site in a.site or [settings.site]:
        secret = ensure_keys(pathlib.Path(a.keys_dir), site)
        print(f"{site}: {secret.with_suffix('.key')} (public), {secret} (secret)")
    return 0


class Follow:
    """The events one id led to: an event whose ``id`` is followed, or whose ``cause`` is,
    is shown and followed in turn. Events may arrive before their cause (replays come topic
    by topic), so an event with an unknown cause waits (a bounded number of them) until
    its cause turns up."""

    WAITING_MAX = 50_000

    def __init__(self, root: str) -> None:
        self.ids = {root}
        self.waiting: dict[str, list[Any]] = {}
        self.n_waiting = 0

    def feed(self, env: Any) -> list[Any]:
        """The events to show now, in the order they became known to be followed."""
        if env.id not in self.ids and env.cause not in self.ids:
            if env.cause:
                if self.n_waiting >= self.WAITING_MAX:  # forget the oldest causes first
                    self.n_waiting -= len(self.waiting.pop(next(iter(self.waiting))))
                self.waiting.setdefault(env.cause, []).append(env)
                self.n_waiting += 1
            return []
        out, todo = [], [env]
        while todo:
            e = todo.pop(0)
            self.ids.add(e.id)
            out.append(e)
            more = self.waiting.pop(e.id, [])
            self.n_waiting -= len(more)
            todo.extend(more)
        return out


async def _tail(prefixes: list[str], count: int | None, follow: str | None = None) -> None:
    import zmq.asyncio

    from services.bus import BusSettings, Security, Store, Subscriber

    s = BusSettings()
    ctx = zmq.asyncio.Context()
    seen = 0
    done = asyncio.Event()
    chain = Follow(follow) if follow else None

    def show(env: Any, _conn: Any) -> None:
        nonlocal seen
        for e in chain.feed(env) if chain is not None else [env]:
            print(e.model_dump_json(), flush=True)
            seen += 1
            if count is not None and seen >= count:
                done.set()

    sub = Subscriber(ctx, Security(s.keys, s.site, insecure=s.insecure), Store(":memory:"), hub_sub=s.hub_sub,
                     hub_site=s.hub_site, prefixes=prefixes or [""], handler=show, start="latest", name="tail",
                     authority=s.authority)
    if chain is not None:  # also what the publishers still keep from before (the "latest" look-back)
        sub.since = 0.0
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, done.set)
    await sub.start()
    try:
        await done.wait()
    finally:
        await sub.stop()
        ctx.destroy(0)


async def _publish(type_: str, body_json: str) -> int:
    import zmq.asyncio

    from services.bus import BusSettings, DecodeError, Publisher, Security, Store
    from services.bus.envelope import parse_body

    s = BusSettings()
    try:
        body = parse_body(type_, body_json)
    except DecodeError as e:
        print(f"gridtrade bus publish: {e}", file=sys.stderr)
        return 2
    from services.bus.events import permitted

    if not permitted(body, f"{s.site}/cli", s.authority):
        print(f"gridtrade bus publish: warning: subscribers drop {type_} from {s.site}/cli (its publish policy is "
              f"{body.ORIGIN.name}; see services/bus/events.py)", file=sys.stderr)
    ctx = zmq.asyncio.Context()
    sec = Security(s.keys, s.site, insecure=s.insecure)
    sec.start(ctx)
    pub = Publisher(ctx, sec, Store(s.data_dir / "cli.sqlite"), source=f"{s.site}/cli", hub_pub=s.hub_pub,
                    hub_site=s.hub_site, replay_bind=s.replay_bind, heartbeat_s=s.heartbeat_s)
    await pub.start()
    env = await pub.publish(body)
    print(env.model_dump_json(), flush=True)
    await asyncio.sleep(2 * s.heartbeat_s + 1)  # stay for subscribers that replay it
    await pub.stop()
    sec.stop()
    pub.store.close()
    ctx.destroy(0)
    return 0


def _bus(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="gridtrade bus", description="The bus: run the hub, watch it, publish to it.")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("hub", help="run the hub (XSUB/XPUB proxy)", add_help=False)
    t = sub.add_parser("tail", help="print events as JSON lines")
    t.add_argument("prefix", nargs="*", help="topic prefixes, e.g. meter.reading or trade.")
    t.add_argument("--count", type=int, help="exit after this many events")
    t.add_argument("--follow", metavar="ID", help="only the event ID (or the command ID) and what it led to, "
                   "cause by cause (e.g. a reading, then its mint; a bid, then its trade, settlements and close)")
    pb = sub.add_parser("publish", help="publish one event, validated against its model")
    pb.add_argument("type", help="event type, e.g. meter.energy_produced")
    pb.add_argument("json", help="the event body as JSON")
    if argv[:1] == ["hub"]:
        from services.bus.__main__ import main as hub_main

        return hub_main(argv[1:])
    a = p.parse_args(argv)
    if a.cmd == "tail":
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_tail(a.prefix, a.count, a.follow))
        return 0
    return asyncio.run(_publish(a.type, a.json))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "bus":
        return _bus(rest)
    if cmd == "keys":
        return _keys(rest)
    if cmd in SERVICES:
        return int(importlib.import_module(f"services.{cmd}.__main__").main(rest) or 0)
    if cmd == "account":
        return int(importlib.import_module("services.chain.__main__").main(["account", *rest]) or 0)
    if cmd == "up":
        return int(importlib.import_module("services.launcher").main(rest) or 0)
    if cmd == "simulate":
        return int(importlib.import_module("services.simulate.run").main(rest) or 0)
    print(f"gridtrade: unknown command {cmd!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
