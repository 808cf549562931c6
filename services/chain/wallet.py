"""The chain service in its site role: a site's wallet. It runs at the site, holds that
site's keystores and nobody else's, and serves callers of its own site only.

- Keys: keystore v3 files in ``<data_dir>/keystore`` (this site's folder). Unlock
  decrypts one for a session, in memory only; attempts are throttled per account and per
  calling site before the slow scrypt work starts (``too_many_attempts``).
- Who owns what: every account here belongs to this site (a file that names another site
  is not served). Its ownership claim (the account key's signature, kept in the file; see
  :mod:`services.bus.claims`) is announced on the bus as ``wallet.account`` at start and
  whenever an account is added; a file without a claim gets one at its first unlock.
- Its own transactions: Ether transfers, escrow deposit/withdraw, token approval for the
  market, credit withdrawal, escrow reservation for bids (``Reserve``), each signed here
  by the unlocked account and tracked from hash to receipt; their progress is published
  as ``wallet.tx`` (SITE_NAMED: this site's gateway shows it), pending ones are listed by
  ``ListPending``.
- Its signatures (contracts v2: every payment comes from a signature): an offer
  (``SignOffer``) or a bid (``SignBid``) of an unlocked account, EIP-712 typed data of
  the market domain of the operator's deployment (chain id and market address), with a
  fresh random id. Nothing is sent; the auction checks them and the operator opens a
  trade from the two, which the market contract checks again.
- Reads: public balances from its own node connection (plus, best effort, the tokens
  locked in open trades, which only the operator's trade book knows: a read-only request
  to the market's chain service), mining status. Mining is started and stopped by the
  market's operator only.
- Contracts: learned from the operator's ``chain.deployment`` announcement (kept in the
  store); a redeploy announced later is followed. Until one is known, and while this
  node is not the operator's chain, requests that need the chain answer
  ``chain_unavailable``; keys, unlock and the account list work regardless.

A caller of another site gets ``not_your_site`` for everything (counted in ``/healthz``),
before any work; a caller without identity (insecure mode, a local ipc socket) is served.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from typing import Any

from eth_account.signers.local import LocalAccount
from pydantic import ValidationError
from web3 import AsyncWeb3

from services.bus import Caller, RpcServer
from services.bus import claims as claims_mod
from services.bus import commands as C
from services.bus import events as E
from services.bus import typed
from services.bus import refusals
from services.bus.errors import RequestError
from services.bus.refusals import RequestTimeout
from services.bus.retry import worth_logging

from . import ledger
from .config import ChainSettings
from .errors import AccountLocked, ChainUnavailable, UnknownAccount
from .keystore import KeyFile, Keystore
from .node import Node, guard
from .service import ChainBase, _errors
from .unlocks import Sessions, TooManyAttempts, UnlockThrottle

log = logging.getLogger(__name__)


def reserve_plan(*, total_wei: int, until: int, reserved_wei: int, reserved_until: int, free_wei: int) -> int | None:
    """The amount ``reserve(amount, until)`` must move from free escrow so that at least
    ``total_wei`` is reserved until ``until`` (0: only the time is extended), or None when
    the account's reservation covers that already. Raises ``insufficient_escrow`` (with the
    numbers) when the free escrow cannot make up what is missing."""
    if total_wei <= 0:
        return None
    missing = max(0, total_wei - reserved_wei)
    if missing == 0 and reserved_until >= until:
        return None
    if missing > free_wei:
        raise refusals.InsufficientEscrow(
            f"nothing was sent: reserving {total_wei} wei until {until} needs {missing} wei more than "
            f"the {reserved_wei} wei reserved now, and the free escrow holds {free_wei} wei; deposit "
            f"at least {missing - free_wei} wei more")
    return missing


class WalletService(ChainBase):
    name = "wallet"
    role = "site"

    def __init__(self, settings: ChainSettings) -> None:
        super().__init__(settings)
        self.keystore = Keystore(settings.keystore, scrypt_n=settings.scrypt_n)
        self.sessions = Sessions()
        self.unlock_throttle = UnlockThrottle(per_account=settings.unlock_max_failures,
                                              per_site=settings.unlock_site_max_failures,
                                              window_s=settings.unlock_window_s)
        self.refused: dict[str, int] = {}  # calling site -> requests refused (not this wallet's site)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="wallet-scrypt")
        self._announce = asyncio.Event()
        self._foreign_warned: set[str] = set()
        self.deployment: E.Deployment | None = None
        self._attached = ""  # the deployment id attached to
        self._reserving: dict[str, asyncio.Lock] = {}  # account -> one Reserve at a time
        raw = ledger.get_meta(self.store.conn, "deployment_announced")
        if raw:
            self.deployment = E.Deployment.model_validate_json(raw)

    def register(self, srv: RpcServer) -> None:
        s = self.settings
        self.subscribe([E.Deployment.TYPE], self.on_deployment)
        self.operator_client = self.client(s.chain_rpc, s.chain_site)
        for req, fn in ((C.ListAccounts, self.list_accounts), (C.Unlock, self.unlock), (C.Lock, self.lock),
                        (C.GetBalances, self.balances), (C.Transfer, self.transfer), (C.Escrow, self.escrow),
                        (C.Approve, self.approve), (C.SetMining, self.set_mining),
                        (C.ListPending, self.list_pending), (C.SignOffer, self.sign_offer),
                        (C.SignBid, self.sign_bid)):
            srv.handle(req, fn)
        # the reservation waits for its block before the command's store transaction (the
        # transaction manager needs the store meanwhile to follow it)
        srv.handle(C.Reserve, self.reserved, prefetch=self.reserve)
        self.spawn(self._announcer(), "wallet-claims")

    async def teardown(self) -> None:
        self.sessions.clear()
        self._pool.shutdown(wait=True)
        await super().teardown()

    def health(self) -> dict[str, Any]:
        return {**super().health(), "accounts": len(self.accounts()), "unlocked": len(self.sessions.unlocked()),
                "refused_other_sites": dict(self.refused), "unlocks_throttled": self.unlock_throttle.refused,
                "deployment": self.deployment.deployment if self.deployment else None}

    def tx_event(self) -> Any:
        site = self.settings.site

        def wallet_tx(**kw: Any) -> E.WalletTx:
            return E.WalletTx(site=site, **kw)

        return wallet_tx

    def key_of(self, address: str) -> LocalAccount | None:
        """An unlocked account's key, to sign its stuck transaction again (fees raised, a
        nonce filled); None while it is locked: the transaction waits for its unlock."""
        if not any(kf.address.lower() == address.lower() for kf in self.accounts()):
            return None
        return self.sessions.account(address) if self.sessions.is_unlocked(address) else None

    # --- the contracts, from the operator's announcement ------------------------------------

    def on_deployment(self, env: Any, conn: Any) -> None:
        body = env.body
        if not isinstance(body, E.Deployment):
            return
        ledger.set_meta(conn, "deployment_announced", body.model_dump_json())
        if self.deployment is None or self.deployment.deployment != body.deployment \
                or self.deployment.market != body.market:
            log.info("the operator announced contracts: token %s, market %s (deployment %s)", body.token,
                     body.market, body.deployment)
        self.deployment = body

    async def contracts_on(self, node: Node, ident: str) -> tuple[str, str, str, str]:
        d = self.deployment
        if d is None:
            raise ChainUnavailable("no contracts announced by the operator yet (chain.deployment)")
        if f"{d.chain_id}:{d.genesis}" != ident:
            raise ChainUnavailable(f"this node's chain ({ident[:24]}) is not the operator's ({d.chain_id}:"
                                   f"{d.genesis[:12]})")
        if not await node.has_code(d.market):
            raise ChainUnavailable(f"no contract at the operator's market address {d.market} on this node (yet)")
        if d.deploy_block_hash and await node.block_hash(d.deploy_block) != d.deploy_block_hash:
            # a fresh dev chain: same genesis, the operator's new contracts at the same addresses
            raise ChainUnavailable(f"the announced deployment's block {d.deploy_block} is not on this node's chain: "
                                   "waiting for the operator's announcement of the contracts on this chain")
        self.deploy_block = d.deploy_block
        self._attached = d.deployment
        return d.token, d.market, d.registry, d.deployment

    def market_domain(self) -> typed.Domain:
        """The EIP-712 domain of offers and bids: the market of the operator's deployment."""
        d = self.deployment
        if d is None:
            raise ChainUnavailable("no contracts announced by the operator yet (chain.deployment): no market to sign "
                                   "for")
        return typed.market_domain(d.chain_id, d.market)

    async def watch_step(self) -> None:
        self.sessions.expire()
        d = self.deployment
        if d is not None and d.deployment != self._attached:
            raise ChainUnavailable("the operator announced a new deployment: attaching to it")

    # --- claims ---------------------------------------------------------------------------

    def minted_accounts(self) -> list[str] | None:
        """A site's wallet follows the mints to its own accounts only (the node filters them:
        with many sites, every wallet decoding every site's mints grew with their square)."""
        return [kf.address for kf in self.accounts()]

    def accounts(self) -> list[KeyFile]:
        """This site's accounts: the files of its keystore that name this site (or none)."""
        site = self.settings.site
        out = []
        for kf in self.keystore.list():
            if kf.site in ("", site):
                out.append(kf)
            elif kf.address not in self._foreign_warned:
                self._foreign_warned.add(kf.address)
                log.warning("keystore file %s names site %s, not this wallet's site %s: not served", kf.path.name,
                            kf.site, site)
        return out

    async def _announcer(self) -> None:
        """Announce each claimed account once per store (a subscriber that starts later gets
        it replayed), at start, after an unlock made a claim, and for files added meanwhile."""
        while True:
            try:
                await self.announce_claims()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - logged; the next round tries again
                log.exception("announcing account claims failed")
            try:
                await asyncio.wait_for(self._announce.wait(), 5.0)
            except asyncio.TimeoutError:
                pass
            self._announce.clear()

    async def announce_claims(self) -> int:
        if self.pub is None:
            return 0
        site, n = self.settings.site, 0
        for kf in self.accounts():
            if not kf.claim or kf.site != site:
                continue  # claimed at its first unlock
            key = f"claimed:{kf.address}"
            if ledger.get_meta(self.store.conn, key) == kf.claim:
                continue
            if not claims_mod.valid(site, kf.address, kf.claim):
                log.warning("keystore file %s holds a claim that is not its key's: ignored", kf.path.name)
                continue
            async with self.store.atomic() as conn:
                await self.publish(E.WalletAccount(site=site, address=kf.address, name=kf.name[:64],
                                                    signature=kf.claim))
                ledger.set_meta(conn, key, kf.claim)
            n += 1
            log.info("announced account %s (%s) of site %s", kf.address, kf.name, site)
        return n

    # --- requests -----------------------------------------------------------------------

    def _own_site(self, caller: Caller) -> None:
        """A wallet serves its own site only: another site's key gets nothing at all."""
        if caller.site is None or caller.site == self.settings.site:
            return
        site = str(caller)
        n = self.refused[site] = self.refused.get(site, 0) + 1
        if worth_logging(n):
            log.warning("refused a request of site %s: this is the wallet of site %s (%d so far)", site,
                        self.settings.site, n)
        raise refusals.NotYourSite(f"this is the wallet of site {self.settings.site}; it serves that "
                                   f"site only, not {site}; nothing was done")

    def _account(self, caller: Caller, address: str) -> KeyFile:
        """This site's keystore file of ``address``, for a caller of this site."""
        self._own_site(caller)
        want = AsyncWeb3.to_checksum_address(address) if AsyncWeb3.is_address(address) else address
        for kf in self.accounts():
            if kf.address == want:
                return kf
        raise UnknownAccount(f"no account {address} at the wallet of site {self.settings.site}")

    async def list_accounts(self, req: C.ListAccounts, caller: Caller) -> C.Accounts:
        self._own_site(caller)
        return C.Accounts(accounts=[C.AccountInfo(address=kf.address, name=kf.name, site=self.settings.site,
                                                  unlocked=self.sessions.is_unlocked(kf.address))
                                    for kf in self.accounts()])

    @_errors
    async def unlock(self, req: C.Unlock, caller: Caller) -> C.Unlocked:
        kf = self._account(caller, req.address)  # before any work
        try:
            slot = self.unlock_throttle.begin(kf.address, caller.site or "")
        except TooManyAttempts as e:
            wait = int(e.retry_after_s) + 1
            raise refusals.TooManyAttempts(f"too many failed unlock attempts for {e.what}; nothing was "
                                           f"tried; try again in {wait} s") from None
        loop = asyncio.get_running_loop()
        key = await loop.run_in_executor(self._pool, self.keystore.decrypt, kf.address,
                                         req.passphrase.get_secret_value())
        self.unlock_throttle.succeeded(slot)
        if not kf.claim or kf.site != self.settings.site:  # an older or imported file: claim it now
            claim = claims_mod.sign(key, self.settings.site)
            await loop.run_in_executor(self._pool, self.keystore.set_claim, kf.address, self.settings.site, claim)
            self._announce.set()
        session = self.sessions.unlock(key, req.ttl_s)
        del key
        log.info("unlocked %s for %.0fs", session.address, req.ttl_s)
        if self.txm is not None:
            self.txm.wake.set()  # a stuck transaction of this account may wait for its key
        return C.Unlocked(address=session.address, expires_at=session.expires_at)

    @_errors
    async def lock(self, req: C.Lock, caller: Caller) -> C.Ok:
        kf = self._account(caller, req.address)
        if self.sessions.lock(kf.address):
            log.info("locked %s", kf.address)
        return C.Ok()

    def _signer(self, caller: Caller, address: str) -> LocalAccount:
        kf = self._account(caller, address)
        if self.sessions.is_unlocked(kf.address):
            return self.sessions.account(kf.address)
        raise AccountLocked(f"account {kf.address} is locked: unlock it first")

    @_errors
    async def balances(self, req: C.GetBalances, caller: Caller) -> C.Balances:
        """Public balances read from this site's node; the tokens locked in open trades
        from the operator's books (one store read there, best effort: 0 when it does not
        answer)."""
        self._own_site(caller)
        bal = await self.read_balances(req.address)
        mine = any(kf.address == bal.address for kf in self.accounts())
        locked = 0
        try:
            op: C.TokensLocked = await self.operator_client.request(C.GetTokensLocked(address=bal.address),
                                                                    timeout=2.0)
            locked = op.tokens_locked_wh
        except (RequestError, RequestTimeout) as e:
            log.debug("tokens locked of %s unknown: %s", bal.address, e)
        return bal.model_copy(update={"site": self.settings.site if mine else "", "tokens_locked_wh": locked})

    @_errors
    async def transfer(self, req: C.Transfer, caller: Caller) -> C.TxSent:
        signer = self._signer(caller, req.sender)
        _, _, txm = self._ready()
        tx = await txm.build(signer.address, to=req.to, value=req.amount_wei)
        return C.TxSent(tx_hash=await txm.prepare(signer, tx, kind="transfer",
                                                  ref=AsyncWeb3.to_checksum_address(req.to)))

    @_errors
    async def escrow(self, req: C.Escrow, caller: Caller) -> C.TxSent:
        signer = self._signer(caller, req.account)
        node, dep, txm = self._ready()
        m = dep.market
        if req.action == "deposit":
            tx = await txm.build(signer.address, to=dep.market_address, value=req.amount_wei,
                                 data=m.encode_abi("deposit", args=[]))
            kind = "deposit"
        elif req.action == "withdraw":
            # v2: withdraw takes the free escrow, then the reserved escrow once its time has passed
            async with guard():
                free, reserved, until, head = await asyncio.gather(
                    m.functions.freeEscrow(signer.address).call(), m.functions.reservedEscrow(signer.address).call(),
                    m.functions.reservedUntil(signer.address).call(), node.w3.eth.get_block("latest"))
            now = int(head["timestamp"])
            held = now < until
            withdrawable = free + (0 if held else reserved)
            if req.amount_wei > withdrawable:
                why = f"free {free} wei"
                if reserved and held:
                    why += f"; {reserved} wei reserved for bids until {until}, {until - now} s from now"
                raise refusals.InsufficientEscrow(f"nothing was sent: {req.amount_wei} wei exceeds the escrow "
                                                  f"that can be withdrawn now, {withdrawable} wei ({why})")
            tx = await txm.build(signer.address, to=dep.market_address,
                                 data=m.encode_abi("withdraw", args=[req.amount_wei]))
            kind = "withdraw"
        else:
            async with guard():
                credit = await m.functions.credit(signer.address).call()
            if credit == 0 or req.amount_wei > credit:
                raise refusals.InsufficientCredit(f"nothing was sent: {req.amount_wei} wei exceeds the credit of "
                                                  f"{credit} wei (withdraw_credit takes all of it)")
            tx = await txm.build(signer.address, to=dep.market_address, data=m.encode_abi("withdrawCredit", args=[]))
            kind = "withdraw_credit"
        return C.TxSent(tx_hash=await txm.prepare(signer, tx, kind=kind, ref=str(req.amount_wei)))

    @_errors
    async def reserve(self, req: C.Reserve, caller: Caller) -> C.TxSent:
        """At least ``total_wei`` of the account's escrow reserved until ``until``: reserve
        what is missing from free escrow (and extend the time), answered once that
        transaction is in a block ("" when nothing was missing). Runs before the command's
        store transaction (a prefetch); one at a time per account, and a reservation of the
        account still on its way is waited for first, so a retry never reserves twice."""
        signer = self._signer(caller, req.account)
        lock = self._reserving.setdefault(signer.address, asyncio.Lock())
        async with lock:
            _, dep, txm = self._ready()
            for row in ledger.pending_txs(self.store.conn, signer.address):
                if row["kind"] == "reserve":
                    await self._in_block(row["tx_hash"])
            m = dep.market.functions
            async with guard():
                free, reserved, until = await asyncio.gather(
                    m.freeEscrow(signer.address).call(), m.reservedEscrow(signer.address).call(),
                    m.reservedUntil(signer.address).call())
            amount = reserve_plan(total_wei=req.total_wei, until=req.until, reserved_wei=int(reserved),
                                  reserved_until=int(until), free_wei=int(free))
            if amount is None:
                return C.TxSent(tx_hash="")
            tx = await txm.build(signer.address, to=dep.market_address,
                                 data=dep.market.encode_abi("reserve", args=[amount, req.until]))
            tx_hash = await txm.prepare(signer, tx, kind="reserve", ref=f"{amount} until {req.until}")
            log.info("reserving %d wei more of %s's escrow until %d (%d reserved until %d, asked %d in all)", amount,
                     signer.address, req.until, reserved, until, req.total_wei)
            await self._in_block(tx_hash)
            return C.TxSent(tx_hash=tx_hash)

    async def reserved(self, req: C.Reserve, caller: Caller, sent: C.TxSent) -> C.TxSent:
        return sent

    async def _in_block(self, tx_hash: str) -> None:
        """Until our transaction ``tx_hash`` is in a block (mined, not reverted); a clear
        error when it failed or is still not in a block after ``reserve_wait_s``."""
        loop = asyncio.get_running_loop()
        end = loop.time() + self.settings.reserve_wait_s
        while True:
            row = ledger.get_tx(self.store.conn, tx_hash)
            if row is None:
                raise refusals.Internal(f"transaction {tx_hash} is not in this wallet's books")
            ok = row["ok"]
            if row["status"] == "confirmed" or (row["status"] == "mined" and ok == 1):
                return
            if row["status"] == "failed" or (row["status"] == "mined" and ok == 0):
                raise refusals.Rejected(f"the {row['kind']} transaction {tx_hash} failed: "
                                        f"{row['reason'] or row['note'] or 'reverted'}")
            if loop.time() > end:
                raise refusals.RequestTimeout(f"the {row['kind']} transaction {tx_hash} is not in a block after "
                                              f"{self.settings.reserve_wait_s:.0f} s; it stays pending (ask again to "
                                              "wait for it)")
            await asyncio.sleep(0.05)

    def _signable(self, caller: Caller, account: str, expiry: int, what: str) -> tuple[LocalAccount, typed.Domain]:
        """The unlocked key of this site's ``account`` and the market domain to sign in."""
        signer = self._signer(caller, account)
        domain = self.market_domain()
        if expiry <= time.time():
            raise refusals.Invalid(f"nothing was signed: the {what}'s expiry {expiry} has passed already")
        return signer, domain

    @staticmethod
    def _invalid(e: ValidationError) -> refusals.Invalid:
        err = e.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(x) for x in err.get("loc", ()))
        return refusals.Invalid(f"nothing was signed: {where}: {err.get('msg', 'invalid')}")

    @_errors
    async def sign_offer(self, req: C.SignOffer, caller: Caller) -> C.SignedOffer:
        """An offer of this site's unlocked account, signed (EIP-712, market domain), with
        a fresh offer id. A retry of the command gets the same signed offer."""
        signer, domain = self._signable(caller, req.account, req.expiry, "offer")
        try:
            offer = typed.Offer(offer_id=typed.new_id(), seller=signer.address, wh=req.wh,
                                min_price_wei_per_kwh=req.min_price_wei_per_kwh, expiry=req.expiry,
                                duration_s=req.duration_s)
        except ValidationError as e:
            raise self._invalid(e) from None
        signature = typed.sign_offer(bytes(signer.key), domain, offer)
        log.info("signed offer %s of %s: %d Wh at %d wei/kWh or more, until %d, trade of %d s", offer.offer_id,
                 signer.address, offer.wh, offer.min_price_wei_per_kwh, offer.expiry, offer.duration_s)
        return C.SignedOffer(offer=offer, signature=signature)

    @_errors
    async def sign_bid(self, req: C.SignBid, caller: Caller) -> C.SignedBid:
        """A bid of this site's unlocked account for the signed offer ``offer_id`` (the zero
        id: a double-auction buy order), signed, with a fresh bid id."""
        signer, domain = self._signable(caller, req.account, req.expiry, "bid")
        try:
            bid = typed.Bid(bid_id=typed.new_id(), offer_id=req.offer_id.lower(), buyer=signer.address, wh=req.wh,
                            max_price_wei_per_kwh=req.max_price_wei_per_kwh, expiry=req.expiry)
        except ValidationError as e:
            raise self._invalid(e) from None
        signature = typed.sign_bid(bytes(signer.key), domain, bid)
        log.info("signed bid %s of %s for offer %s: %d Wh at %d wei/kWh or less, until %d", bid.bid_id,
                 signer.address, bid.offer_id, bid.wh, bid.max_price_wei_per_kwh, bid.expiry)
        return C.SignedBid(bid=bid, signature=signature)

    @_errors
    async def approve(self, req: C.Approve, caller: Caller) -> C.TxSent:
        signer = self._signer(caller, req.account)
        _, dep, txm = self._ready()
        if req.wh <= 0:
            raise refusals.BadAmount("nothing was sent: approve a positive number of Wh")
        t = dep.token.functions
        async with guard():
            balance = await t.balanceOf(signer.address).call()
            allowance = await t.allowance(signer.address, dep.market_address).call()
        want = allowance + req.wh
        if want > balance:
            raise refusals.InsufficientTokens(f"nothing was sent: approving {want} Wh in all exceeds the "
                                              f"token balance of {balance} Wh")
        tx = await txm.build(signer.address, to=dep.token_address,
                             data=dep.token.encode_abi("approve", args=[dep.market_address, want]))
        return C.TxSent(tx_hash=await txm.prepare(signer, tx, kind="approve", ref=str(req.wh)))

    @_errors
    async def set_mining(self, req: C.SetMining, caller: Caller) -> C.Mining:
        """The status only: mining is started and stopped by the market's operator."""
        self._own_site(caller)
        if req.action != "status":
            raise refusals.NotAllowed(f"mining is started and stopped by the market's operator (site "
                                      f"{self.settings.chain_site}) only; nothing was done")
        return await self.mining_status(controllable=False)

    @_errors
    async def list_pending(self, req: C.ListPending, caller: Caller) -> C.Pending:
        """This site's pending transactions (of one of its accounts, or all), and those
        final in the last ``recent_s`` seconds."""
        if req.account is not None:
            self._account(caller, req.account)
        else:
            self._own_site(caller)
        return C.Pending(txs=self.pending_infos(self.pending_rows(req)))

