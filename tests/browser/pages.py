"""What the browser tests share: opening a wallet as a person would, the accessibility
audit (axe-core, vendored), the layout checks of a narrow screen, screenshots (to
test-artifacts/, and to docs/ for the README), and reading amounts the page shows."""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import shutil
from decimal import Decimal
from collections.abc import AsyncIterator
from typing import Any

import zmq.asyncio
from playwright.async_api import Locator, Page, expect
from web3 import HTTPProvider, Web3

from services.bus import RpcClient, Security
from services.bus import commands as cmd
from tests.support.plan import Person, RealStack

ROOT = pathlib.Path(__file__).resolve().parents[2]
AXE = pathlib.Path(__file__).resolve().parent / "vendor" / "axe.min.js"
DOCS = ROOT / "docs"
WAIT = 60_000  # ms: how long a page may take to show what the grid does (a deadline, not a measurement)
DESKTOP = {"width": 1280, "height": 1000}
MOBILE = {"width": 375, "height": 800}
VIEWS = ("wallet", "market", "history", "figures")
TIMEZONE = "Europe/Berlin"  # the simulated site's (the sim's default site is Berlin)


async def open_wallet(browser: Any, url: str, who: Person, viewport: dict[str, int] = DESKTOP) -> tuple[Any, Page]:
    """A new browser context (its own cookies) logged in as ``who``; ``page.errors`` collects
    uncaught script errors. CSP is bypassed only so that the audit script can be injected."""
    ctx = await browser.new_context(viewport=viewport, timezone_id=TIMEZONE, bypass_csp=True,
                                    is_mobile=viewport["width"] < 500, has_touch=viewport["width"] < 500)
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


@contextlib.asynccontextmanager
async def both_wallets(browser: Any, grid: RealStack,
                       buyer_viewport: dict[str, int] = DESKTOP) -> AsyncIterator[tuple[Page, Page]]:
    """The producer's wallet on solar-1 and the consumer's on home-7, each in its own browser
    context (closed on leaving): ``(seller, buyer)``."""
    pctx, seller = await open_wallet(browser, grid.url("solar-1"), grid.people["producer"])
    cctx, buyer = await open_wallet(browser, grid.url("home-7"), grid.people["consumer"], viewport=buyer_viewport)
    try:
        yield seller, buyer
    finally:
        await pctx.close()
        await cctx.close()


async def go(page: Page, view: str) -> None:
    await page.click(f"#nav-{view}")
    await expect(page.locator(f"#view-{view}")).to_be_visible(timeout=WAIT)
    await expect(page.locator(f"#nav-{view}")).to_have_attribute("aria-current", "page")


async def audit(page: Page, where: str) -> None:
    """No serious or critical accessibility violation (axe-core's WCAG 2.x A/AA rules)."""
    if not await page.evaluate("typeof window.axe !== 'undefined'"):
        await page.add_script_tag(path=str(AXE))
    result = await page.evaluate(
        "axe.run(document, {runOnly: {type: 'tag', values: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa', "
        "'best-practice']}, resultTypes: ['violations']})")
    bad = [f"{v['impact']} {v['id']}: {v['help']} at {[n['target'] for n in v['nodes']][:3]}"
           for v in result["violations"] if v["impact"] in ("serious", "critical")]
    assert not bad, f"accessibility violations on {where}:\n" + "\n".join(bad)


async def fits(page: Page, where: str) -> None:
    """Nothing scrolls sideways and the header's Log out stays on screen."""
    width = await page.evaluate("window.innerWidth")
    scroll = await page.evaluate("document.documentElement.scrollWidth")
    assert scroll <= width, f"{where}: the page scrolls sideways ({scroll} px wide in a {width} px window)"
    box = await page.locator("#logout").bounding_box()
    header = await page.locator("header.top").bounding_box()
    assert box and header and 0 <= box["x"] and box["x"] + box["width"] <= width, (where, box)
    assert header["y"] <= box["y"] and box["y"] + box["height"] <= header["y"] + header["height"], (where, box, header)


async def shot(page: Page, artifacts: pathlib.Path, name: str, docs: str | None = None) -> pathlib.Path:
    """A full-page screenshot to test-artifacts/; with ``docs``, also docs/<docs>.png when that
    file is missing or GRIDTRADE_DOCS_SCREENSHOT=1 (the README shows them)."""
    path = artifacts / f"browser-{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    if docs is not None:
        # the README's picture without the notices of the test's earlier steps
        await page.evaluate("document.querySelectorAll('#toasts .toast').forEach((t) => t.remove())")
        await page.screenshot(path=str(path), full_page=True)
        target = DOCS / f"{docs}.png"
        if os.environ.get("GRIDTRADE_DOCS_SCREENSHOT") == "1" or not target.exists():
            DOCS.mkdir(exist_ok=True)
            shutil.copyfile(path, target)
    return path


async def wei(loc: Locator) -> int:
    """The exact amount behind a rounded one (its data-wei)."""
    return int(await loc.get_attribute("data-wei") or "-1")


async def number(grid: RealStack, loc: Locator, what: str, ok: Any, timeout: float = 60) -> Decimal:
    """Wait until the element shows a number (followed by its unit, if any) for which
    ``ok(n)`` holds; return it."""
    async def check() -> Decimal | None:
        text = (await loc.text_content() or "").strip()
        m = re.fullmatch(r"(-?\d+(?:\.\d+)?)(?: [A-Za-z/]+)?", text)
        n = Decimal(m.group(1)) if m else None
        return n if n is not None and ok(n) else None
    return Decimal(await grid.until(what, check, timeout=timeout))


async def toast(page: Page, text: str | re.Pattern[str]) -> Locator:
    """The toast that says ``text`` (toasts stack; the newest is last)."""
    loc = page.locator("#toasts .toast", has_text=text).last
    await expect(loc).to_be_visible(timeout=WAIT)
    return loc


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


async def confirmed(grid: RealStack, page: Page, status: Locator, *, site: str) -> None:
    """The transaction under ``status`` (sent from ``site``'s wallet) shows confirmed. If it does
    not in time, the failure says where the transaction is: in the wallet's open list, in the
    page's history, on the node, and in the wallet's log."""
    try:
        await expect(status).to_have_attribute("data-state", "confirmed", timeout=WAIT)
    except AssertionError as e:
        where = await whereabouts(grid, page, await status.get_attribute("data-hash"), site=site)
        raise AssertionError(f"{e}\n\nwhere the transaction is:\n{where}") from None


async def whereabouts(grid: RealStack, page: Page, tx_hash: str | None, *, site: str) -> str:
    if not tx_hash:
        return "the page shows no transaction hash"
    out = [f"hash {tx_hash}"]
    for what, path, key, field in (("the wallet's open list", "/api/pending", "txs", "tx_hash"),
                                   ("the history", "/api/history", "rows", "id")):
        try:
            got = await page.evaluate(f"fetch('{path}').then(r => r.json())")
            out.append(f"{what}: {[r for r in got.get(key, []) if r.get(field) == tx_hash]}")
        except Exception as e:  # noqa: BLE001 - a report of what could be seen
            out.append(f"{what}: not readable ({e})")
    try:
        w3 = Web3(HTTPProvider(grid.proc("chain").env["GRIDTRADE_CHAIN_URL"], request_kwargs={"timeout": 10}))
        tx = w3.eth.get_transaction(tx_hash)  # type: ignore[arg-type]
        receipt = w3.eth.get_transaction_receipt(tx_hash) if tx["blockNumber"] is not None else None  # type: ignore
        base = w3.eth.get_block("latest").get("baseFeePerGas")
        automine = w3.provider.make_request("anvil_getAutomine", []).get("result")  # type: ignore[arg-type]
        out.append(f"the node: block {tx['blockNumber']}, nonce {tx['nonce']}, max fee {tx.get('maxFeePerGas')}, "
                   f"receipt status {receipt and receipt['status']}; head {w3.eth.block_number}, base fee {base}, "
                   f"automine {automine}, pool {w3.provider.make_request('txpool_status', []).get('result')}")  # type: ignore
    except Exception as e:  # noqa: BLE001
        out.append(f"the node: {type(e).__name__}: {e}")
    log = grid.proc(f"wallet-{site}").log
    if log is not None and log.exists():
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if tx_hash[2:18] in ln]
        out.append(f"the wallet's log: {lines[-10:] or 'nothing about it'}")
    return "\n".join(out)
