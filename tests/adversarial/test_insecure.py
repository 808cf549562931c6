"""What ``GRIDTRADE_INSECURE=1`` costs: without CURVE there is no identity on the bus.

The same hostile process, with no key at all, claims an address of its own as solar-1's
(``wallet.account`` in solar-1's name, signed by that address's key: the claim is only as
good as the topic it came under) and then publishes a kWh in solar-1's name (solar-1's
topic and source, solar-1's reading id) to that address: the hub cannot tell who sent
either and forwards both, the operator's policy can only compare each body with the
source it claims, the claim binds the thief's address to solar-1, and a token is minted to
the thief. This test documents that cost; it is why the insecure mode logs at ERROR level
and must never run a real micro-grid. (The grid: the hub and the market's operator on an
anvil node.)
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from eth_account import Account

from services import launcher
from services.bus import claims

from .grid import AdvGrid, ev, grid_processes, module_of, req, store_of

THIEF_KEY = bytes.fromhex("66" * 32)
THIEF = Account.from_key(THIEF_KEY).address


@pytest.fixture(scope="module")
def insecure_grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdvGrid]:
    root = tmp_path_factory.mktemp("insecure")
    plan = {p.name: p for p in launcher.plan(launcher.Options(data=root))}
    only = [n for n in grid_processes(root) if n == "anvil" or module_of(plan[n]) == "services.bus"
            or module_of(plan[n]) == "services.chain" and store_of(plan[n]) == "chain"]
    g = AdvGrid(root, env={"GRIDTRADE_INSECURE": "1", "GRIDTRADE_HEARTBEAT_S": "0.5"}, insecure=True, only=only,
                probe_wallet=False)
    try:
        yield g.start()
    finally:
        g.stop()


def test_without_curve_a_peer_publishing_in_another_sites_name_is_believed(insecure_grid: AdvGrid) -> None:
    g, chain = insecure_grid, insecure_grid.chain
    assert g.health(g.hub)["identity_checked"] is False
    claimed = "solar-1/main/4242"
    g.hostile("publish", {"frames": [
        ev("wallet.account", "solar-1/wallet", site="solar-1", address=THIEF, name="solar-1 producer",
           signature=claims.sign(THIEF_KEY, "solar-1")),
        ev("meter.energy_produced", "solar-1/meter", reading_id=claimed, site="solar-1", meter="main",
           account=THIEF, kwh_index=4242)]})
    # believed: the thief's address is solar-1's at the operator, and the token minted to it
    g.wait("the forged mint to be minted", lambda: g.rows(
        chain, "chain", "SELECT 1 FROM chain_mints WHERE reading_id = ? AND account = ? AND state = 'done'",
        (claimed, THIEF)), timeout=30)
    bal = g.requests("probe", "chain", req("chain.balances", address=THIEF))[0]["result"]
    assert (bal["site"], bal["tokens_wh"]) == ("solar-1", 1000), bal
    # and nobody counted anything: the hub forwarded both, the operator's policy saw bodies
    # that agree with the sources they claim, and the claim's signature is the address's key's
    h = g.health(chain)
    assert g.health(g.hub)["hub_dropped"] == {}
    assert not any(k.startswith("policy:") for k in h["dropped"])
    assert h["claims_refused"] == {} and h["mints_refused"] == {}
    # the policy still catches a body that contradicts its own claimed source, which stops nobody
    g.hostile("publish", {"frames": [ev("meter.energy_produced", "pretend/meter", reading_id="solar-1/main/4243",
                                        site="solar-1", meter="main", account=THIEF, kwh_index=4243)]})
    g.wait("the contradicting one to be refused",
           lambda: g.health(chain)["dropped"].get("policy:meter.energy_produced") == 1, timeout=30)
    assert not g.rows(chain, "chain", "SELECT 1 FROM chain_mints WHERE reading_id = 'solar-1/main/4243'")
