"""Chain fixtures: a real anvil node, the embedded py-evm chain, and `w3` over both.

Register with `pytest_plugins = ["tests.chain_fixtures"]` (or import * in a conftest).

- `anvil_url` (session): starts node_modules/.bin/anvil on a free loopback port, waits until it
  answers JSON-RPC, yields its URL and kills its process group at the end.
- `anvil_w3`: AsyncWeb3 over HTTP to that node, disconnected at teardown.
- `embedded_w3`: AsyncWeb3 over a fresh eth-tester (py-evm) chain per test.
- `w3`: parametrized over "embedded" and "anvil", so a test using it runs on both.
- `sync_anvil_w3`: synchronous Web3 over HTTP to the same node, for code that cannot await
  (hypothesis state machines).

Tests share the session's anvil node: they deploy their own contracts and measure balance
changes rather than absolute balances.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator

import pytest
import requests
from web3 import AsyncHTTPProvider, AsyncWeb3, HTTPProvider, Web3
from web3.providers.eth_tester import AsyncEthereumTesterProvider

from services.chain.bindings import close_provider
from tests.conftest import free_port

ROOT = pathlib.Path(__file__).resolve().parent.parent
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


def start_anvil() -> tuple[subprocess.Popen[bytes], str]:
    """Start anvil on a free port in its own process group; return it and its URL once it answers."""
    if not ANVIL.exists():
        raise RuntimeError(f"{ANVIL} is missing; run `npm ci` in {ROOT}")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [str(ANVIL), "--port", str(port), "--silent"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + ANVIL_START_TIMEOUT_S
    while not answers_rpc(url):
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError(f"anvil exited with {proc.returncode}: {err}")
        if time.monotonic() > deadline:
            stop_anvil(proc)
            raise RuntimeError(f"anvil did not answer on {url} within {ANVIL_START_TIMEOUT_S}s")
        time.sleep(0.05)
    return proc, url


def stop_anvil(proc: subprocess.Popen[bytes]) -> None:
    """Stop anvil and reap it, leaving no process behind.

    node_modules/.bin/anvil is a node launcher that spawns the anvil binary; on SIGTERM the
    launcher kills itself before its child exits, which would orphan the child as a zombie.
    So the binary is terminated first (the launcher reaps it and exits); the whole process
    group is killed only as a fallback."""
    try:
        children = _children(proc.pid)
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


def _children(pid: int) -> list[int]:
    """Child process ids of `pid` (Linux /proc; empty elsewhere)."""
    try:
        return [int(x) for x in pathlib.Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.fixture(scope="session")
def anvil_url() -> Iterator[str]:
    proc, url = start_anvil()
    try:
        yield url
    finally:
        stop_anvil(proc)


@pytest.fixture
async def anvil_w3(anvil_url: str) -> AsyncIterator[AsyncWeb3]:
    w3 = AsyncWeb3(AsyncHTTPProvider(anvil_url))
    try:
        yield w3
    finally:
        await close_provider(w3)


@pytest.fixture
def sync_anvil_w3(anvil_url: str) -> Iterator[Web3]:
    with requests.Session() as session:
        yield Web3(HTTPProvider(anvil_url, session=session))


@pytest.fixture
def embedded_w3() -> AsyncWeb3:
    """In-process chain: no connection, thread or task to clean up."""
    return AsyncWeb3(AsyncEthereumTesterProvider())


@pytest.fixture(params=["embedded", pytest.param("anvil", marks=pytest.mark.anvil)])
def w3(request: pytest.FixtureRequest) -> AsyncWeb3:
    """The same test on the embedded chain and on a real anvil node."""
    return request.getfixturevalue(f"{request.param}_w3")
