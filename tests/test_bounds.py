import networkx as nx
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from cachefit import LayerTable, group_sizes
from cachefit.memory import scale_activation
from cachefit.solvers import brute, cpsat, greedy
from cachefit.solvers.bounds import (all_bounds, forced_bytes, head_tail_bound, item_sizes, l2_bound, lower_bound,
                                     path_bound, reachability, sum_bound)
from cachefit.memory import scale_activation_array as scale_array
from cachefit.testing import chains, dags

MODELS = ["additive", "liveness"]
FRACTIONS = [1.0, 0.5, 1 / 3]


class TestL2:
    @pytest.mark.parametrize("items,capacity,expected", [
        ([], 10, 0),
        ([10], 10, 1),
        ([6, 6, 6, 2, 2, 2], 10, 3),
        ([6, 6, 6, 5, 5, 5], 10, 5),  # the 6s go alone; the 5s pair up
        ([51, 50, 51], 100, 3),  # no two share a bin; the sum bound says 2
        ([4, 4, 4, 4, 4], 10, 2),  # L2 cannot see that only two 4s share a bin (the optimum is 3)
        ([0, 0, 0], 10, 0),
    ])
    def test_known_values(self, items, capacity, expected):
        assert l2_bound(items, capacity) == expected

    @settings(max_examples=200, deadline=None, derandomize=True)
    @given(items=st.lists(st.integers(0, 20), max_size=8), capacity=st.integers(1, 30))
    def test_never_exceeds_optimal_bin_packing(self, items, capacity):
        if any(item > capacity for item in items):
            return
        # Optimal bin packing by brute force: a chain of the items with no edges is a free packing.
        graph = nx.DiGraph()
        for index, item in enumerate(items):
            graph.add_node(str(index), weight_bytes=item, activation_bytes=0, buffer_bytes=0)
        optimum = brute(graph, capacity, memory="additive").k
        bound = l2_bound(items, capacity)
        assert -(-sum(items) // capacity) <= bound <= optimum  # L2 dominates the sum bound


class TestByHand:
    def test_sum_bound(self):
        assert sum_bound(LayerTable.chain([30, 30, 30]), 60, memory="additive") == 2
        table = LayerTable.chain([10, 20], [4, 4], [3, 1])
        assert forced_bytes(table, chunk_fraction=0.5) == 10 + 20 + 3 + 4
        assert sum_bound(table, 20, chunk_fraction=0.5) == 2

    def test_path_bound_of_a_chain_is_greedy(self):
        table = LayerTable.chain([40, 30, 20, 50, 10], [5, 0, 5, 0, 5])
        for memory in MODELS:
            assert path_bound(table, 60, memory=memory) == greedy(table, 60, memory=memory).k

    def test_path_bound_counts_inputs_as_live(self):
        # b's group always holds a's output (a is b's input), in any plan.
        graph = nx.DiGraph()
        graph.add_node("a", weight_bytes=50, activation_bytes=30, buffer_bytes=0)
        graph.add_node("b", weight_bytes=40, activation_bytes=0, buffer_bytes=0)
        graph.add_node("x", weight_bytes=0, activation_bytes=0, buffer_bytes=0)
        graph.add_edges_from([("a", "b")])
        table = LayerTable.from_graph(graph)
        assert path_bound(table, 100, memory="liveness") == 2  # 50 + 30 + 40 > 100
        assert brute(graph, 100, memory="liveness").k == 2

    def test_head_tail_bound(self):
        table = LayerTable.chain([51, 50, 51])
        assert head_tail_bound(table, 100, memory="additive") == 3

    def test_item_sizes_liveness_floor_and_reserved_buffer(self):
        items, reserved = item_sizes(LayerTable.chain([10, 20], [5, 5], [1, 3]), chunk_fraction=0.5)
        assert items.tolist() == [12, 22] and reserved == 1

    def test_lower_bound_is_the_max_of_all(self):
        graph = nx.DiGraph()
        for node, weight in zip("abcde", (51, 50, 51, 10, 10)):
            graph.add_node(node, weight_bytes=weight, activation_bytes=0, buffer_bytes=0)
        graph.add_edges_from([("a", "b"), ("b", "c"), ("a", "d"), ("d", "e")])
        table = LayerTable.from_graph(graph)
        bounds = all_bounds(table, 100, memory="additive")
        assert lower_bound(table, 100, memory="additive") == max(bounds.values()) == 3
        assert bounds["sum"] == 2

    def test_empty(self):
        table = LayerTable.chain([])
        assert lower_bound(table, 10) == 0 and all_bounds(table, 10) == {"sum": 0, "l2": 0, "path": 0, "head_tail": 0}

    def test_reachability(self):
        graph = nx.DiGraph()
        for node in "abcd":
            graph.add_node(node, weight_bytes=1, activation_bytes=0, buffer_bytes=0)
        graph.add_edges_from([("a", "b"), ("b", "d"), ("a", "c")])
        reach = reachability(LayerTable.from_graph(graph))
        assert reach.astype(int).tolist() == [[0, 1, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0]]


@settings(max_examples=150, deadline=None, derandomize=True)
@given(graph=dags(max_nodes=9, capacity=100), memory=st.sampled_from(MODELS), fraction=st.sampled_from(FRACTIONS))
def test_no_bound_exceeds_the_optimum(graph, memory, fraction):
    oracle = brute(graph, 100, memory=memory, chunk_fraction=fraction)
    if not oracle.ok:
        return
    table = LayerTable.from_graph(graph)
    bounds = all_bounds(table, 100, memory=memory, chunk_fraction=fraction)
    assert max(bounds.values()) <= oracle.k, bounds
    assert lower_bound(table, 100, memory=memory, chunk_fraction=fraction) <= oracle.k
    assert oracle.lower_bound <= oracle.k


@settings(max_examples=150, deadline=None, derandomize=True)
@given(graph=dags(min_nodes=1, max_nodes=9, capacity=100), memory=st.sampled_from(MODELS),
       fraction=st.sampled_from(FRACTIONS), k=st.integers(1, 9))
def test_item_sizes_fit_inside_every_group_of_any_plan(graph, memory, fraction, k):
    # Any valid plan (here cpsat's, and brute's balanced one at a drawn k) has Σ items + reserved <= S(P).
    items, reserved = item_sizes(LayerTable.from_graph(graph), memory=memory, chunk_fraction=fraction)
    index = {node: position for position, node in enumerate(graph.nodes)}
    for plan in (brute(graph, 100, memory=memory, chunk_fraction=fraction, k=min(k, graph.number_of_nodes())),
                 cpsat(graph, 100, memory=memory, chunk_fraction=fraction, workers=1)):
        if not plan.ok:
            continue
        sizes = group_sizes(graph, plan.partitions, memory=memory, chunk_fraction=fraction)
        for group, size in zip(plan.partitions, sizes):
            assert sum(int(items[index[node]]) for node in group) + reserved <= size


@settings(max_examples=60, deadline=None, derandomize=True)
@given(graph=chains(max_nodes=10, capacity=100), memory=st.sampled_from(MODELS), fraction=st.sampled_from(FRACTIONS))
def test_chain_lower_bound_is_exact(graph, memory, fraction):
    oracle = brute(graph, 100, memory=memory, chunk_fraction=fraction)
    if oracle.ok:
        assert lower_bound(LayerTable.from_graph(graph), 100, memory=memory, chunk_fraction=fraction) == oracle.k


@settings(max_examples=200, deadline=None, derandomize=True)
@given(values=st.lists(st.integers(0, 2**40), max_size=6),
       fraction=st.sampled_from([1.0, 0.5, 0.25, 1 / 3, 0.1, 2 / 3, 1 / 7]))
def test_scale_array_is_exact(values, fraction):
    assert scale_array(values, fraction).tolist() == [scale_activation(v, fraction) for v in values]
    numerator, denominator = float(fraction).as_integer_ratio()
    assert scale_array(values, fraction, ceil=False).tolist() == [v * numerator // denominator for v in values]


def test_scale_array_large_values_take_the_float_path_exactly():
    values = np.array([2**50, 3 * 2**48 + 1, 10**15], dtype=np.int64)
    assert scale_array(values, 1 / 3).tolist() == [scale_activation(int(v), 1 / 3) for v in values]


def test_buffer_only_nodes_at_exact_capacity():
    """Regression: the L2 bound's bin is C − min buffer; at 0 it must not claim n bins."""
    import networkx as nx

    graph = nx.DiGraph()
    for name in "ab":
        graph.add_node(name, weight_bytes=0, activation_bytes=0, buffer_bytes=10)
    assert lower_bound(LayerTable.from_graph(graph), 10) == 1
    for solver in (greedy, brute, cpsat):
        plan = solver(graph, 10)
        assert plan.k == 1 and plan.status == "OPTIMAL"
