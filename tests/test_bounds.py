import networkx as nx
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from cachefit import LayerTable, group_sizes
from cachefit.memory import MODELS as REGISTRY, MemoryModel, Terms, scale_activation
from cachefit.solvers import brute, cpsat, greedy
from cachefit.solvers.bounds import (all_bounds, forced_bytes, head_tail_bound, item_sizes, l2_bound, live_spans,
                                     lower_bound, path_bound, reachability, span_bound, sum_bound)
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
        assert lower_bound(table, 10) == 0
        assert all_bounds(table, 10) == {"sum": 0, "l2": 0, "path": 0, "head_tail": 0, "span": 0, "cut": 0}

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


def _skip_graph(scale=1):
    """a → b → c → d with a skip a → d: a's output stays live across the middle groups."""
    graph = nx.DiGraph()
    for node, weight, activation in (("a", 50, 40), ("b", 50, 0), ("c", 50, 0), ("d", 50, 0)):
        graph.add_node(node, weight_bytes=weight * scale, activation_bytes=activation * scale, buffer_bytes=0)
    graph.add_edges_from([("a", "b"), ("b", "c"), ("c", "d"), ("a", "d")])
    return graph


class TestSpanBound:
    def test_skip_edge_keeps_the_output_live_in_every_group_between(self):
        for scale in (1, 10**8, 10**10):
            graph = _skip_graph(scale)
            table = LayerTable.from_graph(graph)
            # a's 40 is live in every group up to d's: no two of the four 50s share one (50 + 50 + 40 > 100),
            # so a's output is live in 4 groups: 200 + 4·40 = 360 bytes > 3 groups.
            assert live_spans(table, 100 * scale).tolist() == [4, 1, 1, 1]
            assert sum_bound(table, 100 * scale) == 3
            assert span_bound(table, 100 * scale) == 4
            assert brute(graph, 100 * scale, memory="liveness").k == 4

    def test_additive_and_oversize_cases_give_nothing(self):
        table = LayerTable.from_graph(_skip_graph())
        assert span_bound(table, 100, memory="additive") == 0
        assert live_spans(LayerTable.chain([5, 5], [1, 1], [7, 7]), 7) is None  # no byte left after buffers

    def test_a_sink_spans_its_own_group(self):
        assert live_spans(LayerTable.chain([10]), 100).tolist() == [1]

    def test_reported_by_lower_bound(self):
        table = LayerTable.from_graph(_skip_graph())
        assert all_bounds(table, 100)["span"] == 4 == lower_bound(table, 100)


#: Byte scales of the fuzz: toy sizes and the sizes of real layers (1e8–1e12 bytes per node).
SCALES = [100, 10**8, 10**10, 10**12]


@settings(max_examples=200, deadline=None, derandomize=True)
@given(data=st.data(), scale=st.sampled_from(SCALES), fraction=st.sampled_from(FRACTIONS + [0.25]))
def test_span_bound_never_exceeds_the_optimum(data, scale, fraction):
    capacity = scale + data.draw(st.integers(0, 7))
    graph = data.draw(dags(max_nodes=9, capacity=capacity, max_activation=capacity // 2))
    oracle = brute(graph, capacity, memory="liveness", chunk_fraction=fraction)
    if not oracle.ok:
        return
    table = LayerTable.from_graph(graph)
    assert span_bound(table, capacity, chunk_fraction=fraction) <= oracle.k
    assert lower_bound(table, capacity, chunk_fraction=fraction) <= oracle.k


def random_case(rng, *, max_nodes):
    """A random DAG (edges low → high index) at a random byte scale, a capacity, a model and f."""
    n = int(rng.integers(1, max_nodes + 1))
    scale = int(rng.choice(SCALES))
    capacity = scale + int(rng.integers(0, 1000))
    probability = float(rng.choice([0.15, 0.35, 0.7]))
    graph = nx.DiGraph()
    for v in range(n):
        graph.add_node(str(v), weight_bytes=int(rng.integers(0, capacity // 2 + 1)),
                       activation_bytes=int(rng.integers(0, capacity // 3 + 1)),
                       buffer_bytes=int(rng.integers(0, capacity // 8 + 1)) if rng.random() < 0.3 else 0)
    graph.add_edges_from((str(u), str(v)) for u in range(n) for v in range(u + 1, n) if rng.random() < probability)
    return graph, capacity, str(rng.choice(MODELS)), float(rng.choice([1.0, 0.5, 1 / 3]))


#: Cases of the seeded fuzz; a longer run: CACHEFIT_FUZZ_CASES=5000 python -m pytest tests/test_bounds.py -k seeded
FUZZ_CASES = int(__import__("os").environ.get("CACHEFIT_FUZZ_CASES", "300"))


def test_seeded_fuzz_every_bound_against_brute():
    rng = np.random.default_rng(17)
    checked = 0
    for _ in range(FUZZ_CASES):
        graph, capacity, memory, fraction = random_case(rng, max_nodes=10)
        oracle = brute(graph, capacity, memory=memory, chunk_fraction=fraction)
        if not oracle.ok:
            continue
        bounds = all_bounds(LayerTable.from_graph(graph), capacity, memory=memory, chunk_fraction=fraction)
        assert max(bounds.values()) <= oracle.k, (bounds, oracle.k, memory, fraction, capacity,
                                                  [(v, d) for v, d in graph.nodes(data=True)], list(graph.edges))
        checked += 1
    assert checked > FUZZ_CASES // 3


# ---------------------------------------------------------------------------
# the bounds read the registry's terms: a model added there needs no edit here

def _peak_terms(table):
    """A toy model: S(P) = Σ weight + max (activation + buffer) (summed and peak terms, no live one)."""
    return Terms(table.weight, table.activation + table.buffer)


def _peak_reference(graph, groups, group_of, chunk_fraction):
    nodes = graph.nodes
    return [sum(nodes[v]["weight_bytes"] for v in group)
            + max(nodes[v]["activation_bytes"] + nodes[v]["buffer_bytes"] for v in group) for group in groups]


def _swapped_terms(table):
    """A toy model with all three terms, the buffer summed and the weight the peak."""
    return Terms(table.buffer, table.weight, table.activation)


def _swapped_reference(graph, groups, group_of, chunk_fraction):
    swapped = nx.DiGraph(graph)
    for v, data in swapped.nodes(data=True):
        data["weight_bytes"], data["buffer_bytes"] = data["buffer_bytes"], data["weight_bytes"]
    return REGISTRY["liveness"].reference(swapped, groups, group_of, chunk_fraction)


@pytest.fixture
def toy_models(monkeypatch):
    monkeypatch.setitem(REGISTRY, "peak", MemoryModel("peak", "toy", _peak_terms, _peak_reference))
    monkeypatch.setitem(REGISTRY, "swapped", MemoryModel("swapped", "toy", _swapped_terms, _swapped_reference))


def test_registry_models_by_hand(toy_models):
    table = LayerTable.chain([10, 20], [7, 3], [1, 9])
    assert forced_bytes(table, memory="peak") == 10 + 20 + 12
    items, reserved = item_sizes(table, memory="peak")
    assert items.tolist() == [10, 20] and reserved == 8
    assert forced_bytes(table, memory="swapped", chunk_fraction=0.5) == 1 + 9 + 20 + 5
    assert span_bound(table, 100, memory="peak") == 0  # no live term


def test_seeded_fuzz_registry_models_against_brute(toy_models):
    """Every bound stays at most brute's optimum under models the bounds never name (toys and +kv)."""
    rng = np.random.default_rng(29)
    checked = 0
    for _ in range(FUZZ_CASES // 2):
        graph, capacity, _, fraction = random_case(rng, max_nodes=9)
        for v in graph.nodes:
            graph.nodes[v]["kv_bytes"] = int(rng.integers(0, capacity // 4 + 1)) if rng.random() < 0.5 else 0
        memory = str(rng.choice(["peak", "swapped", "additive+kv", "liveness+kv"]))
        oracle = brute(graph, capacity, memory=memory, chunk_fraction=fraction)
        if not oracle.ok:
            continue
        table = LayerTable.from_graph(graph)
        bounds = all_bounds(table, capacity, memory=memory, chunk_fraction=fraction)
        assert max(bounds.values()) <= oracle.k, (bounds, oracle.k, memory)
        assert forced_bytes(table, memory=memory, chunk_fraction=fraction) <= sum(oracle.sizes)
        checked += 1
    assert checked > FUZZ_CASES // 8


def test_kv_resident_bytes_raise_the_bounds():
    """``liveness+kv`` counts the KV bytes in every bound (they were invisible before the terms)."""
    graph = nx.DiGraph()
    for v in "abc":
        graph.add_node(v, weight_bytes=30, activation_bytes=5, buffer_bytes=0, kv_bytes=30)
    graph.add_node("d", weight_bytes=0, activation_bytes=0, buffer_bytes=0)  # not a chain: every bound runs
    graph.add_edges_from([("a", "b"), ("b", "c")])
    table = LayerTable.from_graph(graph)
    assert set(all_bounds(table, 100, memory="liveness").values()) == {2}
    assert all_bounds(table, 100, memory="liveness+kv") == {"sum": 2, "l2": 3, "path": 3, "head_tail": 3, "span": 3,
                                                                  "cut": 3}
    assert brute(graph, 100, memory="liveness+kv").k == 3  # a, b and c each need a group of their own


def test_a_passed_deadline_leaves_out_only_the_quadratic_bounds():
    """With the deadline gone, the O(n·e) bounds (head–tail, span, cut) are 0 and the others unchanged."""
    from cachefit.instances.families import generate
    from cachefit.memory import as_table
    from cachefit.solvers._deadline import Deadline

    gone = Deadline(1.0, start=0.0, clock=lambda: 2.0)
    for memory in ("additive", "liveness"):
        graph, capacity = generate("dag-layered", 300, seed=3, capacity="tight", memory=memory)
        table = as_table(graph)
        full = all_bounds(table, capacity, memory=memory)
        cut = all_bounds(table, capacity, memory=memory, deadline=gone)
        assert cut == {**full, "head_tail": 0, "span": 0, "cut": 0}
        assert lower_bound(table, capacity, memory=memory, deadline=gone) == max(cut.values()) <= max(full.values())
        assert reachability(table, deadline=gone) is None
