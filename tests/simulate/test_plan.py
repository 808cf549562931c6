"""A scenario as processes: many sites per site host, each with its own key, account, data
folder and ports; the market and the utility as ``gridtrade up`` plans them."""

from __future__ import annotations

import pathlib

from services import launcher
from services.simulate import host as host_mod
from services.simulate import plan as P
from services.simulate import run
from services.simulate.scenario import load

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_village_20_is_hosted_ten_sites_a_process_each_site_on_its_own(tmp_path: pathlib.Path) -> None:
    sc = load(ROOT / "scenarios" / "village-20.toml")
    o = launcher.Options(data=tmp_path / "sim", base_port=30000, time_scale=576)
    o, accounts, passphrases = run.prepare(o, sc)
    procs, specs = P.sim_plan(o, sc, P.SimOptions(per_host=10), accounts)
    names = [p.name for p in procs]
    assert names == ["hub", "anvil", "chain", "auction", "wallet-utility", "meter-utility", "agent-utility",
                     "host-1", "host-2"]
    assert [len(s.sites) for s in specs] == [10, 10]
    sites = [site for s in specs for site in s.sites]
    assert [s.name for s in sites] == [s.name for s in sc.all_sites]
    # each site its own account, and the passphrase is nowhere in the plan
    assert len({s.account for s in sites}) == 20 and all(s.account == accounts[s.name] for s in sites)
    blob = "".join(s.model_dump_json() for s in specs) + "".join(str(p.env) + str(p.argv) for p in procs)
    assert not any(pw in blob for pw in passphrases.values())
    # every port once, inside the block the plan asks for
    ports = [int(e.rsplit(":", 1)[1]) for s in sites for e in (s.wallet_rpc, s.agent_rpc)]
    ports += [int(p.health_url.rsplit(":", 1)[1].split("/")[0]) for p in procs if p.health_url]
    ports += [45 + o.base_port, o.base_port, o.base_port + 1, o.base_port + 10, o.base_port + 11]
    assert len(ports) == len(set(ports)) and all(o.base_port <= q < o.base_port + P.ports_needed(20) for q in ports)
    # the scenario's market, tariffs and utility reach the services
    auction = next(p for p in procs if p.name == "auction")
    assert auction.env["GRIDTRADE_AUCTION_MARKET"] == "english"
    assert auction.env["GRIDTRADE_TARIFF_FEED_IN_WEI_PER_KWH"] == str(sc.tariffs.feed_in_wei_per_kwh)
    assert next(p for p in procs if p.name == "agent-utility").env["GRIDTRADE_AGENT_MAX_TRADE_WH"] == "300"

    # one host's services: three per site, each site with its own key, data folder and stores
    h = host_mod.Host(specs[1], o.data.resolve())
    h.build_meters(epoch=1000.0, now=1000.0)
    try:
        assert len(h.wallets) == len(h.meters) == len(h.agents) == 10
        every = h.every()
        assert len({(svc.settings.site, svc.name) for svc in every}) == 30
        for name in h.wallets:
            wallet, meter, agent = h.wallets[name], h.meters[name], h.agents[name]
            assert {wallet.settings.site, meter.settings.site, agent.settings.site} == {name}
            assert {wallet.settings.data_dir, meter.settings.data_dir, agent.settings.data_dir} == {
                o.data.resolve() / name}
            assert wallet.keystore.list()[0].address == accounts[name] == agent.settings.agent_account
            assert meter.settings.sim.battery.capacity_wh == agent.settings.agent_battery_wh
            assert meter.settings.sim.start == sc.start_utc()  # the clock starts at local midnight
            assert wallet.settings.wallet_rpc == agent.settings.wallet_rpc != h.wallets[
                next(n for n in h.wallets if n != name)].settings.wallet_rpc
        assert len({svc.security.public for svc in every}) == 10  # one CURVE key per site
        assert len({str(svc.store.path) for svc in every}) == 30
    finally:
        h.close()


def test_hosts_share_one_clock_from_the_scenario_start() -> None:
    sc = load(ROOT / "scenarios" / "demo.toml")
    spec = P.HostSpec(name="h", data=pathlib.Path("/x"), sites=[], chain_url="", market="english", time_scale=100,
                      start=sc.start_utc(), epoch=1000.0)
    assert host_mod.site_start(spec, 1000.0) == sc.start_utc().timestamp()
    assert host_mod.site_start(spec, 1003.0) == sc.start_utc().timestamp() + 300  # a host started later catches up


def test_village_100_is_ten_hosts_within_its_port_block() -> None:
    sc = load(ROOT / "scenarios" / "village-100.toml")
    o = launcher.Options(data=pathlib.Path("/nonexistent/sim"), base_port=20000, utility_account="0x" + "1" * 40)
    accounts = {s.name: f"0x{i:040x}" for i, s in enumerate(sc.all_sites, 1)}
    procs, specs = P.sim_plan(o, sc, P.SimOptions(), accounts)
    assert [len(s.sites) for s in specs] == [10] * 10
    assert [p.name for p in procs][-10:] == [f"host-{k}" for k in range(1, 11)]
    ports = [int(e.rsplit(":", 1)[1]) for s in specs for site in s.sites for e in (site.wallet_rpc, site.agent_rpc)]
    ports += [int(p.health_url.rsplit(":", 1)[1].split("/")[0]) for p in procs if p.health_url]
    assert len(ports) == len(set(ports)) and max(ports) < o.base_port + P.ports_needed(100)
    # a hundred sites go at a quarter of a small run's pace in wall time: every service beats,
    # every meter reads, every wallet follows the chain and every agent decides 4 times less
    # often, and the clock runs 4 times slower, so that per simulated hour a site does the same
    python = [p for p in procs if p.name != "anvil"]
    assert {p.env.get("GRIDTRADE_HEARTBEAT_S") for p in python} == {"4"}
    assert {p.env.get("GRIDTRADE_READING_INTERVAL_S") for p in python} == {"4"}
    assert {(p.env["GRIDTRADE_AGENT_EVERY_S"], p.env["GRIDTRADE_AGENT_OFFER_DURATION_S"]) for p in python} == {
        ("12", "40")}
    assert {s.wallet_poll_s for s in specs} == {4.0}
    assert P.default_time_scale(100) == 90 and P.default_time_scale(20) == P.default_time_scale(2) == 360
    small = P.service_env(load(ROOT / "scenarios" / "village-20.toml"), P.SimOptions())
    assert (small["GRIDTRADE_HEARTBEAT_S"], small["GRIDTRADE_READING_INTERVAL_S"], small["GRIDTRADE_AGENT_EVERY_S"],
            small["GRIDTRADE_AGENT_OFFER_DURATION_S"]) == ("1", "1", "3", "10")


def test_the_reports_charts_are_pngs_of_every_site_and_every_price() -> None:
    from services.gateway import figures
    from services.simulate import report as rep

    rows = {}
    for i, site in enumerate(["house-001", "house-002", "solar-1", "utility"]):
        rows[site] = figures.Row(day="total", start=0, end=86400, produced_mwh=1_000_000 * i,
                                 consumed_mwh=500_000 * (i + 1), bought_local_mwh=100_000 * i)
    prices = [rep.Price(sim_at=3600.0 * h, price_wei_per_kwh=5 * 10**14 + h, wh=100 * h) for h in range(1, 20)]
    r = rep.Report(name="test", start=0, end=86400, roles={}, rows=rows, utility="utility", prices=prices, trades=19,
                   wall_s=1.0)
    pngs = [rep.energy_png(r), rep.prices_png(r),
            rep.prices_png(rep.Report(name="none", start=0, end=86400, roles={}, rows=rows, utility="utility",
                                      prices=[], trades=0, wall_s=1.0))]
    for png in pngs:
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # more sites make a wider chart; the PNG's width is in its header
    wider = rep.Report(name="many", start=0, end=86400, roles={}, utility="utility", prices=prices, trades=19,
                       wall_s=1.0, rows={f"house-{i:03}": rows["solar-1"] for i in range(60)})
    width = int.from_bytes(pngs[0][16:20], "big")
    assert int.from_bytes(rep.energy_png(wider)[16:20], "big") > width
