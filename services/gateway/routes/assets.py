"""The web UI's files (``/`` and ``/static/...``, read once into memory) and the OpenAPI
document (``/api/openapi.json``)."""

from __future__ import annotations

import pathlib
from typing import Any

from aiohttp import web

from services.bus import refusals, states

from ..errors import ApiError

STATIC = pathlib.Path(__file__).resolve().parent.parent / "static"

CONTENT_TYPES = {".html": "text/html", ".css": "text/css", ".js": "text/javascript", ".svg": "image/svg+xml",
                 ".png": "image/png", ".ico": "image/x-icon", ".json": "application/json", ".txt": "text/plain"}

ASSETS = web.AppKey("assets", dict[str, tuple[bytes, str]])
"""The UI's files by their path under ``static/``: (body, content type)."""
OPENAPI = web.AppKey("openapi", dict[str, Any])
"""The OpenAPI document of the app's API routes."""

routes = web.RouteTableDef()


TRADE_STATES_JS = "js/trade_states.js"  # made from services/bus/states.py, not read from a file


def load_assets(root: pathlib.Path) -> dict[str, tuple[bytes, str]]:
    """Every file under ``root`` by its relative path (no path from a request touches the disk),
    and the web UI's trade states, made from the one enum (no copy of them to drift)."""
    out: dict[str, tuple[bytes, str]] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            ctype = CONTENT_TYPES.get(p.suffix, "text/plain" if "LICENSE" in p.name else "application/octet-stream")
            out[p.relative_to(root).as_posix()] = (p.read_bytes(), ctype)
    out[TRADE_STATES_JS] = (states.js_module().encode(), CONTENT_TYPES[".js"])
    return out


def _asset(request: web.Request, name: str) -> web.Response:
    """The UI's files, read once into memory (a few hundred kB; no executor threads)."""
    found = request.app[ASSETS].get(name)
    if found is None:
        raise ApiError.of(refusals.NotFound, "no such page or file")
    body, ctype = found
    return web.Response(body=body, content_type=ctype, charset="utf-8" if ctype.startswith("text/")
                        or ctype.endswith("javascript") else None, headers={"Cache-Control": "no-cache"})


@routes.get("/api/openapi.json")
async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPENAPI])


@routes.get("/")
async def index(request: web.Request) -> web.StreamResponse:
    return _asset(request, "index.html")


@routes.get("/static/{path:.+}")
async def static(request: web.Request) -> web.StreamResponse:
    return _asset(request, request.match_info["path"])
