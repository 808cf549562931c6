"""A site's agent: trades for the site's account within the limits its owner sets.

Every ``GRIDTRADE_AGENT_EVERY_S`` it reads the site's latest meter reading (battery,
PV and load: the forecast's observations), the account's balances from the site's own
wallet and the market's offers and trades from the auction, asks the pure strategy
(:mod:`services.agent.strategy`) what to do, and does it the way a person's click in the
wallet page does (:class:`services.trader.Trader`): the site's wallet signs every offer and
bid, so the agent holds no key and no passphrase. While the account is locked in the
wallet (the wallet restarted, or the login's unlock ran out) the agent waits and says so;
the owner's next login lets it go on.

The owner's limits are kept in the agent's store (``<data_dir>/agent.sqlite``): set in
the page (through the site's gateway: ``agent.limits``, from this site only) they survive a
restart; the ``GRIDTRADE_AGENT_*`` settings are only the first ones.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from typing import Any, ClassVar

from services.bus import Caller, RequestError, Service, refusals
from services.bus import commands as cmd
from services.bus import events as ev
from services.trader import Trader

from . import strategy, views
from .config import AgentSettings
from .forecast import Naive

log = logging.getLogger(__name__)

SCHEMA = "CREATE TABLE IF NOT EXISTS agent_limits (id INTEGER PRIMARY KEY CHECK (id = 1), limits TEXT NOT NULL)"
LOCKED = "the account is locked in the site's wallet: log in to the wallet page once to let the agent trade"


async def _nothing() -> None:
    return None


class AgentService(Service):
    name: ClassVar[str] = "agent"
    settings: AgentSettings

    def __init__(self, settings: AgentSettings) -> None:
        super().__init__(settings)
        with self.store.transaction() as conn:
            conn.execute(SCHEMA)
            row = conn.execute("SELECT limits FROM agent_limits WHERE id = 1").fetchone()
        self.limits = cmd.AgentLimits.model_validate_json(row[0]) if row else settings.first_limits()
        self.tariffs = strategy.Tariffs.of(settings)
        self.forecast = Naive()
        self.reading: ev.MeterReading | None = None
        self.roles: set[str] = set()  # of the site's meters: a producer meter to sell, a consumer meter to buy
        self.account = settings.agent_account
        self.waiting_for = "the first decision"
        self.last: dict[str, Any] = {}
        self.actions: collections.deque[cmd.AgentAction] = collections.deque(maxlen=20)
        self.counts: collections.Counter[str] = collections.Counter()
        self.wake = asyncio.Event()

    async def setup(self) -> None:
        s = self.settings
        wallet = self.client(s.wallet_rpc, s.wallet_site or s.site)
        auction = self.client(s.auction_rpc, s.auction_site)
        self.trader = Trader(wallet, auction, s.site)
        rpc = self.serve(s.agent_bind)
        rpc.handle(cmd.GetAgent, self.get)
        rpc.handle(cmd.SetAgentLimits, self.set_limits)
        self.subscribe([f"{ev.MeterReading.TYPE}.{s.site}"], self.on_reading, start="latest")
        self.spawn(self._loop(), name="agent-loop")

    # --- the owner's side -------------------------------------------------------------------

    def _own_site(self, caller: Caller) -> None:
        if not caller.may_act_for(self.settings.site):
            raise refusals.NotYourSite(f"only site {self.settings.site} sets its agent's limits")

    def state(self) -> cmd.AgentState:
        cap, floor = strategy.effective(self.limits, self.tariffs)
        r = self.reading
        return cmd.AgentState(
            site=self.settings.site, account=self.account,
            state="off" if not self.limits.enabled else ("waiting" if self.waiting_for else "trading"),
            waiting_for=self.waiting_for if self.limits.enabled else "", limits=self.limits,
            max_buy_wei_per_kwh=cap, min_sell_wei_per_kwh=floor, retail_wei_per_kwh=self.tariffs.retail_wei_per_kwh,
            feed_in_wei_per_kwh=self.tariffs.feed_in_wei_per_kwh, **self.last,
            soc=r.soc if r else None, sim_ts=r.sim_ts if r else None, actions=list(reversed(self.actions)))

    async def get(self, req: cmd.GetAgent, caller: Caller) -> cmd.AgentState:
        self._own_site(caller)
        return self.state()

    async def set_limits(self, req: cmd.SetAgentLimits, caller: Caller) -> cmd.AgentState:
        self._own_site(caller)
        with self.store.transaction() as conn:
            conn.execute("INSERT INTO agent_limits (id, limits) VALUES (1, ?) "
                         "ON CONFLICT (id) DO UPDATE SET limits = excluded.limits", (req.limits.model_dump_json(),))
        self.limits = req.limits
        log.info("the owner set the agent's limits: %s", req.limits.model_dump_json())
        self.wake.set()
        return self.state()

    # --- what it sees -------------------------------------------------------------------------

    def on_reading(self, env: Any, conn: Any) -> None:
        r = env.body
        if not isinstance(r, ev.MeterReading):
            return
        self.reading = r
        self.roles.add(r.role)
        if r.pv_w is not None and r.load_w is not None:
            self.forecast.observe(r.sim_ts if r.sim_ts is not None else env.ts, r.pv_w, r.load_w)

    # --- deciding and doing -----------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except RequestError as e:
                self.waiting_for = LOCKED if e.code == "locked" else f"{e.service or 'a service'}: {e.message}"
            except Exception:  # noqa: BLE001 - a bug in one round must not stop the agent
                log.exception("agent: a decision failed")
                self.waiting_for = "a decision failed (see the agent's log)"
            try:
                await asyncio.wait_for(self.wake.wait(), self.settings.agent_every_s)
            except asyncio.TimeoutError:
                pass
            self.wake.clear()

    async def _account(self) -> str:
        if not self.account:
            accounts: cmd.Accounts = await self.trader.wallet.request(cmd.ListAccounts())
            if not accounts.accounts:
                raise refusals.UnknownAccount("the site's wallet holds no account yet")
            self.account = accounts.accounts[0].address
        return self.account

    async def step(self) -> list[strategy.Action]:
        """One decision: read, decide, act. Returns what it did."""
        if not self.limits.enabled:
            self.waiting_for = ""
            return []
        r = self.reading
        if r is None:
            self.waiting_for = "a reading of the site's meter"
            return []
        me = await self._account()
        wallet, auction = self.trader.wallet, self.trader.auction
        double = self.settings.agent_market == "double"
        # its own trades, and the market's latest for the last clearing price (not the whole
        # day's trades of every site each decision: that grew with the sites and the hours)
        bal, offers, mine, latest, book = await asyncio.gather(
            wallet.request(cmd.GetBalances(address=me)), auction.request(cmd.ListOffers()),
            auction.request(cmd.ListTrades(account=me)), auction.request(cmd.ListTrades(last=1)),
            auction.request(cmd.ListOrders(calls=0)) if double else _nothing())
        mine_trades = mine.trades
        now_sim = r.sim_ts if r.sim_ts is not None else time.time()
        net = self.forecast.net_wh(now_sim, self.limits.horizon_s)
        site = views.site_view(me, bal, offers.offers, mine_trades, soc=r.soc, battery_wh=self.settings.agent_battery_wh,
                               forecast_net_wh=net, orders=book.orders if book is not None else ())
        market = views.market_view(me, offers.offers, latest.trades, now=time.time(),
                                   min_increment=self.settings.auction_min_increment_wei_per_kwh)
        self.last = {"forecast_net_wh": round(net, 1), "surplus_wh": strategy.surplus_wh(site, self.limits),
                     "deficit_wh": strategy.deficit_wh(site, self.limits)}
        if self.settings.agent_strategy == "utility" and double and book is not None:
            sides = frozenset(o.side for o in book.orders if o.state == "open" and o.account.lower() == me.lower())
            actions = strategy.decide_utility_double(me, self.limits, self.tariffs, site, open_sides=sides)
        elif self.settings.agent_strategy == "utility":
            actions = strategy.decide_utility(me, self.limits, self.tariffs, site, market)
        elif double:  # its open orders of the current call count as committed: one order per call
            actions = strategy.decide_double(me, self.limits, self.tariffs, site, market,
                                             slot=strategy.call_slot(time.time(), self.settings.auction_clear_interval_s))
        else:
            actions = strategy.decide_english(me, self.limits, self.tariffs, site, market)
        actions = views.doable(actions, self.roles)
        self.waiting_for = ""
        by_id = {o.offer_id: o for o in offers.offers}
        for a in actions:
            await self._do(me, a, by_id, offers.offers)
        return actions

    async def _do(self, me: str, a: strategy.Action, by_id: dict[str, cmd.OfferView],
                  offers: list[cmd.OfferView]) -> None:
        cid = f"agent:{self.settings.site}:{uuid.uuid4().hex}"
        if isinstance(a, strategy.PlaceOffer):
            kind, wh, price, offer_id = "offer", a.wh, a.start_price_wei_per_kwh, ""
        elif isinstance(a, strategy.PlaceBid):
            kind, wh, price, offer_id = "bid", by_id[a.offer_id].wh, a.price_wei_per_kwh, a.offer_id
        else:
            kind, wh, price, offer_id = "order", a.wh, a.limit_price_wei_per_kwh, ""
        ok, note = True, ""
        try:
            if isinstance(a, strategy.PlaceOffer):
                placed = await self.trader.sell(me, a.wh, a.start_price_wei_per_kwh,
                                                self.settings.agent_offer_duration_s, now=time.time(), cmd_id=cid)
                offer_id = placed.offer_id
            elif isinstance(a, strategy.PlaceBid):
                await self.trader.bid(me, by_id[a.offer_id], offers, a.price_wei_per_kwh, cmd_id=cid)
            else:
                offer_id = (await self.trader.order(me, a.side, a.wh, a.limit_price_wei_per_kwh, now=time.time(),
                                                    duration_s=self.settings.agent_offer_duration_s,
                                                    cmd_id=cid)).order_id
        except RequestError as e:
            if e.code == "locked":
                raise
            ok, note = False, f"{e.code}: {e.message}"
            log.info("agent: %s of %d Wh at %d wei/kWh refused: %s", kind, wh, price, note)
        self.counts[f"{kind}:{'ok' if ok else 'refused'}"] += 1
        sim_at = self.reading.sim_ts if self.reading is not None else None
        self.actions.append(cmd.AgentAction(at=time.time(), sim_at=sim_at, kind=kind, wh=wh,
                                            price_wei_per_kwh=price,
                                            offer_id=offer_id, ok=ok, note=note[:500]))
        if ok:
            log.info("agent: %s of %d Wh at %d wei/kWh placed (%s)", kind, wh, price, offer_id)

    def health(self) -> dict[str, Any]:
        st = self.state()
        return {**super().health(), "account": self.account, "agent": st.state, "waiting_for": st.waiting_for,
                "actions": dict(self.counts)}
