"""What a person reads: amounts in Ether and kWh, and the services' refusals reworded to
speak to "you" in those units, with the fix where one exists (pure: no I/O).

The auction and the chain services refuse in their own terms (wei, Wh, "the buyer", Unix
times). :func:`for_person` turns such a refusal, given the route it answered and the
session's account, into a sentence for the person at this wallet, and adds a ``fix``
the page can offer as a button (e.g. deposit the missing escrow, bid the minimum). A
refusal it does not recognise still gets its numbers converted and its parties named.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Context, Decimal
from typing import Any

WEI_PER_ETHER = 10**18
ETHER_DIGITS = 6  # decimals shown for an amount of Ether
PRICE_DIGITS = 9  # decimals shown for a price in Ether per kWh


def ether_exact(wei: int) -> str:
    """Every digit: ``1500000000000000`` -> ``"0.0015"`` (never a float on the way)."""
    sign = "-" if wei < 0 else ""
    whole, frac = divmod(abs(wei), WEI_PER_ETHER)
    text = f"{whole}.{frac:018d}".rstrip("0").rstrip(".")
    return sign + text


def ether(wei: int, digits: int = ETHER_DIGITS) -> str:
    """Rounded half up to ``digits`` decimals, trailing zeros dropped; an amount that is not
    zero but rounds to zero says so (``"less than 0.000001"``) instead of showing 0."""
    ctx = Context(prec=120)  # 2**256 wei has 78 digits: no precision is ever lost
    q = Decimal(wei).scaleb(-18, ctx).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP, context=ctx)
    if q == 0 and wei != 0:
        return ("more than -" if wei < 0 else "less than ") + "0." + "0" * (digits - 1) + "1"
    text = format(q, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def kwh(wh: int) -> str:
    """``1500`` -> ``"1.5"`` (1 Wh is the smallest unit: exact)."""
    sign = "-" if wh < 0 else ""
    whole, frac = divmod(abs(wh), 1000)
    return sign + f"{whole}.{frac:03d}".rstrip("0").rstrip(".")


def ether_amount(wei: int) -> str:
    return f"{ether(wei)} Ether"


def price(wei_per_kwh: int) -> str:
    return f"{ether(wei_per_kwh, PRICE_DIGITS)} Ether/kWh"


def energy(wh: int) -> str:
    return f"{kwh(wh)} kWh"


def duration(seconds: float) -> str:
    """``42`` -> ``"42 s"``, ``150`` -> ``"2 min 30 s"``, ``7300`` -> ``"2 h 2 min"``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        m, r = divmod(s, 60)
        return f"{m} min" + (f" {r} s" if r else "")
    h, r = divmod(s, 3600)
    return f"{h} h" + (f" {r // 60} min" if r // 60 else "")


def until(ts: int | float, now: float) -> str:
    """A deadline in Unix seconds, as a person reads it: ``"for 2 min 30 s more"``."""
    left = ts - now
    return "already over" if left <= 0 else f"for {duration(left)} more"


# --- refusals ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Said:
    """A refusal as the person reads it: the message, and what would fix it (if anything)."""

    message: str
    fix: dict[str, str] = field(default_factory=dict)


_N = r"(\d+)"
_PARTY = re.compile(r"\b(the buyer|the seller)\b")
_WEI_PER_KWH = re.compile(_N + r" wei/kWh")
_WEI = re.compile(_N + r" wei\b")
_WH = re.compile(_N + r" Wh\b")
_UNTIL = re.compile(r"\buntil (\d{9,11})\b")
_SENT_PREFIX = re.compile(r"^nothing was (sent|signed|done): ", re.I)

FIELDS = {"amount_wei": "the amount", "to": "the recipient", "price_wei_per_kwh": "the price",
          "start_price_wei_per_kwh": "the start bid", "kwh": "the energy", "wh": "the energy",
          "duration_s": "the duration", "passphrase": "the passphrase", "address": "the account",
          "action": "the action"}

SELLER_ROUTES = {"sell", "cancel_offer", "place_order_sell"}
BUYER_ROUTES = {"bid", "close_trade", "place_order_buy"}


def _sentence(text: str) -> str:
    text = text.strip()
    if not text:
        return text
    text = text[0].upper() + text[1:]
    return text if text.endswith((".", "!", "?", ")")) else text + "."


def convert_units(text: str, now: float) -> str:
    """Wei, Wh and Unix times in a service's message, in the person's units."""
    text = _WEI_PER_KWH.sub(lambda mo: price(int(mo.group(1))), text)
    text = _WEI.sub(lambda mo: ether_amount(int(mo.group(1))), text)
    text = _WH.sub(lambda mo: energy(int(mo.group(1))), text)
    return _UNTIL.sub(lambda mo: until(int(mo.group(1)), now), text)


def generic(message: str, *, me_is: str | None, now: float) -> str:
    """Any message: units converted, "nothing was sent" said last, the party that is the
    person named "you"."""
    text = message.strip()
    nothing = ""
    if m := _SENT_PREFIX.match(text):
        nothing = f" Nothing was {m.group(1).lower()}."
        text = text[m.end():]
    text = text.replace("(nothing was done)", "").replace("; nothing was done", "").strip()
    if text.endswith((":", ";", ",")):
        text = text[:-1]
    text = convert_units(text, now)
    if me_is:
        text = re.sub(rf"\b{me_is} has\b", "you have", text)
        text = re.sub(rf"\b{me_is}'s\b", "your", text)
        text = re.sub(rf"\b{me_is}\b", "you", text)
    return _sentence(text) + nothing


def _nums(pattern: str, text: str) -> list[int] | None:
    m = re.search(pattern, text)
    return [int(g) for g in m.groups() if g is not None] if m else None


def for_person(code: str, message: str, *, route: str = "", body: Any = None, now: float = 0.0) -> Said:
    """The refusal ``code``/``message`` a service gave to ``route``, for the person whose
    session made the request."""
    if route == "place_order" and getattr(body, "side", None) in ("sell", "buy"):
        route = f"place_order_{body.side}"
    me_is = "the seller" if route in SELLER_ROUTES else "the buyer" if route in BUYER_ROUTES else None
    m = message

    if code == "unfunded":
        # v1: "the bid needs N wei of free escrow; the buyer has M (K wei already held by ...)"
        if got := _nums(r"needs (\d+) wei of free escrow; the buyer has (\d+)(?: \((\d+) wei already held)?", m):
            need, has, held = got[0], got[1], (got[2] if len(got) > 2 else 0)
            missing = need - has
            extra = f" ({ether_amount(held)} of it is held by your other bids and trades)" if held else ""
            return Said(f"Your free escrow does not cover this bid: it needs {ether_amount(need)}, you have "
                        f"{ether_amount(has)} free{extra}. Deposit {ether_amount(missing)} more and bid again. "
                        "Nothing was done.", {"action": "deposit", "amount_wei": str(missing)})
        # v2: "... needs N wei of escrow reserved until T[, on top of H wei held ...]; the buyer has ...:
        #      reserve TOTAL wei in all until T (nothing was done)"
        if got := _nums(r"needs (\d+) wei of escrow reserved until (\d+).*reserve (\d+) wei in all", m):
            need, t, total = got
            held = _nums(r"on top of (\d+) wei held", m)
            extra = f" on top of the {ether_amount(held[0])} your other bids and trades hold" if held else ""
            return Said(f"This bid needs {ether_amount(need)} of your escrow reserved {until(t, now)}{extra}: "
                        f"{ether_amount(total)} in all. Deposit escrow and bid again: your wallet reserves it "
                        "with the bid. Nothing was done.", {"action": "deposit", "amount_wei": str(total)})
    if code == "insufficient_escrow":
        # the wallet's Reserve: "... needs M wei more than the R wei reserved now, and the free escrow
        # holds F wei; deposit at least D wei more"
        if got := _nums(r"reserving (\d+) wei until (\d+) needs (\d+) wei more than the (\d+) wei reserved now, "
                        r"and the free escrow holds (\d+) wei; deposit at least (\d+) wei", m):
            total, t, _missing, reserved, free, deposit = got
            return Said(f"Your escrow does not cover this: it needs {ether_amount(total)} reserved "
                        f"{until(t, now)}; you have {ether_amount(reserved)} reserved and {ether_amount(free)} free. "
                        f"Deposit {ether_amount(deposit)} more and try again. Nothing was sent.",
                        {"action": "deposit", "amount_wei": str(deposit)})
        # withdraw, v2: "N wei exceeds the escrow that can be withdrawn now, W wei (free F wei; R wei reserved
        # for bids until T, S s from now)"
        if got := _nums(r"(\d+) wei exceeds the escrow that can be withdrawn now, (\d+) wei", m):
            asked, can = got
            why = ""
            if held := _nums(r"(\d+) wei reserved for bids until (\d+)", m):
                why = (f" ({ether_amount(held[0])} more is reserved for your bids {until(held[1], now)}, "
                       "and can be withdrawn after that)")
            return Said(f"You can withdraw at most {ether_amount(can)} of escrow now{why}; you asked for "
                        f"{ether_amount(asked)}. Nothing was sent.", {"action": "withdraw", "amount_wei": str(can)})
        # withdraw, v1: "N wei exceeds the free escrow of F wei"
        if got := _nums(r"(\d+) wei exceeds the free escrow of (\d+) wei", m):
            asked, free = got
            return Said(f"You can withdraw at most {ether_amount(free)}: that is your free escrow (you asked for "
                        f"{ether_amount(asked)}). Nothing was sent.", {"action": "withdraw", "amount_wei": str(free)})
    if code == "insufficient_credit":
        if got := _nums(r"(\d+) wei exceeds the credit of (\d+) wei", m):
            asked, credit = got
            if credit == 0:
                return Said("You have no earnings to withdraw yet. Nothing was sent.")
            return Said(f"You have {ether_amount(credit)} of earnings to withdraw, not {ether_amount(asked)}. "
                        "Nothing was sent.", {"action": "withdraw_credit", "amount_wei": str(credit)})
    if code == "insufficient_tokens":
        if got := _nums(r"approving (\d+) Wh in all exceeds the token balance of (\d+) Wh", m):
            want, have = got
            return Said(f"You have {energy(have)} of Energy Tokens; this offer and your open ones need "
                        f"{energy(want)} in all. Nothing was sent.")
    if code == "no_tokens":
        if got := _nums(r"has (-?\d+) Wh of free tokens, the (?:offer|order) needs (\d+) Wh", m):
            free, want = max(got[0], 0), got[1]
            held = _nums(r"\((\d+) Wh already held", m)
            extra = f" ({energy(held[0])} are held by your open offers and trades)" if held else ""
            return Said(f"You have {energy(free)} of Energy Tokens free to sell{extra}; this offer needs "
                        f"{energy(want)}. Nothing was done.")
    if code == "too_low":
        if got := _nums(r"the highest bid is (\d+) wei/kWh; bid at least (\d+) wei/kWh", m):
            high, floor = got
            return Said(f"The highest bid is {price(high)}: bid at least {price(floor)}. Nothing was done.",
                        {"action": "bid", "price_wei_per_kwh": str(floor)})
        if got := _nums(r"the start bid is (\d+) wei/kWh", m):
            return Said(f"Your bid is below the start bid of {price(got[0])}: bid at least that. Nothing was done.",
                        {"action": "bid", "price_wei_per_kwh": str(got[0])})
    if code == "own_offer":
        if route == "bid":
            return Said("This is your own offer: you cannot bid on it.")
        return Said(generic(m, me_is=None, now=now).replace("This account has", "You have"))
    if code == "has_bids":
        return Said("This offer has bids now: it can no longer be cancelled.")
    if code == "closed":
        if got := re.search(r"offer \S+ is (?:already )?(past its deadline|\w+)", m):
            how = {"past its deadline": "ended"}.get(got.group(1), got.group(1))
            return Said(f"This offer has {'ended' if how == 'ended' else f'ended ({how})'}. Nothing was done.")
        if got := re.search(r"trade \S+ is already (\w+)", m):
            return Said(f"This trade has already ended ({got.group(1)}). Nothing was done.")
    if code == "not_allowed":
        if route == "cancel_offer":
            return Said("You can cancel only your own offers.")
        if route == "close_trade":
            return Said("You can close only a trade you are part of.")
        if route == "set_mining":
            return Said("Mining is started and stopped by the market, not by a site's wallet.")
    if code == "insufficient_funds":
        asked = getattr(body, "amount_wei", None)
        what = f"sending {ether_amount(asked)} and its network fee" if route == "transfer" and asked else \
            "this transaction's network fee"
        return Said(_sentence(f"your account does not hold enough Ether for {what}") + " Nothing was sent.")
    if code == "rejected":
        return Said(_sentence("the chain refused this: " + _SENT_PREFIX.sub("", m)) + " Nothing was sent.")
    if code == "invalid" and re.match(r"^[a-z_]+(\.\d+)?: ", m):
        return Said(_invalid(m))
    return Said(generic(m, me_is=me_is, now=now))


def _invalid(message: str) -> str:
    """A validation message ("amount_wei: amount_wei must be more than 0; to: ...") in words."""
    parts = []
    for part in message.split("; "):
        where, _, what = part.partition(": ")
        name = FIELDS.get(where.split(".")[0], where)
        what = what.replace("amount_wei", "the amount").replace("price_wei_per_kwh", "the price")
        parts.append(_sentence(f"{name}: {what}"))
    return " ".join(parts)
