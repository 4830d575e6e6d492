"""Validation of model graphs (docs/concepts.md §3): one function, used by every entry point.

The checks run over whole columns at once, each a pass of C over the nodes
with no Python-level loop: the three byte attributes are read in one pass,
their types checked on the set of types present, their ranges with numpy; a
chain is recognised by its edge count and one membership test per node.
Only when something fails does a per-node pass run, to name the node at
fault.  On a 10⁶-node chain this costs about 9 readings of one attribute
(``python -m cachefit.bench.bench_nx_path --passes`` times each pass).
"""

from __future__ import annotations

import numbers
import operator
from itertools import chain, islice

import networkx as nx
import numpy as np

from .errors import InputError

__all__ = ["BYTE_ATTRIBUTES", "MAX_BYTES", "validate", "flatten", "check_total"]

#: The node attributes every graph must carry, as non-negative integers.
BYTE_ATTRIBUTES = ("weight_bytes", "activation_bytes", "buffer_bytes")

#: The most bytes a graph may hold in all (Σ of every node's byte attributes), 2**62 (4 EiB).
#: Every group size S(P), under every memory model, is at most that sum, so the solvers'
#: int64 prefix sums and probes are exact below it; a graph beyond it is refused up front.
#: A capacity above it is treated as this value (every group of a valid graph fits it).
MAX_BYTES = 2**62


def validate(graph):
    """Check that `graph` is a model graph cachefit can plan; return it unchanged.

    A model graph is a `networkx.DiGraph` whose node ids are strings, whose
    nodes carry ``weight_bytes``, ``activation_bytes`` and ``buffer_bytes``
    as non-negative integers adding up to at most `MAX_BYTES` (2**62) over
    the whole graph, that is acyclic, and whose node insertion order is a
    topological order (the model's execution order).

    Raises
    ------
    InputError
        Naming the node and attribute at fault, or the first backward edge.

    Notes
    -----
    Node ids must be strings so that every plan cachefit writes reads back
    to the same ids (JSON would turn 1 into "1", and converting silently
    could merge 1 and "1"); relabel with ``networkx.relabel_nodes(G, str)``.

    Complexity: O(n + e), vectorised.

    Examples
    --------
    >>> import networkx as nx
    >>> g = nx.DiGraph()
    >>> g.add_node("a", weight_bytes=4, activation_bytes=2, buffer_bytes=0)
    >>> validate(g) is g
    True
    >>> g.add_node("b", weight_bytes=-1, activation_bytes=0, buffer_bytes=0)
    >>> validate(g)
    Traceback (most recent call last):
    ...
    cachefit.errors.InputError: node 'b': `weight_bytes` must be a non-negative integer, got -1
    """
    flatten(graph)
    return graph


def flatten(graph):
    """Validate `graph` (see `validate`) and return its columns.

    Returns
    -------
    ids : tuple of str
    columns : numpy.ndarray
        Shape (3, n), int64: ``weight_bytes``, ``activation_bytes``, ``buffer_bytes``.
    sources, targets : numpy.ndarray of int64
        The edges as position pairs.
    """
    if not isinstance(graph, nx.DiGraph) or graph.is_multigraph():
        raise InputError(f"`graph` must be a networkx.DiGraph, got {type(graph).__name__}")
    storage = getattr(graph, "_node", None)  # networkx's node → attributes dict, in node order
    direct = isinstance(storage, dict) and len(storage) == len(graph)
    ids = tuple(storage) if direct else tuple(graph.nodes)
    _check_ids(ids)
    datas = storage.values() if direct else [data for _, data in graph.nodes(data=True)]
    columns = _byte_columns(ids, datas)
    check_total(ids, columns)
    sources, targets = _edges(graph, ids)
    return ids, columns, sources, targets


def _check_ids(ids):
    if set(map(type, ids)) <= {str}:
        return
    for node in ids:
        if not isinstance(node, str):
            raise InputError(f"node {node!r}: node ids must be strings, got {type(node).__name__}; "
                             "relabel the graph, e.g. networkx.relabel_nodes(G, str)")


def _integral_type(kind):
    return issubclass(kind, (int, np.integer)) and not issubclass(kind, (bool, np.bool_))


#: A node's three byte counts, in `BYTE_ATTRIBUTES` order.
_READ_BYTES = operator.itemgetter(*BYTE_ATTRIBUTES)


def _byte_columns(ids, datas):
    """The byte attributes of every node as an int64 array of shape (3, n), or raise naming the node at fault.

    One pass over the nodes reads all three values of each (interleaved:
    w₀ a₀ b₀ w₁ …); their types are checked on the set of types present (a
    handful), not per value, and their range with one unsigned maximum
    (a negative int64 reads as at least 2⁶³ unsigned).  When that fails, a
    per-node pass names the first bad node (`_name_bad_node`); if it finds
    none, the values are integers of other types (e.g. a registered
    `numbers.Integral`), converted one by one.
    """
    n = len(ids)
    try:
        values = list(chain.from_iterable(map(_READ_BYTES, datas)))
    except KeyError:  # a missing attribute: named below
        values = None
    if values is not None and all(map(_integral_type, set(map(type, values)))):
        try:
            interleaved = np.fromiter(values, dtype=np.int64, count=3 * n)
        except (OverflowError, ValueError, TypeError):
            interleaved = None
        if interleaved is not None and not (n and interleaved.view(np.uint64).max() > MAX_BYTES):
            return np.ascontiguousarray(interleaved.reshape(n, 3).T)
    _name_bad_node(ids, datas)
    return np.array([[int(data[attribute]) for data in datas] for attribute in BYTE_ATTRIBUTES],
                    dtype=np.int64).reshape(3, n)


def _name_bad_node(ids, datas):
    """Raise the `InputError` naming the first node (then attribute) whose byte count is missing or bad, if any."""
    for node, data in zip(ids, datas):
        for attribute in BYTE_ATTRIBUTES:
            if attribute not in data:
                raise InputError(f"node {node!r}: missing `{attribute}` (a non-negative integer of bytes)")
            value = data[attribute]
            if not isinstance(value, numbers.Integral) or isinstance(value, (bool, np.bool_)) or value < 0:
                raise InputError(f"node {node!r}: `{attribute}` must be a non-negative integer, got {value!r}")
            if value > MAX_BYTES:
                raise InputError(f"node {node!r}: `{attribute}` {value} is beyond 2**62 B (4 EiB), "
                                 "the most bytes cachefit's exact integer arithmetic holds for a graph")


def check_total(ids, columns):
    """Refuse a graph whose byte counts add up beyond `MAX_BYTES`, naming the node where they cross it.

    `columns`: int64 rows of per-node byte counts, each at most `MAX_BYTES`.
    """
    if not columns.size or float(columns.sum(dtype=np.float64)) < MAX_BYTES / 2:
        return
    running = 0
    for node, total in zip(ids, (columns[0].astype(object) + columns[1] + columns[2]).tolist()):
        running += total
        if running > MAX_BYTES:
            raise InputError(f"node {node!r}: the graph's byte counts add up beyond 2**62 B (4 EiB) at this node, "
                             "the most cachefit's exact integer arithmetic holds for a graph")


def _is_chain(ids, adjacency):
    """Whether the successors of the i-th node are exactly {ids[i + 1]}, the last node having none.

    `adjacency`: node → successor dict, in node order.  n − 1 edges in all,
    and each node but the last has the next one among its successors (one
    dict lookup in C per node, the id's hash cached), leave room for no
    other edge.  The edge count comes first: it is the cheaper pass, and it
    turns down at once a chain with one extra edge.
    """
    n = len(ids)
    successors = adjacency.values()
    return (n > 1 and sum(map(len, successors)) == n - 1
            and all(map(operator.contains, islice(successors, n - 1), islice(ids, 1, None))))


def _edge_positions(graph, ids):
    """(sources, targets) as position arrays, in the graph's edge order.

    A chain (`_is_chain`) is recognised in two passes of C over the
    successor dicts and needs nothing more.  Otherwise builds no node → position dict when it
    can avoid it (on this kind of machine a 10⁶-entry dict costs seconds):
    each edge's target is first guessed to be the node right after its
    source, which it is for most edges of a layer graph, and the guess is
    verified by comparing ids; only the edges it misses are looked up in a
    dict, built then.  Reads networkx's adjacency dict ``_succ`` (the
    documented storage of `networkx.DiGraph`) rather than the ``succ`` view,
    whose per-node view objects cost as much as the rest together; its keys
    must be the node ids themselves, in node order (they are for every
    graph networkx builds), else it is rebuilt from the view.
    """
    n = len(ids)
    adjacency = getattr(graph, "_succ", None)
    if not isinstance(adjacency, dict) or len(adjacency) != n or not all(map(operator.is_, adjacency, ids)):
        adjacency = {node: dict(graph.succ[node]) for node in ids}
    if _is_chain(ids, adjacency):
        sources = np.arange(n - 1, dtype=np.int64)
        return sources, sources + 1
    neighbours = adjacency.values()
    counts = np.fromiter(map(len, neighbours), dtype=np.int64, count=n)
    keys = tuple(chain.from_iterable(neighbours))  # every edge's target id, in edge order
    sources = np.repeat(np.arange(n, dtype=np.int64), counts)
    targets = np.minimum(sources + 1, max(n - 1, 0))
    guessed = np.fromiter(ids, dtype=object, count=n)[targets] if n else ()
    hits = np.fromiter(map(operator.eq, keys, guessed), dtype=bool, count=len(targets))
    misses = np.flatnonzero(~hits)
    if misses.size:
        position = dict(zip(ids, range(n)))
        targets[misses] = [position[keys[index]] for index in misses.tolist()]
    return sources, targets


def _edges(graph, ids):
    """Edges as position arrays, refusing self-loops, cycles and a node order that is not topological."""
    sources, targets = _edge_positions(graph, ids)
    backward = np.flatnonzero(sources >= targets)
    if backward.size:
        first = int(backward[0])  # the first bad edge in the graph's edge order
        u, v = ids[int(sources[first])], ids[int(targets[first])]
        if u == v:
            raise InputError(f"the graph has a cycle: self-loop on node {u!r}")
        if not nx.is_directed_acyclic_graph(graph):
            cycle = nx.find_cycle(graph)
            raise InputError(f"the graph has a cycle: {' -> '.join(repr(a) for a, _ in cycle)}")
        raise InputError(
            f"node order is not topological: edge {u!r} -> {v!r} goes backwards; "
            "add nodes in execution order (e.g. rebuild from nx.topological_sort)")
    return sources, targets
