"""Prints what the Docker tests measured (image sizes, build and start-up times) at the
end of the run, and keeps it in test-artifacts/docker-report.json."""

from __future__ import annotations

import json

import pytest

from tests.support.paths import ARTIFACTS

from .engine import REPORT


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not REPORT:
        return
    terminalreporter.section("docker")
    for key, value in REPORT.items():
        if isinstance(value, dict):
            terminalreporter.write_line(f"{key}:")
            for k, v in value.items():
                terminalreporter.write_line(f"    {k}: {v}")
        else:
            terminalreporter.write_line(f"{key}: {value}")
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "docker-report.json").write_text(json.dumps(REPORT, indent=2) + "\n")
