"""docker-compose.yml and the Dockerfile against the code they run, without an engine
(test_docker.py builds the images and runs the sites in a real one).

``docker-compose config`` (v1, the Debian package) parses, validates (unknown keys are
errors) and resolves the file; the tests then check what it resolved to against the
code: every command is a real ``gridtrade`` subcommand, every ``GRIDTRADE_*`` variable is
a settings field of the service that reads it (and the whole environment validates),
servers bind 0.0.0.0, published ports and the port the images' health check asks
(services/healthcheck.py, from the same environment) are the ports the service listens
on, clients point at the service and port that serves them, and state and keys live on
volumes.
"""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
import re
import shutil
import subprocess
import tomllib
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic import BaseModel

from services import cli, healthcheck
from services.auction.config import AuctionSettings
from services.bus.__main__ import HubSettings
from services.bus.config import BusSettings
from services.chain.config import ChainSettings
from services.gateway.config import GatewaySettings
from services.meter.config import MeterSettings

ROOT = pathlib.Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
PROFILES = ("market", "producer", "consumer", "chain-node")
ANY_HOST = "0.0.0.0"

# the settings class each `gridtrade` command reads
SETTINGS: dict[tuple[str, ...], type[BusSettings]] = {
    ("bus", "hub"): HubSettings,
    ("chain",): ChainSettings,
    ("auction",): AuctionSettings,
    ("meter",): MeterSettings,
    ("gateway",): GatewaySettings,
    ("keys",): BusSettings,
}


def _compose_bin() -> str:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (`./gridtrade test` installs the Debian package "
                    "docker-compose); the compose file could not be validated")
    return exe


def compose_config(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # a clean environment: only what the test sets reaches ${VAR:-default} substitution
    base = {k: v for k, v in os.environ.items() if not k.startswith(("GRIDTRADE_", "COMPOSE_"))}
    return subprocess.run([_compose_bin(), "-f", str(COMPOSE), *args, "config"], cwd=ROOT, capture_output=True,
                          text=True, env={**base, **(env or {})}, timeout=120)


@pytest.fixture(scope="module")
def resolved() -> dict[str, Any]:
    out = compose_config()
    assert out.returncode == 0, f"docker-compose config failed:\n{out.stderr}"
    return yaml.safe_load(out.stdout)


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def gridtrade_services(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in cfg["services"].items() if n != "anvil"}


def settings_class(command: list[str]) -> type[BusSettings]:
    for prefix, cls in SETTINGS.items():
        if tuple(command[:len(prefix)]) == prefix:
            return cls
    raise AssertionError(f"no settings class known for `gridtrade {' '.join(command)}`")


def env_of(svc: dict[str, Any]) -> dict[str, str]:
    """The environment the container gets: a null value passes the shell's through (unset here)."""
    return {k: str(v) for k, v in (svc.get("environment") or {}).items() if v is not None}


def settings_of(svc: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> BusSettings:
    """The service's settings built from exactly its compose environment."""
    cls = settings_class(svc["command"])
    with monkeypatch.context() as m:
        for k in [k for k in os.environ if k.startswith("GRIDTRADE_")]:
            m.delenv(k)
        for k, v in env_of(svc).items():
            m.setenv(k, v)
        return cls()


def port_of(endpoint: str) -> int:
    port = urlsplit(endpoint.replace("tcp://", "http://", 1)).port
    assert port is not None, endpoint
    return port


def host_of(endpoint: str) -> str:
    host = urlsplit(endpoint.replace("tcp://", "http://", 1)).hostname
    assert host is not None, endpoint
    return host


def binds(s: BusSettings, svc_name: str) -> dict[str, str]:
    """Every server endpoint the service binds, by setting name."""
    out: dict[str, str] = {}
    if isinstance(s, HubSettings):
        out.update(pub_bind=s.pub_bind, sub_bind=s.sub_bind)
    if isinstance(s, ChainSettings):
        out["chain_bind"] = s.bind
    if isinstance(s, AuctionSettings):
        out["auction_bind"] = s.bind
    if isinstance(s, (ChainSettings, AuctionSettings, MeterSettings)):  # they publish: a replay endpoint
        out["replay_bind"] = s.replay_bind
    return out


def listening_ports(s: BusSettings, svc_name: str) -> set[int]:
    ports = {port_of(e) for e in binds(s, svc_name).values()}
    if s.metrics_port:
        ports.add(s.metrics_port)
    if isinstance(s, GatewaySettings):
        ports.add(s.http_port)
    return ports


def healthcheck_port(svc: dict[str, Any], entry: str = "gridtrade") -> int:
    """The port the image's HEALTHCHECK asks in this service's container: compose leaves
    the test to the image (services/healthcheck.py), which reads the service's command
    line and environment."""
    assert "test" not in (svc.get("healthcheck") or {}), "the images' health check applies; compose sets no test"
    what = healthcheck.target([entry, *svc["command"]], env_of(svc))
    assert what is not None, f"no health check for {svc['command']}"
    port = urlsplit(what[1]).port
    assert port is not None and urlsplit(what[1]).hostname == "127.0.0.1", what
    return port


# --- the file is valid ---------------------------------------------------------------------


def test_config_is_valid_for_every_profile() -> None:
    for profiles in [(), *[(p,) for p in PROFILES], PROFILES]:
        args = [a for p in profiles for a in ("--profile", p)]
        out = compose_config(*args)
        assert out.returncode == 0, f"docker-compose {' '.join(args)} config failed:\n{out.stderr}"
        assert "WARNING" not in out.stderr, out.stderr  # e.g. a variable without a default


def test_unknown_keys_are_rejected(tmp_path: pathlib.Path) -> None:
    """The validation above means something: this docker-compose refuses a misspelt key."""
    bad = tmp_path / "docker-compose.yml"
    text = COMPOSE.read_text()
    assert "    restart: unless-stopped\n" in text
    bad.write_text(text.replace("    restart: unless-stopped\n", "    restat: unless-stopped\n", 1))
    out = subprocess.run([_compose_bin(), "-f", str(bad), "config"], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    assert out.returncode != 0 and "restat" in out.stderr, out.stderr


def test_profiles_name_the_sites(resolved: dict[str, Any]) -> None:
    by_profile: dict[str, dict[str, dict[str, Any]]] = {p: {} for p in PROFILES}
    for name, svc in resolved["services"].items():
        assert svc.get("profiles"), f"{name} has no profile: it would start on every host"
        for p in svc["profiles"]:
            assert p in by_profile, f"{name}: unknown profile {p}"
            by_profile[p][name] = svc

    def commands(p: str) -> list[str]:
        return sorted(" ".join(s["command"]) for s in by_profile[p].values() if s["command"][0] != "keys")

    assert commands("market") == ["auction", "bus hub", "chain"]
    for role in ("producer", "consumer"):
        assert commands(role) == ["chain", "gateway", "meter"]  # the site's wallet, gateway and meter
        meter = next(s for s in by_profile[role].values() if s["command"] == ["meter"])
        assert env_of(meter)["GRIDTRADE_ROLE"] == role
        sites = {env_of(s)["GRIDTRADE_SITE"] for s in by_profile[role].values()}
        assert len(sites) == 1, f"{role}: one site per profile, got {sites}"
    assert list(by_profile["chain-node"]) == ["anvil"]
    assert by_profile["chain-node"]["anvil"]["build"]["target"] == "anvil"
    # every site creates its CURVE key pair before its services start
    for p in ("market", "producer", "consumer"):
        keys = [s for s in by_profile[p].values() if s["command"][0] == "keys"]
        assert len(keys) == 1, p
        site = keys[0]["command"][keys[0]["command"].index("--site") + 1]
        for s in by_profile[p].values():
            if s["command"][0] != "keys":
                assert env_of(s)["GRIDTRADE_SITE"] == site


# --- what it names exists in the code -----------------------------------------------------


def test_every_command_is_a_gridtrade_subcommand(resolved: dict[str, Any]) -> None:
    for name, svc in gridtrade_services(resolved).items():
        command = svc["command"]
        assert isinstance(command, list) and command, name
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()) as err, \
                pytest.raises(SystemExit) as exit_:
            cli.main([*command, "--help"])
        assert exit_.value.code == 0, f"{name}: `gridtrade {' '.join(command)} --help` failed: {err.getvalue()}"
        assert "usage: gridtrade" in out.getvalue(), (name, out.getvalue()[:300])
        # and the arguments themselves parse (--help stops before checking the rest)
        if command[0] == "keys":
            assert command[1::2] == ["--site"] * (len(command) // 2), command
        else:
            assert command in ([*k] for k in SETTINGS), f"{name}: `gridtrade {' '.join(command)}` takes no arguments here"


def test_every_variable_is_a_setting_of_its_service(resolved: dict[str, Any], raw: dict[str, Any]) -> None:
    for name, svc in gridtrade_services(resolved).items():
        cls = settings_class(svc["command"])
        env = svc.get("environment") or {}
        assert env, name
        nested = cls.model_config.get("env_nested_delimiter")
        for key in env:
            assert key.startswith("GRIDTRADE_"), f"{name}: {key} is not a GRIDTRADE_ variable"
            field, *path = key.removeprefix("GRIDTRADE_").lower().split("__")
            assert field in cls.model_fields, f"{name}: {key}: {cls.__name__} has no field {field!r}"
            if path:
                assert nested == "__", f"{name}: {key}: {cls.__name__} reads no nested variables"
                model: Any = cls.model_fields[field].annotation
                for part in path:
                    assert isinstance(model, type) and issubclass(model, BaseModel), f"{name}: {key}"
                    assert part in model.model_fields, f"{name}: {key}: {model.__name__} has no field {part!r}"
                    model = model.model_fields[part].annotation
    # the variables the other sites set to join a remote market are substituted, with defaults
    text = COMPOSE.read_text()
    for var in ("GRIDTRADE_HUB_PUB", "GRIDTRADE_HUB_SUB", "GRIDTRADE_CHAIN_RPC", "GRIDTRADE_AUCTION_RPC",
                "GRIDTRADE_CHAIN_URL", "GRIDTRADE_ADVERTISE_HOST"):
        assert re.search(r"\$\{" + var + r":-[^}]+\}", text), f"{var} is not substituted with a default"
    assert isinstance(raw["services"], dict)


def test_each_environment_validates(resolved: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    for name, svc in gridtrade_services(resolved).items():
        s = settings_of(svc, monkeypatch)
        assert s.site == env_of(svc)["GRIDTRADE_SITE"], name
        if isinstance(s, MeterSettings):
            assert s.sim.time_scale > 1 and [m.role for m in s.meters] == [env_of(svc)["GRIDTRADE_ROLE"]]


def test_servers_bind_every_interface(resolved: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    for name, svc in gridtrade_services(resolved).items():
        if svc["command"][0] == "keys":
            continue
        s = settings_of(svc, monkeypatch)
        for setting, endpoint in binds(s, name).items():
            assert host_of(endpoint) == ANY_HOST, f"{name}: {setting} = {endpoint}"
            assert "*" not in endpoint, f"{name}: {setting} = {endpoint}: a random port cannot be published"
        if "replay_bind" in binds(s, name):
            assert s.replay_advertise, f"{name}: heartbeats would announce {s.replay_bind} to other hosts"
        if isinstance(s, GatewaySettings):
            assert s.http_host == ANY_HOST, name
        else:
            assert s.metrics_host == ANY_HOST and s.metrics_port, f"{name}: /healthz must be reachable"


def test_ports_are_the_ports_the_services_listen_on(resolved: dict[str, Any],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    published: set[int] = set()
    for name, svc in gridtrade_services(resolved).items():
        if svc["command"][0] == "keys":
            assert "ports" not in svc and "healthcheck" not in svc, name
            continue
        s = settings_of(svc, monkeypatch)
        listening = listening_ports(s, name)
        for p in svc.get("ports", []):
            target = int(p["target"])
            assert target in listening, f"{name}: publishes {target}, listens on {sorted(listening)}"
            assert int(p["published"]) not in published, f"{name}: host port {p['published']} used twice"
            published.add(int(p["published"]))
        # heartbeats announce the replay port: it must be published on the same number
        if "replay_bind" in binds(s, name):
            rp = port_of(s.replay_bind)
            assert {"target": rp, "published": rp} in [{"target": int(p["target"]), "published": int(p["published"])}
                                                       for p in svc.get("ports", [])], f"{name}: replay port {rp}"
        want = s.http_port if isinstance(s, GatewaySettings) else s.metrics_port
        assert healthcheck_port(svc) == want, f"{name}: healthcheck asks {healthcheck_port(svc)}, serves {want}"
    anvil = resolved["services"]["anvil"]
    cmd = anvil["command"]
    port = int(cmd[cmd.index("--port") + 1])
    assert cmd[cmd.index("--host") + 1] == ANY_HOST
    assert [int(p["target"]) for p in anvil["ports"]] == [port]
    assert healthcheck_port(anvil, entry="anvil") == port


def test_health_check_defaults_are_the_settings_defaults() -> None:
    """services/healthcheck.py imports nothing of the services (it runs every few seconds
    in every container): its defaults, written out again, are the settings' own."""
    d = healthcheck.DEFAULTS
    assert d["http_host"] == GatewaySettings.model_fields["http_host"].default
    assert d["http_port"] == GatewaySettings.model_fields["http_port"].default
    assert d["metrics_host"] == BusSettings.model_fields["metrics_host"].default
    assert d["metrics_port"] == BusSettings.model_fields["metrics_port"].default
    # the service is found on the container's command line, with or without compose's init
    env = {"GRIDTRADE_METRICS_PORT": "9100", "GRIDTRADE_METRICS_HOST": "0.0.0.0", "GRIDTRADE_HTTP_PORT": "8081"}
    for argv, want in (
            (["/sbin/docker-init", "--", "gridtrade", "gateway"], ("http", "http://127.0.0.1:8081/healthz")),
            (["/opt/venv/bin/python", "/opt/venv/bin/gridtrade", "chain"], ("http", "http://127.0.0.1:9100/healthz")),
            (["/sbin/docker-init", "--", "gridtrade", "bus", "hub"], ("http", "http://127.0.0.1:9100/healthz")),
            (["gridtrade", "gateway", "--port", "9000"], ("http", "http://127.0.0.1:9000/healthz")),
            (["anvil", "--host", "0.0.0.0", "--port", "8546"], ("rpc", "http://127.0.0.1:8546")),
            (["/sbin/docker-init", "--", "gridtrade", "keys", "--site", "x"], None),
            (["gridtrade", "chain", "account", "list"], None)):
        assert healthcheck.target(argv, env) == want, argv
    with pytest.raises(LookupError):  # no /healthz without a metrics port: unhealthy, said why
        healthcheck.target(["gridtrade", "meter"], {})


def test_clients_point_at_their_servers(resolved: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """With the defaults (one host), every endpoint a service connects to is a compose
    service that binds that port, and is served under the site name the client expects."""
    servers: dict[str, tuple[str, dict[int, str]]] = {}
    for name, svc in gridtrade_services(resolved).items():
        if svc["command"][0] != "keys":
            s = settings_of(svc, monkeypatch)
            servers[name] = (s.site, {port_of(e): k for k, e in binds(s, name).items()})
    wants = {"hub_pub": ("pub_bind", "hub_site"), "hub_sub": ("sub_bind", "hub_site"),
             "chain_rpc": ("chain_bind", "chain_site"), "auction_rpc": ("auction_bind", "auction_site")}
    for name, svc in gridtrade_services(resolved).items():
        if svc["command"][0] in ("keys", "bus"):
            continue
        s = settings_of(svc, monkeypatch)
        for client, (server_setting, site_setting) in wants.items():
            endpoint = getattr(s, client)
            host = host_of(endpoint)
            assert host in servers, f"{name}: {client} = {endpoint}: no service {host!r}"
            site, ports = servers[host]
            assert ports.get(port_of(endpoint)) == server_setting, f"{name}: {client} = {endpoint}: {host} binds {ports}"
            assert getattr(s, site_setting) == site, f"{name}: {site_setting} != {site}"
        if isinstance(s, GatewaySettings):  # a gateway talks to its own site's wallet
            host = host_of(s.wallet_rpc)
            assert host in servers, f"{name}: wallet_rpc = {s.wallet_rpc}: no service {host!r}"
            site, ports = servers[host]
            assert ports.get(port_of(s.wallet_rpc)) == "chain_bind" and site == (s.wallet_site or s.site) == s.site, \
                f"{name}: wallet_rpc = {s.wallet_rpc}: {host} is site {site}, binds {ports}"
        if s.replay_advertise:
            assert s.replay_advertise == name, f"{name}: advertises {s.replay_advertise}, is reached as {name}"


def test_remote_hub_and_chain_come_from_the_environment() -> None:
    env = {"GRIDTRADE_HUB_PUB": "tcp://192.0.2.10:5550", "GRIDTRADE_HUB_SUB": "tcp://192.0.2.10:5551",
           "GRIDTRADE_CHAIN_RPC": "tcp://192.0.2.10:5560", "GRIDTRADE_AUCTION_RPC": "tcp://192.0.2.10:5561",
           "GRIDTRADE_ADVERTISE_HOST": "192.0.2.20", "GRIDTRADE_CHAIN_URL": "http://192.0.2.30:8545"}
    out = compose_config("--profile", "producer", env=env)
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    for name in ("meter-producer", "gateway-producer", "meter-consumer", "gateway-consumer"):
        got = cfg["services"][name]["environment"]
        for k in ("GRIDTRADE_HUB_PUB", "GRIDTRADE_HUB_SUB", "GRIDTRADE_CHAIN_RPC", "GRIDTRADE_AUCTION_RPC"):
            assert got[k] == env[k], (name, k)
    assert cfg["services"]["meter-producer"]["environment"]["GRIDTRADE_REPLAY_ADVERTISE"] == "192.0.2.20"
    assert cfg["services"]["chain"]["environment"]["GRIDTRADE_CHAIN_URL"] == env["GRIDTRADE_CHAIN_URL"]


def test_state_and_keys_live_on_volumes(resolved: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    named = set(resolved.get("volumes") or {})
    sources: dict[str, list[str]] = {}
    for name, svc in gridtrade_services(resolved).items():
        s = settings_of(svc, monkeypatch)
        targets: dict[str, str] = {}
        for v in svc.get("volumes", []):
            source, target = v.split(":")[:2]
            targets[target] = source
            assert source in named, f"{name}: volume {source} is not declared"
        dirs = {str(s.data_dir), str(s.keys)}
        if isinstance(s, ChainSettings):
            assert s.keystore.is_relative_to(s.data_dir), "the chain's keystore must be on its data volume"
        for target in targets:
            assert target in dirs, f"{name}: volume at {target} is neither its data dir nor its keys dir {dirs}"
        if svc["command"][0] == "keys":
            assert set(targets) == {str(s.keys)}, name
        else:
            assert set(targets) == dirs, f"{name}: {dirs - set(targets)} would be lost with the container"
            sources.setdefault(targets[str(s.data_dir)], []).append(name)
    shared = {v: ns for v, ns in sources.items() if len(ns) > 1}
    assert not shared, f"each service owns its state: {shared}"
    anvil = resolved["services"]["anvil"]
    state = anvil["command"][anvil["command"].index("--state") + 1]
    assert any(state.startswith(v.split(":")[1] + "/") for v in anvil["volumes"]), state


# --- the Dockerfile -------------------------------------------------------------------------


def stages(text: str) -> list[dict[str, Any]]:
    """FROM ... AS name blocks with their instructions (continuations joined)."""
    text = re.sub(r"\\\n", " ", text)
    out: list[dict[str, Any]] = []
    args: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        op = op.upper()
        if op == "ARG" and not out:
            k, _, v = rest.partition("=")
            args[k] = v
        elif op == "FROM":
            parts = rest.split()
            image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), parts[0])
            name = parts[2] if len(parts) > 2 and parts[1].upper() == "AS" else ""
            out.append({"image": image, "name": name, "ops": []})
        elif out:
            out[-1]["ops"].append((op, rest))
    return out


def test_dockerfile() -> None:
    text = DOCKERFILE.read_text()
    st = stages(text)
    by_name = {s["name"]: s for s in st}
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "gridtrade" in scripts

    def chain(name: str) -> list[dict[str, Any]]:  # a stage and the stages it is built FROM
        s = by_name[name]
        return [s, *(chain(s["image"]) if s["image"] in by_name else [])]

    def last(stage_chain: list[dict[str, Any]], op: str) -> str | None:
        for s in stage_chain:
            for o, rest in reversed(s["ops"]):
                if o == op:
                    return rest
        return None

    # the default target (the last stage) is the services image that compose builds
    default = st[-1]
    assert default["name"] == "gridtrade"
    services = chain("gridtrade")
    assert services[-1]["image"] == "python:3.11-slim"
    assert last(services, "ENTRYPOINT") == '["gridtrade"]', "the entrypoint is the console script"
    assert last(services, "USER") == "gridtrade", "the services run as a user of their own, not root"
    assert last(services, "HEALTHCHECK").endswith('CMD ["python", "-m", "services.healthcheck"]')  # type: ignore[union-attr]
    assert "node" not in " ".join(str(s["ops"]) for s in services), "the services image carries no node"
    # its packages come from a virtual environment built in a stage of its own (pip stays there)
    copied = [rest for s in services for o, rest in s["ops"] if o == "COPY"]
    assert "--from=venv /opt/venv /opt/venv" in copied, copied
    assert "PATH=/opt/venv/bin:$PATH" in (last(services, "ENV") or ""), "the venv's gridtrade and python first"
    venv = by_name["venv"]
    assert venv["image"] == "python:3.11-slim"  # the same base: the venv's python is the image's
    runs = " && ".join(rest for o, rest in venv["ops"] if o == "RUN")
    assert "python3 -m venv /opt/venv" in runs and re.search(r"/opt/venv/bin/pip install \.(\s|$)", runs), runs
    assert "/opt/venv/bin/pip install --no-deps ." in runs and "pip uninstall -y pip setuptools" in runs, runs
    # downloads trust a proxy's CA through the build secret only, never an image's setting or file
    for s in st:
        for o, rest in s["ops"]:
            if o == "RUN" and re.search(r"\b(pip|npm) install\b", rest):
                assert rest.startswith("--mount=type=secret,id=ca_bundle "), f"{s['name']}: {rest[:80]}"
            if o in ("ENV", "ARG", "COPY", "ADD"):
                assert not re.search(r"ca-certificates|ca_bundle|PIP_CERT|NODE_EXTRA_CA_CERTS|cafile", rest), rest
    # the targets compose asks for exist; anvil's binary comes from the pinned npm package
    with open(COMPOSE) as f:
        targets = {s["build"]["target"] for s in yaml.safe_load(f)["services"].values() if "build" in s} | {
            "gridtrade"}
    assert targets <= set(by_name), targets - set(by_name)
    node = by_name["node-tools"]
    assert any(o == "RUN" and rest.endswith("npm install --no-audit --no-fund --loglevel=error")
               for o, rest in node["ops"]), node["ops"]
    assert "package-lock.json" in last([node], "COPY")  # type: ignore[operator]
    copied = [rest for o, rest in by_name["anvil"]["ops"] if o == "COPY"]
    assert any("@foundry-rs/anvil-linux-${TARGETARCH}/bin/anvil" in c for c in copied), copied
    lock = (ROOT / "package-lock.json").read_text()
    assert '"node_modules/@foundry-rs/anvil-linux-amd64"' in lock  # TARGETARCH's default
    # what the build copies is in the build context (.dockerignore keeps it)
    ignored = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")}
    for s in st:
        for o, rest in s["ops"]:
            if o == "COPY" and not rest.startswith("--from"):
                for src in rest.split()[:-1]:
                    if "[" in src:  # optional file through a glob
                        continue
                    assert (ROOT / src).exists(), src
                    assert src not in ignored, f"{src} is in .dockerignore"


def test_keys_stay_at_their_sites(resolved: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The market runs the chain service as the operator; each site runs its own wallet,
    with its own data volume (its keystores), and no volume is shared between sites."""
    roles: dict[str, str] = {}
    volumes: dict[str, set[str]] = {}
    for name, svc in gridtrade_services(resolved).items():
        if svc["command"] == ["chain"]:
            s = settings_of(svc, monkeypatch)
            assert isinstance(s, ChainSettings)
            roles[name] = f"{s.site}:{s.role}"
        for v in svc.get("volumes", []):
            source, target = (v["source"], v["target"]) if isinstance(v, dict) else v.split(":")[:2]
            if target == "/data":
                volumes.setdefault(str(source), set()).add(env_of(svc)["GRIDTRADE_SITE"])
    assert roles == {"chain": "market:operator", "wallet-producer": "solar-1:site", "wallet-consumer": "home-7:site"}
    assert all(len(sites) == 1 for sites in volumes.values()), volumes


def test_the_host_network_override_keeps_every_client_pointed_at_its_server(
        resolved: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """test_docker.py runs this file on the host's network: its override (derived from the
    resolved file) gives every service loopback addresses and ports of its own, and every
    client the address its server now listens on."""
    from tests.deploy.engine import Ports, host_network_override

    override = host_network_override(resolved, Ports(20000, 100))["services"]
    assert set(override) == set(resolved["services"])
    merged = {}
    for name, svc in resolved["services"].items():
        assert override[name]["network_mode"] == "host", name
        env = {**(svc.get("environment") or {}), **override[name].get("environment", {})}
        merged[name] = {**svc, "environment": env, "command": override[name].get("command", svc["command"])}
    taken: dict[int, str] = {}
    servers: dict[tuple[str, int], str] = {}
    for name, svc in gridtrade_services({"services": merged}).items():
        if svc["command"][0] == "keys":
            continue
        s = settings_of(svc, monkeypatch)
        for endpoint in binds(s, name).values():
            assert host_of(endpoint) == "127.0.0.1", (name, endpoint)
            servers["127.0.0.1", port_of(endpoint)] = name
        assert s.metrics_host == "127.0.0.1" and (not isinstance(s, GatewaySettings) or s.http_host == "127.0.0.1")
        for port in listening_ports(s, name):
            assert taken.setdefault(port, name) == name, f"port {port}: {taken[port]} and {name}"
        if s.replay_advertise:
            assert s.replay_advertise == "127.0.0.1", name
    for name, svc in gridtrade_services({"services": merged}).items():
        if svc["command"][0] in ("keys", "bus"):
            continue
        s = settings_of(svc, monkeypatch)
        clients = {"hub_pub": "hub", "hub_sub": "hub", "chain_rpc": "chain", "auction_rpc": "auction"}
        if isinstance(s, GatewaySettings):
            clients["wallet_rpc"] = name.replace("gateway", "wallet")
        for client, server in clients.items():
            endpoint = getattr(s, client)
            assert servers.get((host_of(endpoint), port_of(endpoint))) == server, f"{name}: {client} = {endpoint}"
    anvil = merged["anvil"]["command"]
    port = int(anvil[anvil.index("--port") + 1])
    assert anvil[anvil.index("--host") + 1] == "127.0.0.1" and port not in taken
    for name in ("chain", "wallet-producer", "wallet-consumer"):
        assert merged[name]["environment"]["GRIDTRADE_CHAIN_URL"] == f"http://127.0.0.1:{port}", name


def test_no_anonymous_volumes(resolved: dict[str, Any]) -> None:
    """Every VOLUME of an image has something mounted on it in each service (a named
    volume, a folder or a tmpfs): else each container gets an anonymous volume, which
    `docker compose down` leaves behind and the next `up` does not reuse."""
    st = {s["name"]: s for s in stages(DOCKERFILE.read_text())}

    def volumes_of(target: str) -> set[str]:
        out: set[str] = set()
        stage: dict[str, Any] | None = st[target]
        while stage is not None:
            for o, rest in stage["ops"]:
                if o == "VOLUME":
                    out |= set(yaml.safe_load(rest))
            stage = st.get(stage["image"])
        return out

    for name, svc in resolved["services"].items():
        want = volumes_of(svc["build"]["target"])
        assert want, f"{name}: its image declares no VOLUME"
        mounted = {v.split(":")[1] if isinstance(v, str) else v["target"] for v in svc.get("volumes", [])}
        tmpfs = svc.get("tmpfs") or []
        mounted |= {t.split(":")[0] for t in ([tmpfs] if isinstance(tmpfs, str) else tmpfs)}
        assert want <= mounted, f"{name}: nothing mounted on {want - mounted}"
