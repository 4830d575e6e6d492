"""dp on long random chains, and against DeepSpeed's ``partition_balanced``.

Run: ``python -m cachefit.bench.bench_dp [--n 1000000] [--k 64] [--repeats 9] [--peer-n 2000] [--peer-k 16]``

Part 1 (issue 3 target: ≤ 50 ms): the whole ``dp(table, C, k=64)`` call that
returns a `Plan` on a random ``LayerTable.chain`` of 10⁶ layers (building
the table is not timed: it is the caller's), for each probe mode of
`cachefit.solvers.dp`: additive ("exact"), liveness without buffers at
f = 1 ("exact") and f = 0.25 ("float"), liveness with buffers ("search").
The capacity is the total bytes over 32, so the fewest groups is about 32
and k = 64 is feasible.  Each plan's bottleneck is certified
minimal: greedy at bottleneck − 1 needs more than k groups.

Part 2 (target: ≥ 1,000× faster than DeepSpeed, bottleneck never worse):
2,000 random layer sizes into 16 parts, additive, no capacity limit (C =
the total), compared with ``deepspeed.runtime.utils.partition_balanced``
when DeepSpeed imports; DeepSpeed is timed once (it takes tens of seconds),
dp as the median of `--repeats` runs.  Without DeepSpeed the comparison is
reported as unavailable: no stand-in is timed in its place.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from ..memory import Intervals, LayerTable
from ..solvers.dp import dp
from ..solvers.greedy import greedy_bounds
from ..machine import machine_line
from .timing import median_seconds


def certified_minimal(table, plan, memory, fraction):
    """True when no bottleneck below the plan's admits plan.k runs (greedy at B − 1 needs more)."""
    bounds, _ = greedy_bounds(Intervals(table, memory, fraction), plan.bottleneck - 1)
    return bounds is None or len(bounds) - 1 > plan.k


def long_chain(args):
    rng = np.random.default_rng(args.seed)
    n = args.n
    weight = rng.integers(1, 2**20, n)  # up to 1 MiB per layer
    activation = rng.integers(0, 2**16, n)
    buffer = rng.integers(0, 2**14, n)
    plain = LayerTable.chain(weight, activation)
    buffered = LayerTable.chain(weight, activation, buffer)
    capacity = int((weight.sum() + activation.sum() + buffer.sum()) // 32)
    print(f"Part 1: dp on a random chain of {n:,} layers, k = {args.k}, capacity {capacity:,} B, "
          f"median of {args.repeats} whole dp() calls")
    cases = [("additive", plain, 1.0), ("liveness", plain, 1.0), ("liveness", plain, 0.25),
             ("liveness", buffered, 1.0)]
    for memory, table, fraction in cases:
        seconds, plan = median_seconds(
            lambda: dp(table, capacity, memory=memory, chunk_fraction=fraction, k=args.k), args.repeats)
        minimal = certified_minimal(table, plan, memory, fraction)
        label = f"{memory}, f={fraction:g}" + (", buffers" if table is buffered else "")
        print(f"  {label:27s} probe={plan.stats['probe']:6s} {str(plan.status):8s} k={plan.k} "
              f"(fewest {plan.stats['min_k_for_order']}) bottleneck {plan.bottleneck:,} B "
              f"[minimal: {'certified' if minimal else 'NOT CERTIFIED'}] "
              f"Σ S² optimal: {plan.stats['sum_squares_optimal']}  median {seconds * 1e3:8.1f} ms")


def versus_deepspeed(args):
    rng = np.random.default_rng(args.seed + 1)
    weights = rng.integers(1, 1000, args.peer_n)
    table = LayerTable.chain(weights)
    capacity = int(weights.sum())
    print(f"Part 2: {args.peer_n:,} random layer sizes into {args.peer_k} parts (additive, C = total)")
    seconds, plan = median_seconds(lambda: dp(table, capacity, memory="additive", k=args.peer_k), args.repeats)
    print(f"  cachefit dp:                     bottleneck {plan.bottleneck:,}  median {seconds * 1e3:9.2f} ms "
          f"({str(plan.status)}, Σ S² optimal: {plan.stats['sum_squares_optimal']})")
    try:
        from deepspeed.runtime.utils import partition_balanced
    except Exception as exc:  # ImportError, or DeepSpeed failing while importing
        print(f"  DeepSpeed partition_balanced:    unavailable ({type(exc).__name__}: {exc}); no comparison made")
        return
    started = time.perf_counter()
    parts = partition_balanced([int(w) for w in weights], args.peer_k)
    peer_seconds = time.perf_counter() - started
    prefix = np.concatenate(([0], np.cumsum(weights)))
    peer_bottleneck = int(max(prefix[e] - prefix[s] for s, e in zip(parts[:-1], parts[1:])))
    verdict = "never worse" if plan.bottleneck <= peer_bottleneck else "WORSE"
    print(f"  DeepSpeed partition_balanced:    bottleneck {peer_bottleneck:,}  one run {peer_seconds * 1e3:9.2f} ms")
    print(f"  -> dp is {peer_seconds / seconds:,.0f}x faster; dp's bottleneck is {verdict} "
          f"({plan.bottleneck:,} vs {peer_bottleneck:,})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peer-n", type=int, default=2000)
    parser.add_argument("--peer-k", type=int, default=16)
    parser.add_argument("--skip-peer", action="store_true", help="leave out Part 2")
    args = parser.parse_args(argv)
    print(f"machine: {machine_line()}")
    long_chain(args)
    if not args.skip_peer:
        versus_deepspeed(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
