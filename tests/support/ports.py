"""Free loopback ports: one (:func:`free_port`) or a block (:func:`free_port_block`)."""

from __future__ import annotations

import pathlib
import random
import socket


def free_port() -> int:
    """A port free on 127.0.0.1 now (the kernel's choice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_block(size: int = 48) -> int:
    """A base port p with p .. p+size-1 free on loopback (``gridtrade up``'s plan uses
    p..p+45 for the bus, the services and anvil; put the two wallets at p+46, p+47)."""
    # below the kernel's ephemeral range: ports bound as tcp://...:* (replay endpoints) and
    # outgoing connections come from there, and could take a port of the block meanwhile
    try:
        low = int(pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(200):
        p = random.randrange(10000, max(10001, low - size), 50)
        if all(_port_free(q) for q in range(p, p + size)):
            return p
    raise RuntimeError(f"no block of {size} free loopback ports found")
