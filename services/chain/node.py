"""The edge to Ethereum: one JSON-RPC node (or the in-process embedded chain).

``Node`` hides what differs between backends: how a raw transaction is sent, whether
the node knows a hash, mining control, the prefunded dev account, and how errors look.
Every call that cannot reach the node raises :class:`ChainUnavailable`; a node that
refuses a transaction raises :class:`TxRejected` with its reason. Over HTTP, a rate limit
(HTTP 429, JSON-RPC -32005 or a 'rate limit' / 'limit exceeded' message), a 5xx answer,
a dropped connection and a timeout are retried with backoff by the provider
(:class:`RetryingHTTPProvider`) and, if they persist, raised as :class:`RateLimited` /
:class:`RpcTimeout` / :class:`ChainUnavailable`: never as a refusal. :func:`refusal`
sorts a refusal's reason into what the transaction manager does about it.
"""

from __future__ import annotations

import asyncio
import time
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from eth_account import Account
from eth_utils import keccak
from eth_tester.exceptions import TransactionFailed
from eth_utils.exceptions import ValidationError as EthValidationError
from hexbytes import HexBytes
from web3 import AsyncWeb3
from web3.exceptions import (
    BlockNotFound,
    ContractLogicError,
    ProviderConnectionError,
    TimeExhausted,
    TransactionNotFound,
    Web3RPCError,
)
from web3.providers import AsyncHTTPProvider

from services.bus.retry import Backoff

from .bindings import close_provider, revert_reason
from .errors import ChainUnavailable, NotSupported, RateLimited, RpcTimeout, TxRejected

log = logging.getLogger(__name__)

# anvil's (and hardhat's) first prefunded account: a public, well-known test key.
ANVIL_DEV_KEY = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"
ANVIL_DEV_KEYS = (  # anvil's default mnemonic, accounts 0-3: the dev chain's admin, operator, registrar, pauser
    ANVIL_DEV_KEY,
    "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d",
    "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a",
    "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6",
)

_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError, aiohttp.ClientError, asyncio.TimeoutError, ProviderConnectionError, TimeExhausted,
)


def is_transient(err: Any) -> str | None:
    """'rate_limit' or 'timeout' if a JSON-RPC error object says "slow down" or "try again"
    (not a verdict on the request); else None."""
    if not isinstance(err, dict):
        return None
    code, msg = err.get("code"), str(err.get("message", "")).lower()
    if code in (-32005, 429) or "rate limit" in msg or "ratelimit" in msg or "too many requests" in msg \
            or ("limit exceeded" in msg and "gas limit" not in msg) or "exceeded the quota" in msg \
            or "capacity exceeded" in msg or "request limit" in msg:
        return "rate_limit"
    if "timeout" in msg or "timed out" in msg or "try again later" in msg or "temporarily unavailable" in msg:
        return "timeout"
    return None


def refusal(reason: str) -> str:
    """What a node's refusal of a raw transaction means for its sender:

    - ``known``: the node has it already (fine);
    - ``nonce_low``: the nonce is used (by this transaction mined, or by another one);
    - ``nonce_high``: a nonce before it is missing at the node (fill the gap first);
    - ``replacement``: one with this nonce is pooled and pays more (pay more still);
    - ``fee``: the fees are too low for the node now (re-sign with current fees);
    - ``funds``: the account cannot pay for it;
    - ``other``: refused for good (fill its nonce with a no-op)."""
    low = reason.lower()
    if any(k in low for k in ("already known", "known transaction", "already imported", "alreadyknown",
                              "already in mempool", "already exists")):
        return "known"
    if any(k in low for k in ("nonce too low", "nonce is too low", "already been used", "old nonce")):
        return "nonce_low"
    if any(k in low for k in ("nonce too high", "nonce gap", "future nonce")):
        return "nonce_high"
    if "replacement" in low and ("underpriced" in low or "too low" in low) or "could not replace" in low:
        return "replacement"
    if any(k in low for k in ("underpriced", "base fee", "basefee", "fee too low", "gas price too low",
                              "gasprice too low", "tip too low", "priority fee", "fee cap", "feecap",
                              "below minimum", "min gas price", "minimum gas price", "gas price below")):
        return "fee"
    if any(k in low for k in ("insufficient funds", "enough balance", "insufficient balance")):
        return "funds"
    return "other"


def _reason(e: BaseException) -> str:
    """A short human reason out of web3 / eth-tester / node errors."""
    if isinstance(e, Web3RPCError):
        msg = e.message or str(e)
        if isinstance(e.rpc_response, dict):
            err = e.rpc_response.get("error")
            if isinstance(err, dict) and err.get("message"):
                msg = str(err["message"])
    else:
        msg = str(e) or type(e).__name__
    return msg.removeprefix("execution reverted: ").removeprefix("execution reverted:").strip()[:500]


@contextlib.asynccontextmanager
async def guard() -> AsyncIterator[None]:
    """Map "cannot reach the node" to ChainUnavailable, and refusals to TxRejected."""
    try:
        yield
    except (ChainUnavailable, TxRejected, NotSupported):
        raise
    except _UNAVAILABLE as e:
        raise ChainUnavailable(f"chain node unreachable: {type(e).__name__}") from e
    except (ContractLogicError, TransactionFailed) as e:
        raise TxRejected(revert_reason(e) or "reverted") from e
    except EthValidationError as e:
        raise TxRejected(_reason(e)) from e
    except TransactionNotFound:
        raise
    except Web3RPCError as e:
        err = e.rpc_response.get("error") if isinstance(e.rpc_response, dict) else None
        cause = is_transient(err)
        if cause == "rate_limit":
            raise RateLimited(f"chain node rate limit: {_reason(e)}") from e
        if cause == "timeout":
            raise RpcTimeout(f"chain node timeout: {_reason(e)}") from e
        raise TxRejected(_reason(e)) from e


class RetryingHTTPProvider(AsyncHTTPProvider):
    """web3's HTTP provider, with what a public node or an RPC provider does told apart
    from a refusal: a timeout, a dropped connection, HTTP 429/5xx and JSON-RPC rate-limit
    errors are retried ``retries`` times with exponential backoff (and jitter), then
    raised as RateLimited / RpcTimeout / ChainUnavailable. A node that is not listening
    at all is not retried here (the service's supervisor reconnects with backoff).
    ``transient`` counts the retried causes."""

    def __init__(self, url: str, *, timeout_s: float = 10.0, retries: int = 4, backoff_s: float = 0.2) -> None:
        super().__init__(url, request_kwargs={"timeout": aiohttp.ClientTimeout(total=timeout_s)},
                         exception_retry_configuration=None)
        self.retries, self.backoff_s, self.timeout_s = retries, backoff_s, timeout_s
        self.transient: Counter[str] = Counter()

    async def make_request(self, method: Any, params: Any) -> Any:
        data = self.encode_rpc_request(method, params)
        cause, detail = "transport", ""
        backoff = Backoff(self.backoff_s, 5.0, jitter=0.25)
        for attempt in range(self.retries + 1):
            try:
                resp = self.decode_rpc_response(await self._make_request(method, data))
            except aiohttp.ClientResponseError as e:
                if e.status != 429 and e.status < 500:
                    raise ChainUnavailable(f"chain node answered HTTP {e.status} to {method}") from e
                cause, detail = ("rate_limit" if e.status == 429 else "transport"), f"HTTP {e.status}"
            except aiohttp.ClientConnectorError:
                raise  # nobody listening: the supervisor's backoff, not ours
            except asyncio.TimeoutError:
                cause, detail = "timeout", f"no answer within {self.timeout_s} s"
            except (aiohttp.ClientError, OSError) as e:
                cause, detail = "transport", type(e).__name__
            else:
                err = resp.get("error") if isinstance(resp, dict) else None
                transient = is_transient(err)
                if transient is None:
                    return resp
                cause, detail = transient, str(err.get("message", ""))[:200]  # type: ignore[union-attr]
            self.transient[cause] += 1
            if attempt < self.retries:
                await asyncio.sleep(backoff.failed())
        log.warning("chain node: %s of %s persisted over %d attempts (%s)", cause, method, self.retries + 1, detail)
        if cause == "rate_limit":
            raise RateLimited(f"chain node rate limit on {method}: {detail}")
        if cause == "timeout":
            raise RpcTimeout(f"chain node timeout on {method}: {detail}")
        raise ChainUnavailable(f"chain node unreachable on {method}: {detail}")


class Node:
    """A JSON-RPC node. ``kind`` is 'embedded', 'anvil' or 'rpc'."""

    kind = "rpc"
    pending_tag = "pending"
    """The block tag that sees pending transactions (estimates, balances)."""

    def __init__(self, w3: AsyncWeb3, url: str) -> None:
        self.w3 = w3
        self.url = url
        self.client = ""
        self.dev_key: bytes | None = None
        self.dev_keys: list[bytes] = []  # dev chains: prefunded keys for the separate roles (admin first)

    @property
    def is_dev(self) -> bool:
        return self.dev_key is not None

    async def probe(self) -> None:
        """Reach the node once (raises ChainUnavailable)."""
        async with guard():
            self.client = str(await self.w3.client_version)

    async def identity(self) -> tuple[int, str]:
        async with guard():
            chain_id = int(await self.w3.eth.chain_id)
            genesis = await self.w3.eth.get_block(0)
        return chain_id, HexBytes(genesis["hash"]).to_0x_hex()

    async def has_code(self, address: str) -> bool:
        async with guard():
            return len(await self.w3.eth.get_code(AsyncWeb3.to_checksum_address(address))) > 0

    async def send_raw(self, raw: bytes) -> str:
        async with guard():
            h = await self.w3.eth.send_raw_transaction(raw)
        return HexBytes(h).to_0x_hex()

    async def known(self, tx_hash: str) -> bool:
        """Whether the node has this transaction (pending or mined)."""
        async with guard():
            try:
                await self.w3.eth.get_transaction(tx_hash)
            except TransactionNotFound:
                return False
        return True

    async def receipt(self, tx_hash: str) -> Any | None:
        async with guard():
            try:
                return await self.w3.eth.get_transaction_receipt(tx_hash)
            except TransactionNotFound:
                return None

    async def nonce(self, address: str, block: str = "pending") -> int:
        async with guard():
            return int(await self.w3.eth.get_transaction_count(AsyncWeb3.to_checksum_address(address), block))

    async def head(self) -> tuple[int, str]:
        """The latest block's number and hash."""
        async with guard():
            b = await self.w3.eth.get_block("latest")
        return int(b["number"]), HexBytes(b["hash"]).to_0x_hex()

    async def block_hash(self, number: int) -> str | None:
        async with guard():
            try:
                b = await self.w3.eth.get_block(number)
            except BlockNotFound:
                return None
        return None if b is None else HexBytes(b["hash"]).to_0x_hex()

    async def fee_market(self, blocks: int = 10, percentile: float = 50.0) -> tuple[int | None, int | None]:
        """(the next block's base fee, or None on a chain without EIP-1559; the median tip
        paid in recent blocks, or None if the node does not say), from eth_feeHistory,
        else from the latest block."""
        try:
            async with guard():
                h = await self.w3.eth.fee_history(blocks, "latest", [percentile])
            bases = [int(x) for x in h.get("baseFeePerGas") or []]
            if bases:
                tips = sorted(int(r[0]) for r in h.get("reward") or [] if r)
                tip = tips[len(tips) // 2] if tips else None
                return (bases[-1] if any(bases) else None), tip
        except (TxRejected, NotSupported, ValueError):  # no eth_feeHistory here: the latest block
            pass
        async with guard():
            block = await self.w3.eth.get_block("latest")
        base = block.get("baseFeePerGas")
        return (None if base is None else int(base)), None

    async def gas_price(self) -> int:
        async with guard():
            return int(await self.w3.eth.gas_price)

    @property
    def transient(self) -> dict[str, int]:
        """Retried transport errors, rate limits and timeouts, by cause."""
        return dict(getattr(self.w3.provider, "transient", {}))

    # mining ---------------------------------------------------------------------------

    supports_mining = False

    async def mining(self) -> bool:
        return True  # someone else's network produces blocks

    async def set_mining(self, on: bool, interval_s: float = 0.0) -> None:
        raise NotSupported(f"mining control is not supported on this chain ({self.client or self.url})")

    async def block_time(self) -> int:
        """The newest block's timestamp: the contracts' clock."""
        async with guard():
            return int((await self.w3.eth.get_block("latest"))["timestamp"])

    async def clock_behind(self, t: int) -> bool:
        """Whether the next block may still be stamped before ``t``. A network's blocks keep
        coming; a dev chain that mines only on transactions is moved on to the wall clock."""
        return await self.block_time() < t

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await close_provider(self.w3)


class AnvilNode(Node):
    kind = "anvil"
    supports_mining = True

    async def _rpc(self, method: str, params: list[Any]) -> Any:
        async with guard():
            resp = await self.w3.provider.make_request(method, params)  # type: ignore[arg-type]
        if "error" in resp:
            raise TxRejected(str(resp["error"].get("message", resp["error"])))
        return resp.get("result")

    async def mining(self) -> bool:
        """Automine, or interval mining (``--block-time``, evm_setIntervalMining)."""
        if await self._rpc("anvil_getAutomine", []):
            return True
        try:
            return int(await self._rpc("anvil_getIntervalMining", []) or 0) > 0
        except TxRejected:  # a node without it (hardhat)
            return False

    async def clock_behind(self, t: int) -> bool:
        """Anvil mined its last block a while ago when idle: an empty block brings its clock
        to the wall clock's."""
        if await self.block_time() >= t:
            return False
        if time.time() >= t + 1 and await self.mining():
            await self._rpc("evm_mine", [])
            return await self.block_time() < t
        return True

    async def set_mining(self, on: bool, interval_s: float = 0.0) -> None:
        if on:
            await self._rpc("evm_setAutomine", [True])  # mines what is pending right away
            if interval_s > 0:
                await self._rpc("evm_setIntervalMining", [max(1, round(interval_s))])
        else:
            await self._rpc("evm_setIntervalMining", [0])
            await self._rpc("evm_setAutomine", [False])


def _threaded_tester_provider() -> Any:
    """web3's eth-tester provider with every call on one worker thread: py-evm is
    synchronous and slow (a block per transaction), so on the event loop it would hold up
    every request of the service; one thread keeps its calls in order."""
    import concurrent.futures

    from web3.providers.eth_tester import AsyncEthereumTesterProvider
    from web3.providers.eth_tester.main import _make_request

    class ThreadedTesterProvider(AsyncEthereumTesterProvider):
        def __init__(self) -> None:
            super().__init__()
            self.worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedded-evm")

        async def run(self, fn: Any, *args: Any) -> Any:
            return await asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)

        async def make_request(self, method: Any, params: Any) -> Any:
            self._current_request_id += 1
            return await self.run(_make_request, method, params, self.api_endpoints, self.ethereum_tester,
                                  repr(self._current_request_id))

    return ThreadedTesterProvider()


class EmbeddedNode(Node):
    """The in-process py-evm chain (eth-tester). A dev/demo chain: its state lives in this
    process and is gone when it stops. Its calls run on one worker thread of their own.

    eth-tester's own "pending" mode keeps at most one pending transaction per sender, so
    with mining stopped this node holds raw transactions in its own pool, in order, and
    sends them (one block each) when mining starts again.
    """

    kind = "embedded"
    supports_mining = True
    pending_tag = "latest"

    def __init__(self, w3: AsyncWeb3, url: str = "embedded") -> None:
        super().__init__(w3, url)
        self.provider = w3.provider
        self.tester = w3.provider.ethereum_tester  # type: ignore[attr-defined]
        self.dev_key = self.tester.backend.account_keys[0].to_bytes()
        self.dev_keys = [k.to_bytes() for k in self.tester.backend.account_keys[:4]]
        self._pool: list[tuple[str, bytes]] = []
        self._mining = True
        self._interval_task: asyncio.Task[None] | None = None
        self.users = 1

    async def send_raw(self, raw: bytes) -> str:
        if self._mining:
            return await super().send_raw(raw)
        tx_hash = HexBytes(keccak(raw)).to_0x_hex()
        async with guard():
            sender = Account.recover_transaction(raw)
        pool_nonces = {n for h, r in self._pool if (n := self._nonce_of(r, sender)) is not None}
        nonce = self._nonce_of(raw, sender)
        if nonce is not None and (nonce < await super().nonce(sender, "latest") or nonce in pool_nonces):
            raise TxRejected("nonce too low")
        if all(h != tx_hash for h, _ in self._pool):
            self._pool.append((tx_hash, raw))
        return tx_hash

    @staticmethod
    def _nonce_of(raw: bytes, sender: str) -> int | None:
        from eth_account.typed_transactions import TypedTransaction
        from eth_account._utils.legacy_transactions import Transaction
        try:
            if raw[0] <= 0x7F:
                d = TypedTransaction.from_bytes(HexBytes(raw)).as_dict()
            else:
                d = Transaction.from_bytes(raw).as_dict()
            return int(d["nonce"])
        except Exception:  # noqa: BLE001 - not decodable: the node will say so
            return None

    async def known(self, tx_hash: str) -> bool:
        if any(h == tx_hash for h, _ in self._pool):
            return True
        return await super().known(tx_hash)

    async def nonce(self, address: str, block: str = "pending") -> int:
        n = await super().nonce(address, "latest")
        if block == "pending":
            addr = AsyncWeb3.to_checksum_address(address)
            for _, raw in self._pool:
                if Account.recover_transaction(raw) == addr:
                    n += 1
        return n

    async def mining(self) -> bool:
        return self._mining

    async def set_mining(self, on: bool, interval_s: float = 0.0) -> None:
        self._mining = on
        if on:
            pool, self._pool = self._pool, []
            for tx_hash, raw in pool:
                try:
                    await super().send_raw(raw)
                except TxRejected as e:
                    log.warning("embedded chain: dropped pending %s: %s", tx_hash, e.reason)
            if interval_s > 0 and self._interval_task is None:
                self._interval_task = asyncio.create_task(self._mine_every(interval_s), name="embedded-miner")
        elif self._interval_task is not None:
            self._interval_task.cancel()
            await asyncio.gather(self._interval_task, return_exceptions=True)
            self._interval_task = None

    async def clock_behind(self, t: int) -> bool:
        """py-evm stamps a block when the one before it was mined: after an idle spell the
        next block is dated in the past. Move the pending block to the wall clock."""
        if await self.block_time() >= t:
            return False
        now = int(time.time())
        if now >= t + 1:
            pending = (await self.provider.run(self.tester.get_block_by_number, "pending"))["timestamp"]
            if pending < now:
                await self.provider.run(self.tester.time_travel, now)  # type: ignore[attr-defined]
            return False
        return True

    async def _mine_every(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await self.provider.run(self.tester.mine_blocks, 1)  # type: ignore[attr-defined]

    async def close(self) -> None:
        self.users -= 1
        if self.users > 0:
            return  # another service of this process still uses this shared chain
        _SHARED.pop(self.url, None)
        if self._interval_task is not None:
            self._interval_task.cancel()
            await asyncio.gather(self._interval_task, return_exceptions=True)
            self._interval_task = None
        self.provider.worker.shutdown(wait=True)  # type: ignore[attr-defined]


_SHARED: dict[str, EmbeddedNode] = {}


async def connect(url: str, *, timeout_s: float = 10.0, retries: int = 4) -> Node:
    """Build the node for ``url`` ('embedded' or an http(s)/ws(s) URL) and reach it once.

    Raises ChainUnavailable when an RPC node cannot be reached (the caller retries).
    """
    node: Node
    if url == "embedded" or url.startswith("embedded:"):
        # 'embedded': a chain of this service's own; 'embedded:NAME': one chain shared by the
        # services of this process (an operator and its sites' wallets in one test)
        shared = _SHARED.get(url)
        if shared is not None:
            shared.users += 1
            return shared
        node = EmbeddedNode(AsyncWeb3(_threaded_tester_provider()), url)
        await node.probe()
        if url != "embedded":
            _SHARED[url] = node
        return node
    if url.startswith(("http://", "https://")):
        w3 = AsyncWeb3(RetryingHTTPProvider(url, timeout_s=timeout_s, retries=retries))
    elif url.startswith(("ws://", "wss://")):
        from web3.providers.persistent import WebSocketProvider

        w3 = AsyncWeb3(WebSocketProvider(url))
        async with guard():
            await w3.provider.connect()
    else:
        raise ValueError(f"unknown chain URL {url!r}: use 'embedded' or an http(s):// or ws(s):// URL")
    # web3's validation layer asks the node its chain id before every eth_call and estimate
    # (twice the requests for every read); the chain id is checked once, by the node's identity
    # against the deployment, and the node refuses a transaction signed for another chain
    w3.middleware_onion.remove("validation")
    probe = Node(w3, url)
    try:
        await probe.probe()
    except ChainUnavailable:
        await probe.close()
        raise
    if probe.client.lower().startswith(("anvil", "hardhat")):
        node = AnvilNode(w3, url)
        node.client = probe.client
        with contextlib.suppress(ChainUnavailable, TxRejected):
            acct = Account.from_key(ANVIL_DEV_KEY)
            async with guard():
                if await w3.eth.get_balance(acct.address) > 0:
                    node.dev_key = bytes(acct.key)
                    node.dev_keys = [bytes(Account.from_key(k).key) for k in ANVIL_DEV_KEYS]
        return node
    return probe
