"""``gridtrade simulate`` of the 20-household village for one simulated day on the real
services (anvil, the hub, the operator's chain service, the auction, the utility, two site
hosts of ten sites each), with the auction and then the operator's chain service killed
(SIGKILL) mid-day and restarted by the launcher's supervision. Checked as states, against
the chain: every trade paid exactly for what it delivered, every account's escrow and
credit to the wei, nothing lost or doubled across the kills, and each site's figures in
the report close their energy balance and show what the chain settled."""

from __future__ import annotations

import collections
import os
import pathlib
import signal
import time
from typing import Any

import pytest
from eth_utils import to_checksum_address
from web3 import HTTPProvider, Web3

from services import launcher
from services.chain.bindings import load_artifact
from services.simulate.plan import SimOptions, ports_needed
from services.simulate.run import Simulation
from services.simulate.scenario import load
from tests.support import poll
from tests.support.plan import health_at
from tests.support.ports import free_port_block

from .harness import cost

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCALE = 720.0  # a simulated day in 120 s of wall time
HOUR = 3600


async def until(what: str, check: Any, timeout: float, every: float = 0.5) -> Any:
    return await poll.until(check, what=what, timeout=timeout, every=every,
                            retry_on=(AssertionError, OSError, ValueError))


class Chain:
    """The anvil chain, read straight with web3."""

    def __init__(self, url: str, market: str) -> None:
        self.w3 = Web3(HTTPProvider(url))
        self.market = self.w3.eth.contract(address=to_checksum_address(market),
                                           abi=load_artifact("EnergyMarket")["abi"])
        self.token = self.w3.eth.contract(address=self.market.functions.token().call(),
                                          abi=load_artifact("EnergyToken")["abi"])

    def events(self, name: str, block: int, contract: Any = None) -> list[dict[str, Any]]:
        c = contract if contract is not None else self.market
        return [dict(e["args"]) for e in getattr(c.events, name)().get_logs(from_block=0, to_block=block)]

    def trades(self, block: int) -> dict[bytes, dict[str, Any]]:
        out = {}
        for e in self.events("TradeOpened", block):
            seller, wh, status, buyer, delivered, price, _, _ = self.market.functions.trades(e["tradeId"]).call(
                block_identifier=block)
            out[e["tradeId"]] = {"seller": seller.lower(), "buyer": buyer.lower(), "wh": wh, "status": status,
                                 "delivered": delivered, "price": price}
        return out

    def account(self, a: str, block: int) -> dict[str, int]:
        a = to_checksum_address(a)
        m, at = self.market.functions, {"block_identifier": block}
        return {"free": m.freeEscrow(a).call(**at), "reserved": m.reservedEscrow(a).call(**at),
                "locked": m.lockedEscrow(a).call(**at), "credit": m.credit(a).call(**at),
                "tokens": self.token.functions.balanceOf(a).call(**at)}


async def sigkill_and_restarted(sim: Simulation, name: str) -> None:
    """SIGKILL a part of the run; the run's supervision starts it again."""
    assert sim.runner is not None
    child = sim.runner.running[name]
    os.killpg(child.pid, signal.SIGKILL)
    await child.wait()
    url = sim.proc(name).health_url
    await until(f"{name} to be restarted and ready",
                lambda: sim.runner.running[name] is not child and (health_at(url) or {}).get("ready"), timeout=90)


@pytest.mark.slow
@pytest.mark.anvil
@pytest.mark.timeout(600)
async def test_village_20_trades_a_day_through_kills_of_the_auction_and_the_chain(tmp_path: pathlib.Path) -> None:
    sc = load(ROOT / "scenarios" / "village-20.toml")
    base = free_port_block(ports_needed(len(sc.all_sites)))
    o = launcher.Options(data=tmp_path / "sim", time_scale=SCALE, base_port=base, agents=True)
    sim = Simulation(sc, o, SimOptions(days=1), progress=False)
    wall0 = time.monotonic()
    try:
        await sim.start()
        c = sim.collector
        assert c is not None
        chain = Chain(sim.proc("anvil").extra["rpc"], health_at(sim.proc("chain").health_url)["market"])
        t0 = sim.start_sim

        async def at_site_time(hours: float) -> None:
            await until(f"site time {hours} h", lambda: (c.sim_now(sim.sites) or 0) >= t0 + hours * HOUR,
                        timeout=HOUR * 24 / SCALE + 60)

        # mid-morning, with trades under way: the auction dies and comes back
        await at_site_time(9.5)
        await until("a trade on the chain", lambda: chain.trades(chain.w3.eth.block_number), timeout=90)
        before_auction = chain.trades(chain.w3.eth.block_number)
        await sigkill_and_restarted(sim, "auction")
        # early afternoon: the operator's chain service dies and comes back
        await at_site_time(13.0)
        before_chain = chain.trades(chain.w3.eth.block_number)
        assert len(before_chain) >= len(before_auction)
        await sigkill_and_restarted(sim, "chain")

        assert await sim.until_end()
        wall_day = time.monotonic() - wall0
        left = await sim.drain(timeout=60)

        # --- against the chain, at one block ---
        block = chain.w3.eth.block_number
        trades = chain.trades(block)
        accounts = {a.lower(): s for s, a in sim.accounts.items()}
        util = sim.accounts[launcher.UTILITY].lower()
        assert trades and all(t["seller"] in accounts and t["buyer"] in accounts for t in trades.values())
        local = [t for t in trades.values() if util not in (t["seller"], t["buyer"])]
        assert local, "no trade between two sites in a whole day"

        # nothing lost across the kills: every trade seen before is still there, its delivery only grew
        for before in (before_auction, before_chain):
            for tid, t in before.items():
                assert tid in trades and trades[tid]["delivered"] >= t["delivered"], (tid, t, trades.get(tid))
        # nothing doubled: each trade the auction agreed is opened once at most, under its own id
        opened = [e["tradeId"] for e in chain.events("TradeOpened", block)]
        assert len(opened) == len(set(opened))
        agreed = collections.Counter(a.trade_id for a in c.agreed)
        from eth_utils import keccak
        assert {keccak(text=t) for t in agreed} >= set(opened)
        never_opened = [t for t in agreed if keccak(text=t) not in trades]
        assert all(c.trade_state.get(t) == "failed" for t in never_opened), \
            [(t, c.trade_state.get(t)) for t in never_opened]
        # each production counter minted once
        minted = chain.events("Minted", block, chain.token)
        per_meter = collections.Counter((m["to"], m["producedWh"]) for m in minted)
        assert all(n == 1 for n in per_meter.values()), [k for k, n in per_meter.items() if n > 1]

        # every trade paid exactly for what it delivered: floor(delivered x price / 1000), settled step by step
        settled = chain.events("Settled", block)
        paid = collections.defaultdict(int)
        delta = collections.defaultdict(int)
        for e in settled:
            paid[e["tradeId"]] += e["paidWei"]
            delta[e["tradeId"]] += e["deltaWh"]
        for tid, t in trades.items():
            assert paid[tid] == cost(t["delivered"], t["price"]), (tid, t, paid[tid])
            assert delta[tid] == t["delivered"], (tid, t, delta[tid])
            assert sc.tariffs.feed_in_wei_per_kwh <= t["price"] <= sc.tariffs.retail_wei_per_kwh, t
        # each account's escrow and credit to the wei (nobody withdrew), the consumers' tokens
        deposits = chain.events("Deposited", block)
        all_escrow = 0
        for a, site in accounts.items():
            on = chain.account(a, block)
            put_in = sum(d["amountWei"] for d in deposits if d["account"].lower() == a)
            spent = sum(paid[tid] for tid, t in trades.items() if t["buyer"] == a)
            earned = sum(paid[tid] for tid, t in trades.items() if t["seller"] == a)
            assert on["free"] + on["reserved"] + on["locked"] == put_in - spent, (site, on, put_in, spent)
            assert on["credit"] == earned, (site, on, earned)
            if site != launcher.UTILITY and sim.scenario.all_sites[sim.sites.index(site)].meter_role == "consumer":
                assert on["tokens"] == sum(t["delivered"] for t in trades.values() if t["buyer"] == a), (site, on)
            all_escrow += on["free"] + on["reserved"] + on["locked"] + on["credit"]
        assert chain.w3.eth.get_balance(chain.market.address, block) == all_escrow

        # --- the report: every site's balance closes, and its money is the chain's ---
        def report_matches() -> Any:
            r = sim.report()
            for site, row in r.rows.items():
                a = sim.accounts[site].lower()
                sold = sum(paid[tid] for tid, t in trades.items() if t["seller"] == a)
                bought = sum(paid[tid] for tid, t in trades.items() if t["buyer"] == a)
                assert row.sold_local_wei + row.sold_utility_wei == sold, (site, row, sold)
                assert row.bought_local_wei + row.bought_utility_wei == bought, (site, row, bought)
            return r

        r = await until("the report to show every settlement", report_matches, timeout=30)
        assert set(r.rows) == set(sim.accounts)
        assert r.end >= sim.end_sim
        for site, row in r.rows.items():
            assert (row.produced_mwh + row.bought_local_mwh + row.bought_utility_mwh + row.unmatched_import_mwh
                    == row.consumed_mwh + row.sold_local_mwh + row.sold_utility_mwh + row.unmatched_export_mwh), site
            assert row.saved_wei == row.baseline_cost_wei - row.actual_cost_wei
        total = r.total
        # the households with PV produced (a June day); a household whose battery ran empty and that did
        # not buy sheds its load (the sim's site has no other supply), so not every one need consume
        assert all(r.rows[s.name].produced_mwh > 0 for s in sc.all_sites if s.pv_peak_w > 0)
        assert total.consumed_mwh > 0
        assert total.sold_local_mwh == total.bought_local_mwh == 1000 * sum(t["delivered"] for t in local)
        out = sim.write(r)
        assert {p.name for p in out.iterdir()} >= {"figures.csv", "prices.csv", "energy.png", "prices.png"}
        for chart in ("energy.png", "prices.png"):  # real images, not empty files
            assert (out / chart).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / chart).stat().st_size > 5000
        print(f"\n{len(trades)} trades on the chain ({len(local)} local, "
              f"{sum(t['delivered'] for t in local) / 1000:.2f} kWh delivered locally), {left} open at the end; "
              f"a day in {wall_day:.0f} s of wall time ({24 * HOUR / wall_day:.0f} site s per wall s, "
              f"start-up included)")
        from services.simulate import report as rep
        print(rep.table(r))
    finally:
        await sim.stop()
