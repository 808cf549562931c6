"""``gridtrade agent`` / ``python -m services.agent``: trade for one site within its owner's limits."""

from __future__ import annotations

import sys

from services.bus.service import service_main

from .config import AgentSettings
from .service import AgentService


def main(argv: list[str] | None = None) -> int:
    return service_main(
        AgentService, AgentSettings, prog="gridtrade agent", argv=argv,
        description="Run a site's agent: it sells the site's forecast surplus and buys its forecast deficit within "
                    "the owner's limits, signing through the site's own wallet. Configured by GRIDTRADE_* "
                    "environment variables, e.g. GRIDTRADE_SITE, GRIDTRADE_AGENT_ACCOUNT, GRIDTRADE_AGENT_ENABLED, "
                    "GRIDTRADE_AGENT_RESERVE_SOC, GRIDTRADE_AGENT_MAX_TRADE_WH, GRIDTRADE_TARIFF_RETAIL_WEI_PER_KWH.")


if __name__ == "__main__":
    sys.exit(main())
