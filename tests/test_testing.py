import dataclasses

import networkx as nx
import pytest
from hypothesis import Phase, find as hypothesis_find, given, settings

import cachefit
from cachefit import InputError, Status
from cachefit.graphs import from_layers, validate
from cachefit.testing import assert_valid_plan, chains, dags, exact_fit_weights


def find(strategy, condition):
    """An example meeting `condition` (no shrinking: only its existence matters)."""
    return hypothesis_find(strategy, condition, settings=settings(phases=[Phase.generate], max_examples=500,
                                                                  derandomize=True, database=None))


def weights(graph):
    return [data["weight_bytes"] for _, data in graph.nodes(data=True)]


class TestChains:
    @settings(max_examples=50, deadline=None, derandomize=True)
    @given(graph=chains(min_nodes=2, max_nodes=7, capacity=80))
    def test_valid_chains_in_range(self, graph):
        assert validate(graph) is graph
        n = graph.number_of_nodes()
        assert 2 <= n <= 7
        assert list(graph.edges) == [(str(i), str(i + 1)) for i in range(n - 1)]
        for _, data in graph.nodes(data=True):
            assert data["weight_bytes"] <= 80 and data["activation_bytes"] <= 20 and data["buffer_bytes"] <= 20

    def test_zero_and_exact_fit_weights_occur(self):
        assert 0 in weights(find(chains(min_nodes=1, capacity=100), lambda g: 0 in weights(g)))
        exact = find(chains(min_nodes=1, capacity=100), lambda g: 100 in weights(g))
        assert 100 in weights(exact)

    @settings(max_examples=30, deadline=None, derandomize=True)
    @given(graph=chains(max_nodes=6, capacity=100, max_activation=0, max_buffer=0, zeros=False, exact_fit=False))
    def test_options_turn_parts_off(self, graph):
        for _, data in graph.nodes(data=True):
            assert data["activation_bytes"] == 0 and data["buffer_bytes"] == 0
            assert 1 <= data["weight_bytes"] <= 50

    def test_bad_options(self):
        with pytest.raises(InputError, match="`capacity` must be a positive integer of bytes, got 0"):
            chains(capacity=0).example()
        with pytest.raises(InputError, match="`min_nodes` and `max_nodes` must be integers"):
            chains(min_nodes=3, max_nodes=2).example()
        with pytest.raises(InputError, match="`max_buffer` must be a non-negative integer of bytes or None, got -1"):
            chains(max_buffer=-1).example()


class TestDags:
    @settings(max_examples=50, deadline=None, derandomize=True)
    @given(graph=dags(max_nodes=9))
    def test_edges_go_forward(self, graph):
        validate(graph)
        assert nx.is_directed_acyclic_graph(graph)
        assert all(int(u) < int(v) for u, v in graph.edges)

    @settings(max_examples=20, deadline=None, derandomize=True)
    @given(empty=dags(min_nodes=5, max_nodes=5, edge_probability=0.0),
           full=dags(min_nodes=5, max_nodes=5, edge_probability=1.0))
    def test_edge_probability_extremes(self, empty, full):
        assert empty.number_of_edges() == 0 and full.number_of_edges() == 10

    def test_sparse_and_dense_graphs_occur(self):
        sparse = find(dags(min_nodes=6, max_nodes=6), lambda g: g.number_of_edges() <= 2)
        dense = find(dags(min_nodes=6, max_nodes=6), lambda g: g.number_of_edges() >= 10)
        assert sparse.number_of_edges() <= 2 < 10 <= dense.number_of_edges()

    def test_bad_edge_probability(self):
        with pytest.raises(InputError, match=r"`edge_probability` must be a number in \[0, 1\] or None, got 2"):
            dags(edge_probability=2).example()


def test_exact_fit_weights():
    assert exact_fit_weights(100) == [25, 33, 50, 100]
    assert exact_fit_weights(1) == [1]


class TestAssertValidPlan:
    def test_passes_a_valid_plan(self):
        graph = from_layers([30, 30, 30])
        report = assert_valid_plan(graph, cachefit.plan(graph, 60, solver="greedy"))
        assert report.ok and report.sizes == (60, 30)

    def test_passes_a_plan_without_groups_that_says_why(self):
        graph = from_layers([30, 90])
        plan = cachefit.plan(graph, 60, solver="greedy")
        assert plan.status == Status.INFEASIBLE
        assert assert_valid_plan(graph, plan).ok

    def test_lists_every_violation(self):
        graph = from_layers([30, 30, 30])
        plan = cachefit.plan(graph, 60, solver="greedy")
        broken = dataclasses.replace(plan, capacity=50, k=3)
        with pytest.raises(AssertionError) as info:
            assert_valid_plan(graph, broken)
        message = str(info.value)
        assert message.startswith("plan from 'greedy' (OPTIMAL) is invalid:")
        assert "  - group 0 needs 60 B > capacity 50 B" in message
        assert "  - k = 3 but the plan holds 2 groups" in message

    def test_checks_against_the_given_graph(self):
        plan = cachefit.plan(from_layers([30, 30, 30]), 60, solver="greedy")
        with pytest.raises(AssertionError, match="node\\(s\\) in no group"):
            assert_valid_plan(from_layers([30, 30, 30, 30]), plan)
