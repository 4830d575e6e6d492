"""Search for DAG groupings: exact over cuts when the graph is narrow, else list scheduling and window repacking.

``search(graph, capacity, *, memory, chunk_fraction, k, time_limit_s, seed, balance)``
follows every solver's contract (`cachefit.solvers`).  It first runs the
exact breadth-first search over cuts (`cachefit.solvers.cuts`) within a
share of the time limit: on narrow graphs (sequential models with residual
and branch blocks) that proves the fewest groups outright.  Otherwise it
looks for a plan with fewer groups than the given node order allows and
stops as soon as k meets the proven lower bound
(`cachefit.solvers.bounds.lower_bound`), when the search stalls, or at the
time limit, whichever comes first; ``stats["stop_reason"]`` says which.

Notes
-----
A plan is a sequence of groups, each a set of nodes whose predecessors lie in
the same or earlier groups.  Its size under any memory model depends only
on which nodes lie before the group, in it and after it: for liveness, the
live set of group p is its members plus every earlier node with a successor
in group p or later.  Two consequences drive the search.

*Construction* (`ListScheduler.pack`): groups are filled one at a time from the
*ready* nodes (all predecessors placed) in the order of a priority, a node
joining the open group when it fits; a node made ready by a member may join
the same group; the group closes when no ready node fits.  Sizes are exact
(the memory engine's `cachefit.memory.OpenGroup`, integer arithmetic),
because the live set carried into the open group (earlier nodes with an
unplaced successor) is fixed while the group grows.  Priorities: the node order, the
heaviest path to a sink, the largest item, and random ones, each with and
without a preference for nodes that free live activations (the last
unplaced consumer of a carried output).

*Window repacking* (large-neighbourhood search): take w consecutive groups
i..i+w−1 of the incumbent and repack their nodes with a random priority,
starting from the same carried state.  The set of nodes before group i and
after group i+w−1 is unchanged, so every other group keeps its size exactly
(its live set is decided by which nodes lie before, in and after it); a
repacking into fewer than w groups therefore lowers k, and one into w groups
whose Σ S² is at least the old one is accepted as a sideways move that
pushes free bytes towards the window's end, where a later window can use
them.

*Exact windows* (``exact_windows=True``, what `auto` asks for on large
DAGs): once the window repacking stalls, CP-SAT repacks windows exactly
(`cachefit.solvers._window`), from the same incumbent, until k meets the
bound, the windows stall too, or the time is spent.

The best plan is finally re-cut by `cachefit.solvers.dp` on its own node
order (never more groups: its groups are contiguous runs of that order),
which balances it, and is returned through the common `finish`, so its sizes
are recomputed by `cachefit.memory` and the plan is OPTIMAL only when k
meets the lower bound.  Deterministic for a fixed `seed` whenever the time
limit is not what stops it (the stall rule counts attempts, not seconds).
"""

from __future__ import annotations

import logging

import numpy as np

from ..memory import group_sizes
from ..result import Status
from ._common import Problem, check_k, finish, no_plan, refuse
from ._deadline import Deadline, finish_reserve
from ._schedule import DP_S_PER_NODE, Incumbent, ListScheduler, cut_order
from ._window import repack_windows
from .bounds import BOUNDS_SHARE, item_sizes, lower_bound
from .cpsat import activation_scale
from .cuts import MAX_CUT_STATES, fewest_groups
from .greedy import greedy_bounds

__all__ = ["search", "DEFAULT_SEARCH_LIMIT_S", "STALL_ATTEMPTS", "CUTS_SHARE"]

logger = logging.getLogger(__name__)

#: Time limit of a search when none is given (seconds).
DEFAULT_SEARCH_LIMIT_S = 10.0

#: The share of the time limit the exact search over cuts may take before the heuristics run.
CUTS_SHARE = 0.75

#: The search over cuts gives up beyond this many down-sets per node (narrow graphs need a few).
CUT_STATES_PER_NODE = 20

#: ... and beyond this many (down-set, group) pairs per node (about 150 on series-parallel graphs).
CUT_ARCS_PER_NODE = 400

#: The search stops after this many window repackings in a row without a better plan.
STALL_ATTEMPTS = 3000

#: Share of the time limit kept for the final rebalancing by dp (skipped, not late, when the time is gone;
#: when dp is not expected to fit in it (`DP_S_PER_NODE`), the repackings keep it).
REBALANCE_SHARE = 0.2


def _priorities(table, items, rng, count):
    """Named priority vectors for the initial constructions (module notes)."""
    n = table.n
    tail = items.tolist()  # heaviest item sum on a path from v to a sink
    successors = table.successors()
    for v in range(n - 1, -1, -1):
        tail[v] += max((tail[z] for z in successors[v]), default=0)
    rules = {"order": [-v for v in range(n)], "critical path": tail, "largest": items.tolist()}
    for index in range(count):
        rules[f"random {index}"] = rng.random(n).tolist()
    return rules


def _recut(problem, groups, k, deadline):
    """dp's balanced groups on the node order of `groups` (k groups, or the fewest), or None (`cut_order`).

    Its Σ S² stage stops at `deadline` (less the time the plan's assembly needs).
    """
    return cut_order(problem.table, [v for group in groups for v in group], problem.capacity, problem.memory,
                     problem.chunk_fraction, k, problem.flops,
                     deadline.reserve(finish_reserve(problem.table.n, deadline.limit_s)))


def _greedy_groups(problem):
    """Greedy's fewest groups of the given node order (lists of positions), or None when the order cannot fit."""
    bounds, _ = greedy_bounds(problem.intervals(), problem.capacity)
    if bounds is None:
        return None
    return [list(range(s, e)) for s, e in zip(bounds[:-1].tolist(), bounds[1:].tolist())]


def _construct(problem, packer, rng, deadline):
    """The best initial plan: dp on the given order and list schedules under several priorities.

    Returns (name, groups, sizes) with the fewest groups (then the smallest
    bottleneck), or None when none was found.
    """
    table = problem.table
    candidates = []
    given = _greedy_groups(problem)  # cheap; the final plan is rebalanced by dp when time allows
    if given is not None:
        candidates.append(("greedy on the given order", given))
    items, _ = item_sizes(table, memory=problem.memory, chunk_fraction=problem.chunk_fraction)
    rules = ("fit", "free") if packer.has_live else ("fit",)
    for name, priority in _priorities(table, items, rng, 4).items():
        for rule in rules:
            if deadline.expired() and candidates:
                break
            packed = packer.pack(list(range(table.n)), {}, priority, rule, deadline=None if not candidates else deadline)
            if packed is not None:
                candidates.append((f"list schedule ({name}{', freeing first' if rule == 'free' else ''})",
                                   packed[0]))
    if not candidates:
        return None
    fewest = min(len(groups) for _, groups in candidates)
    scored = []
    for name, groups in candidates:
        if len(groups) == fewest:  # sizes (O(n + e) each) only for the ties on k
            sizes = _sizes(problem, groups)
            scored.append(((len(groups), max(sizes)), name, groups, sizes))
    scored.sort(key=lambda entry: entry[0])
    _, name, groups, sizes = scored[0]
    return name, groups, sizes


def _sizes(problem, groups):
    ids = problem.table.ids
    return group_sizes(problem.table, [[ids[v] for v in group] for group in groups], memory=problem.memory,
                       chunk_fraction=problem.chunk_fraction)


#: The most consecutive groups one repacking takes.
MAX_WINDOW = 6


def _window_priority(incumbent, start, width, rng):
    """A random priority: the incumbent's own order with noise of a random spread, or none of it."""
    n = incumbent.packer.table.n
    spread = float(rng.choice([1.0, 4.0, 16.0, 0.0]))
    if spread == 0.0:
        return rng.random(n).tolist()
    priority = np.zeros(n)
    nodes = [v for group in incumbent.groups[start:start + width] for v in group]
    priority[nodes] = -np.arange(len(nodes)) + spread * rng.standard_normal(len(nodes))
    return priority.tolist()


#: The packing rules a window repacking draws from (`ListScheduler.pack`); "free" only for a model with a live term.
_RULES = ("fit", "free", "strict")


def _improve(incumbent, rng, deadline, lower, stall_attempts, liveness):
    """Window repacking until k meets `lower`, `stall_attempts` tries in a row fail, or the deadline.

    Returns (stop reason, attempts, improvements).
    """
    n = incumbent.packer.table.n
    attempts = improvements = since = 0
    while True:
        if incumbent.k <= lower:
            return "k meets the lower bound", attempts, improvements
        if since >= stall_attempts:
            return f"stalled: {since} window repackings in a row without fewer groups", attempts, improvements
        if deadline.expired():
            return "time limit", attempts, improvements
        width = int(rng.integers(2, min(MAX_WINDOW, incumbent.k) + 1))
        start = int(rng.integers(0, incumbent.k - width + 1))
        priority = _window_priority(incumbent, start, width, rng)
        rule = str(rng.choice(_RULES)) if liveness else str(rng.choice(_RULES[::2]))
        attempts += 1
        since += 1
        if incumbent.try_window(start, width, priority, rule):
            improvements += 1
            since = 0


def search(graph, capacity, *, memory="liveness", chunk_fraction=1.0, k=None, time_limit_s=None, seed=0,
           balance="memory", stall_attempts=STALL_ATTEMPTS, cuts=True, exact_windows=False, deadline=None):
    """A DAG grouping by list scheduling and window repacking (module notes).

    Parameters
    ----------
    graph : networkx.DiGraph or LayerTable
    capacity : int, str
        C in bytes, a byte string or a device name.
    memory : str
        A name in `cachefit.memory.MODELS`.
    chunk_fraction : float in (0, 1]
    k : int, optional
        Exactly k groups, balanced by dp on the best plan's order; default the fewest found.
    time_limit_s : float, optional
        Wall-clock limit for the whole call (default `DEFAULT_SEARCH_LIMIT_S`).
    seed : int
        Seed of the random priorities and windows.
    balance : {"memory", "flops"}
        What dp balances on the final order.
    stall_attempts : int
        Stop after this many window repackings in a row without fewer groups.
    cuts : bool
        First try the exact search over cuts (`cachefit.solvers.cuts`), for
        at most `CUTS_SHARE` of the time limit; it proves k on narrow graphs
        and gives up quickly on wide ones.
    exact_windows : bool
        When the window repacking stalls, go on with exact window repacking
        by CP-SAT (`cachefit.solvers._window`) until k meets the lower
        bound, the windows stall, or the time is spent (what `auto` does on
        DAGs whose whole CP-SAT model is large); ``stats["exact_windows"]``
        says what they did.
    deadline : Deadline, optional
        A `cachefit.solvers._deadline.Deadline` that replaces `time_limit_s`
        (`auto` shares one between its solvers; tests inject a clock).

    Returns
    -------
    Plan
        OPTIMAL when k meets the lower bound or the search over cuts proved
        it, else FEASIBLE; ``stats`` holds
        the starting plan (``start``, ``start_k``), the repackings tried and
        the ones that removed a group, and ``stop_reason``.

    Notes
    -----
    Each construction is O(n · r) size evaluations for r ready nodes; each
    window repacking O(n) plus the window's nodes times its ready nodes.

    References
    ----------
    A. Scholl and C. Becker, "State-of-the-art exact and heuristic solution
    procedures for simple assembly line balancing", EJOR 168 (2006) 666–693
    (priority-rule list scheduling); P. Shaw, "Using constraint programming
    and local search methods to solve vehicle routing problems", CP 1998
    (large-neighbourhood search).

    Examples
    --------
    >>> import networkx as nx
    >>> g = nx.DiGraph()
    >>> for name, weight in zip("abcd", (10, 30, 50, 20)):
    ...     g.add_node(name, weight_bytes=weight, activation_bytes=0, buffer_bytes=0)
    >>> g.add_edges_from([("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")])
    >>> plan = search(g, 60, memory="additive")
    >>> plan.k, plan.status, plan.stats["stop_reason"]
    (2, <Status.OPTIMAL: 'OPTIMAL'>, 'the search over cuts proved k')
    """
    problem = Problem.make(graph, capacity, memory=memory, chunk_fraction=chunk_fraction, k=k,
                           time_limit_s=time_limit_s, seed=seed, balance=balance)
    refused = refuse(problem, "search")
    if refused:
        return refused
    table = problem.table
    if table.n == 0:
        return finish(problem, "search", [], lower=0, stats={"stop_reason": "empty graph"})
    if deadline is None:
        deadline = Deadline(float(problem.time_limit_s or DEFAULT_SEARCH_LIMIT_S), start=problem.started)
    else:  # the shares of the phases are of the time this call has
        deadline = deadline.within(1.0)
    limit = deadline.limit_s
    lower = lower_bound(table, problem.capacity, memory=problem.memory, chunk_fraction=problem.chunk_fraction,
                        deadline=deadline.at_share(BOUNDS_SHARE))
    reason = check_k(problem, lower)
    if reason:
        return no_plan(problem, "search", Status.INFEASIBLE, reason, lower=lower)
    exact = None
    if cuts:
        exact = fewest_groups(table, problem.capacity, memory=problem.memory, chunk_fraction=problem.chunk_fraction,
                              max_states=min(MAX_CUT_STATES, CUT_STATES_PER_NODE * table.n),
                              max_arcs=CUT_ARCS_PER_NODE * table.n, deadline=deadline.at_share(CUTS_SHARE))
    if exact is not None:
        return _from_cuts(problem, exact, lower, deadline)
    rng = np.random.default_rng(problem.seed)
    packer = ListScheduler(table, problem.capacity, problem.memory, problem.chunk_fraction)
    # The rest is for dp's rebalancing, unless dp cannot fit in it: then half of it for assembling the plan
    # (a window repacking and the plan's sizes can take tens of ms on a loaded machine).
    rebalances = problem.k is not None or REBALANCE_SHARE * limit >= DP_S_PER_NODE * table.n
    reserve = REBALANCE_SHARE * limit if rebalances else max(finish_reserve(table.n, limit), REBALANCE_SHARE * limit / 2)
    if exact_windows and rebalances:  # the exact windows use the time dp is not expected to need
        reserve = min(reserve, DP_S_PER_NODE * table.n + finish_reserve(table.n, limit) + 0.1)
    search_deadline = deadline.reserve(reserve)
    setup_s = deadline.elapsed()  # bounds and the search over cuts: before the first plan is searched for
    start = _construct(problem, packer, rng, search_deadline)
    if start is None:
        return no_plan(problem, "search", Status.UNKNOWN,
                       "no construction found a plan (live activations overflow every order tried)", lower=lower)
    name, groups, sizes = start
    incumbent = Incumbent(packer, groups, sizes)
    stop, attempts, improvements = _improve(incumbent, rng, search_deadline, max(lower, problem.k or 0),
                                            stall_attempts, packer.has_live)
    if problem.k is not None and problem.k > lower and stop == "k meets the lower bound":
        stop = f"k meets the k asked for ({problem.k})"
    stats = {"start": name, "start_k": len(groups), "windows": attempts, "windows_improved": improvements,
             "stop_reason": stop, "seed": problem.seed, "time_limit_s": limit,
             "cuts": "gave up: too wide for the time or state budget",
             "setup_s": round(setup_s, 3)}
    if exact_windows and stop.startswith("stalled"):
        stats.update(_exact_windows(problem, incumbent, max(lower, problem.k or 0), search_deadline))
    logger.info("search: k %d -> %d (bound %d): %s", len(groups), incumbent.k, lower, stop)
    if problem.k is not None and incumbent.k > problem.k:
        return no_plan(problem, "search", Status.UNKNOWN,
                       f"k = {problem.k}: the search found no plan with fewer than {incumbent.k} groups",
                       lower=lower, stats=stats)
    # dp rebalances the plan's order (and splits it into an explicit k); with the time gone, a k=None plan is
    # returned as found rather than late.
    rebalance = problem.k is not None or (rebalances and deadline.remaining() > DP_S_PER_NODE * table.n)
    final = _recut(problem, incumbent.groups, problem.k, deadline) if rebalance else None
    stats["rebalanced"] = final is not None
    if final is None or (problem.k is None and len(final) > incumbent.k):
        final = incumbent.groups
    return finish(problem, "search", final, lower=lower, stats=stats)


def _exact_windows(problem, incumbent, lower, deadline):
    """Exact window repacking after the heuristic one stalled; the stats it adds (``exact_windows``, ``stop_reason``)."""
    live = incumbent.packer.live
    scale = activation_scale(problem.chunk_fraction, sum(live), problem.capacity) if incumbent.packer.has_live else (1, 1)
    if scale is None:
        return {"exact_windows": f"skipped: chunk_fraction {problem.chunk_fraction!r} has no exact small-integer "
                                 "scaling for CP-SAT"}
    before = incumbent.k
    stats = repack_windows(problem, incumbent, lower, deadline, scale=scale)
    logger.info("search: exact windows: k %d -> %d: %s", before, incumbent.k, stats["stop_reason"])
    return {"exact_windows": {"start_k": before, **stats}, "stop_reason": f"exact windows: {stats['stop_reason']}"}


def _from_cuts(problem, exact, lower, deadline):
    """The plan when the search over cuts finished: k is proved (`cachefit.solvers.cuts`)."""
    stats = {"stop_reason": "the search over cuts proved k", "cut_states": exact.states, "seed": problem.seed,
             "time_limit_s": deadline.limit_s}
    if lower > exact.k:  # the cut search is exact, so this would be a bug in a bound
        raise AssertionError(f"lower bound {lower} exceeds the optimal k = {exact.k} of the search over cuts")
    if problem.k is not None and problem.k < exact.k:
        return no_plan(problem, "search", Status.INFEASIBLE,
                       f"k = {problem.k} is below the minimum number of groups, {exact.k}", lower=exact.k,
                       stats=stats)
    rebalance = problem.k is not None or deadline.remaining() > DP_S_PER_NODE * problem.table.n
    final = _recut(problem, exact.groups, problem.k, deadline) if rebalance else None
    stats["rebalanced"] = final is not None
    if final is None or (problem.k is None and len(final) > exact.k):
        if problem.k is not None:
            return no_plan(problem, "search", Status.UNKNOWN,
                           f"k = {problem.k}: no split of the optimal plan's order into exactly {problem.k} groups",
                           lower=exact.k, stats=stats)
        final = exact.groups
    return finish(problem, "search", final, lower=exact.k, stats=stats)
