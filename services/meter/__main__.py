"""``gridtrade meter`` / ``python -m services.meter``: run the site's meters.

``gridtrade meter emulate --driver line|modbus``: serve a meter protocol on a
pseudo-terminal, backed by the simulated site, and print the device to point a meter at.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys

from services.bus.service import configure_logging, run_service

from .config import MeterSettings


def _emulate(args: argparse.Namespace) -> int:
    from .emulator import make_emulator
    from .sim import SimParams, SimSite

    settings = MeterSettings()
    configure_logging(settings.log_level)
    params = settings.sim
    if args.sim:
        params = SimParams.model_validate({**params.model_dump(), **json.loads(args.sim)})
    if args.time_scale is not None:
        params = params.model_copy(update={"time_scale": args.time_scale})

    async def run() -> None:
        model = SimSite(params, args.role)
        emu = await make_emulator(args.driver, model, link=args.link, watchdog_s=args.watchdog,
                                  device_id=args.device_id).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        print(f"{args.driver} meter emulator ({args.role}) on {emu.device}"
              + (f" (link {args.link})" if args.link else ""), flush=True)
        print(emu.path, flush=True)
        try:
            await stop.wait()
        finally:
            await emu.close()

    asyncio.run(run())
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["emulate"]:
        p = argparse.ArgumentParser(prog="gridtrade meter emulate",
                                    description="Serve a meter protocol on a pseudo-terminal, backed by the "
                                                "simulated site (GRIDTRADE_SIM... as for the service).")
        p.add_argument("--driver", choices=["line", "modbus"], required=True)
        p.add_argument("--role", choices=["producer", "consumer"], default="producer")
        p.add_argument("--link", help="keep a symlink here pointing at the current pty")
        p.add_argument("--time-scale", type=float, default=None, help="simulated seconds per second")
        p.add_argument("--watchdog", type=float, default=None,
                       help="line: open the relay after this many seconds without a valid frame")
        p.add_argument("--device-id", type=int, default=1, help="modbus slave address")
        p.add_argument("--sim", help="JSON overrides of the simulated site (see services/meter/README.md)")
        return _emulate(p.parse_args(argv[1:]))
    p = argparse.ArgumentParser(
        prog="gridtrade meter",
        description="Run the meter service: read the site's meters (GRIDTRADE_METERS), sign and publish their "
                    "production with each meter's own key, drive relays from trades, publish readings and signed "
                    "delivery. "
                    "'gridtrade meter emulate --help' serves a meter on a pty.")
    p.parse_args(argv)
    from .service import MeterService

    return run_service(MeterService, MeterSettings())


if __name__ == "__main__":
    sys.exit(main())
