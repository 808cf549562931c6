"""Two hosts and a market, joined over TCP with CURVE, and the link cut mid-trade.

Four network namespaces made here: ``net`` holds a bridge (the switch), ``mkt`` the
market host (anvil, hub, the chain service as operator, auction), ``prd`` the producer
site (its wallet, meter and gateway) and ``con`` the consumer site (its wallet, meter and
gateway). Each site's keystore is on its own host, in its wallet's data folder; the
gateway reaches its wallet on its own host only; the market host holds no user key. Each host has one veth into the switch; the
test itself reaches the switch through one veth from the root namespace. Addresses come
from one 10.231.N.0/24 that exists only on these interfaces. Every service is the real
``python -m services.<name>`` run with ``ip netns exec``, configured only by GRIDTRADE_*
environment as a container would be (0.0.0.0 binds, advertised replay hosts, its own keys
folder per host with the others' public keys on the allow-list).

The trade: the producer sells 1 kWh, the consumer buys it; once delivery runs, the
market's cable is pulled for 30 s. Both meters stop hearing the trade heartbeat and open
their relays (fail safe); when the cable is back the trade carries on and ends, and every
balance is read from anvil and checked to the wei.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests
from eth_utils import keccak, to_checksum_address
from web3 import HTTPProvider, Web3

from services.bus import ensure_keys
from services.chain.bindings import load_artifact
from services.chain.keystore import Keystore
from tests.support.poll import wait

ROOT = pathlib.Path(__file__).resolve().parents[2]
ANVIL = ROOT / "node_modules" / ".bin" / "anvil"
PY = sys.executable

SELL_WH = 1000
PRICE = 1_000_000_000_000_007  # wei per kWh (odd: floor(wh * price / 1000) really rounds)
DEPOSIT = 2 * 10**15
AUCTION_S = 3
CUT_AT_WH = 100  # settled on-chain before the cable is pulled
CUT_S = 30.0
STATUS_OPEN, STATUS_CLOSED = 1, 3
SIM = {"GRIDTRADE_SIM__TIME_SCALE": "720", "GRIDTRADE_SIM__LINE_W": "150",  # 1 kWh over the line: ~33 s
       "GRIDTRADE_SIM__START": "2024-06-21T09:00:00+00:00"}  # a clear June morning: production at once
CONSUMER = {"GRIDTRADE_SIM__PANEL__AREA_M2": "0", "GRIDTRADE_SIM__BATTERY__SOC": "0.1"}
SITES = {"mkt": "market", "prd": "solar-1", "con": "home-7"}
HOST_IP = {"mkt": 1, "prd": 2, "con": 3}
TEST_IP = 254


def cost(wh: int, price: int) -> int:
    """EnergyMarket's rounding: floor(wh * price / 1000)."""
    return (wh * price) // 1000


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {out.stderr.strip()}")
    return out


def until(what: str, check: Callable[[], Any], *, timeout: float, every: float = 0.3,
          logs: Callable[[], str] = lambda: "") -> Any:
    """Poll ``check`` until it returns something truthy; errors count as 'not yet'."""
    return wait(check, what=what, timeout=timeout, every=every,
                retry_on=(AssertionError, OSError, ValueError, KeyError, requests.RequestException),
                fail=lambda msg: pytest.fail(f"{msg}\n{logs()}", pytrace=False))


# --- the network ------------------------------------------------------------------------


@dataclass
class Net:
    tag: str
    subnet: int  # the N of 10.231.N.0/24
    made: list[str] = field(default_factory=list)
    root_if: str = ""

    def ns(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def ip(self, host: str) -> str:
        return f"10.231.{self.subnet}.{HOST_IP[host] if host in HOST_IP else TEST_IP}"

    def up(self) -> None:
        net = self.ns("net")
        for host in ("net", *HOST_IP):
            sh("ip", "netns", "add", self.ns(host))
            self.made.append(self.ns(host))
            sh("ip", "-n", self.ns(host), "link", "set", "lo", "up")
        sh("ip", "-n", net, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", net, "link", "set", "br0", "up")
        for host in HOST_IP:  # one cable per host into the switch: <host>0 there, eth0 at the host
            sh("ip", "-n", net, "link", "add", f"{host}0", "type", "veth", "peer", "name", "eth0",
               "netns", self.ns(host))
            sh("ip", "-n", net, "link", "set", f"{host}0", "master", "br0", "up")
            sh("ip", "-n", self.ns(host), "addr", "add", f"{self.ip(host)}/24", "dev", "eth0")
            sh("ip", "-n", self.ns(host), "link", "set", "eth0", "up")
        # the test's own cable, from the root namespace into the switch
        self.root_if = f"{self.tag}r"[-15:]
        sh("ip", "link", "add", self.root_if, "type", "veth", "peer", "name", "test0", "netns", net)
        sh("ip", "-n", net, "link", "set", "test0", "master", "br0", "up")
        sh("ip", "addr", "add", f"{self.ip('test')}/24", "dev", self.root_if)
        sh("ip", "link", "set", self.root_if, "up")

    def cable(self, host: str, connected: bool) -> None:
        sh("ip", "-n", self.ns("net"), "link", "set", f"{host}0", "up" if connected else "down")

    def down(self) -> None:
        if self.root_if:
            sh("ip", "link", "del", self.root_if, check=False)
        for ns in reversed(self.made):
            sh("ip", "netns", "del", ns, check=False)
        self.made.clear()


def pick_subnet() -> int:
    used = sh("ip", "-4", "route", "show", "table", "all").stdout + sh("ip", "-4", "addr").stdout
    free = [n for n in range(256) if f"10.231.{n}." not in used]
    if not free:
        pytest.skip("every 10.231.N.0/24 is in use on this machine")
    return random.choice(free)


def _remove_stale() -> None:
    """Namespaces and the root veth of an earlier run of this test whose process is gone
    (killed before its teardown ran); only names this test makes (gt2h<pid>-...)."""
    names = [line.split()[0] for line in sh("ip", "netns", "list", check=False).stdout.splitlines() if line.strip()]
    links = [line.split(":")[1].strip().split("@")[0] for line in sh("ip", "-o", "link", check=False).stdout.splitlines()]
    for name in names + links:
        m = re.fullmatch(r"gt2h(\d+)(-(net|mkt|prd|con|probe)|r)", name)
        if m is None or pathlib.Path(f"/proc/{m.group(1)}").exists():
            continue
        if name.endswith("r"):
            sh("ip", "link", "del", name, check=False)
        else:
            sh("ip", "netns", "del", name, check=False)


@pytest.fixture
def net() -> Iterator[Net]:
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (`ip`) is not installed (`./gridtrade test` installs it)")
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (ip netns add)")
    _remove_stale()
    tag = f"gt2h{os.getpid()}"
    probe = subprocess.run(["ip", "netns", "add", f"{tag}-probe"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"network namespaces are not permitted here: {probe.stderr.strip()}")
    sh("ip", "netns", "del", f"{tag}-probe")
    n = Net(tag, pick_subnet())
    try:
        n.up()
        yield n
    finally:
        n.down()


# --- the processes ----------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    host: str
    popen: subprocess.Popen[bytes]
    log: pathlib.Path
    health: str | None


class Hosts:
    def __init__(self, net: Net, data: pathlib.Path) -> None:
        self.net, self.data = net, data
        self.procs: dict[str, Proc] = {}
        self.http = requests.Session()
        self.http.trust_env = False  # never a proxy: these addresses exist only here
        self.no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def keys(self, host: str) -> pathlib.Path:
        return self.data / host / "keys"

    def make_keys(self) -> None:
        """Each host its own key pair; every host allows the others' public keys."""
        for host, site in SITES.items():
            ensure_keys(self.keys(host), site)
        for host in SITES:
            for other, site in SITES.items():
                shutil.copy(self.keys(other) / f"{site}.key", self.keys(host) / "allowed" / f"{site}.key")

    def env(self, host: str, service: str, extra: dict[str, str]) -> dict[str, str]:
        m = self.net.ip("mkt")
        base = {k: v for k, v in os.environ.items() if not k.startswith("GRIDTRADE_")}
        return {**base, "GRIDTRADE_SITE": SITES[host], "GRIDTRADE_DATA_DIR": str(self.data / host / service),
                "GRIDTRADE_KEYS_DIR": str(self.keys(host)), "GRIDTRADE_LOG_LEVEL": "INFO",
                "GRIDTRADE_HUB_PUB": f"tcp://{m}:5550", "GRIDTRADE_HUB_SUB": f"tcp://{m}:5551",
                "GRIDTRADE_HUB_SITE": "market", "GRIDTRADE_CHAIN_RPC": f"tcp://{m}:5560",
                "GRIDTRADE_CHAIN_SITE": "market", "GRIDTRADE_AUCTION_RPC": f"tcp://{m}:5561",
                "GRIDTRADE_AUCTION_SITE": "market", "GRIDTRADE_METRICS_HOST": "0.0.0.0",
                "GRIDTRADE_REPLAY_BIND": "tcp://0.0.0.0:*", "GRIDTRADE_REPLAY_ADVERTISE": self.net.ip(host),
                **extra}

    def start(self, name: str, host: str, argv: list[str], env: dict[str, str], health: str | None) -> Proc:
        log = self.data / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            popen = subprocess.Popen(["ip", "netns", "exec", self.net.ns(host), *argv], env=env, cwd=ROOT,
                                     stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        p = self.procs[name] = Proc(name, host, popen, log, health)
        return p

    def service(self, name: str, host: str, module: str, port: int, extra: dict[str, str] | None = None) -> Proc:
        extra = dict(extra or {})
        if module == "services.gateway":
            extra.update(GRIDTRADE_HTTP_HOST="0.0.0.0", GRIDTRADE_HTTP_PORT=str(port))
        else:
            extra["GRIDTRADE_METRICS_PORT"] = str(port)
        env = self.env(host, module.rsplit(".", 1)[1], extra)
        return self.start(name, host, [PY, "-m", module], env, f"http://{self.net.ip(host)}:{port}/healthz")

    def healthz(self, name: str) -> dict[str, Any]:
        url = self.procs[name].health
        assert url is not None
        with self.no_proxy.open(url, timeout=2) as r:  # noqa: S310 - our own namespace
            return dict(json.loads(r.read()))

    def wait_healthy(self, name: str, timeout: float = 120) -> dict[str, Any]:
        p = self.procs[name]

        def ok() -> dict[str, Any]:
            assert p.popen.poll() is None, f"{name} exited with {p.popen.returncode}"
            h = self.healthz(name)
            assert h.get("ready"), h
            return h

        return until(f"{name} to be healthy", ok, timeout=timeout, logs=self.tails)

    def tails(self, lines: int = 30) -> str:
        out = []
        for p in self.procs.values():
            if p.log.exists():
                tail = p.log.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"----- {p.name} -----\n" + "\n".join(tail))
        return "service log tails:\n" + "\n".join(out)

    def stop(self) -> None:
        for p in reversed(list(self.procs.values())):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.popen.pid, signal.SIGTERM)
        for p in reversed(list(self.procs.values())):
            try:
                p.popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.popen.pid, signal.SIGKILL)
                p.popen.wait()
            with contextlib.suppress(ProcessLookupError, PermissionError):  # children (anvil's binary)
                os.killpg(p.popen.pid, signal.SIGKILL)
        self.http.close()


class Wallet:
    """One user at their site's gateway, through the REST API."""

    def __init__(self, hosts: Hosts, base: str, address: str, passphrase: str) -> None:
        self.hosts, self.base, self.address, self.passphrase = hosts, base, address, passphrase
        self.http = requests.Session()
        self.http.trust_env = False

    def call(self, method: str, path: str, body: Any = None, *, key: str | None = None) -> Any:
        headers = {"Idempotency-Key": key} if key else {}
        r = self.http.request(method, self.base + path, json=body, headers=headers, timeout=30)
        if r.status_code == 401 and path != "/api/session":
            self.login()
            r = self.http.request(method, self.base + path, json=body, headers=headers, timeout=30)
        assert r.status_code in (200, 201, 202), f"{method} {path}: HTTP {r.status_code}: {r.text[:500]}"
        return r.json() if r.content else None

    def login(self) -> None:
        out = self.call("POST", "/api/session", {"address": self.address, "passphrase": self.passphrase})
        assert out["address"].lower() == self.address.lower(), out

    def wallet(self) -> dict[str, Any]:
        return dict(self.call("GET", "/api/wallet"))

    def trade_of(self, offer_id: str) -> dict[str, Any]:
        rows = [t for t in self.call("GET", "/api/trades")["trades"] if t["offer_id"] == offer_id]
        assert rows, f"no trade for offer {offer_id} yet"
        return dict(rows[0])


# --- the test ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.anvil
@pytest.mark.timeout(900)
def test_trade_across_hosts_survives_a_cut_link(net: Net, tmp_path: pathlib.Path) -> None:
    if not ANVIL.exists():
        pytest.fail(f"{ANVIL} is missing; run `npm ci` in {ROOT}")
    hosts = Hosts(net, tmp_path)
    wallets: list[Wallet] = []
    try:
        _run(net, hosts, wallets)
    finally:
        for w in wallets:
            w.http.close()
        hosts.stop()


def _run(net: Net, hosts: Hosts, wallets: list[Wallet]) -> None:
    m = net.ip("mkt")
    hosts.make_keys()
    # each user's keystore lives on its own site's host, with that site's wallet (quick scrypt for the test)
    prod_pw, cons_pw = "sunny-roof-1", "cosy-home-7"
    prod_addr = Keystore(hosts.data / "prd" / "chain" / "keystore", scrypt_n=2**12).new(
        prod_pw, name="producer", site=SITES["prd"]).address
    cons_addr = Keystore(hosts.data / "con" / "chain" / "keystore", scrypt_n=2**12).new(
        cons_pw, name="consumer", site=SITES["con"]).address

    # the market host: anvil, hub, chain, auction
    hosts.start("anvil", "mkt", [str(ANVIL), "--host", m, "--port", "8545", "--silent"], dict(os.environ), None)
    session = requests.Session()
    session.trust_env = False
    w3 = Web3(HTTPProvider(f"http://{m}:8545", session=session))
    until("anvil to answer in the market's namespace", w3.is_connected, timeout=60, logs=hosts.tails)
    hosts.service("hub", "mkt", "services.bus", 9100, {"GRIDTRADE_PUB_BIND": "tcp://0.0.0.0:5550",
                                                       "GRIDTRADE_SUB_BIND": "tcp://0.0.0.0:5551"})
    hosts.wait_healthy("hub")
    # the operator settles every 50 Wh (its default is every 1000 Wh, for gas: this 1 kWh trade
    # would be settled once, at its end), so a part is settled before the cut
    hosts.service("chain", "mkt", "services.chain", 9101, {"GRIDTRADE_CHAIN_URL": f"http://{m}:8545",
                                                           "GRIDTRADE_CHAIN_ROLE": "operator",
                                                           "GRIDTRADE_CHAIN_BIND": "tcp://0.0.0.0:5560",
                                                           "GRIDTRADE_SETTLE_EVERY_WH": "50"})
    hosts.service("auction", "mkt", "services.auction", 9102, {"GRIDTRADE_AUCTION_BIND": "tcp://0.0.0.0:5561"})
    # the two sites, each on its own host: its wallet (reached on loopback by its gateway only), meter, gateway
    wallet = {"GRIDTRADE_CHAIN_URL": f"http://{m}:8545", "GRIDTRADE_CHAIN_ROLE": "site",
              "GRIDTRADE_CHAIN_BIND": "tcp://127.0.0.1:5562"}
    hosts.service("wallet-prd", "prd", "services.chain", 9101, wallet)
    hosts.service("wallet-con", "con", "services.chain", 9101, wallet)
    meter = {"GRIDTRADE_TRADE_TIMEOUT_S": "2", **SIM}
    hosts.service("meter-prd", "prd", "services.meter", 9100,
                  {**meter, "GRIDTRADE_ROLE": "producer", "GRIDTRADE_ACCOUNT": prod_addr})
    hosts.service("meter-con", "con", "services.meter", 9100,  # its key signs the deliveries that pay
                  {**meter, **CONSUMER, "GRIDTRADE_ROLE": "consumer", "GRIDTRADE_ACCOUNT": cons_addr})
    own_wallet = {"GRIDTRADE_WALLET_RPC": "tcp://127.0.0.1:5562"}
    hosts.service("gateway-prd", "prd", "services.gateway", 8080, own_wallet)
    hosts.service("gateway-con", "con", "services.gateway", 8080, own_wallet)
    for name in ("chain", "auction", "wallet-prd", "wallet-con", "meter-prd", "meter-con", "gateway-prd",
                 "gateway-con"):
        hosts.wait_healthy(name)
    market_addr = until("the chain service to deploy the contracts",
                        lambda: hosts.healthz("chain").get("market"), timeout=90, logs=hosts.tails)
    market = w3.eth.contract(address=to_checksum_address(market_addr), abi=load_artifact("EnergyMarket")["abi"])
    token = w3.eth.contract(address=market.functions.token().call(), abi=load_artifact("EnergyToken")["abi"])

    prod = Wallet(hosts, f"http://{net.ip('prd')}:8080", prod_addr, prod_pw)
    cons = Wallet(hosts, f"http://{net.ip('con')}:8080", cons_addr, cons_pw)
    wallets += [prod, cons]
    for w in (prod, cons):
        until(f"{w.address} to log in at {w.base}", lambda w=w: w.login() or True, timeout=60, logs=hosts.tails)

    # production on the producer's host mints tokens through the market's chain service
    until("the producer to hold 1 kWh of tokens", lambda: prod.wallet()["tokens_wh"] >= SELL_WH, timeout=120,
          logs=hosts.tails)
    until("the consumer's dev Ether", lambda: int(cons.wallet()["ether_wei"]) > DEPOSIT, timeout=60, logs=hosts.tails)
    cons.call("POST", "/api/escrow/deposit", {"amount_wei": str(DEPOSIT)}, key="two-hosts-deposit")
    until("the deposit to show as free escrow", lambda: int(cons.wallet()["escrow_free_wei"]) == DEPOSIT,
          timeout=60, logs=hosts.tails)

    offer = prod.call("POST", "/api/offers", {"wh": SELL_WH, "start_price_wei_per_kwh": str(PRICE),
                                              "duration_s": AUCTION_S}, key="two-hosts-offer")
    offer_id = offer["offer_id"]
    until("the offer to be listed at the consumer's gateway",
          lambda: any(o["offer_id"] == offer_id for o in cons.call("GET", "/api/offers")["offers"]), timeout=30,
          logs=hosts.tails)
    cons.call("POST", f"/api/offers/{offer_id}/bids", {"price_wei_per_kwh": str(PRICE)}, key="two-hosts-bid")
    row = until("the auction to close and the trade to be recorded on-chain",
                lambda: (r := cons.trade_of(offer_id))["state"] in ("recorded", "delivering") and r,
                timeout=120, logs=hosts.tails)
    trade_id, tid = row["trade_id"], keccak(text=row["trade_id"])

    def onchain_trade(block: int | str = "latest") -> dict[str, Any]:
        seller, wh, status, buyer, delivered, price, *_ = market.functions.trades(tid).call(block_identifier=block)
        return {"seller": seller, "wh": wh, "status": status, "buyer": buyer, "delivered": delivered, "price": price}

    t = onchain_trade()
    assert (t["seller"], t["buyer"], t["wh"], t["price"]) == (prod_addr, cons_addr, SELL_WH, PRICE), t

    def relays() -> tuple[bool | None, bool | None]:
        return tuple(hosts.healthz(n)["meters"]["main"]["relay_closed"] for n in ("meter-prd", "meter-con"))  # type: ignore[return-value]

    until("both relays to close", lambda: relays() == (True, True), timeout=60, logs=hosts.tails)
    until(f"{CUT_AT_WH} Wh to be delivered and settled", lambda: onchain_trade()["delivered"] >= CUT_AT_WH,
          timeout=120, every=0.2, logs=hosts.tails)
    t_cut = onchain_trade()
    assert t_cut["status"] == STATUS_OPEN and t_cut["delivered"] < SELL_WH, ("the trade ended before the cut", t_cut)

    # pull the market host's cable: both sites lose the hub, the trade heartbeat with it
    cut_at = time.monotonic()
    net.cable("mkt", connected=False)
    try:
        until("both relays to open (fail safe)", lambda: relays() == (False, False), timeout=CUT_S - 5,
              every=0.2, logs=hosts.tails)
        time.sleep(max(0.0, CUT_S - (time.monotonic() - cut_at)))
        assert relays() == (False, False), "a relay closed again while the market was unreachable"
        why = {n: hosts.healthz(n)["meters"]["main"]["why"] for n in ("meter-prd", "meter-con")}
    finally:
        net.cable("mkt", connected=True)
    assert all("heartbeat" in reason for reason in why.values()), why  # opened by the fail safe
    at_return = onchain_trade()["delivered"]

    # the link is back: the trade carries on (relays close again) and ends
    closed_again: list[str] = []

    def ended() -> bool:
        if relays() == (True, True) and not closed_again:
            closed_again.append("yes")
        return bool(onchain_trade()["status"] == STATUS_CLOSED)

    until("the trade to end on-chain after the link came back", ended, timeout=300, every=0.3, logs=hosts.tails)
    final_row = until("the trade to be settled at the consumer's gateway",
                      lambda: (r := cons.trade_of(offer_id))["state"] == "settled" and r, timeout=120,
                      logs=hosts.tails)
    until("both relays to open after the trade", lambda: relays() == (False, False), timeout=60, logs=hosts.tails)

    # every balance, read from anvil at one block, to the wei
    block = w3.eth.block_number
    t = onchain_trade(block)
    delivered = t["delivered"]
    assert t["status"] == STATUS_CLOSED and at_return < delivered <= SELL_WH, ("no delivery after the cut", at_return, t)
    assert closed_again, "after the link came back the relays never closed again"
    # the gateway's row: paid exactly what the chain settled; its delivered_wh is the buyer's
    # meter, which may count a few Wh past the trade while the relays open (the chain caps it)
    assert int(final_row["paid_wei"]) == cost(delivered, PRICE), final_row
    assert final_row["delivered_wh"] >= delivered, final_row
    mf, tf = market.functions, token.functions
    settled = market.events.Settled().get_logs(from_block=0, to_block=block)
    settled = [e["args"] for e in settled if e["args"]["tradeId"] == tid]
    assert sum(e["paidWei"] for e in settled) == cost(delivered, PRICE), settled
    assert sum(e["deltaWh"] for e in settled) == delivered, settled
    closed = [e["args"] for e in market.events.TradeClosed().get_logs(from_block=0, to_block=block)
              if e["args"]["tradeId"] == tid]
    assert len(closed) == 1 and closed[0]["deliveredWh"] == delivered, closed
    assert closed[0]["refundedWei"] == cost(SELL_WH, PRICE) - cost(delivered, PRICE), closed
    minted = [e["args"] for e in token.events.Minted().get_logs(from_block=0, to_block=block)]
    assert all(e["to"] == prod_addr for e in minted), minted
    counters = [e["producedWh"] for e in minted]
    assert counters == sorted(set(counters)), "a production counter was minted twice"
    minted_wh = sum(e["amountWh"] for e in minted)
    assert minted_wh == counters[-1], "minted more than the meter signed"

    def at(fn: Any) -> int:
        return int(fn.call(block_identifier=block))

    assert at(mf.freeEscrow(cons_addr)) == DEPOSIT - cost(delivered, PRICE)
    assert at(mf.lockedEscrow(cons_addr)) == 0 and at(mf.reservedEscrow(cons_addr)) == 0
    assert at(mf.credit(prod_addr)) == cost(delivered, PRICE)
    assert at(tf.balanceOf(cons_addr)) == delivered
    assert at(tf.balanceOf(prod_addr)) == minted_wh - delivered
    assert at(tf.balanceOf(market.address)) == 0
    assert w3.eth.get_balance(market.address, block) == DEPOSIT  # escrow left + the seller's credit
    # keys stayed at their hosts: the market host has no keystore file, each site only its own
    def keystore_files(host: str, meter: bool = False) -> set[str]:
        """The account keystores (or, ``meter``, the meter key files) at a host."""
        return {str(p) for p in (hosts.data / host).rglob("UTC--*") if ("meter-keys" in p.parts) == meter}

    assert keystore_files("mkt") == set() and keystore_files("mkt", meter=True) == set()
    assert len(keystore_files("prd", meter=True)) == 1 and len(keystore_files("con", meter=True)) == 1
    assert len(keystore_files("prd")) == 1 and prod_addr[2:].lower() in next(iter(keystore_files("prd")))
    assert len(keystore_files("con")) == 1 and cons_addr[2:].lower() in next(iter(keystore_files("con")))
    for f in (hosts.data / "mkt").rglob("*"):
        if f.is_file():
            assert b'"ciphertext"' not in f.read_bytes() and prod_pw.encode() not in f.read_bytes(), f
    session.close()
