"""STAND-INS for the chain service and the meters, for the gateway's tests.

They are real bus parts on real sockets (RpcServer, Publisher, Subscriber through the
real hub with CURVE), answering and publishing what the real services would, from
in-memory dicts. The auction is the real :class:`AuctionService`. The end-to-end issue
re-runs the same flows against the real chain and meter services.

``ChainStandIn``
  answers ListAccounts, Unlock, Lock, GetBalances, Transfer, Escrow, Approve,
  SetMining, ListPending; every transaction is published as ``TxUpdate`` pending and
  confirmed on the next "block" while mining is on (stays pending while it is off).
  It follows the auction: ``TradeAgreed`` -> an ``open`` transaction -> ``TradeRecorded``
  once mined; buyer ``Delivery`` -> ``Settled`` (cumulative payment); a trade that is
  ``closed``/``fulfilled`` -> ``TradeClosedOnChain`` with the refund.
``MeterStandIn``
  publishes ``MeterReading`` for each site and, while a trade is delivering, the buyer
  meter's cumulative ``Delivery`` in steps (stopping at ``stop_at`` of the trade's Wh).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import itertools
import pathlib
import time
from typing import Any

import zmq.asyncio

from services.bus import Publisher, RequestError, RpcServer, Security, Store, Subscriber
from services.bus import commands as cmd
from services.bus import events as ev

ETHER = 10**18


@dataclasses.dataclass
class Account:
    address: str
    name: str
    site: str
    passphrase: str
    ether_wei: int = 100 * ETHER
    escrow_free_wei: int = 0
    escrow_locked_wei: int = 0
    credit_wei: int = 0
    tokens_wh: int = 0
    generated_wh: int = 0


@dataclasses.dataclass
class Tx:
    tx_hash: str
    kind: str
    ref: str
    account: str
    effect: Any = None  # a callable applied when mined


@dataclasses.dataclass
class ChainTrade:
    agreed: ev.TradeAgreed
    recorded: bool = False
    delivered_wh: int = 0
    paid_wei: int = 0
    closed: bool = False


PRODUCER = Account(address="0x" + "a1" * 20, name="alice-solar", site="solar-1", passphrase="sunny-day-1",
                   tokens_wh=5_000, generated_wh=5_000)
CONSUMER = Account(address="0x" + "b2" * 20, name="bob-home", site="home-7", passphrase="evening-load-2",
                   escrow_free_wei=ETHER)
THIRD = Account(address="0x" + "c3" * 20, name="carol-home", site="home-7", passphrase="third-party-3",
                escrow_free_wei=ETHER)


def accounts() -> list[Account]:
    return [dataclasses.replace(a) for a in (PRODUCER, CONSUMER, THIRD)]


class ChainStandIn:
    """STAND-IN for the chain service (see the module docstring)."""

    def __init__(self, *, keys: pathlib.Path, hub_pub: str, hub_sub: str, root: pathlib.Path,
                 block_s: float = 0.3) -> None:
        self.keys, self.hub_pub, self.hub_sub, self.root = keys, hub_pub, hub_sub, root
        self.block_s = block_s
        self.accounts = {a.address.lower(): a for a in accounts()}
        self.unlocked: set[str] = set()
        self.mining = True
        self.pending: list[Tx] = []
        self.mined: list[Tx] = []
        self.trades: dict[str, ChainTrade] = {}
        self.requests: list[cmd.Request] = []
        self._n = itertools.count(1)
        self._wake = asyncio.Event()
        self._bg: set[asyncio.Future[Any]] = set()

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        self.ctx = zmq.asyncio.Context()
        self.sec = Security(self.keys, "market")
        self.sec.start(self.ctx)
        self.store = Store(self.root / "chain-standin.sqlite")
        self.server = RpcServer(self.ctx, self.sec, self.store, bind="tcp://127.0.0.1:*", name="chain-standin")
        for req_cls, fn in ((cmd.ListAccounts, self.list_accounts), (cmd.Unlock, self.unlock), (cmd.Lock, self.lock),
                            (cmd.GetBalances, self.balances), (cmd.Transfer, self.transfer),
                            (cmd.Escrow, self.escrow), (cmd.Approve, self.approve),
                            (cmd.SetMining, self.set_mining), (cmd.ListPending, self.list_pending)):
            self.server.handle(req_cls, fn)
        self.pub = Publisher(self.ctx, self.sec, self.store, source="market/chain-standin", hub_pub=self.hub_pub,
                             hub_site="market", heartbeat_s=0.2)
        self.sub = Subscriber(self.ctx, self.sec, self.store, hub_sub=self.hub_sub, hub_site="market",
                              prefixes=[ev.TradeAgreed.TYPE, ev.TradeStatus.TYPE, ev.Delivery.TYPE],
                              handler=self.on_event, name="chain-standin sub")
        await self.server.start()
        await self.pub.start()
        await self.sub.start()
        self.endpoint = self.server.endpoint
        self.miner = asyncio.create_task(self._mine(), name="chain-standin-miner")

    async def stop(self) -> None:
        await self.drain()
        self.miner.cancel()
        await asyncio.gather(self.miner, return_exceptions=True)
        await self.sub.stop()
        await self.server.stop()
        await self.pub.stop()
        self.sec.stop()
        self.store.close()
        self.ctx.destroy(linger=0)

    # --- transactions ------------------------------------------------------------------

    def _hash(self, kind: str) -> str:
        return "0x" + hashlib.sha256(f"{kind}-{next(self._n)}-{time.time()}".encode()).hexdigest()

    async def send(self, kind: str, ref: str, account: str, effect: Any = None) -> str:
        tx = Tx(tx_hash=self._hash(kind), kind=kind, ref=ref, account=account, effect=effect)
        self.pending.append(tx)
        await self.pub.publish(ev.TxUpdate(tx_hash=tx.tx_hash, kind=kind, ref=ref, account=account, status="pending"))
        self._wake.set()
        return tx.tx_hash

    async def _mine(self) -> None:
        block = 0
        while True:
            await asyncio.sleep(self.block_s)
            if not self.mining or not self.pending:
                continue
            block += 1
            batch, self.pending = self.pending, []
            for tx in batch:
                if tx.effect is not None:
                    result = tx.effect()
                    if asyncio.iscoroutine(result):
                        await result
                self.mined.append(tx)
                await self.pub.publish(ev.TxUpdate(tx_hash=tx.tx_hash, kind=tx.kind, ref=tx.ref, account=tx.account,
                                                   status="confirmed", block=block))

    def _acct(self, address: str) -> Account:
        a = self.accounts.get(address.lower())
        if a is None:
            raise RequestError("unknown_account", f"no keystore holds {address}")
        return a

    def _signer(self, address: str) -> Account:
        a = self._acct(address)
        if a.address.lower() not in self.unlocked:
            raise RequestError("locked", f"account {address} is locked: unlock it first")
        return a

    # --- requests ----------------------------------------------------------------------

    async def list_accounts(self, req: cmd.ListAccounts) -> cmd.Accounts:
        return cmd.Accounts(accounts=[cmd.AccountInfo(address=a.address, name=a.name, site=a.site,
                                                      unlocked=a.address in self.unlocked)
                                      for a in self.accounts.values()])

    async def unlock(self, req: cmd.Unlock) -> cmd.Unlocked:
        a = self._acct(req.address)
        if req.passphrase.get_secret_value() != a.passphrase:
            raise RequestError("bad_passphrase", "the passphrase does not decrypt this keystore")
        self.unlocked.add(a.address.lower())
        return cmd.Unlocked(address=a.address, expires_at=time.time() + req.ttl_s)

    async def lock(self, req: cmd.Lock) -> cmd.Ok:
        self.requests.append(req)
        self.unlocked.discard(req.address.lower())
        return cmd.Ok()

    async def balances(self, req: cmd.GetBalances) -> cmd.Balances:
        a = self._acct(req.address)
        return cmd.Balances(address=a.address, ether_wei=a.ether_wei, escrow_free_wei=a.escrow_free_wei,
                            escrow_locked_wei=a.escrow_locked_wei, credit_wei=a.credit_wei, tokens_wh=a.tokens_wh,
                            generated_wh=a.generated_wh)

    async def transfer(self, req: cmd.Transfer) -> cmd.TxSent:
        self.requests.append(req)
        a = self._signer(req.sender)
        if req.amount_wei > a.ether_wei:
            raise RequestError("insufficient_funds", f"nothing was sent: insufficient funds for {req.amount_wei} wei")
        to = self.accounts.get(req.to.lower())

        def effect() -> None:
            a.ether_wei -= req.amount_wei
            if to is not None:
                to.ether_wei += req.amount_wei

        return cmd.TxSent(tx_hash=await self.send("transfer", req.to, a.address, effect))

    async def escrow(self, req: cmd.Escrow) -> cmd.TxSent:
        self.requests.append(req)
        a = self._signer(req.account)
        amount = req.amount_wei
        if req.action == "deposit":
            if amount > a.ether_wei:
                raise RequestError("insufficient_funds", "nothing was sent: insufficient funds")

            def effect() -> None:
                a.ether_wei -= amount
                a.escrow_free_wei += amount
        elif req.action == "withdraw":
            if amount > a.escrow_free_wei:
                raise RequestError("insufficient_escrow",
                                   f"nothing was sent: {amount} wei exceeds the free escrow of {a.escrow_free_wei} wei")

            def effect() -> None:
                a.escrow_free_wei -= amount
                a.ether_wei += amount
        else:
            raise RequestError("unsupported", "withdraw_credit is not in the stand-in")
        return cmd.TxSent(tx_hash=await self.send(req.action, str(amount), a.address, effect))

    async def approve(self, req: cmd.Approve) -> cmd.TxSent:
        self.requests.append(req)
        a = self._signer(req.account)
        return cmd.TxSent(tx_hash=await self.send("approve", str(req.wh), a.address))

    async def set_mining(self, req: cmd.SetMining) -> cmd.Mining:
        if req.action != "status":
            on = req.action == "start"
            if on != self.mining:
                self.mining = on
                await self.pub.publish(ev.MiningChanged(mining=on))
        return cmd.Mining(mining=self.mining, supported=True, detail="stand-in")

    async def list_pending(self, req: cmd.ListPending) -> cmd.Pending:
        return cmd.Pending(txs=[cmd.TxInfo(tx_hash=t.tx_hash, kind=t.kind, ref=t.ref, account=t.account,
                                           status="pending")
                                for t in self.pending if req.account is None or
                                t.account.lower() == req.account.lower()])

    # --- following the market ------------------------------------------------------------

    async def on_event(self, env: Any, conn: Any) -> None:
        body = env.body
        if isinstance(body, ev.TradeAgreed) and body.trade_id not in self.trades:
            t = self.trades[body.trade_id] = ChainTrade(agreed=body)
            # the real chain runs this as a durable job; publishing from the handler would
            # join the subscriber's transaction on another store, so hand it to a task
            self._later(self._open(t))
        elif isinstance(body, ev.Delivery) and body.role == "consumer":
            t = self.trades.get(body.trade_id)
            if t and t.recorded and not t.closed and body.delivered_wh > t.delivered_wh:
                self._later(self._settle(t, min(body.delivered_wh, t.agreed.wh)))
        elif isinstance(body, ev.TradeStatus) and body.state in ("closed", "fulfilled"):
            t = self.trades.get(body.trade_id)
            if t and not t.closed:
                t.closed = True
                self._later(self._close(t))

    def _later(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    async def _open(self, t: ChainTrade) -> None:
        a = t.agreed
        buyer, seller = self._acct(a.buyer), self._acct(a.seller)
        cost = a.wh * a.price_wei_per_kwh // 1000

        async def effect() -> None:
            buyer.escrow_free_wei -= cost
            buyer.escrow_locked_wei += cost
            seller.tokens_wh -= a.wh
            t.recorded = True
            await self.pub.publish(ev.TradeRecorded(trade_id=a.trade_id, tx_hash=tx))

        tx = await self.send("open", a.trade_id, a.buyer, effect)

    async def _settle(self, t: ChainTrade, delivered: int) -> None:
        a = t.agreed
        paid = delivered * a.price_wei_per_kwh // 1000
        step = paid - t.paid_wei
        buyer, seller = self._acct(a.buyer), self._acct(a.seller)
        buyer.escrow_locked_wei -= step
        seller.credit_wei += step
        self._acct(a.buyer).tokens_wh += delivered - t.delivered_wh
        t.delivered_wh, t.paid_wei = delivered, paid
        await self.pub.publish(ev.Settled(trade_id=a.trade_id, delivered_wh=delivered, paid_wei=paid,
                                          tx_hash=self._hash("settle")))

    async def _close(self, t: ChainTrade) -> None:
        a = t.agreed
        cost = a.wh * a.price_wei_per_kwh // 1000
        refund = cost - t.paid_wei
        buyer, seller = self._acct(a.buyer), self._acct(a.seller)
        buyer.escrow_locked_wei -= refund
        buyer.escrow_free_wei += refund
        seller.tokens_wh += a.wh - t.delivered_wh
        await self.pub.publish(ev.TradeClosedOnChain(trade_id=a.trade_id, delivered_wh=t.delivered_wh,
                                                     paid_wei=t.paid_wei, refunded_wei=refund,
                                                     tx_hash=self._hash("close")))

    async def drain(self) -> None:
        """Wait for the follow-up work handed to tasks (called before stop)."""
        bg = list(self._bg)
        if bg:
            await asyncio.gather(*bg, return_exceptions=True)


class MeterStandIn:
    """STAND-IN for the meters of two sites: readings for the charts, buyer delivery."""

    def __init__(self, *, keys: pathlib.Path, hub_pub: str, hub_sub: str, root: pathlib.Path,
                 every_s: float = 0.4, step_wh: int = 100, stop_at: float = 0.5) -> None:
        self.keys, self.hub_pub, self.hub_sub, self.root = keys, hub_pub, hub_sub, root
        self.every_s, self.step_wh, self.stop_at = every_s, step_wh, stop_at
        self.delivering: dict[str, ev.TradeStatus] = {}
        self.delivered: dict[str, int] = {}
        self.counters = {"solar-1": 5_000, "home-7": 0}

    async def start(self) -> None:
        self.parts: list[tuple[zmq.asyncio.Context, Security, Store, Publisher]] = []
        self.pubs: dict[str, Publisher] = {}
        for site in ("solar-1", "home-7"):
            ctx = zmq.asyncio.Context()  # one ZAP handler per context: one context per site
            sec = Security(self.keys, site)
            sec.start(ctx)
            store = Store(self.root / f"meter-standin-{site}.sqlite")
            pub = Publisher(ctx, sec, store, source=f"{site}/meter-standin", hub_pub=self.hub_pub,
                            hub_site="market", heartbeat_s=0.2)
            await pub.start()
            self.parts.append((ctx, sec, store, pub))
            self.pubs[site] = pub
        ctx, sec, store, _ = self.parts[1]
        self.sub = Subscriber(ctx, sec, store, hub_sub=self.hub_sub, hub_site="market",
                              prefixes=[ev.TradeStatus.TYPE], handler=self.on_status, start="latest",
                              name="meter-standin sub")
        await self.sub.start()
        self.task = asyncio.create_task(self._run(), name="meter-standin")

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.sub.stop()
        for ctx, sec, store, pub in self.parts:
            await pub.stop()
            sec.stop()
            store.close()
            ctx.destroy(linger=0)

    def on_status(self, env: Any, conn: Any) -> None:
        body = env.body
        if body.state == "delivering":
            self.delivering[body.trade_id] = body
        else:
            self.delivering.pop(body.trade_id, None)

    async def _run(self) -> None:
        n = 0
        while True:
            n += 1
            live = bool(self.delivering)
            pv = 800.0 + 50 * (n % 7)
            load = 300.0 + (400.0 if live else 0.0) + 20 * (n % 5)
            self.counters["solar-1"] += int(pv * self.every_s / 3.6) // 1000 + 1
            self.counters["home-7"] += int(load * self.every_s / 3.6) // 1000 + 1
            await self.pubs["solar-1"].publish(ev.MeterReading(
                site="solar-1", meter="m1", role="producer", energy_wh=self.counters["solar-1"], power_w=pv,
                voltage_v=24.0, current_a=pv / 24, relay_closed=live, soc=0.8, pv_w=pv, load_w=50.0))
            await self.pubs["home-7"].publish(ev.MeterReading(
                site="home-7", meter="m1", role="consumer", energy_wh=self.counters["home-7"], power_w=load,
                voltage_v=24.0, current_a=load / 24, relay_closed=live, load_w=load))
            for tid, st in list(self.delivering.items()):
                have = self.delivered.get(tid, 0)
                if have >= st.wh * self.stop_at:
                    continue
                have = min(have + self.step_wh, st.wh)
                self.delivered[tid] = have
                with contextlib.suppress(Exception):
                    await self.pubs["home-7"].publish(ev.Delivery(trade_id=tid, site="home-7", meter="m1",
                                                                  role="consumer", delivered_wh=have))
            await asyncio.sleep(self.every_s)
