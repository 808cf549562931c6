"""The route table and the OpenAPI 3 document built from it (pure: no I/O).

Each route is declared once, in :data:`ROUTES`, with the pydantic models of its body and
its answer. The app validates request bodies with exactly these models and the document
at ``/api/openapi.json`` is generated from them, so the two cannot drift.
"""

from __future__ import annotations

import dataclasses
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


_SESSION_ERRORS = (401, 503)
_BACKEND = (502, 503)

ROUTES: tuple[Route, ...] = (
    Route("GET", "/api/accounts", "list_accounts", "Local accounts for the login page", m.AccountsOut,
          auth=False, errors=_BACKEND, tag="session"),
    Route("POST", "/api/session", "login", "Log in: unlock an account with its passphrase", m.SessionOut,
          body=m.Login, auth=False, errors=(400, 401, 415, 422, 429, *_BACKEND), tag="session"),
    Route("GET", "/api/session", "whoami", "The logged-in account", m.SessionOut, errors=(401,), tag="session"),
    Route("POST", "/api/session/unlock", "unlock",
          "Unlock the session's account again with its passphrase (after its wallet restarted, actions that "
          "sign answer 401 with code locked; the session itself stays)", m.SessionOut, body=m.UnlockIn,
          errors=(400, 401, 415, 422, 429, *_BACKEND), tag="session"),
    Route("DELETE", "/api/session", "logout", "Log out: lock the account and end the session", m.OkOut,
          errors=(401,), tag="session"),
    Route("GET", "/api/wallet", "wallet", "Tokens, generation, Ether, escrow and pending transactions", m.WalletOut,
          errors=(*_SESSION_ERRORS, 502)),
    Route("GET", "/api/pending", "pending", "This account's pending transactions", m.PendingOut,
          errors=(*_SESSION_ERRORS, 502)),
    Route("POST", "/api/transfers", "transfer", "Send Ether to another participant", m.TxSentOut, body=m.TransferIn,
          status=202, errors=(400, 401, 409, 415, 422, *_BACKEND)),
    Route("POST", "/api/escrow/deposit", "escrow_deposit", "Move Ether into the market's escrow", m.TxSentOut,
          body=m.EscrowIn, status=202, errors=(400, 401, 409, 415, 422, *_BACKEND)),
    Route("POST", "/api/escrow/withdraw", "escrow_withdraw", "Take free escrow back", m.TxSentOut,
          body=m.EscrowIn, status=202, errors=(400, 401, 409, 415, 422, *_BACKEND)),
    Route("POST", "/api/credit/withdraw", "withdraw_credit", "Take out what buyers paid this seller", m.TxSentOut,
          body=m.EscrowIn, status=202, errors=(400, 401, 409, 415, 422, *_BACKEND)),
    Route("GET", "/api/mining", "mining", "Whether blocks are being produced", m.MiningOut,
          errors=(*_SESSION_ERRORS, 502)),
    Route("POST", "/api/mining", "set_mining", "Start or stop mining", m.MiningOut, body=m.MiningIn,
          errors=(400, 401, 409, 415, 422, *_BACKEND)),
    Route("GET", "/api/offers", "list_offers", "Open offers with their highest bids", m.OffersOut,
          errors=(*_SESSION_ERRORS, 502), tag="market"),
    Route("POST", "/api/offers", "sell", "Sell energy tokens in an auction (the site's wallet signs the offer)",
          m.OfferPlacedOut, body=m.SellIn,
          status=201, errors=(400, 401, 409, 415, 422, *_BACKEND), tag="market"),
    Route("POST", "/api/offers/{offer_id}/bids", "bid",
          "Bid on an offer: the site's wallet reserves the escrow the bid and the account's other winning bids need "
          "until the bid expires, then signs the bid", m.BidOut, body=m.BidIn, status=201,
          errors=(400, 401, 403, 404, 409, 415, 422, *_BACKEND), tag="market"),
    Route("POST", "/api/offers/{offer_id}/cancel", "cancel_offer", "Cancel an own offer without bids", m.OkOut,
          body=m.Empty, errors=(400, 401, 403, 404, 409, 415, 422, *_BACKEND), tag="market"),
    Route("GET", "/api/orders", "list_orders",
          "The double auction: the order book of the call being collected (your orders marked mine), when it "
          "clears, and the latest cleared calls' prices and volumes", m.OrdersOut,
          errors=(*_SESSION_ERRORS, 502), tag="market"),
    Route("POST", "/api/orders", "place_order",
          "Place a double-auction order for the call being collected (the site's wallet approves the tokens or "
          "reserves the escrow, then signs it); every fill of a call pays the call's one clearing price",
          m.OrderPlacedOut, body=m.OrderIn, status=201, errors=(400, 401, 403, 409, 415, 422, *_BACKEND),
          tag="market"),
    Route("GET", "/api/trades", "list_trades", "Trades (all of the market's)", m.TradesOut,
          errors=(*_SESSION_ERRORS, 502), tag="market"),
    Route("POST", "/api/trades/{trade_id}/close", "close_trade", "Close Connection: end a live trade", m.OkOut,
          body=m.Empty, errors=(400, 401, 403, 404, 409, 415, 422, *_BACKEND), tag="market"),
    Route("GET", "/api/agent", "agent", "This site's agent: what it does, its limits in force, its latest actions",
          m.AgentOut, errors=(*_SESSION_ERRORS, 404, 502), tag="agent"),
    Route("PUT", "/api/agent/limits", "set_agent_limits",
          "Set the site's agent's limits (off: trade by hand); its next decision follows them", m.AgentOut,
          body=m.AgentLimitsIn, errors=(*_SESSION_ERRORS, 404, 422, 502), tag="agent"),
    Route("GET", "/api/site", "site_info", "This site: its role, its (simulated) clock, the block explorer, the "
          "auction's minimum increment, which markets run", m.SiteOut, auth=False, tag="history"),
    Route("GET", "/api/history", "history", "Your trades, ended offers and Ether transactions, newest first (the "
          "same as CSV: GET /api/history.csv)", m.HistoryOut, errors=(401,), tag="history"),
    Route("GET", "/api/prices", "prices", "The market's start bids, bids, trade and clearing prices over time",
          m.PricesOut, errors=(401,), tag="history"),
    Route("GET", "/api/figures", "figures",
          "Your site's figures per day of site time and in total: energy produced, consumed, traded locally (as "
          "the chain settled it) and exchanged with the utility, self-sufficiency and money saved against the "
          "utility's tariffs. Query: from, to (site time, Unix s; default the site's current day), tz_offset_s "
          "(days start at midnight shifted by it; default 0). The same as CSV: GET /api/figures.csv",
          m.FiguresOut, errors=(400, 401), tag="history",
          query=(("from", "the range's start, site time (Unix s)"), ("to", "the range's end (exclusive), site time"),
                 ("tz_offset_s", "days begin at midnight shifted by this many seconds (quarter hours)"))),
    Route("GET", "/api/readings", "readings", "This site's latest meter readings (for the charts)", m.ReadingsOut,
          errors=(401,), tag="history"),
)

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


def document(routes: tuple[Route, ...] = ROUTES, *, title: str = "gridtrade gateway",
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
