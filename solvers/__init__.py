"""Partitioning solvers, all with one signature and one result type.

``solver(graph, capacity, *, memory="liveness", chunk_fraction=1.0, k=None,
time_limit_s=None, seed=0) -> Plan``

`SOLVERS` maps each name to its function; `cachefit.plan` looks solvers up
there.  A solver validates its input, never mutates the graph, and reports
infeasibility as a status, never as an exception.
"""

from .bounds import lower_bound
from .brute import brute
from .greedy import greedy
from ._common import Problem

__all__ = ["SOLVERS", "auto", "brute", "greedy", "lower_bound"]


def auto(graph, capacity, *, memory="liveness", chunk_fraction=1.0, k=None, time_limit_s=None, seed=0):
    """Pick a solver for the graph: greedy for chains and DAGs (until exact solvers are registered).

    The plan's ``stats["auto"]`` names the solver that ran.
    """
    plan = greedy(graph, capacity, memory=memory, chunk_fraction=chunk_fraction, k=k,
                  time_limit_s=time_limit_s, seed=seed)
    return plan.with_stats(auto="greedy")


#: Every registered solver by name.
SOLVERS = {
    "greedy": greedy,
    "brute": brute,
    "auto": auto,
}
