"""A trade's whole on-chain path driven only by signed bus events, on the embedded chain and on anvil.

Setup steps a user takes through the wallet (unlock, escrow deposit, token approval) go over
request/reply; meter registration, mint, open, settle, close and finalize are driven by
events published with a real Publisher through a real hub, signed as the sites' meters and
accounts sign them (tests.signed). Balances are then read straight from the chain.
"""

from __future__ import annotations

import asyncio

import pathlib
from typing import Any

import pytest
from eth_account import Account
from web3 import AsyncHTTPProvider, AsyncWeb3

from services.bus import commands as C
from services.bus import events as E
from services.bus.prices import wei_for
from services.chain import bindings
from tests.support.signing import Domains, Meter, agreed

from tests.support.bus import Grid
from tests.support.chain import PASS, TX, rounds, site_keystore, start_stack
from tests.support.poll import until

PRICE = 10**16  # wei per kWh
DEPOSIT = 10**18


async def settled(peer: Any, hashes: list[str]) -> None:
    await peer.probe.wait_for(lambda: all(
        any(isinstance(e, TX) and e.tx_hash == h and e.status == "confirmed" for e in peer.probe.bodies())
        for h in hashes))


def keys(tmp_path: pathlib.Path, site: str, name: str = "") -> tuple[str, bytes]:
    ks = site_keystore(tmp_path, site)
    address = ks.new(PASS, name=name or site, site=site).address
    return address, ks.decrypt(address, PASS)


async def ready_to_trade(peer: Any, svc: Any, seller: str, buyer: str, wh: int) -> tuple[Any, Any, Any]:
    """Both accounts unlocked at their sites, both meters announced, ``wh`` minted to the
    seller from its meter's signed counter, the buyer's deposit and the seller's approval
    mined: (the domains, the seller's meter, the buyer's meter)."""
    for a, site in ((seller, "solar-1"), (buyer, "home-7")):
        await peer.request(C.Unlock(address=a, passphrase=PASS), site=site)
    dm = Domains.of(svc)
    solar, home = Meter("solar-1", seller), Meter("home-7", buyer, name="m2")
    for m in (solar, home):
        await peer.publish(m.announce(dm))
    await peer.publish(solar.production(dm, wh))
    await peer.probe.wait_for(lambda: sum(x.wh for x in peer.probe.of(E.Minted)) >= wh)
    dep = await peer.request(C.Escrow(account=buyer, action="deposit", amount_wei=DEPOSIT), site="home-7")
    appr = await peer.request(C.Approve(account=seller, wh=wh), site="solar-1")
    await settled(peer, [dep.tx_hash, appr.tx_hash])
    return dm, solar, home


@pytest.mark.parametrize("backend", ["embedded", pytest.param("anvil", marks=pytest.mark.anvil)])
async def test_trade_driven_by_bus_events(backend: str, request: pytest.FixtureRequest, grid: Grid,
                                          tmp_path: pathlib.Path, peer_factory: Any) -> None:
    url = "embedded" if backend == "embedded" else request.getfixturevalue("anvil_url")
    seller, seller_key = keys(tmp_path, "solar-1", "solar")
    buyer, buyer_key = keys(tmp_path, "home-7", "home")
    # an early close waits for the buyer meter's final reading, not for a grace period
    stack = await start_stack(grid, tmp_path, url, sites=("solar-1", "home-7"), close_grace_s=600,
                              dispute_window_s=3)
    svc = stack.operator
    reader: AsyncWeb3 | None = None
    try:
        peer = await peer_factory(stack)
        for a, site in ((seller, "solar-1"), (buyer, "home-7")):  # each site unlocks its own account
            await peer.request(C.Unlock(address=a, passphrase=PASS), site=site)
        d = Domains.of(svc)
        solar, home = Meter("solar-1", seller), Meter("home-7", buyer, name="m2")
        for m in (solar, home):
            await peer.publish(m.announce(d))

        # cumulative production 1000, then 2000, then 1000 again (old): 2000 tokens in all
        produced = [await peer.publish(solar.production(d, wh)) for wh in (1000, 2000, 1000)]
        await peer.probe.wait_for(lambda: sum(m.wh for m in peer.probe.of(E.Minted)) >= 2000)

        dep = await peer.request(C.Escrow(account=buyer, action="deposit", amount_wei=DEPOSIT), site="home-7",
                                 cmd_id="cmd-deposit")
        appr = await peer.request(C.Approve(account=seller, wh=1500), site="solar-1")
        await settled(peer, [dep.tx_hash, appr.tx_hash])

        trade = dict(trade_id="t-1", seller=seller, buyer=buyer, seller_site="solar-1", buyer_site="home-7",
                     wh=1500, price_wei_per_kwh=PRICE)
        agreement = agreed(d, "t-1", seller_key, buyer_key, 1500, PRICE, seller_site="solar-1", buyer_site="home-7")
        agreed_env = await peer.publish(agreement)
        await peer.probe.wait_for(lambda: peer.probe.of(E.TradeRecorded))

        # the buyer's meter pays; the seller's meter (even signing a consumer reading) and an
        # unsigned reading do not
        await peer.publish(E.Delivery(trade_id="t-1", site="solar-1", meter="m1", role="producer", delivered_wh=1400))
        await peer.publish(Meter("solar-1", seller, key=solar.key).delivery(d, "t-1", 1400))
        await peer.publish(E.Delivery(trade_id="t-1", site="home-7", meter="m2", role="consumer", delivered_wh=1450))
        deliveries = [await peer.publish(home.delivery(d, "t-1", wh)) for wh in (400, 1000)]
        await peer.probe.wait_for(lambda: any(s.delivered_wh == 1000 for s in peer.probe.of(E.Settled)))

        status_closed = await peer.publish(E.TradeStatus(state="closed", delivered_wh=1200, **trade))
        await asyncio.sleep(1.0)  # the buyer's relay opens a moment after the close ...
        assert not [u for u in peer.probe.of(E.ChainTx) if u.kind == "close"]
        deliveries.append(await peer.publish(home.delivery(d, "t-1", 1230, final=True)))  # ... its last reading
        await peer.probe.wait_for(lambda: [u for u in peer.probe.of(E.ChainTx)
                                              if u.kind == "close" and u.status == "confirmed"])
        # in the dispute window a higher signed delivery still settles
        deliveries.append(await peer.publish(home.delivery(d, "t-1", 1260, final=True)))
        closed = await peer.probe.wait_for(lambda: peer.probe.of(E.TradeClosed), timeout=60)

        if backend == "embedded":
            w3 = svc.node.w3  # the embedded chain lives inside the service's process
        else:
            reader = w3 = AsyncWeb3(AsyncHTTPProvider(url))
        dd = bindings.attach(w3, svc.dep.token_address, svc.dep.market_address, svc.dep.registry_address)
        m, t = dd.market.functions, dd.token.functions
        delivered = 1260
        paid = wei_for(delivered, PRICE)
        assert await t.totalSupply().call() == 2000
        assert await t.balanceOf(seller).call() == 2000 - delivered
        assert await t.balanceOf(buyer).call() == delivered
        assert await t.balanceOf(dd.market_address).call() == 0
        assert await m.freeEscrow(buyer).call() == DEPOSIT - paid
        assert await m.lockedEscrow(buyer).call() == 0
        assert await m.credit(seller).call() == paid
        status = await m.trades(bindings.id32("t-1")).call()
        assert (status[2], status[4]) == (bindings.STATUS_CLOSED, delivered)

        ev = peer.probe
        assert sum(x.wh for x in ev.of(E.Minted)) == 2000 and max(x.produced_wh for x in ev.of(E.Minted)) == 2000
        assert len(ev.of(E.TradeRecorded)) == 1
        assert [(c.delivered_wh, c.paid_wei, c.refunded_wei) for c in closed] == [
            (delivered, paid, wei_for(1500, PRICE) - paid)]
        assert [s.delivered_wh for s in ev.of(E.Settled)][-1] == delivered
        assert all(s.paid_wei == wei_for(s.delivered_wh, PRICE) for s in ev.of(E.Settled))

        bal = await peer.request(C.GetBalances(address=seller), site="solar-1")
        assert (bal.tokens_wh, bal.generated_wh, bal.credit_wei) == (2000 - delivered, 2000, paid)
        # every transaction sent went pending -> confirmed, once each
        ups = ev.of(TX)
        sent = {u.tx_hash for u in ups if u.status == "pending"}
        assert sent and all(sum(1 for u in ups if u.tx_hash == h and u.status == "confirmed") == 1 for h in sent), \
            [(u.kind, u.ref, u.status) for u in ups]

        # each chain event names the bus event (or command) whose job it finished
        assert {e.cause for e in ev.events if isinstance(e.body, E.Minted)} <= {p.id for p in produced[:2]}
        assert [e.cause for e in ev.events if isinstance(e.body, E.TradeRecorded)] == [agreed_env.id]
        assert all(e.cause in {x.id for x in deliveries} | {status_closed.id}
                   for e in ev.events if isinstance(e.body, E.Settled))
        assert [e.cause for e in ev.events if isinstance(e.body, E.TradeClosed)] == [status_closed.id]
        assert {e.cause for e in ev.events if isinstance(e.body, E.WalletTx) and e.body.tx_hash == dep.tx_hash} \
            == {"cmd-deposit"}  # the deposit's pending and confirmed updates: its command
    finally:
        if reader is not None:
            await bindings.close_provider(reader)
        await stack.stop()


@pytest.mark.parametrize("backend", ["embedded", pytest.param("anvil", marks=pytest.mark.anvil)])
async def test_batched_settlement_and_full_delivery_closes(backend: str, request: pytest.FixtureRequest, grid: Grid,
                                                           tmp_path: pathlib.Path, peer_factory: Any) -> None:
    url = "embedded" if backend == "embedded" else request.getfixturevalue("anvil_url")
    seller, seller_key = keys(tmp_path, "solar-1")
    buyer, buyer_key = keys(tmp_path, "home-7")
    stack = await start_stack(grid, tmp_path, url, sites=("solar-1", "home-7"), settle_window_s=0.5)
    svc = stack.operator
    try:
        peer = await peer_factory(stack)
        dm, solar, home = await ready_to_trade(peer, svc, seller, buyer, 3000)
        ids = [f"b-{i}" for i in range(3)]
        for tid in ids:
            await peer.publish(agreed(dm, tid, seller_key, buyer_key, 1000, PRICE, seller_site="solar-1",
                                      buyer_site="home-7"))
        await peer.probe.wait_for(lambda: len(peer.probe.of(E.TradeRecorded)) >= 3)
        for tid in ids:  # full delivery on each: settled together, closed by the contract
            await peer.publish(home.delivery(dm, tid, 1000))
        await peer.probe.wait_for(lambda: len(peer.probe.of(E.TradeClosed)) >= 3)
        settles = [u for u in peer.probe.of(E.ChainTx) if u.kind == "settle" and u.status == "confirmed"]
        assert len(settles) < 3, "deliveries due together are settled in a batch"
        for tid in ids:  # fulfilled afterwards: nothing left to close, nothing published twice
            await peer.publish(E.TradeStatus(trade_id=tid, state="fulfilled", seller=seller, buyer=buyer,
                                                 seller_site="solar-1", buyer_site="home-7", wh=1000,
                                                 price_wei_per_kwh=PRICE, delivered_wh=1000))
        d = svc.dep
        assert await d.market.functions.credit(seller).call() == 3 * wei_for(1000, PRICE)
        assert await d.token.functions.balanceOf(buyer).call() == 3000
        await peer.probe.wait_for(lambda: True)
        await until(lambda: svc.store.conn.execute(
            "SELECT MAX(seq) FROM bus_offsets_now WHERE topic LIKE 'trade.status%'").fetchone()[0] == 3, timeout=60)
        await rounds(svc)
        assert len(peer.probe.of(E.TradeClosed)) == 3
        assert not [u for u in peer.probe.of(E.ChainTx) if u.kind == "close"]
    finally:
        await stack.stop()


@pytest.mark.parametrize("backend", ["embedded", pytest.param("anvil", marks=pytest.mark.anvil)])
async def test_opens_batched_a_bad_agreement_alone_and_held_readings(backend: str, request: pytest.FixtureRequest,
                                                                     grid: Grid, tmp_path: pathlib.Path,
                                                                     peer_factory: Any) -> None:
    """Agreements that arrive together are opened in one openBatch; one the contract refuses
    (a bid signature that is not the buyer's) does not keep the others from opening: they are
    opened one by one and it is refused alone, with its reason. A reading below the
    settlement step is held back, and is settled at once when the buyer closes the trade
    on-chain behind the auction's back (the dispute window must not pass it by)."""
    url = "embedded" if backend == "embedded" else request.getfixturevalue("anvil_url")
    seller, seller_key = keys(tmp_path, "solar-1")
    buyer, buyer_key = keys(tmp_path, "home-7")
    stack = await start_stack(grid, tmp_path, url, sites=("solar-1", "home-7"), open_window_s=1.0,
                              dispute_window_s=3600)
    svc = stack.operator
    try:
        peer = await peer_factory(stack)
        dm, solar, home = await ready_to_trade(peer, svc, seller, buyer, 6000)
        ev = peer.probe

        def agree(tid: str) -> E.TradeAgreed:
            return agreed(dm, tid, seller_key, buyer_key, 1000, PRICE, seller_site="solar-1", buyer_site="home-7")

        # three honest agreements together: one openBatch
        for tid in ("g-0", "g-1", "g-2"):
            await peer.publish(agree(tid))
        await ev.wait_for(lambda: len(ev.of(E.TradeRecorded)) >= 3)
        opens = [u for u in ev.of(E.ChainTx) if u.kind in ("open", "open_batch") and u.status == "confirmed"]
        assert [(u.kind, u.ref) for u in opens] == [("open_batch", "g-0,g-1,g-2")]

        # two honest and one whose bid signature is the offer's: the batch is refused, the honest two open alone
        bad = agree("x-1")
        bad = bad.model_copy(update={"bid_signature": bad.offer_signature})
        for body in (agree("h-0"), bad, agree("h-1")):
            await peer.publish(body)
        await ev.wait_for(lambda: {r.trade_id for r in ev.of(E.TradeRecorded)} >= {"h-0", "h-1"})
        failed = await ev.wait_for(lambda: [u for u in ev.of(E.ChainTx) if u.ref == "x-1" and u.status == "failed"])
        assert failed[0].kind == "open" and "bid not signed by buyer" in failed[0].reason
        assert "x-1" not in {r.trade_id for r in ev.of(E.TradeRecorded)}
        d = svc.dep
        for tid, status in (("h-0", bindings.STATUS_OPEN), ("h-1", bindings.STATUS_OPEN),
                            ("x-1", bindings.STATUS_NONE)):
            assert (await d.market.functions.trades(bindings.id32(tid)).call())[2] == status

        # a reading below the step (settle_every_wh 1000) is held; a full one is settled
        await peer.publish(home.delivery(dm, "g-0", 300))
        await peer.publish(home.delivery(dm, "g-1", 1000))
        await ev.wait_for(lambda: [s for s in ev.of(E.Settled) if s.trade_id == "g-1"])
        await rounds(svc)
        assert not [s for s in ev.of(E.Settled) if s.trade_id == "g-0"]
        assert (await d.market.functions.trades(bindings.id32("g-0")).call())[4] == 0
        assert svc.settlements.held_back == 1

        # the buyer closes g-0 on-chain itself: its held reading is settled in the dispute window
        w3 = svc.node.w3
        close = d.market.functions.close(bindings.id32("g-0"))
        tx = await close.build_transaction({"from": buyer, "nonce": await w3.eth.get_transaction_count(buyer)})
        raw = Account.sign_transaction(tx, buyer_key).raw_transaction
        receipt = await w3.eth.wait_for_transaction_receipt(await w3.eth.send_raw_transaction(raw))
        assert receipt["status"] == 1
        paid = await ev.wait_for(lambda: [s for s in ev.of(E.Settled) if s.trade_id == "g-0"])
        assert [(s.delivered_wh, s.paid_wei) for s in paid] == [(300, wei_for(300, PRICE))]
        t = await d.market.functions.trades(bindings.id32("g-0")).call()
        assert (t[2], t[4]) == (bindings.STATUS_CLOSING, 300)
    finally:
        await stack.stop()
