"""`from_layers`: a chain from a plain list of layer sizes."""

from __future__ import annotations

from collections.abc import Mapping

import networkx as nx

from ..errors import InputError
from ..validation import BYTE_ATTRIBUTES, validate

__all__ = ["from_layers"]


def from_layers(layers, *, name=None):
    """A chain graph from layer sizes.

    Parameters
    ----------
    layers : sequence of int or of mapping
        Each entry is either an int (the layer's weight bytes; activation and
        buffer 0) or a mapping with ``weight_bytes``, ``activation_bytes`` and
        ``buffer_bytes`` (missing ones are 0) and optionally ``name`` (the node
        id, default its index), ``op`` and ``flops`` (for ``balance="flops"``).
    name : str, optional
        The graph's name.

    Returns
    -------
    networkx.DiGraph
        Nodes in order, an edge from each layer to the next.

    Examples
    --------
    >>> g = from_layers([10, {"name": "head", "weight_bytes": 5, "activation_bytes": 2}])
    >>> list(g.nodes(data="weight_bytes")), list(g.edges)
    ([('0', 10), ('head', 5)], [('0', 'head')])
    """
    if isinstance(layers, (str, bytes, Mapping)) or not hasattr(layers, "__iter__"):
        raise InputError(f"`layers` must be a sequence of ints or mappings, got {type(layers).__name__}")
    graph = nx.DiGraph(name=name or "layers", source="from_layers")
    previous = None
    for index, layer in enumerate(layers):
        if isinstance(layer, Mapping):
            node = str(layer.get("name", index))
            unknown = set(layer) - set(BYTE_ATTRIBUTES) - {"name", "op", "flops"}
            if unknown:
                raise InputError(f"`layers[{index}]` has unknown keys {sorted(unknown)}; "
                                 f"expected {', '.join(BYTE_ATTRIBUTES)}, name, op, flops")
            attributes = {key: layer.get(key, 0) for key in BYTE_ATTRIBUTES}
            attributes.update({key: layer[key] for key in ("op", "flops") if key in layer})
        else:
            node = str(index)
            attributes = {"weight_bytes": layer, "activation_bytes": 0, "buffer_bytes": 0}
        if node in graph:
            raise InputError(f"`layers[{index}]`: duplicate layer name {node!r}")
        graph.add_node(node, **attributes)
        if previous is not None:
            graph.add_edge(previous, node)
        previous = node
    return validate(graph)
