"""Partitioning solvers, all with one signature and one result type.

``solver(graph, capacity, *, memory="liveness", chunk_fraction=1.0, k=None,
time_limit_s=None, seed=0, balance="memory") -> Plan``

``balance="flops"`` minimises the largest group's Σ ``flops`` (node
attribute, 0 where absent) after k instead of its bytes; every group still
fits the capacity in bytes, and ``plan.bottleneck`` stays the largest size
(``stats["bottleneck_flops"]`` holds the flops one).

`SOLVERS` maps each name to its function; `cachefit.plan` looks solvers up
there.  A solver validates its input, never mutates the graph, and reports
infeasibility as a status, never as an exception.

- ``greedy``: one pass over the node order (optimal k for that order).
- ``dp``: balanced partition of the node order (exact for chains).
- ``cpsat``: OR-Tools CP-SAT over every valid grouping of a DAG.
- ``brute``: exhaustive search, n ≤ 12 (the test oracle).
- ``search``: list scheduling and window repacking over every valid grouping
  of a DAG (a heuristic: OPTIMAL only when k meets the lower bound).
- ``auto``: dp for chains; for a DAG whose whole CP-SAT model would be
  large, ``search`` with exact windows (`cachefit.solvers._window`: CP-SAT
  repacks a few consecutive groups at a time); for a smaller DAG ``search``
  first, then cpsat with the time left unless the search has closed the gap.

`compare` runs several solvers on one problem.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from ..errors import InputError
from ..memory import as_table
from ..result import Status
from .bounds import lower_bound
from .brute import MAX_BRUTE_NODES, brute
from .cpsat import DEFAULT_TIME_LIMIT_S, cpsat
from .dp import dp
from .greedy import greedy, greedy_bounds
from .search import search
from ._common import Problem
from ._deadline import Deadline

__all__ = ["SOLVERS", "auto", "brute", "compare", "cpsat", "dp", "greedy", "lower_bound", "search",
           "AUTO_WINDOWS_CELLS", "AUTO_WINDOWS_STALL_ATTEMPTS", "AUTO_SEARCH_SHARE"]

logger = logging.getLogger(__name__)

#: `auto` gives a DAG to ``search`` with exact windows (`cachefit.solvers._window`) for the whole time limit
#: when its whole CP-SAT model would have more cells than this (`_cells_estimate`); smaller DAGs get
#: ``search``, then ``cpsat``.  On the bench's tight dag-layered instances (n = 250: ~30,000 cells) the
#: windows ended with k 33 and 30 where search then cpsat ended with 34 and 31 (liveness, 10 s).
AUTO_WINDOWS_CELLS = 20_000

#: ... and stops its heuristic window repacking after this many in a row without fewer groups (search's own
#: default is 3,000): the exact windows that follow use the time better (tight dag-layered liveness, 10 s,
#: seed 0: k 159/70/63 against 160/70/64 at n = 2,000/1,000/500; never worse on the others tried).
AUTO_WINDOWS_STALL_ATTEMPTS = 1000

#: The share of `auto`'s time limit the first search may take on a DAG (it stops earlier when it stalls).
AUTO_SEARCH_SHARE = 0.5


def auto(graph, capacity, *, memory="liveness", chunk_fraction=1.0, k=None, time_limit_s=None, seed=0,
         balance="memory", deadline=None):
    """Pick a solver for the graph and run it.

    Chains (and graphs of at most one node) go to ``dp``, which is exact for
    them.  A DAG whose whole CP-SAT model would exceed `AUTO_WINDOWS_CELLS`
    (`_cells_estimate`) goes to ``search`` with ``exact_windows=True`` for
    the whole time limit: its heuristics, then exact window repacking by
    CP-SAT on small models (`cachefit.solvers._window`), stopping when k
    meets the lower bound, the windows stall, or at the limit.  For a
    smaller DAG, ``search`` runs first, for at most `AUTO_SEARCH_SHARE`
    of `time_limit_s` (default `cachefit.solvers.cpsat.DEFAULT_TIME_LIMIT_S`,
    10 s), stopping earlier when k meets the lower bound or it stalls.  When
    its k meets the lower bound, that plan is returned at once.  Otherwise
    ``cpsat`` gets the time left, and the
    better of the two plans is returned (fewer groups, then the smaller
    bottleneck) with the better of their lower bounds.  Parameters and
    result as for every solver.  Both solvers read one
    `cachefit.solvers._deadline.Deadline` (`deadline`, which replaces
    `time_limit_s`, e.g. to inject a clock), so the limit covers the call.

    Returns
    -------
    Plan
        The plan of the solver that found it (``plan.solver``);
        ``stats["auto"]`` says which ran, ``stats["stop_reason"]`` why auto
        stopped.  OPTIMAL when its k meets the best lower bound.

    Examples
    --------
    >>> from cachefit.graphs import from_layers
    >>> plan = auto(from_layers([40, 30, 20, 50, 10]), 100, memory="additive")
    >>> plan.solver, plan.stats["auto"], plan.sizes
    ('dp', 'dp (chain)', (70, 80))
    """
    options = dict(memory=memory, chunk_fraction=chunk_fraction, k=k, seed=seed, balance=balance)
    started = time.perf_counter()
    table = as_table(graph)
    if table.is_chain or table.n <= 1:
        return dp(table, capacity, time_limit_s=time_limit_s, **options).with_stats(
            auto="dp (chain)", stop_reason="dp is exact for a chain")
    problem = Problem.make(table, capacity, time_limit_s=time_limit_s, **options)  # bad input fails here
    if deadline is None:
        deadline = Deadline(float(problem.time_limit_s or DEFAULT_TIME_LIMIT_S), start=started)
    limit = deadline.limit_s
    estimate = _cells_estimate(problem)
    if estimate > AUTO_WINDOWS_CELLS:
        plan = search(table, capacity, time_limit_s=limit, deadline=deadline, exact_windows=True,
                      stall_attempts=AUTO_WINDOWS_STALL_ATTEMPTS, **options)
        why = (f"search with exact windows (the whole CP-SAT model would have ~{estimate} cells "
               f"> {AUTO_WINDOWS_CELLS})")
        return plan.with_stats(auto=why, stop_reason=plan.stats.get("stop_reason", plan.reason or why))
    first = search(table, capacity, time_limit_s=limit, deadline=deadline.at_share(AUTO_SEARCH_SHARE), **options)
    if first.status == "INFEASIBLE" or (first.ok and k is None and first.k <= first.lower_bound):
        why = "search proved infeasible" if not first.ok else "search: k meets the lower bound"
        return first.with_stats(auto=why, stop_reason=first.stats.get("stop_reason", first.reason or why))
    remaining = deadline.remaining()
    if remaining < 0.5:
        return first.with_stats(auto="search (no time left for another solver)",
                                stop_reason=f"time limit ({limit:g} s) after the search")
    # The whole model is small here ((nodes + edges) × search's k ≤ the estimate ≤ AUTO_WINDOWS_CELLS).
    second = cpsat(table, capacity, time_limit_s=limit, deadline=deadline, **options)
    why = f"search ({first.stats.get('stop_reason', first.reason)}), then cpsat for {remaining:.3g} s"
    return _better(first, second, k, started).with_stats(auto=why, stop_reason=_stop_reason(first, second))


def _cells_estimate(problem):
    """(nodes + edges) × the fewest groups of the node order (greedy's k, at least search's): the whole CP-SAT model's size."""
    bounds, _ = greedy_bounds(problem.intervals(), problem.capacity)
    table = problem.table
    groups = table.n if bounds is None else len(bounds) - 1
    return (table.n + len(table.sources)) * max(groups, 1)


def _key(plan):
    """Plans compare by k, then the bottleneck they were balanced for (bytes, or flops)."""
    if not plan.ok:
        return (1, 0, 0)
    return (0, plan.k, plan.stats.get("bottleneck_flops", plan.bottleneck))


def _better(first, second, k, started):
    """The better plan of two runs on one problem, with the better lower bound of the two.

    OPTIMAL when no k was asked for and the plan's k meets that bound.
    """
    best = second if _key(second) < _key(first) else first
    if not best.ok and second.status == "INFEASIBLE":  # a proof that no plan exists beats "none found"
        best = second
    lower = max(first.lower_bound, second.lower_bound)
    if best.ok and lower > best.k:  # a bound above a valid plan's k is a bug in a bound
        raise AssertionError(f"lower bound {lower} exceeds the k = {best.k} of a valid plan")
    status = best.status
    if best.ok and k is None and lower == best.k:
        status = Status.OPTIMAL
    return dataclasses.replace(best, lower_bound=lower, status=status, wall_s=time.perf_counter() - started)


def _stop_reason(first, second):
    plans = [plan for plan in (first, second) if plan.ok]
    best = min(plans, key=_key) if plans else None
    if best is not None and best.k <= max(first.lower_bound, second.lower_bound):
        return "k meets the lower bound"
    if second.solver == "cpsat" and second.status == "OPTIMAL":
        return "cpsat proved its plan"
    searched = f"the search had stopped ({first.stats.get('stop_reason', '')})"
    return f"gap left: cpsat stopped ({second.stats.get('stop_reason', second.reason)}), {searched}"


#: Every registered solver by name.
SOLVERS = {
    "greedy": greedy,
    "dp": dp,
    "cpsat": cpsat,
    "search": search,
    "brute": brute,
    "auto": auto,
}


def compare(graph, capacity, *, solvers=None, **options):
    """Run several solvers on one problem; one Plan each, in the order run.

    Parameters
    ----------
    graph : networkx.DiGraph or LayerTable
    capacity : int or str
    solvers : sequence of str, optional
        Names in `SOLVERS`.  Default: every registered solver except
        ``auto`` (which only repeats one of them), leaving out ``brute`` when
        the graph has more than 12 nodes.
    **options
        Passed to every solver (memory, chunk_fraction, k, time_limit_s, seed, balance).

    Returns
    -------
    list of Plan

    Raises
    ------
    InputError
        An unknown solver name, or invalid input (checked once, up front).

    Examples
    --------
    >>> from cachefit.graphs import from_layers
    >>> plans = compare(from_layers([10] * 6), 40, memory="additive")
    >>> [(p.solver, p.k, p.sizes) for p in plans]
    [('greedy', 2, (40, 20)), ('dp', 2, (30, 30)), ('cpsat', 2, (30, 30)), ('search', 2, (30, 30)), ('brute', 2, (30, 30))]
    """
    if solvers is None:
        names = [name for name in SOLVERS if name != "auto"]
        explicit = False
    else:
        if isinstance(solvers, str):
            solvers = [solvers]
        names = list(solvers)
        unknown = [name for name in names if name not in SOLVERS]
        if unknown:
            raise InputError(f"`solvers` must name solvers in {', '.join(SOLVERS)}, got {unknown[0]!r}")
        explicit = True
    table = as_table(graph)
    Problem.make(table, capacity, memory=options.get("memory", "liveness"),
                 chunk_fraction=options.get("chunk_fraction", 1.0), k=options.get("k"),
                 time_limit_s=options.get("time_limit_s"), seed=options.get("seed", 0),
                 balance=options.get("balance", "memory"))
    plans = []
    for name in names:
        if name == "brute" and table.n > MAX_BRUTE_NODES and not explicit:
            logger.info("compare: brute left out: %d nodes > %d", table.n, MAX_BRUTE_NODES)
            continue
        plans.append(SOLVERS[name](table, capacity, **options))
    return plans
