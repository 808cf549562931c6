"""The bus as the tests see it: a real hub on random loopback ports with CURVE keys
(:class:`Grid`), events published as the source each one's policy allows, with that
site's own key (:class:`Sources`), and :class:`BusProbe`, a real subscriber that records
what it hears and publishes through :class:`Sources`."""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq.asyncio

from services.bus import BusSettings, Publisher, Security, Store, Subscriber
from services.bus.envelope import Envelope
from services.bus.events import Authority, MeterReading, Message, Origin

from .poll import until

SITES = ("market", "solar-1", "home-7", "probe", "tester")
"""The sites with CURVE keys on the ``grid`` fixture's hub."""


def reading(wh: int, site: str = "solar-1") -> MeterReading:
    """A reading of ``site``'s meter (its counter at ``wh``): the event the bus tests send."""
    return MeterReading(site=site, meter="m1", role="producer", energy_wh=wh, power_w=1.0, voltage_v=12.0,
                        current_a=0.1, relay_closed=False)


@dataclass
class Grid:
    """A real hub on random loopback ports, with CURVE keys for a few sites."""

    keys: pathlib.Path
    hub_pub: str
    hub_sub: str
    root: pathlib.Path

    def settings(self, site: str, **kw: object) -> BusSettings:
        return BusSettings(site=site, data_dir=self.root / site, keys_dir=self.keys, hub_pub=self.hub_pub,
                           hub_sub=self.hub_sub, heartbeat_s=0.2, **kw)  # type: ignore[arg-type]

    def security(self, site: str) -> Security:
        return Security(self.keys, site)

    def env(self, site: str) -> dict[str, str]:
        return {"GRIDTRADE_SITE": site, "GRIDTRADE_DATA_DIR": str(self.root / site),
                "GRIDTRADE_KEYS_DIR": str(self.keys), "GRIDTRADE_HUB_PUB": self.hub_pub,
                "GRIDTRADE_HUB_SUB": self.hub_sub, "GRIDTRADE_HEARTBEAT_S": "0.2"}


def raw_socket(actx: zmq.asyncio.Context, grid: Grid, site: str, kind: int, endpoint: str,
               server: str = "market") -> zmq.asyncio.Socket:
    """A bare socket of ``kind`` with ``site``'s CURVE key, connected to ``endpoint`` (served
    with ``server``'s key), linger 0: for frames no typed client would send."""
    sock = actx.socket(kind)
    sock.linger = 0
    grid.security(site).connect_to(sock, endpoint, server)
    sock.connect(endpoint)
    return sock


class Sources:
    """Publishes each event as the source its publish policy allows, with that site's own
    key: meter events as ``<body.site>/meter``, market and trade events as the market's
    auction, chain events as the market's chain service (one publisher per source, made
    on first use). ``publish(body, source=...)`` publishes as any source instead."""

    def __init__(self, grid: Grid, root: pathlib.Path, authority: Authority = Authority()) -> None:
        self.grid, self.root, self.authority = grid, root, authority
        self.pubs: dict[str, tuple[zmq.asyncio.Context, Security, Publisher]] = {}

    def source_of(self, body: Message) -> str:
        if body.ORIGIN is Origin.SITE_NAMED:
            return f"{body.site}/meter"  # type: ignore[attr-defined]
        if body.ORIGIN is Origin.AUCTION:
            return self.authority.auction
        if body.ORIGIN is Origin.CHAIN:
            return self.authority.chain
        raise ValueError(f"no proper source for {body.TYPE}")

    async def publisher(self, source: str) -> Publisher:
        if source not in self.pubs:
            ctx = zmq.asyncio.Context()  # one ZAP authenticator per context: one context per site key
            sec = self.grid.security(source.split("/", 1)[0])
            sec.start(ctx)
            store = Store(self.root / f"pub-{source.replace('/', '-')}.sqlite")
            pub = Publisher(ctx, sec, store, source=source, hub_pub=self.grid.hub_pub, heartbeat_s=0.2)
            await pub.start()
            self.pubs[source] = (ctx, sec, pub)
        return self.pubs[source][2]

    async def publish(self, body: Message, source: str | None = None) -> object:
        return await (await self.publisher(source or self.source_of(body))).publish(body)

    async def stop(self) -> None:
        for ctx, sec, pub in self.pubs.values():
            await pub.stop()
            pub.store.close()
            sec.stop()
            ctx.destroy(linger=0)
        self.pubs.clear()


class Applied:
    """A subscriber's state under test: its handler writes each event it applies into the
    subscriber's own ``store``, in the bus transaction, so what was applied exactly once is
    what the rows show (unlike :class:`BusProbe`, which records in memory)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        store.conn.execute("CREATE TABLE IF NOT EXISTS applied (source TEXT, type TEXT, seq INTEGER, wh INTEGER)")

    def handler(self, env: Envelope, conn: Any) -> None:
        conn.execute("INSERT INTO applied VALUES (?, ?, ?, ?)",
                     (env.source, env.type, env.seq, getattr(env.body, "energy_wh", None)))

    def rows(self) -> list[tuple[str, str, int]]:
        """(source, type, seq) of each event applied, in order."""
        return list(self.store.conn.execute("SELECT source, type, seq FROM applied ORDER BY rowid"))

    def of(self, source: str) -> list[tuple[str, int]]:
        """(type, seq) of each event of ``source`` applied, in order."""
        return [(t, q) for s, t, q in self.rows() if s == source]

    def seqs(self, source: str) -> list[int]:
        return [q for _, q in self.of(source)]

    def subscriber(self, actx: zmq.asyncio.Context, grid: Grid, prefixes: list[str] | None = None) -> Subscriber:
        """home-7's subscriber on ``grid``'s hub (to ``meter.reading`` unless ``prefixes``),
        applying what it hears into this store; not started."""
        return Subscriber(actx, grid.security("home-7"), self.store, hub_sub=grid.hub_sub,
                          prefixes=prefixes or ["meter.reading"], handler=self.handler)

    def values(self) -> list[int]:
        """The ``energy_wh`` of each reading applied, in order."""
        return [r[0] for r in self.store.conn.execute("SELECT wh FROM applied ORDER BY rowid")]


class BusProbe:
    """A test's ear and mouth on the bus: a real subscriber with ``site``'s key that records
    every event it applies under ``prefixes`` (``events``: the envelopes, in order), and
    :class:`Sources` that publish each event as its proper source (``publish``).

    ``of(kind, **match)`` are the bodies of one type (``kind``: the type's name, e.g.
    ``"meter.delivery"``, or its class) whose fields equal ``match``; ``changed`` is set
    at each event; ``on_event`` (if set) is called with each envelope as it is applied."""

    def __init__(self, grid: Grid, root: pathlib.Path, *, site: str, prefixes: list[str] | tuple[str, ...],
                 name: str = "probe", speaks_as: tuple[str, ...] = (), wait_connected: bool = True) -> None:
        """``grid``: the hub's addresses and keys (``hub_pub`` is only needed to publish).
        ``speaks_as``: sources whose publishers start with the probe (the others start when
        first used). ``wait_connected``: ``start`` returns once the subscription is live,
        which the probe knows from the first heartbeat it hears: from a service already on
        the bus, or from one of its own publishers."""
        self.grid, self.root, self.site = grid, root, site
        self.speaks_as, self.wait_connected = speaks_as, wait_connected
        root.mkdir(parents=True, exist_ok=True)
        self.events: list[Envelope] = []
        self.changed = asyncio.Event()
        self.on_event: Callable[[Envelope], None] | None = None
        self.ctx = zmq.asyncio.Context()
        self.security = grid.security(site)
        self.store = Store(root / f"{name}-sub.sqlite")
        self.sub = Subscriber(self.ctx, self.security, self.store, hub_sub=grid.hub_sub, prefixes=list(prefixes),
                              handler=self._handle, name=name)
        self.sources = Sources(grid, root)
        self.started = False

    def _handle(self, env: Envelope, conn: object) -> None:
        self.events.append(env)
        if self.on_event is not None:
            self.on_event(env)
        self.changed.set()

    async def start(self, timeout: float = 60) -> BusProbe:
        """Subscribe and start the publishers of ``speaks_as``; wait until the subscription is
        live (if ``wait_connected``)."""
        self.security.start(self.ctx)  # one ZAP authenticator per context: the probe's own
        self.started = True
        await self.sub.start()
        for source in self.speaks_as:
            await self.sources.publisher(source)
        if self.wait_connected:
            await until(self.sub.connected.is_set, what=f"the {self.site} probe to hear a heartbeat",
                        timeout=timeout)
        return self

    async def stop(self) -> None:
        """Stop what was started and close the rest (a probe never started too)."""
        if self.started:
            await self.sub.stop()
        await self.sources.stop()
        if self.started:
            self.security.stop()
        self.store.close()
        self.ctx.destroy(linger=0)

    async def publish(self, body: Message, source: str | None = None) -> object:
        return await self.sources.publish(body, source)

    def bodies(self) -> list[Any]:
        return [e.body for e in self.events]

    def of(self, kind: str | type, **match: Any) -> list[Any]:
        return [e.body for e in self.events
                if (e.type == kind if isinstance(kind, str) else isinstance(e.body, kind))
                and all(getattr(e.body, k) == v for k, v in match.items())]

    async def wait_for(self, pred: Callable[[], Any], timeout: float = 60, what: str = "events") -> Any:
        """Until ``pred()`` is truthy (polled); returns its result."""
        return await until(pred, what=what, timeout=timeout)
