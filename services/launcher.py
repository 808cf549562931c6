"""``gridtrade up``: the whole micro-grid on one machine.

A hub; a local anvil node whose state is kept under ``<data>/chain-node/`` (dumped every
second and on exit, loaded at the next start: tokens, balances, escrow and history
survive Ctrl-C); at the market the chain service in its operator role (the operator key
only) and the auction; and two sites, a producer ``solar-1`` and a consumer ``home-7``,
each with its meter service (simulated, or ``--meters emulated``: serial meter emulators
on pseudo-terminals read by the real line driver), its own wallet (the chain service in
its site role, holding that site's keystore under ``<data>/<site>/keystore``) and its
own gateway, which talks to that wallet only. ``--chain-url URL`` uses any JSON-RPC node
instead of starting anvil. The embedded py-evm chain lives inside one process, and here
the operator and every wallet are processes of their own: ``--chain-url embedded`` is
refused (it serves the unit tests, which run the roles in one process).

On first start it creates the CURVE keys and one demo account in each site's own
keystore and prints their passphrases once (they are stored nowhere); user keystores that
an earlier version kept at the market are moved to their sites. It waits until every part
is healthy, prints the two wallet URLs, restarts a part that dies, and stops everything
on Ctrl-C. State is kept under ``--data`` for the next start; ``--reset`` starts afresh.

The plan (which process, which environment) is pure and separate from running it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import pathlib
import secrets
import shutil
import signal
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MARKET, PRODUCER, CONSUMER, UTILITY = "market", "solar-1", "home-7", "utility"
SITES = (PRODUCER, CONSUMER)
FIRST_DEPOSIT_WEI = 10**18  # a first start: the consumer's escrow for its agent's bids
CHAIN_NODE = "chain-node"  # the anvil node's state, under the data folder
ROOT = pathlib.Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Options:
    data: pathlib.Path = pathlib.Path("data")
    chain_url: str = "anvil"
    meters: str = "sim"
    time_scale: float = 720.0
    base_port: int = 5550
    http_port: int = 8080
    host: str = "127.0.0.1"
    producer_account: str = ""
    consumer_account: str = ""
    utility_account: str = ""
    sim_start: str = ""
    agents: bool = False  # `gridtrade up` starts them (its --no-agents does not); a plan for tests does not


@dataclass
class Proc:
    name: str
    argv: list[str]
    env: dict[str, str]
    health_url: str | None = None
    log: pathlib.Path | None = None
    needs_pty: pathlib.Path | None = None
    public_url: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


def _py(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


class Planner:
    """Builds a plan: the environment every process shares (the bus, the market's
    endpoints, the keys) and :meth:`add` for one process with its own. ``gridtrade up``'s
    plan and ``gridtrade simulate``'s (:mod:`services.simulate.plan`) both start with
    :meth:`market`."""

    def __init__(self, o: Options) -> None:
        self.o = o
        p = o.base_port
        self.data = o.data.resolve()
        self.common = {
            "GRIDTRADE_KEYS_DIR": str(self.data / "keys"),
            "GRIDTRADE_HUB_PUB": f"tcp://{o.host}:{p}",
            "GRIDTRADE_HUB_SUB": f"tcp://{o.host}:{p + 1}",
            "GRIDTRADE_HUB_SITE": MARKET,
            "GRIDTRADE_CHAIN_RPC": f"tcp://{o.host}:{p + 10}",
            "GRIDTRADE_CHAIN_SITE": MARKET,
            "GRIDTRADE_AUCTION_RPC": f"tcp://{o.host}:{p + 11}",
            "GRIDTRADE_AUCTION_SITE": MARKET,
            "GRIDTRADE_UTILITY_SITE": UTILITY,  # the figures count its trades as the exchange with the grid
            "GRIDTRADE_METRICS_HOST": o.host,
        }
        self.procs: list[Proc] = []
        self._metrics = iter(range(p + 20, p + 40))
        self.chain_url = f"http://{o.host}:{p + 45}" if o.chain_url == "anvil" else o.chain_url

    def add(self, name: str, site: str, argv: list[str], env: dict[str, str], *, http: int | None = None) -> Proc:
        """One process: the shared environment, its site's name and data folder, ``env``;
        its ``/healthz`` on ``http`` (else the next metrics port, set for it)."""
        o = self.o
        port = http if http is not None else next(self._metrics)
        e = {**self.common, "GRIDTRADE_SITE": site, "GRIDTRADE_DATA_DIR": str(self.data / site), **env}
        if http is None:
            e["GRIDTRADE_METRICS_PORT"] = str(port)
        proc = Proc(name, argv, e, health_url=f"http://{o.host}:{port}/healthz",
                    log=self.data / "logs" / f"{name}.log")
        self.procs.append(proc)
        return proc

    def market(self, auction_env: dict[str, str] | None = None) -> None:
        """The hub, the anvil node (unless another chain is named), the operator's chain
        service and the auction."""
        o, p, data, common = self.o, self.o.base_port, self.data, self.common
        self.add("hub", MARKET, _py("services.bus"), {"GRIDTRADE_PUB_BIND": common["GRIDTRADE_HUB_PUB"],
                                                      "GRIDTRADE_SUB_BIND": common["GRIDTRADE_HUB_SUB"]})
        if o.chain_url == "anvil":
            anvil = shutil.which("anvil") or str(ROOT / "node_modules" / ".bin" / "anvil")
            # the chain node's state: dumped every second and on exit, loaded at the next start
            # the dev accounts hold a million Ether each (anvil's default is 10,000): the operator
            # gives each new account 100 (dev_fund_wei), and a simulated village has hundreds
            self.procs.append(Proc("anvil", [anvil, "--host", o.host, "--port", str(p + 45), "--silent",
                                             "--balance", "1000000",
                                             "--state", str(data / CHAIN_NODE / "state.json"), "--state-interval",
                                             "1"], {},
                                   health_url=None, log=data / "logs" / "anvil.log", extra={"rpc": self.chain_url}))
        self.add("chain", MARKET, _py("services.chain"), {"GRIDTRADE_CHAIN_URL": self.chain_url,
                                                          "GRIDTRADE_CHAIN_ROLE": "operator"})
        self.add("auction", MARKET, _py("services.auction"), dict(auction_env or {}))


def plan(o: Options) -> list[Proc]:
    """Every process of the demo, in start order, with its environment."""
    p = o.base_port
    planner = Planner(o)
    planner.market()
    add, procs, chain_url, data = planner.add, planner.procs, planner.chain_url, planner.data
    for i, (site, role, account) in enumerate(((PRODUCER, "producer", o.producer_account),
                                               (CONSUMER, "consumer", o.consumer_account))):
        wallet_rpc = {"GRIDTRADE_WALLET_RPC": f"tcp://{o.host}:{p + 12 + i}"}
        add(f"wallet-{site}", site, _py("services.chain"),
            {**wallet_rpc, "GRIDTRADE_CHAIN_URL": chain_url, "GRIDTRADE_CHAIN_ROLE": "site"})
        env = {"GRIDTRADE_ROLE": role, "GRIDTRADE_SIM__TIME_SCALE": str(o.time_scale),
               # a first start begins at dawn (Berlin, the sim's default site), so the demo
               # sees the sun soon; a restart continues from the meter's stored time
               "GRIDTRADE_SIM__START": o.sim_start or f"{datetime.date.today()}T05:00:00+00:00"}
        if role == "consumer":  # the demo's buyer: a home without PV of its own, its battery low at the start
            env.update({"GRIDTRADE_SIM__PANEL__AREA_M2": "0", "GRIDTRADE_SIM__BATTERY__SOC": "0.1"})
        if account:
            env["GRIDTRADE_ACCOUNT"] = account
        if o.meters == "emulated":
            pty = data / site / "meter.pty"
            emu = add(f"emulator-{site}", site, _py("services.meter", "emulate", "--driver", "line", "--role", role,
                                                   "--link", str(pty), "--time-scale", str(o.time_scale)),
                      {k: v for k, v in env.items()
                       if k.startswith("GRIDTRADE_SIM__") and k != "GRIDTRADE_SIM__TIME_SCALE"})
            emu.health_url = None
            env["GRIDTRADE_METERS"] = json.dumps([{"name": "main", "role": role, "driver": "line", "port": str(pty)}])
            meter = add(f"meter-{site}", site, _py("services.meter"), env)
            meter.needs_pty = pty
        else:
            add(f"meter-{site}", site, _py("services.meter"), env)
    if o.agents and o.utility_account:
        add_utility(o, add, chain_url)
    for i, (site, account) in enumerate(((PRODUCER, o.producer_account), (CONSUMER, o.consumer_account))):
        agent_rpc = f"tcp://{o.host}:{p + 15 + i}"
        if o.agents:
            add(f"agent-{site}", site, _py("services.agent"),
                {"GRIDTRADE_AGENT_BIND": agent_rpc, "GRIDTRADE_AGENT_ACCOUNT": account,
                 "GRIDTRADE_WALLET_RPC": f"tcp://{o.host}:{p + 12 + i}"})
        gw = add(f"gateway-{site}", site, _py("services.gateway"),
                 {"GRIDTRADE_HTTP_HOST": o.host, "GRIDTRADE_HTTP_PORT": str(o.http_port + i),
                  "GRIDTRADE_WALLET_RPC": f"tcp://{o.host}:{p + 12 + i}",
                  "GRIDTRADE_AGENT_RPC": agent_rpc if o.agents else ""},
                 http=o.http_port + i)
        gw.public_url = f"http://{o.host}:{o.http_port + i}/"
    return procs


UTILITY_SIM = {  # the sim's stand-in for the utility's connection to the grid
    "GRIDTRADE_SIM__SUPPLY_W": "5000",  # what the grid makes available, minted as it comes
    "GRIDTRADE_SIM__PANEL__AREA_M2": "0", "GRIDTRADE_SIM__LOAD__SCHEDULE": "[[0, 0]]",
    "GRIDTRADE_SIM__BATTERY__CAPACITY_WH": "1e9", "GRIDTRADE_SIM__BATTERY__SOC": "0.5",  # the grid takes it all
}


def add_utility(o: Options, add: Callable[..., Proc], chain_url: str) -> None:
    """The utility grid as counterparty of last resort: a site of its own with a wallet, a
    meter of each kind at its connection (a producer meter for what it sells, a consumer
    meter for what it buys) and an agent that buys at the feed-in and sells at the retail
    tariff. Its trades are recorded, delivered and settled from escrow like any other."""
    p = o.base_port
    add(f"wallet-{UTILITY}", UTILITY, _py("services.chain"),
        {"GRIDTRADE_WALLET_RPC": f"tcp://{o.host}:{p + 14}", "GRIDTRADE_CHAIN_URL": chain_url,
         "GRIDTRADE_CHAIN_ROLE": "site"})
    meters = [{"name": "supply", "role": "producer", "driver": "sim"},
              {"name": "intake", "role": "consumer", "driver": "sim"}]
    add(f"meter-{UTILITY}", UTILITY, _py("services.meter"),
        {"GRIDTRADE_METERS": json.dumps(meters), "GRIDTRADE_ACCOUNT": o.utility_account,
         "GRIDTRADE_SIM__TIME_SCALE": str(o.time_scale), **UTILITY_SIM})
    add(f"agent-{UTILITY}", UTILITY, _py("services.agent"),
        {"GRIDTRADE_AGENT_BIND": f"tcp://{o.host}:{p + 17}", "GRIDTRADE_AGENT_ACCOUNT": o.utility_account,
         "GRIDTRADE_WALLET_RPC": f"tcp://{o.host}:{p + 14}", "GRIDTRADE_AGENT_STRATEGY": "utility"})


WALLET_PORTS = {PRODUCER: 12, CONSUMER: 13, UTILITY: 14}  # a site's wallet: base port + this


async def unlock_in_wallet(o: Options, site: str, account: str, passphrase: str, *, ttl_s: float = 86400,
                           deposit_wei: int = 0, endpoint: str | None = None, timeout_s: float = 30) -> list[str]:
    """Unlock ``account`` in its site's wallet (over the bus, with the site's own key, as
    the site's gateway does at a login) and, with ``deposit_wei``, put that much of its
    Ether in the market's escrow once it is funded. ``endpoint``: the wallet's request
    endpoint (default: the demo's port of ``site``). Returns what was done, in words."""
    from services.bus import RequestError, RequestTimeout, RpcClient, Security
    from services.bus import commands as C
    import zmq.asyncio

    done: list[str] = []
    ctx = zmq.asyncio.Context()  # one ZAP authenticator per context: one context per site key
    sec = Security(o.data.resolve() / "keys", site)
    sec.start(ctx)
    wallet = RpcClient(ctx, sec, endpoint or f"tcp://{o.host}:{o.base_port + WALLET_PORTS[site]}", server_site=site,
                       timeout_s=timeout_s)
    try:
        # asked again (the same command: executed once, its stored reply returned) when no reply
        # comes within a quarter of the time: a reply can be lost when the link is re-made
        await wallet.request(C.Unlock(address=account, passphrase=passphrase, ttl_s=ttl_s), timeout=timeout_s / 4,
                             retries=3)
        done.append(f"unlocked {site}'s account in its wallet for {ttl_s / 3600:g} h (its agent signs through it)")
        if deposit_wei:
            deadline = time.monotonic() + max(60.0, 2 * timeout_s)

            async def funded() -> bool:
                try:
                    return (await wallet.request(C.GetBalances(address=account))).ether_wei >= deposit_wei * 2
                except RequestTimeout:  # a busy wallet: a read, asked again
                    return False
                except RequestError as e:  # a wallet that has not attached to the chain yet: not yet
                    if e.code != "chain_unavailable":
                        raise
                    return False

            while not await funded():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the account of {site} was not funded")
                await asyncio.sleep(1.0)
            await wallet.request(C.Escrow(account=account, action="deposit", amount_wei=deposit_wei),
                                 timeout=timeout_s / 4, retries=3)
            done.append(f"deposited {deposit_wei / 10**18:g} ETH of {site}'s Ether in the market's escrow for its "
                        "agent's bids")
    finally:
        await wallet.close()
        sec.stop()
        ctx.destroy(0)
    return done


async def hand_over(o: Options, passphrases: dict[str, str]) -> list[str]:
    """A first start: the new accounts are unlocked in their sites' wallets for a day (as the
    owner's login would), so the agents trade at once, and the consumer and the utility put a
    first deposit in the market's escrow for their agents' bids. Later starts leave this to
    the owners: a login to the wallet page (or ``gridtrade up unlock``) unlocks a key again.
    Returns what was done, in words."""
    done: list[str] = []
    for site, role, account in ((PRODUCER, "producer", o.producer_account), (CONSUMER, "consumer", o.consumer_account),
                                (UTILITY, "grid", o.utility_account)):
        pw = passphrases.get(f"{site} {role}")
        if pw and account:
            done += await unlock_in_wallet(o, site, account, pw, deposit_wei=FIRST_DEPOSIT_WEI
                                           if role in ("consumer", "grid") and o.agents else 0)
    return done


# --- running the plan -----------------------------------------------------------------


def say(msg: str) -> None:
    print(f"gridtrade: {msg}", flush=True)


def keystore_of(data: pathlib.Path, site: str) -> pathlib.Path:
    """Where a site's wallet keeps its keystore (its ``GRIDTRADE_DATA_DIR`` is ``<data>/<site>``)."""
    return data / site / "keystore"


def move_keystores_home(data: pathlib.Path) -> list[str]:
    """User keystore files an earlier version kept at the market go to their sites' own
    keystores (the site the file records, else the one its name starts with); the
    market keeps none. Returns the addresses moved."""
    from services.chain.keystore import Keystore, owner

    moved = []
    for kf in Keystore(data / MARKET / "keystore").list():
        site = owner(kf, known_sites=set(SITES), default="")
        if site not in SITES:
            continue
        dest = keystore_of(data, site)
        dest.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.replace(kf.path, dest / kf.path.name)
        moved.append(kf.address)
        say(f"moved the keystore of {kf.address} ({kf.name}) from the market to its site {site}")
    return moved


def prepare(o: Options, reset: bool) -> tuple[Options, dict[str, str]]:
    """Keys and demo accounts (each in its own site's keystore); returns the options with
    the accounts and new passphrases."""
    from services.bus import ensure_keys
    from services.chain.keystore import Keystore

    if reset and o.data.exists():
        shutil.rmtree(o.data)
    data = o.data.resolve()
    (data / "logs").mkdir(parents=True, exist_ok=True)
    (data / CHAIN_NODE).mkdir(parents=True, exist_ok=True)
    for site in (MARKET, *SITES, UTILITY):
        ensure_keys(data / "keys", site)
    move_keystores_home(data)
    shown: dict[str, str] = {}
    accounts = {}
    labels = [(PRODUCER, f"{PRODUCER} producer"), (CONSUMER, f"{CONSUMER} consumer")]
    if o.agents:  # the utility's connection trades through an agent only
        labels.append((UTILITY, f"{UTILITY} grid"))
    for site, label in labels:
        ks = Keystore(keystore_of(data, site))
        have = {kf.name: kf.address for kf in ks.list()}
        if label not in have:
            passphrase = "-".join(secrets.token_urlsafe(4) for _ in range(3))
            say(f"creating the demo account '{label}' in the keystore of {site} (scrypt takes a moment) ...")
            # the account belongs to its site: its keystore (and the claim its key signs) is there
            have[label] = ks.new(passphrase, name=label, site=site).address
            shown[label] = passphrase
        accounts[label] = have[label]
    opts = Options(**{**o.__dict__, "producer_account": accounts[f"{PRODUCER} producer"],
                      "consumer_account": accounts[f"{CONSUMER} consumer"],
                      "utility_account": accounts.get(f"{UTILITY} grid", "")})
    return opts, shown


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:  # noqa: S310 - our own loopback endpoint
            return bool(r.status == 200)
    except OSError:
        return False


class Runner:
    def __init__(self, procs: list[Proc]) -> None:
        self.procs = procs
        self.running: dict[str, asyncio.subprocess.Process] = {}
        self.restarts: dict[str, int] = {}
        self.stopping = False
        self.retired: set[str] = set()  # stopped on purpose before the others: not restarted

    async def start(self, proc: Proc) -> None:
        assert proc.log is not None
        if proc.needs_pty is not None:
            for _ in range(100):
                if proc.needs_pty.exists():
                    break
                await asyncio.sleep(0.1)
        log = open(proc.log, "ab")  # noqa: SIM115 - handed to the child
        self.running[proc.name] = await asyncio.create_subprocess_exec(
            *proc.argv, env={**os.environ, **proc.env}, stdout=log, stderr=log, stdin=asyncio.subprocess.DEVNULL,
            cwd=ROOT, start_new_session=True)
        log.close()

    async def wait_until(self, proc: Proc, what: str, check: Callable[[], Any], timeout: float) -> None:
        """Poll ``check`` until it is true; raises RuntimeError naming ``what`` and the
        part's log when ``proc`` exits meanwhile or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while not check():
            child = self.running[proc.name]
            if child.returncode is not None:
                raise RuntimeError(f"{proc.name} exited with {child.returncode}; see {proc.log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what}: not after {timeout:.0f} s; see {proc.log}")
            await asyncio.sleep(0.3)

    async def wait_healthy(self, proc: Proc, timeout: float = 180) -> None:
        await self.wait_until(proc, f"{proc.name} healthy", lambda: not proc.health_url or healthy(proc.health_url),
                              timeout)
        if proc.name == "anvil":
            await asyncio.sleep(1.0)

    async def supervise(self) -> None:
        """Restart a part that dies, with a growing pause; its state is in its store."""
        while not self.stopping:
            await asyncio.sleep(1)
            for proc in self.procs:
                child = self.running.get(proc.name)
                if child is None or child.returncode is None or self.stopping or proc.name in self.retired:
                    continue
                n = self.restarts[proc.name] = self.restarts.get(proc.name, 0) + 1
                say(f"{proc.name} exited ({child.returncode}); restarting (#{n}); log: {proc.log}")
                await asyncio.sleep(min(30, 2 ** min(n, 5) / 4))
                await self.start(proc)

    async def stop(self, only: set[str] | None = None) -> None:
        """Stop every part (``only``: just these, and do not restart them), the last started first."""
        if only is None:
            self.stopping = True
        else:
            self.retired |= only
        for proc in reversed(self.procs):
            if only is not None and proc.name not in only:
                continue
            child = self.running.get(proc.name)
            if child is not None and child.returncode is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(child.pid, signal.SIGTERM)  # its whole group: anvil's launcher and its binary
                try:
                    await asyncio.wait_for(child.wait(), 15)
                except asyncio.TimeoutError:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(child.pid, signal.SIGKILL)
                    await child.wait()


async def up(o: Options, reset: bool) -> int:
    o, passphrases = prepare(o, reset)
    procs = plan(o)
    runner = Runner(procs)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        for i, proc in enumerate(procs, 1):
            say(f"[{i}/{len(procs)}] starting {proc.name} ...")
            await runner.start(proc)
            waiter = asyncio.create_task(runner.wait_healthy(proc))
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if stop.is_set():
                waiter.cancel()
                await asyncio.gather(waiter, return_exceptions=True)
                return 130
            waiter.result()
        say("all parts are healthy.\n")
        for proc in procs:
            if proc.public_url:
                print(f"  wallet of {proc.env['GRIDTRADE_SITE']:8} {proc.public_url}")
        print(f"\n  accounts: producer {o.producer_account}\n            consumer {o.consumer_account}")
        if o.utility_account:
            print(f"            utility  {o.utility_account} (the grid: buys at feed-in, sells at retail)")
        if passphrases:
            print("  passphrases (shown this once, stored nowhere; --reset makes new accounts):")
            for label, pw in passphrases.items():
                print(f"    {label:20} {pw}")
        if passphrases:
            try:
                for line in await hand_over(o, passphrases):
                    say(line)
            except Exception as e:  # noqa: BLE001 - the demo runs on; the owner logs in by hand
                say(f"could not hand the new accounts to their agents ({e}): log in to each wallet once")
        if o.agents:
            print("\n  each site's agent trades for it within the limits on its wallet's Agent page "
                  "(turn it off there, or start with --no-agents, to trade by hand)")
        print(f"\n  logs in {o.data.resolve() / 'logs'}; Ctrl-C stops everything (state is kept).", flush=True)
        watcher = asyncio.create_task(runner.supervise())
        await stop.wait()
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        return 0
    except RuntimeError as e:
        say(f"start-up failed: {e}")
        return 1
    finally:
        say("stopping ...")
        await runner.stop()
        say("stopped.")


def unlock_main(argv: list[str]) -> int:
    """``gridtrade up unlock SITE``: unlock a site's account in its running wallet (the
    passphrase asked for, or GRIDTRADE_PASSPHRASE), e.g. the utility's after a restart."""
    import getpass

    from services.chain.keystore import Keystore

    p = argparse.ArgumentParser(prog="gridtrade up unlock", description=unlock_main.__doc__)
    p.add_argument("site", choices=sorted(WALLET_PORTS))
    p.add_argument("--data", type=pathlib.Path, default=pathlib.Path(os.environ.get("GRIDTRADE_UP_DATA", "data")))
    p.add_argument("--base-port", type=int, default=5550)
    p.add_argument("--hours", type=float, default=24.0, help="how long the wallet keeps it unlocked (at most 168)")
    a = p.parse_args(argv)
    accounts = Keystore(keystore_of(a.data.resolve(), a.site)).list()
    if not accounts:
        print(f"gridtrade up unlock: no account in the keystore of {a.site}", file=sys.stderr)
        return 1
    pw = os.environ.get("GRIDTRADE_PASSPHRASE") or getpass.getpass(f"passphrase of {accounts[0].address}: ")
    o = Options(data=a.data, base_port=a.base_port)
    try:
        for line in asyncio.run(unlock_in_wallet(o, a.site, accounts[0].address, pw,
                                                 ttl_s=min(a.hours, 168.0) * 3600)):
            say(line)
    except Exception as e:  # noqa: BLE001 - said in words
        say(f"could not unlock: {e}")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["unlock"]:
        return unlock_main(argv[1:])
    p = argparse.ArgumentParser(prog="gridtrade up", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=pathlib.Path, default=pathlib.Path(os.environ.get("GRIDTRADE_UP_DATA", "data")),
                   help="where all state lives (default ./data)")
    p.add_argument("--reset", action="store_true", help="delete the state and start afresh")
    p.add_argument("--chain-url", default="anvil", help="'anvil' (default: a local anvil node, its state under "
                   "<data>/chain-node/) or the JSON-RPC URL of a node every wallet and the operator reach")
    p.add_argument("--sim-start", default="", help="ISO time the simulated meters start at on a first start "
                   "(default: today at dawn)")
    p.add_argument("--meters", choices=["sim", "emulated"], default="sim",
                   help="sim: simulated meters; emulated: serial emulators on pseudo-terminals, read by the line driver")
    p.add_argument("--time-scale", type=float, default=720.0, help="simulated seconds per second (720: a day in 2 min)")
    p.add_argument("--base-port", type=int, default=5550, help="bus ports start here")
    p.add_argument("--http-port", type=int, default=8080, help="the producer's wallet; the consumer's is the next port")
    p.add_argument("--no-agents", action="store_true", help="start no site agents: trade by hand in the wallets")
    a = p.parse_args(argv)
    if a.chain_url == "embedded" or a.chain_url.startswith("embedded:"):
        print("gridtrade up: the embedded chain lives inside one process, but here the operator and each site's "
              "wallet are processes of their own and must share one chain: use the default (a local anvil node) or "
              "--chain-url http://... (the embedded chain serves the unit tests)", file=sys.stderr)
        return 2
    opts = Options(data=a.data, chain_url=a.chain_url, meters=a.meters, time_scale=a.time_scale,
                   base_port=a.base_port, http_port=a.http_port, sim_start=a.sim_start,
                   agents=not a.no_agents)
    return asyncio.run(up(opts, a.reset))


if __name__ == "__main__":
    raise SystemExit(main())
