"""SIGKILL the auction service (a real subprocess) at random moments during a stream of
bids: no accepted bid is lost, no trade is agreed twice, deadlines that passed while it
was down are settled once when it comes back."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field

import zmq.asyncio

from services.bus import RequestError, RequestTimeout, RpcClient
from services.bus import commands as cmd
from tests.support.paths import ROOT
from tests.support.ports import free_port
from tests.support.signing import later

from tests.support.auction import BUYERS, FakeChain, key_of, offer
from tests.support.bus import Grid

KILLS = 3


@dataclass
class Stream:
    accepted: list[tuple[str, str, str, str, int]] = field(default_factory=list)  # cmd_id, bid_id, offer, buyer, price
    unknown: list[tuple[cmd.Request, str]] = field(default_factory=list)  # no reply: maybe applied, maybe not
    refused: dict[str, int] = field(default_factory=dict)
    offers: dict[str, float] = field(default_factory=dict)  # offer_id -> ends_at
    best: dict[str, int] = field(default_factory=dict)  # offer_id -> highest accepted price
    signed: dict[str, tuple[str, int]] = field(default_factory=dict)  # offer_id -> (signed offer id, Wh)


class Market:
    def __init__(self, grid: Grid, chain: FakeChain, port: int) -> None:
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.data_dir = grid.root / "market"
        self.log = open(grid.root / "auction.log", "ab")  # noqa: SIM115 - closed in close()
        self.env = {**os.environ, "GRIDTRADE_SITE": "market", "GRIDTRADE_DATA_DIR": str(self.data_dir),
                    "GRIDTRADE_KEYS_DIR": str(grid.keys), "GRIDTRADE_HUB_PUB": grid.hub_pub,
                    "GRIDTRADE_HUB_SUB": grid.hub_sub, "GRIDTRADE_HEARTBEAT_S": "0.2",
                    "GRIDTRADE_CHAIN_RPC": chain.endpoint, "GRIDTRADE_AUCTION_RPC": self.endpoint,
                    "GRIDTRADE_AUCTION_MIN_INCREMENT_WEI_PER_KWH": "1", "GRIDTRADE_LOG_LEVEL": "WARNING"}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "services.auction"], cwd=ROOT, env=self.env,
                                     stdout=subprocess.DEVNULL, stderr=self.log)

    async def wait_exit(self) -> None:
        assert self.proc is not None
        while self.proc.poll() is None:
            await asyncio.sleep(0.02)

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.wait_exit()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.wait_exit(), 20)
            except asyncio.TimeoutError:
                await self.kill()
        self.log.close()


async def ready(client: RpcClient) -> None:
    for _ in range(300):
        try:
            await client.request(cmd.Ping(), timeout=0.5)
            return
        except RequestTimeout:
            await asyncio.sleep(0.05)
    raise AssertionError("the auction service did not come up")


async def bidder(client: RpcClient, buyer: str, s: Stream, rnd: random.Random, stop: asyncio.Event) -> None:
    while not stop.is_set():
        live = [o for o, ends in s.offers.items() if ends > _wall() + 0.1]
        if not live:
            await asyncio.sleep(0.02)
            continue
        offer_id = rnd.choice(live)
        price = s.best.get(offer_id, 999) + rnd.randint(1, 5)
        signed_id, wh = s.signed[offer_id]
        b, sig = key_of(buyer).bid(offer_id=signed_id, wh=wh, price=price, expiry=later(600))
        req = cmd.PlaceBid(offer_id=offer_id, buyer=buyer, buyer_site="home-7", price_wei_per_kwh=price, bid=b,
                           signature=sig)
        cmd_id = uuid.uuid4().hex
        try:
            rep = await client.request(req, timeout=1.0, cmd_id=cmd_id)
        except RequestTimeout:
            s.unknown.append((req, cmd_id))
        except RequestError as e:
            s.refused[e.code] = s.refused.get(e.code, 0) + 1
        else:
            s.accepted.append((cmd_id, rep.bid_id, offer_id, buyer, price))
            s.best[offer_id] = max(s.best.get(offer_id, 0), price)
        await asyncio.sleep(rnd.uniform(0, 0.01))


def _wall() -> float:
    return time.time()


async def seller(client: RpcClient, s: Stream, stop: asyncio.Event) -> None:
    while not stop.is_set():
        if sum(1 for e in s.offers.values() if e > _wall() + 0.3) < 2:
            req = offer(wh=1000, price=1000, duration=1.2)
            cmd_id = uuid.uuid4().hex
            try:
                rep = await client.request(req, timeout=1.0, cmd_id=cmd_id)
            except RequestTimeout:
                s.unknown.append((req, cmd_id))
            except RequestError as e:  # e.g. 'unavailable' until the auction has heard the deployment
                s.refused[e.code] = s.refused.get(e.code, 0) + 1
            else:
                s.signed[rep.offer_id] = (req.offer.offer_id, req.wh)
                s.offers[rep.offer_id] = rep.ends_at
        await asyncio.sleep(0.05)


async def test_sigkill_during_a_stream_of_bids_loses_nothing_and_doubles_nothing(grid: Grid, fake_chain: FakeChain) -> None:
    rnd = random.Random(int.from_bytes(os.urandom(4), "big"))
    market = Market(grid, fake_chain, free_port())
    ctx = zmq.asyncio.Context()
    # the seller's site offers, the buyers' site bids: each with its own key
    clients = [RpcClient(ctx, grid.security("solar-1"), market.endpoint, server_site="market")]
    clients += [RpcClient(ctx, grid.security("home-7"), market.endpoint, server_site="market") for _ in BUYERS]
    s = Stream()
    try:
        market.start()
        await ready(clients[0])
        for _ in range(KILLS):
            stop = asyncio.Event()
            tasks = [asyncio.create_task(seller(clients[0], s, stop))]
            tasks += [asyncio.create_task(bidder(c, b, s, rnd, stop)) for c, b in zip(clients[1:], BUYERS)]
            await asyncio.sleep(rnd.uniform(0.8, 2.5))
            await market.kill()  # mid-stream: requests are in flight
            stop.set()
            await asyncio.gather(*tasks)
            await asyncio.sleep(rnd.uniform(0, 1.0))  # some deadlines pass while it is down
            market.start()
            await ready(clients[0])
        # retry every request that got no answer, with its own command id: each runs at most once
        for req, cmd_id in s.unknown:
            try:
                # a retry comes from the same site (command ids are remembered per site)
                by = clients[0] if isinstance(req, cmd.PlaceOffer) else clients[1]
                rep = await by.request(req, timeout=5.0, cmd_id=cmd_id)
            except RequestError:
                continue
            if isinstance(rep, cmd.BidAccepted):
                assert isinstance(req, cmd.PlaceBid)
                s.accepted.append((cmd_id, rep.bid_id, req.offer_id, req.buyer, req.price_wei_per_kwh))
            elif isinstance(rep, cmd.OfferPlaced):
                assert isinstance(req, cmd.PlaceOffer)
                s.signed[rep.offer_id] = (req.offer.offer_id, req.wh)
                s.offers[rep.offer_id] = rep.ends_at

        async def all_closed() -> bool:
            return not (await clients[0].request(cmd.ListOffers())).offers

        for _ in range(400):
            if await all_closed():
                break
            await asyncio.sleep(0.05)
        assert await all_closed(), "offers past their deadline were not settled"
    finally:
        for c in clients:
            await c.close()
        await market.stop()
        ctx.destroy(linger=0)

    print(f"accepted {len(s.accepted)}, no answer {len(s.unknown)}, refused {s.refused}, offers {len(s.offers)}")
    assert len(s.accepted) > 10, f"the stream was too thin to show anything: {s}"
    db = sqlite3.connect(market.data_dir / "auction.sqlite")
    try:
        bids = {r[0]: r[1:] for r in db.execute("SELECT bid_id, offer_id, buyer, price FROM bids")}
        # no accepted bid is lost
        for _cmd, bid_id, offer_id, buyer, price in s.accepted:
            assert bids.get(bid_id) == (offer_id, buyer, str(price)), f"accepted bid {bid_id} lost"
        # every bid in the store was announced exactly once, and nothing else was
        outbox = [json.loads(r[0]) for r in db.execute("SELECT data FROM bus_outbox ORDER BY topic, seq")]
        placed = [e["body"]["bid_id"] for e in outbox if e["type"] == "market.bid_placed"]
        assert sorted(placed) == sorted(bids) and len(set(placed)) == len(placed)
        # every bid came from exactly one command id (a retried command did not run twice)
        replies = [json.loads(r[0]) for r in db.execute("SELECT reply FROM bus_commands WHERE type = 'auction.bid'")]
        assert sorted(r["result"]["bid_id"] for r in replies) == sorted(bids)
        # no trade agreed twice; the store and the outbox agree
        agreed = [e["body"] for e in outbox if e["type"] == "trade.agreed"]
        agreed_ids = [a["trade_id"] for a in agreed]
        assert len(set(agreed_ids)) == len(agreed_ids)
        trades = {r[0]: r[1:] for r in db.execute("SELECT trade_id, offer_id, buyer, price FROM trades")}
        assert sorted(trades) == sorted(agreed_ids)
        offers = dict(db.execute("SELECT offer_id, state FROM offers"))
        closed = [e["body"]["offer_id"] for e in outbox if e["type"] == "market.offer_closed"]
        assert sorted(closed) == sorted(offers) and set(offers.values()) <= {"sold", "expired"}
        # each sold offer went to its highest bid (earliest on a tie), at least the best accepted one
        for offer_id, state in offers.items():
            rows = db.execute("SELECT buyer, price, seq FROM bids WHERE offer_id = ?", (offer_id,)).fetchall()
            if not rows:
                assert state == "expired" and f"t-{offer_id}" not in trades
                continue
            win = min(rows, key=lambda r: (-int(r[1]), r[2]))
            assert state == "sold" and trades[f"t-{offer_id}"] == (offer_id, win[0], win[1])
            assert int(win[1]) >= s.best.get(offer_id, 0)
        assert set(trades) == {f"t-{o}" for o, st in offers.items() if st == "sold"}
    finally:
        db.close()
