"""The group-size engine: every S(P) query the solvers, `tile` and the bounds ask, for every model.

`Intervals` answers queries about contiguous runs [start, end) of one
table's node order (sizes, the longest run that fits from a start, the
earliest start that fits for an end, greedy cuts and counts), in O(1) or one
C-level bisection each.  `group_sizes` gives S of any grouping of a DAG,
`alone_sizes` S of each node in a group of its own, and `sizes_alone` the
same for nodes whose live bytes the caller counts (tiles).

Nothing here names a model: each query aggregates the model's `Terms`
(Σ summed, max peak, ⌈f·live⌉), so a model added to `MODELS` gets every
query at once.
"""

from __future__ import annotations

import bisect

import numpy as np

from ..errors import InputError
from .models import get_model
from .scale import check_chunk_fraction, scale_activation, scale_activation_array
from .table import as_table

__all__ = ["Intervals", "OpenGroup", "group_sizes", "alone_sizes", "sizes_alone"]


def _prefix(values):
    prefix = np.zeros(len(values) + 1, dtype=np.int64)
    np.cumsum(values, out=prefix[1:])
    return prefix


def _subtract_at(target, positions, values):
    """target[positions] -= values, with repeated positions accumulated (exact integers)."""
    if positions.size and np.all(positions[1:] > positions[:-1]):
        target[positions] -= values  # strictly increasing: no repeats (the chain case)
    else:
        np.subtract.at(target, positions, values)


def _incoming(table, live):
    """incoming[s] = Σ live(u) over u < s with last_use(u) ≥ s, for s = 0..n."""
    n = table.n
    if table.is_chain and table.sources.size == n - 1:  # the edges are 0 → 1, 1 → 2, …: one consumer each
        incoming = np.zeros(n + 1, dtype=np.int64)
        incoming[1:n] = live[:n - 1]
        return incoming
    delta = np.zeros(n + 2, dtype=np.int64)
    producers = np.flatnonzero(table.last_use > np.arange(n))
    delta[producers + 1] = live[producers]  # positions are distinct
    _subtract_at(delta, table.last_use[producers] + 1, live[producers])
    return np.cumsum(delta)[: n + 1]


def _sparse_max(values):
    """Sparse table for range maxima: levels[j][i] = max(values[i : i + 2^j])."""
    levels, width = [values], 1
    while 2 * width <= len(values):
        previous = levels[-1]
        levels.append(np.maximum(previous[:-width], previous[width:]))
        width *= 2
    return levels


class Intervals:
    """Sizes of contiguous runs [start, end) of a table's node order, under one memory model.

    Parameters
    ----------
    table : LayerTable
    memory : str
        A name in `cachefit.memory.MODELS`.
    chunk_fraction : float

    Attributes
    ----------
    mode : {"exact", "float", "search"}
        How a run's fit is searched (below).
    incoming : numpy.ndarray
        Live bytes entering each start position (earlier nodes consumed at or
        after it); only for models with a live term.
    prefix_total : numpy.ndarray
        Prefix sums of the summed term; only for models whose size is that
        alone (``additive``).

    Notes
    -----
    S(s, e) = Σ summed + max peak + ⌈f · (Σ live over the run + incoming[s])⌉:
    for a run of a fixed order the live set is the run itself plus every
    earlier node with a successor at position ≥ s, so a run's size does not
    depend on where the other cuts fall, and it never shrinks when the run
    grows at either end.

    ``"exact"``
        No peak term, and no live term or f = 1: S(s, e) = E[e] − B[s] with
        non-decreasing int64 arrays (E = prefix of summed + live,
        B = E − incoming).  ``end`` and ``begin`` are one C-level bisection
        over a memoryview: no per-node Python work.
    ``"float"``
        No peak term, f < 1.  ⌈f·x⌉ ≤ m ⇔ f·x ≤ m for an integer m, so one
        bisection over float64 keys, then an exact check (and a galloping
        correction, if rounding put it off by some positions) in integers.
    ``"search"``
        A peak term (the max does not separate): a sparse table for range
        maxima (O(n log n) build) and O(log n) size evaluations per search.
    """

    def __init__(self, table, memory, chunk_fraction=1.0):
        self.table = table
        self.n = n = table.n
        self.memory = memory
        self.model = get_model(memory)
        self.chunk_fraction = chunk_fraction
        self._numerator, self._denominator = float(chunk_fraction).as_integer_ratio()
        terms = self.terms = self.model.terms_at(table, chunk_fraction)
        self.prefix_summed = _prefix(terms.summed)
        self.has_live = terms.live is not None
        self._levels = _sparse_max(terms.peak) if terms.peak is not None and n and terms.peak.any() else None
        self._summed = memoryview(self.prefix_summed)
        if self.has_live:
            self.prefix_live = _prefix(terms.live)
            self.incoming = _incoming(table, terms.live)
            self._live = memoryview(self.prefix_live)
            self._incoming = memoryview(self.incoming)
        elif self._levels is None:
            self.prefix_total = self.prefix_summed
        self.ends = self.starts = None
        if self._levels is not None:
            self.mode = "search"
        elif not self.has_live:
            self.mode = "exact"
            self.ends = self.starts = self.prefix_summed
        elif chunk_fraction == 1.0:
            self.mode = "exact"
            self.ends = self.prefix_summed + self.prefix_live
            self.starts = self.ends - self.incoming
        else:
            self.mode = "float"
            self.ends = self.prefix_summed + chunk_fraction * self.prefix_live.astype(np.float64)
            self.starts = self.prefix_summed + chunk_fraction * (self.prefix_live - self.incoming).astype(np.float64)
        if self.ends is not None:
            self._ends_view = memoryview(np.ascontiguousarray(self.ends))
            self._starts_view = memoryview(np.ascontiguousarray(self.starts))

    def _max_peak(self, start, end):
        level = (end - start).bit_length() - 1
        row = self._levels[level]
        return int(max(row[start], row[end - (1 << level)]))

    def size(self, start, end):
        """S of the run [start, end) (end > start), exactly, as a Python int."""
        if self.mode == "exact":
            return self._ends_view[end] - self._starts_view[start]
        total = self._summed[end] - self._summed[start]
        if self._levels is not None:
            total += self._max_peak(start, end)
        if self.has_live:
            live = self._live[end] - self._live[start] + self._incoming[start]
            total -= (-live * self._numerator) // self._denominator
        return total

    def sizes_of(self, starts, ends):
        """Sizes of runs [starts[i], ends[i]) (int64 arrays, ends > starts), exactly."""
        if self.mode == "exact":
            return self.ends[ends] - self.starts[starts]
        sizes = self.prefix_summed[ends] - self.prefix_summed[starts]
        if self.has_live:
            live = self.prefix_live[ends] - self.prefix_live[starts] + self.incoming[starts]
            sizes = sizes + scale_activation_array(live, self.chunk_fraction)
        if self._levels is not None:
            level = np.frexp((ends - starts).astype(np.float64))[1] - 1  # ⌊log2(length)⌋
            peaks = np.empty_like(sizes)
            for value in np.unique(level):
                rows = np.flatnonzero(level == value)
                row = self._levels[int(value)]
                peaks[rows] = np.maximum(row[starts[rows]], row[ends[rows] - (1 << int(value))])
            sizes = sizes + peaks
        return sizes

    def sizes(self, bounds):
        """Sizes of consecutive runs given by boundary positions [0, b1, ..., n]."""
        bounds = np.asarray(bounds, dtype=np.int64)
        return self.sizes_of(bounds[:-1], bounds[1:])

    def _gallop_end(self, start, guess, cap):
        """Largest end ≥ start with size(start, end) ≤ cap (start when none), from a guess."""
        n, size = self.n, self.size
        guess = min(max(guess, start), n)
        if guess > start and size(start, guess) > cap:
            high, step = guess, 1  # high does not fit
            low = guess - 1
            while low > start and size(start, low) > cap:
                high = low
                step *= 2
                low = max(start, guess - step)
        else:
            low, step = guess, 1  # low fits (or is start)
            while low + step <= n and size(start, low + step) <= cap:
                low += step
                step *= 2
            high = min(low + step, n + 1)
        while high - low > 1:
            middle = (low + high) // 2
            if size(start, middle) <= cap:
                low = middle
            else:
                high = middle
        return low

    def _gallop_begin(self, end, guess, cap):
        """Smallest start < end with size(start, end) ≤ cap (end when none), from a guess."""
        size = self.size
        if end == 0 or size(end - 1, end) > cap:
            return end
        guess = min(max(guess, 0), end - 1)
        if size(guess, end) <= cap:
            high, step = guess, 1  # high fits
            low = guess - 1
            while low >= 0 and size(low, end) <= cap:
                high = low
                step *= 2
                low = guess - step
            low = max(low, -1)  # low does not fit, or is -1
        else:
            low, step = guess, 1  # low does not fit
            while low + step < end - 1 and size(low + step, end) > cap:
                low += step
                step *= 2
            high = min(low + step, end - 1)
        while high - low > 1:
            middle = (low + high) // 2
            if size(middle, end) <= cap:
                high = middle
            else:
                low = middle
        return high

    def end(self, start, cap):
        """The largest end with size(start, end) ≤ cap (start when none)."""
        if self.mode == "exact":
            return max(start, bisect.bisect_right(self._ends_view, self._starts_view[start] + cap, start) - 1)
        if start >= self.n:
            return start
        if self.mode == "float":
            guess = bisect.bisect_right(self._ends_view, self._starts_view[start] + cap, start) - 1
            return self._gallop_end(start, guess, cap)
        return self._gallop_end(start, start + 1, cap)

    longest_fit = end

    def begin(self, end, cap):
        """The smallest start ≤ end − 1 with size(start, end) ≤ cap (end when none)."""
        if self.mode == "exact":
            return bisect.bisect_left(self._starts_view, self._ends_view[end] - cap, 0, end)
        guess = end - 1
        if self.mode == "float":
            guess = bisect.bisect_left(self._starts_view, self._ends_view[end] - cap, 0, end)
        return self._gallop_begin(end, guess, cap)

    def begins(self, ends, cap, floor):
        """``begin`` for many ends at once, searching starts ≥ floor (numpy)."""
        if self.mode == "exact":
            found = np.searchsorted(self.starts, self.ends[ends] - cap, side="left")
            return np.maximum(found, floor)
        low = np.full(ends.shape, floor, dtype=np.int64)
        high = ends - 1  # the one-node run [end-1, end) always fits cap ≥ every single
        while True:
            active = low < high
            if not active.any():
                return low
            middle = (low + high) // 2
            fits = self.sizes_of(middle, ends) <= cap
            high = np.where(active & fits, middle, high)
            low = np.where(active & ~fits, middle + 1, low)

    def count(self, cap, limit):
        """Greedy runs of size ≤ cap, stopping past `limit`: (count, largest run size)."""
        n, start, count, largest = self.n, 0, 0, 0
        if self.mode == "exact":  # the hot loop of dp's bisection: C-level bisections only
            ends, starts = self._ends_view, self._starts_view
            while start < n:
                base = starts[start]
                end = bisect.bisect_right(ends, base + cap, start) - 1
                if end <= start:
                    return limit + 1, largest
                largest = max(largest, ends[end] - base)
                count += 1
                if count > limit:
                    return count, largest
                start = end
            return count, largest
        size, reach = self.size, self.end
        while start < n:
            end = reach(start, cap)
            if end <= start:
                return limit + 1, largest
            largest = max(largest, size(start, end))
            count += 1
            if count > limit:
                return count, largest
            start = end
        return count, largest

    def cuts(self, capacity):
        """Greedy boundaries [0, b1, ..., n], each run extended as far as it fits.

        Returns ``(bounds, None)``, or ``(None, position)`` with the position
        that does not fit even alone.  O(k) C-level bisections in
        ``"exact"`` mode.
        """
        n, start, bounds = self.n, 0, [0]
        if self.mode == "exact":
            ends, starts = self._ends_view, self._starts_view
            while start < n:
                end = bisect.bisect_right(ends, starts[start] + capacity, start) - 1
                if end <= start:
                    return None, start
                bounds.append(end)
                start = end
            return np.asarray(bounds, dtype=np.int64), None
        while start < n:
            end = self.end(start, capacity)
            if end <= start:
                return None, start
            bounds.append(end)
            start = end
        return np.asarray(bounds, dtype=np.int64), None


class OpenGroup:
    """S of a group built one node at a time in any order (a list scheduler's current group).

    Parameters
    ----------
    terms : Terms
        The model's terms of the table (``get_model(memory).terms_at(table, chunk_fraction)``).
    chunk_fraction : float
    carried : int
        Live bytes that enter the group from earlier groups (nodes placed
        before it with a successor not yet placed); 0 for a model without a
        live term.

    Notes
    -----
    ``size_with(v)`` is what the group would need with node ``v`` added,
    ``add(v)`` adds it; both O(1) exact integer arithmetic on Python ints
    (lists, not numpy scalars, so a scheduler's inner loop stays cheap).
    The caller tracks ``carried`` across groups (it knows the placement).

    Examples
    --------
    >>> from cachefit.memory import LayerTable, get_model
    >>> table = LayerTable.chain([10, 20], [4, 6], [1, 3])
    >>> group = OpenGroup(get_model("liveness").terms_at(table, 0.5), 0.5, carried=2)
    >>> group.size_with(0), group.add(0), group.size_with(1)
    (14, 14, 39)
    """

    def __init__(self, terms, chunk_fraction, carried=0):
        self._summed = terms.summed.tolist()
        self._peak = terms.peak.tolist() if terms.peak is not None else None
        self._live = terms.live.tolist() if terms.live is not None else None
        self._numerator, self._denominator = float(chunk_fraction).as_integer_ratio()
        self.reset(carried)

    def reset(self, carried=0):
        """Start a new, empty group with `carried` live bytes entering it."""
        self.summed, self.peak, self.live = 0, 0, carried
        self.members = []

    def size_with(self, v):
        """S of the group with node `v` added (the group is not changed)."""
        size = self.summed + self._summed[v]
        if self._peak is not None:
            size += max(self.peak, self._peak[v])
        if self._live is not None:
            live = self.live + self._live[v]
            size -= (-live * self._numerator) // self._denominator
        return size

    def add(self, v):
        """Add node `v`; returns the group's new size."""
        size = self.size_with(v)
        self.summed += self._summed[v]
        if self._peak is not None:
            self.peak = max(self.peak, self._peak[v])
        if self._live is not None:
            self.live += self._live[v]
        self.members.append(v)
        return size


def _compose(terms, live_at, chunk_fraction):
    """Σ summed + peak + ⌈f·live_at⌉ per position (terms the model lacks count 0)."""
    sizes = terms.summed
    if terms.peak is not None:
        sizes = sizes + terms.peak
    if terms.live is not None:
        sizes = sizes + scale_activation_array(live_at, chunk_fraction)
    return sizes


def sizes_alone(table, memory, chunk_fraction, live_at):
    """S of each position of `table` in a group of its own, with `live_at[i]` live bytes counted there.

    For callers that know what is live where better than the table's edges
    say (`tile`'s tiles and joins).  `live_at` is ignored by a model without
    a live term; it may be an object array of Python ints.

    Examples
    --------
    >>> from cachefit.memory import LayerTable
    >>> table = LayerTable.chain([10, 20], [4, 4], [1, 0])
    >>> sizes_alone(table, "liveness", 0.5, [4, 12]).tolist(), sizes_alone(table, "additive", 0.5, None).tolist()
    ([13, 26], [15, 24])
    """
    terms = get_model(memory).terms_at(table, chunk_fraction)
    if terms.live is not None:
        live_at = np.asarray(live_at)
        if live_at.dtype != object:
            live_at = live_at.astype(np.int64)
    return _compose(terms, live_at, chunk_fraction)


def alone_sizes(table, memory, chunk_fraction=1.0, *, intervals=None):
    """S of each node alone in a group, a lower bound on any group holding it.

    The node's own terms, and (models with a live term) its own live bytes
    plus those of every input it consumes.  On a chain (one valid order)
    every live byte that passes the node is live in its group as well, so
    the inputs are everything incoming at its position (`Intervals.incoming`).

    Examples
    --------
    >>> from cachefit.memory import LayerTable
    >>> alone_sizes(LayerTable.chain([10, 20], [4, 6]), "liveness").tolist()
    [14, 30]
    """
    table = as_table(table)
    if table.is_chain and intervals is not None and intervals.mode == "exact":
        return intervals.ends[1:] - intervals.starts[:-1]  # node i alone is the run [i, i + 1): one subtraction
    terms = get_model(memory).terms_at(table, chunk_fraction)
    live_at = None
    if terms.live is not None:
        inputs = np.zeros(table.n, dtype=np.int64)
        if table.is_chain:
            incoming = intervals.incoming if intervals is not None else _incoming(table, terms.live)
            inputs = incoming[:table.n]
        elif table.targets.size and np.all(table.targets[1:] > table.targets[:-1]):
            inputs[table.targets] = terms.live[table.sources]  # one input each
        else:
            np.add.at(inputs, table.targets, terms.live[table.sources])
        live_at = terms.live + inputs
    return _compose(terms, live_at, chunk_fraction)


def _positions_of_groups(table, partitions):
    """part[position] = group index, refusing unknown, repeated and missing nodes."""
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
    return part


def group_sizes(graph, partitions, *, memory="liveness", chunk_fraction=1.0):
    """S of every group of `partitions` under `memory` (any valid grouping of a DAG).

    Parameters
    ----------
    graph : networkx.DiGraph or LayerTable
    partitions : sequence of sequences of node ids
        The groups in execution order; every node exactly once.
    memory : str
        A name in `cachefit.memory.MODELS`.
    chunk_fraction : float in (0, 1]

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
    model = get_model(memory)
    chunk_fraction = check_chunk_fraction(chunk_fraction)
    table = as_table(graph)
    part = _positions_of_groups(table, partitions)
    k = len(partitions)
    terms = model.terms_at(table, chunk_fraction)
    sizes = [int(x) for x in _sum_by_group(part, terms.summed, k)]
    if terms.peak is not None:
        peak = np.zeros(k, dtype=np.int64)
        np.maximum.at(peak, part, terms.peak)
        sizes = [size + int(p) for size, p in zip(sizes, peak)]
    if terms.live is not None:
        last = part.copy()
        np.maximum.at(last, table.sources, part[table.targets])
        delta = np.zeros(k + 1, dtype=np.int64)
        np.add.at(delta, part, terms.live)
        np.add.at(delta, last + 1, -terms.live)
        live = np.cumsum(delta)[:k]
        sizes = [size + scale_activation(int(x), chunk_fraction) for size, x in zip(sizes, live)]
    return sizes


def _sum_by_group(part, values, k):
    sums = np.zeros(k, dtype=np.int64)
    np.add.at(sums, part, values)
    return sums
