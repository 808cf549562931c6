"""The wallets of both roles in a real browser against the real micro-grid (every service
a real process from ``launcher.plan()`` on a real anvil node; simulated meters on a sunny
Berlin morning at 1440x): what a person sees of amounts, errors, transactions, history and
figures, at desktop width and at 375 px, with an accessibility audit of every page.
Screenshots go to test-artifacts/, and to docs/ when missing or GRIDTRADE_DOCS_SCREENSHOT=1."""

from __future__ import annotations

import calendar
import csv
import io
import pathlib
import re
import time
from decimal import Decimal
from typing import Any

import pytest
from playwright.async_api import expect

from tests.support.plan import RealStack

from .pages import (MOBILE, VIEWS, WAIT, audit, both_wallets, confirmed, fits, go, number, open_wallet,
                    set_mining_as_market, shot, toast, wei)

pytestmark = pytest.mark.browser
ETH = 10**18
ELSEWHERE = "0xdbF03B407c01E7cD3CBea99509d93f8DDDC8C6FB"  # EIP-55 valid, outside this grid
WRONG_CHECKSUM = ELSEWHERE[:-1] + ELSEWHERE[-1].lower()  # one letter's case changed
SUNNY_SIM = 1718953200  # the grid's simulated start, 2024-06-21 07:00 UTC (tests/support/plan.py SUNNY)


@pytest.mark.timeout(480)
async def test_wallets_units_progress_history_figures_on_desktop_and_mobile(browser: Any, real_grid: RealStack,
                                                                         artifacts_dir: pathlib.Path) -> None:
    grid = real_grid
    consumer = grid.people["consumer"]
    async with both_wallets(browser, grid) as (seller, buyer):
        # the consumer's page: escrow, explained in one sentence; no tokens or Sell
        await expect(buyer.locator("#role-name")).to_have_text("consumer", timeout=WAIT)
        await expect(buyer.locator("#escrow-explained")).to_be_visible()
        for part in ("free escrow you may bid with or withdraw", "reserved escrow backs your live bids",
                     "locked escrow pays for a running trade"):
            await expect(buyer.locator("#escrow-explained")).to_contain_text(part)
        await expect(buyer.locator("#tokens-title")).to_be_hidden()
        start = await number(grid, buyer.locator("#balance"), "the consumer's Ether from the dev chain",
                             lambda n: n > 99)
        # every amount: rounded, every digit on hover
        assert re.fullmatch(r"\d+(\.\d{1,6})?", (await buyer.locator("#balance").text_content() or ""))
        exact = await wei(buyer.locator("#balance"))
        assert (await buyer.locator("#balance").get_attribute("title") or "").startswith(
            str(Decimal(exact) / ETH).rstrip("0").rstrip("."))

        # a deposit, followed from sent to confirmed, with a toast at the end
        await buyer.fill("#deposit-amount", "0.01")
        await buyer.click("#deposit-btn")
        status = buyer.locator("#deposit-status")
        await expect(status).to_contain_text(re.compile(r"Deposit of 0\.01 Ether: (sending|pending|confirmed)"),
                                             timeout=WAIT)
        await expect(status).to_have_attribute("data-hash", re.compile(r"^0x[0-9a-f]{64}$"), timeout=WAIT)
        await confirmed(grid, buyer, status, site="home-7")
        await toast(buyer, "Deposit of 0.01 Ether: confirmed.")
        await expect(buyer.locator("#escrow-free")).to_have_text("0.01", timeout=WAIT)
        deposit_hash = await status.get_attribute("data-hash")
        await expect(buyer.locator(f'#pending li[data-hash="{deposit_hash}"]')).to_contain_text("confirmed")

        # a refusal in the person's units, speaking to "you", with the fix as a button
        await buyer.fill("#withdraw-amount", "5")
        await buyer.click("#withdraw-btn")
        refusal = await toast(buyer, "You can withdraw at most 0.01 Ether")
        await expect(buyer.locator("#withdraw-status")).to_have_attribute("data-state", "refused")
        for word in (" wei", " Wh ", "the buyer"):
            assert word not in (await refusal.text_content() or "")
        await refusal.get_by_role("button", name="Withdraw 0.01 Ether").click()
        await expect(buyer.locator("#withdraw-amount")).to_have_value("0.01")
        # withdrawing all of it leaves nothing behind (exact wei, not a rounded figure)
        await buyer.fill("#withdraw-amount", "")
        await buyer.click("#withdraw-all")
        await buyer.click("#withdraw-btn")
        await confirmed(grid, buyer, buyer.locator("#withdraw-status"), site="home-7")
        await expect(buyer.locator("#escrow-free")).to_have_attribute("data-wei", "0", timeout=WAIT)

        # addresses: the page's own messages, no browser bubble, nothing sent
        await buyer.fill("#transfer-to", "0x1234")
        await buyer.fill("#transfer-amount", "0.5")
        await buyer.click("#transfer-btn")
        await expect(buyer.locator("#transfer-to-error")).to_contain_text("0x followed by 40 hexadecimal digits")
        await expect(buyer.locator("#transfer-to")).to_have_attribute("aria-invalid", "true")
        await buyer.fill("#transfer-to", WRONG_CHECKSUM)
        await buyer.click("#transfer-btn")
        await expect(buyer.locator("#transfer-to-error")).to_contain_text("checksum")
        await expect(buyer.locator("#transfer-status")).to_have_text("")
        # ... the server refuses it too, in words
        refused = await buyer.evaluate(
            "(to) => fetch('/api/transfers', {method: 'POST', headers: {'Content-Type': 'application/json'}, "
            "body: JSON.stringify({to, amount_wei: '1'})}).then(r => r.json())", WRONG_CHECKSUM)
        assert "checksum" in refused["error"]["message"], refused
        await buyer.fill("#transfer-to", ELSEWHERE)
        await expect(buyer.locator("#transfer-to-error")).to_have_text("")
        await buyer.click("#transfer-btn")
        await expect(buyer.locator("#transfer-status")).to_contain_text(
            f"Sending 0.5 Ether to {ELSEWHERE[:8]}", timeout=WAIT)
        await confirmed(grid, buyer, buyer.locator("#transfer-status"), site="home-7")
        await toast(buyer, re.compile(r"Sending 0\.5 Ether to .*: confirmed\."))
        await number(grid, buyer.locator("#balance"), "the balance to drop by 0.5 Ether and gas",
                     lambda n: start - Decimal("0.52") < n <= start - Decimal("0.5"))

        # the market stops mining: the next transaction says it waits for a block, also after a reload,
        # and is confirmed once mining starts again
        await set_mining_as_market(grid, "stop")
        await expect(buyer.locator("#mining-state")).to_have_attribute("data-mining", "off", timeout=WAIT)
        await buyer.fill("#transfer-amount", "0.1")
        await buyer.click("#transfer-btn")
        waiting = buyer.locator("#transfer-status")
        await expect(waiting).to_contain_text("Sending 0.1 Ether", timeout=WAIT)
        await expect(waiting).to_contain_text("pending: waiting for a block (mining is stopped)", timeout=WAIT)
        second = await waiting.get_attribute("data-hash")
        await buyer.reload()
        await expect(buyer.locator("#view-wallet")).to_be_visible(timeout=WAIT)
        await expect(buyer.locator(f'#pending li[data-hash="{second}"]')).to_contain_text("pending", timeout=WAIT)
        await shot(buyer, artifacts_dir, "consumer-transfer-pending")
        await set_mining_as_market(grid, "start")
        await expect(buyer.locator(f'#pending li[data-hash="{second}"]')).to_contain_text("confirmed", timeout=WAIT)

        # Ether received from another site shows at once, from the websocket, with a toast
        async def settled() -> int | None:  # the page shows what the wallet holds (the 0.1 Ether and its gas gone)
            held = int((await buyer.evaluate("fetch('/api/wallet').then(r => r.json())"))["ether_wei"])
            return held if held == await wei(buyer.locator("#balance")) else None
        before = await grid.until("the consumer's balance to settle", settled)
        await seller.fill("#transfer-to", consumer.address)
        await seller.fill("#transfer-amount", "1.25")
        await seller.click("#transfer-btn")
        await confirmed(grid, seller, seller.locator("#transfer-status"), site="solar-1")
        await toast(buyer, "You received 1.25 Ether.")
        await expect(buyer.locator("#balance")).to_have_attribute("data-wei", str(before + 125 * 10**16),
                                                                  timeout=WAIT)

        # history: what each did, with times and figures; the same as CSV
        await go(buyer, "history")
        rows = buyer.locator("#history tbody tr")
        sent = rows.filter(has=buyer.locator('td.what', has_text="you sent Ether"))
        await expect(sent).to_have_count(2, timeout=WAIT)
        sent = sent.filter(has=buyer.locator("td.amount[data-wei='500000000000000000']"))
        await expect(sent.locator("td.with")).to_contain_text(ELSEWHERE[:8])
        await expect(sent.locator("td.amount")).to_have_attribute("data-wei", str(5 * 10**17))
        await expect(sent.locator("td.status")).to_contain_text("confirmed")
        deposits = rows.filter(has=buyer.locator("td.what", has_text="escrow deposit"))
        await expect(deposits.locator("td.amount")).to_have_attribute("data-wei", str(10**16))
        withdrawals = rows.filter(has=buyer.locator("td.what", has_text="escrow withdrawal"))
        await expect(withdrawals).to_have_count(1)  # the refused one was never sent
        await expect(withdrawals.locator("td.amount")).to_have_attribute("data-wei", str(10**16))
        await expect(withdrawals.locator("td.status")).to_contain_text("confirmed")
        when = await sent.locator("td.time").text_content() or ""
        assert re.fullmatch(r"2024-06-2\d \d\d:\d\d", when), when  # the simulated site's date, not today's
        csv_text = await (await buyer.request.get(grid.url("home-7") + "/api/history.csv")).text()
        table = list(csv.DictReader(io.StringIO(csv_text)))
        assert {"you sent Ether", "escrow deposit", "escrow withdrawal"} <= {r["what"] for r in table}, table
        assert {r["amount (Ether)"] for r in table if r["what"] == "you sent Ether"} == {"0.5", "0.1"}, table
        await go(seller, "history")
        await expect(seller.locator("#history tbody tr td.what", has_text="you sent Ether")).to_have_count(
            1, timeout=WAIT)
        await expect(seller.locator("#history tbody tr", has_text="you sent Ether").locator("td.with")).to_contain_text(
            consumer.address[:8])

        # figures: kW now, energy apart, the chart's time axis in the site's (simulated) time
        await go(buyer, "figures")
        chart = buyer.locator("#chart-energy")
        await expect(chart.locator("svg .tick-x").first).to_be_visible(timeout=WAIT)
        ticks = [t.strip() for t in await chart.locator("svg .tick-x").all_text_contents()]
        assert len(ticks) >= 3 and len(set(ticks)) == len(ticks), ticks  # distinct, sensible ticks
        assert all(re.fullmatch(r"(\d\d-\d\d )?\d\d:\d\d", t) for t in ticks), ticks
        span_from = float(await chart.get_attribute("data-from") or 0)
        span_to = float(await chart.get_attribute("data-to") or 0)
        assert SUNNY_SIM - 7200 <= span_from <= span_to and span_to - span_from >= 7200  # site hours, not wall seconds
        await expect(buyer.locator("#fig-load")).to_have_text(re.compile(r"^\d+\.\d\d$"))
        await expect(buyer.locator("#chart-price")).to_be_hidden()
        await expect(buyer.locator("#chart-price-big")).to_contain_text("No bids or trades yet")

        # the site's figures: the site's current (simulated) day, its totals, charts per day, the same as CSV
        day = buyer.locator("#figures-day")
        await expect(day).to_have_text(re.compile(r"^2024-0[67]-\d\d \(today, site time\)$"), timeout=WAIT)
        await expect(buyer.locator("#ft-consumed")).to_have_text(re.compile(r"^\d+(\.\d+)?$"))
        await expect(buyer.locator("#ft-self")).to_have_text(re.compile(r"^(\d+ %|– \(nothing consumed\))$"))
        await expect(buyer.locator("#ft-saved")).to_have_attribute("data-wei", re.compile(r"^-?\d+$"))
        await expect(buyer.locator("#chart-days svg rect.bar").first).to_be_attached(timeout=WAIT)
        today = (await day.text_content() or "")[:10]
        assert re.fullmatch(r"2024-0[67]-\d\d", await buyer.locator("#figures-from").input_value())
        href = await buyer.locator("#figures-csv").get_attribute("href") or ""
        assert href.startswith("/api/figures.csv?"), href
        table = list(csv.DictReader(io.StringIO(await (await buyer.request.get(grid.url("home-7") + href)).text())))
        # (a site day lasts a minute here: the CSV may already be of the next one)
        assert len(table) == 2 and table[0]["day (site time)"] >= today and table[1]["day (site time)"] == "total"
        # a range of two days: a bar group per day, the CSV link follows
        y, mo, d = map(int, today.split("-"))
        yesterday = time.strftime("%Y-%m-%d", time.gmtime(calendar.timegm((y, mo, d, 0, 0, 0)) - 86400))
        await buyer.fill("#figures-from", yesterday)
        await buyer.click("#figures-show")
        await expect(day).to_have_text(f"{yesterday} to {today} (2 days)", timeout=WAIT)
        await expect(buyer.locator("#figures-csv")).to_have_attribute("href", re.compile(r"from=\d+&to=\d+"))
        await buyer.click("#figures-today")
        await expect(day).to_have_text(re.compile(r"\(today, site time\)$"), timeout=WAIT)

        # every page: no serious accessibility violation; screenshots for the README
        for view in VIEWS:
            await go(buyer, view)
            await audit(buyer, f"the consumer's {view} page at desktop width")
            await shot(buyer, artifacts_dir, f"consumer-{view}-desktop", docs=f"{view}-desktop")
        await go(seller, "wallet")
        await audit(seller, "the producer's wallet at desktop width")
        await shot(seller, artifacts_dir, "producer-wallet-desktop")

        # keyboard: the pages are links in the header
        await buyer.focus("#nav-history")
        await buyer.keyboard.press("Enter")
        await expect(buyer.locator("#view-history")).to_be_visible()

        # 375 px: nothing scrolls sideways, Log out stays in the header, the audit passes
        mctx, phone = await open_wallet(browser, grid.url("home-7"), consumer, viewport=MOBILE)
        try:
            for view in VIEWS:
                await go(phone, view)
                await phone.wait_for_timeout(300)  # charts are drawn for the width they get
                await fits(phone, f"the {view} page at 375 px")
                await audit(phone, f"the {view} page at 375 px")
                await shot(phone, artifacts_dir, f"consumer-{view}-mobile", docs=f"{view}-mobile")
            assert not phone.errors, phone.errors  # type: ignore[attr-defined]
        finally:
            await mctx.close()

        # a deliberate logout is no error
        await buyer.click("#logout")
        await expect(buyer.locator("#view-login")).to_be_visible(timeout=WAIT)
        await expect(buyer.locator("#login-note")).to_have_text("You are logged out.")
        await expect(buyer.locator("#login-error")).to_have_text("")
        await expect(buyer.locator("#toasts .toast.bad")).to_have_count(0)
        assert not seller.errors and not buyer.errors, (seller.errors, buyer.errors)  # type: ignore[attr-defined]
