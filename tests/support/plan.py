"""The processes of ``launcher.plan()`` as a test sees them (:class:`PlanGrid`: find one,
ask its health, read its logs, wait for something and fail with the logs' tails, read the
operator's contracts), and :class:`RealStack`, the real micro-grid for the gateway,
browser and adversarial tests: the processes of ``launcher.plan()`` (anvil, hub, the
market's operator, auction, each site's wallet and simulated meter, and for the browser
the two gateways) as real subprocesses on a random block of loopback ports, with their logs in ``<data>/logs``. Each site's accounts are in
its own wallet's keystore.

Nothing is timed: every wait is bounded and fails with what it waited for and the tails
of the service logs. ``stop()`` ends every process it started (its whole process group).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import subprocess
import urllib.request
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, NoReturn

import pytest
from web3 import Web3

from services import launcher
from services.chain import bindings
from services.chain.keystore import Keystore

from .anvil import answers_rpc, child_pids
from .paths import ROOT
from .poll import until, wait
from .ports import free_port_block
# a clear June morning in Berlin (the sim's default site): the panel produces at once
SUNNY = "2024-06-21T07:00:00+00:00"
# the consumer site has no PV and a low battery: it takes what the line brings
CONSUMER_SITE = {"GRIDTRADE_SIM__PANEL__AREA_M2": "0", "GRIDTRADE_SIM__BATTERY__SOC": "0.1"}


@dataclass(frozen=True)
class Person:
    address: str
    passphrase: str
    name: str


def health_at(url: str | None) -> dict[str, Any] | None:
    """What a service answers at its /healthz ``url`` (None: no answer, or no URL)."""
    if url is None:
        return None
    try:
        with urllib.request.urlopen(url, timeout=2) as r:  # noqa: S310 - loopback
            return dict(json.loads(r.read()))
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class ChainView:
    """The node and the operator's contracts, read straight."""

    w3: Web3
    token: Any
    market: Any
    registry: Any


class PlanGrid:
    """What every grid of plan processes offers a test (``procs``: the plan). Waits fail with
    the tails of the service logs; ``until`` counts the exceptions in ``retry_on`` as "not
    yet", ``wait`` (blocking) none."""

    procs: list[launcher.Proc]
    retry_on: tuple[type[BaseException], ...] = (AssertionError,)
    every: float = 0.2

    def proc(self, name: str) -> launcher.Proc:
        return next(p for p in self.procs if p.name == name)

    def health(self, name: str) -> dict[str, Any] | None:
        """What ``name`` answers on /healthz (None: no answer, or no health URL)."""
        return health_at(self.proc(name).health_url)

    def log_tails(self, lines: int = 40) -> str:
        out = []
        for p in self.procs:
            if p.log is not None and p.log.exists():
                tail = p.log.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"----- {p.name} ({p.log}) -----\n" + "\n".join(tail))
        return "\n".join(out)

    def fail(self, msg: str) -> NoReturn:
        pytest.fail(f"{msg}\n\nservice log tails:\n{self.log_tails()}", pytrace=False)

    def wait(self, what: str, check: Callable[[], Any], timeout: float = 60, every: float | None = None) -> Any:
        """Block until ``check`` returns something truthy (an exception fails at once)."""
        return wait(check, what=what, timeout=timeout, every=every or self.every, fail=self.fail)

    async def until(self, what: str, check: Callable[[], Awaitable[Any] | Any], timeout: float = 60,
                    every: float | None = None) -> Any:
        """Poll ``check`` (sync or async) until it returns something truthy."""
        return await until(check, what=what, timeout=timeout, every=every or self.every, retry_on=self.retry_on,
                           fail=self.fail)

    def chain_view(self, w3: Web3) -> ChainView:
        """The operator's contracts (token, market and registry, from the market address the
        operator reports) on the node ``w3`` reaches."""
        h = self.health("chain")
        assert h and h.get("market"), h
        market = w3.eth.contract(address=Web3.to_checksum_address(h["market"]),
                                 abi=bindings.load_artifact(bindings.MARKET)["abi"])
        token = w3.eth.contract(address=market.functions.token().call(),
                                abi=bindings.load_artifact(bindings.TOKEN)["abi"])
        registry = w3.eth.contract(address=market.functions.registry().call(),
                                   abi=bindings.load_artifact(bindings.REGISTRY)["abi"])
        return ChainView(w3, token, market, registry)


class RealStack(PlanGrid):
    """Start the plan's processes (``only``: a subset by name), stop them all."""

    def __init__(self, root: pathlib.Path, *, chain_url: str = "anvil", time_scale: float = 1440.0,
                 meter_env: dict[str, dict[str, str]] | None = None, env: dict[str, str] | None = None,
                 only: Iterable[str] | None = None, extra_accounts: Iterable[tuple[str, str]] = (),
                 scrypt_n: int | None = None,
                 add_procs: Callable[[list[launcher.Proc]], list[launcher.Proc]] | None = None,
                 agents: bool = False) -> None:
        self.agents = agents  # each site's agent, as `gridtrade up` starts them
        self.data = root / "data"
        self.chain_url, self.time_scale = chain_url, time_scale
        self.meter_env, self.env = meter_env or {}, env or {}
        self.only = set(only) if only is not None else None
        self.extra_accounts, self.scrypt_n = list(extra_accounts), scrypt_n
        self.add_procs = add_procs  # the plan, with processes of another site added (e.g. its wallet)
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.procs: list[launcher.Proc] = []
        self.people: dict[str, Person] = {}

    # -- start and stop --

    def __enter__(self) -> RealStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> RealStack:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        base = free_port_block()
        opts = launcher.Options(data=self.data, chain_url=self.chain_url, time_scale=self.time_scale,
                                base_port=base, http_port=base + 46, sim_start=SUNNY, agents=self.agents)
        data = self.data.resolve()
        made: dict[str, str] = {}
        if self.scrypt_n is not None:  # tests log in often: accounts made with a cheap scrypt, before prepare()
            for label in (f"{launcher.PRODUCER} producer", f"{launcher.CONSUMER} consumer"):
                site = label.split()[0]
                made[label] = pw = f"{label.split()[1]}-passphrase"
                Keystore(launcher.keystore_of(data, site), scrypt_n=self.scrypt_n).new(pw, name=label, site=site)
        self.options, shown = launcher.prepare(opts, reset=False)
        shown = {**made, **shown}
        assert {"solar-1 producer", "home-7 consumer"} <= set(shown), shown
        self.people["producer"] = Person(self.options.producer_account, shown["solar-1 producer"], "solar-1 producer")
        self.people["consumer"] = Person(self.options.consumer_account, shown["home-7 consumer"], "home-7 consumer")
        for key, label in self.extra_accounts:  # "<site> <label>": the account is in that site's wallet
            pw, site = f"{key}-passphrase", label.split()[0]
            ks = Keystore(launcher.keystore_of(data, site), scrypt_n=self.scrypt_n or 2**18)
            self.people[key] = Person(ks.new(pw, name=label, site=site).address, pw, label)
        self.procs = launcher.plan(self.options)
        if self.add_procs is not None:
            self.procs = self.add_procs(self.procs)
        for p in self.procs:
            if p.name.startswith("meter-"):
                p.env.update(self.meter_env.get(p.name, {}))
            if p.name != "anvil":
                p.env.update(self.env)
        for p in self.procs:
            if self.only is None or p.name in self.only:
                self.spawn(p.name)
                self.wait_healthy(p.name)
        if "chain" in self.children:
            self.wait("the chain service to deploy the contracts", lambda: (self.health("chain") or {}).get("market"),
                      timeout=90)

    def spawn(self, name: str) -> None:
        p = self.proc(name)
        assert p.log is not None
        with open(p.log, "ab") as log:
            self.children[name] = subprocess.Popen(p.argv, env={**os.environ, **p.env}, stdout=log, stderr=log,
                                                   stdin=subprocess.DEVNULL, cwd=ROOT, start_new_session=True)

    def wait_healthy(self, name: str, timeout: float = 120) -> None:
        p, child = self.proc(name), self.children[name]

        def up() -> bool:
            if child.poll() is not None:
                self.fail(f"{name} exited with {child.returncode} while starting")
            if name == "anvil":
                return answers_rpc(p.extra["rpc"])
            return p.health_url is None or self.health(name) is not None

        self.wait(f"{name} to be healthy", up, timeout=timeout)

    def terminate(self, name: str, sig: int = signal.SIGTERM) -> None:
        """Stop one process and reap it (anvil: its binary first, so the node launcher reaps it)."""
        child = self.children.pop(name, None)
        if child is None:
            return
        if child.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                kids = child_pids(child.pid) if name == "anvil" else []
                for pid in kids:
                    os.kill(pid, sig)
                if not kids:
                    os.killpg(child.pid, sig)
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGKILL)  # anything left in its group
        child.wait()

    def stop(self) -> None:
        for name in reversed(list(self.children)):
            self.terminate(name)

    # -- looking and waiting --

    def url(self, site: str) -> str:
        return next(p.public_url for p in self.procs if p.public_url and p.env["GRIDTRADE_SITE"] == site).rstrip("/")

    def bus_env(self) -> dict[str, str]:
        """Where the services are, for an in-process part (a gateway) joining this grid."""
        return next(p for p in self.procs if p.name == "hub").env

    def wallet_rpc(self, site: str) -> str:
        """The request endpoint of ``site``'s wallet."""
        return self.proc(f"wallet-{site}").env["GRIDTRADE_WALLET_RPC"]
