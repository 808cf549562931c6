"""``python -m services.simulate.host SPEC.json``: a site host, the wallet, meter and agent
services of many sites in one asyncio loop (the spec: :class:`services.simulate.plan.HostSpec`).

Each site's services are the ordinary service classes, each with its own settings: the
site's name (its CURVE key), its data folder ``<data>/<site>/``, its wallet's and agent's
request ports from the plan. What every service shares (the bus, the market's endpoints,
the tariffs) comes from the ``GRIDTRADE_*`` environment as for a service of its own. The
host answers ``/healthz`` on ``GRIDTRADE_METRICS_PORT`` (ready once the wallets and agents
are; the meters, and with them the sites' simulated clocks, start when the run says go:
:class:`Host`), and stops every service in order on SIGINT/SIGTERM: the agents, then the
meters (their relays open), then the wallets.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import pathlib
import signal
import sys
import time
from typing import Any

from aiohttp import web

from services.agent.config import AgentSettings
from services.agent.service import AgentService
from services.bus import Service
from services.bus.config import BusSettings
from services.bus.service import configure_logging, health_routes, tune_gc
from services.chain.config import ChainSettings
from services.chain.wallet import WalletService
from services.meter.config import MeterSettings
from services.meter.service import MeterService
from services.meter.sim import SimParams

from .plan import HostedSite, HostSpec

log = logging.getLogger(__name__)


def site_start(spec: HostSpec, now: float) -> float:
    """Where a site's simulated clock starts when its meter first starts at wall time ``now``
    (every site of the run on one clock; see :class:`HostSpec`)."""
    return spec.start.timestamp() + max(0.0, now - spec.epoch) * spec.time_scale if spec.epoch else \
        spec.start.timestamp()


def _own(site: HostedSite, data: pathlib.Path) -> dict[str, Any]:
    return {"site": site.name, "data_dir": data / site.name, "keys_dir": data / "keys", "metrics_port": 0}


def wallet_of(spec: HostSpec, site: HostedSite, data: pathlib.Path) -> WalletService:
    # a site's own transactions are few (a deposit, reservations for bids): looked after once a
    # second or less often (the run's pace) rather than five times, which many wallets in one loop feel
    return WalletService(ChainSettings(**_own(site, data), chain_role="site", chain_url=spec.chain_url,
                                       wallet_rpc=site.wallet_rpc, poll_s=spec.wallet_poll_s))


def agent_of(spec: HostSpec, site: HostedSite, data: pathlib.Path) -> AgentService:
    lim = site.limits
    return AgentService(AgentSettings(
        **_own(site, data), agent_bind=site.agent_rpc, agent_account=site.account, wallet_rpc=site.wallet_rpc,
        agent_market=spec.market, agent_battery_wh=site.battery_wh, agent_enabled=lim.enabled,
        agent_reserve_soc=lim.reserve_soc, agent_max_buy_wei_per_kwh=lim.max_buy_wei_per_kwh,
        agent_min_sell_wei_per_kwh=lim.min_sell_wei_per_kwh, agent_max_trade_wh=lim.max_trade_wh,
        agent_horizon_s=lim.horizon_s))


def meter_of(spec: HostSpec, site: HostedSite, data: pathlib.Path, now: float) -> MeterService:
    """The site's meter service, its simulated site's clock on the run's (a meter restarted
    goes on from its stored time)."""
    start = dt.datetime.fromtimestamp(site_start(spec, now), dt.timezone.utc)
    sim = SimParams.model_validate({**site.sim, "time_scale": spec.time_scale, "start": start})
    return MeterService(MeterSettings(**_own(site, data), role=site.role, account=site.account or None, sim=sim))


def go_path(data: pathlib.Path) -> pathlib.Path:
    """Where ``gridtrade simulate`` writes the wall time the sites' clocks start at."""
    return data / "hosts" / "go"


class Host:
    """The sites of one host: their wallets and agents start at once; their meters (and with
    them the simulated clocks) when the run says go (:func:`go_path`), once every account
    is in its agent's hands, so that the sites' day does not begin during the start-up."""

    def __init__(self, spec: HostSpec, data: pathlib.Path) -> None:
        self.spec, self.data = spec, data
        self.wallets = {s.name: wallet_of(spec, s, data) for s in spec.sites}
        self.agents = {s.name: agent_of(spec, s, data) for s in spec.sites}
        self.meters: dict[str, MeterService] = {}
        self.ready = False
        self.clock_started = False
        self.started_at = time.time()

    def build_meters(self, epoch: float, now: float) -> None:
        spec = self.spec.model_copy(update={"epoch": epoch})
        self.meters = {s.name: meter_of(spec, s, self.data, now) for s in self.spec.sites}

    def every(self) -> list[Service]:
        return [*self.wallets.values(), *self.meters.values(), *self.agents.values()]

    async def start(self) -> None:
        await asyncio.gather(*(s.start() for s in self.wallets.values()))
        await asyncio.gather(*(s.start() for s in self.agents.values()))
        self.ready = True

    async def start_clock(self) -> None:
        go = go_path(self.data)
        while not go.exists():
            await asyncio.sleep(0.2)
        self.build_meters(float(go.read_text().strip()), time.time())
        await asyncio.gather(*(s.start() for s in self.meters.values()))
        self.clock_started = True

    async def stop(self) -> None:
        self.ready = False
        for group in (self.agents, self.meters, self.wallets):
            await asyncio.gather(*(s.stop() for s in group.values()), return_exceptions=True)

    def close(self) -> None:
        """Close what services that never started hold (their stores and contexts)."""
        for svc in self.every():
            svc.store.close()
            svc.ctx.term()

    def health(self) -> dict[str, Any]:
        sites = {}
        for name in self.wallets:
            wallet, agent, meter = self.wallets[name], self.agents[name], self.meters.get(name)
            a = agent.health() if agent.ready else {}
            m = meter.health() if meter is not None and meter.ready else {}
            sites[name] = {"ready": wallet.ready and agent.ready, "agent": a.get("agent"),
                           "waiting_for": a.get("waiting_for"), "actions": a.get("actions"),
                           "meters": {k: {"trade": v.get("trade"), "failing": v.get("failing")}
                                      for k, v in m.get("meters", {}).items()}}
        return {"service": "site-host", "host": self.spec.name, "ready": self.ready,
                "clock_started": self.clock_started, "uptime_s": round(time.time() - self.started_at, 1),
                "sites": sites}


async def serve(spec: HostSpec, settings: BusSettings) -> None:
    host = Host(spec, spec.data)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):  # a second signal is ignored: stop is already set
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)

    app = web.Application()
    app.add_routes(health_routes(host.health))  # /healthz only: the sites' services keep their own metrics
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    if settings.metrics_port:
        await web.TCPSite(runner, settings.metrics_host, settings.metrics_port).start()
    clock: asyncio.Task[None] | None = None
    try:
        await host.start()
        log.info("%s: %d sites ready: %s", spec.name, len(host.wallets), ", ".join(host.wallets))
        clock = asyncio.create_task(host.start_clock(), name="site-host-clock")
        await stop.wait()
    finally:
        log.info("%s: stopping", spec.name)
        if clock is not None:
            clock.cancel()
            await asyncio.gather(clock, return_exceptions=True)
        await host.stop()
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m services.simulate.host SPEC.json", file=sys.stderr)
        return 2
    settings = BusSettings()
    configure_logging(settings.log_level)
    tune_gc()
    spec = HostSpec.model_validate_json(pathlib.Path(argv[0]).read_text())
    asyncio.run(serve(spec, settings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
