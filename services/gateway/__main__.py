"""``gridtrade gateway`` / ``python -m services.gateway``: the web UI and API of one site."""

from __future__ import annotations

import argparse
import sys

from services.bus import run_service

from .config import GatewaySettings
from .service import GatewayService


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gridtrade gateway",
        description="Serve the web UI, the REST API (/api, OpenAPI at /api/openapi.json), the websocket "
                    "(/api/ws), /metrics and /healthz of one site. Configured by GRIDTRADE_* environment "
                    "variables: GRIDTRADE_SITE (this site's name), GRIDTRADE_HTTP_HOST, GRIDTRADE_HTTP_PORT "
                    "(default 127.0.0.1:8080), GRIDTRADE_CHAIN_RPC, GRIDTRADE_AUCTION_RPC, GRIDTRADE_HUB_SUB, "
                    "GRIDTRADE_SESSION_TTL_S, GRIDTRADE_COOKIE_SECURE.")
    parser.add_argument("--host", help="override GRIDTRADE_HTTP_HOST")
    parser.add_argument("--port", type=int, help="override GRIDTRADE_HTTP_PORT")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    overrides = {k: v for k, v in (("http_host", args.host), ("http_port", args.port)) if v is not None}
    return run_service(GatewayService, GatewaySettings(**overrides))


if __name__ == "__main__":
    sys.exit(main())
