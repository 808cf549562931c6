"""Every revert reason the contracts can give is asserted by a contract test: a new `require`
without a test fails here."""

from __future__ import annotations

import pathlib
import re

from contracts import build

TESTS = pathlib.Path(__file__).resolve().parent
REASON = re.compile(r'"((?:MeterRegistry|EnergyToken|EnergyMarket|AccessControl|ERC20): [^"]+)"')
#: Reasons no test can reach: the token is trusted and never returns false from a transfer.
UNREACHABLE = {"EnergyMarket: token transfer failed"}


def test_every_revert_reason_is_tested() -> None:
    reasons = {m for p in build.HERE.glob("*.sol") for m in REASON.findall(p.read_text())}
    assert len(reasons) > 60
    tests = "\n".join(p.read_text() for p in TESTS.glob("test_*.py") if p.name != pathlib.Path(__file__).name)
    untested = []
    for reason in sorted(reasons - UNREACHABLE):
        contract, _, text = reason.partition(": ")
        # tests of the market spell its reasons M + "text" (M = "EnergyMarket: ") or in tables of texts
        if f'"{reason}"' not in tests and not (contract == "EnergyMarket" and f'"{text}"' in tests):
            untested.append(reason)
    assert untested == []
