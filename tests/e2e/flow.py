"""The seed's demo as a user does it, through the two wallets' REST APIs, shared by the
end-to-end tests: production mints tokens, the producer sells, the consumer funds escrow
and bids, the auction closes, the trade is recorded on-chain, relays close, payments
arrive, the consumer closes the connection, relays open; then every balance is checked
straight on the chain against amounts computed here from the delivered Wh and the price."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from services.bus import events as E

from .harness import ApiError, Grid, User, cost, id32

SELL_WH = 2000
START_PRICE = 500_000_000_000_003  # wei per kWh
PRICE = 1_000_000_000_000_007  # the bid: odd, so floor(wh * price / 1000) really rounds
DEPOSIT = 10**18
AUCTION_S = 6
CLOSE_AT_WH = 1000  # the consumer presses Close Connection after this much is settled

STATUS_OPEN, STATUS_CLOSED = 1, 3


@dataclass
class Outcome:
    trade_id: str
    offer_id: str
    steps: list[tuple[int, int]] = field(default_factory=list)  # (delivered Wh, seller credit) at one block


async def retrying(grid: Grid, what: str, call: Callable[[], Awaitable[Any]], user: User | None = None,
                   timeout: float = 90) -> Any:
    """A user's action, retried while a service is (re)starting: 503s, refused connections,
    and a lost session (the gateway restarted) is logged in again."""

    async def attempt() -> Any:
        try:
            return await call() or True
        except ApiError as e:
            if e.status == 401 and user is not None:
                await grid.login(user)
            if e.status in (401, 502, 503):
                raise AssertionError(f"{what}: {e}") from None
            raise

    return await grid.until(what, attempt, timeout=timeout, every=0.5)


async def wallet(grid: Grid, user: User) -> dict[str, Any]:
    return await retrying(grid, f"the wallet of {user.address}", user.wallet, user)


async def run_trade(grid: Grid, *, between: Callable[[str], Awaitable[None]] | None = None,
                    close_at_wh: int = CLOSE_AT_WH) -> Outcome:
    """The whole trade. ``between(stage)`` runs at each stage (the kill test restarts
    services there): 'produced', 'funded', 'offered', 'bid', 'recorded', 'delivering'."""
    prod, cons = grid.producer, grid.consumer

    async def stage(name: str) -> None:
        if between is not None:
            await between(name)

    # 1. production mints tokens to the producer
    async def enough_tokens() -> bool:
        w = await prod.wallet()
        assert w["tokens_wh"] >= SELL_WH, f"producer has {w['tokens_wh']} Wh of tokens"
        assert w["generated_wh"] >= SELL_WH
        return True

    await retrying(grid, f"the producer to hold {SELL_WH} Wh of tokens", enough_tokens, prod, timeout=120)
    await stage("produced")

    # 2. the consumer funds escrow
    tx = await retrying(grid, "escrow deposit",
                        lambda: cons.call("POST", "/api/escrow/deposit", {"amount_wei": str(DEPOSIT)},
                                          key="e2e-deposit"), cons)
    assert tx["tx_hash"].startswith("0x"), tx

    async def funded() -> bool:
        w = await cons.wallet()
        assert int(w["escrow_free_wei"]) == DEPOSIT, f"free escrow {w['escrow_free_wei']}"
        return True

    await retrying(grid, "the deposit to show as free escrow", funded, cons)
    await stage("funded")

    # a wallet that restarted has locked the consumer's key: its page says "log in once", and
    # the consumer does so before the auction starts (a login is slow on a loaded machine and
    # the auction lasts AUCTION_S; a bid while locked answering 401 is tested in tests/gateway)
    async def unlocked() -> bool:
        w = await cons.wallet()
        if w["unlocked"] is False:
            await grid.login(cons)
            w = await cons.wallet()
        assert w["unlocked"] is True, f"the consumer's key: unlocked={w['unlocked']}"
        return True

    await retrying(grid, "the consumer's key to be unlocked", unlocked, cons)

    # 3. the producer sells
    offer = await retrying(grid, "placing the offer", lambda: prod.call(
        "POST", "/api/offers", {"wh": SELL_WH, "start_price_wei_per_kwh": str(START_PRICE), "duration_s": AUCTION_S},
        key="e2e-offer"), prod)
    offer_id = offer["offer_id"]
    assert offer["wh"] == SELL_WH

    async def listed() -> bool:
        offers = (await cons.call("GET", "/api/offers"))["offers"]
        mine = [o for o in offers if o["offer_id"] == offer_id]
        assert mine and mine[0]["seller"].lower() == prod.address.lower(), offers
        return True

    await retrying(grid, "the offer to be listed at the consumer's gateway", listed, cons)
    await stage("offered")

    # 4. the consumer bids (once: the bid is idempotent by its Idempotency-Key header)
    bid = await retrying(grid, "placing the bid", lambda: _bid(cons, offer_id), cons)
    assert bid["bid_id"]
    await stage("bid")

    # 5. the auction closes at the timeout; the trade is recorded on-chain
    async def trade_row() -> dict[str, Any]:
        trades = (await cons.call("GET", "/api/trades"))["trades"]
        rows = [t for t in trades if t["offer_id"] == offer_id]
        assert rows, f"no trade for offer {offer_id} yet: {trades}"
        assert rows[0]["state"] in ("recorded", "delivering", "closed", "fulfilled", "settled"), rows[0]
        return rows[0]

    row = await retrying(grid, "the auction to close and the trade to be recorded", trade_row, cons, timeout=120)
    trade_id = row["trade_id"]
    assert row["buyer"].lower() == cons.address.lower() and row["seller"].lower() == prod.address.lower(), row
    assert row["wh"] == SELL_WH and int(row["price_wei_per_kwh"]) == PRICE, row
    on = grid.trade(trade_id)
    assert on["status"] in (STATUS_OPEN, STATUS_CLOSED) and on["wh"] == SELL_WH and on["price"] == PRICE, on
    assert on["seller"] == grid.w3.to_checksum_address(prod.address), on
    opened = [e for e in grid.market_events("TradeOpened") if e["tradeId"] == id32(trade_id)]
    assert len(opened) == 1 and opened[0]["lockedWei"] == cost(SELL_WH, PRICE), opened
    await stage("recorded")

    # 6. relays close at both sites
    await grid.until("both relays to close for the trade", lambda: all(
        grid.watch.of(E.MeterRelay, site=s, closed=True, trade_id=trade_id) for s in ("solar-1", "home-7")),
        timeout=60)

    # 7. payments arrive per step: the seller's credit grows with the settled Wh
    out = Outcome(trade_id, offer_id)

    def step() -> bool:
        block = grid.w3.eth.block_number
        seller, _, status, _, delivered, *_ = grid.market.functions.trades(id32(trade_id)).call(
            block_identifier=block)
        credit = grid.market.functions.credit(seller).call(block_identifier=block)
        if not out.steps or out.steps[-1] != (delivered, credit):
            out.steps.append((delivered, credit))
        assert status == STATUS_OPEN, f"the trade ended at {delivered} Wh before the consumer could close it"
        return delivered >= close_at_wh

    middle = False

    async def delivering() -> bool:
        nonlocal middle
        done = step()
        if not middle and out.steps[-1][0] > 0:
            middle = True
            await stage("delivering")
        return done

    await grid.until(f"{close_at_wh} Wh to be delivered and settled", delivering, timeout=150, every=0.2)
    paid = [s.delivered_wh for s in grid.watch.of(E.Settled, trade_id=trade_id)]
    assert len(paid) >= 2 and paid == sorted(paid), f"payments should arrive in growing steps, saw {paid}"
    for delivered, credit in out.steps:
        assert credit == cost(delivered, PRICE), f"credit {credit} for {delivered} Wh at {PRICE}"
    assert [s[0] for s in out.steps] == sorted(s[0] for s in out.steps)

    # 8. the consumer presses Close Connection
    await retrying(grid, "closing the trade", lambda: _close(cons, trade_id), cons)

    async def settled() -> dict[str, Any]:
        r = await trade_row()
        assert r["state"] == "settled", r
        return r

    final_row = await retrying(grid, "the trade to be settled", settled, cons, timeout=120)
    assert grid.trade(trade_id)["status"] == STATUS_CLOSED

    # 9. relays open at both sites
    def relays_open() -> bool:
        for s in ("solar-1", "home-7"):
            last = [e for e in grid.watch.of(E.MeterRelay, site=s)]
            assert last and last[-1].closed is False, f"{s}: last relay event {last[-1:]}"
            h = grid.health(f"meter-{s}")
            assert h is not None and h["meters"]["main"]["relay_closed"] is False, h
        return True

    await grid.until("both relays to open", relays_open, timeout=60)
    assert final_row["delivered_wh"] == grid.trade(trade_id)["delivered"], final_row
    return out


async def _bid(user: User, offer_id: str) -> Any:
    assert user.http is not None
    async with user.http.post(f"{user.base}/api/offers/{offer_id}/bids", json={"price_wei_per_kwh": str(PRICE)},
                              headers={"Idempotency-Key": f"e2e-bid-{offer_id}"}) as r:
        data = await r.json(content_type=None)
        if r.status not in (200, 201, 202):
            raise ApiError(r.status, data, "POST bid")
        return data


async def _close(user: User, trade_id: str) -> Any:
    assert user.http is not None
    async with user.http.post(f"{user.base}/api/trades/{trade_id}/close", json={},
                              headers={"Idempotency-Key": f"e2e-close-{trade_id}"}) as r:
        data = await r.json(content_type=None)
        if r.status == 409 and isinstance(data, dict) and data.get("error", {}).get("code") == "invalid_transition":
            return {"ok": True, "already": data}  # a retry after the first close went through
        if r.status not in (200, 201, 202):
            raise ApiError(r.status, data, "POST close")
        return data


async def check_final(grid: Grid, out: Outcome) -> dict[str, Any]:
    """Every balance straight from the chain, against amounts computed from the delivered
    Wh and the price; every mint from a signed counter, once; settlement equals delivery."""
    prod, cons = grid.producer.address, grid.consumer.address
    t = grid.trade(out.trade_id)
    delivered = t["delivered"]
    assert t["status"] == STATUS_CLOSED and 0 < delivered < SELL_WH, t

    # the buyer's meter: what it measured for the trade is what was settled
    def meter_final() -> bool:
        ds = grid.watch.of(E.Delivery, trade_id=out.trade_id, role="consumer")
        assert ds, "no Delivery from the buyer's meter"
        assert max(d.delivered_wh for d in ds) == delivered, (
            f"buyer's meter says {max(d.delivered_wh for d in ds)} Wh, the chain settled {delivered} Wh")
        return True

    await grid.until("the buyer's meter's last delivery to equal the settled Wh", meter_final, timeout=20)

    tid = id32(out.trade_id)
    settled = [e for e in grid.market_events("Settled") if e["tradeId"] == tid]
    closed = [e for e in grid.market_events("TradeClosed") if e["tradeId"] == tid]
    assert sum(e["paidWei"] for e in settled) == cost(delivered, PRICE), settled
    assert sum(e["deltaWh"] for e in settled) == delivered, settled
    assert len(closed) == 1, closed
    assert closed[0]["deliveredWh"] == delivered
    assert closed[0]["refundedWei"] == cost(SELL_WH, PRICE) - cost(delivered, PRICE)
    assert closed[0]["returnedWh"] == SELL_WH - delivered

    # mints: only from the producer meter's signed counters, each the delta since the last
    # read at one block: the producer's meter goes on minting while this runs
    block = grid.w3.eth.block_number
    mints = grid.minted(to_block=block)
    assert mints and all(m["to"] == grid.w3.to_checksum_address(prod) for m in mints)
    counters = [m["producedWh"] for m in mints]
    assert counters == sorted(set(counters)), "a counter was minted twice or out of order"
    assert [m["amountWh"] for m in mints] == [b - a for a, b in zip([0] + counters, counters)]
    # the watch applies each meter's events exactly once, but one that restarted is replayed
    # when its next heartbeat names its replay endpoint: give the replay its time
    def all_announced() -> bool:
        return set(counters) <= {e.produced_wh for e in grid.watch.of(E.EnergyProduced)}

    await grid.until("every minted counter among those the producer's meter signed", all_announced, timeout=30)
    minted_wh = counters[-1]

    p, c = grid.onchain(prod, block), grid.onchain(cons, block)
    assert c["free"] == DEPOSIT - cost(delivered, PRICE), c
    assert c["locked"] == 0 and c["reserved"] == 0, c
    assert p["credit"] == cost(delivered, PRICE), p
    assert c["tokens"] == delivered, c
    assert p["tokens"] == minted_wh - delivered, (p, minted_wh)
    assert grid.token.functions.balanceOf(grid.market.address).call(block_identifier=block) == 0
    assert grid.w3.eth.get_balance(grid.market.address, block) == c["free"] + c["reserved"] + c["locked"] + p["credit"]
    assert p["ether"] == grid.ether_from_history(prod)
    assert c["ether"] == grid.ether_from_history(cons)
    deposits = grid.market_events("Deposited")
    assert [(d["account"], d["amountWei"]) for d in deposits] == [(grid.w3.to_checksum_address(cons), DEPOSIT)]

    # and the wallets say the same
    for user, want in ((grid.producer, p), (grid.consumer, c)):
        w = await wallet(grid, user)
        got = {"ether": int(w["ether_wei"]), "free": int(w["escrow_free_wei"]),
               "reserved": int(w["escrow_reserved_wei"]), "locked": int(w["escrow_locked_wei"]),
               "credit": int(w["credit_wei"]), "tokens": w["tokens_wh"]}
        if user is grid.producer:  # production goes on: tokens may have grown since
            assert got["tokens"] >= want["tokens"]
            got["tokens"] = want["tokens"]
        assert got == want, (user.address, got, want)
    return {"delivered": delivered, "minted_wh": minted_wh, "producer": p, "consumer": c}


def relay_audit(grid: Grid, trade_ids: set[str]) -> None:
    """Relays closed only for a live trade, and never left closed after it ended."""
    live_since: dict[str, float] = {}
    ended_at: dict[str, float] = {}
    for s in grid.watch.events:
        b = s.body
        if isinstance(b, E.TradeStatus):
            if b.state in ("recorded", "delivering"):
                live_since.setdefault(b.trade_id, s.ts)
            elif b.state in ("closed", "fulfilled", "settled", "failed"):
                ended_at.setdefault(b.trade_id, s.ts)
    for s in grid.watch.events:
        b = s.body
        if isinstance(b, E.MeterRelay) and b.closed:
            assert b.trade_id in trade_ids, f"relay closed for an unknown trade: {b}"
            assert b.trade_id in live_since and live_since[b.trade_id] <= s.ts, f"relay closed before the trade was live: {b}"
            end = ended_at.get(b.trade_id)
            assert end is None or s.ts <= end, f"relay closed after the trade ended: {b} at {s.ts}, ended {end}"
    for site in ("solar-1", "home-7"):
        last = grid.watch.of(E.MeterRelay, site=site)
        assert last and not last[-1].closed, f"{site}: relay left closed: {last[-1:]}"
