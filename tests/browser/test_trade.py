"""The seed's whole demo through a trade, for both roles, in a real browser against the
real micro-grid: sell, bid (with the refusals in Ether and kWh and their fixes), the
minimum increment, outbidding yourself, cancelling an offer, the countdown, the trade card's
story through Close Connection, the history of both sides with the right figures, the price
history after a reload, and earnings withdrawn.

It needs the v2 grid to trade end to end: the meters' signed production (to mint tokens
from) and signed deliveries (to settle from), and the gateway's Sell (approve and a
wallet-signed offer) and Buy (escrow reserved on-chain and a wallet-signed bid). Until
those are in the tree it is reported as an expected failure and not run (it would only
wait for tokens that are never minted)."""

from __future__ import annotations

import pathlib
import re
from decimal import Decimal
from typing import Any

import pytest
from playwright.async_api import expect

from tests.support.plan import RealStack

from .pages import (MOBILE, WAIT, audit, both_wallets, confirmed, fits, go, number, open_wallet, shot, toast,
                    wei)

pytestmark = pytest.mark.browser


PRICE = 10**15  # 0.001 Ether/kWh


@pytest.mark.timeout(600)
async def test_a_trade_from_offer_to_history_for_both_roles(browser: Any, real_grid: RealStack,
                                                            artifacts_dir: pathlib.Path) -> None:
    grid = real_grid
    producer, consumer = grid.people["producer"], grid.people["consumer"]
    async with both_wallets(browser, grid) as (seller, buyer):
        # pages by role: the producer sees tokens, earnings and Sell first; the consumer escrow and offers
        await expect(seller.locator("#role-name")).to_have_text("producer", timeout=WAIT)
        await expect(seller.locator("#tokens-title")).to_be_visible()
        await expect(seller.locator("#escrow-title")).to_be_hidden()
        await number(grid, seller.locator("#tokens"), "the producer's tokens to reach 2 kWh", lambda n: n >= 2,
                     timeout=120)
        await go(seller, "market")
        await go(buyer, "market")
        await expect(seller.locator("#sell-form")).to_be_visible()
        await expect(buyer.locator("#sell-form")).to_be_hidden()
        await expect(buyer.locator("#buying-title")).to_be_visible()

        # selling more than the tokens: the refusal in kWh, to "you"
        await seller.fill("#sell-kwh", "5000")
        await seller.fill("#sell-price", "0.001")
        await seller.fill("#sell-duration", "20")
        await seller.click("#sell-btn")
        await toast(seller, re.compile(r"You have [\d.]+ kWh of Energy Tokens"))

        # an offer the producer cancels while it has no bids: it leaves every list
        await seller.fill("#sell-kwh", "0.5")
        await seller.fill("#sell-duration", "300")
        await seller.click("#sell-btn")
        await toast(seller, "Your offer of 0.5 kWh is on the market.")
        spare = seller.locator("#offers [data-offer]", has=seller.locator(".kwh", has_text=re.compile(r"^0\.5$")))
        await expect(spare.locator(".cancel-btn")).to_be_visible(timeout=WAIT)
        await expect(buyer.locator("#offers [data-offer]")).to_have_count(1, timeout=WAIT)
        await spare.locator(".cancel-btn").click()
        await toast(seller, "Your offer is cancelled.")
        await expect(buyer.locator("#offers [data-offer]")).to_have_count(0, timeout=WAIT)
        await expect(seller.locator("#offers [data-offer]")).to_have_count(0, timeout=WAIT)

        # the real offer: 1.5 kWh at a start bid of 0.001 Ether/kWh
        await seller.fill("#sell-kwh", "1.5")
        await seller.fill("#sell-price", "0.001")
        await seller.fill("#sell-duration", "25")
        await seller.click("#sell-btn")
        card = buyer.locator("#offers [data-offer]")
        await expect(card).to_have_count(1, timeout=WAIT)
        await expect(card.locator(".kwh")).to_have_text("1.5")
        await expect(card.locator(".next")).to_have_text("Next bid: at least 0.001 Ether/kWh (the start bid).")
        await expect(card.locator(".countdown")).to_have_text(re.compile(r"^\d+s$"), timeout=WAIT)

        # below the start bid: the market's reason in Ether/kWh, and the minimum as a button
        await card.locator(".bid-price").fill("0.0005")
        await card.locator(".bid-btn").click()
        low = await toast(buyer, "below the start bid of 0.001 Ether/kWh")
        await low.get_by_role("button", name="Bid 0.001 Ether/kWh").click()
        await expect(card.locator(".bid-price")).to_have_value("0.001")
        # no escrow yet: the missing deposit, in Ether, as a button that fills the deposit form
        await card.locator(".bid-price").fill("0.002")
        await card.locator(".bid-btn").click()
        short_of = await toast(buyer, re.compile(r"escrow.*0\.003 Ether", re.S))
        for word in (" wei", "the buyer"):
            assert word not in (await short_of.text_content() or "")
        await short_of.get_by_role("button", name=re.compile(r"^Deposit [\d.]+ Ether$")).click()
        await expect(buyer.locator("#view-wallet")).to_be_visible()
        await expect(buyer.locator("#deposit-amount")).to_have_value(re.compile(r"^0\.00\d+$"))
        await expect(buyer.locator("#deposit-amount")).to_be_focused()
        await buyer.fill("#deposit-amount", "0.01")
        await buyer.click("#deposit-btn")
        await confirmed(grid, buyer, buyer.locator("#deposit-status"), site="home-7")

        await go(buyer, "market")
        await card.locator(".bid-price").fill("0.002")
        await card.locator(".bid-btn").click()
        await expect(card.locator(".tx-status")).to_have_attribute("data-state", "done", timeout=WAIT)
        await expect(card.locator(".bidder")).to_have_text("by you", timeout=WAIT)
        seller_card = seller.locator("#offers [data-offer]")
        await expect(seller_card.locator(".highest")).to_have_text("0.002 Ether/kWh", timeout=WAIT)
        # the next bid: the highest plus the minimum increment, shown on the offer
        await expect(card.locator(".next")).to_contain_text("the highest bid plus the minimum increment of")
        assert await wei(card.locator(".next")) > 2 * PRICE
        # bidding again over your own bid asks first
        await card.locator(".bid-price").fill("0.003")
        await card.locator(".bid-btn").click()
        await expect(card.locator(".warn")).to_contain_text("You are already the highest bidder at 0.002 Ether/kWh")
        await expect(card.locator(".bid-btn")).to_have_text("Raise my bid")
        await expect(card.locator(".highest")).to_have_text("0.002 Ether/kWh")
        await card.locator(".bid-price").fill("0.002")  # changed the mind: back to the plain form
        await expect(card.locator(".warn")).to_be_hidden()
        await audit(buyer, "the marketplace with an offer")
        await shot(buyer, artifacts_dir, "consumer-bid")

        # the countdown ends: the offer says how it ended, then leaves the list
        await expect(card.locator(".countdown-line")).to_contain_text("Ended: sold to you at 0.002 Ether/kWh",
                                                                      timeout=WAIT)
        await expect(card).to_have_count(0, timeout=WAIT)
        trade = buyer.locator("#trades [data-trade]")
        await expect(trade).to_have_count(1, timeout=WAIT)
        await expect(trade).to_have_attribute("data-state", "delivering", timeout=WAIT)
        await expect(trade.locator(".parties")).to_have_text("you buy from solar-1")
        await expect(seller.locator("#trades [data-trade] .parties")).to_have_text("you sell to home-7")
        await number(grid, trade.locator(".paid"), "a payment on the buyer's page", lambda n: n > 0)
        await expect(trade.locator(".money")).to_contain_text("of 0.003 Ether locked in escrow")
        # the figures mark the trade on the site's timeline
        await go(seller, "figures")
        await expect(seller.locator("#chart-energy svg rect.span")).not_to_have_count(0, timeout=WAIT)
        await expect(seller.locator("#chart-energy svg g.marker")).not_to_have_count(0, timeout=WAIT)
        await shot(seller, artifacts_dir, "producer-figures-trade", docs="trade-figures-desktop")
        await go(seller, "market")
        await shot(buyer, artifacts_dir, "consumer-trade-delivering", docs="trade-desktop")

        # Close Connection: "closing…" until the relays open; then the card tells who closed it and when
        await expect(seller.locator("#trades [data-trade] .close-btn")).to_be_hidden()
        await trade.locator(".close-btn").click()
        await expect(trade.locator(".close-btn")).to_have_text("Closing…")
        await expect(trade.locator(".state")).to_have_text("closing…")
        await expect(trade).to_have_attribute("data-closing", "", timeout=WAIT)
        await expect(trade).to_have_attribute("data-state", "settled", timeout=WAIT)
        await expect(trade.locator(".story")).to_have_text(re.compile(r"^You closed it at \d\d:\d\d site time\.$"))
        seller_trade = seller.locator("#trades [data-trade]")
        await expect(seller_trade).to_have_attribute("data-state", "settled", timeout=WAIT)
        await expect(seller_trade.locator(".story")).to_have_text(
            re.compile(r"^The buyer closed it at \d\d:\d\d site time\.$"))
        delivered = int(await trade.locator(".delivered-line").get_attribute("data-wh") or "0")
        assert 0 < delivered < 1500, delivered  # closed part-way
        paid = await wei(trade.locator(".paid"))
        assert paid == delivered * 2 * PRICE // 1000
        await expect(trade.locator(".refunded")).to_have_attribute("data-wei", str(3 * PRICE - paid), timeout=WAIT)
        await expect(trade.locator(".delivered-line")).to_contain_text(f"of 1.5 kWh")
        await expect(trade.locator(".close-btn")).to_be_hidden()
        await shot(buyer, artifacts_dir, "consumer-trade-closed")

        # history on both sides: times, counterparty, energy, price and amount
        for page, what, other in ((buyer, "you bought", producer), (seller, "you sold", consumer)):
            await go(page, "history")
            row = page.locator("#history tbody tr", has=page.locator("td.what", has_text=what))
            await expect(row).to_have_count(1, timeout=WAIT)
            await expect(row.locator("td.with")).to_contain_text(other.address[:8])
            await expect(row.locator("td.energy")).to_have_attribute("data-delivered-wh", str(delivered))
            await expect(row.locator("td.energy")).to_have_attribute("data-wh", "1500")
            await expect(row.locator("td.price")).to_have_attribute("data-wei", str(2 * PRICE))
            await expect(row.locator("td.amount")).to_have_attribute("data-wei", str(paid))
            await expect(row.locator("td.status")).to_contain_text("closed by")
            assert re.fullmatch(r"2024-06-2\d \d\d:\d\d", await row.locator("td.time").text_content() or "")
        await shot(buyer, artifacts_dir, "consumer-history", docs="trade-history-desktop")

        # the price history comes from the server: after a reload the bid and the trade are still drawn
        await go(buyer, "figures")
        await buyer.reload()
        await expect(buyer.locator("#view-figures")).to_be_visible(timeout=WAIT)
        prices = buyer.locator("#chart-price-big")
        await expect(prices.locator("svg circle.bid")).not_to_have_count(0, timeout=WAIT)
        await expect(prices.locator("svg circle.trade")).to_have_count(1)
        await expect(prices.locator("svg g.marker")).to_have_count(1)
        await expect(prices).to_contain_text("Last trade: 0.002 Ether/kWh.")
        ticks = [t.strip() for t in await prices.locator("svg .tick-y").all_text_contents()]
        assert len(set(ticks)) == len(ticks) >= 3, ticks  # distinct, readable y ticks

        # the seller withdraws the earnings: followed to confirmed
        await go(seller, "wallet")
        await expect(seller.locator("#credit")).to_have_attribute("data-wei", str(paid), timeout=WAIT)
        await seller.click("#withdraw-credit")
        await confirmed(grid, seller, seller.locator("#withdraw-credit-status"), site="solar-1")
        await toast(seller, re.compile(r"Withdrawing your earnings of .*: confirmed\."))
        await expect(seller.locator("#credit")).to_have_attribute("data-wei", "0", timeout=WAIT)
        await shot(seller, artifacts_dir, "producer-wallet", docs="trade-wallet-producer-desktop")

        # the marketplace with the trade's card at 375 px
        mctx, phone = await open_wallet(browser, grid.url("home-7"), consumer, viewport=MOBILE)
        try:
            await go(phone, "market")
            await expect(phone.locator("#trades [data-trade]")).to_have_count(1, timeout=WAIT)
            await fits(phone, "the marketplace with a trade at 375 px")
            await audit(phone, "the marketplace with a trade at 375 px")
            await shot(phone, artifacts_dir, "consumer-market-mobile-trade", docs="trade-mobile")
        finally:
            await mctx.close()
        assert Decimal(paid) > 0
        assert not seller.errors and not buyer.errors, (seller.errors, buyer.errors)  # type: ignore[attr-defined]
