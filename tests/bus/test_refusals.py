"""Refusals are declared once (services/bus/refusals.py): each code any service can answer
is a class there, with the HTTP status the gateway answers it with."""

from __future__ import annotations

import ast
import functools
import pathlib

import pytest

from services.bus import RequestError, refusals
from services.bus.refusals import REFUSALS, Refusal, RequestTimeout, status_of
from services.gateway.errors import from_request_error

SERVICES = pathlib.Path(__file__).resolve().parents[2] / "services"

# the gateway's code -> status table before the refusals were declared as classes: the
# declarations must answer every one of these codes with the same status
STATUS_BEFORE = {
    "not_found": 404, "unknown_account": 404,
    "not_allowed": 403, "not_your_account": 403, "not_your_site": 403,
    "too_many_attempts": 429,
    "invalid": 422, "bad_request": 422, "bad_amount": 422,
    "locked": 401,
    "timeout": 503, "unavailable": 503, "chain_unavailable": 503, "busy": 503,
    **dict.fromkeys(("too_low", "closed", "has_bids", "unfunded", "no_tokens", "own_offer", "insufficient_escrow",
                     "insufficient_credit", "insufficient_tokens", "insufficient_funds", "rejected",
                     "invalid_transition", "not_supported", "unsupported", "bad_signature", "replayed"), 409),
    "internal": 502,
}


@functools.cache
def _modules() -> tuple[tuple[str, ast.Module], ...]:
    """(path under the repository, syntax tree) of every module in services/."""
    return tuple((p.relative_to(SERVICES.parent).as_posix(), ast.parse(p.read_text(), p.name))
                 for p in sorted(SERVICES.rglob("*.py")))


def _camel(code: str) -> str:
    return "".join(w.capitalize() for w in code.split("_"))


def test_each_refusal_is_named_for_its_code_and_declared_once() -> None:
    declared = [c for c in vars(refusals).values()
                if isinstance(c, type) and issubclass(c, Refusal) and c.__dict__.get("code")]
    assert sorted(c.code for c in declared) == sorted(REFUSALS)
    for code, cls in REFUSALS.items():
        assert cls.__name__ == ("RequestTimeout" if code == "timeout" else _camel(code))
        assert issubclass(cls, RequestError)
        e = cls("why")
        assert (e.code, e.message, e.status) == (code, "why", cls.status)
    with pytest.raises(TypeError, match="declared twice"):
        type("Again", (Refusal,), {"code": "too_low"})


def test_the_statuses_are_those_the_gateway_answered_before() -> None:
    assert {code: status_of(code) for code in STATUS_BEFORE} == STATUS_BEFORE
    assert status_of("no_such_code") == 409  # undeclared: a conflict, as before
    assert issubclass(RequestTimeout, TimeoutError) and RequestTimeout().code == "timeout"


@pytest.mark.parametrize("code", sorted(REFUSALS))
def test_the_gateway_answers_each_code_with_its_declared_status(code: str) -> None:
    e = from_request_error(RequestError(code, "the service's words"), "auction")
    assert e.status == REFUSALS[code].status
    assert e.code == {"internal": "upstream_error"}.get(code, "unavailable" if e.status == 503 else code)


def _literal_codes() -> dict[str, list[str]]:
    """Every code written as a literal in services/: given to a RequestError or a reply's
    ErrorInfo, or compared with a ``.code`` (the gateway's wording of a refusal)."""
    found: dict[str, list[str]] = {}

    def add(node: ast.AST, where: str) -> None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.setdefault(node.value, []).append(where)
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            for elt in node.elts:
                add(elt, where)

    for rel, tree in _modules():
        for node in ast.walk(tree):
            where = f"{rel}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Call):
                name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                if name == "RequestError" and node.args:
                    add(node.args[0], where)
                if name == "ErrorInfo":
                    for kw in node.keywords:
                        if kw.arg == "code":
                            add(kw.value, where)
            elif isinstance(node, ast.Compare) and len(node.ops) == 1:
                left, right = node.left, node.comparators[0]
                is_code = (isinstance(left, ast.Attribute) and left.attr == "code") or \
                          (isinstance(left, ast.Name) and left.id == "code" and "gateway/words.py" in rel)
                if is_code and isinstance(node.ops[0], (ast.Eq, ast.NotEq, ast.In, ast.NotIn)):
                    add(right, where)
    return found


def _gateway_own_codes() -> set[str]:
    """The codes the gateway answers of its own (``ApiError(status, "code", ...)``: no service
    sends them, e.g. ``no_session``)."""
    own = set()
    for rel, tree in _modules():
        if not rel.startswith("services/gateway/"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "ApiError" and len(node.args) > 1 \
                    and isinstance(node.args[1], ast.Constant):
                own.add(node.args[1].value)
    return own


def test_every_code_any_service_answers_is_declared() -> None:
    found = _literal_codes()
    assert {"unfunded", "insufficient_escrow", "too_low"} <= found.keys(), "the scan misses codes: it looks in the wrong place"
    own = _gateway_own_codes()
    assert own and not own & REFUSALS.keys(), "the gateway answers a declared code with a status of its own"
    undeclared = {code: where for code, where in found.items() if code not in REFUSALS and code not in own}
    assert undeclared == {}


def test_services_raise_refusal_classes_not_bare_codes() -> None:
    bare = []
    for rel, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == \
                    "RequestError" and node.args and isinstance(node.args[0], ast.Constant):
                bare.append(f"{rel}:{node.lineno}")
    assert bare == []
