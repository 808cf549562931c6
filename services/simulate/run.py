"""``gridtrade simulate SCENARIO``: a scenario's micro-grid on the real services, faster than
real time, then its report.

A run starts afresh in ``--data`` (default ``./sim-data``; a folder that holds anything but
an earlier run is refused): CURVE keys for the market, the utility and every site; one
account per site in that site's own keystore, its passphrase made at random and held in
memory only, for the run (so a run cannot be continued later: its keys stay encrypted).
Then, with the launcher's runner and supervision (a part that dies is restarted): the hub,
anvil, the operator's chain service and the auction; the utility's wallet, meters and agent;
and the site hosts (:mod:`services.simulate.host`), each running the wallet, meter and agent of
many sites. Once they are up each account is unlocked in its site's wallet for the run (as
an owner's login would) and each buying site and the utility put a first deposit in the
market's escrow (as ``gridtrade up``'s first start does). Then the sites' meters start,
and every site's simulated clock with them, at local midnight of the scenario's start day.

A one-line bar of simulated time runs on stderr. After ``--days`` of simulated time every
agent is turned off, the trades still open are given a minute to be delivered and settled
(the report covers that time too), the sites stop (agents, then meters, then wallets),
then the market, and the report is printed and written to ``<data>/report/``
(figures.csv, prices.csv, and the charts energy.png and prices.png).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import datetime as dt
import json
import pathlib
import secrets
import shutil
import signal
import sys
import time
import urllib.request

from services import launcher
from services.bus import ensure_keys
from services.gateway import figures

from . import report as rep
from .host import go_path
from .plan import (FULL_PACE_SCALE, SCRYPT_N, SITES_AT_FULL_PACE, HostSpec, SimOptions, default_time_scale,
                   ports_needed, sim_plan, spec_path)
from .scenario import Scenario, ScenarioError
from .scenario import load as load_scenario

MARKER = ".gridtrade-simulate"
COLLECTOR = "sim-report"  # the report's own key: it only listens


class SimError(RuntimeError):
    pass


def say(msg: str) -> None:
    print(f"gridtrade simulate: {msg}", file=sys.stderr, flush=True)


def prepare(o: launcher.Options, sc: Scenario) -> tuple[launcher.Options, dict[str, str], dict[str, str]]:
    """A fresh data folder with every key and account; returns the options with the
    utility's account, each site's account and their passphrases (memory only)."""
    from services.chain.keystore import Keystore

    data = o.data.resolve()
    if data.exists() and any(data.iterdir()) and not (data / MARKER).exists():
        raise SimError(f"{data} holds something that is not an earlier run: give an empty or new --data folder")
    if data.exists():
        shutil.rmtree(data)
    for sub in ("logs", launcher.CHAIN_NODE, "hosts", "report"):
        (data / sub).mkdir(parents=True, exist_ok=True)
    (data / MARKER).write_text("a gridtrade simulate run: the next run deletes it\n")
    sites = [s.name for s in sc.all_sites]
    for site in (launcher.MARKET, launcher.UTILITY, COLLECTOR, *sites):
        ensure_keys(data / "keys", site)
    accounts, passphrases = {}, {}
    for site in (launcher.UTILITY, *sites):
        pw = secrets.token_urlsafe(18)
        ks = Keystore(launcher.keystore_of(data, site), scrypt_n=SCRYPT_N)
        accounts[site] = ks.new(pw, name=f"{site} sim", site=site).address
        passphrases[site] = pw
    o = dataclasses.replace(o, agents=True, utility_account=accounts[launcher.UTILITY])
    return o, accounts, passphrases


def _health(url: str | None) -> dict | None:
    if url is None:
        return None
    try:
        with urllib.request.urlopen(url, timeout=2) as r:  # noqa: S310 - our own loopback endpoint
            return json.loads(r.read())
    except (OSError, ValueError):
        return None


@dataclasses.dataclass
class Simulation:
    """One run; :meth:`start`, :meth:`until_end`, :meth:`drain`, :meth:`report`, :meth:`stop`."""

    scenario: Scenario
    options: launcher.Options
    sim: SimOptions = SimOptions()
    progress: bool = True
    procs: list[launcher.Proc] = dataclasses.field(default_factory=list)
    specs: list[HostSpec] = dataclasses.field(default_factory=list)
    accounts: dict[str, str] = dataclasses.field(default_factory=dict)
    runner: launcher.Runner | None = None
    collector: rep.Collector | None = None
    started: float = 0.0
    ended: float = 0.0
    _watcher: asyncio.Task | None = None

    @property
    def sites(self) -> list[str]:
        return [s.name for s in self.scenario.all_sites]

    @property
    def start_sim(self) -> float:
        return self.scenario.start_utc().timestamp()

    @property
    def end_sim(self) -> float:
        return self.start_sim + self.sim.days * figures.DAY_S

    def proc(self, name: str) -> launcher.Proc:
        return next(p for p in self.procs if p.name == name)

    def host_names(self) -> list[str]:
        return [s.name for s in self.specs]

    async def start(self) -> None:
        self.started = time.monotonic()
        say(f"preparing {len(self.sites)} sites (keys, accounts) in {self.options.data.resolve()} ...")
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="simulate-prepare") as pool:  # scrypt
            o, self.accounts, passphrases = await asyncio.get_running_loop().run_in_executor(
                pool, prepare, self.options, self.scenario)
        self.options = o
        self.procs, self.specs = sim_plan(o, self.scenario, self.sim, self.accounts)
        self.runner = runner = launcher.Runner(self.procs)
        hub = self.proc("hub")
        self.collector = rep.Collector(o.data.resolve() / "keys", COLLECTOR, hub.env["GRIDTRADE_HUB_SUB"],
                                       self.accounts, market=self.scenario.grid.market)
        for spec in self.specs:
            spec_path(o.data, spec.name).write_text(spec.model_dump_json())
        utility_meter = f"meter-{launcher.UTILITY}"  # its clock starts with the sites' (below)
        for i, proc in enumerate(self.procs, 1):
            if proc.name == utility_meter:
                continue
            say(f"[{i}/{len(self.procs)}] starting {proc.name}"
                + (f" ({len(proc.extra['sites'].split(','))} sites)" if "sites" in proc.extra else "") + " ...")
            await runner.start(proc)
            await runner.wait_healthy(proc)
            if proc.name == "hub":
                await self.collector.start()
            if proc.name == "chain":
                await runner.wait_until(proc, "the operator's contracts deployed",
                                        lambda: (_health(proc.health_url) or {}).get("market"), 120)
        say("handing the accounts to their agents (unlock in each wallet, first escrow deposits) ...")
        await self.hand_over(passphrases)
        passphrases.clear()
        # the sites' meters start now, and with them their day: one run, one clock
        go_path(o.data.resolve()).write_text(repr(time.time()))
        await runner.start(self.proc(utility_meter))
        await runner.wait_healthy(self.proc(utility_meter))
        self._watcher = asyncio.create_task(runner.supervise(), name="simulate-supervise")

    async def hand_over(self, passphrases: dict[str, str]) -> None:
        buyers = {s.name for s in self.scenario.all_sites if s.meter_role == "consumer"} | {launcher.UTILITY}
        endpoints = {site.name: site.wallet_rpc for spec in self.specs for site in spec.sites}
        limit = asyncio.Semaphore(8)

        async def one(site: str) -> None:
            async with limit:
                await launcher.unlock_in_wallet(self.options, site, self.accounts[site], passphrases[site],
                                                ttl_s=7 * 86400, deposit_wei=self.sim.deposit_wei if site in buyers
                                                else 0, endpoint=endpoints.get(site), timeout_s=120)

        sites = list(passphrases)
        got = await asyncio.gather(*(one(s) for s in sites), return_exceptions=True)
        failed = {site: r for site, r in zip(sites, got) if isinstance(r, BaseException)}
        if len(failed) == len(sites):
            raise SimError(f"no account could be handed to its agent: {next(iter(failed.values()))}")
        if failed:  # the run goes on without them: those agents wait, as after a wallet's restart
            say(f"{len(failed)} site(s) not handed to their agents (they will not trade): "
                + "; ".join(f"{site}: {e}" for site, e in sorted(failed.items())))

    def bar(self, sim: float | None) -> str:
        c = self.collector
        assert c is not None
        span = self.end_sim - self.start_sim
        done = 0.0 if sim is None else min(max((sim - self.start_sim) / span, 0.0), 1.0)
        width = 30
        filled = int(done * width)
        local = "--:--" if sim is None else dt.datetime.fromtimestamp(
            sim, dt.timezone(dt.timedelta(hours=self.scenario.utc_offset_h()))).strftime("%m-%d %H:%M")
        wall = time.monotonic() - self.started
        return (f"\r[{'#' * filled}{'.' * (width - filled)}] {done * 100:5.1f}% {local} | "
                f"{len(c.agreed):4d} trades, {c.local_wh(launcher.UTILITY) / 1000:7.1f} kWh local | {wall:5.0f} s")

    async def until_end(self, stop: asyncio.Event | None = None) -> bool:
        """Wait for the end of the run's simulated days (False: ``stop`` came first)."""
        assert self.collector is not None
        while True:
            sim = self.collector.sim_now(self.sites)
            if self.progress:
                print(self.bar(sim), end="", file=sys.stderr, flush=True)
            if sim is not None and sim >= self.end_sim:
                break
            if stop is not None and stop.is_set():
                if self.progress:
                    print(file=sys.stderr)
                return False
            await asyncio.sleep(0.5)
        self.ended = time.monotonic()
        if self.progress:
            print(file=sys.stderr)
        return True

    async def agents_off(self) -> None:
        """Every agent (the utility's too) turned off, as its owner would in the wallet
        page: over the bus, with the site's own key, to its agent."""
        from services.bus import RpcClient, Security
        from services.bus import commands as C
        import zmq.asyncio

        o = self.options
        endpoints = {site.name: site.agent_rpc for spec in self.specs for site in spec.sites}
        endpoints[launcher.UTILITY] = f"tcp://{o.host}:{o.base_port + 17}"
        limit = asyncio.Semaphore(8)

        async def one(site: str, endpoint: str) -> None:
            async with limit:
                ctx = zmq.asyncio.Context()  # one ZAP authenticator per context: one context per site key
                sec = Security(o.data.resolve() / "keys", site)
                sec.start(ctx)
                agent = RpcClient(ctx, sec, endpoint, server_site=site, timeout_s=30)
                try:
                    state = await agent.request(C.GetAgent())
                    await agent.request(C.SetAgentLimits(limits=state.limits.model_copy(update={"enabled": False})))
                finally:
                    await agent.close()
                    sec.stop()
                    ctx.destroy(0)

        await asyncio.gather(*(one(s, e) for s, e in endpoints.items()))

    async def drain(self, timeout: float = 60.0) -> int:
        """The end of the run: the agents stop trading, the open trades are given ``timeout``
        s to be delivered and settled, then the sites and the utility stop (the market runs
        on until :meth:`stop`). Returns the trades still open."""
        assert self.runner is not None and self.collector is not None
        try:
            await self.agents_off()
        except Exception as e:  # noqa: BLE001 - said; the sites stop anyway
            say(f"could not turn every agent off ({e}); stopping the sites")
        deadline = time.monotonic() + timeout
        while self.collector.live_trades() and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        parts = {p.name for p in self.procs if p.name in self.host_names() or p.name.endswith(f"-{launcher.UTILITY}")}
        await self.runner.stop(only=parts)
        return self.collector.live_trades()

    def report(self) -> rep.Report:
        c = self.collector
        assert c is not None
        t = self.scenario.tariffs
        # to the latest clock at the latest event heard: the run's days and the time its last trades took to settle
        now = max([h.sim_of(c.latest_wall) or 0.0 for h in c.histories.values() if h.live is not None]
                  + [self.end_sim])
        start = int(self.start_sim)
        end = max(int(self.end_sim), figures.bucket_of(now) + figures.BUCKET_S)
        tz = round(self.scenario.utc_offset_h() * 3600)
        rows = c.figures(start, end, figures.Tariffs(t.retail_wei_per_kwh, t.feed_in_wei_per_kwh), tz,
                         launcher.UTILITY)
        roles = {s.name: s.meter_role for s in self.scenario.all_sites}
        wall = (self.ended or time.monotonic()) - self.started
        return rep.Report(name=self.scenario.grid.name, start=start, end=end, roles=roles, rows=rows,
                          utility=launcher.UTILITY, prices=list(c.prices), trades=len(c.agreed), wall_s=wall,
                          tz_offset_s=tz)

    def write(self, r: rep.Report) -> pathlib.Path:
        out = self.options.data.resolve() / "report"
        out.mkdir(parents=True, exist_ok=True)
        (out / "figures.csv").write_text(rep.to_csv(r))
        (out / "prices.csv").write_text(rep.prices_csv(r))
        (out / "energy.png").write_bytes(rep.energy_png(r))
        (out / "prices.png").write_bytes(rep.prices_png(r))
        return out

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
            self._watcher = None
        if self.runner is not None:
            await self.runner.stop()
        if self.collector is not None:
            await self.collector.stop()
            self.collector = None


async def simulate(sc: Scenario, o: launcher.Options, so: SimOptions) -> int:
    sim = Simulation(sc, o, so, progress=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        starting = asyncio.create_task(sim.start())
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({starting, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if stop.is_set() and not starting.done():
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            return 130
        starting.result()
        say(f"running {so.days:g} simulated day(s) at {o.time_scale:g}x; logs in {o.data.resolve() / 'logs'}")
        if not await sim.until_end(stop):
            say("interrupted: the report covers the time simulated so far")
        say("the simulated time is over: stopping the sites, settling the open trades ...")
        left = await sim.drain()
        if left:
            say(f"{left} trade(s) still open at the end: what they delivered so far is counted")
        r = sim.report()
        print(rep.table(r), flush=True)
        out = sim.write(r)
        say(f"report written to {out} (figures.csv, prices.csv, energy.png, prices.png)")
        return 0
    except (SimError, RuntimeError) as e:
        say(f"failed: {e}")
        return 1
    finally:
        with contextlib.suppress(Exception):
            await sim.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gridtrade simulate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", type=pathlib.Path, help="a scenario file (TOML; see scenarios/ and the README)")
    p.add_argument("--days", type=float, default=1.0, help="simulated days to run (default 1)")
    p.add_argument("--time-scale", type=float, default=None,
                   help=f"simulated seconds per second (default {FULL_PACE_SCALE:g}, a day in 4 minutes, up to "
                        f"{SITES_AT_FULL_PACE} sites; beyond, slower in proportion: 90 for 100 sites, whose meters, "
                        "wallets and agents then also read, follow and decide 4 times less often in wall time)")
    p.add_argument("--data", type=pathlib.Path, default=pathlib.Path("sim-data"),
                   help="where the run keeps its state and report (default ./sim-data; started afresh)")
    p.add_argument("--base-port", type=int, default=5550, help="its ports start here (100 + 2 per site of them)")
    p.add_argument("--per-host", type=int, default=10, help="sites per site host process (default 10)")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        sc = load_scenario(a.scenario)
        so = SimOptions(days=a.days, per_host=a.per_host)
    except ScenarioError as e:
        print(f"gridtrade simulate: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # the options' own checks
        print(f"gridtrade simulate: {e}", file=sys.stderr)
        return 2
    if a.time_scale is None:
        a.time_scale = default_time_scale(len(sc.all_sites))
    if not 0 < a.time_scale <= 1e5:
        print("gridtrade simulate: --time-scale must be more than 0 and at most 100000", file=sys.stderr)
        return 2
    if not 1024 <= a.base_port <= 65535 - ports_needed(len(sc.all_sites)):
        print(f"gridtrade simulate: --base-port: {ports_needed(len(sc.all_sites))} ports from it must fit below "
              "65536", file=sys.stderr)
        return 2
    o = launcher.Options(data=a.data, time_scale=a.time_scale, base_port=a.base_port, agents=True,
                         sim_start=sc.start_utc().isoformat())
    return asyncio.run(simulate(sc, o, so))


if __name__ == "__main__":
    raise SystemExit(main())
