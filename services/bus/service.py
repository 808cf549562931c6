"""The small base every service stands on: settings, logging, signals, ordered shutdown,
the bus parts it asks for, and a ``/healthz`` + ``/metrics`` endpoint."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, ClassVar

import zmq.asyncio
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

from .config import BusSettings
from .errors import GridtradeError
from .keys import Security
from .store import Store
from .pubsub import Handler, Publisher, Subscriber
from .rpc import RpcClient, RpcServer

log = logging.getLogger(__name__)


def health_routes(health: Callable[[], dict[str, Any]], registry: CollectorRegistry | None = None,
                  refresh: Callable[[], None] | None = None) -> list[web.RouteDef]:
    """The ``/healthz`` route (``health()`` as JSON: 200 while it says ready, else 503) and,
    given a registry, ``/metrics`` (its samples in Prometheus' text format, ``refresh()``
    first): what every service serves, and what the gateway and a site host add to their apps."""

    async def healthz(_: web.Request) -> web.Response:
        h = health()
        return web.json_response(h, status=200 if h.get("ready") else 503)

    routes = [web.get("/healthz", healthz)]
    if registry is not None:
        async def metrics(_: web.Request) -> web.Response:
            if refresh is not None:
                refresh()
            return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

        routes.append(web.get("/metrics", metrics))
    return routes


def configure_logging(level: str = "INFO") -> None:
    """Only ``main()`` configures handlers; modules just use ``logging.getLogger``."""
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


class Service:
    """Subclasses set ``name``, override ``setup`` (ask for bus parts, spawn tasks) and
    optionally ``stopping`` (stop taking input) and ``health``."""

    name: ClassVar[str] = "service"

    def __init__(self, settings: BusSettings) -> None:
        self.settings = settings
        self.source = f"{settings.site}/{self.name}"
        self.ctx = zmq.asyncio.Context()
        self.security = Security(settings.keys, settings.site, insecure=settings.insecure)
        self.store = Store(settings.data_dir / f"{self.name}.sqlite")
        self.registry = CollectorRegistry()
        self.m_events = Counter("gridtrade_events_published", "events published", registry=self.registry)
        self.m_applied = Gauge("gridtrade_events_applied", "events applied by subscribers", registry=self.registry)
        self.m_dropped = Gauge("gridtrade_frames_dropped", "frames dropped", ["cause"], registry=self.registry)
        self.m_busy = Gauge("gridtrade_rpc_busy", "requests refused as busy, by calling site", ["site"],
                            registry=self.registry)
        self.m_up = Gauge("gridtrade_up", "1 while the service runs", registry=self.registry)
        self.pub: Publisher | None = None
        self.subscribers: list[Subscriber] = []
        self.servers: list[RpcServer] = []
        self.clients: list[RpcClient] = []
        self._tasks: list[asyncio.Task[Any]] = []
        self._stop = asyncio.Event()
        self._stopping = False
        self.started_at = time.time()
        self.ready = False
        self._runner: web.AppRunner | None = None  # /healthz and /metrics, when metrics_port is set

    # --- parts a subclass asks for in setup() ----------------------------------------

    def publisher(self) -> Publisher:
        if self.pub is None:
            s = self.settings
            self.pub = Publisher(self.ctx, self.security, self.store, source=self.source, hub_pub=s.hub_pub,
                                 hub_site=s.hub_site, replay_bind=s.replay_bind, advertise_host=s.replay_advertise,
                                 heartbeat_s=s.heartbeat_s, keep=s.outbox_keep)
        return self.pub

    def subscribe(self, prefixes: Iterable[str], handler: Handler, *, start: str = "earliest",
                  replayable: bool = False) -> Subscriber:
        """Apply the events of ``prefixes`` with ``handler`` in this service's store (see
        :class:`~.pubsub.Subscriber` for ``replayable``)."""
        sub = Subscriber(self.ctx, self.security, self.store, hub_sub=self.settings.hub_sub,
                         hub_site=self.settings.hub_site, prefixes=prefixes, handler=handler, start=start,
                         name=f"{self.source} sub", authority=self.settings.authority, replayable=replayable)
        self.subscribers.append(sub)
        return sub

    def serve(self, bind: str) -> RpcServer:
        s = self.settings
        srv = RpcServer(self.ctx, self.security, self.store, bind=bind, name=f"{self.source} rpc",
                        max_inflight_per_site=s.rpc_max_inflight_per_site, commands_keep_s=s.rpc_commands_keep_s)
        self.servers.append(srv)
        return srv

    def client(self, endpoint: str, server_site: str) -> RpcClient:
        c = RpcClient(self.ctx, self.security, endpoint, server_site=server_site,
                      timeout_s=self.settings.rpc_timeout_s)
        self.clients.append(c)
        return c

    def spawn(self, coro: Awaitable[Any], name: str = "") -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        if name:
            task.set_name(name)
        self._tasks.append(task)
        return task

    # --- hooks ------------------------------------------------------------------------

    async def setup(self) -> None:
        """Ask for bus parts and spawn background tasks here."""

    async def stopping(self) -> None:
        """Called first on shutdown: stop taking new input."""

    async def teardown(self) -> None:
        """Called after the bus parts stopped: close clients of other things."""

    def health(self) -> dict[str, Any]:
        return {
            "service": self.name, "site": self.settings.site, "ready": self.ready,
            "uptime_s": round(time.time() - self.started_at, 1),
            "published": self.pub.sent if self.pub else 0,
            "applied": sum(s.applied for s in self.subscribers),
            "handler_failures": sum(s.failed for s in self.subscribers),  # retried from the outbox
            "dropped": {c: n for s in self.subscribers for c, n in s.drops.counts.items()},
            "rpc": [s.endpoint for s in self.servers if s.endpoint],
            "rpc_busy": {site or "(no identity)": n for s in self.servers for site, n in s.busy.items()},
            "gc": {"threshold": list(gc.get_threshold()), "collections": [g["collections"] for g in gc.get_stats()]},
        }

    # --- lifecycle --------------------------------------------------------------------

    def request_stop(self) -> None:
        if self._stop.is_set():
            return  # a second signal is ignored: shutdown is already under way
        log.info("%s: stopping", self.source)
        self._stop.set()

    async def start(self) -> None:
        self.security.start(self.ctx)
        await self.setup()
        for srv in self.servers:
            await srv.start()
        if self.pub:
            await self.pub.start()
        for sub in self.subscribers:
            await sub.start()
        if self.settings.metrics_port:
            await self._start_http()
        self.ready = True
        self.m_up.set(1)
        log.info("%s: ready", self.source)

    async def stop(self) -> None:
        """Ordered: stop input, finish in-flight work, close sockets. Twice is harmless."""
        if self._stopping:
            return
        self._stopping = True
        self.ready = False
        with contextlib.suppress(Exception):
            await self.stopping()
        for sub in self.subscribers:
            await sub.stop()
        for srv in self.servers:
            await srv.stop()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.pub:
            await self.pub.stop()
        for c in self.clients:
            await c.close()
        with contextlib.suppress(Exception):
            await self.teardown()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self.security.stop()
        await asyncio.sleep(0)
        self.store.close()
        self.ctx.destroy(linger=0)  # closes a socket a part left open, where term() would wait for it for ever
        self.m_up.set(0)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)
        try:
            await self.start()
            await self._stop.wait()
        finally:
            await self.stop()

    def refresh_metrics(self) -> None:
        """The gauges that are read from the bus parts, brought up to date before ``/metrics``."""
        self.m_applied.set(sum(s.applied for s in self.subscribers))
        for s in self.subscribers:
            for cause, n in s.drops.counts.items():
                self.m_dropped.labels(cause).set(n)
        for srv in self.servers:
            for site, n in srv.busy.items():
                self.m_busy.labels(site or "(no identity)").set(n)

    async def _start_http(self) -> None:
        app = web.Application()
        app.add_routes(health_routes(self.health, self.registry, self.refresh_metrics))
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.settings.metrics_host, self.settings.metrics_port).start()


def service_main(cls: type[Service], settings: Callable[[], BusSettings], *, prog: str, description: str,
                 argv: list[str] | None = None) -> int:
    """The whole ``main()`` of a service configured by its environment alone: ``--help`` says
    ``description``; then :func:`run_service`."""
    argparse.ArgumentParser(prog=prog, description=description).parse_args(sys.argv[1:] if argv is None else argv)
    return run_service(cls, settings())


GC_THRESHOLD = (10_000, 20, 20)
"""The cyclic collector's thresholds in a service process. With Python's (700, 10, 10) a
subscriber applying events collected its whole heap every few thousand events: a fifth of
its CPU per event at 300 sites (``bench/scale.py``). Its garbage is short-lived and
acyclic (envelopes, rows), so collecting less often costs little memory."""


def tune_gc() -> None:
    """Set :data:`GC_THRESHOLD` for this process (every service's and site host's main)."""
    gc.set_threshold(*GC_THRESHOLD)


def run_service(cls: type[Service], settings: BusSettings) -> int:
    """Entry point for ``python -m services.<name>``: run until SIGINT/SIGTERM."""
    configure_logging(settings.log_level)
    tune_gc()
    try:
        asyncio.run(cls(settings).run())
    except GridtradeError as e:
        log.error("%s: %s", cls.name, e)
        return 2
    return 0
