"""The fast path of `flatten` on chains and near-chains agrees with a plain reading, on hostile inputs too.

`flatten` reads the three byte attributes of every node in one pass and
checks their types on the set of types present; it recognises a chain by an
edge count and one membership test per node; `LayerTable` then takes the
chain's ``last_use`` without a scatter, and the engine its incoming live bytes
without a cumulative sum and each node's size alone from its intervals.  Each short cut is checked here against a
reference that reads the public networkx API node by node, on the inputs
most likely to slip past it: bools (which are ints), floats that are whole,
strings of digits, numpy scalars, 0-d arrays, values at and just past 2**62,
missing attributes, ids that are not strings, and graphs that look like
chains and are not.
"""

import fractions
import numbers
from decimal import Decimal

import networkx as nx
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import cachefit
from cachefit.errors import InputError
from cachefit.memory import LayerTable, get_model
from cachefit.memory.engine import Intervals
from cachefit.validation import MAX_BYTES, flatten

GIB = 2**30


def _chain(n, *, fresh_ids=True, weight=lambda i: (i + 1) * GIB):
    """A chain of nodes "n0" … in order; with `fresh_ids` the edges name their ends with equal, new strings."""
    graph = nx.DiGraph()
    for index in range(n):
        graph.add_node(f"n{index}", weight_bytes=weight(index), activation_bytes=(index % 5) * 2**20,
                       buffer_bytes=(index % 3) * 2**24)
    ids = list(graph.nodes)
    name = (lambda i: "".join(["n", str(i)])) if fresh_ids else ids.__getitem__
    graph.add_edges_from((name(i), name(i + 1)) for i in range(n - 1))
    return graph


def _reference(graph):
    """(ids, columns, sources, targets, last_use, is_chain) from the public networkx API, node by node."""
    ids = tuple(graph.nodes)
    position = {node: index for index, node in enumerate(ids)}
    columns = [[int(graph.nodes[node][a]) for node in ids]
               for a in ("weight_bytes", "activation_bytes", "buffer_bytes")]
    pairs = [(position[u], position[v]) for u, v in graph.edges]
    last_use = list(range(len(ids)))
    for u, v in pairs:
        last_use[u] = max(last_use[u], v)
    linked = {(u, v) for u, v in pairs if v == u + 1}
    is_chain = all((i, i + 1) in linked for i in range(len(ids) - 1))
    return ids, columns, [u for u, _ in pairs], [v for _, v in pairs], last_use, is_chain


def _refusal(graph):
    """The message `validate` must give, from the definitions: first node, then attribute, then edges."""
    ids = list(graph.nodes)
    for node in ids:
        if not isinstance(node, str):
            return (f"node {node!r}: node ids must be strings, got {type(node).__name__}; "
                    "relabel the graph, e.g. networkx.relabel_nodes(G, str)")
    for node in ids:
        data = graph.nodes[node]
        for a in ("weight_bytes", "activation_bytes", "buffer_bytes"):
            if a not in data:
                return f"node {node!r}: missing `{a}` (a non-negative integer of bytes)"
            value = data[a]
            if not isinstance(value, numbers.Integral) or isinstance(value, (bool, np.bool_)) or value < 0:
                return f"node {node!r}: `{a}` must be a non-negative integer, got {value!r}"
            if value > MAX_BYTES:
                return (f"node {node!r}: `{a}` {value} is beyond 2**62 B (4 EiB), "
                        "the most bytes cachefit's exact integer arithmetic holds for a graph")
    position = {node: index for index, node in enumerate(ids)}
    backward = [(u, v) for u, v in graph.edges if position[u] >= position[v]]
    if backward:
        u, v = backward[0]
        if u == v:
            return f"the graph has a cycle: self-loop on node {u!r}"
        if not nx.is_directed_acyclic_graph(graph):
            return "cycle"
        return (f"node order is not topological: edge {u!r} -> {v!r} goes backwards; "
                "add nodes in execution order (e.g. rebuild from nx.topological_sort)")
    return None


def _assert_agrees(graph):
    """`flatten` and `LayerTable.from_graph` give the reference, or refuse with the reference's message."""
    want = _refusal(graph)
    if want is not None:
        with pytest.raises(InputError) as error:
            flatten(graph)
        assert str(error.value) == want or (want == "cycle" and str(error.value).startswith("the graph has a cycle"))
        return
    ids, columns, sources, targets, last_use, is_chain = _reference(graph)
    got_ids, got_columns, got_sources, got_targets = flatten(graph)
    assert got_ids == ids
    assert got_columns.dtype == np.int64 and got_columns.tolist() == columns
    assert got_columns.flags.c_contiguous
    if list(graph._succ) == list(ids):  # networkx's edge order; when its dicts disagree, in node order
        assert got_sources.tolist() == sources and got_targets.tolist() == targets
    else:
        assert sorted(zip(got_sources.tolist(), got_targets.tolist())) == sorted(zip(sources, targets))
    table = LayerTable.from_graph(graph)
    assert table.last_use.tolist() == last_use and table.is_chain == is_chain


class _Registered:
    """An integer type that is not an int: registered as `numbers.Integral`, converted with int()."""

    def __init__(self, value):
        self.value = value

    def __int__(self):
        return self.value

    def __index__(self):
        return self.value

    def __lt__(self, other):
        return self.value < other

    def __gt__(self, other):
        return self.value > other

    def __repr__(self):
        return f"_Registered({self.value})"


numbers.Integral.register(_Registered)

HOSTILE_VALUES = [
    pytest.param(True, "must be a non-negative integer, got True", id="True"),
    pytest.param(False, "must be a non-negative integer, got False", id="False"),
    pytest.param(np.True_, "must be a non-negative integer, got np.True_", id="np.True_"),
    pytest.param(np.False_, "must be a non-negative integer, got np.False_", id="np.False_"),
    pytest.param(2.5, "must be a non-negative integer, got 2.5", id="float"),
    pytest.param(3.0, "must be a non-negative integer, got 3.0", id="whole float"),
    pytest.param(np.float64(4.0), "must be a non-negative integer, got np.float64(4.0)", id="np.float64"),
    pytest.param("3", "must be a non-negative integer, got '3'", id="digit string"),
    pytest.param(None, "must be a non-negative integer, got None", id="None"),
    pytest.param(Decimal(7), "must be a non-negative integer, got Decimal('7')", id="Decimal"),
    pytest.param(fractions.Fraction(8), "must be a non-negative integer, got Fraction(8, 1)", id="Fraction"),
    pytest.param(np.array(5), "must be a non-negative integer, got array(5)", id="0-d array"),
    pytest.param(-1, "must be a non-negative integer, got -1", id="negative"),
    pytest.param(np.int64(-2), "must be a non-negative integer, got np.int64(-2)", id="negative np.int64"),
    pytest.param(2**62 + 1, "`weight_bytes` 4611686018427387905 is beyond 2**62 B (4 EiB)", id="2**62+1"),
    pytest.param(2**63, "`weight_bytes` 9223372036854775808 is beyond 2**62 B (4 EiB)", id="2**63"),
    pytest.param(2**70, "`weight_bytes` 1180591620717411303424 is beyond 2**62 B (4 EiB)", id="2**70"),
    pytest.param(np.uint64(2**63 + 5), "`weight_bytes` 9223372036854775813 is beyond 2**62 B (4 EiB)",
                 id="np.uint64 2**63+5"),
    pytest.param(np.uint64(2**64 - 1), "`weight_bytes` 18446744073709551615 is beyond 2**62 B (4 EiB)",
                 id="np.uint64 max"),
]


class TestHostileByteCounts:
    @pytest.mark.parametrize("position", [0, 3, 9])
    @pytest.mark.parametrize("value, message", HOSTILE_VALUES)
    def test_refused_naming_the_node(self, value, message, position):
        graph = _chain(10)
        graph.nodes[f"n{position}"]["weight_bytes"] = value
        with pytest.raises(InputError) as error:
            flatten(graph)
        text = str(error.value)
        assert text.startswith(f"node 'n{position}': ") and message in text and "\n" not in text
        _assert_agrees(graph)

    @pytest.mark.parametrize("attribute", ["weight_bytes", "activation_bytes", "buffer_bytes"])
    @pytest.mark.parametrize("value", [True, 0.0, "0", np.False_])
    def test_every_attribute_checked(self, attribute, value):
        graph = _chain(6)
        graph.nodes["n4"][attribute] = value
        with pytest.raises(InputError) as error:
            flatten(graph)
        assert str(error.value) == f"node 'n4': `{attribute}` must be a non-negative integer, got {value!r}"

    def test_bools_where_every_other_value_is_zero_or_one(self):
        """Bools hide best among 0s and 1s (True == 1): a column of 0s with one False is still refused."""
        graph = _chain(50, weight=lambda i: i % 2)
        for node in graph.nodes:
            graph.nodes[node]["buffer_bytes"] = 0
        graph.nodes["n37"]["buffer_bytes"] = False
        with pytest.raises(InputError, match=r"^node 'n37': `buffer_bytes` must be a non-negative integer, got False$"):
            flatten(graph)

    @pytest.mark.parametrize("attribute", ["weight_bytes", "activation_bytes", "buffer_bytes"])
    def test_missing(self, attribute):
        graph = _chain(6)
        del graph.nodes["n2"][attribute]
        graph.nodes["n5"]["weight_bytes"] = 1.5  # a later bad value: the first node at fault is named
        with pytest.raises(InputError) as error:
            flatten(graph)
        assert str(error.value) == f"node 'n2': missing `{attribute}` (a non-negative integer of bytes)"

    def test_first_bad_node_then_attribute(self):
        graph = _chain(6)
        graph.nodes["n3"]["buffer_bytes"] = -5
        graph.nodes["n4"]["weight_bytes"] = True
        graph.nodes["n3"]["activation_bytes"] = 2**63
        with pytest.raises(InputError) as error:
            flatten(graph)
        assert str(error.value).startswith("node 'n3': `activation_bytes` 9223372036854775808 is beyond 2**62 B")

    @pytest.mark.parametrize("value", [np.int64(3 * GIB), np.int32(7), np.uint8(200), np.uint64(2**62),
                                       2**62, _Registered(11)])
    def test_integers_of_other_types_are_read_exactly(self, value):
        graph = _chain(5)
        if int(value) > 2**40:  # room for it under the 2**62 total
            for node in graph.nodes:
                graph.nodes[node].update(weight_bytes=0, activation_bytes=0, buffer_bytes=0)
        graph.nodes["n2"]["activation_bytes"] = value
        assert flatten(graph)[1][1][2] == int(value)
        _assert_agrees(graph)

    def test_total_beyond_2_62_named_where_it_crosses(self):
        graph = _chain(4, weight=lambda i: 2**61)
        with pytest.raises(InputError, match=r"^node 'n1': the graph's byte counts add up beyond 2\*\*62 B"):
            flatten(graph)


class TestHostileIds:
    @pytest.mark.parametrize("bad", [5, 2.0, ("a", 1), b"n1", frozenset("a")])
    def test_non_string_id_named(self, bad):
        graph = _chain(4)
        graph.add_node(bad, weight_bytes=1, activation_bytes=0, buffer_bytes=0)
        graph.add_edge("n3", bad)
        with pytest.raises(InputError) as error:
            flatten(graph)
        assert str(error.value) == (f"node {bad!r}: node ids must be strings, got {type(bad).__name__}; "
                                    "relabel the graph, e.g. networkx.relabel_nodes(G, str)")

    def test_integer_ids_of_a_relabelled_chain(self):
        graph = nx.relabel_nodes(_chain(4), {f"n{i}": i for i in range(4)})
        with pytest.raises(InputError, match=r"^node 0: node ids must be strings, got int"):
            flatten(graph)

    @pytest.mark.parametrize("kind", [np.str_, type("Name", (str,), {})])
    def test_string_subclasses_are_ids(self, kind):
        graph = nx.relabel_nodes(_chain(5), {f"n{i}": kind(f"n{i}") for i in range(5)})
        _assert_agrees(graph)
        assert LayerTable.from_graph(graph).is_chain

    @pytest.mark.parametrize("names", [["", "a", "b"], ["a", "", "b"], ["a\x00b", "a", "b\x01"],
                                       ["é", "日本", "🙂"]])
    def test_odd_strings(self, names):
        graph = nx.DiGraph()
        for name in names:
            graph.add_node(name, weight_bytes=GIB, activation_bytes=1, buffer_bytes=0)
        graph.add_edges_from(zip(names[:-1], names[1:]))
        _assert_agrees(graph)
        assert LayerTable.from_graph(graph).is_chain


def _mutations():
    """(name, function(graph) -> graph): ways a graph can look like a chain and not be one."""
    def extra_edge(graph):
        graph.add_edge("n2", "n5")
        return graph

    def moved_edge(graph):  # the same edge count, one node with two successors and one with none
        graph.remove_edge("n3", "n4")
        graph.add_edge("n2", "n4")
        return graph

    def dropped_edge(graph):
        graph.remove_edge("n4", "n5")
        return graph

    def edge_out_of_the_last(graph):
        graph.add_edge("n9", "n0")
        return graph

    def self_loop_on_the_last(graph):
        graph.add_edge("n9", "n9")
        return graph

    def self_loop_in_the_middle(graph):
        graph.add_edge("n4", "n4")
        return graph

    def swapped_insertion_order(graph):  # the same chain, nodes n4 and n5 added in the other order
        order = [f"n{i}" for i in (0, 1, 2, 3, 5, 4, 6, 7, 8, 9)]
        swapped = nx.DiGraph()
        swapped.add_nodes_from((node, graph.nodes[node]) for node in order)
        swapped.add_edges_from(graph.edges)
        return swapped

    def reversed_insertion_order(graph):
        backwards = nx.DiGraph()
        backwards.add_nodes_from((node, graph.nodes[node]) for node in reversed(list(graph.nodes)))
        backwards.add_edges_from(graph.edges)
        return backwards

    def successor_dicts_reordered(graph):  # networkx's own dicts tampered with: the orders disagree
        graph._succ = dict(reversed(list(graph._succ.items())))
        graph._adj = graph._succ
        return graph

    def two_chains(graph):
        graph.remove_edge("n4", "n5")
        graph.add_edge("n4", "n6")
        return graph

    def branch_rejoins(graph):  # n − 1 edges, every node but the last has one out-edge
        graph.remove_edge("n6", "n7")
        graph.add_edge("n6", "n8")
        return graph

    def cycle_back(graph):
        graph.remove_edge("n8", "n9")
        graph.add_edge("n8", "n3")
        return graph

    def gap_crossed(graph):  # not a chain, and n3's output passes n4 and n5, which do not read it
        graph.remove_edge("n4", "n5")
        graph.add_edge("n3", "n6")
        return graph

    return [extra_edge, moved_edge, dropped_edge, gap_crossed, edge_out_of_the_last, self_loop_on_the_last,
            self_loop_in_the_middle, swapped_insertion_order, reversed_insertion_order,
            successor_dicts_reordered, two_chains, branch_rejoins, cycle_back]


class TestLookalikeChains:
    @pytest.mark.parametrize("fresh_ids", [False, True])
    @pytest.mark.parametrize("mutate", _mutations(), ids=lambda f: f.__name__)
    def test_agrees_with_the_reference(self, mutate, fresh_ids):
        graph = mutate(_chain(10, fresh_ids=fresh_ids))
        _assert_agrees(graph)

    @pytest.mark.parametrize("fresh_ids", [False, True])
    @pytest.mark.parametrize("n", [0, 1, 2, 3, 50])
    def test_real_chain(self, n, fresh_ids):
        graph = _chain(n, fresh_ids=fresh_ids)
        _assert_agrees(graph)
        assert LayerTable.from_graph(graph).is_chain

    def test_a_non_chain_order_is_refused_with_its_first_backward_edge(self):
        graph = _mutations()[7](_chain(10))  # n5 inserted before n4
        with pytest.raises(InputError) as error:
            flatten(graph)
        assert str(error.value) == ("node order is not topological: edge 'n4' -> 'n5' goes backwards; "
                                    "add nodes in execution order (e.g. rebuild from nx.topological_sort)")

    def test_views_go_through_the_public_api(self):
        view = _chain(8).subgraph([f"n{i}" for i in range(2, 6)])
        _assert_agrees(view)
        assert LayerTable.from_graph(view).is_chain


@st.composite
def _near_chains(draw):
    """A chain of 2..12 nodes, then 0..3 random edits: add, remove or move an edge, or swap two insertion slots."""
    n = draw(st.integers(2, 12))
    graph = _chain(n, fresh_ids=draw(st.booleans()))
    order = list(graph.nodes)
    node = st.integers(0, n - 1)
    for _ in range(draw(st.integers(0, 3))):
        edit = draw(st.sampled_from(["add", "remove", "move", "swap"]))
        u, v = draw(node), draw(node)
        if edit == "add":
            graph.add_edge(f"n{u}", f"n{v}")
        elif edit == "remove" and graph.has_edge(f"n{u}", f"n{u + 1}"):
            graph.remove_edge(f"n{u}", f"n{u + 1}")
        elif edit == "move" and graph.has_edge(f"n{u}", f"n{u + 1}"):
            graph.remove_edge(f"n{u}", f"n{u + 1}")
            graph.add_edge(f"n{u}", f"n{v}")
        elif edit == "swap":
            order[u], order[v] = order[v], order[u]
    rebuilt = nx.DiGraph()
    rebuilt.add_nodes_from((name, graph.nodes[name]) for name in order)
    rebuilt.add_edges_from(graph.edges)
    return rebuilt


@settings(max_examples=300, deadline=None)
@given(_near_chains())
@example(_mutations()[1](_chain(10)))
@example(_mutations()[11](_chain(10)))
def test_near_chains_agree_with_the_reference(graph):
    _assert_agrees(graph)


@pytest.mark.parametrize("memory", ["liveness", "additive"])
@pytest.mark.parametrize("mutate", [None, *_mutations()[:4]], ids=lambda f: getattr(f, "__name__", "chain"))
def test_chain_incoming_equals_the_definition(memory, mutate):
    """incoming[s] = Σ live(u) over u < s with last_use(u) ≥ s, on a chain (short cut) and near it (general)."""
    graph = _chain(10) if mutate is None else mutate(_chain(10))
    table = LayerTable.from_graph(graph)
    intervals = Intervals(table, memory)
    if not intervals.has_live:
        return
    live = get_model(memory).terms_at(table).live.tolist()
    last = table.last_use.tolist()
    want = [sum(live[u] for u in range(s) if last[u] >= s) for s in range(table.n + 1)]
    assert intervals.incoming.tolist() == want


@pytest.mark.parametrize("chunk_fraction", [1.0, 0.3])
@pytest.mark.parametrize("memory", ["liveness", "additive", "liveness+kv"])
@pytest.mark.parametrize("mutate", [None, *_mutations()[:4]], ids=lambda f: getattr(f, "__name__", "chain"))
@pytest.mark.parametrize("buffers", [False, True])
def test_alone_sizes_from_the_intervals_equal_the_terms(memory, chunk_fraction, mutate, buffers):
    """On a chain a node alone is the run [i, i + 1); the short cut through `Intervals` gives the same sizes."""
    from cachefit.memory import alone_sizes

    graph = _chain(10) if mutate is None else mutate(_chain(10))
    if not buffers:  # no peak term: the intervals' exact mode, where the short cut is taken
        for node in graph.nodes:
            graph.nodes[node]["buffer_bytes"] = 0
    if memory.endswith("+kv"):
        graph.graph.update(batch=1, seq_len=8)
        for index, node in enumerate(graph.nodes):
            graph.nodes[node]["kv_bytes"] = index * 2**20
    table = LayerTable.from_graph(graph)
    intervals = Intervals(table, memory, chunk_fraction)
    assert (alone_sizes(table, memory, chunk_fraction, intervals=intervals).tolist()
            == alone_sizes(table, memory, chunk_fraction).tolist())


@pytest.mark.parametrize("solver", ["greedy", "dp"])
@pytest.mark.parametrize("memory", ["liveness", "additive"])
def test_plan_on_the_graph_equals_plan_on_the_table(solver, memory):
    """The fast path changes nothing a plan says: the same groups as from `LayerTable.chain`, checked."""
    rng = np.random.default_rng(17)
    weights = rng.integers(10**8, 10**10, 300).tolist()
    activations = rng.integers(0, 10**8, 300).tolist()
    graph = cachefit.graphs.from_layers([{"name": f"l{i}", "weight_bytes": w, "activation_bytes": a}
                                         for i, (w, a) in enumerate(zip(weights, activations))])
    capacity = sum(weights) // 20
    from_graph = cachefit.plan(graph, capacity, solver=solver, memory=memory)
    table = LayerTable.chain(weights, activations, ids=list(graph.nodes))
    from_table = cachefit.plan(table, capacity, solver=solver, memory=memory)
    assert from_graph.partitions == from_table.partitions and from_graph.sizes == from_table.sizes
    assert from_graph.status == from_table.status == cachefit.Status.OPTIMAL
    assert cachefit.check(from_graph, graph).ok


def test_bench_prints_both_yardsticks_and_the_passes(capsys):
    from cachefit.bench import bench_nx_path

    bench_nx_path.main(["--n", "300", "--repeats", "1", "--passes"])
    out = capsys.readouterr().out
    for name in ("read the weights (yardstick 1)", "read the 3 byte attributes (yardstick 3)",
                 "cachefit.plan solver=greedy liveness", "each node's successor is the next", "flatten (all"):
        assert name in out
    assert out.count("(OPTIMAL, k=") == 4
