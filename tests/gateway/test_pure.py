"""The gateway's pure parts: request models, kWh conversion, sessions, the login throttle,
event visibility and the OpenAPI document's agreement with the models."""

from __future__ import annotations

import pathlib

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from services.bus import events as ev
from services.bus.store import Store
from services.gateway import feed, models as m
from services.gateway.openapi import document
from services.gateway.routes import ROUTES
from services.gateway.sessions import LoginThrottle, SessionStore

A, B, C = "0x" + "a1" * 20, "0x" + "b2" * 20, "0x" + "c3" * 20


@given(st.integers(min_value=1, max_value=2**256 - 1))
def test_wei_strings_round_trip_exactly(n: int) -> None:
    assert m.EscrowIn.model_validate({"amount_wei": str(n)}).amount_wei == n
    assert m.OfferOut.model_validate({"offer_id": "o", "seller": A, "seller_site": "s", "wh": 1,
                                      "start_price_wei_per_kwh": n, "opened_at": 0, "ends_at": 1, "state": "open"}
                                     ).model_dump(mode="json")["start_price_wei_per_kwh"] == str(n)


@pytest.mark.parametrize("bad", [-1, 1, 1.0, "-1", "+1", " 1", "1e3", "0x10", str(2**256), "", True, None, [], "0"])
def test_bad_wei_is_refused(bad: object) -> None:
    with pytest.raises(ValidationError):
        m.EscrowIn.model_validate({"amount_wei": bad})


@given(st.integers(min_value=1, max_value=9_999_999_999))
def test_kwh_with_three_decimals_is_exact_wh(wh: int) -> None:
    text = f"{wh // 1000}.{wh % 1000:03d}"
    assert m.kwh_to_wh(text) == wh
    if wh <= m.MAX_WH:
        assert m.SellIn.model_validate({"kwh": text, "start_price_wei_per_kwh": "1", "duration_s": 1}).energy_wh == wh


def test_sell_takes_one_amount_and_no_account() -> None:
    for body in ({"start_price_wei_per_kwh": "1", "duration_s": 1},
                 {"wh": 1, "kwh": "1", "start_price_wei_per_kwh": "1", "duration_s": 1},
                 {"kwh": "0.0001", "start_price_wei_per_kwh": "1", "duration_s": 1},
                 {"kwh": "0", "start_price_wei_per_kwh": "1", "duration_s": 1},
                 {"wh": 1, "start_price_wei_per_kwh": "1", "duration_s": 1, "seller": A}):
        with pytest.raises(ValidationError):
            m.SellIn.model_validate(body)


async def test_sessions_expire_drop_and_outlive_the_store_object(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "gateway.sqlite"
    store = Store(path)
    s = SessionStore(store, ttl_s=100)
    token, sess = await s.create(A, now=1000, expires_at=5000)
    assert sess.expires_at == 1100  # never longer than the gateway's ttl
    assert s.get(token, 1050) == sess and s.get("other", 1050) is None and s.get(None, 1050) is None
    assert s.get("x" * 300, 1050) is None
    assert s.others_of(A, 1050) == 1 and s.others_of(A.upper().replace("0X", "0x"), 1050) == 1
    t2, _ = await s.create(B, now=1000)
    assert await s.drop(t2) and s.get(t2, 1001) is None and not await s.drop(t2)
    store.close()
    # a new store over the same file (a restarted gateway) knows the session
    store = Store(path)
    s = SessionStore(store, ttl_s=100)
    assert s.get(token, 1050) == sess and s.live(1050) == 1
    assert s.get(token, 1100) is None and s.live(1100) == 0  # expired: refused ...
    assert len(s) == 1 and await s.purge(1100) == 1 and len(s) == 0  # ... and pruned
    store.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert token.encode() not in raw and t2.encode() not in raw  # only digests are kept


def test_throttle_blocks_after_max_failures_and_backs_off() -> None:
    th = LoginThrottle(max_failures=5, window_s=60, max_delay_s=300)
    keys = ["addr:x", "ip:1"]
    for i in range(5):
        assert th.retry_after(keys, 100 + i) == 0
        th.failed(keys, 100 + i)
    assert th.retry_after(keys, 105) == pytest.approx(59)  # 60 s after the 5th failure
    assert th.retry_after(["ip:1"], 110) > 0 and th.retry_after(["addr:y"], 110) == 0
    assert th.retry_after(keys, 165) == 0
    th.failed(keys, 165)  # the 6th: twice as long
    assert th.retry_after(keys, 166) == pytest.approx(119)
    th.succeeded(["addr:x"])
    assert th.retry_after(["addr:x"], 166) == 0 and th.retry_after(["ip:1"], 166) > 0


def test_visibility() -> None:
    p = feed.Parties()
    agreed = ev.TradeAgreed(trade_id="t1", offer_id="o1", seller=A, buyer=B, seller_site="solar-1",
                            buyer_site="home-7", wh=1000, price_wei_per_kwh=5)
    settled = ev.Settled(trade_id="t1", delivered_wh=1, paid_wei=1, tx_hash="0x1")
    assert not feed.visible(settled, account=A, site="solar-1", parties=p)  # parties not known yet
    p.observe(agreed)
    assert feed.visible(agreed, account=C, site="home-7", parties=p)  # public
    assert feed.visible(settled, account=A, site="solar-1", parties=p)
    assert feed.visible(settled, account=B.upper().replace("0X", "0x"), site="home-7", parties=p)
    assert not feed.visible(settled, account=C, site="home-7", parties=p)
    tx = ev.ChainTx(tx_hash="0x2", kind="transfer", account=A, status="pending")
    assert feed.visible(tx, account=A, site="x", parties=p) and not feed.visible(tx, account=B, site="x", parties=p)
    reading = ev.MeterReading(site="solar-1", meter="m", role="producer", energy_wh=1, power_w=1, voltage_v=1,
                              current_a=1, relay_closed=False)
    assert feed.visible(reading, account=C, site="solar-1", parties=p)
    assert not feed.visible(reading, account=A, site="home-7", parties=p)
    assert feed.message("market.cleared", 1.0, ev.MarketCleared(round=1, price_wei_per_kwh=2**200, volume_wh=3)
                        )["body"]["price_wei_per_kwh"] == str(2**200)


def test_the_document_uses_the_validating_models() -> None:
    doc = document(ROUTES)
    for r in ROUTES:
        op = doc["paths"][r.path][r.method.lower()]
        if r.body is not None:
            ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            assert ref == f"#/components/schemas/{r.body.__name__}"
            props = doc["components"]["schemas"][r.body.__name__].get("properties", {})
            assert set(props) == set(r.body.model_fields)
        assert ("security" in op) == r.auth
    assert doc["components"]["schemas"]["WalletOut"]["properties"]["ether_wei"]["type"] == "string"
