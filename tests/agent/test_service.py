"""The agent's owner side on the real bus: only its own site sets its limits, the limits
survive a restart, and the agent says what it waits for."""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator

import pytest
import zmq.asyncio

from services.agent.config import AgentSettings
from services.agent.service import AgentService
from services.bus import RequestError, RpcClient
from services.bus import commands as cmd

from tests.support.bus import Grid
from tests.support.ports import free_port


def settings(grid: Grid, bind: str) -> AgentSettings:
    return AgentSettings(**grid.settings("solar-1").model_dump(), agent_bind=bind, agent_every_s=0.2,
                         agent_max_trade_wh=700)


async def started(grid: Grid, bind: str) -> AgentService:
    svc = AgentService(settings(grid, bind))
    await svc.start()
    return svc


@pytest.fixture
async def callers(grid: Grid) -> AsyncIterator[dict[str, RpcClient]]:
    out, parts = {}, []
    bind = f"tcp://127.0.0.1:{free_port()}"
    for site in ("solar-1", "home-7"):
        ctx = zmq.asyncio.Context()
        sec = grid.security(site)
        sec.start(ctx)
        out[site] = RpcClient(ctx, sec, bind, server_site="solar-1", timeout_s=5)
        parts.append((ctx, sec, out[site]))
    out["bind"] = bind  # type: ignore[assignment]
    yield out
    for ctx, sec, client in parts:
        await client.close()
        sec.stop()
        ctx.destroy(0)


async def test_only_its_own_site_sets_the_limits_and_they_survive_a_restart(
        grid: Grid, callers: dict[str, RpcClient], tmp_path: pathlib.Path) -> None:
    bind = str(callers["bind"])
    svc = await started(grid, bind)
    try:
        first = await callers["solar-1"].request(cmd.GetAgent())
        assert first.limits.max_trade_wh == 700  # the configuration's first limits
        assert first.state == "waiting" and "meter" in first.waiting_for, first
        # tariffs bound the prices in force whatever the owner sets
        mine = cmd.AgentLimits(enabled=True, reserve_soc=0.5, max_buy_wei_per_kwh=10**30,
                               min_sell_wei_per_kwh=1, max_trade_wh=250, horizon_s=1800)
        st = await callers["solar-1"].request(cmd.SetAgentLimits(limits=mine))
        assert st.limits == mine
        assert st.max_buy_wei_per_kwh == st.retail_wei_per_kwh and st.min_sell_wei_per_kwh == st.feed_in_wei_per_kwh

        # another site of the micro-grid, with a valid key, tries to take the agent over
        hostile = cmd.AgentLimits(enabled=True, reserve_soc=0.0, max_trade_wh=10**9, horizon_s=7 * 86400)
        with pytest.raises(RequestError) as e:
            await callers["home-7"].request(cmd.SetAgentLimits(limits=hostile))
        assert e.value.code == "not_your_site"
        with pytest.raises(RequestError):
            await callers["home-7"].request(cmd.GetAgent())
        assert (await callers["solar-1"].request(cmd.GetAgent())).limits == mine  # nothing changed
    finally:
        await svc.stop()

    svc = await started(grid, bind)  # the owner's limits are kept at the site
    try:
        assert (await callers["solar-1"].request(cmd.GetAgent())).limits == mine
    finally:
        await svc.stop()


async def test_bad_limits_are_refused_with_a_clear_error() -> None:
    with pytest.raises(ValueError, match="reserve_soc"):
        cmd.AgentLimits(reserve_soc=1.5)
    with pytest.raises(ValueError, match="max_trade_wh"):
        cmd.AgentLimits(max_trade_wh=0)
