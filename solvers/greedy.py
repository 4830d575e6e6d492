"""Greedy aggregation: one pass over the node order, cutting when the next node would overflow."""

from __future__ import annotations

import heapq

import numpy as np

from ..result import Status
from ._common import Problem, check_k, contiguous_groups, finish, no_plan, refuse

__all__ = ["greedy", "greedy_bounds", "split_to_k"]


def greedy_bounds(intervals, capacity):
    """Boundary positions [0, b1, ..., n] of the greedy cut, or None when a node cannot start a group.

    Each group starts where the last ended and is extended as far as it fits
    (`cachefit.memory.Intervals.cuts`).  Returns ``(bounds, None)`` or
    ``(None, position)`` with the position that does not fit even alone.
    """
    return intervals.cuts(capacity)


def split_to_k(bounds, k):
    """Split the longest runs in half (the leftmost of equal ones first) until there are exactly `k` runs (k <= n).

    A part of a run that fits also fits (sizes are monotone), so the result
    stays feasible.  O((k + runs) log k) with a heap of the runs.

    >>> split_to_k([0, 4, 5], 4).tolist()
    [0, 1, 2, 4, 5]
    """
    bounds = [int(b) for b in bounds]
    heap = [(start - end, start) for start, end in zip(bounds[:-1], bounds[1:])]  # (−length, start)
    heapq.heapify(heap)
    added = []
    for _ in range(k - (len(bounds) - 1)):
        negative, start = heapq.heappop(heap)
        middle = start + (-negative) // 2
        added.append(middle)
        heapq.heappush(heap, (start - middle, start))
        heapq.heappush(heap, (middle - (start - negative), middle))
    return np.asarray(sorted(bounds + added), dtype=np.int64)


def greedy(graph, capacity, *, memory="liveness", chunk_fraction=1.0, k=None, time_limit_s=None, seed=0,
           balance="memory"):
    """Greedy layer aggregation over the graph's node order.

    Parameters
    ----------
    graph : networkx.DiGraph or LayerTable
        The model graph; its node order is the order groups are cut from.
    capacity : int, str
        C in bytes, a byte string (``"50MiB"``) or a device name (``"h100-l2"``).
    memory : {"liveness", "additive"}
    chunk_fraction : float in (0, 1]
    k : int, optional
        Exactly k groups: the greedy groups, the longest split in half until
        there are k (not balanced; use ``dp`` for that).
    time_limit_s, seed
        Accepted for the common signature; greedy neither needs nor uses them.
    balance : {"memory", "flops"}
        Greedy balances neither: with ``"flops"`` the plan only records each
        group's flops (``stats["flops"]``, ``stats["bottleneck_flops"]``); with
        an explicit k it is FEASIBLE, never proved balanced.

    Returns
    -------
    Plan
        Groups are contiguous runs of the node order.

    Notes
    -----
    Optimal k for the given order: the size of a run never shrinks when it
    grows at either end, so if some plan puts its first i cuts at or before
    greedy's, greedy's (i+1)-th run, starting no later, reaches at least as far.
    By induction greedy needs no more runs than any plan in this order.  For a
    chain the order is the only topological order, so greedy's k is optimal
    over all plans and is reported as the lower bound (status OPTIMAL).

    Complexity: O(n + e) to flatten the graph, then O(k log n) size
    evaluations (numpy ``searchsorted`` on prefix sums for the additive model).

    References
    ----------
    The seed paper's "greedy layer aggregation" (O(n)).

    Examples
    --------
    >>> from cachefit.graphs import from_layers
    >>> plan = greedy(from_layers([40, 30, 20, 50, 10]), 60, memory="additive")
    >>> plan.partitions, plan.sizes, plan.status
    ((('0',), ('1', '2'), ('3', '4')), (40, 50, 60), <Status.OPTIMAL: 'OPTIMAL'>)
    """
    problem = Problem.make(graph, capacity, memory=memory, chunk_fraction=chunk_fraction, k=k,
                           time_limit_s=time_limit_s, seed=seed, balance=balance)
    refused = refuse(problem, "greedy")
    if refused:
        return refused
    intervals = problem.intervals()
    bounds, stuck = greedy_bounds(intervals, problem.capacity)
    table = problem.table
    if bounds is None:  # on a chain `oversize_node` has already said INFEASIBLE
        return no_plan(problem, "greedy", Status.UNKNOWN,
                       f"node {table.ids[stuck]!r} does not fit even alone in the given node order "
                       "(activations of earlier nodes pass through it); another order may fit: try solver='cpsat'")
    minimum_k = len(bounds) - 1
    # On a chain greedy's k is itself proved minimal (Notes), so no bound can beat it.
    lower = minimum_k if table.is_chain else problem.lower_bound()
    reason = check_k(problem, minimum_k if table.is_chain else lower)
    if reason:
        return no_plan(problem, "greedy", Status.INFEASIBLE, reason, lower=lower)
    if problem.k is not None and problem.k < minimum_k:
        return no_plan(problem, "greedy", Status.UNKNOWN,
                       f"k = {problem.k}: greedy needs {minimum_k} groups in the given node order; "
                       "another order may need fewer: try solver='cpsat'", lower=lower)
    if problem.k is not None:
        bounds = split_to_k(bounds, problem.k)
    sizes = intervals.sizes(bounds)
    return finish(problem, "greedy", contiguous_groups(bounds), lower=lower, sizes=sizes,
                  stats={"order": "given", "greedy_k": minimum_k})
