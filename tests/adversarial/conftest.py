"""On a failed adversarial test, the tails of the grid's service logs join the report."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    for value in getattr(item, "funcargs", {}).values():
        grid = getattr(value, "g", value)
        stack = getattr(grid, "stack", None)
        if report.failed and stack is not None and hasattr(stack, "log_tails"):
            report.sections.append(("service log tails", stack.log_tails()))
            break
