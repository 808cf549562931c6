"""The Agent page in a real browser against the real micro-grid with the sites' agents on
(every service a real process from ``launcher.plan()``): the owner sees what the agent does,
changes its limits, and the agent's next offers follow them; turned off, it offers nothing."""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.async_api import expect

from tests.support.plan import CONSUMER_SITE, RealStack

from .pages import MOBILE, WAIT, audit, fits, go, open_wallet, shot

pytestmark = pytest.mark.browser

AGENT_ENV = {"GRIDTRADE_AGENT_EVERY_S": "1", "GRIDTRADE_AGENT_OFFER_DURATION_S": "5",
             "GRIDTRADE_AGENT_MAX_TRADE_WH": "600"}


@pytest.fixture
def agent_grid(tmp_path: pathlib.Path) -> Iterator[RealStack]:
    with RealStack(tmp_path, chain_url="anvil", time_scale=1440, env=AGENT_ENV, agents=True,
                   meter_env={"meter-home-7": CONSUMER_SITE}) as grid:
        yield grid


def offers_made(grid: RealStack) -> int:
    return int(((grid.health("agent-solar-1") or {}).get("actions") or {}).get("offer:ok", 0))


@pytest.mark.timeout(420)
async def test_the_owner_sets_the_agents_limits_and_its_next_offers_follow(
        browser: Any, agent_grid: RealStack, artifacts_dir: pathlib.Path) -> None:
    grid = agent_grid
    producer = grid.people["producer"]
    ctx, page = await open_wallet(browser, grid.url("solar-1"), producer)  # the login unlocks the key it signs with
    try:
        await go(page, "agent")
        await expect(page.locator("#agent-state")).to_have_text("Trading for you", timeout=WAIT)
        rows = page.locator("#agent-actions tbody tr")
        await expect(rows.first).to_contain_text("offer", timeout=90_000)
        await expect(rows.first.locator("td").nth(2)).to_have_text("0.6 kWh")  # the configured largest trade
        await expect(page.locator("#agent-max-trade")).to_have_value("0.6")

        # the owner: at most 0.25 kWh a trade, and never below 0.002 Ether per kWh
        await page.fill("#agent-max-trade", "0.25")
        await page.fill("#agent-min-sell", "0.002")
        await page.click("#agent-save")
        await expect(page.locator("#agent-status")).to_contain_text("Saved", timeout=WAIT)
        await expect(page.locator("#agent-floor")).to_contain_text("0.002")
        await expect(rows.first.locator("td").nth(2)).to_have_text("0.25 kWh", timeout=90_000)
        await expect(rows.first.locator("td").nth(3)).to_contain_text("0.002")
        await shot(page, artifacts_dir, "agent-desktop", docs="agent-desktop")

        # turned off: it offers nothing more
        await page.uncheck("#agent-enabled")
        await page.click("#agent-save")
        await expect(page.locator("#agent-state")).to_have_text("Off: you trade by hand", timeout=WAIT)
        before = offers_made(grid)
        await asyncio.sleep(8)  # more than one offer's auction and several decisions
        assert offers_made(grid) == before

        # the page at a phone's width: nothing sideways, no serious accessibility fault
        await page.set_viewport_size(MOBILE)
        await fits(page, "agent page at 375 px")
        await audit(page, "agent page")
        await shot(page, artifacts_dir, "agent-mobile", docs="agent-mobile")
        assert not page.errors, page.errors  # type: ignore[attr-defined]
    finally:
        await ctx.close()
