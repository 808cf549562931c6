"""The market: the english auction's offers and bids, the double auction's orders, and the
trades they opened. The site's wallet signs (and approves tokens or reserves escrow for)
what is placed here; the auction at the market only ever gets signed offers and bids."""

from __future__ import annotations

import math

from aiohttp import web

from services.bus import refusals
from services.bus import commands as cmd

from .. import models as m
from ..errors import ApiError, refused_by
from ..openapi import Route
from ..sessions import Session
from ..state import Gateway
from .api import BACKEND, SESSION_ERRORS, Api, match_id

api = Api()

ON_AN_ITEM = (400, 401, 403, 404, 409, 415, 422, *BACKEND)
"""What a POST on one offer or trade (by its id) may answer besides success."""


@api(Route("GET", "/api/offers", "list_offers", "Open offers with their highest bids", m.OffersOut,
           errors=(*SESSION_ERRORS, 502), tag="market"))
async def list_offers(gw: Gateway, request: web.Request, session: Session) -> m.OffersOut:
    r: cmd.Offers = await gw.ask_auction(cmd.ListOffers())
    return m.OffersOut(offers=[m.OfferOut(**o.model_dump()) for o in r.offers], now=gw.clock())


@api(Route("POST", "/api/offers", "sell", "Sell energy tokens in an auction (the site's wallet signs the offer)",
           m.OfferPlacedOut, body=m.SellIn,
           status=201, errors=(400, 401, 409, 415, 422, *BACKEND), tag="market"))
async def sell(gw: Gateway, request: web.Request, session: Session, body: m.SellIn) -> m.OfferPlacedOut:
    """Approve the tokens for the market, have the wallet sign the offer (valid until the
    auction's end plus a grace period, for a trade of the configured duration), place it."""
    with refused_by("chain"):
        placed = await gw.trader.sell(session.address, body.energy_wh, body.start_price_wei_per_kwh,
                                      body.duration_s, now=gw.clock(), cmd_id=gw.cmd_id(request, session, "sell"))
    return m.OfferPlacedOut(offer_id=placed.offer_id, ends_at=placed.ends_at, wh=body.energy_wh)


async def _open_offer(gw: Gateway, offer_id: str, me: str, price: int) -> tuple[cmd.OfferView, list[cmd.OfferView]]:
    """The open english offer ``offer_id`` and every open offer, with the refusals the
    listing already tells (no escrow is reserved for a bid that cannot be placed)."""
    offers = (await gw.ask_auction(cmd.ListOffers())).offers
    offer = next((o for o in offers if o.offer_id == offer_id and o.market == "english"), None)
    if offer is None:
        closed = next((o for o in (await gw.ask_auction(cmd.ListOffers(include_closed=True))).offers
                       if o.offer_id == offer_id and o.market == "english"), None)
        if closed is None:
            raise ApiError.of(refusals.NotFound, "no such offer")
        raise ApiError.of(refusals.Closed, f"offer {offer_id} is {closed.state}")
    if offer.seller.lower() == me.lower():
        raise ApiError.of(refusals.OwnOffer, "a seller cannot bid on their own offer")
    floor = offer.highest_bid_wei_per_kwh or offer.start_price_wei_per_kwh
    if price < floor:
        words = (f"the highest bid is {offer.highest_bid_wei_per_kwh} wei/kWh" if offer.highest_bid_wei_per_kwh
                 else f"the start bid is {offer.start_price_wei_per_kwh} wei/kWh")
        raise ApiError.of(refusals.TooLow, f"{words}; nothing was done")
    if not offer.signed_offer_id:
        raise ApiError.of(refusals.Closed, f"offer {offer_id} carries no signed offer: it cannot be bid on")
    return offer, offers


@api(Route("POST", "/api/offers/{offer_id}/bids", "bid",
           "Bid on an offer: the site's wallet reserves the escrow the bid and the account's other winning bids "
           "need until the bid expires, then signs the bid", m.BidOut, body=m.BidIn, status=201,
           errors=ON_AN_ITEM, tag="market"))
async def bid(gw: Gateway, request: web.Request, session: Session, body: m.BidIn) -> m.BidOut:
    """Reserve the escrow this bid and the account's other live bids need until the bid
    expires (the wallet tops up from free escrow and answers once in a block), have the
    wallet sign the bid, place it."""
    offer_id = match_id(request, "offer_id")
    offer, offers = await _open_offer(gw, offer_id, session.address, body.price_wei_per_kwh)
    with refused_by("chain"):
        r = await gw.trader.bid(session.address, offer, offers, body.price_wei_per_kwh,
                                cmd_id=gw.cmd_id(request, session, "bid"))
    return m.BidOut(bid_id=r.bid_id)


@api(Route("POST", "/api/offers/{offer_id}/cancel", "cancel_offer", "Cancel an own offer without bids", m.OkOut,
           body=m.Empty, errors=ON_AN_ITEM, tag="market"))
async def cancel_offer(gw: Gateway, request: web.Request, session: Session, body: m.Empty) -> m.OkOut:
    offer_id = match_id(request, "offer_id")
    await gw.ask_auction(cmd.CancelOffer(offer_id=offer_id, seller=session.address),
                         gw.cmd_id(request, session, "cancel"))
    return m.OkOut()


@api(Route("GET", "/api/orders", "list_orders",
           "The double auction: the order book of the call being collected (your orders marked mine), when it "
           "clears, and the latest cleared calls' prices and volumes", m.OrdersOut,
           errors=(*SESSION_ERRORS, 502), tag="market"))
async def list_orders(gw: Gateway, request: web.Request, session: Session) -> m.OrdersOut:
    r: cmd.OrderBook = await gw.ask_auction(cmd.ListOrders())
    me = session.address.lower()

    def out(o: cmd.BookOrder) -> m.BookOrderOut:
        return m.BookOrderOut(**o.model_dump(), mine=o.account.lower() == me)

    return m.OrdersOut(market=r.market, round=r.round, clears_at=r.clears_at, interval_s=r.interval_s,
                       now=gw.clock(), orders=[out(o) for o in r.orders],
                       last_orders=[out(o) for o in r.last_orders],
                       calls=[m.ClearedCallOut(**c.model_dump()) for c in r.calls])


@api(Route("POST", "/api/orders", "place_order",
           "Place a double-auction order for the call being collected (the site's wallet approves the tokens or "
           "reserves the escrow, then signs it); every fill of a call pays the call's one clearing price",
           m.OrderPlacedOut, body=m.OrderIn, status=201, errors=(400, 401, 403, 409, 415, 422, *BACKEND),
           tag="market"))
async def place_order(gw: Gateway, request: web.Request, session: Session, body: m.OrderIn) -> m.OrderPlacedOut:
    """An order for the double auction's current call: the wallet approves the tokens (a
    sell) or reserves the escrow (a buy) and signs it, valid past the call's clearing."""
    if gw.settings.auction_market == "english":
        raise ApiError.of(refusals.Unsupported, "this market runs the english auction only: sell and bid on offers "
                                           "instead; nothing was done")
    interval = gw.settings.auction_clear_interval_s
    now = gw.clock()
    # valid through the call being collected and the next one (the clock may just have cleared this one)
    duration = max(1, math.ceil((math.floor(now / interval) + 2) * interval - now))
    with refused_by("chain"):
        placed = await gw.trader.order(session.address, body.side, body.energy_wh, body.limit_price_wei_per_kwh,
                                       now=now, duration_s=duration,
                                       cmd_id=gw.cmd_id(request, session, f"order-{body.side}"))
    return m.OrderPlacedOut(order_id=placed.order_id, side=body.side, wh=body.energy_wh,
                            limit_price_wei_per_kwh=body.limit_price_wei_per_kwh)


@api(Route("GET", "/api/trades", "list_trades", "Trades (all of the market's)", m.TradesOut,
           errors=(*SESSION_ERRORS, 502), tag="market"))
async def list_trades(gw: Gateway, request: web.Request, session: Session) -> m.TradesOut:
    r: cmd.Trades = await gw.ask_auction(cmd.ListTrades())
    for t in r.trades:
        gw.parties.learn(t.trade_id, t.seller, t.buyer)
    facts = gw.history.facts([t.trade_id for t in r.trades])  # the cards' story
    return m.TradesOut(trades=[m.TradeOut(**{**t.model_dump(), **facts.get(t.trade_id, {})}) for t in r.trades])


@api(Route("POST", "/api/trades/{trade_id}/close", "close_trade", "Close Connection: end a live trade", m.OkOut,
           body=m.Empty, errors=ON_AN_ITEM, tag="market"))
async def close_trade(gw: Gateway, request: web.Request, session: Session, body: m.Empty) -> m.OkOut:
    trade_id = match_id(request, "trade_id")
    await gw.ask_auction(cmd.CloseTrade(trade_id=trade_id, by=session.address),
                         gw.cmd_id(request, session, "close"))
    await gw.history.closing(trade_id, session.address)
    return m.OkOut()
