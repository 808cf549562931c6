"""End-to-end harness: the whole micro-grid from ``launcher.plan()`` as real subprocesses
(anvil, hub, the market's operator and auction, and per site its wallet, meter and
gateway), a user per site talking to its
gateway's REST API, a bus listener (a real CURVE subscriber) and a web3 reader of the
anvil chain, so a test can check every balance straight from the contracts.

Nothing here is timed: every wait is a bounded polling loop that fails with what it
waited for and the tails of the service logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pathlib
import signal
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import requests
from eth_utils import keccak, to_checksum_address
from web3 import HTTPProvider, Web3

from services import launcher
from services.bus import ensure_keys
from tests.support.bus import BusProbe
from tests.support.bus import Grid as HubAddress
from tests.support.plan import PlanGrid
from tests.support.ports import free_port_block

TEST_SITE = "e2e-watch"
SIM_START = "2024-06-21T07:00:00+00:00"  # a clear June morning: production starts at once
SERVICES = ("hub", "chain", "auction", "wallet-solar-1", "wallet-home-7", "meter-solar-1", "meter-home-7",
            "gateway-solar-1", "gateway-home-7")


def cost(wh: int, price: int) -> int:
    """EnergyMarket's rounding, written out again here: floor(wh * price / 1000)."""
    return (wh * price) // 1000


def id32(text: str) -> bytes:
    """A trade's on-chain id."""
    return keccak(text=text)




# --- the bus, as the test sees it -------------------------------------------------------

WATCHED = ("meter.relay", "meter.delivery", "meter.energy_produced", "trade.", "chain.", "market.")


def watch_bus(keys: pathlib.Path, hub_sub: str, root: pathlib.Path) -> BusProbe:
    """Every event with the ``WATCHED`` prefixes, applied once each (a real subscriber with
    the ``TEST_SITE`` key; it only listens)."""
    return BusProbe(HubAddress(keys=keys, hub_pub="", hub_sub=hub_sub, root=root), root, site=TEST_SITE,
                    prefixes=WATCHED, name="e2e-watch", wait_connected=False)


# --- one person at one gateway ------------------------------------------------------------


class ApiError(AssertionError):
    def __init__(self, status: int, body: Any, what: str) -> None:
        super().__init__(f"{what}: HTTP {status}: {body}")
        self.status, self.body = status, body


class User:
    """A person using one site's wallet through the REST API only."""

    def __init__(self, base: str, address: str, passphrase: str) -> None:
        self.base = base.rstrip("/")
        self.address = address
        self.passphrase = passphrase
        self.http: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        self.http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True),
                                          timeout=aiohttp.ClientTimeout(total=30))

    async def close(self) -> None:
        if self.http is not None:
            await self.http.close()
            self.http = None

    async def call(self, method: str, path: str, body: Any = None, *, ok: tuple[int, ...] = (200, 201, 202),
                   key: str | None = None) -> Any:
        """One request; ``key`` (an Idempotency-Key) makes a retried POST run once."""
        assert self.http is not None
        kw: dict[str, Any] = {}
        if body is not None:
            kw["json"] = body
        if key is not None:
            kw["headers"] = {"Idempotency-Key": key}
        async with self.http.request(method, self.base + path, **kw) as r:
            text = await r.text()
            try:
                data = json.loads(text) if text else None
            except ValueError:
                data = text
            if r.status not in ok:
                raise ApiError(r.status, data, f"{method} {path}")
            return data

    async def login(self) -> None:
        assert self.http is not None
        self.http.cookie_jar.clear()
        out = await self.call("POST", "/api/session", {"address": self.address, "passphrase": self.passphrase})
        assert out["address"].lower() == self.address.lower(), out

    async def wallet(self) -> dict[str, Any]:
        return await self.call("GET", "/api/wallet")


# --- the grid ---------------------------------------------------------------------------------


@dataclass
class Grid(PlanGrid):
    """The plan's processes run by ``launcher.Runner``, both users, the watch and a reader of
    the chain (what :class:`~tests.support.plan.PlanGrid` offers, with the ``until`` of a
    user: a refused connection, a timeout or a bad answer while a service restarts counts as
    "not yet")."""

    retry_on = (AssertionError, aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError)
    every = 0.3

    data: pathlib.Path
    options: launcher.Options
    procs: list[launcher.Proc]
    runner: launcher.Runner
    passphrases: dict[str, str]
    w3: Web3
    http: requests.Session
    watch: BusProbe
    producer: User
    consumer: User
    token: Any = None
    market: Any = None
    kills: list[str] = field(default_factory=list)

    # -- processes --

    async def kill(self, name: str) -> None:
        """SIGKILL the process (its whole group) and reap it."""
        child = self.runner.running[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        await child.wait()
        self.kills.append(name)

    async def start(self, name: str) -> None:
        proc = self.proc(name)
        await self.runner.start(proc)
        try:
            await self.runner.wait_healthy(proc, timeout=90)
        except RuntimeError as e:
            self.fail(str(e))

    async def restart(self, name: str) -> None:
        await self.kill(name)
        await self.start(name)

    async def login(self, user: User, timeout: float = 90) -> None:
        """Log in, again while the gateway or chain is busy or restarting (scrypt is slow on
        a loaded machine: the gateway then answers 503 and a person tries again)."""

        async def attempt() -> bool:
            try:
                await user.login()
            except ApiError as e:
                if e.status in (502, 503):
                    raise AssertionError(f"login: {e}") from None
                raise
            return True

        await self.until(f"{user.address} to log in at {user.base}", attempt, timeout=timeout, every=1.0)

    # -- the chain, read straight --

    def attach_contracts(self) -> None:
        view = self.chain_view(self.w3)
        self.market, self.token = view.market, view.token

    def onchain(self, address: str, block: int | str = "latest") -> dict[str, int]:
        a = to_checksum_address(address)
        m, t = self.market.functions, self.token.functions
        at = {"block_identifier": block}
        return {"ether": self.w3.eth.get_balance(a, block), "free": m.freeEscrow(a).call(**at),
                "reserved": m.reservedEscrow(a).call(**at), "locked": m.lockedEscrow(a).call(**at),
                "credit": m.credit(a).call(**at), "tokens": t.balanceOf(a).call(**at)}

    def trade(self, trade_id: str) -> dict[str, Any]:
        return self.trade_by_key(keccak(text=trade_id))

    def trade_by_key(self, key: bytes) -> dict[str, Any]:
        """A trade as the contract holds it, by its on-chain key (the hash of its id)."""
        seller, wh, status, buyer, delivered, price, deadline, closing_at = self.market.functions.trades(key).call()
        return {"seller": seller, "wh": wh, "status": status, "buyer": buyer, "delivered": delivered, "price": price,
                "deadline": deadline, "closing_at": closing_at}

    def minted(self, to_block: int | str = "latest", from_block: int = 0) -> list[dict[str, Any]]:
        """The token's mints in the blocks from ``from_block`` to ``to_block`` (none in an empty
        range: the node refuses a range that starts past its head)."""
        if isinstance(to_block, int) and from_block > to_block:
            return []
        return [dict(ev["args"]) for ev in self.token.events.Minted().get_logs(from_block=from_block,
                                                                                to_block=to_block)]

    def market_events(self, name: str, to_block: int | str = "latest") -> list[dict[str, Any]]:
        return [dict(ev["args"]) for ev in getattr(self.market.events, name)().get_logs(from_block=0,
                                                                                     to_block=to_block)]

    def ether_from_history(self, address: str) -> int:
        """An account's Ether recomputed from every transaction in every block: what it was
        sent minus what it sent and paid in gas (none of these accounts is paid by contracts
        here: nobody withdraws)."""
        a = to_checksum_address(address)
        total = 0
        for n in range(self.w3.eth.block_number + 1):
            block = self.w3.eth.get_block(n, full_transactions=True)
            for tx in block["transactions"]:
                if tx["to"] == a:
                    total += tx["value"]
                if tx["from"] == a:
                    r = self.w3.eth.get_transaction_receipt(tx["hash"])
                    total -= tx["value"] + r["gasUsed"] * r["effectiveGasPrice"]
        return total


async def start_grid(tmp: pathlib.Path, *, time_scale: float = 1440.0, meter_env: dict[str, dict[str, str]] | None
                     = None, service_env: dict[str, str] | None = None, agents: bool = False) -> Grid:
    """Prepare keys and accounts, start every process of the plan, log both users in."""
    data = tmp / "grid"
    base = free_port_block()
    http = base + 46
    opts = launcher.Options(data=data, chain_url="anvil", time_scale=time_scale, base_port=base, http_port=http,
                            agents=agents)
    opts, passphrases = launcher.prepare(opts, reset=True)
    assert set(passphrases) == {"solar-1 producer", "home-7 consumer", *(["utility grid"] if agents else [])}, \
        passphrases
    ensure_keys(data.resolve() / "keys", TEST_SITE)  # before any process loads the allow-list
    procs = launcher.plan(opts)
    for p in procs:
        if p.name.startswith("meter-"):
            p.env["GRIDTRADE_SIM__START"] = SIM_START
            p.env.update((meter_env or {}).get(p.name, {}))
        if p.name != "anvil":
            p.env.update(service_env or {})
    runner = launcher.Runner(procs)
    anvil = next(p for p in procs if p.name == "anvil")
    session = requests.Session()
    w3 = Web3(HTTPProvider(anvil.extra["rpc"], session=session))
    common = next(p for p in procs if p.name == "hub").env
    watch = watch_bus(data.resolve() / "keys", common["GRIDTRADE_HUB_SUB"], tmp / "watch")
    gw = {p.env["GRIDTRADE_SITE"]: p.public_url for p in procs if p.public_url}
    grid = Grid(data=data, options=opts, procs=procs, runner=runner, passphrases=passphrases, w3=w3, http=session,
                watch=watch,
                producer=User(gw["solar-1"], opts.producer_account, passphrases["solar-1 producer"]),
                consumer=User(gw["home-7"], opts.consumer_account, passphrases["home-7 consumer"]))
    try:
        for p in procs:
            await runner.start(p)
            if p.name == "anvil":
                await grid.until("anvil to answer JSON-RPC", lambda: w3.is_connected(), timeout=30)
            else:
                try:
                    await runner.wait_healthy(p, timeout=120)
                except RuntimeError as e:
                    grid.fail(str(e))
            if p.name == "hub":
                await watch.start()
        await grid.until("the chain service to deploy the contracts",
                         lambda: (grid.health("chain") or {}).get("market"), timeout=60)
        grid.attach_contracts()
        for u in (grid.producer, grid.consumer):
            await u.open()
            await grid.login(u)
        if agents:  # the utility's account, unlocked in its wallet with a first escrow for its bids
            done = await launcher.hand_over(opts, {"utility grid": passphrases["utility grid"]})
            assert len(done) == 2, done
    except BaseException:
        await stop_grid(grid)
        raise
    return grid


async def stop_grid(grid: Grid) -> None:
    """Stop everything: SIGTERM in reverse order, then SIGKILL every process group left."""
    for u in (grid.producer, grid.consumer):
        await u.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(grid.runner.stop(), 60)
    for child in grid.runner.running.values():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGKILL)
        if child.returncode is None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(child.wait(), 10)
    await grid.watch.stop()
    grid.http.close()
