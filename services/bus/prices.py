"""What energy costs in wei, the one rule every service and the market contract share."""

from __future__ import annotations

__all__ = ["wei_for"]


def wei_for(wh: int, price_wei_per_kwh: int, *, round_up: bool = False) -> int:
    """Wei for ``wh`` Wh at ``price_wei_per_kwh`` (a price per 1000 Wh).

    Rounded down by default: ``floor(wh * price / 1000)`` is what the market contract locks
    for a trade and pays for a cumulative delivery (``EnergyMarket.costOf``). With
    ``round_up`` the ceiling, for an amount held for it that must never fall short (the
    escrow the auction and the trader count a bid or a buy order as needing).
    """
    if round_up:
        return -(-(wh * price_wei_per_kwh) // 1000)
    return wh * price_wei_per_kwh // 1000
