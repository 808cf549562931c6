"""The double auction's panel in a real browser against the real micro-grid (every service
a real process from ``launcher.plan()``, the auction running both markets): the producer
sells and the consumer (on a phone's width) buys from the order form, both see the orders in
the book of the current call, the consumer's own marked, then the call's clearing in the
chart and in words; a mistake in the form is said next to it. The page stays accessible
and fits 375 px."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.async_api import Page, expect

from tests.support.plan import CONSUMER_SITE, RealStack

from .pages import MOBILE, WAIT, audit, both_wallets, confirmed, fits, go, number, shot

pytestmark = pytest.mark.browser

CLEAR_INTERVAL_S = 12
DOUBLE_ENV = {"GRIDTRADE_AUCTION_MARKET": "both", "GRIDTRADE_AUCTION_CLEAR_INTERVAL_S": str(CLEAR_INTERVAL_S)}


@pytest.fixture
def double_grid(tmp_path: pathlib.Path) -> Iterator[RealStack]:
    with RealStack(tmp_path, chain_url="anvil", time_scale=1440, env=DOUBLE_ENV,
                   meter_env={"meter-home-7": CONSUMER_SITE}) as grid:
        yield grid


async def left_in_call(page: Page) -> float:
    """Seconds until the call the panel shows clears (the gateway runs on this host's clock)."""
    return float(await page.evaluate(
        "Number(document.querySelector('#double-panel').dataset.clearsAt || 0) - Date.now() / 1000"))


@pytest.mark.timeout(420)
async def test_orders_from_the_form_reach_the_book_and_the_cleared_call_the_chart(
        browser: Any, double_grid: RealStack, artifacts_dir: pathlib.Path) -> None:
    grid = double_grid
    async with both_wallets(browser, grid, buyer_viewport=MOBILE) as (seller, buyer):
        await number(grid, seller.locator("#tokens"), "the producer's tokens to reach 1 kWh", lambda n: n >= 1,
                     timeout=120)
        # the consumer's escrow to buy with
        await buyer.fill("#deposit-amount", "0.01")
        await buyer.click("#deposit-btn")
        await confirmed(grid, buyer, buyer.locator("#deposit-status"), site="home-7")

        await go(seller, "market")
        await go(buyer, "market")
        for page in (seller, buyer):
            await expect(page.locator("#double-panel")).to_be_visible(timeout=WAIT)
            await expect(page.locator("#da-interval")).to_have_text(str(CLEAR_INTERVAL_S), timeout=WAIT)
        await expect(buyer.locator("#order-buy")).to_be_checked()

        # a mistake is said next to the form; nothing is sent
        await buyer.fill("#order-kwh", "lots")
        await buyer.fill("#order-price", "0.002")
        await buyer.click("#order-btn")
        await expect(buyer.locator("#order-error")).to_contain_text("Enter the energy in kWh")
        await expect(buyer.locator("#order-kwh")).to_have_attribute("aria-invalid", "true")
        await expect(buyer.locator("#order-status")).to_have_text("")

        # both orders in one call: wait for a call with most of its time left
        await grid.until("a call with time left for two orders",
                         lambda: _roomy(buyer), timeout=3 * CLEAR_INTERVAL_S)
        await seller.check("#order-sell")
        await expect(seller.locator("#order-btn")).to_have_text("Place sell order")
        await seller.fill("#order-kwh", "0.5")
        await seller.fill("#order-price", "0.001")
        await seller.click("#order-btn")
        await buyer.fill("#order-kwh", "0.4")
        await buyer.click("#order-btn")
        await expect(seller.locator("#order-status")).to_have_attribute("data-state", "done", timeout=WAIT)
        await expect(buyer.locator("#order-status")).to_have_attribute("data-state", "done", timeout=WAIT)
        await expect(buyer.locator("#order-status")).to_contain_text("Your buy order of 0.4 kWh")

        # the book of the call: the ask and the bid, the consumer's own marked
        ask = buyer.locator("#order-book tbody tr.ask")
        mine = buyer.locator("#order-book tbody tr.mine")
        await expect(ask).to_have_count(1, timeout=WAIT)
        await expect(mine).to_have_count(1)
        await expect(mine).to_have_attribute("data-side", "buy")
        await expect(mine.locator("td").nth(1)).to_have_text("0.4 kWh")
        await expect(mine.locator(".badge")).to_have_text("your order")
        await expect(ask.locator("td").nth(2)).to_have_text("0.001 Ether/kWh")
        await expect(seller.locator("#order-book tbody tr.mine")).to_have_attribute("data-side", "sell")
        assert (await buyer.locator("#da-countdown").text_content() or "").endswith("s")
        await fits(buyer, "market page with the double auction at 375 px")
        await audit(buyer, "market page with the double auction's book")

        # the call clears: the chart shows its price, the book is empty again, the note says what was filled
        for page in (seller, buyer):
            await expect(page.locator("#chart-calls circle.clear")).to_have_count(1, timeout=3 * CLEAR_INTERVAL_S * 1000)
        await expect(buyer.locator("#order-book-note")).to_contain_text("cleared 0.4 kWh at 0.001 Ether/kWh")
        await expect(buyer.locator("#order-book-note")).to_contain_text("Your buy order of 0.4 kWh: 0.4 kWh filled")
        await expect(buyer.locator("#order-book tbody tr")).to_have_count(0)
        await expect(buyer.locator("#chart-call-volume circle.volume")).not_to_have_count(0)
        await shot(seller, artifacts_dir, "double-auction-desktop")
        await fits(buyer, "market page after the call at 375 px")
        await audit(seller, "market page with the cleared call")
        assert not seller.errors and not buyer.errors, (seller.errors, buyer.errors)  # type: ignore[attr-defined]


async def _roomy(page: Page) -> bool:
    return await left_in_call(page) > CLEAR_INTERVAL_S * 0.6
