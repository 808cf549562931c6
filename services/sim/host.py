"""``python -m services.sim.host SPEC.json``: a site host, the wallet, meter and agent
services of many sites in one asyncio loop (the spec: :class:`services.sim.plan.HostSpec`).

Each site's services are the ordinary service classes, each with its own settings: the
site's name (its CURVE key), its data folder ``<data>/<site>/``, its wallet's and agent's
request ports from the plan. What every service shares (the bus, the market's endpoints,
the tariffs) comes from the ``GRIDTRADE_*`` environment as for a service of its own. The
host answers ``/healthz`` on ``GRIDTRADE_METRICS_PORT`` (ready once every service is), and
stops every service in order on SIGINT/SIGTERM: the agents, then the meters (their relays
open), then the wallets.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from services.bus.service import configure_logging
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


def services_of(spec: HostSpec, site: HostedSite, data: pathlib.Path, now: float) -> list[Service]:
    """A site's wallet, meter and agent (not started)."""
    import datetime as dt

    own: dict[str, Any] = {"site": site.name, "data_dir": data / site.name, "keys_dir": data / "keys",
                           "metrics_port": 0}
    # a site's own transactions are few (a deposit, reservations for bids): looked after once a
    # second rather than five times, which many wallets in one loop feel
    wallet = WalletService(ChainSettings(**own, chain_role="site", chain_url=spec.chain_url,
                                         wallet_rpc=site.wallet_rpc, poll_s=1.0))
    start = dt.datetime.fromtimestamp(site_start(spec, now), dt.timezone.utc)
    sim = SimParams.model_validate({**site.sim, "time_scale": spec.time_scale, "start": start})
    meter = MeterService(MeterSettings(**own, role=site.role, account=site.account or None, sim=sim))
    lim = site.limits
    agent = AgentService(AgentSettings(
        **own, agent_bind=site.agent_rpc, agent_account=site.account, wallet_rpc=site.wallet_rpc,
        agent_market=spec.market, agent_battery_wh=site.battery_wh, agent_enabled=lim.enabled,
        agent_reserve_soc=lim.reserve_soc, agent_max_buy_wei_per_kwh=lim.max_buy_wei_per_kwh,
        agent_min_sell_wei_per_kwh=lim.min_sell_wei_per_kwh, agent_max_trade_wh=lim.max_trade_wh,
        agent_horizon_s=lim.horizon_s))
    return [wallet, meter, agent]


class Host:
    def __init__(self, spec: HostSpec, data: pathlib.Path) -> None:
        self.spec = spec
        now = time.time()
        self.sites = {s.name: services_of(spec, s, data, now) for s in spec.sites}
        self.ready = False
        self.started_at = now

    def kind(self, i: int) -> list[Service]:
        return [svcs[i] for svcs in self.sites.values()]

    async def start(self) -> None:
        for i in range(3):  # the wallets, then the meters, then the agents
            await asyncio.gather(*(s.start() for s in self.kind(i)))
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        for i in (2, 1, 0):
            await asyncio.gather(*(s.stop() for s in self.kind(i)), return_exceptions=True)

    def health(self) -> dict[str, Any]:
        sites = {}
        for name, (wallet, meter, agent) in self.sites.items():
            a = agent.health() if agent.ready else {}
            m = meter.health() if meter.ready else {}
            sites[name] = {"ready": all(s.ready for s in (wallet, meter, agent)), "agent": a.get("agent"),
                           "waiting_for": a.get("waiting_for"), "actions": a.get("actions"),
                           "meters": {k: {"trade": v.get("trade"), "failing": v.get("failing")}
                                      for k, v in m.get("meters", {}).items()}}
        return {"service": "site-host", "host": self.spec.name, "ready": self.ready,
                "uptime_s": round(time.time() - self.started_at, 1), "sites": sites}


async def serve(spec: HostSpec, settings: BusSettings) -> None:
    host = Host(spec, spec.data)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):  # a second signal is ignored: stop is already set
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)

    async def healthz(_: web.Request) -> web.Response:
        h = host.health()
        return web.json_response(h, status=200 if h["ready"] else 503)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    if settings.metrics_port:
        await web.TCPSite(runner, settings.metrics_host, settings.metrics_port).start()
    try:
        await host.start()
        log.info("%s: %d sites ready: %s", spec.name, len(host.sites), ", ".join(host.sites))
        await stop.wait()
    finally:
        log.info("%s: stopping", spec.name)
        await host.stop()
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m services.sim.host SPEC.json", file=sys.stderr)
        return 2
    settings = BusSettings()
    configure_logging(settings.log_level)
    spec = HostSpec.model_validate_json(pathlib.Path(argv[0]).read_text())
    asyncio.run(serve(spec, settings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
