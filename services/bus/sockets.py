"""What every socket loop of the bus shares: sockets that close at once, and dropped
frames counted by cause."""

from __future__ import annotations

import logging

import zmq
import zmq.asyncio

from .retry import LogThrottle

log = logging.getLogger(__name__)


def open_socket(ctx: zmq.asyncio.Context, kind: int) -> zmq.asyncio.Socket:
    """A socket of ``kind`` with linger 0: closing it never waits for a peer."""
    sock = ctx.socket(kind)
    sock.linger = 0
    return sock


class DropCounter(LogThrottle):
    """Counts dropped frames by cause; logs them by the one rule of :mod:`.retry` (the first
    of each cause, then its 10th, 100th...).

    Bounded whatever a peer sends: causes are a fixed set (never built from what a peer
    sent, beyond a known event type), and besides at most ``MAX_CAUSES`` distinct causes
    are kept (any further cause is counted as ``other``), a cause is cut to 60 characters
    and a logged detail to 300."""

    MAX_CAUSES = 64

    def __init__(self, what: str) -> None:
        super().__init__(self.MAX_CAUSES)
        self.what = what

    def drop(self, cause: str, detail: str = "") -> None:
        cause = str(self.kind(str(cause)[:60]))
        if self.hit(cause):
            log.warning("%s: dropped a frame (%s) %r; %d so far of this cause (only counted, logged again at "
                        "the 10th, 100th...)", self.what, cause, detail[:300], self.counts[cause])
