"""The seed's demo in a real browser against the real micro-grid: every service a real
process from ``launcher.plan()`` on a real anvil node, simulated meters on a sunny
morning at 1440x, a producer and a consumer in two browser contexts with the
passphrases ``launcher.prepare()`` made. Screenshots go to test-artifacts/; the
marketplace with a live trade also to docs/trade.png when that file is missing or
GRIDTRADE_DOCS_SCREENSHOT=1.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import signal
from decimal import Decimal
from typing import Any

import pytest
import zmq.asyncio
from playwright.async_api import Locator, Page, expect

from services.bus import RpcClient, Security
from services.bus import commands as cmd
from tests.gateway.realstack import Person, RealStack

pytestmark = pytest.mark.browser
WAIT = 60_000  # ms: how long a page may take to show what the grid does (a deadline, not a measurement)
DOCS_SHOT = pathlib.Path(__file__).resolve().parents[2] / "docs" / "trade.png"
ELSEWHERE = "0x" + "c3" * 20  # an account outside this grid
TICK = Decimal("0.000001")  # the page shows Ether truncated to 6 decimals


async def set_mining_as_market(grid: RealStack, action: str) -> None:
    """Mining is started and stopped by the market's site only (with the market's key)."""
    env = grid.bus_env()
    ctx = zmq.asyncio.Context()
    client = RpcClient(ctx, Security(pathlib.Path(env["GRIDTRADE_KEYS_DIR"]), "market"), env["GRIDTRADE_CHAIN_RPC"],
                       server_site="market")
    try:
        await client.request(cmd.SetMining(action=action), timeout=30)  # type: ignore[arg-type]
    finally:
        await client.close()
        ctx.destroy(linger=0)


async def open_wallet(browser: Any, url: str, who: Person) -> tuple[Any, Page]:
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


async def shot(page: Page, artifacts: pathlib.Path, name: str) -> pathlib.Path:
    path = artifacts / f"browser-{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    return path


async def number(grid: RealStack, loc: Locator, what: str, ok: Any, timeout: float = 60) -> Decimal:
    """Wait until the element shows a number for which ``ok(n)`` holds; return it."""
    async def check() -> Decimal | None:
        text = (await loc.text_content() or "").strip()
        n = Decimal(text) if re.fullmatch(r"-?\d+(\.\d+)?", text) else None
        return n if n is not None and ok(n) else None
    return Decimal(await grid.until(what, check, timeout=timeout))


@pytest.mark.timeout(420)
async def test_sell_bid_trade_close_transfer_and_mining(browser: Any, real_grid: RealStack,
                                                        artifacts_dir: pathlib.Path) -> None:
    grid = real_grid
    producer, consumer = grid.people["producer"], grid.people["consumer"]
    pctx, seller = await open_wallet(browser, grid.url("solar-1"), producer)
    cctx, buyer = await open_wallet(browser, grid.url("home-7"), consumer)
    try:
        # a wrong passphrase is explained in words
        bad = await browser.new_context()
        page = await bad.new_page()
        await page.goto(grid.url("home-7") + "/")
        await expect(page.locator(f'#account option[value="{consumer.address}"]')).to_have_count(1, timeout=WAIT)
        await page.select_option("#account", consumer.address)
        await page.fill("#passphrase", "not it")
        await page.click("#login-btn")
        await expect(page.locator("#login-error")).to_have_text("wrong account or passphrase", timeout=WAIT)
        await shot(page, artifacts_dir, "0-login-error")
        await bad.close()

        # wallet: the dock; the producer's meter mints tokens from the morning sun; the dev chain funds both
        await expect(seller.locator("#dock")).to_contain_text("Energy Marketplace")
        await number(grid, seller.locator("#tokens"), "the producer's tokens to reach 2 kWh", lambda n: n >= 2,
                     timeout=120)
        await number(grid, seller.locator("#generation"), "the producer's generation", lambda n: n >= 2)
        before = await number(grid, buyer.locator("#balance"), "the consumer's Ether from the dev chain",
                              lambda n: n > 99)
        await shot(seller, artifacts_dir, "1-producer-wallet")

        # the consumer funds escrow for bids
        await buyer.fill("#deposit-amount", "0.01")
        await buyer.click("#deposit-form button[type=submit]")
        await expect(buyer.locator("#escrow-free")).to_have_text("0.01", timeout=WAIT)

        # the marketplace: sell 1.5 kWh, start bid 0.001 Ether/kWh
        await seller.click("#nav-market")
        await buyer.click("#nav-market")
        await expect(seller.locator("#view-market")).to_be_visible()
        await seller.fill("#sell-kwh", "1.5")
        await seller.fill("#sell-price", "0.001")
        await seller.fill("#sell-duration", "15")
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

        # the countdown ends, the trade is recorded on the chain and delivers; payments appear on both pages
        await expect(card.locator(".countdown")).to_have_text("ended (sold)", timeout=WAIT)
        trade = buyer.locator("#trades [data-trade]")
        await expect(trade).to_have_count(1, timeout=WAIT)
        await expect(trade).to_have_attribute("data-state", "delivering", timeout=WAIT)
        await number(grid, trade.locator(".delivered"), "delivered Wh on the buyer's page", lambda n: n > 0)
        await number(grid, trade.locator(".paid"), "a payment on the buyer's page", lambda n: n > 0)
        await number(grid, seller.locator("#trades [data-trade] .paid"), "a payment on the seller's page",
                     lambda n: n > 0)
        path = await shot(buyer, artifacts_dir, "3-trade-delivering")
        if os.environ.get("GRIDTRADE_DOCS_SCREENSHOT") == "1" or not DOCS_SHOT.exists():
            DOCS_SHOT.parent.mkdir(exist_ok=True)
            shutil.copyfile(path, DOCS_SHOT)

        # Close Connection: only on the buyer's page
        await expect(seller.locator("#trades [data-trade] .close-btn")).to_be_hidden()
        await trade.locator(".close-btn").click()
        await expect(trade).to_have_attribute("data-state", "settled", timeout=WAIT)
        await expect(seller.locator("#trades [data-trade]")).to_have_attribute("data-state", "settled",
                                                                               timeout=WAIT)
        paid = await trade.locator(".paid").text_content()
        delivered = int(await trade.locator(".delivered").text_content() or "0")
        assert 0 < delivered < 1500, delivered  # closed part-way
        assert paid == f"{Decimal(delivered) * 2 / 1_000_000:.9f}".rstrip("0").rstrip(".")  # 0.002 Ether/kWh
        await expect(trade.locator(".close-btn")).to_be_hidden()
        await shot(buyer, artifacts_dir, "4-trade-closed")

        # the seller's wallet shows what was earned
        await seller.click("#nav-wallet")
        await expect(seller.locator("#credit")).to_have_text(paid or "?", timeout=WAIT)

        # an Ether transfer: pending, then gone once mined (gas is paid on top)
        await buyer.click("#nav-wallet")
        start = await number(grid, buyer.locator("#balance"), "the consumer's balance", lambda n: n < before)
        await buyer.fill("#transfer-to", ELSEWHERE)
        await buyer.fill("#transfer-amount", "1.25")
        await buyer.click("#transfer-btn")
        await expect(buyer.locator("#transfer-result")).to_contain_text("sent: 0x", timeout=WAIT)
        first = (await buyer.locator("#transfer-result").text_content() or "").removeprefix("sent: ")
        await expect(buyer.locator(f'#pending li[data-hash="{first}"]')).to_have_count(0, timeout=WAIT)
        after_first = await number(grid, buyer.locator("#balance"), "the balance to drop by 1.25 Ether and gas",
                                   lambda n: start - Decimal("1.26") < n <= start - Decimal("1.25") + TICK)

        # a site's wallet shows mining but cannot switch it; the market stops it: the next
        # transfer stays pending until the market starts mining again
        await expect(seller.locator("#mining-stop")).to_be_disabled(timeout=WAIT)
        await set_mining_as_market(grid, "stop")
        await expect(seller.locator("#mining-state")).to_have_text("off", timeout=WAIT)
        await expect(buyer.locator("#mining-state")).to_have_text("off", timeout=WAIT)  # pushed, no reload
        await buyer.fill("#transfer-amount", "0.5")
        await buyer.click("#transfer-btn")
        await expect(buyer.locator("#transfer-result")).not_to_contain_text(first, timeout=WAIT)
        second = (await buyer.locator("#transfer-result").text_content() or "").removeprefix("sent: ")
        pending = buyer.locator(f'#pending li[data-hash="{second}"]')
        await expect(pending).to_have_count(1, timeout=WAIT)
        await buyer.reload()  # the pending list comes from the chain service too, not only from this page
        await expect(buyer.locator("#view-wallet")).to_be_visible(timeout=WAIT)
        await expect(buyer.locator(f'#pending li[data-hash="{second}"]')).to_have_count(1, timeout=WAIT)
        await expect(buyer.locator(f'#pending li[data-hash="{second}"]')).to_contain_text("· pending")
        assert await number(grid, buyer.locator("#balance"), "the balance", lambda n: True) == after_first
        await shot(buyer, artifacts_dir, "5-transfer-pending")
        await expect(seller.locator("#mining-start")).to_be_disabled(timeout=WAIT)
        await set_mining_as_market(grid, "start")
        await expect(buyer.locator("#mining-state")).to_have_text("on", timeout=WAIT)
        await expect(buyer.locator(f'#pending li[data-hash="{second}"]')).to_have_count(0, timeout=WAIT)
        await number(grid, buyer.locator("#balance"), "the balance to drop by 0.5 Ether and gas",
                     lambda n: after_first - Decimal("0.51") < n <= after_first - Decimal("0.5") + TICK)
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


@pytest.mark.timeout(360)
async def test_a_session_outlives_a_gateway_restart_and_a_wallet_restart_asks_for_the_passphrase(
        browser: Any, real_grid: RealStack, artifacts_dir: pathlib.Path) -> None:
    grid = real_grid
    consumer = grid.people["consumer"]
    ctx, page = await open_wallet(browser, grid.url("home-7"), consumer)
    try:
        await number(grid, page.locator("#balance"), "the consumer's Ether from the dev chain", lambda n: n > 99)
        await expect(page.locator("#locked")).to_be_hidden()

        # the site's gateway is killed during the session and started again: the page goes on
        # with the same cookie, no new login (the session is in the gateway's store)
        grid.terminate("gateway-home-7", signal.SIGKILL)
        await expect(page.locator("#live")).to_have_text("offline", timeout=WAIT)
        grid.spawn("gateway-home-7")
        await grid.until("the gateway to be healthy again", lambda: grid.health("gateway-home-7"))
        await expect(page.locator("#live")).to_have_text("live", timeout=WAIT)  # the websocket is back
        await page.fill("#deposit-amount", "0.01")
        await page.click("#deposit-form button[type=submit]")
        await expect(page.locator("#escrow-free")).to_have_text("0.01", timeout=WAIT)
        await page.reload()
        await expect(page.locator("#view-wallet")).to_be_visible(timeout=WAIT)
        await expect(page.locator("#who")).to_have_attribute("title", consumer.address)
        await expect(page.locator("#view-login")).to_be_hidden()
        await shot(page, artifacts_dir, "7-after-gateway-restart")

        # the site's wallet restarts: the key it held unlocked in memory is locked
        # now; the page says so and keeps the session
        grid.terminate("wallet-home-7")
        grid.spawn("wallet-home-7")
        await grid.until("the restarted wallet to be healthy",
                         lambda: (grid.health("wallet-home-7") or {}).get("market"), timeout=90)
        await expect(page.locator("#locked")).to_be_visible(timeout=WAIT)
        await expect(page.locator("#view-wallet")).to_be_visible()
        # an action that signs asks for the passphrase of the same account, not for a new login
        await page.fill("#deposit-amount", "0.02")
        await page.click("#deposit-form button[type=submit]")
        dialog = page.locator("#unlock-dialog")
        await expect(dialog).to_be_visible(timeout=WAIT)
        await expect(dialog.locator("#unlock-account")).to_have_text(consumer.address)
        await page.fill("#unlock-passphrase", "not it")
        await page.click("#unlock-btn")
        await expect(page.locator("#unlock-error")).to_have_text("wrong passphrase", timeout=WAIT)
        await shot(page, artifacts_dir, "8-unlock-prompt")
        await page.fill("#unlock-passphrase", consumer.passphrase)
        await page.click("#unlock-btn")
        await expect(dialog).to_be_hidden(timeout=WAIT)
        await expect(page.locator("#locked")).to_be_hidden()
        # the deposit that met the locked key was made once the key was unlocked again
        await expect(page.locator("#escrow-free")).to_have_text("0.03", timeout=WAIT)
        await expect(page.locator("#view-login")).to_be_hidden()
        assert not page.errors, page.errors  # type: ignore[attr-defined]
    finally:
        await ctx.close()
