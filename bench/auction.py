"""Clearing time of the double auction against Python's ``sorted()`` of the same orders.

The clearing sorts both sides (O(n log n)) and walks them once (O(n)); the baseline is
one ``sorted()`` of the same order objects by price, the O(n log n) floor, measured in
the same run. The ratio is what to watch: it should stay flat as n grows.

    python bench/auction.py [--sizes 1000,10000,100000] [--repeat 5] [--seed 1]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from services.auction.double import Order, clear  # noqa: E402
from timing import best_of  # noqa: E402


def book(n: int, rnd: random.Random) -> list[Order]:
    """Overlapping buy and sell price ranges so that roughly half the book trades."""
    orders = []
    for k in range(n):
        side = "buy" if rnd.random() < 0.5 else "sell"
        centre = 1_100 if side == "buy" else 900
        orders.append(Order(order_id=f"d-{k:010d}", side=side, account=f"0x{k:040x}", site="s",
                            wh=rnd.randint(100, 5_000), limit_price_wei_per_kwh=max(1, int(rnd.gauss(centre, 200)))))
    rnd.shuffle(orders)
    return orders




def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1000,10000,100000")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args(argv)
    rnd = random.Random(a.seed)
    print("double auction clearing vs sorted() of the same orders (best of %d runs)" % a.repeat)
    print(f"{'orders':>8} {'sorted() ms':>12} {'clear() ms':>11} {'ratio':>7} {'vs first':>10} "
          f"{'fills':>7} {'volume Wh':>12} {'price':>6}")
    rows = []
    for n in (int(x) for x in a.sizes.split(",")):
        orders = book(n, rnd)
        base = best_of(lambda: sorted(orders, key=lambda o: o.limit_price_wei_per_kwh), a.repeat)
        took = best_of(lambda: clear(orders), a.repeat)
        res = clear(orders)
        rows.append(took / base)
        print(f"{n:>8} {base * 1e3:>12.2f} {took * 1e3:>11.2f} {took / base:>7.2f} "
              f"{took / base / rows[0]:>10.2f} {len(res.fills):>7} {res.volume_wh:>12} "
              f"{res.price_wei_per_kwh!s:>6}")
    print(f"ratio spread: {statistics.mean(rows):.2f} mean, {max(rows) / min(rows):.2f}x max/min "
          "(flat = the same O(n log n) as sorting)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
