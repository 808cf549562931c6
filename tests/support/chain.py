"""The chain service in a test's process, in both its roles (the market's operator and one
wallet per site, on one embedded chain shared in this process or on an anvil node), and
:class:`Peer`, a test participant with a bus probe and request clients per site."""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from typing import Any

from services.bus import Security
from services.bus import commands as C
from services.bus import events as E
from services.bus import RpcClient
from services.bus.errors import RequestError
from services.chain.config import ChainSettings
from services.chain.keystore import Keystore
from services.chain.operator import OperatorService
from services.chain.service import ChainBase
from services.chain.wallet import WalletService

from .bus import BusProbe, Grid
from .paths import ROOT
from .poll import until
from .ports import free_port

PASS = "correct horse battery staple"
TX = (E.ChainTx, E.WalletTx)  # a transaction's progress: the operator's or a wallet's


def chain_settings(grid: Grid, data_dir: pathlib.Path, url: str, **kw: Any) -> ChainSettings:
    opts: dict[str, Any] = dict(site="market", data_dir=data_dir, keys_dir=grid.keys, hub_pub=grid.hub_pub,
                                hub_sub=grid.hub_sub, heartbeat_s=0.2, chain_url=url, chain_bind="tcp://127.0.0.1:*",
                                scrypt_n=2**10, poll_s=0.05, settle_window_s=0.2, resend_after_s=0.5,
                                backoff_max_s=1.0)
    return ChainSettings(**(opts | kw))


async def start_chain(settings: ChainSettings, timeout: float = 60) -> ChainBase:
    svc: ChainBase = OperatorService(settings) if settings.role == "operator" else WalletService(settings)
    await svc.start()
    await asyncio.wait_for(svc.connected.wait(), timeout)
    return svc


def site_keystore(root: pathlib.Path, site: str) -> Keystore:
    """The keystore of ``site``'s wallet in a stack under ``root``."""
    return Keystore(root / site / "keystore", scrypt_n=2**10)


@dataclass
class Stack:
    """The market's operator and one wallet per site, in this process, on one chain."""

    root: pathlib.Path
    operator: OperatorService
    wallets: dict[str, WalletService]
    url: str

    def wallet(self, site: str) -> WalletService:
        return self.wallets[site]

    def pending(self) -> bool:
        assert self.operator.txm is not None
        return bool(self.operator.txm.pending()) or any(w.txm is not None and w.txm.pending()
                                                        for w in self.wallets.values())

    async def stop(self) -> None:
        for w in self.wallets.values():
            await w.stop()
        await self.operator.stop()


async def start_stack(grid: Grid, root: pathlib.Path, url: str, sites: tuple[str, ...] = ("tester",),
                      timeout: float = 60, **kw: Any) -> Stack:
    """``url``: 'embedded' is one embedded chain shared by the operator and the wallets."""
    if url == "embedded":
        url = f"embedded:{uuid.uuid4().hex}"
    op = await start_chain(chain_settings(grid, root / "market", url, **kw), timeout)
    assert isinstance(op, OperatorService)
    wallets: dict[str, WalletService] = {}
    try:
        for site in sites:
            ws = chain_settings(grid, root / site, url, site=site, chain_role="site",
                                chain_rpc=op.servers[0].endpoint, **kw)
            w = await start_chain(ws, timeout)
            assert isinstance(w, WalletService)
            wallets[site] = w
    except BaseException:
        for w in wallets.values():
            await w.stop()
        await op.stop()
        raise
    return Stack(root, op, wallets, url)


async def stack_with_two_accounts(grid: Grid, root: pathlib.Path, url: str) -> tuple[Stack, str, str]:
    """``start_stack`` once two new accounts (alice and bob to the tests) are in the keystore
    of the 'tester' wallet: ``(stack, alice, bob)``."""
    ks = site_keystore(root, "tester")
    alice, bob = ks.new(PASS, site="tester").address, ks.new(PASS, site="tester").address
    return await start_stack(grid, root, url), alice, bob


async def claimed(stack: Stack, *addresses: str, timeout: float = 30) -> None:
    """Until the operator knows whose each address is (from the wallets' announcements)."""
    await until(lambda: all(stack.operator.claims.site_of(a) for a in addresses), timeout=timeout,
                what=f"the operator to know whose {addresses} are")


async def rounds(svc: Any, n: int = 2, timeout: float = 30) -> None:
    """Wait until the service's job worker has gone round ``n`` more times."""
    start = svc.job_rounds
    await until(lambda: svc.job_rounds >= start + n, every=0.02, timeout=timeout, what=f"{n} more job rounds")


WALLET_REQUESTS = (C.ListAccounts, C.Unlock, C.Lock, C.Transfer, C.Escrow, C.Approve)


@dataclass
class Peer:
    """A test participant on the bus: a probe (it hears ``chain.`` and ``wallet.`` events
    and publishes each event as its proper source: the meters of the site it names, the
    market's auction) and request clients, each with the key of the site it sends as.

    ``request(req, site=...)`` sends as ``site`` (default 'tester') to ``to``: a wallet's
    site or 'operator'; by default a wallet's request goes to the wallet of the site it is
    sent as, mining control and the market's own requests to the operator."""

    probe: BusProbe
    stack: Stack | None
    keys: pathlib.Path
    clients: dict[tuple[str, str], RpcClient] = field(default_factory=dict)
    endpoints: dict[str, tuple[str, str]] = field(default_factory=dict)
    """Where each part answers when it runs as a subprocess: 'operator' or a wallet's site
    -> (endpoint, server site)."""

    async def publish(self, body: Any) -> Any:
        return await self.probe.publish(body)

    def endpoint_of(self, to: str) -> tuple[str, str]:
        if to in self.endpoints:
            return self.endpoints[to]
        assert self.stack is not None
        svc: ChainBase = self.stack.operator if to == "operator" else self.stack.wallet(to)
        return svc.servers[0].endpoint, svc.settings.site

    def client_of(self, as_site: str, to: str) -> RpcClient:
        if (as_site, to) not in self.clients:
            endpoint, server_site = self.endpoint_of(to)
            self.clients[(as_site, to)] = RpcClient(self.probe.ctx, Security(self.keys, as_site), endpoint,
                                                    server_site=server_site)
        return self.clients[(as_site, to)]

    def route(self, req: Any, site: str) -> str:
        wallets = set(self.stack.wallets if self.stack is not None else ()) | (set(self.endpoints) - {"operator"})
        if isinstance(req, WALLET_REQUESTS) or site not in ("market",):
            return site if site in wallets else "operator"
        return "operator"

    async def request(self, req: Any, *, site: str | None = None, to: str | None = None, **kw: Any) -> Any:
        as_site = site or "tester"
        return await self.client_of(as_site, to or self.route(req, as_site)).request(req, timeout=30, **kw)

    async def funded(self, *addresses: str) -> None:
        """Until the operator knows whose each address is and has confirmed as many fundings
        (each claimed account is funded once on a dev chain)."""
        assert self.stack is not None
        await claimed(self.stack, *addresses)
        await self.probe.wait_for(lambda: len([u for u in self.probe.of(E.ChainTx)
                                               if u.kind == "fund" and u.status == "confirmed"]) >= len(addresses))

    async def close_clients(self) -> None:
        for c in self.clients.values():
            await c.close()
        self.clients.clear()


class ChainProcess:
    """``python -m services.chain`` as its own process (the operator, or a site's wallet with
    ``site`` and ``operator``) on the node at ``url``, quick to poll and resend: to be killed."""

    def __init__(self, grid: Grid, data_dir: pathlib.Path, url: str, log: pathlib.Path, site: str = "market",
                 operator: str = "") -> None:
        self.port = free_port()
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.site = site
        self.env = {**os.environ, **grid.env(site), "GRIDTRADE_DATA_DIR": str(data_dir),
                    "GRIDTRADE_CHAIN_URL": url, "GRIDTRADE_CHAIN_BIND": self.endpoint, "GRIDTRADE_SCRYPT_N": "1024",
                    "GRIDTRADE_POLL_S": "0.05", "GRIDTRADE_RESEND_AFTER_S": "0.5", "GRIDTRADE_SETTLE_WINDOW_S": "0.2",
                    "GRIDTRADE_LOG_LEVEL": "INFO", "GRIDTRADE_BACKOFF_MAX_S": "1", "GRIDTRADE_DISPUTE_WINDOW_S": "2"}
        if operator:
            self.env["GRIDTRADE_CHAIN_RPC"] = operator
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "services.chain"], cwd=ROOT, env=self.env,
                                         stdout=out, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


async def up(peer: Any, to: str = "operator", site: str = "market") -> None:
    """Until the (re)started service answers and is connected to the chain."""
    for _ in range(300):
        try:
            await peer.client_of(site, to).request(C.GetBalances(address="0x" + "00" * 20), timeout=1.0)
            return
        except RequestError:
            await asyncio.sleep(0.1)
    raise AssertionError(f"the chain service ({to}) did not come up")
