"""The contract every registered solver keeps (docs/concepts.md §6), written once and run for each."""

import json
import re

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


EXACT = ["greedy", "dp", "brute"]


def nx_graph(ids, weights):
    graph = nx.DiGraph()
    for node, weight in zip(ids, weights):
        graph.add_node(node, weight_bytes=weight, activation_bytes=0, buffer_bytes=0)
    graph.add_edges_from(zip(ids[:-1], ids[1:]))
    return graph


class TestExactIntegers:
    """Issue 10: byte counts beyond int64 wrapped to a negative size that was reported OPTIMAL."""

    @pytest.mark.parametrize("name", EXACT)
    def test_node_beyond_the_limit_is_refused_naming_it(self, name):
        graph = nx_graph(["0", "1"], [6917529027641081856] * 2)
        with pytest.raises(InputError, match=r"^node '0': `weight_bytes` 6917529027641081856 is beyond 2\*\*62 B"):
            run(name, graph, 6917529027641081856, memory="additive")

    @pytest.mark.parametrize("name", EXACT)
    def test_total_beyond_the_limit_is_refused_naming_the_node(self, name):
        graph = nx_graph(["0", "1", "2"], [2**62] * 3)
        with pytest.raises(InputError, match=r"^node '1': the graph's byte counts add up beyond 2\*\*62 B"):
            run(name, graph, 2**63)

    def test_through_plan_and_from_layers(self):
        import cachefit
        with pytest.raises(InputError, match=r"^node '0': `weight_bytes` 6917529027641081856 is beyond 2\*\*62"):
            cachefit.plan(nx_graph(["0", "1"], [6917529027641081856] * 2), 6917529027641081856)
        with pytest.raises(InputError, match=r"^node '1': the graph's byte counts add up beyond 2\*\*62 B"):
            from_layers([2**62] * 3)
        cachefit.LayerTable.chain([2**61, 2**61])  # exactly 2**62: accepted
        with pytest.raises(InputError, match=r"^node '2': the graph's byte counts add up beyond 2\*\*62 B"):
            cachefit.LayerTable.chain([2**61, 2**61, 1])

    @pytest.mark.parametrize("memory", MODELS)
    @pytest.mark.parametrize("k", [None, 2, 3])
    def test_at_the_limit_solvers_agree_with_brute_force(self, memory, k):
        """Σ bytes = 2**62 exactly, capacities at, below and far above the limit (clamped to 2**62)."""
        import cachefit
        layers = [{"weight_bytes": 2**60, "activation_bytes": 2**59, "buffer_bytes": 2**58}] * 2
        layers.append({"weight_bytes": 2**58, "activation_bytes": 2**57, "buffer_bytes": 2**57})
        graph = from_layers(layers)
        assert sum(sum(layer.values()) for layer in layers) == 2**62
        for capacity in (2**62, 2**61 + 2**59, 2**70):
            oracle = run("brute", graph, capacity, memory=memory, chunk_fraction=1 / 3, k=k)
            plans = [run(name, graph, capacity, memory=memory, chunk_fraction=1 / 3, k=k) for name in ("greedy", "dp")]
            plans.append(cachefit.plan(graph, capacity, memory=memory, chunk_fraction=1 / 3, k=k))
            for plan in plans:
                assert plan.capacity == min(capacity, 2**62) and min(plan.sizes) > 0
                assert plan.k == oracle.k
                if plan.solver == "dp":
                    assert plan.bottleneck == oracle.bottleneck and plan.status == oracle.status


class TestTimeLimit:
    @pytest.mark.parametrize("limit", [float("inf"), float("nan"), 0, -1.0, "1"])
    @pytest.mark.parametrize("name", EXACT)
    def test_non_finite_or_non_positive_is_refused(self, name, limit):
        with pytest.raises(InputError, match=r"^`time_limit_s` must be a positive finite number of seconds, got "):
            run(name, from_layers([1]), 10, time_limit_s=limit)

    def test_message(self):
        import cachefit
        with pytest.raises(InputError) as error:
            cachefit.plan(from_layers([1]), 10, time_limit_s=float("inf"))
        assert str(error.value) == "`time_limit_s` must be a positive finite number of seconds, got inf"


class TestNodeIds:
    """Issue 10: a graph with non-string ids planned, but its own plan file could not be read back."""

    @pytest.mark.parametrize("node", [1, True, 1.5, ("a", 1)])
    @pytest.mark.parametrize("name", EXACT)
    def test_non_string_ids_are_refused_naming_the_id(self, name, node):
        graph = nx_graph(["a", node], [1, 2])
        expected = f"node {node!r}: node ids must be strings, got {type(node).__name__}; "
        with pytest.raises(InputError, match="^" + re.escape(expected) + r"relabel the graph"):
            run(name, graph, 10)

    def test_chain_ids_must_be_strings(self):
        import cachefit
        with pytest.raises(InputError, match=r"^`ids` must be strings, got 1 \(int\)"):
            cachefit.LayerTable.chain([1, 2], ids=["0", 1])

    @pytest.mark.parametrize("memory", MODELS)
    def test_every_accepted_graph_round_trips_through_its_plan_file(self, memory, tmp_path):
        import cachefit
        from cachefit.result import Plan
        graph = diamond()
        graph.add_node("1", weight_bytes=3, activation_bytes=1, buffer_bytes=0)
        graph.add_edge("d", "1")
        plan = cachefit.plan(graph, 100, memory=memory)
        path = tmp_path / "plan.json"
        plan.to_json(path)
        again = Plan.from_json(path)
        assert again.partitions == plan.partitions and check(again).ok
