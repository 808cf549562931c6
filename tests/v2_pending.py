"""Marks for the tests that need pieces of contracts v2 still being built elsewhere.

They are written against the interface of the v2 spec and run as soon as the v2
contracts are in the tree; until then they are reported as expected failures, not run
(``run=False``: they would only wait for a chain that cannot come up).
"""

from __future__ import annotations

import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONTRACTS_V2 = (ROOT / "contracts" / "artifacts" / "MeterRegistry.json").exists()

needs_chain_v2 = pytest.mark.xfail(
    not CONTRACTS_V2, run=False, strict=False,
    reason="waiting for contracts v2 (contracts/: MeterRegistry, EnergyMarket v2 with reserve, reservedEscrow, "
           "reservedUntil; services/chain/contracts.py v2) and the operator v2 (services/chain/operator.py) that "
           "deploys them and announces the registry in chain.deployment")

needs_grid_v2 = pytest.mark.xfail(
    not CONTRACTS_V2, run=False, strict=False,
    reason="the real grid needs contracts v2 (contracts/, services/chain/contracts.py), the operator v2 "
           "(services/chain/operator.py: opens trades from the signed offer and bid) and the meters v2 "
           "(services/meter/: signed production to mint from, signed deliveries to settle)")
