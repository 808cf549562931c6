"""``gridtrade up`` as a newcomer runs it: a real process tree, two wallets, Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

from typing import Any

import pytest

from services.launcher import Options, plan
from tests.support import poll
from tests.support.ports import free_port_block


def test_the_plan_names_every_part_once_with_its_own_ports() -> None:
    procs = plan(Options(meters="emulated"))
    names = [p.name for p in procs]
    assert names[:2] == ["hub", "anvil"] and len(set(names)) == len(names)
    assert {"chain", "auction", "wallet-solar-1", "wallet-home-7", "meter-solar-1", "meter-home-7",
            "emulator-solar-1", "gateway-solar-1", "gateway-home-7"} <= set(names)
    urls = [p.health_url for p in procs if p.health_url]
    assert len(set(urls)) == len(urls)
    meter = next(p for p in procs if p.name == "meter-solar-1")
    assert json.loads(meter.env["GRIDTRADE_METERS"])[0]["driver"] == "line"
    by = {p.name: p for p in procs}
    # anvil keeps its state under the data folder; the operator and the wallets use it
    anvil = by["anvil"].argv
    assert anvil[anvil.index("--state") + 1].endswith("chain-node/state.json") and "--state-interval" in anvil
    assert by["chain"].env["GRIDTRADE_CHAIN_URL"] == by["anvil"].extra["rpc"]
    assert (by["chain"].env["GRIDTRADE_SITE"], by["chain"].env["GRIDTRADE_CHAIN_ROLE"]) == ("market", "operator")
    for site in ("solar-1", "home-7"):
        wallet, gateway = by[f"wallet-{site}"].env, by[f"gateway-{site}"].env
        assert (wallet["GRIDTRADE_SITE"], wallet["GRIDTRADE_CHAIN_ROLE"]) == (site, "site")
        assert wallet["GRIDTRADE_DATA_DIR"].endswith(f"/{site}")  # its keystore: <data>/<site>/keystore
        assert gateway["GRIDTRADE_WALLET_RPC"] == wallet["GRIDTRADE_WALLET_RPC"]  # each gateway: its own wallet
    assert by["wallet-solar-1"].env["GRIDTRADE_WALLET_RPC"] != by["wallet-home-7"].env["GRIDTRADE_WALLET_RPC"]


def test_up_refuses_the_embedded_chain(capsys: pytest.CaptureFixture[str]) -> None:
    from services.launcher import main

    assert main(["--chain-url", "embedded", "--data", "/nonexistent/never-made"]) == 2
    assert "embedded chain lives inside one process" in capsys.readouterr().err


def get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.status, r.read()


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def start_up(args: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], str]:
    """Start ``gridtrade up`` as a process (``env``: settings added for every part); return it
    and what it printed until it was ready (the deadline is a failure, not a time assertion)."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})
    out = ""
    deadline = time.monotonic() + 300
    assert proc.stdout is not None
    while "Ctrl-C stops everything" not in out:
        line = proc.stdout.readline()
        assert line or proc.poll() is None, f"gridtrade up exited early:\n{out}"
        out += line
        if time.monotonic() > deadline:
            pytest.fail(f"gridtrade up was not ready in time:\n{out}")
    return proc, out


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_up_starts_everything_prints_the_wallets_and_stops_on_ctrl_c(tmp_path) -> None:  # type: ignore[no-untyped-def]
    base = free_port_block(100)  # the plan's ports and the wallets' HTTP ports at base+80, +81
    args = [sys.executable, "-m", "services.cli", "up", "--data", str(tmp_path / "data"), "--base-port", str(base),
            "--http-port", str(base + 80)]

    proc, out = start_up(args)
    try:
        urls = re.findall(r"wallet of (\S+)\s+(http://\S+)", out)
        assert [site for site, _ in urls] == ["solar-1", "home-7"]
        passphrases = dict(re.findall(r"^\s+(solar-1 producer|home-7 consumer)\s+(\S+)$", out, re.M))
        assert len(passphrases) == 2
        # each wallet lists its own site's demo account only
        listed = {site: json.loads(get(url + "api/accounts")[1])["accounts"] for site, url in urls}
        assert {s: [(a["name"], a["site"]) for a in accts] for s, accts in listed.items()} == {
            "solar-1": [("solar-1 producer", "solar-1")], "home-7": [("home-7 consumer", "home-7")]}
        accounts = listed["solar-1"]
        for _, url in urls:
            assert get(url)[0] == 200 and get(url + "healthz")[0] == 200
        kids = children_of(proc.pid)
        # every part of the default plan: the sites' agents and the utility's site included
        assert len(kids) == len(plan(Options(agents=True, utility_account="0x" + "11" * 20)))
        assert "utility  0x" in out and "unlocked utility's account" in out
        assert not (tmp_path / "data" / "market" / "keystore").exists()  # the market holds no user keystore
        for pw in passphrases.values():  # printed to the person, never written to disk or logs
            for f in (tmp_path / "data").rglob("*"):
                if f.is_file():
                    assert pw.encode() not in f.read_bytes(), f
    finally:
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "stopped." in rest
    for pid in kids:
        assert not os.path.exists(f"/proc/{pid}") or "Z" in open(f"/proc/{pid}/stat").read().split()[2]

    # the next start keeps the state: the same accounts, no new passphrases; this time the
    # meters are serial emulators on pseudo-terminals, read by the real line driver
    args += ["--meters", "emulated"]
    proc, out = start_up(args)
    try:
        assert "passphrases" not in out and accounts[0]["address"] in out
        meter = next(p for p in plan(Options(base_port=base, meters="emulated")) if p.name == "meter-solar-1")
        assert meter.health_url is not None
        health = json.loads(get(meter.health_url)[1])["meters"]["main"]
        assert health["driver"] == "line" and health["connected"] and not health["errors"], health
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=120)
    assert proc.returncode == 0


# --- a whole trade, Ctrl-C, and the same state again -----------------------------------------


class Api:
    """One person at one wallet URL (cookies kept)."""

    def __init__(self, base: str, address: str, passphrase: str) -> None:
        import requests

        self.base, self.address, self.passphrase = base.rstrip("/"), address, passphrase
        self.http = requests.Session()
        self.http.trust_env = False

    def call(self, method: str, path: str, body: Any = None, ok: tuple[int, ...] = (200, 201, 202)) -> Any:
        r = self.http.request(method, self.base + path, json=body, timeout=30)
        assert r.status_code in ok, f"{method} {path}: HTTP {r.status_code}: {r.text[:300]}"
        return r.json() if r.content else None

    def login(self) -> None:
        self.call("POST", "/api/session", {"address": self.address, "passphrase": self.passphrase})


def wait(what: str, check: Any, timeout: float = 120, every: float = 0.5) -> Any:
    return poll.wait(check, what=what, timeout=timeout, every=every, retry_on=(AssertionError, OSError, KeyError),
                     fail=pytest.fail)


@pytest.mark.slow
@pytest.mark.anvil
@pytest.mark.timeout(900)
def test_a_trade_survives_ctrl_c_and_keys_stay_at_their_sites(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``gridtrade up`` as a process: a whole trade through both wallets' APIs, then the
    market's folder holds no user keystore and no key material; Ctrl-C and ``up`` again:
    the same accounts, tokens, Ether, escrow, open offers and trade history, read from
    the chain and from the API."""
    from web3 import HTTPProvider, Web3

    from services.chain.bindings import load_artifact
    from tests.e2e.keys import assert_keys_stay_home

    base = free_port_block(100)  # the plan's ports and the wallets' HTTP ports at base+80, +81
    data = tmp_path / "data"
    args = [sys.executable, "-m", "services.cli", "up", "--data", str(data), "--base-port", str(base),
            "--http-port", str(base + 80), "--time-scale", "1440", "--sim-start", "2024-06-21T09:00:00+00:00",
            "--no-agents"]  # a trade by hand, as in the seed: the state across a restart is the test's own
    logs: list[str] = []
    # the operator settles every 100 Wh (its default is every 1000 Wh, for gas: the 1 kWh trade
    # here would be paid once, at its end), so the buyer closes a trade that has paid a part
    steps = {"GRIDTRADE_SETTLE_EVERY_WH": "100"}

    def start() -> tuple[subprocess.Popen[str], str]:
        proc, out = start_up(args, steps)
        logs.append(out)
        return proc, out

    def stop(proc: subprocess.Popen[str]) -> None:
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0 and "stopped." in rest, rest

    proc, out = start_up(args, steps)
    try:
        urls = dict(re.findall(r"wallet of (\S+)\s+(http://\S+)", out))
        passphrases = dict(re.findall(r"^\s+(solar-1 producer|home-7 consumer)\s+(\S+)$", out, re.M))
        accounts = {s: json.loads(get(u + "api/accounts")[1])["accounts"] for s, u in urls.items()}
        prod = Api(urls["solar-1"], accounts["solar-1"][0]["address"], passphrases["solar-1 producer"])
        cons = Api(urls["home-7"], accounts["home-7"][0]["address"], passphrases["home-7 consumer"])
        for who in (prod, cons):
            wait(f"{who.address} to log in", lambda who=who: who.login() or True)
        wait("the producer's first kWh of tokens", lambda: prod.call("GET", "/api/wallet")["tokens_wh"] >= 1000)
        wait("the consumer's dev Ether", lambda: int(cons.call("GET", "/api/wallet")["ether_wei"]) > 10**17)
        cons.call("POST", "/api/escrow/deposit", {"amount_wei": str(10**17)})
        wait("the deposit", lambda: int(cons.call("GET", "/api/wallet")["escrow_free_wei"]) == 10**17)
        price = 10**15
        offer = prod.call("POST", "/api/offers", {"wh": 1000, "start_price_wei_per_kwh": str(price),
                                                  "duration_s": 3})["offer_id"]
        cons.call("POST", f"/api/offers/{offer}/bids", {"price_wei_per_kwh": str(price)})

        def trade() -> dict[str, Any]:
            rows = [t for t in cons.call("GET", "/api/trades")["trades"] if t["offer_id"] == offer]
            assert rows, "no trade yet"
            return dict(rows[0])

        wait("some energy delivered and paid", lambda: int(trade()["paid_wei"]) > 0, timeout=180)
        cons.call("POST", f"/api/trades/{trade()['trade_id']}/close", {})
        wait("the trade to be settled", lambda: trade()["state"] == "settled", timeout=120)
        # the market stops and starts mining (its own key); a site's wallet only shows it
        env = {**os.environ, "GRIDTRADE_SITE": "market", "GRIDTRADE_KEYS_DIR": str(data / "keys"),
               "GRIDTRADE_CHAIN_RPC": f"tcp://127.0.0.1:{base + 10}"}

        def mining(action: str, site: str = "market") -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "services.cli", "chain", "mining", action], text=True,
                                  capture_output=True, env={**env, "GRIDTRADE_SITE": site}, timeout=60)

        assert "mining off" in mining("stop").stdout
        assert cons.call("GET", "/api/mining")["mining"] is False
        refused = mining("start", site="home-7")
        assert refused.returncode == 1 and "not_allowed" in refused.stderr, refused
        assert "mining on" in mining("start").stdout
        # an offer that stays open across the restart
        open_offer = prod.call("POST", "/api/offers", {"wh": 500, "start_price_wei_per_kwh": str(price),
                                                       "duration_s": 3600})["offer_id"]

        def snapshot() -> dict[str, Any]:
            w = {s: who.call("GET", "/api/wallet") for s, who in (("solar-1", prod), ("home-7", cons))}
            for s in w:
                w[s].pop("pending", None)
            return {"accounts": {s: json.loads(get(u + "api/accounts")[1])["accounts"] for s, u in urls.items()},
                    "wallets": w, "trades": cons.call("GET", "/api/trades")["trades"],
                    "offers": [o for o in cons.call("GET", "/api/offers")["offers"]]}

        wait("no transaction pending", lambda: not prod.call("GET", "/api/wallet")["pending"]
             and not cons.call("GET", "/api/wallet")["pending"])

        def unminted() -> int:  # what the wallet counts as minted to the producer less what it holds
            w = prod.call("GET", "/api/wallet")
            return int(w["generated_wh"]) - int(w["tokens_wh"])

        # the balance comes from the chain and the minted total from the wallet's events: a mint
        # can be in one and not yet in the other, so a snapshot is taken between two reads that agree
        def settled_snapshot() -> dict[str, Any] | None:
            first = unminted()
            snap = snapshot()
            return snap if unminted() == first == int(snap["wallets"]["solar-1"]["generated_wh"]) - int(
                snap["wallets"]["solar-1"]["tokens_wh"]) else None

        before = wait("a snapshot between two mints", settled_snapshot, timeout=60)
        assert [o["offer_id"] for o in before["offers"]] == [open_offer]
        w3 = Web3(HTTPProvider(f"http://127.0.0.1:{base + 45}"))
        market = next(json.loads(get(p.health_url)[1])["market"] for p in plan(Options(base_port=base))
                      if p.name == "chain")
        m = w3.eth.contract(address=market, abi=load_artifact("EnergyMarket")["abi"])
        t = w3.eth.contract(address=m.functions.token().call(), abi=load_artifact("EnergyToken")["abi"])

        def onchain() -> dict[str, Any]:
            return {a: (w3.eth.get_balance(a), m.functions.freeEscrow(a).call(), m.functions.credit(a).call())
                    for a in (prod.address, cons.address)} | {"consumer tokens": t.functions.balanceOf(
                        cons.address).call(), "block": w3.eth.block_number}

        chain_before = onchain()
    finally:
        stop(proc)
    assert_keys_stay_home(data, passphrases)

    proc, out = start()
    try:
        assert "passphrases" not in out  # the same accounts: nothing new made
        for who in (prod, cons):
            wait(f"{who.address} to log in again", lambda who=who: who.login() or True)
        w3 = Web3(HTTPProvider(f"http://127.0.0.1:{base + 45}"))
        chain_after = onchain()
        assert chain_after["block"] >= chain_before["block"]
        chain_before.pop("block"), chain_after.pop("block")
        assert chain_after == chain_before  # Ether, escrow, credit, tokens: read from the restarted node
        after = wait("the wallets to read the chain again", lambda: (s := snapshot()) and s, timeout=60)
        assert after["accounts"] == before["accounts"]
        assert after["trades"] == before["trades"] and after["offers"] == before["offers"]
        for site in ("solar-1", "home-7"):
            b, a = before["wallets"][site], after["wallets"][site]
            for k in ("address", "ether_wei", "escrow_free_wei", "escrow_locked_wei", "credit_wei"):
                assert a[k] == b[k], (site, k, b, a)
        # the producer's meter keeps minting: what it holds grew by what was minted to it since.
        # The balance is read from the chain and the minted total from the wallet's events, so a
        # mint can be in one and not yet in the other: a read where both agree is waited for.
        b = before["wallets"]["solar-1"]

        def grew_by_its_mints() -> bool:
            a = prod.call("GET", "/api/wallet")
            return a["tokens_wh"] - b["tokens_wh"] == a["generated_wh"] - b["generated_wh"] >= 0

        wait("the producer's tokens to have grown by what was minted to it", grew_by_its_mints, timeout=60)
    finally:
        stop(proc)


def test_the_plan_with_agents_gives_each_site_its_agent_and_the_utility_its_site() -> None:
    procs = plan(Options(agents=True, utility_account="0x" + "11" * 20, producer_account="0x" + "22" * 20,
                         consumer_account="0x" + "33" * 20))
    by = {p.name: p for p in procs}
    assert {"agent-solar-1", "agent-home-7", "wallet-utility", "meter-utility", "agent-utility"} <= set(by)
    assert len({p.health_url for p in procs if p.health_url}) == len([p for p in procs if p.health_url])
    binds = [p.env["GRIDTRADE_AGENT_BIND"] for p in procs if p.name.startswith("agent-")]
    wallets = [p.env["GRIDTRADE_WALLET_RPC"] for p in procs if p.name.startswith("wallet-")]
    assert len(set(binds)) == 3 and len(set(wallets)) == 3 and not set(binds) & set(wallets)
    for site, account in (("solar-1", "0x" + "22" * 20), ("home-7", "0x" + "33" * 20), ("utility", "0x" + "11" * 20)):
        agent = by[f"agent-{site}"].env
        assert agent["GRIDTRADE_SITE"] == site and agent["GRIDTRADE_AGENT_ACCOUNT"] == account
        assert agent["GRIDTRADE_WALLET_RPC"] == by[f"wallet-{site}"].env["GRIDTRADE_WALLET_RPC"]  # its own wallet
    for site in ("solar-1", "home-7"):  # each gateway asks its own site's agent
        assert by[f"gateway-{site}"].env["GRIDTRADE_AGENT_RPC"] == by[f"agent-{site}"].env["GRIDTRADE_AGENT_BIND"]
    assert by["agent-utility"].env["GRIDTRADE_AGENT_STRATEGY"] == "utility"
    roles = [m["role"] for m in json.loads(by["meter-utility"].env["GRIDTRADE_METERS"])]
    assert sorted(roles) == ["consumer", "producer"]  # it sells through one meter, buys through the other
    # without agents: no agent, no utility, and the gateways know there is none
    plain = {p.name: p for p in plan(Options())}
    assert not [n for n in plain if n.startswith("agent-") or n.endswith("-utility")]
    assert plain["gateway-home-7"].env["GRIDTRADE_AGENT_RPC"] == ""
