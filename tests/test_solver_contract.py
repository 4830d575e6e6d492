"""The contract every registered solver keeps (DESIGN.md §6), written once and run for each."""

import json

import networkx as nx
import pytest
from hypothesis import given, settings

from cachefit import InputError, Status, check
from cachefit.graphs import from_layers
from cachefit.result import graph_to_data
from cachefit.solvers import SOLVERS
from cachefit.testing import assert_valid_plan, dags

NAMES = sorted(SOLVERS)
MODELS = ["additive", "liveness"]


def run(name, graph, capacity, **options):
    if name in ("cpsat", "auto"):
        options.setdefault("time_limit_s", 10)
    plan = SOLVERS[name](graph, capacity, **options)
    assert_valid_plan(graph, plan)
    if name != "auto":
        assert plan.solver == name
    return plan


def diamond():
    graph = nx.DiGraph(name="diamond")
    for node, weight in zip("abcd", (10, 30, 50, 20)):
        graph.add_node(node, weight_bytes=weight, activation_bytes=5, buffer_bytes=2)
    graph.add_edges_from([("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")])
    return graph


@pytest.mark.parametrize("memory", MODELS)
@pytest.mark.parametrize("name", NAMES)
class TestContract:
    def test_empty_graph(self, name, memory):
        plan = run(name, nx.DiGraph(), 10, memory=memory)
        assert plan.status == Status.OPTIMAL and plan.k == 0 and plan.partitions == () and plan.lower_bound == 0

    def test_one_node(self, name, memory):
        plan = run(name, from_layers([10]), 10, memory=memory)
        assert plan.status == Status.OPTIMAL and plan.partitions == (("0",),) and plan.sizes == (10,)

    def test_chain(self, name, memory):
        plan = run(name, from_layers([40, 30, 20, 50, 10]), 60, memory=memory)
        assert plan.status == Status.OPTIMAL and plan.k == 3 and plan.lower_bound == 3

    def test_diamond(self, name, memory):
        plan = run(name, diamond(), 80, memory=memory)
        assert plan.ok and plan.k >= plan.lower_bound >= 1
        order = list(diamond().nodes)
        for group in plan.partitions:  # nodes within a group in topological (given) order
            assert list(group) == sorted(group, key=order.index)

    def test_oversize_node_is_infeasible_naming_it(self, name, memory):
        graph = from_layers([10, {"name": "huge", "weight_bytes": 70}, 10])
        plan = run(name, graph, 60, memory=memory)
        assert plan.status == Status.INFEASIBLE and plan.k == 0 and plan.partitions == ()
        assert "'huge'" in plan.reason

    def test_k_above_node_count_is_infeasible(self, name, memory):
        plan = run(name, from_layers([10, 10, 10]), 60, memory=memory, k=4)
        assert plan.status == Status.INFEASIBLE and "k = 4" in plan.reason

    def test_k_on_the_empty_graph_is_infeasible(self, name, memory):
        plan = run(name, nx.DiGraph(), 10, memory=memory, k=1)
        assert plan.status == Status.INFEASIBLE

    def test_explicit_k_gives_exactly_k_groups(self, name, memory):
        plan = run(name, from_layers([10, 20, 30, 40]), 100, memory=memory, k=3)
        assert plan.ok and plan.k == 3 and all(plan.partitions)

    def test_input_graph_not_mutated(self, name, memory):
        graph = diamond()
        graph.graph["note"] = "keep"
        before = json.dumps(graph_to_data(graph), sort_keys=True)
        run(name, graph, 80, memory=memory)
        run(name, graph, 80, memory=memory, k=2)
        assert json.dumps(graph_to_data(graph), sort_keys=True) == before


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=15, deadline=None, derandomize=True)
@given(graph=dags(max_nodes=8, capacity=100))
def test_every_plan_passes_check(name, graph):
    for memory in MODELS:
        plan = run(name, graph, 100, memory=memory, chunk_fraction=0.5)
        report = check(plan, graph)
        assert report.ok, report.violations
        if plan.ok:
            assert plan.lower_bound <= plan.k


@pytest.mark.parametrize("module", ["cachefit.solvers", "cachefit.solvers.bounds", "cachefit.solvers.dp",
                                    "cachefit.solvers.cpsat", "cachefit.testing"])
def test_docstring_examples(module):
    # The solvers live in solvers/ (mapped to cachefit.solvers), which a walk of cachefit/ does not reach.
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


class TestReviewRegressions:
    def test_chain_with_skip_edge_is_infeasible_for_every_solver(self):
        """Node 2 must hold node 0's output passing by to node 3: 30 + 20 > 40 in the only order."""
        graph = nx.DiGraph()
        for index, (weight, activation) in enumerate([(0, 20), (0, 0), (30, 0), (0, 0)]):
            graph.add_node(str(index), weight_bytes=weight, activation_bytes=activation, buffer_bytes=0)
        graph.add_edges_from([("0", "1"), ("1", "2"), ("2", "3"), ("0", "3")])
        for name in NAMES:
            plan = run(name, graph, 40)
            assert plan.status == Status.INFEASIBLE and "node '2' needs 50 B" in plan.reason, name

    @pytest.mark.parametrize("seed", [-1, 2**40, 1.5])
    def test_seed_range(self, seed):
        with pytest.raises(InputError, match=r"`seed` must be an integer from 0 to 2\*\*31 - 1"):
            run("greedy", from_layers([1]), 10, seed=seed)
