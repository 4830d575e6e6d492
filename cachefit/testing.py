"""Helpers for testing partitioners: hypothesis strategies for model graphs, and a plan assertion.

`chains` and `dags` draw small model graphs (docs/concepts.md §3) whose sizes are
chosen around a capacity, with zero-byte nodes and exact-fit weights mixed
in, edges only from lower to higher index (acyclic by construction) and
nodes inserted in index order (a topological order).  `assert_valid_plan`
re-checks any plan with the independent checker.  `FakeClock` stands in for the
wall clock of a solver's deadline, so time limits can be tested without
waiting.

Requires hypothesis (``pip install 'cachefit[test]'``).

Examples
--------
>>> from hypothesis import given, settings
>>> import cachefit
>>> from cachefit.testing import assert_valid_plan, dags
>>> @settings(max_examples=5, deadline=None, derandomize=True)
... @given(dags(max_nodes=6, capacity=100))
... def test_greedy_plans_are_valid(graph):
...     assert_valid_plan(graph, cachefit.plan(graph, 100, solver="greedy"))
>>> test_greedy_plans_are_valid()
"""

from __future__ import annotations

try:
    from hypothesis import strategies as st
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("cachefit.testing needs hypothesis: pip install 'cachefit[test]'") from exc

import networkx as nx

from .checker import check
from .errors import InputError

__all__ = ["chains", "dags", "assert_valid_plan", "exact_fit_weights", "FakeClock"]


def exact_fit_weights(capacity):
    """Weights that fill `capacity` exactly alone or in small combinations.

    Examples
    --------
    >>> exact_fit_weights(100)
    [25, 33, 50, 100]
    """
    return sorted({capacity, capacity // 2, capacity - capacity // 2, capacity // 3, capacity // 4} - {0})


def _check_options(capacity, min_nodes, max_nodes, **maxima):
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise InputError(f"`capacity` must be a positive integer of bytes, got {capacity!r}")
    if not (isinstance(min_nodes, int) and isinstance(max_nodes, int) and 0 <= min_nodes <= max_nodes):
        raise InputError(f"`min_nodes` and `max_nodes` must be integers with 0 <= min_nodes <= max_nodes, "
                         f"got {min_nodes!r} and {max_nodes!r}")
    for name, value in maxima.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise InputError(f"`{name}` must be a non-negative integer of bytes or None, got {value!r}")


def _node_bytes(capacity, max_weight, max_activation, max_buffer, zeros, exact_fit):
    """Strategy for one node's (weight, activation, buffer)."""
    max_weight = capacity // 2 if max_weight is None else max_weight
    max_activation = capacity // 4 if max_activation is None else max_activation
    max_buffer = capacity // 4 if max_buffer is None else max_buffer
    weights = [st.integers(min(1, max_weight), max_weight)]
    if zeros:
        weights.append(st.just(0))
    if exact_fit:
        weights.append(st.sampled_from(exact_fit_weights(capacity)))
    return st.tuples(st.one_of(*weights), st.integers(0, max_activation), st.integers(0, max_buffer))


def _graph(node_bytes, edges, name):
    graph = nx.DiGraph(name=name, source="cachefit.testing")
    for index, (weight, activation, buffer) in enumerate(node_bytes):
        graph.add_node(str(index), weight_bytes=weight, activation_bytes=activation, buffer_bytes=buffer)
    graph.add_edges_from((str(u), str(v)) for u, v in edges)
    return graph


@st.composite
def chains(draw, *, min_nodes=0, max_nodes=8, capacity=100, max_weight=None, max_activation=None,
           max_buffer=None, zeros=True, exact_fit=True):
    """Hypothesis strategy for chain graphs (each node feeds the next).

    Parameters
    ----------
    min_nodes, max_nodes : int
        Range of the number of nodes.
    capacity : int
        The capacity the sizes are chosen around (bytes); plan with it.
    max_weight : int, optional
        Largest drawn weight (default capacity // 2); exact-fit weights
        (`exact_fit_weights`) may exceed it.
    max_activation, max_buffer : int, optional
        Largest activation and buffer (default capacity // 4); 0 turns them off.
    zeros : bool
        Mix in zero-weight nodes.
    exact_fit : bool
        Mix in weights that fill the capacity exactly, alone or in pairs.

    Returns
    -------
    hypothesis strategy of networkx.DiGraph
        Nodes ``"0"``, ``"1"``, ... with the three byte attributes.

    Examples
    --------
    >>> from hypothesis import given, settings
    >>> @settings(max_examples=10, deadline=None, derandomize=True)
    ... @given(chains(min_nodes=3, max_nodes=3, capacity=64))
    ... def test_three_node_chains(graph):
    ...     assert list(graph.edges) == [("0", "1"), ("1", "2")]
    ...     assert all(data["weight_bytes"] <= 64 for _, data in graph.nodes(data=True))
    >>> test_three_node_chains()
    """
    _check_options(capacity, min_nodes, max_nodes, max_weight=max_weight, max_activation=max_activation,
                   max_buffer=max_buffer)
    n = draw(st.integers(min_nodes, max_nodes))
    sizes = draw(st.lists(_node_bytes(capacity, max_weight, max_activation, max_buffer, zeros, exact_fit),
                          min_size=n, max_size=n))
    return _graph(sizes, [(i, i + 1) for i in range(n - 1)], f"chain-{n}")


@st.composite
def dags(draw, *, min_nodes=0, max_nodes=8, edge_probability=None, capacity=100, max_weight=None,
         max_activation=None, max_buffer=None, zeros=True, exact_fit=True):
    """Hypothesis strategy for DAGs with edges from lower to higher index.

    Parameters
    ----------
    min_nodes, max_nodes : int
        Range of the number of nodes.
    edge_probability : float in [0, 1], optional
        Chance of each edge i → j (i < j), in steps of 1 %.  Default: drawn
        per graph from 0.15, 0.35 and 0.7, so sparse and dense graphs both
        occur.  Shrinking removes edges.
    capacity, max_weight, max_activation, max_buffer, zeros, exact_fit
        As for `chains`.

    Returns
    -------
    hypothesis strategy of networkx.DiGraph

    Examples
    --------
    >>> from hypothesis import given, settings
    >>> @settings(max_examples=10, deadline=None, derandomize=True)
    ... @given(dags(min_nodes=4, max_nodes=4, edge_probability=1.0))
    ... def test_complete_dags(graph):
    ...     assert graph.number_of_edges() == 6  # every pair i < j
    >>> test_complete_dags()
    """
    _check_options(capacity, min_nodes, max_nodes, max_weight=max_weight, max_activation=max_activation,
                   max_buffer=max_buffer)
    if edge_probability is not None and (isinstance(edge_probability, bool)
                                         or not isinstance(edge_probability, (int, float))
                                         or not 0 <= edge_probability <= 1):
        raise InputError(f"`edge_probability` must be a number in [0, 1] or None, got {edge_probability!r}")
    n = draw(st.integers(min_nodes, max_nodes))
    sizes = draw(st.lists(_node_bytes(capacity, max_weight, max_activation, max_buffer, zeros, exact_fit),
                          min_size=n, max_size=n))
    probability = edge_probability if edge_probability is not None else draw(st.sampled_from([0.15, 0.35, 0.7]))
    cutoff = 100 - round(100 * probability)  # draw >= cutoff: edge; shrinking draws to 0 removes edges
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    draws = draw(st.lists(st.integers(0, 99), min_size=len(pairs), max_size=len(pairs)))
    edges = [pair for pair, value in zip(pairs, draws) if value >= cutoff]
    return _graph(sizes, edges, f"dag-{n}")


def assert_valid_plan(graph, plan):
    """Check `plan` against `graph` with `cachefit.check`; raise AssertionError listing every violation.

    Parameters
    ----------
    graph : networkx.DiGraph or LayerTable
        The model graph the plan was made for.
    plan : Plan
        Any plan: a plan with groups must be consistent and fit; a plan
        without (INFEASIBLE, UNKNOWN) must hold no groups and state a reason.

    Returns
    -------
    CheckReport
        The checker's report (ok).

    Raises
    ------
    AssertionError
        One line per violation, naming the solver and status.

    Examples
    --------
    >>> import dataclasses, cachefit
    >>> g = cachefit.graphs.from_layers([30, 30, 30])
    >>> plan = cachefit.plan(g, 60, solver="greedy")
    >>> assert_valid_plan(g, plan).ok
    True
    >>> assert_valid_plan(g, dataclasses.replace(plan, capacity=50))
    Traceback (most recent call last):
    ...
    AssertionError: plan from 'greedy' (OPTIMAL) is invalid:
      - group 0 needs 60 B > capacity 50 B
    """
    report = check(plan, graph)
    if not report.ok:
        lines = "\n".join(f"  - {violation}" for violation in report.violations)
        raise AssertionError(f"plan from {plan.solver!r} ({plan.status}) is invalid:\n{lines}")
    return report


class FakeClock:
    """A clock whose seconds pass only when a test moves ``now``: the `clock` of a solver's deadline.

    Examples
    --------
    >>> from cachefit.solvers._deadline import Deadline
    >>> clock = FakeClock()
    >>> deadline = Deadline(2.0, clock=clock)
    >>> deadline.expired(), deadline.remaining()
    (False, 2.0)
    >>> clock.now += 3.0
    >>> deadline.expired()
    True
    """

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now
