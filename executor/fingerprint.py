"""Which graph a plan was made for: `graph_fingerprint` and the plan checks run before executing.

The executor refuses to run a plan on a model built from another graph.  The
test is a hash over everything that decides what runs and how large it is:
node ids in execution order, every node attribute (op, shapes, byte counts,
tiles), and the edges.  It is computed from plain Python values, so a graph
and its JSON round trip (`cachefit.Plan.to_json` / `from_json`) hash alike.
"""

from __future__ import annotations

import hashlib
import json
import math

import networkx as nx

from ..errors import InputError
from ..memory import LayerTable

__all__ = ["graph_fingerprint", "check_plan_groups", "check_same_graph", "plan_graph"]


def _canonical(value):
    """A JSON-ready form of an attribute value that survives a JSON round trip unchanged."""
    if isinstance(value, dict):
        return {str(key): _canonical(item) for key, item in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(item) for item in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, float):
        return None if not math.isfinite(value) else (int(value) if value.is_integer() and abs(value) < 2**53 else value)
    if isinstance(value, int):
        return value
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _canonical(value.item())
    return str(value)


def graph_fingerprint(graph):
    """A hex digest identifying `graph`'s nodes, shapes, byte counts and edges.

    Parameters
    ----------
    graph : networkx.DiGraph or cachefit.memory.LayerTable
        A model graph.

    Returns
    -------
    str
        64 hex digits (SHA-256).  Equal for a graph and its JSON round trip;
        different when a node id, the node order, an attribute (``op``, a
        shape key, ``weight_bytes``, ``activation_bytes``, ``buffer_bytes``,
        ``tile``, ...) or an edge differs.  Graph-level attributes (name,
        source, config) are not hashed: the nodes carry every shape the
        executor uses.

    Raises
    ------
    InputError
        `graph` is neither a DiGraph nor a LayerTable.

    Notes
    -----
    O(n + e) after sorting each node's attribute keys.  Floats that are whole
    numbers hash as ints (JSON may turn ``2.0`` into ``2``); tuples hash as
    lists (JSON has no tuples).

    Examples
    --------
    >>> from cachefit.graphs import from_layers
    >>> from cachefit.result import graph_from_data, graph_to_data
    >>> g = from_layers([10, 20, 30])
    >>> graph_fingerprint(g) == graph_fingerprint(graph_from_data(graph_to_data(g)))
    True
    >>> graph_fingerprint(g) == graph_fingerprint(from_layers([10, 20, 31]))
    False
    """
    if isinstance(graph, LayerTable):
        graph = graph.to_graph()
    if not isinstance(graph, nx.DiGraph):
        raise InputError(f"`graph` must be a networkx.DiGraph or a LayerTable, got {type(graph).__name__}")
    record = {
        "nodes": [[str(node), _canonical(dict(data))] for node, data in graph.nodes(data=True)],
        "edges": sorted([str(u), str(v)] for u, v in graph.edges()),
    }
    text = json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def check_plan_groups(plan, graph=None):
    """The plan's groups as lists of node ids, after checking they can run in order.

    Parameters
    ----------
    plan : cachefit.Plan
        A plan with status OPTIMAL or FEASIBLE.
    graph : networkx.DiGraph, optional
        The graph to check against (default ``plan.graph``).

    Returns
    -------
    list of list of str
        ``plan.partitions``, each group's nodes put in the graph's node order.

    Raises
    ------
    InputError
        The plan has no groups (``plan.ok`` is false), carries no graph, names
        a node twice or a node not in the graph, leaves a node out, or has an
        edge from a later group to an earlier one.

    Notes
    -----
    O(n + e).  Capacity is not checked here: an over-capacity plan still runs
    (it is only slower); `cachefit.check` reports capacity violations.

    Examples
    --------
    >>> import cachefit
    >>> g = cachefit.graphs.from_layers([10, 20, 30])
    >>> check_plan_groups(cachefit.plan(g, 35, solver="greedy"))
    [['0', '1'], ['2']]
    """
    if not getattr(plan, "ok", False):
        reason = getattr(plan, "reason", "")
        raise InputError(f"`plan` must hold groups (status OPTIMAL or FEASIBLE), got status "
                         f"{getattr(plan, 'status', None)}" + (f": {reason}" if reason else ""))
    graph = plan_graph(plan if graph is None else graph)
    position = {node: index for index, node in enumerate(graph)}
    group_of = {}
    for index, group in enumerate(plan.partitions):
        for node in group:
            if node not in position:
                raise InputError(f"`plan` names node {node!r}, which is not in the model graph")
            if node in group_of:
                raise InputError(f"`plan` puts node {node!r} in two groups ({group_of[node]} and {index})")
            group_of[node] = index
    missing = [node for node in graph if node not in group_of]
    if missing:
        raise InputError(f"`plan` leaves {len(missing)} node(s) out, e.g. {missing[0]!r}")
    for u, v in graph.edges():
        if group_of[u] > group_of[v]:
            raise InputError(f"`plan` cannot run in order: edge {u!r} -> {v!r} goes from group "
                             f"{group_of[u]} back to group {group_of[v]}")
    return [sorted(group, key=position.__getitem__) for group in plan.partitions]


def plan_graph(source):
    """The networkx graph of `source`: a plan's graph, or a graph (a `LayerTable` converted) as it is.

    Raises
    ------
    InputError
        A plan that carries no graph.

    Examples
    --------
    >>> import cachefit
    >>> plan = cachefit.plan(cachefit.graphs.from_layers([10, 20]), 40, solver="greedy")
    >>> sorted(plan_graph(plan)), plan_graph(plan.graph) is plan.graph
    (['0', '1'], True)
    """
    graph = source.graph if hasattr(source, "partitions") else source
    if isinstance(graph, LayerTable):
        graph = graph.to_graph()
    if graph is None:
        raise InputError("`plan` carries no graph; the executor needs the graph the plan was made for "
                         "(read the plan from its JSON file, Plan.from_json)")
    return graph


def check_same_graph(plan, fingerprint, what="the model"):
    """Refuse to run `plan` on something built from a graph whose `graph_fingerprint` is `fingerprint`.

    Raises
    ------
    InputError
        The plan carries no graph, or its graph is another one (node ids,
        shapes or byte counts differ); the message gives both fingerprints.
    """
    planned = graph_fingerprint(plan_graph(plan))
    if planned != fingerprint:
        raise InputError(f"`plan` does not match {what}: the plan's graph (fingerprint {planned[:12]}) is not "
                         f"the graph {what} was built from ({fingerprint[:12]}); node ids, shapes or byte "
                         "counts differ; plan the model's own graph")
