"""Deploy, attach to and talk to gridtrade's contracts (EnergyToken, EnergyMarket).

No service wiring here: the chain service builds on these helpers. Everything that touches a
node is async (web3's AsyncWeb3); the EIP-712 and id helpers are pure.

Units: energy in Wh (the token's base unit, 3 decimals), prices in wei per kWh, amounts in wei.
The Ether due for a cumulative delivery of `wh` at `price` is `cost(wh, price)` = wh * price // 1000.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

from eth_abi import decode as abi_decode
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_tester.exceptions import TransactionFailed
from eth_utils import keccak, to_checksum_address
from hexbytes import HexBytes
from web3 import AsyncWeb3
from web3.contract import AsyncContract
from web3.exceptions import ContractLogicError
from web3.providers.eth_tester import AsyncEthereumTesterProvider
from web3.types import TxReceipt

TOKEN = "EnergyToken"
MARKET = "EnergyMarket"

#: Role that may mint on EnergyToken.
METER_ROLE = keccak(text="METER_ROLE")
#: Role that may open, settle and close trades and register meters on EnergyMarket.
OPERATOR_ROLE = keccak(text="OPERATOR_ROLE")
#: Role that grants and revokes roles (on both contracts).
DEFAULT_ADMIN_ROLE = b"\x00" * 32

#: EIP-712 domain name/version and type of a delivery reading (must match EnergyMarket.sol).
EIP712_NAME = "GridTrade EnergyMarket"
EIP712_VERSION = "1"
DELIVERY_TYPES = {
    "EIP712Domain": [
        {"name": "name", "type": "string"},
        {"name": "version", "type": "string"},
        {"name": "chainId", "type": "uint256"},
        {"name": "verifyingContract", "type": "address"},
    ],
    "Delivery": [
        {"name": "tradeId", "type": "bytes32"},
        {"name": "deliveredWh", "type": "uint256"},
    ],
}

#: Trade.status values of EnergyMarket.trades(tradeId).
STATUS_NONE, STATUS_OPEN, STATUS_CLOSED = 0, 1, 2

_ERROR_STRING_SELECTOR = bytes.fromhex("08c379a0")  # Error(string)
_REVERTED_PREFIX = "execution reverted"


def load_artifact(name: str) -> dict[str, Any]:
    """The committed build artifact of contract `name` (abi, bytecode, deployedBytecode, compiler...)."""
    path = resources.files("contracts").joinpath("artifacts", f"{name}.json")
    return json.loads(path.read_text())


def cost(wh: int, price_wei_per_kwh: int) -> int:
    """Wei due for `wh` Wh at `price_wei_per_kwh`, rounded down exactly as EnergyMarket does."""
    return wh * price_wei_per_kwh // 1000


def id32(text: str) -> bytes:
    """A bytes32 id (trade id, reading id) derived from a stable off-chain id: keccak256 of its UTF-8."""
    return keccak(text=text)


@dataclass(frozen=True)
class Deployment:
    """The two contracts of one market, bound to a web3 instance."""

    token: AsyncContract
    market: AsyncContract

    @property
    def token_address(self) -> str:
        return str(self.token.address)

    @property
    def market_address(self) -> str:
        return str(self.market.address)


Sender = str | LocalAccount
"""Who sends a transaction: an address unlocked on the node (dev chains) or a local account
whose key signs the transaction here (any chain)."""


async def send(w3: AsyncWeb3, call: Any, sender: Sender, value: int = 0) -> TxReceipt:
    """Send a contract call or constructor (`contract.functions.f(...)` / `contract.constructor(...)`)
    from `sender`, wait for the receipt and return it.

    A call that would revert raises (ContractLogicError on JSON-RPC nodes, eth_tester's
    TransactionFailed on the embedded chain; `revert_reason` reads either) before anything is sent.
    A transaction mined with status 0 raises TransactionReverted.
    A local account's nonce is the node's count of its mined transactions, so this is not for
    concurrent sends from one key (the chain service keeps its own nonces for that).
    """
    if isinstance(sender, LocalAccount):
        tx = await call.build_transaction(
            {"from": sender.address, "value": value, "nonce": await w3.eth.get_transaction_count(sender.address)}
        )
        signed = sender.sign_transaction(tx)
        tx_hash = await w3.eth.send_raw_transaction(signed.raw_transaction)
    else:
        tx_hash = await call.transact({"from": sender, "value": value})
    receipt = await w3.eth.wait_for_transaction_receipt(tx_hash)
    if receipt["status"] != 1:
        raise TransactionReverted(receipt)
    return receipt


class TransactionReverted(Exception):
    """A transaction was mined but reverted (status 0)."""

    def __init__(self, receipt: TxReceipt) -> None:
        super().__init__(f"transaction {HexBytes(receipt['transactionHash']).to_0x_hex()} reverted")
        self.receipt = receipt


def _address(sender: Sender) -> str:
    return sender.address if isinstance(sender, LocalAccount) else to_checksum_address(sender)


async def deploy(
    w3: AsyncWeb3, deployer: Sender, *, operator: str | None = None, minter: str | None = None
) -> Deployment:
    """Deploy EnergyToken and EnergyMarket from `deployer`, who becomes admin of both.

    The deployer holds METER_ROLE on the token and OPERATOR_ROLE on the market; `minter` and
    `operator`, when given, are granted those roles too. The market needs no role on the token:
    sellers approve it, and it moves only tokens it holds. Returns the bound contracts.
    """
    admin = _address(deployer)
    token = await _deploy_one(w3, TOKEN, deployer, admin)
    market = await _deploy_one(w3, MARKET, deployer, token.address, admin)
    deployment = Deployment(token=token, market=market)
    if minter is not None:
        await send(w3, deployment.token.functions.grantRole(METER_ROLE, to_checksum_address(minter)), deployer)
    if operator is not None:
        await send(w3, deployment.market.functions.grantRole(OPERATOR_ROLE, to_checksum_address(operator)), deployer)
    return deployment


async def _deploy_one(w3: AsyncWeb3, name: str, deployer: Sender, *args: Any) -> AsyncContract:
    art = load_artifact(name)
    factory = w3.eth.contract(abi=art["abi"], bytecode=art["bytecode"])
    receipt = await send(w3, factory.constructor(*args), deployer)
    return w3.eth.contract(address=receipt["contractAddress"], abi=art["abi"])


def attach(w3: AsyncWeb3, token_address: str, market_address: str) -> Deployment:
    """Bind already deployed contracts at the given addresses (no network access)."""
    return Deployment(
        token=w3.eth.contract(address=to_checksum_address(token_address), abi=load_artifact(TOKEN)["abi"]),
        market=w3.eth.contract(address=to_checksum_address(market_address), abi=load_artifact(MARKET)["abi"]),
    )


def delivery_typed_data(chain_id: int, market_address: str, trade_id: bytes, delivered_wh: int) -> dict[str, Any]:
    """The EIP-712 typed data (eth_signTypedData_v4 shape) of a delivery reading: trade
    `trade_id` has delivered `delivered_wh` Wh in total, for the market at `market_address`."""
    return {
        "types": DELIVERY_TYPES,
        "primaryType": "Delivery",
        "domain": {
            "name": EIP712_NAME,
            "version": EIP712_VERSION,
            "chainId": chain_id,
            "verifyingContract": to_checksum_address(market_address),
        },
        "message": {"tradeId": bytes(trade_id), "deliveredWh": delivered_wh},
    }


def sign_delivery(
    private_key: bytes | str, chain_id: int, market_address: str, trade_id: bytes, delivered_wh: int
) -> bytes:
    """A meter key's 65-byte signature (r ‖ s ‖ v) of a delivery reading, for settleSigned."""
    typed = delivery_typed_data(chain_id, market_address, trade_id, delivered_wh)
    return bytes(Account.sign_typed_data(private_key, full_message=typed).signature)


async def close_provider(w3: AsyncWeb3) -> None:
    """Release what an AsyncWeb3's provider holds: HTTP/websocket sessions and, for HTTP, the
    thread pool web3 8 keeps for its session-cache lock (its disconnect() leaves that running).
    The in-process eth-tester provider holds nothing and is left as is."""
    provider = w3.provider
    if isinstance(provider, AsyncEthereumTesterProvider):
        return
    await provider.disconnect()
    manager = getattr(provider, "_request_session_manager", None)
    if manager is not None:
        manager.session_pool.shutdown(wait=True)


def revert_reason(exc: BaseException) -> str | None:
    """The revert reason carried by a web3 / eth-tester exception, as a clean string
    ("EnergyMarket: trade not open"), or None when `exc` is not a contract revert.

    A revert without a reason string gives "" (empty)."""
    if isinstance(exc, ContractLogicError):
        data = exc.data if isinstance(exc.data, str) else None
        if data:
            raw = HexBytes(data)
            if raw[:4] == _ERROR_STRING_SELECTOR:
                return str(abi_decode(["string"], raw[4:])[0])
        return _strip_prefix(exc.message or "")
    if isinstance(exc, TransactionFailed):
        return _strip_prefix(str(exc.args[0]) if exc.args else "")
    return None


def _strip_prefix(message: str) -> str:
    if message.startswith(_REVERTED_PREFIX):
        message = message[len(_REVERTED_PREFIX) :].lstrip(":").strip()
    return message
