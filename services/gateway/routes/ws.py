"""The websocket ``/api/ws``: the events a logged-in page may see (:mod:`services.gateway.feed`)
and its balances, pushed as they happen; closed when the session ends or the page reads too
slowly."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from aiohttp import WSMsgType, web

from ..errors import no_session
from ..state import GATEWAY, Client, Gateway

routes = web.RouteTableDef()


@routes.get("/api/ws")
async def websocket(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    token = request.cookies.get(gw.cookie)
    session = gw.sessions.get(token, gw.clock())
    if session is None or token is None:
        raise no_session()
    ws = web.WebSocketResponse(heartbeat=20, max_msg_size=4096)
    await ws.prepare(request)
    client = Client(ws=ws, token=token, address=session.address)
    gw.clients.add(client)
    gw.metrics.ws_clients.set(len(gw.clients))
    reader = asyncio.create_task(_ws_reader(gw, client), name="gateway-ws-reader")
    getter: asyncio.Future[dict[str, Any]] | None = None
    try:
        await ws.send_json({"type": "hello", "ts": gw.clock(),
                            "body": {"address": session.address, "site": gw.site}})
        while not ws.closed:
            getter = asyncio.ensure_future(client.queue.get())
            done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await getter
                break
            msg = getter.result()
            if gw.sessions.get(token, gw.clock()) is None:
                await ws.close(code=4401, message=b"session expired")
                break
            await ws.send_json(msg)
            gw.metrics.ws_sent.inc()
    except (ConnectionError, RuntimeError):
        pass
    finally:
        gw.clients.discard(client)
        gw.metrics.ws_clients.set(len(gw.clients))
        if getter is not None and not getter.done():  # the handler itself was cancelled while waiting
            getter.cancel()
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader
        if not ws.closed:
            await ws.close()
    return ws


async def _ws_reader(gw: Gateway, client: Client) -> None:
    """Incoming frames are only pings; the loop ends when the socket closes."""
    async for msg in client.ws:
        if msg.type == WSMsgType.TEXT and msg.data == "ping":
            await client.ws.send_json({"type": "pong", "ts": gw.clock(), "body": {}})
