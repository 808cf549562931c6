"""The site agent's decisions (pure): examples and property tests of the spec's invariants."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from services.agent import strategy as s
from services.agent.strategy import (
    MIN_LOT_WH,
    Limits,
    MarketView,
    OfferSeen,
    PlaceBid,
    PlaceOffer,
    PlaceOrder,
    SiteView,
    Tariffs,
)
from services.bus.config import BusSettings

ME = "0x" + "ab" * 20
OTHER = "0x" + "cd" * 20
THIRD = "0x" + "ef" * 20
RETAIL, FEED_IN = 3_000_000_000_000_000, 500_000_000_000_000
TARIFFS = Tariffs(retail_wei_per_kwh=RETAIL, feed_in_wei_per_kwh=FEED_IN)
NOW = 1_800_000_000.0
PROPS = settings(max_examples=200, deadline=None)


def site(**kw: object) -> SiteView:
    base: dict[str, object] = dict(soc=None, battery_wh=0.0, forecast_net_wh=0.0, tokens_free_wh=0, selling_wh=0,
                                   buying_wh=0)
    base.update(kw)
    return SiteView(**base)  # type: ignore[arg-type]


def offer(offer_id: str = "o1", seller: str = OTHER, wh: int = 500, start: int = FEED_IN, highest: int | None = None,
          bidder: str | None = None, opened_at: float = NOW - 30, ends_at: float = NOW + 30) -> OfferSeen:
    return OfferSeen(offer_id=offer_id, seller=seller, wh=wh, start_price_wei_per_kwh=start,
                     highest_bid_wei_per_kwh=highest, highest_bidder=bidder, opened_at=opened_at, ends_at=ends_at)


def market(*offers: OfferSeen, last: int | None = None, now: float = NOW, inc: int = 1) -> MarketView:
    return MarketView(now=now, offers=tuple(offers), last_clearing_wei_per_kwh=last, min_increment_wei_per_kwh=inc)


# ---------------------------------------------------------------- limits, tariffs, effective prices


def test_limits_defaults_and_refusals() -> None:
    lim = Limits()
    assert (lim.enabled, lim.reserve_soc, lim.max_trade_wh, lim.horizon_s) == (True, 0.2, 2000, 3600)
    assert lim.max_buy_wei_per_kwh is None and lim.min_sell_wei_per_kwh is None
    for bad in ({"reserve_soc": 1.5}, {"reserve_soc": -0.1}, {"max_buy_wei_per_kwh": 0}, {"min_sell_wei_per_kwh": -1},
                {"max_trade_wh": 0}, {"max_trade_wh": 10**9 + 1}, {"horizon_s": 0}, {"horizon_s": 7 * 86400 + 1},
                {"colour": "red"}):
        with pytest.raises(ValidationError):
            Limits.model_validate(bad)
    # the owner may sell above what they pay at most
    assert Limits(max_buy_wei_per_kwh=10, min_sell_wei_per_kwh=20).min_sell_wei_per_kwh == 20


def test_tariffs_must_be_ordered() -> None:
    with pytest.raises(ValueError, match="feed-in"):
        Tariffs(retail_wei_per_kwh=1, feed_in_wei_per_kwh=2)
    with pytest.raises(ValueError):
        Tariffs(retail_wei_per_kwh=1, feed_in_wei_per_kwh=0)
    assert Tariffs(retail_wei_per_kwh=5, feed_in_wei_per_kwh=5).retail_wei_per_kwh == 5


def test_bus_settings_carry_the_tariffs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GRIDTRADE_TARIFF_RETAIL_WEI_PER_KWH", raising=False)
    monkeypatch.delenv("GRIDTRADE_TARIFF_FEED_IN_WEI_PER_KWH", raising=False)
    assert Tariffs.of(BusSettings()) == TARIFFS
    monkeypatch.setenv("GRIDTRADE_TARIFF_RETAIL_WEI_PER_KWH", "700")
    monkeypatch.setenv("GRIDTRADE_TARIFF_FEED_IN_WEI_PER_KWH", "300")
    assert Tariffs.of(BusSettings()) == Tariffs(retail_wei_per_kwh=700, feed_in_wei_per_kwh=300)
    monkeypatch.setenv("GRIDTRADE_TARIFF_FEED_IN_WEI_PER_KWH", "701")
    with pytest.raises(ValidationError, match="at most the retail tariff"):
        BusSettings()
    monkeypatch.setenv("GRIDTRADE_TARIFF_FEED_IN_WEI_PER_KWH", "0")
    with pytest.raises(ValidationError):
        BusSettings()


def test_effective_defaults_to_the_tariffs_and_keeps_within_them() -> None:
    assert s.effective(Limits(), TARIFFS) == (RETAIL, FEED_IN)
    assert s.effective(Limits(max_buy_wei_per_kwh=RETAIL * 2, min_sell_wei_per_kwh=1), TARIFFS) == (RETAIL, FEED_IN)
    inside = Limits(max_buy_wei_per_kwh=RETAIL - 5, min_sell_wei_per_kwh=FEED_IN + 5)
    assert s.effective(inside, TARIFFS) == (RETAIL - 5, FEED_IN + 5)


# ---------------------------------------------------------------- surplus and deficit


def test_surplus_is_what_the_battery_holds_above_the_reserve_within_the_position_and_free_tokens() -> None:
    lim = Limits(reserve_soc=0.2)
    view = site(soc=0.5, battery_wh=10_000.0, forecast_net_wh=1_000.0, tokens_free_wh=100_000)
    # a trade delivers at once, from the battery: the forecast's 1 kWh is sold once it is there
    assert s.surplus_wh(view, lim) == 3_000
    assert s.surplus_wh(dataclasses.replace(view, forecast_net_wh=-1_000.0), lim) == 2_000  # the load's share kept
    assert s.surplus_wh(dataclasses.replace(view, tokens_free_wh=2_500), lim) == 2_500
    assert s.surplus_wh(dataclasses.replace(view, selling_wh=2_500), lim) == 500
    assert s.surplus_wh(dataclasses.replace(view, selling_wh=9_000), lim) == 0
    # no battery known: the forecast alone
    assert s.surplus_wh(site(forecast_net_wh=1_000.0, tokens_free_wh=100_000), lim) == 1_000
    assert s.deficit_wh(view, lim) == 0


def test_the_battery_below_the_reserve_is_refilled_first() -> None:
    lim = Limits(reserve_soc=0.5)
    view = site(soc=0.3, battery_wh=10_000.0, forecast_net_wh=1_500.0, tokens_free_wh=100_000)
    assert s.surplus_wh(view, lim) == 0  # the 1.5 kWh surplus goes into the battery, which needs 2 kWh
    assert s.deficit_wh(view, lim) == 500
    assert s.deficit_wh(dataclasses.replace(view, buying_wh=200), lim) == 300
    assert s.deficit_wh(dataclasses.replace(view, buying_wh=800), lim) == 0


def test_a_forecast_deficit_is_met_from_the_battery_above_the_reserve_first() -> None:
    lim = Limits(reserve_soc=0.2)
    view = site(soc=0.3, battery_wh=10_000.0, forecast_net_wh=-1_500.0, tokens_free_wh=100_000)
    assert (s.surplus_wh(view, lim), s.deficit_wh(view, lim)) == (0, 500)
    no_battery = site(forecast_net_wh=-1_500.0)
    assert (s.surplus_wh(no_battery, lim), s.deficit_wh(no_battery, lim)) == (0, 1_500)
    unknown_soc = site(soc=None, battery_wh=10_000.0, forecast_net_wh=-1_500.0)
    assert s.deficit_wh(unknown_soc, lim) == 1_500


# ---------------------------------------------------------------- the price ramp


def test_the_ramp_starts_at_the_last_clearing_price_and_reaches_the_owners_cap_before_the_end() -> None:
    lim = Limits(max_buy_wei_per_kwh=2_000_000_000_000_000)
    o = offer(opened_at=NOW, ends_at=NOW + 100)
    last = 1_000_000_000_000_000
    assert s.RAMP_SHARE == 0.75
    assert s.willing_to_pay(lim, TARIFFS, market(o, last=last, now=NOW), o) == last
    assert s.willing_to_pay(lim, TARIFFS, market(o, last=last, now=NOW + 37.5), o) == 1_500_000_000_000_000
    # at the cap three quarters in: a bid at the cap is still placed before the auction closes
    assert s.willing_to_pay(lim, TARIFFS, market(o, last=last, now=NOW + 75), o) == 2_000_000_000_000_000
    assert s.willing_to_pay(lim, TARIFFS, market(o, last=last, now=NOW + 100), o) == 2_000_000_000_000_000
    assert s.willing_to_pay(lim, TARIFFS, market(o, last=last, now=NOW + 500), o) == 2_000_000_000_000_000
    assert s.willing_to_pay(lim, TARIFFS, market(o, last=last, now=NOW - 500), o) == last


def test_the_ramp_starts_at_the_feed_in_tariff_when_nothing_cleared_and_ends_at_retail_by_default() -> None:
    o = offer(opened_at=NOW, ends_at=NOW + 60)
    assert s.willing_to_pay(Limits(), TARIFFS, market(o, now=NOW), o) == FEED_IN
    assert s.willing_to_pay(Limits(), TARIFFS, market(o, now=NOW + 60), o) == RETAIL


def test_the_ramp_ends_exactly_at_the_cap_with_prices_beyond_float_precision() -> None:
    tar = Tariffs(retail_wei_per_kwh=2**60 + 3, feed_in_wei_per_kwh=2)
    o = offer(opened_at=NOW, ends_at=NOW + 60)
    assert s.willing_to_pay(Limits(), tar, market(o, now=NOW + 60), o) == 2**60 + 3
    assert s.willing_to_pay(Limits(), tar, market(o, now=NOW + 59.999), o) <= 2**60 + 3


def test_the_ramp_never_passes_the_cap_even_after_a_dear_clearing() -> None:
    lim = Limits(max_buy_wei_per_kwh=FEED_IN + 10)
    o = offer(opened_at=NOW, ends_at=NOW + 60)
    for now in (NOW, NOW + 30, NOW + 60):
        assert s.willing_to_pay(lim, TARIFFS, market(o, last=RETAIL * 5, now=now), o) == FEED_IN + 10


# ---------------------------------------------------------------- english decisions


def test_disabled_does_nothing() -> None:
    view = site(forecast_net_wh=-5_000.0, tokens_free_wh=0)
    mk = market(offer(start=1))
    assert s.decide_english(ME, Limits(), TARIFFS, view, mk) != []
    assert s.decide_english(ME, Limits(enabled=False), TARIFFS, view, mk) == []
    rich = site(forecast_net_wh=5_000.0, tokens_free_wh=10_000)
    assert s.decide_english(ME, Limits(enabled=False), TARIFFS, rich, market()) == []
    assert s.decide_double(ME, Limits(enabled=False), TARIFFS, rich, market()) == []
    assert s.decide_double(ME, Limits(enabled=False), TARIFFS, view, market(), slot=(NOW, NOW + 15)) == []


def test_offers_the_surplus_from_the_owners_floor_in_one_lot() -> None:
    view = site(forecast_net_wh=5_000.0, tokens_free_wh=10_000)
    for last in (None, FEED_IN, 2_000_000_000_000_000, RETAIL * 2):  # the buyers bid it up, whatever cleared last
        assert s.decide_english(ME, Limits(), TARIFFS, view, market(last=last)) == [
            PlaceOffer(wh=2_000, start_price_wei_per_kwh=FEED_IN)]
    lim = Limits(min_sell_wei_per_kwh=FEED_IN * 2)
    assert s.decide_english(ME, lim, TARIFFS, view, market(last=FEED_IN))[0].start_price_wei_per_kwh == FEED_IN * 2
    # a floor below the feed-in tariff is lifted to it
    low = Limits(min_sell_wei_per_kwh=1)
    assert s.decide_english(ME, low, TARIFFS, view, market())[0].start_price_wei_per_kwh == FEED_IN


def test_no_second_offer_and_no_offer_under_a_lot() -> None:
    view = site(forecast_net_wh=5_000.0, tokens_free_wh=10_000)
    mine = offer(seller=ME.upper().replace("0X", "0x"))
    assert s.decide_english(ME, Limits(), TARIFFS, view, market(mine)) == []
    small = site(forecast_net_wh=99.0, tokens_free_wh=10_000)
    assert s.decide_english(ME, Limits(), TARIFFS, small, market()) == []
    assert s.decide_english(ME, Limits(), TARIFFS, dataclasses.replace(small, forecast_net_wh=100.0), market()) == [
        PlaceOffer(wh=100, start_price_wei_per_kwh=FEED_IN)]


def test_no_bid_on_own_or_led_offers() -> None:
    view = site(forecast_net_wh=-5_000.0)
    own = offer("own", seller=ME.upper().replace("0X", "0x"), start=FEED_IN)
    led = offer("led", start=FEED_IN, highest=FEED_IN, bidder=ME.upper().replace("0X", "0x"))
    mk = market(own, led)
    assert s.decide_english(ME, Limits(), TARIFFS, view, mk) == []
    outbid = offer("outbid", start=FEED_IN, highest=FEED_IN, bidder=OTHER)
    assert s.decide_english(ME, Limits(), TARIFFS, view, market(own, led, outbid, inc=7)) == [
        PlaceBid(offer_id="outbid", price_wei_per_kwh=FEED_IN + 7)]


def test_bids_cheapest_first_within_the_deficit_and_the_largest_trade() -> None:
    view = site(forecast_net_wh=-1_000.0)
    cheap = offer("cheap", wh=600, start=FEED_IN)
    dearer = offer("dearer", wh=400, start=FEED_IN + 100)
    too_big = offer("big", wh=3_000, start=1)
    overflow = offer("overflow", wh=500, start=FEED_IN + 50)  # fits the deficit alone, not after "cheap"
    acts = s.decide_english(ME, Limits(), TARIFFS, view, market(dearer, too_big, overflow, cheap))
    assert acts == [PlaceBid("cheap", FEED_IN), PlaceBid("dearer", FEED_IN + 100)]


def test_bids_only_up_to_what_the_ramp_allows() -> None:
    view = site(forecast_net_wh=-1_000.0)
    o = offer(wh=500, start=2_000_000_000_000_000, opened_at=NOW, ends_at=NOW + 100)
    lim = Limits()  # ramp from the feed-in tariff (0.5e15) to retail (3e15) over 100 s
    assert s.decide_english(ME, lim, TARIFFS, view, market(o, now=NOW + 10)) == []
    assert s.decide_english(ME, lim, TARIFFS, view, market(o, now=NOW + 60)) == [
        PlaceBid("o1", 2_000_000_000_000_000)]
    assert s.decide_english(ME, lim, TARIFFS, view, market(o, now=NOW + 100)) == []  # the auction ended


def test_double_orders() -> None:
    sell = site(forecast_net_wh=5_000.0, tokens_free_wh=10_000)
    floor = FEED_IN * 2
    assert s.decide_double(ME, Limits(min_sell_wei_per_kwh=floor), TARIFFS, sell, market()) == [
        PlaceOrder(side="sell", wh=2_000, limit_price_wei_per_kwh=floor)]
    buy = site(forecast_net_wh=-700.0)
    slot = s.call_slot(NOW + 5, 15.0)
    assert slot == (NOW, NOW + 15)
    assert s.decide_double(ME, Limits(), TARIFFS, buy, market(now=NOW + 15), slot=slot) == [
        PlaceOrder(side="buy", wh=700, limit_price_wei_per_kwh=RETAIL)]
    assert s.decide_double(ME, Limits(), TARIFFS, buy, market(now=NOW), slot=slot) == [
        PlaceOrder(side="buy", wh=700, limit_price_wei_per_kwh=FEED_IN)]
    assert s.decide_double(ME, Limits(), TARIFFS, buy, market(now=NOW + 15)) == [
        PlaceOrder(side="buy", wh=700, limit_price_wei_per_kwh=FEED_IN)]
    assert s.decide_double(ME, Limits(), TARIFFS, site(forecast_net_wh=-50.0), market()) == []
    assert s.decide_double(ME, Limits(), TARIFFS, site(), market()) == []


# ---------------------------------------------------------------- properties

ACCOUNTS = st.sampled_from([ME, ME.upper().replace("0X", "0x"), OTHER, THIRD])
PRICES = st.integers(min_value=1, max_value=10**19)


@st.composite
def tariffs(draw: st.DrawFn) -> Tariffs:
    feed_in = draw(st.integers(min_value=1, max_value=10**18))
    retail = draw(st.integers(min_value=feed_in, max_value=feed_in * 20))
    return Tariffs(retail_wei_per_kwh=retail, feed_in_wei_per_kwh=feed_in)


@st.composite
def limits(draw: st.DrawFn) -> Limits:
    return Limits(reserve_soc=draw(st.floats(min_value=0, max_value=1)),
                  max_buy_wei_per_kwh=draw(st.none() | PRICES), min_sell_wei_per_kwh=draw(st.none() | PRICES),
                  max_trade_wh=draw(st.integers(min_value=1, max_value=5_000)))


WH = st.integers(min_value=0, max_value=20_000)


@st.composite
def sites(draw: st.DrawFn) -> SiteView:
    battery = draw(st.booleans())
    return SiteView(soc=draw(st.floats(min_value=0, max_value=1)) if battery else draw(st.none() | st.just(0.5)),
                    battery_wh=draw(st.floats(min_value=0, max_value=20_000)) if battery else 0.0,
                    forecast_net_wh=draw(st.floats(min_value=-20_000, max_value=20_000)),
                    tokens_free_wh=draw(WH), selling_wh=draw(WH), buying_wh=draw(WH))


def _offer_seen(k: int, seller: str, wh: int, start: int, highest: int | None, bidder: str, opened: float,
                span: float) -> OfferSeen:
    return OfferSeen(offer_id=f"o{k}", seller=seller, wh=wh, start_price_wei_per_kwh=start,
                     highest_bid_wei_per_kwh=highest, highest_bidder=None if highest is None else bidder,
                     opened_at=opened, ends_at=opened + span)


OFFERS = st.lists(st.tuples(ACCOUNTS, st.integers(1, 6_000), PRICES, st.none() | PRICES, ACCOUNTS,
                            st.floats(NOW - 2_000, NOW + 500), st.floats(0, 3_000)), max_size=6)


@st.composite
def markets(draw: st.DrawFn) -> MarketView:
    offers = tuple(_offer_seen(k, *t) for k, t in enumerate(draw(OFFERS)))
    return MarketView(now=draw(st.floats(NOW - 1_000, NOW + 1_000)), offers=offers,
                      last_clearing_wei_per_kwh=draw(st.none() | PRICES),
                      min_increment_wei_per_kwh=draw(st.integers(0, 10**15)))


SLOTS = st.none() | st.tuples(st.floats(NOW - 100, NOW + 100), st.floats(0, 60)).map(lambda t: (t[0], t[0] + t[1]))


class Scenario(NamedTuple):
    lim: Limits
    tar: Tariffs
    view: SiteView
    mk: MarketView
    slot: tuple[float, float] | None

    def english(self, lim: Limits | None = None) -> list[s.Action]:
        return s.decide_english(ME, lim or self.lim, self.tar, self.view, self.mk)

    def double(self, lim: Limits | None = None) -> list[s.Action]:
        return s.decide_double(ME, lim or self.lim, self.tar, self.view, self.mk, slot=self.slot)


SCENARIOS = st.builds(Scenario, limits(), tariffs(), sites(), markets(), SLOTS)


# Each invariant of the spec is one check; one property test runs them all on the same
# generated scenarios (generating a market is what takes the time).


def check_prices_within_the_effective_limits(sc: Scenario) -> None:
    """Every bid and buy limit <= the buy cap <= retail; every offer start and sell limit
    >= the sell floor >= feed-in."""
    cap, floor = s.effective(sc.lim, sc.tar)
    for a in sc.english() + sc.double():
        if isinstance(a, PlaceBid):
            assert a.price_wei_per_kwh <= cap <= sc.tar.retail_wei_per_kwh
        elif isinstance(a, PlaceOffer):
            assert a.start_price_wei_per_kwh >= floor >= sc.tar.feed_in_wei_per_kwh
        elif a.side == "buy":
            assert a.limit_price_wei_per_kwh <= cap <= sc.tar.retail_wei_per_kwh
        else:
            assert a.limit_price_wei_per_kwh >= floor >= sc.tar.feed_in_wei_per_kwh


def check_quantities(sc: Scenario) -> None:
    """Every action's wh <= max_trade_wh; the bids' wh <= deficit_wh; an offer's wh <=
    surplus_wh; at most one offer and one double-auction order."""
    english, double = sc.english(), sc.double()
    by_id = {o.offer_id: o for o in sc.mk.offers}
    bids = [a for a in english if isinstance(a, PlaceBid)]
    placed = [a for a in english if isinstance(a, PlaceOffer)]
    assert len(placed) <= 1 and len(double) <= 1
    assert len({b.offer_id for b in bids}) == len(bids)
    assert sum(by_id[b.offer_id].wh for b in bids) <= s.deficit_wh(sc.view, sc.lim)
    for o in placed:
        assert 0 < o.wh <= min(s.surplus_wh(sc.view, sc.lim), sc.lim.max_trade_wh)
    for b in bids:
        assert by_id[b.offer_id].wh <= sc.lim.max_trade_wh
    for d in double:
        assert isinstance(d, PlaceOrder) and min(s.MIN_LOT_WH, sc.lim.max_trade_wh) <= d.wh <= sc.lim.max_trade_wh
        assert d.wh <= (s.surplus_wh(sc.view, sc.lim) if d.side == "sell" else s.deficit_wh(sc.view, sc.lim))


def check_surplus_and_deficit(sc: Scenario) -> None:
    surplus, deficit = s.surplus_wh(sc.view, sc.lim), s.deficit_wh(sc.view, sc.lim)
    assert surplus >= 0 and deficit >= 0 and (surplus == 0 or deficit == 0)
    assert surplus <= sc.view.tokens_free_wh


def check_the_battery_reserve_is_never_planned_away(sc: Scenario) -> None:
    """What is being sold, with a new offer or sell order, stays within the forecast
    surplus (if positive) plus the battery above the reserve."""
    view, spare = sc.view, 0.0
    if view.soc is not None and view.battery_wh > 0:
        spare = (view.soc - sc.lim.reserve_soc) * view.battery_wh
    bound = max(view.forecast_net_wh, 0.0) + spare
    for a in sc.english() + sc.double():
        if isinstance(a, PlaceOffer) or (isinstance(a, PlaceOrder) and a.side == "sell"):
            assert a.wh + view.selling_wh <= bound + 1e-6
            assert a.wh <= view.tokens_free_wh


def check_bids_target_others_unled_open_offers(sc: Scenario) -> None:
    """Never a bid on its own offer nor on one it leads; no offer while it has one open;
    a bid is the least the auction accepts, within the ramp."""
    by_id, mk = {o.offer_id: o for o in sc.mk.offers}, sc.mk
    for a in sc.english():
        if isinstance(a, PlaceOffer):
            assert not any(o.seller.lower() == ME.lower() for o in mk.offers)
            continue
        assert isinstance(a, PlaceBid)
        o = by_id[a.offer_id]
        assert o.seller.lower() != ME.lower()
        assert o.highest_bidder is None or o.highest_bidder.lower() != ME.lower()
        assert mk.now < o.ends_at
        assert a.price_wei_per_kwh == (o.start_price_wei_per_kwh if o.highest_bid_wei_per_kwh is None
                                       else o.highest_bid_wei_per_kwh + mk.min_increment_wei_per_kwh)
        assert a.price_wei_per_kwh <= s.willing_to_pay(sc.lim, sc.tar, mk, o)


def check_disabled_does_nothing(sc: Scenario) -> None:
    off = sc.lim.model_copy(update={"enabled": False})
    assert sc.english(off) == [] and sc.double(off) == []


def check_deterministic(sc: Scenario) -> None:
    assert sc.english() == sc.english() and sc.double() == sc.double()


INVARIANTS = [check_prices_within_the_effective_limits, check_quantities, check_surplus_and_deficit,
              check_the_battery_reserve_is_never_planned_away, check_bids_target_others_unled_open_offers,
              check_disabled_does_nothing, check_deterministic]


@PROPS
@given(SCENARIOS)
def test_prop_decision_invariants(sc: Scenario) -> None:
    for check in INVARIANTS:
        check(sc)


@PROPS
@given(limits(), tariffs())
def test_prop_effective_prices_within_the_tariffs(lim: Limits, tar: Tariffs) -> None:
    cap, floor = s.effective(lim, tar)
    assert cap <= tar.retail_wei_per_kwh and floor >= tar.feed_in_wei_per_kwh
    if lim.max_buy_wei_per_kwh is not None and lim.max_buy_wei_per_kwh <= tar.retail_wei_per_kwh:
        assert cap == lim.max_buy_wei_per_kwh
    if lim.min_sell_wei_per_kwh is not None and lim.min_sell_wei_per_kwh >= tar.feed_in_wei_per_kwh:
        assert floor == lim.min_sell_wei_per_kwh


@PROPS
@given(st.data(), tariffs(), sites(), markets(), SLOTS)
def test_prop_prices_never_outside_the_tariffs_when_the_owners_limits_are_beyond_them(
        data: st.DataObject, tar: Tariffs, view: SiteView, mk: MarketView, slot: tuple[float, float] | None) -> None:
    lim = Limits(max_buy_wei_per_kwh=data.draw(st.none() | st.integers(tar.retail_wei_per_kwh, 10**21)),
                 min_sell_wei_per_kwh=data.draw(st.none() | st.integers(1, tar.feed_in_wei_per_kwh)))
    sc = Scenario(lim, tar, view, mk, slot)
    band = range(tar.feed_in_wei_per_kwh, tar.retail_wei_per_kwh + 1)
    for a in sc.english() + sc.double():
        if isinstance(a, PlaceBid):
            assert a.price_wei_per_kwh <= tar.retail_wei_per_kwh  # a bid is the least the auction accepts
        elif isinstance(a, PlaceOffer):
            assert a.start_price_wei_per_kwh in band
        else:
            assert a.limit_price_wei_per_kwh in band
    for o in mk.offers:
        assert s.willing_to_pay(lim, tar, mk, o) in band


@PROPS
@given(limits(), tariffs(), st.none() | PRICES, st.floats(0, 3_000), st.floats(0, 3_000), st.floats(0, 3_000))
def test_prop_the_ramp_rises_from_its_start_to_the_cap(lim: Limits, tar: Tariffs, last: int | None, span: float,
                                                       a: float, b: float) -> None:
    cap, _ = s.effective(lim, tar)
    o = offer(opened_at=NOW, ends_at=NOW + span)

    def at(t: float) -> int:
        return s.willing_to_pay(lim, tar, market(o, last=last, now=t), o)

    opening = tar.feed_in_wei_per_kwh if last is None else last
    start = min(max(opening, tar.feed_in_wei_per_kwh), tar.retail_wei_per_kwh, cap)
    if o.ends_at > o.opened_at:
        assert at(NOW) == start
    assert at(NOW + span) == cap
    lo, hi = sorted((a, b))
    assert start <= at(NOW + lo) <= at(NOW + hi) <= cap


# ---------------------------------------------------------------- the utility, counterparty of last resort


def test_the_utility_buys_at_feed_in_what_nobody_pays_more_for_and_sells_at_retail() -> None:
    view = site(tokens_free_wh=10_000)
    cheap = offer("cheap", start=FEED_IN)                                   # no bid yet: the utility stands behind it
    dear = offer("dear", start=FEED_IN + 1)                                 # asks more than the grid pays
    outbid = offer("outbid", start=FEED_IN, highest=FEED_IN + 5, bidder=OTHER)  # a site pays more
    mine = offer("mine", seller=ME, start=RETAIL)
    got = s.decide_utility(ME, Limits(max_trade_wh=3_000), TARIFFS, view, market(cheap, dear, outbid))
    assert got == [PlaceOffer(wh=3_000, start_price_wei_per_kwh=RETAIL),
                   PlaceBid(offer_id="cheap", price_wei_per_kwh=FEED_IN)]
    # its standing offer is open: no second one; disabled: nothing
    assert s.decide_utility(ME, Limits(), TARIFFS, view, market(cheap, mine)) == [
        PlaceBid(offer_id="cheap", price_wei_per_kwh=FEED_IN)]
    assert s.decide_utility(ME, Limits(enabled=False), TARIFFS, view, market(cheap)) == []


@PROPS
@given(SCENARIOS)
def test_prop_the_utility_pays_feed_in_and_sells_at_retail(sc: Scenario) -> None:
    acts = s.decide_utility(ME, sc.lim, sc.tar, sc.view, sc.mk)
    by_id = {o.offer_id: o for o in sc.mk.offers}
    assert len([a for a in acts if isinstance(a, PlaceOffer)]) <= 1
    for a in acts:
        if isinstance(a, PlaceOffer):
            assert a.start_price_wei_per_kwh == sc.tar.retail_wei_per_kwh
            assert MIN_LOT_WH <= a.wh <= min(sc.lim.max_trade_wh, sc.view.tokens_free_wh)
        else:
            assert isinstance(a, PlaceBid) and a.price_wei_per_kwh == sc.tar.feed_in_wei_per_kwh
            o = by_id[a.offer_id]
            assert o.seller.lower() != ME.lower() and (o.highest_bidder or "").lower() != ME.lower()
            assert o.wh <= sc.lim.max_trade_wh and sc.mk.now < o.ends_at
            needed = o.start_price_wei_per_kwh if o.highest_bid_wei_per_kwh is None else \
                o.highest_bid_wei_per_kwh + sc.mk.min_increment_wei_per_kwh
            assert needed <= sc.tar.feed_in_wei_per_kwh  # the auction takes it
    if not sc.lim.enabled:
        assert acts == []


def test_the_utility_quotes_the_spread_in_each_double_auction_call_once_per_side() -> None:
    view = site(tokens_free_wh=10_000)
    lim = Limits(max_trade_wh=1_500)
    both = s.decide_utility_double(ME, lim, TARIFFS, view)
    assert both == [PlaceOrder(side="sell", wh=1_500, limit_price_wei_per_kwh=RETAIL),
                    PlaceOrder(side="buy", wh=1_500, limit_price_wei_per_kwh=FEED_IN)]
    assert s.decide_utility_double(ME, lim, TARIFFS, view, open_sides=frozenset({"sell"})) == both[1:]
    assert s.decide_utility_double(ME, lim, TARIFFS, view, open_sides=frozenset({"sell", "buy"})) == []
    # no tokens to sell: it only buys; off: nothing
    assert s.decide_utility_double(ME, lim, TARIFFS, site(tokens_free_wh=50)) == both[1:]
    assert s.decide_utility_double(ME, Limits(enabled=False), TARIFFS, view) == []
