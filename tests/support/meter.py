"""The meter tests' pieces: a meter service's settings and run, and what they publish as
the market (the operator's deployment, trade states, the auction's heartbeat)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from services.bus.events import Deployment, TradeHeartbeat, TradeStatus
from services.meter.config import MeterSettings
from services.meter.emulator import LineEmulator, ModbusEmulator
from services.meter.service import MeterService

from .bus import BusProbe, Grid
from .poll import until

ACCOUNT = "0x" + "ab" * 20


def deployment(n: int = 1) -> Deployment:
    """The operator's contracts, as ``chain.deployment`` announces them (the ``n``-th deployment)."""
    return Deployment(chain_id=31337, genesis="0x" + "00" * 32, token="0x" + f"{0xa0 + n:02x}" * 20,
                      market="0x" + f"{0xb0 + n:02x}" * 20, registry="0x" + f"{0xc0 + n:02x}" * 20, deploy_block=n,
                      deployment=f"d{n}")


async def deploy(probe: BusProbe, n: int = 1) -> Deployment:
    """Announce the ``n``-th deployment as the market's chain service."""
    dep = deployment(n)
    await probe.publish(dep)
    return dep


SELLER, BUYER = "0x" + "11" * 20, "0x" + "22" * 20
NOON = "2024-06-21T10:00:00Z"


def settings(grid: Grid, site: str, **kw: object) -> MeterSettings:
    base = dict(site=site, data_dir=grid.root / site, keys_dir=grid.keys, hub_pub=grid.hub_pub,
                hub_sub=grid.hub_sub, heartbeat_s=0.2, reading_interval_s=0.1, trade_timeout_s=1.0,
                backoff_initial_s=0.05, backoff_max_s=0.4, meter_scrypt_n=2**10)
    base.update(kw)
    return MeterSettings(**base)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def running(s: MeterSettings):  # type: ignore[no-untyped-def]
    svc = MeterService(s)
    try:
        await svc.start()
        yield svc
    finally:
        await svc.stop()


def status(trade_id: str, state: str, **kw: object) -> TradeStatus:
    return TradeStatus(trade_id=trade_id, state=state, seller=SELLER, buyer=BUYER, seller_site="solar-1",  # type: ignore[arg-type]
                       buyer_site="home-7", wh=5000, price_wei_per_kwh=10**15, **kw)


class Heartbeats:
    """The auction's trade heartbeat, switchable."""

    def __init__(self, bus: BusProbe, live: list[str]) -> None:
        self.bus, self.live, self.on = bus, live, True
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            if self.on:
                await self.bus.publish(TradeHeartbeat(live=list(self.live)))
            await asyncio.sleep(0.2)

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


def consumer_settings(grid: Grid, port: str, *, driver: str = "line", timeout_s: float = 0.5,
                      **kw: object) -> MeterSettings:
    """home-7 with one consumer meter, "grid", on the emulator at ``port``: rated 1 kW, its
    site running an hour per second."""
    return settings(grid, "home-7", meters=[{"name": "grid", "role": "consumer", "driver": driver, "port": port,
                                            "timeout_s": timeout_s, "time_scale": 3600, "rated_w": 1000}], **kw)


@contextlib.asynccontextmanager
async def in_a_live_trade(bus: BusProbe, s: MeterSettings, emu: LineEmulator | ModbusEmulator,  # type: ignore[no-untyped-def]
                          relay_closed: Callable[[], bool]):
    """The meter service of ``s`` for the deployment, with trade t1 recorded and kept live by
    its heartbeat, once the relay has closed (``relay_closed`` reads the meter); yields the
    service. On leaving: the service stops, then the heartbeat, then the emulator."""
    hb = Heartbeats(bus, ["t1"])
    await deploy(bus)
    try:
        async with running(s) as svc:
            await bus.publish(status("t1", "recorded"))
            await until(relay_closed, what="relay closed")
            yield svc
    finally:
        await hb.stop()
        await emu.close()
