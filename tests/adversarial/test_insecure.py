"""What ``GRIDTRADE_INSECURE=1`` costs: without CURVE there is no identity on the bus.

The same hostile process, with no key at all, publishes a kWh in solar-1's name (solar-1's
topic and source, solar-1's reading id, to an address of its own): the hub cannot tell who
sent it and forwards it, the chain service's policy can only compare the body with the
source it claims, and a token is minted to the thief. This test documents that cost; it
is why the insecure mode logs at ERROR level and must never run a real micro-grid.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from web3 import Web3

from services import launcher

from .grid import AdvGrid, ev, grid_processes, module_of

THIEF = "0x" + "66" * 20


@pytest.fixture(scope="module")
def insecure_grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdvGrid]:
    root = tmp_path_factory.mktemp("insecure")
    plan = {p.name: p for p in launcher.plan(launcher.Options(data=root))}
    only = [n for n in grid_processes(root) if module_of(plan[n]) in ("services.bus", "services.chain")]
    g = AdvGrid(root, env={"GRIDTRADE_INSECURE": "1", "GRIDTRADE_HEARTBEAT_S": "0.5"}, insecure=True, only=only)
    try:
        yield g.start()
    finally:
        g.stop()


def test_without_curve_a_peer_publishing_in_another_sites_name_is_believed(insecure_grid: AdvGrid) -> None:
    g, chain = insecure_grid, insecure_grid.chain
    assert g.health(g.hub)["identity_checked"] is False
    claimed = "solar-1/main/4242"
    g.hostile("publish", {"frames": [ev("meter.energy_produced", "solar-1/meter", reading_id=claimed, site="solar-1",
                                        meter="main", account=THIEF, kwh_index=4242)]})
    # believed: the mint job is queued and the token minted to the thief's address
    g.wait("the forged mint to be minted", lambda: g.rows(
        chain, "chain", "SELECT 1 FROM chain_mints WHERE reading_id = ? AND account = ? AND state = 'done'",
        (claimed, Web3.to_checksum_address(THIEF))), timeout=30)
    # and nobody counted anything: the hub forwarded it, the subscriber's policy saw a body
    # that agrees with the source it claims
    assert g.health(g.hub)["hub_dropped"] == {}
    assert not any(k.startswith("policy:") for k in g.health(chain)["dropped"])
    # the policy still catches a body that contradicts its own claimed source, which stops nobody
    g.hostile("publish", {"frames": [ev("meter.energy_produced", "pretend/meter", reading_id="solar-1/main/4243",
                                        site="solar-1", meter="main", account=THIEF, kwh_index=4243)]})
    g.wait("the contradicting one to be refused",
           lambda: g.health(chain)["dropped"].get("policy:meter.energy_produced") == 1, timeout=30)
    assert not g.rows(chain, "chain", "SELECT 1 FROM chain_mints WHERE reading_id = 'solar-1/main/4243'")
