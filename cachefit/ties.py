"""Tied weights across pipeline stages: a stage that holds a tied node but not its owner holds its own copy.

A graph counts a tensor shared by several nodes once, on its owner: a tied
LM head (``tied_to="embed"``, `cachefit.graphs.transformer`) or a node that
``from_torch`` found reading another node's parameters has ``weight_bytes``
0 for the shared part.  That is right while owner and user run on one
device.  When a stage plan puts them on different devices, the user's device
needs the table as well, so its stage counts a copy:

    copy(v) = out_features × in_features × dtype bytes   for a tied linear (the matrix it would own untied),
    copy(v) = Σ weight_bytes of its owners in other stages   for any other tied node (an upper bound),

and 0 when every owner of v is in v's stage.  `with_table_copies` marks a
graph for a given split: such a node gets ``weight_bytes`` + copy(v) and
``table_copy_bytes`` = copy(v), so every memory model, the on-chip level
inside the stage (its sub-graph copies the node) and the checker count it
like any weight.  `cachefit.checker.check_levels` recomputes copy(v) from
the owner's side (an embedding's ``num_embeddings × embedding_dim``) and
refuses a plan whose marks differ.
"""

from __future__ import annotations

import networkx as nx

from .units import DTYPE_BYTES

__all__ = ["owners", "tied_nodes", "copy_bytes", "with_table_copies", "without_table_copies", "forced_apart",
           "COPY_KEY"]

#: The node attribute that records the bytes of a table copy counted in ``weight_bytes``.
COPY_KEY = "table_copy_bytes"


def owners(attrs):
    """The owner ids a node's ``tied_to`` names (a string or a list), as a tuple (empty when untied)."""
    tied = attrs.get("tied_to")
    if tied is None:
        return ()
    return (tied,) if isinstance(tied, str) else tuple(tied)


def tied_nodes(graph):
    """The nodes of `graph` tied to an owner that is in the graph, as {node: owners}."""
    return {node: tuple(owner for owner in owners(data) if owner in graph)
            for node, data in graph.nodes(data=True) if any(owner in graph for owner in owners(data))}


def copy_bytes(graph, node, absent):
    """The bytes node `node` needs for the tensors it shares with the owners in `absent` (0 when none)."""
    if not absent:
        return 0
    attrs = graph.nodes[node]
    element = DTYPE_BYTES.get(str(graph.graph.get("dtype", "")).lower())
    if attrs.get("op") == "linear" and element and attrs.get("in_features") and attrs.get("out_features"):
        return int(attrs["in_features"]) * int(attrs["out_features"]) * element
    return sum(int(graph.nodes[owner].get("weight_bytes") or 0) for owner in absent)


def with_table_copies(graph, partitions=None):
    """A copy of `graph` in which every tied node counts a copy of the tables its stage lacks.

    Parameters
    ----------
    graph : networkx.DiGraph
    partitions : sequence of sequences of node ids, optional
        The stages.  None: every tied node is taken to be apart from its
        owners (what a split of at least two stages gives when `forced_apart`).

    Returns
    -------
    networkx.DiGraph
        `graph` itself when nothing changes (no tied node apart from its
        owner), else a new graph; `graph` is never changed.  Marks of an
        earlier split are replaced, not added to, on the nodes whose owner
        is in `graph` (a stage's sub-graph, without the owner, keeps them).
    """
    ties = tied_nodes(graph)
    earlier = {node for node in ties if graph.nodes[node].get(COPY_KEY)}  # a stage sub-graph keeps its copies
    stage_of = None if partitions is None else {node: index for index, group in enumerate(partitions)
                                                    for node in group}
    marks = {}
    for node, node_owners in ties.items():
        absent = node_owners if stage_of is None else tuple(owner for owner in node_owners
                                                            if stage_of.get(owner) != stage_of.get(node))
        extra = copy_bytes(graph, node, absent)
        if extra:
            marks[node] = extra
    if not marks and not earlier:
        return graph
    marked = nx.DiGraph(graph)  # nodes' attribute dicts are copied, not shared
    for node in earlier:  # a graph marked for another split: back to the model's own bytes first
        data = marked.nodes[node]
        data["weight_bytes"] = int(data.get("weight_bytes") or 0) - int(data.pop(COPY_KEY))
    for node, extra in marks.items():
        data = marked.nodes[node]
        data["weight_bytes"] = int(data.get("weight_bytes") or 0) + extra
        data[COPY_KEY] = extra
    return marked


def without_table_copies(graph):
    """`graph` as one module holds it: no copy for a node whose owner is in `graph` (`graph` itself when
    none is marked); a stage's sub-graph keeps the copies it needs."""
    return with_table_copies(graph, [list(graph)])


def forced_apart(graph, devices):
    """Whether every order-preserving split of `graph` into `devices` stages puts each tied node apart
    from its owners.

    A run of the node order holding positions i < j leaves i + (n − 1 − j)
    nodes for the other devices − 1 runs, so the two are apart in every
    split exactly when i + (n − 1 − j) < devices − 1 (an embedding first and
    its tied head last: whenever devices ≥ 2).
    """
    position = {node: index for index, node in enumerate(graph)}
    last = len(position) - 1
    for node, node_owners in tied_nodes(graph).items():
        for owner in node_owners:
            first, second = sorted((position[owner], position[node]))
            if first + (last - second) >= devices - 1:
                return False
    return True
