"""``python -m services.chain`` / ``gridtrade chain``: run the chain service.

``gridtrade chain account new|list|import`` (and ``gridtrade account ...``) manage the
site's keystore; see :mod:`services.chain.accounts`.
"""

from __future__ import annotations

import argparse
import sys

from services.bus import run_service


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "account":
        from .accounts import account_main

        return account_main(argv[1:])
    argparse.ArgumentParser(prog="gridtrade chain", description=__doc__).parse_args(argv)
    from .config import ChainSettings
    from .service import ChainService

    return run_service(ChainService, ChainSettings())


if __name__ == "__main__":
    raise SystemExit(main())
