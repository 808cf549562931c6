"""A scenario as processes (pure: the plan is data; :mod:`services.simulate.run` runs it).

The market is ``gridtrade up``'s (:class:`services.launcher.Planner`: the hub, anvil, the
operator's chain service, the auction) and so is the utility (its wallet, meters and agent,
:func:`services.launcher.add_utility`). The sites are hosted: a *site host* process
(:mod:`services.simulate.host`) runs the wallet, meter and agent services of up to
``per_host`` sites in one asyncio loop. Each site keeps its own CURVE key (its name), its
own data folder ``<data>/<site>/`` (keystore, stores, meter keys) and its own request
ports, all fixed by the plan so that a restarted host is found where it was.

Ports from the base port ``p``: the demo's (``p`` .. ``p + 45``: the bus, the market, the
utility, anvil at ``p + 45``), the hosts' ``/healthz`` at ``p + 50 + k``, and site ``i``'s
wallet at ``p + 100 + 2i`` and agent at ``p + 101 + 2i``: a block of
:func:`ports_needed` ports.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import pathlib

from pydantic import BaseModel, ConfigDict, Field

from services import launcher
from services.bus import commands as cmd

from .scenario import Scenario, site_spec

HOST_HEALTH = 50
SITE_PORTS = 100
MAX_HOSTS = SITE_PORTS - HOST_HEALTH
SCRYPT_N = 2**14  # the sim's own throw-away accounts and meter keys: encrypted, with less work than a real site's


class SimOptions(BaseModel):
    """How a scenario is run (besides the launcher's :class:`~services.launcher.Options`)."""

    model_config = ConfigDict(frozen=True)
    days: float = Field(default=1.0, gt=0, le=366)
    per_host: int = Field(default=10, ge=1, le=500, description="sites per site host process")
    agent_every_s: float | None = Field(default=None, gt=0, description="wall seconds between two decisions of an "
                                        "agent (default 3 x pace)")
    offer_duration_s: int | None = Field(default=None, gt=0, description="an agent's english auction (wall s; "
                                         "default 10 x pace)")
    clear_interval_s: float | None = Field(default=None, gt=0, description="the double auction's call interval "
                                           "(wall s; default 5 x pace)")
    deposit_wei: int = Field(default=10**18, ge=0, description="first escrow of each buying site and the utility")
    heartbeat_s: float | None = Field(default=None, gt=0, description="the bus heartbeat interval of every "
                                      "service (default: the pace)")
    env: dict[str, str] = Field(default_factory=dict, description="more GRIDTRADE_* settings for every service")


class HostedSite(BaseModel):
    """One site of a host: what its three services are told (no secret)."""

    model_config = ConfigDict(frozen=True)
    name: str
    role: str
    account: str
    sim: dict
    limits: cmd.AgentLimits
    battery_wh: float
    wallet_rpc: str
    agent_rpc: str


class HostSpec(BaseModel):
    """A site host's sites, and the clock they share: a site's simulated time is
    ``start + (wall - epoch) * time_scale`` from its first start (a restart continues from
    its meter's stored time)."""

    model_config = ConfigDict(frozen=True)
    name: str
    data: pathlib.Path
    sites: list[HostedSite]
    chain_url: str
    market: str
    time_scale: float
    start: dt.datetime
    epoch: float = 0.0
    wallet_poll_s: float = Field(default=1.0, gt=0, description="how often each wallet follows the chain")


def ports_needed(n_sites: int) -> int:
    return SITE_PORTS + 2 * n_sites


def host_count(n_sites: int, per_host: int) -> int:
    return -(-n_sites // per_host)


SITES_AT_FULL_PACE = 25
FULL_PACE_SCALE = 360.0  # a day in four minutes


def pace(n_sites: int) -> float:
    """How many times slower than a small run, in wall time, a run of ``n_sites`` goes:
    1 up to 25 sites, then in proportion (4 at 100). Every site costs CPU per wall second
    (a meter reading, a wallet following the chain, an agent's decision, and heartbeats
    heard by every subscriber, growing with the square of the sites), so a large run reads,
    decides and beats that much less often and its clock runs that much slower: per
    simulated hour a site does what it does in a small run, and one machine carries it."""
    return max(1.0, n_sites / SITES_AT_FULL_PACE)


def default_time_scale(n_sites: int) -> float:
    """360 (a day in four minutes) up to 25 sites; slower beyond, with the pace."""
    return FULL_PACE_SCALE / pace(n_sites)


@dataclasses.dataclass(frozen=True)
class Intervals:
    """The wall-time intervals of a run (see :func:`pace`)."""

    heartbeat_s: float
    reading_s: float
    wallet_poll_s: float
    agent_every_s: float
    offer_duration_s: int
    clear_interval_s: float

    @classmethod
    def of(cls, sc: Scenario, so: SimOptions) -> Intervals:
        k = pace(len(sc.all_sites))
        return cls(heartbeat_s=so.heartbeat_s or k, reading_s=k, wallet_poll_s=k,
                   agent_every_s=so.agent_every_s or 3.0 * k, offer_duration_s=so.offer_duration_s or round(10 * k),
                   clear_interval_s=so.clear_interval_s or 5.0 * k)


def service_env(sc: Scenario, so: SimOptions) -> dict[str, str]:
    """What every service of the run is told besides the launcher's shared environment."""
    iv = Intervals.of(sc, so)
    return {
        "GRIDTRADE_TARIFF_RETAIL_WEI_PER_KWH": str(sc.tariffs.retail_wei_per_kwh),
        "GRIDTRADE_TARIFF_FEED_IN_WEI_PER_KWH": str(sc.tariffs.feed_in_wei_per_kwh),
        "GRIDTRADE_AUCTION_MARKET": sc.grid.market, "GRIDTRADE_AGENT_MARKET": sc.grid.market,
        "GRIDTRADE_AUCTION_CLEAR_INTERVAL_S": f"{iv.clear_interval_s:g}",
        "GRIDTRADE_AGENT_EVERY_S": f"{iv.agent_every_s:g}",
        "GRIDTRADE_AGENT_OFFER_DURATION_S": str(iv.offer_duration_s),
        "GRIDTRADE_READING_INTERVAL_S": f"{iv.reading_s:g}",
        "GRIDTRADE_DISPUTE_WINDOW_S": "2",
        "GRIDTRADE_SCRYPT_N": str(SCRYPT_N), "GRIDTRADE_METER_SCRYPT_N": str(SCRYPT_N),
        "GRIDTRADE_HEARTBEAT_S": f"{iv.heartbeat_s:g}",
        **so.env,
    }


def sim_plan(o: launcher.Options, sc: Scenario, so: SimOptions,
             accounts: dict[str, str]) -> tuple[list[launcher.Proc], list[HostSpec]]:
    """The processes of a run, in start order, and what each site host runs.
    ``accounts``: site -> its account (the utility's under ``launcher.UTILITY``)."""
    sites = sc.all_sites
    n_hosts = host_count(len(sites), so.per_host)
    if n_hosts > MAX_HOSTS:
        raise ValueError(f"{len(sites)} sites at {so.per_host} per host need {n_hosts} hosts; at most {MAX_HOSTS}: "
                         "raise per_host")
    p, h = o.base_port, o.host
    env = service_env(sc, so)
    planner = launcher.Planner(o)
    planner.common.update(env)
    planner.market()
    start = sc.start_utc()
    if o.utility_account:
        launcher.add_utility(o, planner.add, planner.chain_url)
        for proc in planner.procs:
            if proc.name == f"meter-{launcher.UTILITY}":
                proc.env.update({"GRIDTRADE_SIM__SUPPLY_W": str(sc.utility.supply_w),
                                 "GRIDTRADE_SIM__START": start.isoformat(),
                                 "GRIDTRADE_SIM__LATITUDE": str(sc.grid.latitude),
                                 "GRIDTRADE_SIM__LONGITUDE": str(sc.grid.longitude)})
            if proc.name == f"agent-{launcher.UTILITY}":
                proc.env["GRIDTRADE_AGENT_MAX_TRADE_WH"] = str(sc.utility.max_trade_wh)
    specs: list[HostSpec] = []
    for k in range(n_hosts):
        hosted = []
        for i in range(k * so.per_host, min(len(sites), (k + 1) * so.per_host)):
            spec = site_spec(sc, sites[i])
            hosted.append(HostedSite(name=spec.name, role=spec.role, account=accounts.get(spec.name, ""), sim=spec.sim,
                                     limits=spec.limits, battery_wh=spec.battery_wh,
                                     wallet_rpc=f"tcp://{h}:{p + SITE_PORTS + 2 * i}",
                                     agent_rpc=f"tcp://{h}:{p + SITE_PORTS + 2 * i + 1}"))
        name = f"host-{k + 1}"
        host = HostSpec(name=name, data=o.data.resolve(), sites=hosted, chain_url=planner.chain_url,
                        market=sc.grid.market, time_scale=o.time_scale, start=start,
                        wallet_poll_s=Intervals.of(sc, so).wallet_poll_s)
        specs.append(host)
        port = p + HOST_HEALTH + k
        proc = planner.add(name, launcher.MARKET, launcher._py("services.simulate.host", str(spec_path(o.data, name))),
                           {"GRIDTRADE_METRICS_PORT": str(port)}, http=port)
        proc.env["GRIDTRADE_DATA_DIR"] = str(planner.data / "hosts")
        proc.extra["sites"] = ",".join(s.name for s in hosted)
    return planner.procs, specs


def spec_path(data: pathlib.Path, host: str) -> pathlib.Path:
    return data.resolve() / "hosts" / f"{host}.json"
