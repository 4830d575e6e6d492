"""CP-SAT on random layered DAGs: time to a proved optimum, per memory model.

Run: ``python -m cachefit.bench.bench_cpsat [--quick] [--repeats 3] [--workers N] [--nodes-per-group 10 20]``

Targets (issue 3): the additive model solved to OPTIMAL at n = 500 within
10 s, the liveness model at n = 120 within 30 s; then, per model, the
largest n (from a doubling-then-bisecting search over n, one random DAG per
size and seed) proved optimal within 60 s.

A random layered DAG: the ``dag-layered`` family of
`cachefit.instances.families` (layers of width 1 to 8, each node fed by 1 to
3 nodes of the previous layer plus an occasional skip edge from an earlier
layer, as in residual networks; log-normal byte counts), with a capacity
such that about `--nodes-per-group` nodes (default ten) fit a group.  The smaller the groups
relative to the nodes, the closer the instance is to tight bin packing and
the harder the proof.  "OPTIMAL" below means the plan's k is proved
minimal; the bottleneck is proved too when ``bottleneck_optimal`` is true.
"""

from __future__ import annotations

import argparse
import statistics
import time

from ..checker import check
from ..instances.families import generate
from ..solvers.cpsat import cpsat
from ..machine import machine_line
from ..solvers.greedy import greedy


def layered_dag(n, seed=0, *, nodes_per_group=10, memory="liveness"):
    """The ``dag-layered`` instance of `cachefit.instances.families` and a capacity for about
    `nodes_per_group` nodes per group.

    The capacity is the larger of ``nodes_per_group × total / n`` (total:
    Σ weight + activation + buffer) and the family's ``"tight"`` capacity under
    `memory` (which is at least the largest node alone, so a plan exists).
    Returns (graph, capacity_bytes).
    """
    graph, tight = generate("dag-layered", n, seed=seed, capacity="tight", memory=memory)
    total = sum(attrs["weight_bytes"] + attrs["activation_bytes"] + attrs["buffer_bytes"]
                for _, attrs in graph.nodes(data=True))
    return graph, max(tight, nodes_per_group * total // n)


def run_one(n, memory, seed, time_limit_s, workers, nodes_per_group=10):
    graph, capacity = layered_dag(n, seed, nodes_per_group=nodes_per_group, memory=memory)
    started = time.perf_counter()
    plan = cpsat(graph, capacity, memory=memory, time_limit_s=time_limit_s, seed=seed, workers=workers)
    wall = time.perf_counter() - started
    report = check(plan)
    if not report.ok:
        raise SystemExit(f"CHECK FAILED for n={n} {memory}: {report.violations[:3]}")
    greedy_k = greedy(graph, capacity, memory=memory).k
    return plan, wall, greedy_k


def describe(n, memory, plan, wall, greedy_k):
    return (f"  n={n:4d} {memory:9s} {str(plan.status):8s} k={plan.k:3d} (bound {plan.lower_bound:3d}, "
            f"greedy {greedy_k:3d}) bottleneck proved={plan.stats.get('bottleneck_optimal')} "
            f"phase1={plan.stats.get('phase1')} phase2={plan.stats.get('phase2')} "
            f"k proved at {plan.stats.get('k_proved_s', '-')} s, wall {wall:6.2f} s")


def target(n, memory, limit, repeats, workers, nodes_per_group):
    walls, statuses = [], []
    for seed in range(repeats):
        plan, wall, greedy_k = run_one(n, memory, seed, limit, workers, nodes_per_group)
        print(describe(n, memory, plan, wall, greedy_k), flush=True)
        walls.append(wall)
        statuses.append(plan.status == "OPTIMAL")
    print(f"  -> {memory} n={n}: {sum(statuses)}/{repeats} OPTIMAL within {limit:g} s, "
          f"median wall {statistics.median(walls):.2f} s", flush=True)


def largest_optimal(memory, start, limit, workers, ceiling, nodes_per_group, floor=10):
    """Largest n proved optimal within `limit` (seed 0): double or halve from `start`, then bisect.

    Instances of different n are different random DAGs, so "proved at n" is
    not monotone in n; the search reports the largest success it saw below
    the first failure it bracketed.
    """
    def proved(n):
        plan, wall, greedy_k = run_one(n, memory, 0, limit, workers, nodes_per_group)
        print(describe(n, memory, plan, wall, greedy_k), flush=True)
        return plan.status == "OPTIMAL"

    good, bad = None, None
    n = start
    if proved(n):
        good = n
        while 2 * n <= ceiling:
            n *= 2
            if not proved(n):
                bad = n
                break
            good = n
    else:
        bad = n
        while n // 2 >= floor:
            n //= 2
            if proved(n):
                good = n
                break
            bad = n
    if good is None or bad is None:
        return good, bad
    while bad - good > max(good // 8, 10):
        n = (good + bad) // 2
        if proved(n):
            good = n
        else:
            bad = n
    return good, bad


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="random DAGs per target (seeds 0..)")
    parser.add_argument("--workers", type=int, default=None, help="CP-SAT workers (default: all cores)")
    parser.add_argument("--nodes-per-group", type=int, nargs="+", default=[10],
                        help="capacity as about this many nodes per group (several: one run each)")
    parser.add_argument("--quick", action="store_true", help="only the two targets, no search for the largest n")
    parser.add_argument("--ceiling", type=int, default=4000, help="largest n the search tries")
    args = parser.parse_args(argv)
    print(f"cpsat on random layered DAGs; machine: {machine_line()}", flush=True)
    for per_group in args.nodes_per_group:
        print(f"== capacity for about {per_group} nodes per group ==", flush=True)
        print("target: additive, n = 500, 10 s", flush=True)
        target(500, "additive", 10, args.repeats, args.workers, per_group)
        print("target: liveness, n = 120, 30 s", flush=True)
        target(120, "liveness", 30, args.repeats, args.workers, per_group)
        if args.quick:
            continue
        for memory, start in (("additive", 500), ("liveness", 120)):
            print(f"largest n proved optimal within 60 s, {memory} (seed 0):", flush=True)
            good, bad = largest_optimal(memory, start, 60, args.workers, args.ceiling, per_group)
            print(f"  -> {memory}: largest proved n = {good} (first failure bracketed at n = {bad})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
