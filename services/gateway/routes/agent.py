"""This site's agent, if it runs one: what it does and the limits its owner sets for it."""

from __future__ import annotations

from aiohttp import web

from services.bus import commands as cmd
from services.bus import refusals

from .. import models as m
from ..errors import ApiError
from ..openapi import Route
from ..sessions import Session
from ..state import Gateway
from .api import SESSION_ERRORS, Api

api = Api()

AGENT_TIMEOUT_S = 2.0  # the agent runs at this site: it answers at once or not at all


async def _ask_agent(gw: Gateway, req: cmd.Request, session: Session, cmd_id: str | None = None) -> cmd.AgentState:
    if gw.agent_client is None:
        raise ApiError(404, "no_agent", "this site runs no agent: trade by hand on the Market page")
    st: cmd.AgentState = await gw.ask(gw.agent_client, "agent", req, cmd_id, timeout=AGENT_TIMEOUT_S)
    if st.account and st.account.lower() != session.address.lower():
        raise ApiError.of(refusals.NotYourAccount, "the site's agent trades for another account of this site")
    return st


@api(Route("GET", "/api/agent", "agent", "This site's agent: what it does, its limits in force, its latest actions",
           m.AgentOut, errors=(*SESSION_ERRORS, 404, 502), tag="agent"))
async def agent(gw: Gateway, request: web.Request, session: Session) -> m.AgentOut:
    return m.AgentOut(**(await _ask_agent(gw, cmd.GetAgent(), session)).model_dump())


@api(Route("PUT", "/api/agent/limits", "set_agent_limits",
           "Set the site's agent's limits (off: trade by hand); its next decision follows them", m.AgentOut,
           body=m.AgentLimitsIn, errors=(*SESSION_ERRORS, 404, 422, 502), tag="agent"))
async def set_agent_limits(gw: Gateway, request: web.Request, session: Session, body: m.AgentLimitsIn) -> m.AgentOut:
    limits = cmd.AgentLimits(**body.model_dump())
    st = await _ask_agent(gw, cmd.SetAgentLimits(limits=limits), session, gw.cmd_id(request, session, "agent-limits"))
    return m.AgentOut(**st.model_dump())
