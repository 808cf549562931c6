"""Signed production -> tokens. A meter signs its cumulative production; the token mints
only the delta since that meter's last mint, to the account the registry holds for it.
So the operator keeps, per meter, the highest signed counter it heard, and submits it
(many meters in one ``mintBatch``) once the meter is registered: a replayed or older
reading mints nothing, whoever sends it, and a reading announced twice is one mint."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from web3 import AsyncWeb3

from services.bus import events as E
from services.bus import typed
from services.bus.envelope import caused_by

from ..node import guard
from . import Job

log = logging.getLogger(__name__)

BATCH = 50


class Mints(Job):
    kinds = ("mint",)
    SCHEMA: ClassVar[str] = """
CREATE TABLE IF NOT EXISTS job_production (
    token TEXT NOT NULL, meter TEXT NOT NULL, site TEXT NOT NULL, produced_wh INTEGER NOT NULL,
    signature TEXT NOT NULL, minted_wh INTEGER NOT NULL DEFAULT 0, refused_wh INTEGER NOT NULL DEFAULT 0,
    tx_hash TEXT NOT NULL DEFAULT '', reason TEXT NOT NULL DEFAULT '', seq INTEGER NOT NULL, cause TEXT,
    PRIMARY KEY (token, meter));
"""

    def __init__(self, op: Any) -> None:
        super().__init__(op)
        self.refused: dict[str, int] = {}  # publishing site -> production readings with a bad signature

    def record(self, env: Any, conn: Any) -> bool:
        body = env.body
        if not isinstance(body, E.EnergyProduced):
            return False
        meter = AsyncWeb3.to_checksum_address(body.meter_address)
        domain = typed.token_domain(body.chain_id, body.token)
        if typed.recover_production(domain, meter, body.produced_wh, body.signature) != meter:
            self.count(self.refused, env.site)
            log.warning("production %s Wh of meter %s from site %s: not signed by that meter; ignored",
                        body.produced_wh, meter, env.site)
            return False
        seq = int(conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM job_production").fetchone()[0])
        cur = conn.execute(
            "INSERT INTO job_production (token, meter, site, produced_wh, signature, seq, cause) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (token, meter) DO UPDATE SET produced_wh = excluded.produced_wh, "
            "signature = excluded.signature, cause = excluded.cause, seq = excluded.seq "
            "WHERE excluded.produced_wh > job_production.produced_wh",
            (AsyncWeb3.to_checksum_address(body.token), meter, body.site, body.produced_wh, body.signature, seq,
             env.id))
        return cur.rowcount > 0

    async def step(self) -> None:
        op = self.op
        assert op.dep is not None and op.txm is not None and op.operator is not None
        token = op.dep.token
        registered = op.meters.accounts_of(op.dep.registry_address)
        rows = [r for r in self.conn.execute(
            "SELECT meter, produced_wh, signature, cause FROM job_production WHERE token = ? AND tx_hash = '' "
            "AND produced_wh > minted_wh AND produced_wh > refused_wh ORDER BY seq", (op.dep.token_address,)
        ).fetchall() if r[0] in registered]
        if not rows:
            return
        batch: list[tuple[str, int, str]] = []
        causes: dict[str, str | None] = {}
        for meter, produced, sig, cause in rows[:BATCH]:
            async with guard():
                minted = int(await token.functions.mintedOf(meter).call(block_identifier=op.txm.final_block))
            if minted >= produced:  # minted already (an earlier run, or someone else submitted it)
                async with op.store.atomic() as conn:
                    conn.execute("UPDATE job_production SET minted_wh = ? WHERE token = ? AND meter = ?",
                                 (minted, op.dep.token_address, meter))
                continue
            batch.append((meter, produced, sig))
            causes[meter] = cause
        if not batch:
            return
        if len(batch) == 1:
            m, p, s = batch[0]
            data = token.encode_abi("mint", args=[m, p, typed.sig_bytes(s)])
        else:
            data = token.encode_abi("mintBatch", args=[[m for m, _, _ in batch], [p for _, p, _ in batch],
                                                       [typed.sig_bytes(s) for _, _, s in batch]])
        async with op.store.atomic() as conn, caused_by(causes[batch[0][0]]):
            ref = ",".join(m for m, _, _ in batch)[:500]
            h, refused = await self.send(op.operator, kind="mint", ref=ref, to=op.dep.token_address, data=data,
                                         meta={"entries": [[m, p] for m, p, _ in batch], "causes": causes})
            if h:
                conn.executemany("UPDATE job_production SET tx_hash = ? WHERE token = ? AND meter = ?",
                                 [(h, op.dep.token_address, m) for m, _, _ in batch])
            elif refused:  # not again until the meter signs a higher counter
                conn.executemany("UPDATE job_production SET refused_wh = ?, reason = ? WHERE token = ? AND meter = ?",
                                 [(p, refused[:500], op.dep.token_address, m) for m, p, _ in batch])

    async def final(self, kind: str, row: dict[str, Any], receipt: Any, ok: bool, reason: str) -> None:
        op = self.op
        assert op.dep is not None
        conn = self.conn
        conn.execute("UPDATE job_production SET tx_hash = '', reason = ? WHERE tx_hash = ?",
                     ("" if ok else reason[:500], row["tx_hash"]))
        causes = row["meta"].get("causes", {})
        for ev in self.logs(op.dep.token, "Minted", receipt) if ok else []:
            a = ev["args"]
            meter, produced = str(a["meter"]), int(a["producedWh"])
            conn.execute("UPDATE job_production SET minted_wh = MAX(minted_wh, ?) WHERE token = ? AND meter = ?",
                         (produced, op.dep.token_address, meter))
            with caused_by(causes.get(meter)):
                await op.publish(E.Minted(account=str(a["to"]), meter=meter, produced_wh=produced,
                                          wh=int(a["amountWh"]), tx_hash=row["tx_hash"]))
        op.store.on_commit(op.work.set)

    def health(self) -> dict[str, Any]:
        return {"production_refused": dict(self.refused)}
