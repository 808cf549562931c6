"""A hostile site with a valid key, as a real process, against the real grid (contracts v2).

'probe' is a third site on the grid's allow-list with its own CURVE key and its own
account in its own wallet. It runs as ``python -m tests.adversarial.hostile`` against the
hub, the market's operator, the auction, the honest sites' wallets, both meters and the
consumer's gateway, all started from ``launcher.plan()`` on an anvil node, while a real
trade between solar-1 (seller) and home-7 (buyer) is delivering. A few attacks are those
of a trade's own party turned hostile: the seller's or the buyer's site, with its own bus
key, its meter's key or its account key (what that site holds), and the market's own key
for a trade agreement the bus takes from the auction only.

Every payment in v2 comes from a signature the contracts check: a meter's signed
production (minted as the increase since that meter's last mint, to the account the
MeterRegistry holds for it), the buyer meter's signed delivery, the parties' signed offer
and bid. Each forgery changes nothing (no token minted, no meter registered for another
site's account, no settlement beyond what the buyer's meter signed, no trade opened or
closed, no relay switched, no escrow freed under a live bid, no account claimed away
from its site, no event of an honest source lost or held up, no request acted on for
another site's account), read from the chain itself and from the operator's job tables
(``job_meters``, ``job_production``, ``job_trades``, ``job_deliveries``), and each one is
counted by cause where the services count it (``/healthz``). The auction keeps no count
of the requests it refuses: there the refusal is its answer's code, and nothing it
publishes or stores changes.

One grid for the module; the tests run in order and share it (the buyer closes the trade
in the last ones).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from eth_account import Account

from services import launcher
from services.bus import events as E
from services.bus import typed
from services.bus.prices import wei_for
from services.chain import bindings
from services.chain.keystore import Keystore
from services.chain.operator import CONSUMED as OPERATOR_CONSUMES
from services.gateway.feed import PREFIXES as GATEWAY_CONSUMES
from tests.support.plan import CONSUMER_SITE
from tests.support.signing import Meter

from .grid import PROBE, PROBE_PASS, AdvGrid, ev, frame, module_of, req, store_of

SOLAR, HOME, MARKET = launcher.PRODUCER, launcher.CONSUMER, launcher.MARKET
TRADE_WH, SPARE_WH = 3000, 100
PRICE = 2 * 10**15
DEPOSIT = 10**17
SOLD_AUCTION_S = 15  # the auction of the offer the consumer wins
TRADE_S = 3600  # a trade runs at most this long (the signed offer's duration)
GRACE_S = 3600  # signed offers and bids (and the escrow reserved for a bid) last this long after their auction
DISPUTE_WINDOW_S = 30
# the line carries 10 W while a trade runs: at the sim's 1440x, 4 Wh a second, so the
# trade is still delivering when the buyer closes it at the end
LINE = {"GRIDTRADE_SIM__LINE_W": "10"}
# the operator settles a trade's reading every 100 Wh (25 s of this line; its default 1000 Wh
# would be minutes), so the tests see settlement follow the buyer's meter while the trade runs
SETTLE_EVERY_WH = 100
RETRY = ["insufficient_funds", "insufficient_tokens", "rejected", "chain_unavailable"]

# what each kind of service's subscriber takes (its prefixes, from its code); keyed by
# store (a chain service's role), see wants()
WANTS = {
    "chain": (*OPERATOR_CONSUMES, E.WalletAccount.TYPE),  # the market's operator
    "wallet": (E.Deployment.TYPE,),  # a site's wallet
    "auction": (E.TradeRecorded.TYPE, E.TradeClosed.TYPE, E.Settled.TYPE, E.ChainTx.TYPE, E.Delivery.TYPE,
                E.MeterMismatch.TYPE, E.Deployment.TYPE),
    "meter": ("trade.status.", "trade.heartbeat.", "meter.delivery.", "meter.key.", "chain.deployment."),
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
    spare: dict[str, Any]  # the open offer nobody won: offer_id, ends_at, signed (offer, signature)
    probe: str
    agreed: dict[str, Any]  # the trade's TradeAgreed as the auction published it (the signed offer and bid)

    @property
    def producer(self) -> str:
        return self.g.producer.address

    @property
    def consumer(self) -> str:
        return self.g.consumer.address

    @property
    def key(self) -> bytes:
        """The trade's on-chain id."""
        return typed.trade_key(self.trade_id)

    def meter_address(self, site: str) -> str:
        return str(self.g.health(self.g.meters[site])["meters"]["main"]["key"])


def ok(replies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    bad = [r for r in replies if not r["ok"]]
    assert not bad, bad
    return replies


def cost(wh: int, price: int) -> int:
    return wei_for(wh, price)


def sign_offer(g: AdvGrid, wh: int, price: int, auction_s: float) -> dict[str, Any]:
    """The producer's wallet signs an offer of ``wh`` for an auction of ``auction_s``."""
    return dict(ok(g.requests(SOLAR, f"wallet:{SOLAR}", req(
        "chain.sign_offer", account=g.producer.address, wh=wh, min_price_wei_per_kwh=price,
        expiry=int(time.time() + auction_s + GRACE_S), duration_s=TRADE_S)))[0]["result"])


def sell(g: AdvGrid, wh: int, price: int, auction_s: float, signed: dict[str, Any] | None = None) -> dict[str, Any]:
    """The producer's site offers ``wh``: its wallet signs the offer (unless ``signed`` already,
    by :func:`sign_offer`), the auction takes it."""
    p = g.producer.address
    signed = signed or sign_offer(g, wh, price, auction_s)
    placed = ok(g.requests(SOLAR, "auction", req(
        "auction.offer", seller=p, seller_site=SOLAR, wh=wh, start_price_wei_per_kwh=price, duration_s=auction_s,
        offer=signed["offer"], signature=signed["signature"])))[0]["result"]
    return {**placed, "signed": signed, "wh": wh}


def sign_bid(g: AdvGrid, site: str, account: str, offer: dict[str, Any], price: int, expiry: int) -> dict[str, Any]:
    """A site's wallet signs a bid of its account for ``offer`` (as returned by :func:`sell`)."""
    return dict(ok(g.requests(site, f"wallet:{site}", req(
        "chain.sign_bid", account=account, offer_id=offer["signed"]["offer"]["offer_id"], wh=offer["wh"],
        max_price_wei_per_kwh=price, expiry=expiry)))[0]["result"])


def bid_req(offer: dict[str, Any], account: str, site: str, price: int, signed: dict[str, Any]) -> dict[str, Any]:
    return req("auction.bid", offer_id=offer["offer_id"], buyer=account, buyer_site=site, price_wei_per_kwh=price,
               bid=signed["bid"], signature=signed["signature"])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("adversarial")
    g = AdvGrid(root, env={"GRIDTRADE_HEARTBEAT_S": "0.5", "GRIDTRADE_DISPUTE_WINDOW_S": str(DISPUTE_WINDOW_S),
                           "GRIDTRADE_SETTLE_EVERY_WH": str(SETTLE_EVERY_WH)},
                probe_scrypt_n=2**15, meter_env={f"meter-{SOLAR}": LINE, f"meter-{HOME}": {**CONSUMER_SITE, **LINE}})
    try:
        g.start()
        chain = g.chain
        producer, consumer = g.producer, g.consumer
        # each site's wallet (probe's too) has announced its account's claim to the operator
        g.wait("the operator to know every site's account", lambda: dict(g.rows(
            chain, "chain", "SELECT address, site FROM account_claims")) == {
            producer.address: SOLAR, consumer.address: HOME, g.probe_account: PROBE}, timeout=60)
        # each site's meter announced its key; the registrar registered it for the site's account
        g.wait("both meters' keys to be registered", lambda: sorted(g.rows(
            chain, "chain", "SELECT site, account FROM job_meters WHERE state = 'done'")) == sorted(
            [(SOLAR, producer.address), (HOME, consumer.address)]), timeout=90)
        # the producer's sunny morning: its meter's signed production is minted, enough to sell
        g.wait("the producer's mints", lambda: g.chain_view().token.functions.balanceOf(producer.address).call()
               >= TRADE_WH + SPARE_WH, timeout=90)
        # the consumer funds escrow; the producer approves and offers (one offer to be won, one left open)
        ok(g.requests(HOME, f"wallet:{HOME}",
                      req("chain.unlock", address=consumer.address, passphrase=consumer.passphrase),
                      {**req("chain.escrow", account=consumer.address, action="deposit", amount_wei=DEPOSIT),
                       "retry_on": RETRY, "retry_s": 30}))
        ok(g.requests(SOLAR, f"wallet:{SOLAR}",
                      req("chain.unlock", address=producer.address, passphrase=producer.passphrase),
                      {**req("chain.approve", account=producer.address, wh=TRADE_WH + SPARE_WH),
                       "retry_on": RETRY, "retry_s": 30}))
        spare = sell(g, SPARE_WH, PRICE, 3600)
        # the consumer's wallet reserves the bid's escrow past the bid's expiry (before the
        # auction starts: a block on a loaded machine may take longer than the auction)
        ok(g.requests(HOME, f"wallet:{HOME}", req("chain.reserve", account=consumer.address,
                                                  total_wei=cost(TRADE_WH, PRICE),
                                                  until=int(time.time() + SOLD_AUCTION_S + GRACE_S + 600))))
        # the offer and the consumer's bid are both signed before the auction starts: each
        # request here is a process of its own, slow to start on a loaded machine, and two of
        # them between the offer and the bid once outlasted the auction
        offer = sign_offer(g, TRADE_WH, PRICE // 2, SOLD_AUCTION_S)
        bid = sign_bid(g, HOME, consumer.address, {"signed": offer, "wh": TRADE_WH}, PRICE,
                       int(time.time() + SOLD_AUCTION_S + GRACE_S))
        sold = sell(g, TRADE_WH, PRICE // 2, SOLD_AUCTION_S, signed=offer)
        # ... the auction takes the bid
        ok(g.requests(HOME, "auction", bid_req(sold, consumer.address, HOME, PRICE, bid)))
        trade_id = f"t-{sold['offer_id']}"
        g.wait("the trade to be opened on-chain", lambda: g.rows(
            chain, "chain", "SELECT 1 FROM job_trades WHERE trade_id = ? AND open_state = 'done'", (trade_id,)),
            timeout=60)
        g.wait("both relays to close", lambda: all(g.health(m)["meters"]["main"]["relay_closed"]
                                                   for m in g.meters.values()), timeout=30)
        agreed = next(e["body"] for e in g.outbox(g.auction, "auction", f"{E.TradeAgreed.TYPE}.{MARKET}")
                      if e["body"]["trade_id"] == trade_id)
        yield World(g, trade_id, spare, g.probe_account, agreed)
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


def buyer_meter_deliveries(w: World) -> list[dict[str, Any]]:
    """What the buyer's own meter published for the trade (signed), in order."""
    return [d["body"] for d in w.g.outbox(w.g.meters[HOME], "meter", f"{E.Delivery.TYPE}.{HOME}")
            if d["body"]["trade_id"] == w.trade_id]


def buyer_meter_delivered(w: World) -> int:
    """The most the buyer's own meter has signed it delivered for the trade."""
    return max((d["delivered_wh"] for d in buyer_meter_deliveries(w)), default=0)


def on_chain(w: World) -> dict[str, Any]:
    seller, wh, status, buyer, delivered, price, deadline, closing_at = \
        w.g.chain_view().market.functions.trades(w.key).call()
    return {"seller": seller, "wh": wh, "status": status, "buyer": buyer, "delivered": delivered, "price": price,
            "deadline": deadline, "closing_at": closing_at}


def escrow(g: AdvGrid, address: str, block: int | str = "latest") -> dict[str, int]:
    """An account's balances in the market and the token, read from the chain (at ``block``)."""
    v = g.chain_view()
    m, t = v.market.functions, v.token.functions
    return {"ether": v.w3.eth.get_balance(address, block), "free": m.freeEscrow(address).call(block_identifier=block),
            "reserved": m.reservedEscrow(address).call(block_identifier=block),
            "until": m.reservedUntil(address).call(block_identifier=block),
            "locked": m.lockedEscrow(address).call(block_identifier=block),
            "credit": m.credit(address).call(block_identifier=block),
            "tokens": t.balanceOf(address).call(block_identifier=block)}


def escrow_at_rest(w: World) -> dict[str, Any]:
    """What no attack may change while the trade delivers: the parties' free and reserved
    escrow, the producer's allowance to the market and probe's balances; the consumer's
    locked escrow plus the producer's credit (a settlement moves wei from one to the other)."""
    g = w.g
    v = g.chain_view()
    block = v.w3.eth.block_number  # one block for all of it: a settlement may be mined between two reads
    c, p = escrow(g, w.consumer, block), escrow(g, w.producer, block)
    allowance = v.token.functions.allowance(w.producer, v.market.address).call(block_identifier=block)
    return {"consumer": {k: c[k] for k in ("free", "reserved", "until")},
            "producer": {k: p[k] for k in ("free", "reserved", "until")}, "allowance": allowance,
            "locked_plus_credit": c["locked"] + p["credit"],
            "probe": {k: x for k, x in escrow(g, w.probe, block).items() if k != "ether"}}


# --- minting -------------------------------------------------------------------------


def test_a_site_cannot_mint_in_another_sites_name(world: World) -> None:
    g, chain = world.g, world.g.chain
    v, d = g.chain_view(), g.domains()
    solar_meter = world.meter_address(SOLAR)
    # solar-1's meter's latest signed production, as it published it
    real = g.outbox(g.meters[SOLAR], "meter", f"{E.EnergyProduced.TYPE}.{SOLAR}")[-1]["body"]
    stranger = Meter(site=PROBE, account=world.probe)  # a key of probe's own, not any registered meter's
    before = g.counts()
    at_rest = escrow_at_rest(world)
    production_before = g.rows(chain, "chain", "SELECT meter, site FROM job_production")
    frames = [
        # solar-1's reading replayed under solar-1's topic: dropped at the hub
        ev(E.EnergyProduced.TYPE, f"{SOLAR}/meter", **real),
        # under its own topic, the body naming solar-1: policy
        ev(E.EnergyProduced.TYPE, f"{PROBE}/meter", **real),
        # in its own name: the meter's own signature, a counter already minted or queued: it mints nothing more
        ev(E.EnergyProduced.TYPE, f"{PROBE}/meter", **{**real, "site": PROBE}),
        # the same with a higher counter: the signature no longer verifies
        ev(E.EnergyProduced.TYPE, f"{PROBE}/meter", **{**real, "site": PROBE, "produced_wh": real["produced_wh"] + 10**6}),
        # solar-1's meter named, signed by another key
        frame(stranger.production(d, 10**6), f"{PROBE}/meter", meter_address=solar_meter),
        # a meter key of its own, announced for solar-1's account (the key's own signature):
        # the registrar refuses, solar-1's wallet claimed that account
        frame(Meter(site=PROBE, account=world.producer, key=stranger.key).announce(d), f"{PROBE}/meter"),
        # solar-1's meter's address announced for probe's account, signed by another key
        frame(stranger.announce(d), f"{PROBE}/meter", address=solar_meter),
        # a key announced in solar-1's name: dropped at the hub
        frame(Meter(site=SOLAR, account=world.producer, key=stranger.key).announce(d), f"{SOLAR}/meter"),
    ]
    g.hostile("publish", {"frames": frames})
    g.expect_counts(before, merge(
        {g.hub.name: {"site/probe": 2}},
        want_counts(g, [(E.EnergyProduced.TYPE, PROBE)]),  # the one naming solar-1
        {chain.name: {f"production_refused:{PROBE}": 2, f"meter_keys_refused:{PROBE}": 1, "meters:failed": 1}},
        {m.name: {f"meter_keys_refused:{PROBE}": 1} for m in g.meters.values()}))

    # the registrar refused the key for solar-1's account (the account is solar-1's) and registered nothing
    (state, reason), = g.rows(chain, "chain", "SELECT state, reason FROM job_meters WHERE meter = ?",
                              (stranger.address,))
    assert state == "failed" and f"belongs to site {SOLAR}" in reason, (state, reason)
    assert v.registry.functions.accountOf(stranger.address).call() == "0x" + "00" * 20
    assert v.registry.functions.accountOf(solar_meter).call() == world.producer
    # the operator holds solar-1's meter's own readings only, still as solar-1's
    assert g.rows(chain, "chain", "SELECT meter, site FROM job_production") == production_before \
        == [(solar_meter, SOLAR)]
    # every token ever minted is solar-1's meter's signed production, to the producer, never above what it
    # signed (all read at one block; what the meter signed read after, as it only grows)
    block = v.w3.eth.block_number
    mints = [dict(e["args"]) for e in v.token.events.Minted().get_logs(from_block=0, to_block=block)]
    (held,) = g.rows(chain, "chain", "SELECT produced_wh, signature FROM job_production WHERE meter = ?",
                     (solar_meter,))
    signed = {(b["produced_wh"], b["signature"]) for b in (
        e["body"] for e in g.outbox(g.meters[SOLAR], "meter", f"{E.EnergyProduced.TYPE}.{SOLAR}"))}
    assert held in signed
    assert mints and all((m["to"], m["meter"]) == (world.producer, solar_meter) for m in mints), mints
    assert {m["producedWh"] for m in mints} <= {wh for wh, _ in signed}
    assert v.token.functions.mintedOf(solar_meter).call(block_identifier=block) == mints[-1]["producedWh"] == \
        sum(m["amountWh"] for m in mints) == v.token.functions.totalSupply().call(block_identifier=block)
    assert escrow_at_rest(world) == at_rest and at_rest["probe"]["tokens"] == 0

    # a meter key of its own, for its own account (claimed by its own wallet), is its own: registered, and
    # its signed production minted to probe; the same reading again, or an older one, mints nothing more
    own = Meter(site=PROBE, account=world.probe)
    g.hostile("publish", {"frames": [frame(own.announce(d), f"{PROBE}/meter"),
                                     frame(own.production(d, 1000), f"{PROBE}/meter")]})
    g.wait("the probe's own mint", lambda: v.token.functions.balanceOf(world.probe).call() == 1000, timeout=60)
    assert v.registry.functions.accountOf(own.address).call() == world.probe
    before = g.counts()
    g.hostile("publish", {"frames": [frame(own.production(d, 1000), f"{PROBE}/meter"),
                                     frame(own.production(d, 500), f"{PROBE}/meter")]})
    time.sleep(3.0)  # several rounds of the operator's jobs
    assert v.token.functions.balanceOf(world.probe).call() == v.token.functions.mintedOf(own.address).call() == 1000
    # (a replay is not refused: the token mints the increase since the meter's last mint, and there is none)
    g.expect_counts(before, {chain.name: {f"production_refused:{PROBE}": 0}}, timeout=5)


# --- delivery --------------------------------------------------------------------------


def test_a_site_cannot_be_paid_for_a_delivery_it_did_not_measure(world: World) -> None:
    g, chain = world.g, world.g.chain
    v, d, tid = g.chain_view(), g.domains(), world.trade_id
    stranger = Meter(site=PROBE, account=world.probe)  # a key no registry holds
    seller_meter = Meter(site=SOLAR, account=world.producer, key=Account.from_key(g.meter_key(SOLAR)))
    assert seller_meter.address == world.meter_address(SOLAR)
    buyers_own = Meter(site=HOME, account=world.consumer)  # a key the buyer's site made, never registered
    before = g.counts()
    at_rest = escrow_at_rest(world)
    settled_before = on_chain(world)["delivered"]
    full = dict(final=True)
    by_probe = [
        # the whole trade delivered, in the buyer's name: dropped at the hub
        frame(stranger.delivery(d, tid, TRADE_WH, **full), f"{HOME}/meter", site=HOME),
        # naming the buyer under its own topic: policy
        frame(stranger.delivery(d, tid, TRADE_WH, **full), f"{PROBE}/meter", site=HOME),
        # in its own name: not the trade's buyer, not the buyer's meter
        frame(stranger.delivery(d, tid, TRADE_WH, **full), f"{PROBE}/meter"),
    ]
    # the seller's site: a Delivery signed by the seller's own (registered) meter key
    by_seller = [frame(seller_meter.delivery(d, tid, TRADE_WH, **full), f"{SOLAR}/forger")]
    # the buyer's site: a reading just short of the whole trade, signed by a key no registry holds for the
    # buyer (were it kept, the buyer's meter's real, lower readings would not be)
    forged_wh = TRADE_WH - 1
    by_buyer = [frame(buyers_own.delivery(d, tid, forged_wh), f"{HOME}/forger")]
    g.hostile("publish", {"frames": by_probe})
    g.hostile("publish", {"frames": by_seller}, site=SOLAR)
    g.hostile("publish", {"frames": by_buyer}, site=HOME)
    said_then = buyer_meter_delivered(world)
    g.expect_counts(before, merge(
        {g.hub.name: {"site/probe": 1}}, want_counts(g, [(E.Delivery.TYPE, PROBE)]),
        # the operator records a buyer's delivery only from the trade's buyer's registered meter
        {chain.name: {f"deliveries_refused:{PROBE}": 1, f"deliveries_refused:{SOLAR}": 1,
                      f"deliveries_refused:{HOME}": 1}},
        # the seller's cross-check believes only the buyer's site's announced meter keys; the buyer's meter
        # takes no other site's word for its trade either (each meter ignores its own site's)
        {g.meters[SOLAR].name: {f"deliveries_refused:{PROBE}": 1, f"deliveries_refused:{HOME}": 1,
                                "deliveries_refused_why:not_the_buyer": 1, "deliveries_refused_why:unknown_key": 1},
         g.meters[HOME].name: {f"deliveries_refused:{PROBE}": 1, f"deliveries_refused:{SOLAR}": 1,
                               "deliveries_refused_why:not_the_buyer": 2}}))

    # on-chain, too, only the buyer's meter pays: the seller's meter key (a Delivery, or the Export it signs
    # for its own cross-check) and keys no registry holds for the buyer are refused by the contract, whoever
    # submits them
    export = typed.sign_export(bytes(seller_meter.key.key), d.market_domain, tid, TRADE_WH)
    for wh, sig in ((TRADE_WH, seller_meter.delivery(d, tid, TRADE_WH).signature), (TRADE_WH, export),
                    (TRADE_WH, stranger.delivery(d, tid, TRADE_WH).signature),
                    (forged_wh, buyers_own.delivery(d, tid, forged_wh).signature)):
        for call in (v.market.functions.settle(world.key, wh, typed.sig_bytes(sig)),
                     v.market.functions.settleBatch([world.key], [wh], [typed.sig_bytes(sig)])):
            assert g.refusal(call, world.producer) == "EnergyMarket: signer is not the buyer's meter"

    # the operator holds the buyer's meter's own signed reading only, and settlement goes on following it
    rows = g.rows(chain, "chain", "SELECT site, meter, delivered_wh, signature FROM job_deliveries WHERE trade_id = ?",
                  (tid,))
    assert [(site, meter) for site, meter, _, _ in rows] == [(HOME, world.meter_address(HOME))], rows
    mine = {(b["delivered_wh"], b["signature"]) for b in buyer_meter_deliveries(world)}
    assert all((wh, sig) in mine for _, _, wh, sig in rows), rows
    g.wait("a settlement of the buyer's meter's later readings", lambda: on_chain(world)["delivered"] > max(
        settled_before, said_then), timeout=60)
    (settled, close_state), = g.rows(chain, "chain", "SELECT settled_wh, close_state FROM job_trades "
                                                      "WHERE trade_id = ?", (tid,))
    t = on_chain(world)
    signed_wh = [b["delivered_wh"] for b in buyer_meter_deliveries(world)]  # read last: it only grows
    assert t["status"] == bindings.STATUS_OPEN and close_state == "none"
    assert settled <= t["delivered"] <= max(signed_wh) < TRADE_WH, (settled, t, max(signed_wh))
    assert t["delivered"] in signed_wh  # exactly a figure the buyer's meter signed
    said = max(signed_wh)
    rest = escrow_at_rest(world)
    assert rest == at_rest, (rest, at_rest)
    # the seller's cross-check took only the buyer's meter: no false mismatch raised
    peer = g.rows(g.meters[SOLAR], "meter", "SELECT buyer_wh, flagged, site FROM meter_peer WHERE trade_id = ?",
                  (tid,))
    assert all(wh <= said and not flagged and site == HOME for wh, flagged, site in peer), (peer, said)
    assert g.outbox(g.meters[SOLAR], "meter", f"{E.MeterMismatch.TYPE}.{SOLAR}") == []


# --- trade and market events -------------------------------------------------------------


def test_trade_and_market_events_from_a_site_open_nothing_and_switch_no_relay(world: World) -> None:
    g, chain = world.g, world.g.chain
    before = g.counts()
    at_rest = escrow_at_rest(world)
    relays_before = {s: g.outbox(m, "meter", f"meter.relay.{s}") for s, m in g.meters.items()}
    a = world.agreed
    fake = dict(trade_id="t-forged", seller=world.producer, buyer=world.probe, seller_site=SOLAR, buyer_site=HOME,
                wh=10**6, price_wei_per_kwh=1)
    real = dict(trade_id=world.trade_id, seller=world.producer, buyer=world.consumer, seller_site=SOLAR,
                buyer_site=HOME, wh=TRADE_WH, price_wei_per_kwh=PRICE)
    own = [
        # a trade nobody agreed, carrying the parties' genuine signed offer and bid
        ev(E.TradeAgreed.TYPE, f"{PROBE}/auction", offer_id="o-forged", **{**fake, "buyer": world.consumer},
           offer=a["offer"], offer_signature=a["offer_signature"], bid=a["bid"], bid_signature=a["bid_signature"]),
        ev(E.TradeStatus.TYPE, f"{PROBE}/auction", state="delivering", **fake),  # relays closed for it
        ev(E.TradeStatus.TYPE, f"{PROBE}/auction", state="closed", **real),  # the real trade ended: relays open
        ev(E.TradeHeartbeat.TYPE, f"{PROBE}/auction", live=[], sites={}),  # nothing is live: relays open
        ev(E.TradeHeartbeat.TYPE, f"{PROBE}/auction", live=["t-forged"], sites={"t-forged": [SOLAR, HOME]}),
        ev(E.OfferOpened.TYPE, f"{PROBE}/auction", offer_id="o-forged", seller=world.producer, seller_site=SOLAR,
           wh=10**6, start_price_wei_per_kwh=1, opened_at=time.time(), ends_at=time.time() + 60),
        ev(E.OfferClosed.TYPE, f"{PROBE}/auction", offer_id=world.spare["offer_id"], outcome="cancelled"),
        ev(E.BidPlaced.TYPE, f"{PROBE}/auction", offer_id=world.spare["offer_id"], bid_id="b-forged",
           buyer=world.probe, buyer_site=PROBE, price_wei_per_kwh=10**30, placed_at=time.time()),
    ]
    in_markets_name = [ev(E.TradeStatus.TYPE, f"{MARKET}/auction", state="closed", **real),
                       ev(E.TradeHeartbeat.TYPE, f"{MARKET}/auction", live=[], sites={}),
                       ev(E.TradeAgreed.TYPE, f"{MARKET}/auction", offer_id="o-forged", **fake)]
    g.hostile("publish", {"frames": [*own, *in_markets_name]})
    g.expect_counts(before, merge({g.hub.name: {"site/probe": len(in_markets_name)}},
                                  want_counts(g, [(f["type"], PROBE) for f in own])))
    time.sleep(2.5)  # two readings and more: a relay that was told to move would have moved
    # no trade opened, nothing closed: not at the operator, not on-chain, not at the auction, not at the meters
    assert not g.rows(chain, "chain", "SELECT 1 FROM job_trades WHERE trade_id = 't-forged'")
    assert g.rows(chain, "chain", "SELECT open_state, close_state FROM job_trades WHERE trade_id = ?",
                  (world.trade_id,)) == [("done", "none")]
    assert not g.rows(chain, "chain", "SELECT 1 FROM chain_txs WHERE ref LIKE '%t-forged%'")
    v = g.chain_view()
    assert v.market.functions.trades(typed.trade_key("t-forged")).call()[2] == bindings.STATUS_NONE
    assert on_chain(world)["status"] == bindings.STATUS_OPEN
    assert escrow_at_rest(world) == at_rest
    listing = ok(g.requests(PROBE, "auction", req("auction.trades"), req("auction.offers")))
    assert {t["trade_id"] for t in listing[0]["result"]["trades"]} == {world.trade_id}
    spare = next(o for o in listing[1]["result"]["offers"] if o["offer_id"] == world.spare["offer_id"])
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
    return {(s, t): q for s, t, q in w.g.rows(p, name, "SELECT source, topic, seq FROM bus_offsets_now")}


def db_name(p: Any) -> str:
    return store_of(p)


def test_a_heartbeat_offset_jump_and_a_stalled_replay_lose_and_hold_up_nothing(world: World) -> None:
    g, auction = world.g, world.g.auction
    before = g.counts()
    at_rest = escrow_at_rest(world)
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
    # their relays would open after the trade timeout) and the operator hears the meters
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
    assert escrow_at_rest(world) == at_rest


# --- requests for another site's account ---------------------------------------------------


def test_a_site_cannot_act_for_another_sites_account(world: World) -> None:
    g, chain = world.g, world.g.chain
    p, c = world.producer, world.consumer
    a, spare = world.agreed, world.spare
    honest = {SOLAR: g.wallets[SOLAR], HOME: g.wallets[HOME]}
    before = g.counts()
    at_rest = escrow_at_rest(world)
    bids_placed = len(g.outbox(g.auction, "auction", f"{E.BidPlaced.TYPE}.{MARKET}"))
    txs = "SELECT account, COUNT(*) FROM chain_txs WHERE account IN (?, ?) GROUP BY account"
    nonces = "SELECT * FROM chain_nonces WHERE account IN (?, ?) ORDER BY account"
    txs_before = {s: g.rows(w, "wallet", txs, (p, c)) for s, w in honest.items()}
    nonces_before = {s: g.rows(w, "wallet", nonces, (p, c)) for s, w in honest.items()}
    op_txs = "SELECT COUNT(*) FROM chain_txs WHERE account NOT IN (?, ?)"
    operator, registrar = g.health(chain)["operator"], g.health(chain)["registrar"]
    op_txs_before = g.rows(chain, "chain", op_txs, (operator, registrar))
    limit = 5  # GRIDTRADE_UNLOCK_MAX_FAILURES (the default)
    later = int(time.time() + 3600)
    chain_attacks = [
        *(req("chain.unlock", address=p, passphrase=f"a guess {i}") for i in range(limit + 2)),
        req("chain.unlock", address=c, passphrase=g.consumer.passphrase),  # even the right passphrase
        req("chain.transfer", sender=c, to=world.probe, amount_wei=10**15),
        req("chain.escrow", account=c, action="withdraw", amount_wei=10**15),
        req("chain.escrow", account=c, action="deposit", amount_wei=1),
        req("chain.escrow", account=p, action="withdraw_credit", amount_wei=1),
        req("chain.approve", account=p, wh=1),
        req("chain.reserve", account=c, total_wei=0, until=0),  # e.g. release nothing, extend nothing
        # the signatures v2 pays from: an offer of the producer's, a bid of the consumer's
        req("chain.sign_offer", account=p, wh=10**6, min_price_wei_per_kwh=1, expiry=later, duration_s=60),
        req("chain.sign_bid", account=c, offer_id=spare["signed"]["offer"]["offer_id"], wh=SPARE_WH,
            max_price_wei_per_kwh=10**20, expiry=later),
        req("chain.lock", address=c),
        req("chain.accounts"),
        req("chain.pending", account=c),
    ]
    # at each honest site's wallet: refused before any work (no scrypt, no throttle slot, no signature), counted
    for site in honest:
        replies = g.requests(PROBE, f"wallet:{site}", *chain_attacks)
        assert [r["code"] for r in replies] == ["not_your_site"] * len(chain_attacks), (site, replies)
        assert all("nothing was done" in r["message"] for r in replies), replies
    # at the market's operator: it holds no user key and has no such handlers
    signing = [r for r in chain_attacks if r["type"] not in ("chain.accounts", "chain.pending")]
    replies = g.requests(PROBE, "chain", *signing)
    assert [r["code"] for r in replies] == ["unsupported"] * len(signing), replies

    # at the auction: offers and bids carry the party's own signature, and the party must be the calling site's
    probe_key = g.account_key(PROBE, world.probe, PROBE_PASS)
    forged_offer = typed.Offer(offer_id=typed.new_id(), seller=p, wh=10, min_price_wei_per_kwh=1, expiry=later,
                               duration_s=60)
    forged_bid = typed.Bid(bid_id=typed.new_id(), offer_id=spare["signed"]["offer"]["offer_id"], buyer=c,
                           wh=SPARE_WH, max_price_wei_per_kwh=PRICE, expiry=later)
    dom = g.domains().market_domain
    offer_of_p = dict(seller=p, wh=TRADE_WH, start_price_wei_per_kwh=PRICE // 2, duration_s=10, offer=a["offer"],
                      signature=a["offer_signature"])  # the producer's genuine signed offer (the sold one)
    bid_on_spare = dict(offer_id=spare["offer_id"], buyer=c, price_wei_per_kwh=PRICE)
    auction_attacks = [
        (req("auction.offer", seller_site=SOLAR, **offer_of_p), "not_your_account"),
        # naming itself, with the producer's own signature: the chain says whose account it is
        (req("auction.offer", seller_site=PROBE, **offer_of_p), "not_your_account"),
        # naming itself, an offer of the producer's signed by probe's key
        (req("auction.offer", seller=p, seller_site=PROBE, wh=10, start_price_wei_per_kwh=1, duration_s=60,
             offer=forged_offer.model_dump(mode="json"), signature=typed.sign_offer(probe_key, dom, forged_offer)),
         "bad_signature"),
        (req("auction.bid", buyer_site=HOME, bid=a["bid"], signature=a["bid_signature"], **bid_on_spare),
         "not_your_account"),
        # naming itself, a bid of the consumer's signed by probe's key
        (req("auction.bid", buyer_site=PROBE, bid=forged_bid.model_dump(mode="json"),
             signature=typed.sign_bid(probe_key, dom, forged_bid), **bid_on_spare), "bad_signature"),
        # ... the consumer's genuine bid, for another offer
        (req("auction.bid", buyer_site=PROBE, bid=a["bid"], signature=a["bid_signature"], **bid_on_spare),
         "invalid"),
        (req("auction.cancel", offer_id=spare["offer_id"], seller=p), "not_allowed"),
        (req("auction.close", trade_id=world.trade_id, by=c), "not_allowed"),
        (req("auction.close", trade_id=world.trade_id, by=p), "not_allowed"),
    ]
    replies = g.requests(PROBE, "auction", *(r for r, _ in auction_attacks))
    assert [r["code"] for r in replies] == [code for _, code in auction_attacks], replies
    # counted at each wallet by the calling site; no unlock attempt started (none throttled)
    g.expect_counts(before, {w.name: {f"refused:{PROBE}": len(chain_attacks), "unlocks_throttled": 0}
                             for w in honest.values()})

    # nothing sent for them, nothing changed at the auction or on-chain; their sessions stay theirs
    for site, w in honest.items():
        assert g.rows(w, "wallet", txs, (p, c)) == txs_before[site], site
        assert g.rows(w, "wallet", nonces, (p, c)) == nonces_before[site], site
    assert g.rows(chain, "chain", op_txs, (operator, registrar)) == op_txs_before  # the market signs for itself only
    assert escrow_at_rest(world) == at_rest
    assert len(g.outbox(g.auction, "auction", f"{E.BidPlaced.TYPE}.{MARKET}")) == bids_placed
    listing = ok(g.requests(PROBE, "auction", req("auction.offers"), req("auction.trades")))
    open_offers = [o for o in listing[0]["result"]["offers"] if o["state"] == "open"]
    assert [(o["offer_id"], o["bids"]) for o in open_offers] == [(spare["offer_id"], 0)], open_offers
    trade = next(t for t in listing[1]["result"]["trades"] if t["trade_id"] == world.trade_id)
    assert trade["state"] in ("recorded", "delivering"), trade
    for site, acct in ((SOLAR, p), (HOME, c)):
        listed = ok(g.requests(site, f"wallet:{site}", req("chain.accounts")))[0]["result"]["accounts"]
        assert {x["address"]: x["unlocked"] for x in listed} == {acct: True}, (site, listed)
    # the guesses at solar-1's account took no throttle slot there: its own site unlocks it at once
    ok(g.requests(SOLAR, f"wallet:{SOLAR}", req("chain.unlock", address=p, passphrase=g.producer.passphrase)))


# --- escrow under a bid --------------------------------------------------------------------


def test_a_bid_whose_escrow_is_not_reserved_on_chain_is_refused(world: World) -> None:
    """probe bids for the open offer with its own account: its free escrow, or a
    reservation too small or ending before the bid does, funds nothing."""
    g, spare = world.g, world.spare
    need = cost(SPARE_WH, PRICE)
    expiry = int(spare["ends_at"] + GRACE_S)
    ok(g.requests(PROBE, f"wallet:{PROBE}", req("chain.unlock", address=world.probe, passphrase=PROBE_PASS),
                  {**req("chain.escrow", account=world.probe, action="deposit", amount_wei=need),
                   "retry_on": RETRY, "retry_s": 30}))
    g.wait("probe's deposit", lambda: escrow(g, world.probe)["free"] == need, timeout=30)
    bids_placed = len(g.outbox(g.auction, "auction", f"{E.BidPlaced.TYPE}.{MARKET}"))
    at_rest = escrow_at_rest(world)

    def place(bid_expiry: int) -> dict[str, Any]:
        signed = sign_bid(g, PROBE, world.probe, spare, PRICE, bid_expiry)
        return g.requests(PROBE, "auction", bid_req(spare, world.probe, PROBE, PRICE, signed))[0]

    tried = [place(expiry)]  # free escrow only: nothing reserved
    ok(g.requests(PROBE, f"wallet:{PROBE}", req("chain.reserve", account=world.probe, total_wei=need // 2,
                                                until=expiry)))
    tried.append(place(expiry))  # reserved until the bid's expiry, but half of what it needs
    ok(g.requests(PROBE, f"wallet:{PROBE}", req("chain.reserve", account=world.probe, total_wei=need, until=expiry)))
    tried.append(place(expiry + 600))  # reserved in full, but until before this bid's expiry
    assert [r["code"] for r in tried] == ["unfunded"] * 3, tried
    assert "reserved only until" in tried[2]["message"], tried[2]
    # nothing taken: no bid on the offer, nothing announced; the escrow is where the wallet put it
    offer = next(o for o in ok(g.requests(PROBE, "auction", req("auction.offers")))[0]["result"]["offers"]
                 if o["offer_id"] == spare["offer_id"])
    assert (offer["state"], offer["bids"], offer["highest_bidder"]) == ("open", 0, None), offer
    assert len(g.outbox(g.auction, "auction", f"{E.BidPlaced.TYPE}.{MARKET}")) == bids_placed
    now = escrow(g, world.probe)
    assert (now["free"], now["reserved"], now["until"]) == (0, need, expiry), now
    rest = escrow_at_rest(world)
    assert {k: v for k, v in rest.items() if k != "probe"} == {k: v for k, v in at_rest.items() if k != "probe"}


def test_reserved_escrow_cannot_be_withdrawn_under_a_live_bid(world: World) -> None:
    """probe's bid, funded by escrow reserved until it expires, is taken; then probe tries to
    take that escrow back, through its wallet and on-chain with its own key."""
    g, spare = world.g, world.spare
    v = g.chain_view()
    need = cost(SPARE_WH, PRICE)
    expiry = int(spare["ends_at"] + GRACE_S)
    signed = sign_bid(g, PROBE, world.probe, spare, PRICE, expiry)
    ok(g.requests(PROBE, "auction", bid_req(spare, world.probe, PROBE, PRICE, signed)))
    held = escrow(g, world.probe)
    assert (held["free"], held["reserved"], held["until"]) == (0, need, expiry), held
    at_rest = escrow_at_rest(world)
    # its wallet sends nothing
    r = g.requests(PROBE, f"wallet:{PROBE}", req("chain.escrow", account=world.probe, action="withdraw",
                                                 amount_wei=need))[0]
    assert r["code"] == "insufficient_escrow" and "reserved for bids until" in r["message"], r
    # its own key, around the wallet: the market refuses each, mined and failed
    key = g.account_key(PROBE, world.probe, PROBE_PASS)
    m = v.market.functions
    ether = v.w3.eth.get_balance(world.probe)
    fees = 0
    for call, reason in ((m.withdraw(need), "EnergyMarket: amount exceeds withdrawable escrow"),
                         (m.withdraw(1), "EnergyMarket: amount exceeds withdrawable escrow"),
                         (m.release(need), "EnergyMarket: escrow reserved until later")):
        assert g.refusal(call, world.probe) == reason
        receipt = g.send(key, call)
        assert receipt["status"] == 0, receipt
        fees += receipt["gasUsed"] * receipt["effectiveGasPrice"]
    # the bid stays funded: the escrow stays reserved until the bid expires, only the gas was spent
    assert escrow_at_rest(world) == at_rest
    assert v.w3.eth.get_balance(world.probe) == ether - fees
    offer = next(o for o in ok(g.requests(PROBE, "auction", req("auction.offers")))[0]["result"]["offers"]
                 if o["offer_id"] == spare["offer_id"])
    assert (offer["state"], offer["bids"], offer["highest_bidder"]) == ("open", 1, world.probe), offer
    assert not [e for e in v.market.events.Withdrawn().get_logs(from_block=0) if e["args"]["account"] == world.probe]


# --- unlocking -----------------------------------------------------------------------------


def test_unlock_guessing_is_throttled_before_scrypt(world: World) -> None:
    """At probe's own wallet (at another site's wallet it is refused before the throttle,
    see above)."""
    g, wallet = world.g, world.g.wallets[PROBE]
    before = g.counts()
    at_rest = escrow_at_rest(world)
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
    assert escrow_at_rest(world) == at_rest


# --- account claims and wallet transactions -------------------------------------------------


def test_a_site_cannot_claim_another_sites_account_or_forge_its_wallet_txs(world: World) -> None:
    g, chain = world.g, world.g.chain
    before = g.counts()
    at_rest = escrow_at_rest(world)
    data = g.stack.data.resolve()
    home_claim = next(kf.claim for kf in Keystore(data / HOME / "keystore").list() if kf.address == world.consumer)
    probe_claim = next(kf.claim for kf in Keystore(data / PROBE / "keystore").list() if kf.address == world.probe)
    nobody = "0x" + "42" * 20  # an address nobody claimed
    # (a source of its own: the seqs of probe/wallet are its real wallet's)
    forger = f"{PROBE}/forger"
    claims = [
        # home-7's genuine claim of its own account, replayed in home-7's name: dropped at the hub
        ev(E.WalletAccount.TYPE, f"{HOME}/wallet", site=HOME, address=world.consumer, signature=home_claim),
        # the same under its own topic: the body names another site (policy)
        ev(E.WalletAccount.TYPE, forger, site=HOME, address=world.consumer, signature=home_claim),
        # in its own name, another site's account, with that site's signature (of another text)
        ev(E.WalletAccount.TYPE, forger, site=PROBE, address=world.consumer, signature=home_claim),
        # ... with its own account key's signature (of its own address)
        ev(E.WalletAccount.TYPE, forger, site=PROBE, address=world.producer, signature=probe_claim),
        # ... a signature that is nobody's
        ev(E.WalletAccount.TYPE, forger, site=PROBE, address=world.producer, signature="0x" + "11" * 65),
        # an address nobody claimed yet, with a signature not of its key
        ev(E.WalletAccount.TYPE, forger, site=PROBE, address=nobody, signature=probe_claim),
    ]
    fake_tx = dict(tx_hash="0x" + "ab" * 32, kind="deposit", ref=str(10**18), account=world.consumer,
                   status="confirmed", block=1)
    txs = [
        # a deposit the consumer never made, shown in its wallet: in home-7's name, dropped at the hub
        ev(E.WalletTx.TYPE, f"{HOME}/wallet", site=HOME, **fake_tx),
        # from its own source but under home-7's topic (the one the consumer's gateway takes): the same
        ev(E.WalletTx.TYPE, forger, topic_site=HOME, site=HOME, **fake_tx),
    ]
    out = g.hostile("publish", {"frames": [*claims, *txs]})
    # (under its own topic a wallet.tx reaches nobody: a gateway takes its own site's only)
    assert out["sent"] == len(claims) + len(txs)
    g.expect_counts(before, merge({g.hub.name: {"site/probe": 1 + len(txs)}},
                                  want_counts(g, [(E.WalletAccount.TYPE, PROBE)]),
                                  {chain.name: {"claims_refused:bad_signature": 4, "claims_refused:other_site": 0}}))
    # every account still belongs to its own site at the operator; nothing bound to probe but its own
    for address, site in ((world.consumer, HOME), (world.producer, SOLAR), (world.probe, PROBE), (nobody, "")):
        assert balances(world, address)["site"] == site, (address, balances(world, address))
    (n,), = g.rows(chain, "chain", "SELECT COUNT(*) FROM account_claims WHERE site = ?", (PROBE,))
    assert n == 1
    # the consumer's gateway showed no forged transaction (it refused nothing: nothing reached it)
    gw = next(p for p in g.subscribers() if store_of(p) == "gateway")
    assert not any(k.startswith("policy:wallet.") for k in g.health(gw)["dropped"])
    assert escrow_at_rest(world) == at_rest


def balances(w: World, address: str) -> dict[str, Any]:
    return dict(ok(w.g.requests(PROBE, "chain", req("chain.balances", address=address)))[0]["result"])


# --- what even the market's own auction cannot do ---------------------------------------


def test_a_trade_agreed_with_altered_signed_terms_is_refused_by_the_contract(world: World) -> None:
    """The bus takes a TradeAgreed from the market's auction only (see above); here it comes
    from the market's own key, as from an auction gone wrong: the operator opens what it
    says, and the market contract refuses every term the parties did not sign. (It takes
    the next seqs of the auction's trade.agreed topic: the grid agrees no trade after it.)"""
    g, chain = world.g, world.g.chain
    a, v = world.agreed, world.g.chain_view()
    topic = f"{E.TradeAgreed.TYPE}.{MARKET}"
    (last,), = g.rows(g.auction, "auction", "SELECT MAX(seq) FROM bus_outbox WHERE topic = ?", (topic,))
    g.continue_seqs(MARKET, {(f"{MARKET}/auction", topic): last})
    offer, bid = typed.Offer.model_validate(a["offer"]), typed.Bid.model_validate(a["bid"])
    probe_key = g.account_key(PROBE, world.probe, PROBE_PASS)
    # a bid naming the consumer for the offer, at ten times the price, signed by probe's key
    swapped = bid.model_copy(update={"bid_id": typed.new_id(), "max_price_wei_per_kwh": 10 * PRICE})
    terms = dict(offer_id=a["offer_id"], seller=world.producer, buyer=world.consumer, seller_site=SOLAR,
                 buyer_site=HOME, offer=a["offer"], offer_signature=a["offer_signature"])
    forged = {
        # the buyer's signed bid, its price limit and energy raised after signing
        "t-altered": (dict(wh=2 * TRADE_WH, price_wei_per_kwh=10 * PRICE,
                           bid={**a["bid"], "wh": 2 * TRADE_WH, "max_price_wei_per_kwh": 10 * PRICE},
                           bid_signature=a["bid_signature"]), "EnergyMarket: bid not signed by buyer"),
        # both genuine signatures again, for another trade: the offer and the bid are filled already
        "t-again": (dict(wh=TRADE_WH, price_wei_per_kwh=PRICE, bid=a["bid"], bid_signature=a["bid_signature"]),
                    "EnergyMarket: offer overfilled"),
        "t-swapped": (dict(wh=TRADE_WH, price_wei_per_kwh=10 * PRICE, bid=swapped.model_dump(mode="json"),
                           bid_signature=typed.sign_bid(probe_key, g.domains().market_domain, swapped)),
                      "EnergyMarket: bid not signed by buyer"),
    }
    at_rest = escrow_at_rest(world)
    failed_before = [e["body"]["ref"] for e in g.outbox(chain, "chain", f"{E.ChainTx.TYPE}.{MARKET}")
                     if e["body"]["status"] == "failed"]
    before = g.counts()
    g.hostile("publish", {"frames": [ev(E.TradeAgreed.TYPE, f"{MARKET}/auction", trade_id=tid, **terms, **t)
                                     for tid, (t, _) in forged.items()]}, site=MARKET)
    g.wait("the operator to have tried each", lambda: sorted(r for r, in g.rows(
        chain, "chain", "SELECT trade_id FROM job_trades WHERE open_state = 'failed'")) == sorted(forged), timeout=60)
    for tid, (_, reason) in forged.items():
        (why,), = g.rows(chain, "chain", "SELECT reason FROM job_trades WHERE trade_id = ?", (tid,))
        assert reason in why, (tid, why)
        assert v.market.functions.trades(typed.trade_key(tid)).call()[2] == bindings.STATUS_NONE
    # said on the bus, as the operator says a refused job (chain.tx failed); nothing sent, nothing moved
    failed = [e["body"]["ref"] for e in g.outbox(chain, "chain", f"{E.ChainTx.TYPE}.{MARKET}")
              if e["body"]["status"] == "failed"]
    assert sorted(set(failed) - set(failed_before)) == sorted(forged)
    assert not g.rows(chain, "chain", "SELECT 1 FROM chain_txs WHERE ref LIKE 't-altered%' OR ref LIKE 't-again%' "
                                      "OR ref LIKE 't-swapped%'")
    assert escrow_at_rest(world) == at_rest
    assert [e for e in v.market.events.TradeOpened().get_logs(from_block=0)] == [
        e for e in v.market.events.TradeOpened().get_logs(from_block=0) if e["args"]["tradeId"] == world.key]
    # the bus passed them (the market's key, the auction's source): nobody dropped anything
    g.expect_counts(before, {p.name: {f"policy:{E.TradeAgreed.TYPE}": 0} for p in g.subscribers()}, timeout=5)


# --- the dispute window, and the honest path in the same grid --------------------------------


def test_a_buyer_closing_early_cannot_keep_a_later_delivery_from_settling(world: World) -> None:
    """The buyer's site closes the trade on-chain with its own account key while its meter
    still takes the seller's energy (nothing told the meters), hoping to pay for what was
    settled so far. The buyer's meter's later signed readings still settle during the
    dispute window; then the buyer presses Close Connection, and the trade is finalized for
    exactly what its meter measured."""
    g, chain = world.g, world.g.chain
    v = g.chain_view()
    window = v.market.functions.disputeWindow().call()
    assert window == DISPUTE_WINDOW_S
    key = g.account_key(HOME, world.consumer, g.consumer.passphrase)
    c_before = escrow(g, world.consumer)
    receipt = g.send(key, v.market.functions.close(world.key))
    assert receipt["status"] == 1, receipt
    t = on_chain(world)
    assert t["status"] == bindings.STATUS_CLOSING, t
    at_close, closing_at = t["delivered"], t["closing_at"]
    said_at_close = buyer_meter_delivered(world)
    # the meters go on: the buyer's meter's next signed readings settle in the window
    g.wait("a later signed delivery to settle", lambda: on_chain(world)["delivered"] > max(at_close, said_at_close),
           timeout=window)
    later = [e for e in v.market.events.Settled().get_logs(from_block=receipt["blockNumber"] + 1)
             if e["args"]["tradeId"] == world.key]
    assert later, "nothing settled after the buyer's close"
    assert all(closing_at <= v.w3.eth.get_block(e["blockNumber"])["timestamp"] < closing_at + window for e in later)
    assert on_chain(world)["status"] == bindings.STATUS_CLOSING
    # the buyer presses Close Connection: the relays open, the meter's last reading settles, and after the
    # window the trade is finalized
    ok(g.requests(HOME, "auction", req("auction.close", trade_id=world.trade_id, by=world.consumer)))
    g.wait("both relays to open", lambda: not any(g.health(m)["meters"]["main"]["relay_closed"]
                                                  for m in g.meters.values()), timeout=30)
    g.wait("the trade to be finalized", lambda: g.rows(
        chain, "chain", "SELECT 1 FROM job_trades WHERE trade_id = ? AND close_state = 'done'", (world.trade_id,)),
        timeout=window + 60)
    final = [d for d in buyer_meter_deliveries(world) if d["final"]]
    assert len(final) == 1, final
    delivered = final[0]["delivered_wh"]
    t = on_chain(world)
    assert t["status"] == bindings.STATUS_CLOSED and t["delivered"] == delivered == buyer_meter_delivered(world), t
    assert at_close < delivered < TRADE_WH
    (settled,), = g.rows(chain, "chain", "SELECT settled_wh FROM job_trades WHERE trade_id = ?", (world.trade_id,))
    assert settled == delivered
    closed = [e["args"] for e in v.market.events.TradeClosed().get_logs(from_block=0)
              if e["args"]["tradeId"] == world.key]
    assert len(closed) == 1 and closed[0]["deliveredWh"] == delivered, closed
    assert closed[0]["refundedWei"] == cost(TRADE_WH, PRICE) - cost(delivered, PRICE)
    assert closed[0]["returnedWh"] == TRADE_WH - delivered
    # the seller is paid for every Wh the buyer's meter signed; the buyer keeps the rest, in free escrow
    c, p = escrow(g, world.consumer), escrow(g, world.producer)
    assert p["credit"] == cost(delivered, PRICE), p
    assert (c["locked"], c["reserved"]) == (0, 0), c
    assert c["free"] == c_before["free"] + cost(TRADE_WH, PRICE) - cost(delivered, PRICE) == DEPOSIT - cost(
        delivered, PRICE), (c, c_before)
    assert c["tokens"] == delivered


def test_the_honest_path_still_works_after_the_attacks(world: World) -> None:
    g, chain = world.g, world.g.chain
    v = g.chain_view()
    solar_meter = world.meter_address(SOLAR)
    # the producer's own production is still minted to it
    minted = v.token.functions.mintedOf(solar_meter).call()
    g.wait("a new mint of the producer's own", lambda: v.token.functions.mintedOf(solar_meter).call() > minted,
           timeout=60)
    produced = [e["body"]["produced_wh"] for e in g.outbox(g.meters[SOLAR], "meter",
                                                           f"{E.EnergyProduced.TYPE}.{SOLAR}")]
    assert v.token.functions.mintedOf(solar_meter).call() in produced
    (row,), = g.rows(chain, "chain", "SELECT site FROM job_production WHERE meter = ?", (solar_meter,))
    assert row == SOLAR
    # the hub dropped the probe's messages only; the honest services' subscribers refused
    # nothing of the honest sites' own services (every policy drop above was a hostile's)
    assert all(k.endswith(f"/{PROBE}") for k in g.health(g.hub)["hub_dropped"]), g.health(g.hub)
