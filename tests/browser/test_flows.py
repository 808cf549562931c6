"""The seed's demo in a real browser: a producer and a consumer in two browser contexts.

The chain and the meters are STAND-INS (tests/gateway/standins.py) publishing what the
real services would; the auction is the real service. Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import pathlib
import re
from typing import Any

import pytest
from playwright.async_api import Page, expect

from tests.bus.conftest import Grid
from tests.gateway.conftest import CONSUMER, PRODUCER, THIRD, Stack

pytestmark = pytest.mark.browser
WAIT = 30_000  # ms: how long a page may take to show what the bus says (a deadline, not a measurement)


async def open_wallet(browser: Any, url: str, who: Any) -> tuple[Any, Page]:
    ctx = await browser.new_context(viewport={"width": 1280, "height": 1000})
    page = await ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.errors = errors  # type: ignore[attr-defined]
    await page.goto(url + "/")
    await expect(page.locator("#view-login")).to_be_visible(timeout=WAIT)
    await expect(page.locator(f'#account option[value="{who.address}"]')).to_have_count(1, timeout=WAIT)
    await page.select_option("#account", who.address)
    await page.fill("#passphrase", who.passphrase)
    await page.click("#login-btn")
    await expect(page.locator("#view-wallet")).to_be_visible(timeout=WAIT)
    await expect(page.locator("#live")).to_have_text("live", timeout=WAIT)
    return ctx, page


async def shot(page: Page, artifacts: pathlib.Path, name: str) -> None:
    await page.screenshot(path=str(artifacts / f"browser-{name}.png"), full_page=True)


async def test_sell_bid_trade_close_transfer_and_mining(browser: Any, grid: Grid, artifacts_dir: pathlib.Path) -> None:
    async with Stack(grid, meters=True) as s:
        pctx, seller = await open_wallet(browser, s.url("solar-1"), PRODUCER)
        cctx, buyer = await open_wallet(browser, s.url("home-7"), CONSUMER)
        try:
            # a wrong passphrase is explained in words
            bad = await browser.new_context()
            page = await bad.new_page()
            await page.goto(s.url("home-7") + "/")
            await expect(page.locator(f'#account option[value="{THIRD.address}"]')).to_have_count(1, timeout=WAIT)
            await page.select_option("#account", THIRD.address)
            await page.fill("#passphrase", "not it")
            await page.click("#login-btn")
            await expect(page.locator("#login-error")).to_have_text("wrong account or passphrase", timeout=WAIT)
            await shot(page, artifacts_dir, "0-login-error")
            await bad.close()

            # wallet: the dock, tokens, generation, balance
            await expect(seller.locator("#tokens")).to_have_text("5", timeout=WAIT)
            await expect(seller.locator("#generation")).to_have_text("5", timeout=WAIT)
            await expect(buyer.locator("#balance")).to_have_text("100", timeout=WAIT)
            await expect(buyer.locator("#escrow-free")).to_have_text("1", timeout=WAIT)
            await expect(seller.locator("#dock")).to_contain_text("Energy Marketplace")
            await shot(seller, artifacts_dir, "1-producer-wallet")

            # the marketplace: sell 1.5 kWh, start bid 0.001 Ether/kWh
            await seller.click("#nav-market")
            await buyer.click("#nav-market")
            await expect(seller.locator("#view-market")).to_be_visible()
            await seller.fill("#sell-kwh", "1.5")
            await seller.fill("#sell-price", "0.001")
            await seller.fill("#sell-duration", "6")
            await seller.click("#sell-btn")
            card = buyer.locator("#offers [data-offer]")
            await expect(card).to_have_count(1, timeout=WAIT)
            await expect(card.locator(".kwh")).to_have_text("1.5")
            await expect(card.locator(".countdown")).to_have_text(re.compile(r"^\d+s$"), timeout=WAIT)

            # a bid below the start bid: the market's reason, in words
            await card.locator(".bid-price").fill("0.0005")
            await card.locator(".bid-btn").click()
            await expect(buyer.locator("#toast")).to_contain_text("start bid", timeout=WAIT)
            await card.locator(".bid-price").fill("0.002")
            await card.locator(".bid-btn").click()
            seller_card = seller.locator("#offers [data-offer]")
            await expect(seller_card.locator(".highest")).to_have_text("0.002 Ether/kWh", timeout=WAIT)
            await shot(buyer, artifacts_dir, "2-consumer-bid")

            # the countdown ends, the trade is recorded and delivers; payments appear on both pages
            await expect(card.locator(".countdown")).to_have_text("ended (sold)", timeout=WAIT)
            trade = buyer.locator("#trades [data-trade]")
            await expect(trade).to_have_count(1, timeout=WAIT)
            await expect(trade).to_have_attribute("data-state", "delivering", timeout=WAIT)
            await expect(trade.locator(".paid")).not_to_have_text("0", timeout=WAIT)
            await expect(seller.locator("#trades [data-trade] .paid")).not_to_have_text("0", timeout=WAIT)
            await shot(buyer, artifacts_dir, "3-trade-delivering")

            # Close Connection: only on the buyer's page
            await expect(seller.locator("#trades [data-trade] .close-btn")).to_be_hidden()
            await trade.locator(".close-btn").click()
            await expect(trade).to_have_attribute("data-state", "settled", timeout=WAIT)
            await expect(seller.locator("#trades [data-trade]")).to_have_attribute("data-state", "settled",
                                                                                   timeout=WAIT)
            paid = await trade.locator(".paid").text_content()
            delivered = int(await trade.locator(".delivered").text_content() or "0")
            assert 0 < delivered < 1500 and paid == f"{delivered * 2 / 1_000_000:.9f}".rstrip("0").rstrip(".")
            await expect(trade.locator(".close-btn")).to_be_hidden()
            await shot(buyer, artifacts_dir, "4-trade-closed")

            # the seller's wallet shows what was earned
            await seller.click("#nav-wallet")
            await expect(seller.locator("#credit")).to_have_text(paid or "?", timeout=WAIT)

            # an Ether transfer: pending, then gone once mined
            await buyer.click("#nav-wallet")
            await buyer.fill("#transfer-to", THIRD.address)
            await buyer.fill("#transfer-amount", "1.25")
            await buyer.click("#transfer-btn")
            await expect(buyer.locator("#transfer-result")).to_contain_text("sent: 0x", timeout=WAIT)
            first = (await buyer.locator("#transfer-result").text_content() or "").removeprefix("sent: ")
            await expect(buyer.locator(f'#pending li[data-hash="{first}"]')).to_have_count(0, timeout=WAIT)
            await expect(buyer.locator("#balance")).to_have_text("98.75", timeout=WAIT)

            # stop mining: the next transfer stays pending until mining starts again
            await seller.click("#mining-stop")
            await expect(seller.locator("#mining-state")).to_have_text("off", timeout=WAIT)
            await expect(buyer.locator("#mining-state")).to_have_text("off", timeout=WAIT)  # pushed, no reload
            await buyer.fill("#transfer-amount", "0.5")
            await buyer.click("#transfer-btn")
            await expect(buyer.locator("#transfer-result")).not_to_contain_text(first, timeout=WAIT)
            second = (await buyer.locator("#transfer-result").text_content() or "").removeprefix("sent: ")
            pending = buyer.locator(f'#pending li[data-hash="{second}"]')
            await expect(pending).to_have_count(1, timeout=WAIT)
            assert [t.tx_hash for t in s.chain.pending] == [second]  # the stand-in holds it: no blocks
            await buyer.reload()  # the pending list comes from the chain too, not only from this page
            await expect(buyer.locator(f'#pending li[data-hash="{second}"]')).to_have_count(1, timeout=WAIT)
            await shot(buyer, artifacts_dir, "5-transfer-pending")
            await seller.click("#mining-start")
            await expect(buyer.locator("#mining-state")).to_have_text("on", timeout=WAIT)
            await expect(buyer.locator(f'#pending li[data-hash="{second}"]')).to_have_count(0, timeout=WAIT)
            await expect(buyer.locator("#balance")).to_have_text("98.25", timeout=WAIT)
            await shot(buyer, artifacts_dir, "6-transfer-confirmed")

            # charts are drawn from the live meter readings
            await expect(buyer.locator("#chart-energy .uplot")).to_have_count(1, timeout=WAIT)

            # logout goes back to the login page
            await buyer.click("#logout")
            await expect(buyer.locator("#view-login")).to_be_visible(timeout=WAIT)
            assert not seller.errors and not buyer.errors, (seller.errors, buyer.errors)  # type: ignore[attr-defined]
        finally:
            await pctx.close()
            await cctx.close()
