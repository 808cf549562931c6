"""Meter emulators: the line protocol and Modbus RTU served on a pseudo-terminal, backed by
the simulated site, so the demo and the tests run the real serial code.

- :class:`LineEmulator` answers :mod:`~services.meter.lineproto` frames on a pty.
- :class:`ModbusEmulator` runs pymodbus' own ``ModbusSerialServer`` (RTU) on one pty and
  bridges it to a second pty that the meter opens, like a null-modem cable. The bridge is
  where faults are injected.

Both print/offer the device path the meter should open (``/dev/pts/N``) and, given a
``link``, keep a symlink pointing at the current device, so a port that is unplugged
(:meth:`unplug`: the pty is closed and its device disappears) and plugged back in
(:meth:`replug`: a new pty) is found again under the same name. Fault injection:
:meth:`inject` writes raw bytes to the meter, :meth:`corrupt` mangles the next replies
(``checksum``/``crc``, ``short``, ``garbage``, ``drop``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import pathlib
import tty

from . import lineproto as lp
from .errors import ProtocolError
from .physics import Counters
from .registers import READ_COUNT_EXPORT, encode_counters

log = logging.getLogger(__name__)

FAULTS = ("checksum", "crc", "short", "garbage", "drop")


class Pty:
    """One pseudo-terminal: the master end stays here, the slave is kept open in raw mode
    (so the line discipline never echoes) and its path is what a meter opens."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        os.set_blocking(self.master, False)
        self.path = os.ttyname(self.slave)

    def close(self) -> None:
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.master = self.slave = -1


def _point(link: pathlib.Path, target: str) -> None:
    tmp = link.with_name(link.name + ".tmp")
    link.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    tmp.symlink_to(target)
    os.replace(tmp, link)


def mangle(data: bytes, fault: str) -> bytes:
    """Damage one reply the way a noisy line would."""
    if fault in ("checksum", "crc"):
        body = data.rstrip(b"\r\n")
        tail = data[len(body):]
        if not body:
            return data
        return body[:-1] + bytes([body[-1] ^ 0x01 if body[-1] not in b"0123456789ABCDEF" else
                                  (b"1" if body[-1:] == b"0" else b"0")[0]]) + tail
    if fault == "short":
        return data[: max(1, len(data) // 2)] + (b"\n" if data.endswith(b"\n") else b"")
    if fault == "garbage":
        return bytes((b * 37 + 11) & 0xFF for b in data)
    if fault == "drop":
        return b""
    raise ValueError(f"unknown fault {fault!r}; known: {', '.join(FAULTS)}")


class _Base:
    def __init__(self, model, *, link: pathlib.Path | str | None = None) -> None:
        """``model`` has ``read() -> Counters`` and ``set_relay(closed)`` (a
        :class:`~services.meter.sim.SimSite`)."""
        self.model = model
        self.link = pathlib.Path(link) if link else None
        self.pty: Pty | None = None
        self.faults: collections.deque[str] = collections.deque()
        self.served: Counters | None = None
        self.requests = 0
        self.loop: asyncio.AbstractEventLoop | None = None

    @property
    def path(self) -> str:
        """What a meter should open: the link if there is one, else the pty device."""
        if self.link:
            return str(self.link)
        assert self.pty is not None
        return self.pty.path

    @property
    def device(self) -> str | None:
        return self.pty.path if self.pty else None

    def _plug(self) -> None:
        self.pty = Pty()
        assert self.loop is not None
        self.loop.add_reader(self.pty.master, self._readable)
        if self.link:
            _point(self.link, self.pty.path)

    def unplug(self) -> None:
        """The cable is pulled: the pty closes and its device (and link) disappear."""
        if self.pty is None:
            return
        assert self.loop is not None
        self.loop.remove_reader(self.pty.master)
        self.pty.close()
        self.pty = None
        if self.link:
            with contextlib.suppress(FileNotFoundError):
                self.link.unlink()

    def replug(self) -> None:
        """The cable is back: a new pty, the link points at it."""
        if self.pty is None:
            self._plug()

    def inject(self, data: bytes) -> None:
        """Raw bytes to the meter (noise on the line)."""
        if self.pty is not None:
            self._write(data)

    def corrupt(self, fault: str, times: int = 1) -> None:
        mangle(b"x", fault)  # validates the name
        self.faults.extend([fault] * times)

    def _write(self, data: bytes) -> None:
        assert self.pty is not None
        try:
            os.write(self.pty.master, data)
        except (BlockingIOError, OSError) as e:
            log.debug("emulator: write dropped: %s", e)

    def _reply(self, data: bytes) -> None:
        if self.faults:
            data = mangle(data, self.faults.popleft())
        if data:
            self._write(data)

    def _readable(self) -> None:
        raise NotImplementedError


class LineEmulator(_Base):
    """The line protocol on a pty. With ``watchdog_s`` the relay opens by itself when no
    valid frame came for that long (the microcontroller's fail-safe)."""

    def __init__(self, model, *, link: pathlib.Path | str | None = None, watchdog_s: float | None = None) -> None:
        super().__init__(model, link=link)
        self.buf = bytearray()
        self.errors: collections.Counter[str] = collections.Counter()
        self.watchdog_s = watchdog_s
        self._last_valid = 0.0
        self._watchdog: asyncio.Task | None = None

    async def start(self) -> LineEmulator:
        self.loop = asyncio.get_running_loop()
        self._last_valid = self.loop.time()
        self._plug()
        if self.watchdog_s:
            self._watchdog = asyncio.create_task(self._watch(), name="line-emulator-watchdog")
        return self

    async def close(self) -> None:
        if self._watchdog:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
            self._watchdog = None
        self.unplug()

    async def _watch(self) -> None:
        assert self.loop is not None and self.watchdog_s
        while True:
            await asyncio.sleep(min(self.watchdog_s / 4, 0.5))
            if self.loop.time() - self._last_valid > self.watchdog_s and self.model.read().relay_closed:
                log.info("emulator: no frame for %.1f s: relay opens (watchdog)", self.watchdog_s)
                self.model.set_relay(False)

    def _readable(self) -> None:
        assert self.pty is not None
        try:
            data = os.read(self.pty.master, 4096)
        except BlockingIOError:
            return
        except OSError:
            return
        self.buf += data
        while (i := self.buf.find(b"\n")) >= 0:
            line, self.buf = bytes(self.buf[: i + 1]), self.buf[i + 1:]
            self._handle(line)
        if len(self.buf) > lp.MAX_LINE:
            self.buf.clear()
            self.errors["too_long"] += 1
            self._reply(lp.encode_error("too_long"))

    def _handle(self, line: bytes) -> None:
        self.requests += 1
        try:
            req = lp.decode_request(line)
        except ProtocolError as e:
            self.errors[e.reason] += 1
            self._reply(lp.encode_error(e.reason))
            return
        assert self.loop is not None
        self._last_valid = self.loop.time()
        if isinstance(req, lp.ReadRequest):
            c = self.model.read()
            served = Counters(energy_wh=c.energy_wh, power_w=c.power_w, voltage_v=c.voltage_v,
                              current_a=c.current_a, relay_closed=c.relay_closed, export_wh=c.export_wh)
            self.served = served
            self._reply(lp.encode_reading(served))
        elif isinstance(req, lp.RelayRequest):
            self.model.set_relay(req.closed)
            self._reply(lp.encode_relay_ack(req.closed))
        else:
            self._reply(lp.encode_pong())


class ModbusEmulator(_Base):
    """pymodbus' ModbusSerialServer (RTU) with a PZEM-017-style device on an inner pty,
    bridged byte for byte to the pty the meter opens."""

    def __init__(self, model, *, link: pathlib.Path | str | None = None, device_id: int = 1,
                 baudrate: int = 9600) -> None:
        super().__init__(model, link=link)
        self.device_id = device_id
        self.baudrate = baudrate
        self.inner: Pty | None = None
        self.server = None

    async def start(self) -> ModbusEmulator:
        from pymodbus.framer import FramerType
        from pymodbus.server import ModbusSerialServer
        from pymodbus.simulator import DataType, SimData, SimDevice

        from .registers import DEFAULT_HIGH_ALARM_CV, DEFAULT_LOW_ALARM_CV

        self.loop = asyncio.get_running_loop()
        self.inner = Pty()
        device = SimDevice(
            id=self.device_id,
            simdata=(
                [SimData(0, values=[False] * 16, datatype=DataType.BITS)],  # coils: 0 = relay
                [SimData(0, values=[False] * 16, datatype=DataType.BITS)],  # discrete inputs (unused)
                [SimData(0, values=[DEFAULT_HIGH_ALARM_CV, DEFAULT_LOW_ALARM_CV, self.device_id, 0],
                         datatype=DataType.REGISTERS)],
                [SimData(0, values=[0] * READ_COUNT_EXPORT, datatype=DataType.REGISTERS, readonly=True)],
            ),
            action=self._action,
        )
        self.server = ModbusSerialServer(device, framer=FramerType.RTU, port=self.inner.path,
                                         baudrate=self.baudrate, timeout=1)
        await self.server.serve_forever(background=True)
        self.loop.add_reader(self.inner.master, self._inner_readable)
        self._plug()
        return self

    async def close(self) -> None:
        self.unplug()
        if self.server is not None:
            await self.server.shutdown()
            self.server = None
        if self.inner is not None:
            assert self.loop is not None
            self.loop.remove_reader(self.inner.master)
            self.inner.close()
            self.inner = None

    async def _action(self, function_code: int, start_address: int, address: int, count: int,
                      registers: list[int], set_values) -> None:
        """Called by pymodbus for every request: fresh registers from the model."""
        self.requests += 1
        if function_code == 4:
            c = self.model.read()
            self.served = Counters(energy_wh=c.energy_wh, power_w=c.power_w, voltage_v=c.voltage_v,
                                   current_a=c.current_a, relay_closed=c.relay_closed, export_wh=c.export_wh)
            regs = encode_counters(self.served)
            registers[: len(regs)] = regs
        elif function_code in (1, 5, 15):
            if set_values is not None and function_code in (5, 15) and address == 0:
                self.model.set_relay(bool(set_values[0]))
            relay = self.model.read().relay_closed
            registers[0] = (registers[0] & ~1) | (1 if relay else 0)
        return None

    # the bridge: inner pty (server) <-> outer pty (meter) ----------------------------

    def _inner_readable(self) -> None:
        assert self.inner is not None
        try:
            data = os.read(self.inner.master, 4096)
        except OSError:
            return
        if self.pty is not None:
            self._reply(data)

    def _readable(self) -> None:
        assert self.pty is not None and self.inner is not None
        try:
            data = os.read(self.pty.master, 4096)
        except OSError:
            return
        try:
            os.write(self.inner.master, data)
        except OSError as e:
            log.debug("emulator: bridge write dropped: %s", e)


def make_emulator(kind: str, model, *, link=None, watchdog_s: float | None = None, device_id: int = 1):
    if kind == "line":
        return LineEmulator(model, link=link, watchdog_s=watchdog_s)
    if kind == "modbus":
        return ModbusEmulator(model, link=link, device_id=device_id)
    raise ValueError(f"no emulator for driver {kind!r}")
