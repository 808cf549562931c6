"""The chain service: the only talker to Ethereum.

- Bus events become durable jobs (``EnergyProduced`` -> mint, ``TradeAgreed`` -> open,
  buyer-meter ``Delivery`` -> settle, ``TradeStatus`` closed/fulfilled -> close). The
  subscriber's handler only records them, in the transaction that records the event's
  seq; workers then turn jobs into transactions, each checked against on-chain state
  first (the trade id / reading id are the contracts' keys), so nothing is sent twice.
- Requests: accounts, unlock/lock, balances, transfers, escrow, approvals, mining,
  pending transactions. Each account belongs to one site (its keystore file says which,
  see ``keystore.owner``); a request acts for an account only when that site's key sent
  it (the request server's ``Caller``, never the body): else ``not_your_account``,
  nothing done. A site lists and sees the pending transactions of its own accounts only;
  the market's own site (this service's ``GRIDTRADE_SITE``, the operator) sees all.
  Balances of any address are public (they are public on-chain anyway), with the site
  the account belongs to (empty for an address this keystore does not hold). Mining is
  started and stopped only by the market's site. Unlock attempts are throttled per
  account and per calling site before the slow scrypt work starts (``too_many_attempts``).
  A caller without identity (insecure mode, a local ipc socket) is not checked.
- A supervisor connects to the node with exponential backoff, notices a fresh chain
  (chain id + genesis hash + code at the stored addresses) and redeploys there.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from eth_account import Account
from eth_account.signers.local import LocalAccount
from hexbytes import HexBytes
from web3 import AsyncWeb3

from services.bus import Caller, Service
from services.bus import commands as C
from services.bus import events as E
from services.bus.errors import RequestError

from . import contracts, ledger
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
from . import keystore as keystore_mod
from .index import MintedIndex
from .keystore import KeyFile, Keystore
from .node import Node, guard
from .sessions import Sessions, TooManyAttempts, UnlockThrottle
from .txs import TxManager

log = logging.getLogger(__name__)

R = TypeVar("R")

CONSUMED = ("meter.energy_produced", "meter.delivery", "trade.agreed", "trade.status")
MAX_ATTEMPTS = 5


def _errors(fn: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
    """Turn the service's errors into clear request errors (code + message)."""

    @functools.wraps(fn)
    async def wrapper(*args: Any) -> R:
        try:
            return await fn(*args)
        except UnknownAccount as e:
            raise RequestError("unknown_account", str(e)) from None
        except BadPassphrase as e:
            raise RequestError("bad_passphrase", str(e)) from None
        except AccountLocked as e:
            raise RequestError("locked", str(e)) from None
        except ChainUnavailable as e:
            raise RequestError("chain_unavailable", f"{e}; try again later") from None
        except NotSupported as e:
            raise RequestError("not_supported", str(e)) from None
        except TxRejected as e:
            low = e.reason.lower()
            code = "insufficient_funds" if ("insufficient funds" in low or "enough balance" in low) else "rejected"
            raise RequestError(code, f"nothing was sent: {e.reason}") from None
        except KeystoreError as e:
            raise RequestError("keystore", str(e)) from None

    return wrapper


class ChainService(Service):
    name = "chain"
    settings: ChainSettings

    def __init__(self, settings: ChainSettings) -> None:
        super().__init__(settings)
        ledger.init(self.store.conn)
        self.keystore = Keystore(settings.keystore, scrypt_n=settings.scrypt_n)
        self.sessions = Sessions()
        self.unlock_throttle = UnlockThrottle(per_account=settings.unlock_max_failures,
                                              per_site=settings.unlock_site_max_failures,
                                              window_s=settings.unlock_window_s)
        self.refused: dict[str, int] = {}  # calling site -> requests refused for another site's account
        self._known_sites: set[str] | None = None
        self.node: Node | None = None
        self.txm: TxManager | None = None
        self.dep: contracts.Deployment | None = None
        self.operator: LocalAccount | None = None
        self.chain_key = ""
        self.deploy_block = 0
        self.connected = asyncio.Event()
        self.work = asyncio.Event()
        self._started = asyncio.Event()
        self._settle_due_since: float | None = None
        self._settle_skip: dict[str, int] = {}
        self._close_seen: dict[str, float] = {}  # trade id -> when its early close was first seen
        self.reconnects = 0
        self.job_rounds = 0
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="chain-scrypt")
        self._reading: dict[tuple[str, int], asyncio.Future[tuple[int, int, int, int, int]]] = {}
        self.minted = MintedIndex(self.store, logs_range=settings.logs_range)  # Wh minted per account
        self.confirmations = 0  # blocks on top before a transaction counts as final (see attach)

    @property
    def logs_calls(self) -> int:
        """eth_getLogs calls of the minted index so far."""
        return self.minted.calls

    # --- wiring -------------------------------------------------------------------------

    async def setup(self) -> None:
        self.publisher()
        self.subscribe(CONSUMED, self.on_event)
        srv = self.serve(self.settings.bind)
        for req, fn in (
            (C.ListAccounts, self.list_accounts), (C.Unlock, self.unlock), (C.Lock, self.lock),
            (C.GetBalances, self.balances), (C.Transfer, self.transfer), (C.Escrow, self.escrow),
            (C.Approve, self.approve), (C.SetMining, self.set_mining), (C.ListPending, self.list_pending),
            (C.Ping, self.ping),
        ):
            srv.handle(req, fn)
        self.spawn(self.supervise(), "chain-supervisor")

    async def start(self) -> None:
        await super().start()
        self._started.set()

    async def teardown(self) -> None:
        self.sessions.clear()
        self._pool.shutdown(wait=True)
        if self.node is not None:
            await self.node.close()

    def health(self) -> dict[str, Any]:
        return {**super().health(), "chain": self.settings.chain_url if self.settings.chain_url == "embedded"
                else "rpc", "connected": self.connected.is_set(),
                "market": self.dep.market_address if self.dep else None,
                "pending_txs": ledger.count_pending(self.store.conn), "confirmations": self.confirmations,
                "tx_events": dict(self.txm.stats) if self.txm else {},
                "rpc_retried": self.node.transient if self.node else {},
                "refused_other_sites": dict(self.refused), "unlocks_throttled": self.unlock_throttle.refused}

    async def publish(self, body: E.Message) -> Any:
        assert self.pub is not None
        return await self.pub.publish(body)

    # --- connection supervisor ----------------------------------------------------------

    async def supervise(self) -> None:
        await self._started.wait()
        delay, warned = 0.2, False
        while True:
            try:
                if self.node is None:
                    self.node = await node_mod.connect(self.settings.chain_url, timeout_s=self.settings.rpc_timeout_s,
                                                       retries=self.settings.rpc_retries)
                else:
                    await self.node.probe()
                await self.attach()
                self.connected.set()
                if warned:
                    log.info("chain node reachable again")
                delay, warned = 0.2, False
                await self.run_workers()
            except ChainUnavailable as e:
                self.connected.clear()
                if not warned:
                    log.warning("chain node %s unreachable (%s); retrying with backoff up to %.0fs",
                                self.settings.chain_url, e, self.settings.backoff_max_s)
                    warned = True
                    self.reconnects += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.backoff_max_s)
            except ChainError as e:  # configuration: cannot go on
                log.error("chain: %s", e)
                self.request_stop()
                return
            except Exception:  # noqa: BLE001 - a bug: log it, keep trying
                self.connected.clear()
                log.exception("chain: supervisor step failed; retrying")
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.backoff_max_s)

    async def run_workers(self) -> None:
        assert self.txm is not None
        tasks = [asyncio.create_task(self._forever(self.txm.step, self.settings.poll_s, self.txm.wake), name="chain-tx"),
                 asyncio.create_task(self._forever(self.process_jobs, self.settings.poll_s, self.work),
                                     name="chain-jobs"),
                 asyncio.create_task(self._watch(), name="chain-watch"),
                 asyncio.create_task(self._forever(self.save_minted, 2.0, asyncio.Event()), name="chain-index")]
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
            self.sessions.expire()

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
                if failures < 5 or failures % 100 == 0:
                    log.exception("chain: %s failed", getattr(step, "__name__", step))
            try:
                await asyncio.wait_for(wake.wait(), every)
            except asyncio.TimeoutError:
                pass
            wake.clear()

    async def attach(self) -> None:
        """Deploy on a fresh chain or attach to the known contracts; set up the tx manager."""
        assert self.node is not None
        node, s = self.node, self.settings
        if self.operator is None:
            self.operator = self._operator_account(node)
        chain_id, genesis = await node.identity()
        ident = f"{chain_id}:{genesis}"
        conn = self.store.conn
        stored_ident = ledger.get_meta(conn, "identity")
        token, market = ledger.get_meta(conn, "token"), ledger.get_meta(conn, "market")
        if s.token_address and s.market_address:
            token, market = s.token_address, s.market_address
            if not (await node.has_code(token) and await node.has_code(market)):
                raise ChainError(f"no contract code at the configured addresses {token} / {market}")
        elif not (stored_ident == ident and token and market and await node.has_code(token)
                  and await node.has_code(market)):
            if stored_ident is not None:
                log.warning("fresh chain (stored %s, now %s, or no code at the stored addresses): "
                            "not trusting stored addresses, redeploying", stored_ident[:24], ident[:24])
            token, market = await self._deploy()
        assert token and market
        self.dep = contracts.attach(node.w3, token, market)
        self.deploy_block = int(ledger.get_meta(conn, "deploy_block") or 0)
        deployment = ledger.get_meta(conn, "deployment") or "attached"
        self.chain_key = f"{ident}:{market.lower()}:{deployment}"  # a redeploy starts a new key
        async with self.store.atomic() as c:
            ledger.set_meta(c, "identity", ident)
            ledger.set_meta(c, "token", token)
            ledger.set_meta(c, "market", market)
        self.confirmations = (s.confirmation_depth if s.confirmation_depth is not None
                              else 0 if node.kind in ("embedded", "anvil") else 12)
        if self.txm is None:
            self.txm = TxManager(node, self.store, self.publish, chain=self.chain_key, gas_margin=s.gas_margin,
                                 resend_after_s=s.resend_after_s, confirmations=self.confirmations,
                                 replace_after_s=s.replace_after_s, fee_cap_wei=int(s.fee_cap_gwei * 10**9),
                                 min_tip_wei=int(s.priority_fee_gwei * 10**9), bump=s.fee_bump, signer=self._key_of)
            self.txm.on_final.update(mint=self._mint_final, open=self._open_final, settle=self._settle_final,
                                     close=self._close_final)
        self.txm.chain = self.chain_key
        self.txm.chain_id = chain_id
        self.txm.head, _ = await node.head()
        await self.txm.fill_gaps(self.operator.address)
        if node.is_dev and s.dev_fund_wei:
            for kf in self.keystore.list():
                await self.fund(kf.address)
        log.info("chain %s (%s): token %s, market %s, operator %s", ident[:24], node.kind, token, market,
                 self.operator.address)

    def _key_of(self, address: str) -> LocalAccount | None:
        """The key to sign again with (fees raised, a nonce filled): the operator's, or an
        unlocked session's; None while a wallet account is locked."""
        if self.operator is not None and address.lower() == self.operator.address.lower():
            return self.operator
        return self.sessions.account(address) if self.sessions.is_unlocked(address) else None

    def _operator_account(self, node: Node) -> LocalAccount:
        s = self.settings
        if s.operator_address:
            if s.operator_passphrase_file is None:
                raise ChainError("GRIDTRADE_OPERATOR_ADDRESS needs GRIDTRADE_OPERATOR_PASSPHRASE_FILE")
            lines = s.operator_passphrase_file.read_text().splitlines()
            try:
                key = self.keystore.decrypt(s.operator_address, lines[0] if lines else "")
            except KeystoreError as e:
                raise ChainError(f"cannot unlock the operator account: {e}") from None
            return Account.from_key(key)
        if node.dev_key is None:
            raise ChainError("this chain has no prefunded dev account: set GRIDTRADE_OPERATOR_ADDRESS "
                             "(a keystore account) and GRIDTRADE_OPERATOR_PASSPHRASE_FILE")
        return Account.from_key(node.dev_key)

    async def _deploy(self) -> tuple[str, str]:
        assert self.node is not None and self.operator is not None
        if self.node.supports_mining and not await self.node.mining():
            log.warning("mining is stopped; starting it to deploy the contracts")
            await self.node.set_mining(True)
        async with guard():
            dep = await contracts.deploy(self.node.w3, self.operator)
            block = int(await self.node.w3.eth.block_number)
        async with self.store.atomic() as c:
            ledger.set_meta(c, "deploy_block", str(block))
            ledger.set_meta(c, "deployment", uuid.uuid4().hex)
        log.info("deployed EnergyToken at %s and EnergyMarket at %s", dep.token_address, dep.market_address)
        return dep.token_address, dep.market_address

    async def fund(self, address: str) -> str | None:
        """Dev chains: give ``address`` dev_fund_wei once (per chain)."""
        s = self.settings
        if self.node is None or not self.node.is_dev or not s.dev_fund_wei or self.txm is None:
            return None
        assert self.operator is not None
        address = AsyncWeb3.to_checksum_address(address)
        async with self.store.atomic() as conn:
            if conn.execute("SELECT 1 FROM chain_funded WHERE chain = ? AND account = ?",
                            (self.chain_key, address)).fetchone():
                return None
            tx = await self.txm.build(self.operator.address, to=address, value=s.dev_fund_wei, gas=21000)
            tx_hash = await self.txm.prepare(self.operator, tx, kind="fund", ref=address)
            conn.execute("INSERT INTO chain_funded (chain, account, tx_hash) VALUES (?, ?, ?)",
                         (self.chain_key, address, tx_hash))
        return tx_hash

    # --- bus events -> jobs -------------------------------------------------------------

    def on_event(self, env: Any, conn: Any) -> None:
        """Runs inside the subscriber's transaction: record the job, nothing else."""
        body = env.body
        if isinstance(body, E.EnergyProduced):
            if not self.mint_allowed(env, body):
                log.warning("not minting %s: site %s may not mint to %s", body.reading_id, env.site, body.account)
                return
            conn.execute("INSERT OR IGNORE INTO chain_mints (reading_id, account, wh, seq) VALUES (?, ?, ?, ?)",
                         (body.reading_id, AsyncWeb3.to_checksum_address(body.account), body.wh,
                          ledger.next_seq(conn, "chain_mints")))
        elif isinstance(body, E.TradeAgreed):
            self._record_trade(conn, body)
        elif isinstance(body, E.Delivery):
            if body.role != "consumer":
                return  # the seller's meter only cross-checks; the buyer's meter pays
            conn.execute("INSERT INTO chain_deliveries (trade_id, site, delivered_wh, final) VALUES (?, ?, ?, ?) "
                         "ON CONFLICT (trade_id, site) DO UPDATE SET delivered_wh = MAX(delivered_wh, excluded.delivered_wh), "
                         "final = excluded.final",  # in order: a relay that closes again un-finals it
                         (body.trade_id, body.site, body.delivered_wh, int(body.final)))
        elif isinstance(body, E.TradeStatus):
            if body.state not in ("closed", "fulfilled"):
                return
            self._record_trade(conn, body)
            conn.execute("UPDATE chain_trades SET close_state = 'queued', close_wh = MAX(close_wh, ?) "
                         "WHERE trade_id = ? AND close_state = 'none'", (body.delivered_wh, body.trade_id))
        else:
            return
        self.store.on_commit(self.work.set)

    def mint_allowed(self, env: Any, body: E.EnergyProduced) -> bool:
        """Whether the publishing site may have ``body.account`` minted to: a site mints
        only to its own accounts. The bus's publish policy already holds ``body.site`` and
        the reading id to the publishing site (``env.site``, which the hub vouches for).

        HOOK: once the keystore records each account's site, this also requires the
        account's site to be ``env.site``; until then any account is taken."""
        return body.site == env.site

    @staticmethod
    def _record_trade(conn: Any, t: E.TradeAgreed | E.TradeStatus) -> None:
        conn.execute(
            "INSERT OR IGNORE INTO chain_trades (trade_id, seller, buyer, buyer_site, wh, price, seq) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (t.trade_id, AsyncWeb3.to_checksum_address(t.seller), AsyncWeb3.to_checksum_address(t.buyer),
             t.buyer_site, t.wh, str(t.price_wei_per_kwh), ledger.next_seq(conn, "chain_trades")))

    # --- jobs -> transactions -----------------------------------------------------------

    async def process_jobs(self) -> None:
        if self.dep is None or self.txm is None:
            return
        await self._mints()
        await self._opens()
        await self._settlements()
        await self._closes()
        self.job_rounds += 1

    def _have_pending(self) -> bool:
        return ledger.count_pending(self.store.conn) > 0

    async def _fail_job(self, kind: str, ref: str, account: str, reason: str) -> None:
        """A job the chain refuses: nothing is sent; say so on the bus."""
        await self.publish(E.TxUpdate(tx_hash="", kind=kind, ref=ref, account=account, status="failed",
                                      reason=reason[:500]))
        log.warning("%s %s refused: %s", kind, ref, reason)

    async def _mints(self) -> None:
        assert self.dep is not None and self.txm is not None and self.operator is not None
        rows = self.store.conn.execute(
            "SELECT reading_id, account, wh FROM chain_mints WHERE state = 'queued' ORDER BY seq LIMIT 100").fetchall()
        for rid, account, wh in rows:
            key = contracts.id32(rid)
            async with guard():
                done = await self.dep.token.functions.minted(key).call(block_identifier=self.txm.final_block)
            async with self.store.atomic() as conn:
                if done:  # minted already (by an earlier run): record it, publish once
                    conn.execute("UPDATE chain_mints SET state = 'done' WHERE reading_id = ?", (rid,))
                    await self.publish(E.Minted(reading_id=rid, account=account, wh=wh, tx_hash=""))
                    continue
                try:
                    tx = await self.txm.build(self.operator.address, to=self.dep.token_address,
                                              data=self.dep.token.encode_abi("mint", args=[account, wh, key]))
                except TxRejected as e:
                    if self._have_pending():
                        continue  # may depend on a pending transaction: try again later
                    conn.execute("UPDATE chain_mints SET state = 'failed', reason = ? WHERE reading_id = ?",
                                 (e.reason, rid))
                    await self._fail_job("mint", rid, account, e.reason)
                    continue
                h = await self.txm.prepare(self.operator, tx, kind="mint", ref=rid, meta={"account": account, "wh": wh})
                conn.execute("UPDATE chain_mints SET state = 'sent', tx_hash = ? WHERE reading_id = ?", (h, rid))

    async def _mint_final(self, row: dict[str, Any], receipt: Any, ok: bool, reason: str) -> None:
        conn = self.store.conn
        rid = row["ref"]
        if ok:
            conn.execute("UPDATE chain_mints SET state = 'done' WHERE reading_id = ?", (rid,))
            await self.publish(E.Minted(reading_id=rid, account=row["meta"]["account"], wh=row["meta"]["wh"],
                                        tx_hash=row["tx_hash"]))
        else:  # look at the chain again next round (a reverted mint is refused there with its reason)
            conn.execute("UPDATE chain_mints SET state = 'queued', reason = ? WHERE reading_id = ?", (reason, rid))
        self.store.on_commit(self.work.set)

    async def _trade_on_chain(self, trade_id: str) -> tuple[int, int]:
        """(status, settled Wh) of a trade in the market contract."""
        assert self.dep is not None
        async with guard():
            t = await self.dep.market.functions.trades(contracts.id32(trade_id)).call(
                block_identifier=self.txm.final_block if self.txm else "latest")
        return int(t[2]), int(t[4])

    async def _opens(self) -> None:
        assert self.dep is not None and self.txm is not None and self.operator is not None
        rows = self.store.conn.execute(
            "SELECT trade_id, seller, buyer, wh, price FROM chain_trades WHERE open_state = 'queued' "
            "ORDER BY seq LIMIT 100").fetchall()
        for tid, seller, buyer, wh, price in rows:
            status, _ = await self._trade_on_chain(tid)
            async with self.store.atomic() as conn:
                if status != contracts.STATUS_NONE:
                    conn.execute("UPDATE chain_trades SET open_state = 'done' WHERE trade_id = ?", (tid,))
                    await self.publish(E.TradeRecorded(trade_id=tid, tx_hash=""))
                    continue
                try:
                    data = self.dep.market.encode_abi("open", args=[contracts.id32(tid), seller, buyer, wh, int(price)])
                    tx = await self.txm.build(self.operator.address, to=self.dep.market_address, data=data)
                except TxRejected as e:
                    if self._have_pending():
                        continue
                    conn.execute("UPDATE chain_trades SET open_state = 'failed', reason = ? WHERE trade_id = ?",
                                 (e.reason, tid))
                    await self._fail_job("open", tid, buyer, e.reason)
                    continue
                h = await self.txm.prepare(self.operator, tx, kind="open", ref=tid)
                conn.execute("UPDATE chain_trades SET open_state = 'sent', open_tx = ? WHERE trade_id = ?", (h, tid))

    async def _open_final(self, row: dict[str, Any], receipt: Any, ok: bool, reason: str) -> None:
        conn = self.store.conn
        if ok:
            conn.execute("UPDATE chain_trades SET open_state = 'done' WHERE trade_id = ?", (row["ref"],))
            await self.publish(E.TradeRecorded(trade_id=row["ref"], tx_hash=row["tx_hash"]))
        else:
            conn.execute("UPDATE chain_trades SET open_state = 'queued', reason = ? WHERE trade_id = ?",
                         (reason, row["ref"]))
        self.store.on_commit(self.work.set)

    def _due_settlements(self) -> list[tuple[str, int, int, int, str]]:
        """(trade_id, target Wh, settled Wh, trade Wh, price) of open trades whose buyer meter is ahead."""
        rows = self.store.conn.execute(
            "SELECT t.trade_id, MIN(d.delivered_wh, t.wh), t.settled_wh, t.wh, t.price FROM chain_trades t "
            "JOIN chain_deliveries d ON d.trade_id = t.trade_id AND d.site = t.buyer_site "
            "WHERE t.open_state = 'done' AND t.close_state = 'none' AND t.settle_tx = '' "
            "AND MIN(d.delivered_wh, t.wh) > t.settled_wh ORDER BY t.seq").fetchall()
        return [r for r in rows if self._settle_skip.get(r[0]) != r[1]]

    async def _settlements(self) -> None:
        assert self.dep is not None and self.txm is not None and self.operator is not None
        due = self._due_settlements()
        if not due:
            self._settle_due_since = None
            return
        now = time.monotonic()
        if self._settle_due_since is None:
            self._settle_due_since = now
        if now - self._settle_due_since < self.settings.settle_window_s:
            asyncio.get_running_loop().call_later(self.settings.settle_window_s, self.work.set)
            return  # collect a little longer, then settle them together
        self._settle_due_since = None
        batch: list[tuple[str, int]] = []
        for tid, target, _settled, _wh, _price in due[: self.settings.settle_max_batch]:
            status, on_chain = await self._trade_on_chain(tid)
            if status != contracts.STATUS_OPEN or on_chain >= target:
                await self._sync_closed(tid, status, on_chain)
                continue
            batch.append((tid, target))
        if not batch:
            return
        m = self.dep.market
        if len(batch) == 1:
            data = m.encode_abi("settle", args=[contracts.id32(batch[0][0]), batch[0][1]])
        else:
            data = m.encode_abi("settleBatch", args=[[contracts.id32(t) for t, _ in batch], [w for _, w in batch]])
        async with self.store.atomic() as conn:
            try:
                tx = await self.txm.build(self.operator.address, to=self.dep.market_address, data=data)
            except TxRejected as e:
                for tid, target in batch:
                    self._settle_skip[tid] = target  # until the meter moves on
                log.warning("settlement of %s refused: %s", ", ".join(t for t, _ in batch), e.reason)
                return
            ref = ",".join(t for t, _ in batch)[:500]
            h = await self.txm.prepare(self.operator, tx, kind="settle", ref=ref,
                                       meta={"targets": [[t, w] for t, w in batch]})
            conn.executemany("UPDATE chain_trades SET settle_tx = ?, settle_target = ? WHERE trade_id = ?",
                             [(h, w, t) for t, w in batch])

    async def _sync_closed(self, tid: str, status: int, on_chain: int) -> None:
        """The chain is ahead of us (an earlier run, or the buyer closed on-chain): catch up."""
        async with self.store.atomic() as conn:
            conn.execute("UPDATE chain_trades SET settled_wh = MAX(settled_wh, ?) WHERE trade_id = ?", (on_chain, tid))
            if status == contracts.STATUS_CLOSED:
                await self._closed(conn, tid, on_chain, "")

    async def _closed(self, conn: Any, tid: str, delivered: int, tx_hash: str, refunded: int | None = None) -> None:
        row = conn.execute("SELECT wh, price, closed_published FROM chain_trades WHERE trade_id = ?", (tid,)).fetchone()
        if row is None:
            return
        wh, price, published = int(row[0]), int(row[1]), int(row[2])
        conn.execute("UPDATE chain_trades SET close_state = 'done', closed_published = 1, settled_wh = MAX(settled_wh, ?)"
                     " WHERE trade_id = ?", (delivered, tid))
        if not published:
            paid = contracts.cost(delivered, price)
            await self.publish(E.TradeClosedOnChain(
                trade_id=tid, delivered_wh=delivered, paid_wei=paid, tx_hash=tx_hash,
                refunded_wei=refunded if refunded is not None else contracts.cost(wh, price) - paid))

    async def _settle_final(self, row: dict[str, Any], receipt: Any, ok: bool, reason: str) -> None:
        conn = self.store.conn
        for tid, target in row["meta"]["targets"]:
            conn.execute("UPDATE chain_trades SET settle_tx = '' WHERE trade_id = ? AND settle_tx = ?",
                         (tid, row["tx_hash"]))
            if not ok:
                continue
            r = conn.execute("SELECT wh, price, settled_wh FROM chain_trades WHERE trade_id = ?", (tid,)).fetchone()
            wh, price, settled = int(r[0]), int(r[1]), int(r[2])
            if target > settled:
                conn.execute("UPDATE chain_trades SET settled_wh = ? WHERE trade_id = ?", (target, tid))
                await self.publish(E.Settled(trade_id=tid, delivered_wh=target, paid_wei=contracts.cost(target, price),
                                             tx_hash=row["tx_hash"]))
            if target >= wh:  # a full delivery closes the trade in the contract
                await self._closed(conn, tid, target, row["tx_hash"], refunded=0)
        self.store.on_commit(self.work.set)

    async def _closes(self) -> None:
        assert self.dep is not None and self.txm is not None and self.operator is not None
        rows = self.store.conn.execute(
            "SELECT t.trade_id, t.wh, t.open_state, MAX(t.close_wh, COALESCE(d.delivered_wh, 0)), COALESCE(d.final, 0) "
            "FROM chain_trades t LEFT JOIN chain_deliveries d ON d.trade_id = t.trade_id AND d.site = t.buyer_site "
            "WHERE t.close_state = 'queued' AND t.open_state IN ('done', 'failed') AND t.settle_tx = '' "
            "ORDER BY t.seq LIMIT 100").fetchall()
        for tid, wh, open_state, want, final in rows:
            if open_state == "failed":  # never opened: nothing to close on-chain
                async with self.store.atomic() as conn:
                    conn.execute("UPDATE chain_trades SET close_state = 'done' WHERE trade_id = ?", (tid,))
                continue
            if int(want) < int(wh) and not final:  # closed early: wait for the buyer meter's last reading
                first = self._close_seen.setdefault(tid, time.monotonic())
                left = first + self.settings.close_grace_s - time.monotonic()
                if left > 0:
                    asyncio.get_running_loop().call_later(left, self.work.set)
                    continue
            status, on_chain = await self._trade_on_chain(tid)
            if status != contracts.STATUS_OPEN:
                await self._sync_closed(tid, status, on_chain)
                continue
            target = max(on_chain, min(int(want), int(wh)))
            async with self.store.atomic() as conn:
                try:
                    data = self.dep.market.encode_abi("close", args=[contracts.id32(tid), target])
                    tx = await self.txm.build(self.operator.address, to=self.dep.market_address, data=data)
                except TxRejected as e:
                    if self._have_pending():
                        continue
                    conn.execute("UPDATE chain_trades SET close_state = 'failed', reason = ? WHERE trade_id = ?",
                                 (e.reason, tid))
                    await self._fail_job("close", tid, self.operator.address, e.reason)
                    continue
                h = await self.txm.prepare(self.operator, tx, kind="close", ref=tid, meta={"target": target})
                conn.execute("UPDATE chain_trades SET close_state = 'sent', close_tx = ? WHERE trade_id = ?", (h, tid))

    async def _close_final(self, row: dict[str, Any], receipt: Any, ok: bool, reason: str) -> None:
        conn = self.store.conn
        tid = row["ref"]
        if not ok:
            conn.execute("UPDATE chain_trades SET close_state = 'queued' WHERE trade_id = ?", (tid,))
            self.store.on_commit(self.work.set)
            return
        assert self.dep is not None
        delivered, refunded = int(row["meta"]["target"]), None
        for ev in self.dep.market.events.TradeClosed().process_receipt(receipt, errors=_DISCARD):
            delivered, refunded = int(ev["args"]["deliveredWh"]), int(ev["args"]["refundedWei"])
        r = conn.execute("SELECT price, settled_wh FROM chain_trades WHERE trade_id = ?", (tid,)).fetchone()
        if r is not None and delivered > int(r[1]):
            await self.publish(E.Settled(trade_id=tid, delivered_wh=delivered,
                                         paid_wei=contracts.cost(delivered, int(r[0])), tx_hash=row["tx_hash"]))
        await self._closed(conn, tid, delivered, row["tx_hash"], refunded=refunded)

    # --- chain state read from events, incrementally -------------------------------------

    async def index_minted(self) -> int:
        """Catch the Wh-minted index up to the head minus the confirmation depth (bounded
        eth_getLogs ranges from its stored block, reorg-aware: see ``index.MintedIndex``);
        returns the block it is complete to. A view never scans from the deployment."""
        node, dep, _ = self._ready()
        return await self.minted.catch_up(node, dep.token, key=self.chain_key, deploy_block=self.deploy_block,
                                          depth=self.confirmations)

    async def save_minted(self) -> None:
        """Catch the generated totals up and store them with their block."""
        await self.index_minted()
        await self.minted.save()

    # --- requests -----------------------------------------------------------------------

    def owner(self, kf: KeyFile) -> str:
        """The site an account belongs to (an older file without one: see keystore.owner)."""
        if self._known_sites is None:
            try:
                self._known_sites = set(self.security.sites().values())
            except Exception:  # noqa: BLE001 - no usable allow-list (insecure mode): no known sites
                self._known_sites = set()
        return keystore_mod.owner(kf, known_sites=self._known_sites, default=self.settings.site)

    def sees_all(self, caller: Caller) -> bool:
        """The market's own site (and a caller without identity) sees and controls everything."""
        return caller.site is None or caller.site == self.settings.site

    def _account(self, caller: Caller, address: str) -> KeyFile:
        """The keystore file of ``address`` if the calling site may act for it; else refuse."""
        kf = self.keystore.find(address)  # UnknownAccount for an address that is not ours
        if not caller.may_act_for(self.owner(kf)):
            site = str(caller)
            n = self.refused[site] = self.refused.get(site, 0) + 1
            if n <= 10 or n % 1000 == 0:
                log.warning("refused a request of site %s for account %s of another site (%d so far)",
                            site, kf.address, n)
            raise RequestError("not_your_account", f"account {kf.address} does not belong to site {site}; "
                                                   "nothing was done")
        return kf

    async def ping(self, req: C.Ping, caller: Caller) -> C.Pong:
        return C.Pong(node=self.source, uptime_s=time.time() - self.started_at)

    async def list_accounts(self, req: C.ListAccounts, caller: Caller) -> C.Accounts:
        out = []
        for kf in self.keystore.list():
            site = self.owner(kf)
            if self.sees_all(caller) or caller.site == site:
                out.append(C.AccountInfo(address=kf.address, name=kf.name, site=site,
                                         unlocked=self.sessions.is_unlocked(kf.address)))
        return C.Accounts(accounts=out)

    @_errors
    async def unlock(self, req: C.Unlock, caller: Caller) -> C.Unlocked:
        kf = self._account(caller, req.address)  # before any work
        try:
            slot = self.unlock_throttle.begin(kf.address, caller.site or "")
        except TooManyAttempts as e:
            wait = int(e.retry_after_s) + 1
            raise RequestError("too_many_attempts", f"too many failed unlock attempts for {e.what}; nothing was "
                                                    f"tried; try again in {wait} s") from None
        key = await asyncio.get_running_loop().run_in_executor(
            self._pool, self.keystore.decrypt, kf.address, req.passphrase.get_secret_value())
        self.unlock_throttle.succeeded(slot)
        session = self.sessions.unlock(key, req.ttl_s)
        del key
        log.info("unlocked %s for %.0fs (site %s)", session.address, req.ttl_s, caller)
        if self.connected.is_set():
            try:
                await self.fund(session.address)
            except (ChainUnavailable, TxRejected) as e:
                log.warning("could not fund %s: %s", session.address, e)
        return C.Unlocked(address=session.address, expires_at=session.expires_at)

    @_errors
    async def lock(self, req: C.Lock, caller: Caller) -> C.Ok:
        kf = self._account(caller, req.address)
        if self.sessions.lock(kf.address):
            log.info("locked %s", kf.address)
        return C.Ok()

    def _ready(self) -> tuple[Node, contracts.Deployment, TxManager]:
        if not self.connected.is_set() or self.node is None or self.dep is None or self.txm is None:
            raise ChainUnavailable("not connected to the chain node")
        return self.node, self.dep, self.txm

    def _signer(self, caller: Caller, address: str) -> LocalAccount:
        kf = self._account(caller, address)  # another site's account: refused, unlocked or not
        if self.sessions.is_unlocked(kf.address):
            return self.sessions.account(kf.address)
        raise AccountLocked(f"account {kf.address} is locked: unlock it first")

    @_errors
    async def balances(self, req: C.GetBalances, caller: Caller) -> C.Balances:
        """Public, for any address (as on-chain), with the site the account belongs to; as of
        the head block. Concurrent reads of one account at one block share one set of node
        calls, so a burst of readers costs the node what one reader does."""
        node, _, _ = self._ready()
        a = AsyncWeb3.to_checksum_address(req.address)
        try:
            site = self.owner(self.keystore.find(a))
        except UnknownAccount:
            site = ""
        async with guard():
            head = int(await node.w3.eth.block_number)
        key = (a, head)
        fut = self._reading.get(key)
        if fut is None:
            fut = self._reading[key] = asyncio.ensure_future(self._read_balances(a, head))
            fut.add_done_callback(lambda _: self._reading.pop(key, None))
        ether, free, locked, credit, tokens = await asyncio.shield(fut)
        await self.index_minted()
        generated = self.minted.totals.get(a, 0)
        row = self.store.conn.execute(
            "SELECT COALESCE(SUM(wh - settled_wh), 0) FROM chain_trades WHERE seller = ? AND open_state = 'done' "
            "AND close_state != 'done'", (a,)).fetchone()
        return C.Balances(address=a, ether_wei=ether, escrow_free_wei=free, escrow_locked_wei=locked,
                          credit_wei=credit, tokens_wh=tokens, tokens_locked_wh=int(row[0]), generated_wh=generated,
                          site=site)

    async def _read_balances(self, a: str, block: int) -> tuple[int, int, int, int, int]:
        node, dep, _ = self._ready()
        m, t = dep.market.functions, dep.token.functions
        async with guard():  # concurrently: on a remote node, one round trip instead of five
            ether, free, locked, credit, tokens = await asyncio.gather(
                node.w3.eth.get_balance(a, block), m.freeEscrow(a).call(block_identifier=block),
                m.lockedEscrow(a).call(block_identifier=block), m.credit(a).call(block_identifier=block),
                t.balanceOf(a).call(block_identifier=block))
        return int(ether), int(free), int(locked), int(credit), int(tokens)

    @_errors
    async def transfer(self, req: C.Transfer, caller: Caller) -> C.TxSent:
        signer = self._signer(caller, req.sender)
        _, _, txm = self._ready()
        tx = await txm.build(signer.address, to=req.to, value=req.amount_wei)
        return C.TxSent(tx_hash=await txm.prepare(signer, tx, kind="transfer", ref=AsyncWeb3.to_checksum_address(req.to)))

    @_errors
    async def escrow(self, req: C.Escrow, caller: Caller) -> C.TxSent:
        signer = self._signer(caller, req.account)
        _, dep, txm = self._ready()
        m = dep.market
        if req.action == "deposit":
            tx = await txm.build(signer.address, to=dep.market_address, value=req.amount_wei,
                                 data=m.encode_abi("deposit", args=[]))
            kind = "deposit"
        elif req.action == "withdraw":
            async with guard():
                free = await m.functions.freeEscrow(signer.address).call()
            if req.amount_wei > free:
                raise RequestError("insufficient_escrow",
                                   f"nothing was sent: {req.amount_wei} wei exceeds the free escrow of {free} wei")
            tx = await txm.build(signer.address, to=dep.market_address, data=m.encode_abi("withdraw", args=[req.amount_wei]))
            kind = "withdraw"
        else:
            async with guard():
                credit = await m.functions.credit(signer.address).call()
            if credit == 0 or req.amount_wei > credit:
                raise RequestError("insufficient_credit",
                                   f"nothing was sent: {req.amount_wei} wei exceeds the credit of {credit} wei "
                                   "(withdraw_credit takes all of it)")
            tx = await txm.build(signer.address, to=dep.market_address, data=m.encode_abi("withdrawCredit", args=[]))
            kind = "withdraw_credit"
        return C.TxSent(tx_hash=await txm.prepare(signer, tx, kind=kind, ref=str(req.amount_wei)))

    @_errors
    async def approve(self, req: C.Approve, caller: Caller) -> C.TxSent:
        signer = self._signer(caller, req.account)
        _, dep, txm = self._ready()
        if req.wh <= 0:
            raise RequestError("bad_amount", "nothing was sent: approve a positive number of Wh")
        t = dep.token.functions
        async with guard():
            balance = await t.balanceOf(signer.address).call()
            allowance = await t.allowance(signer.address, dep.market_address).call()
        want = allowance + req.wh
        if want > balance:
            raise RequestError("insufficient_tokens", f"nothing was sent: approving {want} Wh in all exceeds the "
                                                      f"token balance of {balance} Wh")
        tx = await txm.build(signer.address, to=dep.token_address,
                             data=dep.token.encode_abi("approve", args=[dep.market_address, want]))
        return C.TxSent(tx_hash=await txm.prepare(signer, tx, kind="approve", ref=str(req.wh)))

    @_errors
    async def set_mining(self, req: C.SetMining, caller: Caller) -> C.Mining:
        """Any site may ask the status; only the market's site starts and stops mining."""
        market = self.sees_all(caller)
        if not market and req.action != "status":
            raise RequestError("not_allowed", f"mining is started and stopped by the market (site "
                               f"{self.settings.site}) only; nothing was done")
        node, _, txm = self._ready()
        if not node.supports_mining:
            if req.action == "status":
                return C.Mining(mining=True, supported=False, controllable=False,
                                detail=f"mining control is not supported on this chain ({node.client or node.url})")
            await node.set_mining(req.action == "start")  # raises NotSupported
        if req.action != "status":
            on = req.action == "start"
            was = await node.mining()
            await node.set_mining(on, self.settings.block_interval_s)
            if was != on:
                await self.publish(E.MiningChanged(mining=on))
                log.info("mining %s", "started" if on else "stopped")
            if on:
                self.store.on_commit(txm.wake.set)
        detail = node.kind if market else f"{node.kind}; started and stopped by the market (site {self.settings.site})"
        return C.Mining(mining=await node.mining(), supported=True, detail=detail, controllable=market)

    @_errors
    async def list_pending(self, req: C.ListPending, caller: Caller) -> C.Pending:
        """A site sees its own accounts' pending transactions; the market's site sees all."""
        rows = ledger.pending_txs(self.store.conn, req.account)
        if req.recent_s:
            rows += ledger.recent_txs(self.store.conn, time.time() - req.recent_s, req.account)
        if not self.sees_all(caller):
            if req.account is not None:
                self._account(caller, req.account)
            else:
                mine = {kf.address for kf in self.keystore.list() if self.owner(kf) == caller.site}
                rows = [r for r in rows if AsyncWeb3.to_checksum_address(r["account"]) in mine]
        describe = self.txm.describe if self.txm is not None else (lambda r: {})
        return C.Pending(txs=[
            C.TxInfo(tx_hash=r["tx_hash"], kind=r["kind"], ref=r["ref"], account=r["account"],
                     status=r["status"] if r["status"] in ("confirmed", "failed") else "pending", **describe(r))
            for r in rows])


try:  # web3's log-processing error policy
    from web3.logs import DISCARD as _DISCARD
except ImportError:  # pragma: no cover
    _DISCARD = "discard"  # type: ignore[assignment]
