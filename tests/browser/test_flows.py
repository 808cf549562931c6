"""Sessions in a real browser against the real micro-grid (every service a real process
from ``launcher.plan()`` on a real anvil node): a session outlives a restart of the site's
gateway, a restart of the site's wallet asks for the passphrase again, and a transaction
whose news never reaches the page still ends there. The wallet pages and the trade flow are
in test_wallet.py and test_trade.py."""

from __future__ import annotations

import pathlib
import re
import signal
from typing import Any

import pytest
from playwright.async_api import expect

from tests.support.plan import RealStack

from .pages import WAIT, confirmed, number, open_wallet, shot, toast

pytestmark = pytest.mark.browser


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


@pytest.mark.timeout(300)
async def test_a_transaction_whose_news_never_reaches_the_page_still_ends_there(browser: Any,
                                                                                real_grid: RealStack) -> None:
    """Between the gateway and the page, every message about a transaction is dropped (as on a
    websocket that came back after them): the page finds the outcome in the wallet's history."""
    grid = real_grid
    ctx, page = await open_wallet(browser, grid.url("home-7"), grid.people["consumer"])
    dropped: list[str | bytes] = []

    def without_tx_news(ws: Any) -> None:
        server = ws.connect_to_server()

        def to_page(message: str | bytes) -> None:
            if '"chain.tx"' in str(message):
                dropped.append(message)
            else:
                ws.send(message)
        server.on_message(to_page)

    try:
        await page.route_web_socket(re.compile(r"/api/ws$"), without_tx_news)
        await page.reload()
        await expect(page.locator("#live")).to_have_text("live", timeout=WAIT)
        await page.fill("#deposit-amount", "0.01")
        await page.click("#deposit-btn")
        await confirmed(grid, page, page.locator("#deposit-status"), site="home-7")
        await toast(page, "Deposit of 0.01 Ether: confirmed.")
        assert dropped, "the gateway sent no news of the transaction: the route dropped nothing"
        assert not page.errors, page.errors  # type: ignore[attr-defined]
    finally:
        await ctx.close()
