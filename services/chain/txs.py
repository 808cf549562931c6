"""Sending transactions: nonces per account, signing, persisting the signed raw tx before
it leaves, broadcasting, tracking each one from hash to receipt, and re-sending what a
restart (or a node restart) left pending.

The life of a transaction:

1. ``prepare`` (inside a store transaction): estimate gas (a revert is refused here, and
   nothing is sent), check the balance, take the next nonce, sign, store the raw bytes
   with status ``pending`` and stage a ``TxUpdate pending``. Only after COMMIT does the
   broadcaster send it — so a crash can never leave a sent transaction we do not know.
2. The tracker polls receipts. A receipt turns the row ``confirmed`` or ``failed`` (with
   the revert reason) and stages ``TxUpdate`` plus the domain events (via ``on_final``)
   in one store transaction: each is published exactly once.
3. A pending transaction the node does not know (restart, node restart, dropped) is sent
   again, byte for byte: same nonce, same hash, so it can never execute twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from eth_account.signers.local import LocalAccount
from hexbytes import HexBytes
from web3 import AsyncWeb3

from services.bus.envelope import caused_by, current_cause
from services.bus.events import TxUpdate
from services.bus.store import Store

from . import ledger
from .errors import ChainUnavailable, TxRejected
from .node import Node, guard

log = logging.getLogger(__name__)

Publish = Callable[[Any], Awaitable[Any]]
OnFinal = Callable[[dict[str, Any], Any | None, bool, str], Awaitable[None]]
"""``(tx_row, receipt_or_None, ok, reason)``, called inside the store transaction that
marks the transaction final."""

PRIORITY_FEE = 10**9


class TxManager:
    def __init__(self, node: Node, store: Store, publish: Publish, *, chain: str, gas_margin: float = 1.25,
                 resend_after_s: float = 3.0, update: Callable[..., Any] = TxUpdate) -> None:
        self.node, self.store, self.publish = node, store, publish
        self.update = update
        """Builds the event of a transaction's progress: TxUpdate (the operator's) or a
        site's WalletTx (a wallet's)."""
        self.chain = chain
        self.gas_margin = gas_margin
        self.resend_after_s = resend_after_s
        self.on_final: dict[str, OnFinal] = {}
        self.wake = asyncio.Event()
        self.chain_id: int | None = None

    @property
    def w3(self) -> AsyncWeb3:
        return self.node.w3

    # --- preparing ----------------------------------------------------------------------

    async def fees(self) -> dict[str, int]:
        async with guard():
            block = await self.w3.eth.get_block("latest")
            base = block.get("baseFeePerGas")
            if base is None:
                return {"gasPrice": int(await self.w3.eth.gas_price)}
        return {"maxFeePerGas": 2 * int(base) + PRIORITY_FEE, "maxPriorityFeePerGas": PRIORITY_FEE}

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

    async def prepare(self, account: LocalAccount, tx: dict[str, Any], *, kind: str, ref: str = "",
                      meta: dict[str, Any] | None = None) -> str:
        """Sign and store ``tx`` (from :meth:`build`); it is sent after the store commits.
        The current cause (the event or command that asked for it) is kept in ``meta``: the
        events of its outcome name it too."""
        if (cause := current_cause.get()) is not None:
            meta = {**(meta or {}), "cause": cause}
        async with self.store.atomic() as conn:
            row = conn.execute("SELECT next FROM chain_nonces WHERE chain = ? AND account = ?",
                               (self.chain, account.address)).fetchone()
            on_chain = await self.node.nonce(account.address, "pending")
            nonce = max(on_chain, int(row[0]) if row else 0)
            tx = {k: v for k, v in tx.items() if k != "from"} | {"nonce": nonce}
            signed = account.sign_transaction(tx)
            tx_hash = HexBytes(signed.hash).to_0x_hex()
            conn.execute(
                "INSERT INTO chain_txs (tx_hash, chain, account, nonce, kind, ref, raw, status, meta, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?)",
                (tx_hash, self.chain, account.address, nonce, kind, ref, bytes(signed.raw_transaction),
                 json.dumps(meta or {}), time.time()))
            conn.execute("INSERT INTO chain_nonces (chain, account, next) VALUES (?, ?, ?) "
                         "ON CONFLICT (chain, account) DO UPDATE SET next = excluded.next",
                         (self.chain, account.address, nonce + 1))
            await self.publish(self.update(tx_hash=tx_hash, kind=kind, ref=ref, account=account.address,
                                        status="pending"))
            self.store.on_commit(self.wake.set)
        log.info("tx %s %s %s nonce %d from %s", kind, ref, tx_hash, nonce, account.address)
        return tx_hash

    # --- broadcasting and tracking -------------------------------------------------------

    async def run(self, poll_s: float) -> None:
        """Broadcast and track until cancelled. Raises ChainUnavailable to the supervisor."""
        while True:
            await self.step()
            try:
                await asyncio.wait_for(self.wake.wait(), poll_s)
            except asyncio.TimeoutError:
                pass
            self.wake.clear()

    async def step(self) -> None:
        rows = ledger.pending_txs(self.store.conn)
        for row in rows:
            if not row["sent"]:
                await self._send(row)
        for row in rows:
            if row["sent"] or row["chain"] != self.chain:
                await self._check(row)

    async def _send(self, row: dict[str, Any]) -> None:
        if row["chain"] != self.chain:
            await self.finish(row, None, False, "chain reset: the transaction belongs to a chain that is gone")
            return
        try:
            await self.node.send_raw(row["raw"])
        except TxRejected as e:
            low = e.reason.lower()
            if "already known" in low or "known transaction" in low or "already imported" in low:
                pass
            elif await self.node.receipt(row["tx_hash"]) is not None:
                pass  # mined already; the check below picks the receipt up
            else:
                await self.finish(row, None, False, f"rejected by the node: {e.reason}")
                await self._resync_nonce(row["account"])
                return
        async with self.store.atomic() as conn:
            conn.execute("UPDATE chain_txs SET sent = 1, last_sent = ? WHERE tx_hash = ? AND chain = ?",
                         (time.time(), row["tx_hash"], row["chain"]))

    async def _check(self, row: dict[str, Any]) -> None:
        if row["chain"] != self.chain:
            await self.finish(row, None, False, "chain reset: the transaction belongs to a chain that is gone")
            return
        receipt = await self.node.receipt(row["tx_hash"])
        if receipt is not None:
            ok = int(receipt["status"]) == 1
            reason = "" if ok else await self.revert_reason(row, receipt)
            await self.finish(row, receipt, ok, reason)
            return
        if time.time() - row["last_sent"] >= self.resend_after_s and not await self.node.known(row["tx_hash"]):
            log.info("tx %s is pending here but unknown to the node: sending it again", row["tx_hash"])
            await self._send(row)

    async def revert_reason(self, row: dict[str, Any], receipt: Any) -> str:
        """Replay the call at the block before, to learn why it reverted."""
        try:
            async with guard():
                tx = await self.w3.eth.get_transaction(row["tx_hash"])
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
            cur = conn.execute(
                "UPDATE chain_txs SET status = ?, block = ?, reason = ?, gas_used = ? "
                "WHERE tx_hash = ? AND chain = ? AND status = 'pending'",
                (status, None if receipt is None else int(receipt["blockNumber"]), reason[:500],
                 None if receipt is None else int(receipt["gasUsed"]), row["tx_hash"], row["chain"]))
            if cur.rowcount != 1:
                return  # someone else finished it
            await self.publish(self.update(tx_hash=row["tx_hash"], kind=row["kind"], ref=row["ref"],
                                        account=row["account"], status=status,
                                        block=None if receipt is None else int(receipt["blockNumber"]),
                                        reason=reason[:500]))
            handler = self.on_final.get(row["kind"])
            if handler is not None:
                await handler(row, receipt, ok, reason)
        log.info("tx %s %s %s: %s%s", row["kind"], row["ref"], row["tx_hash"], status, f" ({reason})" if reason else "")

    async def _resync_nonce(self, account: str) -> None:
        """After a refused transaction, the next nonce is the node's (plus ours still pending)."""
        on_chain = await self.node.nonce(account, "pending")
        async with self.store.atomic() as conn:
            row = conn.execute("SELECT MAX(nonce) FROM chain_txs WHERE chain = ? AND account = ? AND status = 'pending'",
                               (self.chain, account)).fetchone()
            nxt = max(on_chain, (row[0] + 1) if row and row[0] is not None else 0)
            conn.execute("UPDATE chain_nonces SET next = ? WHERE chain = ? AND account = ?", (nxt, self.chain, account))

    def pending(self, account: str | None = None) -> list[dict[str, Any]]:
        return ledger.pending_txs(self.store.conn, account)
