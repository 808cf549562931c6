"""Compile the contracts with py-solc-x and write `contracts/artifacts/<Name>.json`.

    python -m contracts.build           write the artifacts
    python -m contracts.build --check   exit 1 if the committed artifacts differ from a fresh compile

The compiler is solc-js from node_modules (the version pinned in package.json), driven through
the `contracts/solc` wrapper that speaks the native CLI's `--version` and `--standard-json`.
Output is deterministic: the same sources and compiler give byte-identical files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import sys
from typing import Any

import solcx
import solcx.wrapper

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
ARTIFACTS = HERE / "artifacts"
SOLC = HERE / "solc"
PACKAGE_JSON = ROOT / "package.json"

#: Contracts that get an artifact, by source unit name.
CONTRACTS = {"MeterRegistry": "MeterRegistry.sol", "EnergyToken": "EnergyToken.sol", "EnergyMarket": "EnergyMarket.sol"}
OPTIMIZER = {"enabled": True, "runs": 200}
#: Cancun: supported by anvil, py-evm, geth and current L2s.
EVM_VERSION = "cancun"


class BuildError(RuntimeError):
    """The compiler is missing, has the wrong version, or rejected the sources."""


def pinned_solc_version() -> str:
    """The solc version pinned in package.json (e.g. "0.8.30")."""
    return str(json.loads(PACKAGE_JSON.read_text())["dependencies"]["solc"])


def compiler_version() -> str:
    """Full version of the wrapped compiler (e.g. "0.8.30+commit.73712a01"), checked against package.json."""
    try:
        full = solcx.wrapper.get_solc_version(SOLC, with_commit_hash=True)
    except Exception as exc:  # the wrapper could not start or load solc-js
        raise BuildError(f"cannot run {SOLC}: {exc}") from exc
    if full.base_version != pinned_solc_version():
        raise BuildError(f"node_modules/solc is {full}, package.json pins {pinned_solc_version()}; run npm ci")
    return str(full)


def sources() -> dict[str, str]:
    """Every .sol file in contracts/, by source unit name (its file name)."""
    return {p.name: p.read_text() for p in sorted(HERE.glob("*.sol"))}


def compile_contracts() -> dict[str, dict[str, Any]]:
    """Compile all sources; return the artifact of each contract in CONTRACTS by name."""
    version = compiler_version()
    srcs = sources()
    settings = {"optimizer": OPTIMIZER, "evmVersion": EVM_VERSION}
    standard_input = {
        "language": "Solidity",
        "sources": {name: {"content": text} for name, text in srcs.items()},
        "settings": {
            **settings,
            "outputSelection": {
                "*": {"*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object", "metadata"]}
            },
        },
    }
    try:
        output = solcx.compile_standard(standard_input, solc_binary=SOLC)
    except solcx.exceptions.SolcError as exc:
        raise BuildError(str(exc)) from exc
    warnings = [e["formattedMessage"] for e in output.get("errors", []) if e["severity"] != "info"]
    if warnings:
        raise BuildError("compiler warnings:\n" + "\n".join(warnings))
    artifacts = {}
    for name, unit in CONTRACTS.items():
        out = output["contracts"][unit][name]
        used = json.loads(out["metadata"])["sources"]  # the contract's source and what it imports
        artifacts[name] = {
            "contractName": name,
            "sourceName": unit,
            "abi": out["abi"],
            "bytecode": "0x" + out["evm"]["bytecode"]["object"],
            "deployedBytecode": "0x" + out["evm"]["deployedBytecode"]["object"],
            "compiler": {"name": "solc", "version": version},
            "settings": settings,
            "sourceSha256": {u: hashlib.sha256(srcs[u].encode()).hexdigest() for u in sorted(used)},
        }
    return artifacts


def render(artifact: dict[str, Any]) -> str:
    """The canonical file text of an artifact (sorted keys, 2-space indent, final newline)."""
    return json.dumps(artifact, indent=2, sort_keys=True) + "\n"


def stale_artifacts(artifacts: dict[str, dict[str, Any]]) -> list[str]:
    """Names of the contracts whose committed artifact file differs from `artifacts`."""
    stale = []
    for name, artifact in artifacts.items():
        path = ARTIFACTS / f"{name}.json"
        if not path.exists() or path.read_text() != render(artifact):
            stale.append(name)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m contracts.build", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="verify the committed artifacts, write nothing")
    args = parser.parse_args(argv)
    try:
        artifacts = compile_contracts()
    except BuildError as exc:
        print(f"build failed: {exc}", file=sys.stderr)
        return 2
    if args.check:
        stale = stale_artifacts(artifacts)
        for name in stale:
            print(f"{ARTIFACTS / name}.json is out of date; run python -m contracts.build", file=sys.stderr)
        if not stale:
            print(f"artifacts match the sources ({', '.join(artifacts)})")
        return 1 if stale else 0
    ARTIFACTS.mkdir(exist_ok=True)
    for name, artifact in artifacts.items():
        (ARTIFACTS / f"{name}.json").write_text(render(artifact))
        print(f"wrote {ARTIFACTS / name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
