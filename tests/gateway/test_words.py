"""What a person reads: amounts rounded in Ether and kWh, and the services' refusals
reworded to speak to "you" in those units, with the fix the page offers (pure)."""

from __future__ import annotations

from decimal import Context, Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.gateway import words as w

NOW = 1_800_000_000.0
ETH = 10**18


@pytest.mark.parametrize(("wei", "shown"), [
    (0, "0"), (ETH, "1"), (15 * 10**17, "1.5"), (1_234_567_89 * 10**10, "1.234568"),  # rounded, not cut
    (999_999_5 * 10**11, "1"), (999_999_4 * 10**11, "0.999999"), (1, "less than 0.000001"),
    (5 * 10**11, "0.000001"), (4 * 10**11, "less than 0.000001"), (123 * ETH, "123")])
def test_ether_is_rounded_half_up_and_never_shows_a_false_zero(wei: int, shown: str) -> None:
    assert w.ether(wei) == shown


@given(st.integers(min_value=0, max_value=2**256 - 1))
def test_exact_ether_keeps_every_wei(wei: int) -> None:
    assert Decimal(w.ether_exact(wei)).scaleb(18, Context(prec=120)) == wei
    w.ether(wei)  # any amount can be shown


@given(st.integers(min_value=0, max_value=10**15))
def test_rounding_is_within_half_a_unit(wei: int) -> None:
    shown = w.ether(wei)
    if not shown.startswith("less"):
        assert abs(Decimal(shown) - Decimal(wei) / ETH) <= Decimal("0.0000005")


def test_kwh_and_durations() -> None:
    assert (w.kwh(1500), w.kwh(1000), w.kwh(1), w.kwh(0)) == ("1.5", "1", "0.001", "0")
    assert (w.duration(42), w.duration(150), w.duration(7300)) == ("42 s", "2 min 30 s", "2 h 1 min")
    assert w.until(NOW + 90, NOW) == "for 1 min 30 s more" and w.until(NOW - 1, NOW) == "already over"


def test_unfunded_bid_says_what_you_have_and_offers_the_deposit() -> None:
    said = w.for_person("unfunded", "the bid needs 2000000000000000 wei of free escrow; the buyer has 0",
                        route="bid", now=NOW)
    assert said.message == ("Your free escrow does not cover this bid: it needs 0.002 Ether, you have 0 Ether free. "
                            "Deposit 0.002 Ether more and bid again. Nothing was done.")
    assert said.fix == {"action": "deposit", "amount_wei": "2000000000000000"}
    held = w.for_person("unfunded", "the bid needs 3000000000000000 wei of free escrow; the buyer has 1000000000000000 "
                        "(5000000000000000 wei already held by other bids and trades)", route="bid", now=NOW)
    assert "you have 0.001 Ether free (0.005 Ether of it is held by your other bids and trades)" in held.message
    assert held.fix["amount_wei"] == "2000000000000000"


def test_v2_refusals_of_reserved_escrow() -> None:
    said = w.for_person("unfunded", "the bid needs 1500000000000000 wei of escrow reserved until 1800000120, on top "
                        "of 500000000000000 wei held by the buyer's other bids, orders and trades; the buyer has 0 wei "
                        "reserved: reserve 2000000000000000 wei in all until 1800000120 (nothing was done)",
                        route="bid", now=NOW)
    assert "0.0015 Ether of your escrow reserved for 2 min more on top of the 0.0005 Ether" in said.message
    assert said.fix == {"action": "deposit", "amount_wei": "2000000000000000"}
    said = w.for_person("insufficient_escrow", "nothing was sent: reserving 2000000000000000 wei until 1800000060 "
                        "needs 2000000000000000 wei more than the 0 wei reserved now, and the free escrow holds "
                        "500000000000000 wei; deposit at least 1500000000000000 wei more", route="bid", now=NOW)
    assert said.message == ("Your escrow does not cover this: it needs 0.002 Ether reserved for 1 min more; you have "
                            "0 Ether reserved and 0.0005 Ether free. Deposit 0.0015 Ether more and try again. "
                            "Nothing was sent.")
    assert said.fix == {"action": "deposit", "amount_wei": "1500000000000000"}
    said = w.for_person("insufficient_escrow", "nothing was sent: 3000000000000000000 wei exceeds the escrow that can be "
                        "withdrawn now, 1000000000000000000 wei (free 1000000000000000000 wei; 2000000000000000000 wei "
                        "reserved for bids until 1800000030, 30 s from now)", route="escrow_withdraw", now=NOW)
    assert said.message.startswith("You can withdraw at most 1 Ether of escrow now (2 Ether more is reserved for your "
                                   "bids for 30 s more")
    assert said.fix == {"action": "withdraw", "amount_wei": str(ETH)}


def test_withdrawals_tokens_and_bids() -> None:
    said = w.for_person("insufficient_escrow", "nothing was sent: 1000000000000000000000000000000 wei exceeds the free "
                        "escrow of 1000000000000000000 wei", route="escrow_withdraw", now=NOW)
    assert said.message.startswith("You can withdraw at most 1 Ether: that is your free escrow")
    assert said.fix == {"action": "withdraw", "amount_wei": str(ETH)}
    assert w.for_person("insufficient_credit", "nothing was sent: 5 wei exceeds the credit of 0 wei (withdraw_credit "
                        "takes all of it)", route="withdraw_credit").message == \
        "You have no earnings to withdraw yet. Nothing was sent."
    said = w.for_person("no_tokens", "the seller has 1200 Wh of free tokens, the offer needs 1500 Wh (800 Wh already "
                        "held by open offers and trades)", route="sell")
    assert said.message == ("You have 1.2 kWh of Energy Tokens free to sell (0.8 kWh are held by your open offers "
                            "and trades); this offer needs 1.5 kWh. Nothing was done.")
    said = w.for_person("too_low", "the highest bid is 2000000000000000 wei/kWh; bid at least 2000000000000001 "
                        "wei/kWh", route="bid")
    assert said.message == ("The highest bid is 0.002 Ether/kWh: bid at least 0.002000000 Ether/kWh. Nothing was done."
                            .replace("0.002000000", "0.002"))
    assert said.fix == {"action": "bid", "price_wei_per_kwh": "2000000000000001"}
    said = w.for_person("too_low", "the start bid is 1000000000000000 wei/kWh", route="bid")
    assert "below the start bid of 0.001 Ether/kWh" in said.message and said.fix["price_wei_per_kwh"] == str(10**15)
    assert w.for_person("own_offer", "a seller cannot bid on their own offer", route="bid").message == \
        "This is your own offer: you cannot bid on it."
    assert w.for_person("has_bids", "an offer with bids cannot be cancelled", route="cancel_offer").message == \
        "This offer has bids now: it can no longer be cancelled."
    assert w.for_person("closed", "offer o-1 is past its deadline", route="bid").message == \
        "This offer has ended. Nothing was done."
    assert w.for_person("closed", "offer o-1 is already sold", route="cancel_offer").message == \
        "This offer has ended (sold). Nothing was done."
    assert w.for_person("closed", "trade t-1 is already settled", route="close_trade").message == \
        "This trade has already ended (settled). Nothing was done."


def test_anything_else_gets_units_and_you() -> None:
    said = w.for_person("whatever", "the buyer has 2500 Wh and 7000000000000000 wei; the price is 3000000000000000 "
                        "wei/kWh", route="bid")
    assert said.message == "You have 2.5 kWh and 0.007 Ether; the price is 0.003 Ether/kWh."
    assert not said.fix
    said = w.for_person("rejected", "nothing was sent: execution reverted: EnergyMarket: paused", route="transfer")
    assert said.message == "The chain refused this: execution reverted: EnergyMarket: paused. Nothing was sent."

    class Body:
        amount_wei = 125 * 10**16
    said = w.for_person("insufficient_funds", "nothing was sent: insufficient funds for gas * price + value",
                        route="transfer", body=Body())
    assert said.message == ("Your account does not hold enough Ether for sending 1.25 Ether and its network fee. "
                            "Nothing was sent.")
    assert w.for_person("invalid", "amount_wei: amount_wei must be more than 0", route="transfer").message == \
        "The amount: the amount must be more than 0."
    for code, msg in [("unfunded", "the bid needs 5 wei of free escrow; the buyer has 1"),
                      ("too_low", "the start bid is 5 wei/kWh"), ("no_tokens", "the seller has 0 Wh of free tokens, "
                                                                              "the offer needs 5 Wh")]:
        text = w.for_person(code, msg, route="bid").message
        assert " wei" not in text and " Wh " not in text and "the buyer" not in text and "the seller" not in text
