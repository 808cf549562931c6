"""Meter drivers behind one interface: ``await read() -> Counters``,
``await set_relay(closed)``, ``await close()``.

- :class:`SimDriver`: the simulated site in-process (:mod:`services.meter.sim`).
- :class:`LineDriver`: the checksummed line protocol (:mod:`services.meter.lineproto`)
  over pyserial-asyncio.
- :class:`ModbusDriver`: Modbus RTU through pymodbus' async serial client, the
  PZEM-017-style register map (:mod:`services.meter.registers`) and a relay coil.

The serial drivers connect lazily and survive a flaky port: an I/O error closes the port
and the next attempt waits an exponential backoff (capped); garbage, short frames and bad
checksums are counted by reason in :attr:`Driver.errors` and never returned as readings.
Every failure raises :class:`~services.meter.errors.MeterError`; callers keep relays safe.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable

from services.bus.retry import Backoff, LogThrottle

from .config import MeterConfig
from .errors import DriverError, ProtocolError
from .physics import Counters
from .sim import SimParams, SimSite

log = logging.getLogger(__name__)


class Driver:
    """Base of every driver: counters of errors by reason, connects and reconnects."""

    kind = "base"

    def __init__(self, cfg: MeterConfig) -> None:
        self.cfg = cfg
        self.errors: collections.Counter[str] = collections.Counter()
        self.connects = 0
        self.connected = False

    async def read(self) -> Counters:
        raise NotImplementedError

    async def set_relay(self, closed: bool) -> None:
        raise NotImplementedError

    def sim_clock(self) -> tuple[float, float] | None:
        """(simulated Unix time now, time scale) of a simulated meter; None for a real one."""
        return None

    async def close(self) -> None:
        self.connected = False

    def health(self) -> dict:
        return {"driver": self.kind, "connected": self.connected, "connects": self.connects,
                "errors": dict(self.errors)}


class SimDriver(Driver):
    kind = "sim"

    def __init__(self, cfg: MeterConfig, params: SimParams, state: dict | None = None) -> None:
        super().__init__(cfg)
        self.sim = SimSite(params, cfg.role, state)
        self.connected = True
        self.connects = 1

    async def read(self) -> Counters:
        return self.sim.read()

    async def set_relay(self, closed: bool) -> None:
        self.sim.set_relay(closed)

    def state_json(self) -> str:
        return self.sim.state_json()

    def sim_clock(self) -> tuple[float, float] | None:
        return self.sim.clock.now(), self.sim.clock.scale


class SerialDriver(Driver):
    """Connection management shared by the line and Modbus drivers."""

    def __init__(self, cfg: MeterConfig, *, backoff: Backoff | None = None) -> None:
        super().__init__(cfg)
        self.backoff = backoff or Backoff()
        self._lock = asyncio.Lock()
        self._failures = LogThrottle()  # the port's failures since it was last opened

    async def _open(self) -> None:
        raise NotImplementedError

    async def _close(self) -> None:
        raise NotImplementedError

    async def _ensure(self) -> None:
        if self.connected:
            return
        if (left := self.backoff.wait_left()) > 0:
            raise DriverError(f"port {self.cfg.port}: reconnect in {left:.2f} s")
        try:
            await self._open()
        except Exception as e:  # noqa: BLE001 - pyserial/pymodbus raise many kinds; all mean "not now"
            self._failed("open", e)
            raise DriverError(f"cannot open {self.cfg.port}: {e}") from e
        self.connected = True
        self.connects += 1
        if self._failures.reset() or self.connects > 1:
            log.info("meter %s: port %s open again", self.cfg.name, self.cfg.port)

    def _failed(self, reason: str, e: BaseException) -> None:
        self.errors[reason] += 1
        delay = self.backoff.failed()
        if self._failures.hit():
            log.warning("meter %s: %s on %s (%s; %d failures so far); retrying with backoff up to %.1f s",
                        self.cfg.name, reason, self.cfg.port, e, self._failures.count(), self.backoff.cap)
        else:
            log.debug("meter %s: %s again, next try in %.2f s", self.cfg.name, reason, delay)

    async def _drop(self, reason: str, e: BaseException) -> None:
        """Close the port after an I/O error and back off."""
        self.connected = False
        with contextlib.suppress(Exception):
            await self._close()
        self._failed(reason, e)

    async def close(self) -> None:
        self.connected = False
        with contextlib.suppress(Exception):
            await self._close()


# --- line protocol --------------------------------------------------------------------


class _LineProtocol(asyncio.Protocol):
    """Splits the serial byte stream into lines; over-long lines are cut and counted."""

    def __init__(self, on_error: Callable[[str], None]) -> None:
        self.lines: asyncio.Queue[bytes] = asyncio.Queue()
        self.buf = bytearray()
        self.lost: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self._on_error = on_error

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        from .lineproto import MAX_LINE

        self.buf += data
        while (i := self.buf.find(b"\n")) >= 0:
            line, self.buf = bytes(self.buf[: i + 1]), self.buf[i + 1:]
            self.lines.put_nowait(line)
        if len(self.buf) > MAX_LINE:
            self._on_error("too_long")
            del self.buf[: len(self.buf) - MAX_LINE // 2]
            if (j := self.buf.find(b"$")) >= 0:
                del self.buf[:j]
            else:
                self.buf.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


class LineDriver(SerialDriver):
    """The line protocol over pyserial-asyncio: one request, the first valid reply of the
    expected kind within ``timeout_s`` (invalid lines before it are counted and skipped)."""

    kind = "line"

    def __init__(self, cfg: MeterConfig, *, backoff: Backoff | None = None) -> None:
        super().__init__(cfg, backoff=backoff)
        self._transport: asyncio.Transport | None = None
        self._proto: _LineProtocol | None = None

    async def _open(self) -> None:
        import serial_asyncio

        loop = asyncio.get_running_loop()
        assert self.cfg.port
        transport, proto = await serial_asyncio.create_serial_connection(
            loop, lambda: _LineProtocol(self._count), self.cfg.port, baudrate=self.cfg.baudrate)
        self._transport, self._proto = transport, proto  # type: ignore[assignment]

    async def _close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        self._transport = self._proto = None

    def _count(self, reason: str) -> None:
        self.errors[reason] += 1

    async def _exchange(self, request: bytes, want: type) -> object:
        from . import lineproto as lp

        async with self._lock:
            await self._ensure()
            proto, transport = self._proto, self._transport
            assert proto is not None and transport is not None
            while not proto.lines.empty():  # stale replies of an earlier, timed-out request
                proto.lines.get_nowait()
            proto.buf.clear()
            try:
                transport.write(request)
            except Exception as e:
                await self._drop("io", e)
                raise DriverError(f"write to {self.cfg.port} failed: {e}") from e
            deadline = asyncio.get_running_loop().time() + self.cfg.timeout_s
            while True:
                left = deadline - asyncio.get_running_loop().time()
                if proto.lost.done() or transport.is_closing():
                    exc = proto.lost.result() if proto.lost.done() else None
                    await self._drop("io", exc or ConnectionError("port closed"))
                    raise DriverError(f"port {self.cfg.port} lost: {exc}")
                if left <= 0:
                    self.errors["timeout"] += 1
                    raise ProtocolError("timeout", f"no valid reply in {self.cfg.timeout_s} s")
                getter = asyncio.ensure_future(proto.lines.get())
                done, _ = await asyncio.wait({getter, proto.lost}, timeout=left,
                                             return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await getter
                    continue
                line = getter.result()
                try:
                    reply = lp.decode_reply(line)
                except ProtocolError as e:
                    self.errors[e.reason] += 1
                    log.debug("meter %s: dropped line %r: %s", self.cfg.name, line[:60], e)
                    continue
                if isinstance(reply, lp.ErrorReply):
                    self.errors["meter_" + reply.reason] += 1
                    raise ProtocolError("meter", f"meter answered ERR {reply.reason}")
                if isinstance(reply, want):
                    self.backoff.reset()
                    return reply
                self.errors["unexpected"] += 1

    async def read(self) -> Counters:
        from . import lineproto as lp

        reply = await self._exchange(lp.encode_read(), Counters)
        assert isinstance(reply, Counters)
        return reply

    async def set_relay(self, closed: bool) -> None:
        from . import lineproto as lp

        reply = await self._exchange(lp.encode_relay(closed), lp.RelayAck)
        assert isinstance(reply, lp.RelayAck)
        if reply.closed != closed:
            self.errors["relay"] += 1
            raise ProtocolError("relay", f"relay acknowledged {reply.closed}, wanted {closed}")


# --- Modbus RTU -----------------------------------------------------------------------


class ModbusDriver(SerialDriver):
    """PZEM-017-style DC meter over pymodbus' AsyncModbusSerialClient (RTU framer). The
    client's own reconnect is off: this driver reconnects with its own capped backoff."""

    kind = "modbus"

    def __init__(self, cfg: MeterConfig, *, backoff: Backoff | None = None) -> None:
        super().__init__(cfg, backoff=backoff)
        self.client = None
        self.alarms: dict[str, bool] = {}

    async def _open(self) -> None:
        from pymodbus.client import AsyncModbusSerialClient
        from pymodbus.framer import FramerType

        assert self.cfg.port
        client = AsyncModbusSerialClient(
            self.cfg.port, framer=FramerType.RTU, baudrate=self.cfg.baudrate, timeout=self.cfg.timeout_s,
            retries=0, reconnect_delay=0, name=f"meter-{self.cfg.name}")
        if not await client.connect():
            client.close()
            raise DriverError(f"cannot open {self.cfg.port}")
        self.client = client

    async def _close(self) -> None:
        if self.client is not None:
            self.client.close()
        self.client = None

    async def _call(self, what: str, fn: Callable):
        from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException

        async with self._lock:
            await self._ensure()
            client = self.client
            try:
                if not client.connected:  # type: ignore[union-attr]
                    raise ConnectionException("port closed")
                rr = await fn(client)
            except ConnectionException as e:
                await self._drop("io", e)
                raise DriverError(f"{what}: {e}") from e
            except ModbusIOException as e:
                # no (valid) answer in time: garbage, a bad CRC or a short frame was dropped
                self.errors["timeout"] += 1
                if not client.connected:  # type: ignore[union-attr]
                    await self._drop("io", e)
                    raise DriverError(f"{what}: {e}") from e
                raise ProtocolError("timeout", f"{what}: {e}") from e
            except ModbusException as e:
                self.errors["modbus"] += 1
                raise ProtocolError("modbus", f"{what}: {e}") from e
            except (OSError, asyncio.TimeoutError) as e:
                await self._drop("io", e)
                raise DriverError(f"{what}: {e}") from e
            if rr.isError():
                self.errors["exception"] += 1
                raise ProtocolError("exception", f"{what}: {rr}")
            self.backoff.reset()
            return rr

    async def read(self) -> Counters:
        from .registers import READ_ADDRESS, READ_COUNT, READ_COUNT_EXPORT, RELAY_COIL, decode_counters

        count = READ_COUNT_EXPORT if self.cfg.export_registers else READ_COUNT
        dev = self.cfg.device_id
        regs = await self._call("read input registers", lambda c: c.read_input_registers(
            READ_ADDRESS, count=count, device_id=dev))
        coils = await self._call("read relay coil", lambda c: c.read_coils(RELAY_COIL, count=1, device_id=dev))
        if len(regs.registers) != count or not coils.bits:
            self.errors["short"] += 1
            raise ProtocolError("short", f"got {len(regs.registers)} registers")
        try:
            counters, self.alarms = decode_counters(regs.registers, bool(coils.bits[0]))
        except ProtocolError as e:
            self.errors[e.reason] += 1
            raise
        return counters

    async def set_relay(self, closed: bool) -> None:
        from .registers import RELAY_COIL

        dev = self.cfg.device_id
        rr = await self._call("write relay coil", lambda c: c.write_coil(RELAY_COIL, closed, device_id=dev))
        if bool(rr.bits[0]) != closed:
            self.errors["relay"] += 1
            raise ProtocolError("relay", "relay coil echo differs")


def make_driver(cfg: MeterConfig, sim: SimParams, *, state: dict | None = None,
                backoff: Backoff | None = None) -> Driver:
    if cfg.driver == "sim":
        return SimDriver(cfg, sim, state)
    if cfg.driver == "line":
        return LineDriver(cfg, backoff=backoff)
    return ModbusDriver(cfg, backoff=backoff)
