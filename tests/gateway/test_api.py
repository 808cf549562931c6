"""The REST API on a real server in front of the real chain service (embedded chain), the
real auction and the real simulated meters: sessions, auth, validation, errors, the
websocket feed."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from services.bus import commands as cmd
from services.gateway import models as m
from services.gateway.routes import ROUTES

from tests.support.gateway import Stack, error_of, http, login



def sample_body(route: Any, stack: Stack) -> dict[str, Any] | None:
    return {
        "transfer": {"to": stack.third.address, "amount_wei": "1000"},
        "escrow_deposit": {"amount_wei": "1000"}, "escrow_withdraw": {"amount_wei": "1000"},
        "set_mining": {"action": "stop"}, "sell": {"kwh": "1", "start_price_wei_per_kwh": "1000", "duration_s": 5},
        "bid": {"price_wei_per_kwh": "2000"}, "cancel_offer": {}, "close_trade": {},
        "login": {"address": stack.producer.address, "passphrase": "x"},
        "unlock": {"passphrase": "x"},
    }.get(route.name)


def concrete(path: str) -> str:
    return path.replace("{offer_id}", "o-1").replace("{trade_id}", "t-1")


async def test_without_a_session_every_route_but_login_answers_401(stack: Stack) -> None:
    base = stack.url("home-7")
    async with http() as me, http() as h:
        await login(me, base, stack.consumer)
        before = await stack.settled_wallet(me, "home-7")
        for r in ROUTES:
            if not r.auth:
                continue
            async with h.request(r.method, base + concrete(r.path), json=sample_body(r, stack)) as resp:
                assert resp.status == 401, (r.method, r.path, resp.status)
                assert (await error_of(resp))["code"] == "no_session"
        # a made-up cookie is no session either
        h.cookie_jar.update_cookies({stack.gateways["home-7"].gateway.cookie: "forged-token"})
        transfer = next(r for r in ROUTES if r.name == "transfer")
        async with h.post(base + "/api/transfers", json=sample_body(transfer, stack)) as resp:
            assert resp.status == 401
        with pytest.raises(aiohttp.WSServerHandshakeError) as e:
            await h.ws_connect(base + "/api/ws")
        assert e.value.status == 401
        # nothing reached the chain: the consumer's Ether did not move (no gas paid), nothing is pending
        after = await stack.wallet(me, "home-7")
        assert (after["ether_wei"], after["pending"]) == (before["ether_wei"], [])


async def test_login_sets_a_strict_httponly_cookie_and_logout_locks(stack: Stack) -> None:
    base = stack.url("solar-1")
    producer = stack.producer
    chain = stack.gateways["solar-1"].gateway.chain  # the gateway's own client of its site's real wallet

    async def unlocked() -> bool:
        accounts = (await chain.request(cmd.ListAccounts(), timeout=5)).accounts
        return next(a.unlocked for a in accounts if a.address == producer.address)

    async with http() as h:
        async with h.post(base + "/api/session", json={"address": producer.address,
                                                       "passphrase": producer.passphrase}) as r:
            assert r.status == 200
            who = await r.json()
            cookie = r.headers["Set-Cookie"]
        assert who["address"] == producer.address and who["site"] == "solar-1"
        low = cookie.lower()
        assert "httponly" in low and "samesite=strict" in low and "path=/" in low
        assert producer.passphrase not in cookie
        assert await unlocked()
        async with h.get(base + "/api/mining") as r:  # shown at a site, switched by the market only
            assert r.status == 200 and (await r.json())["controllable"] is False
        async with h.post(base + "/api/mining", json={"action": "stop"}) as r:
            assert r.status == 403 and (await error_of(r))["code"] == "not_allowed"
        async with h.get(base + "/api/wallet") as r:
            assert r.status == 200
            w = m.WalletOut.model_validate(await r.json())
            # tokens minted from the sunny morning's production (sold ones leave the balance)
            assert w.address == producer.address and 0 < w.tokens_wh <= w.generated_wh
            assert isinstance((await r.json())["ether_wei"], str)
        async with h.delete(base + "/api/session") as r:
            assert r.status == 200
        assert not await unlocked()  # logout locked the key in the chain service
        async with h.get(base + "/api/wallet") as r:
            assert r.status == 401


async def test_bad_input_gets_a_4xx_with_a_message(stack: Stack) -> None:
    base = stack.url("home-7")
    third = stack.third.address
    async with http() as h:
        await login(h, base, stack.consumer)
        before = await stack.settled_wallet(h, "home-7")
        cases: list[tuple[str, Any, dict[str, str] | None, int, str]] = [
            ("/api/transfers", b"{not json", {"Content-Type": "application/json"}, 400, "malformed_json"),
            ("/api/transfers", b'{"to": "' + third.encode() + b'", "amount_wei": "1"}',
             {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
            ("/api/transfers", b"[1, 2]", {"Content-Type": "application/json"}, 422, "invalid"),
            ("/api/transfers", {"to": third, "amount_wei": 1000}, None, 422, "invalid"),  # a number
            ("/api/transfers", {"to": third, "amount_wei": "-5"}, None, 422, "invalid"),
            ("/api/transfers", {"to": third, "amount_wei": "0"}, None, 422, "invalid"),
            ("/api/transfers", {"to": third, "amount_wei": "1.5"}, None, 422, "invalid"),
            ("/api/transfers", {"to": third, "amount_wei": str(2**256)}, None, 422, "invalid"),
            ("/api/transfers", {"to": "0x123", "amount_wei": "1"}, None, 422, "invalid"),
            ("/api/transfers", {"to": third}, None, 422, "invalid"),
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
        # none of that reached the chain: no transaction, the balances did not move
        after = await stack.wallet(h, "home-7")
        assert (after["ether_wei"], after["pending"]) == (before["ether_wei"], [])


async def test_one_user_cannot_act_for_another(stack: Stack) -> None:
    sell_base, buy_base = stack.url("solar-1"), stack.url("home-7")
    producer, consumer, third_p = stack.producer, stack.consumer, stack.third
    async with http() as seller, http() as buyer, http() as third:
        # an account logs in only at its own site's gateway: the chain service refuses the
        # other site's key (to a person: a wrong account), even with the right passphrase
        async with seller.post(buy_base + "/api/session", json={"address": producer.address,
                                                                "passphrase": producer.passphrase}) as r:
            assert r.status == 401 and (await error_of(r))["code"] == "bad_credentials"
        await login(seller, sell_base, producer)
        await login(buyer, buy_base, consumer)
        await login(third, buy_base, third_p)
        # a body cannot name the acting account: such fields are refused
        for path, body in (("/api/transfers", {"to": third_p.address, "amount_wei": "5", "sender": producer.address}),
                           ("/api/escrow/withdraw", {"amount_wei": "5", "account": producer.address}),
                           ("/api/offers", {"wh": 5, "start_price_wei_per_kwh": "1", "duration_s": 5,
                                            "seller": producer.address})):
            async with buyer.post(buy_base + path, json=body) as r:
                assert r.status == 422 and "extra" in (await error_of(r))["message"].lower()
        # a transfer is sent from the session's own account: the third account receives 7 wei
        third_before = int((await stack.settled_wallet(third, "home-7"))["ether_wei"])
        async with buyer.post(buy_base + "/api/transfers", json={"to": third_p.address, "amount_wei": "7"}) as r:
            assert r.status == 202
            assert (await r.json())["tx_hash"].startswith("0x")

        async def received() -> bool:
            return int((await stack.wallet(third, "home-7"))["ether_wei"]) == third_before + 7
        await stack.until("the third account to receive the consumer's 7 wei", received)

        async with seller.post(sell_base + "/api/offers", json={"kwh": "1.5", "start_price_wei_per_kwh": "1000",
                                                                "duration_s": 4}) as r:
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
        # 1.5 kWh at 1 Ether/kWh: more than the third account's free escrow can reserve; nothing is signed
        async with third.post(buy_base + f"/api/offers/{oid}/bids", json={"price_wei_per_kwh": str(10**18)}) as r:
            err = await error_of(r)
            assert r.status == 409 and err["code"] == "insufficient_escrow" and "Deposit 0.5 Ether" in err["message"]
            assert err.get("fix", {}).get("action") == "deposit", err
        async with buyer.post(buy_base + f"/api/offers/{oid}/bids", json={"price_wei_per_kwh": "2000"}) as r:
            assert r.status == 201, await r.text()
        # the bid's escrow is reserved (1.5 kWh at 2000 wei/kWh) until the bid expires, past the auction's end
        w = await stack.wallet(buyer, "home-7")
        assert int(w["escrow_reserved_wei"]) >= 3000 and w["reserved_until"] >= int(offer["ends_at"]) + 600

        async def trade() -> dict[str, Any] | None:
            async with buyer.get(buy_base + "/api/trades") as r:
                ts = [t for t in (await r.json())["trades"] if t["offer_id"] == oid]
            return ts[0] if ts and ts[0]["state"] == "delivering" else None

        t = await stack.until("the trade to be recorded on the chain and delivering", trade)
        assert t["buyer"] == consumer.address and t["price_wei_per_kwh"] == "2000"
        async with third.post(buy_base + f"/api/trades/{t['trade_id']}/close", json={}) as r:
            assert r.status == 403 and (await error_of(r))["code"] == "not_allowed"
        async with buyer.post(buy_base + f"/api/trades/{t['trade_id']}/close", json={}) as r:
            assert r.status == 200, await r.text()


async def test_failed_logins_are_throttled_per_address_and_per_ip(stack: Stack) -> None:
    base = stack.url("home-7")
    async with http() as h:
        for _ in range(5):
            async with h.post(base + "/api/session", json={"address": stack.consumer.address,
                                                           "passphrase": "guess"}) as r:
                assert r.status == 401 and (await error_of(r))["code"] == "bad_credentials"
        # the right passphrase is refused too now: the address is throttled
        async with h.post(base + "/api/session", json={"address": stack.consumer.address,
                                                       "passphrase": stack.consumer.passphrase}) as r:
            assert r.status == 429 and int(r.headers["Retry-After"]) > 0
            assert "too many" in (await error_of(r))["message"]
        # ... and so is this client IP, whatever the address
        async with h.post(base + "/api/session", json={"address": stack.third.address,
                                                       "passphrase": stack.third.passphrase}) as r:
            assert r.status == 429
    # another gateway keeps its own counts: a correct login there works
    async with http() as h:
        await login(h, stack.url("solar-1"), stack.producer)


async def test_a_backing_service_that_does_not_answer_is_a_503(stack: Stack) -> None:
    from tests.support.ports import free_port

    # a gateway whose wallet and auction addresses lead nowhere (nobody listens there)
    gw = await stack.add_gateway("home-7", name="lonely", wallet_rpc=f"tcp://127.0.0.1:{free_port()}",
                                 auction_rpc=f"tcp://127.0.0.1:{free_port()}", gateway_rpc_timeout_s=0.3)
    async with http() as h:
        async with h.get(gw.url + "/api/accounts") as r:
            assert r.status == 503
            assert "chain service does not answer" in (await error_of(r))["message"]
        async with h.post(gw.url + "/api/session", json={"address": stack.consumer.address,
                                                         "passphrase": stack.consumer.passphrase}) as r:
            assert r.status == 503
        async with h.get(gw.url + "/healthz") as r:
            assert r.status == 200 and (await r.json())["ready"] is True
    # logged in at a working gateway, the real auction process going away is a 503 with words
    grid = stack.grid
    async with http() as h:
        await login(h, stack.url("home-7"), stack.consumer)
        grid.terminate("auction")
        try:
            async with h.get(stack.url("home-7") + "/api/offers") as r:
                assert r.status == 503 and "auction service" in (await error_of(r))["message"]
        finally:
            grid.spawn("auction")
            await grid.until("the auction to be healthy again", lambda: grid.health("auction"))

        async def answers() -> bool:
            async with h.get(stack.url("home-7") + "/api/offers") as r:
                return r.status == 200
        await stack.until("the gateway to reach the restarted auction", answers)


async def test_the_websocket_pushes_what_the_user_may_see(stack: Stack) -> None:
    producer, consumer = stack.producer, stack.consumer
    async with http() as seller, http() as buyer:
        await login(seller, stack.url("solar-1"), producer)
        await login(buyer, stack.url("home-7"), consumer)
        got: dict[str, list[dict[str, Any]]] = {"seller": [], "buyer": []}
        ws_s = await seller.ws_connect(stack.url("solar-1") + "/api/ws")
        ws_b = await buyer.ws_connect(stack.url("home-7") + "/api/ws")

        async def read(ws: aiohttp.ClientWebSocketResponse, into: list[dict[str, Any]]) -> None:
            async for msg in ws:
                into.append(json.loads(msg.data))

        readers = [asyncio.create_task(read(ws_s, got["seller"])), asyncio.create_task(read(ws_b, got["buyer"]))]
        try:
            def types(who: str) -> set[str]:
                return {e["type"] for e in got[who]}

            await stack.until("hello on both websockets", lambda: "hello" in types("seller") and "hello" in types("buyer"))
            oid = await stack.sell_and_bid(seller, buyer, 6000)
            # the buyer sends a transaction of its own too (chain.tx of its account)
            async with buyer.post(stack.url("home-7") + "/api/escrow/deposit", json={"amount_wei": "1000"}) as r:
                assert r.status == 202, await r.text()
            await stack.until("payments to reach both parties' websockets",
                              lambda: "chain.settled" in types("buyer") and "chain.settled" in types("seller"))
            for who in ("seller", "buyer"):
                assert {"market.offer_opened", "market.bid_placed", "market.offer_closed", "trade.status",
                        "meter.reading", "chain.tx"} <= types(who), (who, types(who))
            # meter readings: only this gateway's site; tx updates: only the user's own account
            assert {e["body"]["site"] for e in got["seller"] if e["type"] == "meter.reading"} == {"solar-1"}
            assert {e["body"]["site"] for e in got["buyer"] if e["type"] == "meter.reading"} == {"home-7"}
            assert {e["body"]["account"] for e in got["seller"] if e["type"] == "chain.tx"} == {producer.address}
            assert {e["body"]["account"] for e in got["buyer"] if e["type"] == "chain.tx"} == {consumer.address}
            bid = next(e for e in got["seller"] if e["type"] == "market.bid_placed" and e["body"]["offer_id"] == oid)
            assert bid["body"]["price_wei_per_kwh"] == "6000"  # wei as a string on the websocket too
            # logging out closes the feed
            async with buyer.delete(stack.url("home-7") + "/api/session") as r:
                assert r.status == 200
            await stack.until("the buyer's websocket to close at logout", lambda: ws_b.closed)
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
        async with h.get(base + "/api/accounts") as r:  # the chain service's keystore: this site's accounts only
            got = {a["address"]: (a["name"], a["site"]) for a in (await r.json())["accounts"]}
        assert got == {p.address: (p.name, "home-7") for p in (stack.consumer, stack.third)}
        async with h.get(stack.url("solar-1") + "/api/accounts") as r:
            got = {a["address"]: (a["name"], a["site"]) for a in (await r.json())["accounts"]}
        assert got == {stack.producer.address: (stack.producer.name, "solar-1")}
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
        async with h.get(base + "/static/vendor/sha3.min.js") as r:
            assert r.status == 200
