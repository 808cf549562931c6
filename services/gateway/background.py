"""The gateway's background work, each a context of the aiohttp app (``cleanup_ctx``):
started with the app, cancelled when it stops.

- expired sessions are pruned (once at the start, then every :data:`PRUNE_EVERY_S`);
- the balances of the accounts with a page open are read and changes pushed to the pages;
- the site's clock (as the meter readings tell it) is saved for the history.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from .state import GATEWAY, Gateway

log = logging.getLogger(__name__)

PRUNE_EVERY_S = 60.0
PERSIST_EVERY_S = 5.0


async def prune_sessions(gw: Gateway) -> int:
    n = await gw.sessions.purge(time.time())
    if n:
        log.info("pruned %d expired session(s)", n)
    return n


async def _every(seconds: float, step: Callable[[], Awaitable[Any]], failure: str) -> None:
    """``step()`` every ``seconds``; a failure is logged and tried again next round."""
    while True:
        await asyncio.sleep(seconds)
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - tried again next round
            log.exception(failure)


@contextlib.asynccontextmanager
async def _running(work: Awaitable[None], name: str) -> AsyncIterator[None]:
    task = asyncio.ensure_future(work)
    task.set_name(name)
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def sweep_sessions(app: web.Application) -> AsyncIterator[None]:
    gw = app[GATEWAY]
    await prune_sessions(gw)
    async with _running(_every(PRUNE_EVERY_S, lambda: prune_sessions(gw), "pruning expired sessions failed"),
                        "gateway-session-prune"):
        yield


async def watch_balances(app: web.Application) -> AsyncIterator[None]:
    gw = app[GATEWAY]
    last: dict[str, dict[str, Any]] = {}  # account -> the balances its pages were sent last
    async with _running(_every(gw.settings.gateway_balance_poll_s, lambda: gw.push_balances(last),
                               "reading balances for the pages failed"), "gateway-balances"):
        yield


async def persist_history(app: web.Application) -> AsyncIterator[None]:
    gw = app[GATEWAY]
    async with _running(_every(PERSIST_EVERY_S, gw.history.persist, "saving the site's clock failed"),
                        "gateway-history-clock"):
        yield


BACKGROUND = (sweep_sessions, watch_balances, persist_history)
"""The service's background work (a bare app, as the pages' tests serve, runs none)."""
