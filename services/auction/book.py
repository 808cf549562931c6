"""The auction's tables in its own SQLite store: offers, bids, orders, rounds, trades.

Plain functions over an open ``sqlite3`` connection (the caller holds the transaction).
Amounts of wei are stored as decimal text (they exceed SQLite's 64-bit integers); Wh
as integers. Deadlines are absolute Unix times, so a restart keeps them. Each offer,
bid and order keeps its signed fact (JSON of :mod:`services.bus.typed`) and signature;
the signed id is unique per table, so a signed fact is taken once.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

from services.bus import typed
from services.bus.prices import wei_for
from services.bus.states import LIVE
from services.bus.states import TradeState as S

from . import double, lifecycle
from .english import Bid, Offer

SCHEMA = """
CREATE TABLE IF NOT EXISTS auction_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS offers (
    offer_id TEXT PRIMARY KEY, seller TEXT NOT NULL, seller_site TEXT NOT NULL, wh INTEGER NOT NULL,
    start_price TEXT NOT NULL, opened_at REAL NOT NULL, ends_at REAL NOT NULL, state TEXT NOT NULL,
    highest_bid TEXT, bids INTEGER NOT NULL DEFAULT 0, closed_at REAL, cause TEXT, signed TEXT, signature TEXT,
    signed_id TEXT);
CREATE INDEX IF NOT EXISTS offers_by_state ON offers (state, ends_at);
CREATE TABLE IF NOT EXISTS bids (
    bid_id TEXT PRIMARY KEY, offer_id TEXT NOT NULL, seq INTEGER NOT NULL, buyer TEXT NOT NULL,
    buyer_site TEXT NOT NULL, price TEXT NOT NULL, placed_at REAL NOT NULL, signed TEXT, signature TEXT,
    signed_id TEXT, UNIQUE (offer_id, seq));
CREATE TABLE IF NOT EXISTS orders (
    order_id TEXT PRIMARY KEY, round INTEGER NOT NULL, side TEXT NOT NULL, account TEXT NOT NULL,
    site TEXT NOT NULL, wh INTEGER NOT NULL, limit_price TEXT NOT NULL, placed_at REAL NOT NULL,
    state TEXT NOT NULL, filled_wh INTEGER NOT NULL DEFAULT 0, signed TEXT, signature TEXT, signed_id TEXT);
CREATE INDEX IF NOT EXISTS orders_by_state ON orders (state, round);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY, cleared_at REAL NOT NULL, price TEXT, volume_wh INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS trades (
    trade_id TEXT PRIMARY KEY, offer_id TEXT NOT NULL, market TEXT NOT NULL, seller TEXT NOT NULL,
    buyer TEXT NOT NULL, seller_site TEXT NOT NULL, buyer_site TEXT NOT NULL, wh INTEGER NOT NULL,
    price TEXT NOT NULL, state TEXT NOT NULL, delivered_wh INTEGER NOT NULL DEFAULT 0,
    paid_wei TEXT NOT NULL DEFAULT '0', reason TEXT NOT NULL DEFAULT '', agreed_at REAL NOT NULL,
    updated_at REAL NOT NULL, bid_id TEXT NOT NULL DEFAULT '', fallback TEXT NOT NULL DEFAULT '',
    fallback_cause TEXT);
CREATE INDEX IF NOT EXISTS trades_by_state ON trades (state);
"""


ADDED_COLUMNS = (  # (table, column, declaration) added after the table first shipped
    ("offers", "cause", "TEXT"),  # the id of the event that decides the offer's end: OfferOpened, then the highest BidPlaced
    # contracts v2: the signed fact (JSON), its signature and its id (lowercase 0x-hex)
    *((table, column, "TEXT") for table in ("offers", "bids", "orders") for column in ("signed", "signature",
                                                                                      "signed_id")),
    ("trades", "bid_id", "TEXT NOT NULL DEFAULT ''"),  # the auction's bid the trade was agreed from (english)
    # the english trade's next-best bid is tried when it could not be opened: '' no, 'pending', then what came of it
    ("trades", "fallback", "TEXT NOT NULL DEFAULT ''"),
    ("trades", "fallback_cause", "TEXT"),
)

INDEXES = """
CREATE UNIQUE INDEX IF NOT EXISTS offers_signed ON offers (signed_id) WHERE signed_id IS NOT NULL;
CREATE UNIQUE INDEX IF NOT EXISTS bids_signed ON bids (signed_id) WHERE signed_id IS NOT NULL;
CREATE UNIQUE INDEX IF NOT EXISTS orders_signed ON orders (signed_id) WHERE signed_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS trades_fallback ON trades (fallback) WHERE fallback = 'pending';
CREATE INDEX IF NOT EXISTS trades_by_offer ON trades (offer_id);
"""


def create(conn: sqlite3.Connection) -> None:
    conn.executescript(SCHEMA)
    for table, column, decl in ADDED_COLUMNS:  # a store from before the column
        if column not in {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
    conn.executescript(INDEXES)


def get_meta(conn: sqlite3.Connection, key: str) -> str | None:
    row = conn.execute("SELECT value FROM auction_meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


def set_meta(conn: sqlite3.Connection, key: str, value: str) -> None:
    conn.execute("INSERT INTO auction_meta (key, value) VALUES (?, ?) "
                 "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value))


def signed_taken(conn: sqlite3.Connection, table: str, signed_id: str) -> str | None:
    """The offer, bid or order (its auction id) that took the signed fact ``signed_id``."""
    key = {"offers": "offer_id", "bids": "bid_id", "orders": "order_id"}[table]
    row = conn.execute(f"SELECT {key} FROM {table} WHERE signed_id = ?", (signed_id.lower(),)).fetchone()  # noqa: S608
    return None if row is None else str(row[0])


def _signed_offer(raw: str | None) -> typed.Offer | None:
    return typed.Offer.model_validate_json(raw) if raw else None


def _signed_bid(raw: str | None) -> typed.Bid | None:
    return typed.Bid.model_validate_json(raw) if raw else None


def next_number(conn: sqlite3.Connection, counter: str) -> int:
    row = conn.execute("SELECT value FROM auction_meta WHERE key = ?", (counter,)).fetchone()
    n = int(row[0]) + 1 if row else 1
    conn.execute("INSERT INTO auction_meta (key, value) VALUES (?, ?) "
                 "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (counter, str(n)))
    return n


# --- english offers and bids ----------------------------------------------------------


def _bid(row: tuple) -> Bid:  # type: ignore[type-arg]
    bid_id, offer_id, seq, buyer, buyer_site, price, placed_at, signed, signature = row
    return Bid(bid_id=bid_id, offer_id=offer_id, buyer=buyer, buyer_site=buyer_site,
               price_wei_per_kwh=int(price), placed_at=placed_at, seq=seq, signed=_signed_bid(signed),
               signature=signature or "")


_BID_COLS = "bid_id, offer_id, seq, buyer, buyer_site, price, placed_at, signed, signature"
_OFFER_COLS = ("offer_id, seller, seller_site, wh, start_price, opened_at, ends_at, state, highest_bid, bids, signed, "
               "signature")


def _offer(conn: sqlite3.Connection, row: tuple) -> Offer:  # type: ignore[type-arg]
    offer_id, seller, seller_site, wh, start, opened_at, ends_at, state, highest_bid, bids, signed, signature = row
    highest = None
    if highest_bid is not None:
        highest = _bid(conn.execute(f"SELECT {_BID_COLS} FROM bids WHERE bid_id = ?", (highest_bid,)).fetchone())
    return Offer(offer_id=offer_id, seller=seller, seller_site=seller_site, wh=wh, start_price_wei_per_kwh=int(start),
                 opened_at=opened_at, ends_at=ends_at, state=state, highest=highest, bids=bids,
                 signed=_signed_offer(signed), signature=signature or "")


def get_offer(conn: sqlite3.Connection, offer_id: str) -> Offer | None:
    row = conn.execute(f"SELECT {_OFFER_COLS} FROM offers WHERE offer_id = ?", (offer_id,)).fetchone()
    return _offer(conn, row) if row else None


def offers(conn: sqlite3.Connection, *, include_closed: bool) -> list[Offer]:
    where = "" if include_closed else "WHERE state = 'open'"
    rows = conn.execute(f"SELECT {_OFFER_COLS} FROM offers {where} ORDER BY opened_at, offer_id").fetchall()
    return [_offer(conn, r) for r in rows]


def due_offers(conn: sqlite3.Connection, now: float) -> list[Offer]:
    rows = conn.execute(f"SELECT {_OFFER_COLS} FROM offers WHERE state = 'open' AND ends_at <= ? "
                        "ORDER BY ends_at, offer_id", (now,)).fetchall()
    return [_offer(conn, r) for r in rows]


def next_deadline(conn: sqlite3.Connection) -> float | None:
    row = conn.execute("SELECT MIN(ends_at) FROM offers WHERE state = 'open'").fetchone()
    return row[0] if row else None


def insert_offer(conn: sqlite3.Connection, o: Offer) -> None:
    conn.execute("INSERT INTO offers (offer_id, seller, seller_site, wh, start_price, opened_at, ends_at, state, bids, "
                 "signed, signature, signed_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?)",
                 (o.offer_id, o.seller, o.seller_site, o.wh, str(o.start_price_wei_per_kwh), o.opened_at, o.ends_at,
                  o.state, o.signed.model_dump_json() if o.signed else None, o.signature or None,
                  o.signed.offer_id.lower() if o.signed else None))


def save_bid(conn: sqlite3.Connection, o: Offer, b: Bid) -> None:
    conn.execute(f"INSERT INTO bids ({_BID_COLS}, signed_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                 (b.bid_id, b.offer_id, b.seq, b.buyer, b.buyer_site, str(b.price_wei_per_kwh), b.placed_at,
                  b.signed.model_dump_json() if b.signed else None, b.signature or None,
                  b.signed.bid_id.lower() if b.signed else None))
    conn.execute("UPDATE offers SET highest_bid = ?, bids = ? WHERE offer_id = ?",
                 (o.highest.bid_id if o.highest else None, o.bids, o.offer_id))


def set_offer_cause(conn: sqlite3.Connection, offer_id: str, cause: str) -> None:
    """What the offer's end is caused by: its opening, then its highest bid."""
    conn.execute("UPDATE offers SET cause = ? WHERE offer_id = ?", (cause, offer_id))


def offer_cause(conn: sqlite3.Connection, offer_id: str) -> str | None:
    row = conn.execute("SELECT cause FROM offers WHERE offer_id = ?", (offer_id,)).fetchone()
    return row[0] if row else None


def close_offer(conn: sqlite3.Connection, o: Offer, now: float) -> None:
    conn.execute("UPDATE offers SET state = ?, closed_at = ? WHERE offer_id = ?", (o.state, now, o.offer_id))


def bids_of(conn: sqlite3.Connection, offer_id: str) -> list[Bid]:
    return [_bid(r) for r in conn.execute(f"SELECT {_BID_COLS} FROM bids WHERE offer_id = ? ORDER BY seq", (offer_id,))]


# --- double auction orders ------------------------------------------------------------

_ORDER_COLS = "order_id, side, account, site, wh, limit_price, signed, signature"


def _signed_id(o: double.Order) -> str | None:
    if isinstance(o.signed, typed.Offer):
        return o.signed.offer_id.lower()
    if isinstance(o.signed, typed.Bid):
        return o.signed.bid_id.lower()
    return None


def insert_order(conn: sqlite3.Connection, o: double.Order, round_: int, now: float) -> None:
    conn.execute("INSERT INTO orders (order_id, round, side, account, site, wh, limit_price, placed_at, state, signed, "
                 "signature, signed_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'open', ?, ?, ?)",
                 (o.order_id, round_, o.side, o.account, o.site, o.wh, str(o.limit_price_wei_per_kwh), now,
                  o.signed.model_dump_json() if o.signed else None, o.signature or None, _signed_id(o)))


def orders_of_round(conn: sqlite3.Connection, round_: int) -> list[double.Order]:
    rows = conn.execute(f"SELECT {_ORDER_COLS} FROM orders WHERE round = ? AND state = 'open'", (round_,))
    out = []
    for r in rows:
        signed: typed.Offer | typed.Bid | None = (_signed_offer(r[6]) if r[1] == "sell" else _signed_bid(r[6]))
        out.append(double.Order(order_id=r[0], side=r[1], account=r[2], site=r[3], wh=r[4],
                                limit_price_wei_per_kwh=int(r[5]), signed=signed, signature=r[7] or ""))
    return out


def open_order_rounds(conn: sqlite3.Connection) -> list[int]:
    return [r[0] for r in conn.execute("SELECT DISTINCT round FROM orders WHERE state = 'open' ORDER BY round")]


def crossing_own_order(conn: sqlite3.Connection, account: str, side: str, limit_wei_per_kwh: int,
                       round_: int) -> int | None:
    """The limit of ``account``'s own open order of the other side in ``round_`` that an
    order of ``side`` at ``limit_wei_per_kwh`` would trade with (a buy at or above its sell,
    a sell at or below its buy), or None. A buy below its own sell (a market maker's
    spread) never meets it."""
    other = "buy" if side == "sell" else "sell"
    for (limit,) in conn.execute("SELECT limit_price FROM orders WHERE round = ? AND state = 'open' AND side = ? "
                                 "AND lower(account) = ?", (round_, other, account.lower())):
        if (int(limit) <= limit_wei_per_kwh) if side == "buy" else (int(limit) >= limit_wei_per_kwh):
            return int(limit)
    return None


def finish_round(conn: sqlite3.Connection, round_: int, result: double.Clearing, now: float) -> None:
    filled = result.filled()
    for (order_id, wh) in conn.execute("SELECT order_id, wh FROM orders WHERE round = ? AND state = 'open'",
                                       (round_,)).fetchall():
        got = filled.get(order_id, 0)
        state = "filled" if got >= wh else ("partial" if got else "expired")
        conn.execute("UPDATE orders SET state = ?, filled_wh = ? WHERE order_id = ?", (state, got, order_id))
    conn.execute("INSERT INTO rounds (round, cleared_at, price, volume_wh) VALUES (?, ?, ?, ?)",
                 (round_, now, None if result.price_wei_per_kwh is None else str(result.price_wei_per_kwh),
                  result.volume_wh))


def round_cleared(conn: sqlite3.Connection, round_: int) -> bool:
    return conn.execute("SELECT 1 FROM rounds WHERE round = ?", (round_,)).fetchone() is not None


def current_call(conn: sqlite3.Connection, now: float, interval_s: float) -> int:
    """The call an order placed at ``now`` joins: the one holding ``now`` (calls every
    ``interval_s`` seconds, aligned to Unix time), or the next not cleared yet when the
    clock cleared it already."""
    round_ = int(now // interval_s)
    while round_cleared(conn, round_):
        round_ += 1
    return round_


def clears_at(round_: int, interval_s: float) -> float:
    return (round_ + 1) * interval_s


_BOOK_COLS = "order_id, side, account, site, wh, limit_price, placed_at, state, filled_wh"


def book_of_round(conn: sqlite3.Connection, round_: int) -> list[dict[str, object]]:
    """The orders of call ``round_`` as the book shows them: asks (sells) by price up, then
    bids (buys) by price down, ties by order id (the clearing's order); ``filled_wh`` None
    while the call is open."""
    rows = conn.execute(f"SELECT {_BOOK_COLS} FROM orders WHERE round = ?", (round_,)).fetchall()
    out = [{"order_id": r[0], "side": r[1], "account": r[2], "site": r[3], "wh": r[4],
            "limit_price_wei_per_kwh": int(r[5]), "placed_at": r[6], "state": r[7],
            "filled_wh": None if r[7] == "open" else r[8]} for r in rows]
    out.sort(key=lambda o: o["order_id"])  # type: ignore[arg-type,return-value]
    out.sort(key=lambda o: (o["side"] != "sell",
                            o["limit_price_wei_per_kwh"] if o["side"] == "sell" else -o["limit_price_wei_per_kwh"]))  # type: ignore[operator]
    return out


def cleared_calls(conn: sqlite3.Connection, limit: int = 50) -> list[dict[str, object]]:
    """The latest ``limit`` cleared calls, oldest first (price None: nothing crossed)."""
    rows = conn.execute("SELECT round, cleared_at, price, volume_wh FROM rounds ORDER BY round DESC LIMIT ?",
                        (limit,)).fetchall()
    return [{"round": r[0], "cleared_at": r[1], "price_wei_per_kwh": None if r[2] is None else int(r[2]),
             "volume_wh": r[3]} for r in reversed(rows)]


def open_sell_orders(conn: sqlite3.Connection, include_closed: bool) -> list[tuple]:  # type: ignore[type-arg]
    where = "side = 'sell'" + ("" if include_closed else " AND state = 'open'")
    return conn.execute(f"SELECT order_id, account, site, wh, limit_price, placed_at, round, state, filled_wh, "
                        f"signed_id FROM orders WHERE {where} ORDER BY placed_at, order_id").fetchall()


# --- trades ---------------------------------------------------------------------------

_TRADE_COLS = ("trade_id, offer_id, seller, buyer, seller_site, buyer_site, wh, price, state, delivered_wh, "
               "paid_wei, reason")


def _trade(row: tuple) -> lifecycle.Trade:  # type: ignore[type-arg]
    (trade_id, offer_id, seller, buyer, seller_site, buyer_site, wh, price, state, delivered, paid, reason) = row
    return lifecycle.Trade(trade_id=trade_id, offer_id=offer_id, seller=seller, buyer=buyer, seller_site=seller_site,
                           buyer_site=buyer_site, wh=wh, price_wei_per_kwh=int(price), state=S(state),
                           delivered_wh=delivered, paid_wei=int(paid), reason=reason)


def get_trade(conn: sqlite3.Connection, trade_id: str) -> lifecycle.Trade | None:
    row = conn.execute(f"SELECT {_TRADE_COLS} FROM trades WHERE trade_id = ?", (trade_id,)).fetchone()
    return _trade(row) if row else None


def insert_trade(conn: sqlite3.Connection, t: lifecycle.Trade, market: str, now: float, bid_id: str = "") -> bool:
    """False if a trade with this id exists already (nothing is agreed twice)."""
    cur = conn.execute(
        "INSERT INTO trades (trade_id, offer_id, market, seller, buyer, seller_site, buyer_site, wh, price, state, "
        "agreed_at, updated_at, bid_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (trade_id) DO NOTHING",
        (t.trade_id, t.offer_id, market, t.seller, t.buyer, t.seller_site, t.buyer_site, t.wh,
         str(t.price_wei_per_kwh), t.state, now, now, bid_id))
    return cur.rowcount == 1


def trade_market(conn: sqlite3.Connection, trade_id: str) -> str | None:
    row = conn.execute("SELECT market FROM trades WHERE trade_id = ?", (trade_id,)).fetchone()
    return None if row is None else str(row[0])


def trades_of_offer(conn: sqlite3.Connection, offer_id: str) -> list[lifecycle.Trade]:
    rows = conn.execute(f"SELECT {_TRADE_COLS} FROM trades WHERE offer_id = ? ORDER BY agreed_at, trade_id",
                        (offer_id,))
    return [_trade(r) for r in rows]


def set_fallback(conn: sqlite3.Connection, trade_id: str, state: str, cause: str | None = None) -> None:
    """What became of trying the next bid after ``trade_id`` could not be opened:
    'pending' (to do), then the next trade's id or why there is none."""
    if cause is None:
        conn.execute("UPDATE trades SET fallback = ? WHERE trade_id = ?", (state, trade_id))
    else:
        conn.execute("UPDATE trades SET fallback = ?, fallback_cause = ? WHERE trade_id = ?", (state, cause, trade_id))


def fallback_of(conn: sqlite3.Connection, trade_id: str) -> tuple[str, str | None]:
    row = conn.execute("SELECT fallback, fallback_cause FROM trades WHERE trade_id = ?", (trade_id,)).fetchone()
    return ("", None) if row is None else (str(row[0]), row[1])


def pending_fallbacks(conn: sqlite3.Connection) -> list[str]:
    return [r[0] for r in conn.execute("SELECT trade_id FROM trades WHERE fallback = 'pending' ORDER BY updated_at")]


def save_trade(conn: sqlite3.Connection, t: lifecycle.Trade, now: float) -> None:
    conn.execute("UPDATE trades SET state = ?, delivered_wh = ?, paid_wei = ?, reason = ?, updated_at = ? "
                 "WHERE trade_id = ?", (t.state, t.delivered_wh, str(t.paid_wei), t.reason, now, t.trade_id))


def trades(conn: sqlite3.Connection, account: str | None = None, last: int | None = None) -> list[lifecycle.Trade]:
    """The trades (of ``account``, as seller or buyer), oldest first; ``last``: only the latest so many."""
    where, args = ("", ()) if account is None else (
        "WHERE lower(seller) = ? OR lower(buyer) = ? ", (account.lower(), account.lower()))
    if last is None:
        rows = conn.execute(f"SELECT {_TRADE_COLS} FROM trades {where}ORDER BY agreed_at, trade_id", args)
        return [_trade(r) for r in rows]
    rows = conn.execute(f"SELECT {_TRADE_COLS} FROM trades {where}ORDER BY agreed_at DESC, trade_id DESC LIMIT ?",
                        (*args, last))
    return [_trade(r) for r in reversed(rows.fetchall())]


def live_trades(conn: sqlite3.Connection) -> list[lifecycle.Trade]:
    states = tuple(sorted(LIVE))
    marks = ",".join("?" * len(states))
    rows = conn.execute(f"SELECT {_TRADE_COLS} FROM trades WHERE state IN ({marks}) ORDER BY trade_id", states)
    return [_trade(r) for r in rows]


# --- what an account has promised but the chain does not lock yet -----------------------


def _rows(conn: sqlite3.Connection, sql: str, args: tuple) -> Iterator[tuple]:  # type: ignore[type-arg]
    yield from conn.execute(sql, args)


def reserved_wei(conn: sqlite3.Connection, buyer: str, *, except_offer: str | None = None) -> int:
    """Escrow the buyer's leading bids, open buy orders and not-yet-recorded trades claim."""
    b = buyer.lower()
    total = 0
    for wh, price in _rows(conn, "SELECT o.wh, bd.price FROM offers o JOIN bids bd ON bd.bid_id = o.highest_bid "
                                 "WHERE o.state = 'open' AND lower(bd.buyer) = ? AND o.offer_id != ?",
                           (b, except_offer or "")):
        total += wei_for(wh, int(price), round_up=True)
    for wh, price in _rows(conn, "SELECT wh, limit_price FROM orders WHERE state = 'open' AND side = 'buy' "
                                 "AND lower(account) = ?", (b,)):
        total += wei_for(wh, int(price), round_up=True)
    for wh, price in _rows(conn, "SELECT wh, price FROM trades WHERE state = ? AND lower(buyer) = ?", (S.AGREED, b)):
        total += wei_for(wh, int(price), round_up=True)
    return total


def reserved_wh(conn: sqlite3.Connection, seller: str) -> int:
    """Tokens the seller's open offers, open sell orders and not-yet-recorded trades claim."""
    s = seller.lower()
    total = 0
    for (wh,) in _rows(conn, "SELECT wh FROM offers WHERE state = 'open' AND lower(seller) = ?", (s,)):
        total += wh
    for (wh,) in _rows(conn, "SELECT wh FROM orders WHERE state = 'open' AND side = 'sell' AND lower(account) = ?",
                       (s,)):
        total += wh
    for (wh,) in _rows(conn, "SELECT wh FROM trades WHERE state = ? AND lower(seller) = ?", (S.AGREED, s)):
        total += wh
    return total
