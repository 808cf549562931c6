"""The meter service's settings: ``GRIDTRADE_*`` environment variables (pydantic-settings).

``GRIDTRADE_METERS`` is a JSON list of meters, e.g.::

    [{"name": "pv", "role": "producer", "driver": "sim"},
     {"name": "grid", "role": "consumer", "driver": "line", "port": "/dev/ttyUSB0"},
     {"name": "dc", "role": "producer", "driver": "modbus", "port": "/dev/ttyUSB1", "device_id": 1}]

The simulated site (used by ``sim`` meters) is ``GRIDTRADE_SIM`` (JSON) or field by
field with ``__``: ``GRIDTRADE_SIM__TIME_SCALE=720``, ``GRIDTRADE_SIM__LATITUDE=48.1``.
"""

from __future__ import annotations

import pathlib
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from services.bus.config import BusSettings
from services.bus.events import Address, Name, Role

from .sim import SimParams

DriverName = Literal["sim", "line", "modbus"]

DEFAULT_RATED_W = 10_000.0
"""The rated power assumed for a serial meter that does not say (a household DC meter)."""
SIM_HEADROOM = 1.5
"""A sim meter is rated for its site's largest flow with this much headroom."""


class MeterConfig(BaseModel):
    """One meter of the site."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Name
    role: Role
    driver: DriverName = "sim"
    port: str | None = Field(default=None, description="serial device or pyserial URL (line, modbus)")
    baudrate: int = Field(default=9600, gt=0)
    device_id: int = Field(default=1, ge=1, le=247, description="Modbus slave address")
    export_registers: bool = Field(default=False, description="modbus: read the export extension 0x0008-0x0009")
    timeout_s: float = Field(default=1.0, gt=0, description="how long to wait for one reply")
    mint: bool | None = Field(default=None, description="sign and announce its cumulative production "
                                                        "(EnergyProduced); default: producers do")
    trade: bool = Field(default=True, description="relay follows the site's trades, Delivery is published")
    rated_w: float | None = Field(
        default=None, gt=0, le=1e9,
        description="the most power the meter can measure (W): a reading implying more over the time since the "
                    "last one is refused; default: a sim meter's largest flow (PV peak, line) x 1.5, else 10 kW")
    time_scale: float | None = Field(
        default=None, gt=0, le=1e6,
        description="meter seconds per wall second (an emulator backed by a time-scaled simulated site); "
                    "default: GRIDTRADE_SIM's time_scale, 1 unless set")

    @model_validator(mode="after")
    def _port_needed(self) -> MeterConfig:
        if self.driver != "sim" and not self.port:
            raise ValueError(f"meter {self.name!r}: the {self.driver} driver needs a port")
        return self

    @property
    def mints(self) -> bool:
        return self.role == "producer" if self.mint is None else self.mint

    @property
    def keyed(self) -> bool:
        """Whether the meter holds a key: it signs production, delivery or export."""
        return self.mints or self.trade

    def rating(self, sim: SimParams) -> float:
        """The most Wh per hour of wall time this meter can count: its rated power (W) times
        its time scale."""
        rated = self.rated_w
        if rated is None:
            if self.driver == "sim":
                # what the simulated counters can reach: PV into the batteries, the line
                largest = max(sim.panel.peak_w + sim.supply_w, sim.line_w * (1.0 + sim.line_loss), 1.0)
                rated = largest * SIM_HEADROOM
            else:
                rated = DEFAULT_RATED_W
        return rated * (self.time_scale if self.time_scale is not None else sim.time_scale)


class MeterSettings(BusSettings):
    """Settings of ``gridtrade meter``."""

    model_config = SettingsConfigDict(env_prefix="GRIDTRADE_", extra="ignore", env_nested_delimiter="__")

    role: Role = Field(default="producer", description="role of the default meter when GRIDTRADE_METERS is unset")
    meters: list[MeterConfig] = Field(default_factory=list, description="JSON list of meters (see module doc)")
    account: Address | None = Field(default=None, description="account the site's meter keys are registered for "
                                                              "(credited with their mints); empty: none")
    sim: SimParams = SimParams()

    @field_validator("account", mode="before")
    @classmethod
    def _empty_is_none(cls, v: object) -> object:
        return None if v == "" else v  # GRIDTRADE_ACCOUNT= (e.g. compose's ${VAR:-}): no account yet

    reading_interval_s: float = Field(default=1.0, gt=0, description="wall seconds between MeterReading events")
    production_granularity_wh: int = Field(default=1000, ge=1, description="sign and publish the cumulative "
                                                                         "production each time it passes a multiple "
                                                                         "of this")
    delivery_granularity_wh: int = Field(default=10, ge=0, description="publish Delivery every N Wh; 0: each reading")
    mismatch_tolerance: float = Field(default=0.05, ge=0, le=1, description="allowed (seller-buyer)/seller")
    mismatch_slack_wh: int = Field(default=20, ge=0, description="absolute Wh allowed on top of the tolerance")
    lag_s: float = Field(default=30.0, gt=0, description="seller: flag a trade whose buyer's signed Delivery was "
                                                         "not heard for this long ...")
    lag_slack_wh: int = Field(default=100, ge=0, description="... while the seller exported more than this since "
                                                             "(keep it above delivery_granularity_wh)")
    meter_keys_dir: pathlib.Path | None = Field(default=None, description="default <data_dir>/meter-keys")
    meter_passphrase_file: pathlib.Path | None = Field(
        default=None, description="file whose first line unlocks the meter keys (never logged); default: "
                                  "<data_dir>/meter-passphrase, made at random on the first start")
    meter_scrypt_n: int = Field(default=2**18, ge=2**10, le=2**20,
                                description="scrypt work factor of new meter key files (a power of two)")
    trade_timeout_s: float = Field(default=5.0, gt=0, description="open the relay after this long without a trade heartbeat")
    fail_open_after: int = Field(default=3, ge=1, description="open the relay after this many failures in a row "
                                                              "(reads, implausible readings, bookkeeping)")
    confirm_reads: int = Field(default=3, ge=1, le=100, description="consecutive consistent readings that make a "
                                                                    "counter reset or jump believed")
    backoff_initial_s: float = Field(default=0.2, gt=0)
    backoff_max_s: float = Field(default=10.0, gt=0)
    store_path: pathlib.Path | None = Field(default=None, description="default <data_dir>/meter.sqlite")

    @model_validator(mode="after")
    def _default_meter(self) -> MeterSettings:
        if not self.meters:
            self.meters = [MeterConfig(name="main", role=self.role, driver="sim")]
        names = [m.name for m in self.meters]
        if len(set(names)) != len(names):
            raise ValueError(f"meter names must be unique: {names}")
        return self

    @property
    def keys_folder(self) -> pathlib.Path:
        return self.meter_keys_dir if self.meter_keys_dir is not None else self.data_dir / "meter-keys"

    @property
    def store_file(self) -> pathlib.Path:
        return self.store_path if self.store_path is not None else self.data_dir / "meter.sqlite"
