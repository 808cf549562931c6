"""A hostile site with a valid key, as a real process, against the real grid.

'probe' is a third site on the grid's allow-list with its own CURVE key and its own
account in its own wallet. It runs as ``python -m tests.adversarial.hostile`` against the
hub, the market's operator, the auction, the honest sites' wallets, both meters and the
consumer's gateway, all started from ``launcher.plan()`` on an anvil node, while a real
trade between solar-1 (seller) and home-7 (buyer) is delivering. Each forgery changes
nothing (no mint queued or sent, no settlement, no trade opened or closed, no relay
switched, no account claimed away from its site, no event of an honest source lost or
held up, no request acted on for another site's account), and each one is counted by
cause where the services show their counts (``/healthz``). The honest path goes on in the
same grid.

One grid for the module; the tests run in order and share it (the trade is closed by the
last one).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from services import launcher
from services.bus import events as E
from services.chain.keystore import Keystore
from services.chain.operator import CONSUMED as OPERATOR_CONSUMES
from services.gateway.feed import PREFIXES as GATEWAY_CONSUMES
from tests.gateway.realstack import CONSUMER_SITE

from .grid import PROBE, PROBE_PASS, AdvGrid, ev, module_of, req, store_of

SOLAR, HOME, MARKET = launcher.PRODUCER, launcher.CONSUMER, launcher.MARKET
TRADE_WH, SPARE_WH = 500, 100
PRICE = 2 * 10**15
DEPOSIT = 10**17
# the line carries 10 W while a trade runs: at the sim's 1440x, 4 Wh a second, so the
# trade is still delivering when the last attack is over
LINE = {"GRIDTRADE_SIM__LINE_W": "10"}

# what each kind of service's subscriber takes (its prefixes; the operator's and the
# gateway's from their code); keyed by store (a chain service's role), see wants()
WANTS = {
    "chain": (*OPERATOR_CONSUMES, E.AccountClaimed.TYPE),  # the market's operator
    "wallet": (E.Deployment.TYPE,),  # a site's wallet
    "auction": ("chain.trade_recorded", "chain.trade_closed", "chain.settled", "chain.tx", "meter.delivery"),
    "meter": ("trade.status.", "trade.heartbeat.", "meter.delivery."),
    "gateway": tuple(GATEWAY_CONSUMES),
}


def wants(p: Any) -> tuple[str, ...]:
    """The prefixes ``p``'s subscriber takes (a gateway: also its own site's readings and wallet.tx)."""
    out = WANTS[store_of(p)]
    if store_of(p) == "gateway":
        site = p.env["GRIDTRADE_SITE"]
        out = (*out, f"{E.MeterReading.TYPE}.{site}", f"{E.WalletTx.TYPE}.{site}")
    return out


@dataclass
class World:
    g: AdvGrid
    trade_id: str
    spare_offer: str
    probe: str

    @property
    def producer(self) -> str:
        return self.g.producer.address

    @property
    def consumer(self) -> str:
        return self.g.consumer.address


def ok(replies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    bad = [r for r in replies if not r["ok"]]
    assert not bad, bad
    return replies


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("adversarial")
    g = AdvGrid(root, env={"GRIDTRADE_HEARTBEAT_S": "0.5"}, probe_scrypt_n=2**15,
                meter_env={f"meter-{SOLAR}": LINE, f"meter-{HOME}": {**CONSUMER_SITE, **LINE}})
    try:
        g.start()
        chain = g.chain
        producer, consumer = g.producer, g.consumer
        # each site's wallet (probe's too) has announced its account's claim to the operator
        g.wait("the operator to know every site's account", lambda: dict(g.rows(
            chain, "chain", "SELECT address, site FROM account_claims")) == {
            producer.address: SOLAR, consumer.address: HOME, g.probe_account: PROBE}, timeout=60)
        # the producer's sunny morning mints its first kWh
        g.wait("the producer's first mint", lambda: g.rows(
            chain, "chain", "SELECT 1 FROM chain_mints WHERE account = ? AND state = 'done'", (producer.address,)),
            timeout=90)
        # the consumer funds escrow; the producer offers (one offer to be won, one left open)
        ok(g.requests(HOME, f"wallet:{HOME}",
                      req("chain.unlock", address=consumer.address, passphrase=consumer.passphrase),
                      {**req("chain.escrow", account=consumer.address, action="deposit", amount_wei=DEPOSIT),
                       "retry_on": ["insufficient_funds", "rejected", "chain_unavailable"], "retry_s": 30}))
        ok(g.requests(SOLAR, f"wallet:{SOLAR}",
                      req("chain.unlock", address=producer.address, passphrase=producer.passphrase),
                      {**req("chain.approve", account=producer.address, wh=TRADE_WH + SPARE_WH),
                       "retry_on": ["insufficient_funds", "rejected", "chain_unavailable"], "retry_s": 30}))
        offers = ok(g.requests(SOLAR, "auction",
                               req("auction.offer", seller=producer.address, seller_site=SOLAR, wh=TRADE_WH,
                                   start_price_wei_per_kwh=PRICE // 2, duration_s=8),
                               req("auction.offer", seller=producer.address, seller_site=SOLAR, wh=SPARE_WH,
                                   start_price_wei_per_kwh=PRICE, duration_s=3600)))
        sold, spare = (r["result"]["offer_id"] for r in offers)
        ok(g.requests(HOME, "auction", {**req("auction.bid", offer_id=sold, buyer=consumer.address, buyer_site=HOME,
                                              price_wei_per_kwh=PRICE), "retry_on": ["unfunded"], "retry_s": 8}))
        trade_id = f"t-{sold}"
        g.wait("the trade to be recorded on-chain", lambda: g.rows(
            chain, "chain", "SELECT 1 FROM chain_trades WHERE trade_id = ? AND open_state = 'done'", (trade_id,)),
            timeout=60)
        g.wait("both relays to close", lambda: all(g.health(m)["meters"]["main"]["relay_closed"]
                                                   for m in g.meters.values()), timeout=30)
        yield World(g, trade_id, spare, g.probe_account)
    finally:
        g.stop()


def want_counts(g: AdvGrid, events: list[tuple[str, str]]) -> dict[str, dict[str, int]]:
    """(type, topic site) of events that reach the subscribers -> the policy drops each
    service that takes that topic must count."""
    out: dict[str, Counter[str]] = {}
    for p in g.subscribers():
        prefixes = wants(p)
        for type_, site in events:
            topic = f"{type_}.{site}"
            if any(topic.startswith(w) for w in prefixes):
                out.setdefault(p.name, Counter())[f"policy:{type_}"] += 1
    return {k: dict(v) for k, v in out.items()}


def merge(*parts: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for part in parts:
        for name, kv in part.items():
            for k, n in kv.items():
                out.setdefault(name, {})[k] = out.setdefault(name, {}).get(k, 0) + n
    return out


def buyer_meter_delivered(w: World) -> int:
    """The most the buyer's own meter has said it delivered for the trade."""
    return max((d["body"]["delivered_wh"] for d in w.g.outbox(w.g.meters[HOME], "meter", f"meter.delivery.{HOME}")
                if d["body"]["trade_id"] == w.trade_id), default=0)


def balances(w: World, address: str) -> dict[str, Any]:
    return dict(ok(w.g.requests(PROBE, "chain", req("chain.balances", address=address)))[0]["result"])


# --- minting -------------------------------------------------------------------------


def test_a_site_cannot_mint_in_another_sites_name(world: World) -> None:
    g, chain = world.g, world.g.chain
    before = g.counts()
    mints_before = g.rows(chain, "chain", "SELECT reading_id, account FROM chain_mints")
    probe_before = balances(world, world.probe)
    forged = [
        # under solar-1's topic: the hub drops it
        ev("meter.energy_produced", f"{SOLAR}/meter", reading_id=f"{SOLAR}/main/900", site=SOLAR, meter="main",
           account=world.probe, kwh_index=900),
        # under its own topic, naming solar-1 as the producing site
        ev("meter.energy_produced", f"{PROBE}/meter", reading_id=f"{SOLAR}/main/901", site=SOLAR, meter="main",
           account=world.probe, kwh_index=901),
        # its own site, but solar-1's reading id (the contract's mint key: it would take solar-1's mint)
        ev("meter.energy_produced", f"{PROBE}/meter", reading_id=f"{SOLAR}/main/902", site=PROBE, meter="main",
           account=world.probe, kwh_index=902),
        # its own site and reading id, to another site's account
        ev("meter.energy_produced", f"{PROBE}/meter", reading_id=f"{PROBE}/main/0", site=PROBE, meter="main",
           account=world.producer, kwh_index=0),
    ]
    g.hostile("publish", {"frames": forged})
    g.expect_counts(before, merge({g.hub.name: {"site/probe": 1}},
                                  want_counts(g, [("meter.energy_produced", PROBE)] * 2)))
    # no mint job queued, no transaction: the mint table only grew by the producer's own
    mints = g.rows(chain, "chain", "SELECT reading_id, account FROM chain_mints")
    new = set(mints) - set(mints_before)
    assert all(rid.startswith(f"{SOLAR}/") and acct == world.producer for rid, acct in new), new
    # the one that passed the policy (its own name, an account solar-1's wallet claimed) is refused by the
    # operator from its claims map, counted
    g.expect_counts(before, {chain.name: {f"mints_refused:{PROBE}": 1}}, timeout=5)
    assert not [m for m in mints if m[0] in {f["body"]["reading_id"] for f in forged}]
    assert not g.rows(chain, "chain", "SELECT 1 FROM chain_txs WHERE kind = 'mint' AND ref NOT LIKE ?", (f"{SOLAR}/%",))
    after = balances(world, world.probe)
    assert (after["tokens_wh"], after["generated_wh"]) == (probe_before["tokens_wh"], probe_before["generated_wh"]) \
        == (0, 0)

    # its own kWh, to its own account (claimed by its own wallet), is its own claim: taken (the key works; the
    # name was the problem)
    g.hostile("publish", {"frames": [ev("meter.energy_produced", f"{PROBE}/meter", reading_id=f"{PROBE}/main/1",
                                        site=PROBE, meter="main", account=world.probe, kwh_index=1)]})
    g.wait("the probe's own mint", lambda: balances(world, world.probe)["tokens_wh"] == 1000, timeout=30)


# --- delivery --------------------------------------------------------------------------


def test_a_site_cannot_report_delivery_for_another_sites_trade(world: World) -> None:
    g, chain = world.g, world.g.chain
    before = g.counts()
    full = dict(trade_id=world.trade_id, meter="main", role="consumer", delivered_wh=TRADE_WH, final=True)
    g.hostile("publish", {"frames": [
        ev("meter.delivery", f"{HOME}/meter", site=HOME, **full),  # in the buyer's name: dropped at the hub
        ev("meter.delivery", f"{PROBE}/meter", site=HOME, **full),  # naming the buyer under its own topic
        ev("meter.delivery", f"{PROBE}/meter", site=PROBE, **full),  # in its own name: not the trade's buyer
    ]})
    g.expect_counts(before, merge({g.hub.name: {"site/probe": 1}}, want_counts(g, [("meter.delivery", PROBE)]),
                                  # the one in its own name is not the buyer's: both meters of the trade refuse it
                                  {m.name: {f"deliveries_refused:{PROBE}": 1} for m in g.meters.values()}))
    time.sleep(1.0)  # a settlement window and more
    # the chain pays only what the buyer's meter said; the trade is neither settled in full nor closed
    (recorded,) = g.rows(chain, "chain", "SELECT delivered_wh FROM chain_deliveries WHERE trade_id = ? AND site = ?",
                         (world.trade_id, HOME))
    (settled, close_state), = g.rows(chain, "chain", "SELECT settled_wh, close_state FROM chain_trades "
                                                      "WHERE trade_id = ?", (world.trade_id,))
    trade = next(t for t in ok(g.requests(PROBE, "auction", req("auction.trades")))[0]["result"]["trades"]
                 if t["trade_id"] == world.trade_id)
    # the seller's cross-check takes only the buyer's meter: no false mismatch raised
    peer = g.rows(g.meters[SOLAR], "meter", "SELECT buyer_wh, flagged FROM meter_peer WHERE trade_id = ?",
                  (world.trade_id,))
    home_said = buyer_meter_delivered(world)  # read last: it only grows
    assert recorded[0] <= home_said < TRADE_WH
    assert settled <= home_said and close_state == "none"
    assert trade["state"] in ("recorded", "delivering") and trade["delivered_wh"] <= home_said, trade
    assert all(wh <= home_said and not flagged for wh, flagged in peer), (peer, home_said)
    assert g.outbox(g.meters[SOLAR], "meter", f"meter.mismatch.{SOLAR}") == []


# --- trade and market events -------------------------------------------------------------


def test_trade_and_market_events_from_a_site_open_nothing_and_switch_no_relay(world: World) -> None:
    g, chain = world.g, world.g.chain
    before = g.counts()
    relays_before = {s: g.outbox(m, "meter", f"meter.relay.{s}") for s, m in g.meters.items()}
    fake = dict(trade_id="t-forged", seller=world.producer, buyer=world.probe, seller_site=SOLAR, buyer_site=HOME,
                wh=10**6, price_wei_per_kwh=1)
    real = dict(trade_id=world.trade_id, seller=world.producer, buyer=world.consumer, seller_site=SOLAR,
                buyer_site=HOME, wh=TRADE_WH, price_wei_per_kwh=PRICE)
    own = [
        ev("trade.agreed", f"{PROBE}/auction", offer_id="o-forged", **fake),  # a trade nobody agreed
        ev("trade.status", f"{PROBE}/auction", state="delivering", **fake),  # relays closed for it
        ev("trade.status", f"{PROBE}/auction", state="closed", **real),  # the real trade ended: relays open
        ev("trade.heartbeat", f"{PROBE}/auction", live=[], sites={}),  # nothing is live: relays open
        ev("trade.heartbeat", f"{PROBE}/auction", live=["t-forged"], sites={"t-forged": [SOLAR, HOME]}),
        ev("market.offer_opened", f"{PROBE}/auction", offer_id="o-forged", seller=world.producer, seller_site=SOLAR,
           wh=10**6, start_price_wei_per_kwh=1, opened_at=time.time(), ends_at=time.time() + 60),
        ev("market.offer_closed", f"{PROBE}/auction", offer_id=world.spare_offer, outcome="cancelled"),
        ev("market.bid_placed", f"{PROBE}/auction", offer_id=world.spare_offer, bid_id="b-forged",
           buyer=world.probe, buyer_site=PROBE, price_wei_per_kwh=10**30, placed_at=time.time()),
    ]
    in_markets_name = [ev("trade.status", f"{MARKET}/auction", state="closed", **real),
                       ev("trade.heartbeat", f"{MARKET}/auction", live=[], sites={})]
    g.hostile("publish", {"frames": [*own, *in_markets_name]})
    g.expect_counts(before, merge({g.hub.name: {"site/probe": len(in_markets_name)}},
                                  want_counts(g, [(f["type"], PROBE) for f in own])))
    time.sleep(2.5)  # two readings and more: a relay that was told to move would have moved
    # no trade opened, nothing closed: not at the chain service, not at the auction, not at the meters
    assert not g.rows(chain, "chain", "SELECT 1 FROM chain_trades WHERE trade_id = 't-forged'")
    assert g.rows(chain, "chain", "SELECT close_state FROM chain_trades WHERE trade_id = ?",
                  (world.trade_id,)) == [("none",)]
    assert not g.rows(chain, "chain", "SELECT 1 FROM chain_txs WHERE ref LIKE '%t-forged%'")
    listing = ok(g.requests(PROBE, "auction", req("auction.trades"), req("auction.offers")))
    assert {t["trade_id"] for t in listing[0]["result"]["trades"]} == {world.trade_id}
    spare = next(o for o in listing[1]["result"]["offers"] if o["offer_id"] == world.spare_offer)
    assert spare["state"] == "open" and spare["bids"] == 0, spare
    for site, m in g.meters.items():
        assert not g.rows(m, "meter", "SELECT 1 FROM meter_trades WHERE trade_id = 't-forged'")
        assert g.rows(m, "meter", "SELECT state FROM meter_trades WHERE trade_id = ?",
                      (world.trade_id,))[0][0] in ("recorded", "delivering")
        main = g.health(m)["meters"]["main"]
        assert (main["relay_closed"], main["relay_wanted"], main["trade"]) == (True, True, world.trade_id), main
        assert g.outbox(m, "meter", f"meter.relay.{site}") == relays_before[site], site


# --- the subscribers' streams --------------------------------------------------------------


def offsets(w: World, p: Any, name: str) -> dict[tuple[str, str], int]:
    return {(s, t): q for s, t, q in w.g.rows(p, name, "SELECT source, topic, seq FROM bus_offsets")}


def db_name(p: Any) -> str:
    return store_of(p)


def test_a_heartbeat_offset_jump_and_a_stalled_replay_lose_and_hold_up_nothing(world: World) -> None:
    g, auction = world.g, world.g.auction
    before = g.counts()
    market_topics = {f"{t}.{MARKET}": 10**9 for t in ("trade.status", "trade.heartbeat", "trade.agreed",
                                                       "market.offer_opened", "chain.settled", "chain.tx")}
    own_topics = {f"{t}.{PROBE}": 10**9 for t in ("meter.delivery", "trade.status", "meter.energy_produced",
                                                  "chain.settled", "market.offer_opened")}
    seconds = 7.0
    jobs = {
        # another node's heartbeat, with a huge last: the market's events would be skipped
        "jump": g.hostile_background("beat", {"source": f"{PROBE}/x", "node": f"{MARKET}/auction", "site": MARKET,
                                              "last": market_topics, "seconds": seconds, "every": 0.25}),
        # the same in the market's name: dropped at the hub
        "named": g.hostile_background("beat", {"source": f"{MARKET}/auction", "node": f"{MARKET}/auction",
                                               "site": MARKET, "last": market_topics, "seconds": seconds,
                                               "every": 0.25}),
        # its own node, its replay pointed at an endpoint that takes requests and never answers
        "stall": g.hostile_background("beat", {"source": f"{PROBE}/stall", "node": f"{PROBE}/stall", "site": PROBE,
                                               "last": own_topics, "seconds": seconds, "every": 0.25,
                                               "replay": "silent"}),
        # and one pointed at a port where nothing listens
        "dead": g.hostile_background("beat", {"source": f"{PROBE}/dead", "node": f"{PROBE}/dead", "site": PROBE,
                                              "last": own_topics, "seconds": seconds, "every": 0.25,
                                              "replay": "dead"}),
    }
    # meanwhile the honest streams flow: the meters hear the auction's trade heartbeat (else
    # their relays would open after the trade timeout) and the chain hears the producer's kWh
    hb_topic = f"trade.heartbeat.{MARKET}"
    lags = []
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        published = g.rows(auction, "auction", "SELECT MAX(seq) FROM bus_outbox WHERE topic = ?", (hb_topic,))[0][0]
        for site, m in g.meters.items():
            lags.append(published - offsets(world, m, "meter").get((f"{MARKET}/auction", hb_topic), 0))
            main = g.health(m)["meters"]["main"]
            assert main["relay_closed"] and main["relay_wanted"], (site, main)
        time.sleep(0.5)
    out = {k: g.finish(j) for k, j in jobs.items()}
    assert max(lags) <= 3, f"a meter fell behind the auction's trade heartbeats by {max(lags)} (lags {lags})"

    # every event the honest publishers committed by now is applied, none skipped
    def caught_up() -> bool:
        for p in g.subscribers():
            if module_of(p) == "services.gateway":
                continue  # a live view ("latest"): it takes only what comes after it started
            have = offsets(world, p, db_name(p))
            for (source, topic), seq in have.items():
                assert seq < 10**9, (p.name, source, topic, seq)
            for pub in (auction, g.chain, *g.wallets.values(), *g.meters.values()):
                for (topic,) in g.rows(pub, db_name(pub), "SELECT DISTINCT topic FROM bus_outbox"):
                    if not any(topic.startswith(w) for w in wants(p)) or pub is p:
                        continue
                    last = g.rows(pub, db_name(pub), "SELECT MAX(seq) FROM bus_outbox WHERE topic = ?", (topic,))[0][0]
                    source = f"{pub.env['GRIDTRADE_SITE']}/{db_name(pub)}"
                    if have.get((source, topic), 0) < last - 3:  # the last few may be on their way
                        return False
        return True

    g.wait("every subscriber to have applied what the honest sources published", caught_up, timeout=20)
    stalled = [p.name for p in g.subscribers() if any(
        f"{t}.{PROBE}".startswith(w) for t in ("meter.delivery", "trade.status", "meter.energy_produced",
                                                "chain.settled", "market.offer_opened") for w in wants(p))]
    n_jump, n_named = out["jump"]["beats"], out["named"]["beats"]
    # (the probe's own nodes' heartbeats are its own to send: not drops)
    want = merge({g.hub.name: {"site/probe": n_named}},
                 {p.name: {"policy:bus.heartbeat": n_jump} for p in g.subscribers()})
    deltas = g.expect_counts(before, want)
    for name in stalled:  # the silent replay timed out (and was retried with a backoff, not on every beat)
        assert deltas[name]["replay_timeout"] >= 1, (name, deltas[name])
    assert out["stall"]["replay_asked"] >= 1
    assert out["stall"]["replay_asked"] <= 6 * len(stalled), out["stall"]


# --- requests for another site's account ---------------------------------------------------


def test_a_site_cannot_act_for_another_sites_account(world: World) -> None:
    g, chain = world.g, world.g.chain
    p, c = world.producer, world.consumer
    honest = {SOLAR: g.wallets[SOLAR], HOME: g.wallets[HOME]}
    before = g.counts()
    txs = "SELECT account, COUNT(*) FROM chain_txs WHERE account IN (?, ?) GROUP BY account"
    nonces = "SELECT * FROM chain_nonces WHERE account IN (?, ?) ORDER BY account"
    txs_before = {s: g.rows(w, "wallet", txs, (p, c)) for s, w in honest.items()}
    nonces_before = {s: g.rows(w, "wallet", nonces, (p, c)) for s, w in honest.items()}
    op_txs = "SELECT COUNT(*) FROM chain_txs WHERE account != ?"
    operator = g.health(chain)["operator"]
    op_txs_before = g.rows(chain, "chain", op_txs, (operator,))
    limit = 5  # GRIDTRADE_UNLOCK_MAX_FAILURES (the default)
    chain_attacks = [
        *(req("chain.unlock", address=p, passphrase=f"a guess {i}") for i in range(limit + 2)),
        req("chain.unlock", address=c, passphrase=g.consumer.passphrase),  # even the right passphrase
        req("chain.transfer", sender=c, to=world.probe, amount_wei=10**15),
        req("chain.escrow", account=c, action="withdraw", amount_wei=10**15),
        req("chain.escrow", account=c, action="deposit", amount_wei=1),
        req("chain.escrow", account=p, action="withdraw_credit", amount_wei=1),
        req("chain.approve", account=p, wh=1),
        req("chain.lock", address=c),
        req("chain.accounts"),
        req("chain.pending", account=c),
    ]
    # at each honest site's wallet: refused before any work (no scrypt, no throttle slot), counted
    for site in honest:
        replies = g.requests(PROBE, f"wallet:{site}", *chain_attacks)
        assert [r["code"] for r in replies] == ["not_your_site"] * len(chain_attacks), (site, replies)
        assert all("nothing was done" in r["message"] for r in replies), replies
    # at the market's operator: it holds no user key and has no such handlers
    signing = [r for r in chain_attacks if r["type"] not in ("chain.accounts", "chain.pending")]
    replies = g.requests(PROBE, "chain", *signing)
    assert [r["code"] for r in replies] == ["unsupported"] * len(signing), replies

    auction_attacks = [
        (req("auction.offer", seller=p, seller_site=SOLAR, wh=10, start_price_wei_per_kwh=1, duration_s=60),
         "not_your_account"),
        (req("auction.offer", seller=p, seller_site=PROBE, wh=10, start_price_wei_per_kwh=1, duration_s=60),
         "not_your_account"),  # naming itself, but solar-1's account
        (req("auction.bid", offer_id=world.spare_offer, buyer=c, buyer_site=HOME, price_wei_per_kwh=PRICE),
         "not_your_account"),
        (req("auction.bid", offer_id=world.spare_offer, buyer=c, buyer_site=PROBE, price_wei_per_kwh=PRICE),
         "not_your_account"),
        (req("auction.cancel", offer_id=world.spare_offer, seller=p), "not_allowed"),
        (req("auction.close", trade_id=world.trade_id, by=c), "not_allowed"),
        # its own account is held to the rules like anyone's (it has no escrow)
        (req("auction.bid", offer_id=world.spare_offer, buyer=world.probe, buyer_site=PROBE,
             price_wei_per_kwh=PRICE), "unfunded"),
    ]
    replies = g.requests(PROBE, "auction", *(r for r, _ in auction_attacks))
    assert [r["code"] for r in replies] == [code for _, code in auction_attacks], replies
    # counted at each wallet by the calling site; no unlock attempt started (none throttled)
    g.expect_counts(before, {w.name: {f"refused:{PROBE}": len(chain_attacks), "unlocks_throttled": 0}
                             for w in honest.values()})

    # nothing sent for them, nothing changed at the auction; their sessions stay theirs
    for site, w in honest.items():
        assert g.rows(w, "wallet", txs, (p, c)) == txs_before[site], site
        assert g.rows(w, "wallet", nonces, (p, c)) == nonces_before[site], site
    assert g.rows(chain, "chain", op_txs, (operator,)) == op_txs_before  # the operator signs for itself only
    listing = ok(g.requests(PROBE, "auction", req("auction.offers"), req("auction.trades")))
    spare = next(o for o in listing[0]["result"]["offers"] if o["offer_id"] == world.spare_offer)
    assert spare["state"] == "open" and spare["bids"] == 0, spare
    assert [o for o in listing[0]["result"]["offers"] if o["state"] == "open"] == [spare]
    trade = next(t for t in listing[1]["result"]["trades"] if t["trade_id"] == world.trade_id)
    assert trade["state"] in ("recorded", "delivering"), trade
    for site, acct in ((SOLAR, p), (HOME, c)):
        listed = ok(g.requests(site, f"wallet:{site}", req("chain.accounts")))[0]["result"]["accounts"]
        assert {a["address"]: a["unlocked"] for a in listed} == {acct: True}, (site, listed)
    # the guesses at solar-1's account took no throttle slot there: its own site unlocks it at once
    ok(g.requests(SOLAR, f"wallet:{SOLAR}", req("chain.unlock", address=p, passphrase=g.producer.passphrase)))


def test_unlock_guessing_is_throttled_before_scrypt(world: World) -> None:
    """At probe's own wallet (at another site's wallet it is refused before the throttle,
    see above)."""
    g, wallet = world.g, world.g.wallets[PROBE]
    before = g.counts()
    limit = 5  # GRIDTRADE_UNLOCK_MAX_FAILURES (the default)
    guesses = [req("chain.unlock", address=world.probe, passphrase=f"guess {i}") for i in range(limit + 4)]
    replies = g.requests(PROBE, f"wallet:{PROBE}", *guesses,
                         req("chain.unlock", address=world.probe, passphrase=PROBE_PASS))
    codes = [r["code"] for r in replies]
    assert codes == ["bad_passphrase"] * limit + ["too_many_attempts"] * 5, replies
    throttled = [r for r in replies if r["code"] == "too_many_attempts"]
    assert all("nothing was tried" in r["message"] for r in throttled), throttled
    # a refused attempt does no scrypt work: it is answered faster than any attempt that did
    assert max(r["s"] for r in throttled) < min(r["s"] for r in replies[:limit]), replies
    g.expect_counts(before, {wallet.name: {"unlocks_throttled": 5},
                             **{g.wallets[s].name: {"unlocks_throttled": 0} for s in (SOLAR, HOME)}})
    # another site's logins are not held up by probe's guessing
    ok(g.requests(SOLAR, f"wallet:{SOLAR}", req("chain.unlock", address=world.producer,
                                                 passphrase=g.producer.passphrase)))


# --- account claims and wallet transactions -------------------------------------------------


def test_a_site_cannot_claim_another_sites_account_or_forge_its_wallet_txs(world: World) -> None:
    g, chain = world.g, world.g.chain
    before = g.counts()
    data = g.stack.data.resolve()
    home_claim = next(kf.claim for kf in Keystore(data / HOME / "keystore").list() if kf.address == world.consumer)
    probe_claim = next(kf.claim for kf in Keystore(data / PROBE / "keystore").list() if kf.address == world.probe)
    nobody = "0x" + "42" * 20  # an address nobody claimed
    # (a source of its own: the seqs of probe/wallet are its real wallet's)
    forger = f"{PROBE}/forger"
    claims = [
        # home-7's genuine claim of its own account, replayed in home-7's name: dropped at the hub
        ev("wallet.account", f"{HOME}/wallet", site=HOME, address=world.consumer, signature=home_claim),
        # the same under its own topic: the body names another site (policy)
        ev("wallet.account", forger, site=HOME, address=world.consumer, signature=home_claim),
        # in its own name, another site's account, with that site's signature (of another text)
        ev("wallet.account", forger, site=PROBE, address=world.consumer, signature=home_claim),
        # ... with its own account key's signature (of its own address)
        ev("wallet.account", forger, site=PROBE, address=world.producer, signature=probe_claim),
        # ... a signature that is nobody's
        ev("wallet.account", forger, site=PROBE, address=world.producer, signature="0x" + "11" * 65),
        # an address nobody claimed yet, with a signature not of its key
        ev("wallet.account", forger, site=PROBE, address=nobody, signature=probe_claim),
    ]
    fake_tx = dict(tx_hash="0x" + "ab" * 32, kind="deposit", ref=str(10**18), account=world.consumer,
                   status="confirmed", block=1)
    txs = [
        # a deposit the consumer never made, shown in its wallet: in home-7's name, dropped at the hub
        ev("wallet.tx", f"{HOME}/wallet", site=HOME, **fake_tx),
        # from its own source but under home-7's topic (the one the consumer's gateway takes): the same
        ev("wallet.tx", forger, topic_site=HOME, site=HOME, **fake_tx),
    ]
    out = g.hostile("publish", {"frames": [*claims, *txs]})
    # (under its own topic a wallet.tx reaches nobody: a gateway takes its own site's only)
    assert out["sent"] == len(claims) + len(txs)
    g.expect_counts(before, merge({g.hub.name: {"site/probe": 1 + len(txs)}},
                                  want_counts(g, [("wallet.account", PROBE)]),
                                  {chain.name: {"claims_refused:bad_signature": 4, "claims_refused:other_site": 0}}))
    # every account still belongs to its own site at the operator; nothing bound to probe but its own
    for address, site in ((world.consumer, HOME), (world.producer, SOLAR), (world.probe, PROBE), (nobody, "")):
        assert balances(world, address)["site"] == site, (address, balances(world, address))
    (n,), = g.rows(chain, "chain", "SELECT COUNT(*) FROM account_claims WHERE site = ?", (PROBE,))
    assert n == 1
    # the consumer's gateway showed no forged transaction (it refused nothing: nothing reached it)
    gw = next(p for p in g.subscribers() if store_of(p) == "gateway")
    assert not any(k.startswith("policy:wallet.") for k in g.health(gw)["dropped"])


# --- the honest path, in the same grid -----------------------------------------------------


def test_the_honest_path_still_works_after_the_attacks(world: World) -> None:
    g, chain = world.g, world.g.chain
    # the producer's own kWh are still minted to it
    minted = len(g.rows(chain, "chain", "SELECT 1 FROM chain_mints WHERE account = ? AND state = 'done'",
                        (world.producer,)))
    g.wait("a new mint of the producer's own", lambda: len(g.rows(
        chain, "chain", "SELECT 1 FROM chain_mints WHERE account = ? AND state = 'done'", (world.producer,))) > minted,
        timeout=60)
    # the buyer closes its trade: settled on-chain for what its meter measured, relays open
    ok(g.requests(HOME, "auction", req("auction.close", trade_id=world.trade_id, by=world.consumer)))
    g.wait("the trade to be closed on-chain", lambda: g.rows(
        chain, "chain", "SELECT 1 FROM chain_trades WHERE trade_id = ? AND close_state = 'done'", (world.trade_id,)),
        timeout=60)
    (settled,), = g.rows(chain, "chain", "SELECT settled_wh FROM chain_trades WHERE trade_id = ?", (world.trade_id,))
    assert 0 < settled == buyer_meter_delivered(world) < TRADE_WH
    g.wait("both relays to open", lambda: not any(g.health(m)["meters"]["main"]["relay_closed"]
                                                  for m in g.meters.values()), timeout=30)
    # the hub dropped the probe's messages only; the honest services' subscribers refused
    # nothing of the honest sites (every policy drop above was one of probe's)
    assert all(k.endswith(f"/{PROBE}") for k in g.health(g.hub)["hub_dropped"]), g.health(g.hub)
