"""Meter keys -> the registry: a site's meter announces its key (``meter.key``, signed by
that key for the site's account); the registrar registers it once the account is the
site's own (its wallet's ownership claim). The registry checks the meter key's
signature itself, so no key can be registered by anyone who does not hold it; a meter
is registered once, ever (a revoked key cannot come back)."""

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


class Meters(Job):
    kinds = ("register",)
    SCHEMA: ClassVar[str] = """
CREATE TABLE IF NOT EXISTS job_meters (
    registry TEXT NOT NULL, meter TEXT NOT NULL, site TEXT NOT NULL, name TEXT NOT NULL, account TEXT NOT NULL,
    signature TEXT NOT NULL, state TEXT NOT NULL DEFAULT 'queued', tx_hash TEXT NOT NULL DEFAULT '',
    reason TEXT NOT NULL DEFAULT '', seq INTEGER NOT NULL, cause TEXT, PRIMARY KEY (registry, meter));
"""

    def __init__(self, op: Any) -> None:
        super().__init__(op)
        self.refused: dict[str, int] = {}  # site -> meter keys announced with a bad signature

    def record(self, env: Any, conn: Any) -> bool:
        body = env.body
        if not isinstance(body, E.MeterKey):
            return False
        domain = typed.registry_domain(body.chain_id, body.registry)
        if typed.recover_registration(domain, body.address, body.account, body.signature) != \
                AsyncWeb3.to_checksum_address(body.address):
            self.count(self.refused, env.site)
            log.warning("meter key %s of site %s: the signature is not the key's; ignored", body.address, env.site)
            return False
        seq = int(conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM job_meters").fetchone()[0])
        cur = conn.execute(
            "INSERT OR IGNORE INTO job_meters (registry, meter, site, name, account, signature, seq, cause) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (AsyncWeb3.to_checksum_address(body.registry), AsyncWeb3.to_checksum_address(body.address), body.site,
             body.meter, AsyncWeb3.to_checksum_address(body.account), body.signature, seq, env.id))
        return cur.rowcount > 0

    def accounts_of(self, registry: str) -> dict[str, str]:
        """meter -> account of the registered meters of this registry."""
        return dict(self.conn.execute("SELECT meter, account FROM job_meters WHERE registry = ? AND state = 'done'",
                                      (registry,)).fetchall())

    async def step(self) -> None:
        op = self.op
        assert op.dep is not None and op.txm is not None and op.registrar is not None
        reg = op.dep.registry
        rows = self.conn.execute(
            "SELECT meter, site, account, signature, cause FROM job_meters WHERE registry = ? AND state = 'queued' "
            "ORDER BY seq LIMIT 100", (op.dep.registry_address,)).fetchall()
        for meter, site, account, sig, cause in rows:
            owner = op.claims.site_of(account)
            with caused_by(cause):
                if owner != site:
                    if owner:
                        async with op.store.atomic() as conn:
                            self._set(conn, meter, "failed", f"account {account} belongs to site {owner}, not {site}")
                    continue  # not claimed yet: waits for its site's wallet
                async with guard():
                    now = await reg.functions.accountOf(meter).call(block_identifier=op.txm.final_block)
                async with op.store.atomic() as conn:
                    if now.lower() == account.lower():
                        self._set(conn, meter, "done")
                        continue
                    h, refused = await self.send(op.registrar, kind="register", ref=meter, to=op.dep.registry_address,
                                                 data=reg.encode_abi("register", args=[meter, account,
                                                                                       typed.sig_bytes(sig)]),
                                                 meta={"site": site, "account": account})
                    if h:
                        conn.execute("UPDATE job_meters SET state = 'sent', tx_hash = ? WHERE registry = ? AND meter = ?",
                                     (h, op.dep.registry_address, meter))
                    elif refused:
                        self._set(conn, meter, "failed", refused)

    def _set(self, conn: Any, meter: str, state: str, reason: str = "") -> None:
        assert self.op.dep is not None
        conn.execute("UPDATE job_meters SET state = ?, reason = ? WHERE registry = ? AND meter = ?",
                     (state, reason[:500], self.op.dep.registry_address, meter))
        if state == "done":
            log.info("meter %s is registered", meter)
            self.op.store.on_commit(self.op.work.set)  # its production can be minted now

    async def final(self, kind: str, row: dict[str, Any], receipt: Any, ok: bool, reason: str) -> None:
        self._set(self.conn, row["ref"], "done" if ok else "queued", "" if ok else reason)
        self.op.store.on_commit(self.op.work.set)

    def health(self) -> dict[str, Any]:
        states = dict(self.conn.execute("SELECT state, COUNT(*) FROM job_meters GROUP BY state").fetchall())
        return {"meters": states, "meter_keys_refused": dict(self.refused)}
