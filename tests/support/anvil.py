"""A real anvil node (node_modules/.bin/anvil) on a free loopback port: started, asked
whether it answers JSON-RPC, stopped with nothing left behind.

The fixtures over it (``anvil_url``, ``anvil_w3``, ``sync_anvil_w3``, ``embedded_w3`` and
``w3``, parametrized over both chains) are in :mod:`tests.support.plugin`; the benches call
:func:`start_anvil` and :func:`stop_anvil` directly.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import urllib.error
import urllib.request

from .poll import wait
from .paths import ROOT
from .ports import free_port

ANVIL = ROOT / "node_modules" / ".bin" / "anvil"
ANVIL_START_TIMEOUT_S = 30.0


def answers_rpc(url: str) -> bool:
    """True once a JSON-RPC node at ``url`` answers eth_chainId."""
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []}).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=1) as resp:
            return "result" in json.loads(resp.read())
    except (OSError, ValueError):
        return False


def start_anvil(*options: str) -> tuple[subprocess.Popen[bytes], str]:
    """Start anvil on a free port in its own process group (with more command-line
    ``options``, e.g. ``"--block-time", "2"``); return it and its URL once it answers."""
    if not ANVIL.exists():
        raise RuntimeError(f"{ANVIL} is missing; run `npm ci` in {ROOT}")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [str(ANVIL), "--port", str(port), "--silent", *options],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )

    def up() -> bool:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError(f"anvil exited with {proc.returncode}: {err}")
        return answers_rpc(url)

    def give_up(msg: str) -> None:
        stop_anvil(proc)
        raise RuntimeError(f"anvil did not answer on {url} within {ANVIL_START_TIMEOUT_S}s")

    wait(up, what=f"anvil to answer on {url}", timeout=ANVIL_START_TIMEOUT_S, fail=give_up)
    return proc, url


def stop_anvil(proc: subprocess.Popen[bytes]) -> None:
    """Stop anvil and reap it, leaving no process behind.

    node_modules/.bin/anvil is a node launcher that spawns the anvil binary; on SIGTERM the
    launcher kills itself before its child exits, which would orphan the child as a zombie.
    So the binary is terminated first (the launcher reaps it and exits); the whole process
    group is killed only as a fallback."""
    try:
        children = child_pids(proc.pid)
        if children:
            for pid in children:
                os.kill(pid, signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        proc.wait()
    if proc.stderr:
        proc.stderr.close()


def child_pids(pid: int) -> list[int]:
    """Child process ids of `pid` (Linux /proc; empty elsewhere)."""
    try:
        return [int(x) for x in pathlib.Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
