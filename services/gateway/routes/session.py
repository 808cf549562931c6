"""Logging in and out: this site's accounts, the session cookie, unlocking the key again.

Logging in asks this site's wallet to unlock the key (the key, the passphrase and every
signature stay at this site); failed attempts are throttled per address and per client IP
(429 with Retry-After), by this gateway and by the wallet itself.
"""

from __future__ import annotations

import logging
import re

from aiohttp import web

from services.bus import RequestError, refusals
from services.bus import commands as cmd

from .. import models as m
from ..errors import ApiError, from_request_error, no_session
from ..openapi import Route
from ..sessions import Session
from ..state import Gateway
from .api import BACKEND, Api

log = logging.getLogger(__name__)

api = Api()

# what the chain service answers an unlock of a wrong account or passphrase (to a person: wrong credentials)
WRONG_ACCOUNT = frozenset(r.code for r in (refusals.BadPassphrase, refusals.UnknownAccount, refusals.NotYourAccount,
                                           refusals.NotYourSite, refusals.Invalid, refusals.BadRequest,
                                           refusals.Keystore))


@api(Route("GET", "/api/accounts", "list_accounts", "Local accounts for the login page", m.AccountsOut,
           auth=False, errors=BACKEND, tag="session"))
async def list_accounts(gw: Gateway, request: web.Request) -> m.AccountsOut:
    reply: cmd.Accounts = await gw.ask_chain(cmd.ListAccounts())
    return m.AccountsOut(accounts=[m.AccountOut(address=a.address, name=a.name, site=a.site)
                                   for a in reply.accounts])


async def unlock_at_chain(gw: Gateway, request: web.Request, address: str, passphrase: str, ttl_s: float,
                          wrong: str) -> cmd.Unlocked:
    """Unlock ``address`` in the chain service, behind this gateway's throttle (per address
    and per client IP; a failure counts, a success clears the address)."""
    now = gw.clock()
    keys = [f"addr:{address.lower()}", f"ip:{request.remote or '?'}"]
    wait = gw.throttle.retry_after(keys, now)
    if wait > 0:
        gw.metrics.logins.labels("throttled").inc()
        raise ApiError.of(refusals.TooManyAttempts, f"too many failed logins; try again in {int(wait) + 1} s",
                       {"Retry-After": str(int(wait) + 1)})
    try:
        unlocked: cmd.Unlocked = await gw.chain.request(
            cmd.Unlock(address=address, passphrase=passphrase, ttl_s=ttl_s),
            timeout=gw.settings.gateway_rpc_timeout_s)
    except RequestError as e:
        # another site's account is refused by the chain service: to a person, a wrong account
        if e.code in WRONG_ACCOUNT:
            gw.throttle.failed(keys, gw.clock())
            gw.metrics.logins.labels("failed").inc()
            raise ApiError(401, "bad_credentials", wrong) from None
        if e.code == refusals.TooManyAttempts.code:  # the chain service's own throttle
            gw.metrics.logins.labels("throttled").inc()
            found = re.search(r"try again in (\d+) s", e.message)
            wait_s = found.group(1) if found else "60"
            raise ApiError.of(refusals.TooManyAttempts, f"too many failed logins; try again in {wait_s} s",
                           {"Retry-After": wait_s}) from None
        raise from_request_error(e, "chain") from None
    gw.throttle.succeeded([keys[0]])
    gw.metrics.logins.labels("ok").inc()
    return unlocked


@api(Route("POST", "/api/session", "login", "Log in: unlock an account with its passphrase", m.SessionOut,
           body=m.Login, auth=False, errors=(400, 401, 415, 422, 429, *BACKEND), tag="session"))
async def login(gw: Gateway, request: web.Request, body: m.Login) -> web.StreamResponse:
    now = gw.clock()
    unlocked = await unlock_at_chain(gw, request, body.address, body.passphrase, gw.settings.session_ttl_s,
                                     "wrong account or passphrase")
    token, session = await gw.sessions.create(unlocked.address, now, unlocked.expires_at)
    resp = web.json_response(text=m.SessionOut(address=session.address, site=gw.site,
                                               expires_at=session.expires_at, unlocked=True).model_dump_json())
    resp.set_cookie(gw.cookie, token, httponly=True, samesite="Strict", path="/",
                    max_age=int(session.expires_at - now), secure=gw.settings.cookie_secure)
    log.info("login %s", session.address)
    return resp


@api(Route("GET", "/api/session", "whoami", "The logged-in account", m.SessionOut, errors=(401,), tag="session"))
async def whoami(gw: Gateway, request: web.Request, session: Session) -> m.SessionOut:
    return m.SessionOut(address=session.address, site=gw.site, expires_at=session.expires_at,
                        unlocked=await gw.is_unlocked(session.address))


@api(Route("POST", "/api/session/unlock", "unlock",
           "Unlock the session's account again with its passphrase (after its wallet restarted, actions that "
           "sign answer 401 with code locked; the session itself stays)", m.SessionOut, body=m.UnlockIn,
           errors=(400, 401, 415, 422, 429, *BACKEND), tag="session"))
async def unlock(gw: Gateway, request: web.Request, session: Session, body: m.UnlockIn) -> m.SessionOut:
    """The session's account again (its wallet restarted): for the rest of the session."""
    ttl_s = session.expires_at - gw.clock()
    if ttl_s <= 0:
        raise no_session()
    await unlock_at_chain(gw, request, session.address, body.passphrase, ttl_s, "wrong passphrase")
    log.info("unlocked %s again", session.address)
    return m.SessionOut(address=session.address, site=gw.site, expires_at=session.expires_at, unlocked=True)


@api(Route("DELETE", "/api/session", "logout", "Log out: lock the account and end the session", m.OkOut,
           errors=(401,), tag="session"))
async def logout(gw: Gateway, request: web.Request, session: Session) -> web.StreamResponse:
    token = request.cookies.get(gw.cookie)
    await gw.sessions.drop(token)
    if not gw.sessions.others_of(session.address, gw.clock()):
        try:
            await gw.chain.request(cmd.Lock(address=session.address), timeout=gw.settings.gateway_rpc_timeout_s)
        except RequestError as e:  # the session is gone here anyway; the key expires at the chain
            log.warning("could not lock %s at logout: %s", session.address, e)
    for c in [c for c in gw.clients if c.token == token]:
        await c.ws.close(code=4401, message=b"logged out")
    resp = web.json_response(text=m.OkOut().model_dump_json())
    resp.del_cookie(gw.cookie, path="/")
    log.info("logout %s", session.address)
    return resp
