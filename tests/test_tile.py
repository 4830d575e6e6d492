"""Tests for `cachefit.graphs.tile`: splitting oversize layers into tiles that fit."""

import networkx as nx
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import cachefit
from cachefit import instances
from cachefit.errors import InputError
from cachefit.graphs import from_layers, tile, transformer, validate
from cachefit.memory import Intervals, LayerTable, group_sizes
from cachefit.result import Status
from cachefit.solvers import greedy

MiB = 2**20


def layer(name, weight, activation=0, *, op="linear", units=64, buffer=0):
    key = {"embedding": "embedding_dim", "expert": "intermediate_size"}.get(op, "out_features")
    return {"name": name, "weight_bytes": weight, "activation_bytes": activation, "buffer_bytes": buffer,
            "op": op, key: units}


def chain(*layers, name="chain"):
    """A chain graph whose nodes keep every key of `layers` (from_layers keeps only a few)."""
    graph = nx.DiGraph(name=name)
    previous = None
    for entry in layers:
        entry = dict(entry)
        node = entry.pop("name")
        graph.add_node(node, **entry)
        if previous is not None:
            graph.add_edge(previous, node)
        previous = node
    return validate(graph)


def weights(graph):
    return sum(data["weight_bytes"] for _, data in graph.nodes(data=True))


def assert_checked(plan):
    report = cachefit.check(plan)
    assert report.ok, report.violations
    assert all(size <= plan.capacity for size in plan.sizes)


class TestNoOp:
    def test_nothing_oversize_leaves_the_graph_as_it_is(self):
        graph = chain(layer("a", 30, 5), layer("b", 40, 5), layer("c", 10, 5))
        tiled = tile(graph, 100)
        assert tiled is not graph
        assert list(tiled.nodes(data=True)) == list(graph.nodes(data=True))
        assert list(tiled.edges) == list(graph.edges)
        assert tiled.graph["tiled"] == {} and tiled.graph["untiled"] == {}

    def test_llama_blocks_that_fit_are_kept(self):
        graph = instances.load("gpt2", seq_len=64)
        tiled = tile(graph, "1GiB")
        assert list(tiled) == list(graph) and tiled.graph["tiled"] == {}

    def test_input_graph_is_not_modified(self):
        graph = chain(layer("a", 300, 8, units=8), layer("b", 20, 4))
        before = (list(graph.nodes(data=True)), list(graph.edges), dict(graph.graph))
        tile(graph, 100)
        assert (list(graph.nodes(data=True)), list(graph.edges), dict(graph.graph)) == before


class TestConcatTiles:
    def test_fewest_equal_tiles(self):
        # 1000 B over 100 output units (10 B each), no activations, C = 300: 4 tiles of 250 B;
        # 3 tiles would hold 340 B (34 units) > 300.
        tiled = tile(chain(layer("fc", 1000, 0, units=100)), 300)
        assert tiled.graph["tiled"] == {"fc": {"tiles": 4, "join": "cat", "axis": "out_features"}}
        assert [tiled.nodes[f"fc.tile.{i}"]["weight_bytes"] for i in range(4)] == [250] * 4
        assert [tiled.nodes[f"fc.tile.{i}"]["out_features"] for i in range(4)] == [25] * 4

    def test_structure_attributes_and_liveness(self):
        graph = chain(layer("x", 0, 64, op="input"), layer("fc", 900, 96, units=12), layer("y", 10, 8))
        tiled = tile(graph, 400)
        n = tiled.graph["tiled"]["fc"]["tiles"]
        tiles = [f"fc.tile.{i}" for i in range(n)]
        assert list(tiled) == ["x", *tiles, "fc", "y"]  # the join keeps the parent's id
        for index, name in enumerate(tiles):
            data = tiled.nodes[name]
            assert data["tile"] == (index, n) and data["parent"] == "fc" and data["op"] == "linear"
            # the input stays live for every tile: each one reads it
            assert list(tiled.predecessors(name)) == ["x"]
            assert list(tiled.successors(name)) == ["fc"]
        assert sum(tiled.nodes[t]["weight_bytes"] for t in tiles) == 900
        assert sum(tiled.nodes[t]["activation_bytes"] for t in tiles) == 96
        assert sum(tiled.nodes[t]["out_features"] for t in tiles) == 12
        assert [tiled.nodes[t]["tile_offset"] for t in tiles] == [12 // n * i for i in range(n)]
        join = tiled.nodes["fc"]
        assert (join["op"], join["join"], join["weight_bytes"], join["activation_bytes"]) == ("concat", "cat", 0, 96)
        assert (join["parent"], join["tiles"]) == ("fc", n)
        assert list(tiled.successors("fc")) == ["y"]
        # each tile alone, in order: its weights + the input + the slices made so far
        produced = 0
        for name in tiles:
            produced += tiled.nodes[name]["activation_bytes"]
            assert tiled.nodes[name]["weight_bytes"] + 64 + produced <= 400
        # the concat's group holds the slices and the joined copy: 2 x 96
        assert group_sizes(tiled, [["x"], *[[t] for t in tiles], ["fc"], ["y"]])[-2] == 2 * 96

    def test_weights_preserved_exactly_with_uneven_units(self):
        graph = chain(layer("fc", 1_000_003, 77, units=7))
        tiled = tile(graph, 200_000)
        n = tiled.graph["tiled"]["fc"]["tiles"]
        assert weights(tiled) == 1_000_003
        shares = [tiled.nodes[f"fc.tile.{i}"]["weight_bytes"] for i in range(n)]
        assert sum(shares) == 1_000_003 and max(shares) <= 200_000

    def test_params_and_flops_split_exactly(self):
        graph = instances.load("llama-3.1-8b", seq_len=16, granularity="op")
        tiled = tile(graph, "h100-l2")
        for parent in tiled.graph["tiled"]:
            tiles = [v for v, d in tiled.nodes(data=True) if d.get("parent") == parent and "tile" in d]
            for key in ("params", "flops", "weight_bytes"):
                assert sum(tiled.nodes[v][key] for v in tiles) == graph.nodes[parent][key]
        assert weights(tiled) == weights(graph)
        assert sum(d["params"] for _, d in tiled.nodes(data=True)) == graph.graph["params"]

    def test_additive_model(self):
        graph = chain(layer("a", 500, 40, units=50), layer("b", 50, 10))
        tiled = tile(graph, 150, memory="additive")
        for name, data in tiled.nodes(data=True):
            assert data["weight_bytes"] + data["activation_bytes"] + data["buffer_bytes"] <= 150
        plan = greedy(tiled, 150, memory="additive")
        assert plan.ok
        assert_checked(plan)


class TestExpertTiles:
    CONFIG = {"model_type": "mixtral", "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 512, "vocab_size": 0, "num_local_experts": 4,
              "num_experts_per_tok": 2}

    def test_partial_sums_joined_by_a_sum(self):
        graph = transformer(self.CONFIG, batch=1, seq_len=8, granularity="op")
        parent = "block.0.expert.0"
        expert = graph.nodes[parent]
        capacity = expert["weight_bytes"] // 3
        tiled = tile(graph, capacity)
        entry = tiled.graph["tiled"][parent]
        assert entry["join"] == "sum" and entry["axis"] == "intermediate_size"
        n = entry["tiles"]
        tiles = [f"{parent}.tile.{i}" for i in range(n)]
        for name in tiles:
            # each tile reads the expert's input (and the router edge) and makes a full-width partial sum
            assert set(tiled.predecessors(name)) == {"block.0.mlp_norm", "block.0.router"}
            assert list(tiled.successors(name)) == [parent]
            assert tiled.nodes[name]["activation_bytes"] == expert["activation_bytes"]
        join = tiled.nodes[parent]
        assert (join["op"], join["join"], join["weight_bytes"]) == ("concat", "sum", 0)
        assert "block.0.combine" in set(tiled.successors(parent))
        assert sum(tiled.nodes[t]["intermediate_size"] for t in tiles) == 512
        assert sum(tiled.nodes[t]["params"] for t in tiles) == expert["params"]
        assert weights(tiled) == weights(graph)
        plan = cachefit.plan(tiled, capacity)
        assert plan.ok
        assert_checked(plan)

    def test_fewest_tiles_with_partial_sums_live(self):
        # input 50 B, expert 1800 B of weights, each partial sum 50 B: tile i alone holds its
        # 1800/n B, the input and the i + 1 partial sums made so far.  Last tile: 1800/n + 50 + 50 n.
        graph = chain(layer("x", 0, 50, op="input"), layer("e", 1800, 50, op="expert", units=36))
        tiled = tile(graph, 700)
        assert tiled.graph["tiled"]["e"]["tiles"] == 4  # n = 3: 600 + 50 + 150 = 800 > 700; n = 4: 700
        sizes = group_sizes(tiled, [["x"], *[[f"e.tile.{i}"] for i in range(4)], ["e"]])
        assert sizes == [50, 550, 600, 650, 700, 250]
        # 1800/n + 50 + 50 n is never below 650 B: more tiles pile up more partial sums
        assert "no count of tiles" in tile(graph, 640).graph["untiled"]["e"]
        assert greedy(tile(graph, 640), 640).status == Status.INFEASIBLE


class TestBlocks:
    CONFIG = {"model_type": "llama", "hidden_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
              "intermediate_size": 512, "vocab_size": 256}

    def test_oversize_blocks_become_their_operators(self):
        blocks = transformer(self.CONFIG, batch=1, seq_len=16)
        ops = transformer(self.CONFIG, batch=1, seq_len=16, granularity="op")
        capacity = 100_000  # a block holds ~400 KB: all blocks are oversize, the ops are not
        tiled_blocks, tiled_ops = tile(blocks, capacity), tile(ops, capacity)
        assert tiled_blocks.graph["expanded_blocks"] == ["block.0", "block.1", "block.2"]
        assert list(tiled_blocks) == list(tiled_ops)
        assert set(tiled_blocks.edges) == set(tiled_ops.edges)
        for node in tiled_ops:
            for key in ("weight_bytes", "activation_bytes", "params", "op"):
                assert tiled_blocks.nodes[node][key] == tiled_ops.nodes[node][key]
        plan = cachefit.plan(blocks, capacity, tile=True)
        assert plan.ok and plan.stats["expanded_blocks"] == 3
        assert_checked(plan)

    def test_blocks_that_fit_are_not_expanded(self):
        blocks = transformer(self.CONFIG, batch=1, seq_len=16)
        assert blocks.nodes["block.0"]["weight_bytes"] == 524_800
        tiled = tile(blocks, 600_000)
        assert list(tiled) == list(blocks) and "expanded_blocks" not in tiled.graph


class TestUntileable:
    def test_unknown_op_stays_and_the_plan_names_it(self):
        graph = chain(layer("a", 10, 4), layer("norm", 500, 4, op="norm"), layer("b", 10, 4))
        tiled = tile(graph, 100)
        assert "norm" in tiled and tiled.graph["tiled"] == {}
        assert "its op 'norm' is not matmul-like" in tiled.graph["untiled"]["norm"]
        plan = cachefit.plan(graph, 100, tile=True)
        assert plan.status == Status.INFEASIBLE
        assert "'norm'" in plan.reason and "could not be tiled" in plan.reason
        assert_checked(plan)

    def test_activations_alone_exceed_capacity(self):
        graph = chain(layer("x", 0, 60, op="input"), layer("fc", 500, 50, units=50))
        tiled = tile(graph, 100)
        assert "activations alone need" in tiled.graph["untiled"]["fc"]
        assert greedy(tiled, 100).status == Status.INFEASIBLE

    def test_concat_does_not_fit(self):
        # a tile needs 35 + 10 + 60 ... the concat needs 2 x 60 > 100
        graph = chain(layer("fc", 400, 60, units=40))
        tiled = tile(graph, 100)
        assert "the join of its tiles needs" in tiled.graph["untiled"]["fc"]

    def test_missing_or_tiny_split_dimension(self):
        graph = chain({"name": "fc", "weight_bytes": 500, "activation_bytes": 0, "buffer_bytes": 0,
                       "op": "linear"})
        assert "needs an integer `out_features` >= 2" in tile(graph, 100).graph["untiled"]["fc"]
        graph = chain(layer("fc", 500, 0, units=3))
        assert "even one tile per unit" in tile(graph, 100).graph["untiled"]["fc"]

    def test_bad_input(self):
        with pytest.raises(InputError, match=r"`graph` must be a networkx.DiGraph with node `op` attributes"):
            tile(LayerTable.chain([1, 2]), 10)
        with pytest.raises(InputError, match=r"`memory` must be one of"):
            tile(chain(layer("a", 1)), 10, memory="peak")
        with pytest.raises(InputError, match=r"`chunk_fraction` must be a number in \(0, 1\]"):
            tile(chain(layer("a", 1)), 10, chunk_fraction=2)
        with pytest.raises(InputError, match=r"`capacity`"):
            tile(chain(layer("a", 1)), "lots")


@pytest.mark.parametrize("name, granularity, chunk_tokens", [
    ("llama-3.1-8b", "op", 16),
    ("llama-3.1-8b", "block", 16),
    ("mixtral-8x7b", "op", 16),
    ("gpt2", "op", 64),
    ("bert-large", "block", 64),
    ("falcon-7b", "op", 16),
    ("qwen2.5-7b", "op", 16),
    ("opt-30b", "op", 16),
    ("paper-4x15gb", "block", 1),
    ("paper-shape", "block", 64),
])
def test_every_tiled_instance_plans_to_a_checked_plan(name, granularity, chunk_tokens):
    graph = instances.load(name, granularity=granularity, **({} if name.startswith("paper") else {"seq_len": 256}))
    plan = cachefit.plan(graph, "h100-l2", tile=True, chunk_tokens=chunk_tokens)
    assert plan.ok, plan.reason
    assert_checked(plan)
    assert weights(plan.graph) == weights(graph)
    again = cachefit.Plan.from_json(plan.to_json())
    assert cachefit.check(again).ok


class TestExecutorRunsTiledGraphs:
    """The tiled graph follows the executor's conventions: it computes the untiled function."""

    CONFIGS = {
        "llama": {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 128},
        "mixtral": {"model_type": "mixtral", "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 128,
                    "num_local_experts": 4, "num_experts_per_tok": 2},
        "bert": {"model_type": "bert", "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
                 "intermediate_size": 128, "vocab_size": 128, "max_position_embeddings": 32},
    }

    @pytest.mark.parametrize("name", ["llama", "mixtral", "bert"])
    @pytest.mark.parametrize("granularity", ["op", "block"])
    def test_same_outputs(self, name, granularity):
        torch = pytest.importorskip("torch")
        from cachefit.executor import build

        graph = transformer(self.CONFIGS[name], batch=4, seq_len=8, granularity=granularity)
        tiled = tile(graph, 12_000, chunk_fraction=0.25)
        assert tiled.graph["tiled"]
        reference, out = build(graph, seed=5).forward(), build(tiled, seed=5).forward()
        assert reference.keys() & out.keys()
        for key in reference.keys() & out.keys():
            torch.testing.assert_close(out[key], reference[key], rtol=1e-5, atol=1e-5)


# --- property: tile + greedy never returns an oversize group -----------------

OPS = ["linear", "linear", "embedding", "expert", "norm", "add"]


@st.composite
def tileable_graphs(draw, dag=False):
    n = draw(st.integers(1, 7))
    graph = nx.DiGraph(name="random")
    for index in range(n):
        op = draw(st.sampled_from(OPS))
        key = {"embedding": "embedding_dim", "expert": "intermediate_size"}.get(op, "out_features")
        # matmul-like ops up to 3000 B of weights; the others small, so most graphs can be tiled
        heavy = op in ("linear", "embedding", "expert")
        graph.add_node(str(index), op=op, **{key: draw(st.integers(1, 40))},
                       weight_bytes=draw(st.integers(0, 3000 if heavy else 300)),
                       activation_bytes=draw(st.integers(0, 120)),
                       buffer_bytes=draw(st.sampled_from([0, 0, 0, 5, 30])))
        if index and not dag:
            graph.add_edge(str(index - 1), str(index))
        elif index:
            for source in draw(st.sets(st.integers(0, index - 1), max_size=2)):
                graph.add_edge(str(source), str(index))
    return graph


def run_property(graph, capacity, memory, chunk_fraction):
    tiled = tile(graph, capacity, memory=memory, chunk_fraction=chunk_fraction)
    assert weights(tiled) == weights(graph)
    plan = greedy(tiled, capacity, memory=memory, chunk_fraction=chunk_fraction)
    if plan.ok:
        assert_checked(plan)
    else:
        assert plan.reason
    if not tiled.graph["untiled"]:
        # every node of the tiled graph fits a group of its own in order, so greedy cannot get stuck
        assert plan.ok, plan.reason
    return plan


def with_tile_count(tiled, parent, m):
    """`tiled` with `parent` re-split into m near-equal tiles, built here independently of `tile`."""
    tiles = sorted((v for v, d in tiled.nodes(data=True) if d.get("parent") == parent and "tile" in d),
                   key=lambda v: tiled.nodes[v]["tile"][0])
    first = tiled.nodes[tiles[0]]
    op, join = first["op"], first["join"]
    axis = {"embedding": "embedding_dim", "expert": "intermediate_size"}.get(op, "out_features")
    units = sum(tiled.nodes[v][axis] for v in tiles)
    weight = sum(tiled.nodes[v]["weight_bytes"] for v in tiles)
    output = tiled.nodes[parent]["activation_bytes"]
    counts = [units // m + (1 if i < units % m else 0) for i in range(m)]
    cumulative = [sum(counts[: i + 1]) for i in range(m)]
    share = lambda total, i: total * cumulative[i] // units - (total * cumulative[i - 1] // units if i else 0)
    preds = list(tiled.predecessors(tiles[0]))
    result = nx.DiGraph()
    for node, data in tiled.nodes(data=True):
        if node in tiles:
            if node != tiles[0]:
                continue
            for i in range(m):
                result.add_node(f"new.{i}", weight_bytes=share(weight, i), buffer_bytes=first["buffer_bytes"],
                                activation_bytes=share(output, i) if join == "cat" else output)
                result.add_edges_from((u, f"new.{i}") for u in preds)
            continue
        result.add_node(node, **data)
        result.add_edges_from((u, node) for u in tiled.predecessors(node) if u not in tiles)
    result.add_edges_from((f"new.{i}", parent) for i in range(m))
    return result, [f"new.{i}" for i in range(m)] + [parent]


def fits_alone_in_order(graph, nodes, capacity, memory, chunk_fraction):
    """Every node of `nodes` fits a group of its own in `graph`'s order (sizes from cachefit.memory)."""
    table = LayerTable.from_graph(graph)
    intervals = Intervals(table, memory, chunk_fraction)
    return all(intervals.size(table.ids.index(v), table.ids.index(v) + 1) <= capacity for v in nodes)


FRACTIONS = st.sampled_from([1.0, 0.5, 0.25, 1 / 3, 0.1])


@settings(max_examples=150, deadline=None, derandomize=True)
@given(graph=tileable_graphs(), capacity=st.integers(400, 2500), memory=st.sampled_from(["liveness", "additive"]),
       chunk_fraction=FRACTIONS)
def test_property_tile_counts_are_the_fewest(graph, capacity, memory, chunk_fraction):
    tiled = tile(graph, capacity, memory=memory, chunk_fraction=chunk_fraction)
    for parent, entry in tiled.graph["tiled"].items():
        n = entry["tiles"]
        same, nodes = with_tile_count(tiled, parent, n)
        assert fits_alone_in_order(same, nodes, capacity, memory, chunk_fraction)  # the rebuild agrees
        for m in range(2, n):
            fewer, nodes = with_tile_count(tiled, parent, m)
            assert not fits_alone_in_order(fewer, nodes, capacity, memory, chunk_fraction), (parent, m, n)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(graph=tileable_graphs(), capacity=st.integers(1, 2500) | st.integers(400, 2500), memory=st.sampled_from(["liveness", "additive"]),
       chunk_fraction=FRACTIONS)
@example(graph=chain(layer("a", 1000, 0, units=100)), capacity=300, memory="liveness", chunk_fraction=1.0)
def test_property_chains_tile_and_greedy_never_oversize(graph, capacity, memory, chunk_fraction):
    plan = run_property(graph, capacity, memory, chunk_fraction)
    # on a chain the only failure left is a node that no tiling can help: INFEASIBLE, with the reason
    assert plan.ok or plan.status == Status.INFEASIBLE


@settings(max_examples=100, deadline=None, derandomize=True)
@given(data=st.data(), capacity=st.integers(50, 3000), oversize=st.integers(1, 6), dag=st.booleans())
def test_property_shared_strategies_with_oversize_layers(data, capacity, oversize, dag):
    """cachefit.testing's graphs (sizes around C, exact fits, zeros), made linear layers, some
    scaled `oversize` times beyond C: tile + plan gives a valid plan or says why not."""
    from cachefit.testing import assert_valid_plan, chains, dags

    strategy = dags if dag else chains
    base = data.draw(strategy(min_nodes=1, max_nodes=7, capacity=capacity))
    graph = nx.DiGraph(**base.graph)
    for node, attrs in base.nodes(data=True):
        scale = oversize if data.draw(st.booleans()) else 1
        graph.add_node(node, **dict(attrs, weight_bytes=attrs["weight_bytes"] * scale, op="linear",
                                    out_features=data.draw(st.integers(1, 64))))
    graph.add_edges_from(base.edges)
    tiled = tile(graph, capacity)
    assert weights(tiled) == weights(graph)
    for solver in ("greedy", "dp"):
        plan = cachefit.plan(tiled, capacity, solver=solver)
        assert_valid_plan(tiled, plan)
        if not tiled.graph["untiled"]:
            assert plan.ok, (solver, plan.reason)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(graph=tileable_graphs(dag=True), capacity=st.integers(1, 2500) | st.integers(400, 2500),
       memory=st.sampled_from(["liveness", "additive"]), chunk_fraction=FRACTIONS)
def test_property_dags_tile_and_greedy_never_oversize(graph, capacity, memory, chunk_fraction):
    run_property(graph, capacity, memory, chunk_fraction)
