"""``python -m services.bus`` / ``gridtrade bus hub``: run the micro-grid's hub."""

from __future__ import annotations

import argparse
from typing import Any

from pydantic import Field

from .config import BusSettings
from .hub import Hub
from .keys import Security
from .service import Service, run_service


class HubSettings(BusSettings):
    pub_bind: str = Field(default="tcp://127.0.0.1:5550", description="XSUB side: publishers connect here")
    sub_bind: str = Field(default="tcp://127.0.0.1:5551", description="XPUB side: subscribers connect here")


class HubService(Service):
    name = "hub"
    settings: HubSettings

    async def setup(self) -> None:
        s = self.settings
        self.hub = Hub(Security(s.keys, s.site, insecure=s.insecure), pub_bind=s.pub_bind, sub_bind=s.sub_bind)
        self.hub.start()

    async def teardown(self) -> None:
        self.hub.stop()

    def health(self) -> dict[str, Any]:
        return {**super().health(), "endpoints": list(self.hub.endpoints)}


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="gridtrade bus hub", description=__doc__).parse_args(argv)
    return run_service(HubService, HubSettings())


if __name__ == "__main__":
    raise SystemExit(main())
