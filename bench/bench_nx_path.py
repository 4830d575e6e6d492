"""The path users take: `cachefit.plan` on a long networkx chain, against reading its weights.

Run: ``python -m cachefit.bench.bench_nx_path [--n 1000000] [--repeats 3]``

Builds a random chain of `--n` nodes as a `networkx.DiGraph` (not timed),
then prints the median wall time of

- reading the weights out of the graph,
  ``[d["weight_bytes"] for _, d in G.nodes(data=True)]`` (the yardstick);
- ``cachefit.plan(G, C, solver="greedy")`` and ``solver="dp"`` end to end
  (validation, flattening, the solve, the Plan), with the capacity the
  total over 32, additive and liveness;

and each plan's time as a multiple of the yardstick (issue 17's target:
greedy ≤ 3×).
"""

from __future__ import annotations

import argparse
import networkx as nx
import numpy as np

import cachefit

from .bench_dp import median_seconds
from .machine import machine_line


def chain_graph(n, seed):
    """A random networkx chain of `n` nodes with string ids (built once, not timed)."""
    rng = np.random.default_rng(seed)
    weights = rng.integers(1, 2**20, n).tolist()
    activations = rng.integers(0, 2**16, n).tolist()
    graph = nx.DiGraph()
    graph.add_nodes_from((str(index), {"weight_bytes": weight, "activation_bytes": activation, "buffer_bytes": 0})
                         for index, (weight, activation) in enumerate(zip(weights, activations)))
    graph.add_edges_from((str(index), str(index + 1)) for index in range(n - 1))
    return graph, (sum(weights) + sum(activations)) // 32


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(machine_line())
    graph, capacity = chain_graph(args.n, args.seed)
    read, _ = median_seconds(lambda: [d["weight_bytes"] for _, d in graph.nodes(data=True)], args.repeats)
    print(f"networkx chain of {args.n:,} nodes, capacity {capacity:,} B, median of {args.repeats}")
    print(f"  read the weights:                      {read * 1e3:8.1f} ms")
    for solver in ("greedy", "dp"):
        for memory in ("additive", "liveness"):
            seconds, plan = median_seconds(lambda: cachefit.plan(graph, capacity, solver=solver, memory=memory),
                                           args.repeats)
            print(f"  cachefit.plan solver={solver:6s} {memory:8s}: {seconds * 1e3:8.1f} ms "
                  f"= {seconds / read:5.1f}x reading  ({plan.status}, k={plan.k})")


if __name__ == "__main__":
    main()
