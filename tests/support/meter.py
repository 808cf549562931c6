"""What the meter tests publish as the market: the operator's deployment."""

from __future__ import annotations

from services.bus.events import Deployment

from .bus import BusProbe

ACCOUNT = "0x" + "ab" * 20


def deployment(n: int = 1) -> Deployment:
    """The operator's contracts, as ``chain.deployment`` announces them (the ``n``-th deployment)."""
    return Deployment(chain_id=31337, genesis="0x" + "00" * 32, token="0x" + f"{0xa0 + n:02x}" * 20,
                      market="0x" + f"{0xb0 + n:02x}" * 20, registry="0x" + f"{0xc0 + n:02x}" * 20, deploy_block=n,
                      deployment=f"d{n}")


async def deploy(probe: BusProbe, n: int = 1) -> Deployment:
    """Announce the ``n``-th deployment as the market's chain service."""
    dep = deployment(n)
    await probe.publish(dep)
    return dep
