"""Every event on the bus, defined once and imported by producer and consumer alike.

An event class is a pydantic model of the event's body with a ``TYPE`` class variable
and its publish policy ``ORIGIN`` (who may publish it, see :class:`Origin`); ``@event``
registers it, and :mod:`services.bus.envelope` builds the one discriminated
union (keyed on the envelope's ``type``) that every subscriber decodes through.

Units: energy in integer Wh, Ether in integer wei, prices in wei per kWh, times in Unix
seconds, accounts as 0x-prefixed checksummed or lowercase hex addresses.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from .states import TradeState
from .typed import Bid, Offer

ADDRESS_PATTERN = r"^0x[0-9a-fA-F]{40}$"
NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"

# checked by pydantic-core's own regex engine, not by a Python validator: every event decoded
# checks its names (a Python call each was a fifth of a subscriber's CPU with 300 sites)
Address = Annotated[str, Field(pattern=ADDRESS_PATTERN,
                               description="an Ethereum account address: 0x followed by 40 hex digits")]
"""An Ethereum account address."""
Name = Annotated[str, Field(pattern=NAME_PATTERN, description="1-63 of a-z, 0-9, '-' and '_', starting with a "
                                                             "letter or digit")]
"""A site, meter or service name: safe in topics, file names and URLs."""
Wei = Annotated[int, Field(ge=0, lt=2**256)]
Wh = Annotated[int, Field(ge=0, lt=2**63)]
Id = Annotated[str, Field(min_length=1, max_length=128)]
Signature = Annotated[str, Field(pattern=r"^0x[0-9a-fA-F]{130}$")]
"""65 bytes r || s || v as 0x-hex (EIP-712 or EIP-191)."""


class Origin(enum.Enum):
    """Who may publish an event type: its publish policy (``ORIGIN`` on each event class).

    Every subscriber checks it before its handler sees an event, live or replayed
    (:func:`permitted`). It relies on the one thing a subscriber can trust about an
    envelope: with CURVE on, the hub drops any event whose ``source`` site is not the
    sending key's site, so the source's *site* is the publisher's. The service part of a
    source, and everything in the body, is only what the publisher says. Without CURVE
    (``GRIDTRADE_INSECURE=1``) the source is as forgeable as the body: the policy then
    only catches bodies that contradict their own source, which stops nobody.
    """

    SITE_NAMED = "site_named"
    """Only from the site the body names (``body.site``); what else names a site in the
    body (:meth:`Message.names_only`) must name the same one."""
    OWN_NODE = "own_node"
    """A heartbeat about the publisher itself: ``node`` is the envelope's source and
    ``site`` its site (a heartbeat's replay endpoint is believed for that source only)."""
    AUCTION = "auction"
    """Only from the market's auction (:attr:`Authority.auction`)."""
    CHAIN = "chain"
    """Only from the operator's chain service (:attr:`Authority.chain`)."""
    ANY_SITE = "any_site"
    """Any site, as its own claim: the body names no other site and moves nothing."""


@dataclass(frozen=True)
class Authority:
    """The sources that speak for the market (:data:`Origin.AUCTION`, :data:`Origin.CHAIN`)."""

    auction: str = "market/auction"
    chain: str = "market/chain"

    @classmethod
    def of(cls, market_site: str, *, auction_site: str | None = None, chain_site: str | None = None) -> Authority:
        """The auction and the chain service of ``market_site`` (each may run elsewhere)."""
        return cls(auction=f"{auction_site or market_site}/auction", chain=f"{chain_site or market_site}/chain")


class Message(BaseModel):
    """Base of every bus body: strict about unknown fields, immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    TYPE: ClassVar[str]
    ORIGIN: ClassVar[Origin]
    """The publish policy of an event type; every event class declares one."""

    def names_only(self, site: str) -> bool:
        """True when no field other than ``site`` names a site other than ``site``."""
        return True


EVENTS: dict[str, type[Message]] = {}


def event(cls: type[Message]) -> type[Message]:
    """Register an event class under its ``TYPE``; it must declare its ``ORIGIN``."""
    if cls.TYPE in EVENTS:
        raise TypeError(f"event type {cls.TYPE!r} defined twice")
    if not isinstance(cls.__dict__.get("ORIGIN"), Origin):
        raise TypeError(f"event type {cls.TYPE!r} declares no ORIGIN (who may publish it)")
    if cls.ORIGIN is Origin.SITE_NAMED and "site" not in cls.model_fields:
        raise TypeError(f"event type {cls.TYPE!r} is SITE_NAMED but has no site field")
    EVENTS[cls.TYPE] = cls
    return cls


def permitted(body: Message, source: str, authority: Authority) -> bool:
    """Whether ``source`` may publish ``body`` under its type's :class:`Origin`."""
    site = source.split("/", 1)[0]
    origin = body.ORIGIN
    if origin is Origin.SITE_NAMED:
        return getattr(body, "site", None) == site and body.names_only(site)
    if origin is Origin.OWN_NODE:
        return getattr(body, "node", None) == source and getattr(body, "site", None) == site
    if origin is Origin.AUCTION:
        return source == authority.auction
    if origin is Origin.CHAIN:
        return source == authority.chain
    return origin is Origin.ANY_SITE


# --- the bus itself -------------------------------------------------------------------


@event
class Heartbeat(Message):
    """A publisher's pulse: the last seq of each of its topics and where to replay them."""

    TYPE: ClassVar[str] = "bus.heartbeat"
    ORIGIN: ClassVar[Origin] = Origin.OWN_NODE
    node: str
    replay: str
    site: Name
    last: dict[str, int]


# --- meters ---------------------------------------------------------------------------

Role = Literal["producer", "consumer"]


@event
class MeterReading(Message):
    """One sample of a meter's counters."""

    TYPE: ClassVar[str] = "meter.reading"
    ORIGIN: ClassVar[Origin] = Origin.SITE_NAMED
    site: Name
    meter: Name
    role: Role
    energy_wh: Wh = Field(description="cumulative energy counter")
    power_w: float
    voltage_v: float
    current_a: float
    relay_closed: bool
    soc: float | None = Field(default=None, ge=0, le=1, description="battery state of charge")
    load_w: float | None = Field(default=None, description="consumption at the site, if known")
    pv_w: float | None = Field(default=None, description="PV generation at the site, if known")
    sim_ts: float | None = Field(default=None, description="the simulated site's clock (Unix s) at this reading; "
                                                           "None for a real meter (its time is the wall clock)")
    time_scale: float | None = Field(default=None, gt=0, description="simulated seconds per wall second, with sim_ts")


@event
class MeterKey(Message):
    """A meter's key, created at its site on first start, asks to be registered for the
    site's account: ``signature`` is the meter key's EIP-712 ``MeterKey(meter, account)``
    (registry domain), so nobody can register a key it does not hold. The market's
    registrar registers it once the account is the site's own (its wallet's claim)."""

    TYPE: ClassVar[str] = "meter.key"
    ORIGIN: ClassVar[Origin] = Origin.SITE_NAMED
    site: Name
    meter: Name
    address: Address
    account: Address
    chain_id: int = Field(ge=0)
    registry: Address
    signature: Signature


@event
class EnergyProduced(Message):
    """A meter's cumulative production, signed by its key (EIP-712 ``Production``, token
    domain). Anyone may submit it to the token, which mints only the delta since the last
    mint of that meter, so a replayed or older reading mints nothing."""

    TYPE: ClassVar[str] = "meter.energy_produced"
    ORIGIN: ClassVar[Origin] = Origin.SITE_NAMED
    site: Name
    meter: Name
    meter_address: Address
    produced_wh: Wh = Field(description="cumulative, since the meter key was created")
    chain_id: int = Field(ge=0)
    token: Address
    signature: Signature


@event
class MeterRelay(Message):
    TYPE: ClassVar[str] = "meter.relay"
    ORIGIN: ClassVar[Origin] = Origin.SITE_NAMED
    site: Name
    meter: Name
    closed: bool
    trade_id: Id | None = None
    reason: str = ""


@event
class Delivery(Message):
    """Wh measured at a meter since the trade started (cumulative)."""

    TYPE: ClassVar[str] = "meter.delivery"
    ORIGIN: ClassVar[Origin] = Origin.SITE_NAMED
    trade_id: Id
    site: Name
    meter: Name
    role: Role
    delivered_wh: Wh
    final: bool = Field(default=False, description="the meter stopped counting for this trade (its relay "
                                                   "opened): this is its last Delivery for it")
    meter_address: Address | None = Field(default=None, description="the meter key that signed")
    signature: Signature | None = Field(default=None, description="EIP-712 Delivery (consumer) or Export "
                                                                  "(producer) of the cumulative Wh, market domain")


@event
class MeterMismatch(Message):
    TYPE: ClassVar[str] = "meter.mismatch"
    ORIGIN: ClassVar[Origin] = Origin.ANY_SITE
    trade_id: Id
    buyer_wh: Wh
    seller_wh: Wh
    tolerance: float
    site: str = Field(default="", description="the seller's site that flagged it")
    reason: str = Field(default="", max_length=300, description="why, in words")


# --- market ---------------------------------------------------------------------------


@event
class OfferOpened(Message):
    TYPE: ClassVar[str] = "market.offer_opened"
    ORIGIN: ClassVar[Origin] = Origin.AUCTION
    offer_id: Id
    market: Literal["english", "double"] = "english"
    seller: Address
    seller_site: Name
    wh: Wh
    start_price_wei_per_kwh: Wei
    opened_at: float
    ends_at: float


@event
class BidPlaced(Message):
    TYPE: ClassVar[str] = "market.bid_placed"
    ORIGIN: ClassVar[Origin] = Origin.AUCTION
    offer_id: Id
    bid_id: Id
    buyer: Address
    buyer_site: Name
    price_wei_per_kwh: Wei
    wh: Wh | None = None
    placed_at: float


@event
class OfferClosed(Message):
    TYPE: ClassVar[str] = "market.offer_closed"
    ORIGIN: ClassVar[Origin] = Origin.AUCTION
    offer_id: Id
    outcome: Literal["sold", "expired", "cancelled", "filled"]
    winner: Address | None = None
    price_wei_per_kwh: Wei | None = None


@event
class OrderPlaced(Message):
    """A limit order for the double auction's call ``round`` (cleared at ``clears_at``)."""

    TYPE: ClassVar[str] = "market.order_placed"
    ORIGIN: ClassVar[Origin] = Origin.AUCTION
    order_id: Id
    round: int = Field(ge=0)
    side: Literal["sell", "buy"]
    account: Address
    site: Name
    wh: Wh
    limit_price_wei_per_kwh: Wei
    placed_at: float
    clears_at: float


@event
class MarketCleared(Message):
    """One call of the double auction: one price, the fills it made."""

    TYPE: ClassVar[str] = "market.cleared"
    ORIGIN: ClassVar[Origin] = Origin.AUCTION
    round: int = Field(ge=0)
    price_wei_per_kwh: Wei | None
    volume_wh: Wh
    trade_ids: list[Id] = Field(default_factory=list)


# --- trades ---------------------------------------------------------------------------

@event
class TradeAgreed(Message):
    TYPE: ClassVar[str] = "trade.agreed"
    ORIGIN: ClassVar[Origin] = Origin.AUCTION
    trade_id: Id
    offer_id: Id
    seller: Address
    buyer: Address
    seller_site: Name
    buyer_site: Name
    wh: Wh
    price_wei_per_kwh: Wei
    offer: Offer | None = Field(default=None, description="the seller's signed offer the trade is opened from")
    offer_signature: Signature | None = None
    bid: Bid | None = Field(default=None, description="the buyer's signed bid")
    bid_signature: Signature | None = None


@event
class TradeStatus(Message):
    """A step of the trade lifecycle (see docs/architecture.md, "One trade, event by event")."""

    TYPE: ClassVar[str] = "trade.status"
    ORIGIN: ClassVar[Origin] = Origin.AUCTION
    trade_id: Id
    state: TradeState
    seller: Address
    buyer: Address
    seller_site: Name
    buyer_site: Name
    wh: Wh
    price_wei_per_kwh: Wei
    delivered_wh: Wh = 0
    reason: str = ""


@event
class TradeHeartbeat(Message):
    """The trades that are live right now; meters keep relays closed only while they hear it."""

    TYPE: ClassVar[str] = "trade.heartbeat"
    ORIGIN: ClassVar[Origin] = Origin.AUCTION
    live: list[Id]
    sites: dict[Id, list[Name]] = Field(default_factory=dict)


# --- chain ----------------------------------------------------------------------------

TxStatus = Literal["pending", "confirmed", "failed"]


class TxFields(Message):
    """What every transaction update says, the operator's and a wallet's alike."""

    tx_hash: str
    kind: str = Field(description="mint, open, open_batch, settle, close (the operator's); transfer, deposit, withdraw, "
                                  "withdraw_credit, approve (a wallet's)")
    ref: str = Field(default="", description="what it is for: reading id, trade id, ...")
    account: Address
    status: TxStatus
    block: int | None = None
    reason: str = ""
    mined_hash: str = Field(default="", description="the hash actually mined, when fees were raised by a new "
                                                    "version (same nonce) or its nonce was filled by a no-op")


@event
class ChainTx(TxFields):
    """A transaction the chain service sent, from hash to receipt."""

    TYPE: ClassVar[str] = "chain.tx"
    ORIGIN: ClassVar[Origin] = Origin.CHAIN


@event
class Minted(Message):
    TYPE: ClassVar[str] = "chain.minted"
    ORIGIN: ClassVar[Origin] = Origin.CHAIN
    account: Address
    meter: Address
    produced_wh: Wh = Field(description="the meter's cumulative production minted up to now")
    wh: Wh = Field(description="minted by this transaction")
    tx_hash: str


@event
class TradeRecorded(Message):
    """The trade is in the market contract: funds and tokens are locked."""

    TYPE: ClassVar[str] = "chain.trade_recorded"
    ORIGIN: ClassVar[Origin] = Origin.CHAIN
    trade_id: Id
    tx_hash: str


@event
class Settled(Message):
    TYPE: ClassVar[str] = "chain.settled"
    ORIGIN: ClassVar[Origin] = Origin.CHAIN
    trade_id: Id
    delivered_wh: Wh
    paid_wei: Wei = Field(description="cumulative paid to the seller for this trade")
    tx_hash: str


@event
class TradeClosed(Message):
    TYPE: ClassVar[str] = "chain.trade_closed"
    ORIGIN: ClassVar[Origin] = Origin.CHAIN
    trade_id: Id
    delivered_wh: Wh
    paid_wei: Wei
    refunded_wei: Wei
    tx_hash: str


@event
class ChainMining(Message):
    TYPE: ClassVar[str] = "chain.mining"
    ORIGIN: ClassVar[Origin] = Origin.CHAIN
    mining: bool


@event
class Deployment(Message):
    """The contracts the operator deployed (or attached to) on which chain: the sites'
    wallets learn the addresses from it and follow a redeploy. Published by the operator at
    every start that finds a deployment it has not announced yet."""

    TYPE: ClassVar[str] = "chain.deployment"
    ORIGIN: ClassVar[Origin] = Origin.CHAIN
    chain_id: int = Field(ge=0)
    genesis: str = Field(min_length=1, max_length=80, description="hash of block 0: with chain_id, which chain")
    token: Address
    market: Address
    registry: Address
    dispute_window_s: int = Field(default=0, ge=0)
    deploy_block: int = Field(ge=0)
    deploy_block_hash: str = Field(default="", max_length=80,
                                   description="hash of the deploy block: tells this deployment from one at the same "
                                               "addresses on a fresh dev chain with the same genesis")
    deployment: str = Field(min_length=1, max_length=64, description="one id per deployment (a redeploy: a new one)")


# --- the sites' wallets ---------------------------------------------------------------


@event
class WalletAccount(Message):
    """A site's wallet says an account is its own, with the account key's signature of
    ``claim_text(site, address)`` (EIP-191 personal message): only whoever holds the key
    could have signed it. The first valid claim of an address binds it to its site; the
    auction and the operator keep that map (see :mod:`services.bus.claims`)."""

    TYPE: ClassVar[str] = "wallet.account"
    ORIGIN: ClassVar[Origin] = Origin.SITE_NAMED
    site: Name
    address: Address
    name: str = Field(default="", max_length=64, description="the label shown on the site's login page")
    signature: str = Field(pattern=r"^0x[0-9a-fA-F]{130}$")


@event
class WalletTx(TxFields):
    """A transaction a site's wallet sent for one of its accounts, from hash to receipt
    (what :class:`ChainTx` is for the operator's transactions)."""

    TYPE: ClassVar[str] = "wallet.tx"
    ORIGIN: ClassVar[Origin] = Origin.SITE_NAMED
    site: Name
