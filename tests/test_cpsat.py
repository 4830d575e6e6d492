import random

import networkx as nx
import pytest
from hypothesis import example, given, settings, strategies as st

from cachefit import InputError, Status
from cachefit.graphs import from_layers
from cachefit.memory import scale_activation
from cachefit.solvers import brute, cpsat, dp, greedy
from cachefit.solvers.cpsat import activation_scale
from cachefit.testing import assert_valid_plan, dags

MODELS = ["additive", "liveness"]


def diamond(weights=(10, 30, 50, 20), activation=0):
    graph = nx.DiGraph()
    for node, weight in zip("abcd", weights):
        graph.add_node(node, weight_bytes=weight, activation_bytes=activation, buffer_bytes=0)
    graph.add_edges_from([("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")])
    return graph


def layered(n, seed, *, per_group=10):
    """A random layered DAG whose capacity fits about `per_group` nodes (same family as the bench)."""
    rng = random.Random(seed)
    graph = nx.DiGraph()
    layers, index = [], 0
    while index < n:
        width = min(rng.randint(2, 6), n - index)
        layers.append(list(range(index, index + width)))
        index += width
    for v in range(n):
        graph.add_node(str(v), weight_bytes=rng.randint(1, 1000), activation_bytes=rng.randint(1, 200),
                       buffer_bytes=rng.randint(0, 100))
    for depth in range(1, len(layers)):
        for v in layers[depth]:
            for u in rng.sample(layers[depth - 1], min(len(layers[depth - 1]), rng.randint(1, 3))):
                graph.add_edge(str(u), str(v))
    return graph, per_group * 650


class TestByHand:
    def test_beats_the_given_order(self):
        graph = diamond()
        plan = cpsat(graph, 60, memory="additive", workers=1)
        assert_valid_plan(graph, plan)
        assert plan.k == 2 and plan.status == Status.OPTIMAL and plan.partitions == (("a", "c"), ("b", "d"))
        assert dp(graph, 60, memory="additive").k == 3

    def test_liveness_counts_activations_passing_through(self):
        # a's output goes to d: it is live in every group from a's to d's.
        graph = diamond(weights=(10, 30, 30, 10), activation=10)
        plan = cpsat(graph, 60, memory="liveness", workers=1)
        assert_valid_plan(graph, plan)
        oracle = brute(graph, 60, memory="liveness")
        assert (plan.k, plan.bottleneck) == (oracle.k, oracle.bottleneck)

    def test_explicit_k_is_balanced_and_proved(self):
        graph = from_layers([10] * 6)
        plan = cpsat(graph, 60, memory="additive", k=3, workers=1)
        assert plan.sizes == (20, 20, 20) and plan.status == Status.OPTIMAL
        assert plan.stats["bottleneck_optimal"] is True

    def test_k_below_lower_bound_is_infeasible(self):
        plan = cpsat(from_layers([30, 30, 30]), 60, memory="additive", k=1, workers=1)
        assert plan.status == Status.INFEASIBLE and plan.reason == "k = 1 is below the minimum number of groups, 2"

    def test_k_below_the_optimum_is_proved_infeasible(self):
        # Every bound says 2 groups; the search proves 3 (found by brute force over small DAGs).
        graph = nx.DiGraph()
        for node, weight in enumerate((50, 40, 50, 20, 40)):
            graph.add_node(str(node), weight_bytes=weight, activation_bytes=0, buffer_bytes=0)
        graph.add_edges_from([("0", "4"), ("1", "2"), ("2", "3"), ("2", "4"), ("3", "4")])
        best = cpsat(graph, 100, memory="additive", workers=1)
        assert best.k == 3 and best.status == Status.OPTIMAL and best.stats["phase1"] == "OPTIMAL"
        plan = cpsat(graph, 100, memory="additive", k=2, workers=1)
        assert plan.status == Status.INFEASIBLE
        assert plan.reason == "no valid grouping has exactly k = 2 groups within the capacity"

    def test_bad_workers(self):
        with pytest.raises(InputError, match="`workers` must be a positive integer or None, got 0"):
            cpsat(from_layers([1]), 10, workers=0)

    def test_chunk_fraction_without_exact_scaling_falls_back_to_the_hint(self):
        # 0.1's float is 3602879701896397 / 2^55: den·C overflows int64 for any C above 127 bytes.
        graph = diamond(weights=(1000, 3000, 5000, 2000), activation=1000)
        plan = cpsat(graph, 7000, memory="liveness", chunk_fraction=0.1, workers=1)
        assert_valid_plan(graph, plan)
        assert "no exact small-integer scaling" in plan.stats["fallback"]
        assert plan.status == (Status.OPTIMAL if plan.k == plan.lower_bound else Status.FEASIBLE)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(graph=dags(max_nodes=9, capacity=100), memory=st.sampled_from(MODELS),
       fraction=st.sampled_from([1.0, 0.5, 1 / 3]), k=st.one_of(st.none(), st.none(), st.integers(1, 9)))
@example(graph=diamond(), memory="additive", fraction=1.0, k=None)
def test_matches_brute_force(graph, memory, fraction, k):
    plan = cpsat(graph, 100, memory=memory, chunk_fraction=fraction, k=k, workers=1, time_limit_s=20)
    assert_valid_plan(graph, plan)
    if k is not None and k > graph.number_of_nodes():
        assert plan.status == Status.INFEASIBLE
        return
    oracle = brute(graph, 100, memory=memory, chunk_fraction=fraction, k=k)
    assert plan.status == oracle.status  # small instances are solved to optimality well within the limit
    if oracle.ok:
        assert plan.k == oracle.k and plan.lower_bound <= plan.k
        assert plan.stats["bottleneck_optimal"] is True and plan.bottleneck == oracle.bottleneck


@settings(max_examples=8, deadline=None, derandomize=True)
@given(graph=dags(min_nodes=15, max_nodes=30, capacity=100, edge_probability=0.15), memory=st.sampled_from(MODELS))
def test_never_worse_than_greedy_on_larger_dags(graph, memory):
    plan = cpsat(graph, 100, memory=memory, workers=2, time_limit_s=2)
    base = greedy(graph, 100, memory=memory)
    assert_valid_plan(graph, plan)
    if base.ok:
        assert plan.ok and plan.k <= base.k
        assert plan.lower_bound <= plan.k


def test_timeout_returns_a_valid_plan_with_a_bound():
    graph, capacity = layered(200, 2)  # hint k = 21, bounds 20: not settled within a second
    plan = cpsat(graph, capacity, memory="additive", time_limit_s=1, workers=2)
    assert_valid_plan(graph, plan)
    assert plan.ok and plan.lower_bound <= plan.k
    assert plan.stats["gap"] == plan.k - plan.lower_bound
    assert plan.status == (Status.OPTIMAL if plan.stats["gap"] == 0 else Status.FEASIBLE)


def test_tiny_time_limit_never_raises():
    graph, capacity = layered(300, 1)
    plan = cpsat(graph, capacity, memory="liveness", time_limit_s=0.01, workers=1)
    assert_valid_plan(graph, plan)
    assert plan.ok and plan.lower_bound <= plan.k


def test_deterministic_for_a_fixed_seed_and_worker_count():
    graph, capacity = layered(14, 3, per_group=5)  # fewest groups 4; k = 5 is proved in about a second
    runs = [cpsat(graph, capacity, memory="liveness", k=5, seed=5, workers=2, time_limit_s=30) for _ in range(2)]
    assert runs[0].stats["bottleneck_optimal"] is True
    assert runs[0].partitions == runs[1].partitions


def test_groups_run_in_order_and_nodes_are_topological_within_groups():
    graph, capacity = layered(30, 2, per_group=5)
    plan = cpsat(graph, capacity, memory="liveness", workers=2, time_limit_s=1)
    assert_valid_plan(graph, plan)
    order = {node: index for index, node in enumerate(graph.nodes)}
    for group in plan.partitions:
        assert list(group) == sorted(group, key=order.get)
    group_of = {node: index for index, group in enumerate(plan.partitions) for node in group}
    assert all(group_of[u] <= group_of[v] for u, v in graph.edges)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(fraction=st.sampled_from([1.0, 0.5, 0.25, 0.75, 1 / 3, 2 / 3, 0.2, 0.3, 0.1, 1 / 7]),
       x=st.integers(0, 10**12))
def test_activation_scale_is_exact(fraction, x):
    scale = activation_scale(fraction, 10**12, 10**9)
    if scale is None:
        return
    numerator, denominator = scale
    assert -((-x * numerator) // denominator) == scale_activation(x, fraction)


def test_activation_scale_examples():
    assert activation_scale(0.75, 10**12, 10**9) == (3, 4)
    assert activation_scale(1 / 3, 10**12, 10**9) == (1, 3)
    assert activation_scale(0.1, 10**12, 10**9) is None
    # 1/3's float is just below 1/3: equal up to 2^54, and cpsat's check refuses larger totals.
    assert activation_scale(1 / 3, 2**60, 10**9) is None
