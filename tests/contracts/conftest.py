"""Contract tests run on both chains (`w3` is parametrized over embedded py-evm and anvil)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from web3 import AsyncWeb3
from web3.logs import EventLogErrorFlags
from web3.types import TxReceipt

from services.chain import contracts as c
from tests.chain_fixtures import *  # noqa: F403 (anvil_url, anvil_w3, embedded_w3, w3, sync_anvil_w3)

ETHER = 10**18


@dataclass
class Env:
    """Freshly deployed contracts and named dev accounts: admin (also operator), meter (minter),
    seller, buyer, other (no role, no stake)."""

    w3: AsyncWeb3
    d: c.Deployment
    admin: str
    meter: str
    seller: str
    buyer: str
    other: str

    @property
    def token(self) -> Any:
        return self.d.token.functions

    @property
    def market(self) -> Any:
        return self.d.market.functions

    async def tx(self, call: Any, sender: str, value: int = 0) -> TxReceipt:
        """Send and return the receipt (status 1)."""
        return await c.send(self.w3, call, sender, value)

    async def reverts(self, call: Any, sender: str, value: int = 0) -> str:
        """Send a call that must revert; return its revert reason."""
        try:
            await c.send(self.w3, call, sender, value)
        except Exception as exc:  # the backend decides the exception type; revert_reason reads both
            reason = c.revert_reason(exc)
            if reason is None:
                raise
            return reason
        pytest.fail("call did not revert")

    async def eth(self, address: str) -> int:
        return await self.w3.eth.get_balance(address)

    async def escrow(self, account: str) -> tuple[int, int]:
        """(free, locked) escrow of `account` in wei."""
        return (await self.market.freeEscrow(account).call(), await self.market.lockedEscrow(account).call())

    async def tokens(self, account: str) -> int:
        return await self.token.balanceOf(account).call()

    def events(self, receipt: TxReceipt, contract: Any, name: str) -> list[dict[str, Any]]:
        """Decoded `name` events emitted by `contract` in `receipt`."""
        event = getattr(contract.events, name)()
        return [dict(e["args"]) for e in event.process_receipt(receipt, errors=EventLogErrorFlags.Discard) if e["address"] == contract.address]


def fee(receipt: TxReceipt) -> int:
    """Ether the sender paid for gas."""
    return receipt["gasUsed"] * receipt["effectiveGasPrice"]


@pytest.fixture
async def env(w3: AsyncWeb3) -> Env:
    accounts = await w3.eth.accounts
    admin, meter, seller, buyer, other = accounts[:5]
    d = await c.deploy(w3, admin, minter=meter)
    return Env(w3=w3, d=d, admin=admin, meter=meter, seller=seller, buyer=buyer, other=other)
