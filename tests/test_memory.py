import re

import networkx as nx
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from cachefit import InputError, LayerTable, group_sizes
from cachefit.checker import check
from cachefit.memory import (MEMORY_MODELS, MODELS, Intervals, MemoryModel, OpenGroup, Terms, alone_sizes,
                             scale_activation, sizes_alone)
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
        with pytest.raises(InputError, match=r"`memory` must be one of 'additive', 'liveness', 'additive\+kv', 'liveness\+kv', got 'lru'"):
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


def dag_grouping(draw, graph):
    """Any valid grouping of a DAG (not only runs): a drawn group index per node, pushed up past its inputs."""
    nodes = list(graph.nodes)
    part = {}
    for v in nodes:  # nodes are in topological order
        drawn = draw(st.integers(0, len(nodes)))
        part[v] = max([drawn, *(part[u] for u in graph.predecessors(v))])
    used = sorted(set(part.values()))
    return [[v for v in nodes if part[v] == index] for index in used]


MODEL_NAMES = st.sampled_from(sorted(MODELS))
FRACTIONS = st.sampled_from([1.0, 0.5, 1 / 3, 0.01])


class TestRegistry:
    def test_names(self):
        assert MEMORY_MODELS == tuple(MODELS) == ("additive", "liveness", "additive+kv", "liveness+kv")
        assert all(model.name == name for name, model in MODELS.items())

    @given(st.data())
    def test_engine_matches_reference_on_any_dag_grouping(self, data):
        """Each entry's two halves agree: the engine over its terms and its plain-Python reference."""
        g = data.draw(graphs(min_nodes=1))
        memory, fraction = data.draw(MODEL_NAMES), data.draw(FRACTIONS)
        groups = dag_grouping(data.draw, g)
        group_of = {v: index for index, group in enumerate(groups) for v in group}
        reference = MODELS[memory].reference(g, groups, group_of, fraction)
        assert group_sizes(g, groups, memory=memory, chunk_fraction=fraction) == reference

    def test_checker_reads_the_registry(self, monkeypatch):
        """A model registered at run time is checked with its own reference, not a hard-coded list."""
        def weights_only(table):
            return Terms(table.weight)

        def reference(graph, groups, group_of, chunk_fraction):
            return [sum(graph.nodes[v]["weight_bytes"] for v in group) for group in groups]

        monkeypatch.setitem(MODELS, "weights", MemoryModel("weights", "S(P) = Σ weight", weights_only, reference))
        g = diamond()
        groups = [["in", "left"], ["right", "out"]]
        assert group_sizes(g, groups, memory="weights") == [3, 7]
        plan = Plan(tuple(map(tuple, groups)), (3, 7), 10, "weights", 1.0, "test", Status.FEASIBLE, 2, 1, 7, 0.0,
                    graph=g)
        assert check(plan).ok
        wrong = Plan(tuple(map(tuple, groups)), (3, 8), 10, "weights", 1.0, "test", Status.FEASIBLE, 2, 1, 8, 0.0,
                     graph=g)
        assert "stated sizes [3, 8] differ from recomputed [3, 7]" in check(wrong).violations[0]
        monkeypatch.delitem(MODELS, "weights")
        assert check(plan).violations == ("unknown memory model 'weights'",)


class TestEngineQueries:
    @settings(max_examples=60, deadline=None)
    @given(st.data())
    def test_probes_match_a_scan(self, data):
        """end / begin / count / cuts / sizes_of agree with sizes evaluated one run at a time."""
        g = data.draw(graphs(min_nodes=1))
        memory, fraction = data.draw(MODEL_NAMES), data.draw(FRACTIONS)
        table = LayerTable.from_graph(g)
        runs = Intervals(table, memory, fraction)
        n = table.n
        size = {(s, e): runs.size(s, e) for s in range(n) for e in range(s + 1, n + 1)}
        reference = group_sizes(g, [list(table.ids)], memory=memory, chunk_fraction=fraction)
        assert size[0, n] == reference[0]
        cap = data.draw(st.integers(0, max(size.values()) + 1))
        for s in range(n):
            fitting = [e for e in range(s + 1, n + 1) if size[s, e] <= cap]
            assert runs.end(s, cap) == max(fitting, default=s)
        for e in range(1, n + 1):
            fitting = [s for s in range(e) if size[s, e] <= cap]
            assert runs.begin(e, cap) == min(fitting, default=e)
        starts, ends = np.array([s for s, _ in size]), np.array([e for _, e in size])
        assert runs.sizes_of(starts, ends).tolist() == list(size.values())
        bounds, stuck = runs.cuts(cap)
        if bounds is None:
            assert runs.count(cap, n)[0] == n + 1 and runs.end(stuck, cap) == stuck
        else:
            assert runs.count(cap, n) == (len(bounds) - 1, max(runs.sizes(bounds)))

    def test_modes(self):
        plain, buffered = LayerTable.chain([5, 6], [1, 1]), LayerTable.chain([5, 6], [1, 1], [0, 2])
        assert Intervals(plain, "additive").mode == "exact"
        assert Intervals(buffered, "additive").mode == "exact"
        assert Intervals(plain, "liveness").mode == "exact"
        assert Intervals(plain, "liveness", 0.5).mode == "float"
        assert Intervals(buffered, "liveness").mode == "search"

    @given(st.data())
    def test_alone_sizes(self, data):
        """On a chain a node alone is the run of one; in a DAG, no group holding the node is smaller."""
        g = data.draw(graphs(min_nodes=1))
        memory, fraction = data.draw(MODEL_NAMES), data.draw(FRACTIONS)
        table = LayerTable.from_graph(g)
        alone = alone_sizes(table, memory, fraction)
        runs = Intervals(table, memory, fraction)
        if table.is_chain:
            assert alone.tolist() == [runs.size(p, p + 1) for p in range(table.n)]
        groups = dag_grouping(data.draw, g)
        for group, size in zip(groups, group_sizes(g, groups, memory=memory, chunk_fraction=fraction)):
            assert all(alone[table.ids.index(v)] <= size for v in group)

    def test_sizes_alone_counts_the_callers_live_bytes(self):
        table = LayerTable.chain([10, 0], [4, 8], [3, 0])
        assert sizes_alone(table, "liveness", 0.5, [4, 12]).tolist() == [10 + 3 + 2, 6]
        assert sizes_alone(table, "additive", 0.5, None).tolist() == [17, 8]
        assert sizes_alone(table, "liveness", 1.0, np.array([2**70, 0], dtype=object))[0] == 13 + 2**70


class TestSuccessorsAndReorder:
    def test_successors_mirror_predecessors(self):
        table = LayerTable.from_graph(diamond())
        assert table.successors() == [[1, 2], [3], [3], []]
        assert table.predecessors() == [[], [0], [0], [1, 2]]

    def test_reorder_is_the_table_of_the_reordered_graph(self):
        g = diamond()
        reordered = LayerTable.from_graph(g).reorder([0, 2, 1, 3])
        h = nx.DiGraph()
        for node in ["in", "right", "left", "out"]:
            h.add_node(node, **g.nodes[node])
        h.add_edges_from(g.edges)
        expected = LayerTable.from_graph(h)
        assert reordered.ids == expected.ids and reordered.graph is None
        for name in ("weight", "activation", "buffer", "last_use"):
            assert getattr(reordered, name).tolist() == getattr(expected, name).tolist()
        assert sorted(zip(reordered.sources.tolist(), reordered.targets.tolist())) == sorted(
            zip(expected.sources.tolist(), expected.targets.tolist()))
        assert not reordered.is_chain and LayerTable.chain([1, 2]).reorder([0, 1]).is_chain

    def test_reorder_carries_flops(self):
        assert LayerTable.chain([1, 2], flops=[7, 9]).reorder([1, 0]).flops.tolist() == [9, 7]


class TestFlatten:
    """`LayerTable.from_graph` reads whole columns at once; the per-node pass only names a fault."""

    def test_edges_off_the_next_node_are_placed_exactly(self):
        g = diamond()
        g.add_node("tail", weight_bytes=1, activation_bytes=1, buffer_bytes=0)
        g.add_edges_from([("in", "tail"), ("left", "tail")])
        table = LayerTable.from_graph(g)
        position = {node: index for index, node in enumerate(g)}
        assert list(zip(table.sources.tolist(), table.targets.tolist())) == [
            (position[u], position[v]) for u, v in g.edges]

    def test_views_and_equal_but_distinct_id_objects(self):
        g = nx.DiGraph()
        names = ["node" + str(index) for index in range(5)]
        for name in names:
            g.add_node(name, weight_bytes=np.int64(3), activation_bytes=1, buffer_bytes=np.uint8(0))
        g.add_edges_from(("node" + str(index), "node" + str(index + 1)) for index in range(4))  # new str objects
        g.add_edge("node0", "node3")
        view = g.subgraph(names[:4])
        table = LayerTable.from_graph(view)
        assert table.ids == tuple(names[:4]) and table.weight.tolist() == [3] * 4
        assert sorted(zip(table.sources.tolist(), table.targets.tolist())) == [(0, 1), (0, 3), (1, 2), (2, 3)]

    @pytest.mark.parametrize("value, shown", [(True, "True"), (1.0, "1.0"), (2**63, str(2**63)), ("1", "'1'"),
                                              (None, "None")])
    def test_bad_values_are_named(self, value, shown):
        g = diamond()
        g.nodes["right"]["buffer_bytes"] = value
        message = (f"node 'right': `buffer_bytes` {value} is beyond 2**62 B" if value == 2**63 else
                   f"node 'right': `buffer_bytes` must be a non-negative integer, got {shown}")
        with pytest.raises(InputError, match="^" + re.escape(message)):
            LayerTable.from_graph(g)

    def test_first_bad_node_is_named_across_attributes(self):
        g = diamond()
        del g.nodes["left"]["activation_bytes"]
        g.nodes["out"]["weight_bytes"] = -1
        with pytest.raises(InputError, match=r"^node 'left': missing `activation_bytes`"):
            LayerTable.from_graph(g)

    def test_backward_edge_and_cycle_messages(self):
        g = diamond()
        g.add_edge("out", "in")
        with pytest.raises(InputError, match=r"^the graph has a cycle: "):
            LayerTable.from_graph(g)
        h = nx.DiGraph()
        for name in "ab":
            h.add_node(name, weight_bytes=1, activation_bytes=0, buffer_bytes=0)
        h.add_edge("b", "a")
        with pytest.raises(InputError, match=r"^node order is not topological: edge 'b' -> 'a' goes backwards"):
            LayerTable.from_graph(h)
        h.add_edge("a", "a")
        with pytest.raises(InputError, match=r"^the graph has a cycle: self-loop on node 'a'"):
            LayerTable.from_graph(h)


class TestOpenGroup:
    @given(st.data())
    def test_matches_group_sizes_node_by_node(self, data):
        """Building the groups of a run cut node by node gives the engine's sizes at every step."""
        g = data.draw(graphs(min_nodes=1))
        memory, fraction = data.draw(MODEL_NAMES), data.draw(FRACTIONS)
        table = LayerTable.from_graph(g)
        runs = Intervals(table, memory, fraction)
        bounds = np.cumsum([0] + [len(group) for group in random_partition(data.draw, g)])
        group = OpenGroup(MODELS[memory].terms(table), fraction)
        for start, end in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            group.reset(int(runs.incoming[start]) if runs.has_live else 0)
            for v in range(start, end):
                expected = runs.size(start, v + 1)
                assert group.size_with(v) == expected and group.add(v) == expected
            assert group.members == list(range(start, end))
