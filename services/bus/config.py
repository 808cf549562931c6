"""Settings every service shares, from ``GRIDTRADE_*`` environment variables."""

from __future__ import annotations

import pathlib

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .events import Authority


class BusSettings(BaseSettings):
    """How a service joins its micro-grid's bus. Each service subclasses this."""

    model_config = SettingsConfigDict(env_prefix="GRIDTRADE_", extra="ignore")

    site: str = Field(default="market", pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$",
                      description="this site's name; topics end with it, keys are named by it")
    data_dir: pathlib.Path = Field(default=pathlib.Path("data"), description="where this site keeps its state")
    hub_pub: str = Field(default="tcp://127.0.0.1:5550", description="the hub's XSUB endpoint: publishers connect here")
    hub_sub: str = Field(default="tcp://127.0.0.1:5551", description="the hub's XPUB endpoint: subscribers connect here")
    hub_site: str = Field(default="market", description="the site whose key the hub serves with")
    keys_dir: pathlib.Path | None = Field(default=None, description="CURVE keys; default <data_dir>/keys")
    insecure: bool = Field(default=False, description="run TCP sockets without CURVE (logs a warning)")
    heartbeat_s: float = Field(default=1.0, gt=0, description="publisher heartbeat interval")
    outbox_keep: int = Field(default=100_000, ge=100, description="events kept per topic for replay")
    replay_bind: str = Field(default="tcp://127.0.0.1:*", description="where a publisher serves replays")
    replay_advertise: str | None = Field(
        default=None, description="host put in the replay endpoint that heartbeats announce (when replay_bind "
                                  "binds 0.0.0.0: the address other hosts reach this one at)")
    rpc_timeout_s: float = Field(default=5.0, gt=0)
    rpc_max_inflight_per_site: int = Field(
        default=32, ge=1, description="request servers: requests of one calling site running at once; more are "
                                      "answered at once with the error 'busy'")
    rpc_commands_keep_s: float = Field(
        default=86400.0, gt=0, description="request servers: how long the reply of an executed command is kept "
                                           "(a retry with the same command id within this window is not run again)")
    chain_rpc: str = Field(default="tcp://127.0.0.1:5560", description="the chain service's request endpoint")
    chain_site: str = "market"
    auction_rpc: str = Field(default="tcp://127.0.0.1:5561", description="the auction service's request endpoint")
    auction_site: str = "market"
    wallet_rpc: str = Field(default="tcp://127.0.0.1:5562",
                            description="this site's wallet (the chain service in its site role): its request endpoint")
    wallet_site: str | None = Field(default=None, description="the site whose key the wallet serves with; "
                                                              "default: this site (a wallet serves its own site only)")
    metrics_port: int = Field(default=0, ge=0, le=65535, description="/healthz and /metrics port; 0 = off")
    metrics_host: str = "127.0.0.1"
    log_level: str = "INFO"
    tariff_retail_wei_per_kwh: int = Field(
        default=3_000_000_000_000_000, gt=0, description="the grid's retail tariff (wei per kWh): what a site pays "
                                                         "the grid for energy; no site agent pays more in the market")
    tariff_feed_in_wei_per_kwh: int = Field(
        default=500_000_000_000_000, gt=0, description="the grid's feed-in tariff (wei per kWh): what the grid pays "
                                                       "a site for energy fed in; no site agent sells for less")

    utility_site: str = Field(
        default="utility", pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$",
        description="the site name of the utility grid's connection; its trades are the micro-grid's exchange with "
                    "the grid, not local trades")

    @model_validator(mode="after")
    def _tariffs(self) -> BusSettings:
        if not 0 < self.tariff_feed_in_wei_per_kwh <= self.tariff_retail_wei_per_kwh:
            raise ValueError(
                f"the feed-in tariff ({self.tariff_feed_in_wei_per_kwh} wei/kWh) must be more than 0 and at most the "
                f"retail tariff ({self.tariff_retail_wei_per_kwh} wei/kWh): set GRIDTRADE_TARIFF_FEED_IN_WEI_PER_KWH "
                f"<= GRIDTRADE_TARIFF_RETAIL_WEI_PER_KWH")
        return self

    @property
    def authority(self) -> Authority:
        """Who speaks for the market on the bus (the publish policy of market, trade and chain events)."""
        return Authority.of(self.hub_site, auction_site=self.auction_site, chain_site=self.chain_site)

    @property
    def keys(self) -> pathlib.Path:
        return self.keys_dir if self.keys_dir is not None else self.data_dir / "keys"
