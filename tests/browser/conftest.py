"""Debian's chromium driven by Playwright (async API), and the real micro-grid behind it:
every process of ``launcher.plan()`` (anvil, hub, the market's operator and auction, and per site
its wallet, simulated meter and gateway) on a random block of loopback ports."""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from tests.support.plan import CONSUMER_SITE, RealStack

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update"]
# power over the line while a trade's relays are closed, on both sites (their meters cross-check):
# at 1440x a 1.5 kWh trade takes about a minute, so the buyer closes it part-way
LINE = {"GRIDTRADE_SIM__LINE_W": "60"}


@pytest.fixture
def real_grid(tmp_path: pathlib.Path) -> Iterator[RealStack]:
    # the operator settles every 100 Wh (its default 1000 Wh is for gas), so the page shows the
    # payments grow while the trade runs
    grid = RealStack(tmp_path, chain_url="anvil", time_scale=1440,
                     meter_env={"meter-solar-1": LINE, "meter-home-7": {**CONSUMER_SITE, **LINE}},
                     env={"GRIDTRADE_SETTLE_EVERY_WH": "100"})
    grid.start()
    try:
        yield grid
    finally:
        grid.stop()


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield b
        finally:
            await b.close()
    # Playwright hands file writes (screenshots) to the loop's default executor: join its threads
    await asyncio.get_running_loop().shutdown_default_executor()
