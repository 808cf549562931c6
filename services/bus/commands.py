"""Requests and their replies (request/reply over DEALER -> ROUTER), defined once.

A request class names its reply model in ``Reply``. On the wire a request is
``{"v", "type", "cmd_id", "body"}``; the client chooses ``cmd_id`` and the server runs a
command id at most once, answering a retry with the stored reply.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_serializer

from .envelope import PROTOCOL_MAJOR, cause_of, tagged_union
from .errors import DecodeError
from .events import Address, Id, Message, Name, Signature, TxStatus, Wei, Wh
from .typed import Bid, Offer


class Reply(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Ok(Reply):
    ok: bool = True


class Request(Message):
    Reply: ClassVar[type[Reply]] = Ok
    READ_ONLY: ClassVar[bool] = False
    """Queries are not remembered by command id: they change nothing."""


REQUESTS: dict[str, type[Request]] = {}


def request(cls: type[Request]) -> type[Request]:
    if cls.TYPE in REQUESTS:
        raise TypeError(f"request type {cls.TYPE!r} defined twice")
    REQUESTS[cls.TYPE] = cls
    return cls


# --- any service ----------------------------------------------------------------------


class Pong(Reply):
    node: str
    uptime_s: float


@request
class Ping(Request):
    TYPE: ClassVar[str] = "ping"
    Reply: ClassVar[type[Reply]] = Pong
    READ_ONLY: ClassVar[bool] = True


# --- chain ----------------------------------------------------------------------------


class AccountInfo(Reply):
    address: Address
    name: str = ""
    site: str = ""
    unlocked: bool = False


class Accounts(Reply):
    accounts: list[AccountInfo]


@request
class ListAccounts(Request):
    TYPE: ClassVar[str] = "chain.accounts"
    Reply: ClassVar[type[Reply]] = Accounts
    READ_ONLY: ClassVar[bool] = True


class Unlocked(Reply):
    address: Address
    expires_at: float


@request
class Unlock(Request):
    """Unlock an account's keystore for a session. The passphrase is never logged or stored."""

    TYPE: ClassVar[str] = "chain.unlock"
    Reply: ClassVar[type[Reply]] = Unlocked
    READ_ONLY: ClassVar[bool] = True  # never remember a reply to a passphrase
    address: Address
    passphrase: SecretStr = Field(min_length=1, max_length=1024)
    ttl_s: float = Field(default=3600, gt=0, le=7 * 86400)

    @field_serializer("passphrase", when_used="json")
    def _reveal_on_the_wire(self, v: SecretStr) -> str:
        return v.get_secret_value()


@request
class Lock(Request):
    TYPE: ClassVar[str] = "chain.lock"
    address: Address


class Balances(Reply):
    """Public, for any address (balances are public on-chain)."""

    address: Address
    ether_wei: Wei
    escrow_free_wei: Wei = 0
    escrow_reserved_wei: Wei = Field(default=0, description="held for live bids until reserved_until")
    reserved_until: int = Field(default=0, ge=0, description="Unix s (block time) the reservation lasts")
    escrow_locked_wei: Wei = 0
    credit_wei: Wei = Field(default=0, description="paid to this seller, not yet withdrawn")
    tokens_wh: Wh = 0
    tokens_locked_wh: Wh = 0
    generated_wh: Wh = Field(default=0, description="Wh minted to the account so far (a site's wallet follows its "
                                                   "own accounts' mints only: 0 for another's)")
    site: str = Field(default="", description="the site the account belongs to; empty if the chain service "
                                              "holds no such account")


@request
class GetBalances(Request):
    TYPE: ClassVar[str] = "chain.balances"
    Reply: ClassVar[type[Reply]] = Balances
    READ_ONLY: ClassVar[bool] = True
    address: Address


class TokensLocked(Reply):
    address: Address
    tokens_locked_wh: Wh = 0


@request
class GetTokensLocked(Request):
    """The Wh of an address locked in the market's open trades (the operator's own books:
    no node call), for a site's wallet view."""

    TYPE: ClassVar[str] = "chain.tokens_locked"
    Reply: ClassVar[type[Reply]] = TokensLocked
    READ_ONLY: ClassVar[bool] = True
    address: Address


class TxSent(Reply):
    tx_hash: str


@request
class Transfer(Request):
    TYPE: ClassVar[str] = "chain.transfer"
    Reply: ClassVar[type[Reply]] = TxSent
    sender: Address
    to: Address
    amount_wei: Wei = Field(gt=0)


@request
class Escrow(Request):
    TYPE: ClassVar[str] = "chain.escrow"
    Reply: ClassVar[type[Reply]] = TxSent
    account: Address
    action: Literal["deposit", "withdraw", "withdraw_credit"]
    amount_wei: Wei = Field(gt=0)


@request
class Reserve(Request):
    """Make at least ``total_wei`` of the account's escrow reserved until ``until`` (Unix s):
    the wallet reserves what is missing (from free escrow) and extends the reservation, and
    answers once the transaction is in a block ("" when nothing was missing). Reserved
    escrow cannot be withdrawn before ``until``: it is what covers the account's live bids."""

    TYPE: ClassVar[str] = "chain.reserve"
    Reply: ClassVar[type[Reply]] = TxSent
    account: Address
    total_wei: Wei
    until: int = Field(ge=0, lt=2**64)


class SignedOffer(Reply):
    offer: Offer
    signature: Signature


@request
class SignOffer(Request):
    """The site's wallet signs an offer (EIP-712) with an unlocked account key."""

    TYPE: ClassVar[str] = "chain.sign_offer"
    Reply: ClassVar[type[Reply]] = SignedOffer
    account: Address
    wh: Wh = Field(gt=0, le=10**9)
    min_price_wei_per_kwh: Wei = Field(gt=0)
    expiry: int = Field(ge=0, lt=2**64)
    duration_s: int = Field(gt=0, lt=2**32)


class SignedBid(Reply):
    bid: Bid
    signature: Signature


@request
class SignBid(Request):
    """The site's wallet signs a bid (EIP-712); ``offer_id`` is the signed offer's id, or
    the zero id for a double-auction buy order."""

    TYPE: ClassVar[str] = "chain.sign_bid"
    Reply: ClassVar[type[Reply]] = SignedBid
    account: Address
    offer_id: str = Field(pattern=r"^0x[0-9a-fA-F]{64}$")
    wh: Wh = Field(gt=0, le=10**9)
    max_price_wei_per_kwh: Wei = Field(gt=0)
    expiry: int = Field(ge=0, lt=2**64)


@request
class Approve(Request):
    """Let the market contract lock this many Wh of the seller's tokens."""

    TYPE: ClassVar[str] = "chain.approve"
    Reply: ClassVar[type[Reply]] = TxSent
    account: Address
    wh: Wh


class Mining(Reply):
    mining: bool
    supported: bool
    detail: str = ""
    controllable: bool = Field(default=True, description="whether the asking site may start and stop mining "
                                                         "(the market's site only)")


@request
class SetMining(Request):
    TYPE: ClassVar[str] = "chain.mining"
    Reply: ClassVar[type[Reply]] = Mining
    action: Literal["start", "stop", "status"]


class TxInfo(Reply):
    tx_hash: str
    kind: str
    ref: str = ""
    account: Address
    status: TxStatus
    reason: str = Field(default="", description="why it failed; while open, the latest thing that happened to it "
                                                "(a refusal, a fee raise, a reorg)")
    state: Literal["pending", "replaced", "mined", "confirmed", "failed"] = Field(
        default="pending", description="pending: sent, not in a block; replaced: a new version with higher fees "
                                       "(or a no-op filling its nonce) is out; mined: in a block, not yet deep enough; "
                                       "then final")
    nonce: int | None = None
    current_hash: str = Field(default="", description="the version now out (tx_hash is the first one's)")
    block: int | None = None
    depth: int | None = Field(default=None, description="blocks on top of its block (None: not mined)")
    depth_required: int = Field(default=0, description="blocks on top before it counts as final")
    attempts: int = 1


class Pending(Reply):
    txs: list[TxInfo]


@request
class ListPending(Request):
    TYPE: ClassVar[str] = "chain.pending"
    Reply: ClassVar[type[Reply]] = Pending
    READ_ONLY: ClassVar[bool] = True
    account: Address | None = None
    recent_s: float = Field(default=0.0, ge=0, le=86400,
                            description="also the transactions that became final in the last recent_s seconds")


# --- auction --------------------------------------------------------------------------


class OfferView(Reply):
    offer_id: Id
    market: Literal["english", "double"] = "english"
    seller: Address
    seller_site: Name
    wh: Wh
    start_price_wei_per_kwh: Wei
    opened_at: float
    ends_at: float
    state: Literal["open", "sold", "expired", "cancelled", "filled"]
    highest_bid_wei_per_kwh: Wei | None = None
    highest_bidder: Address | None = None
    bids: int = 0
    signed_offer_id: str = Field(default="", description="the id in the seller's signed offer: a bid's signed "
                                                         "offer_id names it")


class OfferPlaced(Reply):
    offer_id: Id
    ends_at: float


@request
class PlaceOffer(Request):
    TYPE: ClassVar[str] = "auction.offer"
    Reply: ClassVar[type[Reply]] = OfferPlaced
    seller: Address
    seller_site: Name
    wh: Wh = Field(gt=0, le=10**9)
    start_price_wei_per_kwh: Wei = Field(gt=0)
    duration_s: float = Field(gt=0, le=7 * 86400)
    offer: Offer = Field(description="the same offer, signed by the seller's account")
    signature: Signature


class BidAccepted(Reply):
    bid_id: Id


@request
class PlaceBid(Request):
    TYPE: ClassVar[str] = "auction.bid"
    Reply: ClassVar[type[Reply]] = BidAccepted
    offer_id: Id
    buyer: Address
    buyer_site: Name
    price_wei_per_kwh: Wei = Field(gt=0)
    bid: Bid = Field(description="the same bid, signed by the buyer's account")
    signature: Signature


@request
class CancelOffer(Request):
    TYPE: ClassVar[str] = "auction.cancel"
    offer_id: Id
    seller: Address


@request
class CloseTrade(Request):
    """Close Connection: the buyer, the seller (contracts v2) or the operator ends a live trade."""

    TYPE: ClassVar[str] = "auction.close"
    trade_id: Id
    by: Address


class Offers(Reply):
    offers: list[OfferView]


@request
class ListOffers(Request):
    TYPE: ClassVar[str] = "auction.offers"
    Reply: ClassVar[type[Reply]] = Offers
    READ_ONLY: ClassVar[bool] = True
    include_closed: bool = False


class TradeView(Reply):
    trade_id: Id
    offer_id: Id
    seller: Address
    buyer: Address
    seller_site: Name
    buyer_site: Name
    wh: Wh
    price_wei_per_kwh: Wei
    state: str
    delivered_wh: Wh = 0
    paid_wei: Wei = 0
    reason: str = Field(default="", description="why it is closed or failed, in words")


class Trades(Reply):
    trades: list[TradeView]


@request
class ListTrades(Request):
    TYPE: ClassVar[str] = "auction.trades"
    Reply: ClassVar[type[Reply]] = Trades
    READ_ONLY: ClassVar[bool] = True
    account: Address | None = Field(default=None, description="only the trades this account sells or buys in")
    last: int | None = Field(default=None, ge=1, le=10_000, description="only the latest this many (oldest first)")


class OrderAccepted(Reply):
    order_id: Id


@request
class PlaceOrder(Request):
    """An order for the double auction (pay-as-clear call market)."""

    TYPE: ClassVar[str] = "auction.order"
    Reply: ClassVar[type[Reply]] = OrderAccepted
    side: Literal["sell", "buy"]
    account: Address
    site: Name
    wh: Wh = Field(gt=0, le=10**9)
    limit_price_wei_per_kwh: Wei = Field(gt=0)
    offer: Offer | None = Field(default=None, description="a sell order: the signed offer")
    bid: Bid | None = Field(default=None, description="a buy order: the signed bid (offer id zero)")
    signature: Signature


class BookOrder(Reply):
    """An order in the double auction's book."""

    order_id: Id
    side: Literal["sell", "buy"]
    account: Address
    site: Name
    wh: Wh
    limit_price_wei_per_kwh: Wei
    placed_at: float
    state: Literal["open", "filled", "partial", "expired"] = "open"
    filled_wh: Wh | None = Field(default=None, description="filled at the call's clearing; None while it is open")


class ClearedCall(Reply):
    round: int = Field(ge=0)
    cleared_at: float
    price_wei_per_kwh: Wei | None = Field(description="the one price of the call; None when nothing crossed")
    volume_wh: Wh


class OrderBook(Reply):
    """The double auction's call being collected now, and the calls cleared before it."""

    market: Literal["english", "double", "both"] = Field(description="which markets the auction runs")
    round: int = Field(ge=0, description="the call being collected now")
    clears_at: float = Field(description="Unix s: when that call is cleared")
    interval_s: float = Field(description="one call every this many seconds, aligned to Unix time")
    now: float = Field(description="the auction's clock, so pages can correct their countdowns")
    orders: list[BookOrder] = Field(description="the current call's orders: asks by price up, bids by price down")
    last_orders: list[BookOrder] = Field(default_factory=list,
                                         description="the orders of the latest cleared call, with their fills")
    calls: list[ClearedCall] = Field(description="the latest cleared calls, oldest first")


@request
class ListOrders(Request):
    """The double auction's order book (public, like the offers)."""

    TYPE: ClassVar[str] = "auction.orders"
    Reply: ClassVar[type[Reply]] = OrderBook
    READ_ONLY: ClassVar[bool] = True
    calls: int = Field(default=50, ge=0, le=500, description="how many of the latest cleared calls")


# --- a site's agent -------------------------------------------------------------------


class AgentLimits(BaseModel):
    """What a site's owner lets its agent do. Prices left empty follow the micro-grid's
    tariffs (the most paid: retail; the least sold for: feed-in), and the agent never goes
    beyond the tariffs whatever is set: the utility is always there at those prices."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    enabled: bool = Field(default=True, description="off: the agent places nothing (trade by hand)")
    reserve_soc: float = Field(default=0.2, ge=0, le=1, description="battery state of charge kept for the site")
    max_buy_wei_per_kwh: Wei | None = Field(default=None, gt=0, description="the most paid per kWh; none: retail")
    min_sell_wei_per_kwh: Wei | None = Field(default=None, gt=0,
                                             description="the least sold for per kWh; none: feed-in")
    max_trade_wh: Wh = Field(default=2000, gt=0, le=10**9, description="the largest single trade")
    horizon_s: int = Field(default=3600, gt=0, le=7 * 86400, description="site seconds of forecast traded ahead")


class AgentAction(Reply):
    at: float
    sim_at: float | None = Field(default=None, description="the site's (simulated) clock then, from its meter")
    kind: Literal["offer", "bid", "order"]
    wh: Wh
    price_wei_per_kwh: Wei
    offer_id: str = ""
    ok: bool = True
    note: str = Field(default="", max_length=500)


class AgentState(Reply):
    site: Name
    account: str
    state: Literal["trading", "waiting", "off"]
    waiting_for: str = ""
    limits: AgentLimits
    max_buy_wei_per_kwh: Wei = Field(description="in force: the owner's limit within the tariffs")
    min_sell_wei_per_kwh: Wei = Field(description="in force: the owner's limit within the tariffs")
    retail_wei_per_kwh: Wei
    feed_in_wei_per_kwh: Wei
    forecast_net_wh: float = 0.0
    surplus_wh: Wh = 0
    deficit_wh: Wh = 0
    soc: float | None = None
    sim_ts: float | None = None
    actions: list[AgentAction] = Field(default_factory=list, description="the latest first")


@request
class GetAgent(Request):
    TYPE: ClassVar[str] = "agent.get"
    Reply: ClassVar[type[Reply]] = AgentState
    READ_ONLY: ClassVar[bool] = True


@request
class SetAgentLimits(Request):
    """The owner's new limits (only from the agent's own site): the next decision follows them."""

    TYPE: ClassVar[str] = "agent.limits"
    Reply: ClassVar[type[Reply]] = AgentState
    limits: AgentLimits


# --- wire -----------------------------------------------------------------------------


class RequestEnvelope(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    v: int = PROTOCOL_MAJOR
    type: str
    cmd_id: str = Field(min_length=1, max_length=128)
    body: Request


REQUEST, _REQ_BY_TYPE = tagged_union(RequestEnvelope, REQUESTS)


class ErrorInfo(BaseModel):
    code: str
    message: str


class ReplyEnvelope(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cmd_id: str
    ok: bool
    result: dict[str, Any] | None = None
    error: ErrorInfo | None = None


def wrap(req: Request, cmd_id: str) -> RequestEnvelope:
    return _REQ_BY_TYPE[req.TYPE](type=req.TYPE, cmd_id=cmd_id, body=req)


def decode_request(data: bytes) -> RequestEnvelope:
    try:
        env: RequestEnvelope = REQUEST.validate_json(data)
    except ValidationError as err:
        raise DecodeError(cause_of(err), str(err.errors(include_url=False, include_input=False)[:3])) from None
    if env.v > PROTOCOL_MAJOR:
        raise DecodeError("version", f"newer major version {env.v}")
    return env
