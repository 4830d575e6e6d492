"""Validation of model graphs (DESIGN.md §3): one function, used by every entry point."""

from __future__ import annotations

import numbers

import networkx as nx

from .errors import InputError

__all__ = ["BYTE_ATTRIBUTES", "validate"]

#: The node attributes every graph must carry, as non-negative integers.
BYTE_ATTRIBUTES = ("weight_bytes", "activation_bytes", "buffer_bytes")


def validate(graph):
    """Check that `graph` is a model graph cachefit can plan; return it unchanged.

    A model graph is a `networkx.DiGraph` whose nodes carry ``weight_bytes``,
    ``activation_bytes`` and ``buffer_bytes`` as non-negative finite integers,
    that is acyclic, and whose node insertion order is a topological order
    (the model's execution order).

    Raises
    ------
    InputError
        Naming the node and attribute at fault, or the first backward edge.

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
    if not isinstance(graph, nx.DiGraph) or graph.is_multigraph():
        raise InputError(f"`graph` must be a networkx.DiGraph, got {type(graph).__name__}")
    for node, data in graph.nodes(data=True):
        for attribute in BYTE_ATTRIBUTES:
            if attribute not in data:
                raise InputError(f"node {node!r}: missing `{attribute}` (a non-negative integer of bytes)")
            value = data[attribute]
            ok = (isinstance(value, numbers.Integral) and not isinstance(value, bool)
                  and value >= 0)
            if not ok:
                raise InputError(
                    f"node {node!r}: `{attribute}` must be a non-negative integer, got {value!r}")
    position = {node: index for index, node in enumerate(graph.nodes)}
    for u, v in graph.edges:
        if u == v:
            raise InputError(f"the graph has a cycle: self-loop on node {u!r}")
        if position[u] > position[v]:
            if not nx.is_directed_acyclic_graph(graph):
                cycle = nx.find_cycle(graph)
                raise InputError(f"the graph has a cycle: {' -> '.join(repr(a) for a, _ in cycle)}")
            raise InputError(
                f"node order is not topological: edge {u!r} -> {v!r} goes backwards; "
                "add nodes in execution order (e.g. rebuild from nx.topological_sort)")
    return graph
