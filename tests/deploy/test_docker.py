"""The images built and the sites trading in a real Docker engine.

What a user does with the official base images, here on local stand-ins (see
``engine.py``: every instruction after ``FROM`` is the same):

1. Build the two images of the Dockerfile (``gridtrade``, ``anvil``) and check them: a
   virtual environment holding the packages, a non-root user, a HEALTHCHECK, no pip, and
   the build's CA bundle (a build secret) nowhere in them.
2. With docker-compose, the real ``docker-compose.yml`` plus a test override (the host's
   network, loopback addresses, free ports): create each site's account in its own
   wallet's volume (``run --rm wallet-producer chain account new``), then ``up`` the
   profiles market, chain-node, producer and consumer; wait until the images'
   health checks say every service is healthy.
3. A whole trade through the REST API of the two site gateways (tests/e2e/flow.py, the
   same steps as the end-to-end tests), every balance read from the chain node's
   JSON-RPC. Mid-delivery, the consumer wallet's service process is killed with SIGKILL
   inside its container and compose's restart policy brings it back; the consumer's meter
   container is stopped with ``docker kill`` (a container killed by hand stays down:
   Docker's restart policies leave it alone) and started again with ``docker-compose
   start``. The trade completes: balances exact to the wei, nothing lost or doubled.
4. ``docker-compose down`` leaves the volumes; a second ``up`` goes on from the same
   state: the same contracts, balances, trade history, keystores (the same passphrase
   logs in), gateway sessions (the cookie from before still works), and the producer's
   meter carries on minting where it stopped (its signed counter goes on; nothing minted twice).

The build and start-up times and the image sizes are printed at the end of the run.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import json
import os
import pathlib
import secrets
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests
from web3 import HTTPProvider, Web3

from services.bus import ensure_keys
from services.bus import events as E
from tests.support.paths import ARTIFACTS
from tests.support.plan import health_at
from tests.support.ports import free_port_block
from tests.e2e.flow import CLOSE_AT_WH, check_final, relay_audit, retrying, run_trade
from tests.e2e.harness import SIM_START, TEST_SITE, Grid, User, watch_bus
from tests.e2e.test_kill import _nothing_twice

from .engine import (CA_BUNDLE, REPORT, Engine, Ports, Project, Unavailable, build, health_target, image_size,
                     standin_bases, standin_refs, timed)

IMAGE = "gridtrade:test-standin"
ANVIL_IMAGE = "gridtrade-anvil:test-standin"
PROFILES = ("market", "chain-node", "producer", "consumer")
PROJECT_PREFIX = "gtdeploy"  # the test's compose projects: gtdeploy<random>
UID = 10001  # the images' user
# the launcher's names (tests/e2e/flow.py asks for these) -> the compose services
ALIASES = {"meter-solar-1": "meter-producer", "meter-home-7": "meter-consumer", "wallet-solar-1": "wallet-producer",
           "wallet-home-7": "wallet-consumer", "gateway-solar-1": "gateway-producer",
           "gateway-home-7": "gateway-consumer"}

# the meters as in tests/e2e/test_kill.py: a slow line (100 W), so delivery lasts through
# the restarts, and the cross-check loosened (a simulated meter counts no flow while its
# container is down; see there); a consumer without PV and with a low battery; deliveries
# every 50 Wh
LINE = {"GRIDTRADE_SIM__LINE_W": "100", "GRIDTRADE_SIM__START": SIM_START, "GRIDTRADE_MISMATCH_TOLERANCE": "1",
        "GRIDTRADE_LAG_S": "600"}
METER_ENV = {
    "meter-producer": LINE,
    "meter-consumer": {**LINE, "GRIDTRADE_SIM__PANEL__AREA_M2": "0", "GRIDTRADE_SIM__BATTERY__SOC": "0.1",
                       "GRIDTRADE_DELIVERY_GRANULARITY_WH": "50"},
    # the operator settles each of them (its default is every 1000 Wh, for gas), so the
    # payments are seen to grow in steps, as in tests/e2e/test_kill.py
    "chain": {"GRIDTRADE_SETTLE_EVERY_WH": "50"},
}
CLOSE_AT = 300  # Wh: the consumer closes soon after the restarts, well before the 2 kWh are through


@dataclass
class Images:
    engine: Engine
    workdir: pathlib.Path


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Images]:
    """A Docker engine (started here when none runs), the stand-in bases and the images."""
    work = tmp_path_factory.mktemp("docker")
    t0 = time.monotonic()
    try:
        engine = Engine.find_or_start(work)
    except Unavailable as e:
        REPORT["skipped"] = f"no Docker engine: {e}"
        pytest.skip(REPORT["skipped"])
    REPORT["engine"] = f"{engine.answers()} ({'started by the test' if engine.daemon else 'already running'})"
    try:
        engine.remove_projects(PROJECT_PREFIX)
        try:
            had = {ref: engine.has_image(ref) for ref in standin_refs()}
            with timed("stand-in bases"):
                args = standin_bases(engine, work)
        except Unavailable as e:
            REPORT["skipped"] = f"no stand-in base image: {e}"
            pytest.skip(REPORT["skipped"])
        REPORT["bases"] = {ref: "kept by the engine" if had[ref] else "built" for ref in args.values()}
        for target, tag in (("gridtrade", IMAGE), ("anvil", ANVIL_IMAGE)):
            log = work / f"build-{target}.log"
            with timed(f"build {target} image"):
                build(engine, target, tag, args, log)
            REPORT.setdefault("build steps from the layer cache", {})[target] = log.read_text().count(" CACHED")
        REPORT["image sizes (MB)"] = {ref: round(image_size(engine, ref) / 1e6, 1) for ref in (IMAGE, ANVIL_IMAGE)}
        REPORT["base sizes (MB)"] = {ref: round(image_size(engine, ref) / 1e6, 1) for ref in args.values()}
        yield Images(engine, work)
    finally:
        engine.stop()
        REPORT.setdefault("seconds", {})["the Docker tests in all (engine start to stop)"] = round(
            time.monotonic() - t0, 1)


# --- the images ---------------------------------------------------------------------------


def _pem_certs(text: str) -> list[str]:
    out, cur = [], []
    for line in text.splitlines():
        if "BEGIN CERTIFICATE" in line:
            cur = []
        elif "END CERTIFICATE" in line:
            out.append("".join(cur))
        else:
            cur.append(line.strip())
    return out


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_images(images: Images) -> None:
    engine = images.engine
    svc = engine.inspect(IMAGE)["Config"]
    assert svc["User"] == "gridtrade", svc["User"]
    assert svc["Entrypoint"] == ["gridtrade"]
    assert svc["Healthcheck"]["Test"] == ["CMD", "python", "-m", "services.healthcheck"], svc["Healthcheck"]
    assert any(e.startswith("PATH=/opt/venv/bin:") for e in svc["Env"]), svc["Env"]
    anvil = engine.inspect(ANVIL_IMAGE)["Config"]
    assert anvil["User"] == "anvil" and anvil["Entrypoint"] == ["anvil"], anvil
    assert anvil["Healthcheck"]["Test"][:2] == ["CMD", "python3"], anvil["Healthcheck"]
    # nothing of the build's CA bundle in their settings
    for cfg in (svc, anvil):
        assert not [e for e in cfg["Env"] if "CERT" in e or "CA_BUNDLE" in e or "cafile" in e], cfg["Env"]
    # the packages are in the virtual environment; pip is not in the image; the user is not root
    out = engine.run("run", "--rm", "--network", "none", "--entrypoint", "python", IMAGE, "-c",
                     "import json, os, shutil, sys, services, web3, zmq, pandas, pvlib; print(json.dumps("
                     "{'prefix': sys.prefix, 'pip': shutil.which('pip') or shutil.which('pip3'), "
                     "'uid': os.getuid(), 'services': services.__file__}))").stdout
    info = json.loads(out.strip().splitlines()[-1])
    assert info["prefix"] == "/opt/venv" and info["services"].startswith("/opt/venv/lib/"), info
    assert info["pip"] is None and info["uid"] == UID, info
    assert "usage" in engine.run("run", "--rm", "--network", "none", IMAGE, "chain", "--help").stdout
    assert "anvil" in engine.run("run", "--rm", "--network", "none", ANVIL_IMAGE, "--version").stdout
    # the CA certificates this machine's bundle has beyond the image's own (a proxy's CA):
    # in no file of either image, as PEM text or as DER bytes
    if not CA_BUNDLE.is_file():
        return
    host = _pem_certs(CA_BUNDLE.read_text(errors="replace"))
    own = engine.run("run", "--rm", "--network", "none", "--entrypoint", "cat", IMAGE,
                     "/etc/ssl/certs/ca-certificates.crt").stdout
    extra = [c for c in host if c not in set(_pem_certs(own))]
    REPORT["CA certificates only in the build secret"] = len(extra)
    if not extra:
        return
    needles = [c[64:128].encode() for c in extra] + [base64.b64decode(c)[40:104] for c in extra]
    for ref in (IMAGE, ANVIL_IMAGE):
        found = [path for path, data in engine.files(ref) if any(n in data for n in needles)]
        assert not found, f"{ref}: the build's CA bundle is baked into {found}"


# --- the sites in compose -----------------------------------------------------------------


@dataclass
class ComposeGrid(Grid):
    """tests/e2e's Grid, its services being the containers of a compose project."""

    project: Project | None = None
    urls: dict[str, str] = field(default_factory=dict)  # service -> its /healthz

    def health(self, name: str) -> dict[str, Any] | None:
        return health_at(self.urls[ALIASES.get(name, name)])

    def log_tails(self, lines: int = 40) -> str:
        assert self.project is not None
        return self.project.logs(lines)


LONG_RUNNING = ("hub", "chain", "auction", "anvil", "wallet-producer", "meter-producer", "gateway-producer",
                "wallet-consumer", "meter-consumer", "gateway-consumer")


async def wait_healthy(grid: ComposeGrid, services: tuple[str, ...] = LONG_RUNNING, timeout: float = 240) -> None:
    """Until Docker reports each container healthy (the image's HEALTHCHECK: the service's
    own /healthz) and the one-shot key services have exited 0."""
    project = grid.project
    assert project is not None

    def states() -> dict[str, Any]:
        got = project.states()
        for name, st in got.items():
            if name.startswith("keys-") and st["status"] == "exited" and st["exit"] != 0:
                raise RuntimeError(f"{name} failed: {st}\n{project.logs(40)}")
        bad = {s: got.get(s) for s in services if (got.get(s) or {}).get("health") != "healthy"}
        assert not bad, f"not healthy yet: {bad}"
        return got

    await grid.until(f"{', '.join(services)} to be healthy", states, timeout=timeout, every=1.0)


async def sigkill_service(grid: ComposeGrid, service: str) -> None:
    """SIGKILL the service's process inside its container, as a crash or the kernel's OOM
    killer would: the container exits (137) and the restart policy starts it again."""
    project = grid.project
    assert project is not None
    before = project.state(service)
    pids = project.service_pids(service)
    assert pids, f"{service}: no process under the container's init"
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    def restarted() -> bool:
        st = project.state(service)
        assert st["restarts"] > before["restarts"] and st["status"] == "running", st
        return True

    await grid.until(f"{service} to be restarted by its restart policy", restarted, timeout=60)
    grid.kills.append(service)


async def docker_kill_and_start(grid: ComposeGrid, service: str) -> None:
    """``docker kill`` the container; it stays down (a container killed by hand is left
    alone by the restart policy) until ``docker-compose start``."""
    project = grid.project
    assert project is not None
    cid = project.container(service)
    before = project.state(service)
    project.engine.run("kill", cid)
    await asyncio.sleep(3)  # longer than the restart policy's first back-off
    after = project.state(service)
    assert after["status"] == "exited" and after["restarts"] == before["restarts"], after
    await project.run("start", service, timeout=120)
    grid.kills.append(service)


def _down_up_snapshot(grid: ComposeGrid) -> dict[str, Any]:
    prod, cons = grid.producer.address, grid.consumer.address
    return {"market": grid.market.address, "producer": grid.onchain(prod), "consumer": grid.onchain(cons),
            "block": grid.w3.eth.block_number, "mints": grid.minted()}


@pytest.mark.slow
@pytest.mark.anvil
@pytest.mark.timeout(1800)
async def test_sites_trade_in_compose(images: Images, tmp_path: pathlib.Path) -> None:
    engine = images.engine
    keys = tmp_path / "keys"
    ensure_keys(keys, TEST_SITE)  # the test's own bus key, on the allow-list before the hub starts
    for p in [keys, *keys.rglob("*")]:
        if os.geteuid() == 0:
            os.chown(p, UID, UID)
        else:
            p.chmod(0o777 if p.is_dir() else 0o644)
    (keys / f"{TEST_SITE}.key_secret").chmod(0o600)
    project = Project(engine, f"{PROJECT_PREFIX}{secrets.token_hex(3)}", tmp_path, profiles=PROFILES, env={
        "GRIDTRADE_IMAGE": IMAGE, "GRIDTRADE_ANVIL_IMAGE": ANVIL_IMAGE, "GRIDTRADE_KEYS_SOURCE": str(keys),
        "GRIDTRADE_TIME_SCALE": "1440"})
    ports = Ports(free_port_block(64), 64)
    project.prepare(ports, METER_ENV)
    cfg = project.config["services"]
    urls = {}
    for name in LONG_RUNNING:
        what = health_target(cfg[name])
        assert what is not None, name
        urls[name] = what[1]
    hub_sub = cfg["hub"]["environment"]["GRIDTRADE_SUB_BIND"]
    rpc = urls["anvil"]
    passphrases = {"solar-1 producer": secrets.token_urlsafe(12), "home-7 consumer": secrets.token_urlsafe(12)}
    session = requests.Session()
    w3 = Web3(HTTPProvider(rpc, session=session))
    watch = watch_bus(keys, hub_sub, tmp_path / "watch")
    grid: ComposeGrid | None = None
    try:
        # 1. each site's account, made in its own wallet's volume
        async def account(service: str, label: str, site: str) -> str:
            _, out, err = await project.run("run", "--rm", "--no-deps", "-T", "-e", "GRIDTRADE_PASSPHRASE", service,
                                            "chain", "account", "new", "--name", label, "--site", site,
                                            extra_env={"GRIDTRADE_PASSPHRASE": passphrases[label]}, timeout=300)
            addrs = [ln for ln in out.split() if ln.startswith("0x")]
            assert len(addrs) == 1, (out, err)
            return addrs[0]

        with timed("accounts (docker-compose run, scrypt)"):
            producer, consumer = await asyncio.gather(account("wallet-producer", "solar-1 producer", "solar-1"),
                                                      account("wallet-consumer", "home-7 consumer", "home-7"))
        # each site's meter key is registered for its account: the producer's mints, the consumer's deliveries
        up_env = {"GRIDTRADE_PRODUCER_ACCOUNT": producer, "GRIDTRADE_CONSUMER_ACCOUNT": consumer}
        project.env.update(up_env)  # interpolated into the compose file: resolve it again
        project.prepare(ports, METER_ENV)

        # 2. up, until every service is healthy and the operator has deployed the contracts
        grid = ComposeGrid(data=tmp_path, options=None, procs=[], runner=None,  # type: ignore[arg-type]
                           passphrases=passphrases, w3=w3, http=session, watch=watch,
                           producer=User(_base(urls["gateway-producer"]), producer, passphrases["solar-1 producer"]),
                           consumer=User(_base(urls["gateway-consumer"]), consumer, passphrases["home-7 consumer"]),
                           project=project, urls=urls)
        t0 = time.monotonic()
        await project.run("up", "-d", "--no-build", timeout=600, extra_env=up_env)
        REPORT.setdefault("seconds", {})["docker-compose up -d"] = round(time.monotonic() - t0, 1)
        await wait_healthy(grid)
        await grid.until("the operator to deploy the contracts", lambda: (grid.health("chain") or {}).get("market"),
                         timeout=120)
        REPORT["seconds"]["start-up: up until all healthy, contracts deployed"] = round(time.monotonic() - t0, 1)
        await watch.start()
        grid.attach_contracts()
        for u in (grid.producer, grid.consumer):
            await u.open()
            await grid.login(u)

        # 3. the trade; mid-delivery: a crash under the restart policy, and a docker kill
        async def between(stage: str) -> None:
            if stage != "delivering":
                return
            await sigkill_service(grid, "wallet-consumer")
            await docker_kill_and_start(grid, "meter-consumer")
            await wait_healthy(grid, ("wallet-consumer", "meter-consumer"), timeout=120)
            # the key was unlocked in the wallet's memory only: the consumer enters the passphrase again
            cons = grid.consumer
            w = await retrying(grid, "the consumer's wallet after its wallet restarted", cons.wallet)
            assert w["unlocked"] is False, f"the wallet still holds the key: it did not restart ({w})"
            s = await cons.call("POST", "/api/session/unlock", {"passphrase": cons.passphrase})
            assert s["unlocked"] is True, s

        t1 = time.monotonic()
        out = await run_trade(grid, between=between, close_at_wh=CLOSE_AT)
        assert CLOSE_AT < CLOSE_AT_WH
        assert set(grid.kills) == {"wallet-consumer", "meter-consumer"}, grid.kills
        # the restart policy restarted the crashed wallet once, and nothing else ever
        restarts = {name: st["restarts"] for name, st in project.states().items()}
        assert restarts == {**{name: 0 for name in cfg}, "wallet-consumer": 1}, restarts
        final = await check_final(grid, out)
        relay_audit(grid, {out.trade_id})
        _nothing_twice(grid, out.trade_id, final["delivered"])
        REPORT["seconds"]["the trade, with the two restarts"] = round(time.monotonic() - t1, 1)

        # 4. down keeps the volumes; up goes on from the same state
        before = _down_up_snapshot(grid)
        trades_before = (await grid.consumer.call("GET", "/api/trades"))["trades"]
        volumes = project.volumes()
        assert {v.split("_", 1)[1] for v in volumes} >= {
            "chain-data", "anvil-data", "producer-wallet-data", "consumer-wallet-data", "producer-meter-data",
            "consumer-meter-data", "producer-gateway-data", "consumer-gateway-data", "hub-data", "auction-data"}, volumes
        await project.run("down", timeout=300)
        assert not engine.run("ps", "-aq", "--filter", f"label=com.docker.compose.project={project.name}").stdout.strip()
        assert project.volumes() == volumes
        t2 = time.monotonic()
        await project.run("up", "-d", "--no-build", timeout=600, extra_env=up_env)
        await wait_healthy(grid)
        REPORT["seconds"]["second up until all healthy"] = round(time.monotonic() - t2, 1)
        h = await grid.until("the operator to attach to its contracts",
                             lambda: (grid.health("chain") or {}).get("market"), timeout=120)
        assert h == before["market"], f"the operator deployed again: {h} != {before['market']}"
        assert grid.w3.eth.block_number >= before["block"]
        prod, cons = grid.producer.address, grid.consumer.address
        assert grid.onchain(cons) == before["consumer"]  # no second dev fund, nothing moved
        now = grid.onchain(prod)
        assert {k: v for k, v in now.items() if k != "tokens"} == {
            k: v for k, v in before["producer"].items() if k != "tokens"}
        # the gateway's session store kept the consumer's session: the old cookie still works
        w = await retrying(grid, "the consumer's wallet with the session from before the restart",
                           grid.consumer.wallet)
        assert int(w["escrow_free_wei"]) == before["consumer"]["free"], w
        trades_after = (await grid.consumer.call("GET", "/api/trades"))["trades"]
        assert [(t["trade_id"], t["state"], t["delivered_wh"]) for t in trades_after] == [
            (t["trade_id"], t["state"], t["delivered_wh"]) for t in trades_before]
        # the keystore is still there: the same passphrase logs in
        await grid.login(grid.producer)
        # the producer's meter goes on from its stored counters: its next kWh, minted now, once
        n = len(grid.minted())
        assert n >= len(before["mints"])
        t3 = time.monotonic()
        await grid.until("the producer's meter to mint its next kWh after the restart",
                         lambda: len(grid.minted()) > n, timeout=180)
        REPORT["seconds"]["the next mint after the second up"] = round(time.monotonic() - t3, 1)
        mints = grid.minted()
        counters = [m["producedWh"] for m in mints]
        assert counters == sorted(set(counters)), "a production counter was minted twice"
        assert sum(m["amountWh"] for m in mints) == counters[-1], "minted more than the meter signed"
        minted_again = collections.Counter(e.produced_wh for e in watch.of(E.Minted))
        assert all(c == 1 for c in minted_again.values()), minted_again
        restarts = {name: st["restarts"] for name, st in project.states().items()}
        assert restarts == {name: 0 for name in cfg}, f"a service crashed after the second up: {restarts}"
    except BaseException:
        with contextlib.suppress(Exception):
            ARTIFACTS.mkdir(exist_ok=True)
            (ARTIFACTS / "docker-compose.log").write_text(project.logs(400))
        raise
    finally:
        if grid is not None:
            for u in (grid.producer, grid.consumer):
                await u.close()
        await watch.stop()  # what it started, if anything; its store and context
        session.close()
        with contextlib.suppress(Exception):
            await project.run("down", "--volumes", "--remove-orphans", timeout=300, check=False)


def _base(healthz: str) -> str:
    return healthz.removesuffix("healthz")
