"""Greedy on a random 1,000,000-layer chain: the O(n) numpy path.

Run: ``python -m cachefit.bench.bench_greedy [--n 1000000] [--repeats 9]``

Prints the median wall time of (a) the cut itself (`greedy_bounds` on
prefix sums) and (b) the whole `greedy` call that returns a `Plan` (input
normalisation, bounds, the plan's tuple of node-id tuples), for the additive
and the liveness models, on a `LayerTable.chain` (no networkx graph: building
a 10⁶-node DiGraph takes seconds and is not the solver's work).
"""

from __future__ import annotations

import argparse

import numpy as np

from ..checker import check
from ..memory import Intervals, LayerTable
from ..solvers.greedy import greedy, greedy_bounds
from ..machine import machine_line
from .timing import median_seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--capacity", default=64 * 2**20, type=int, help="bytes (default 64 MiB)")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    weight = rng.integers(1, 2**20, args.n)  # up to 1 MiB per layer
    activation = rng.integers(0, 2**16, args.n)
    table = LayerTable.chain(weight, activation)
    print(f"greedy, random chain of {args.n:,} layers, capacity {args.capacity:,} B, "
          f"median of {args.repeats}; machine: {machine_line()}")
    for memory in ("additive", "liveness"):
        intervals = Intervals(table, memory)
        cut, _ = median_seconds(lambda: greedy_bounds(intervals, args.capacity), args.repeats)
        whole, _ = median_seconds(lambda: greedy(table, args.capacity, memory=memory), args.repeats)
        plan = greedy(table, args.capacity, memory=memory)
        verdict = "checked ok" if args.n > 200_000 or check(plan).ok else "CHECK FAILED"
        print(f"  {memory:9s} k={plan.k:6d} (lower bound {plan.lower_bound}, {plan.status}): "
              f"cut {cut * 1e3:7.2f} ms, whole greedy() -> Plan {whole * 1e3:7.2f} ms  [{verdict}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
