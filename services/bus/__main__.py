"""``python -m services.bus`` / ``gridtrade bus hub``: run the micro-grid's hub."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily
from pydantic import Field

from .config import BusSettings
from .hub import Hub
from .service import Service, run_service


class HubSettings(BusSettings):
    pub_bind: str = Field(default="tcp://127.0.0.1:5550", description="XSUB side: publishers connect here")
    sub_bind: str = Field(default="tcp://127.0.0.1:5551", description="XPUB side: subscribers connect here")


class _HubMetrics:
    """/metrics: what the hub forwarded and dropped (by cause and sending site)."""

    def __init__(self, service: HubService) -> None:
        self.service = service

    def collect(self) -> Iterator[CounterMetricFamily]:
        hub = self.service.hub
        if hub is None:
            return
        fwd = CounterMetricFamily("gridtrade_hub_forwarded", "messages the hub forwarded")
        fwd.add_metric([], hub.forwarded)
        yield fwd
        dropped = CounterMetricFamily("gridtrade_hub_dropped", "messages the hub dropped", labels=["cause", "site"])
        for (cause, site), n in sorted(hub.drop_counts().items()):
            dropped.add_metric([cause, site], n)
        yield dropped


class HubService(Service):
    name = "hub"
    settings: HubSettings

    def __init__(self, settings: HubSettings) -> None:
        super().__init__(settings)
        self.hub: Hub | None = None  # its sockets are opened in setup()

    async def setup(self) -> None:
        s = self.settings
        # the hub's sockets live on a context of their own (a sync one, for the proxy thread)
        self.hub = Hub(self.security.for_context(), pub_bind=s.pub_bind, sub_bind=s.sub_bind)
        self.registry.register(_HubMetrics(self))  # type: ignore[arg-type]
        self.hub.start()

    async def teardown(self) -> None:
        if self.hub is not None:
            self.hub.stop()

    def health(self) -> dict[str, Any]:
        hub = self.hub
        if hub is None:  # not set up
            return super().health()
        return {**super().health(), "endpoints": list(hub.endpoints), "identity_checked": hub.checks,
                "forwarded": hub.forwarded,
                "hub_dropped": {f"{cause}/{site}": n for (cause, site), n in sorted(hub.drop_counts().items())}}


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="gridtrade bus hub", description=__doc__).parse_args(argv)
    return run_service(HubService, HubSettings())


if __name__ == "__main__":
    raise SystemExit(main())
