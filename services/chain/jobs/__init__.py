"""The operator's jobs: bus facts that become transactions, one module per kind.

Every job has one shape (:class:`Job`): ``record`` runs inside the subscriber's
transaction and only writes the job's own table (with the event's id as the cause of
what the job publishes later); ``step`` runs in the operator's worker, looks at the
chain first (what the contracts already hold is never sent again), builds the
transaction, and either records it as sent or, when the chain refuses it for good, marks
the job failed and says so on the bus (``chain.tx`` status failed); ``final`` runs when
a sent transaction is final (confirmed or failed) and publishes what happened, read from
the receipt's logs. The transaction manager routes each final transaction to the job of
its kind.

The jobs hold no user key and move nothing on their own word: every transaction carries
the signatures the contracts check (a meter's production or delivery, a seller's offer
and a buyer's bid); the operator only pays the gas and batches.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, ClassVar

from eth_account.signers.local import LocalAccount

from ..errors import TxRejected

if TYPE_CHECKING:
    from ..operator import OperatorService

log = logging.getLogger(__name__)


class Job:
    kinds: ClassVar[tuple[str, ...]] = ()
    """The transaction kinds this job sends (and whose final receipts it handles)."""
    SCHEMA: ClassVar[str] = ""

    def __init__(self, op: OperatorService) -> None:
        self.op = op
        self._due_since: float | None = None

    def collecting(self, due: bool, window_s: float) -> bool:
        """Whether to wait before sending what is due: work that comes due together (an
        auction round agrees many trades, a meter's readings of many trades arrive) is
        collected for ``window_s`` from when the first of it came due, then sent together."""
        if not due:
            self._due_since = None
            return True
        now = time.monotonic()
        if self._due_since is None:
            self._due_since = now
        if now - self._due_since < window_s:
            asyncio.get_running_loop().call_later(window_s, self.op.work.set)
            return True
        self._due_since = None
        return False

    @property
    def conn(self) -> Any:
        return self.op.store.conn

    def count(self, counts: dict[str, int], site: str) -> None:
        """One more in ``counts[site]`` once the subscriber's transaction commits (``record``
        may run again on an event whose batch was rolled back: it counts once)."""
        self.op.store.on_commit(lambda: counts.__setitem__(site, counts.get(site, 0) + 1))

    def create(self, conn: Any) -> None:
        if self.SCHEMA:
            conn.executescript(self.SCHEMA)

    def record(self, env: Any, conn: Any) -> bool:
        """A bus event, inside the subscriber's transaction; True when it added work."""
        return False

    async def step(self) -> None:
        """One round of work: turn due jobs into transactions."""

    async def final(self, kind: str, row: dict[str, Any], receipt: Any, ok: bool, reason: str) -> None:
        """A transaction of one of ``kinds`` is final (runs in the manager's transaction)."""

    def health(self) -> dict[str, Any]:
        return {}

    # --- shared --------------------------------------------------------------------

    async def send(self, key: LocalAccount, *, kind: str, ref: str, to: str, data: Any, account: str | None = None,
                   meta: dict[str, Any] | None = None, later_if: tuple[str, ...] = ()) -> tuple[str | None, str | None]:
        """Build and record one transaction (call inside a store transaction).

        Returns (hash, None) once it is signed and stored to be sent; (None, reason) when the
        chain refuses it for good (announced as a failed ``chain.tx``); (None, None) when it
        may depend on a transaction still pending, or the refusal names one of ``later_if``
        (a time that has not come yet): try again next round."""
        txm = self.op.txm
        assert txm is not None
        try:
            tx = await txm.build(key.address, to=to, data=data)
        except TxRejected as e:
            if self.op.have_pending() or any(w in e.reason for w in later_if):
                return None, None
            await self.op.fail_job(kind, ref, account or key.address, e.reason)
            return None, e.reason
        return await txm.prepare(key, tx, kind=kind, ref=ref, meta=meta or {}), None

    def logs(self, contract: Any, event: str, receipt: Any) -> list[Any]:
        """The ``event`` logs of ``contract`` in a receipt (others' logs ignored)."""
        if receipt is None:
            return []
        return list(getattr(contract.events, event)().process_receipt(receipt, errors=_DISCARD))


try:  # web3's log-processing error policy
    from web3.logs import DISCARD as _DISCARD
except ImportError:  # pragma: no cover
    _DISCARD = "discard"  # type: ignore[assignment]
