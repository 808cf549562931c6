"""A JSON-RPC proxy in front of a node, for tests: it counts the calls per method (and the
block ranges of eth_getLogs), injects what public nodes and RPC providers do (HTTP 429,
JSON-RPC -32005 'limit exceeded', answers that come too late) and can refuse chosen raw
transactions the way geth's transaction pool does."""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web
from web3 import AsyncWeb3

from tests.support.ports import free_port


class RpcProxy:
    def __init__(self, upstream: str, *, seed: int = 7) -> None:
        self.upstream = upstream
        self.calls: Counter[str] = Counter()
        self.log_ranges: list[tuple[int, int]] = []
        self.log_topics: list[list[Any]] = []  # each eth_getLogs's topic filter
        self.injected: Counter[str] = Counter()
        self.fault_rate = 0.0
        self.late_s = 1.5  # an injected slow answer comes this late (longer than the client waits)
        self.refuse: Callable[[bytes], str | None] | None = None
        """Called with each raw transaction sent: an error message refuses it (-32000)."""
        self.rng = random.Random(seed)
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self._session = aiohttp.ClientSession()
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _forward(self, body: Any) -> Any:
        assert self._session is not None
        async with self._session.post(self.upstream, json=body) as resp:
            return await resp.json(content_type=None)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        method = body.get("method", "") if isinstance(body, dict) else "batch"
        self.calls[method] += 1
        if method == "eth_getLogs":
            f = body["params"][0]
            self.log_ranges.append((int(f["fromBlock"], 16), int(f["toBlock"], 16)))
            self.log_topics.append(list(f.get("topics") or []))
        # a chosen refusal comes before any injected fault: a send that a late answer let
        # through to the node would be "already known" to a real node when sent again, never
        # refused, so the refusal must meet the transaction's first send
        if method == "eth_sendRawTransaction" and self.refuse is not None:
            msg = self.refuse(bytes.fromhex(body["params"][0].removeprefix("0x")))
            if msg:
                self.injected["refused"] += 1
                return web.json_response({"jsonrpc": "2.0", "id": body.get("id"),
                                          "error": {"code": -32000, "message": msg}})
        if self.fault_rate and self.rng.random() < self.fault_rate:
            kind = self.rng.choice(("http429", "limit", "late"))
            self.injected[kind] += 1
            if kind == "http429":
                return web.Response(status=429, text="Too Many Requests")
            if kind == "limit":
                return web.json_response({"jsonrpc": "2.0", "id": body.get("id"),
                                          "error": {"code": -32005, "message": "limit exceeded"}})
            answer = await self._forward(body)  # the node did it; the answer is lost to the client's timeout
            await asyncio.sleep(self.late_s)
            return web.json_response(answer)
        return web.json_response(await self._forward(body))


async def rpc(w3: AsyncWeb3, method: str, *params: Any) -> Any:
    resp = await w3.provider.make_request(method, list(params))  # type: ignore[arg-type]
    if "error" in resp:
        raise AssertionError(f"{method}: {json.dumps(resp['error'])}")
    return resp.get("result")


async def txpool(w3: AsyncWeb3) -> list[dict[str, Any]]:
    pool = await rpc(w3, "txpool_content")
    return [tx for section in ("pending", "queued") for by_nonce in pool[section].values() for tx in by_nonce.values()]
