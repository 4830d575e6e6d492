"""Memory models (DESIGN.md §4): the size S(P) of each group of a partition.

Two models:

``additive``
    The seed paper's formula: S(P) = Σ_{v∈P} (weight + activation + buffer).
``liveness``
    The working set: S(P) = Σ_{v∈P} weight + max_{v∈P} buffer
    + ⌈f · Σ_{u live in P} activation(u)⌉, where u is live in the p-th group
    when part(u) ≤ p ≤ last(u), last(u) being the largest group index among
    u's successors (part(u) when u has none), and f ∈ (0, 1] the streaming
    (chunk) fraction.

The rounding ⌈f·x⌉ is exact: f is taken as the rational number its float
denotes, so the solvers, the checker and a reader with pencil and paper agree
to the byte.

Solvers work on a `LayerTable`, the graph flattened into numpy arrays in its
node order, and cut it with `Intervals`, which gives S of a contiguous run of
that order in O(1).  For a run [s, e) of a fixed order the live set is the
run itself plus every earlier node with a successor at position ≥ s, so a
run's size does not depend on where the other cuts fall.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from fractions import Fraction

import networkx as nx
import numpy as np

from .errors import InputError
from .validation import validate

__all__ = [
    "MEMORY_MODELS",
    "LayerTable",
    "Intervals",
    "check_memory",
    "check_chunk_fraction",
    "scale_activation",
    "scale_activation_array",
    "group_sizes",
]

MEMORY_MODELS = ("additive", "liveness")


def check_memory(memory):
    """Return `memory` if it names a memory model, else raise `InputError`."""
    if memory not in MEMORY_MODELS:
        raise InputError(f"`memory` must be one of {', '.join(map(repr, MEMORY_MODELS))}, got {memory!r}")
    return memory


def check_chunk_fraction(chunk_fraction):
    """Return `chunk_fraction` as a float in (0, 1], else raise `InputError`."""
    if isinstance(chunk_fraction, bool) or not isinstance(chunk_fraction, (int, float, Fraction)):
        raise InputError(f"`chunk_fraction` must be a number in (0, 1], got {chunk_fraction!r}")
    value = float(chunk_fraction)
    if not (0.0 < value <= 1.0):
        raise InputError(f"`chunk_fraction` must be a number in (0, 1], got {chunk_fraction!r}")
    return value


def scale_activation(total, chunk_fraction):
    """⌈f · total⌉ computed exactly (f's float taken as the rational it denotes).

    >>> scale_activation(10, 0.25), scale_activation(10, 1/3), scale_activation(7, 1.0)
    (3, 4, 7)
    """
    if chunk_fraction == 1.0:
        return int(total)
    numerator, denominator = Fraction(chunk_fraction).as_integer_ratio()
    return -((-int(total) * numerator) // denominator)


def scale_activation_array(values, chunk_fraction, *, ceil=True):
    """⌈f·x⌉ (or ⌊f·x⌋ with ``ceil=False``) elementwise, exactly, as int64.

    f's float is taken as the rational it denotes, like `scale_activation`.
    When numerator × max(x) fits in int64 (every dyadic f such as 0.25, and
    byte counts < 2⁶³ / numerator) it is pure integer arithmetic; otherwise a
    float64 product, redone in exact integer arithmetic for the entries within
    rounding distance of an integer.

    Examples
    --------
    >>> scale_activation_array([10, 7, 0], 0.25).tolist(), scale_activation_array([10, 7, 0], 0.25, ceil=False).tolist()
    ([3, 2, 0], [2, 1, 0])
    >>> scale_activation_array([3, 4], 1 / 3).tolist()
    [1, 2]
    """
    values = np.asarray(values, dtype=np.int64)
    if chunk_fraction == 1.0:
        return values.copy()
    numerator, denominator = float(chunk_fraction).as_integer_ratio()
    top = int(values.max()) if values.size else 0
    if top * numerator < 2**62:
        if ceil:
            return -((-values * numerator) // denominator)
        return (values * numerator) // denominator
    product = values.astype(np.float64) * chunk_fraction
    result = (np.ceil(product) if ceil else np.floor(product)).astype(np.int64)
    near = np.flatnonzero(np.abs(product - np.rint(product)) <= 1e-6 * np.maximum(1.0, product))
    if near.size:
        exact = values[near].astype(object) * numerator  # Python ints: no overflow
        result[near] = (-((-exact) // denominator) if ceil else exact // denominator).astype(np.int64)
    return result


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
        """Validate `graph` and flatten it.  O(n + e)."""
        validate(graph)
        ids = tuple(graph.nodes)
        position = {node: index for index, node in enumerate(ids)}
        n = len(ids)
        columns = np.zeros((3, n), dtype=np.int64)
        for index, (_, data) in enumerate(graph.nodes(data=True)):
            columns[0, index] = data["weight_bytes"]
            columns[1, index] = data["activation_bytes"]
            columns[2, index] = data["buffer_bytes"]
        edges = np.array([(position[u], position[v]) for u, v in graph.edges], dtype=np.int64).reshape(-1, 2)
        sources, targets = edges[:, 0].copy(), edges[:, 1].copy()
        last_use = np.arange(n, dtype=np.int64)
        np.maximum.at(last_use, sources, targets)
        linked = np.zeros(max(n - 1, 0), dtype=bool)
        consecutive = targets == sources + 1
        linked[sources[consecutive]] = True
        return cls(ids, columns[0], columns[1], columns[2], last_use, sources, targets,
                   bool(linked.all()), graph)

    @classmethod
    def chain(cls, weight, activation=None, buffer=None, *, ids=None, flops=None):
        """A chain straight from arrays, without building a graph.

        This is the fast path for very long chains: ``ids`` default to
        ``"0", "1", ...``; `flops` (non-negative integers) defaults to none.
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


def _subtract_at(target, positions, values):
    """target[positions] -= values, with repeated positions accumulated (exact integers)."""
    if positions.size and np.all(positions[1:] > positions[:-1]):
        target[positions] -= values  # strictly increasing: no repeats (the chain case)
    else:
        np.subtract.at(target, positions, values)


def _byte_array(values, name):
    array = np.asarray(values)
    if array.ndim != 1:
        raise InputError(f"`{name}` must be a one-dimensional sequence of byte counts")
    if array.size and (array.dtype.kind not in "iu" or array.min() < 0):
        raise InputError(f"`{name}` must hold non-negative integers of bytes")
    return array.astype(np.int64, copy=False)


def as_table(graph):
    """`graph` as a `LayerTable` (a table is returned as it is)."""
    if isinstance(graph, LayerTable):
        return graph
    return LayerTable.from_graph(graph)


class Intervals:
    """O(1) sizes of contiguous runs [start, end) of a table's node order.

    Parameters
    ----------
    table : LayerTable
    memory : {"additive", "liveness"}
    chunk_fraction : float

    Notes
    -----
    Prefix sums of weights and activations, the activation "incoming" to each
    start position (earlier nodes consumed at or after it), and a sparse table
    for range maxima of buffers when any buffer is non-zero (O(n log n) build).
    """

    def __init__(self, table, memory, chunk_fraction=1.0):
        self.table = table
        self.memory = memory
        self.chunk_fraction = chunk_fraction
        n = table.n
        if memory == "additive":
            totals = table.weight + table.activation
            totals += table.buffer
            self.prefix_total = np.zeros(n + 1, dtype=np.int64)
            np.cumsum(totals, out=self.prefix_total[1:])
            return
        self.prefix_weight = np.concatenate(([0], np.cumsum(table.weight)))
        self.prefix_activation = np.concatenate(([0], np.cumsum(table.activation)))
        # incoming[s] = Σ activation(u) over u < s with last_use(u) >= s.
        delta = np.zeros(n + 2, dtype=np.int64)
        producers = np.flatnonzero(table.last_use > np.arange(n))
        delta[producers + 1] = table.activation[producers]  # positions are distinct
        _subtract_at(delta, table.last_use[producers] + 1, table.activation[producers])
        self.incoming = np.cumsum(delta)[: n + 1]
        self._levels = None
        self._fit_prefix = None
        if n and not table.buffer.any():
            # Without buffers, size(s, e) <= C  <=>  W(s, e) + f·A(s, e) <= C - f·incoming[s]
            # (W and C are integers, so W + ⌈x⌉ <= C  <=>  x <= C - W): a prefix-sum search.
            # For f < 1 the float prefix is only a first guess that `longest_fit` corrects exactly.
            if chunk_fraction == 1.0:
                fit = np.zeros(n + 1, dtype=np.int64)
                np.cumsum(table.weight + table.activation, out=fit[1:])
                self._fit_incoming = memoryview(self.incoming.copy())
            else:
                fit = np.zeros(n + 1, dtype=np.float64)
                np.cumsum(table.weight + chunk_fraction * table.activation, out=fit[1:])
                self._fit_incoming = memoryview(self.incoming * chunk_fraction)
            self._fit_prefix = memoryview(fit)
        elif n:
            levels = [table.buffer]
            width = 1
            while 2 * width <= n:
                previous = levels[-1]
                levels.append(np.maximum(previous[:-width], previous[width:]))
                width *= 2
            self._levels = levels

    def _max_buffer(self, start, end):
        if self._levels is None:
            return 0
        level = (end - start).bit_length() - 1
        row = self._levels[level]
        return int(max(row[start], row[end - (1 << level)]))

    def size(self, start, end):
        """S of the run [start, end) (end > start)."""
        if self.memory == "additive":
            return int(self.prefix_total[end] - self.prefix_total[start])
        live = int(self.prefix_activation[end] - self.prefix_activation[start] + self.incoming[start])
        return (int(self.prefix_weight[end] - self.prefix_weight[start])
                + self._max_buffer(start, end) + scale_activation(live, self.chunk_fraction))

    def longest_fit(self, start, capacity):
        """The largest end with size(start, end) <= capacity (start when none).

        Exponential then binary search: O(log(end - start)) size evaluations,
        valid because a run's size never shrinks when it grows.
        """
        n = self.table.n
        if self.memory == "additive":
            prefix = self.prefix_total
            return int(prefix.searchsorted(prefix[start] + capacity, side="right")) - 1
        if self._fit_prefix is not None and start < n:
            prefix = self._fit_prefix
            end = bisect.bisect_right(prefix, prefix[start] - self._fit_incoming[start] + capacity, start) - 1
            end = min(max(end, start), n)
            if self.chunk_fraction == 1.0:  # integer prefix sums: the search is exact
                return end
            while end > start and self.size(start, end) > capacity:
                end -= 1
            while end < n and self.size(start, end + 1) <= capacity:
                end += 1
            return end
        if start >= n or self.size(start, start + 1) > capacity:
            return start
        low, step = start + 1, 1  # size(start, low) fits
        while low + step <= n and self.size(start, low + step) <= capacity:
            low += step
            step *= 2
        high = min(low + step, n + 1)  # size(start, high) does not fit or high = n + 1
        while high - low > 1:
            middle = (low + high) // 2
            if self.size(start, middle) <= capacity:
                low = middle
            else:
                high = middle
        return low

    def sizes(self, bounds):
        """Sizes of consecutive runs given by boundary positions [0, b1, ..., n]."""
        bounds = np.asarray(bounds, dtype=np.int64)
        if self.memory == "additive":
            return np.diff(self.prefix_total[bounds])
        if self._levels is None:
            starts = bounds[:-1]
            live = np.diff(self.prefix_activation[bounds]) + self.incoming[starts]
            return np.diff(self.prefix_weight[bounds]) + scale_activation_array(live, self.chunk_fraction)
        return np.array([self.size(int(s), int(e)) for s, e in zip(bounds[:-1], bounds[1:])], dtype=np.int64)


def group_sizes(graph, partitions, *, memory="liveness", chunk_fraction=1.0):
    """S of every group of `partitions` under `memory` (DESIGN.md §4).

    Parameters
    ----------
    graph : networkx.DiGraph or LayerTable
    partitions : sequence of sequences of node ids
        The groups in execution order; every node exactly once.

    Returns
    -------
    list of int

    Examples
    --------
    >>> import networkx as nx
    >>> g = nx.DiGraph()
    >>> for name in "abc":
    ...     g.add_node(name, weight_bytes=10, activation_bytes=4, buffer_bytes=1)
    >>> g.add_edges_from([("a", "b"), ("b", "c"), ("a", "c")])
    >>> group_sizes(g, [["a"], ["b"], ["c"]], memory="additive")
    [15, 15, 15]
    >>> group_sizes(g, [["a"], ["b"], ["c"]], memory="liveness")
    [15, 19, 23]
    """
    check_memory(memory)
    chunk_fraction = check_chunk_fraction(chunk_fraction)
    table = as_table(graph)
    position = {node: index for index, node in enumerate(table.ids)}
    part = np.full(table.n, -1, dtype=np.int64)
    for group_index, group in enumerate(partitions):
        for node in group:
            if node not in position:
                raise InputError(f"`partitions`: unknown node {node!r}")
            if part[position[node]] != -1:
                raise InputError(f"`partitions`: node {node!r} appears twice")
            part[position[node]] = group_index
    if (part < 0).any():
        missing = table.ids[int(np.flatnonzero(part < 0)[0])]
        raise InputError(f"`partitions`: node {missing!r} is in no group")
    k = len(partitions)
    if memory == "additive":
        totals = table.weight + table.activation + table.buffer
        return [int(x) for x in _sum_by_group(part, totals, k)]
    weights = _sum_by_group(part, table.weight, k)
    max_buffer = np.zeros(k, dtype=np.int64)
    np.maximum.at(max_buffer, part, table.buffer)
    last = part.copy()
    np.maximum.at(last, table.sources, part[table.targets])
    delta = np.zeros(k + 1, dtype=np.int64)
    np.add.at(delta, part, table.activation)
    np.add.at(delta, last + 1, -table.activation)
    live = np.cumsum(delta)[:k]
    scaled = [scale_activation(int(x), chunk_fraction) for x in live]
    return [int(w) + int(b) + s for w, b, s in zip(weights, max_buffer, scaled)]


def _sum_by_group(part, values, k):
    sums = np.zeros(k, dtype=np.int64)
    np.add.at(sums, part, values)
    return sums
