"""Meter keys: made once at the site, kept encrypted (keystore v3), the same after a
restart, never logged; what the meter publishes recovers to the address it announced."""

from __future__ import annotations

import json
import logging
import pathlib
import stat

import pytest
from eth_account import Account

from services.bus import typed
from services.chain.keystore import Keystore
from services.meter.errors import MeterKeyError
from services.meter.keys import load_or_create, passphrase
from services.meter.service import MeterService
from services.meter.sim import SimParams

from tests.support.bus import BusProbe, Grid
from tests.support.meter import ACCOUNT, NOON, Heartbeats, deploy, running, settings, status
from tests.support.poll import until

METERS = [{"name": "pv", "role": "producer"}, {"name": "grid", "role": "consumer"},
          {"name": "aux", "role": "consumer", "trade": False}]  # neither mints nor trades: no key


def test_a_key_is_made_once_and_unlocked_after(tmp_path: pathlib.Path) -> None:
    secret = passphrase(None, tmp_path)  # none configured: made at random, kept private
    file = tmp_path / "meter-passphrase"
    assert stat.S_IMODE(file.stat().st_mode) == 0o600 and passphrase(None, tmp_path) == secret
    k1 = load_or_create(tmp_path / "keys" / "pv", "pv", secret, scrypt_n=2**10)
    k2 = load_or_create(tmp_path / "keys" / "pv", "pv", secret, scrypt_n=2**10)
    assert (k1.address, k1.key, k1.path) == (k2.address, k2.key, k2.path)
    assert Account.from_key(k1.key).address == k1.address and k1.key.hex() not in repr(k1)
    with pytest.raises(MeterKeyError, match="wrong passphrase"):
        load_or_create(tmp_path / "keys" / "pv", "pv", secret + "x", scrypt_n=2**10)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(MeterKeyError, match="empty"):
        passphrase(empty, tmp_path)


async def test_keys_are_kept_encrypted_at_the_site_and_survive_a_restart(
        grid: Grid, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("correct horse battery staple\n")
    caplog.set_level(logging.DEBUG)
    s = settings(grid, "home-7", meters=METERS, meter_passphrase_file=secret_file)
    async with running(s) as svc:
        first = {name: m["key"] for name, m in svc.health()["meters"].items()}
    assert first["aux"] is None and first["pv"] != first["grid"]
    folder = grid.root / "home-7" / "meter-keys"
    assert sorted(p.name for p in folder.iterdir()) == ["grid", "pv"]
    keys = {}
    for name in ("pv", "grid"):
        (path,) = (folder / name).iterdir()
        data = json.loads(path.read_text())
        # keystore v3, scrypt, readable by the owner only; the key itself is nowhere in it
        assert data["version"] == 3 and data["crypto"]["kdf"] == "scrypt"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert "0x" + data["address"].lower() == first[name].lower()
        keys[name] = Keystore(folder / name).decrypt(first[name], "correct horse battery staple")
        assert Account.from_key(keys[name]).address == first[name]
        assert keys[name].hex() not in path.read_text()
    async with running(s) as svc:
        again = {name: m["key"] for name, m in svc.health()["meters"].items()}
    assert again == first
    assert all(len(list((folder / n).iterdir())) == 1 for n in ("pv", "grid"))
    # never logged, nor the passphrase
    assert all(k.hex() not in caplog.text for k in keys.values())
    assert "correct horse" not in caplog.text
    # a wrong passphrase: the service does not start
    secret_file.write_text("wrong\n")
    svc = MeterService(s)
    with pytest.raises(MeterKeyError, match="wrong passphrase"):
        await svc.start()
    await svc.stop()


async def test_what_a_meter_signs_recovers_to_the_address_it_announced(grid: Grid, bus: BusProbe) -> None:
    """A site with a producer and a consumer meter, buying in one trade and selling in
    another (each meter follows its own side's trade): each key is announced for the site's
    account (registry domain); production (token domain), the consumer's delivery and the
    producer's export (market domain) recover to the announced keys."""
    sim = SimParams(time_scale=20000, start=NOON, battery={"capacity_wh": 200000, "soc": 0.5})
    s = settings(grid, "home-7", account=ACCOUNT, meters=METERS, sim=sim, delivery_granularity_wh=0)
    dep = await deploy(bus)
    hb = Heartbeats(bus, ["t1", "t2"])
    try:
        async with running(s):
            await until(lambda: len(bus.of("meter.key")) == 2, what="two keys announced")
            await bus.publish(status("t1", "recorded"))  # home-7 buys: its consumer meter counts
            sale = status("t2", "recorded").model_copy(update={"seller_site": "home-7", "buyer_site": "solar-1"})
            await bus.publish(sale)  # home-7 sells: its producer meter counts the export
            await until(lambda: bus.of("meter.delivery", meter="grid") and bus.of("meter.delivery", meter="pv")
                        and bus.of("meter.energy_produced"), what="production, delivery and export")
    finally:
        await hb.stop()
    announced = {k.meter: k.address for k in bus.of("meter.key")}
    registry = typed.registry_domain(dep.chain_id, dep.registry)
    market = typed.market_domain(dep.chain_id, dep.market)
    token = typed.token_domain(dep.chain_id, dep.token)
    assert all(k.account == ACCOUNT and typed.recover_registration(registry, k.address, ACCOUNT, k.signature)
               == k.address for k in bus.of("meter.key"))
    assert all(typed.recover_production(token, announced["pv"], p.produced_wh, p.signature) == announced["pv"]
               for p in bus.of("meter.energy_produced"))
    assert all(typed.recover_delivery(market, "t1", d.delivered_wh, d.signature) == announced["grid"]
               == d.meter_address for d in bus.of("meter.delivery", meter="grid"))
    assert all(d.trade_id == "t1" for d in bus.of("meter.delivery", meter="grid"))
    assert all(d.trade_id == "t2" for d in bus.of("meter.delivery", meter="pv"))
    assert all(typed.recover_export(market, "t2", d.delivered_wh, d.signature) == announced["pv"]
               == d.meter_address for d in bus.of("meter.delivery", meter="pv"))
    # a signature of one kind is not another's: the export does not pass as a delivery
    d = bus.of("meter.delivery", meter="pv")[-1]
    assert typed.recover_delivery(market, "t2", d.delivered_wh, d.signature) != announced["pv"]
