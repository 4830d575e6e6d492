import networkx as nx
import numpy as np
import pytest
from hypothesis import given, strategies as st

import cachefit
from cachefit import InputError, LayerTable, Status, check
from cachefit.graphs import from_layers
from cachefit.solvers import brute, greedy
from strategies import capacities, graphs

MODELS = ["additive", "liveness"]


def assert_checked(plan, graph=None):
    report = check(plan, graph)
    assert report.ok, report.violations
    return plan


class TestGreedy:
    def test_empty_graph(self):
        plan = assert_checked(greedy(nx.DiGraph(), 10))
        assert plan.k == 0 and plan.partitions == () and plan.status == Status.OPTIMAL

    def test_one_node(self):
        plan = assert_checked(greedy(from_layers([10]), 10))
        assert plan.partitions == (("0",),) and plan.sizes == (10,) and plan.status == "OPTIMAL"

    def test_chain_by_hand(self):
        plan = assert_checked(greedy(from_layers([40, 30, 20, 50, 10]), 60, memory="additive"))
        assert plan.partitions == (("0",), ("1", "2"), ("3", "4")) and plan.lower_bound == 3

    def test_exact_fit(self):
        plan = assert_checked(greedy(from_layers([25, 25, 25, 25]), 50))
        assert plan.sizes == (50, 50)

    def test_oversize_node_is_infeasible_with_reason(self):
        plan = assert_checked(greedy(from_layers([10, 70, 10]), 60))
        assert plan.status == Status.INFEASIBLE and plan.k == 0 and plan.partitions == ()
        assert "node '1' needs 70 B (70 B) alone" in plan.reason and "> capacity 60 B (60 B)" in plan.reason

    def test_liveness_counts_inputs_in_alone_size(self):
        g = from_layers([{"weight_bytes": 10, "activation_bytes": 30}, {"weight_bytes": 10, "activation_bytes": 30}])
        assert greedy(g, 60, memory="additive").k == 2
        plan = greedy(g, 60, memory="liveness")  # node 1 alone: 10 + its input 30 + its output 30 = 70
        assert plan.status == Status.INFEASIBLE and "node '1' needs 70 B" in plan.reason

    def test_explicit_k_splits(self):
        plan = assert_checked(greedy(from_layers([10] * 6), 60, k=3))
        assert plan.k == 3 and plan.status == Status.FEASIBLE

    def test_explicit_k_too_large(self):
        plan = greedy(from_layers([10] * 3), 60, k=4)
        assert plan.status == Status.INFEASIBLE
        assert plan.reason == "k = 4 non-empty groups need at least 4 nodes; the graph has 3"

    def test_explicit_k_too_small_on_chain(self):
        plan = greedy(from_layers([10] * 6), 20, k=2)
        assert plan.status == Status.INFEASIBLE and plan.reason == "k = 2 is below the minimum number of groups, 3"

    def test_does_not_mutate(self):
        g = from_layers([1, 2, 3])
        before = nx.node_link_data(g, edges="edges")
        greedy(g, 4)
        assert nx.node_link_data(g, edges="edges") == before

    def test_layer_table_fast_path(self):
        weights = np.random.default_rng(1).integers(0, 100, 1000)
        a = greedy(LayerTable.chain(weights), 500, memory="additive")
        b = greedy(from_layers(weights.tolist()), 500, memory="additive")
        assert a.partitions == b.partitions and a.sizes == b.sizes
        assert_checked(a)

    @pytest.mark.parametrize("bad, message", [
        ({"capacity": "fifty"}, r"`capacity` must be an int of bytes"),
        ({"memory": "lru"}, r"`memory` must be one of"),
        ({"k": 0}, r"`k` must be a positive integer or None, got 0"),
        ({"k": 2.5}, r"`k` must be a positive integer or None, got 2.5"),
        ({"time_limit_s": -1}, r"`time_limit_s` must be a positive finite number of seconds, got -1"),
        ({"chunk_fraction": 2}, r"`chunk_fraction` must be a number in \(0, 1\], got 2"),
    ])
    def test_bad_arguments(self, bad, message):
        arguments = {"capacity": 100, **bad}
        capacity = arguments.pop("capacity")
        with pytest.raises(InputError, match=message):
            greedy(from_layers([1, 2]), capacity, **arguments)

    @given(st.data())
    def test_every_plan_checks(self, data):
        g = data.draw(graphs(max_nodes=14))
        memory = data.draw(st.sampled_from(MODELS))
        plan = greedy(g, data.draw(capacities(g)), memory=memory, chunk_fraction=data.draw(st.sampled_from([1.0, 0.5])))
        assert_checked(plan)
        assert plan.status in (Status.OPTIMAL, Status.FEASIBLE, Status.INFEASIBLE, Status.UNKNOWN)
        if plan.ok:
            assert plan.lower_bound <= plan.k


class TestGreedyAgainstBrute:
    @given(st.data())
    def test_chain_k_equals_brute(self, data):
        g = data.draw(graphs(max_nodes=10, chain=True))
        memory = data.draw(st.sampled_from(MODELS))
        capacity = data.draw(capacities(g))
        fraction = data.draw(st.sampled_from([1.0, 0.5, 0.3]))
        fast = assert_checked(greedy(g, capacity, memory=memory, chunk_fraction=fraction))
        exact = assert_checked(brute(g, capacity, memory=memory, chunk_fraction=fraction))
        assert fast.status == exact.status or {fast.status, exact.status} <= {Status.OPTIMAL}
        assert fast.k == exact.k
        if fast.ok:
            assert fast.status == exact.status == Status.OPTIMAL

    @given(st.data())
    def test_dag_k_not_below_brute(self, data):
        g = data.draw(graphs(max_nodes=8))
        memory = data.draw(st.sampled_from(MODELS))
        capacity = data.draw(capacities(g))
        fast = assert_checked(greedy(g, capacity, memory=memory))
        exact = assert_checked(brute(g, capacity, memory=memory))
        if fast.ok:
            assert exact.ok and fast.k >= exact.k
        if exact.status == Status.INFEASIBLE:
            assert not fast.ok


class TestBrute:
    def test_refuses_large(self):
        with pytest.raises(InputError, match=r"`graph` has 13 nodes; brute force handles at most 12"):
            brute(from_layers([1] * 13), 10)

    def test_balances(self):
        plan = assert_checked(brute(from_layers([40, 30, 20, 50, 10]), 100, memory="additive"))
        assert plan.k == 2 and plan.bottleneck == 80 and plan.sizes == (70, 80)  # 40+30 | 20+50+10

    def test_uses_other_orders_on_dags(self):
        # a -> c, b independent: the given order a, b, c forces b's big output to pass c's group
        g = nx.DiGraph()
        g.add_node("a", weight_bytes=10, activation_bytes=10, buffer_bytes=0)
        g.add_node("b", weight_bytes=10, activation_bytes=0, buffer_bytes=0)
        g.add_node("c", weight_bytes=30, activation_bytes=0, buffer_bytes=0)
        g.add_edge("a", "c")
        plan = assert_checked(brute(g, 40, memory="liveness"))
        assert plan.k == 2 and plan.status == Status.OPTIMAL

    def test_explicit_k(self):
        plan = assert_checked(brute(from_layers([10] * 6), 60, k=3, memory="additive"))
        assert plan.k == 3 and plan.sizes == (20, 20, 20) and plan.status == Status.OPTIMAL


class TestPlanEntry:
    def test_unknown_solver(self):
        with pytest.raises(InputError, match=r"`solver` must be one of .*greedy.*, got 'magic'"):
            cachefit.plan(from_layers([1]), 10, solver="magic")

    def test_capacity_by_device_name(self):
        plan = cachefit.plan(from_layers([30 * 2**20, 30 * 2**20]), "h100-l2")
        assert plan.capacity == 50 * 2**20 and plan.k == 2
