"""The auction's settings (``GRIDTRADE_*`` environment variables)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from services.bus.config import BusSettings
from services.bus.events import Address


class AuctionSettings(BusSettings):
    """Everything in :class:`BusSettings` plus the market's own knobs."""

    auction_market: Literal["english", "double", "both"] = Field(
        default="english", description="which markets run: the english auction (default), the double auction, or both")
    auction_bind: str | None = Field(
        default=None, description="where the request server binds; default: the address in GRIDTRADE_AUCTION_RPC")
    auction_min_increment_wei_per_kwh: int = Field(
        default=1, ge=0, description="a bid must beat the highest bid by at least this much (0: equal bids allowed, "
                                     "the earliest wins the tie)")
    auction_max_duration_s: float = Field(default=7 * 86400, gt=0, description="longest auction a seller may run")
    auction_clear_interval_s: float = Field(
        default=15.0, gt=0, description="double auction: one call every this many seconds, aligned to Unix time")
    auction_operator: Address | None = Field(
        default=None, description="account that may close any trade besides its buyer")
    auction_trade_heartbeat_s: float = Field(
        default=1.0, gt=0, description="how often the live trades are announced (meters fail safe without it)")
    auction_balance_timeout_s: float = Field(
        default=2.0, gt=0, description="how long to wait for the chain service's balances before refusing a bid")
    auction_expiry_grace_s: float = Field(
        default=60.0, ge=0, description="a signed offer or bid must stay valid at least this long after the auction's "
                                        "end (or the call's clearing): the time the operator has to open the trade")
    auction_fallback_margin_s: float = Field(
        default=5.0, ge=0, description="when a winning bid's trade cannot be opened, the next bid is tried only if it "
                                       "and the offer stay valid at least this much longer")

    @property
    def english(self) -> bool:
        return self.auction_market in ("english", "both")

    @property
    def double(self) -> bool:
        return self.auction_market in ("double", "both")

    @property
    def bind(self) -> str:
        return self.auction_bind or self.auction_rpc
