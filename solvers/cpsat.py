"""OR-Tools CP-SAT over every valid grouping of a DAG (not only the given node order).

Two solves: the fewest groups, then the smallest bottleneck at that number
of groups (or at a given k).  Both are hinted with the best of several
heuristic plans (list scheduling over the DAG, each order balanced by `dp`)
and bounded below by `cachefit.solvers.bounds`.
"""

from __future__ import annotations

import logging
import os
import time
from fractions import Fraction

import numpy as np

from ..errors import InputError
from ..result import Status
from ..memory import LayerTable, group_sizes
from ._common import Problem, alone_sizes, finish, no_plan, refuse
from .bounds import forced_bytes, head_tail, item_sizes, lower_bound, reachability
from .dp import balanced_cut

__all__ = ["cpsat", "DEFAULT_TIME_LIMIT_S", "activation_scale"]

logger = logging.getLogger(__name__)

#: Time limit of a cpsat solve when none is given (seconds, both phases together).
DEFAULT_TIME_LIMIT_S = 10.0

_INT_LIMIT = 2 ** 62


def activation_scale(chunk_fraction, largest_live, capacity):
    """Integers (num, den) with ⌈num·x/den⌉ = ⌈f·x⌉ for 0 ≤ x ≤ `largest_live`, or None.

    The liveness constraint is written ``den · act[p] ≥ num · Σ a·live``
    with an integer ``act[p]``, which makes ``act[p] ≥ ⌈(num/den)·Σ⌉``
    exactly.  (num, den) is f's own rational when the products fit in int64
    (every dyadic f: 0.5, 0.25, ...).  Otherwise it is a rational r = p/q ≥ f
    with a small q and (r − f)·X·q < 1 for X = `largest_live`, which makes
    ⌈r x⌉ = ⌈f x⌉ for every 0 ≤ x ≤ X: ⌈f x⌉ < ⌈r x⌉ needs an integer m with
    f x ≤ m < r x, and m < p x / q forces m ≤ r x − 1/q, so (r − f) x ≥ 1/q.
    (An r below f would not do: at x = q, r x is an integer that f x exceeds.)

    Examples
    --------
    >>> activation_scale(1.0, 10**12, 10**9), activation_scale(0.25, 10**12, 10**9)
    ((1, 1), (1, 4))
    >>> activation_scale(1 / 3, 10**12, 10**9)  # the float just below 1/3 acts as 1/3 up to 2^54
    (1, 3)
    >>> activation_scale(0.1, 10**12, 10**9) is None  # the float 0.1 is just above 1/10
    True
    """
    if chunk_fraction == 1.0:
        return 1, 1
    numerator, denominator = float(chunk_fraction).as_integer_ratio()
    largest_live = max(int(largest_live), 1)
    if numerator * largest_live < _INT_LIMIT and denominator * int(capacity) < _INT_LIMIT:
        return numerator, denominator
    exact = Fraction(numerator, denominator)
    for limit in (2 ** 8, 2 ** 12, 2 ** 16, 2 ** 20):
        r = exact.limit_denominator(limit)
        if r < exact:  # try the next fraction above: the mediant with the upper neighbour is not simpler
            continue
        if ((r - exact) * largest_live * r.denominator < 1 and r.numerator * largest_live < _INT_LIMIT
                and r.denominator * int(capacity) < _INT_LIMIT):
            return r.numerator, r.denominator
    return None


def _domains(table, capacity, memory, chunk_fraction, groups, reach):
    """Earliest and latest group of every node among plans with at most `groups` groups.

    From the head–tail bound (`cachefit.solvers.bounds.head_tail`):
    part(v) ≥ H_v − 1 and part(v) ≤ groups − T_v.
    """
    n = table.n
    earliest = np.zeros(n, dtype=np.int64)
    latest = np.full(n, groups - 1, dtype=np.int64)
    result = head_tail(table, capacity, memory=memory, chunk_fraction=chunk_fraction, reach=reach)
    if result is None:
        return earliest, latest
    head, tail = result
    earliest = np.maximum(head - 1, 0)
    latest = groups - np.maximum(tail, 1)
    return earliest, np.maximum(latest, earliest)


class _Model:
    """The CP-SAT model of one solve: at most `groups` groups (phase 1) or exactly `groups` (phase 2).

    Variables (order encoding):

    - ``started[v][p]`` = 1 iff part(v) ≤ p; a constant outside v's domain.
    - ``x[v][p]`` = started[v][p] − started[v][p−1]: v is in group p.
    - ``used[p]``: group p is non-empty (phase 1; used groups form a prefix).
    - ``live[u][p]`` ≥ [part(u) ≤ p ≤ last(u)] (liveness): forced up by
      ``live[u][p] ≥ started[u][p] − started[z][p−1]`` for z = u and every
      successor z of u (z is in group p or later, u in p or earlier).
      Over-counting only tightens, and the bottleneck objective pushes it
      down, so the feasible groupings are exactly the valid ones.
    - ``buffer[p]`` ≥ b_v·x[v][p]: the largest buffer of group p.
    - ``act[p]``: den·act[p] ≥ num·Σ_u a_u·live[u][p] (`activation_scale`).
    - ``size[p]`` = Σ w·x + buffer[p] + act[p] (liveness) or Σ (w+a+b)·x
      (additive), ≤ C, and ≤ the bottleneck variable in phase 2; with
      `flops` (balance by flops) phase 2 bounds Σ flops·x[v][p] by the
      bottleneck instead, sizes staying ≤ C.
    """

    def __init__(self, table, capacity, memory, scale, groups, earliest, latest, reach, *, exact_k,
                 minimum_groups=1, bottleneck_low=0, flops=None):
        from ortools.sat.python import cp_model

        self.cp_model = cp_model
        model = cp_model.CpModel()
        self.model = model
        self.groups = groups
        n = table.n
        self.n = n
        weight = table.weight.tolist()
        activation = table.activation.tolist()
        buffer = table.buffer.tolist()
        K = groups
        earliest = np.minimum(earliest, K - 1).tolist()
        latest = np.minimum(latest, K - 1).tolist()

        # started[v][p] = part(v) <= p
        started = []
        for v in range(n):
            row = []
            for p in range(K):
                if p < earliest[v]:
                    row.append(0)
                elif p >= latest[v]:
                    row.append(1)
                else:
                    row.append(model.NewBoolVar(f"started_{v}_{p}"))
            for p in range(K - 1):
                if not isinstance(row[p], int) and not isinstance(row[p + 1], int):
                    model.AddImplication(row[p], row[p + 1])
            started.append(row)
        self.started = started

        def before(v, p):  # started[v][p-1], 0 for p = 0
            return 0 if p == 0 else started[v][p - 1]

        # x[v][p] = v is in group p
        x = []
        for v in range(n):
            row = []
            for p in range(K):
                if p < earliest[v] or p > latest[v]:
                    row.append(0)
                else:
                    var = model.NewBoolVar(f"x_{v}_{p}")
                    model.Add(var == started[v][p] - before(v, p))
                    row.append(var)
            x.append(row)
        self.x = x

        # Precedence: part(u) <= part(v)  <=>  started[v][p] -> started[u][p].
        for u, v in zip(table.sources.tolist(), table.targets.tolist()):
            for p in range(K):
                later, earlier = started[v][p], started[u][p]
                if isinstance(later, int) and isinstance(earlier, int):
                    if later > earlier:
                        model.AddBoolOr([])  # empty domains: no plan with this many groups
                elif isinstance(later, int):
                    if later == 1:
                        model.Add(earlier == 1)
                elif isinstance(earlier, int):
                    if earlier == 0:
                        model.Add(later == 0)
                else:
                    model.AddImplication(later, earlier)

        # Group use: a prefix (symmetry breaking), each used group non-empty.
        if exact_k:
            used = [1] * K
        else:
            used = [1 if p < minimum_groups else model.NewBoolVar(f"used_{p}") for p in range(K)]
            for p in range(K - 1):
                if not isinstance(used[p + 1], int) and not isinstance(used[p], int):
                    model.AddImplication(used[p + 1], used[p])
            # An unused group p means every node is in a group before p.  (Implied by the
            # clauses on sinks alone, but stated for every node it tightens the relaxation.)
            for p in range(1, K):
                if isinstance(used[p], int):
                    continue
                for v in range(n):
                    done = started[v][p - 1]
                    if isinstance(done, int):
                        if done == 0:
                            model.Add(used[p] == 1)
                    else:
                        model.AddBoolOr([used[p], done])
        for p in range(K):
            members = [x[v][p] for v in range(n) if not isinstance(x[v][p], int)]
            model.Add(sum(members) >= used[p])
        self.used = used

        # Group sizes.
        sizes = []
        if memory == "additive":
            total = [weight[v] + activation[v] + buffer[v] for v in range(n)]
            for p in range(K):
                sizes.append(sum(total[v] * x[v][p] for v in range(n) if total[v] and not isinstance(x[v][p], int)))
        else:
            numerator, denominator = scale
            successors = [[] for _ in range(n)]
            for u, v in zip(table.sources.tolist(), table.targets.tolist()):
                successors[u].append(v)
            if reach is not None:  # a successor with a later successor below it never decides last(u)
                successors = [[z for z in succ if not any(reach[z, y] for y in succ if y != z)]
                              for succ in successors]
            live_terms = [[] for _ in range(K)]
            for u in range(n):
                if not activation[u]:
                    continue
                if table.last_use[u] == u:  # no successor: live only in its own group
                    for p in range(K):
                        if not isinstance(x[u][p], int):
                            live_terms[p].append((activation[u], x[u][p]))
                    continue
                horizon = max(latest[u], *(latest[z] for z in successors[u]))
                for p in range(earliest[u], horizon + 1):
                    produced = started[u][p]
                    forcing = []
                    for z in [u, *successors[u]]:
                        gone = before(z, p)  # z is in a group before p
                        if isinstance(gone, int) and gone == 1:
                            continue
                        forcing.append(gone)
                    if not forcing or (isinstance(produced, int) and produced == 0):
                        continue
                    live = model.NewBoolVar(f"live_{u}_{p}")
                    for gone in forcing:
                        model.Add(live >= produced - gone)
                    live_terms[p].append((activation[u], live))
            max_buffer = max(buffer) if n else 0
            for p in range(K):
                members = [v for v in range(n) if not isinstance(x[v][p], int)]
                term = sum(weight[v] * x[v][p] for v in members if weight[v])
                if max_buffer:
                    largest = model.NewIntVar(0, max_buffer, f"buffer_{p}")
                    for v in members:
                        if buffer[v]:
                            model.Add(largest >= buffer[v] * x[v][p])
                    term = term + largest
                live_sum = sum(a * var for a, var in live_terms[p])
                if live_terms[p]:
                    if (numerator, denominator) == (1, 1):
                        term = term + live_sum
                    else:
                        act = model.NewIntVar(0, capacity, f"act_{p}")
                        model.Add(denominator * act >= numerator * live_sum)
                        term = term + act
                sizes.append(term)
        self.sizes = sizes
        for p in range(K):
            model.Add(sizes[p] <= capacity)
        self.bottleneck = None
        if exact_k and flops is not None:
            # bottleneck = the largest group's Σ flops; the sizes are only capped by C
            total = int(sum(flops))
            self.bottleneck = model.NewIntVar(min(bottleneck_low, total), total, "bottleneck_flops")
            for p in range(K):
                work = sum(flops[v] * x[v][p] for v in range(n) if flops[v] and not isinstance(x[v][p], int))
                model.Add(self.bottleneck >= work)
            model.Minimize(self.bottleneck)
        elif exact_k:
            self.bottleneck = model.NewIntVar(min(bottleneck_low, capacity), capacity, "bottleneck")
            for p in range(K):
                model.Add(sizes[p] <= self.bottleneck)
            model.Minimize(self.bottleneck)
        else:
            model.Add(sum(used) >= minimum_groups)
            model.Minimize(sum(used))

    def hint(self, part):
        """Hint a complete assignment from a group index per node (positions)."""
        model = self.model
        for v in range(self.n):
            for p in range(self.groups):
                var = self.started[v][p]
                if not isinstance(var, int):
                    model.AddHint(var, 1 if part[v] <= p else 0)
                var = self.x[v][p]
                if not isinstance(var, int):
                    model.AddHint(var, 1 if part[v] == p else 0)
        top = max(part) if len(part) else -1
        for p, var in enumerate(self.used):
            if not isinstance(var, int):
                model.AddHint(var, 1 if p <= top else 0)

    def solve(self, time_limit_s, workers, seed):
        cp_model = self.cp_model
        solver = cp_model.CpSolver()
        solver.parameters.max_time_in_seconds = max(time_limit_s, 0.001)
        solver.parameters.num_workers = workers
        solver.parameters.random_seed = seed
        if workers > 1:
            # Deterministic parallel search: the default portfolio shares
            # solutions between threads as they come, which depends on timing.
            solver.parameters.interleave_search = True
        code = solver.Solve(self.model)
        status = {cp_model.OPTIMAL: "OPTIMAL", cp_model.FEASIBLE: "FEASIBLE",
                  cp_model.INFEASIBLE: "INFEASIBLE", cp_model.MODEL_INVALID: "MODEL_INVALID"}.get(code, "UNKNOWN")
        result = {"status": status, "wall_s": solver.WallTime(), "branches": solver.NumBranches(),
                  "conflicts": solver.NumConflicts()}
        if status in ("OPTIMAL", "FEASIBLE"):
            result["objective"] = int(round(solver.ObjectiveValue()))
            result["bound"] = int(np.ceil(solver.BestObjectiveBound() - 1e-9))
            part = []
            for v in range(self.n):
                row = self.started[v]
                part.append(next(p for p in range(self.groups)
                                 if (row[p] if isinstance(row[p], int) else solver.Value(row[p]))))
            result["part"] = part
        return result


def _groups_of(part):
    """Non-empty groups (lists of positions, in order) from a group index per position."""
    groups = {}
    for v, p in enumerate(part):
        groups.setdefault(p, []).append(v)
    return [groups[p] for p in sorted(groups)]


def _part_from(groups, n):
    part = [0] * n
    for index, group in enumerate(groups):
        for v in group:
            part[v] = index
    return part


# -- Hints: list scheduling over the DAG, then dp on the order it found ------------------------------

def _list_schedule(table, capacity, memory, scale, priority):
    """Groups built one at a time from the nodes whose predecessors are placed.

    Each step adds the ready node of highest `priority` that still fits the
    group (a node made ready by a member may join the same group); a group
    closes when none fits.  Exact sizes: for the group being built, the live
    set is its members plus every node of a closed group with a successor
    not in a closed group, which is fixed while the group grows.  Returns the
    groups, or None when a node cannot start a group.  O(n · ready) size
    evaluations.
    """
    n = table.n
    weight = table.weight.tolist()
    activation = table.activation.tolist()
    buffer = table.buffer.tolist()
    predecessors = table.predecessors()
    successors = [[] for _ in range(n)]
    for u, v in zip(table.sources.tolist(), table.targets.tolist()):
        successors[u].append(v)
    waiting = [len(p) for p in predecessors]
    open_successors = [len(s) for s in successors]
    closed = [False] * n
    ready = [v for v in range(n) if not waiting[v]]
    numerator, denominator = scale
    additive = memory == "additive"
    carried = 0
    groups = []
    placed = 0
    while placed < n:
        group = []
        total = weight_sum = activation_sum = largest_buffer = 0
        while True:
            best, best_key = -1, None
            for v in ready:
                if additive:
                    size = total + weight[v] + activation[v] + buffer[v]
                else:
                    live = carried + activation_sum + activation[v]
                    size = (weight_sum + weight[v] + max(largest_buffer, buffer[v])
                            - ((-live * numerator) // denominator))
                if size <= capacity and (best_key is None or priority[v] > best_key):
                    best, best_key = v, priority[v]
            if best < 0:
                break
            group.append(best)
            ready.remove(best)
            total += weight[best] + activation[best] + buffer[best]
            weight_sum += weight[best]
            activation_sum += activation[best]
            largest_buffer = max(largest_buffer, buffer[best])
            for z in successors[best]:
                waiting[z] -= 1
                if not waiting[z]:
                    ready.append(z)
        if not group:
            return None
        for v in group:
            for u in predecessors[v]:
                open_successors[u] -= 1
                if not open_successors[u] and closed[u]:
                    carried -= activation[u]
        for v in group:
            closed[v] = True
            if open_successors[v]:
                carried += activation[v]
        placed += len(group)
        groups.append(group)
    return groups


def _reorder(table, order):
    """`table` with its nodes in `order` (a topological order of positions)."""
    order = np.asarray(order, dtype=np.int64)
    n = table.n
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    sources, targets = position[table.sources], position[table.targets]
    last_use = np.arange(n, dtype=np.int64)
    np.maximum.at(last_use, sources, targets)
    linked = np.zeros(max(n - 1, 0), dtype=bool)
    consecutive = targets == sources + 1
    linked[sources[consecutive]] = True
    return LayerTable(tuple(table.ids[i] for i in order.tolist()), table.weight[order], table.activation[order],
                      table.buffer[order], last_use, sources, targets, bool(linked.all()), None)


def _cut_order(table, order, capacity, memory, chunk_fraction, k, flops=None):
    """dp's balanced groups (positions of `table`) for the topological `order`, or None.

    With `flops` (per position of `table`) the runs are balanced by flops.
    """
    reordered = _reorder(table, order)
    bounds, _ = balanced_cut(reordered, capacity, memory=memory, chunk_fraction=chunk_fraction, k=k,
                             flops=None if flops is None else flops[np.asarray(order, dtype=np.int64)])
    if bounds is None:
        return None
    order = list(order)
    return [sorted(order[i] for i in range(int(s), int(e))) for s, e in zip(bounds[:-1], bounds[1:])]


def _starts(table, capacity, memory, chunk_fraction, scale, k, seed, flops=None):
    """Candidate plans (groups of positions) for hints: dp on the given order and on list-schedule orders."""
    n = table.n
    items, _ = item_sizes(table, memory=memory, chunk_fraction=chunk_fraction)
    items = items.tolist()
    tail = list(items)  # heaviest item sum on a path from v to a sink
    successors = [[] for _ in range(n)]
    for u, v in zip(table.sources.tolist(), table.targets.tolist()):
        successors[u].append(v)
    for v in range(n - 1, -1, -1):
        tail[v] = items[v] + max((tail[z] for z in successors[v]), default=0)
    rng = np.random.default_rng(seed)
    rules = {
        "order": [-v for v in range(n)],
        "largest": [(items[v], -v) for v in range(n)],
        "critical path": [(tail[v], -v) for v in range(n)],
    }
    for index in range(2):
        rules[f"random {index}"] = rng.random(n).tolist()
    orders = {"given order": list(range(n))}
    for name, priority in rules.items():
        groups = _list_schedule(table, capacity, memory, scale, priority)
        if groups is not None:
            orders[f"list schedule ({name})"] = [v for group in groups for v in group]
    starts = []
    seen = set()
    for name, order in orders.items():
        key = tuple(order)
        if key in seen:
            continue
        seen.add(key)
        groups = _cut_order(table, order, capacity, memory, chunk_fraction, k, flops)
        if groups is not None:
            starts.append((name, groups))
    return starts


def _bottleneck(table, groups, memory, chunk_fraction, flops=None):
    """The largest group's size, or with `flops` its Σ flops."""
    if flops is not None:
        return max(int(sum(int(flops[v]) for v in group)) for group in groups)
    ids = table.ids
    return max(group_sizes(table, [[ids[v] for v in group] for group in groups], memory=memory,
                           chunk_fraction=chunk_fraction))


def cpsat(graph, capacity, *, memory="liveness", chunk_fraction=1.0, k=None, time_limit_s=None, seed=0,
          workers=None, balance="memory"):
    """Exact partition over every valid grouping of a DAG with OR-Tools CP-SAT.

    Parameters
    ----------
    graph : networkx.DiGraph or LayerTable
    capacity : int, str
        C in bytes, a byte string or a device name.
    memory : {"liveness", "additive"}
    chunk_fraction : float in (0, 1]
    k : int, optional
        Exactly k non-empty groups, balanced.  Default: the fewest.
    time_limit_s : float, optional
        Wall-clock limit for the whole call (default `DEFAULT_TIME_LIMIT_S`):
        the fewest-groups solve gets what it needs and the bottleneck solve
        the rest.
    seed : int
        CP-SAT's ``random_seed`` and the seed of the randomised hints.
    workers : int, optional
        CP-SAT's ``num_workers`` (default: the machine's cores).
    balance : {"memory", "flops"}
        The bottleneck of the second solve: the largest group's bytes, or its
        Σ ``flops`` with every group still within the capacity
        (``stats["bottleneck_bound"]`` is then in flops).

    Returns
    -------
    Plan
        OPTIMAL when k is proved minimal (for an explicit k: when the
        bottleneck is proved minimal).  When time runs out, the best plan
        found, FEASIBLE, with the proven bound in ``lower_bound`` and
        ``stats["gap"]``; never an exception.  Groups are listed in order,
        nodes within a group in the graph's (topological) order.
        ``stats`` holds each phase's CP-SAT status and time, where the hint
        came from, when k was proved (``k_proved_s``, seconds into the
        call), the bottleneck bound and whether the bottleneck is proved
        (``bottleneck_optimal``).  Σ S² is not minimised
        (``stats["sum_squares"] = "not minimised"``).

    Raises
    ------
    InputError
        For invalid input (graph, capacity, memory, chunk fraction, k,
        time limit, seed, workers); never for a timeout.

    Notes
    -----
    Phase 0 (hints): list scheduling over the DAG with several priority
    rules (`_list_schedule`), each order it finds cut by `dp` (balanced
    within that order), plus dp on the given order; the best plan (fewest
    groups, then smallest bottleneck) seeds both solves.  When it meets the
    lower bound of `cachefit.solvers.bounds`, k is proved without a solve.

    Phase 1 (fewest groups) and phase 2 (smallest bottleneck at that k or
    the given k) solve `_Model`, which encodes the memory model of
    DESIGN.md §4 exactly: precedence, the group prefix (symmetry breaking),
    liveness from a producer's group to its last consumer's, the largest
    buffer, and ⌈f·Σ activations⌉ through `activation_scale`.  Every node's
    group is confined to [earliest, latest] by the head–tail bound and the
    lower bound on k is a constraint.  When f admits no exact small-integer
    scaling (e.g. the float 0.1, slightly above 1/10, which rounds
    differently from 1/10 at multiples of 10), cpsat returns the best hint,
    FEASIBLE, with ``stats["fallback"]`` saying why.

    Determinism: with ``workers > 1`` the search runs with
    ``interleave_search`` (CP-SAT's deterministic parallel mode), so a fixed
    seed and worker count give the same plan as long as the time limit is not
    what stops the search; a search cut by the time limit depends on the
    machine's speed.

    Complexity: the model has O((n + e)·K) constraints for K = the hint's
    number of groups; the search is exponential in the worst case.

    References
    ----------
    L. Perron and F. Didier, CP-SAT, Google OR-Tools, https://developers.google.com/optimization.
    A. Scholl and C. Becker, "State-of-the-art exact and heuristic solution
    procedures for simple assembly line balancing", EJOR 168 (2006) 666–693
    (station bounds and priority-rule list scheduling).

    Examples
    --------
    >>> import networkx as nx
    >>> g = nx.DiGraph()
    >>> for name, weight in zip("abcd", (10, 30, 50, 20)):
    ...     g.add_node(name, weight_bytes=weight, activation_bytes=0, buffer_bytes=0)
    >>> g.add_edges_from([("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")])
    >>> plan = cpsat(g, 60, memory="additive", workers=1)
    >>> plan.k, plan.status, plan.partitions  # the given order a, b, c, d needs 3
    (2, <Status.OPTIMAL: 'OPTIMAL'>, (('a', 'c'), ('b', 'd')))
    """
    problem = Problem.make(graph, capacity, memory=memory, chunk_fraction=chunk_fraction, k=k,
                           time_limit_s=time_limit_s, seed=seed, balance=balance)
    if workers is None:
        workers = os.cpu_count() or 1
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
        raise InputError(f"`workers` must be a positive integer or None, got {workers!r}")
    workers = int(workers)
    limit = float(problem.time_limit_s or DEFAULT_TIME_LIMIT_S)
    deadline = problem.started + limit
    table = problem.table
    n = table.n
    capacity = problem.capacity
    memory, fraction = problem.memory, problem.chunk_fraction
    refused = refuse(problem, "cpsat")
    if refused:
        return refused
    if n == 0:
        return finish(problem, "cpsat", [], status=Status.OPTIMAL, lower=0,
                      stats={"bottleneck_optimal": True, "gap": 0})
    reach = reachability(table)
    lower = lower_bound(table, capacity, memory=memory, chunk_fraction=fraction, reach=reach)
    if problem.k is not None and problem.k < lower:
        return no_plan(problem, "cpsat", Status.INFEASIBLE,
                       f"k = {problem.k} is below the minimum number of groups, {lower}", lower=lower)
    stats = {"workers": workers, "seed": problem.seed, "time_limit_s": limit, "sum_squares": "not minimised"}

    scale = (1, 1)
    if memory == "liveness":
        scale = activation_scale(fraction, int(table.activation.sum()), capacity)
    exact_scale = scale is not None
    if not exact_scale:  # hints only: list scheduling then needs some exact scaling of its own
        scale = Fraction(fraction).as_integer_ratio()

    # Phase 0: hints.
    flops = problem.flops
    starts = _starts(table, capacity, memory, fraction, scale, problem.k, problem.seed, flops)
    best = None
    for name, groups in starts:
        key = (len(groups), _bottleneck(table, groups, memory, fraction, flops))
        if best is None or key < best[0]:
            best = (key, name, groups)
    stats["hint"] = f"{best[1]}, k={best[0][0]}" if best else "none"
    best_groups = best[2] if best else None

    if not exact_scale:
        why = (f"chunk_fraction {fraction!r} has no exact small-integer scaling for CP-SAT; "
               "the plan is the best hint")
        logger.info("cpsat: %s", why)
        stats["fallback"] = why
        if best_groups is None:
            return no_plan(problem, "cpsat", Status.UNKNOWN, why, lower=lower, stats=stats)
        return finish(problem, "cpsat", best_groups, status=Status.FEASIBLE, lower=lower, stats=stats)
    if memory == "liveness":
        stats["activation_scale"] = f"{scale[0]}/{scale[1]}"

    proven = False
    build_s = None
    if problem.k is None:
        upper = len(best_groups) if best_groups else n
        if best_groups and upper == lower:
            proven = True
            stats["phase1"] = "skipped: the hint meets the lower bound"
        else:
            built = time.perf_counter()
            earliest, latest = _domains(table, capacity, memory, fraction, upper, reach)
            model = _Model(table, capacity, memory, scale, upper, earliest, latest, reach,
                           exact_k=False, minimum_groups=lower)
            if best_groups is not None:
                model.hint(_part_from(best_groups, n))
            build_s = time.perf_counter() - built
            result = model.solve(deadline - time.perf_counter(), workers, problem.seed)
            stats["phase1"] = result["status"]
            stats["phase1_wall_s"] = round(result["wall_s"], 3)
            stats["phase1_build_s"] = round(build_s, 3)
            if result["status"] == "INFEASIBLE":
                return no_plan(problem, "cpsat", Status.INFEASIBLE,
                               "no valid grouping fits: activations passing through every order overflow the capacity",
                               lower=lower, stats=stats)
            if "part" in result:
                found = _groups_of(result["part"])
                if best_groups is None or len(found) < len(best_groups):
                    # Rebalance within the order CP-SAT found (dp on it needs no more groups).
                    order = [v for group in found for v in group]
                    best_groups = _cut_order(table, order, capacity, memory, fraction, None, flops) or found
                lower = max(lower, min(result["bound"], len(best_groups)))
                proven = result["status"] == "OPTIMAL"
            if best_groups is None:
                return no_plan(problem, "cpsat", Status.UNKNOWN,
                               f"time ran out ({limit:g} s) before CP-SAT found a plan", lower=lower, stats=stats)
        target = len(best_groups)
        if proven:
            lower = target
            stats["k_proved_s"] = round(problem.elapsed(), 3)
    else:
        target = problem.k

    # Phase 2: the smallest bottleneck with exactly `target` groups.
    groups = best_groups if best_groups is not None and len(best_groups) == target else None
    bottleneck_optimal = False
    remaining = deadline - time.perf_counter()
    estimate = build_s if build_s is not None else 3e-5 * (n + len(table.sources)) * target
    if remaining > 1.5 * estimate + 0.05:
        earliest, latest = _domains(table, capacity, memory, fraction, target, reach)
        if flops is not None:
            low = max(int(flops.max()), -(-int(flops.sum()) // target))
        else:
            low = max(int(alone_sizes(problem).max()),
                      -(-forced_bytes(table, memory=memory, chunk_fraction=fraction) // target))
        model = _Model(table, capacity, memory, scale, target, earliest, latest, reach,
                       exact_k=True, bottleneck_low=low, flops=None if flops is None else flops.tolist())
        if groups is not None:
            model.hint(_part_from(groups, n))
        result = model.solve(deadline - time.perf_counter(), workers, problem.seed)
        stats["phase2"] = result["status"]
        stats["phase2_wall_s"] = round(result["wall_s"], 3)
        if result["status"] == "INFEASIBLE" and problem.k is not None:
            return no_plan(problem, "cpsat", Status.INFEASIBLE,
                           f"no valid grouping has exactly k = {problem.k} groups within the capacity",
                           lower=lower, stats=stats)
        if "part" in result:
            found = _groups_of(result["part"])
            if len(found) == target and (groups is None or _bottleneck(table, found, memory, fraction, flops)
                                         <= _bottleneck(table, groups, memory, fraction, flops)):
                groups = found
            stats["bottleneck_bound"] = result["bound"]
            bottleneck_optimal = result["status"] == "OPTIMAL"
    else:
        stats["phase2"] = "skipped: no time left"
    if groups is None:
        return no_plan(problem, "cpsat", Status.UNKNOWN,
                       f"time ran out ({limit:g} s) before CP-SAT found a plan with k = {target}",
                       lower=lower, stats=stats)
    stats["bottleneck_optimal"] = bottleneck_optimal
    stats["gap"] = len(groups) - lower
    status = Status.OPTIMAL if problem.k is not None and bottleneck_optimal else Status.FEASIBLE
    return finish(problem, "cpsat", groups, status=status, lower=lower, stats=stats)

