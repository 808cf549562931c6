"""The chain service's settings (``GRIDTRADE_*`` environment variables)."""

from __future__ import annotations

import pathlib
from typing import Literal

from pydantic import Field

from services.bus.config import BusSettings


class ChainSettings(BusSettings):
    """Everything ``gridtrade chain`` reads from the environment, on top of the bus settings."""

    chain_role: Literal["operator", "site"] | None = Field(
        default=None, description="'operator': the market's chain service (the operator key only: deploys, mints, "
                                  "opens, settles, closes, mining control); 'site': a site's wallet (that site's "
                                  "keystores, unlock, balances, its own transactions). Default: operator when "
                                  "GRIDTRADE_SITE is GRIDTRADE_CHAIN_SITE (the market), else site")
    chain_url: str = Field(
        default="embedded",
        description="'embedded' (in-process py-evm through eth-tester: a chain whose state is lost when the "
                    "process stops, for tests; 'embedded:NAME' is one such chain shared by the services of one "
                    "process) or an http(s):// / ws(s):// JSON-RPC URL (anvil, geth, any EVM chain)")
    chain_bind: str | None = Field(
        default=None, description="where the request server binds; default: the bus setting chain_rpc")
    token_address: str | None = Field(
        default=None, description="attach to an EnergyToken already deployed here (with market_address)")
    market_address: str | None = Field(
        default=None, description="attach to an EnergyMarket already deployed here (with token_address)")
    operator_address: str | None = Field(
        default=None, description="the operator: keystore account (in this service's keystore, at the market) that "
                                  "deploys, mints, opens, settles and closes; default on dev chains: the chain's "
                                  "prefunded account")
    operator_passphrase_file: pathlib.Path | None = Field(
        default=None, description="file holding the operator keystore's passphrase (never logged)")
    registry_address: str | None = Field(default=None, description="the MeterRegistry of an existing deployment")
    registrar_address: str | None = Field(
        default=None, description="the registrar (registers meter keys): a keystore account at the market, a key "
                                  "of its own (not the operator's). Dev chains: a prefunded dev account")
    registrar_passphrase_file: pathlib.Path | None = Field(default=None)
    pauser_address: str | None = Field(
        default=None, description="who may pause minting and opening (its key is kept offline); dev chains: a "
                                  "prefunded dev account")
    dispute_window_s: int = Field(default=20, ge=0, description="after a close, how long a higher signed delivery "
                                                                 "still settles (a new deployment only)")
    keystore_dir: pathlib.Path | None = Field(default=None, description="default <data_dir>/keystore")
    scrypt_n: int = Field(default=2**18, ge=2**10, le=2**20,
                          description="scrypt work factor of new keystore files (a power of two)")
    unlock_ttl_s: float = Field(default=3600.0, gt=0, description="default unlock session length")
    unlock_max_failures: int = Field(
        default=5, ge=1, description="unlock attempts per account that may fail in unlock_window_s (counted when "
                                     "they start, before the slow scrypt work; a correct one gives its slot back)")
    unlock_site_max_failures: int = Field(
        default=30, ge=1, description="the same per calling site, over all its accounts")
    unlock_window_s: float = Field(default=300.0, gt=0)
    dev_fund_wei: int = Field(default=100 * 10**18, ge=0,
                              description="dev chains: Ether the operator gives once to each newly claimed account "
                                          "(0: off)")
    poll_s: float = Field(default=0.2, gt=0, description="how often pending transactions are checked")
    logs_range: int = Field(default=2000, ge=1, description="most blocks asked for in one eth_getLogs call "
                                                            "(public RPC providers cap the range)")
    settle_window_s: float = Field(default=0.3, ge=0,
                                   description="deliveries are collected this long, then settled in one batch")
    settle_max_batch: int = Field(default=50, ge=1, le=500)
    settle_every_wh: int = Field(
        default=1000, ge=0, description="a trade's signed delivery is settled once it is this many Wh above what is "
                                        "settled (0: every reading); at once when it ends the trade, is the meter's "
                                        "final reading, or the trade is being closed")
    open_window_s: float = Field(default=0.3, ge=0,
                                 description="agreed trades are collected this long, then opened in one batch")
    open_max_batch: int = Field(default=50, ge=1, le=200)
    close_grace_s: float = Field(default=10.0, ge=0,
                                 description="a trade closed before it is fully delivered is closed on-chain when the "
                                             "buyer meter's last Delivery (final, sent as its relay opens) arrives, "
                                             "or this long after the close if the meter stays silent")
    resend_after_s: float = Field(default=3.0, gt=0,
                                  description="re-send a pending transaction the node does not know after this")
    backoff_max_s: float = Field(default=10.0, gt=0, description="cap of the reconnect backoff")
    gas_margin: float = Field(default=1.25, ge=1.0, description="gas limit = estimate x this")
    confirmation_depth: int | None = Field(
        default=None, ge=0, le=1000,
        description="blocks on top of a transaction's block before it (a payment, a mint, a trade state) counts as "
                    "final and is published; default: 0 on dev chains (embedded, anvil), 12 on any other node")
    replace_after_s: float = Field(
        default=30.0, gt=0, description="a transaction not mined this long while blocks go by (or whose max fee is "
                                        "below the base fee) is replaced: same nonce, fees raised by at least "
                                        "fee_bump, within fee_cap_gwei")
    fee_bump: float = Field(default=0.125, ge=0.1, le=10.0,
                            description="least raise of a replacement's fees (geth wants 10 %, others 12.5 %)")
    fee_cap_gwei: float = Field(default=500.0, gt=0, description="most max fee (or gas price) per gas ever signed")
    priority_fee_gwei: float = Field(default=1.0, ge=0,
                                     description="least tip per gas (recent blocks' median tip if higher)")
    rpc_timeout_s: float = Field(default=10.0, gt=0, description="one JSON-RPC call's time limit")
    rpc_retries: int = Field(default=4, ge=0, le=20, description="retries of a JSON-RPC call that timed out, was "
                                                                "rate limited or lost its connection (with backoff)")
    block_interval_s: float = Field(default=0.0, ge=0,
                                    description="dev chains: mine a block this often when mining is on (0: per tx)")

    @property
    def keystore(self) -> pathlib.Path:
        return self.keystore_dir if self.keystore_dir is not None else self.data_dir / "keystore"

    reserve_wait_s: float = Field(default=120.0, gt=0, description="a wallet's Reserve answers once its transaction "
                                                                    "is in a block; after this long without one it "
                                                                    "answers 'timeout' (the transaction stays pending)")
    deployment_wait_s: float = Field(default=5.0, gt=0, description="a wallet: how often it looks again for the "
                                                                     "operator's deployment while it has none")

    @property
    def role(self) -> str:
        return self.chain_role or ("operator" if self.site == self.chain_site else "site")

    @property
    def bind(self) -> str:
        return self.chain_bind or (self.chain_rpc if self.role == "operator" else self.wallet_rpc)
