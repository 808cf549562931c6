"""The gateway's settings (``GRIDTRADE_*`` environment variables)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from services.bus.config import BusSettings


class GatewaySettings(BusSettings):
    """Everything in :class:`BusSettings` (``GRIDTRADE_SITE`` names this site: it is the
    ``seller_site``/``buyer_site`` of every offer and bid placed here) plus the web side."""

    agent_rpc: str = Field(default="", description="this site's agent's request endpoint; empty: the site runs no "
                                                   "agent (its page says so, its owner trades by hand)")
    http_host: str = Field(default="127.0.0.1", description="where the web UI and the API listen")
    http_port: int = Field(default=8080, ge=0, le=65535, description="0 picks a free port (tests)")
    session_ttl_s: float = Field(default=3600.0, gt=0, le=7 * 86400,
                                 description="a login lasts this long (the chain unlocks the key for as long)")
    cookie_secure: bool = Field(default=False, description="mark the session cookie Secure (serve over https)")
    login_max_failures: int = Field(default=5, ge=1, description="failed logins per address or client IP in "
                                                                 "login_window_s before logins are refused")
    login_window_s: float = Field(default=60.0, gt=0)
    login_max_delay_s: float = Field(default=300.0, gt=0, description="cap of the exponential back-off")
    gateway_rpc_timeout_s: float = Field(default=5.0, gt=0, description="how long to wait for chain/auction")
    gateway_reserve_timeout_s: float = Field(
        default=150.0, gt=0, description="how long a bid waits for the wallet's escrow reservation (it answers once "
                                         "its transaction is in a block)")
    gateway_offer_grace_s: int = Field(
        default=600, ge=0, description="a signed offer stays valid this long after its auction ends: the time the "
                                       "market has to open the trade (the auction asks for at least its own grace)")
    gateway_bid_grace_s: int = Field(
        default=600, ge=0, description="a signed bid, and the escrow reserved for it, last this long after the "
                                       "auction ends")
    gateway_trade_duration_s: int = Field(
        default=3600, gt=0, lt=2**32, description="a trade opened from an offer sold here runs at most this long "
                                                  "(the signed offer's duration)")
    explorer_tx_url: str = Field(default="", max_length=300,
                                 description="a block explorer's transaction page, {hash} replaced by the hash "
                                             "(e.g. https://explorer.example/tx/{hash}); empty: no links")
    auction_min_increment_wei_per_kwh: int = Field(
        default=1, ge=0, description="the auction's minimum increment (the same variable the auction reads), shown "
                                     "on each offer")
    auction_market: Literal["english", "double", "both"] = Field(
        default="english", description="which markets the auction runs (the same variable the auction reads): the "
                                       "page shows the double auction's panel when it runs")
    auction_clear_interval_s: float = Field(
        default=15.0, gt=0, description="the double auction's call interval (the same variable the auction reads)")
    gateway_balance_poll_s: float = Field(default=2.0, gt=0, description="how often the balances of the accounts "
                                          "with a page open are read, to push changes (Ether received) to it")
