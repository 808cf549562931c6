"""The double auction through the REST API on the real grid (the auction runs both markets,
a call every 5 s): the producer's sell order and the consumer's buy order clear at one
price, GET /api/orders shows the book and the clearing, and the trade is opened on the
chain at that price (read straight from the EnergyMarket contract). A buy order its
escrow does not cover is refused in words and changes nothing."""

from __future__ import annotations

from typing import Any

import aiohttp
from eth_utils import keccak, to_checksum_address
from web3 import HTTPProvider, Web3

from services.chain.bindings import STATUS_NONE, load_artifact

from tests.support.gateway import CLEAR_INTERVAL_S, Stack, error_of, http, login

PRICE_SELL = 1000  # wei/kWh: the producer's least price
PRICE_BUY = 3000   # wei/kWh: the consumer's most


def onchain_trade(stack: Stack, trade_id: str) -> dict[str, Any]:
    """A trade as the EnergyMarket contract on anvil holds it (by the hash of its id)."""
    grid = stack.grid
    w3 = Web3(HTTPProvider(grid.proc("anvil").extra["rpc"]))
    market = w3.eth.contract(address=to_checksum_address((grid.health("chain") or {})["market"]),
                             abi=load_artifact("EnergyMarket")["abi"])
    seller, wh, status, buyer, delivered, price, _deadline, _closing = \
        market.functions.trades(keccak(text=trade_id)).call()
    return {"seller": seller, "wh": wh, "status": status, "buyer": buyer, "price": price}


async def orders(h: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    async with h.get(base + "/api/orders") as r:
        assert r.status == 200, await r.text()
        return dict(await r.json())


async def fresh_call(stack: Stack, h: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    """Wait until a call has most of its interval left: both orders land in it."""
    async def roomy() -> dict[str, Any] | None:
        b = await orders(h, base)
        return b if b["clears_at"] - b["now"] > CLEAR_INTERVAL_S * 0.7 else None
    return dict(await stack.until("a call with time left to place two orders", roomy, timeout=3 * CLEAR_INTERVAL_S))


async def test_two_sites_orders_clear_at_one_price_and_the_trade_opens_on_chain(stack: Stack) -> None:
    sell_base, buy_base = stack.url("solar-1"), stack.url("home-7")
    async with http() as seller, http() as buyer:
        await login(seller, sell_base, stack.producer)
        await login(buyer, buy_base, stack.consumer)
        async with seller.get(sell_base + "/api/site") as r:
            site = await r.json()
        assert (site["auction_market"], site["clear_interval_s"]) == ("both", CLEAR_INTERVAL_S)

        book = await fresh_call(stack, seller, sell_base)
        assert isinstance(book["calls"], list) and book["interval_s"] == CLEAR_INTERVAL_S
        async with seller.post(sell_base + "/api/orders", json={"side": "sell", "kwh": "0.6",
                                                                "limit_price_wei_per_kwh": str(PRICE_SELL)}) as r:
            assert r.status == 201, await r.text()
            sell = await r.json()
        async with buyer.post(buy_base + "/api/orders", json={"side": "buy", "wh": 500,
                                                              "limit_price_wei_per_kwh": str(PRICE_BUY)}) as r:
            assert r.status == 201, await r.text()
            buy = await r.json()
        assert (sell["wh"], sell["limit_price_wei_per_kwh"], buy["wh"]) == (600, str(PRICE_SELL), 500)

        # the book of the current call, from the buyer's side: both orders, wei as strings, its own marked
        seen = await orders(buyer, buy_base)
        mine = {o["order_id"]: o for o in seen["orders"]}
        if sell["order_id"] in mine and buy["order_id"] in mine:  # (unless the call just cleared them)
            s, b = mine[sell["order_id"]], mine[buy["order_id"]]
            assert (s["side"], s["site"], s["account"], s["wh"], s["limit_price_wei_per_kwh"], s["mine"]) == \
                ("sell", "solar-1", stack.producer.address, 600, str(PRICE_SELL), False)
            assert (b["side"], b["site"], b["wh"], b["limit_price_wei_per_kwh"], b["mine"], b["filled_wh"]) == \
                ("buy", "home-7", 500, str(PRICE_BUY), True, None)
            round_ = seen["round"]
        else:
            round_ = None

        async def cleared() -> dict[str, Any] | None:
            b = await orders(buyer, buy_base)
            fills = {o["order_id"]: o for o in b["last_orders"]}
            return b if buy["order_id"] in fills else None

        after = await stack.until("the call to clear", cleared, timeout=4 * CLEAR_INTERVAL_S)
        fills = {o["order_id"]: o for o in after["last_orders"]}
        assert (fills[buy["order_id"]]["state"], fills[buy["order_id"]]["filled_wh"]) == ("filled", 500)
        assert (fills[sell["order_id"]]["state"], fills[sell["order_id"]]["filled_wh"]) == ("partial", 500)
        assert fills[buy["order_id"]]["mine"] and not fills[sell["order_id"]]["mine"]
        call = after["calls"][-1]
        assert round_ is None or call["round"] == round_
        price = int(call["price_wei_per_kwh"])
        assert PRICE_SELL <= price <= PRICE_BUY and call["volume_wh"] >= 500
        assert all(o["order_id"] not in (sell["order_id"], buy["order_id"]) for o in after["orders"])

        # the trade: agreed at the call's price, then opened on the chain at that price
        async def trade() -> dict[str, Any] | None:
            async with buyer.get(buy_base + "/api/trades") as r:
                ts = [t for t in (await r.json())["trades"] if t["offer_id"] == sell["order_id"]]
            return ts[0] if ts and ts[0]["state"] in ("recorded", "delivering") else None

        t = await stack.until("the double auction's trade to be opened on the chain", trade)
        assert (t["seller"], t["buyer"], t["wh"], t["price_wei_per_kwh"]) == \
            (stack.producer.address, stack.consumer.address, 500, str(price))
        on = onchain_trade(stack, t["trade_id"])
        assert on["status"] != STATUS_NONE
        assert (on["seller"], on["buyer"], on["wh"], on["price"]) == \
            (stack.producer.address, stack.consumer.address, 500, price)
        async with buyer.post(buy_base + f"/api/trades/{t['trade_id']}/close", json={}) as r:
            assert r.status == 200, await r.text()  # the line is free again for the other tests


async def test_an_uncovered_buy_order_is_refused_in_words_and_changes_nothing(stack: Stack) -> None:
    base = stack.url("home-7")
    async with http() as third:
        await login(third, base, stack.third)
        before = await stack.settled_wallet(third, "home-7")
        # 1.5 kWh at 1 Ether/kWh: more than the third account's escrow can reserve
        async with third.post(base + "/api/orders", json={"side": "buy", "kwh": "1.5",
                                                         "limit_price_wei_per_kwh": str(10**18)}) as r:
            err = await error_of(r)
            assert r.status == 409 and err["code"] == "insufficient_escrow", err
            assert "Deposit" in err["message"] and "Nothing was sent" in err["message"], err
            assert err.get("fix", {}).get("action") == "deposit", err
        for body in ({"side": "buy", "wh": 5, "kwh": "1", "limit_price_wei_per_kwh": "1"},   # two amounts
                     {"side": "hold", "wh": 5, "limit_price_wei_per_kwh": "1"},
                     {"side": "buy", "wh": 5, "limit_price_wei_per_kwh": "0"},
                     {"side": "buy", "wh": 5, "limit_price_wei_per_kwh": 1},                   # a number
                     {"side": "buy", "wh": 5, "limit_price_wei_per_kwh": "1", "account": stack.consumer.address}):
            async with third.post(base + "/api/orders", json=body) as r:
                assert r.status == 422 and (await error_of(r))["code"] == "invalid", body
        after = await stack.wallet(third, "home-7")
        assert after["pending"] == []
        for k in ("ether_wei", "escrow_free_wei", "escrow_reserved_wei", "reserved_until", "escrow_locked_wei"):
            assert after[k] == before[k], (k, before[k], after[k])
        book = await orders(third, base)
        assert not any(o["account"] == stack.third.address for o in book["orders"] + book["last_orders"])
