"""`cachefit.validation.flatten`: the fast paths give what a plain reading of the graph gives.

The reference reads the public networkx API only (``G.nodes``, ``G.edges``
and a node → position dict); `flatten` reads networkx's storage and takes a
short cut for chains, so both must agree on every graph, and refuse the
same graphs with the same message.
"""

import networkx as nx
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cachefit.errors import InputError
from cachefit.memory import LayerTable
from cachefit.validation import flatten, validate


def _graph(n, edges, *, fresh_ids=False):
    """A DiGraph of nodes "n0".."n{n-1}" in order, with `edges` (position pairs).

    With `fresh_ids` the edges name their ends with new (equal, not
    identical) string objects, as a graph built by ``add_edge(f"{i}", ...)`` does.
    """
    graph = nx.DiGraph()
    for index in range(n):
        graph.add_node(f"n{index}", weight_bytes=index + 1, activation_bytes=2 * index, buffer_bytes=index % 3)
    ids = list(graph.nodes)
    name = (lambda i: "".join(["n", str(i)])) if fresh_ids else ids.__getitem__
    graph.add_edges_from((name(u), name(v)) for u, v in edges)
    return graph


def _reference(graph):
    """(ids, columns, sources, targets) read through networkx's public API."""
    ids = tuple(graph.nodes)
    position = {node: index for index, node in enumerate(ids)}
    columns = np.array([[graph.nodes[node][a] for node in ids]
                        for a in ("weight_bytes", "activation_bytes", "buffer_bytes")], dtype=np.int64)
    pairs = [(position[u], position[v]) for u, v in graph.edges]
    sources = np.array([u for u, _ in pairs], dtype=np.int64)
    targets = np.array([v for _, v in pairs], dtype=np.int64)
    return ids, columns.reshape(3, len(ids)), sources, targets


def _backward_edge(graph):
    position = {node: index for index, node in enumerate(graph.nodes)}
    return next(((u, v) for u, v in graph.edges if position[u] >= position[v]), None)


def _assert_same(graph):
    ids, columns, sources, targets = flatten(graph)
    want_ids, want_columns, want_sources, want_targets = _reference(graph)
    assert ids == want_ids
    assert columns.tolist() == want_columns.tolist()
    assert sources.tolist() == want_sources.tolist()
    assert targets.tolist() == want_targets.tolist()


@pytest.mark.parametrize("fresh_ids", [False, True])
@pytest.mark.parametrize("n", [0, 1, 2, 7])
def test_chain(n, fresh_ids):
    graph = _graph(n, [(i, i + 1) for i in range(n - 1)], fresh_ids=fresh_ids)
    if fresh_ids and n > 1:
        assert next(iter(graph.succ["n0"])) is not list(graph.nodes)[1]  # equal, not identical
    _assert_same(graph)
    assert LayerTable.from_graph(graph).is_chain


@pytest.mark.parametrize("edges, n", [
    ([(0, 1), (0, 2), (2, 3)], 4),  # n - 1 edges, but node 1 has none out: not the chain short cut
    ([(0, 2), (1, 2)], 3),  # one edge out of each but the last, not to the next node
    ([(0, 1), (1, 2), (0, 2)], 3),  # a chain plus a skip edge
    ([(1, 2), (0, 3)], 4),
    ([], 3),
])
def test_other_shapes(edges, n):
    for fresh_ids in (False, True):
        _assert_same(_graph(n, edges, fresh_ids=fresh_ids))


def test_graph_view_reads_the_public_api():
    graph = _graph(5, [(i, i + 1) for i in range(4)])
    view = graph.subgraph(["n1", "n2", "n3"])
    _assert_same(view)
    assert flatten(view)[0] == ("n1", "n2", "n3")


@pytest.mark.parametrize("edges, message", [
    ([(0, 1), (1, 0)], "the graph has a cycle: 'n0' -> 'n1'"),
    ([(1, 1)], "the graph has a cycle: self-loop on node 'n1'"),
    ([(0, 1), (2, 1)], None),  # acyclic, but node 2 comes after 1 in the node order
    ([(1, 0), (2, 1)], None),  # one edge out of each but the last, all backwards
])
def test_refusals(edges, message):
    graph = _graph(3, edges)
    with pytest.raises(InputError) as error:
        validate(graph)
    if message is None:
        u, v = _backward_edge(graph)
        message = (f"node order is not topological: edge {u!r} -> {v!r} goes backwards; "
                   "add nodes in execution order (e.g. rebuild from nx.topological_sort)")
    assert str(error.value) == message


@st.composite
def _graphs(draw):
    n = draw(st.integers(0, 8))
    pairs = st.tuples(st.integers(0, max(n - 1, 0)), st.integers(0, max(n - 1, 0)))
    edges = draw(st.lists(pairs, max_size=12)) if n else []
    chain = draw(st.booleans())
    if chain:
        edges = [(i, i + 1) for i in range(n - 1)] + edges[:1]
    return _graph(n, edges, fresh_ids=draw(st.booleans()))


@settings(max_examples=200, deadline=None)
@given(_graphs())
@example(_graph(3, [(0, 1), (1, 2), (2, 0)]))
@example(_graph(4, [(0, 1), (1, 2), (2, 3), (3, 3)]))
def test_flatten_matches_the_reference(graph):
    """Every graph flattens as the public API reads it, or is refused when an edge goes backwards."""
    if _backward_edge(graph) is None:
        _assert_same(graph)
    else:
        with pytest.raises(InputError, match="cycle|not topological"):
            flatten(graph)


def test_bad_attribute_named_from_the_storage_path():
    graph = _graph(3, [(0, 1), (1, 2)])
    graph.nodes["n2"]["activation_bytes"] = 1.5
    with pytest.raises(InputError) as error:
        validate(graph)
    assert str(error.value) == "node 'n2': `activation_bytes` must be a non-negative integer, got 1.5"
    del graph.nodes["n1"]["buffer_bytes"]
    with pytest.raises(InputError) as error:
        validate(graph)
    assert str(error.value) == "node 'n1': missing `buffer_bytes` (a non-negative integer of bytes)"


def test_numpy_integers_are_converted():
    graph = _graph(3, [(0, 1), (1, 2)])
    graph.nodes["n1"]["weight_bytes"] = np.int32(9)
    assert flatten(graph)[1][0].tolist() == [1, 9, 3]
