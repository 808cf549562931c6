"""What a route of the API is, and the OpenAPI 3 document built from the routes (pure: no I/O).

Each route is declared once, on its handler (``@api(Route(...))`` in
:mod:`services.gateway.routes`), with the pydantic models of its body and its answer. The
app validates request bodies with exactly these models and the document at
``/api/openapi.json`` is generated from them, so the two cannot drift.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema

from . import models as m

REF = "#/components/schemas/{model}"


@dataclasses.dataclass(frozen=True)
class Route:
    method: str
    path: str
    name: str
    summary: str
    response: type[BaseModel]
    body: type[BaseModel] | None = None
    auth: bool = True
    status: int = 200
    errors: tuple[int, ...] = ()
    tag: str = "wallet"
    query: tuple[tuple[str, str], ...] = ()  # optional integer query parameters: (name, description)


_REASONS = {400: "Malformed request",
            401: "No session (code no_session: log in first), a wrong passphrase (bad_credentials), or the "
                 "account's key is locked in its wallet (locked: POST /api/session/unlock)",
            403: "Not allowed for this account", 404: "No such thing", 409: "Refused by the market or the chain",
            415: "Body is not application/json", 422: "Invalid field values", 429: "Too many failed logins",
            502: "A backing service failed", 503: "A backing service does not answer"}


def _path_params(path: str) -> list[dict[str, Any]]:
    out = []
    for part in path.split("/"):
        if part.startswith("{") and part.endswith("}"):
            out.append({"name": part[1:-1], "in": "path", "required": True,
                        "schema": {"type": "string", "pattern": m.ID_PATTERN}})
    return out


def document(routes: Sequence[Route], *, title: str = "gridtrade gateway",
             version: str = "0.1.0", cookie: str = "gridtrade_session") -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``routes``."""
    pairs: list[tuple[type[BaseModel], Any]] = [(m.ErrorOut, "serialization")]
    for r in routes:
        pairs.append((r.response, "serialization"))
        if r.body is not None:
            pairs.append((r.body, "validation"))
    seen: list[tuple[type[BaseModel], Any]] = []
    for p in pairs:
        if p not in seen:
            seen.append(p)
    keys, defs = models_json_schema(seen, ref_template=REF)
    schemas = defs.get("$defs", {})

    def ref(model: type[BaseModel], mode: str) -> dict[str, Any]:
        return keys[(model, mode)]

    error_ref = ref(m.ErrorOut, "serialization")
    paths: dict[str, dict[str, Any]] = {}
    for r in routes:
        op: dict[str, Any] = {
            "operationId": r.name, "summary": r.summary, "tags": [r.tag],
            "responses": {str(r.status): {"description": "OK",
                                          "content": {"application/json": {"schema": ref(r.response, "serialization")}}}},
        }
        for code in r.errors:
            op["responses"][str(code)] = {"description": _REASONS.get(code, "Error"),
                                          "content": {"application/json": {"schema": error_ref}}}
        if r.auth:
            op["security"] = [{"session": []}]
            op["responses"].setdefault("401", {"description": _REASONS[401],
                                               "content": {"application/json": {"schema": error_ref}}})
        params = _path_params(r.path) + [{"name": name, "in": "query", "required": False, "description": text,
                                          "schema": {"type": "integer"}} for name, text in r.query]
        if params:
            op["parameters"] = params
        if r.body is not None:
            op["requestBody"] = {"required": r.body is not m.Empty,
                                 "content": {"application/json": {"schema": ref(r.body, "validation")}}}
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version,
                 "description": "Wallet and energy marketplace of one gridtrade site. Wei travel as decimal "
                                "strings, energy as integer Wh. State-changing routes need the session cookie "
                                "and Content-Type: application/json."},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"session": {"type": "apiKey", "in": "cookie", "name": cookie}},
        },
    }


def validation_message(err: ValidationError) -> str:
    """A short, human sentence for a pydantic error (no input values echoed)."""
    parts = []
    for e in err.errors(include_url=False, include_input=False)[:3]:
        where = ".".join(str(x) for x in e["loc"]) or "body"
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)
