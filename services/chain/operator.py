"""The chain service in its operator role, at the market: the market's keys only.

- Deploys the contracts (registry, token, market) on a fresh chain (chain id + genesis
  hash + code at the stored addresses tell), or attaches to known ones, and announces
  them on the bus (``chain.deployment``): the sites' wallets and meters learn the
  addresses and the EIP-712 domains there.
- Holds two keys, each for its own role: the operator key (opens trades from signed
  offers and bids, submits signed production and deliveries, closes and finalizes) and
  the registrar key (registers meter keys). Neither can move a party's value on its own
  word: the contracts check every signature. The admin key deploys and is not used
  after; the pauser's key is kept elsewhere (dev chains: prefunded dev accounts).
- Bus events become durable jobs, one module per kind in :mod:`services.chain.jobs`
  (meter keys -> register, signed production -> mint, agreed trades -> open, signed
  deliveries -> settle, closed trades -> close, then finalize after the dispute window).
- Keeps which account belongs to which site from the wallets' signed ownership claims
  (``wallet.account``, see :mod:`services.bus.claims`): a meter key is registered only for
  an account its own site claimed; on dev chains each newly claimed account is given
  ``dev_fund_wei`` once.
- Requests: public balances of any address (with the site that claimed it), the
  operator's pending transactions (to the market's site), mining status to anyone and
  mining start/stop to the market's own site only.
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
from services.bus import refusals

from . import bindings, ledger
from .config import ChainSettings
from .errors import ChainError, KeystoreError, TxRejected
from .jobs import Job
from .jobs.closes import Closes
from .jobs.meters import Meters
from .jobs.mints import Mints
from .jobs.opens import Opens
from .jobs.settlements import Settlements
from .keystore import Keystore
from .node import Node, guard
from .service import ChainBase, _errors
from .txs import OnFinal

log = logging.getLogger(__name__)

CONSUMED = (E.MeterKey.TYPE, E.EnergyProduced.TYPE, E.TradeAgreed.TYPE, E.Delivery.TYPE, E.TradeStatus.TYPE)
"""The bus events the operator's jobs record (see ``OperatorService.consumes``)."""

class OperatorService(ChainBase):
    name = "chain"
    role = "operator"

    def __init__(self, settings: ChainSettings) -> None:
        super().__init__(settings)
        self.claims = Claims(self.store.conn)
        self.operator: LocalAccount | None = None
        self.registrar: LocalAccount | None = None
        self.dispute_window_s = settings.dispute_window_s
        self._funded_seen: set[str] = set()  # chain key + address checked for funding
        self._fund_retry_at: dict[str, float] = {}  # chain key + address -> when to try funding it again
        self.job_rounds = 0
        self.meters = Meters(self)
        self.mints = Mints(self)
        self.opens = Opens(self)
        self.settlements = Settlements(self)
        self.closes = Closes(self)
        self.jobs: list[Job] = [self.meters, self.mints, self.opens, self.settlements, self.closes]
        for job in self.jobs:
            job.create(self.store.conn)
        self.consumes = dict(zip(CONSUMED, (self.meters, self.mints, self.opens, self.settlements, self.closes),
                                 strict=True))

    def register(self, srv: RpcServer) -> None:
        self.subscribe(list(self.consumes), self.on_event, replayable=True)  # jobs record in the store only
        self.subscribe([E.WalletAccount.TYPE], self.on_claim)
        for req, fn in ((C.GetBalances, self.balances), (C.GetTokensLocked, self.tokens_locked),
                        (C.SetMining, self.set_mining), (C.ListPending, self.list_pending)):
            srv.handle(req, fn)

    def health(self) -> dict[str, Any]:
        h = {**super().health(), "operator": self.operator.address if self.operator else None,
             "registrar": self.registrar.address if self.registrar else None,
             "claimed_accounts": len(self.claims), "claims_refused": dict(self.claims.refused)}
        for job in self.jobs:
            h.update(job.health())
        return h

    def tx_event(self) -> Any:
        return E.ChainTx

    def final_hooks(self) -> dict[str, OnFinal]:
        hooks: dict[str, OnFinal] = {}
        for job in self.jobs:
            for kind in job.kinds:
                hooks[kind] = _hook(job, kind)
        return hooks

    def workers(self) -> list[tuple[Any, float, asyncio.Event]]:
        return [(self.process_jobs, self.settings.poll_s, self.work)]

    # --- the contracts ---------------------------------------------------------------------

    async def contracts_on(self, node: Node, ident: str) -> tuple[str, str, str, str]:
        s = self.settings
        if self.operator is None:
            self.operator, self.registrar = self._keys(node)
        conn = self.store.conn
        stored_ident = ledger.get_meta(conn, "identity")
        token, market = ledger.get_meta(conn, "token"), ledger.get_meta(conn, "market")
        registry = ledger.get_meta(conn, "registry")
        if s.token_address and s.market_address and s.registry_address:
            token, market, registry = s.token_address, s.market_address, s.registry_address
            for a in (token, market, registry):
                if not await node.has_code(a):
                    raise ChainError(f"no contract code at the configured address {a}")
        elif not (stored_ident == ident and token and market and registry and await node.has_code(token)
                  and await node.has_code(market) and await node.has_code(registry)
                  and await self._deploy_block_is_ours(node)):
            if stored_ident is not None:
                log.warning("fresh chain (stored %s, now %s, or no code at the stored addresses): "
                            "not trusting stored addresses, redeploying", stored_ident[:24], ident[:24])
            token, market, registry = await self._deploy()
        assert token and market and registry
        self.deploy_block = int(ledger.get_meta(conn, "deploy_block") or 0)
        deployment = ledger.get_meta(conn, "deployment") or "attached"
        async with self.store.atomic() as c:
            ledger.set_meta(c, "identity", ident)
            ledger.set_meta(c, "token", token)
            ledger.set_meta(c, "market", market)
            ledger.set_meta(c, "registry", registry)
        return token, market, registry, deployment

    async def _deploy_block_is_ours(self, node: Node) -> bool:
        """Whether the stored deploy block is on this chain: a fresh dev chain may have the
        same genesis and, from the same deployer, contracts at the same addresses."""
        conn = self.store.conn
        stored = ledger.get_meta(conn, "deploy_block_hash")
        return not stored or await node.block_hash(int(ledger.get_meta(conn, "deploy_block") or 0)) == stored

    async def attached(self) -> None:
        """Announce the deployment (once per deployment: a wallet or meter that starts later
        gets it replayed from the outbox); fund the claimed accounts on a dev chain."""
        assert self.node is not None and self.dep is not None and self.operator is not None
        assert self.txm is not None
        async with guard():
            self.dispute_window_s = int(await self.dep.market.functions.disputeWindow().call())
        for key in (self.operator, self.registrar):
            if key is not None:
                await self.txm.fill_gaps(key.address)
        if ledger.get_meta(self.store.conn, "announced") != self.chain_key:
            chain_id, genesis = await self.node.identity()
            deployment = ledger.get_meta(self.store.conn, "deployment") or "attached"
            async with self.store.atomic() as conn:
                await self.publish(E.Deployment(chain_id=chain_id, genesis=genesis, token=self.dep.token_address,
                                                market=self.dep.market_address, registry=self.dep.registry_address,
                                                dispute_window_s=self.dispute_window_s,
                                                deploy_block=self.deploy_block, deployment=deployment,
                                                deploy_block_hash=ledger.get_meta(self.store.conn,
                                                                                  "deploy_block_hash") or ""))
                ledger.set_meta(conn, "announced", self.chain_key)
        self.work.set()
        log.info("operator %s, registrar %s", self.operator.address, self.registrar.address if self.registrar else None)

    def key_of(self, address: str) -> LocalAccount | None:
        """The market's keys sign their transactions again (fees raised, a nonce filled)."""
        for key in (self.operator, self.registrar):
            if key is not None and address.lower() == key.address.lower():
                return key
        return None

    def _keys(self, node: Node) -> tuple[LocalAccount, LocalAccount]:
        """(operator, registrar): keystore accounts at the market, or on a dev chain its
        prefunded dev accounts 1 and 2 (account 0 deploys, account 3 pauses)."""
        s = self.settings
        if s.operator_address:
            operator = self._unlock(s.operator_address, s.operator_passphrase_file, "OPERATOR")
            registrar = (self._unlock(s.registrar_address, s.registrar_passphrase_file, "REGISTRAR")
                         if s.registrar_address else None)
            if registrar is None:
                if len(node.dev_keys) < 3:
                    raise ChainError("set GRIDTRADE_REGISTRAR_ADDRESS (a keystore account of its own) and "
                                     "GRIDTRADE_REGISTRAR_PASSPHRASE_FILE")
                registrar = Account.from_key(node.dev_keys[2])
            return operator, registrar
        if len(node.dev_keys) < 4:
            raise ChainError("this chain has no prefunded dev accounts: set GRIDTRADE_OPERATOR_ADDRESS and "
                             "GRIDTRADE_REGISTRAR_ADDRESS (keystore accounts) with their passphrase files")
        return Account.from_key(node.dev_keys[1]), Account.from_key(node.dev_keys[2])

    def _unlock(self, address: str, passphrase_file: Any, what: str) -> LocalAccount:
        s = self.settings
        if passphrase_file is None:
            raise ChainError(f"GRIDTRADE_{what}_ADDRESS needs GRIDTRADE_{what}_PASSPHRASE_FILE")
        lines = passphrase_file.read_text().splitlines()
        try:
            key = Keystore(s.keystore, scrypt_n=s.scrypt_n).decrypt(address, lines[0] if lines else "")
        except KeystoreError as e:
            raise ChainError(f"cannot unlock the {what.lower()} account: {e}") from None
        return Account.from_key(key)

    async def _deploy(self) -> tuple[str, str, str]:
        assert self.node is not None and self.operator is not None and self.registrar is not None
        s, node = self.settings, self.node
        if node.supports_mining and not await node.mining():
            log.warning("mining is stopped; starting it to deploy the contracts")
            await node.set_mining(True)
        deployer = Account.from_key(node.dev_keys[0]) if node.dev_keys else self.operator
        pauser = s.pauser_address or (Account.from_key(node.dev_keys[3]).address if len(node.dev_keys) > 3
                                      else deployer.address)
        if deployer is self.operator:
            log.warning("the operator key deploys and so holds the admin role: move it to a key kept offline "
                        "(grantRole, then renounceRole)")
        async with guard():
            dep = await bindings.deploy(node.w3, deployer, operator=self.operator.address,
                                         registrar=self.registrar.address, pauser=pauser,
                                         dispute_window_s=s.dispute_window_s)
            block = int(await node.w3.eth.block_number)
        block_hash = await node.block_hash(block) or ""
        async with self.store.atomic() as c:
            ledger.set_meta(c, "deploy_block", str(block))
            ledger.set_meta(c, "deploy_block_hash", block_hash)
            ledger.set_meta(c, "deployment", uuid.uuid4().hex)
        log.info("deployed MeterRegistry at %s, EnergyToken at %s and EnergyMarket at %s", dep.registry_address,
                 dep.token_address, dep.market_address)
        return dep.token_address, dep.market_address, dep.registry_address

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
            if time.monotonic() < self._fund_retry_at.get(seen, 0.0):
                continue
            try:
                await self.fund(address)
            except TxRejected as e:  # e.g. the operator's own Ether ran out: said once a minute, not every round
                log.warning("could not fund %s (trying again in a minute): %s", address, e.reason)
                self._fund_retry_at[seen] = time.monotonic() + 60.0
                continue
            self._funded_seen.add(seen)

    def on_claim(self, env: Any, conn: Any) -> None:
        """A site's wallet announces one of its accounts (runs in the subscriber's transaction)."""
        if isinstance(env.body, E.WalletAccount) and self.claims.apply(conn, env.body):
            log.info("account %s belongs to site %s", env.body.address, env.body.site)
            self.store.on_commit(self.work.set)

    # --- bus events -> jobs -------------------------------------------------------------

    def on_event(self, env: Any, conn: Any) -> None:
        """Runs inside the subscriber's transaction: the job of the event's kind records it
        (with the event's id as the cause of what it publishes later), nothing else."""
        job = self.consumes.get(env.type)
        if job is not None and job.record(env, conn):
            self.store.on_commit(self.work.set)

    async def process_jobs(self) -> None:
        if self.dep is None or self.txm is None:
            return
        await self._fund_claimed()
        for job in self.jobs:
            await job.step()
        self.job_rounds += 1

    def have_pending(self) -> bool:
        return ledger.count_pending(self.store.conn) > 0

    async def fail_job(self, kind: str, ref: str, account: str, reason: str) -> None:
        """A job the chain refuses: nothing is sent; say so on the bus."""
        await self.publish(E.ChainTx(tx_hash="", kind=kind, ref=ref, account=account, status="failed",
                                      reason=reason[:500]))
        log.warning("%s %s refused: %s", kind, ref, reason)

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
        return self.opens.tokens_locked(address)

    @_errors
    async def set_mining(self, req: C.SetMining, caller: Caller) -> C.Mining:
        """Any site may ask the status; only the market's site starts and stops mining."""
        market = self.is_market(caller)
        if not market and req.action != "status":
            raise refusals.NotAllowed(f"mining is started and stopped by the market (site "
                                      f"{self.settings.site}) only; nothing was done")
        node, _, txm = self._ready()
        if not node.supports_mining and req.action != "status":
            await node.set_mining(req.action == "start")  # raises NotSupported
        if node.supports_mining and req.action != "status":
            on = req.action == "start"
            was = await node.mining()
            await node.set_mining(on, self.settings.block_interval_s)
            if was != on:
                await self.publish(E.ChainMining(mining=on))
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


def _hook(job: Job, kind: str) -> OnFinal:
    async def final(row: dict[str, Any], receipt: Any, ok: bool, reason: str) -> None:
        await job.final(kind, row, receipt, ok, reason)
    return final
