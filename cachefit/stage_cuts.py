"""Stage plans whose cuts fall only where a pipeline runtime can split: `cut_at_boundaries`.

For a graph imported with ``from_torch`` (``torch.export`` capture), a
pipeline runtime can begin a stage only where a module call begins
(`cachefit.executor.boundaries`).  `cut_at_boundaries` solves the stage
problem with that as a constraint: contiguous runs of the node order, each
beginning at the first node or at an allowed node, each within the capacity,
exactly k of them, with the smallest bottleneck (largest run's flops or
bytes).

Method: bisection over the integer bottleneck B with a greedy probe that
extends each run to the farthest allowed end whose run fits and stays
within B.  Run sizes and flops only grow when a run is extended, so the
greedy count is the fewest runs for B, and the smallest B whose count is at
most k is the optimal bottleneck for exactly k (a run with an allowed cut
inside splits into two that still fit).  O(m log(total)) interval sizes for
m allowed positions.
"""

from __future__ import annotations

import numpy as np

import logging

from .result import Status

__all__ = ["cut_at_boundaries"]

logger = logging.getLogger(__name__)

SOLVER = "dp-boundaries"


def _runs(starts, n, fits):
    """The fewest runs [s, e) over allowed `starts` (ends: the next starts and n) with ``fits(s, e)``;
    None when some start cannot reach the next allowed end."""
    ends = starts[1:] + [n]
    bounds, index = [0], 0
    while bounds[-1] < n:
        start = bounds[-1]
        best = None
        while index < len(ends) and ends[index] <= start:
            index += 1
        probe = index
        while probe < len(ends) and fits(start, ends[probe]):
            best = probe
            probe += 1
        if best is None:
            return None
        bounds.append(ends[best])
        index = best + 1
    return bounds


def _split_to(bounds, k, allowed):
    """Split runs at allowed positions inside them until there are k (sub-runs still fit)."""
    bounds = list(bounds)
    while len(bounds) - 1 < k:
        inner = [p for p in allowed if p not in bounds and bounds[0] < p < bounds[-1]]
        if not inner:
            return None
        widths = {p: min(b for b in bounds if b > p) - max(b for b in bounds if b < p) for p in inner}
        bounds = sorted(bounds + [max(inner, key=lambda p: (widths[p], -p))])
    return bounds


def cut_at_boundaries(graph, capacity, *, k, allowed, memory="liveness", balance="flops"):
    """A plan of exactly `k` contiguous runs, each beginning at the first node or a node of `allowed`.

    Parameters
    ----------
    graph : networkx.DiGraph
    capacity : int
        Bytes per run.
    k : int
    allowed : collection of str
        Nodes a run may begin at (besides the first node).
    memory : {"liveness", "additive"}
    balance : {"flops", "memory"}
        The bottleneck minimised: the largest run's flops, or its bytes.

    Returns
    -------
    Plan
        FEASIBLE with ``stats["boundaries"]`` (the allowed count) and
        ``stats["bottleneck_optimal_for_boundaries"] = True``; INFEASIBLE when
        no k runs with allowed beginnings fit, with the reason.

    Examples
    --------
    >>> from cachefit.graphs import from_layers
    >>> g = from_layers([10, 10, 10, 10])
    >>> plan = cut_at_boundaries(g, 100, k=2, allowed={"3"}, memory="additive", balance="memory")
    >>> plan.partitions
    (('0', '1', '2'), ('3',))
    """
    from .solvers._common import Problem, contiguous_groups, finish, no_plan

    problem = Problem.make(graph, capacity, memory=memory, chunk_fraction=1.0, k=k, time_limit_s=None,
                           seed=0, balance=balance)
    ids = list(problem.table.ids)
    n = len(ids)
    allowed = set(allowed)
    allowed_positions = [p for p, node in enumerate(ids) if p > 0 and node in allowed]
    starts = [0] + allowed_positions
    intervals = problem.intervals()
    if balance == "flops":
        prefix = np.concatenate(([0], np.cumsum(problem.flops, dtype=np.int64))).tolist()  # Σ flops < 2**62

        def cost(s, e):
            return prefix[e] - prefix[s]
    else:
        def cost(s, e):
            return int(intervals.size(s, e))

    def fits(bound):
        return lambda s, e: int(intervals.size(s, e)) <= problem.capacity and cost(s, e) <= bound

    stats = {"boundaries": len(allowed_positions)}
    loose = _runs(starts, n, fits(float("inf")))
    if loose is None or len(starts) < k or len(loose) - 1 > k:
        reason = (f"no {k} stages that each begin where a module call begins ({len(allowed_positions)} such "
                  f"nodes) fit {problem.capacity:,} B"
                  + (f"; the fewest that fit is {len(loose) - 1}" if loose is not None and len(loose) - 1 > k
                     else ""))
        return no_plan(problem, SOLVER, Status.INFEASIBLE, reason, stats=stats)
    low, high = 0, cost(0, n)
    while low < high:  # the smallest bottleneck whose greedy needs at most k runs
        middle = (low + high) // 2
        bounds = _runs(starts, n, fits(middle))
        if bounds is not None and len(bounds) - 1 <= k:
            high = middle
        else:
            low = middle + 1
    bounds = _split_to(_runs(starts, n, fits(low)), k, allowed_positions)
    stats["bottleneck_optimal_for_boundaries"] = True
    return finish(problem, SOLVER, contiguous_groups(bounds), status=Status.FEASIBLE, stats=stats)
