"""The committed artifacts are what the sources compile to (python -m contracts.build --check),
with the solc pinned in package.json, through the contracts/solc wrapper."""

from __future__ import annotations

import copy
import hashlib
import json
import subprocess
import sys

import pytest

from contracts import build


@pytest.fixture(scope="module")
def fresh() -> dict:
    return build.compile_contracts()


def test_committed_artifacts_match_a_fresh_compile(fresh: dict) -> None:
    assert sorted(fresh) == ["EnergyMarket", "EnergyToken", "MeterRegistry"]
    assert build.stale_artifacts(fresh) == []
    for name, artifact in fresh.items():
        assert (build.ARTIFACTS / f"{name}.json").read_text() == build.render(artifact)


def test_a_changed_artifact_is_detected(fresh: dict) -> None:
    changed = copy.deepcopy(fresh)
    changed["EnergyMarket"]["bytecode"] = changed["EnergyMarket"]["bytecode"][:-2] + "00"
    assert build.stale_artifacts(changed) == ["EnergyMarket"]


def test_runtime_code_fits_the_contract_size_limit(fresh: dict) -> None:
    """EIP-170: a contract's runtime code is at most 24,576 bytes (deployment fails beyond)."""
    for name, artifact in fresh.items():
        size = (len(artifact["deployedBytecode"]) - 2) // 2
        assert size <= 24_576, f"{name} runtime code is {size} bytes"


def test_artifacts_record_compiler_settings_and_source_hashes(fresh: dict) -> None:
    for artifact in fresh.values():
        assert artifact["compiler"]["version"].startswith(build.pinned_solc_version() + "+commit.")
        assert artifact["settings"] == {"optimizer": build.OPTIMIZER, "evmVersion": build.EVM_VERSION}
        for unit, digest in artifact["sourceSha256"].items():
            assert hashlib.sha256((build.HERE / unit).read_bytes()).hexdigest() == digest
        for code in (artifact["bytecode"], artifact["deployedBytecode"]):  # code starts with a PUSH (free memory pointer)
            assert 0x60 <= int(code[2:4], 16) <= 0x7F and len(code) > 100


def test_wrapper_speaks_the_solc_cli() -> None:
    version = subprocess.run([str(build.SOLC), "--version"], capture_output=True, text=True, check=True).stdout
    assert f"Version: {build.pinned_solc_version()}+commit." in version
    source = "// SPDX-License-Identifier: MIT\npragma solidity ^0.8.0;\ncontract A { function f() external pure returns (uint) { return 7; } }"
    standard = {
        "language": "Solidity",
        "sources": {"A.sol": {"content": source}},
        "settings": {"outputSelection": {"*": {"*": ["abi"]}}},
    }
    out = subprocess.run(
        [str(build.SOLC), "--standard-json"], input=json.dumps(standard), capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(out)["contracts"]["A.sol"]["A"]["abi"][0]["name"] == "f"  # stdout is only the JSON
    bad = subprocess.run([str(build.SOLC), "--bin", "A.sol"], capture_output=True, text=True)
    assert bad.returncode == 2


def test_check_command_passes() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "contracts.build", "--check"], cwd=build.ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
