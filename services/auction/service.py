"""The auction service: the wiring between the pure engines, the store and the bus.

- Request/reply: PlaceOffer, PlaceBid, CancelOffer, CloseTrade, ListOffers, ListTrades,
  PlaceOrder, ListOrders (the double auction's book of the call being collected and the
  latest cleared calls). A site acts only for itself: the site of an offer, bid or order must be the
  calling site (the request server's ``Caller``, from its key) and its account must
  belong to that site (the chain service says whose it is, with the balances asked
  anyway), else ``not_your_account``; an offer is cancelled only by its seller's site, a
  trade closed only by its buyer's site, its seller's site or the market's own site
  (which alone may close as the operator), else ``not_allowed``. Listings are public. A
  caller without identity (insecure mode, a local ipc socket) is not checked against the
  body's site. Every command runs inside one store transaction together with the events
  it publishes (the outbox lives in the same SQLite file) and the stored reply of its
  command id, so a command is applied, announced and answered all at once or not at all.
- Signed offers and bids (contracts v2): every offer, bid and order carries the seller's
  signed offer or the buyer's signed bid, checked against the market domain of the
  operator's deployment (followed from ``chain.deployment``, kept in the store) by
  :mod:`services.auction.signed`: a forged, altered, replayed, expired or foreign one is
  refused (``bad_signature``, ``invalid``, ``replayed``) and nothing changes. A bid (or a
  buy order) must be covered by the buyer's escrow reserved on-chain until the bid's
  expiry, together with what its other winning bids, buy orders and unopened trades
  hold (``unfunded`` says how much to reserve). ``TradeAgreed`` carries both signed
  facts: the operator opens the trade from them.
- A winning bid whose trade the chain could not open (``ChainTx`` open failed) is
  followed by the next-best bid of another buyer that is still valid and funded: a new
  trade ``t-<offer>-<n>``; the failed one stays failed.
- A ``MeterMismatch`` from the trade's seller's site closes the trade, with the
  reason in words in its ``TradeStatus``.
- The market clock (english): sleeps until the earliest open deadline, then closes every
  due offer in one transaction; on start it first settles whatever fell due while the
  service was down. Deadlines are absolute Unix times in the store.
- The call clock (double): clears every round whose end has passed, once (a round is
  recorded when cleared).
- Trade lifecycle: follows the chain's and the meters' events; announces each step as
  ``TradeStatus`` and the live trades as ``TradeHeartbeat`` every second.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from typing import Any, ClassVar

from services.bus import Caller, Envelope, RequestError, RequestTimeout, Service, refusals
from services.bus import commands as cmd
from services.bus import events as ev
from services.bus import typed
from services.bus.envelope import caused_by
from services.bus.prices import wei_for
from services.bus.states import OPEN
from services.bus.states import TradeState as S

from . import book, double, english, lifecycle, signed
from .config import AuctionSettings

log = logging.getLogger(__name__)


def trade_status(t: lifecycle.Trade, step: lifecycle.Step | None = None) -> ev.TradeStatus:
    return ev.TradeStatus(trade_id=t.trade_id, state=step.state if step else t.state, seller=t.seller, buyer=t.buyer,
                          seller_site=t.seller_site, buyer_site=t.buyer_site, wh=t.wh,
                          price_wei_per_kwh=t.price_wei_per_kwh,
                          delivered_wh=step.delivered_wh if step else t.delivered_wh,
                          reason=step.reason if step else t.reason)


def mismatch_reason(body: ev.MeterMismatch) -> str:
    """Why the seller's site closed the trade, in words."""
    words = body.reason or (f"its meter counted {body.seller_wh} Wh sent and the buyer's meter {body.buyer_wh} Wh "
                            f"received, past the tolerance of {body.tolerance:g}")
    return f"closed by the seller's site: {words}"[:300]


class AuctionService(Service):
    name: ClassVar[str] = "auction"
    settings: AuctionSettings

    def __init__(self, settings: AuctionSettings) -> None:
        super().__init__(settings)
        self._deadline_changed = asyncio.Event()
        self._fallback_wake = asyncio.Event()
        self.settled_offers = 0
        self.cleared_rounds = 0
        self.deployment: ev.Deployment | None = None

    # --- wiring ---------------------------------------------------------------------

    async def setup(self) -> None:
        s = self.settings
        book.create(self.store.conn)  # executescript commits on its own: outside any transaction
        raw = book.get_meta(self.store.conn, "deployment")
        self.deployment = ev.Deployment.model_validate_json(raw) if raw else None
        self.bus = self.publisher()
        self.chain = self.client(s.chain_rpc, s.chain_site)
        self.rpc = self.serve(s.bind)
        for req_cls, fn in ((cmd.CancelOffer, self.cancel_offer), (cmd.CloseTrade, self.close_trade),
                            (cmd.ListOffers, self.list_offers), (cmd.ListTrades, self.list_trades),
                            (cmd.ListOrders, self.list_orders),
                            (cmd.Ping, self.ping)):
            self.rpc.handle(req_cls, fn)
        # what the chain says is asked before the command's transaction: a slow chain holds
        # up that command only, not the other commands and the market clock
        self.rpc.handle(cmd.PlaceOffer, self.place_offer, prefetch=self.offer_balances)
        self.rpc.handle(cmd.PlaceBid, self.place_bid, prefetch=self.bid_balances)
        self.rpc.handle(cmd.PlaceOrder, self.place_order, prefetch=self.order_balances)
        self.subscribe([ev.TradeRecorded.TYPE, ev.TradeClosed.TYPE, ev.Settled.TYPE, ev.ChainTx.TYPE,
                        ev.Delivery.TYPE, ev.MeterMismatch.TYPE, ev.Deployment.TYPE], self.on_event)
        if s.english:
            self.spawn(self._market_clock(), "auction-clock")
            self.spawn(self._fallbacks(), "auction-fallbacks")
        if s.double:
            self.spawn(self._call_clock(), "auction-calls")
        self.spawn(self._heartbeats(), "auction-trade-heartbeat")

    def health(self) -> dict[str, Any]:
        h = super().health()
        h.update(market=self.settings.auction_market, settled_offers=self.settled_offers,
                 cleared_rounds=self.cleared_rounds,
                 deployment=self.deployment.deployment if self.deployment else None)
        return h

    async def ping(self, req: cmd.Ping, caller: Caller) -> cmd.Pong:
        return cmd.Pong(node=self.source, uptime_s=time.time() - self.started_at)

    @staticmethod
    def _acts_for(caller: Caller, site: str) -> None:
        """The body names ``site``: only that site's key may send it."""
        if not caller.may_act_for(site):
            raise refusals.NotYourAccount(f"this request came from site {caller}, not {site}: a site acts only "
                                          "for its own accounts; nothing was done")

    @staticmethod
    def _belongs(bal: cmd.Balances, address: str, site: str) -> None:
        """The chain service says whose account ``address`` is: it must be ``site``'s."""
        if not bal.site:
            raise refusals.UnknownAccount(f"the chain service holds no account {address}; nothing was done")
        if bal.site != site:
            raise refusals.NotYourAccount(f"account {address} belongs to site {bal.site}, not {site}; "
                                          "nothing was done")

    def _need(self, market: str) -> None:
        if not getattr(self.settings, market):
            raise refusals.Unsupported(f"this market does not run the {market} auction "
                                       f"(GRIDTRADE_AUCTION_MARKET={self.settings.auction_market})")

    @property
    def conn(self) -> sqlite3.Connection:
        return self.store.conn

    def _domain(self) -> typed.Domain:
        """The EIP-712 domain every signed offer and bid must be in: the operator's market."""
        d = self.deployment
        if d is None:
            raise refusals.Unavailable("the market's contracts are not announced yet (chain.deployment): signed "
                                       "offers and bids cannot be checked; try again later")
        return typed.market_domain(d.chain_id, d.market)

    @property
    def grace_s(self) -> float:
        return self.settings.auction_expiry_grace_s

    def _not_taken(self, table: str, signed_id: str, what: str) -> None:
        taken = book.signed_taken(self.conn, table, signed_id)
        if taken is not None:
            raise refusals.Replayed(f"this signed {what} ({signed_id}) was placed already ({taken}): sign a new "
                                    "one; nothing was done")

    def _follow(self, body: ev.Deployment, conn: sqlite3.Connection) -> None:
        """The operator announced its contracts: offers and bids are signed for its market."""
        d = self.deployment
        if d is not None and (d.deployment, d.market.lower(), d.chain_id) == \
                (body.deployment, body.market.lower(), body.chain_id):
            return
        book.set_meta(conn, "deployment", body.model_dump_json())
        log.info("the operator announced contracts: market %s on chain %s (deployment %s)", body.market, body.chain_id,
                 body.deployment)
        self.store.on_commit(lambda: setattr(self, "deployment", body))

    async def balances(self, address: str, what: str) -> cmd.Balances:
        try:
            reply: cmd.Balances = await self.chain.request(cmd.GetBalances(address=address),
                                                           timeout=self.settings.auction_balance_timeout_s)
        except RequestTimeout:
            raise refusals.Unavailable(f"cannot check {what} now: the chain service does not answer") from None
        except RequestError as e:
            raise refusals.Unavailable(f"cannot check {what} now: the chain service says {e.code}: {e.message}") \
                from None
        return reply

    # --- english --------------------------------------------------------------------

    async def offer_balances(self, req: cmd.PlaceOffer, caller: Caller) -> cmd.Balances:
        self._need("english")
        self._acts_for(caller, req.seller_site)
        if req.duration_s > self.settings.auction_max_duration_s:
            raise refusals.Invalid(f"the longest auction is {self.settings.auction_max_duration_s:g} s")
        signed.check_offer(self._domain(), req.offer, req.signature, seller=req.seller, wh=req.wh,
                           min_price_wei_per_kwh=req.start_price_wei_per_kwh,
                           min_expiry=time.time() + req.duration_s + self.grace_s, grace_s=self.grace_s)
        bal = await self.balances(req.seller, "tokens")
        self._belongs(bal, req.seller, req.seller_site)
        return bal

    async def place_offer(self, req: cmd.PlaceOffer, caller: Caller, bal: cmd.Balances) -> cmd.OfferPlaced:
        now = time.time()
        signed.check_expiry(req.offer.expiry, now + req.duration_s + self.grace_s, "offer", self.grace_s)
        self._not_taken("offers", req.offer.offer_id, "offer")
        reserved = book.reserved_wh(self.conn, req.seller)
        offer_id = f"o-{book.next_number(self.conn, 'offer')}"
        try:
            offer = english.open_offer(offer_id=offer_id, seller=req.seller, seller_site=req.seller_site, wh=req.wh,
                                       start_price_wei_per_kwh=req.start_price_wei_per_kwh, duration_s=req.duration_s,
                                       now=now, tokens_free_wh=bal.tokens_wh - reserved, signed=req.offer,
                                       signature=req.signature)
        except refusals.Refusal as e:
            if isinstance(e, refusals.NoTokens) and reserved:
                raise refusals.NoTokens(f"{e.message} ({reserved} Wh already held by open offers and trades)") from None
            raise
        book.insert_offer(self.conn, offer)
        opened = await self.bus.publish(ev.OfferOpened(offer_id=offer.offer_id, seller=offer.seller,
                                                       seller_site=offer.seller_site, wh=offer.wh,
                                                       start_price_wei_per_kwh=offer.start_price_wei_per_kwh,
                                                       opened_at=offer.opened_at, ends_at=offer.ends_at))
        book.set_offer_cause(self.conn, offer.offer_id, opened.id)
        self.store.on_commit(self._deadline_changed.set)
        return cmd.OfferPlaced(offer_id=offer.offer_id, ends_at=offer.ends_at)

    async def bid_balances(self, req: cmd.PlaceBid, caller: Caller) -> cmd.Balances:
        """A bid the rules refuse anyway is refused without asking the chain."""
        self._need("english")
        self._acts_for(caller, req.buyer_site)
        offer = book.get_offer(self.conn, req.offer_id)
        english.check_bid(offer, buyer=req.buyer, price_wei_per_kwh=req.price_wei_per_kwh, now=time.time(),
                          min_increment_wei_per_kwh=self.settings.auction_min_increment_wei_per_kwh)
        assert offer is not None
        self._check_signed_bid(offer, req)
        bal = await self.balances(req.buyer, "escrow")
        self._belongs(bal, req.buyer, req.buyer_site)
        return bal

    async def place_bid(self, req: cmd.PlaceBid, caller: Caller, bal: cmd.Balances) -> cmd.BidAccepted:
        now = time.time()  # when it reached us (inside the lock: the clock cannot close it meanwhile)
        inc = self.settings.auction_min_increment_wei_per_kwh
        offer = book.get_offer(self.conn, req.offer_id)
        needed = english.check_bid(offer, buyer=req.buyer, price_wei_per_kwh=req.price_wei_per_kwh, now=now,
                                   min_increment_wei_per_kwh=inc)
        assert offer is not None
        self._check_signed_bid(offer, req)
        self._not_taken("bids", req.bid.bid_id, "bid")
        english.check_reserve(needed_wei=needed, reserved_wei=bal.escrow_reserved_wei,
                              reserved_until=bal.reserved_until, expiry=req.bid.expiry,
                              held_wei=book.reserved_wei(self.conn, req.buyer, except_offer=offer.offer_id))
        bid_id = f"b-{book.next_number(self.conn, 'bid')}"
        offer, bid = english.place_bid(offer, bid_id=bid_id, buyer=req.buyer, buyer_site=req.buyer_site,
                                       price_wei_per_kwh=req.price_wei_per_kwh, now=now, min_increment_wei_per_kwh=inc,
                                       signed=req.bid, signature=req.signature)
        book.save_bid(self.conn, offer, bid)
        placed = await self.bus.publish(ev.BidPlaced(offer_id=offer.offer_id, bid_id=bid.bid_id, buyer=bid.buyer,
                                                     buyer_site=bid.buyer_site, price_wei_per_kwh=bid.price_wei_per_kwh,
                                                     wh=offer.wh, placed_at=bid.placed_at))
        book.set_offer_cause(self.conn, offer.offer_id, placed.id)  # the highest bid decides the end
        return cmd.BidAccepted(bid_id=bid.bid_id)

    def _check_signed_bid(self, offer: english.Offer, req: cmd.PlaceBid) -> None:
        if offer.signed is None:
            raise refusals.Closed(f"offer {offer.offer_id} carries no signed offer: no trade can be opened from it")
        signed.check_bid(self._domain(), req.bid, req.signature, buyer=req.buyer, offer_id=offer.signed.offer_id,
                         wh=offer.wh, max_price_wei_per_kwh=req.price_wei_per_kwh,
                         min_expiry=offer.ends_at + self.grace_s, grace_s=self.grace_s)

    async def cancel_offer(self, req: cmd.CancelOffer, caller: Caller) -> cmd.Ok:
        now = time.time()
        offer = book.get_offer(self.conn, req.offer_id)
        if offer is not None and not caller.may_act_for(offer.seller_site):
            raise refusals.NotAllowed(f"offer {offer.offer_id} is site {offer.seller_site}'s: only its seller's "
                                      "site can cancel it")
        offer = english.cancel(offer, seller=req.seller, now=now)
        book.close_offer(self.conn, offer, now)
        await self.bus.publish(ev.OfferClosed(offer_id=offer.offer_id, outcome="cancelled"))
        self.store.on_commit(self._deadline_changed.set)
        return cmd.Ok()

    async def settle_due(self) -> int:
        """Close every offer whose deadline has passed, in one transaction; returns how many."""
        async with self.store.atomic() as conn:
            now = time.time()
            due = book.due_offers(conn, now)
            for offer in due:
                with caused_by(book.offer_cause(conn, offer.offer_id)):  # the winning bid, or the opening
                    await self._settle(conn, offer, now)
        self.settled_offers += len(due)
        return len(due)

    async def _settle(self, conn: sqlite3.Connection, offer: english.Offer, now: float) -> None:
        done = english.settle(offer, now)
        book.close_offer(conn, done, now)
        win = done.highest
        await self.bus.publish(ev.OfferClosed(offer_id=done.offer_id, outcome=done.state,  # type: ignore[arg-type]
                                              winner=win.buyer if win else None,
                                              price_wei_per_kwh=win.price_wei_per_kwh if win else None))
        if win is None:
            log.info("offer %s expired without bids", done.offer_id)
            return
        trade = lifecycle.Trade(trade_id=english.trade_id_for(done.offer_id), offer_id=done.offer_id,
                                seller=done.seller, buyer=win.buyer, seller_site=done.seller_site,
                                buyer_site=win.buyer_site, wh=done.wh, price_wei_per_kwh=win.price_wei_per_kwh)
        await self._agree(conn, trade, "english", now, offer=done.signed, offer_signature=done.signature,
                          bid=win.signed, bid_signature=win.signature, bid_id=win.bid_id)
        log.info("offer %s sold to %s at %s wei/kWh", done.offer_id, win.buyer, win.price_wei_per_kwh)

    async def _agree(self, conn: sqlite3.Connection, trade: lifecycle.Trade, market: str, now: float, *,
                     offer: typed.Offer | None, offer_signature: str, bid: typed.Bid | None, bid_signature: str,
                     bid_id: str = "") -> bool:
        """Record the trade and announce it with the two signed facts it is opened from."""
        if not book.insert_trade(conn, trade, market, now, bid_id):
            log.warning("trade %s exists already; not agreed twice", trade.trade_id)
            return False
        await self.bus.publish(ev.TradeAgreed(trade_id=trade.trade_id, offer_id=trade.offer_id, seller=trade.seller,
                                              buyer=trade.buyer, seller_site=trade.seller_site,
                                              buyer_site=trade.buyer_site, wh=trade.wh,
                                              price_wei_per_kwh=trade.price_wei_per_kwh, offer=offer,
                                              offer_signature=offer_signature or None, bid=bid,
                                              bid_signature=bid_signature or None))
        await self.bus.publish(trade_status(trade))
        return True

    # --- when the winner's trade cannot be opened -------------------------------------

    async def _fallbacks(self) -> None:
        """Try the next bid of every english trade that could not be opened (durable: the
        store marks them 'pending'; retried while the chain service does not answer)."""
        while True:
            self._fallback_wake.clear()
            try:
                async with self.store.atomic() as conn:
                    due = book.pending_fallbacks(conn)
                for trade_id in due:
                    await self.fall_back(trade_id)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - logged; tried again at the next wake or tick
                log.exception("trying the next bids failed; retrying")
            try:
                await asyncio.wait_for(self._fallback_wake.wait(), 5.0)
            except asyncio.TimeoutError:
                pass

    async def fall_back(self, failed_id: str) -> str | None:
        """The trade ``failed_id`` could not be opened on-chain: agree a new trade with the
        next-highest bid of another buyer whose signed bid (and the seller's offer) is still
        valid and whose reserved escrow covers it. Returns the new trade's id, or None
        (none left, or the chain service does not answer now: tried again later)."""
        now = time.time()
        margin = self.settings.auction_fallback_margin_s
        async with self.store.atomic() as conn:
            state, cause = book.fallback_of(conn, failed_id)
            failed = book.get_trade(conn, failed_id)
            if state != "pending" or failed is None:
                return None
            offer = book.get_offer(conn, failed.offer_id)
            why = ""
            if offer is None or offer.signed is None:
                why = "the offer carries no signed offer"
            elif offer.signed.expiry <= now + margin:
                why = f"the seller's signed offer expires at {offer.signed.expiry}"
            if why:
                book.set_fallback(conn, failed_id, f"none: {why}")
                log.info("trade %s failed; no other bid is tried: %s", failed_id, why)
                return None
            assert offer is not None and offer.signed is not None
            tried = {t.buyer.lower() for t in book.trades_of_offer(conn, offer.offer_id)}
            candidates = english.fallbacks(book.bids_of(conn, offer.offer_id), tried=tried, now=now, margin_s=margin)
        for bid in candidates:
            assert bid.signed is not None
            try:
                bal = await self.balances(bid.buyer, "escrow")
            except refusals.Refusal as e:
                log.warning("trade %s failed; the next bid %s waits: %s", failed_id, bid.bid_id, e.message)
                return None
            async with self.store.atomic() as conn, caused_by(cause):
                if book.fallback_of(conn, failed_id)[0] != "pending":
                    return None
                try:
                    english.check_reserve(needed_wei=wei_for(offer.wh, bid.price_wei_per_kwh, round_up=True),
                                          reserved_wei=bal.escrow_reserved_wei, reserved_until=bal.reserved_until,
                                          expiry=bid.signed.expiry, held_wei=book.reserved_wei(conn, bid.buyer))
                except refusals.Refusal as e:
                    log.info("trade %s failed; bid %s of %s is not funded: %s", failed_id, bid.bid_id, bid.buyer,
                             e.message)
                    continue
                attempt = len(book.trades_of_offer(conn, offer.offer_id)) + 1
                trade = lifecycle.Trade(trade_id=english.trade_id_for(offer.offer_id, attempt),
                                        offer_id=offer.offer_id, seller=offer.seller, buyer=bid.buyer,
                                        seller_site=offer.seller_site, buyer_site=bid.buyer_site, wh=offer.wh,
                                        price_wei_per_kwh=bid.price_wei_per_kwh)
                if not await self._agree(conn, trade, "english", time.time(), offer=offer.signed,
                                         offer_signature=offer.signature, bid=bid.signed,
                                         bid_signature=bid.signature, bid_id=bid.bid_id):
                    book.set_fallback(conn, failed_id, f"none: trade {trade.trade_id} exists already")
                    return None
                book.set_fallback(conn, failed_id, trade.trade_id)
                log.info("trade %s failed; offer %s goes to the next bid %s of %s at %s wei/kWh: trade %s",
                         failed_id, offer.offer_id, bid.bid_id, bid.buyer, bid.price_wei_per_kwh, trade.trade_id)
                return trade.trade_id
        async with self.store.atomic() as conn:
            if book.fallback_of(conn, failed_id)[0] == "pending":
                book.set_fallback(conn, failed_id, "none: no other buyer's bid is valid and funded")
        log.info("trade %s failed; no other buyer's bid on offer %s is valid and funded", failed_id, offer.offer_id)
        return None

    async def _market_clock(self) -> None:
        """Sleep until the next deadline (or a change of deadlines), settle what is due."""
        while True:
            self._deadline_changed.clear()  # before reading: a change from now on wakes us
            try:
                await self.settle_due()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the clock keeps ticking; logged
                log.exception("settling due offers failed; retrying")
                await asyncio.sleep(1.0)
                continue
            async with self.store.atomic() as conn:
                nd = book.next_deadline(conn)
            timeout = None if nd is None else max(0.0, nd - time.time())
            try:
                await asyncio.wait_for(self._deadline_changed.wait(), timeout)
            except asyncio.TimeoutError:
                pass

    # --- double auction -------------------------------------------------------------

    def _round_of(self, t: float) -> int:
        return int(t // self.settings.auction_clear_interval_s)

    def _clears_at(self, round_: int) -> float:
        return book.clears_at(round_, self.settings.auction_clear_interval_s)

    async def order_balances(self, req: cmd.PlaceOrder, caller: Caller) -> cmd.Balances:
        self._need("double")
        self._acts_for(caller, req.site)
        self._check_signed_order(req, self._clears_at(self._round_of(time.time())))
        bal = await self.balances(req.account, "escrow" if req.side == "buy" else "tokens")
        self._belongs(bal, req.account, req.site)
        return bal

    async def place_order(self, req: cmd.PlaceOrder, caller: Caller, bal: cmd.Balances) -> cmd.OrderAccepted:
        now = time.time()
        round_ = book.current_call(self.conn, now, self.settings.auction_clear_interval_s)
        crossed = book.crossing_own_order(self.conn, req.account, req.side, req.limit_price_wei_per_kwh, round_)
        if crossed is not None:
            other = "buy" if req.side == "sell" else "sell"
            raise refusals.OwnOffer(f"this account has a {other} order at {crossed} wei/kWh in the same call "
                                    f"that this {req.side} order would trade with: it would trade with itself "
                                    "(a buy below your own sell, a spread, is taken)")
        self._check_signed_order(req, self._clears_at(round_))
        signed_fact: typed.Offer | typed.Bid = req.offer if req.side == "sell" else req.bid  # type: ignore[assignment]
        self._not_taken("orders", signed_fact.offer_id if isinstance(signed_fact, typed.Offer) else signed_fact.bid_id,
                        "offer" if req.side == "sell" else "bid")
        if req.side == "buy":
            assert req.bid is not None
            english.check_reserve(needed_wei=wei_for(req.wh, req.limit_price_wei_per_kwh, round_up=True),
                                  reserved_wei=bal.escrow_reserved_wei, reserved_until=bal.reserved_until,
                                  expiry=req.bid.expiry, held_wei=book.reserved_wei(self.conn, req.account),
                                  what="buy order")
        else:
            free = bal.tokens_wh - book.reserved_wh(self.conn, req.account)
            if free < req.wh:
                raise refusals.NoTokens(f"the seller has {max(free, 0)} Wh of free tokens, the order needs {req.wh} Wh")
        order = double.Order(order_id=f"d-{book.next_number(self.conn, 'order'):010d}", side=req.side,
                             account=req.account, site=req.site, wh=req.wh,
                             limit_price_wei_per_kwh=req.limit_price_wei_per_kwh, signed=signed_fact,
                             signature=req.signature)
        book.insert_order(self.conn, order, round_, now)
        await self.bus.publish(ev.OrderPlaced(order_id=order.order_id, round=round_, side=order.side,
                                              account=order.account, site=order.site, wh=order.wh,
                                              limit_price_wei_per_kwh=order.limit_price_wei_per_kwh, placed_at=now,
                                              clears_at=self._clears_at(round_)))
        return cmd.OrderAccepted(order_id=order.order_id)

    def _check_signed_order(self, req: cmd.PlaceOrder, clears_at: float) -> None:
        """A sell order carries the seller's signed offer, a buy order the buyer's signed bid
        for any offer (the zero offer id); both valid past the call's clearing."""
        domain, g = self._domain(), self.grace_s
        if req.side == "sell":
            if req.offer is None or req.bid is not None:
                raise refusals.Invalid("a sell order carries the seller's signed offer (and no bid); nothing was done")
            signed.check_offer(domain, req.offer, req.signature, seller=req.account, wh=req.wh,
                               min_price_wei_per_kwh=req.limit_price_wei_per_kwh, min_expiry=clears_at + g, grace_s=g)
        else:
            if req.bid is None or req.offer is not None:
                raise refusals.Invalid("a buy order carries the buyer's signed bid with the zero offer id (and no "
                                       "offer); nothing was done")
            signed.check_bid(domain, req.bid, req.signature, buyer=req.account, offer_id=typed.ZERO_ID, wh=req.wh,
                             max_price_wei_per_kwh=req.limit_price_wei_per_kwh, min_expiry=clears_at + g, grace_s=g)

    async def clear_due_rounds(self) -> int:
        """Clear every round whose end has passed and that was not cleared yet."""
        n = 0
        async with self.store.atomic() as conn:
            now = time.time()
            for round_ in book.open_order_rounds(conn):
                if self._clears_at(round_) > now or book.round_cleared(conn, round_):
                    continue
                await self._clear(conn, round_, now)
                n += 1
        self.cleared_rounds += n
        return n

    async def _clear(self, conn: sqlite3.Connection, round_: int, now: float) -> None:
        orders = book.orders_of_round(conn, round_)
        by_id = {o.order_id: o for o in orders}
        result = double.clear(orders)
        book.finish_round(conn, round_, result, now)
        trade_ids = []
        for f in result.fills:
            b, s = by_id[f.buy_id], by_id[f.sell_id]
            assert result.price_wei_per_kwh is not None
            trade = lifecycle.Trade(trade_id=double.trade_id_for(round_, f), offer_id=s.order_id, seller=s.account,
                                    buyer=b.account, seller_site=s.site, buyer_site=b.site, wh=f.wh,
                                    price_wei_per_kwh=result.price_wei_per_kwh)
            offer = s.signed if isinstance(s.signed, typed.Offer) else None
            bid = b.signed if isinstance(b.signed, typed.Bid) else None
            if await self._agree(conn, trade, "double", now, offer=offer, offer_signature=s.signature, bid=bid,
                                 bid_signature=b.signature):
                trade_ids.append(trade.trade_id)
        await self.bus.publish(ev.MarketCleared(round=round_, price_wei_per_kwh=result.price_wei_per_kwh,
                                                volume_wh=result.volume_wh, trade_ids=trade_ids))
        log.info("round %s cleared: %s Wh at %s wei/kWh, %s trades", round_, result.volume_wh,
                 result.price_wei_per_kwh, len(trade_ids))

    async def _call_clock(self) -> None:
        interval = self.settings.auction_clear_interval_s
        while True:
            try:
                await self.clear_due_rounds()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - logged, retried at the next tick
                log.exception("clearing the double auction failed; retrying")
            now = time.time()
            await asyncio.sleep(max(0.0, self._clears_at(self._round_of(now)) - now) + min(0.01, interval / 10))

    # --- listings -------------------------------------------------------------------

    async def list_offers(self, req: cmd.ListOffers, caller: Caller) -> cmd.Offers:
        views: list[cmd.OfferView] = []
        async with self.store.atomic() as conn:
            for o in book.offers(conn, include_closed=req.include_closed):
                views.append(cmd.OfferView(
                    offer_id=o.offer_id, seller=o.seller, seller_site=o.seller_site, wh=o.wh,
                    start_price_wei_per_kwh=o.start_price_wei_per_kwh, opened_at=o.opened_at, ends_at=o.ends_at,
                    state=o.state, highest_bid_wei_per_kwh=o.highest.price_wei_per_kwh if o.highest else None,
                    highest_bidder=o.highest.buyer if o.highest else None, bids=o.bids,
                    signed_offer_id=o.signed.offer_id if o.signed else ""))
            for (order_id, account, site, wh, limit, placed_at, round_, state, _filled, signed_id) in \
                    book.open_sell_orders(conn, req.include_closed):
                views.append(cmd.OfferView(
                    offer_id=order_id, market="double", seller=account, seller_site=site, wh=wh,
                    start_price_wei_per_kwh=int(limit), opened_at=placed_at, ends_at=self._clears_at(round_),
                    state="filled" if state in ("filled", "partial") else state, signed_offer_id=signed_id or ""))
        return cmd.Offers(offers=views)

    async def list_orders(self, req: cmd.ListOrders, caller: Caller) -> cmd.OrderBook:
        """The call being collected now (its orders, when it clears) and the latest cleared calls."""
        interval = self.settings.auction_clear_interval_s
        async with self.store.atomic() as conn:
            now = time.time()
            round_ = book.current_call(conn, now, interval)
            orders = book.book_of_round(conn, round_)
            calls = book.cleared_calls(conn, req.calls)
            last = book.book_of_round(conn, int(calls[-1]["round"])) if calls else []  # type: ignore[call-overload]
        return cmd.OrderBook(market=self.settings.auction_market, round=round_, clears_at=book.clears_at(round_, interval),
                             interval_s=interval, now=now, orders=[cmd.BookOrder(**o) for o in orders],  # type: ignore[arg-type]
                             last_orders=[cmd.BookOrder(**o) for o in last],  # type: ignore[arg-type]
                             calls=[cmd.ClearedCall(**c) for c in calls])  # type: ignore[arg-type]

    async def list_trades(self, req: cmd.ListTrades, caller: Caller) -> cmd.Trades:
        async with self.store.atomic() as conn:
            ts = book.trades(conn, req.account, req.last)
        return cmd.Trades(trades=[cmd.TradeView(trade_id=t.trade_id, offer_id=t.offer_id, seller=t.seller,
                                                buyer=t.buyer, seller_site=t.seller_site, buyer_site=t.buyer_site,
                                                wh=t.wh, price_wei_per_kwh=t.price_wei_per_kwh, state=t.state,
                                                delivered_wh=t.delivered_wh, paid_wei=t.paid_wei, reason=t.reason)
                                  for t in ts])

    # --- trade lifecycle ------------------------------------------------------------

    async def close_trade(self, req: cmd.CloseTrade, caller: Caller) -> cmd.Ok:
        trade = book.get_trade(self.conn, req.trade_id)
        if trade is None:
            raise refusals.NotFound("no such trade")
        market = self.settings.site
        operator = self.settings.auction_operator
        by = req.by.lower()
        # who closes, and the site that must ask for it: the buyer's, the seller's, or the market's as the operator
        if by == trade.buyer.lower():
            role, site = "buyer", trade.buyer_site
        elif by == trade.seller.lower():
            role, site = "seller", trade.seller_site
        elif operator and by == operator.lower():
            role, site = "operator", market
        else:
            role, site = "", ""
        if not role or not caller.may_act_for(site):
            if role == "operator":
                raise refusals.NotAllowed("only the market's own site closes a trade as the operator")
            raise refusals.NotAllowed(f"trade {trade.trade_id} is closed by its buyer's site ({trade.buyer_site}), "
                                      f"its seller's site ({trade.seller_site}) or the market only, each for its "
                                      "own account")
        trade, steps = lifecycle.close(trade, by=req.by, operator=operator, reason=f"closed by the {role}")
        await self._steps(self.conn, trade, steps)
        return cmd.Ok()

    async def _steps(self, conn: sqlite3.Connection, trade: lifecycle.Trade, steps: list[lifecycle.Step]) -> None:
        book.save_trade(conn, trade, time.time())
        for step in steps:
            await self.bus.publish(trade_status(trade, step))

    async def on_event(self, env: Envelope, conn: sqlite3.Connection) -> None:
        """Chain and meter events move trades along (runs inside the subscriber's transaction)."""
        body = env.body
        if isinstance(body, ev.Deployment):
            self._follow(body, conn)
            return
        trade_id = getattr(body, "trade_id", None) or getattr(body, "ref", None)
        if not trade_id:
            return
        trade = book.get_trade(conn, trade_id)
        if trade is None:
            return  # not one of ours (or not a trade at all)
        fall_back = False
        try:
            if isinstance(body, ev.TradeRecorded):
                trade, steps = lifecycle.recorded(trade)
            elif isinstance(body, ev.Delivery):
                if body.role != "consumer" or body.site != trade.buyer_site:
                    return  # the buyer's meter counts; the seller's cross-checks elsewhere, others' not at all
                trade, steps = lifecycle.delivery(trade, body.delivered_wh)
            elif isinstance(body, ev.TradeClosed):
                trade, steps = lifecycle.closed_on_chain(trade, delivered_wh=body.delivered_wh, paid_wei=body.paid_wei)
            elif isinstance(body, ev.Settled):
                trade, steps = lifecycle.paid(trade, delivered_wh=body.delivered_wh, paid_wei=body.paid_wei), []
            elif isinstance(body, ev.ChainTx):
                if body.kind != "open" or body.status != "failed" or trade.state != S.AGREED:
                    return
                trade, steps = lifecycle.failed(trade, body.reason or "the chain could not record the trade")
                fall_back = self.settings.english and book.trade_market(conn, trade_id) == "english"
            elif isinstance(body, ev.MeterMismatch):
                # the seller's site compares its export with the buyer's signed delivery; only it may end the trade so
                if env.site != trade.seller_site:
                    log.warning("ignoring a delivery mismatch of trade %s from site %s: only its seller's site %s "
                                "closes a trade for it", trade_id, env.site, trade.seller_site)
                    return
                if trade.state not in OPEN:
                    return  # ended already
                trade, steps = lifecycle.close(trade, by=trade.seller, reason=mismatch_reason(body))
            else:
                return
        except lifecycle.InvalidTransition as e:
            log.warning("ignoring %s for trade %s: %s", env.type, trade_id, e.message)
            return
        except refusals.Refusal as e:
            log.warning("ignoring %s for trade %s: %s", env.type, trade_id, e.message)
            return
        await self._steps(conn, trade, steps)
        if fall_back:
            book.set_fallback(conn, trade_id, "pending", env.id)
            self.store.on_commit(self._fallback_wake.set)

    async def _heartbeats(self) -> None:
        while True:
            try:
                async with self.store.atomic() as conn:
                    live = book.live_trades(conn)
                    await self.bus.publish(ev.TradeHeartbeat(
                        live=[t.trade_id for t in live],
                        sites={t.trade_id: [t.seller_site, t.buyer_site] for t in live}))
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - logged; the next beat tries again
                log.exception("trade heartbeat failed")
            await asyncio.sleep(self.settings.auction_trade_heartbeat_s)
