"""Scenario files: parsing, clear errors naming the field, the deterministic generator."""

from __future__ import annotations

import pathlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.meter.sim import SimParams
from services.simulate import scenario as S

ROOT = pathlib.Path(__file__).resolve().parents[2]

BASE = {
    "grid": {"latitude": 52.5, "longitude": 13.4, "tz": "Europe/Berlin", "start": "2024-06-21"},
    "tariffs": {"retail_wei_per_kwh": 3000, "feed_in_wei_per_kwh": 500},
    "sites": [{"name": "solar-1", "pv_peak_w": 1800, "battery": {"capacity_wh": 7200, "soc": 0.5},
               "load": {"profile": "h25", "annual_kwh": 1500}, "agent": {"max_trade_wh": 600}}],
}


def with_(path: str, value: object) -> dict:
    """BASE with one field (a dotted path, list indices as numbers) set."""
    import copy

    data = copy.deepcopy(BASE)
    *head, last = path.split(".")
    node: object = data
    for p in head:
        node = node[int(p)] if isinstance(node, list) else node[p]  # type: ignore[index]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value  # type: ignore[index]
    return data


@pytest.mark.parametrize("name", ["demo", "village-20", "village-100"])
def test_the_example_scenarios_load(name: str) -> None:
    s = S.load(ROOT / "scenarios" / f"{name}.toml")
    sites = s.all_sites
    assert len(sites) == {"demo": 2, "village-20": 20, "village-100": 100}[name]
    for site in sites:  # every site's sim is one the meter service accepts
        SimParams.model_validate(S.site_spec(s, site).sim)


def test_demo_is_todays_demo() -> None:
    s = S.load(ROOT / "scenarios" / "demo.toml")
    prod, cons = s.all_sites
    assert (prod.name, prod.meter_role, cons.name, cons.meter_role) == ("solar-1", "producer", "home-7", "consumer")
    assert prod.load.schedule[0] == (0.0, 80.0)  # read from the CSV next to the file
    assert str(s.start_utc()) == "2024-06-20 22:00:00+00:00" and s.utc_offset_h() == 2.0


@pytest.mark.parametrize(("path", "value", "field"), [
    ("sites.0.battery.soc", 1.5, "sites.0.battery.soc"),
    ("sites.0.agent.max_trade_wh", 0, "sites.0.agent.max_trade_wh"),
    ("sites.0.agent.reserve", 0.1, "sites.0.agent.reserve"),
    ("sites.0.name", "Bad Name", "sites.0.name"),
    ("sites.0.name", "utility", "sites.0.name"),
    ("sites.0.load", {"profile": "h99", "annual_kwh": 1}, "sites.0.load.profile"),
    ("sites.0.load", {"profile": "h25"}, "sites.0.load"),
    ("grid.tz", "Mars/Olympus", "grid.tz"),
    ("grid.market", "dutch", "grid.market"),
    ("grid.start", "yesterday", "grid.start"),
    ("tariffs.feed_in_wei_per_kwh", 4000, "tariffs"),
])
def test_a_bad_field_is_named(path: str, value: object, field: str) -> None:
    with pytest.raises(S.ScenarioError) as e:
        S.parse(with_(path, value), "x.toml")
    assert f"x.toml: {field}" in str(e.value), str(e.value)


def test_duplicate_names_and_no_sites_are_refused() -> None:
    data = with_("sites", BASE["sites"] * 2)
    with pytest.raises(S.ScenarioError, match="unique: solar-1"):
        S.parse(data)
    with pytest.raises(S.ScenarioError, match="at least one site"):
        S.parse(with_("sites", []))


def test_bad_toml_and_missing_csv(tmp_path: pathlib.Path) -> None:
    f = tmp_path / "s.toml"
    f.write_text("[grid\n")
    with pytest.raises(S.ScenarioError, match="not valid TOML"):
        S.load(f)
    f.write_text((ROOT / "scenarios" / "demo.toml").read_text())
    with pytest.raises(S.ScenarioError, match=r"sites\.0\.load\.csv: cannot read"):
        S.load(f)
    (tmp_path / "loads").mkdir()
    (tmp_path / "loads" / "demo-day.csv").write_text("hour,watts\n0,100\n12,abc\n")
    with pytest.raises(S.ScenarioError, match="line 3"):
        S.load(f)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), share=st.floats(0, 1), seed=st.integers(0, 2**32))
def test_the_generator_is_deterministic_and_keeps_the_share(n: int, share: float, seed: int) -> None:
    data = {**BASE, "sites": [], "generate": {"households": n, "pv_share": share, "seed": seed}}
    a, b = S.parse(data).all_sites, S.parse(data).all_sites
    assert a == b
    assert len(a) == n and len({s.name for s in a}) == n
    assert sum(s.pv_peak_w > 0 for s in a) == round(n * share)
    for s in a:
        assert (s.meter_role == "producer") == (s.pv_peak_w > 0)
        assert 0 <= s.battery.soc <= 1 and s.battery.capacity_wh > 0 and s.load.annual_kwh


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 1000))
def test_listed_sites_come_first_and_the_seed_matters(seed: int) -> None:
    data = {**BASE, "generate": {"households": 30, "pv_share": 0.5, "seed": seed}}
    sites = S.parse(data).all_sites
    assert sites[0].name == "solar-1" and sites[1].name == "house-001"
    other = S.parse({**data, "generate": {"households": 30, "pv_share": 0.5, "seed": seed + 1}}).all_sites
    assert [s.pv_peak_w for s in sites] != [s.pv_peak_w for s in other]


def test_simulate_exits_2_naming_the_field(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    from services.cli import main

    f = tmp_path / "bad.toml"
    f.write_text((ROOT / "scenarios" / "village-20.toml").read_text().replace("pv_share = 0.4", "pv_share = 1.4"))
    assert main(["simulate", str(f), "--data", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert f"{f}: generate.pv_share: Input should be less than or equal to 1" in err, err
    assert not (tmp_path / "d").exists()  # nothing was started
