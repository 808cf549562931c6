"""Solidity sources of gridtrade's contracts (EnergyToken, EnergyMarket), the build script
(`python -m contracts.build`) and the committed compiled artifacts under `artifacts/`."""
