"""``gridtrade auction`` / ``python -m services.auction``: run the market."""

from __future__ import annotations

import sys

from services.bus.service import service_main

from .config import AuctionSettings
from .service import AuctionService


def main(argv: list[str] | None = None) -> int:
    return service_main(
        AuctionService, AuctionSettings, prog="gridtrade auction", argv=argv,
        description="Run the auction service: english auctions (default) and/or the double auction, and the "
                    "trade lifecycle. Configured by GRIDTRADE_* environment variables, e.g. "
                    "GRIDTRADE_AUCTION_MARKET=english|double|both, GRIDTRADE_AUCTION_MIN_INCREMENT_WEI_PER_KWH, "
                    "GRIDTRADE_AUCTION_CLEAR_INTERVAL_S, GRIDTRADE_AUCTION_OPERATOR, GRIDTRADE_AUCTION_BIND.")


if __name__ == "__main__":
    sys.exit(main())
