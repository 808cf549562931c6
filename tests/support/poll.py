"""Waiting for a condition: the one polling loop of the tests.

``await until(check, what=...)`` polls ``check`` (a function, sync or async) every
``every`` seconds until it returns something truthy, and returns that. ``wait(...)`` is
the same loop for code that cannot await (subprocess grids started from sync fixtures).
Exceptions of the types in ``retry_on`` count as "not yet" (e.g. ``AssertionError`` from
a check written with asserts, or a refused connection while a service restarts).

On timeout the loop calls ``fail`` with a message naming ``what`` and the last result (a
grid passes one that adds its service logs); by default it raises :class:`Timeout`, an
``AssertionError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn


class Timeout(AssertionError):
    """A condition not met in time."""


def _raise(msg: str) -> NoReturn:
    raise Timeout(msg)


class _Poll:
    """The loop's state: the deadline, the last result, and what to do at the deadline."""

    def __init__(self, what: str, timeout: float, retry_on: tuple[type[BaseException], ...],
                 fail: Callable[[str], Any] | None) -> None:
        self.what, self.timeout, self.retry_on = what, timeout, retry_on
        self.fail = fail or _raise
        self.deadline = time.monotonic() + timeout
        self.last: Any = None

    @contextlib.contextmanager
    def trying(self) -> Iterator[None]:
        """Around one try: an exception of a ``retry_on`` type is its result (not yet)."""
        try:
            yield
        except self.retry_on as e:
            self.last = e

    def give_up_if_late(self) -> None:
        """After a falsy try: past the deadline, fail."""
        if time.monotonic() > self.deadline:
            self.fail(f"waited {self.timeout:g} s for {self.what}; last: {self.last!r}")
            raise Timeout(self.what)  # a fail() that returned


async def until(check: Callable[[], Any], *, what: str = "condition", timeout: float = 30.0, every: float = 0.05,
                retry_on: tuple[type[BaseException], ...] = (), fail: Callable[[str], Any] | None = None) -> Any:
    """Await ``check()``'s first truthy result (``check`` may be async)."""
    p = _Poll(what, timeout, retry_on, fail)
    while True:
        with p.trying():
            r = check()
            if inspect.isawaitable(r):
                r = await r
            if r:
                return r
            p.last = r
        p.give_up_if_late()
        await asyncio.sleep(every)


def wait(check: Callable[[], Any], *, what: str = "condition", timeout: float = 30.0, every: float = 0.05,
         retry_on: tuple[type[BaseException], ...] = (), fail: Callable[[str], Any] | None = None) -> Any:
    """Block until ``check()`` returns something truthy, and return it."""
    p = _Poll(what, timeout, retry_on, fail)
    while True:
        with p.trying():
            if r := check():
                return r
            p.last = r
        p.give_up_if_late()
        time.sleep(every)
