"""``python -m services.chain`` / ``gridtrade chain``: run the chain service in its role
(``GRIDTRADE_CHAIN_ROLE``: the operator at the market, a wallet at a site; see
:mod:`services.chain.service`).

``gridtrade chain account new|list|import`` (and ``gridtrade account ...``) manage a
site's keystore (see :mod:`services.chain.accounts`); ``gridtrade chain mining
start|stop|status`` asks the market's operator to start or stop mining (with this host's
key: only the market's own site may start and stop it).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from services.bus import run_service


async def _mining(action: str) -> int:
    import zmq.asyncio

    from services.bus import RequestError, RequestTimeout, RpcClient, Security
    from services.bus import commands as C

    from .config import ChainSettings

    s = ChainSettings()
    ctx = zmq.asyncio.Context()
    sec = Security(s.keys, s.site, insecure=s.insecure)
    client = RpcClient(ctx, sec, s.chain_rpc, server_site=s.chain_site, timeout_s=s.rpc_timeout_s)
    try:
        r: C.Mining = await client.request(C.SetMining(action=action))  # type: ignore[arg-type]
    except (RequestError, RequestTimeout) as e:
        print(f"gridtrade chain mining: {e}", file=sys.stderr)
        return 1
    finally:
        await client.close()
        ctx.destroy(0)
    state = "on" if r.mining else "off"
    print(f"mining {state} ({r.detail})" if r.supported else f"mining cannot be controlled here: {r.detail}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "account":
        from .accounts import account_main

        return account_main(argv[1:])
    if argv and argv[0] == "mining":
        p = argparse.ArgumentParser(prog="gridtrade chain mining",
                                    description="start or stop mining at the market's operator (the market's key "
                                                "only; GRIDTRADE_CHAIN_RPC names it), or show whether blocks are mined")
        p.add_argument("action", choices=["start", "stop", "status"])
        return asyncio.run(_mining(p.parse_args(argv[1:]).action))
    argparse.ArgumentParser(prog="gridtrade chain", description=__doc__).parse_args(argv)
    from .config import ChainSettings
    from .service import role_class

    settings = ChainSettings()
    return run_service(role_class(settings), settings)


if __name__ == "__main__":
    raise SystemExit(main())
