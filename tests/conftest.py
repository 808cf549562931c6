"""Shared test fixtures: real sockets on loopback, per-test data dirs, and a guard that
fails a test which leaves asyncio tasks or threads running."""

from __future__ import annotations

import asyncio
import os
import pathlib
import socket
import threading

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def data_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


@pytest.fixture
def artifacts_dir() -> pathlib.Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(autouse=True)
async def no_leaked_tasks():
    """Fail a test that leaves asyncio tasks behind (threads are checked after it)."""
    before_threads = {t.ident for t in threading.enumerate()}
    yield
    current = asyncio.current_task()
    leftover = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
    for t in leftover:
        t.cancel()
    if leftover:
        await asyncio.gather(*leftover, return_exceptions=True)
        pytest.fail(f"test left {len(leftover)} asyncio task(s) running: {[t.get_coro() for t in leftover][:3]}")
    await asyncio.sleep(0)
    extra = [t for t in threading.enumerate() if t.ident not in before_threads and t.is_alive() and not t.daemon]
    if extra:
        pytest.fail(f"test left thread(s) running: {extra}")


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("GRIDTRADE_LOG_LEVEL", "INFO")
