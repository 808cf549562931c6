"""Deploy, attach to and talk to gridtrade's contracts (MeterRegistry, EnergyToken, EnergyMarket v2).

No service wiring here: the chain service builds on these helpers. Everything that touches a
node is async (web3's AsyncWeb3); the id and cost helpers are pure. The signed facts the
contracts check (meter registrations, production, deliveries, offers, bids) are built, signed
and recovered by ``services.bus.typed``; ``Deployment`` names the EIP-712 domain of each contract.

Units: energy in Wh (the token's base unit, 3 decimals), prices in wei per kWh, amounts in wei.
The Ether due for a cumulative delivery of `wh` at `price` is `services.bus.prices.wei_for(wh, price)`
= wh * price // 1000.

Roles are separate keys: the deployer holds only DEFAULT_ADMIN_ROLE (grants and revokes roles);
the registrar registers meters, the operator opens trades (from signed offers and bids), the
pauser pauses minting and new commitments. Nobody holds a role that mints.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

from eth_abi import decode as abi_decode
from eth_account.signers.local import LocalAccount
from eth_tester.exceptions import TransactionFailed
from eth_utils import keccak, to_checksum_address
from hexbytes import HexBytes
from web3 import AsyncWeb3
from web3.contract import AsyncContract
from web3.exceptions import ContractLogicError
from web3.providers.eth_tester import AsyncEthereumTesterProvider
from web3.types import TxReceipt

from services.bus import typed

REGISTRY = "MeterRegistry"
TOKEN = "EnergyToken"
MARKET = "EnergyMarket"

#: Role that grants and revokes roles (on every contract); the deployer's only role.
DEFAULT_ADMIN_ROLE = b"\x00" * 32
#: Role that registers and revokes meters on MeterRegistry.
REGISTRAR_ROLE = keccak(text="REGISTRAR_ROLE")
#: Role that opens trades from signed offers and bids, and may close any trade, on EnergyMarket.
OPERATOR_ROLE = keccak(text="OPERATOR_ROLE")
#: Role that pauses minting (EnergyToken) and new commitments (EnergyMarket).
PAUSER_ROLE = keccak(text="PAUSER_ROLE")

#: Trade.status values of EnergyMarket.trades(tradeId).
STATUS_NONE, STATUS_OPEN, STATUS_CLOSING, STATUS_CLOSED = 0, 1, 2, 3
#: MeterRegistry.meterOf(meter) states.
METER_UNKNOWN, METER_ACTIVE, METER_REVOKED = 0, 1, 2

_ERROR_STRING_SELECTOR = bytes.fromhex("08c379a0")  # Error(string)
_REVERTED_PREFIX = "execution reverted"


def load_artifact(name: str) -> dict[str, Any]:
    """The committed build artifact of contract `name` (abi, bytecode, deployedBytecode, compiler...)."""
    path = resources.files("contracts").joinpath("artifacts", f"{name}.json")
    return json.loads(path.read_text())


def id32(text: str) -> bytes:
    """A bytes32 id (a trade's on-chain id) derived from a stable off-chain id: keccak256 of its
    UTF-8, the same as ``typed.trade_key``."""
    return keccak(text=text)


@dataclass(frozen=True)
class Deployment:
    """The three contracts of one market, bound to a web3 instance."""

    token: AsyncContract
    market: AsyncContract
    registry: AsyncContract

    @property
    def token_address(self) -> str:
        return str(self.token.address)

    @property
    def market_address(self) -> str:
        return str(self.market.address)

    @property
    def registry_address(self) -> str:
        return str(self.registry.address)

    def token_domain(self, chain_id: int) -> typed.Domain:
        """The EIP-712 domain of production readings (meters sign them for this token)."""
        return typed.token_domain(chain_id, self.token_address)

    def market_domain(self, chain_id: int) -> typed.Domain:
        """The EIP-712 domain of offers, bids and deliveries (for this market)."""
        return typed.market_domain(chain_id, self.market_address)

    def registry_domain(self, chain_id: int) -> typed.Domain:
        """The EIP-712 domain of meter registrations (for this registry)."""
        return typed.registry_domain(chain_id, self.registry_address)


Sender = str | LocalAccount
"""Who sends a transaction: an address unlocked on the node (dev chains) or a local account
whose key signs the transaction here (any chain)."""


async def send(w3: AsyncWeb3, call: Any, sender: Sender, value: int = 0, gas: int | None = None) -> TxReceipt:
    """Send a contract call or constructor (`contract.functions.f(...)` / `contract.constructor(...)`)
    from `sender`, wait for the receipt and return it.

    A call that would revert raises (ContractLogicError on JSON-RPC nodes, eth_tester's
    TransactionFailed on the embedded chain; `revert_reason` reads either) before anything is sent,
    unless `gas` is given (the caller estimated it: nothing is estimated here).
    A transaction mined with status 0 raises TransactionReverted.
    A local account's nonce is the node's count of its mined transactions, so this is not for
    concurrent sends from one key (the chain service keeps its own nonces for that).
    """
    params: dict[str, Any] = {"value": value} if gas is None else {"value": value, "gas": gas}
    if isinstance(sender, LocalAccount):
        tx = await call.build_transaction(
            {"from": sender.address, **params, "nonce": await w3.eth.get_transaction_count(sender.address)}
        )
        signed = sender.sign_transaction(tx)
        tx_hash = await w3.eth.send_raw_transaction(signed.raw_transaction)
    else:
        tx_hash = await call.transact({"from": sender, **params})
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
    w3: AsyncWeb3,
    deployer: Sender,
    *,
    operator: str,
    registrar: str,
    pauser: str,
    dispute_window_s: int,
) -> Deployment:
    """Deploy MeterRegistry, EnergyToken and EnergyMarket from `deployer`; return them bound.

    Each role goes to its own holder, given to the constructors (no grant transactions): the
    deployer is admin of all three and holds nothing else; `registrar` registers meters,
    `operator` opens trades, `pauser` pauses the token's minting and the market's new
    commitments. After a close, a higher signed delivery still settles for `dispute_window_s`.
    The market needs no role on the token: sellers approve it, and it moves only tokens it holds.
    """
    admin = _address(deployer)
    operator, registrar, pauser = (to_checksum_address(a) for a in (operator, registrar, pauser))
    registry = await _deploy_one(w3, REGISTRY, deployer, admin, registrar)
    token = await _deploy_one(w3, TOKEN, deployer, registry.address, admin, pauser)
    market = await _deploy_one(
        w3, MARKET, deployer, token.address, registry.address, admin, operator, pauser, dispute_window_s
    )
    return Deployment(token=token, market=market, registry=registry)


async def deploy_market(
    w3: AsyncWeb3,
    deployer: Sender,
    token_address: str,
    registry_address: str,
    *,
    operator: str,
    pauser: str,
    dispute_window_s: int,
) -> Deployment:
    """Deploy a new EnergyMarket next to an existing EnergyToken and MeterRegistry (the way to
    move a deployment to a market of a later version: tokens, mint counters and meter
    registrations stay where they are); return the three bound. Roles as in :func:`deploy`."""
    admin = _address(deployer)
    token, registry = to_checksum_address(token_address), to_checksum_address(registry_address)
    market = await _deploy_one(w3, MARKET, deployer, token, registry, admin, to_checksum_address(operator),
                               to_checksum_address(pauser), dispute_window_s)
    bound = attach(w3, token, market.address, registry)
    return Deployment(token=bound.token, market=market, registry=bound.registry)


async def _deploy_one(w3: AsyncWeb3, name: str, deployer: Sender, *args: Any) -> AsyncContract:
    art = load_artifact(name)
    factory = w3.eth.contract(abi=art["abi"], bytecode=art["bytecode"])
    receipt = await send(w3, factory.constructor(*args), deployer)
    return w3.eth.contract(address=receipt["contractAddress"], abi=art["abi"])


def attach(w3: AsyncWeb3, token_address: str, market_address: str, registry_address: str) -> Deployment:
    """Bind already deployed contracts at the given addresses (no network access)."""
    return Deployment(
        token=w3.eth.contract(address=to_checksum_address(token_address), abi=load_artifact(TOKEN)["abi"]),
        market=w3.eth.contract(address=to_checksum_address(market_address), abi=load_artifact(MARKET)["abi"]),
        registry=w3.eth.contract(address=to_checksum_address(registry_address), abi=load_artifact(REGISTRY)["abi"]),
    )


async def discover(w3: AsyncWeb3, market_address: str) -> Deployment:
    """Bind a deployment from its market's address alone: the market names its token and registry."""
    market = w3.eth.contract(address=to_checksum_address(market_address), abi=load_artifact(MARKET)["abi"])
    token, registry = await market.functions.token().call(), await market.functions.registry().call()
    return attach(w3, token, market_address, registry)


def open_args(
    trade_id: str, offer: typed.Offer, offer_sig: str, bid: typed.Bid, bid_sig: str, wh: int, price_wei_per_kwh: int
) -> list[Any]:
    """The arguments of EnergyMarket.open for the off-chain trade id `trade_id` (its on-chain id is
    ``typed.trade_key(trade_id)``), from a signed offer and bid (0x-hex signatures)."""
    return [typed.trade_key(trade_id), offer.as_tuple(), typed.sig_bytes(offer_sig), bid.as_tuple(),
            typed.sig_bytes(bid_sig), wh, price_wei_per_kwh]


def opening(
    trade_id: str, offer: typed.Offer, offer_sig: str | bytes, bid: typed.Bid, bid_sig: str | bytes, wh: int,
    price_wei_per_kwh: int,
) -> tuple[Any, ...]:
    """One entry of EnergyMarket.openBatch (an ``Opening``): the arguments of one ``open``."""
    def raw(sig: str | bytes) -> bytes:
        return sig if isinstance(sig, bytes) else typed.sig_bytes(sig)

    return (typed.trade_key(trade_id), offer.as_tuple(), raw(offer_sig), bid.as_tuple(), raw(bid_sig), wh,
            price_wei_per_kwh)


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
