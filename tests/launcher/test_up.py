"""``gridtrade up`` as a newcomer runs it: a real process tree, two wallets, Ctrl-C."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from services.launcher import Options, plan


def test_the_plan_names_every_part_once_with_its_own_ports() -> None:
    procs = plan(Options(meters="emulated", chain_url="anvil"))
    names = [p.name for p in procs]
    assert names[:2] == ["hub", "anvil"] and len(set(names)) == len(names)
    assert {"chain", "auction", "meter-solar-1", "meter-home-7", "emulator-solar-1", "gateway-solar-1",
            "gateway-home-7"} <= set(names)
    urls = [p.health_url for p in procs if p.health_url]
    assert len(set(urls)) == len(urls)
    meter = next(p for p in procs if p.name == "meter-solar-1")
    assert json.loads(meter.env["GRIDTRADE_METERS"])[0]["driver"] == "line"
    assert next(p for p in procs if p.name == "chain").env["GRIDTRADE_CHAIN_URL"].startswith("http://127.0.0.1:")


def get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.status, r.read()


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_up_starts_everything_prints_the_wallets_and_stops_on_ctrl_c(tmp_path) -> None:  # type: ignore[no-untyped-def]
    base = random.randrange(20000, 40000, 100)
    args = [sys.executable, "-m", "services.cli", "up", "--data", str(tmp_path / "data"), "--base-port", str(base),
            "--http-port", str(base + 80)]

    def start() -> tuple[subprocess.Popen[str], str]:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out = ""
        deadline = time.monotonic() + 300
        assert proc.stdout is not None
        while "Ctrl-C stops everything" not in out:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, f"gridtrade up exited early:\n{out}"
            out += line
            if time.monotonic() > deadline:
                pytest.fail(f"gridtrade up was not ready in time:\n{out}")
        return proc, out

    proc, out = start()
    try:
        urls = re.findall(r"wallet of (\S+)\s+(http://\S+)", out)
        assert [site for site, _ in urls] == ["solar-1", "home-7"]
        passphrases = dict(re.findall(r"^\s+(solar-1 producer|home-7 consumer)\s+(\S+)$", out, re.M))
        assert len(passphrases) == 2
        # each wallet lists its own site's demo account only
        listed = {site: json.loads(get(url + "api/accounts")[1])["accounts"] for site, url in urls}
        assert {s: [(a["name"], a["site"]) for a in accts] for s, accts in listed.items()} == {
            "solar-1": [("solar-1 producer", "solar-1")], "home-7": [("home-7 consumer", "home-7")]}
        accounts = listed["solar-1"]
        for _, url in urls:
            assert get(url)[0] == 200 and get(url + "healthz")[0] == 200
        kids = children_of(proc.pid)
        assert len(kids) == len(plan(Options()))
        for pw in passphrases.values():  # printed to the person, never written to disk or logs
            for f in (tmp_path / "data").rglob("*"):
                if f.is_file():
                    assert pw.encode() not in f.read_bytes(), f
    finally:
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "stopped." in rest
    for pid in kids:
        assert not os.path.exists(f"/proc/{pid}") or "Z" in open(f"/proc/{pid}/stat").read().split()[2]

    # the next start keeps the state: the same accounts, no new passphrases; this time the
    # meters are serial emulators on pseudo-terminals, read by the real line driver
    args += ["--meters", "emulated"]
    proc, out = start()
    try:
        assert "passphrases" not in out and accounts[0]["address"] in out
        meter = next(p for p in plan(Options(base_port=base, meters="emulated")) if p.name == "meter-solar-1")
        assert meter.health_url is not None
        health = json.loads(get(meter.health_url)[1])["meters"]["main"]
        assert health["driver"] == "line" and health["connected"] and not health["errors"], health
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=120)
    assert proc.returncode == 0
