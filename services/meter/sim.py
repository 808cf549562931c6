"""The simulated site behind the ``sim`` driver and the emulators: parameters, a scaled
clock, and the wiring of pvlib/demandlib into the pure :mod:`physics`."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import time
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field

from .physics import BatteryConfig, Counters, Load, LoadConfig, PanelConfig, Site, SiteState, site_counters

DEFAULT_SCHEDULE = [(0, 80.0), (6, 250.0), (8, 120.0), (12, 300.0), (14, 120.0), (18, 600.0), (22, 150.0)]


class SimParams(BaseModel):
    """Everything the simulated site needs. Set as ``GRIDTRADE_SIM`` (JSON) or field by
    field (``GRIDTRADE_SIM__TIME_SCALE=720``)."""

    model_config = ConfigDict(extra="forbid")
    latitude: float = Field(default=52.52, ge=-90, le=90)
    longitude: float = Field(default=13.40, ge=-180, le=180)
    altitude: float = 34.0
    utc_offset_h: float = Field(default=0.0, ge=-14, le=14, description="local time of the load schedule")
    panel: PanelConfig = PanelConfig()
    battery: BatteryConfig = BatteryConfig()
    load: LoadConfig = LoadConfig(schedule=DEFAULT_SCHEDULE)
    supply_w: float = Field(default=0.0, ge=0, le=1e7,
                            description="a constant source into the site's bus besides its PV, counted as generation "
                                        "(the utility's connection: what the grid makes available)")
    line_w: float = Field(default=500.0, ge=0, description="power over the line while a trade's relays are closed")
    line_loss: float = Field(default=0.03, ge=0, lt=1, description="share of a producer's export lost on the wire")
    time_scale: float = Field(default=1.0, gt=0, le=1e6, description="simulated seconds per wall second (720: a day in 2 min)")
    start: dt.datetime | None = Field(default=None, description="simulated start time (UTC); default: now")
    max_step_s: float = Field(default=60.0, gt=0, description="integration step in simulated seconds")


class SimClock:
    """Simulated Unix time: ``t0`` plus scaled wall time since the clock was made."""

    def __init__(self, t0: float, scale: float, mono: Callable[[], float] = time.monotonic) -> None:
        self.t0, self.scale, self._mono = t0, scale, mono
        self._m0 = mono()

    def now(self) -> float:
        return self.t0 + (self._mono() - self._m0) * self.scale


class SimSite:
    """A :class:`~services.meter.physics.Site` run on a :class:`SimClock`; restored from a
    saved state it continues where it stopped (counters, battery, simulated time)."""

    def __init__(self, params: SimParams, role: str, state: dict | None = None) -> None:
        from .solar import ClearSky, bdew_profile

        self.params = params
        self.role = role
        sky = ClearSky(params.latitude, params.longitude, params.altitude)
        start = (params.start or dt.datetime.now(dt.timezone.utc))
        if start.tzinfo is None:
            start = start.replace(tzinfo=dt.timezone.utc)
        restored = SiteState(**state) if state else None
        t0 = restored.t if restored else start.timestamp()
        profile = None
        if params.load.profile:
            profile = bdew_profile(params.load.profile, params.load.annual_kwh,
                                   dt.datetime.fromtimestamp(t0, dt.timezone.utc).date())
        self.site = Site(role=role, battery=params.battery, panel=params.panel, load=Load(params.load, profile),
                         ghi=sky.ghi, line_w=params.line_w, line_loss=params.line_loss, state=restored, t0=t0,
                         supply_w=params.supply_w,
                         utc_offset_s=params.utc_offset_h * 3600)
        self.clock = SimClock(t0, params.time_scale)

    def read(self) -> Counters:
        self.site.advance_to(self.clock.now(), self.params.max_step_s)
        return site_counters(self.site)

    def set_relay(self, closed: bool) -> None:
        self.site.advance_to(self.clock.now(), self.params.max_step_s)
        self.site.set_relay(closed)

    def state_json(self) -> str:
        return json.dumps(dataclasses.asdict(self.site.state))
