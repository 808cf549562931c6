"""Property-based tests of the pure meter models."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.meter.physics import (Battery, BatteryConfig, Load, LoadConfig, PanelConfig, Site, panel_power_w,
                                   site_counters)

battery_cfgs = st.builds(
    BatteryConfig,
    capacity_wh=st.floats(10, 1e5),
    soc=st.floats(0, 1),
    charge_eff=st.floats(0.5, 1),
    discharge_eff=st.floats(0.5, 1),
)
flows = st.lists(st.floats(-1e5, 1e5, allow_nan=False), min_size=1, max_size=60)


@given(battery_cfgs, flows)
def test_battery_stays_within_empty_and_full(cfg: BatteryConfig, steps: list[float]) -> None:
    b = Battery(cfg)
    for net in steps:
        b.exchange(net)
        assert 0.0 <= b.stored_wh <= cfg.capacity_wh
        assert 0.0 <= b.soc <= 1.0
        assert cfg.empty_v - 1e-9 <= b.voltage_v <= cfg.full_v + 1e-9


@given(battery_cfgs, flows)
def test_battery_conserves_energy_within_its_efficiencies(cfg: BatteryConfig, steps: list[float]) -> None:
    b = Battery(cfg)
    start = b.stored_wh
    charged = discharged = 0.0
    for net in steps:
        ex = b.exchange(net)
        assert ex.charged_wh >= 0 and ex.discharged_wh >= 0
        assert ex.charged_wh <= max(net, 0) + 1e-9 and ex.discharged_wh <= max(-net, 0) + 1e-9
        charged += ex.charged_wh
        discharged += ex.discharged_wh
    expected = start + charged * cfg.charge_eff - discharged / cfg.discharge_eff
    assert b.stored_wh == pytest.approx(expected, rel=1e-9, abs=1e-6)
    # what came out never exceeds what was there plus what went in, after losses
    assert discharged <= (start + charged * cfg.charge_eff) * cfg.discharge_eff + 1e-6


@given(battery_cfgs)
def test_battery_charges_only_to_full_and_empties_only_to_zero(cfg: BatteryConfig) -> None:
    b = Battery(cfg)
    ex = b.exchange(1e9)
    assert b.stored_wh == pytest.approx(cfg.capacity_wh)
    assert ex.charged_wh == pytest.approx((cfg.capacity_wh * (1 - cfg.soc)) / cfg.charge_eff, abs=1e-6)
    assert b.exchange(10).charged_wh == 0.0
    ex = b.exchange(-1e9)
    assert b.stored_wh == pytest.approx(0.0, abs=1e-9)
    assert ex.discharged_wh == pytest.approx(cfg.capacity_wh * cfg.discharge_eff)
    assert b.exchange(-10).discharged_wh == 0.0


def test_battery_rejects_non_finite() -> None:
    with pytest.raises(ValueError):
        Battery(BatteryConfig()).exchange(math.nan)


@given(
    role=st.sampled_from(["producer", "consumer"]),
    cfg=battery_cfgs,
    ghi=st.floats(0, 1200),
    load_w=st.floats(0, 5000),
    line_w=st.floats(0, 5000),
    line_loss=st.floats(0, 0.2),
    relays=st.lists(st.booleans(), min_size=1, max_size=30),
    dt=st.floats(1, 900),
)
@settings(max_examples=200)
def test_site_balances_every_flow(role, cfg, ghi, load_w, line_w, line_loss, relays, dt) -> None:
    site = Site(role=role, battery=cfg, panel=PanelConfig(), load=Load(LoadConfig(schedule=[(0, load_w)])),
                ghi=lambda t: ghi, line_w=line_w, line_loss=line_loss)
    start = site.battery.stored_wh
    charged = discharged = 0.0
    for closed in relays:
        site.set_relay(closed)
        before = site.battery.stored_wh
        f = site.step(dt)
        net = f.pv_wh + f.import_wh - f.load_wh - f.export_wh
        # the meter never counts more than could flow
        assert 0 <= f.pv_wh <= panel_power_w(ghi, PanelConfig()) * dt / 3600 + 1e-6
        assert 0 <= f.export_wh <= line_w * (1 + line_loss) * dt / 3600 + 1e-6
        assert 0 <= f.load_wh <= load_w * dt / 3600 + 1e-6
        if not closed:
            assert f.import_wh == 0 and f.export_wh == 0
        if net >= 0:
            charged += net
            assert site.battery.stored_wh - before == pytest.approx(net * cfg.charge_eff, abs=1e-6)
        else:
            discharged -= net
            assert before - site.battery.stored_wh == pytest.approx(-net / cfg.discharge_eff, abs=1e-6)
        assert 0 <= site.battery.stored_wh <= cfg.capacity_wh
    st_ = site.state
    in_ = st_.pv_total_wh + st_.import_total_wh
    out = st_.load_total_wh + st_.export_total_wh
    assert site.battery.stored_wh == pytest.approx(
        start + charged * cfg.charge_eff - discharged / cfg.discharge_eff, abs=1e-5)
    assert in_ - out == pytest.approx(charged - discharged, abs=1e-5)
    c = site_counters(site)
    assert c.energy_wh == math.floor((st_.pv_total_wh if role == "producer" else st_.import_total_wh) + 1e-9)


def test_full_producer_battery_curtails_pv_and_counts_only_what_went_in() -> None:
    site = Site(role="producer", battery=BatteryConfig(capacity_wh=100, soc=1.0), panel=PanelConfig(),
                load=Load(LoadConfig()), ghi=lambda t: 1000.0, line_w=0)
    site.advance_to(3600)
    assert site.energy_wh == 0
    assert site.state.pv_total_wh == 0


def test_empty_producer_battery_sheds_the_export() -> None:
    site = Site(role="producer", battery=BatteryConfig(capacity_wh=100, soc=0.0), panel=None,
                load=Load(LoadConfig()), ghi=lambda t: 0.0, line_w=500)
    site.set_relay(True)
    site.advance_to(3600)
    assert site.export_wh == 0


def test_load_schedule_holds_each_value_and_wraps() -> None:
    load = Load(LoadConfig(schedule=[(7, 300), (18, 800), (23, 100)]))
    assert load.power_w(3 * 3600) == 100  # before the first point: last of the previous day
    assert load.power_w(7 * 3600) == 300
    assert load.power_w(12 * 3600) == 300
    assert load.power_w(19 * 3600) == 800
    assert load.power_w(86400 + 7.5 * 3600) == 300


def test_load_schedule_rejects_bad_points() -> None:
    with pytest.raises(ValueError):
        LoadConfig(schedule=[(25, 100)])
    with pytest.raises(ValueError):
        LoadConfig(schedule=[(1, -5)])


def test_clear_sky_pv_follows_the_sun() -> None:
    import datetime as dt

    from services.meter.solar import ClearSky

    cs = ClearSky(52.52, 13.40)
    noon = dt.datetime(2024, 6, 21, 11, 0, tzinfo=dt.timezone.utc).timestamp()
    midnight = dt.datetime(2024, 6, 21, 23, 0, tzinfo=dt.timezone.utc).timestamp()
    winter_noon = dt.datetime(2024, 12, 21, 11, 0, tzinfo=dt.timezone.utc).timestamp()
    assert cs.ghi(midnight) == 0
    assert cs.ghi(noon) > 700
    assert 0 < cs.ghi(winter_noon) < cs.ghi(noon) / 2
    assert panel_power_w(cs.ghi(noon), PanelConfig(area_m2=10, efficiency=0.2, peak_w=1000, losses=0)) == 1000


def test_bdew_household_profile_scales_to_the_annual_demand() -> None:
    import datetime as dt

    from services.meter.solar import bdew_profile

    day = bdew_profile("h25", 3000, dt.date(2024, 3, 13))
    double = bdew_profile("h25", 6000, dt.date(2024, 3, 13))
    assert len(day) == 96
    assert all(v > 0 for v in day)
    # ~3000 kWh a year is ~8.2 kWh a day: the profile's day is within a factor of two of that
    assert 4000 < sum(day) / 4 < 16000
    assert double == pytest.approx([2 * v for v in day])
    with pytest.raises(ValueError):
        bdew_profile("x1", 1, dt.date(2024, 1, 1))
