"""Irradiance and load profiles from pvlib and demandlib, computed offline.

pvlib's Ineichen clear-sky model reads the Linke turbidity table that ships inside the
pvlib package, so nothing is downloaded. demandlib's BDEW 2025 profiles (H25 ...) read
CSV files that ship inside demandlib; holidays are passed explicitly (an empty mapping:
no holidays), so its optional ``holidays`` package is never consulted.
"""

from __future__ import annotations

import datetime as dt
import functools
import warnings

import numpy as np


class ClearSky:
    """GHI (W/m2) at any Unix time for a location, sampled once a minute per UTC day."""

    def __init__(self, latitude: float, longitude: float, altitude: float = 0.0) -> None:
        import pvlib  # imported here: it is slow to import and only the sim driver needs it

        self.location = pvlib.location.Location(latitude, longitude, tz="UTC", altitude=altitude)
        self._day = functools.lru_cache(maxsize=4)(self._compute_day)

    def _compute_day(self, day: dt.date) -> np.ndarray:
        import pandas as pd

        times = pd.date_range(dt.datetime(day.year, day.month, day.day), periods=1441, freq="1min", tz="UTC")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cs = self.location.get_clearsky(times, model="ineichen")
        return np.nan_to_num(cs["ghi"].to_numpy(dtype=float), nan=0.0).clip(min=0.0)

    def ghi(self, t: float) -> float:
        day = dt.datetime.fromtimestamp(t, dt.timezone.utc)
        values = self._day(day.date())
        minute = (day.hour * 3600 + day.minute * 60 + day.second + day.microsecond / 1e6) / 60.0
        i = int(minute)
        frac = minute - i
        return float(values[i] * (1 - frac) + values[min(i + 1, 1440)] * frac)


def bdew_profile(name: str, annual_kwh: float, day: dt.date) -> list[float]:
    """96 quarter-hour load values in W for ``day`` from a demandlib BDEW 2025 profile,
    scaled to ``annual_kwh`` a year."""
    import pandas as pd
    from demandlib import bdew

    classes = {"h25": bdew.H25, "g25": bdew.G25, "l25": bdew.L25, "p25": bdew.P25, "s25": bdew.S25}
    try:
        cls = classes[name.lower()]
    except KeyError:
        raise ValueError(f"unknown load profile {name!r}; known: {', '.join(classes)}") from None
    index = pd.date_range(dt.datetime(day.year, day.month, day.day), periods=96, freq="15min")
    with warnings.catch_warnings():
        # demandlib 0.2 still uses pandas' deprecated inplace= keywords
        warnings.simplefilter("ignore")
        series = cls(index, holidays={})
    # the profiles are kW for 1 GWh a year (1e6 kWh): scale to annual_kwh and to W
    return [float(v) * annual_kwh / 1e6 * 1000.0 for v in series.to_numpy(dtype=float)]
