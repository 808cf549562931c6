"""A site's wallet in contracts v2: it signs offers and bids (EIP-712, the market domain of
the operator's deployment) for its own site's unlocked accounts only, and reserves
escrow for bids (tops up what is missing, extends the time, answers once in a block,
refuses with the numbers when the free escrow is short). Real hub, real CURVE keys,
real sockets; the wallets in this process. Reserve runs against a stand-in of the v2
escrow now, and against the real v2 contracts once they are in the tree."""

from __future__ import annotations

import asyncio
import pathlib
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import zmq.asyncio

from services.bus import RpcClient, Security
from services.bus import commands as C
from services.bus import typed
from services.bus.errors import RequestError
from services.chain.wallet import WalletService, reserve_plan
from tests.support.signing import CHAIN_ID, DOMAIN, MARKET, deployment, later

from tests.support.bus import Grid, Sources
from tests.support.chain import PASS, chain_settings, claimed, site_keystore, start_stack
from tests.support.poll import until



async def code_of(client: RpcClient, req: Any) -> tuple[str, str]:
    with pytest.raises(RequestError) as ei:
        await client.request(req, timeout=30)
    return ei.value.code, ei.value.message


async def test_the_wallet_signs_offers_and_bids_of_its_own_unlocked_accounts_only(grid: Grid,
                                                                                 tmp_path: pathlib.Path) -> None:
    ks = site_keystore(tmp_path, "solar-1")
    mine = ks.new(PASS, name="seller", site="solar-1").address
    locked = ks.new(PASS, name="second", site="solar-1").address
    site_keystore(tmp_path, "probe").new(PASS, name="probe's own", site="probe")
    url = f"embedded:{uuid.uuid4().hex}"  # no contracts at the announced market: signing needs none
    wallets = {site: WalletService(chain_settings(grid, tmp_path / site, url, site=site, chain_role="site"))
               for site in ("solar-1", "probe")}
    ctx = zmq.asyncio.Context()
    sources = Sources(grid, tmp_path / "sources")
    clients: list[RpcClient] = []

    def client(as_site: str, wallet: str) -> RpcClient:
        w = wallets[wallet]
        c = RpcClient(ctx, Security(grid.keys, as_site), w.servers[0].endpoint, server_site=w.settings.site)
        clients.append(c)
        return c

    try:
        for w in wallets.values():
            await w.start()
        me, probe_there, probe_home = client("solar-1", "solar-1"), client("probe", "solar-1"), client("probe", "probe")
        await me.request(C.Unlock(address=mine, passphrase=PASS), timeout=30)
        offer_req = C.SignOffer(account=mine, wh=1500, min_price_wei_per_kwh=1000, expiry=later(), duration_s=3600)
        # no deployment announced yet: no market to sign for
        code, msg = await code_of(me, offer_req)
        assert code == "chain_unavailable" and "chain.deployment" in msg

        await sources.publish(deployment())
        await until(lambda: wallets["solar-1"].deployment is not None, timeout=30)

        signed: C.SignedOffer = await me.request(offer_req, cmd_id="offer-1", timeout=30)
        o = signed.offer
        assert (o.seller, o.wh, o.min_price_wei_per_kwh, o.expiry, o.duration_s) == \
            (mine, 1500, 1000, offer_req.expiry, 3600)
        assert typed.recover_offer(DOMAIN, o, signed.signature) == mine
        # the domain is the deployment's: for another chain or market it recovers someone else
        for other in (typed.market_domain(CHAIN_ID + 1, MARKET), typed.market_domain(CHAIN_ID, "0x" + "11" * 20)):
            assert typed.recover_offer(other, o, signed.signature) != mine
        # a retried command is the same signed offer; a new command a new offer id
        assert await me.request(offer_req, cmd_id="offer-1", timeout=30) == signed
        again: C.SignedOffer = await me.request(offer_req, timeout=30)
        assert again.offer.offer_id != o.offer_id and len(again.offer.offer_id) == 66

        bid_req = C.SignBid(account=mine, offer_id=o.offer_id, wh=1500, max_price_wei_per_kwh=1200, expiry=later())
        sb: C.SignedBid = await me.request(bid_req, timeout=30)
        assert (sb.bid.offer_id, sb.bid.buyer, sb.bid.wh, sb.bid.max_price_wei_per_kwh) == (o.offer_id, mine, 1500, 1200)
        assert typed.recover_bid(DOMAIN, sb.bid, sb.signature) == mine
        order: C.SignedBid = await me.request(bid_req.model_copy(update={"offer_id": typed.ZERO_ID}), timeout=30)
        assert order.bid.offer_id == typed.ZERO_ID and typed.recover_bid(DOMAIN, order.bid, order.signature) == mine

        # refused: a locked account of this site, another site asking, an account this wallet does not hold
        locked_offer = offer_req.model_copy(update={"account": locked})
        locked_bid = bid_req.model_copy(update={"account": locked})
        for req in (locked_offer, locked_bid):
            assert (await code_of(me, req))[0] == "locked"
        for req in (offer_req, bid_req, locked_offer):
            assert (await code_of(probe_there, req))[0] == "not_your_site"
            assert (await code_of(probe_home, req))[0] == "unknown_account"
        assert wallets["solar-1"].refused["probe"] == 3
        # nonsense is not signed: an expiry already past, a price beyond the contract's uint128
        code, msg = await code_of(me, offer_req.model_copy(update={"expiry": later(-10)}))
        assert code == "invalid" and "expiry" in msg
        code, msg = await code_of(me, bid_req.model_copy(update={"max_price_wei_per_kwh": 2**128}))
        assert code == "invalid" and "nothing was signed" in msg
        # locked again: nothing more is signed
        await me.request(C.Lock(address=mine), timeout=30)
        assert (await code_of(me, offer_req))[0] == "locked"
    finally:
        for c in clients:
            await c.close()
        for w in wallets.values():
            await w.stop()
        await sources.stop()
        ctx.destroy(linger=0)


def test_reserve_plan_tops_up_extends_or_refuses_with_the_numbers() -> None:
    plan = dict(total_wei=4000, until=1000, reserved_wei=4000, reserved_until=1000, free_wei=0)
    assert reserve_plan(**plan) is None  # covered: nothing to send
    assert reserve_plan(**{**plan, "total_wei": 3000, "until": 900}) is None
    assert reserve_plan(**{**plan, "until": 1600}) == 0  # only the time is extended
    assert reserve_plan(**{**plan, "total_wei": 7000, "free_wei": 3000}) == 3000  # what is missing, all of it free
    assert reserve_plan(**{**plan, "total_wei": 0, "until": 5000}) is None  # nothing to cover
    with pytest.raises(RequestError) as e:
        reserve_plan(**{**plan, "total_wei": 9000, "free_wei": 3000})
    assert e.value.code == "insufficient_escrow"
    assert "5000 wei more" in e.value.message and "3000 wei" in e.value.message and "2000 wei more" in e.value.message


ReserveAsk = Callable[..., Awaitable[Any]]


async def exercise_reserve(ask: ReserveAsk, balances: Callable[[], Awaitable[tuple[int, int, int]]],
                           settled: Callable[[], Awaitable[None]], wallet: WalletService, home: str) -> None:
    """Reserve at home-7's wallet for its unlocked account ``home`` (with Ether, no escrow):
    ``ask(req, site=...)`` sends there as a site, ``balances()`` reads (free, reserved,
    reserved until) from the chain, ``settled()`` waits until nothing is pending."""

    async def refused(req: Any, site: str = "home-7") -> tuple[str, str]:
        with pytest.raises(RequestError) as ei:
            await ask(req, site=site)
        return ei.value.code, ei.value.message

    def txs() -> int:
        return int(wallet.store.conn.execute("SELECT COUNT(*) FROM chain_txs").fetchone()[0])

    await ask(C.Escrow(account=home, action="deposit", amount_wei=10_000))
    await settled()
    assert await balances() == (10_000, 0, 0)
    until = later(600)
    # answered once in a block: the chain shows it at once
    sent = await ask(C.Reserve(account=home, total_wei=4000, until=until))
    assert sent.tx_hash.startswith("0x")
    assert await balances() == (6000, 4000, until)
    # covered already: nothing is sent
    assert (await ask(C.Reserve(account=home, total_wei=3000, until=until - 10))).tx_hash == ""
    # more, for longer: what is missing is reserved and the time extended
    assert (await ask(C.Reserve(account=home, total_wei=7000, until=until + 600))).tx_hash
    assert await balances() == (3000, 7000, until + 600)
    # two at once for one account: the second waits for the first and sends nothing more
    a, b = await asyncio.gather(*(ask(C.Reserve(account=home, total_wei=8000, until=until + 600)) for _ in range(2)))
    assert sorted(bool(x.tx_hash) for x in (a, b)) == [False, True]
    assert await balances() == (2000, 8000, until + 600)

    # short: 4000 more cannot come from 2000 of free escrow; nothing is sent
    before = txs()
    code, msg = await refused(C.Reserve(account=home, total_wei=12_000, until=until))
    assert code == "insufficient_escrow" and "4000 wei more" in msg and "2000 wei" in msg
    # withdraw: the free escrow only, while the reservation runs
    code, msg = await refused(C.Escrow(account=home, action="withdraw", amount_wei=2001))
    assert code == "insufficient_escrow" and "reserved for bids until" in msg and "2000 wei" in msg
    assert txs() == before
    await ask(C.Escrow(account=home, action="withdraw", amount_wei=2000))
    await settled()
    assert await balances() == (0, 8000, until + 600)
    # another site cannot reserve (or sign) for home-7's account; a locked account reserves nothing
    for req in (C.Reserve(account=home, total_wei=1, until=until),
                C.SignBid(account=home, offer_id=typed.ZERO_ID, wh=1, max_price_wei_per_kwh=1, expiry=until)):
        assert (await refused(req, site="probe"))[0] == "not_your_site"
    await ask(C.Lock(address=home))
    assert (await refused(C.Reserve(account=home, total_wei=9000, until=until)))[0] == "locked"
    assert txs() == before + 1  # the withdrawal


async def test_reserve_tops_up_extends_and_refuses_when_free_escrow_is_short(grid: Grid, tmp_path: pathlib.Path,
                                                                              peer_factory: Any) -> None:
    """On the real v2 contracts, deployed by the operator (which also answers the balance
    reads and funds the account on the dev chain)."""
    home = site_keystore(tmp_path, "home-7").new(PASS, name="home-7 consumer", site="home-7").address
    stack = await start_stack(grid, tmp_path, "embedded", sites=("home-7",))
    try:
        peer = await peer_factory(stack)

        async def ask(req: Any, site: str = "home-7") -> Any:
            return await peer.request(req, site=site, to="home-7")

        async def balances() -> tuple[int, int, int]:
            b = await peer.request(C.GetBalances(address=home), site="home-7")
            return b.escrow_free_wei, b.escrow_reserved_wei, b.reserved_until

        async def settled() -> None:
            await until(lambda: not stack.pending(), timeout=60)

        await ask(C.Unlock(address=home, passphrase=PASS))
        await claimed(stack, home)
        await until(lambda: not stack.pending() and stack.operator.store.conn.execute(
            "SELECT COUNT(*) FROM chain_funded").fetchone()[0] == 1, timeout=60)
        await exercise_reserve(ask, balances, settled, stack.wallet("home-7"), home)
    finally:
        await stack.stop()
