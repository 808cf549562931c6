"""The chain service in its operator role, at the market: the operator key only.

- Deploys the contracts on a fresh chain (chain id + genesis hash + code at the stored
  addresses tell), or attaches to known ones, and announces them on the bus
  (``chain.deployment``): the sites' wallets learn the addresses there.
- Bus events become durable jobs (``EnergyProduced`` -> mint, ``TradeAgreed`` -> open,
  buyer-meter ``Delivery`` -> settle, ``TradeStatus`` closed/fulfilled -> close). The
  subscriber's handler only records them, in the transaction that records the event's
  seq; workers then turn jobs into transactions, each checked against on-chain state
  first (the trade id / reading id are the contracts' keys), so nothing is sent twice.
- Keeps which account belongs to which site from the wallets' signed ownership claims
  (``wallet.account``, see :mod:`services.bus.claims`): a meter's energy is minted only to
  an account its own site claimed (one not claimed yet waits for its claim); on dev chains
  each newly claimed account is given ``dev_fund_wei`` once.
- Requests: public balances of any address (with the site that claimed it), the
  operator's pending transactions (to the market's site), mining status to anyone and
  mining start/stop to the market's own site only. It holds no user key, unlocks
  nothing and signs for nobody but the operator.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import AsyncWeb3

from services.bus import Caller, RpcServer
from services.bus import commands as C
from services.bus import events as E
from services.bus.claims import Claims
from services.bus.envelope import caused_by
from services.bus.errors import RequestError

from . import contracts, ledger
from .config import ChainSettings
from .errors import ChainError, KeystoreError, TxRejected
from .keystore import Keystore
from .node import Node, guard
from .service import ChainBase, _errors
from .txs import OnFinal

log = logging.getLogger(__name__)

CONSUMED = ("meter.energy_produced", "meter.delivery", "trade.agreed", "trade.status")


class OperatorService(ChainBase):
    name = "chain"
    role = "operator"

    def __init__(self, settings: ChainSettings) -> None:
        super().__init__(settings)
        self.claims = Claims(self.store.conn)
        self.operator: LocalAccount | None = None
        self._settle_due_since: float | None = None
        self._settle_skip: dict[str, int] = {}
        self._close_seen: dict[str, float] = {}  # trade id -> when its early close was first seen
        self._funded_seen: set[str] = set()  # chain key + address checked for funding
        self.job_rounds = 0
        self.mints_refused: dict[str, int] = {}  # publishing site -> mints refused for another site's account

    def register(self, srv: RpcServer) -> None:
        self.subscribe(CONSUMED, self.on_event)
        self.subscribe([E.AccountClaimed.TYPE], self.on_claim)
        for req, fn in ((C.GetBalances, self.balances), (C.GetTokensLocked, self.tokens_locked),
                        (C.SetMining, self.set_mining), (C.ListPending, self.list_pending)):
            srv.handle(req, fn)

    def health(self) -> dict[str, Any]:
        return {**super().health(), "operator": self.operator.address if self.operator else None,
                "claimed_accounts": len(self.claims), "claims_refused": dict(self.claims.refused),
                "mints_refused": dict(self.mints_refused)}

    def tx_event(self) -> Any:
        return E.TxUpdate

    def final_hooks(self) -> dict[str, OnFinal]:
        return dict(mint=self._mint_final, open=self._open_final, settle=self._settle_final, close=self._close_final)

    def workers(self) -> list[tuple[Any, float, asyncio.Event]]:
        return [(self.process_jobs, self.settings.poll_s, self.work)]

    # --- the contracts ---------------------------------------------------------------------

    async def contracts_on(self, node: Node, ident: str) -> tuple[str, str, str]:
        s = self.settings
        if self.operator is None:
            self.operator = self._operator_account(node)
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
        self.deploy_block = int(ledger.get_meta(conn, "deploy_block") or 0)
        deployment = ledger.get_meta(conn, "deployment") or "attached"
        async with self.store.atomic() as c:
            ledger.set_meta(c, "identity", ident)
            ledger.set_meta(c, "token", token)
            ledger.set_meta(c, "market", market)
        return token, market, deployment

    async def attached(self) -> None:
        """Announce the deployment (once per deployment: a wallet that starts later gets it
        replayed from the outbox); fund the claimed accounts on a dev chain."""
        assert self.node is not None and self.dep is not None and self.operator is not None
        assert self.txm is not None
        await self.txm.fill_gaps(self.operator.address)
        if ledger.get_meta(self.store.conn, "announced") != self.chain_key:
            chain_id, genesis = await self.node.identity()
            deployment = ledger.get_meta(self.store.conn, "deployment") or "attached"
            async with self.store.atomic() as conn:
                await self.publish(E.Deployment(chain_id=chain_id, genesis=genesis, token=self.dep.token_address,
                                                market=self.dep.market_address, deploy_block=self.deploy_block,
                                                deployment=deployment))
                ledger.set_meta(conn, "announced", self.chain_key)
        self.work.set()
        log.info("operator %s", self.operator.address)

    def key_of(self, address: str) -> LocalAccount | None:
        """The operator's key signs its transactions again (fees raised, a nonce filled)."""
        if self.operator is not None and address.lower() == self.operator.address.lower():
            return self.operator
        return None

    def _operator_account(self, node: Node) -> LocalAccount:
        s = self.settings
        if s.operator_address:
            if s.operator_passphrase_file is None:
                raise ChainError("GRIDTRADE_OPERATOR_ADDRESS needs GRIDTRADE_OPERATOR_PASSPHRASE_FILE")
            lines = s.operator_passphrase_file.read_text().splitlines()
            try:
                key = Keystore(s.keystore, scrypt_n=s.scrypt_n).decrypt(s.operator_address, lines[0] if lines else "")
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

    async def _fund_claimed(self) -> None:
        """Dev chains: each claimed account gets dev_fund_wei once (per chain)."""
        if self.node is None or not self.node.is_dev or not self.settings.dev_fund_wei:
            return
        for address in self.claims.addresses():
            seen = f"{self.chain_key}|{address}"
            if seen in self._funded_seen:
                continue
            try:
                await self.fund(address)
            except TxRejected as e:
                log.warning("could not fund %s: %s", address, e.reason)
                continue
            self._funded_seen.add(seen)

    def on_claim(self, env: Any, conn: Any) -> None:
        """A site's wallet announces one of its accounts (runs in the subscriber's transaction)."""
        if isinstance(env.body, E.AccountClaimed) and self.claims.apply(conn, env.body):
            log.info("account %s belongs to site %s", env.body.address, env.body.site)
            self.store.on_commit(self.work.set)

    # --- bus events -> jobs -------------------------------------------------------------

    def on_event(self, env: Any, conn: Any) -> None:
        """Runs inside the subscriber's transaction: record the job (with the event's id as
        the cause of what it publishes later), nothing else."""
        body = env.body
        if isinstance(body, E.EnergyProduced):
            if not self.mint_allowed(env, body):
                log.warning("not minting %s: site %s may not mint to %s", body.reading_id, env.site, body.account)
                return
            conn.execute("INSERT OR IGNORE INTO chain_mints (reading_id, account, wh, seq, cause) VALUES (?, ?, ?, ?, ?)",
                         (body.reading_id, AsyncWeb3.to_checksum_address(body.account), body.wh,
                          ledger.next_seq(conn, "chain_mints"), env.id))
        elif isinstance(body, E.TradeAgreed):
            self._record_trade(conn, body, env.id)
        elif isinstance(body, E.Delivery):
            if body.role != "consumer":
                return  # the seller's meter only cross-checks; the buyer's meter pays
            conn.execute("INSERT INTO chain_deliveries (trade_id, site, delivered_wh, final, cause) VALUES (?, ?, ?, ?, ?) "
                         "ON CONFLICT (trade_id, site) DO UPDATE SET delivered_wh = MAX(delivered_wh, excluded.delivered_wh), "
                         "final = excluded.final, cause = excluded.cause",  # in order: a relay that closes again un-finals it
                         (body.trade_id, body.site, body.delivered_wh, int(body.final), env.id))
        elif isinstance(body, E.TradeStatus):
            if body.state not in ("closed", "fulfilled"):
                return
            self._record_trade(conn, body, env.id)
            conn.execute("UPDATE chain_trades SET close_state = 'queued', close_wh = MAX(close_wh, ?), close_cause = ? "
                         "WHERE trade_id = ? AND close_state = 'none'", (body.delivered_wh, env.id, body.trade_id))
        else:
            return
        self.store.on_commit(self.work.set)

    def mint_allowed(self, env: Any, body: E.EnergyProduced) -> bool:
        """Whether the publishing site may have ``body.account`` minted to: a site mints
        only to its own accounts. The bus's publish policy already holds ``body.site`` and
        the reading id to the publishing site (``env.site``, which the hub vouches for); an
        account claimed by another site is refused here. An account nobody has claimed yet
        (its wallet's claim may arrive after the meter's reading) is recorded and waits in
        the queue for its claim (see ``_mints``)."""
        owner = self.claims.site_of(body.account)
        allowed = body.site == env.site and owner in ("", env.site)
        if not allowed:  # counted per publishing site (``mints_refused`` in /healthz)
            self.mints_refused[env.site] = self.mints_refused.get(env.site, 0) + 1
        return allowed

    @staticmethod
    def _record_trade(conn: Any, t: E.TradeAgreed | E.TradeStatus, cause: str) -> None:
        conn.execute(
            "INSERT OR IGNORE INTO chain_trades (trade_id, seller, buyer, buyer_site, wh, price, seq, cause) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (t.trade_id, AsyncWeb3.to_checksum_address(t.seller), AsyncWeb3.to_checksum_address(t.buyer),
             t.buyer_site, t.wh, str(t.price_wei_per_kwh), ledger.next_seq(conn, "chain_trades"), cause))

    # --- jobs -> transactions -----------------------------------------------------------

    async def process_jobs(self) -> None:
        if self.dep is None or self.txm is None:
            return
        await self._fund_claimed()
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
            "SELECT reading_id, account, wh, cause FROM chain_mints WHERE state = 'queued' ORDER BY seq LIMIT 100"
        ).fetchall()
        for rid, account, wh, cause in rows:
            owner, site = self.claims.site_of(account), rid.split("/", 1)[0]
            if owner != site:
                if owner:  # claimed by another site since: never minted
                    async with self.store.atomic() as conn, caused_by(cause):
                        reason = f"account {account} belongs to site {owner}, not {site}"
                        conn.execute("UPDATE chain_mints SET state = 'failed', reason = ? WHERE reading_id = ?",
                                     (reason, rid))
                        await self._fail_job("mint", rid, account, reason)
                continue  # not claimed yet: waits for its site's wallet to announce it
            key = contracts.id32(rid)
            async with guard():
                done = await self.dep.token.functions.minted(key).call(block_identifier=self.txm.final_block)
            async with self.store.atomic() as conn, caused_by(cause):
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
            "SELECT trade_id, seller, buyer, wh, price, cause FROM chain_trades WHERE open_state = 'queued' "
            "ORDER BY seq LIMIT 100").fetchall()
        for tid, seller, buyer, wh, price, cause in rows:
            status, _ = await self._trade_on_chain(tid)
            async with self.store.atomic() as conn, caused_by(cause):
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

    def _due_settlements(self) -> list[tuple[str, int, int, int, str, str | None]]:
        """(trade_id, target Wh, settled Wh, trade Wh, price, cause: the buyer meter's last
        delivery) of open trades whose buyer meter is ahead."""
        rows = self.store.conn.execute(
            "SELECT t.trade_id, MIN(d.delivered_wh, t.wh), t.settled_wh, t.wh, t.price, d.cause FROM chain_trades t "
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
        causes: dict[str, str | None] = {}
        for tid, target, _settled, _wh, _price, cause in due[: self.settings.settle_max_batch]:
            status, on_chain = await self._trade_on_chain(tid)
            if status != contracts.STATUS_OPEN or on_chain >= target:
                with caused_by(cause):
                    await self._sync_closed(tid, status, on_chain)
                continue
            batch.append((tid, target))
            causes[tid] = cause
        if not batch:
            return
        m = self.dep.market
        if len(batch) == 1:
            data = m.encode_abi("settle", args=[contracts.id32(batch[0][0]), batch[0][1]])
        else:
            data = m.encode_abi("settleBatch", args=[[contracts.id32(t) for t, _ in batch], [w for _, w in batch]])
        async with self.store.atomic() as conn, caused_by(causes[batch[0][0]]):  # a batch: its first delivery
            try:
                tx = await self.txm.build(self.operator.address, to=self.dep.market_address, data=data)
            except TxRejected as e:
                for tid, target in batch:
                    self._settle_skip[tid] = target  # until the meter moves on
                log.warning("settlement of %s refused: %s", ", ".join(t for t, _ in batch), e.reason)
                return
            ref = ",".join(t for t, _ in batch)[:500]
            h = await self.txm.prepare(self.operator, tx, kind="settle", ref=ref,
                                       meta={"targets": [[t, w] for t, w in batch], "causes": causes})
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
        causes = row["meta"].get("causes", {})
        for tid, target in row["meta"]["targets"]:
            conn.execute("UPDATE chain_trades SET settle_tx = '' WHERE trade_id = ? AND settle_tx = ?",
                         (tid, row["tx_hash"]))
            if not ok:
                continue
            r = conn.execute("SELECT wh, price, settled_wh FROM chain_trades WHERE trade_id = ?", (tid,)).fetchone()
            wh, price, settled = int(r[0]), int(r[1]), int(r[2])
            with caused_by(causes.get(tid)):  # each trade's own delivery, not the batch's first
                if target > settled:
                    conn.execute("UPDATE chain_trades SET settled_wh = ? WHERE trade_id = ?", (target, tid))
                    await self.publish(E.Settled(trade_id=tid, delivered_wh=target,
                                                 paid_wei=contracts.cost(target, price), tx_hash=row["tx_hash"]))
                if target >= wh:  # a full delivery closes the trade in the contract
                    await self._closed(conn, tid, target, row["tx_hash"], refunded=0)
        self.store.on_commit(self.work.set)

    async def _closes(self) -> None:
        assert self.dep is not None and self.txm is not None and self.operator is not None
        rows = self.store.conn.execute(
            "SELECT t.trade_id, t.wh, t.open_state, MAX(t.close_wh, COALESCE(d.delivered_wh, 0)), COALESCE(d.final, 0), "
            "t.close_cause FROM chain_trades t "
            "LEFT JOIN chain_deliveries d ON d.trade_id = t.trade_id AND d.site = t.buyer_site "
            "WHERE t.close_state = 'queued' AND t.open_state IN ('done', 'failed') AND t.settle_tx = '' "
            "ORDER BY t.seq LIMIT 100").fetchall()
        for tid, wh, open_state, want, final, cause in rows:
            with caused_by(cause):  # what closing publishes names the status that closed the trade
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

    # --- requests -----------------------------------------------------------------------

    def is_market(self, caller: Caller) -> bool:
        """The market's own site (and a caller without identity)."""
        return caller.site is None or caller.site == self.settings.site

    @_errors
    async def balances(self, req: C.GetBalances, caller: Caller) -> C.Balances:
        """Public, for any address (as on-chain), with the site that claimed it ("" if none)
        and the tokens locked in this market's open trades."""
        bal = await self.read_balances(req.address)
        return bal.model_copy(update={"site": self.claims.site_of(bal.address),
                                      "tokens_locked_wh": self._tokens_locked(bal.address)})

    async def tokens_locked(self, req: C.GetTokensLocked, caller: Caller) -> C.TokensLocked:
        a = AsyncWeb3.to_checksum_address(req.address)
        return C.TokensLocked(address=a, tokens_locked_wh=self._tokens_locked(a))

    def _tokens_locked(self, address: str) -> int:
        row = self.store.conn.execute(
            "SELECT COALESCE(SUM(wh - settled_wh), 0) FROM chain_trades WHERE seller = ? AND open_state = 'done' "
            "AND close_state != 'done'", (address,)).fetchone()
        return int(row[0])

    @_errors
    async def set_mining(self, req: C.SetMining, caller: Caller) -> C.Mining:
        """Any site may ask the status; only the market's site starts and stops mining."""
        market = self.is_market(caller)
        if not market and req.action != "status":
            raise RequestError("not_allowed", f"mining is started and stopped by the market (site "
                               f"{self.settings.site}) only; nothing was done")
        node, _, txm = self._ready()
        if not node.supports_mining and req.action != "status":
            await node.set_mining(req.action == "start")  # raises NotSupported
        if node.supports_mining and req.action != "status":
            on = req.action == "start"
            was = await node.mining()
            await node.set_mining(on, self.settings.block_interval_s)
            if was != on:
                await self.publish(E.MiningChanged(mining=on))
                log.info("mining %s", "started" if on else "stopped")
            if on:
                self.store.on_commit(txm.wake.set)
        return await self.mining_status(controllable=market)

    @_errors
    async def list_pending(self, req: C.ListPending, caller: Caller) -> C.Pending:
        """The operator's own pending transactions (and those final in the last
        ``recent_s`` seconds), to the market's site."""
        rows = self.pending_rows(req) if self.is_market(caller) else []
        return C.Pending(txs=self.pending_infos(rows))


try:  # web3's log-processing error policy
    from web3.logs import DISCARD as _DISCARD
except ImportError:  # pragma: no cover
    _DISCARD = "discard"  # type: ignore[assignment]
