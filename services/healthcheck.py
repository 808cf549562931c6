"""``python -m services.healthcheck``: the container images' HEALTHCHECK.

One image runs every service, so the probe first finds out which one this container
runs: from its main process's command line (``/proc/1/cmdline``: ``gridtrade gateway``,
or ``docker-init -- gridtrade chain`` under compose's ``init: true``), then asks that
service's own health endpoint, on the address and port the service reads from the same
``GRIDTRADE_*`` variables:

- the gateway: ``/healthz`` on ``GRIDTRADE_HTTP_HOST``:``GRIDTRADE_HTTP_PORT``;
- the hub, chain, auction and meter services: ``/healthz`` on
  ``GRIDTRADE_METRICS_HOST``:``GRIDTRADE_METRICS_PORT``;
- anvil (the dev chain node's image, which has no ``gridtrade``): ``eth_chainId`` over
  JSON-RPC on its ``--host``/``--port``.

A bind address of every interface is asked on loopback. Exit 0 when healthy (or when the
container runs a one-shot command such as ``keys`` or ``account``), 1 otherwise, with the
reason on stdout (``docker inspect`` shows it).

Standard library only, and nothing of ``services`` imported: it runs every few seconds in
every container, and the dev chain node's image has only this file.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import urllib.request
from collections.abc import Mapping, Sequence

# the settings' defaults (tests/deploy/test_compose.py checks them against the settings classes)
DEFAULTS = {"http_host": "127.0.0.1", "http_port": 8080, "metrics_host": "127.0.0.1", "metrics_port": 0,
            "anvil_host": "127.0.0.1", "anvil_port": 8545}
BUS_SERVICES = ("chain", "auction", "meter")
ANY = ("0.0.0.0", "::", "[::]", "")


def _loopback(host: str) -> str:
    return "127.0.0.1" if host in ANY else host


def _option(argv: Sequence[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def target(argv: Sequence[str], env: Mapping[str, str]) -> tuple[str, str] | None:
    """What to ask for the container whose main command line is ``argv``: ("http", URL)
    for a /healthz, ("rpc", URL) for a JSON-RPC node, None for a one-shot command."""
    names = [pathlib.PurePath(a).name for a in argv]
    if "gridtrade" in names:
        args = list(argv[names.index("gridtrade") + 1:])
        if args[:1] == ["gateway"]:
            host = _option(args, "--host") or env.get("GRIDTRADE_HTTP_HOST", DEFAULTS["http_host"])
            port = _option(args, "--port") or env.get("GRIDTRADE_HTTP_PORT", str(DEFAULTS["http_port"]))
            return "http", f"http://{_loopback(host)}:{int(port)}/healthz"
        if args[:2] == ["bus", "hub"] or (args[:1] and args[0] in BUS_SERVICES and args[1:2] not in (
                ["account"], ["mining"])):
            port = int(env.get("GRIDTRADE_METRICS_PORT", DEFAULTS["metrics_port"]))
            if not port:
                raise LookupError("GRIDTRADE_METRICS_PORT is 0: the service serves no /healthz")
            host = env.get("GRIDTRADE_METRICS_HOST", str(DEFAULTS["metrics_host"]))
            return "http", f"http://{_loopback(host)}:{port}/healthz"
        return None
    if "anvil" in names:
        args = list(argv[names.index("anvil") + 1:])
        host = _option(args, "--host") or env.get("ANVIL_IP_ADDR", str(DEFAULTS["anvil_host"]))
        port = int(_option(args, "--port") or _option(args, "-p") or DEFAULTS["anvil_port"])
        return "rpc", f"http://{_loopback(host)}:{port}"
    raise LookupError(f"no gridtrade service or anvil in this container's command line {list(argv)}")


def probe(kind: str, url: str, timeout: float = 3.0) -> str:
    """Ask once; returns what the service said, raises OSError/ValueError when unhealthy."""
    if kind == "rpc":
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []}).encode()
        req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 - loopback, own container
            out = json.loads(r.read())
        if "result" not in out:
            raise ValueError(f"eth_chainId answered {out}")
        return f"chain id {int(out['result'], 16)}"
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - 503 (not ready) raises HTTPError
        return f"HTTP {r.status}"


def main_cmdline() -> list[str]:
    raw = pathlib.Path("/proc/1/cmdline").read_bytes()
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def main(argv: Sequence[str] | None = None) -> int:
    try:
        what = target(main_cmdline() if argv is None else argv, os.environ)
    except (LookupError, OSError, ValueError) as e:
        print(f"unhealthy: {e}")
        return 1
    if what is None:
        print("no long-running service in this container")
        return 0
    try:
        said = probe(*what)
    except (OSError, ValueError) as e:
        print(f"unhealthy: {what[1]}: {e}")
        return 1
    print(f"healthy: {what[1]}: {said}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or None))
