"""A micro-grid scenario: where it is, its tariffs, its market and its sites (pure: the
only I/O is reading the TOML file and a site's load CSV, in :func:`load`).

A scenario file is TOML::

    [grid]
    name = "village-20"
    latitude = 52.52            # for pvlib's clear-sky model
    longitude = 13.40
    tz = "Europe/Berlin"        # the sites' local time (the load profiles follow it)
    start = 2024-06-21          # the simulation starts at local midnight of this day
    market = "english"          # or "double" (the auction's call market)

    [tariffs]                   # the utility's: it sells at retail, buys at feed-in
    retail_wei_per_kwh = 3_000_000_000_000_000
    feed_in_wei_per_kwh = 500_000_000_000_000

    [utility]                   # the grid's connection, a market participant of its own
    supply_w = 20000            # what the grid makes available (minted as it comes)
    max_trade_wh = 300          # its lots (an agent bids only on lots up to its own largest trade)

    [[sites]]
    name = "solar-1"
    pv_peak_w = 1800            # 0: no PV
    battery = { capacity_wh = 7200, soc = 0.5 }
    load = { profile = "h25", annual_kwh = 1500 }   # a demandlib BDEW profile ...
    # load = { csv = "loads/solar-1.csv" }          # ... or a daily schedule: "hour,watts" lines
    agent = { reserve_soc = 0.2, max_trade_wh = 600 }   # services.bus.commands.AgentLimits

    [generate]                  # N households, expanded deterministically from the seed
    households = 20
    pv_share = 0.4
    seed = 1
    agent = { max_trade_wh = 400, horizon_s = 7200 }  # limits every generated household starts with

A site with PV sells through a producer meter, one without buys through a consumer meter
(``role`` sets it otherwise). Listed sites come first, generated ones (``house-001`` ...)
after them. A bad file raises :class:`ScenarioError` naming the field.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import pathlib
import random
import tomllib
import zoneinfo
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from services.bus import commands as cmd
from services.bus.errors import GridtradeError

__all__ = ["Battery", "Generate", "GridInfo", "Load", "Scenario", "ScenarioError", "Site", "SiteSpec", "Tariffs",
           "Utility", "expand", "load", "parse"]

SITE_NAME = r"^[a-z0-9][a-z0-9_-]{0,62}$"
RESERVED = ("market", "utility")
PANEL_EFFICIENCY = 0.18  # the sim's panel: area x efficiency x irradiance, clipped at the peak
MAX_SITES = 1000


class ScenarioError(GridtradeError, ValueError):
    """A scenario file that cannot be used (the message names the file and the field)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GridInfo(_Strict):
    name: str = Field(default="micro-grid", max_length=100)
    latitude: float = Field(ge=-90, le=90)
    longitude: float = Field(ge=-180, le=180)
    altitude: float = Field(default=0.0, ge=-500, le=9000)
    tz: str = Field(default="UTC", description="IANA time zone of the sites' local time")
    start: dt.date = Field(description="the simulation starts at local midnight of this day")
    market: Literal["english", "double"] = "english"

    @field_validator("tz")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            zoneinfo.ZoneInfo(v)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r} (an IANA name such as 'Europe/Berlin')") from None
        return v


class Tariffs(_Strict):
    retail_wei_per_kwh: int = Field(gt=0)
    feed_in_wei_per_kwh: int = Field(gt=0)

    @model_validator(mode="after")
    def _order(self) -> Tariffs:
        if self.feed_in_wei_per_kwh > self.retail_wei_per_kwh:
            raise ValueError("feed_in_wei_per_kwh must be at most retail_wei_per_kwh")
        return self


class Battery(_Strict):
    capacity_wh: float = Field(gt=0, le=1e7)
    soc: float = Field(default=0.3, ge=0, le=1, description="state of charge at the start")


class Load(_Strict):
    """A demandlib BDEW profile scaled to ``annual_kwh``, or a CSV of a daily schedule."""

    profile: Literal["h25", "g25", "l25", "p25", "s25"] | None = None
    annual_kwh: float | None = Field(default=None, ge=0, le=1e7)
    csv: str | None = Field(default=None, description="'hour,watts' lines (a header line is allowed), relative to "
                                                      "the scenario file")
    schedule: tuple[tuple[float, float], ...] = Field(default=(), description="filled in from the CSV on loading")

    @model_validator(mode="after")
    def _one_kind(self) -> Load:
        if (self.profile is None) == (self.csv is None and not self.schedule):
            raise ValueError("give either 'profile' (with 'annual_kwh') or 'csv'")
        if self.profile is not None and self.annual_kwh is None:
            raise ValueError("a profile needs 'annual_kwh'")
        for hour, watts in self.schedule:
            if not 0 <= hour <= 24 or not 0 <= watts <= 1e7:
                raise ValueError(f"schedule point ({hour}, {watts}): hour 0-24 and watts 0-1e7")
        return self


class Site(_Strict):
    name: str = Field(pattern=SITE_NAME)
    pv_peak_w: float = Field(default=0.0, ge=0, le=1e6)
    battery: Battery
    load: Load
    role: Literal["producer", "consumer"] | None = Field(default=None, description="default: producer with PV")
    agent: cmd.AgentLimits = cmd.AgentLimits()

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, v: str) -> str:
        if v in RESERVED:
            raise ValueError(f"{v!r} is the name of the market's or the utility's site")
        return v

    @property
    def meter_role(self) -> str:
        return self.role or ("producer" if self.pv_peak_w > 0 else "consumer")


class Utility(_Strict):
    supply_w: float = Field(default=20000.0, gt=0, le=1e7)
    max_trade_wh: int = Field(default=2000, gt=0, le=10**9)


class Generate(_Strict):
    households: int = Field(ge=1, le=MAX_SITES)
    pv_share: float = Field(ge=0, le=1)
    seed: int = 0
    prefix: str = Field(default="house", pattern=r"^[a-z][a-z0-9-]{0,40}$")
    agent: cmd.AgentLimits = cmd.AgentLimits()


class Scenario(_Strict):
    grid: GridInfo
    tariffs: Tariffs
    utility: Utility = Utility()
    sites: tuple[Site, ...] = ()
    generate: Generate | None = None

    @model_validator(mode="after")
    def _sites(self) -> Scenario:
        every = expand(self)
        if not every:
            raise ValueError("a scenario needs at least one site ([[sites]] or [generate])")
        if len(every) > MAX_SITES:
            raise ValueError(f"at most {MAX_SITES} sites")
        names = [s.name for s in every]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"site names must be unique: {', '.join(dup)}")
        return self

    @property
    def all_sites(self) -> tuple[Site, ...]:
        return expand(self)

    def start_utc(self) -> dt.datetime:
        """Local midnight of the start day, in UTC."""
        local = dt.datetime.combine(self.grid.start, dt.time(0), tzinfo=zoneinfo.ZoneInfo(self.grid.tz))
        return local.astimezone(dt.timezone.utc)

    def utc_offset_h(self) -> float:
        """The local time's offset from UTC on the start day (hours)."""
        off = self.start_utc().astimezone(zoneinfo.ZoneInfo(self.grid.tz)).utcoffset()
        return (off or dt.timedelta()).total_seconds() / 3600


def expand(s: Scenario) -> tuple[Site, ...]:
    """The scenario's sites: those listed, then the generated households. The same seed
    gives the same households, on any machine (``random.Random`` is seeded, its use fixed)."""
    g = s.generate
    if g is None:
        return s.sites
    rng = random.Random(g.seed)
    n_pv = round(g.households * g.pv_share)
    with_pv = set(rng.sample(range(g.households), n_pv))
    width = max(3, len(str(g.households)))
    out = list(s.sites)
    for i in range(g.households):
        pv = i in with_pv
        peak = float(rng.randrange(15, 41) * 100) if pv else 0.0  # 1.5 - 4 kWp
        # with PV a bank of 4.8 - 9.6 kWh, 20 - 60 % full; without, a small one running low
        capacity = float(rng.choice((4800, 7200, 9600)) if pv else rng.choice((1200, 2400)))
        soc = rng.randrange(20, 61, 5) / 100 if pv else rng.randrange(10, 31, 5) / 100
        annual = float(rng.randrange(15, 46) * 100)  # 1500 - 4500 kWh a year
        out.append(Site(name=f"{g.prefix}-{i + 1:0{width}d}", pv_peak_w=peak,
                        battery=Battery(capacity_wh=capacity, soc=soc), load=Load(profile="h25", annual_kwh=annual),
                        agent=g.agent))
    return tuple(out)


def _where(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def _say(e: ValidationError, source: str) -> ScenarioError:
    lines = [f"{source}: {_where(err['loc'])}: {err['msg']}" for err in e.errors()]
    return ScenarioError("\n".join(lines))


def read_schedule(text: str, source: str) -> tuple[tuple[float, float], ...]:
    """'hour,watts' lines of a daily load schedule (a first line that is not numbers is a header)."""
    points = []
    for n, row in enumerate(csv.reader(io.StringIO(text)), 1):
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
            continue
        try:
            hour, watts = float(row[0]), float(row[1])
        except (ValueError, IndexError):
            if n == 1:
                continue
            raise ScenarioError(f"{source}: line {n}: expected 'hour,watts', got {','.join(row)!r}") from None
        points.append((hour, watts))
    if not points:
        raise ScenarioError(f"{source}: no 'hour,watts' line")
    return tuple(sorted(points))


def parse(data: dict, source: str = "scenario", base: pathlib.Path | None = None) -> Scenario:
    """A scenario from the TOML's tables; a load CSV is read relative to ``base``."""
    try:
        scenario = Scenario.model_validate(data)
    except ValidationError as e:
        raise _say(e, source) from None
    if base is None or not any(s.load.csv for s in scenario.sites):
        return scenario
    sites = []
    for i, site in enumerate(scenario.sites):
        if site.load.csv and not site.load.schedule:
            path = (base / site.load.csv)
            try:
                text = path.read_text()
            except OSError as e:
                raise ScenarioError(f"{source}: sites.{i}.load.csv: cannot read {path}: {e.strerror}") from None
            try:
                load_ = site.load.model_copy(update={"schedule": read_schedule(text, str(path))})
                Load.model_validate(load_.model_dump())
            except ValidationError as e:
                raise _say(e, f"{source}: sites.{i}.load") from None
            site = site.model_copy(update={"load": load_})
        sites.append(site)
    return scenario.model_copy(update={"sites": tuple(sites)})


def load(path: pathlib.Path) -> Scenario:
    """Read and check a scenario file (raises :class:`ScenarioError`)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ScenarioError(f"{path}: cannot read: {e.strerror}") from None
    try:
        data = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ScenarioError(f"{path}: not valid TOML: {e}") from None
    return parse(data, str(path), path.parent)


# --- what a site's services are told --------------------------------------------------------


class SiteSpec(_Strict):
    """A site as its services run it: the meter's simulated site (``services.meter.sim``
    field names) and the agent's first limits."""

    name: str
    role: str
    sim: dict
    limits: cmd.AgentLimits
    battery_wh: float


def site_spec(s: Scenario, site: Site) -> SiteSpec:
    g = s.grid
    load_: dict = ({"profile": site.load.profile, "annual_kwh": site.load.annual_kwh} if site.load.profile
                   else {"schedule": [list(p) for p in site.load.schedule]})
    panel = {"area_m2": site.pv_peak_w / (1000 * PANEL_EFFICIENCY), "efficiency": PANEL_EFFICIENCY,
             "peak_w": site.pv_peak_w}
    sim = {"latitude": g.latitude, "longitude": g.longitude, "altitude": g.altitude,
           "utc_offset_h": s.utc_offset_h(), "panel": panel,
           "battery": {"capacity_wh": site.battery.capacity_wh, "soc": site.battery.soc}, "load": load_}
    return SiteSpec(name=site.name, role=site.meter_role, sim=sim, limits=site.agent,
                    battery_wh=site.battery.capacity_wh)
