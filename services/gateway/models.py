"""The HTTP API's request and response models (pure: no I/O).

These models validate every request body and are the source of the OpenAPI document
(:mod:`services.gateway.openapi`). Units: wei as decimal strings (JSON numbers lose
precision above 2**53), energy as integer Wh, times as Unix seconds.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, ClassVar, Literal

from eth_utils import to_checksum_address
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, WithJsonSchema,
                      model_validator)

MAX_WEI = 2**256 - 1
_DIGITS = re.compile(r"^[0-9]{1,78}$")
_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
_KWH = re.compile(r"^[0-9]{1,7}(\.[0-9]{1,3})?$")
MAX_WH = 10**9  # the auction's limit for one offer


def _wei_in(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, str):
        raise ValueError("an amount of wei is a decimal string of digits, e.g. \"1000000000000000000\"")
    if not _DIGITS.match(value):
        raise ValueError("an amount of wei is digits only: no sign, no decimal point, no spaces")
    n = int(value)
    if n > MAX_WEI:
        raise ValueError("an amount of wei must be below 2**256")
    return n


_WEI_SCHEMA = {"type": "string", "pattern": r"^[0-9]{1,78}$",
               "description": "wei as a decimal string (digits only, below 2**256)", "examples": ["1000000000000000"]}

WeiIn = Annotated[int, BeforeValidator(_wei_in), WithJsonSchema(_WEI_SCHEMA, mode="validation")]
"""Wei in a request: a decimal string, parsed to an int (0 allowed; routes add their own floor)."""

WeiOut = Annotated[int, PlainSerializer(lambda v: str(v), return_type=str),
                   WithJsonSchema(_WEI_SCHEMA, mode="serialization")]
"""Wei in a response: an int here, a decimal string on the wire."""


def _address_in(value: Any) -> str:
    if not isinstance(value, str) or not _ADDRESS.match(value):
        raise ValueError("not an account address (0x followed by 40 hex digits)")
    if not checksum_ok(value):
        raise ValueError("the address's checksum (its mix of upper and lower case letters) is wrong: it has a typo "
                         "or was changed; copy it again")
    return value


def checksum_ok(address: str) -> bool:
    """EIP-55: an address in mixed case carries a checksum, which must hold; one in a single
    case carries none."""
    digits = address[2:]
    if digits == digits.lower() or digits == digits.upper():
        return True
    return bool(to_checksum_address(address) == address)


AddressStr = Annotated[str, BeforeValidator(_address_in),
                       WithJsonSchema({"type": "string", "pattern": r"^0x[0-9a-fA-F]{40}$"})]


class In(BaseModel):
    """A request body: unknown fields are an error, types are not coerced."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Out(BaseModel):
    model_config = ConfigDict(frozen=True)


# --- requests ---------------------------------------------------------------------------


class Login(In):
    address: AddressStr
    passphrase: str = Field(min_length=1, max_length=1024)


class UnlockIn(In):
    """The session's account is unlocked again (after its wallet restarted): only the passphrase."""

    passphrase: str = Field(min_length=1, max_length=1024)


class TransferIn(In):
    to: AddressStr
    amount_wei: WeiIn = Field(description="wei to send, > 0")

    @model_validator(mode="after")
    def _positive(self) -> TransferIn:
        if self.amount_wei <= 0:
            raise ValueError("amount_wei must be more than 0")
        return self


class EscrowIn(In):
    amount_wei: WeiIn

    @model_validator(mode="after")
    def _positive(self) -> EscrowIn:
        if self.amount_wei <= 0:
            raise ValueError("amount_wei must be more than 0")
        return self


class MiningIn(In):
    action: Literal["start", "stop"]


class EnergyIn(In):
    """A body that gives an energy: ``wh`` (integer Wh) or ``kwh`` (a decimal string with up
    to 3 decimals, e.g. ``"1.5"``), not both; and a price per kWh, named by the subclass."""

    PRICE: ClassVar[str] = ""
    wh: int | None = Field(default=None, gt=0, le=MAX_WH)
    kwh: str | None = Field(default=None, pattern=r"^[0-9]{1,7}(\.[0-9]{1,3})?$",
                            description="kWh with up to 3 decimals (1 token = 1 kWh = 1000 Wh)")

    @model_validator(mode="after")
    def _one_amount(self) -> EnergyIn:
        if (self.wh is None) == (self.kwh is None):
            raise ValueError("give the energy as either wh or kwh")
        if getattr(self, self.PRICE) <= 0:
            raise ValueError(f"{self.PRICE} must be more than 0")
        if self.energy_wh <= 0 or self.energy_wh > MAX_WH:
            raise ValueError(f"the energy must be between 1 Wh and {MAX_WH} Wh")
        return self

    @property
    def energy_wh(self) -> int:
        if self.wh is not None:
            return self.wh
        assert self.kwh is not None
        return kwh_to_wh(self.kwh)


class SellIn(EnergyIn):
    """Sell energy tokens: give ``wh`` (integer Wh) or ``kwh`` (a decimal string with up to
    3 decimals, e.g. ``"1.5"``), not both."""

    PRICE: ClassVar[str] = "start_price_wei_per_kwh"
    start_price_wei_per_kwh: WeiIn
    duration_s: int = Field(gt=0, le=7 * 86400, description="how long the auction runs, in seconds")


def kwh_to_wh(kwh: str) -> int:
    """``"1.5"`` -> 1500; at most 3 decimals (1 Wh), never a float on the way."""
    if not _KWH.match(kwh):
        raise ValueError("kWh is digits with up to 3 decimals")
    try:
        return int(Decimal(kwh) * 1000)
    except InvalidOperation as e:  # pragma: no cover - the pattern rules it out
        raise ValueError("not a number of kWh") from e


class OrderIn(EnergyIn):
    """A double-auction order for the call being collected: ``wh`` (integer Wh) or ``kwh``
    (a decimal string with up to 3 decimals), not both; the limit price per kWh."""

    PRICE: ClassVar[str] = "limit_price_wei_per_kwh"
    side: Literal["sell", "buy"]
    limit_price_wei_per_kwh: WeiIn = Field(description="a sell order's least price, a buy order's most")


class BidIn(In):
    price_wei_per_kwh: WeiIn

    @model_validator(mode="after")
    def _positive(self) -> BidIn:
        if self.price_wei_per_kwh <= 0:
            raise ValueError("price_wei_per_kwh must be more than 0")
        return self


class Empty(In):
    """No fields (an empty object or no body at all)."""


# --- responses --------------------------------------------------------------------------


class ErrorDetail(Out):
    code: str
    message: str = Field(description="for the person: amounts in Ether and kWh, speaking to the session's account")
    fix: dict[str, str] | None = Field(default=None, description="what would fix it, for the page to offer: "
                                       "action deposit|withdraw|withdraw_credit with amount_wei, or bid with "
                                       "price_wei_per_kwh")


class ErrorOut(Out):
    error: ErrorDetail


class OkOut(Out):
    ok: bool = True


class AccountOut(Out):
    address: str
    name: str = ""
    site: str = ""


class AccountsOut(Out):
    accounts: list[AccountOut]


class SessionOut(Out):
    address: str
    site: str
    expires_at: float
    unlocked: bool | None = Field(default=None, description="whether the wallet holds the account's key unlocked "
                                  "(false after the wallet restarted: POST /api/session/unlock); null if the "
                                  "wallet does not answer")


class TxOut(Out):
    tx_hash: str
    kind: str = ""
    ref: str = ""
    status: Literal["pending", "confirmed", "failed"] = "pending"
    state: Literal["pending", "replaced", "mined", "confirmed", "failed"] = "pending"
    reason: str = ""
    nonce: int | None = None
    current_hash: str = ""
    depth: int | None = None
    depth_required: int = 0


class WalletOut(Out):
    address: str
    site: str
    ether_wei: WeiOut
    escrow_free_wei: WeiOut
    escrow_reserved_wei: WeiOut = Field(default=0, description="held for live bids until reserved_until (it cannot "
                                                               "be withdrawn before)")
    reserved_until: int = Field(default=0, description="Unix s (block time) the reservation lasts")
    escrow_locked_wei: WeiOut
    credit_wei: WeiOut
    tokens_wh: int
    tokens_locked_wh: int
    generated_wh: int
    pending: list[TxOut]
    unlocked: bool | None = Field(default=None, description="as in SessionOut: false means actions that sign "
                                  "answer 401 locked until POST /api/session/unlock")


class PendingOut(Out):
    txs: list[TxOut]


class TxSentOut(Out):
    tx_hash: str


class MiningOut(Out):
    mining: bool
    supported: bool
    detail: str = ""
    controllable: bool = True


class OfferOut(Out):
    offer_id: str
    market: str = "english"
    seller: str
    seller_site: str
    wh: int
    start_price_wei_per_kwh: WeiOut
    opened_at: float
    ends_at: float
    state: str
    highest_bid_wei_per_kwh: WeiOut | None = None
    highest_bidder: str | None = None
    bids: int = 0
    signed_offer_id: str = ""


class OffersOut(Out):
    offers: list[OfferOut]
    now: float = Field(description="the gateway's clock, so pages can correct their countdowns")


class OfferPlacedOut(Out):
    offer_id: str
    ends_at: float
    wh: int


class BidOut(Out):
    bid_id: str


class OrderPlacedOut(Out):
    order_id: str
    side: Literal["sell", "buy"]
    wh: int
    limit_price_wei_per_kwh: WeiOut


class BookOrderOut(Out):
    order_id: str
    side: Literal["sell", "buy"]
    account: str
    site: str
    wh: int
    limit_price_wei_per_kwh: WeiOut
    placed_at: float
    state: str = Field(description="open while its call collects; then filled, partial or expired")
    filled_wh: int | None = Field(description="filled at its call's clearing; null while the call is open")
    mine: bool = Field(description="the session's own order")


class ClearedCallOut(Out):
    round: int
    cleared_at: float
    price_wei_per_kwh: WeiOut | None = Field(description="the call's one price; null when nothing crossed")
    volume_wh: int


class OrdersOut(Out):
    """The double auction: the book of the call being collected (asks by price up, then bids
    by price down), when it clears, and the latest cleared calls (oldest first) for a chart."""

    market: str = Field(description="which markets the auction runs: english, double or both")
    round: int
    clears_at: float = Field(description="Unix s: when the current call is cleared")
    interval_s: float
    now: float = Field(description="the gateway's clock, so pages can correct their countdowns")
    orders: list[BookOrderOut]
    last_orders: list[BookOrderOut] = Field(description="the latest cleared call's orders, with their fills")
    calls: list[ClearedCallOut]


class Mismatch(Out):
    buyer_wh: int
    seller_wh: int
    tolerance: float
    reason: str = ""
    at: float | None = None


class TradeOut(Out):
    trade_id: str
    offer_id: str
    seller: str
    buyer: str
    seller_site: str
    buyer_site: str
    wh: int
    price_wei_per_kwh: WeiOut
    state: str
    delivered_wh: int = 0
    paid_wei: WeiOut = 0
    reason: str = Field(default="", description="why it is closed or failed, in words")
    # the trade card's story, from this gateway's history (None: not seen here)
    agreed_at: float | None = None
    recorded_at: float | None = None
    closed_at: float | None = None
    closed_by: str = Field(default="", description="buyer, seller, operator, chain, mismatch or delivered (all of "
                                                   "it); empty while it runs")
    close_reason: str = ""
    settled_at: float | None = None
    refunded_wei: WeiOut | None = Field(default=None, description="escrow given back to the buyer at the close")
    mismatch: Mismatch | None = Field(default=None, description="the two sites' meters disagreed beyond tolerance")
    sim_agreed_at: float | None = Field(default=None, description="agreed_at in the site's (simulated) time")
    sim_closed_at: float | None = None


class TradesOut(Out):
    trades: list[TradeOut]


class HealthOut(Out):
    service: str
    site: str
    ready: bool


class ClockOut(Out):
    wall: float = Field(description="the gateway's clock, Unix s")
    sim: float | None = Field(description="the site's time now: simulated, or the wall clock")
    scale: float = Field(description="site seconds per wall second (1 without a simulated meter)")
    simulated: bool


class SiteOut(Out):
    site: str
    role: Literal["producer", "consumer"] | None = Field(description="from the site's meters; None before a reading")
    clock: ClockOut
    explorer_tx_url: str = Field(description="a block explorer's page of a transaction: {hash} is replaced; empty "
                                             "when none is configured")
    min_increment_wei_per_kwh: WeiOut = Field(description="a bid beats the highest by at least this much")
    auction_market: Literal["english", "double", "both"] = Field(
        default="english", description="which markets run: the english auction, the double auction (orders: "
                                       "/api/orders), or both")
    clear_interval_s: float = Field(default=15.0, description="the double auction's call interval")


class HistoryRow(Out):
    at: float | None = Field(description="when (Unix s): a trade when agreed, a transaction when sent")
    sim_at: float | None = Field(description="the same in the site's time")
    kind: Literal["bought", "sold", "offer", "sent", "received", "deposit", "withdraw", "withdraw_credit"]
    id: str = Field(description="trade id, offer id or transaction hash")
    counterparty: str = ""
    counterparty_site: str = ""
    wh: int | None = Field(default=None, description="energy traded (or offered)")
    delivered_wh: int | None = None
    price_wei_per_kwh: WeiOut | None = None
    amount_wei: WeiOut | None = Field(default=None, description="paid so far in a trade; the amount of a transaction")
    refunded_wei: WeiOut | None = None
    status: str
    detail: str = Field(description="what happened, in words")


class HistoryOut(Out):
    rows: list[HistoryRow]
    clock: ClockOut


class PricePoint(Out):
    at: float
    sim_at: float | None
    kind: Literal["start", "bid", "trade", "clear"]
    price_wei_per_kwh: WeiOut
    ref: str = Field(description="the offer, trade or clearing round")
    wh: int | None = None
    who: str = ""


class PricesOut(Out):
    points: list[PricePoint]
    clock: ClockOut


class ReadingPoint(Out):
    at: float
    sim_at: float
    meter: str
    role: str
    power_w: float
    pv_w: float | None = None
    load_w: float | None = None
    soc: float | None = None
    energy_wh: int
    relay_closed: bool


class ReadingsOut(Out):
    readings: list[ReadingPoint]
    clock: ClockOut


# --- the site's agent ------------------------------------------------------------------------


class AgentLimitsIn(In):
    """The owner's limits for the site's agent. Prices as wei/kWh decimal strings; empty
    (null) follows the tariff (the most paid: retail; the least sold for: feed-in)."""

    enabled: bool
    reserve_soc: float = Field(ge=0, le=1, description="battery state of charge kept for the site (0..1)")
    max_buy_wei_per_kwh: WeiIn | None = None
    min_sell_wei_per_kwh: WeiIn | None = None
    max_trade_wh: int = Field(gt=0, le=MAX_WH, description="the largest single trade")
    horizon_s: int = Field(gt=0, le=7 * 86400, description="site seconds of forecast traded ahead")

    @model_validator(mode="after")
    def _prices(self) -> AgentLimitsIn:
        for name in ("max_buy_wei_per_kwh", "min_sell_wei_per_kwh"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be more than 0, or empty to follow the tariff")
        return self


class AgentLimitsOut(Out):
    enabled: bool
    reserve_soc: float
    max_buy_wei_per_kwh: WeiOut | None
    min_sell_wei_per_kwh: WeiOut | None
    max_trade_wh: int
    horizon_s: int


class AgentActionOut(Out):
    at: float
    sim_at: float | None
    kind: str
    wh: int
    price_wei_per_kwh: WeiOut
    offer_id: str
    ok: bool
    note: str


class AgentOut(Out):
    """What the site's agent does and may do: ``state`` trading, waiting (``waiting_for``
    says for what) or off; the limits in force within the tariffs; its latest actions."""

    site: str
    account: str
    state: str
    waiting_for: str
    limits: AgentLimitsOut
    max_buy_wei_per_kwh: WeiOut
    min_sell_wei_per_kwh: WeiOut
    retail_wei_per_kwh: WeiOut
    feed_in_wei_per_kwh: WeiOut
    forecast_net_wh: float
    surplus_wh: int
    deficit_wh: int
    soc: float | None
    sim_ts: float | None
    actions: list[AgentActionOut]


SignedWeiOut = Annotated[int, PlainSerializer(lambda v: str(v), return_type=str),
                         WithJsonSchema({"type": "string", "pattern": r"^-?[0-9]{1,78}$",
                                         "description": "wei as a decimal string, negative when below zero"},
                                        mode="serialization")]
"""Wei in a response that may be negative (a cost after earnings, a saving that is a loss)."""


class FiguresRow(Out):
    """A day's (or the range's) figures of the account: energy in Wh (three decimals), money in wei."""

    day: str = Field(description="the day of the site's clock (YYYY-MM-DD), or 'total'")
    start: int = Field(description="site time, Unix s (inclusive)")
    end: int = Field(description="site time, Unix s (exclusive)")
    produced_wh: float = Field(description="counted by the site's meters")
    consumed_wh: float = Field(description="the site's load, from its meters' readings")
    bought_local_wh: float = Field(description="delivered to this account in local trades (the other party not "
                                               "on the utility's site), as the chain settled them")
    sold_local_wh: float = Field(description="delivered by this account in local trades, as the chain settled them")
    bought_local_wei: WeiOut = Field(description="paid by this account in local trades (chain settlements)")
    sold_local_wei: WeiOut = Field(description="paid to this account in local trades (chain settlements)")
    bought_utility_wh: float = Field(description="bought from the utility: delivered to this account in trades with "
                                                 "the utility's site, as the chain settled them")
    sold_utility_wh: float = Field(description="sold to the utility: delivered by this account in trades with the "
                                               "utility's site, as the chain settled them")
    bought_utility_wei: WeiOut = Field(description="paid by this account to the utility in its trades (chain "
                                                   "settlements)")
    sold_utility_wei: WeiOut = Field(description="paid to this account by the utility in its trades (chain "
                                                 "settlements)")
    unmatched_import_wh: float = Field(
        description="what neither production nor trades covered (per 15 minutes): the site's own battery, load "
                    "not served, or a grid connection outside the market")
    unmatched_export_wh: float = Field(
        description="the surplus neither consumption nor trades took (per 15 minutes): stored in the site's own "
                    "battery, curtailed, or fed in outside the market")
    self_sufficiency: float | None = Field(description="share of consumption covered by own production and local "
                                                       "trades (these first, per 15 minutes), not by the utility nor "
                                                       "the unmatched import (0..1); None when nothing was consumed")
    baseline_cost_wei: SignedWeiOut = Field(description="utility only: consumption at the retail tariff minus "
                                                        "production at the feed-in tariff")
    actual_cost_wei: SignedWeiOut = Field(description="paid to minus earned from the utility in its trades, plus paid "
                                                      "minus earned in local trades, plus the unmatched import at "
                                                      "retail minus the unmatched export at feed-in")
    saved_wei: SignedWeiOut = Field(description="baseline minus actual")


class TariffsOut(Out):
    retail_wei_per_kwh: WeiOut
    feed_in_wei_per_kwh: WeiOut


class FiguresOut(Out):
    start: int = Field(description="the range's start, site time (Unix s)")
    end: int = Field(description="the range's end (exclusive), site time (Unix s)")
    tz_offset_s: int = Field(description="days begin at midnight of site time shifted by this many seconds")
    days: list[FiguresRow]
    total: FiguresRow
    tariffs: TariffsOut
    clock: ClockOut
