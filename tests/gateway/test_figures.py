"""The site figures: the pure computation (the energy balance closes for every bucket and
day, the savings formula), the history that feeds it (readings into 15-minute buckets of
site time, the chain's settlements into increments that name the trade's sites, so trades
with the utility's site are told from local ones; all survive a restart), and the API on the
real grid: JSON and CSV agree, and what was bought and sold locally is what the chain
settled, to the wei."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import pathlib
from decimal import Decimal
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.bus import events as ev
from services.bus.store import Store
from services.gateway import figures as fig
from services.gateway.history import History

from tests.support.gateway import Stack, balance_closes, http, login

T = fig.Tariffs(retail_wei_per_kwh=3 * 10**15, feed_in_wei_per_kwh=5 * 10**14)
DAY0 = 1_718_928_000  # 2024-06-21 00:00 UTC
ME = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"
OTHER = "0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359"
UTIL = "0x7E5F4552091A69125d5DfCb7b8C2659029395Bdf"


def closes(r: fig.Row) -> bool:
    return (r.produced_mwh + r.bought_local_mwh + r.bought_utility_mwh + r.unmatched_import_mwh
            == r.consumed_mwh + r.sold_local_mwh + r.sold_utility_mwh + r.unmatched_export_mwh)


# --- pure -----------------------------------------------------------------------------------------

buckets_st = st.lists(st.tuples(st.integers(0, 3 * 96 - 1), st.integers(0, 2_000_000), st.integers(0, 2_000_000)),
                      max_size=40)
settle_st = st.lists(st.tuples(st.integers(0, 3 * 86400 - 1), st.integers(0, 5000), st.integers(0, 10**16),
                               st.booleans(), st.booleans()), max_size=20)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(buckets_st, settle_st, st.integers(0, 86400), st.integers(1, 3 * 86400), st.sampled_from([0, 3600, -19800]))
def test_the_energy_balance_closes_for_every_bucket_day_and_range(
        buckets: list[tuple[int, int, int]], settles: list[tuple[int, int, int, bool, bool]], start_off: int,
        length: int, tz: int) -> None:
    bs = [(DAY0 + i * fig.BUCKET_S, p, c) for i, p, c in buckets]
    ss = [fig.Settlement(sim_at=DAY0 + t + 0.5, wh=wh, wei=wei, sold=sold, utility=u)
          for t, wh, wei, sold, u in settles]
    start, end = DAY0 + start_off, DAY0 + start_off + length
    days, total = fig.compute(bs, ss, start, end, T, tz)
    # each day of the range, once, in order, clipped to it
    assert days[0].start == start and days[-1].end == end
    assert all(a.end == b.start for a, b in zip(days, days[1:]))
    assert all(fig.day_of(d.start, tz) == fig.day_of(d.end - 1, tz) for d in days)
    for r in [*days, total]:
        assert closes(r), r
        assert r.unmatched_import_mwh >= 0 and r.unmatched_export_mwh >= 0
        assert r.saved_wei == r.baseline_cost_wei - r.actual_cost_wei
        if r is total:
            continue  # the total's money is the sum of the days' (each day's net unmatched priced on its own)
        net = r.unmatched_import_mwh - r.unmatched_export_mwh  # the day's net draw on the battery, priced once
        assert r.actual_cost_wei == (r.bought_utility_wei - r.sold_utility_wei + r.bought_local_wei - r.sold_local_wei
                                     + fig.cost_wei(max(net, 0), T.retail_wei_per_kwh)
                                     - fig.cost_wei(max(-net, 0), T.feed_in_wei_per_kwh))
        ss_ = r.self_sufficiency
        assert ss_ is None if r.consumed_mwh == 0 else 0.0 <= ss_ <= 1.0
        # what production and local trades did not cover came from the utility or the unmatched import
        assert 0 <= r.consumed_mwh - r.covered_mwh <= r.bought_utility_mwh + r.unmatched_import_mwh
    # the total is the days' sum; only what lies in the range counts
    for f in (*fig.ENERGY, "baseline_cost_wei", "actual_cost_wei", "saved_wei"):
        assert getattr(total, f) == sum(getattr(d, f) for d in days)
    assert total.produced_mwh == sum(p for b, p, _ in bs if start <= b < end)
    inside = [s for s in ss if start <= s.sim_at < end]
    # each settlement counts once, on its side: local or with the utility, sold or bought
    for sold, utility, wei, mwh in ((True, False, "sold_local_wei", "sold_local_mwh"),
                                    (False, False, "bought_local_wei", "bought_local_mwh"),
                                    (True, True, "sold_utility_wei", "sold_utility_mwh"),
                                    (False, True, "bought_utility_wei", "bought_utility_mwh")):
        mine = [s for s in inside if s.sold == sold and s.utility == utility]
        assert getattr(total, wei) == sum(s.wei for s in mine)
        assert getattr(total, mwh) == sum(s.wh for s in mine) * fig.MWH_PER_WH
    # per bucket: never importing and exporting at once
    for b, p, c in bs:
        imp, exp = fig.balance(p, c, 0, 0)
        assert imp == 0 or exp == 0


def test_a_day_by_hand_with_a_utility_trade_and_the_savings() -> None:
    # 08:00 a surplus: 1.5 kWh sold locally, 0.25 kWh to the utility (at feed-in), 0.25 kWh left
    # over (into the battery); 12:00 a little load and nothing else (from the battery); 20:00
    # 1 kWh bought locally and 0.5 kWh from the utility (at retail): the trade with the
    # utility counts as the utility's, not as local
    bs = [(DAY0 + 8 * 3600, 3_000_000, 1_000_000), (DAY0 + 12 * 3600, 0, 200_000), (DAY0 + 20 * 3600, 0, 1_500_000)]
    ss = [fig.Settlement(DAY0 + 8 * 3600 + 60, 1500, 3 * 10**15, sold=True),
          fig.Settlement(DAY0 + 8 * 3600 + 120, 250, 125 * 10**12, sold=True, utility=True),
          fig.Settlement(DAY0 + 20 * 3600 + 60, 1000, 2 * 10**15, sold=False),
          fig.Settlement(DAY0 + 20 * 3600 + 120, 500, 15 * 10**14, sold=False, utility=True)]
    days, total = fig.compute(bs, ss, DAY0, DAY0 + 86400, T)
    [d] = days
    assert d.day == "2024-06-21" and (d.start, d.end) == (DAY0, DAY0 + 86400)
    assert (d.produced_mwh, d.consumed_mwh) == (3_000_000, 2_700_000)
    assert (d.sold_local_mwh, d.bought_local_mwh) == (1_500_000, 1_000_000)
    assert (d.sold_local_wei, d.bought_local_wei) == (3 * 10**15, 2 * 10**15)
    assert (d.sold_utility_mwh, d.bought_utility_mwh) == (250_000, 500_000)
    assert (d.sold_utility_wei, d.bought_utility_wei) == (125 * 10**12, 15 * 10**14)
    # 08:00: 3 - 1.5 - 0.25 - 1 = +0.25 kWh unmatched out; 12:00: -0.2 kWh unmatched in; 20:00: 0 + 1 + 0.5 - 1.5 = 0
    assert (d.unmatched_export_mwh, d.unmatched_import_mwh) == (250_000, 200_000)
    assert closes(d) and 3_000_000 + 1_000_000 + 500_000 + 200_000 == 2_700_000 + 1_500_000 + 250_000 + 250_000
    # covered by production and local trades: all but the utility's 0.5 and the unmatched 0.2 kWh
    assert d.covered_mwh == 2_000_000 and d.self_sufficiency == pytest.approx(1 - 0.7 / 2.7)
    baseline = 27 * 3 * 10**14 - 3 * 5 * 10**14  # all consumed at retail, all produced at feed-in
    actual = (15 * 10**14 - 125 * 10**12  # paid to / earned from the utility in its trades
              + 2 * 10**15 - 3 * 10**15  # paid / earned locally
              - 5 * 5 * 10**12)  # the day's net unmatched: 0.05 kWh more out than in, left stored: at feed-in
    assert d.baseline_cost_wei == baseline == 66 * 10**14 and d.actual_cost_wei == actual == 35 * 10**13
    assert d.saved_wei == baseline - actual == total.saved_wei
    # the same day with the utility's trades taken as local ones: counted as local, not as the utility's
    local = [fig.Settlement(s.sim_at, s.wh, s.wei, s.sold) for s in ss]
    [e], _ = fig.compute(bs, local, DAY0, DAY0 + 86400, T)
    assert (e.bought_local_mwh, e.bought_utility_mwh, e.sold_local_wei) == (1_500_000, 0, 3_125 * 10**12)
    # the CSV: a line per day and the total, exact kWh and Ether
    rows = list(csv.reader(io.StringIO(fig.to_csv(days, total))))
    assert rows[0] == fig.CSV_HEADER and [r[0] for r in rows[1:]] == ["2024-06-21", "total"]
    line = dict(zip(rows[0], rows[1]))
    assert line["produced (kWh)"] == "3" and line["bought from the utility (kWh)"] == "0.5"
    assert line["sold to the utility (kWh)"] == "0.25" and line["unmatched import (kWh)"] == "0.2"
    assert line["paid to the utility (Ether)"] == "0.0015" and line["earned from the utility (Ether)"] == "0.000125"
    assert line["bought locally (kWh)"] == "1" and line["paid locally (Ether)"] == "0.002"
    assert Decimal(line["saved (Ether)"]) * 10**18 == d.saved_wei and line["self-sufficiency (%)"] == "74.1"


def test_energy_sold_out_of_a_battery_is_not_consumption_covered_from_outside() -> None:
    # noon: 1 kWh produced, 0.5 kWh consumed, 1 kWh sold locally (half of it out of the battery);
    # night: 0.6 kWh sold to the utility out of the battery, 0.2 kWh consumed from it
    bs = [(DAY0 + 12 * 3600, 1_000_000, 500_000), (DAY0 + 22 * 3600, 0, 200_000)]
    ss = [fig.Settlement(DAY0 + 12 * 3600 + 60, 1000, 10**15, sold=True),
          fig.Settlement(DAY0 + 22 * 3600 + 60, 600, 3 * 10**14, sold=True, utility=True)]
    [d], _ = fig.compute(bs, ss, DAY0, DAY0 + 86400, T)
    assert (d.unmatched_import_mwh, d.unmatched_export_mwh) == (500_000 + 800_000, 0) and closes(d)
    # the noon consumption was the site's own; the night's came from the battery (unmatched)
    assert d.covered_mwh == 500_000 and d.self_sufficiency == pytest.approx(0.5 / 0.7)


def test_bad_ranges_are_refused_with_words() -> None:
    for start, end, tz in ((10, 10, 0), (10, 5, 0), (0, 367 * 86400, 0), (0, 10, 100), (0, 10, 15 * 3600)):
        with pytest.raises(fig.RangeError):
            fig.compute([], [], start, end, T, tz)


def test_energy_is_spread_over_the_buckets_an_interval_spans() -> None:
    parts = fig.spread(DAY0 + 600, DAY0 + 600 + 1440, 144.0)  # 1440 s from 00:10: 300 s, 900 s, 240 s
    assert [b - DAY0 for b, _ in parts] == [0, 900, 1800]
    assert [round(x, 9) for _, x in parts] == [30.0, 90.0, 24.0]


# --- the history that feeds it (a real store on disk) -------------------------------------------


def reading(sim: float, energy_wh: int, **kw: Any) -> ev.MeterReading:
    base: dict[str, Any] = {"site": "solar-1", "meter": "pv", "role": "producer", "energy_wh": energy_wh,
                            "power_w": 0.0, "voltage_v": 48.0, "current_a": 0.0, "relay_closed": False,
                            "load_w": 360.0, "pv_w": 2000.0, "soc": 0.5, "sim_ts": sim, "time_scale": 720.0}
    return ev.MeterReading(**{**base, **kw})


def trade(tid: str, seller: str, buyer: str) -> ev.TradeAgreed:
    return ev.TradeAgreed(trade_id=tid, offer_id="o-" + tid, seller=seller, buyer=buyer, seller_site="solar-1",
                          buyer_site="home-7", wh=2000, price_wei_per_kwh=2 * 10**15)


async def test_the_history_counts_readings_and_settlements_and_keeps_them(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "history.sqlite"
    wall = [1_800_000_000.0]
    h = History(Store(path), "solar-1", clock=lambda: wall[0])
    sim0 = DAY0 + 10 * 3600
    for i in range(6):  # a reading a wall second, 720 site seconds apart, 100 Wh produced each
        h.reading(wall[0] + i, reading(sim0 + 720 * i, 5000 + 100 * i))
    h.reading(wall[0] + 6, reading(sim0 + 720 * 6, 4000))  # a counter that went back counts nothing
    with h.store.transaction() as conn:
        h.apply(conn, wall[0] + 2, trade("t1", ME, OTHER))
        h.apply(conn, wall[0] + 3, ev.Settled(trade_id="t1", delivered_wh=500, paid_wei=10**15, tx_hash="0x1"))
        h.apply(conn, wall[0] + 3, ev.Settled(trade_id="t1", delivered_wh=500, paid_wei=10**15, tx_hash="0x1"))
        h.apply(conn, wall[0] + 4, ev.TradeClosed(trade_id="t1", delivered_wh=800, paid_wei=16 * 10**14,
                                                         refunded_wei=4 * 10**14, tx_hash="0x2"))
        # another site's trade is not this site's figure
        h.apply(conn, wall[0] + 4, ev.TradeAgreed(
            trade_id="t2", offer_id="o2", seller=OTHER, buyer=ME, seller_site="x", buyer_site="y", wh=1,
            price_wei_per_kwh=1))
        h.apply(conn, wall[0] + 4, ev.Settled(trade_id="t2", delivered_wh=1, paid_wei=1, tx_hash="0x3"))
        # a trade with the utility's site: the utility's, not local
        h.apply(conn, wall[0] + 5, ev.TradeAgreed(
            trade_id="t3", offer_id="o3", seller=ME, buyer=UTIL, seller_site="solar-1", buyer_site="utility", wh=300,
            price_wei_per_kwh=5 * 10**14))
        h.apply(conn, wall[0] + 5, ev.Settled(trade_id="t3", delivered_wh=200, paid_wei=10**14, tx_hash="0x4"))
        h.apply(conn, wall[0] + 6, ev.TradeClosed(trade_id="t3", delivered_wh=300, paid_wei=15 * 10**13,
                                                         refunded_wei=0, tx_hash="0x5"))
    wall[0] += 7
    before_write = h.figures(ME, DAY0, DAY0 + 86400, T)
    await h.persist()
    days, total = h.figures(ME, DAY0, DAY0 + 86400, T)
    assert (days, total) == before_write  # what is not written yet counts the same
    assert total.produced_mwh == 500_000  # the counter: 5 x 100 Wh
    assert total.consumed_mwh == 6 * 72_000  # 360 W x 720 s, six intervals (the last one's load counts)
    assert (total.sold_local_mwh, total.sold_local_wei) == (800_000, 16 * 10**14)  # the chain's cumulative numbers
    assert (total.sold_utility_mwh, total.sold_utility_wei) == (300_000, 15 * 10**13)
    assert total.bought_local_mwh == total.bought_utility_mwh == 0 and closes(total)
    assert h.figures(OTHER, DAY0, DAY0 + 86400, T)[1].bought_local_wei == 16 * 10**14
    # another name for the utility's site: the same trade is local
    other = h.figures(ME, DAY0, DAY0 + 86400, T, utility_site="grid")[1]
    assert (other.sold_local_wei, other.sold_utility_wei) == (16 * 10**14 + 15 * 10**13, 0)
    h.store.close()
    # a restart: the buckets, the settlements and the meter's last reading are kept
    h2 = History(Store(path), "solar-1", clock=lambda: wall[0])
    assert h2.figures(ME, DAY0, DAY0 + 86400, T) == (days, total)
    # the split is the settlements' own: it holds without the trades' rows
    h2.store.conn.execute("DELETE FROM hist_trades")
    assert h2.figures(ME, DAY0, DAY0 + 86400, T) == (days, total)
    h2.reading(wall[0] + 1, reading(sim0 + 720 * 7, 4100))  # counts on from the kept reading
    assert h2.figures(ME, DAY0, DAY0 + 86400, T)[1].produced_mwh == 600_000
    h2.store.close()


async def test_a_store_from_before_the_settlements_named_their_sites(tmp_path: pathlib.Path) -> None:
    """Settlements written before they carried the trade's sites count by the trades' rows."""
    import sqlite3
    path = tmp_path / "history.sqlite"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE hist_settlements (id INTEGER PRIMARY KEY AUTOINCREMENT, trade_id TEXT NOT NULL, "
        "at REAL NOT NULL, delivered_wh INTEGER NOT NULL, paid_wei TEXT NOT NULL, d_wh INTEGER NOT NULL, d_wei TEXT NOT NULL);"
        "INSERT INTO hist_settlements (trade_id, at, delivered_wh, paid_wei, d_wh, d_wei) "
        f"VALUES ('t9', {DAY0 + 3600}, 100, '300000000000000', 100, '300000000000000');")
    old.commit()
    old.close()
    h = History(Store(path), "home-7", clock=lambda: float(DAY0 + 7200))
    with h.store.transaction() as conn:
        h.apply(conn, DAY0 + 3000, ev.TradeAgreed(
            trade_id="t9", offer_id="o9", seller=UTIL, buyer=ME, seller_site="utility", buyer_site="home-7", wh=100,
            price_wei_per_kwh=3 * 10**15))
        h.apply(conn, DAY0 + 3700, ev.TradeClosed(trade_id="t9", delivered_wh=100, paid_wei=3 * 10**14,
                                                         refunded_wei=0, tx_hash="0x9"))
    total = h.figures(ME, DAY0, DAY0 + 86400, T)[1]
    assert (total.bought_utility_mwh, total.bought_utility_wei, total.bought_local_wei) == (100_000, 3 * 10**14, 0)
    h.store.close()


# --- the API on the real grid ---------------------------------------------------------------------


async def figures_of(h: aiohttp.ClientSession, base: str, query: str = "") -> tuple[dict[str, Any], list[list[str]]]:
    async with h.get(base + "/api/figures" + query) as r:
        assert r.status == 200, await r.text()
        js = await r.json()
    async with h.get(base + "/api/figures.csv" + query) as r:
        assert r.status == 200 and r.content_type == "text/csv", await r.text()
        assert "attachment" in r.headers["Content-Disposition"]
        rows = list(csv.reader(io.StringIO(await r.text())))
    return js, rows


def agree(js: dict[str, Any], rows: list[list[str]]) -> None:
    """The CSV says what the JSON says (kWh and Ether exact)."""
    assert rows[0] == fig.CSV_HEADER
    assert [r[0] for r in rows[1:]] == [d["day"] for d in js["days"]] + ["total"]
    for r, d in zip(rows[1:], [*js["days"], js["total"]]):
        line = dict(zip(rows[0], r))
        for col, key in (("produced (kWh)", "produced_wh"), ("consumed (kWh)", "consumed_wh"),
                         ("bought locally (kWh)", "bought_local_wh"), ("sold locally (kWh)", "sold_local_wh"),
                         ("bought from the utility (kWh)", "bought_utility_wh"),
                         ("sold to the utility (kWh)", "sold_utility_wh"),
                         ("unmatched import (kWh)", "unmatched_import_wh"),
                         ("unmatched export (kWh)", "unmatched_export_wh")):
            assert Decimal(line[col]) * 1000 == Decimal(str(d[key])), (col, line, d)
        for col, key in (("paid locally (Ether)", "bought_local_wei"), ("earned locally (Ether)", "sold_local_wei"),
                         ("paid to the utility (Ether)", "bought_utility_wei"),
                         ("earned from the utility (Ether)", "sold_utility_wei"),
                         ("utility-only cost (Ether)", "baseline_cost_wei"), ("actual cost (Ether)", "actual_cost_wei"),
                         ("saved (Ether)", "saved_wei")):
            assert Decimal(line[col]) * 10**18 == int(d[key]), (col, line, d)
        assert balance_closes(d), d


async def test_figures_in_json_and_csv_match_the_chains_settlements(stack: Stack) -> None:
    async with http() as seller, http() as buyer:
        await login(seller, stack.url("solar-1"), stack.producer)
        await login(buyer, stack.url("home-7"), stack.consumer)
        # the chain's own word on the trades' payments, from the websocket
        settled: dict[str, int] = {}
        ws = await buyer.ws_connect(stack.url("home-7") + "/api/ws")

        async def read() -> None:
            async for msg in ws:
                e = json.loads(msg.data)
                if e["type"] in ("chain.settled", "chain.trade_closed"):
                    tid = e["body"]["trade_id"]
                    settled[tid] = max(settled.get(tid, 0), int(e["body"]["paid_wei"]))
        reader = asyncio.create_task(read())
        try:
            # the site's day by default (once a reading brought the simulated clock to this fresh
            # gateway); a bad range is a 400 that changes nothing
            async def simulated() -> bool:
                async with buyer.get(stack.url("home-7") + "/api/site") as r:
                    return bool((await r.json())["clock"]["simulated"])
            await stack.until("the site's simulated clock", simulated)
            js, rows = await figures_of(buyer, stack.url("home-7"))
            assert len(js["days"]) == 1 and js["end"] - js["start"] == 86400
            assert js["start"] <= js["clock"]["sim"] < js["end"]
            agree(js, rows)
            for q in ("?from=abc", "?from=10&to=5", "?from=0&to=99999999999", "?tz_offset_s=7"):
                for path in ("/api/figures", "/api/figures.csv"):
                    async with buyer.get(stack.url("home-7") + path + q) as r:
                        assert r.status == 400, (q, await r.text())
                        err = (await r.json())["error"]
                        assert err["code"] == "bad_range" and err["message"], err
            async with aiohttp.ClientSession() as anon, anon.get(stack.url("home-7") + "/api/figures.csv") as r:
                assert r.status == 401
            # a trade
            await stack.sell_and_bid(seller, buyer, 7000)
            await stack.until("a payment of the trade on the chain", lambda: any(settled.values()))
            tid = next(t for t, v in settled.items() if v)

            async def matching() -> tuple[dict[str, Any], dict[str, Any]] | None:
                # everything since the grid started: the history rows of both accounts, the
                # figures' totals of both, and this trade's payment as the chain said it
                paid_now = settled[tid]
                out = []
                for h, site, kind, key in ((buyer, "home-7", "bought", "bought_local"),
                                           (seller, "solar-1", "sold", "sold_local")):
                    js, rows = await figures_of(h, stack.url(site), wide)
                    agree(js, rows)
                    async with h.get(stack.url(site) + "/api/history") as r:
                        hist = [x for x in (await r.json())["rows"] if x["kind"] == kind]
                    mine = next((x for x in hist if x["id"] == tid), None)
                    why[:] = [site, paid_now, mine, js["total"], [(x["id"], x["amount_wei"], x["delivered_wh"])
                                                                   for x in hist]]
                    if mine is None or int(mine["amount_wei"]) != paid_now:
                        return None
                    if int(js["total"][key + "_wei"]) != sum(int(x["amount_wei"]) for x in hist):
                        return None
                    if js["total"][key + "_wh"] > sum(x["delivered_wh"] for x in hist):  # the auction may count ahead
                        return None
                    out.append(js)
                return out[0], out[1]

            js0 = js
            # (a site day lasts a minute here: the range reaches well past today)
            wide = f"?from={js0['start'] - 300 * 86400}&to={js0['end'] + 30 * 86400}"
            why: list[Any] = []
            try:
                got = await stack.until("the figures to show the chain's settlements", matching, timeout=60)
            except BaseException:
                raise AssertionError(f"the figures and the settlements disagree: {why}") from None
            b, s = got
            assert int(b["total"]["bought_local_wei"]) >= settled[tid] > 0
            assert int(s["total"]["sold_local_wei"]) >= settled[tid]
            # both sites' meters were counted (their load; the sun may have set on the simulated site)
            assert b["total"]["consumed_wh"] > 0 and s["total"]["consumed_wh"] > 0
            assert s["total"]["produced_wh"] >= 0 and b["total"]["produced_wh"] >= 0
        finally:
            await ws.close()
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
