"""Placing offers and bids for one site's account: the steps a person's click in the
gateway and a site agent's decision share.

A sale: approve the tokens for the market (so the contract can lock them when the auction
is won), have the site's wallet sign the offer (EIP-712), place it at the auction. A bid:
reserve the escrow the bid and the account's other live bids need until the bid expires,
have the wallet sign the bid, place it. Every step is a bus request with a command id
derived from the caller's, so a retried step runs once.

I/O only through the two clients given (this site's wallet, the market's auction);
errors are the services' own ``RequestError``s: each caller words them for its reader.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services.bus import RequestError, RpcClient
from services.bus import commands as cmd
from services.bus.prices import wei_for  # what a bid needs reserved (rounded up), as the auction counts it
from services.bus.states import TradeState
from services.bus.typed import ZERO_ID



@dataclass
class Trader:
    wallet: RpcClient
    auction: RpcClient
    site: str
    timeout_s: float = 5.0
    reserve_timeout_s: float = 150.0
    offer_grace_s: int = 600
    bid_grace_s: int = 600
    trade_duration_s: int = 3600

    async def _ask(self, client: RpcClient, req: cmd.Request, cmd_id: str | None = None,
                   timeout: float | None = None) -> Any:
        try:
            return await client.request(req, timeout=timeout or self.timeout_s,
                                        cmd_id=cmd_id[:128] if cmd_id else None)
        except RequestError as e:
            e.service = "auction" if client is self.auction else "chain"  # who said it, for the caller's words
            raise

    async def _approve(self, account: str, wh: int, cmd_id: str) -> None:
        """Let the market contract lock these tokens once the offer is won."""
        try:
            await self._ask(self.wallet, cmd.Approve(account=account, wh=wh), f"{cmd_id}:approve")
        except RequestError as e:
            # insufficient_tokens: the allowance left by earlier offers already covers this one
            # (the chain refuses to approve more than the balance); the auction checks the tokens.
            if e.code != "insufficient_tokens":
                raise

    async def sell(self, account: str, wh: int, start_price_wei_per_kwh: int, duration_s: int, *, now: float,
                   cmd_id: str) -> cmd.OfferPlaced:
        """Approve, sign and place an english offer of ``wh`` (auction of ``duration_s``)."""
        await self._approve(account, wh, cmd_id)
        signed: cmd.SignedOffer = await self._ask(
            self.wallet, cmd.SignOffer(account=account, wh=wh, min_price_wei_per_kwh=start_price_wei_per_kwh,
                                       expiry=int(now + duration_s + self.offer_grace_s),
                                       duration_s=self.trade_duration_s), f"{cmd_id}:sign")
        placed: cmd.OfferPlaced = await self._ask(
            self.auction, cmd.PlaceOffer(seller=account, seller_site=self.site, wh=wh,
                                         start_price_wei_per_kwh=start_price_wei_per_kwh, duration_s=duration_s,
                                         offer=signed.offer, signature=signed.signature), f"{cmd_id}:offer")
        return placed

    async def held_for_bids(self, account: str, offers: list[cmd.OfferView], *, except_offer: str) -> int:
        """What this account's other holds at the auction need reserved: its leading bids on
        other open offers and its trades agreed but not yet opened on-chain."""
        who = account.lower()
        held = sum(wei_for(o.wh, o.highest_bid_wei_per_kwh or 0, round_up=True) for o in offers
                   if o.offer_id != except_offer and o.state == "open" and (o.highest_bidder or "").lower() == who)
        trades: cmd.Trades = await self._ask(self.auction, cmd.ListTrades(account=account))
        held += sum(wei_for(t.wh, t.price_wei_per_kwh, round_up=True) for t in trades.trades
                    if t.state == TradeState.AGREED and t.buyer.lower() == who)
        return held

    async def bid(self, account: str, offer: cmd.OfferView, offers: list[cmd.OfferView], price_wei_per_kwh: int, *,
                  cmd_id: str) -> cmd.BidAccepted:
        """Reserve, sign and place a bid on the open english ``offer`` (one of ``offers``,
        the auction's listing: the account's other leading bids stay covered)."""
        expiry = int(offer.ends_at + self.bid_grace_s)
        total = wei_for(offer.wh, price_wei_per_kwh, round_up=True) + await self.held_for_bids(account, offers,
                                                                                  except_offer=offer.offer_id)
        await self._ask(self.wallet, cmd.Reserve(account=account, total_wei=total, until=expiry), f"{cmd_id}:reserve",
                        timeout=self.reserve_timeout_s)
        signed: cmd.SignedBid = await self._ask(
            self.wallet, cmd.SignBid(account=account, offer_id=offer.signed_offer_id, wh=offer.wh,
                                     max_price_wei_per_kwh=price_wei_per_kwh, expiry=expiry), f"{cmd_id}:sign")
        accepted: cmd.BidAccepted = await self._ask(
            self.auction, cmd.PlaceBid(offer_id=offer.offer_id, buyer=account, buyer_site=self.site,
                                       price_wei_per_kwh=price_wei_per_kwh, bid=signed.bid,
                                       signature=signed.signature), f"{cmd_id}:bid")
        return accepted

    async def order(self, account: str, side: str, wh: int, limit_price_wei_per_kwh: int, *, now: float,
                    duration_s: int, cmd_id: str) -> cmd.OrderAccepted:
        """Sign and place a double-auction order valid for ``duration_s`` (at least one call)
        plus the grace: a sell order carries a signed offer (tokens approved first), a buy
        order a signed bid for the zero offer id (escrow reserved first)."""
        expiry = int(now + duration_s + self.offer_grace_s)
        offer: cmd.Offer | None = None
        bid: cmd.Bid | None = None
        if side == "sell":
            await self._approve(account, wh, cmd_id)
            so: cmd.SignedOffer = await self._ask(
                self.wallet, cmd.SignOffer(account=account, wh=wh, min_price_wei_per_kwh=limit_price_wei_per_kwh,
                                           expiry=expiry, duration_s=self.trade_duration_s), f"{cmd_id}:sign")
            offer, signature = so.offer, so.signature
        else:
            offers: cmd.Offers = await self._ask(self.auction, cmd.ListOffers())
            book: cmd.OrderBook = await self._ask(self.auction, cmd.ListOrders(calls=0))
            who = account.lower()
            # the account's open buy orders of this call stay covered too
            held_orders = sum(wei_for(o.wh, o.limit_price_wei_per_kwh, round_up=True) for o in book.orders
                              if o.side == "buy" and o.state == "open" and o.account.lower() == who)
            total = wei_for(wh, limit_price_wei_per_kwh, round_up=True) + held_orders + await self.held_for_bids(
                account, offers.offers, except_offer="")
            await self._ask(self.wallet, cmd.Reserve(account=account, total_wei=total, until=expiry),
                            f"{cmd_id}:reserve", timeout=self.reserve_timeout_s)
            sb: cmd.SignedBid = await self._ask(
                self.wallet, cmd.SignBid(account=account, offer_id=ZERO_ID, wh=wh,
                                         max_price_wei_per_kwh=limit_price_wei_per_kwh, expiry=expiry),
                f"{cmd_id}:sign")
            bid, signature = sb.bid, sb.signature
        placed: cmd.OrderAccepted = await self._ask(
            self.auction, cmd.PlaceOrder(side=side, account=account, site=self.site, wh=wh,
                                         limit_price_wei_per_kwh=limit_price_wei_per_kwh, offer=offer, bid=bid,
                                         signature=signature), f"{cmd_id}:order")
        return placed
