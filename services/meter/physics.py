"""Pure models of a site's energy system: battery, load, PV panel and the site that ties
them to a meter's counters. No I/O, no clocks: callers pass the time and the step.

Sign conventions: powers in W, energies in Wh (floats inside the model, integer Wh on
the meter's counters), time steps in seconds of *simulated* time.

The site's power balance on its DC bus, for one step::

    pv_in + import_in  ->  battery  ->  load_out + export_out

Surplus the battery cannot take (full) is curtailed, first the import, then the PV; a
deficit it cannot cover (empty) is shed, first the export, then the load. What the
meter counts is what really flowed, so the counters never announce energy that the
battery did not get.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Callable, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator


class BatteryConfig(BaseModel):
    """A lead-acid battery bank."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    capacity_wh: float = Field(default=7200.0, gt=0, description="usable capacity (600 Ah at 12 V)")
    soc: float = Field(default=0.3, ge=0, le=1, description="state of charge at start")
    charge_eff: float = Field(default=0.85, gt=0, le=1, description="stored / energy in")
    discharge_eff: float = Field(default=0.9, gt=0, le=1, description="energy out / stored")
    nominal_v: float = Field(default=12.0, gt=0, description="12, 24 or 48 V banks")
    empty_v: float = Field(default=11.8, gt=0, description="rest voltage at 0 % for a 12 V bank")
    full_v: float = Field(default=12.8, gt=0, description="rest voltage at 100 % for a 12 V bank")


class PanelConfig(BaseModel):
    """A PV array: area x efficiency, clipped at its peak power."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    area_m2: float = Field(default=10.0, ge=0)
    efficiency: float = Field(default=0.18, ge=0, le=1)
    peak_w: float = Field(default=1800.0, ge=0, description="inverter/charge controller limit")
    losses: float = Field(default=0.1, ge=0, lt=1, description="wiring, soiling, temperature")


class LoadConfig(BaseModel):
    """A programmable load: a daily schedule of (hour, W) points or a BDEW profile."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    schedule: list[tuple[float, float]] = Field(
        default_factory=list,
        description="(hour of day 0-24, W) points; the load holds each value until the next point",
    )
    profile: str | None = Field(default=None, description="a demandlib BDEW 2025 profile: h25, g25, l25, p25, s25")
    annual_kwh: float = Field(default=3000.0, ge=0, description="yearly consumption the profile is scaled to")

    @field_validator("schedule")
    @classmethod
    def _hours(cls, v: list[tuple[float, float]]) -> list[tuple[float, float]]:
        for hour, watts in v:
            if not 0 <= hour <= 24:
                raise ValueError(f"hour {hour} is not within 0-24")
            if watts < 0 or not math.isfinite(watts):
                raise ValueError(f"load {watts} W must be a finite number >= 0")
        return sorted(v)


# --- battery --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Exchange:
    """What one battery step did, at its terminals and inside."""

    charged_wh: float  # energy in at the terminals (>= 0)
    discharged_wh: float  # energy out at the terminals (>= 0)
    stored_delta_wh: float  # change of the stored energy


class Battery:
    """Stored energy in [0, capacity]; charging stores ``in * charge_eff``, discharging
    draws ``out / discharge_eff`` from the store."""

    def __init__(self, cfg: BatteryConfig, stored_wh: float | None = None) -> None:
        self.cfg = cfg
        self.stored_wh = cfg.capacity_wh * cfg.soc if stored_wh is None else stored_wh
        self.stored_wh = min(max(self.stored_wh, 0.0), cfg.capacity_wh)

    @property
    def soc(self) -> float:
        return min(max(self.stored_wh / self.cfg.capacity_wh, 0.0), 1.0)

    @property
    def voltage_v(self) -> float:
        """Rest voltage, linear in SOC between the empty and full voltages of a 12 V bank."""
        scale = self.cfg.nominal_v / 12.0
        return scale * (self.cfg.empty_v + (self.cfg.full_v - self.cfg.empty_v) * self.soc)

    def headroom_in_wh(self) -> float:
        """The most energy the terminals can take now."""
        return (self.cfg.capacity_wh - self.stored_wh) / self.cfg.charge_eff

    def available_out_wh(self) -> float:
        """The most energy the terminals can give now."""
        return self.stored_wh * self.cfg.discharge_eff

    def exchange(self, net_wh: float) -> Exchange:
        """Push ``net_wh`` in (positive) or pull it out (negative), clamped to what fits."""
        if not math.isfinite(net_wh):
            raise ValueError("net energy must be finite")
        before = self.stored_wh
        if net_wh >= 0:
            headroom = self.headroom_in_wh()
            if net_wh >= headroom:
                accepted, self.stored_wh = headroom, self.cfg.capacity_wh
            else:
                accepted = net_wh
                self.stored_wh = min(before + net_wh * self.cfg.charge_eff, self.cfg.capacity_wh)
            return Exchange(accepted, 0.0, self.stored_wh - before)
        available = self.available_out_wh()
        if -net_wh >= available:
            given, self.stored_wh = available, 0.0
        else:
            given = -net_wh
            self.stored_wh = max(before - given / self.cfg.discharge_eff, 0.0)
        return Exchange(0.0, given, self.stored_wh - before)


# --- load -----------------------------------------------------------------------------


class Load:
    """Load power as a function of the time of day (seconds since midnight)."""

    def __init__(self, cfg: LoadConfig, profile: Sequence[float] | None = None) -> None:
        """``profile``: 96 quarter-hour values in W (e.g. from :func:`services.meter.solar.bdew_profile`);
        it wins over the schedule when given."""
        self.cfg = cfg
        self.profile = list(profile) if profile is not None else None
        self._hours = [h for h, _ in cfg.schedule]
        self._watts = [w for _, w in cfg.schedule]

    def power_w(self, seconds_of_day: float) -> float:
        seconds_of_day %= 86400.0
        if self.profile:
            slot = int(seconds_of_day // (86400.0 / len(self.profile))) % len(self.profile)
            return float(self.profile[slot])
        if not self._hours:
            return 0.0
        i = bisect.bisect_right(self._hours, seconds_of_day / 3600.0) - 1
        return self._watts[i]  # i == -1 wraps to the last point of the previous day


# --- PV -------------------------------------------------------------------------------


def panel_power_w(ghi_w_m2: float, panel: PanelConfig) -> float:
    """DC power from global horizontal irradiance on a flat panel."""
    if ghi_w_m2 <= 0 or not math.isfinite(ghi_w_m2):
        return 0.0
    return min(ghi_w_m2 * panel.area_m2 * panel.efficiency * (1.0 - panel.losses), panel.peak_w)


# --- the site -------------------------------------------------------------------------


@dataclasses.dataclass
class Flows:
    """Energy that flowed in one step (Wh, all >= 0)."""

    pv_wh: float = 0.0
    import_wh: float = 0.0
    load_wh: float = 0.0
    export_wh: float = 0.0
    stored_delta_wh: float = 0.0


@dataclasses.dataclass
class SiteState:
    """What a sim meter persists and reports: float accumulators of the counters."""

    t: float  # simulated Unix time
    stored_wh: float
    pv_total_wh: float = 0.0
    import_total_wh: float = 0.0
    export_total_wh: float = 0.0
    load_total_wh: float = 0.0
    relay_closed: bool = False
    pv_w: float = 0.0
    load_w: float = 0.0
    import_w: float = 0.0
    export_w: float = 0.0


class Site:
    """A site's DC bus: PV and line import charge the battery, load and line export drain it.

    ``ghi(t)`` gives irradiance at simulated time ``t``. While the relay is closed, a
    consumer site draws ``line_w`` from the line, a producer site gives ``line_w``
    (plus ``line_loss``, the share lost on the wire) to it.
    """

    def __init__(self, *, role: str, battery: BatteryConfig, panel: PanelConfig | None, load: Load,
                 ghi: Callable[[float], float], line_w: float, line_loss: float = 0.0,
                 state: SiteState | None = None, t0: float = 0.0, utc_offset_s: float = 0.0,
                 supply_w: float = 0.0) -> None:
        self.role = role
        self.supply_w = supply_w
        self.battery = Battery(battery, None if state is None else state.stored_wh)
        self.panel = panel
        self.load = load
        self.ghi = ghi
        self.line_w = line_w
        self.line_loss = line_loss
        self.utc_offset_s = utc_offset_s
        self.state = state or SiteState(t=t0, stored_wh=self.battery.stored_wh)

    # one step ---------------------------------------------------------------------

    def step(self, dt_s: float) -> Flows:
        """Advance by ``dt_s`` simulated seconds at the powers of the step's midpoint."""
        if dt_s <= 0:
            return Flows()
        st = self.state
        mid = st.t + dt_s / 2
        hours = dt_s / 3600.0
        pv_w = (panel_power_w(self.ghi(mid), self.panel) if self.panel else 0.0) + self.supply_w
        load_w = self.load.power_w(mid + self.utc_offset_s)
        import_w = self.line_w if (st.relay_closed and self.role == "consumer") else 0.0
        export_w = self.line_w * (1.0 + self.line_loss) if (st.relay_closed and self.role == "producer") else 0.0
        pv, imp, load, exp = pv_w * hours, import_w * hours, load_w * hours, export_w * hours
        ex = self.battery.exchange(pv + imp - load - exp)
        if pv + imp - load - exp >= 0:
            # surplus: the battery took ex.charged_wh of it; curtail the import, then the PV
            surplus_lost = (pv + imp - load - exp) - ex.charged_wh
            cut = min(imp, surplus_lost)
            imp -= cut
            pv -= min(pv, surplus_lost - cut)
        else:
            # deficit: the battery gave ex.discharged_wh; shed the export, then the load
            short = (load + exp - pv - imp) - ex.discharged_wh
            cut = min(exp, short)
            exp -= cut
            load -= min(load, short - cut)
        st.t += dt_s
        st.stored_wh = self.battery.stored_wh
        st.pv_total_wh += pv
        st.import_total_wh += imp
        st.export_total_wh += exp
        st.load_total_wh += load
        st.pv_w, st.load_w = pv / hours, load / hours
        st.import_w, st.export_w = imp / hours, exp / hours
        return Flows(pv, imp, load, exp, ex.stored_delta_wh)

    def advance_to(self, t: float, max_step_s: float = 60.0) -> None:
        """Integrate up to simulated time ``t`` in steps of at most ``max_step_s``."""
        while self.state.t < t - 1e-9:
            self.step(min(max_step_s, t - self.state.t))

    def set_relay(self, closed: bool) -> None:
        self.state.relay_closed = bool(closed)

    # what the meter shows ---------------------------------------------------------

    @property
    def energy_wh(self) -> int:
        """The meter's main counter: PV into the batteries (producer), line import (consumer)."""
        total = self.state.pv_total_wh if self.role == "producer" else self.state.import_total_wh
        return int(math.floor(total + 1e-9))

    @property
    def export_wh(self) -> int:
        return int(math.floor(self.state.export_total_wh + 1e-9))

    @property
    def power_w(self) -> float:
        return self.state.pv_w if self.role == "producer" else self.state.import_w

    @property
    def voltage_v(self) -> float:
        return self.battery.voltage_v

    @property
    def current_a(self) -> float:
        return self.power_w / self.voltage_v if self.voltage_v > 0 else 0.0


# --- what a driver reads ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Counters:
    """One reading of a meter, as its wire protocol carries it.

    ``energy_wh`` is the meter's cumulative counter: energy into the batteries from the
    PV (producer) or energy in from the line (consumer). ``export_wh`` is a producer's
    cumulative outflow through its relay when the meter measures it (``None`` when not).
    """

    energy_wh: int
    power_w: float
    voltage_v: float
    current_a: float
    relay_closed: bool
    export_wh: int | None = None
    soc: float | None = None
    pv_w: float | None = None
    load_w: float | None = None


def site_counters(site: Site, *, extras: bool = True) -> Counters:
    """The site's counters at the resolution the serial protocols carry
    (0.1 W, 0.01 V, 0.01 A, whole Wh)."""
    return Counters(
        energy_wh=site.energy_wh,
        power_w=round(site.power_w, 1),
        voltage_v=round(site.voltage_v, 2),
        current_a=round(site.current_a, 2),
        relay_closed=site.state.relay_closed,
        export_wh=site.export_wh if site.role == "producer" else None,
        soc=round(site.battery.soc, 4) if extras else None,
        pv_w=round(site.state.pv_w, 1) if extras else None,
        load_w=round(site.state.load_w, 1) if extras else None,
    )
