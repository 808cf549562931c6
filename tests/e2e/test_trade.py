"""The seed's demo end to end: every service a real subprocess from ``launcher.plan()`` on a
real anvil node, two users at their own gateways' REST APIs, the chain read with web3.
After the trade: the market's folder holds no user keystore and no key material, each
site's folder only its own, and a hostile site with valid bus keys gets no wallet (nor
the operator) to sign or unlock for any account that is not its own."""

from __future__ import annotations

import pathlib

import pytest

from services.bus import events as E

from services import launcher

from .flow import PRICE, check_final, relay_audit, run_trade
from .harness import TEST_SITE, cost, start_grid, stop_grid
from .keys import assert_keys_stay_home, hostile_site_gets_nothing

# the consumer site has no PV and a low battery, so it takes what the line brings;
# a delivery is published every 100 Wh, so the seller is paid in visible steps
CONSUMER_METER = {"GRIDTRADE_SIM__PANEL__AREA_M2": "0", "GRIDTRADE_SIM__BATTERY__SOC": "0.1",
                  "GRIDTRADE_DELIVERY_GRANULARITY_WH": "100"}
# ... and the operator settles each of them (its default is every 1000 Wh, for gas: the
# 2 kWh trade here would show one step before the close)
STEPS = {"GRIDTRADE_SETTLE_EVERY_WH": "100"}


@pytest.mark.slow
@pytest.mark.anvil
@pytest.mark.timeout(600)
async def test_trade_end_to_end(tmp_path: pathlib.Path) -> None:
    grid = await start_grid(tmp_path, time_scale=1440, meter_env={"meter-home-7": CONSUMER_METER}, service_env=STEPS)
    try:
        out = await run_trade(grid)
        final = await check_final(grid, out)
        relay_audit(grid, {out.trade_id})
        # the bus told the same story, each step once
        statuses = [s.state for s in grid.watch.of(E.TradeStatus, trade_id=out.trade_id)]
        assert statuses == ["agreed", "recorded", "delivering", "closed", "settled"], statuses
        assert len(grid.watch.of(E.TradeAgreed, trade_id=out.trade_id)) == 1
        assert len(grid.watch.of(E.TradeRecorded, trade_id=out.trade_id)) == 1
        closed = grid.watch.of(E.TradeClosed, trade_id=out.trade_id)
        assert len(closed) == 1 and closed[0].delivered_wh == final["delivered"], closed
        assert closed[0].paid_wei == cost(final["delivered"], PRICE)

        # keys stayed at their sites: on disk, and against a hostile site with valid keys
        assert_keys_stay_home(grid.data, grid.passphrases)
        data = grid.data.resolve()
        accounts = {"solar-1 producer": grid.producer.address, "home-7 consumer": grid.consumer.address}
        nonces = {a: grid.w3.eth.get_transaction_count(a) for a in accounts.values()}
        start = grid.w3.eth.block_number
        before = {a: grid.onchain(a, start) for a in accounts.values()}
        hub = grid.proc("hub").env
        codes = await hostile_site_gets_nothing(
            data / "keys", TEST_SITE,
            {site: grid.proc(f"wallet-{site}").env["GRIDTRADE_WALLET_RPC"] for site in launcher.SITES},
            hub["GRIDTRADE_CHAIN_RPC"], hub["GRIDTRADE_HUB_PUB"], tmp_path, accounts, grid.passphrases,
            lambda: (grid.health("chain") or {}).get("claims_refused", {}).get("bad_signature", 0))
        assert {site: set(c) for site, c in codes.items()} == {
            "solar-1": {"not_your_site"}, "home-7": {"not_your_site"}, "operator": {"unsupported", "empty"}}, codes
        assert {a: grid.w3.eth.get_transaction_count(a) for a in accounts.values()} == nonces
        # balances read at one block; the producer's meter goes on minting what it produces
        # meanwhile, so its tokens may grow by those mints and by nothing else
        end = grid.w3.eth.block_number
        after = {a: grid.onchain(a, end) for a in accounts.values()}
        for m in grid.minted(to_block=end, from_block=start + 1):
            assert m["to"] in after, m
            after[m["to"]]["tokens"] -= m["amountWh"]
        assert after == before
        for site in launcher.SITES:
            h = grid.health(f"wallet-{site}") or {}
            assert h.get("refused_other_sites", {}).get(TEST_SITE, 0) >= 16, h
        op = grid.health("chain") or {}
        assert op.get("claimed_accounts") == 2, op  # the forged claims bound nothing
    finally:
        await stop_grid(grid)
