"""`LayerTable`: a model graph flattened into numpy arrays, in its node order."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import networkx as nx
import numpy as np

from ..errors import InputError
from ..validation import MAX_BYTES, check_total, flatten

__all__ = ["LayerTable", "as_table"]


@dataclass(frozen=True, eq=False)
class LayerTable:
    """A model graph flattened into arrays, in its node order.

    Attributes
    ----------
    ids : tuple of str
        Node ids in order (a topological order).
    weight, activation, buffer : numpy.ndarray of int64
        The byte attributes per position.
    last_use : numpy.ndarray of int64
        The largest position among each node's successors (its own position
        when it has none).
    sources, targets : numpy.ndarray of int64
        The edges as position pairs.
    is_chain : bool
        Every consecutive pair of positions is an edge, so the order is the
        only topological order and the only valid groups are contiguous runs.
    graph : networkx.DiGraph or None
        The graph the table was made from.
    flops : numpy.ndarray of int64 or None
        Per-position compute, for balancing by flops; None means: read the
        graph's ``flops`` attributes when asked (`flops_array`).
    """

    ids: tuple
    weight: np.ndarray
    activation: np.ndarray
    buffer: np.ndarray
    last_use: np.ndarray
    sources: np.ndarray
    targets: np.ndarray
    is_chain: bool
    graph: nx.DiGraph | None = field(default=None, repr=False)
    flops: np.ndarray | None = field(default=None, repr=False)

    @property
    def n(self):
        return len(self.ids)

    @classmethod
    def from_graph(cls, graph):
        """Validate `graph` (`cachefit.validation.validate`) and flatten it.  O(n + e), vectorised."""
        ids, columns, sources, targets = flatten(graph)
        last_use, is_chain = _last_use_and_chain(len(ids), sources, targets)
        return cls(ids, columns[0], columns[1], columns[2], last_use, sources, targets, is_chain, graph)

    @classmethod
    def chain(cls, weight, activation=None, buffer=None, *, ids=None, flops=None):
        """A chain straight from arrays, without building a graph.

        This is the fast path for very long chains: ``ids`` (strings) default
        to ``"0", "1", ...``; `flops` (non-negative integers) defaults to
        none.  The byte counts must add up to at most 2**62
        (`cachefit.validation.MAX_BYTES`).
        """
        weight = _byte_array(weight, "weight")
        n = len(weight)
        activation = np.zeros(n, np.int64) if activation is None else _byte_array(activation, "activation")
        buffer = np.zeros(n, np.int64) if buffer is None else _byte_array(buffer, "buffer")
        if not (len(activation) == len(buffer) == n):
            raise InputError("`weight`, `activation` and `buffer` must have the same length")
        if ids is None:
            ids = [str(index) for index in range(n)]
        elif len(ids) != n:
            raise InputError(f"`ids` must have {n} entries, got {len(ids)}")
        elif not all(type(node) is str for node in ids):
            bad = next(node for node in ids if not isinstance(node, str))
            raise InputError(f"`ids` must be strings, got {bad!r} ({type(bad).__name__})")
        check_total(ids, np.vstack([weight, activation, buffer]))
        if flops is not None:
            flops = _byte_array(flops, "flops")
            if len(flops) != n:
                raise InputError(f"`flops` must have {n} entries, got {len(flops)}")
        last_use = np.minimum(np.arange(1, n + 1, dtype=np.int64), max(n - 1, 0))
        sources = np.arange(max(n - 1, 0), dtype=np.int64)
        return cls(tuple(ids), weight, activation, buffer, last_use, sources, sources + 1, True, flops=flops)

    def flops_array(self):
        """The ``flops`` of every position as int64: the table's own, else the graph's attributes.

        A node without ``flops`` (or with None) counts 0.

        Raises
        ------
        InputError
            A ``flops`` attribute that is not a non-negative finite number,
            naming the node; or a total beyond 2⁶² (int64 headroom).

        Examples
        --------
        >>> LayerTable.chain([1, 2], flops=[5, 0]).flops_array().tolist()
        [5, 0]
        >>> LayerTable.chain([1, 2]).flops_array().tolist()
        [0, 0]
        """
        if self.flops is not None:
            return self.flops
        values = np.zeros(self.n, dtype=np.int64)
        if self.graph is not None:
            for index, node in enumerate(self.ids):
                value = self.graph.nodes[node].get("flops")
                if value is None:
                    continue
                if (isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating))
                        or not math.isfinite(value) or value < 0):
                    raise InputError(f"node {node!r}: `flops` must be a non-negative finite number, got {value!r}")
                if value >= 2**62:
                    raise InputError(f"node {node!r}: `flops` {value!r} is beyond 2**62; scale the graph's flops "
                                     "down (only ratios matter)")
                values[index] = int(round(value))
        if values.size and sum(values.tolist()) >= 2**62:
            raise InputError("the graph's `flops` add up beyond 2**62; scale them down (only ratios matter)")
        return values

    def to_graph(self):
        """The graph this table stands for (the original one when it has it)."""
        if self.graph is not None:
            return self.graph
        graph = nx.DiGraph()
        for index, node in enumerate(self.ids):
            graph.add_node(node, weight_bytes=int(self.weight[index]),
                           activation_bytes=int(self.activation[index]),
                           buffer_bytes=int(self.buffer[index]))
        graph.add_edges_from((self.ids[u], self.ids[v]) for u, v in zip(self.sources.tolist(), self.targets.tolist()))
        return graph

    def predecessors(self):
        """List of predecessor positions of every position."""
        preds = [[] for _ in range(self.n)]
        for u, v in zip(self.sources.tolist(), self.targets.tolist()):
            preds[v].append(u)
        return preds

    def successors(self):
        """List of successor positions of every position (in edge order).

        >>> LayerTable.chain([1, 1, 1]).successors()
        [[1], [2], []]
        """
        succs = [[] for _ in range(self.n)]
        for u, v in zip(self.sources.tolist(), self.targets.tolist()):
            succs[u].append(v)
        return succs

    def reorder(self, order):
        """The same nodes in `order` (a topological order of positions), as a new table.

        Edges, ``last_use`` and ``is_chain`` are recomputed for the new
        positions; the table's own ``flops`` follow their nodes.  The result
        keeps no graph (its node order is not the graph's).  `order` is
        trusted to be a permutation that keeps every edge forward.

        Examples
        --------
        >>> import networkx as nx
        >>> g = nx.DiGraph()
        >>> for name in "abc":
        ...     g.add_node(name, weight_bytes=1, activation_bytes=0, buffer_bytes=0)
        >>> g.add_edges_from([("a", "b"), ("a", "c")])
        >>> t = LayerTable.from_graph(g).reorder([0, 2, 1])
        >>> t.ids, t.sources.tolist(), t.targets.tolist(), t.last_use.tolist()
        (('a', 'c', 'b'), [0, 0], [2, 1], [2, 1, 2])
        """
        order = np.asarray(order, dtype=np.int64)
        n = self.n
        position = np.empty(n, dtype=np.int64)
        position[order] = np.arange(n)
        sources, targets = position[self.sources], position[self.targets]
        last_use, is_chain = _last_use_and_chain(n, sources, targets)
        return LayerTable(tuple(self.ids[i] for i in order.tolist()), self.weight[order], self.activation[order],
                          self.buffer[order], last_use, sources, targets, is_chain, None,
                          None if self.flops is None else self.flops[order])


def _last_use_and_chain(n, sources, targets):
    """(last_use, is_chain) of edges given as position arrays.

    Edges that are exactly 0 → 1, 1 → 2, …, in that order (what `flatten`
    gives for a chain) are recognised with two array comparisons; their
    ``last_use`` is every position's successor, without a scatter.
    """
    positions = np.arange(n, dtype=np.int64)
    if n and np.array_equal(sources, positions[:-1]) and np.array_equal(targets, positions[1:]):
        positions[:-1] += 1
        return positions, True
    last_use = positions
    np.maximum.at(last_use, sources, targets)
    linked = np.zeros(max(n - 1, 0), dtype=bool)
    consecutive = targets == sources + 1
    linked[sources[consecutive]] = True
    return last_use, bool(linked.all())


def _byte_array(values, name):
    array = np.asarray(values)
    if array.ndim != 1:
        raise InputError(f"`{name}` must be a one-dimensional sequence of byte counts")
    if array.size and (array.dtype.kind not in "iu" or array.min() < 0):
        raise InputError(f"`{name}` must hold non-negative integers of bytes")
    if array.size and array.max() > MAX_BYTES:
        raise InputError(f"`{name}` holds {int(array.max())}, beyond 2**62, the most cachefit's exact "
                         "integer arithmetic holds for a graph")
    return array.astype(np.int64, copy=False)


def as_table(graph):
    """`graph` as a `LayerTable` (a table is returned as it is)."""
    if isinstance(graph, LayerTable):
        return graph
    return LayerTable.from_graph(graph)


