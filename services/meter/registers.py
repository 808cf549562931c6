"""The PZEM-017-style DC meter register map (Modbus RTU), as pure encode/decode functions.

Input registers (function 0x04), read as one block of 8 from 0x0000:

=========  ==========================  ==========================================
address    value                       unit
=========  ==========================  ==========================================
0x0000     voltage                     0.01 V
0x0001     current                     0.01 A
0x0002     power, low 16 bits          0.1 W  (32-bit, low word first)
0x0003     power, high 16 bits
0x0004     energy, low 16 bits         1 Wh   (32-bit, low word first)
0x0005     energy, high 16 bits
0x0006     high-voltage alarm          0xFFFF alarm, 0x0000 normal
0x0007     low-voltage alarm           0xFFFF alarm, 0x0000 normal
=========  ==========================  ==========================================

gridtrade extension (a producer meter that also measures its outflow; read only when
the meter is configured with ``export_registers``):

=========  ==========================  ==========================================
0x0008     export energy, low 16 bits  1 Wh   (32-bit, low word first)
0x0009     export energy, high 16 bits
=========  ==========================  ==========================================

Holding registers (0x03 / 0x06): 0x0000 high-voltage alarm threshold (0.01 V),
0x0001 low-voltage alarm threshold (0.01 V), 0x0002 slave address, 0x0003 current range.

Coil (0x01 / 0x05): 0x0000 the relay, 1 closed, 0 open.

The energy counter is 32 bits and wraps at 2**32 Wh; the service believes a counter that
went backwards once consecutive readings confirm it, and counts on from the new value
(:mod:`services.meter.accounting`).
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import ProtocolError
from .physics import Counters

READ_ADDRESS = 0x0000
READ_COUNT = 8
READ_COUNT_EXPORT = 10
RELAY_COIL = 0x0000
DEFAULT_HIGH_ALARM_CV = 1500  # 15.00 V
DEFAULT_LOW_ALARM_CV = 1100  # 11.00 V
ALARM = 0xFFFF


def _u16(x: float) -> int:
    v = int(round(x))
    return min(max(v, 0), 0xFFFF)


def _u32(x: float) -> tuple[int, int]:
    v = min(max(int(round(x)), 0), 0xFFFFFFFF)
    return v & 0xFFFF, v >> 16


def encode_counters(c: Counters, *, high_alarm_cv: int = DEFAULT_HIGH_ALARM_CV,
                    low_alarm_cv: int = DEFAULT_LOW_ALARM_CV, export: bool = True) -> list[int]:
    """Input registers 0x0000.. for ``c`` (10 with the export extension, else 8)."""
    p_lo, p_hi = _u32(c.power_w * 10)
    e_lo, e_hi = _u32(c.energy_wh)
    v = _u16(c.voltage_v * 100)
    regs = [v, _u16(c.current_a * 100), p_lo, p_hi, e_lo, e_hi,
            ALARM if v > high_alarm_cv else 0, ALARM if v < low_alarm_cv else 0]
    if export:
        x_lo, x_hi = _u32(c.export_wh or 0)
        regs += [x_lo, x_hi]
    return regs


def decode_counters(regs: Sequence[int], relay_closed: bool) -> tuple[Counters, dict[str, bool]]:
    """Counters (and the alarm flags) from the input registers read at 0x0000."""
    if len(regs) not in (READ_COUNT, READ_COUNT_EXPORT):
        raise ProtocolError("syntax", f"expected {READ_COUNT} or {READ_COUNT_EXPORT} registers, got {len(regs)}")
    if any(not 0 <= r <= 0xFFFF for r in regs):
        raise ProtocolError("range", "register out of 16-bit range")
    for i in (6, 7):
        if regs[i] not in (0, ALARM):
            raise ProtocolError("range", f"alarm register {i} = {regs[i]:#06x}")
    counters = Counters(
        energy_wh=regs[4] | regs[5] << 16,
        power_w=(regs[2] | regs[3] << 16) / 10,
        voltage_v=regs[0] / 100,
        current_a=regs[1] / 100,
        relay_closed=relay_closed,
        export_wh=(regs[8] | regs[9] << 16) if len(regs) == READ_COUNT_EXPORT else None,
    )
    return counters, {"high_voltage": regs[6] == ALARM, "low_voltage": regs[7] == ALARM}


def quantize(c: Counters) -> Counters:
    """``c`` at the register map's resolution: what a reader decodes (test helper and
    emulator bookkeeping)."""
    regs = encode_counters(c)
    out, _ = decode_counters(regs, c.relay_closed)
    return out if c.export_wh is not None else Counters(**{**out.__dict__, "export_wh": None})
