"""Which bus events a logged-in user may see, and how they look on the websocket (pure).

Public market events (offers, bids, closed offers, trade steps, double-auction orders and calls) go
to everyone logged in; meter readings and relay changes only of this gateway's site; chain transactions only
of the user's own account; payments (settled/recorded/closed on chain) and meter mismatches
only to the trade's seller and buyer; mining changes to everyone.
"""

from __future__ import annotations

from typing import Any

from services.bus import events as ev

PUBLIC = (ev.OfferOpened, ev.BidPlaced, ev.OfferClosed, ev.TradeAgreed, ev.TradeStatus, ev.OrderPlaced,
          ev.MarketCleared, ev.ChainMining)
PER_TRADE = (ev.TradeRecorded, ev.Settled, ev.TradeClosed, ev.Delivery, ev.MeterMismatch)

# the bus prefixes the gateway subscribes to (a site's meter readings are added per site)
PREFIXES = tuple(sorted({c.TYPE for c in (*PUBLIC, *PER_TRADE, ev.ChainTx, ev.Minted)}))


class Parties:
    """trade id -> (seller, buyer), learned from trade events and listings."""

    def __init__(self, limit: int = 10_000) -> None:
        self.limit = limit
        self._p: dict[str, tuple[str, str]] = {}

    def learn(self, trade_id: str, seller: str, buyer: str) -> None:
        if trade_id not in self._p and len(self._p) >= self.limit:
            self._p.pop(next(iter(self._p)))
        self._p[trade_id] = (seller.lower(), buyer.lower())

    def of(self, trade_id: str) -> tuple[str, str] | None:
        return self._p.get(trade_id)

    def observe(self, body: ev.Message) -> None:
        if isinstance(body, (ev.TradeAgreed, ev.TradeStatus)):
            self.learn(body.trade_id, body.seller, body.buyer)


def visible(body: ev.Message, *, account: str, site: str, parties: Parties) -> bool:
    """May the user logged in as ``account`` at this gateway's ``site`` see ``body``?"""
    if isinstance(body, PUBLIC):
        return True
    if isinstance(body, (ev.MeterReading, ev.MeterRelay)):
        return body.site == site
    if isinstance(body, (ev.ChainTx, ev.Minted)):
        return body.account.lower() == account.lower()
    if isinstance(body, PER_TRADE):
        p = parties.of(body.trade_id)
        return p is not None and account.lower() in p
    return False


def _stringify_wei(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _stringify_wei(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_stringify_wei(v, key) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and (key.endswith("_wei") or key.endswith("_wei_per_kwh")):
        return str(value)
    return value


def message(type_: str, ts: float, body: ev.Message) -> dict[str, Any]:
    """The websocket frame for one event: wei fields as decimal strings."""
    return {"type": type_, "ts": ts, "body": _stringify_wei(body.model_dump(mode="json"))}
