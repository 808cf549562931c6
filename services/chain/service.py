"""The chain service: the only talker to Ethereum. One package, two roles, chosen by
configuration (``GRIDTRADE_CHAIN_ROLE``, default: the operator at the market's site, a
wallet anywhere else):

- :mod:`services.chain.operator`, at the market: the operator key only. Deploys (or
  attaches to) the contracts and announces them (``chain.deployment``), turns bus events
  into mints, trade opens, settlements and closes, funds newly claimed accounts on dev
  chains, starts and stops mining (the market's own site only). It holds no user key.
- :mod:`services.chain.wallet`, at each site: that site's keystores, unlock sessions,
  balances, the transactions its own accounts sign (escrow deposit/withdraw/reserve, Ether
  transfer, token approval, credit withdrawal) and their offers and bids (EIP-712
  signatures, nothing sent). It serves callers of its own site only,
  announces each account's ownership claim (``wallet.account``), and learns the
  contract addresses from the operator's announcement.

This module is their shared base: the node connection (a supervisor that connects with
exponential backoff and re-attaches after a node restart), the transaction manager, the
incremental index of minted tokens, public balance reads, and the errors every request
handler maps to clear request errors. Each role registers its own handlers and
subscriptions in ``register``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from web3 import AsyncWeb3

from services.bus import Caller, Service, RpcServer
from services.bus import commands as C
from services.bus import events as E
from services.bus import refusals
from services.bus.retry import Backoff, LogThrottle, worth_logging

from . import bindings, ledger
from . import node as node_mod
from .config import ChainSettings
from .errors import (
    AccountLocked,
    BadPassphrase,
    ChainError,
    ChainUnavailable,
    KeystoreError,
    NotSupported,
    TxRejected,
    UnknownAccount,
)
from .index import MintedIndex
from .node import Node, guard
from .txs import OnFinal, TxManager

log = logging.getLogger(__name__)

R = TypeVar("R")


def _errors(fn: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
    """Turn the service's errors into the refusals they mean (code + message)."""

    @functools.wraps(fn)
    async def wrapper(*args: Any) -> R:
        try:
            return await fn(*args)
        except UnknownAccount as e:
            raise refusals.UnknownAccount(str(e)) from None
        except BadPassphrase as e:
            raise refusals.BadPassphrase(str(e)) from None
        except AccountLocked as e:
            raise refusals.Locked(str(e)) from None
        except ChainUnavailable as e:
            raise refusals.ChainUnavailable(f"{e}; try again later") from None
        except NotSupported as e:
            raise refusals.NotSupported(str(e)) from None
        except TxRejected as e:
            low = e.reason.lower()
            refusal = (refusals.InsufficientFunds if ("insufficient funds" in low or "enough balance" in low)
                       else refusals.Rejected)
            raise refusal(f"nothing was sent: {e.reason}") from None
        except KeystoreError as e:
            raise refusals.Keystore(str(e)) from None

    return wrapper


class ChainBase(Service):
    """What both roles share: the node, the contracts, the transaction manager."""

    name = "chain"
    role = ""
    settings: ChainSettings

    def __init__(self, settings: ChainSettings) -> None:
        super().__init__(settings)
        ledger.init(self.store.conn)
        self.node: Node | None = None
        self.txm: TxManager | None = None
        self.dep: bindings.Deployment | None = None
        self.chain_key = ""
        self.chain_id = 0
        self.deploy_block = 0
        self.connected = asyncio.Event()
        self.work = asyncio.Event()
        self._started = asyncio.Event()
        self.reconnects = 0
        self._reading: dict[tuple[str, int], asyncio.Future[tuple[int, ...]]] = {}
        self.minted = MintedIndex(self.store, logs_range=settings.logs_range)  # Wh minted per account
        self.confirmations = 0  # blocks on top before a transaction counts as final (see attach)

    @property
    def logs_calls(self) -> int:
        """eth_getLogs calls of the minted index so far."""
        return self.minted.calls

    # --- wiring -------------------------------------------------------------------------

    async def setup(self) -> None:
        self.publisher()
        srv = self.serve(self.settings.bind)
        srv.handle(C.Ping, self.ping)
        self.register(srv)
        self.spawn(self.supervise(), f"{self.name}-supervisor")

    def register(self, srv: RpcServer) -> None:
        """A role's request handlers, subscriptions and tasks."""
        raise NotImplementedError

    async def start(self) -> None:
        await super().start()
        self._started.set()

    async def teardown(self) -> None:
        if self.node is not None:
            await self.node.close()

    def health(self) -> dict[str, Any]:
        return {**super().health(), "role": self.role,
                "chain": self.settings.chain_url if self.settings.chain_url.startswith("embedded") else "rpc",
                "connected": self.connected.is_set(), "market": self.dep.market_address if self.dep else None,
                "pending_txs": ledger.count_pending(self.store.conn), "confirmations": self.confirmations,
                "tx_events": dict(self.txm.stats) if self.txm else {},
                "rpc_retried": self.node.transient if self.node else {}}

    async def publish(self, body: E.Message) -> Any:
        assert self.pub is not None
        return await self.pub.publish(body)

    # --- what each role adds --------------------------------------------------------------

    async def contracts_on(self, node: Node, ident: str) -> tuple[str, str, str, str]:
        """(token, market, deployment id) on this node: the operator deploys or attaches,
        a wallet takes the operator's announcement."""
        raise NotImplementedError

    def tx_event(self) -> Callable[..., E.Message]:
        """The event class of this role's transactions' progress."""
        return E.ChainTx

    def final_hooks(self) -> dict[str, OnFinal]:
        """Handlers of final transactions by kind."""
        return {}

    async def attached(self) -> None:
        """Runs once the contracts and the transaction manager are ready."""

    def key_of(self, address: str) -> Any:
        """The key to sign one of this role's transactions again with (fees raised, a nonce
        filled), or None while it is not at hand (a locked wallet account: the transaction
        waits for its unlock)."""
        return None

    def workers(self) -> list[tuple[Callable[[], Awaitable[None]], float, asyncio.Event]]:
        """(step, every, wake) of the role's background work while connected."""
        return []

    async def watch_step(self) -> None:
        """Runs every second while connected: raise ChainUnavailable to re-attach."""

    # --- connection supervisor ----------------------------------------------------------

    async def supervise(self) -> None:
        await self._started.wait()
        backoff, unusable = Backoff(0.2, self.settings.backoff_max_s), LogThrottle()
        while True:
            try:
                if self.node is None:
                    self.node = await node_mod.connect(self.settings.chain_url, timeout_s=self.settings.rpc_timeout_s,
                                                       retries=self.settings.rpc_retries)
                else:
                    await self.node.probe()
                await self.attach()
                self.connected.set()
                if unusable.reset():
                    log.info("chain node reachable again")
                backoff.reset()
                await self.run_workers()
            except ChainUnavailable as e:
                self.connected.clear()
                if not unusable.count():
                    self.reconnects += 1
                if unusable.hit():
                    log.warning("%s: chain node %s not usable (%s; %d tries so far); retrying with backoff up to %.0fs",
                                self.role, self.settings.chain_url, e, unusable.count(), self.settings.backoff_max_s)
                await asyncio.sleep(backoff.failed())
            except ChainError as e:  # configuration: cannot go on
                log.error("chain (%s): %s", self.role, e)
                self.request_stop()
                return
            except Exception:  # noqa: BLE001 - a bug: log it, keep trying
                self.connected.clear()
                log.exception("chain: supervisor step failed; retrying")
                await asyncio.sleep(backoff.failed())

    async def run_workers(self) -> None:
        assert self.txm is not None
        steps = [(self.txm.step, self.settings.poll_s, self.txm.wake), (self.save_minted, 2.0, asyncio.Event()),
                 *self.workers()]
        tasks = [asyncio.create_task(self._forever(step, every, wake), name=f"{self.name}-{step.__name__}")
                 for step, every, wake in steps]
        tasks.append(asyncio.create_task(self._watch(), name=f"{self.name}-watch"))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                t.result()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _watch(self) -> None:
        """Notice a node that went away even when there is nothing to send."""
        assert self.node is not None
        while True:
            await asyncio.sleep(1.0)
            await self.node.probe()
            await self.watch_step()

    async def _forever(self, step: Callable[[], Awaitable[None]], every: float, wake: asyncio.Event) -> None:
        failures = 0
        while True:
            try:
                await step()
                failures = 0
            except ChainUnavailable:
                raise
            except Exception:  # noqa: BLE001 - a bug in one step must not stop the service
                failures += 1
                if worth_logging(failures):
                    log.exception("chain: %s failed (%d times in a row)", getattr(step, "__name__", step), failures)
            try:
                await asyncio.wait_for(wake.wait(), every)
            except asyncio.TimeoutError:
                pass
            wake.clear()

    async def attach(self) -> None:
        """Find the contracts on this node and set up the transaction manager."""
        assert self.node is not None
        node, s = self.node, self.settings
        chain_id, genesis = await node.identity()
        ident = f"{chain_id}:{genesis}"
        token, market, registry, deployment = await self.contracts_on(node, ident)
        self.dep = bindings.attach(node.w3, token, market, registry)
        self.chain_id = chain_id
        self.chain_key = f"{ident}:{market.lower()}:{deployment}"  # a redeploy starts a new key
        self.confirmations = (s.confirmation_depth if s.confirmation_depth is not None
                              else 0 if node.kind in ("embedded", "anvil") else 12)
        if self.txm is None:
            self.txm = TxManager(node, self.store, self.publish, chain=self.chain_key, gas_margin=s.gas_margin,
                                 resend_after_s=s.resend_after_s, confirmations=self.confirmations,
                                 replace_after_s=s.replace_after_s, fee_cap_wei=int(s.fee_cap_gwei * 10**9),
                                 min_tip_wei=int(s.priority_fee_gwei * 10**9), bump=s.fee_bump, signer=self.key_of,
                                 update=self.tx_event())
            self.txm.on_final.update(self.final_hooks())
        self.txm.chain = self.chain_key
        self.txm.chain_id = chain_id
        self.txm.confirmations = self.confirmations
        self.txm.head, _ = await node.head()
        await self.attached()
        log.info("%s: chain %s (%s): token %s, market %s", self.role, ident[:24], node.kind, token, market)

    # --- shared reads -------------------------------------------------------------------

    async def ping(self, req: C.Ping, caller: Caller) -> C.Pong:
        return C.Pong(node=self.source, uptime_s=time.time() - self.started_at)

    def _ready(self) -> tuple[Node, bindings.Deployment, TxManager]:
        if not self.connected.is_set() or self.node is None or self.dep is None or self.txm is None:
            raise ChainUnavailable("not connected to the chain node")
        return self.node, self.dep, self.txm

    async def read_balances(self, address: str) -> C.Balances:
        """Public balances of any address as of the head block (site, tokens_locked_wh: the
        role fills them in). Concurrent reads of one account at one block share one set of
        node calls, so a burst of readers costs the node what one reader does."""
        node, _, _ = self._ready()
        a = AsyncWeb3.to_checksum_address(address)
        async with guard():
            head = int(await node.w3.eth.block_number)
        key = (a, head)
        fut = self._reading.get(key)
        if fut is None:
            fut = self._reading[key] = asyncio.ensure_future(self._read_balances(a, head))
            fut.add_done_callback(lambda _: self._reading.pop(key, None))
        ether, free, reserved, until, locked, credit, tokens = await asyncio.shield(fut)
        await self.index_minted()
        return C.Balances(address=a, ether_wei=ether, escrow_free_wei=free, escrow_reserved_wei=reserved,
                          reserved_until=until, escrow_locked_wei=locked, credit_wei=credit, tokens_wh=tokens,
                          generated_wh=self.minted.totals.get(a, 0))

    async def _read_balances(self, a: str, block: int) -> tuple[int, ...]:
        """(ether, free, reserved, reserved until, locked, credit, tokens) of ``a`` at ``block``."""
        node, dep, _ = self._ready()
        m, t = dep.market.functions, dep.token.functions
        async with guard():  # concurrently: on a remote node, one round trip instead of seven
            got = await asyncio.gather(
                node.w3.eth.get_balance(a, block), m.freeEscrow(a).call(block_identifier=block),
                m.reservedEscrow(a).call(block_identifier=block), m.reservedUntil(a).call(block_identifier=block),
                m.lockedEscrow(a).call(block_identifier=block), m.credit(a).call(block_identifier=block),
                t.balanceOf(a).call(block_identifier=block))
        return tuple(int(x) for x in got)

    # --- the minted-token index (public logs) ---------------------------------------------

    async def index_minted(self) -> int:
        """Catch the Wh-minted index up to the head minus the confirmation depth (bounded
        eth_getLogs ranges from its stored block, reorg-aware: see ``index.MintedIndex``);
        returns the block it is complete to. A view never scans from the deployment."""
        node, dep, _ = self._ready()
        return await self.minted.catch_up(node, dep.token, key=self.chain_key, deploy_block=self.deploy_block,
                                          depth=self.confirmations, accounts=self.minted_accounts())

    def minted_accounts(self) -> list[str] | None:
        """Whose mints the index follows (None: every account's)."""
        return None

    async def save_minted(self) -> None:
        """Catch the generated totals up and store them with their block."""
        await self.index_minted()
        await self.minted.save()

    def pending_infos(self, rows: list[dict[str, Any]]) -> list[C.TxInfo]:
        """``TxInfo`` of chain_txs rows: open ones as pending (with their state, nonce,
        current hash, depth, attempts), recently final ones with their outcome."""
        describe = self.txm.describe if self.txm is not None else (lambda r: {})
        return [C.TxInfo(tx_hash=r["tx_hash"], kind=r["kind"], ref=r["ref"], account=r["account"],
                         status=r["status"] if r["status"] in ("confirmed", "failed") else "pending", **describe(r))
                for r in rows]

    def pending_rows(self, req: C.ListPending) -> list[dict[str, Any]]:
        """The open transactions (of one account, or all), plus those final in the last
        ``recent_s`` seconds."""
        rows = ledger.pending_txs(self.store.conn, req.account)
        if req.recent_s:
            rows += ledger.recent_txs(self.store.conn, time.time() - req.recent_s, req.account)
        return rows

    async def mining_status(self, controllable: bool) -> C.Mining:
        node, _, _ = self._ready()
        if not node.supports_mining:
            return C.Mining(mining=True, supported=False, controllable=False,
                            detail=f"mining control is not supported on this chain ({node.client or node.url})")
        detail = node.kind if controllable else (f"{node.kind}; started and stopped by the market's operator "
                                                 f"(site {self.settings.chain_site}) only")
        return C.Mining(mining=await node.mining(), supported=True, detail=detail, controllable=controllable)


def role_class(settings: ChainSettings) -> type[ChainBase]:
    """The chain service of the configured role."""
    if settings.role == "operator":
        from .operator import OperatorService

        return OperatorService
    from .wallet import WalletService

    return WalletService


def make(settings: ChainSettings) -> ChainBase:
    return role_class(settings)(settings)
