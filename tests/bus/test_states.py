"""A trade's states are one enum (services/bus/states.py): the wire, the lifecycle, the
stores, the agent and the web UI take them from there, with the same strings as ever."""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import subprocess

import pytest

from services.auction import lifecycle
from services.bus import events as ev
from services.bus.states import ENDED, FINAL, LIVE, OPEN, TradeState, js_module, sql_list

ROOT = pathlib.Path(__file__).resolve().parents[2]
APP_JS = ROOT / "services/gateway/static/js/app.js"


def test_the_states_and_their_groups_keep_their_strings() -> None:
    assert [s.value for s in TradeState] == ["agreed", "recorded", "delivering", "fulfilled", "closed", "settled",
                                            "failed"]
    # the sets each service kept before: the lifecycle's and the meter's LIVE, the agent's
    # and the web UI's open trades, the meter's ended ones, the simulation report's FINAL
    assert LIVE == {"recorded", "delivering"}
    assert OPEN == {"agreed", "recorded", "delivering"}
    assert ENDED == {"fulfilled", "closed", "settled", "failed"}
    assert FINAL == {"settled", "failed"}
    assert OPEN | ENDED == set(TradeState) and not OPEN & ENDED
    assert sql_list(ENDED) == "('fulfilled', 'closed', 'settled', 'failed')"


def test_events_and_the_lifecycle_use_the_enum() -> None:
    assert ev.TradeStatus.model_fields["state"].annotation is TradeState
    assert lifecycle.TradeState is TradeState and lifecycle.LIVE is LIVE
    assert set(lifecycle.TRANSITIONS) == set(TradeState)
    body = ev.TradeStatus.model_validate_json(json.dumps({
        "trade_id": "t-1", "state": "delivering", "seller": "0x" + "a" * 40, "buyer": "0x" + "b" * 40,
        "seller_site": "a", "buyer_site": "b", "wh": 1, "price_wei_per_kwh": 1}))
    assert body.state is TradeState.DELIVERING and json.loads(body.model_dump_json())["state"] == "delivering"


def test_the_web_ui_imports_the_generated_states_and_keeps_no_copy() -> None:
    src = APP_JS.read_text()
    assert "from './trade_states.js'" in src
    # the words a card shows for each state are the page's own; no state is spelled out elsewhere
    words = re.search(r"const STATE_WORDS = \{(.*?)\};", src, re.S)
    assert words is not None and "[TradeState.AGREED]:" in words.group(1)
    copies = re.findall(r"'(agreed|recorded|delivering|fulfilled|settled)'", src.replace(words.group(0), ""))
    assert copies == []


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node")
def test_the_generated_module_holds_what_the_enum_says(tmp_path: pathlib.Path) -> None:
    mod = tmp_path / "trade_states.mjs"
    mod.write_text(js_module())
    out = subprocess.run(
        ["node", "--input-type=module", "-e",
         f"import * as m from {json.dumps(mod.as_uri())}; console.log(JSON.stringify({{TradeState: m.TradeState, "
         "LIVE: [...m.LIVE], OPEN: [...m.OPEN], ENDED: [...m.ENDED], FINAL: [...m.FINAL]}))"],
        capture_output=True, text=True, check=True, timeout=60)
    got = json.loads(out.stdout)
    assert got["TradeState"] == {s.name: s.value for s in TradeState}
    for name, group in (("LIVE", LIVE), ("OPEN", OPEN), ("ENDED", ENDED), ("FINAL", FINAL)):
        assert set(got[name]) == group
