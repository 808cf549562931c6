"""The wallet pages' routes on a real aiohttp server over a bare Gateway whose wallet and
auction are stand-ins answering from a script (no grid: these routes are the gateway's
own): refusals reworded for the person, checksummed addresses, the history of trades and
transactions (JSON and CSV), prices, readings and the site's clock, the trade cards'
facts, and balances pushed to an open page."""

from __future__ import annotations

import asyncio
import csv
import io
import time
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from services.bus import RequestError
from services.bus import commands as cmd
from services.bus import events as ev
from services.gateway.app import make_app
from services.gateway.config import GatewaySettings
from services.gateway.state import Gateway

ME = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"  # the EIP-55 example address
SELLER = "0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359"
FRIEND = "0xdbF03B407c01E7cD3CBea99509d93f8DDDC8C6FB"
ETH = 10**18
T0 = 1_800_000_000.0
SIM0 = 1_718_953_200.0  # 2024-06-21 07:00 UTC


class Backend:
    """A wallet or an auction: each request type answered by a function (or refused)."""

    def __init__(self) -> None:
        self.answers: dict[type, Any] = {}
        self.seen: list[cmd.Request] = []

    async def request(self, req: cmd.Request, timeout: float | None = None, cmd_id: str | None = None) -> Any:
        self.seen.append(req)
        answer = self.answers.get(type(req))
        if answer is None:
            raise RequestError("unavailable", f"no answer for {req.TYPE}")
        result = answer(req)
        if isinstance(result, RequestError):
            raise result
        return result


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
async def gw(tmp_path: Any) -> Any:
    chain, auction, clock = Backend(), Backend(), Clock()
    balances = {"ether_wei": 10 * ETH}
    chain.answers.update({
        cmd.ListAccounts: lambda r: cmd.Accounts(accounts=[cmd.AccountInfo(address=ME, name="home-7 consumer",
                                                                           site="home-7", unlocked=True)]),
        cmd.Unlock: lambda r: cmd.Unlocked(address=ME, expires_at=T0 + 3600),
        cmd.GetBalances: lambda r: cmd.Balances(address=r.address, site="home-7", **balances),
        cmd.ListPending: lambda r: cmd.Pending(txs=[]),
        cmd.Transfer: lambda r: cmd.TxSent(tx_hash="0x" + "aa" * 32),
        cmd.Escrow: lambda r: (cmd.TxSent(tx_hash="0x" + "bb" * 32) if r.action == "deposit" else RequestError(
            "insufficient_escrow", f"nothing was sent: {r.amount_wei} wei exceeds the free escrow of {ETH} wei")),
    })
    auction.answers.update({
        cmd.CancelOffer: lambda r: RequestError("has_bids", "an offer with bids cannot be cancelled"),
        cmd.CloseTrade: lambda r: cmd.Ok(),
    })
    settings = GatewaySettings(site="home-7", data_dir=tmp_path, explorer_tx_url="https://explorer.example/tx/{hash}")
    g = Gateway(settings, chain=chain, auction=auction, clock=clock)  # type: ignore[arg-type]
    server = TestServer(make_app(g))
    await server.start_server()
    g.test_url = str(server.make_url("")).rstrip("/")  # type: ignore[attr-defined]
    g.backends = (chain, auction, clock, balances)  # type: ignore[attr-defined]
    try:
        yield g
    finally:
        await server.close()
        g.history.store.close()
        g.sessions.store.close()


async def logged_in(g: Gateway) -> aiohttp.ClientSession:
    h = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
    async with h.post(g.test_url + "/api/session", json={"address": ME, "passphrase": "x"}) as r:  # type: ignore
        assert r.status == 200, await r.text()
    return h


def apply(g: Gateway, ts: float, *bodies: ev.Message) -> None:
    with g.history.store.transaction() as conn:
        for b in bodies:
            g.history.apply(conn, ts, b)


def reading(sim: float, **kw: Any) -> ev.MeterReading:
    base = {"site": "home-7", "meter": "main", "role": "consumer", "energy_wh": 1200, "power_w": 60.0,
            "voltage_v": 48.0, "current_a": 1.25, "relay_closed": False, "load_w": 450.0, "pv_w": 0.0, "soc": 0.4,
            "sim_ts": sim, "time_scale": 720.0}
    return ev.MeterReading(**{**base, **kw})


async def test_refusals_speak_to_you_in_ether_with_the_fix(gw: Gateway) -> None:
    h = await logged_in(gw)
    base = gw.test_url  # type: ignore[attr-defined]
    async with h:
        async with h.post(base + "/api/escrow/withdraw", json={"amount_wei": str(3 * ETH)}) as r:
            err = (await r.json())["error"]
        assert r.status == 409 and err["code"] == "insufficient_escrow"
        assert err["message"] == ("You can withdraw at most 1 Ether: that is your free escrow (you asked for 3 Ether). "
                                  "Nothing was sent.")
        assert err["fix"] == {"action": "withdraw", "amount_wei": str(ETH)}
        async with h.post(base + "/api/offers/o-1/cancel", json={}) as r:
            err = (await r.json())["error"]
        assert r.status == 409 and err["message"] == "This offer has bids now: it can no longer be cancelled."
        assert "fix" not in err
        # a mixed-case address whose checksum does not hold is refused, with words; nothing reaches the wallet
        chain = gw.backends[0]  # type: ignore[attr-defined]
        wrong = ME[:-1] + ME[-1].upper()
        async with h.post(base + "/api/transfers", json={"to": wrong, "amount_wei": "5"}) as r:
            err = (await r.json())["error"]
        assert r.status == 422 and "checksum" in err["message"] and err["message"].startswith("The recipient:")
        assert not any(isinstance(q, cmd.Transfer) for q in chain.seen)
        for ok in (FRIEND, FRIEND.lower()):  # a valid checksum, or none (one case)
            async with h.post(base + "/api/transfers", json={"to": ok, "amount_wei": "5"}) as r:
                assert r.status == 202, await r.text()


async def test_history_of_trades_and_transactions_in_json_and_csv(gw: Gateway) -> None:
    chain, auction, clock, _ = gw.backends  # type: ignore[attr-defined]
    gw.on_event(ev.MeterReading.TYPE, T0, reading(SIM0))  # the site's clock: 720x from 07:00
    h = await logged_in(gw)
    base = gw.test_url  # type: ignore[attr-defined]
    trade = {"trade_id": "t-o-1", "seller": SELLER, "buyer": ME, "seller_site": "solar-1", "buyer_site": "home-7",
             "wh": 1500, "price_wei_per_kwh": 2 * 10**15}
    apply(gw, T0 + 10, ev.OfferOpened(offer_id="o-1", seller=SELLER, seller_site="solar-1", wh=1500,
                                      start_price_wei_per_kwh=10**15, opened_at=T0 + 10, ends_at=T0 + 25),
          ev.OfferOpened(offer_id="o-2", seller=ME, seller_site="home-7", wh=500, start_price_wei_per_kwh=10**15,
                         opened_at=T0 + 10, ends_at=T0 + 20))
    apply(gw, T0 + 12, ev.BidPlaced(offer_id="o-1", bid_id="b-1", buyer=ME, buyer_site="home-7",
                                    price_wei_per_kwh=2 * 10**15, placed_at=T0 + 12))
    apply(gw, T0 + 20, ev.OfferClosed(offer_id="o-2", outcome="expired"))
    apply(gw, T0 + 25, ev.OfferClosed(offer_id="o-1", outcome="sold", winner=ME, price_wei_per_kwh=2 * 10**15),
          ev.TradeAgreed(offer_id="o-1", **trade))
    apply(gw, T0 + 27, ev.TradeRecorded(trade_id="t-o-1", tx_hash="0x01"),
          ev.TradeStatus(state="delivering", **trade))
    apply(gw, T0 + 40, ev.Settled(trade_id="t-o-1", delivered_wh=412, paid_wei=824 * 10**12, tx_hash="0x02"))
    clock.t = T0 + 41
    async with h:
        async with h.post(base + "/api/trades/t-o-1/close", json={}) as r:
            assert r.status == 200
        apply(gw, T0 + 41, ev.TradeStatus(state="closed", reason="closed by the buyer", delivered_wh=412, **trade),
              ev.MeterMismatch(trade_id="t-o-1", buyer_wh=412, seller_wh=520, tolerance=0.1, site="solar-1",
                                  reason="the seller's meter counted more"))
        apply(gw, T0 + 43, ev.TradeClosed(trade_id="t-o-1", delivered_wh=412, paid_wei=824 * 10**12,
                                                 refunded_wei=2176 * 10**12, tx_hash="0x03"),
              ev.TradeStatus(state="settled", reason="closed by the buyer", delivered_wh=412, **trade))
        # Ether sent from this wallet: the gateway knows the amount; the wallet's events bring the rest
        clock.t = T0 + 50
        async with h.post(base + "/api/transfers", json={"to": FRIEND, "amount_wei": str(125 * 10**16)}) as r:
            assert r.status == 202
        clock.t = T0 + 51
        async with h.post(base + "/api/escrow/deposit", json={"amount_wei": str(10**16)}) as r:
            assert r.status == 202
        apply(gw, T0 + 52, ev.WalletTx(site="home-7", tx_hash="0x" + "aa" * 32, kind="transfer", ref=FRIEND,
                                       account=ME, status="confirmed", block=7),
              ev.WalletTx(site="home-7", tx_hash="0x" + "bb" * 32, kind="deposit", ref=str(10**16), account=ME,
                          status="failed", reason="out of gas"),
              ev.WalletTx(site="home-7", tx_hash="0x" + "cc" * 32, kind="transfer", ref=ME, account=FRIEND,
                          status="confirmed"))
        clock.t = T0 + 60
        async with h.get(base + "/api/history") as r:
            assert r.status == 200
            body = await r.json()
        rows = {row["kind"]: row for row in body["rows"]}
        assert [row["kind"] for row in body["rows"]] == ["received", "deposit", "sent", "bought", "offer"]
        bought = rows["bought"]
        assert (bought["counterparty"], bought["counterparty_site"], bought["wh"], bought["delivered_wh"]) == \
            (SELLER, "solar-1", 1500, 412)
        assert (bought["price_wei_per_kwh"], bought["amount_wei"], bought["refunded_wei"]) == \
            (str(2 * 10**15), str(824 * 10**12), str(2176 * 10**12))
        assert bought["detail"] == "closed by you; meters disagree (buyer 0.412 kWh, seller 0.52 kWh)"
        assert bought["at"] == T0 + 25 and bought["sim_at"] == pytest.approx(SIM0 + 25 * 720)
        assert (rows["sent"]["amount_wei"], rows["sent"]["counterparty"], rows["sent"]["status"]) == \
            (str(125 * 10**16), FRIEND, "confirmed")
        assert rows["deposit"]["status"] == "failed" and rows["deposit"]["detail"] == \
            "escrow deposit: failed (out of gas)"
        assert rows["received"]["counterparty"] == FRIEND
        assert rows["offer"]["detail"] == "your offer expired without a bid"
        # the same as CSV, with every wei
        async with h.get(base + "/api/history.csv") as r:
            assert r.status == 200 and r.content_type == "text/csv"
            assert "attachment" in r.headers["Content-Disposition"]
            table = list(csv.DictReader(io.StringIO(await r.text())))
        got = {row["what"]: row for row in table}
        assert got["you bought"]["amount (Ether)"] == "0.000824" and got["you bought"]["refunded (Ether)"] == "0.002176"
        assert got["you bought"]["energy traded (kWh)"] == "1.5" and got["you bought"]["energy delivered (kWh)"] == "0.412"
        assert got["you sent Ether"]["amount (Ether)"] == "1.25"
        assert got["you bought"]["site time (UTC)"] == time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                      time.gmtime(SIM0 + 25 * 720))
        # the trade card's facts come with the listing
        auction.answers[cmd.ListTrades] = lambda r: cmd.Trades(trades=[cmd.TradeView(
            offer_id="o-1", state="settled", delivered_wh=412, paid_wei=824 * 10**12, **trade)])
        async with h.get(base + "/api/trades") as r:
            card = (await r.json())["trades"][0]
        assert (card["closed_by"], card["close_reason"], card["refunded_wei"]) == \
            ("buyer", "closed by the buyer", str(2176 * 10**12))
        assert card["closed_at"] == T0 + 41 and card["mismatch"]["seller_wh"] == 520
        # prices: the start bid, the bid and the trade, in order, in site time
        async with h.get(base + "/api/prices") as r:
            points = (await r.json())["points"]
        assert [(p["kind"], p["price_wei_per_kwh"]) for p in points] == \
            [("start", str(10**15)), ("start", str(10**15)), ("bid", str(2 * 10**15)), ("trade", str(2 * 10**15))]
        assert points[-1]["sim_at"] == pytest.approx(SIM0 + 25 * 720)
    async with aiohttp.ClientSession() as anon:
        async with anon.get(base + "/api/history.csv") as r:
            assert r.status == 401
        async with anon.get(base + "/api/history") as r:
            assert r.status == 401


async def test_site_clock_role_and_readings(gw: Gateway) -> None:
    base = gw.test_url  # type: ignore[attr-defined]
    async with aiohttp.ClientSession() as anon:
        async with anon.get(base + "/api/site") as r:
            site = await r.json()
        assert site["role"] is None and site["clock"]["simulated"] is False
        assert site["explorer_tx_url"] == "https://explorer.example/tx/{hash}"
        assert site["min_increment_wei_per_kwh"] == "1"
        gw.on_event(ev.MeterReading.TYPE, T0, reading(SIM0))
        gw.on_event(ev.MeterReading.TYPE, T0 + 1, reading(SIM0 + 720, relay_closed=True))
        gw.backends[2].t = T0 + 10  # type: ignore[attr-defined]
        async with anon.get(base + "/api/site") as r:
            site = await r.json()
        assert site["role"] == "consumer" and site["clock"]["simulated"] is True
        assert site["clock"]["sim"] == pytest.approx(SIM0 + 7200) and site["clock"]["scale"] == 720
    await gw.history.persist()
    assert gw.history.anchors and gw.history.sim_of(T0 + 5) == pytest.approx(SIM0 + 3600)
    h = await logged_in(gw)
    async with h, h.get(base + "/api/readings") as r:
        got = (await r.json())["readings"]
    assert [(p["sim_at"], p["load_w"], p["relay_closed"]) for p in got] == \
        [(SIM0, 450.0, False), (SIM0 + 720, 450.0, True)]


async def test_changed_balances_are_pushed_to_the_open_page(gw: Gateway) -> None:
    _, _, _, balances = gw.backends  # type: ignore[attr-defined]
    h = await logged_in(gw)
    async with h:
        ws = await h.ws_connect(gw.test_url + "/api/ws")  # type: ignore[attr-defined]
        assert (await ws.receive_json(timeout=5))["type"] == "hello"
        last: dict[str, Any] = {}
        await gw.push_balances(last)
        first = await ws.receive_json(timeout=5)
        assert first["type"] == "wallet.balances" and first["body"]["ether_wei"] == str(10 * ETH)
        await gw.push_balances(last)  # nothing changed: nothing sent
        balances["ether_wei"] = 10 * ETH + 125 * 10**16  # Ether received from anyone
        await gw.push_balances(last)
        frame = await ws.receive_json(timeout=5)
        assert frame["body"]["ether_wei"] == str(10 * ETH + 125 * 10**16)
        with pytest.raises(asyncio.TimeoutError):
            await ws.receive_json(timeout=0.2)
        await ws.close()
        for _ in range(100):  # the server's side of the socket winds down
            if not gw.clients:
                break
            await asyncio.sleep(0.02)
        assert not gw.clients


async def test_the_page_gets_the_trade_states_generated_from_the_enum(gw: Gateway) -> None:
    from services.bus.states import js_module

    async with aiohttp.ClientSession() as h, h.get(gw.test_url + "/static/js/trade_states.js") as r:  # type: ignore
        assert r.status == 200 and r.content_type == "text/javascript"
        assert await r.text() == js_module()
