"""The trade lifecycle as a state machine (pure, no I/O).

::

    agreed ──TradeRecorded──▶ recorded ──(at once)──▶ delivering ──delivered ≥ wh──▶ fulfilled ─┐
      │                          │                       │                                     ├─TradeClosed─▶ settled
      └─────── CloseTrade (buyer, seller or operator) ───┴──────────────▶ closed ──────────────┘

``failed`` is reached from ``agreed`` when the chain could not record the trade.
A trade is *live* (relays closed, listed in the heartbeat) while ``recorded`` or
``delivering``. Each function returns the new trade and the list of steps it went
through (each one a ``TradeStatus`` to publish), or raises :class:`InvalidTransition`.
Inputs that repeat what already happened (a second TradeRecorded, an older delivery
count) are no-ops returning no steps, so event handlers stay idempotent.
"""

from __future__ import annotations

import dataclasses

from services.bus import refusals
from services.bus.states import FINAL, LIVE, OPEN, TradeState
from services.bus.states import TradeState as S

__all__ = ["FINAL", "LIVE", "OPEN", "TRANSITIONS", "InvalidTransition", "Step", "Trade", "TradeState"]

TRANSITIONS: dict[TradeState, frozenset[TradeState]] = {
    S.AGREED: frozenset({S.RECORDED, S.CLOSED, S.FAILED}),
    S.RECORDED: frozenset({S.DELIVERING, S.CLOSED}),
    S.DELIVERING: frozenset({S.FULFILLED, S.CLOSED}),
    S.FULFILLED: frozenset({S.SETTLED}),
    S.CLOSED: frozenset({S.SETTLED}),
    S.SETTLED: frozenset(),
    S.FAILED: frozenset(),
}


class InvalidTransition(refusals.InvalidTransition):
    def __init__(self, trade_id: str, from_state: str, to_state: str, why: str = "") -> None:
        super().__init__(f"trade {trade_id}: cannot go from {from_state} to {to_state}" + (f" ({why})" if why else ""))
        self.trade_id = trade_id
        self.from_state = from_state
        self.to_state = to_state


@dataclasses.dataclass(frozen=True, slots=True)
class Trade:
    trade_id: str
    offer_id: str
    seller: str
    buyer: str
    seller_site: str
    buyer_site: str
    wh: int
    price_wei_per_kwh: int
    state: TradeState = S.AGREED
    delivered_wh: int = 0
    paid_wei: int = 0
    reason: str = ""

    @property
    def live(self) -> bool:
        return self.state in LIVE


@dataclasses.dataclass(frozen=True, slots=True)
class Step:
    state: TradeState
    delivered_wh: int
    reason: str = ""


def _go(trade: Trade, to: TradeState, reason: str = "", **changes: int) -> tuple[Trade, Step]:
    if to not in TRANSITIONS[trade.state]:
        raise InvalidTransition(trade.trade_id, trade.state, to)
    new = dataclasses.replace(trade, state=to, reason=reason, **changes)  # type: ignore[arg-type]
    return new, Step(state=to, delivered_wh=new.delivered_wh, reason=reason)


def recorded(trade: Trade) -> tuple[Trade, list[Step]]:
    """The chain service recorded the trade: funds and tokens locked, relays may close.
    Delivery starts right away."""
    if trade.state in (LIVE | {S.FULFILLED, S.CLOSED, S.SETTLED}):
        return trade, []  # already past this point: a repeated (or late) event
    trade, a = _go(trade, S.RECORDED)
    trade, b = _go(trade, S.DELIVERING)
    return _check_fulfilled(trade, [a, b])


def failed(trade: Trade, reason: str) -> tuple[Trade, list[Step]]:
    """The chain could not record the trade."""
    if trade.state == S.FAILED:
        return trade, []
    trade, a = _go(trade, S.FAILED, reason)
    return trade, [a]


def delivery(trade: Trade, delivered_wh: int) -> tuple[Trade, list[Step]]:
    """The buyer's meter reports cumulative Wh delivered for this trade."""
    if delivered_wh < 0:
        raise InvalidTransition(trade.trade_id, trade.state, trade.state, "negative delivery")
    delivered_wh = min(delivered_wh, trade.wh)  # energy past the trade's Wh is not part of it
    steps: list[Step] = []
    if trade.state == S.RECORDED:
        trade, a = _go(trade, S.DELIVERING)
        steps.append(a)
    if trade.state in (S.FULFILLED, S.CLOSED):
        # readings after the end (the relay takes a moment to open) only raise the count
        return dataclasses.replace(trade, delivered_wh=max(trade.delivered_wh, delivered_wh)), steps
    if trade.state == S.SETTLED:
        return trade, steps
    if trade.state != S.DELIVERING:
        raise InvalidTransition(trade.trade_id, trade.state, S.DELIVERING, "no delivery before it is recorded")
    if delivered_wh > trade.delivered_wh:
        trade = dataclasses.replace(trade, delivered_wh=delivered_wh)
    return _check_fulfilled(trade, steps)


def _check_fulfilled(trade: Trade, steps: list[Step]) -> tuple[Trade, list[Step]]:
    if trade.state == S.DELIVERING and trade.delivered_wh >= trade.wh:
        trade, s = _go(trade, S.FULFILLED)
        steps.append(s)
    return trade, steps


def may_close(trade: Trade, by: str, operator: str | None) -> bool:
    """The buyer, the seller (contracts v2: e.g. its meter saw the energy go elsewhere) or
    the operator."""
    who = by.lower()
    return who in (trade.buyer.lower(), trade.seller.lower()) or (operator is not None and who == operator.lower())


def close(trade: Trade, *, by: str, operator: str | None = None, reason: str = "closed by the buyer") -> tuple[Trade, list[Step]]:
    """Close Connection: only the buyer, the seller or the operator, only while not yet
    ended; ``reason`` says why, in words (the TradeStatus carries it)."""
    if not may_close(trade, by, operator):
        raise refusals.NotAllowed("only the buyer, the seller or the operator can close a trade")
    if trade.state not in OPEN:
        raise refusals.Closed(f"trade {trade.trade_id} is already {trade.state}")
    trade, a = _go(trade, S.CLOSED, reason)
    return trade, [a]


def closed_on_chain(trade: Trade, *, delivered_wh: int, paid_wei: int) -> tuple[Trade, list[Step]]:
    """The market contract closed the trade (last kWh settled, escrow refunded).

    From ``fulfilled`` or ``closed`` this is the expected last step. If the chain closed
    a trade that was still ``recorded`` or ``delivering`` (the chain is the record), the
    trade goes through ``closed`` first, so every step is a valid transition.
    """
    if trade.state == S.SETTLED:
        return trade, []
    steps: list[Step] = []
    if trade.state in OPEN:
        trade, a = _go(trade, S.CLOSED, "closed on chain")
        steps.append(a)
    # the contract's figures are the record of what was delivered and paid
    trade = dataclasses.replace(trade, delivered_wh=delivered_wh, paid_wei=paid_wei)
    trade, b = _go(trade, S.SETTLED, trade.reason)
    steps.append(b)
    return trade, steps


def paid(trade: Trade, *, delivered_wh: int, paid_wei: int) -> Trade:
    """A settlement on chain (cumulative): only updates the counters we show."""
    return dataclasses.replace(trade, delivered_wh=max(trade.delivered_wh, delivered_wh),
                               paid_wei=max(trade.paid_wei, paid_wei))
