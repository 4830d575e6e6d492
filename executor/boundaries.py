"""Where a pipeline runtime can cut a ``torch.export`` graph: `module_boundaries` (no torch needed).

``torch.distributed.pipelining`` cuts a forward where a submodule is called
(``split_spec`` keys are module qualified names, ``SplitPoint.BEGINNING``).
In a graph that ``from_torch`` captured with ``torch.export`` the nodes are
named after modules (`cachefit.graphs.torch_export`): a leaf module's
qualified name, or a parent's own operations (``model.layers.0``,
``model.layers.0#1``, ``root``).  A stage may begin at node ``n`` when some
module ``P`` (``n`` itself or one of its ancestors) begins at ``n``: ``n`` is
the first node, in execution order, named ``P``, ``P.…`` or ``P#…``; and
``P`` is called once per forward: its nodes form one contiguous run and no
leaf under it ran twice (a ``leaf#1`` node); and ``P`` runs operations of
its own (a node is named ``P`` or ``P#…``), which a container such as a
``ModuleList``, never called, does not.  The split point is the outermost
such ``P`` (``model.layers.4`` rather than its first norm).

`cachefit.stages.stages` cuts only at these nodes for such graphs, and
`cachefit.executor.split.split_spec` turns them into the runtime's split
points.
"""

from __future__ import annotations

__all__ = ["module_boundaries", "stage_boundaries"]

#: Graph sources whose nodes are module runs named by qualified name.
EXPORT_SOURCES = ("torch.export",)


def _ancestors(name):
    """``a.b.c`` -> ``["a", "a.b", "a.b.c"]`` (outermost first)."""
    parts = name.split(".")
    return [".".join(parts[:cut]) for cut in range(1, len(parts) + 1)]


def module_boundaries(graph):
    """node id -> the module qualified name a pipeline stage beginning there splits at.

    Parameters
    ----------
    graph : networkx.DiGraph
        A ``from_torch`` graph captured with ``torch.export``.

    Returns
    -------
    dict of str to str
        Only the nodes where a stage may begin (see the module docstring);
        never the first computing node (no stage ends before it).

    Examples
    --------
    >>> import networkx as nx
    >>> g = nx.DiGraph()
    >>> g.add_nodes_from(["x", "emb", "layers.0.norm", "layers.0.fc", "layers.0", "layers.1.norm",
    ...                   "layers.1.fc", "layers.1", "act", "head", "act#1"])
    >>> g.nodes["x"]["op"] = "input"
    >>> module_boundaries(g)
    {'layers.0.norm': 'layers.0', 'layers.0.fc': 'layers.0.fc', 'layers.1.norm': 'layers.1', 'layers.1.fc': 'layers.1.fc', 'head': 'head'}
    """
    order = [node for node in graph if graph.nodes[node].get("op") != "input"]
    position = {node: index for index, node in enumerate(order)}
    base_names = {node.split("#")[0] for node in order}
    inner = {prefix for name in base_names for prefix in _ancestors(name)[:-1]}
    runs = {}  # module -> positions of its nodes
    for node in order:
        base = node.split("#")[0]
        if base == "root":
            continue
        for module in _ancestors(base):
            runs.setdefault(module, []).append(position[node])
    repeated = {node.split("#")[0] for node in order if "#" in node and node.split("#")[0] not in inner}
    result = {}
    for node in order[1:]:
        if "#" in node or node == "root":
            continue
        for module in _ancestors(node):
            spots = runs.get(module, [])
            if module not in base_names or not spots or spots[0] != position[node]:
                continue
            contiguous = spots[-1] - spots[0] + 1 == len(spots)
            twice = any(leaf == module or leaf.startswith(module + ".") for leaf in repeated)
            if contiguous and not twice:
                result[node] = module
                break
    return result


def stage_boundaries(graph):
    """The nodes a stage may begin at, or None when any node may (the graph is not module-named).

    Graphs from ``torch.export`` capture: `module_boundaries`.
    Other graphs, ``torch.fx`` ones included (their nodes do not record
    whether they call a submodule): None, and `split_spec` checks the cuts.
    """
    if graph.graph.get("source") in EXPORT_SOURCES:
        return set(module_boundaries(graph))
    return None
