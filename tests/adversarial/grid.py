"""The real grid for the adversarial tests, and the hostile process run against it.

The grid is the processes of ``launcher.plan()`` (without the gateways but the
consumer's) started as real subprocesses by :class:`~tests.support.plan.RealStack`
on an anvil node: the hub, the market's operator and auction, and per site its wallet and
meter. A third site ('probe') has its own CURVE key on the grid's allow-list and an
account in its own keystore (``data/probe/keystore``), served by a wallet of its own
(``wallet-probe``: the real wallet, run with probe's key, as any site with valid keys
could run it). Endpoints, health URLs and data folders are all read from the plan,
services found by their module (and a chain service's role).

The chain is read straight from the node (:meth:`AdvGrid.chain_view`: the operator's
deployment, found from the market address it reports), and a party that sends a
transaction itself, around its site's wallet (a hostile site holds its own account keys),
does so with :meth:`AdvGrid.send`.

:meth:`AdvGrid.hostile` runs ``python -m tests.adversarial.hostile`` (a real process with
one site's key: probe's, or that of a trade's party turned hostile) and returns the JSON
it printed; the honest sites' own requests go through the same script with their own
keys, as their gateways would send them.
"""

from __future__ import annotations

import json
import os
import pathlib
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from eth_account import Account
from web3 import Web3
from web3.exceptions import ContractLogicError

from services import launcher
from services.bus import ensure_keys
from services.chain import bindings
from services.chain.keystore import Keystore
from tests.support.plan import ChainView, RealStack
from tests.support.poll import wait
from tests.support.signing import Domains

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROBE = "probe"
PROBE_PASS = "probe-passphrase"
SERVICE_MODULES = ("services.bus", "services.chain", "services.auction", "services.meter")
SUBSCRIBING = (*SERVICE_MODULES[1:], "services.gateway")


def module_of(p: launcher.Proc) -> str:
    return p.argv[2] if len(p.argv) > 2 and p.argv[1] == "-m" else ""


def store_of(p: launcher.Proc) -> str:
    """The name of a service's store (``<name>.sqlite`` in its data folder) and of its bus
    source (``<site>/<name>``): a chain service's is its role's (the operator's ``chain``,
    a site's ``wallet``)."""
    name = module_of(p).split(".")[1]
    return "wallet" if name == "chain" and p.env.get("GRIDTRADE_CHAIN_ROLE") == "site" else name


def with_probe_wallet(procs: list[launcher.Proc]) -> list[launcher.Proc]:
    """The plan with a wallet for the probe site (like the producer's, in ``data/probe``,
    on ports of the plan's block no other process uses), before the gateways."""
    tpl = next(p for p in procs if p.name == f"wallet-{launcher.PRODUCER}")
    base = int(tpl.env["GRIDTRADE_HUB_PUB"].rsplit(":", 1)[1])
    host = tpl.env["GRIDTRADE_METRICS_HOST"]
    data = pathlib.Path(tpl.env["GRIDTRADE_DATA_DIR"]).parent
    metrics = base + 40
    env = {**tpl.env, "GRIDTRADE_SITE": PROBE, "GRIDTRADE_DATA_DIR": str(data / PROBE),
           "GRIDTRADE_WALLET_RPC": f"tcp://{host}:{base + 14}", "GRIDTRADE_METRICS_PORT": str(metrics)}
    wallet = launcher.Proc(f"wallet-{PROBE}", list(tpl.argv), env, health_url=f"http://{host}:{metrics}/healthz",
                           log=data / "logs" / f"wallet-{PROBE}.log")
    at = next((i for i, p in enumerate(procs) if module_of(p) == "services.gateway"), len(procs))
    return [*procs[:at], wallet, *procs[at:]]


def grid_processes(root: pathlib.Path) -> list[str]:
    """The plan's hub, operator, auction, wallet and meter processes (and a chain node if
    any), and the consumer's gateway (the wallet that would show forged market events), by
    name."""
    plan = launcher.plan(launcher.Options(data=root))
    return [p.name for p in plan if module_of(p) in SERVICE_MODULES and p.argv[3:4] != ["emulate"]
            or p.name == "anvil" or module_of(p) == "services.gateway" and p.env["GRIDTRADE_SITE"] == launcher.CONSUMER]


class AdvGrid:
    """A started RealStack plus what the tests read from it."""

    def __init__(self, root: pathlib.Path, *, env: dict[str, str] | None = None,
                 meter_env: dict[str, dict[str, str]] | None = None, insecure: bool = False,
                 only: Iterable[str] | None = None, probe_scrypt_n: int = 2**10, probe_wallet: bool = True) -> None:
        self.root, self.insecure = root, insecure
        self.wallets: dict[str, launcher.Proc] = {}  # site -> its wallet (once started)
        self._view: ChainView | None = None
        data = root / "data"
        ensure_keys(data.resolve() / "keys", PROBE)  # on the allow-list before any process reads it
        # probe's own account, in its own keystore, made before the services start (a costlier
        # scrypt than the others', so the unlock test can tell a throttled reply from one
        # that ran scrypt); its wallet announces its claim
        ks = Keystore(launcher.keystore_of(data.resolve(), PROBE), scrypt_n=probe_scrypt_n)
        self.probe_account = ks.new(PROBE_PASS, name="probe own", site=PROBE).address
        names = list(only) if only is not None else grid_processes(root)
        if probe_wallet:
            names.append(f"wallet-{PROBE}")
        self.stack = RealStack(root, chain_url="anvil", time_scale=1440, env=env, meter_env=meter_env, only=names,
                               scrypt_n=2**10, add_procs=with_probe_wallet if probe_wallet else None)

    def start(self) -> AdvGrid:
        self.stack.start()
        s = self.stack
        self.hub = self.by_module("services.bus")
        self.chain = self.by_module("services.chain", site=launcher.MARKET)  # the operator
        self.wallets = {p.env["GRIDTRADE_SITE"]: p for p in s.procs if module_of(p) == "services.chain"
                        and store_of(p) == "wallet" and p.name in s.children}
        self.auction = self.by_module("services.auction") if any(
            module_of(p) == "services.auction" and p.name in s.children for p in s.procs) else None
        self.meters = {p.env["GRIDTRADE_SITE"]: p for p in s.procs
                       if module_of(p) == "services.meter" and p.argv[3:4] != ["emulate"] and p.name in s.children}
        self.producer, self.consumer = s.people["producer"], s.people["consumer"]
        return self

    def stop(self) -> None:
        self.stack.stop()

    # --- the plan ------------------------------------------------------------------

    def by_module(self, module: str, site: str | None = None) -> launcher.Proc:
        return next(p for p in self.stack.procs if module_of(p) == module and p.name in self.stack.children
                    and (site is None or p.env["GRIDTRADE_SITE"] == site))

    def subscribers(self) -> list[launcher.Proc]:
        """The running services with a bus subscriber (everything but the hub)."""
        return [p for p in self.stack.procs if p.name in self.stack.children
                and module_of(p) in SUBSCRIBING and p.health_url]

    def health(self, p: launcher.Proc) -> dict[str, Any]:
        h = self.stack.health(p.name)
        assert h is not None, f"{p.name} does not answer /healthz"
        return h

    def db(self, p: launcher.Proc, name: str) -> sqlite3.Connection:
        """The store ``<name>.sqlite`` in ``p``'s data folder (the operator's ``chain``, a
        wallet's ``wallet``, see :func:`store_of`)."""
        path = pathlib.Path(p.env["GRIDTRADE_DATA_DIR"]) / f"{name}.sqlite"
        return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)

    def rows(self, p: launcher.Proc, name: str, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        conn = self.db(p, name)
        try:
            return list(conn.execute(sql, args))
        finally:
            conn.close()

    def outbox(self, p: launcher.Proc, name: str, topic: str) -> list[dict[str, Any]]:
        """What a service published under ``topic`` (its own outbox), in order."""
        return [json.loads(d) for (d,) in self.rows(p, name, "SELECT data FROM bus_outbox WHERE topic = ? "
                                                             "ORDER BY seq", (topic,))]

    # --- counts ----------------------------------------------------------------------

    def counts(self) -> dict[str, Counter[str]]:
        """Every count of refused input, by process: the hub's drops by cause/site; each
        subscriber's drops by cause (``policy:<type>``, ``duplicate``, ...); each wallet's
        refusals (``refused:<site>``, ``unlocks_throttled``); the operator's
        (``production_refused:<site>``, ``meter_keys_refused:<site>``,
        ``deliveries_refused:<site>``, ``claims_refused:<cause>``, and its meter-key jobs by
        state, ``meters:<state>``); the meters' (``deliveries_refused:<site>``,
        ``deliveries_refused_why:<why>``, ``meter_keys_refused:<site>``)."""
        out: dict[str, Counter[str]] = {self.hub.name: Counter(self.health(self.hub)["hub_dropped"])}
        for p in self.subscribers():
            h = self.health(p)
            c = Counter(h["dropped"])
            for site, n in h.get("refused_other_sites", {}).items():
                c[f"refused:{site}"] = n
            if "unlocks_throttled" in h:
                c["unlocks_throttled"] = h["unlocks_throttled"]
            for field in ("production_refused", "meter_keys_refused", "deliveries_refused", "deliveries_refused_why",
                          "claims_refused"):
                for k, n in h.get(field, {}).items():
                    c[f"{field}:{k}"] = n
            if store_of(p) == "chain":  # the operator: its meter-key jobs by state
                for state, n in h.get("meters", {}).items():
                    c[f"meters:{state}"] = n
            out[p.name] = c
        return out

    def expect_counts(self, before: dict[str, Counter[str]], want: dict[str, dict[str, int]],
                      timeout: float = 30) -> dict[str, Counter[str]]:
        """Wait until each named count grew by exactly what ``want`` says (and then a
        moment longer, to see it grows no further); returns the deltas."""

        def deltas() -> dict[str, Counter[str]]:
            now = self.counts()
            return {name: Counter({k: now[name][k] - before.get(name, Counter())[k] for k in now[name]})
                    for name in now}

        def reached() -> bool:
            d = deltas()
            return all(d[name][k] >= n for name, kv in want.items() for k, n in kv.items())

        def short(msg: str) -> None:
            d = deltas()
            got = {name: {k: d[name][k] for k in kv} for name, kv in want.items()}
            self.stack.fail(f"waited {timeout:.0f} s for the counts {want}; they grew by {got}")

        wait(reached, what=f"the counts {want}", timeout=timeout, every=0.2, fail=short)
        time.sleep(1.0)
        d = deltas()
        got = {name: {k: d[name][k] for k in kv} for name, kv in want.items()}
        assert got == want, f"counts grew by {got}, expected {want}; all deltas: {d}"
        return d

    # --- the chain, read and written as any party can ----------------------------------

    def chain_view(self) -> ChainView:
        """The node and the operator's contracts (token, market and registry, from the market
        address the operator reports)."""
        if self._view is None:
            rpc = next(p.extra["rpc"] for p in self.stack.procs if p.name == "anvil")
            self._view = self.stack.chain_view(Web3(Web3.HTTPProvider(rpc, request_kwargs={"timeout": 30})))
        return self._view

    def send(self, key: bytes, call: Any, gas: int = 300_000) -> Any:
        """``call`` (a contract function call) as a transaction signed with ``key``, with a
        fixed gas limit so that one the contract refuses is mined and fails (status 0)
        rather than being refused by gas estimation; returns its receipt."""
        w3 = self.chain_view().w3
        sender = Account.from_key(key)
        tx = call.build_transaction({"from": sender.address, "gas": gas, "chainId": w3.eth.chain_id,
                                     "nonce": w3.eth.get_transaction_count(sender.address, "pending")})
        h = w3.eth.send_raw_transaction(sender.sign_transaction(tx).raw_transaction)
        return w3.eth.wait_for_transaction_receipt(h, timeout=60)

    @staticmethod
    def refusal(call: Any, sender: str) -> str:
        """Why the contract refuses ``call`` from ``sender`` now (its revert reason); fails
        if it would not."""
        try:
            call.call({"from": sender})
        except ContractLogicError as e:
            return bindings.revert_reason(e) or ""
        raise AssertionError(f"the contract took {call.fn_name} from {sender}")

    def account_key(self, site: str, address: str, passphrase: str) -> bytes:
        """A site's account key, from that site's own keystore (what the site itself holds)."""
        return Keystore(launcher.keystore_of(self.stack.data.resolve(), site)).decrypt(address, passphrase)

    def meter_key(self, site: str, meter: str = "main") -> bytes:
        """A site's meter key, from the meter's own key folder and passphrase file at that site
        (what that site holds)."""
        p = next(p for p in self.stack.procs if module_of(p) == "services.meter" and p.env["GRIDTRADE_SITE"] == site
                 and p.argv[3:4] != ["emulate"])
        data = pathlib.Path(p.env["GRIDTRADE_DATA_DIR"])
        (kf,) = Keystore(data / "meter-keys" / meter).list()
        return Keystore(kf.path.parent).decrypt(kf.address, (data / "meter-passphrase").read_text().splitlines()[0])

    def domains(self) -> Domains:
        v = self.chain_view()
        return Domains(int(v.w3.eth.chain_id), v.token.address, v.market.address, v.registry.address)

    # --- the hostile (and the honest sites' requests) ---------------------------------

    def argv(self, attack: str, spec: dict[str, Any], site: str) -> list[str]:
        env = self.hub.env
        argv = [sys.executable, "-m", "tests.adversarial.hostile", attack, json.dumps(spec),
                "--keys", env["GRIDTRADE_KEYS_DIR"], "--site", site, "--hub-pub", env["GRIDTRADE_HUB_PUB"],
                "--hub-site", env["GRIDTRADE_HUB_SITE"], "--chain-rpc", env["GRIDTRADE_CHAIN_RPC"],
                "--auction-rpc", env["GRIDTRADE_AUCTION_RPC"], "--state", str(self.root / f"seqs-{site}.json")]
        for s, w in self.wallets.items():
            argv += ["--wallet-rpc", f"{s}={w.env['GRIDTRADE_WALLET_RPC']}"]
        return argv + (["--insecure"] if self.insecure else [])

    def _env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(ROOT), "GRIDTRADE_LOG_LEVEL": "WARNING"}

    def continue_seqs(self, site: str, seqs: dict[tuple[str, str], int]) -> None:
        """The hostile of ``site`` goes on after these seqs of (source, topic): e.g. after
        what a real publisher of that site has published, so that its next event is the
        one every subscriber applies next."""
        path = self.root / f"seqs-{site}.json"
        state = json.loads(path.read_text()) if path.exists() else {}
        state.update({f"{source}|{topic}": n for (source, topic), n in seqs.items()})
        path.write_text(json.dumps(state))

    def hostile(self, attack: str, spec: dict[str, Any], site: str = PROBE, timeout: float = 120) -> dict[str, Any]:
        r = subprocess.run(self.argv(attack, spec, site), cwd=ROOT, env=self._env(), capture_output=True,
                           timeout=timeout)
        if r.returncode != 0:
            self.stack.fail(f"hostile {attack} exited with {r.returncode}: {r.stderr.decode(errors='replace')[-3000:]}")
        out = json.loads(r.stdout.decode().strip().splitlines()[-1])
        assert not out.get("unsubscribed"), f"the hub passed no subscription for {out['unsubscribed']}"
        return dict(out)

    def hostile_background(self, attack: str, spec: dict[str, Any], site: str = PROBE) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.argv(attack, spec, site), cwd=ROOT, env=self._env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)

    def finish(self, child: subprocess.Popen[bytes], timeout: float = 60) -> dict[str, Any]:
        out, err = child.communicate(timeout=timeout)
        if child.returncode != 0:
            self.stack.fail(f"hostile exited with {child.returncode}: {err.decode(errors='replace')[-3000:]}")
        return dict(json.loads(out.decode().strip().splitlines()[-1]))

    def requests(self, site: str, server: str, *reqs: dict[str, Any]) -> list[dict[str, Any]]:
        """Requests of ``site`` (with its key) to the operator (``chain``), the auction or a
        site's wallet (``wallet:<site>``)."""
        return list(self.hostile("rpc", {"server": server, "requests": list(reqs)}, site=site)["replies"])

    def wait(self, what: str, check: Callable[[], Any], timeout: float = 60) -> Any:
        return self.stack.wait(what, check, timeout=timeout)


def req(type_: str, **body: Any) -> dict[str, Any]:
    return {"type": type_, "body": body}


def ev(type_: str, source: str, topic_site: str | None = None, **body: Any) -> dict[str, Any]:
    f = {"type": type_, "source": source, "body": body}
    if topic_site is not None:
        f["topic_site"] = topic_site
    return f


def frame(body: Any, source: str, topic_site: str | None = None, **change: Any) -> dict[str, Any]:
    """An event body (a bus model, e.g. one made and signed by :class:`tests.support.signing.Meter`)
    as a frame for the hostile, with ``change`` applied after any signing."""
    return ev(body.TYPE, source, topic_site, **{**body.model_dump(mode="json"), **change})
