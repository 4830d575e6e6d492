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
- ``auto``: dp for chains; for DAGs greedy for an upper bound, then cpsat
  within the time limit.

`compare` runs several solvers on one problem.
"""

from __future__ import annotations

import logging

from ..errors import InputError
from ..memory import as_table
from .bounds import lower_bound
from .brute import MAX_BRUTE_NODES, brute
from .cpsat import DEFAULT_TIME_LIMIT_S, cpsat
from .dp import dp
from .greedy import greedy
from ._common import Problem

__all__ = ["SOLVERS", "auto", "brute", "compare", "cpsat", "dp", "greedy", "lower_bound",
           "AUTO_CPSAT_MAX_CELLS"]

logger = logging.getLogger(__name__)

#: `auto` hands a DAG to cpsat only when (nodes + edges) × greedy's k is at most this
#: (the size of the CP-SAT model); larger DAGs get dp on the given order.
AUTO_CPSAT_MAX_CELLS = 500_000


def auto(graph, capacity, *, memory="liveness", chunk_fraction=1.0, k=None, time_limit_s=None, seed=0,
         balance="memory"):
    """Pick a solver for the graph and run it.

    Chains (and graphs of at most one node) go to ``dp``, which is exact for
    them.  For a DAG, ``greedy`` gives an upper bound, then ``cpsat`` searches
    every valid grouping within `time_limit_s` (default
    `cachefit.solvers.cpsat.DEFAULT_TIME_LIMIT_S`, 10 s); a DAG whose CP-SAT
    model would exceed `AUTO_CPSAT_MAX_CELLS` gets ``dp`` on its node order
    instead.  Parameters and result as for every solver.

    Returns
    -------
    Plan
        The plan of the solver that ran (``plan.solver``);
        ``stats["auto"]`` says which ran and why.  If cpsat ends without a
        plan while greedy has one, greedy's plan is returned.

    Examples
    --------
    >>> from cachefit.graphs import from_layers
    >>> plan = auto(from_layers([40, 30, 20, 50, 10]), 100, memory="additive")
    >>> plan.solver, plan.stats["auto"], plan.sizes
    ('dp', 'dp (chain)', (70, 80))
    """
    options = dict(memory=memory, chunk_fraction=chunk_fraction, k=k, time_limit_s=time_limit_s, seed=seed,
                   balance=balance)
    table = as_table(graph)
    if table.is_chain or table.n <= 1:
        return dp(table, capacity, **options).with_stats(auto="dp (chain)")
    upper = greedy(table, capacity, **options)
    groups = upper.k if upper.ok else (k or table.n)
    cells = (table.n + len(table.sources)) * max(groups, 1)
    if cells > AUTO_CPSAT_MAX_CELLS:
        plan = dp(table, capacity, **options)
        why = f"dp (CP-SAT model too large: {cells} cells > {AUTO_CPSAT_MAX_CELLS})"
    else:
        limit = time_limit_s if time_limit_s is not None else DEFAULT_TIME_LIMIT_S
        plan = cpsat(table, capacity, **{**options, "time_limit_s": limit})
        why = f"cpsat after greedy (upper bound {upper.k if upper.ok else 'none'}), limit {limit:g} s"
    if not plan.ok and upper.ok and plan.status != "INFEASIBLE":
        return upper.with_stats(auto=f"greedy ({plan.solver} found no plan: {plan.reason})")
    return plan.with_stats(auto=why)


#: Every registered solver by name.
SOLVERS = {
    "greedy": greedy,
    "dp": dp,
    "cpsat": cpsat,
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
    [('greedy', 2, (40, 20)), ('dp', 2, (30, 30)), ('cpsat', 2, (30, 30)), ('brute', 2, (30, 30))]
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
