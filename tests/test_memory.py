import networkx as nx
import numpy as np
import pytest
from hypothesis import given, strategies as st

from cachefit import InputError, LayerTable, group_sizes
from cachefit.checker import check
from cachefit.memory import Intervals, scale_activation
from cachefit.result import Plan, Status
from strategies import graphs


def diamond():
    g = nx.DiGraph()
    for name, (w, a, b) in {"in": (1, 10, 0), "left": (2, 20, 5), "right": (3, 30, 7), "out": (4, 40, 0)}.items():
        g.add_node(name, weight_bytes=w, activation_bytes=a, buffer_bytes=b)
    g.add_edges_from([("in", "left"), ("in", "right"), ("left", "out"), ("right", "out")])
    return g


def random_partition(draw, graph):
    """Cut the node order into contiguous runs (always valid)."""
    nodes = list(graph.nodes)
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(nodes) - 1)), max_size=len(nodes))))
    cuts = [c for c in cuts if 0 < c < len(nodes)]
    bounds = [0, *cuts, len(nodes)]
    return [nodes[s:e] for s, e in zip(bounds[:-1], bounds[1:]) if e > s]


class TestGroupSizes:
    def test_diamond_by_hand(self):
        g = diamond()
        assert group_sizes(g, [["in", "left"], ["right", "out"]], memory="additive") == [38, 84]
        # group 1 holds right and out, plus "in" (consumed by right) and "left" (consumed by out).
        assert group_sizes(g, [["in", "left"], ["right", "out"]], memory="liveness") == [3 + 5 + 30, 7 + 7 + 100]
        assert group_sizes(g, [["in"], ["left"], ["right"], ["out"]], memory="liveness") == [
            1 + 10, 2 + 5 + 30, 3 + 7 + 10 + 20 + 30, 4 + 0 + 20 + 30 + 40]

    def test_chunk_fraction_rounds_up_exactly(self):
        g = diamond()
        sizes = group_sizes(g, [["in", "left", "right", "out"]], memory="liveness", chunk_fraction=1 / 3)
        assert sizes == [10 + 7 + 34]  # ceil(100 / 3) = 34

    def test_scale_activation_exact(self):
        # 1/3 as a float is a little below 1/3, so the exact product is just under 10**15.
        assert scale_activation(3 * 10**15, 1 / 3) == 10**15
        assert scale_activation(3 * 10**15 + 1, 1 / 3) == 10**15 + 1
        assert scale_activation(7, 0.1) == 1  # 0.1 as a float is a little above 1/10
        assert scale_activation(0, 0.5) == 0
        assert scale_activation(10**18, 0.25) == 25 * 10**16

    def test_bad_partitions(self):
        g = diamond()
        with pytest.raises(InputError, match=r"`partitions`: unknown node 'x'"):
            group_sizes(g, [["x"]])
        with pytest.raises(InputError, match=r"`partitions`: node 'in' appears twice"):
            group_sizes(g, [["in"], ["in", "left", "right", "out"]])
        with pytest.raises(InputError, match=r"`partitions`: node 'out' is in no group"):
            group_sizes(g, [["in", "left", "right"]])

    def test_bad_model_and_fraction(self):
        with pytest.raises(InputError, match=r"`memory` must be one of 'additive', 'liveness', got 'lru'"):
            group_sizes(diamond(), [list(diamond())], memory="lru")
        for bad in (0, 1.5, -0.1, "half", True):
            with pytest.raises(InputError, match=r"`chunk_fraction` must be a number in \(0, 1\]"):
                group_sizes(diamond(), [list(diamond())], chunk_fraction=bad)

    @given(st.data())
    def test_liveness_never_below_weight_sum(self, data):
        g = data.draw(graphs(min_nodes=1))
        partition = random_partition(data.draw, g)
        sizes = group_sizes(g, partition, memory="liveness", chunk_fraction=data.draw(st.sampled_from([1.0, 0.5, 0.3])))
        for group, size in zip(partition, sizes):
            assert size >= sum(g.nodes[v]["weight_bytes"] for v in group)

    @given(st.data())
    def test_models_agree_without_activations_and_buffers(self, data):
        g = data.draw(graphs(min_nodes=1, activations=False, buffers=False))
        partition = random_partition(data.draw, g)
        assert group_sizes(g, partition, memory="additive") == group_sizes(g, partition, memory="liveness")

    @given(st.data())
    def test_agrees_with_independent_checker(self, data):
        g = data.draw(graphs(min_nodes=1))
        memory = data.draw(st.sampled_from(["additive", "liveness"]))
        fraction = data.draw(st.sampled_from([1.0, 0.5, 1 / 3, 0.01]))
        partition = random_partition(data.draw, g)
        sizes = group_sizes(g, partition, memory=memory, chunk_fraction=fraction)
        plan = Plan(tuple(map(tuple, partition)), tuple(sizes), 10**9, memory, fraction, "test", Status.FEASIBLE,
                    len(partition), 1, max(sizes), 0.0, graph=g)
        report = check(plan)
        assert report.sizes == tuple(sizes)


class TestIntervals:
    @given(st.data())
    def test_runs_match_group_sizes(self, data):
        g = data.draw(graphs(min_nodes=1))
        memory = data.draw(st.sampled_from(["additive", "liveness"]))
        fraction = data.draw(st.sampled_from([1.0, 0.5, 1 / 3]))
        partition = random_partition(data.draw, g)
        intervals = Intervals(LayerTable.from_graph(g), memory, fraction)
        bounds = np.cumsum([0] + [len(group) for group in partition])
        assert intervals.sizes(bounds).tolist() == group_sizes(g, partition, memory=memory, chunk_fraction=fraction)

    def test_longest_fit_exact_fit(self):
        table = LayerTable.chain([10, 20, 30], activation=[1, 1, 1])
        intervals = Intervals(table, "liveness")
        assert intervals.size(0, 2) == 32
        assert intervals.longest_fit(0, 32) == 2
        assert intervals.longest_fit(0, 31) == 1
        assert intervals.longest_fit(2, 29) == 2  # node 2 needs 30 + 1 + 1


class TestLayerTable:
    def test_chain_fast_path_matches_graph(self):
        from cachefit.graphs import from_layers
        weights = [5, 0, 7, 3]
        a = LayerTable.chain(weights)
        b = LayerTable.from_graph(from_layers(weights))
        assert a.ids == b.ids and a.is_chain and b.is_chain
        assert a.last_use.tolist() == b.last_use.tolist() == [1, 2, 3, 3]

    def test_bad_arrays(self):
        with pytest.raises(InputError, match=r"`weight` must hold non-negative integers of bytes"):
            LayerTable.chain([1, -2])
        with pytest.raises(InputError, match=r"`weight` must hold non-negative integers of bytes"):
            LayerTable.chain([1.5, 2.0])
        with pytest.raises(InputError, match=r"must have the same length"):
            LayerTable.chain([1, 2], activation=[1])

    def test_diamond_is_not_chain(self):
        assert not LayerTable.from_graph(diamond()).is_chain
