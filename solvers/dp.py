"""Balanced partition of a fixed node order: fewest groups, then the smallest bottleneck, then Σ S².

The three stages (`dp` runs them in order):

1. the fewest contiguous runs (greedy cut count, `greedy_bounds`);
2. the smallest bottleneck B* for exactly k runs: bisection over integer
   bottleneck values with a greedy probe (`Intervals.count`);
3. among the partitions into k runs of size ≤ B*, the smallest Σ S² (an
   exact dynamic programme restricted to the feasible window of every
   boundary, `_min_sum_squares`).
"""

from __future__ import annotations

import bisect
import logging

import numpy as np

from ..result import Status
from ..memory import Intervals
from .bounds import forced_bytes
from ._common import Problem, contiguous_groups, finish, no_plan, refuse
from ._deadline import Deadline, finish_reserve
from .greedy import greedy_bounds, split_to_k

__all__ = ["dp", "balanced_cut", "min_bottleneck", "DP_PAIR_BUDGET"]

logger = logging.getLogger(__name__)

#: The most (start, end) pairs the Σ S² stage evaluates before it falls back
#: to a bottleneck-optimal but not Σ S²-optimal plan (stats say which).
DP_PAIR_BUDGET = 20_000_000

_CHUNK_PAIRS = 1_000_000


def min_bottleneck(probe, k, low, high):
    """Smallest integer B in [low, high] with at most k greedy runs of size ≤ B.

    `high` must be feasible.  Returns (B, number of probes).  Each probe is a
    greedy pass that stops after k + 1 runs: O(k log n).
    """
    probes = 0
    while low < high:
        middle = (low + high) // 2
        count, largest = probe.count(middle, k)
        probes += 1
        if count <= k:
            high = largest  # feasible, and no run is larger: a tighter feasible value
        else:
            low = middle + 1
    return high, probes


def _windows(probe, k, cap):
    """For each boundary j = 0..k, the interval of positions a partition into
    exactly k non-empty runs of size ≤ cap can put it at.

    Forward greedy gives the farthest reach F_j after j runs, backward greedy
    the nearest start G_{k−j} from which k − j runs reach the end; together
    with one node per run: W_j = [max(j, G_{k−j}), min(F_j, n − (k − j))].
    Every position in W_j is reachable from the start in exactly j runs and
    reaches the end in exactly k − j (truncate the greedy boundaries), so the
    restricted programme loses no partition.
    """
    n = probe.n
    forward = [0] * (k + 1)
    for j in range(1, k + 1):
        forward[j] = n if forward[j - 1] >= n else probe.end(forward[j - 1], cap)
    backward = [n] * (k + 1)
    for t in range(1, k + 1):
        backward[t] = 0 if backward[t - 1] <= 0 else probe.begin(backward[t - 1], cap)
    low = [max(j, backward[k - j]) for j in range(k + 1)]
    high = [min(forward[j], n - (k - j)) for j in range(k + 1)]
    low[0] = high[0] = 0
    low[k] = high[k] = n
    return low, high


def _min_sum_squares(probe, k, cap, budget, deadline=None):
    """Boundaries [0, b1, ..., n] of k runs of size ≤ cap with the smallest Σ S², or None over budget or time.

    D_j(e) = min over feasible s of D_{j−1}(s) + size(s, e)², evaluated one
    layer at a time over every (s, e) pair of adjacent windows with
    size(s, e) ≤ cap, flattened into numpy arrays.  Ties go to the smallest s.
    Returns (bounds, pairs evaluated, exact integer arithmetic?).  With a
    `deadline` (`cachefit.solvers._deadline.Deadline`) the clock is read
    before each layer, and None is returned once it has passed.
    """
    n = probe.n
    low, high = _windows(probe, k, cap)
    widths = [h - l + 1 for l, h in zip(low, high)]
    if min(widths) < 1:
        raise AssertionError(f"dp: empty boundary window for k = {k}, cap = {cap}")
    if sum(widths) > budget:
        return None, sum(widths), True
    exact = k * float(cap) * float(cap) < 2.0 ** 62
    dtype = np.int64 if exact else np.float64
    previous = np.zeros(1, dtype=dtype)  # D_0 over W_0 = [0, 0]
    choices = []
    pairs = 0
    for j in range(1, k + 1):
        if deadline is not None and deadline.expired():
            return None, pairs, exact
        ends = np.arange(low[j], high[j] + 1, dtype=np.int64)
        first = np.maximum(probe.begins(ends, cap, low[j - 1]), low[j - 1])
        last = np.minimum(ends - 1, high[j - 1])
        counts = last - first + 1
        if (counts < 1).any():
            raise AssertionError(f"dp: boundary {j} has a position with no feasible predecessor")
        total = int(counts.sum())
        pairs += total
        if pairs > budget:
            return None, pairs, exact
        best = np.empty(ends.size, dtype=dtype)
        choice = np.empty(ends.size, dtype=np.int64)
        # Rows in chunks of about _CHUNK_PAIRS pairs.
        cumulative = np.cumsum(counts)
        row = 0
        while row < ends.size:
            stop = int(np.searchsorted(cumulative, (cumulative[row] - counts[row]) + _CHUNK_PAIRS, side="right"))
            stop = max(stop, row + 1)
            chunk_counts = counts[row:stop]
            chunk_total = int(chunk_counts.sum())
            offsets = np.zeros(stop - row, dtype=np.int64)
            np.cumsum(chunk_counts[:-1], out=offsets[1:])
            rows = np.repeat(np.arange(stop - row), chunk_counts)
            starts = first[row:stop][rows] + (np.arange(chunk_total) - offsets[rows])
            sizes = probe.sizes_of(starts, ends[row:stop][rows]).astype(dtype)
            cost = previous[starts - low[j - 1]] + sizes * sizes
            if (sizes > cap).any():  # cannot happen: `begins` is exact
                raise AssertionError("dp: a run in the band exceeds the bottleneck")
            minima = np.minimum.reduceat(cost, offsets)
            hits = np.flatnonzero(cost == minima[rows])
            _, first_hit = np.unique(rows[hits], return_index=True)
            best[row:stop] = minima
            choice[row:stop] = starts[hits[first_hit]]
            row = stop
        choices.append(choice)
        previous = best
    bounds = [n]
    for j in range(k, 0, -1):
        bounds.append(int(choices[j - 1][bounds[-1] - low[j]]))
    bounds.reverse()
    return np.asarray(bounds, dtype=np.int64), pairs, exact


def dp(graph, capacity, *, memory="liveness", chunk_fraction=1.0, k=None, time_limit_s=None, seed=0,
       balance="memory"):
    """Balanced partition of the graph's node order into contiguous runs.

    Parameters
    ----------
    graph : networkx.DiGraph or LayerTable
        The model graph; groups are contiguous runs of its node order.
    capacity : int, str
        C in bytes, a byte string (``"50MiB"``) or a device name (``"h100-l2"``).
    memory : {"liveness", "additive"}
    chunk_fraction : float in (0, 1]
    k : int, optional
        Exactly k non-empty groups, balanced.  Default: the fewest.
    time_limit_s : float, optional
        Wall-clock limit of the call.  The first two stages (k, then the
        bottleneck) always run, O(k log n · log C); the Σ S² stage stops at
        the limit, leaving the bottleneck-optimal greedy runs
        (``stats["sum_squares_optimal"]`` False).  Default: no limit.
    seed
        Accepted for the common signature; dp is deterministic.
    balance : {"memory", "flops"}
        The bottleneck minimised after k: the largest group's bytes, or its
        Σ ``flops`` (node attribute, 0 where absent) with every group still
        within the capacity in bytes.  Σ S² of the bytes breaks ties either way.

    Returns
    -------
    Plan
        For a chain: OPTIMAL (the fewest groups, or the given k, with the
        smallest possible bottleneck).  For a DAG the node order is fixed, so
        the plan is optimal only among plans that keep that order: FEASIBLE
        unless k meets the lower bound; ``stats["balance_optimal_for_order"]``
        is True.  INFEASIBLE with a reason when a node cannot fit alone or an
        explicit k exceeds the number of nodes or is below the minimum;
        UNKNOWN for a DAG when the given order cannot reach what another
        order might (use ``cpsat``).  ``stats["sum_squares_optimal"]`` says
        whether the third stage finished within `DP_PAIR_BUDGET`.

    Notes
    -----
    Sizes of runs are monotone (a run never shrinks when it grows at either
    end), which gives every stage its argument:

    - *k*: greedy cutting needs the fewest runs (see `cachefit.solvers.greedy`).
    - *bottleneck*: a bottleneck B admits exactly k non-empty runs iff greedy
      with capacity B needs at most k runs and n ≥ k (split runs until there
      are k; parts of a run fit wherever the run does).  That predicate is
      monotone in B, so bisection over the integers between the largest
      ⌈(a lower bound on Σ S)/k⌉ and the bottleneck of a feasible k-run plan finds the
      smallest B.  After a feasible probe the upper end drops to the largest
      run the probe made, itself feasible.  At most ~log2(C) probes of
      O(k log n) each.
    - *Σ S²*: an exact DP over boundary positions, restricted to windows
      W_j (see `_windows`) that contain every boundary of every partition
      with runs ≤ B*; for e ∈ W_j only starts s with size(s, e) ≤ B* are
      visited.  When B* is tight the windows are a few positions wide and the
      stage is near-linear.  Σ S² is exact in int64 while k·B*² < 2⁶²,
      otherwise it is minimised in float64 (ties within rounding may then
      break either way).  Above `DP_PAIR_BUDGET` pairs the plan is the greedy
      one at B* (same k and bottleneck) and ``sum_squares_optimal`` is False.

    - *flops bottleneck* (``balance="flops"``): a flops bound F admits
      exactly k non-empty runs, each within C bytes and F flops, iff the
      greedy pass that cuts when either bound would be exceeded needs at
      most k runs: a run's flops, like its size, never shrink when it
      grows, so the greedy argument holds for the pair of bounds, and
      splitting runs keeps both.  Bisection over the integers between
      max(largest node flops, ⌈Σ flops / k⌉) and the flops bottleneck of a
      feasible k-run plan; the Σ S² stage then runs with both bounds.

    Complexity: O(n) to build prefix sums, O(k log n · log C) for the first
    two stages (C-level bisections on prefix sums for the additive model and
    for the liveness model without buffers at f = 1), and O(Σ_j |W_j| ·
    window width) for the third.

    Examples
    --------
    >>> from cachefit.graphs import from_layers
    >>> plan = dp(from_layers([40, 30, 20, 50, 10]), 60, memory="additive")
    >>> plan.sizes, plan.status
    ((40, 50, 60), <Status.OPTIMAL: 'OPTIMAL'>)
    >>> dp(from_layers([40, 30, 20, 50, 10]), 100, memory="additive", k=2).sizes
    (70, 80)
    """
    problem = Problem.make(graph, capacity, memory=memory, chunk_fraction=chunk_fraction, k=k,
                           time_limit_s=time_limit_s, seed=seed, balance=balance)
    table = problem.table
    n = table.n
    refused = refuse(problem, "dp")
    if refused:
        return refused
    if n == 0:
        return finish(problem, "dp", [], status=Status.OPTIMAL, lower=0)
    intervals = problem.intervals()
    bounds, stuck = greedy_bounds(intervals, problem.capacity)
    if bounds is None:  # only for a DAG: activations of earlier nodes pass through this one
        return no_plan(problem, "dp", Status.UNKNOWN,
                       f"node {table.ids[stuck]!r} does not fit even alone in the given node order "
                       "(activations of earlier nodes pass through it); another order may fit: try solver='cpsat'")
    order_k = len(bounds) - 1
    lower = order_k if table.is_chain else problem.lower_bound()
    if problem.k is not None and problem.k < lower:
        return no_plan(problem, "dp", Status.INFEASIBLE,
                       f"k = {problem.k} is below the minimum number of groups, {lower}", lower=lower)
    if problem.k is not None and problem.k < order_k:
        return no_plan(problem, "dp", Status.UNKNOWN,
                       f"k = {problem.k}: the given node order needs {order_k} groups; "
                       "another order may need fewer: try solver='cpsat'", lower=lower)
    target = problem.k or order_k
    deadline = None
    if time_limit_s is not None:  # the plan's sizes and check come after: end the Σ S² stage before them
        deadline = Deadline(float(problem.time_limit_s), start=problem.started).reserve(
            finish_reserve(n, float(problem.time_limit_s)))
    if problem.balance == "flops":
        result, stats = _balance_flops(intervals, bounds, target, problem.flops, problem.capacity, deadline)
    else:
        result, stats = _balance(intervals, bounds, target,
                                 forced_bytes(table, memory=problem.memory, chunk_fraction=problem.chunk_fraction),
                                 deadline)
    sizes = intervals.sizes(result)
    status = Status.OPTIMAL if table.is_chain else Status.FEASIBLE
    stats = {"order": "given", "min_k_for_order": order_k, **stats}
    return finish(problem, "dp", contiguous_groups(result), status=status, lower=lower, sizes=sizes, stats=stats)


def _balance(intervals, bounds, target, forced, deadline=None):
    """Stages 2 and 3 from greedy's `bounds`: boundaries of `target` runs, and stats (stage 3 stops at `deadline`)."""
    order_k = len(bounds) - 1
    probe = intervals
    feasible = split_to_k(bounds, target) if target > order_k else bounds
    high = int(intervals.sizes(feasible).max())
    # k runs hold every node, so k·B* ≥ Σ S ≥ the sum bound's total (see `bounds.forced_bytes`).
    low = -(-forced // target)
    bottleneck, probes = min_bottleneck(probe, target, min(low, high), high)
    result, pairs, exact = _min_sum_squares(probe, target, bottleneck, DP_PAIR_BUDGET, deadline)
    sum_squares_optimal = result is not None
    if result is None:
        logger.info("dp: Σ S² stage over budget (%d pairs) or time; using the greedy plan at the bottleneck", pairs)
        greedy_at, _ = greedy_bounds(intervals, bottleneck)
        result = split_to_k(greedy_at, target) if len(greedy_at) - 1 < target else greedy_at
    return result, {"probes": probes, "balance_optimal_for_order": True,
                    "sum_squares_optimal": sum_squares_optimal, "sum_squares_pairs": int(pairs),
                    "sum_squares_exact_arithmetic": bool(exact), "probe": probe.mode}


class _FlopsCapped:
    """An `Intervals` whose runs must also stay within `limit` flops: the reach under both bounds.

    ``end``, ``begin`` and ``begins`` take the tighter of the byte bound
    (`capacity`, whatever cap the caller passes) and the flops bound
    (bisection over the flops prefix sums); sizes are the byte probe's.  Runs
    feasible under both bounds are closed under containment (both measures
    are monotone), which is all `_windows` and `_min_sum_squares` rely on.
    """

    def __init__(self, probe, prefix_flops, capacity, limit):
        self.probe = probe
        self.n = probe.n
        self.prefix = prefix_flops
        self._prefix_view = memoryview(prefix_flops)
        self.capacity = capacity
        self.limit = limit

    def flops_end(self, start, limit):
        prefix = self._prefix_view
        return bisect.bisect_right(prefix, prefix[start] + limit, start) - 1

    def end(self, start, _cap=None):
        return min(self.probe.end(start, self.capacity), self.flops_end(start, self.limit))

    def begin(self, end, _cap=None):
        prefix = self._prefix_view
        by_flops = bisect.bisect_left(prefix, prefix[end] - self.limit, 0, end)
        return max(self.probe.begin(end, self.capacity), by_flops)

    def begins(self, ends, _cap, floor):
        by_flops = np.searchsorted(self.prefix, self.prefix[ends] - self.limit, side="left")
        return np.maximum(self.probe.begins(ends, self.capacity, floor), by_flops)

    def sizes_of(self, starts, ends):
        return self.probe.sizes_of(starts, ends)

    def count(self, limit, most):
        """Greedy runs within the capacity and `limit` flops, stopping past `most`: (count, largest run flops)."""
        n, start, count, largest = self.n, 0, 0, 0
        prefix = self._prefix_view
        while start < n:
            end = min(self.probe.end(start, self.capacity), self.flops_end(start, limit))
            if end <= start:
                return most + 1, largest
            largest = max(largest, prefix[end] - prefix[start])
            count += 1
            if count > most:
                return count, largest
            start = end
        return count, largest


def _balance_flops(intervals, bounds, target, flops, capacity, deadline=None):
    """Boundaries of `target` runs within `capacity` bytes with the smallest largest Σ flops, then Σ S².

    `bounds` is greedy's byte plan (the fewest runs).  Returns (bounds, stats); the Σ S² stage stops at
    `deadline`.
    """
    order_k = len(bounds) - 1
    probe = intervals
    prefix = np.zeros(len(flops) + 1, dtype=np.int64)
    np.cumsum(flops, out=prefix[1:])
    feasible = split_to_k(bounds, target) if target > order_k else np.asarray(bounds, dtype=np.int64)
    high = int(np.diff(prefix[feasible]).max())
    low = max(int(flops.max()), -(-int(prefix[-1]) // target))
    capped = _FlopsCapped(probe, prefix, capacity, high)
    probes = 0
    while low < high:  # the smallest flops bound F with at most `target` greedy runs (see `dp`, Notes)
        middle = (low + high) // 2
        count, largest = capped.count(middle, target)
        probes += 1
        if count <= target:
            high = largest
        else:
            low = middle + 1
    capped.limit = high
    result, pairs, exact = _min_sum_squares(capped, target, capacity, DP_PAIR_BUDGET, deadline)
    sum_squares_optimal = result is not None
    if result is None:
        logger.info("dp: Σ S² stage over budget (%d pairs) or time; using the greedy plan at the flops bottleneck",
                    pairs)
        cuts, start = [0], 0
        while start < capped.n:
            start = capped.end(start)
            cuts.append(start)
        result = split_to_k(cuts, target) if len(cuts) - 1 < target else np.asarray(cuts, dtype=np.int64)
    return result, {"probes": probes, "balance_optimal_for_order": True, "sum_squares_optimal": sum_squares_optimal,
                    "sum_squares_pairs": int(pairs), "sum_squares_exact_arithmetic": bool(exact),
                    "probe": probe.mode}


def balanced_cut(table, capacity, *, memory="liveness", chunk_fraction=1.0, k=None, flops=None, deadline=None):
    """Boundaries of dp's partition of `table`'s node order, without building a Plan.

    The building block `cpsat` uses to turn any topological order into a
    balanced hint.  Inputs are taken as already validated (capacity in bytes).
    With `flops` (an int64 array per position) the runs are balanced by flops
    (``balance="flops"``), else by bytes.  With a `deadline`
    (`cachefit.solvers._deadline.Deadline`) the Σ S² stage stops when it
    passes, leaving the bottleneck-optimal runs of the greedy cut.

    Returns
    -------
    bounds : numpy.ndarray or None
        [0, b1, ..., n] for `k` runs (default: the fewest), or None when the
        order cannot hold a node or needs more than `k` runs.
    order_k : int or None
        The fewest runs this order needs (None when a node does not fit).

    Examples
    --------
    >>> from cachefit.memory import LayerTable
    >>> bounds, order_k = balanced_cut(LayerTable.chain([40, 30, 20, 50, 10]), 100, memory="additive")
    >>> bounds.tolist(), order_k
    ([0, 2, 5], 2)
    """
    intervals = Intervals(table, memory, chunk_fraction)
    bounds, _ = greedy_bounds(intervals, capacity)
    if bounds is None:
        return None, None
    order_k = len(bounds) - 1
    target = order_k if k is None else k
    if target < order_k or target > table.n:
        return None, order_k
    if table.n == 0:
        return bounds, order_k
    if flops is not None:
        result, _ = _balance_flops(intervals, bounds, target, flops, capacity, deadline)
    else:
        result, _ = _balance(intervals, bounds, target,
                             forced_bytes(table, memory=memory, chunk_fraction=chunk_fraction), deadline)
    return result, order_k
