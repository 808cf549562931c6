"""Schemathesis (v4 Python API) drives every operation of the gateway's own OpenAPI
document with generated input, valid and invalid: never a 5xx, every error in the
``{"error": {"code", "message"}}`` shape. Runs logged in, so validation is reached, and
the requests that pass it reach the real chain service (embedded chain) and the real
auction: transfers, deposits, mining on and off, offers and bids."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import hypothesis
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from tests.support.gateway import Stack, http, login


EXAMPLES = 20


def fuzz(doc: dict[str, Any], base: str, cookies: dict[str, str], failures: list[str], calls: list[int]) -> None:
    """Runs in its own thread (requests is blocking; the servers live in the test's loop)."""
    schema = schemathesis.openapi.from_dict(doc)
    http = requests.Session()
    for result in schema.get_all_operations():
        op = result.ok()
        if (op.method.upper(), op.path) == ("DELETE", "/api/session"):
            continue  # logging out would end the run's session; covered in test_api
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck), phases=[hypothesis.Phase.generate])
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case: Any) -> None:
                resp = case.call(base_url=base, session=http, cookies=cookies, timeout=10)
                calls.append(resp.status_code)
                where = f"{case.method} {case.formatted_path} body={str(case.body)[:120]!r}"
                if resp.status_code >= 500:
                    failures.append(f"{resp.status_code} on {where}: {resp.text[:200]}")
                elif resp.status_code >= 400:
                    body = resp.json()
                    if set(body) != {"error"} or not body["error"].get("message"):
                        failures.append(f"bad error shape on {where}: {resp.text[:200]}")

            try:
                run()
            except hypothesis.errors.Unsatisfiable:
                if mode is GenerationMode.POSITIVE:
                    failures.append(f"{op.method} {op.path}: no valid input could be generated")
                # an operation without inputs has no invalid ones to generate
            except Exception as e:  # noqa: BLE001 - reported by the test, with the operation
                failures.append(f"{op.method} {op.path} ({mode}): {type(e).__name__}: {e}"[:400])
    http.close()


async def test_generated_requests_never_get_a_5xx(stack: Stack) -> None:
    base = stack.url("home-7")
    async with http() as h:
        await login(h, base, stack.consumer)
        cookies = {c.key: c.value for c in h.cookie_jar}
        async with h.get(base + "/api/openapi.json") as r:
            doc = await r.json()
        failures: list[str] = []
        calls: list[int] = []
        t = threading.Thread(target=fuzz, args=(doc, base, cookies, failures, calls), name="schemathesis")
        t.start()
        try:
            while t.is_alive():  # keep the loop serving while the thread sends requests
                await asyncio.sleep(0.05)
            t.join()
        finally:
            # the generated requests could not switch mining: a site's wallet only shows it
            async with h.get(base + "/api/mining") as r:
                assert r.status == 200 and (await r.json())["mining"] is True, await r.text()
    assert not failures, "\n".join(failures[:20])
    # it did reach the handlers: successes and refusals both, across the operations
    assert any(c < 300 for c in calls) and any(c == 422 for c in calls) and len(calls) > 10 * len(doc["paths"])
    assert len(stack.gateways["home-7"].gateway.sessions) >= 1
