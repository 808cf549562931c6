"""What ``GRIDTRADE_INSECURE=1`` costs: without CURVE there is no identity on the bus.

Contracts v2 check every signature, but which site an account and a meter key belong to
is still the bus's word: the registrar registers a meter key only for an account its own
site claimed, and both the claim and the meter key's announcement are believed for the
site whose topic and source they came under. The same hostile process, with no key at
all, claims an address of its own as solar-1's (``wallet.account`` in solar-1's name,
signed by that address's key: the claim is only as good as the topic it came under),
announces a meter key of its own for it in solar-1's name (``meter.key``, the key's own
signature) and publishes that meter's signed production: the hub cannot tell who sent
any of them and forwards all three, the operator's policy can only compare each body
with the source it claims, the registrar registers the thief's meter as solar-1's, and
the token mints the thief's production to the thief's address, which the market now takes
for solar-1's. This test documents that cost; it is why the insecure mode logs at ERROR
level and must never run a real micro-grid. (The grid: the hub and the market's operator
on an anvil node.)
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from eth_account import Account

from services import launcher
from services.bus import claims
from services.bus import events as E
from tests.support.signing import Meter

from .grid import AdvGrid, frame, grid_processes, module_of, req, store_of

SOLAR = launcher.PRODUCER
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
    v, d = g.chain_view(), g.domains()
    assert g.health(g.hub)["identity_checked"] is False
    meter = Meter(site=SOLAR, account=THIEF, name="main")  # the thief's own meter key
    g.hostile("publish", {"frames": [
        frame(E.WalletAccount(site=SOLAR, address=THIEF, name="solar-1 producer",
                               signature=claims.sign(THIEF_KEY, SOLAR)), f"{SOLAR}/wallet"),
        frame(meter.announce(d), f"{SOLAR}/meter"),
        frame(meter.production(d, 4242), f"{SOLAR}/meter")]})
    # believed: the thief's address is solar-1's at the operator, its meter registered for it, its production minted
    g.wait("the forged production to be minted", lambda: v.token.functions.balanceOf(THIEF).call() == 4242,
           timeout=60)
    assert v.registry.functions.accountOf(meter.address).call() == THIEF
    assert g.rows(chain, "chain", "SELECT site, account, state FROM job_meters WHERE meter = ?",
                  (meter.address,)) == [(SOLAR, THIEF, "done")]
    bal = g.requests("probe", "chain", req("chain.balances", address=THIEF))[0]["result"]
    assert (bal["site"], bal["tokens_wh"]) == (SOLAR, 4242), bal
    # and nobody counted anything: the hub forwarded all three, the operator's policy saw bodies
    # that agree with the sources they claim, and every signature is the key's own
    h = g.health(chain)
    assert g.health(g.hub)["hub_dropped"] == {}
    assert not any(k.startswith("policy:") for k in h["dropped"])
    assert h["claims_refused"] == {} and h["meter_keys_refused"] == {} and h["production_refused"] == {}
    # the policy still catches a body that contradicts its own claimed source, which stops nobody
    g.hostile("publish", {"frames": [frame(meter.production(d, 5000), "pretend/meter")]})
    g.wait("the contradicting one to be refused",
           lambda: g.health(chain)["dropped"].get("policy:meter.energy_produced") == 1, timeout=30)
    assert v.token.functions.balanceOf(THIEF).call() == 4242
    assert g.rows(chain, "chain", "SELECT produced_wh FROM job_production WHERE meter = ?", (meter.address,)) == [
        (4242,)]
