"""Meter codecs and the site model, as ratios against baselines measured in the same run.

- line codec: ``lineproto.decode_reply`` of a reading line against ``json.loads`` of the
  same values as a JSON array (the cheapest structured decode Python has built in);
- register codec: ``registers.decode_counters`` of 8 registers against
  ``struct.unpack`` of the same 16 bytes;
- site model: one simulated minute of ``Site.step`` against a bare Python loop doing the
  same number of float multiply-adds (its arithmetic floor).

A reading per second per meter is the load in production; the ratios show how far the
pure parts stay from being the bottleneck.

    python bench/meter.py [--n 20000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from services.meter import lineproto, registers  # noqa: E402
from timing import best_of  # noqa: E402
from services.meter.physics import BatteryConfig, Counters, Load, LoadConfig, PanelConfig, Site  # noqa: E402




def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--repeat", type=int, default=5)
    a = p.parse_args(argv)
    n = a.n
    c = Counters(energy_wh=123456, power_w=512.3, voltage_v=12.41, current_a=41.28, relay_closed=True, export_wh=88)
    line = lineproto.encode_reading(c)
    js = json.dumps([c.energy_wh, c.power_w, c.voltage_v, c.current_a, 1, c.export_wh])
    regs = registers.encode_counters(c, export=False)
    raw = struct.pack(">8H", *regs)
    site = Site(role="producer", battery=BatteryConfig(capacity_wh=1e9, soc=0.5), panel=PanelConfig(),
                load=Load(LoadConfig(schedule=[(0, 200.0), (12, 400.0)])), ghi=lambda t: 800.0, line_w=500)

    def floor_loop() -> None:
        x = 0.0
        for i in range(n):
            x = x * 0.5 + i * 1.5 + 2.0 * 3.0 - x * 0.25 + 7.0 * 0.1 - 1.0 * 2.0 + x * 0.125
        assert x == x

    rows = [
        ("line decode", best_of(lambda: [lineproto.decode_reply(line) for _ in range(n)], a.repeat),
         "json.loads", best_of(lambda: [json.loads(js) for _ in range(n)], a.repeat)),
        ("line encode", best_of(lambda: [lineproto.encode_reading(c) for _ in range(n)], a.repeat),
         "json.dumps", best_of(lambda: [json.dumps([c.energy_wh, c.power_w, c.voltage_v, c.current_a, 1,
                                                     c.export_wh]) for _ in range(n)], a.repeat)),
        ("register decode", best_of(lambda: [registers.decode_counters(regs, True) for _ in range(n)], a.repeat),
         "struct.unpack", best_of(lambda: [struct.unpack(">8H", raw) for _ in range(n)], a.repeat)),
        ("site step (60 s)", best_of(lambda: [site.step(60.0) for _ in range(n)], a.repeat),
         "float loop", best_of(floor_loop, a.repeat)),
    ]
    print(f"{'what':<18} {'per op':>10}   {'baseline':<14} {'per op':>10}   ratio")
    for what, t, base, tb in rows:
        print(f"{what:<18} {t / n * 1e6:>8.2f}us   {base:<14} {tb / n * 1e6:>8.2f}us   {t / tb:6.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
