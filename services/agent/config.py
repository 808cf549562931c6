"""The agent's settings (``GRIDTRADE_*`` environment variables)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from services.bus import commands as cmd
from services.bus.config import BusSettings


class AgentSettings(BusSettings):
    """Everything in :class:`BusSettings` (``GRIDTRADE_SITE`` names the site it trades for;
    the tariffs bound its prices) plus the agent's own. The ``GRIDTRADE_AGENT_*`` limits
    are the owner's first ones: limits set later in the wallet's page are kept at the site
    and win over them."""

    agent_bind: str = Field(default="tcp://127.0.0.1:5565", description="where the agent answers its site's gateway")
    agent_account: str = Field(default="", description="the account it trades for; empty: the site wallet's first")
    agent_every_s: float = Field(default=2.0, gt=0, description="wall seconds between two decisions")
    agent_strategy: Literal["site", "utility"] = Field(
        default="site", description="site: trade the site's forecast surplus and deficit; utility: the utility's "
                                    "connection, buying at the feed-in and selling at the retail tariff")
    agent_market: Literal["english", "double"] = Field(default="english",
                                                       description="which market it trades in (as the auction runs)")
    agent_offer_duration_s: int = Field(default=30, gt=0, le=86400,
                                        description="the auction of an offer it places lasts this long (wall s)")
    agent_battery_wh: float = Field(default=7200.0, ge=0, description="the site battery's usable capacity")
    agent_enabled: bool = True
    agent_reserve_soc: float = Field(default=0.2, ge=0, le=1)
    agent_max_buy_wei_per_kwh: int | None = Field(default=None, gt=0)
    agent_min_sell_wei_per_kwh: int | None = Field(default=None, gt=0)
    agent_max_trade_wh: int = Field(default=2000, gt=0, le=10**9)
    agent_horizon_s: int = Field(default=3600, gt=0, le=7 * 86400)
    auction_min_increment_wei_per_kwh: int = Field(default=1, ge=0, description="the auction's (the same variable)")
    auction_clear_interval_s: float = Field(default=15.0, gt=0, description="the double auction's call interval "
                                                                           "(the same variable the auction reads)")

    def first_limits(self) -> cmd.AgentLimits:
        return cmd.AgentLimits(enabled=self.agent_enabled, reserve_soc=self.agent_reserve_soc,
                               max_buy_wei_per_kwh=self.agent_max_buy_wei_per_kwh,
                               min_sell_wei_per_kwh=self.agent_min_sell_wei_per_kwh,
                               max_trade_wh=self.agent_max_trade_wh, horizon_s=self.agent_horizon_s)
