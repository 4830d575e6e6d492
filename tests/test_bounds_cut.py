"""The cut bound (`cachefit.solvers.bounds.cut_bound`) and its flow-certified floors, against exhaustive oracles."""

import itertools

import networkx as nx
import numpy as np
import pytest
import scipy.sparse.csgraph
from hypothesis import given, settings, strategies as st

from cachefit import LayerTable, check
from cachefit.solvers import greedy
from cachefit.instances.families import generate
from cachefit.solvers import brute
from cachefit.solvers._deadline import Deadline
from cachefit.solvers import bounds as bounds_module
from cachefit.solvers.bounds import (all_bounds, cut_bound, cut_floors, lower_bound, min_boundaries, reachability,
                                     sum_bound)
from cachefit.testing import dags

#: Byte scales: toy sizes and the sizes of real layers (1e8–1e12 bytes per node).
SCALES = [1, 10**8, 10**10, 10**12]
FRACTIONS = [1.0, 0.5, 1 / 3]


def _scaled(graph, factor):
    """A copy of `graph` with every byte attribute multiplied by `factor`."""
    copy = nx.DiGraph(graph)
    for _, data in copy.nodes(data=True):
        for key in ("weight_bytes", "activation_bytes", "buffer_bytes"):
            data[key] = int(data[key]) * factor
    return copy


def _down_sets(table):
    """Every down-set (closed under predecessors) of a small table, as boolean arrays."""
    n = table.n
    predecessors = table.predecessors()
    for bits in itertools.product((False, True), repeat=n):
        if all(not bits[v] or all(bits[u] for u in predecessors[v]) for v in range(n)):
            yield np.array(bits, dtype=bool)


def _boundary(table, live, down):
    """live(∂D) straight from the definition: members of D with a successor outside D."""
    successors = table.successors()
    return sum(int(live[u]) for u in range(table.n) if down[u] and any(not down[z] for z in successors[u]))


class TestMinBoundaries:
    def test_chain_by_hand(self):
        table = LayerTable.chain([1, 1, 1, 1])
        first, last = np.array([1, 0, 0, 0], bool), np.array([0, 0, 0, 1], bool)
        assert min_boundaries(table, [9, 5, 7, 0], [(first, last)]) == [5]  # the cut after the 5
        assert min_boundaries(table, [9, 5, 7, 0], [(first, ~first)]) == [9]  # no choice: D is the first node

    def test_a_node_with_a_successor_on_each_side_is_always_on_the_boundary(self):
        graph = nx.DiGraph()
        for node, activation in (("a", 40), ("b", 1), ("c", 1)):
            graph.add_node(node, weight_bytes=0, activation_bytes=activation, buffer_bytes=0)
        graph.add_edges_from([("a", "b"), ("a", "c"), ("b", "c")])
        table = LayerTable.from_graph(graph)
        inside, outside = np.array([1, 0, 0], bool), np.array([0, 0, 1], bool)
        # D = {a} or {a, b}: a has c outside either way, so 40 (+1 for b in the second).
        assert min_boundaries(table, table.activation, [(inside, outside)]) == [40]

    @pytest.mark.parametrize("seed", range(40))
    def test_equals_the_minimum_over_every_down_set(self, seed):
        rng = np.random.default_rng(seed)
        n = int(rng.integers(1, 10))
        scale = int(rng.choice(SCALES))
        live = rng.integers(0, 1000, size=n) * scale
        edges = [(u, v) for u in range(n) for v in range(u + 1, n) if rng.random() < 0.35]
        graph = nx.DiGraph()
        for v in range(n):
            graph.add_node(str(v), weight_bytes=0, activation_bytes=int(live[v]), buffer_bytes=0)
        graph.add_edges_from((str(u), str(v)) for u, v in edges)
        table = LayerTable.from_graph(graph)
        reach = reachability(table)
        windows = []
        for _ in range(4):  # inside: the down-closure of some nodes; outside: the up-closure of others
            picks = rng.random(n) < 0.2
            inside = picks | reach[:, picks].any(axis=1)
            other = (rng.random(n) < 0.2) & ~inside
            outside = (other | reach[other].any(axis=0)) & ~inside
            windows.append((inside, outside))
        floors = min_boundaries(table, table.activation, windows)
        sets = list(_down_sets(table))
        total = 2 * int(table.activation.sum())
        for (inside, outside), floor in zip(windows, floors):
            exact = min(_boundary(table, table.activation, down) for down in sets
                        if not (inside & ~down).any() and not (outside & down).any())
            assert floor <= exact
            assert exact - floor <= n * (total // 2**29 + 1)  # only the flooring to an int32 network is lost

    def test_a_flow_the_check_rejects_leaves_only_the_forced_part(self, monkeypatch):
        real = scipy.sparse.csgraph.maximum_flow

        def inflated(network, source, sink, **options):
            result = real(network, source, sink, **options)
            result.flow.data[result.flow.data > 0] *= 3  # over capacity and no longer conserved
            return result

        table = LayerTable.chain([1, 1, 1, 1])
        first, last = np.array([1, 0, 0, 0], bool), np.array([0, 0, 0, 1], bool)
        monkeypatch.setattr(scipy.sparse.csgraph, "maximum_flow", inflated)
        assert min_boundaries(table, [9, 5, 7, 3], [(first, last)]) == [0]
        assert min_boundaries(table, [9, 5, 7, 3], [(first, ~first)]) == [9]  # forced, no flow needed


class TestCutBound:
    def test_chain_by_hand(self):
        table = LayerTable.chain([60, 60, 60], [10, 10, 0])
        assert cut_bound(table, 100) == 3 > sum_bound(table, 100)

    def test_models_without_a_live_term_and_no_room_give_nothing(self):
        table = LayerTable.chain([60, 60, 60], [10, 10, 0])
        assert cut_bound(table, 100, memory="additive") == 0
        assert cut_floors(table, 100, memory="additive") is None
        assert cut_bound(LayerTable.chain([5, 5], [1, 1], [7, 7]), 7) == 0  # no byte left after the buffers
        assert cut_bound(LayerTable.chain([]), 10) == 0

    def test_a_passed_deadline_leaves_the_slices_not_reached_at_zero(self, monkeypatch):
        monkeypatch.setattr(bounds_module, "CUT_BATCH", 40)  # undecided nodes per backend call: several calls
        graph, capacity = generate("dag-layered", 120, seed=2, capacity="tight", memory="liveness")
        table = LayerTable.from_graph(graph)
        reach = reachability(table)
        reads = []  # every look at the clock is a second later

        def clock():
            reads.append(None)
            return float(len(reads))

        full = cut_floors(table, capacity, reach=reach, deadline=Deadline(1000.0, start=0.0, clock=clock))[2]
        calls = len(reads)  # one look before the closure sums, then one before each backend call
        assert calls > 4
        reads.clear()
        cut = cut_floors(table, capacity, reach=reach, deadline=Deadline(calls // 2 + 0.5, start=0.0, clock=clock))[2]
        solved = np.flatnonzero(cut)
        assert solved.size and (cut[solved] == full[solved]).all()  # the calls made give what they gave before
        assert np.flatnonzero(full).size > solved.size and not cut[solved.max() + 1:].any()
        gone = Deadline(1.0, start=0.0, clock=lambda: 2.0)
        assert cut_floors(table, capacity, reach=reach, deadline=gone) is None
        assert cut_bound(table, capacity, reach=reach, deadline=gone) == 0

    def test_wide_graphs_get_wider_slices(self, monkeypatch):
        graph, capacity = generate("dag-layered", 300, seed=1, capacity="tight", memory="liveness")
        table = LayerTable.from_graph(graph)
        fine = cut_floors(table, capacity)
        monkeypatch.setattr(bounds_module, "CUT_WORK", 500)
        coarse = cut_floors(table, capacity)
        assert coarse[0].size < fine[0].size
        assert sum_bound(table, capacity) < cut_bound(table, capacity) <= all_bounds(table, capacity)["cut"]

    def test_long_narrow_graphs_get_fewer_slices(self):
        """A 4,000-node DAG two nodes wide: 16 slices per group would be ~43,000 passes over the whole graph."""
        rng = np.random.default_rng(1)
        graph = nx.DiGraph()
        for v in range(4_000):
            graph.add_node(str(v), weight_bytes=int(rng.integers(10**9, 10**9 + 1_000)),
                           activation_bytes=int(rng.integers(10**6, 10**7)), buffer_bytes=0)
            for u in {v - 2 - v % 2, v - 1 - v % 2} if v >= 2 else ():
                graph.add_edge(str(u), str(v))
        table = LayerTable.from_graph(graph)
        capacity = 3 * 10**9 // 2
        lows, highs, floors = cut_floors(table, capacity)
        per_slice = table.n + table.sources.size + bounds_module.CUT_SLICE_CALL
        assert lows.size * per_slice <= bounds_module.CUT_SLICE_WORK + per_slice
        assert lows[0] == 0 and highs[-1] == int((table.weight + table.activation).sum())
        plan = greedy(graph, capacity)
        assert plan.ok and check(plan).ok
        assert sum_bound(table, capacity) <= cut_bound(table, capacity) <= plan.k

    def test_floors_bound_every_down_set_in_their_slice(self):
        capacity = 10**10
        graph = _small_layered(np.random.default_rng(4), 11, capacity)
        table = LayerTable.from_graph(graph)
        lows, highs, floors = cut_floors(table, capacity)
        items = table.weight + table.activation  # liveness items at f = 1
        reached = 0
        for down in _down_sets(table):
            held = int(items[down].sum())
            j = int(np.searchsorted(lows, held, side="right")) - 1
            assert lows[j] <= held <= highs[j] and floors[j] >= 0
            assert floors[j] <= _boundary(table, table.activation, down)
            reached += floors[j] > 0
        assert reached

    def test_bench_instance_rises_above_every_other_bound(self):
        """The bench's tight dag-layered n = 250 (seed 0): the outputs live across the cuts need 3 groups more."""
        graph, capacity = generate("dag-layered", 250, seed=0, capacity="tight", memory="liveness")
        bounds = all_bounds(LayerTable.from_graph(graph), capacity, memory="liveness")
        others = max(value for name, value in bounds.items() if name != "cut")
        assert bounds["cut"] >= others + 3
        assert lower_bound(LayerTable.from_graph(graph), capacity) == bounds["cut"]


def _small_layered(rng, n, capacity):
    """A small layered DAG like the bench's: layers of width 1–3, fan-in 1–2, every output consumed by the next
    layer, weights up to C/3 and activations up to C/5, so that the outputs live across a cut weigh."""
    graph, layers, count = nx.DiGraph(), [], 0
    while count < n:
        width = min(int(rng.integers(1, 4)), n - count)
        layers.append([str(count + i) for i in range(width)])
        count += width
    for depth, layer in enumerate(layers):
        for node in layer:
            graph.add_node(node, weight_bytes=int(rng.integers(0, capacity // 3 + 1)),
                           activation_bytes=int(rng.integers(0, capacity // 5 + 1)),
                           buffer_bytes=int(rng.integers(0, capacity // 20)) if rng.random() < 0.2 else 0,
                           kv_bytes=int(rng.integers(0, capacity // 10)) if rng.random() < 0.3 else 0)
        if depth == 0:
            continue
        previous = layers[depth - 1]
        for node in layer:
            for source in rng.choice(previous, size=int(rng.integers(1, min(2, len(previous)) + 1)), replace=False):
                graph.add_edge(str(source), node)
        for source in previous:
            if graph.out_degree(source) == 0:
                graph.add_edge(source, layer[int(rng.integers(len(layer)))])
    return graph


def test_seeded_fuzz_layered_dags_against_brute():
    """Small layered DAGs at real byte scales, three models, f < 1 too: every bound ≤ brute's optimum, and the
    cut bound is the best one in a good share of the cases."""
    rng = np.random.default_rng(41)
    checked = above = 0
    for _ in range(200):
        n = int(rng.integers(6, 12))
        capacity = 10 ** int(rng.integers(8, 13)) + int(rng.integers(0, 1000))
        graph = _small_layered(rng, n, capacity)
        memory = str(rng.choice(["liveness", "liveness", "liveness+kv", "additive"]))
        fraction = float(rng.choice(FRACTIONS))
        oracle = brute(graph, capacity, memory=memory, chunk_fraction=fraction)
        if not oracle.ok:
            continue
        table = LayerTable.from_graph(graph)
        bounds = all_bounds(table, capacity, memory=memory, chunk_fraction=fraction)
        assert max(bounds.values()) <= oracle.k, (memory, fraction, capacity, bounds, oracle.k,
                                                  list(graph.nodes(data=True)), list(graph.edges))
        checked += 1
        above += bounds["cut"] > max(value for name, value in bounds.items() if name != "cut")
    assert checked > 150
    assert above >= 10


@settings(max_examples=200, deadline=None, derandomize=True)
@given(data=st.data(), scale=st.sampled_from(SCALES), fraction=st.sampled_from(FRACTIONS + [0.25]))
def test_cut_bound_never_exceeds_the_optimum(data, scale, fraction):
    capacity = 100 * scale + data.draw(st.integers(0, 7))
    graph = data.draw(dags(max_nodes=9, capacity=100, max_activation=50))
    graph = _scaled(graph, scale)
    oracle = brute(graph, capacity, memory="liveness", chunk_fraction=fraction)
    if not oracle.ok:
        return
    assert cut_bound(LayerTable.from_graph(graph), capacity, chunk_fraction=fraction) <= oracle.k


def test_a_capacity_beyond_2_62_counts_as_2_62():
    """Every group of a valid graph fits 2**62 bytes, so a larger capacity changes no bound (it crashed L2)."""
    graph, capacity = generate("dag-layered", 60, seed=0, capacity="tight", memory="liveness")
    table = LayerTable.from_graph(graph)
    for huge in (2**62, 2**63, 10**30):
        assert lower_bound(table, huge) == 1
        assert set(all_bounds(table, huge).values()) <= {0, 1}
