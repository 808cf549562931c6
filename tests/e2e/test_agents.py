"""A simulated day with the sites' agents on and nobody clicking Sell or Buy: the agents
trade within their owners' limits, the utility stands behind them at its tariffs, the
trades are delivered and settled on-chain, and the money adds up against the chain to the
wei. Then trading stops (every agent off, the utility's over the bus) and each site's
figures of those days close their energy balance and tell, to the wei, what the chain
settled: locally and with the utility apart.

Real parts: anvil, the hub, the auction, the operator's chain service, each site's wallet,
meter (simulated site), agent and gateway, and the utility's wallet, meters and agent, as
`gridtrade up` starts them. The owners' only acts are the ones a person does once: log in
(the wallet unlocks the key for the agent to sign through) and put Ether in escrow for the
consumer's bids."""

from __future__ import annotations

import pathlib
from decimal import Decimal
from typing import Any

import pytest

from services.gateway import figures as fig

from tests.support.gateway import balance_closes

from .agents import (AGENT_ENV, CLOSED, DAY_S, DEPOSIT, FEED_IN, MAX_TRADE_WH, RETAIL, money_adds_up, trades_at,
                     utility_agent_off)
from .harness import start_grid, stop_grid


def shown(row: dict[str, Any]) -> str:
    def kwh(key: str) -> str:
        return f"{row[key] / 1000:.3f}"

    def eth(key: str) -> str:
        return f"{Decimal(int(row[key])) / 10**18:.6f}"

    ss = row["self_sufficiency"]
    return (f"{row['day']}: produced {kwh('produced_wh')} kWh, consumed {kwh('consumed_wh')} kWh, "
            f"local bought {kwh('bought_local_wh')} kWh for {eth('bought_local_wei')} ETH / sold "
            f"{kwh('sold_local_wh')} kWh for {eth('sold_local_wei')} ETH, utility bought {kwh('bought_utility_wh')} "
            f"kWh for {eth('bought_utility_wei')} ETH / sold {kwh('sold_utility_wh')} kWh for "
            f"{eth('sold_utility_wei')} ETH, unmatched in {kwh('unmatched_import_wh')} / out "
            f"{kwh('unmatched_export_wh')} kWh, self-sufficiency "
            f"{'-' if ss is None else f'{ss * 100:.1f} %'}, saved {eth('saved_wei')} ETH "
            f"(utility only {eth('baseline_cost_wei')}, actual {eth('actual_cost_wei')})")


@pytest.mark.anvil
@pytest.mark.timeout(900)
async def test_agents_trade_a_simulated_day_without_a_click(tmp_path: pathlib.Path) -> None:
    grid = await start_grid(tmp_path, time_scale=1440.0, agents=True, service_env=AGENT_ENV)  # a day in a minute
    prod, cons = grid.producer, grid.consumer
    util = grid.options.utility_account.lower()
    p_, c_ = prod.address.lower(), cons.address.lower()
    try:
        day0 = (await prod.call("GET", "/api/site"))["clock"]["sim"]
        # the consumer's one act: escrow for its agent's bids
        await cons.call("POST", "/api/escrow/deposit", {"amount_wei": str(DEPOSIT)})
        # its agent may reserve (bid) or lock (win) some of it at once: the deposit counts in all three

        def escrowed() -> int:
            e = grid.onchain(cons.address)
            return e["free"] + e["reserved"] + e["locked"]

        await grid.until("the deposit in escrow", lambda: escrowed() >= DEPOSIT, timeout=60)

        # a seller (by hand, here) asks more than the consumer's agent may pay: no bid, ever
        await grid.until("tokens to offer by hand", lambda: grid.onchain(prod.address)["tokens"] >= 100, timeout=90)
        dear = await prod.call("POST", "/api/offers", {"wh": 100, "start_price_wei_per_kwh": str(RETAIL + 1),
                                                       "duration_s": 20})

        # the agents trade, nobody clicking: first between the two sites
        def settled_between() -> set[tuple[str, str]]:
            return {(t["seller"], t["buyer"]) for t in trades_at(grid, grid.w3.eth.block_number) if t["delivered"]}

        await grid.until("a trade between the sites, delivered and settled", lambda: (p_, c_) in settled_between(),
                         timeout=240, every=1.0)
        agent_p = await prod.call("GET", "/api/agent")
        agent_c = await cons.call("GET", "/api/agent")
        assert agent_p["state"] == "trading" and agent_c["state"] == "trading", (agent_p, agent_c)
        # within the owners' limits and the tariffs
        for a in agent_c["actions"]:
            assert a["wh"] <= MAX_TRADE_WH and int(a["price_wei_per_kwh"]) <= RETAIL, a
            assert a["offer_id"] != dear["offer_id"], "the agent bid above its owner's limit"
        for a in agent_p["actions"]:
            assert a["wh"] <= MAX_TRADE_WH and int(a["price_wei_per_kwh"]) >= FEED_IN, a

        # the consumer's owner turns its agent off: the producer's surplus goes to the utility, at feed-in
        off = await cons.call("PUT", "/api/agent/limits", {**agent_c["limits"], "enabled": False})
        assert off["state"] == "off", off
        await grid.until("the utility to buy the producer's surplus", lambda: (p_, util) in settled_between(),
                         timeout=240, every=1.0)

        # the producer's owner turns its agent off, the consumer's (looking 4 h ahead) is on again: with no
        # local offer left, it buys its deficit from the utility at retail
        out = await prod.call("PUT", "/api/agent/limits", {**agent_p["limits"], "enabled": False})
        assert out["state"] == "off" and out["limits"]["enabled"] is False, out
        placed = len((await prod.call("GET", "/api/agent"))["actions"])
        on = await cons.call("PUT", "/api/agent/limits", {**agent_c["limits"], "enabled": True, "horizon_s": 4 * 3600})
        assert on["state"] != "off", on
        await grid.until("the consumer to buy from the utility", lambda: (util, c_) in settled_between(),
                         timeout=240, every=1.0)

        # the rest of the simulated day
        async def day_over() -> bool:
            return (await prod.call("GET", "/api/site"))["clock"]["sim"] >= day0 + DAY_S
        await grid.until("a whole simulated day", day_over, timeout=180, every=1.0)
        assert len((await prod.call("GET", "/api/agent"))["actions"]) == placed

        # the money, against the chain at one block, to the wei
        block = grid.w3.eth.block_number
        trades = trades_at(grid, block)
        parties = {p_, c_, util}
        assert trades and all(t["seller"] in parties and t["buyer"] in parties and t["seller"] != t["buyer"]
                              for t in trades), trades
        for t in trades:
            assert t["wh"] <= max(MAX_TRADE_WH, 2000) and FEED_IN <= t["price"] <= RETAIL, t
            if t["buyer"] == util:
                assert t["price"] == FEED_IN, t  # the utility pays its feed-in tariff, no more
            if t["seller"] == util:
                assert t["price"] >= RETAIL, t  # and sells at retail, no less
        money_adds_up(grid, trades, parties, block, consumer=c_)
        print("trades of the day:", [(t["seller"][:8], t["buyer"][:8], t["wh"], t["delivered"], t["price"])
                                     for t in trades])

        # --- the site figures of those days, against the chain ---
        # trading stops: the consumer's agent off (its owner), the utility's (over the bus)
        agent_c = await cons.call("GET", "/api/agent")
        out = await cons.call("PUT", "/api/agent/limits", {**agent_c["limits"], "enabled": False})
        assert out["state"] == "off", out
        assert (await utility_agent_off(grid)).state == "off"

        # every trade closed on the chain, and no new one since the last look
        seen = [-1]

        def all_closed() -> list[dict[str, Any]] | None:
            now = trades_at(grid, grid.w3.eth.block_number)
            opened, seen[0] = seen[0], len(now)
            return now if len(now) == opened and all(t["status"] == CLOSED for t in now) else None
        final = await grid.until("every trade closed on the chain, no new one", all_closed, timeout=240, every=3.0)
        settled_all = grid.market_events("Settled")
        paid = {t["id"]: sum(e["paidWei"] for e in settled_all if e["tradeId"] == t["id"]) for t in final}
        assert len(final) >= len(trades)

        # the figures of the simulated days so far, each site's, until its history has every settlement
        now_sim = (await prod.call("GET", "/api/site"))["clock"]["sim"]
        start, end = fig.day_of(day0), fig.day_of(now_sim) + DAY_S
        query = f"/api/figures?from={start}&to={end}"
        got: dict[str, dict[str, Any]] = {}
        why: list[Any] = []

        async def figures_match() -> bool:
            for name, user, me in (("producer solar-1", prod, p_), ("consumer home-7", cons, c_)):
                f = await user.call("GET", query)
                t = f["total"]
                mine = [x for x in final if me in (x["seller"], x["buyer"])]
                want = {
                    "sold_utility_wei": sum(paid[x["id"]] for x in mine if x["seller"] == me and x["buyer"] == util),
                    "bought_utility_wei": sum(paid[x["id"]] for x in mine if x["buyer"] == me and x["seller"] == util),
                    "sold_local_wei": sum(paid[x["id"]] for x in mine if x["seller"] == me and x["buyer"] != util),
                    "bought_local_wei": sum(paid[x["id"]] for x in mine if x["buyer"] == me and x["seller"] != util),
                    "sold_utility_wh": sum(x["delivered"] for x in mine if x["seller"] == me and x["buyer"] == util),
                    "bought_utility_wh": sum(x["delivered"] for x in mine if x["buyer"] == me and x["seller"] == util),
                    "sold_local_wh": sum(x["delivered"] for x in mine if x["seller"] == me and x["buyer"] != util),
                    "bought_local_wh": sum(x["delivered"] for x in mine if x["buyer"] == me and x["seller"] != util),
                }
                have = {k: (int(t[k]) if k.endswith("_wei") else t[k]) for k in want}
                why[:] = [name, want, have]
                if have != want:
                    return False
                got[name] = f
            return True
        try:
            await grid.until("each site's figures to show every settlement of the chain", figures_match, timeout=90,
                             every=2.0)
        except BaseException:
            raise AssertionError(f"the figures and the chain disagree: {why}") from None

        for name, f in got.items():
            rows = [*f["days"], f["total"]]
            # (a) the energy balance closes exactly, each day and in total
            for r in rows:
                assert balance_closes(r), (name, r)
                assert r["saved_wei"] == str(int(r["baseline_cost_wei"]) - int(r["actual_cost_wei"])), (name, r)
            # (b) the money is the chain's, to the wei: all it was paid, all it paid, the utility's part apart
            me = p_ if name.startswith("producer") else c_
            t = f["total"]
            assert int(t["sold_local_wei"]) + int(t["sold_utility_wei"]) == sum(
                paid[x["id"]] for x in final if x["seller"] == me), name
            assert int(t["bought_local_wei"]) + int(t["bought_utility_wei"]) == sum(
                paid[x["id"]] for x in final if x["buyer"] == me), name
            for k in ("produced_wh", "consumed_wh", "bought_local_wei", "sold_local_wei", "bought_utility_wei",
                      "sold_utility_wei", "saved_wei"):
                assert sum(Decimal(str(d[k])) for d in f["days"]) == Decimal(str(t[k])), (name, k)
        # the two sites traded with each other: what one sold locally the other bought, and the utility took part
        between = sum(paid[x["id"]] for x in final if x["seller"] == p_ and x["buyer"] == c_)
        assert between > 0
        assert int(got["producer solar-1"]["total"]["sold_local_wei"]) == between
        assert int(got["consumer home-7"]["total"]["bought_local_wei"]) == between
        assert sum(int(f["total"][k]) for f in got.values() for k in ("sold_utility_wei", "bought_utility_wei")) > 0
        # (c) the figures, to be quoted
        for name, f in got.items():
            print(f"figures of the {name} ({len(f['days'])} site days, {fig.day_name(start)} on):")
            for r in [*f["days"], f["total"]]:
                print("  " + shown(r))
    finally:
        await stop_grid(grid)
