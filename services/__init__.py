"""gridtrade: peer-to-peer energy trading for micro-grids, settled on Ethereum."""
