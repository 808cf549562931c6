"""The REST API on a real server: sessions, auth, validation, errors, the websocket feed."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from services.bus import commands as cmd
from services.gateway import models as m
from services.gateway.openapi import ROUTES
from tests.bus.conftest import Grid

from .conftest import CONSUMER, PRODUCER, THIRD, Stack, login, until


def http() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))  # cookies from 127.0.0.1


def sample_body(route: Any) -> dict[str, Any] | None:
    return {
        "transfer": {"to": THIRD.address, "amount_wei": "1000"},
        "escrow_deposit": {"amount_wei": "1000"}, "escrow_withdraw": {"amount_wei": "1000"},
        "set_mining": {"action": "stop"}, "sell": {"kwh": "1", "start_price_wei_per_kwh": "1000", "duration_s": 5},
        "bid": {"price_wei_per_kwh": "2000"}, "cancel_offer": {}, "close_trade": {},
        "login": {"address": PRODUCER.address, "passphrase": "x"},
    }.get(route.name)


def concrete(path: str) -> str:
    return path.replace("{offer_id}", "o-1").replace("{trade_id}", "t-1")


async def error_of(r: aiohttp.ClientResponse) -> dict[str, Any]:
    assert r.content_type == "application/json", await r.text()
    body = await r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["message"] and "Traceback" not in body["error"]["message"]
    return body["error"]


async def test_without_a_session_every_route_but_login_answers_401(stack: Stack) -> None:
    base = stack.url("home-7")
    before = len(stack.chain.requests)
    async with http() as h:
        for r in ROUTES:
            if not r.auth:
                continue
            async with h.request(r.method, base + concrete(r.path), json=sample_body(r)) as resp:
                assert resp.status == 401, (r.method, r.path, resp.status)
                assert (await error_of(resp))["code"] == "no_session"
        # a made-up cookie is no session either
        h.cookie_jar.update_cookies({stack.gateways["home-7"].gateway.cookie: "forged-token"})
        async with h.post(base + "/api/transfers", json=sample_body(ROUTES[6])) as resp:
            assert resp.status == 401
        with pytest.raises(aiohttp.WSServerHandshakeError) as e:
            await h.ws_connect(base + "/api/ws")
        assert e.value.status == 401
    assert len(stack.chain.requests) == before  # nothing reached the chain


async def test_login_sets_a_strict_httponly_cookie_and_logout_locks(stack: Stack) -> None:
    base = stack.url("solar-1")
    async with http() as h:
        async with h.post(base + "/api/session", json={"address": PRODUCER.address,
                                                       "passphrase": PRODUCER.passphrase}) as r:
            assert r.status == 200
            who = await r.json()
            cookie = r.headers["Set-Cookie"]
        assert who["address"] == PRODUCER.address and who["site"] == "solar-1"
        low = cookie.lower()
        assert "httponly" in low and "samesite=strict" in low and "path=/" in low
        assert PRODUCER.passphrase not in cookie
        async with h.get(base + "/api/wallet") as r:
            assert r.status == 200
            w = m.WalletOut.model_validate(await r.json())
            assert w.tokens_wh == 5_000 and w.address == PRODUCER.address
            assert isinstance((await r.json())["ether_wei"], str)
        async with h.delete(base + "/api/session") as r:
            assert r.status == 200
        assert cmd.Lock(address=PRODUCER.address) in stack.chain.requests
        assert PRODUCER.address.lower() not in stack.chain.unlocked
        async with h.get(base + "/api/wallet") as r:
            assert r.status == 401


async def test_bad_input_gets_a_4xx_with_a_message(stack: Stack) -> None:
    base = stack.url("home-7")
    async with http() as h:
        await login(h, base, CONSUMER)
        cases: list[tuple[str, Any, dict[str, str] | None, int, str]] = [
            ("/api/transfers", b"{not json", {"Content-Type": "application/json"}, 400, "malformed_json"),
            ("/api/transfers", b'{"to": "' + THIRD.address.encode() + b'", "amount_wei": "1"}',
             {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
            ("/api/transfers", b"[1, 2]", {"Content-Type": "application/json"}, 422, "invalid"),
            ("/api/transfers", {"to": THIRD.address, "amount_wei": 1000}, None, 422, "invalid"),  # a number
            ("/api/transfers", {"to": THIRD.address, "amount_wei": "-5"}, None, 422, "invalid"),
            ("/api/transfers", {"to": THIRD.address, "amount_wei": "0"}, None, 422, "invalid"),
            ("/api/transfers", {"to": THIRD.address, "amount_wei": "1.5"}, None, 422, "invalid"),
            ("/api/transfers", {"to": THIRD.address, "amount_wei": str(2**256)}, None, 422, "invalid"),
            ("/api/transfers", {"to": "0x123", "amount_wei": "1"}, None, 422, "invalid"),
            ("/api/transfers", {"to": THIRD.address}, None, 422, "invalid"),
            ("/api/escrow/deposit", {"amount_wei": "1e18"}, None, 422, "invalid"),
            ("/api/escrow/withdraw", {"amount_wei": str(10**30)}, None, 409, "insufficient_escrow"),
            ("/api/mining", {"action": "explode"}, None, 422, "invalid"),
            ("/api/offers", {"kwh": "1.2345", "start_price_wei_per_kwh": "1", "duration_s": 5}, None, 422, "invalid"),
            ("/api/offers", {"kwh": "-1", "start_price_wei_per_kwh": "1", "duration_s": 5}, None, 422, "invalid"),
            ("/api/offers", {"wh": 10, "kwh": "1", "start_price_wei_per_kwh": "1", "duration_s": 5}, None, 422,
             "invalid"),
            ("/api/offers", {"wh": 10, "start_price_wei_per_kwh": "1", "duration_s": "5"}, None, 422, "invalid"),
            ("/api/offers", {"wh": 10, "start_price_wei_per_kwh": "1", "duration_s": -5}, None, 422, "invalid"),
            ("/api/offers/no-such-offer/bids", {"price_wei_per_kwh": "5"}, None, 404, "not_found"),
            ("/api/offers/%00%2F..%2F/bids", {"price_wei_per_kwh": "5"}, None, 404, "not_found"),
            ("/api/trades/t-nothing/close", {}, None, 404, "not_found"),
            ("/api/nowhere", {}, None, 404, "not_found"),
        ]
        for path, body, headers, status, code in cases:
            kw: dict[str, Any] = {"data": body, "headers": headers} if isinstance(body, bytes) else {"json": body}
            async with h.post(base + path, **kw) as r:
                err = await error_of(r)
                assert (r.status, err["code"]) == (status, code), (path, body, r.status, err)
        async with h.post(base + "/api/transfers", data=b"x" * 200_000,
                           headers={"Content-Type": "application/json"}) as r:
            assert r.status == 413 and (await error_of(r))["code"] == "too_large"
    # none of that reached the chain as a transfer
    assert not [q for q in stack.chain.requests if isinstance(q, cmd.Transfer)]


def s_chain_pending(stack: Stack) -> list[str]:
    sub = stack.chain.sub
    return [f"{t.kind}:{t.ref}" for t in stack.chain.pending] + [f"mined {t.kind}:{t.ref}" for t in stack.chain.mined] \
        + [f"stand-in subscriber applied={sub.applied} failed={sub.failed} drops={dict(sub.drops.counts)} "
           f"offsets={sub.offsets} replay_at={sub.replay_at}"]


async def test_one_user_cannot_act_for_another(stack: Stack) -> None:
    sell_base, buy_base = stack.url("solar-1"), stack.url("home-7")
    async with http() as seller, http() as buyer, http() as third:
        await login(seller, sell_base, PRODUCER)
        await login(buyer, buy_base, CONSUMER)
        await login(third, buy_base, THIRD)
        # a body cannot name the acting account: such fields are refused
        for path, body in (("/api/transfers", {"to": THIRD.address, "amount_wei": "5", "sender": PRODUCER.address}),
                           ("/api/escrow/withdraw", {"amount_wei": "5", "account": PRODUCER.address}),
                           ("/api/offers", {"wh": 5, "start_price_wei_per_kwh": "1", "duration_s": 5,
                                            "seller": PRODUCER.address})):
            async with buyer.post(buy_base + path, json=body) as r:
                assert r.status == 422 and "extra" in (await error_of(r))["message"].lower()
        async with buyer.post(buy_base + "/api/transfers", json={"to": THIRD.address, "amount_wei": "7"}) as r:
            assert r.status == 202
        sent = [q for q in stack.chain.requests if isinstance(q, cmd.Transfer)]
        assert [(q.sender, q.amount_wei) for q in sent] == [(CONSUMER.address, 7)]

        async with seller.post(sell_base + "/api/offers", json={"kwh": "1.5", "start_price_wei_per_kwh": "1000",
                                                                "duration_s": 2}) as r:
            assert r.status == 201, await r.text()
            offer = await r.json()
        assert offer["wh"] == 1500
        oid = offer["offer_id"]
        async with third.post(buy_base + f"/api/offers/{oid}/cancel", json={}) as r:
            assert r.status == 403 and (await error_of(r))["code"] == "not_allowed"
        async with seller.post(sell_base + f"/api/offers/{oid}/bids", json={"price_wei_per_kwh": "2000"}) as r:
            assert r.status == 409 and (await error_of(r))["code"] == "own_offer"
        async with buyer.post(buy_base + f"/api/offers/{oid}/bids", json={"price_wei_per_kwh": "1"}) as r:
            assert r.status == 409 and (await error_of(r))["code"] == "too_low"
        async with buyer.post(buy_base + f"/api/offers/{oid}/bids", json={"price_wei_per_kwh": "2000"}) as r:
            assert r.status == 201, await r.text()

        async def trade() -> dict[str, Any] | None:
            async with buyer.get(buy_base + "/api/trades") as r:
                ts = [t for t in (await r.json())["trades"] if t["offer_id"] == oid]
            return ts[0] if ts and ts[0]["state"] == "delivering" else None

        try:
            await until(trade, what="the trade is recorded and delivering")
        except AssertionError:
            async with buyer.get(buy_base + "/api/offers") as r1, buyer.get(buy_base + "/api/trades") as r2:
                raise AssertionError(f"offers {await r1.text()} trades {await r2.text()} "
                                     f"chain pending {s_chain_pending(stack)}") from None
        t = await trade()
        assert t is not None and t["buyer"] == CONSUMER.address and t["price_wei_per_kwh"] == "2000"
        async with third.post(buy_base + f"/api/trades/{t['trade_id']}/close", json={}) as r:
            assert r.status == 403 and (await error_of(r))["code"] == "not_allowed"
        async with buyer.post(buy_base + f"/api/trades/{t['trade_id']}/close", json={}) as r:
            assert r.status == 200, await r.text()


async def test_failed_logins_are_throttled_per_address_and_per_ip(stack: Stack) -> None:
    base = stack.url("home-7")
    async with http() as h:
        for _ in range(5):
            async with h.post(base + "/api/session", json={"address": CONSUMER.address, "passphrase": "guess"}) as r:
                assert r.status == 401 and (await error_of(r))["code"] == "bad_credentials"
        # the right passphrase is refused too now: the address is throttled
        async with h.post(base + "/api/session", json={"address": CONSUMER.address,
                                                       "passphrase": CONSUMER.passphrase}) as r:
            assert r.status == 429 and int(r.headers["Retry-After"]) > 0
            assert "too many" in (await error_of(r))["message"]
        # ... and so is this client IP, whatever the address
        async with h.post(base + "/api/session", json={"address": THIRD.address,
                                                       "passphrase": THIRD.passphrase}) as r:
            assert r.status == 429
    # another gateway keeps its own counts: a correct login there works
    async with http() as h:
        await login(h, stack.url("solar-1"), PRODUCER)


async def test_a_backing_service_that_does_not_answer_is_a_503(grid: Grid) -> None:
    from tests.conftest import free_port

    async with Stack(grid) as s:
        gw = await s.add_gateway("home-7", name="lonely", chain_rpc=f"tcp://127.0.0.1:{free_port()}",
                                 auction_rpc=f"tcp://127.0.0.1:{free_port()}", gateway_rpc_timeout_s=0.3)
        async with http() as h:
            async with h.get(gw.url + "/api/accounts") as r:
                assert r.status == 503
                assert "chain service does not answer" in (await error_of(r))["message"]
            async with h.post(gw.url + "/api/session", json={"address": CONSUMER.address,
                                                             "passphrase": CONSUMER.passphrase}) as r:
                assert r.status == 503
            async with h.get(gw.url + "/healthz") as r:
                assert r.status == 200 and (await r.json())["ready"] is True
        # logged in at a working gateway, the auction going away is a 503 with words
        async with http() as h:
            await login(h, s.url("home-7"), CONSUMER)
            await s.auction.stop()
            async with h.get(s.url("home-7") + "/api/offers") as r:
                assert r.status == 503 and "auction service" in (await error_of(r))["message"]


async def test_the_websocket_pushes_what_the_user_may_see(grid: Grid) -> None:
    async with Stack(grid, meters=True) as s, http() as seller, http() as buyer:
        await login(seller, s.url("solar-1"), PRODUCER)
        await login(buyer, s.url("home-7"), CONSUMER)
        got: dict[str, list[dict[str, Any]]] = {"seller": [], "buyer": []}
        ws_s = await seller.ws_connect(s.url("solar-1") + "/api/ws")
        ws_b = await buyer.ws_connect(s.url("home-7") + "/api/ws")

        async def read(ws: aiohttp.ClientWebSocketResponse, into: list[dict[str, Any]]) -> None:
            async for msg in ws:
                into.append(json.loads(msg.data))

        readers = [asyncio.create_task(read(ws_s, got["seller"])), asyncio.create_task(read(ws_b, got["buyer"]))]
        try:
            def types(who: str) -> set[str]:
                return {e["type"] for e in got[who]}

            await until(lambda: "hello" in types("seller") and "hello" in types("buyer"), what="hello")
            async with seller.post(s.url("solar-1") + "/api/offers",
                                   json={"wh": 1000, "start_price_wei_per_kwh": "5000", "duration_s": 1}) as r:
                assert r.status == 201
                oid = (await r.json())["offer_id"]
            async with buyer.post(s.url("home-7") + f"/api/offers/{oid}/bids", json={"price_wei_per_kwh": "6000"}) as r:
                assert r.status == 201
            await until(lambda: "chain.settled" in types("buyer") and "chain.settled" in types("seller"),
                        what="payments reach both parties")
            for who in ("seller", "buyer"):
                assert {"market.offer_opened", "market.bid_placed", "market.offer_closed", "trade.status",
                        "meter.reading", "chain.tx"} <= types(who), (who, types(who))
            # meter readings: only this gateway's site; tx updates: only the user's own account
            assert {e["body"]["site"] for e in got["seller"] if e["type"] == "meter.reading"} == {"solar-1"}
            assert {e["body"]["site"] for e in got["buyer"] if e["type"] == "meter.reading"} == {"home-7"}
            assert {e["body"]["account"] for e in got["seller"] if e["type"] == "chain.tx"} == {PRODUCER.address}
            assert {e["body"]["account"] for e in got["buyer"] if e["type"] == "chain.tx"} == {CONSUMER.address}
            bid = next(e for e in got["seller"] if e["type"] == "market.bid_placed")
            assert bid["body"]["price_wei_per_kwh"] == "6000"  # wei as a string on the websocket too
            # logging out closes the feed
            async with buyer.delete(s.url("home-7") + "/api/session") as r:
                assert r.status == 200
            await until(lambda: ws_b.closed, what="the buyer's websocket closes at logout")
            assert ws_b.close_code == 4401
        finally:
            await ws_s.close()
            await ws_b.close()
            for t in readers:
                t.cancel()
            await asyncio.gather(*readers, return_exceptions=True)


async def test_metrics_healthz_openapi_and_the_page(stack: Stack) -> None:
    base = stack.url("home-7")
    async with http() as h:
        async with h.get(base + "/healthz") as r:
            assert r.status == 200 and (await r.json())["site"] == "home-7"
        async with h.get(base + "/api/accounts") as r:
            assert [a["address"] for a in (await r.json())["accounts"]] == \
                [PRODUCER.address, CONSUMER.address, THIRD.address]
        async with h.get(base + "/metrics") as r:
            text = await r.text()
            assert 'gridtrade_gateway_http_requests_total{route="list_accounts",status="200"} 1.0' in text
        async with h.get(base + "/api/openapi.json") as r:
            doc = await r.json()
        assert {(meth.upper(), p) for p, ops in doc["paths"].items() for meth in ops} == \
            {(r.method, r.path) for r in ROUTES}
        schema = doc["components"]["schemas"]["TransferIn"]
        assert schema["properties"]["amount_wei"]["type"] == "string"
        async with h.get(base + "/") as r:
            page = await r.text()
            assert r.status == 200 and "<script type=\"module\"" in page
            assert "http://" not in page and "https://" not in page  # no CDN
        async with h.get(base + "/static/vendor/uPlot.iife.min.js") as r:
            assert r.status == 200
