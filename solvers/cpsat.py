"""OR-Tools CP-SAT over every valid grouping of a DAG (not only the given node order).

Two solves: the fewest groups, then the smallest bottleneck at that number
of groups (or at a given k).  Both are hinted with the best of several
heuristic plans (list scheduling over the DAG, each order balanced by `dp`)
and bounded below by `cachefit.solvers.bounds`.

Notes
-----
**Claims are certified, not taken from the search.**  On byte counts of
1e9 and more, CP-SAT 9.15 returns wrong OPTIMAL (and INFEASIBLE) answers:
on the 6-node instance pinned in tests/test_cpsat.py it proves a bottleneck
of 15,464,867,035 optimal where 14,464,867,035 exists.  The same model with
``cp_model_presolve = False`` is right, and so is the same instance with
every byte count divided by 10; ``presolve_inclusion_work_limit = 0`` (the
inclusion-detection presolve, google/or-tools#5293) fixes that instance but
not the liveness instance of `TestContainment`, which presolve declares
infeasible.  So presolve rules misreason on large coefficients and the
search solves (`SEARCH`) only *suggest*.  A claim is made when it is
certified independently of them:

- k (k=None) is OPTIMAL when it equals the lower bound of
  `cachefit.solvers.bounds`, or when a decision model "at most k − 1
  groups" is infeasible under `CERTIFY` (no presolve, no LP, one worker:
  exact integer propagation and clause learning only);
- ``bottleneck_optimal`` (and OPTIMAL for an explicit k) when the
  bottleneck B equals the independent floor (largest node alone, forced
  bytes / k, or flops / k), or when "exactly k groups, bottleneck ≤ B − 1"
  is infeasible under `CERTIFY`;
- INFEASIBLE when the `CERTIFY` re-solve of the same model agrees.
A decision solve that finds a plan instead refutes the search and improves
the plan.  Otherwise the claim is dropped (FEASIBLE, flag False) and stats
say why (``k_certificate``, ``bottleneck_certificate``); ``lower_bound``
and ``bottleneck_bound`` hold only certified or independent bounds (the
search's own bounds are kept as ``*_bound_uncertified``).  Every plan
returned passes `cachefit.check`.

**A backend abort never reaches the caller.**  With more than one worker and
``interleave_search`` (our deterministic mode), CP-SAT 9.15 aborts the
process (``Check failed: heuristics.fixed_search != nullptr``) on models
whose presolve ends in an (incorrect) infeasibility, e.g. the instance in
`TestContainment`; without ``interleave_search``, with one worker, or
with presolve off it does not abort there.  No
setting is proven abort-free, so every solve runs in a child forked after
the model is built (`cachefit.solvers._cpsat_child`): about 1–40 ms per
solve, far cheaper than a spawned interpreter.  After a crash the solve is
retried once under `CERTIFY`; ``stats["backend_crash"]`` and the plan's
``reason`` say what happened, and the plan is the best one known.

**The time limit covers the whole call** (`cachefit.solvers._deadline`).
One `Deadline` is read by every phase: the O(n·e) bounds are left out past
`cachefit.solvers.bounds.BOUNDS_SHARE` of the limit; hints stop at
`HINT_SHARE` (an order is cut by dp only when `DP_S_PER_NODE` says it
fits, else kept as found); each model's size is estimated before building
(`_model_cells`, `BUILD_S_PER_CELL`, `BUILD_S_PER_CELL_NO_LIVE`) and its build, hints included, stops
at its share of the remaining time (`BuildTimeout`); a phase that cannot
fit is skipped and ``stats["phase1"]``/``["phase2"]`` say so, leaving the
best hint.  Every solve, re-proving solves included, ends by the call's
deadline less `cachefit.solvers._deadline.finish_reserve` (kept for assembling and checking the
plan): CP-SAT's own limit and a watchdog in the child stop it 0.15 s
before (CP-SAT can take that long to stop its workers on a loaded
machine), and the parent kills a child that has not answered by then.

**CP-SAT stops when it stalls.**  A search solve (phase 1 or 2) also stops
when neither its incumbent nor its bound has moved for `stall_s` of the
limit (``max(STALL_MIN_S, STALL_SHARE × limit)``: 2 s of a 10 s limit),
or when it proves its answer; ``stats["stop_reason"]`` says why the call
ended (``"proved"``, ``"stall: ..."``, ``"time limit ..."``).  A stopped
solve claims nothing: its plan is FEASIBLE unless certified as above.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from fractions import Fraction

import numpy as np

from ..checker import check
from ..errors import InputError
from ..result import Status
from ..memory import get_model, group_sizes
from ._cpsat_child import CONTAINED
from ._cpsat_model import CERTIFY, SEARCH, SEARCH_FROM_HINT, BuildTimeout, Model
from ._common import Problem, alone_sizes, finish, no_plan, refuse
from ._deadline import Deadline, finish_reserve
from ._schedule import DP_S_PER_NODE, ListScheduler, cut_order
from .bounds import BOUNDS_SHARE, forced_bytes, head_tail, item_sizes, lower_bound, reachability
from .greedy import greedy_bounds

__all__ = ["cpsat", "DEFAULT_TIME_LIMIT_S", "activation_scale", "stall_s"]

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


def _domains(n, groups, result):
    """Earliest and latest group of every node among plans with at most `groups` groups.

    From the head–tail bound's `result` (`cachefit.solvers.bounds.head_tail`,
    computed once per call): part(v) ≥ H_v − 1 and part(v) ≤ groups − T_v.
    """
    earliest = np.zeros(n, dtype=np.int64)
    latest = np.full(n, groups - 1, dtype=np.int64)
    if result is None:
        return earliest, latest
    head, tail = result
    earliest = np.maximum(head - 1, 0)
    latest = groups - np.maximum(tail, 1)
    return earliest, np.maximum(latest, earliest)



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

def _starts(table, capacity, memory, chunk_fraction, k, seed, flops=None, deadline=None, intervals=None,
            first_by=None):
    """Candidate plans (groups of positions) for hints: dp on the given order and on list-schedule orders.

    Past `deadline` (a `Deadline`) no further list schedule is tried, and an
    order is cut by dp only while `DP_S_PER_NODE` says dp fits in the time
    left, fewest groups first (the first one while it fits before
    `first_by`, a later deadline); the others (k=None) are kept as found: the
    list schedule's own groups, or greedy's cut of the given order (O(n),
    with `intervals` of the given order).  With an explicit k the given
    order is always cut by dp (only dp splits into exactly k groups).
    """
    n = table.n
    items, _ = item_sizes(table, memory=memory, chunk_fraction=chunk_fraction)
    items = items.tolist()
    tail = list(items)  # heaviest item sum on a path from v to a sink
    successors = table.successors()
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
    given = None
    if intervals is not None:
        bounds, _ = greedy_bounds(intervals, capacity)
        if bounds is not None:
            given = [list(range(a, b)) for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist())]
    found = [("given order", list(range(n)), given)]
    scheduler = ListScheduler(table, capacity, memory, chunk_fraction)
    late = deadline.expired if deadline is not None else (lambda: False)
    for name, priority in rules.items():
        first = len(found) == 1 and first_by is not None  # the first list schedule may run until `first_by`
        if late() and not first:
            break
        packed = scheduler.pack(list(range(n)), {}, priority, deadline=first_by if first else deadline)
        if packed is not None:
            found.append((f"list schedule ({name})", [v for group in packed[0] for v in group], packed[0]))
    if k is None:
        found.sort(key=lambda entry: len(entry[2]) if entry[2] is not None else n + 1)
    starts = []
    seen = set()
    for name, order, groups in found:
        key = tuple(order)
        if key in seen:
            continue
        seen.add(key)
        must = k is not None and name == "given order"
        fits = deadline is None or deadline.remaining() >= DP_S_PER_NODE * n or (
            not starts and first_by is not None and first_by.remaining() >= DP_S_PER_NODE * n)
        if must or fits:
            cut = cut_order(table, order, capacity, memory, chunk_fraction, k, flops)
            if cut is not None:
                starts.append((name, cut))
                continue
        if k is None and groups is not None:
            starts.append((f"{name}, not rebalanced (no time for dp)", groups))
    return starts


def _bottleneck(table, groups, memory, chunk_fraction, flops=None):
    """The largest group's size, or with `flops` its Σ flops."""
    if flops is not None:
        return max(int(sum(int(flops[v]) for v in group)) for group in groups)
    ids = table.ids
    return max(group_sizes(table, [[ids[v] for v in group] for group in groups], memory=memory,
                           chunk_fraction=chunk_fraction))


def cpsat(graph, capacity, *, memory="liveness", chunk_fraction=1.0, k=None, time_limit_s=None, seed=0,
          workers=None, balance="memory", deadline=None):
    """Exact partition over every valid grouping of a DAG with OR-Tools CP-SAT.

    Parameters
    ----------
    graph : networkx.DiGraph or LayerTable
    capacity : int, str
        C in bytes, a byte string or a device name.
    memory : str
        A name in `cachefit.memory.MODELS`.
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
    deadline : Deadline, optional
        A `cachefit.solvers._deadline.Deadline` that replaces `time_limit_s`
        (`auto` shares one between its solvers; tests inject a clock).

    Returns
    -------
    Plan
        OPTIMAL when k is certified minimal (for an explicit k: when the
        bottleneck is certified minimal), independently of the search (see
        the module notes).  When time runs out, the best plan
        found, FEASIBLE, with the proven bound in ``lower_bound`` and
        ``stats["gap"]``; never an exception.  Groups are listed in order,
        nodes within a group in the graph's (topological) order.
        ``stats`` holds each phase's CP-SAT status and time, where the hint
        came from, when k was proved (``k_proved_s``, seconds into the
        call), the bottleneck bound and whether the bottleneck is proved
        (``bottleneck_optimal``), the seconds of set-up before the first
        CP-SAT solve (``setup_s``: bounds, hints, the first model build) and
        why the call ended (``stop_reason``).  Σ S² is not minimised
        (``stats["sum_squares"] = "not minimised"``).

    Raises
    ------
    InputError
        For invalid input (graph, capacity, memory, chunk fraction, k,
        time limit, seed, workers); never for a timeout.

    Notes
    -----
    Phase 0 (hints): list scheduling over the DAG with several priority
    rules (`cachefit.solvers._schedule.ListScheduler`), each order it finds cut by `dp` (balanced
    within that order), plus dp on the given order; the best plan (fewest
    groups, then smallest bottleneck) seeds both solves.  When it meets the
    lower bound of `cachefit.solvers.bounds`, k is proved without a solve.

    Phase 1 (fewest groups) and phase 2 (smallest bottleneck at that k or
    the given k) solve `Model` (`cachefit.solvers._cpsat_model`), which encodes the memory model of
    docs/concepts.md §4 exactly: precedence, the group prefix (symmetry breaking),
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
    refused = refuse(problem, "cpsat")
    if refused:
        return refused
    if problem.table.n == 0:
        return finish(problem, "cpsat", [], status=Status.OPTIMAL, lower=0,
                      stats={"bottleneck_optimal": True, "gap": 0})
    if deadline is None:
        deadline = Deadline(float(problem.time_limit_s or DEFAULT_TIME_LIMIT_S), start=problem.started)
    else:  # the shares of the phases are of the time this call has (`auto` runs it after a search)
        deadline = deadline.within(1.0)
    search = _Search(problem, int(workers), deadline)
    if problem.k is not None and problem.k < search.lower:
        return no_plan(problem, "cpsat", Status.INFEASIBLE,
                       f"k = {problem.k} is below the minimum number of groups, {search.lower}", lower=search.lower)
    best_groups = search.hints()
    if search.scale is None:
        why = (f"chunk_fraction {problem.chunk_fraction!r} has no exact small-integer scaling for CP-SAT; "
               "the plan is the best hint")
        logger.info("cpsat: %s", why)
        search.stats["fallback"] = why
        return search.plan(best_groups, why)
    if problem.k is None:
        outcome = _fewest_groups(search, best_groups)
        if not isinstance(outcome, list):
            return outcome
        best_groups = outcome
        target = len(best_groups)
    else:
        target = problem.k
    groups = best_groups if best_groups is not None and len(best_groups) == target else None
    return _smallest_bottleneck(search, target, groups)


class _Search:
    """One call's state: the problem, the independent bounds, the time budget and the stats."""

    def __init__(self, problem, workers, deadline):
        self.problem = problem
        self.table = problem.table
        self.workers = workers
        self.deadline = deadline
        self.limit = float(problem.time_limit_s or DEFAULT_TIME_LIMIT_S)  # the caller's (auto's: the whole call's)
        self.solving = deadline.reserve(finish_reserve(self.table.n, deadline.limit_s))  # solves and builds end here
        self.stall_s = stall_s(self.limit)
        self.teardown_s = 0.0  # freeing the largest model built so far (`TEARDOWN_S_PER_CELL`)
        imported = time.perf_counter()
        from ortools.sat.python import cp_model  # noqa: F401  (seconds on a first call: kept out of the build budgets)

        self.import_s = time.perf_counter() - imported
        bounds_by = deadline.at_share(BOUNDS_SHARE)  # past it the O(n·e) bounds and domains are left out
        self.reach = reachability(self.table, deadline=bounds_by)
        self.head_tail = (head_tail(self.table, problem.capacity, memory=problem.memory,
                                    chunk_fraction=problem.chunk_fraction, reach=self.reach, deadline=bounds_by)
                          if self.reach is not None else None)
        self.lower = lower_bound(self.table, problem.capacity, memory=problem.memory,
                                 chunk_fraction=problem.chunk_fraction, reach=self.reach, deadline=bounds_by)
        self.k_certificate = None
        self.crash = None
        self.stops = []  # (phase, why its solve stopped)
        self.stats = {"workers": workers, "seed": problem.seed, "time_limit_s": self.limit,
                      "sum_squares": "not minimised", "contained": CONTAINED}
        if self.import_s > 0.01:
            self.stats["import_s"] = round(self.import_s, 3)
        scale = (1, 1)
        self.live = get_model(problem.memory).terms(self.table).live
        if self.live is not None:
            scale = activation_scale(problem.chunk_fraction, int(self.live.sum()), problem.capacity)
            if scale is not None:
                self.stats["activation_scale"] = f"{scale[0]}/{scale[1]}"
        self.scale = scale

    def remaining(self):
        """Seconds left for building and solving (the call's deadline less the finishing and teardown reserves)."""
        return self.solving.remaining() - self.teardown_s

    def hints(self):
        """Phase 0: the best start (fewest groups, then smallest bottleneck), or None."""
        problem = self.problem
        starts = _starts(self.table, problem.capacity, problem.memory, problem.chunk_fraction, problem.k,
                         problem.seed, problem.flops, deadline=self.deadline.at_share(HINT_SHARE),
                         intervals=problem.intervals(), first_by=self.solving)
        best = None
        for name, groups in starts:
            key = (len(groups), self.bottleneck(groups))
            if best is None or key < best[0]:
                best = (key, name, groups)
        self.stats["hint"] = f"{best[1]}, k={best[0][0]}" if best else "none"
        self.stats["hint_s"] = round(self.problem.elapsed(), 3)
        return best[2] if best else None

    def bottleneck(self, groups):
        return _bottleneck(self.table, groups, self.problem.memory, self.problem.chunk_fraction, self.problem.flops)

    def build(self, phase, groups, share, hint=None, **options):
        """The model for `groups` groups, hinted with `hint` (groups), or None when it cannot be built in time.

        The build may use `share` of the remaining time: its size is
        estimated first (`_model_cells`) and the build, hints included, is
        abandoned when the clock passes its budget (`BuildTimeout`); either
        way stats say so.
        """
        problem = self.problem
        earliest, latest = _domains(self.table.n, groups, self.head_tail)
        budget = self.solving.within(share)
        cells = _model_cells(self.table, self.live is not None, groups, earliest, latest)
        if cells * (BUILD_S_PER_CELL if self.live is not None else BUILD_S_PER_CELL_NO_LIVE) > budget.limit_s:
            self.stats[phase] = (f"skipped: a model of ~{cells} cells would not be built within "
                                 f"{max(budget.limit_s, 0):.3g} s of the time limit")
            return None
        from ..progress import task  # progress of the build and solve phases (a no-op without a reporter)
        try:
            with task(f"CP-SAT {phase}: building a {groups}-group model"):
                model = Model(self.table, problem.capacity, problem.memory, self.scale, groups, earliest, latest,
                              self.reach, deadline=budget, **options)
                if hint is not None:
                    model.hint(_part_from(hint, self.table.n))
        except BuildTimeout:
            self.stats[phase] = f"skipped: the model (~{cells} cells) was not built within {budget.limit_s:.3g} s"
            return None
        self.stats[f"{phase}_build_s"] = round(budget.elapsed(), 3)
        per_cell = TEARDOWN_S_PER_CELL if self.live is not None else TEARDOWN_S_PER_CELL / 10
        self.teardown_s = max(self.teardown_s, cells * per_cell)
        return model

    def solve(self, model, phase, time_limit_s, parameters=SEARCH, *, feasible=False):
        """Solve `model` in a contained child, for at most `time_limit_s` and never past the solving deadline.

        A search solve (`SEARCH`) with an objective also stops when it stalls
        (`stall_s`).  After a backend crash, or an INFEASIBLE answer although a plan of the
        model is known (`feasible`), the solve is retried once with `CERTIFY`
        (no presolve, no LP, one worker), if time is left.
        """
        from ..progress import task  # the solve runs in a forked child: the parent reports its phase and time
        # CP-SAT unwinds its workers after its limit (0.1-0.2 s past it on a loaded 2-core machine), then the
        # child reads back, sends and exits (tens of ms for thousands of nodes): both within the margin.
        time_limit_s = min(time_limit_s, self.remaining() - (0.15 + 2.5e-5 * self.table.n))
        if time_limit_s <= 0.0:
            self.stats[f"{phase}_solve"] = "skipped: no time left"
            return {"status": "skipped"}
        stall = self.stall_s if parameters is SEARCH and model.has_objective else None
        if parameters is SEARCH and model.hinted and self.live is not None:
            parameters = SEARCH_FROM_HINT  # presolve would lose the hint (`SEARCH_FROM_HINT`)
        self.stats.setdefault("setup_s", round(self.deadline.elapsed(), 3))  # seconds before the first search starts
        with task(f"CP-SAT {phase}: solving (limit {time_limit_s:.3g} s)"):
            result = model.solve(time_limit_s, self.workers, self.problem.seed, parameters, stall_s=stall,
                                 kill_after_s=self.remaining())
        if "stop_reason" in result:
            self.stops.append((phase, result["stop_reason"]))
        retry = None
        if result["status"] == "CRASHED":
            self.crash = f"{phase}: {result['crash']}"
            self.stats["backend_crash"] = self.crash
            retry = "after the crash"
        elif result["status"] == "INFEASIBLE" and feasible:
            self.stats[f"{phase}_refuted"] = "INFEASIBLE although a plan of the model is known"
            retry = "after a refuted INFEASIBLE"
        if retry and parameters is not CERTIFY and self.remaining() > 0.05:
            result = model.solve(self.remaining() * 0.5, 1, self.problem.seed, CERTIFY,
                                 kill_after_s=self.remaining())
            self.stats[f"{phase}_retry"] = f"without presolve and LP {retry}: {result['status']}"
        self.stats[f"{phase}_overhead_s"] = round(result.get("overhead_s", 0.0), 4)
        return result

    def plan(self, groups, why, status=Status.FEASIBLE, lower=None):
        """The final Plan of `groups` (re-checked), or an UNKNOWN plan saying `why` there is none."""
        problem = self.problem
        lower = self.lower if lower is None else lower
        if groups is None:
            return no_plan(problem, "cpsat", Status.UNKNOWN, self._reason(why), lower=lower, stats=self.stats)
        self.stats["gap"] = len(groups) - lower
        self.stats.setdefault("bottleneck_optimal", False)
        self.stats["stop_reason"] = self._stop_reason(groups, status, lower)
        plan = finish(problem, "cpsat", groups, status=status, lower=lower, stats=self.stats)
        report = check(plan)
        if not report.ok:  # a solver bug: never hand out a plan the checker rejects
            raise AssertionError(f"cpsat produced a plan the checker rejects: {report.violations[0]}")
        if self.crash:
            plan = replace(plan, reason=self._reason("the plan is the best one found without it, re-checked"))
        return plan

    def _stop_reason(self, groups, status, lower):
        """Why the call ended: everything proved, a stalled solve, or the time limit."""
        if self.stats.get("bottleneck_optimal") and (self.problem.k is not None or len(groups) == lower):
            return "proved"
        stalls = [why for _, why in self.stops if why.startswith("stall")]
        if stalls and not any(why == "time limit" for _, why in self.stops):
            return stalls[-1]
        skipped = [phase for phase in ("phase1", "phase2")
                   if str(self.stats.get(phase, "")).startswith(("skipped: a model of", "skipped: the model"))]
        if skipped:
            return (f"the model is too large for the time limit ({self.limit:g} s): {' and '.join(skipped)} "
                    "skipped, not built in the time left")
        return f"time limit ({self.limit:g} s)"

    def _reason(self, why):
        return f"the CP-SAT backend crashed ({self.crash}); {why}" if self.crash else why


#: Share of the time limit after which no further hint order is tried.
HINT_SHARE = 0.3


#: A search solve stops when neither its incumbent nor its bound moved for
#: max(`STALL_MIN_S`, `STALL_SHARE` × the call's limit) seconds.
STALL_MIN_S = 1.0
STALL_SHARE = 0.2


def stall_s(limit_s):
    """The stall window of a call with time limit `limit_s` (module notes).

    >>> stall_s(2.0), stall_s(10.0), stall_s(30.0)
    (1.0, 2.0, 6.0)
    """
    return max(STALL_MIN_S, STALL_SHARE * float(limit_s))



#: Seconds per model cell (one Boolean with its clauses) of `Model`'s build, measured on a
#: loaded 2-core machine; only used to skip builds that clearly cannot fit in the time limit.
BUILD_S_PER_CELL = 2e-5

#: The same for a model without a live term (additive): no live flags, ~10× cheaper per cell (the
#: 145-group model of the 2,000-node tight dag-layered additive instance, ~650k cells, builds in 0.75 s).
BUILD_S_PER_CELL_NO_LIVE = 2.5e-6

#: Seconds per model cell to free a built model (its Python objects): ~1.5 µs with a live term (0.19 s
#: for the 133k-cell model of the 500-node tight dag-layered liveness instance), twice that kept in
#: reserve; a tenth of it without a live term.  The largest model built is kept off the solving time.
TEARDOWN_S_PER_CELL = 3e-6


def _model_cells(table, has_live, groups, earliest, latest):
    """An estimate of `Model`'s size: domain cells, precedence cells and (a model with a live term) live cells."""
    domain = (np.minimum(latest, groups - 1) - earliest + 1).astype(np.int64)
    cells = 2 * int(domain.sum()) + len(table.sources) * groups
    if has_live:
        degree = np.bincount(table.sources, minlength=table.n)
        cells += int((domain * (1 + degree)).sum())
    return cells


def _fewest_groups(search, best_groups):
    """Phase 1: the fewest groups; the groups (k certified or not), or a Plan without groups."""
    stats, n = search.stats, search.table.n
    upper = len(best_groups) if best_groups else n
    if best_groups and upper == search.lower:
        stats["phase1"] = "skipped: the hint meets the lower bound"
        search.lower, stats["k_certificate"] = upper, "equals the lower bound"
        stats["k_proved_s"] = round(search.problem.elapsed(), 3)
        return best_groups
    model = search.build("phase1", upper, 0.5, hint=best_groups, exact_k=False, minimum_groups=search.lower)
    if model is None:
        return best_groups if best_groups else search.plan(None, f"{stats['phase1']}; no hint either")
    result = search.solve(model, "phase1", 0.7 * search.remaining(), feasible=best_groups is not None)
    stats["phase1"], stats["phase1_wall_s"] = result["status"], round(result.get("wall_s", 0.0), 3)
    if result["status"] == "INFEASIBLE" and best_groups is None:  # with a plan in hand it is a backend error
        found = _recheck_infeasible(search, "phase1", upper, exact_k=False, minimum_groups=search.lower)
        if found is True:
            return no_plan(search.problem, "cpsat", Status.INFEASIBLE,
                           "no valid grouping fits: activations passing through every order overflow the capacity",
                           lower=search.lower, stats=stats)
        best_groups = _better(search, best_groups, found)
    elif "part" in result:
        best_groups = _better(search, best_groups, _groups_of(result["part"]))
    if best_groups is None:
        return search.plan(None, f"time ran out ({search.limit:g} s) before CP-SAT found a plan")
    stats["phase1_bound_uncertified"] = result.get("bound")
    if result["status"] == "OPTIMAL":
        best_groups = _certify_k(search, best_groups)
    return best_groups


def _better(search, groups, found):
    """`found` (rebalanced by dp on its own order) when it has fewer groups than `groups`."""
    if not found or (groups is not None and len(found) >= len(groups)):
        return groups
    problem = search.problem
    if search.remaining() < DP_S_PER_NODE * search.table.n:  # no time to rebalance: the plan as found
        return found
    order = [v for group in found for v in group]
    return cut_order(search.table, order, problem.capacity, problem.memory, problem.chunk_fraction, None,
                     problem.flops) or found


def _recheck_infeasible(search, phase, groups, **options):
    """Re-solve an INFEASIBLE answer with `CERTIFY`: True (confirmed), the groups it found, or None."""
    model = search.build(f"{phase}_recheck", groups, 0.5, objective=False, **options)
    if model is None:
        return None
    result = search.solve(model, f"{phase}_recheck", search.remaining(), CERTIFY)
    search.stats[f"{phase}_recheck"] = result["status"]
    if result["status"] == "INFEASIBLE":
        return True
    return _groups_of(result["part"]) if "part" in result else None


def _certify_k(search, groups):
    """Re-prove that no plan has fewer groups than `groups`; the groups to keep.

    Certified when k meets the independent lower bound, or when a decision
    model "at most k − 1 groups" solved with `CERTIFY` is infeasible.  Then
    ``search.lower`` becomes k.  A plan that decision finds (CP-SAT's
    OPTIMAL was wrong) replaces `groups`, uncertified.
    """
    stats, k = search.stats, len(groups)
    if k == search.lower:
        how = "equals the lower bound"
    else:
        model = search.build("k_certificate", k - 1, 0.5, exact_k=False, minimum_groups=search.lower,
                             objective=False)
        result = search.solve(model, "k_certificate", search.remaining(), CERTIFY) if model else {"status": "skipped"}
        if result["status"] != "INFEASIBLE":
            stats["k_certificate"] = f"not re-proved ({result['status']}): k is not claimed minimal"
            if "part" in result:
                stats["k_certificate"] = "refuted: a plan with fewer groups exists"
                return _better(search, groups, _groups_of(result["part"]))
            return groups
        how = "re-proved: at most k - 1 groups is infeasible without presolve and LP"
    stats["k_certificate"], search.lower = how, k
    stats["k_proved_s"] = round(search.problem.elapsed(), 3)
    return groups


def _bottleneck_floor(search, target):
    """An independent lower bound on the bottleneck with `target` groups (bytes, or flops)."""
    problem = search.problem
    if problem.flops is not None:
        return max(int(problem.flops.max()), -(-int(problem.flops.sum()) // target))
    return max(int(alone_sizes(problem).max()),
               -(-forced_bytes(search.table, memory=problem.memory, chunk_fraction=problem.chunk_fraction) // target))


def _smallest_bottleneck(search, target, groups):
    """Phase 2: the smallest bottleneck with exactly `target` groups; the final Plan."""
    problem, stats, n = search.problem, search.stats, search.table.n
    low = _bottleneck_floor(search, target)
    options = dict(exact_k=True, bottleneck_low=low, flops=None if problem.flops is None else problem.flops.tolist())
    model = search.build("phase2", target, 0.6, hint=groups, **options) if search.remaining() > 0.05 else None
    if model is None:
        stats.setdefault("phase2", "skipped: no time left")
        return _final(search, target, groups, low, certified=False)
    result = search.solve(model, "phase2", 0.7 * search.remaining(), feasible=groups is not None)
    stats["phase2"], stats["phase2_wall_s"] = result["status"], round(result.get("wall_s", 0.0), 3)
    stats["phase2_bound_uncertified"] = result.get("bound")
    if result["status"] == "INFEASIBLE" and problem.k is not None and groups is None:
        found = _recheck_infeasible(search, "phase2", target, **options)
        if found is True:
            return no_plan(problem, "cpsat", Status.INFEASIBLE,
                           f"no valid grouping has exactly k = {problem.k} groups within the capacity",
                           lower=search.lower, stats=stats)
        stats["phase2"] = f"INFEASIBLE, not confirmed by the re-check ({stats.get('phase2_recheck', 'skipped')})"
        if found is not None and len(found) == target:
            groups = found
        result = {"status": "UNKNOWN"}
    if "part" in result:
        found = _groups_of(result["part"])
        if len(found) == target and (groups is None or search.bottleneck(found) <= search.bottleneck(groups)):
            groups = found
    certified = result["status"] == "OPTIMAL" and groups is not None
    del model  # freed now, within the solving time (`TEARDOWN_S_PER_CELL`), not after the plan is assembled
    if certified:
        groups, certified = _certify_bottleneck(search, target, groups, low, options)
    return _final(search, target, groups, low, certified)


def _certify_bottleneck(search, target, groups, low, options):
    """Re-prove the bottleneck B of `groups`: B ≤ the floor, or "bottleneck ≤ B − 1" infeasible under `CERTIFY`.

    A better plan that the decision model finds replaces `groups`, and the
    proof is tried again for it.  Returns (groups, certified).
    """
    stats = search.stats
    while True:
        value = search.bottleneck(groups)
        if value <= low:
            stats["bottleneck_certificate"] = "equals the lower bound"
            return groups, True
        model = search.build("bottleneck_certificate", target, 0.5, **{**options, "objective": False},
                             bottleneck_high=value - 1)
        result = (search.solve(model, "bottleneck_certificate", search.remaining(), CERTIFY) if model
                  else {"status": "skipped"})
        if result["status"] == "INFEASIBLE":
            stats["bottleneck_certificate"] = "re-proved: bottleneck - 1 is infeasible without presolve and LP"
            return groups, True
        found = _groups_of(result["part"]) if "part" in result else None
        if not found or len(found) != target or search.bottleneck(found) >= value:
            stats["bottleneck_certificate"] = f"not re-proved ({result['status']}): the bottleneck is not claimed minimal"
            return groups, False
        stats["bottleneck_refuted"] = f"CP-SAT's optimum {value} was beaten by {search.bottleneck(found)}"
        groups = found


def _final(search, target, groups, low, certified):
    """The Plan with exactly `target` groups, its bottleneck claim and its bound."""
    problem, stats = search.problem, search.stats
    if groups is None:
        return search.plan(None, f"time ran out ({search.limit:g} s) before CP-SAT found a plan with k = {target}")
    stats["bottleneck_optimal"] = certified
    stats["bottleneck_bound"] = search.bottleneck(groups) if certified else low
    if problem.k is not None:
        status = Status.OPTIMAL if certified else Status.FEASIBLE
    else:
        status = Status.OPTIMAL if len(groups) == search.lower else Status.FEASIBLE
    return search.plan(groups, "", status=status)
