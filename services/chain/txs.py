"""Sending transactions on a real chain: nonces per account without gaps, EIP-1559 fees
that follow the market, replacement of what is not mined in time, a confirmation depth,
reorgs, and JSON-RPC errors told apart from refusals.

The life of a transaction (one row of ``chain_txs`` per account and nonce; its id is the
hash of its first signed version, the one ``ChainTx`` and ``TxSent`` name):

1. ``prepare`` (inside a store transaction): estimate gas (a revert is refused here, and
   nothing is sent), check the balance, take the next nonce, sign with fees from the
   node's fee history, store the unsigned transaction and the signed raw bytes with
   status ``pending`` and stage a ``ChainTx pending``. Only after COMMIT does the
   broadcaster send it, so a crash never leaves a sent transaction we do not know.
2. Broadcast. The node's answer is sorted (``node.refusal``): fees too low for it now
   -> re-signed, same nonce, current fees (at least +12.5 % over the last version, as
   a pool wants from a replacement); refused for good (or the account cannot pay for it)
   -> the nonce is filled with a no-op self-transfer, so the account's later
   transactions are not held up behind a gap; nonce already used -> mined (by one of
   its versions) or used by another transaction. A rate limit, a timeout or a transport
   error is never a refusal: the provider retries it, then the supervisor reconnects.
3. Tracking, in nonce order per account: a receipt of any of its versions -> ``mined``
   (block number and hash kept). Not mined in time (``replace_after_s`` and blocks went
   by without it, or its max fee is below the next base fee) -> replaced: re-signed with
   higher fees within ``fee_cap_wei``. Unknown to the node (dropped, node restarted) ->
   sent again; if the node now refuses it, as in 2.
4. Finality: a ``mined`` transaction is final once ``confirmations`` blocks are on top of
   it. Only then is it marked ``confirmed`` or ``failed`` and ``ChainTx`` plus the
   domain events (via ``on_final``) staged, in one store transaction: each is published
   once. A reorg that takes its block away turns it back into ``pending``; it is sent
   again and mined again. A no-op that filled the nonce ends the transaction ``failed``
   with the node's reason (the job behind it is queued again by its ``on_final``).

Re-signing needs the account's key: the operator's is always there; a wallet account's
only while it is unlocked (``signer``). Until then its transaction waits, with a note.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from eth_account.signers.local import LocalAccount
from hexbytes import HexBytes
from web3 import AsyncWeb3

from services.bus.envelope import caused_by, current_cause
from services.bus.events import ChainTx
from services.bus.store import Store

from . import ledger
from .errors import ChainUnavailable, TxRejected
from .node import Node, guard, refusal

log = logging.getLogger(__name__)

Publish = Callable[[Any], Awaitable[Any]]
OnFinal = Callable[[dict[str, Any], Any | None, bool, str], Awaitable[None]]
"""``(tx_row, receipt_or_None, ok, reason)``, called inside the store transaction that
marks the transaction final."""
Signer = Callable[[str], LocalAccount | None]

PRIORITY_FEE = 10**9
FEE_FIELDS = ("maxFeePerGas", "maxPriorityFeePerGas", "gasPrice")


def raised(prev: dict[str, int], market: dict[str, int], *, bump: float, cap: int) -> dict[str, int] | None:
    """Fees for a new version of a transaction that was signed with ``prev``: the market's,
    but at least ``1 + bump`` times the previous ones (what a pool takes as a replacement),
    within ``cap`` (max fee or gas price). None when the cap leaves no room for that."""
    def up(x: int) -> int:
        return math.ceil(x * (1 + bump)) + 1

    if "gasPrice" in prev or "gasPrice" in market:
        price = max(int(market.get("gasPrice", market.get("maxFeePerGas", 0))),
                    up(int(prev.get("gasPrice", prev.get("maxFeePerGas", 0)))))
        if price > cap:
            return None
        return {"gasPrice": price}
    tip = max(int(market["maxPriorityFeePerGas"]), up(int(prev["maxPriorityFeePerGas"])))
    fee = max(int(market["maxFeePerGas"]), up(int(prev["maxFeePerGas"])), tip)
    if fee > cap:
        return None
    return {"maxFeePerGas": fee, "maxPriorityFeePerGas": tip}


class TxManager:
    def __init__(self, node: Node, store: Store, publish: Publish, *, chain: str, gas_margin: float = 1.25,
                 resend_after_s: float = 3.0, confirmations: int = 0, replace_after_s: float = 30.0,
                 fee_cap_wei: int = 500 * 10**9, min_tip_wei: int = PRIORITY_FEE, bump: float = 0.125,
                 signer: Signer | None = None, update: Callable[..., Any] = ChainTx) -> None:
        self.node, self.store, self.publish = node, store, publish
        self.update = update
        """Builds the event of a transaction's progress: ChainTx (the operator's) or a
        site's WalletTx (a wallet's)."""
        self.chain = chain
        self.gas_margin = gas_margin
        self.resend_after_s = resend_after_s
        self.confirmations = confirmations
        self.replace_after_s = replace_after_s
        self.fee_cap_wei = fee_cap_wei
        self.min_tip_wei = min_tip_wei
        self.bump = bump
        self.signer: Signer = signer or (lambda address: None)
        self.on_final: dict[str, OnFinal] = {}
        self.wake = asyncio.Event()
        self.chain_id: int | None = None
        self.head = 0
        self._head_at = 0.0
        self._gap_checked: dict[str, float] = {}
        self.stats: Counter[str] = Counter()  # replaced, refused:<kind>, noop, resent, reorged, ...
        self._fees: tuple[float, dict[str, int], int | None] | None = None  # (when, fees, next base fee)

    @property
    def w3(self) -> AsyncWeb3:
        return self.node.w3

    @property
    def final_block(self) -> int | str:
        """The newest block whose state counts as final ('latest' at depth 0)."""
        if self.confirmations <= 0 or self.head == 0:
            return "latest"
        return max(self.head - self.confirmations, 0)

    # --- fees ---------------------------------------------------------------------------

    async def market_fees(self, *, fresh: bool = False) -> tuple[dict[str, int], int | None]:
        """(fee fields for a transaction signed now, the next block's base fee). EIP-1559:
        max fee = 2 x next base fee + tip, the tip the median of recent blocks' (at least
        ``min_tip_wei``); a chain without a base fee: its gas price. Within the cap.
        Cached for a second (one fee-history call for a burst of transactions)."""
        now = time.monotonic()
        if not fresh and self._fees is not None and now - self._fees[0] < 1.0:
            return self._fees[1], self._fees[2]
        base, tip = await self.node.fee_market()
        if base is None:
            fees = {"gasPrice": min(await self.node.gas_price(), self.fee_cap_wei)}
        else:
            t = max(self.min_tip_wei, tip or 0)
            fee = min(2 * base + t, self.fee_cap_wei)
            fees = {"maxFeePerGas": fee, "maxPriorityFeePerGas": min(t, fee)}
        self._fees = (now, fees, base)
        return fees, base

    async def fees(self) -> dict[str, int]:
        return (await self.market_fees())[0]

    # --- preparing ----------------------------------------------------------------------

    async def build(self, sender: str, *, to: str, value: int = 0, data: bytes | str = b"",
                    gas: int | None = None) -> dict[str, Any]:
        """A complete unsigned transaction (without nonce), checked against the chain:
        raises TxRejected with the revert reason or "insufficient funds"."""
        if self.chain_id is None:
            async with guard():
                self.chain_id = int(await self.w3.eth.chain_id)
        tx: dict[str, Any] = {"from": sender, "to": AsyncWeb3.to_checksum_address(to), "value": value,
                               "chainId": self.chain_id}
        if data:
            tx["data"] = HexBytes(data).to_0x_hex()
        if gas is None:
            async with guard():
                estimate = int(await self.w3.eth.estimate_gas(tx, self.node.pending_tag))  # type: ignore[arg-type]
            gas = estimate if estimate == 21000 else int(estimate * self.gas_margin) + 10_000
        tx["gas"] = gas
        tx.update(await self.fees())
        price = tx.get("maxFeePerGas", tx.get("gasPrice", 0))
        async with guard():
            balance = int(await self.w3.eth.get_balance(sender, self.node.pending_tag))  # type: ignore[arg-type]
        need = value + gas * price
        if need > balance:
            raise TxRejected(f"insufficient funds: {sender} has {balance} wei, needs {need} wei "
                             f"({value} + gas {gas} x {price})")
        return tx

    def _sign(self, account: LocalAccount, tx: dict[str, Any]) -> tuple[str, bytes]:
        signed = account.sign_transaction(tx)
        return HexBytes(signed.hash).to_0x_hex(), bytes(signed.raw_transaction)

    async def prepare(self, account: LocalAccount, tx: dict[str, Any], *, kind: str, ref: str = "",
                      meta: dict[str, Any] | None = None) -> str:
        """Sign and store ``tx`` (from :meth:`build`); it is sent after the store commits.
        The current cause (the event or command that asked for it) is kept in ``meta``: the
        events of its outcome name it too."""
        if (cause := current_cause.get()) is not None:
            meta = {**(meta or {}), "cause": cause}
        async with self.store.atomic() as conn:
            nonce = await self._next_nonce(conn, account.address)
            fees = {k: int(tx[k]) for k in FEE_FIELDS if k in tx}
            intent = {k: v for k, v in tx.items() if k not in ("from", "nonce", *FEE_FIELDS)}
            tx_hash, raw = self._sign(account, intent | fees | {"nonce": nonce})
            self._insert(conn, tx_hash, account.address, nonce, kind, ref, raw, fees, intent, meta or {})
            await self.publish(self.update(tx_hash=tx_hash, kind=kind, ref=ref, account=account.address,
                                        status="pending"))
            self.store.on_commit(self.wake.set)
        log.info("tx %s %s %s nonce %d from %s", kind, ref, tx_hash, nonce, account.address)
        return tx_hash

    async def _next_nonce(self, conn: Any, address: str) -> int:
        """Ours, never behind the node's: nonces are handed out once and never taken back
        (a refused transaction keeps its nonce, and fills it)."""
        row = conn.execute("SELECT next FROM chain_nonces WHERE chain = ? AND account = ?",
                           (self.chain, address)).fetchone()
        on_chain = await self.node.nonce(address, "pending")
        nonce = max(on_chain, int(row[0]) if row else 0)
        conn.execute("INSERT INTO chain_nonces (chain, account, next) VALUES (?, ?, ?) "
                     "ON CONFLICT (chain, account) DO UPDATE SET next = excluded.next", (self.chain, address, nonce + 1))
        return nonce

    def _insert(self, conn: Any, tx_hash: str, account: str, nonce: int, kind: str, ref: str, raw: bytes,
                fees: dict[str, int], intent: dict[str, Any], meta: dict[str, Any], *, noop: bool = False) -> None:
        now = time.time()
        conn.execute(
            "INSERT INTO chain_txs (tx_hash, chain, account, nonce, kind, ref, raw, status, meta, created, intent, "
            "current, fees, noop, signed_at, signed_head) VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?)",
            (tx_hash, self.chain, account, nonce, kind, ref, raw, json.dumps(meta), now, json.dumps(intent), tx_hash,
             json.dumps(fees), int(noop), now, self.head))
        conn.execute("INSERT OR IGNORE INTO chain_tx_attempts (chain, tx_hash, hash, raw, fees, noop, created) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?)", (self.chain, tx_hash, tx_hash, raw, json.dumps(fees), int(noop), now))

    # --- broadcasting and tracking -------------------------------------------------------

    async def step(self) -> None:
        rows = ledger.pending_txs(self.store.conn)
        now = time.monotonic()
        if not rows and now - self._head_at < 1.0:
            return
        self.head, _ = await self.node.head()
        self._head_at = now
        lowest: dict[str, int] = {}
        for row in rows:  # per account, in nonce order
            if row["chain"] != self.chain:
                await self.finish(row, None, False, "chain reset: the transaction belongs to a chain that is gone")
                continue
            first = lowest.setdefault(row["account"], row["nonce"]) == row["nonce"]
            if row["status"] == "mined":
                await self._confirm(row)
            elif not row["sent"]:
                await self._broadcast(row)
            else:
                await self._track(row, first)

    async def _update(self, row: dict[str, Any], **cols: Any) -> None:
        sets = ", ".join(f"{k} = ?" for k in cols)
        async with self.store.atomic() as conn:
            conn.execute(f"UPDATE chain_txs SET {sets} WHERE tx_hash = ? AND chain = ?",  # noqa: S608 - fixed names
                         (*cols.values(), row["tx_hash"], row["chain"]))
        row.update(cols)

    async def _broadcast(self, row: dict[str, Any]) -> None:
        try:
            await self.node.send_raw(row["raw"])
        except TxRejected as e:
            await self._refused(row, e.reason)
            return
        await self._update(row, sent=1, last_sent=time.time())

    async def _refused(self, row: dict[str, Any], reason: str) -> None:
        """The node refused the current version of ``row``: keep its nonce filled."""
        why = refusal(reason)
        self.stats[f"refused:{why}"] += 1
        now = time.time()
        if why == "known":
            await self._update(row, sent=1, last_sent=now)
            return
        log.info("tx %s %s nonce %d refused by the node (%s): %s", row["kind"], row["current"], row["nonce"], why, reason)
        if why == "nonce_low":
            found = await self._find_receipt(row)
            if found is not None:
                await self._mined(row, *found)
                return
            if await self.node.nonce(row["account"], "latest") > row["nonce"]:
                await self.finish(row, None, False, f"nonce {row['nonce']} was used by another transaction "
                                                    f"of {row['account']}; nothing of this one was done")
                return
            await self._update(row, sent=1, last_sent=now, note=f"refused by the node: {reason}")  # try again later
        elif why == "nonce_high":
            await self._update(row, sent=1, last_sent=now, note=f"refused by the node: {reason}")
            await self.fill_gaps(row["account"])
        elif why in ("fee", "replacement"):
            await self._replace(row, f"refused by the node: {reason}")
        elif row["noop"]:  # even the no-op cannot go now (e.g. no Ether for gas): try again later
            await self._update(row, sent=1, last_sent=now, note=f"no-op refused by the node: {reason}")
        else:  # refused for good (or unaffordable): its purpose is gone, its nonce is not
            await self._replace(row, f"refused by the node: {reason}", noop=True)

    async def _replace(self, row: dict[str, Any], note: str, *, noop: bool = False) -> bool:
        """Sign a new version of ``row`` with the same nonce and higher fees (a no-op
        self-transfer if ``noop`` or it is one already, or its unsigned form is unknown);
        it is broadcast by the next step. False if it cannot be (key or fee cap)."""
        account = self.signer(row["account"])
        now = time.time()
        if account is None:
            await self._update(row, sent=1, last_sent=now,
                               note=f"{note}; waiting for {row['account']} to be unlocked to sign it again")
            return False
        market, _ = await self.market_fees(fresh=True)
        fees = raised(row["fees"] or market, market, bump=self.bump, cap=self.fee_cap_wei)
        if fees is None:
            await self._update(row, sent=1, last_sent=now, note=f"{note}; the fee cap of {self.fee_cap_wei} wei "
                                                                 "leaves no room to raise its fees")
            return False
        noop = noop or bool(row["noop"]) or not row["intent"]
        if noop:
            tx = {"to": account.address, "value": 0, "gas": 21000, "chainId": self.chain_id}
            note = f"{note}; nonce {row['nonce']} filled by a no-op self-transfer"
            self.stats["noop"] += 1
        else:
            tx = dict(row["intent"])
        h, raw = self._sign(account, tx | fees | {"nonce": row["nonce"]})
        async with self.store.atomic() as conn:
            conn.execute("INSERT OR IGNORE INTO chain_tx_attempts (chain, tx_hash, hash, raw, fees, noop, created) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?)", (row["chain"], row["tx_hash"], h, raw, json.dumps(fees),
                                                          int(noop), now))
            conn.execute("UPDATE chain_txs SET raw = ?, current = ?, fees = ?, noop = ?, attempts = attempts + 1, "
                         "signed_at = ?, signed_head = ?, sent = 0, note = ? WHERE tx_hash = ? AND chain = ?",
                         (raw, h, json.dumps(fees), int(noop), now, self.head, note[:500], row["tx_hash"], row["chain"]))
        self.stats["replaced"] += 1
        log.info("tx %s %s nonce %d: new version %s with %s (%s)", row["kind"], row["tx_hash"], row["nonce"], h, fees,
                 note)
        self.wake.set()
        return True

    async def _find_receipt(self, row: dict[str, Any]) -> tuple[str, Any] | None:
        """The receipt of whichever version of ``row`` was mined, with its hash."""
        receipt = await self.node.receipt(row["current"])
        if receipt is not None:
            return row["current"], receipt
        if row["attempts"] > 1 or row["current"] != row["tx_hash"]:
            for a in ledger.attempts(self.store.conn, row["chain"], row["tx_hash"]):
                if a["hash"] != row["current"] and (receipt := await self.node.receipt(a["hash"])) is not None:
                    return a["hash"], receipt
        return None

    async def _track(self, row: dict[str, Any], first: bool) -> None:
        found = await self._find_receipt(row)
        if found is not None:
            await self._mined(row, *found)
            return
        now = time.time()
        if first and now - row["signed_at"] >= self.replace_after_s:
            _, base = await self.market_fees()
            fees = row["fees"]
            too_low = base is not None and "maxFeePerGas" in fees and int(fees["maxFeePerGas"]) < base
            if too_low or self.head > row["signed_head"]:  # blocks went by without it
                why = (f"its max fee {fees.get('maxFeePerGas')} is below the base fee {base}" if too_low
                       else f"not mined in {self.head - row['signed_head']} blocks / {now - row['signed_at']:.0f} s")
                if await self._replace(row, why):
                    return
        if first and now - self._gap_checked.get(row["account"], 0.0) >= max(self.resend_after_s, 1.0):
            # the chain's count behind our lowest open nonce: a nonce went missing (a reorg deeper
            # than the confirmation depth took a final transaction away): fill it
            self._gap_checked[row["account"]] = now
            if await self.node.nonce(row["account"], "latest") < row["nonce"]:
                await self.fill_gaps(row["account"])
        if now - row["last_sent"] >= self.resend_after_s and not await self.node.known(row["current"]):
            log.info("tx %s is pending here but unknown to the node: sending it again", row["current"])
            self.stats["resent"] += 1
            await self._broadcast(row)

    async def _mined(self, row: dict[str, Any], mined_hash: str, receipt: Any) -> None:
        block, bhash = int(receipt["blockNumber"]), HexBytes(receipt["blockHash"]).to_0x_hex()
        await self._update(row, status="mined", mined_hash=mined_hash, block=block, block_hash=bhash,
                           ok=int(receipt["status"]), gas_used=int(receipt["gasUsed"]))
        if max(self.head, block) - block >= self.confirmations:
            await self._final(row, receipt)

    async def _confirm(self, row: dict[str, Any]) -> None:
        """A mined transaction: still in the chain, in the same block? Deep enough?"""
        receipt = await self.node.receipt(row["mined_hash"])
        if receipt is None:  # its block was reorged away: pending again, sent again
            attempt = next((a for a in ledger.attempts(self.store.conn, row["chain"], row["tx_hash"])
                            if a["hash"] == row["mined_hash"]), None)
            self.stats["reorged"] += 1
            log.warning("tx %s %s: block %s was reorged away; pending again", row["kind"], row["mined_hash"],
                        row["block"])
            cols: dict[str, Any] = dict(status="pending", sent=0, block=None, block_hash="", mined_hash="", ok=None,
                                        note=f"reorg: block {row['block']} was replaced; sent again")
            if attempt is not None:
                cols.update(current=attempt["hash"], raw=attempt["raw"], fees=json.dumps(attempt["fees"]),
                            noop=int(attempt["noop"]))
            await self._update(row, **cols)
            self.wake.set()
            return
        block, bhash = int(receipt["blockNumber"]), HexBytes(receipt["blockHash"]).to_0x_hex()
        if bhash != row["block_hash"]:
            self.stats["reorged"] += 1
            log.warning("tx %s %s moved from block %s to %s by a reorg", row["kind"], row["mined_hash"], row["block"],
                        block)
            await self._update(row, block=block, block_hash=bhash, ok=int(receipt["status"]),
                               gas_used=int(receipt["gasUsed"]), note=f"reorg: moved to block {block}")
        if self.head - block >= self.confirmations:
            await self._final(row, receipt)

    async def _final(self, row: dict[str, Any], receipt: Any) -> None:
        noop = row["mined_hash"] != "" and any(
            a["noop"] for a in ledger.attempts(self.store.conn, row["chain"], row["tx_hash"])
            if a["hash"] == row["mined_hash"])
        if noop and row["kind"] != "noop":
            await self.finish(row, receipt, False, row["note"] or "its nonce was filled by a no-op")
            return
        ok = int(receipt["status"]) == 1
        reason = "" if ok else await self.revert_reason(row, receipt)
        await self.finish(row, receipt, ok, reason)

    async def revert_reason(self, row: dict[str, Any], receipt: Any) -> str:
        """Replay the call at the block before, to learn why it reverted."""
        try:
            async with guard():
                tx = await self.w3.eth.get_transaction(row["mined_hash"] or row["current"])
                call = {"from": tx["from"], "to": tx["to"], "value": tx["value"], "data": tx["input"],
                        "gas": tx["gas"]}
                await self.w3.eth.call(call, int(receipt["blockNumber"]) - 1)  # type: ignore[arg-type]
        except TxRejected as e:
            return e.reason
        except ChainUnavailable:
            raise
        except Exception:  # noqa: BLE001 - the reason is a courtesy
            pass
        return "reverted"

    async def finish(self, row: dict[str, Any], receipt: Any | None, ok: bool, reason: str) -> None:
        """Mark a transaction final and publish it, with its domain consequences, once."""
        async with self.store.atomic() as conn, caused_by(row["meta"].get("cause")):
            status = "confirmed" if ok else "failed"
            block = None if receipt is None else int(receipt["blockNumber"])
            cur = conn.execute(
                "UPDATE chain_txs SET status = ?, block = ?, reason = ?, gas_used = ?, final_at = ? "
                "WHERE tx_hash = ? AND chain = ? AND status IN ('pending', 'mined')",
                (status, block, reason[:500], None if receipt is None else int(receipt["gasUsed"]), time.time(),
                 row["tx_hash"], row["chain"]))
            if cur.rowcount != 1:
                return  # someone else finished it
            mined = row.get("mined_hash") or ""
            await self.publish(self.update(tx_hash=row["tx_hash"], kind=row["kind"], ref=row["ref"],
                                        account=row["account"], status=status, block=block, reason=reason[:500],
                                        mined_hash=mined if mined != row["tx_hash"] else ""))
            handler = self.on_final.get(row["kind"])
            if handler is not None:
                await handler(row, receipt, ok, reason)
        log.info("tx %s %s %s: %s%s", row["kind"], row["ref"], row["tx_hash"], status, f" ({reason})" if reason else "")

    async def fill_gaps(self, account: str) -> int:
        """Nonces of ``account`` between the chain's count and ours that no open
        transaction holds (a store from before this manager, or lost) get a no-op each,
        so the account's later transactions can be mined. Returns how many."""
        conn = self.store.conn
        row = conn.execute("SELECT next FROM chain_nonces WHERE chain = ? AND account = ?",
                           (self.chain, account)).fetchone()
        if row is None:
            return 0
        held = {int(n) for (n,) in conn.execute(
            "SELECT nonce FROM chain_txs WHERE chain = ? AND account = ? AND status IN ('pending', 'mined')",
            (self.chain, account))}
        latest = await self.node.nonce(account, "latest")
        missing = [n for n in range(latest, int(row[0])) if n not in held]
        if not missing:
            return 0
        signer = self.signer(account)
        if signer is None:
            log.warning("account %s has nonce gaps %s but is locked: they are filled once it is unlocked",
                        account, missing)
            return 0
        fees, _ = await self.market_fees(fresh=True)
        async with self.store.atomic() as c:
            for n in missing:
                tx = {"to": signer.address, "value": 0, "gas": 21000, "chainId": self.chain_id}
                h, raw = self._sign(signer, tx | fees | {"nonce": n})
                self._insert(c, h, signer.address, n, "noop", "gap", raw, fees, {}, {}, noop=True)
            self.store.on_commit(self.wake.set)
        log.warning("account %s: nonces %s were held by no transaction; filled with no-ops", account, missing)
        self.stats["noop"] += len(missing)
        return len(missing)

    def pending(self, account: str | None = None) -> list[dict[str, Any]]:
        return ledger.pending_txs(self.store.conn, account)

    def describe(self, row: dict[str, Any]) -> dict[str, Any]:
        """What ListPending shows of a transaction: its state (pending, replaced, mined,
        confirmed, failed), its depth, the reason or note."""
        status = row["status"]
        if status == "mined":
            state = "mined"
        elif status == "pending":
            state = "replaced" if row["current"] != row["tx_hash"] else "pending"
        else:
            state = status
        depth = None if row["block"] is None else max(self.head - int(row["block"]), 0)
        return {"state": state, "nonce": row["nonce"], "current_hash": row["current"], "block": row["block"],
                "depth": depth, "depth_required": self.confirmations, "attempts": row["attempts"],
                "reason": row["reason"] if status in ("confirmed", "failed") else row["note"]}
