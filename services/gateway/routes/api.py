"""How an API handler is declared: ``@api(Route(...))`` on the handler binds it to its route,
once, where it is written. The route's models validate the request body and check the
answer, and the same :class:`~services.gateway.openapi.Route` goes into the OpenAPI document.

A handler is called as ``handler(gw, request[, session][, body])``: the app's
:class:`~services.gateway.state.Gateway`, then the session if the route needs one (401
``no_session`` without), then the body parsed into the route's model. A refusal it raises
is reworded for the person (:func:`~services.gateway.errors.for_person`).
"""

from __future__ import annotations

from services.bus import refusals

import json
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from .. import models as m
from ..errors import ApiError, for_person, no_session
from ..openapi import Route, validation_message
from ..state import GATEWAY

H = TypeVar("H", bound=Callable[..., Awaitable[Any]])

SESSION_ERRORS = (401, 503)
BACKEND = (502, 503)

_ID = re.compile(m.ID_PATTERN)


class Api:
    """One area's API routes, in the order they are declared (the OpenAPI document's order)."""

    def __init__(self) -> None:
        self.routes: list[Route] = []
        self.table = web.RouteTableDef()

    def __call__(self, route: Route) -> Callable[[H], H]:
        def bind(handler: H) -> H:
            self.routes.append(route)
            # GET routes of the API answer GET only (no implicit HEAD)
            extra = {"allow_head": False} if route.method == "GET" else {}
            self.table.route(route.method, route.path, name=route.name, **extra)(endpoint(route, handler))
            return handler
        return bind


def endpoint(route: Route, handler: Callable[..., Awaitable[Any]]) -> Callable[[web.Request],
                                                                          Awaitable[web.StreamResponse]]:
    async def serve(request: web.Request) -> web.StreamResponse:
        gw = request.app[GATEWAY]
        session = gw.session_of(request) if route.auth else None
        if route.auth and session is None:
            raise no_session()
        args: list[Any] = [gw, request]
        if route.auth:
            args.append(session)
        body = None
        try:
            if route.body is not None:
                args.append(body := await parse_body(request, route.body))
            result = await handler(*args)
        except ApiError as e:
            raise for_person(e, route.name, body, gw.clock()) from None
        if isinstance(result, web.StreamResponse):
            return result
        assert isinstance(result, route.response), f"{route.name} returned {type(result).__name__}"
        return web.json_response(text=result.model_dump_json(), status=route.status)

    return serve


async def parse_body(request: web.Request, model: type[BaseModel]) -> Any:
    if request.content_type != "application/json":
        raise ApiError(415, "unsupported_media_type", "send the body as JSON with Content-Type: application/json")
    raw = await request.read()
    if not raw.strip() and model is m.Empty:
        return m.Empty()
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "malformed_json", "the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError.of(refusals.Invalid, "the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ApiError.of(refusals.Invalid, validation_message(e)) from None


def match_id(request: web.Request, name: str) -> str:
    """The path's ``name`` (an offer's or a trade's id); 404 if it cannot be one."""
    value = request.match_info[name]
    if not _ID.match(value):
        raise ApiError.of(refusals.NotFound, f"no such {name.removesuffix('_id')}")
    return value
