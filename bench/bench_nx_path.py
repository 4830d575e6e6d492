"""The path users take: `cachefit.plan` on a long networkx chain, against reading its weights.

Run: ``python -m cachefit.bench.bench_nx_path [--n 1000000] [--repeats 5] [--passes] [--deepspeed-n 1000]``

Builds a random chain of `--n` nodes as a `networkx.DiGraph` (not timed),
then times, interleaved (each repeat runs every measurement once, so a
loaded machine slows all of them alike),

- yardstick 1 (issue 17's): reading the weights out of the graph,
  ``[d["weight_bytes"] for _, d in G.nodes(data=True)]``;
- yardstick 3: reading all three byte attributes, the least any planner
  must read, ``[d["weight_bytes"] + d["activation_bytes"] +
  d["buffer_bytes"] for _, d in G.nodes(data=True)]`` (`read_bytes`);
- ``cachefit.plan(G, C, solver="greedy")`` and ``solver="dp"`` end to end
  (validation, flattening, the solve, the Plan), with the capacity the
  total over 32, additive and liveness;

and prints the medians of wall time and of process CPU time (which a
machine shared with other jobs inflates less), each as a multiple of both
yardsticks (issue 17's target: greedy ≤ 3× yardstick 1).

With ``--passes`` it also times, in a run of their own, each pass
`cachefit.validation.flatten` makes over a chain, alone (`flatten_passes`).

The floor
---------
Greedy within 3× yardstick 1 is out of reach of any reading of the graph in
pure Python: yardstick 3 alone is 2.3× yardstick 1.  Each pass flatten
makes is one pass of C over the 10⁶ nodes (no Python-level loop), and each
is needed (``python -m cachefit.bench.bench_nx_path --repeats 5 --passes``,
CPU medians, 2 cores shared with other jobs at load 4.9, 2026-12-01)::

    pass                                  why                                   CPU ms  × yardstick 1
    node ids (a tuple)                    the plan names its nodes                  23   0.5
    ids are strings (type set)            plans read back to the same ids           28   0.6
    read the 3 byte attributes            the sizes                                105   2.3
    their types (type set)                refuse bool, float, '3', 0-d array        58   1.3
    to int64 (np.fromiter)                the solvers' arrays (fromiter alone       44   1.0
                                          would take '3', 2.5 and True)
    successor dicts in node order         read networkx's adjacency directly        34   0.8
    edge count                            } the graph is a chain, so no             29   0.6
    each node's successor is the next     } node → position lookups                 95   2.1
    sum                                                                            416   9.3

flatten itself took 483 ms (10.8×) in that run, and ``cachefit.plan``
(which adds the table's arrays, the model's prefix sums and the Plan's 10⁶
ids sliced into its groups) 460–570 ms (10.5–12.9×; 4.6–5.7× yardstick 3).
Against main before this change (94f5f65, this file copied onto it), the
two run alternately (``--repeats 3``, load 4–5), greedy went from 12.0–12.4×
to 9.8–10.3× yardstick 1 in CPU time (additive) and from 12.8× to
10.8–11.3× (liveness); dp from 12.7–13.1× to 11.2–11.3× (additive).

With ``--deepspeed-n N`` (and DeepSpeed installed) it also times DeepSpeed's
``partition_balanced`` once on the additive sizes of an N-node chain, with
the k of dp's plan, against dp through `cachefit.plan` on that networkx
chain (issue 17: ≥ 1000× faster end to end).  partition_balanced is
O(k·n²) pure Python: at N = 1000 it takes 33 s on this machine at load 5.7
(DeepSpeed 0.19.8, CPU only), against 2.3 ms for dp: 14,474×.
"""

from __future__ import annotations

import argparse
import operator
import statistics
import time
from itertools import chain, islice

import networkx as nx
import numpy as np

import cachefit
from cachefit.result import Plan
from cachefit.validation import BYTE_ATTRIBUTES, flatten

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


def interleaved(functions, repeats):
    """{name: (median wall s, median CPU s, last result)}, each repeat calling every function once in turn.

    A result is kept until its clock has stopped, and the one before freed
    before its clock starts: freeing a list of 10⁶ integers costs a share of
    building it, and no measurement is charged for another's.
    """
    wall = {name: [] for name in functions}
    cpu = {name: [] for name in functions}
    results = {}
    for _ in range(repeats):
        for name, function in functions.items():
            results.pop(name, None)
            started_wall, started_cpu = time.perf_counter(), time.process_time()
            result = function()
            cpu[name].append(time.process_time() - started_cpu)
            wall[name].append(time.perf_counter() - started_wall)
            results[name] = result
            del result
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name]), results[name]) for name in functions}


def deepspeed_line(n, seed, repeats):
    """dp through `cachefit.plan` against DeepSpeed's partition_balanced on an `n`-node chain, or why not."""
    try:
        from deepspeed.runtime.utils import partition_balanced
    except Exception as error:  # noqa: BLE001 (any import failure means: not available here)
        return f"DeepSpeed unavailable ({type(error).__name__}: {error}); no dp-vs-partition_balanced figure"
    graph, capacity = chain_graph(n, seed)
    sizes = [d["weight_bytes"] + d["activation_bytes"] + d["buffer_bytes"] for _, d in graph.nodes(data=True)]
    capacity = max(capacity, max(sizes))  # a short chain's total / 32 can be below its largest node
    measured = interleaved({"dp": lambda: cachefit.plan(graph, capacity, solver="dp", memory="additive")}, repeats)
    dp_seconds, _, plan = measured["dp"]
    started = time.perf_counter()
    bounds = [int(b) for b in partition_balanced(sizes, plan.k)]
    peer_seconds = time.perf_counter() - started
    largest = max(sum(sizes[s:e]) for s, e in zip(bounds[:-1], bounds[1:]))
    return (f"chain of {n:,} nodes, k = {plan.k}: dp via cachefit.plan {dp_seconds * 1e3:.2f} ms (median of {repeats}), "
            f"deepspeed partition_balanced {peer_seconds:.2f} s (once) = {peer_seconds / dp_seconds:,.0f}x; "
            f"largest part {largest:,} B vs dp's {plan.bottleneck:,} B, capacity {capacity:,} B")


def read_weights(graph):
    """Yardstick 1 (issue 17's): the weights, in the plainest networkx idiom."""
    return [d["weight_bytes"] for _, d in graph.nodes(data=True)]


def read_bytes(graph):
    """Yardstick 3: all three byte attributes, the least any planner must read.

    Their sum per node, the cheapest idiom that reads all three (a list of
    triples costs more: its 10⁶ tuples wake the garbage collector).
    """
    return [d["weight_bytes"] + d["activation_bytes"] + d["buffer_bytes"] for _, d in graph.nodes(data=True)]


def flatten_passes(graph):
    """{pass: function}: each pass `cachefit.validation.flatten` makes over a chain, alone, in its order.

    Plain expressions of what each pass does (for timing, not a second
    implementation): every one reads each of the n nodes once more, so
    together they are the floor of validating a chain in pure Python.
    """
    storage, adjacency = graph._node, graph._succ  # networkx's own storage, as flatten reads it
    ids = tuple(storage)
    values = list(chain.from_iterable(map(operator.itemgetter(*BYTE_ATTRIBUTES), storage.values())))
    n = len(ids)
    return {
        "node ids (a tuple)": lambda: tuple(storage),
        "ids are strings (type set)": lambda: set(map(type, ids)),
        "read the 3 byte attributes": lambda: list(
            chain.from_iterable(map(operator.itemgetter(*BYTE_ATTRIBUTES), storage.values()))),
        "their types (type set)": lambda: set(map(type, values)),
        "to int64 (np.fromiter)": lambda: np.fromiter(values, dtype=np.int64, count=len(values)),
        "successor dicts in node order": lambda: all(map(operator.is_, adjacency, ids)),
        "edge count": lambda: sum(map(len, adjacency.values())),
        "each node's successor is the next": lambda: all(
            map(operator.contains, islice(adjacency.values(), n - 1), islice(ids, 1, None))),
        "flatten (all of the above, and numpy)": lambda: flatten(graph),
    }


def _line(name, wall, cpu, yardsticks, note=""):
    ratios = "  ".join(f"{wall / yard_wall:5.1f}x / {cpu / yard_cpu:5.1f}x" for yard_wall, yard_cpu in yardsticks)
    return f"  {name:40s}: wall {wall * 1e3:8.1f} ms, CPU {cpu * 1e3:8.1f} ms  {ratios}{note}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--passes", action="store_true",
                        help="also time each pass flatten makes, alone (the floor of the pure-Python path)")
    parser.add_argument("--deepspeed-n", type=int, default=0,
                        help="also compare dp with DeepSpeed's partition_balanced on a chain of this many nodes")
    args = parser.parse_args(argv)
    print(machine_line())
    graph, capacity = chain_graph(args.n, args.seed)
    yardsticks = {"read the weights (yardstick 1)": lambda: read_weights(graph),
                  "read the 3 byte attributes (yardstick 3)": lambda: read_bytes(graph)}
    plans = {f"cachefit.plan solver={solver} {memory}":
             (lambda solver=solver, memory=memory: cachefit.plan(graph, capacity, solver=solver, memory=memory))
             for solver in ("greedy", "dp") for memory in ("additive", "liveness")}
    print(f"networkx chain of {args.n:,} nodes, capacity {capacity:,} B, medians of {args.repeats} interleaved runs; "
          "wall / CPU as multiples of yardstick 1, then of yardstick 3")
    _report(interleaved({**yardsticks, **plans}, args.repeats))
    if args.passes:  # a run of its own: the passes' data kept alive must not weigh on the plans' figures
        print("each pass flatten makes, alone (their sum is the floor of the pure-Python path):")
        _report(interleaved({**yardsticks, **flatten_passes(graph)}, args.repeats))
    if args.deepspeed_n:
        print(deepspeed_line(args.deepspeed_n, args.seed, args.repeats))


def _report(measured):
    """Print every measurement as a multiple of the two yardsticks (the first two entries of `measured`)."""
    yardsticks = [measurement[:2] for measurement in list(measured.values())[:2]]
    for name, (wall, cpu, result) in measured.items():
        note = f"  ({result.status}, k={result.k})" if isinstance(result, Plan) else ""
        print(_line(name, wall, cpu, yardsticks, note))


if __name__ == "__main__":
    main()
