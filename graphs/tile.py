"""`tile`: split layers too large for the capacity into tiles that fit.

A matmul-like node (a linear projection, an LM head, an embedding, a
convolution, an MoE expert) that cannot fit a group of its own (its weights
plus the activations live at its position exceed the capacity) is replaced
by the fewest equal tiles that do, each holding a slice of its weights.

Linear-like ops (``linear``, ``lm_head``, ``pooler``, ``conv``, ``gemm``,
``matmul`` with a weight) and ``embedding``
    are split along the output dimension (``out_features``; an embedding's
    ``embedding_dim``): tile i holds the weight columns of its slice of the
    outputs and produces that slice of the output activation.  A join node
    (``op="concat"``, ``join="cat"``, no weights), which keeps the parent's
    id, concatenates the slices into the full output that the parent's
    consumers read.
``expert`` (a whole MoE expert MLP)
    is split along its ``intermediate_size``: tile i holds its slice of the
    up/gate columns and of the down rows and produces a partial output of
    the expert's full width; the join (``join="sum"``) adds them up.

This is the convention `cachefit.executor` runs: tiles carry ``tile=(i, n)``
and ``parent``, the join has ``op="concat"`` and the parent's id (it sums
when all its inputs are expert tiles).

A whole transformer ``block`` (a `transformer` graph at block granularity)
that does not fit is first replaced by its operators, exactly the nodes the
op granularity would have (``block.{i}.q``, ``.gate``, ...; the block's
bytes are their sums), and those are tiled as needed; so is an embedding
that holds its norm (BERT's ``embed``: ``embed`` and ``embed_norm``).

Under the ``liveness`` memory model the parent's inputs stay live across all
of its tiles (every tile reads them) and every tile's output stays live
until the join: the group holding the join of a column-split node holds the
n slices and the joined copy, 2 · f · A for an output of A bytes, as
``torch.cat`` needs; a split expert's join holds n partial outputs of A
bytes each and their sum.
"""

from __future__ import annotations

import copy
import logging

import networkx as nx
import numpy as np

from ..devices import parse_capacity
from ..errors import InputError
from ..memory import Intervals, LayerTable, check_chunk_fraction, check_memory, sizes_alone
from ..units import format_bytes
from ..validation import validate

__all__ = ["tile", "TILE_AXES"]

logger = logging.getLogger(__name__)

#: op -> (the node attribute giving the dimension tiles split, how tiles are joined).
TILE_AXES = {
    "linear": ("out_features", "cat"),
    "lm_head": ("out_features", "cat"),
    "pooler": ("out_features", "cat"),
    "gemm": ("out_features", "cat"),
    "matmul": ("out_features", "cat"),
    "conv": ("out_features", "cat"),
    "embedding": ("embedding_dim", "cat"),
    "expert": ("intermediate_size", "sum"),
}

# Attributes split in proportion to the units a tile holds (exact integers).
_SPLIT_ATTRIBUTES = ("weight_bytes", "params", "flops")


def _shares(total, units, counts):
    """Integer shares of `total` in proportion to `counts` (which sum to `units`); they sum to `total`."""
    shares, done, previous = [], 0, 0
    for count in counts:
        done += count
        current = total * done // units
        shares.append(current - previous)
        previous = current
    return shares


def _share_array(total, units, counts):
    """`_shares` as an int64 array (exact: Python integers where the products could overflow int64)."""
    prefix = np.cumsum(counts)
    if total * units < 2**62:
        return np.diff(total * prefix // units, prepend=0)
    return np.array(_shares(total, units, counts.tolist()), dtype=np.int64)  # each share ≤ total


def _unit_counts(units, n):
    """`units` split into n near-equal positive counts (larger ones first)."""
    base, extra = divmod(units, n)
    return [base + (1 if index < extra else 0) for index in range(n)]


class _Site:
    """What the tiling of one node depends on: its bytes and the activations live around it.

    Sizes come from the memory engine (`cachefit.memory.sizes_alone`): the
    tiles and the join are nodes of a small chain, each in a group of its
    own, with the live bytes this site counts for each.
    """

    def __init__(self, data, incoming, passing, memory, chunk_fraction, join):
        self.weight = data["weight_bytes"]
        self.activation = data["activation_bytes"]
        self.buffer = data["buffer_bytes"]
        self.incoming = incoming      # live at the node's position: its inputs and what passes by
        self.passing = passing        # what stays live after the node (consumed later)
        self.memory = memory
        self.chunk_fraction = chunk_fraction
        self.join = join

    def outputs(self, units, counts):
        """Each tile's output bytes: a slice of A ("cat"), or a whole partial sum ("sum")."""
        if self.join == "cat":
            return _share_array(self.activation, units, counts)
        return np.full(len(counts), self.activation, dtype=np.int64)

    def _alone(self, weights, outputs, buffers, live_at):
        """S of each (weights, output, buffer) node in a group of its own with `live_at` live there."""
        table = LayerTable.chain(np.asarray(weights, dtype=np.int64), np.asarray(outputs, dtype=np.int64),
                                 np.asarray(buffers, dtype=np.int64))
        return sizes_alone(table, self.memory, self.chunk_fraction, live_at)

    def sizes(self, units, n):
        """S of each of the n tiles, then of the join, each in a group of its own in the tiled order."""
        counts = np.array(_unit_counts(units, n), dtype=np.int64)
        weights = _share_array(self.weight, units, counts)
        outputs = self.outputs(units, counts)
        # every tile output stays live until the join; the join adds its own output
        live = np.append(self.incoming + np.cumsum(outputs.astype(object)),
                         self.passing + int(outputs.sum()) + self.activation)
        return self._alone(np.append(weights, 0), np.append(outputs, self.activation),
                           np.append(np.full(n, self.buffer), 0), live)

    def floor(self):
        """What some tile (or the join) needs besides weights, for every n >= 2.

        A weightless tile: a partial sum is a whole output A; a slice can be
        as small as nothing, but the last tile still holds every slice (A)
        and, for a sum join, the partial sums before it (2·A at least).
        """
        own = self.activation if self.join == "sum" else 0
        live = self.incoming + (1 if self.join == "cat" else 2) * self.activation
        return int(self._alone([0], [own], [self.buffer], np.array([live], dtype=object))[0])

    def join_floor(self):
        """The join in a group of its own needs at least this, for every n >= 2."""
        live = self.passing + (2 if self.join == "cat" else 3) * self.activation
        return int(self._alone([0], [self.activation], [0], np.array([live], dtype=object))[0])

    def partials_floor(self, n):
        """A lower bound on the join's size with n or more partial sums live at it (a "sum" join)."""
        live = self.passing + (n + 2) * self.activation
        return int(self._alone([0], [self.activation], [0], np.array([live], dtype=object))[0])


def _plan_tiles(site, units, capacity):
    """(n, unit counts) of the fewest equal tiles that each fit, with their join; or (None, reason)."""
    needed = site.floor()
    if needed >= capacity or site.weight == 0:
        return None, (f"its activations alone need {format_bytes(needed)} ({needed} B) "
                      f"of the capacity {format_bytes(capacity)}")
    if site.join_floor() > capacity:
        return None, (f"the join of its tiles needs {format_bytes(site.join_floor())} "
                      f"({site.join_floor()} B) > capacity {format_bytes(capacity)}")

    def fits(n):
        return int(max(site.sizes(units, n))) <= capacity

    # Some tile holds at least W / n of the weights, so fewer than W / (C - buffer) tiles never fit.
    low = max(1, -(-site.weight // (capacity - site.buffer)) - 1)
    if site.join == "sum":
        # Partial sums pile up (n of them are live at the join), so more tiles are not always
        # better: scan upwards while the partial sums alone still leave room.
        for n in range(max(2, low + 1), units + 1):
            if fits(n):
                return n, _unit_counts(units, n)
            if site.partials_floor(n) > capacity:
                break
        return None, f"no count of tiles from 2 to {units} fits with the partial sums they leave live"
    # A cat-joined node's last tile holds all the slices: W / n + the activations must fit; start
    # there and gallop up to a count that fits, then bisect.
    high = min(units, max(2, -(-site.weight // (capacity - needed))))
    step = 1
    while not fits(high):
        if high == units:
            return None, f"even one tile per unit of its split dimension ({units} tiles) does not fit"
        low, high, step = high, min(units, high + step), 2 * step
    low = min(low, high - 1)
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            high = middle
        else:
            low = middle
    n = high
    while n > 2 and fits(n - 1):  # integer rounding can make fit non-monotone by a byte
        n -= 1
    return n, _unit_counts(units, n)


def _tile_nodes(parent, data, axis, join, counts):
    """The tiles of `parent` as (id, attributes), and its join's attributes (the join keeps the id)."""
    n, units = len(counts), sum(counts)
    shares = {key: _shares(data[key], units, counts) for key in _SPLIT_ATTRIBUTES
              if isinstance(data.get(key), int) and not isinstance(data.get(key), bool)}
    outputs = (_shares(data["activation_bytes"], units, counts) if join == "cat"
               else [data["activation_bytes"]] * n)
    tiles, offset = [], 0
    for index, count in enumerate(counts):
        attrs = copy.deepcopy(dict(data))
        for key, values in shares.items():
            attrs[key] = values[index]
        attrs.update(activation_bytes=outputs[index], tile=(index, n), parent=parent,
                     tile_offset=offset, join=join)
        attrs[axis] = count
        offset += count
        tiles.append((f"{parent}.tile.{index}", attrs))
    join_attrs = {"op": "concat", "join": join, "weight_bytes": 0, "params": 0, "flops": 0,
                  "activation_bytes": data["activation_bytes"], "buffer_bytes": 0, "parent": parent,
                  "tiles": n, "axis": axis, "width": units}
    if "layer" in data:
        join_attrs["layer"] = data["layer"]
    return tiles, join_attrs


def _op_graph(graph):
    """The same transformer at operator granularity (built from the graph's own config)."""
    from .transformer import transformer

    config = dict(graph.graph["config"])
    if not config.get("max_position_embeddings"):
        config.pop("max_position_embeddings", None)  # 0 stands for "none" in the normalised form
    return transformer(config, batch=graph.graph["batch"], seq_len=graph.graph["seq_len"],
                       dtype=graph.graph.get("dtype", "bf16"), granularity="op",
                       phase=graph.graph.get("phase", "prefill"), context=graph.graph.get("context"))


def _members(ops, node):
    """The op-granularity nodes that stand for `node` of the block-granularity graph, in order."""
    if node == "embed":  # an embedding that holds its norm (BERT): the table, then the norm
        return [v for v in ("embed", "embed_norm") if v in ops]
    return [v for v in ops if v.startswith(f"{node}.")]


def _expand_blocks(graph, blocks):
    """A new graph with each node of `blocks` replaced by its operators (ids as at op granularity)."""
    ops = _op_graph(graph)
    result = nx.DiGraph(**copy.deepcopy(dict(graph.graph)))
    result.graph["expanded_blocks"] = list(blocks)
    output = {}
    for node, data in graph.nodes(data=True):
        if node not in blocks:
            result.add_node(node, **copy.deepcopy(dict(data)))
            output[node] = node
            continue
        members = _members(ops, node)
        inside = set(members)
        outer = list(graph.predecessors(node))
        for member in members:
            result.add_node(member, **copy.deepcopy(dict(ops.nodes[member])))
            for pred in ops.predecessors(member):
                if pred in inside:
                    result.add_edge(pred, member)
                else:  # the block's input
                    result.add_edges_from((output[u], member) for u in outer)
        output[node] = members[-1]
    for u, v in graph.edges:
        if v not in blocks:
            result.add_edge(output[u], v)
    return result


def _expandable(graph, node, data):
    """A whole block (or an embedding holding its norm) of a block-granularity `transformer` graph."""
    whole = ((data.get("op") == "block" and isinstance(data.get("layer"), int))
             or (node == "embed" and data.get("op") == "embedding" and "norm" in data))
    return (whole and isinstance(graph.graph.get("config"), dict) and "hidden_size" in graph.graph["config"]
            and graph.graph.get("granularity") == "block")


def tile(graph, capacity, *, memory="liveness", chunk_fraction=1.0):
    """A new graph in which every oversize matmul-like node is split into tiles that fit.

    Parameters
    ----------
    graph : networkx.DiGraph
        A model graph; nodes carry ``op`` and the shape key of their op
        (`TILE_AXES`: ``out_features``, ``embedding_dim`` or
        ``intermediate_size``) to be tileable.  Not modified.
    capacity : int or str
        Bytes, a byte string or a device name, as in `cachefit.plan`.
    memory : {"liveness", "additive"}
    chunk_fraction : float in (0, 1]
        The streaming fraction the plan will use (liveness model).

    Returns
    -------
    networkx.DiGraph
        A new graph, in execution order.  A tiled node ``v`` becomes
        ``v.tile.0 .. v.tile.{n-1}`` (attributes: the parent's, with
        ``weight_bytes``, ``params``, ``flops`` and the split dimension
        divided, ``tile=(i, n)``, ``parent``, ``tile_offset`` and ``join``)
        followed by the join, which keeps the id ``v`` (``op="concat"``,
        ``join`` ``"cat"`` or ``"sum"``, no weights, the parent's full
        output) so the parent's consumers still read ``v``.  Graph
        attributes ``tiled``
        (``{parent: {"tiles": n, "join": ..., "axis": ...}}``), ``untiled``
        (``{node: reason}`` for oversize nodes left whole),
        ``expanded_blocks`` (blocks replaced by their operators, when any),
        and ``tile_capacity``, ``tile_memory``, ``tile_chunk_fraction``.

    Raises
    ------
    InputError
        `graph` is not a valid model graph, or a bad `capacity`, `memory` or
        `chunk_fraction`.

    Notes
    -----
    A node is split when it cannot run in a group of its own in the graph's
    order: weights + buffer + ⌈f · (the activations live at its position:
    its inputs, its output and those passing by it to later nodes)⌉ > C
    (additive model: weights + activation + buffer > C).  For a chain this is
    exactly the "alone" test of `cachefit.solvers._common.oversize_node`; in a
    DAG it also counts activations passing by, so a greedy cut of the tiled
    graph in its order never gets stuck on a tile.

    The tile count n is the fewest for which every tile, in a group of its
    own in the tiled order, fits: the weight share of each tile (integers,
    ⌊W · U_i / U⌋ differences over the cumulative units U_i, so they sum to
    W exactly) plus its buffer plus the live activations (the parent's
    inputs and passers-by, and the outputs of the tiles before it, which
    stay live until the join), and the join fits too.  For a cat-joined op
    n is found by bisection over [2, U] (U the units of the split
    dimension): the largest tile never grows as n grows, except by a byte of
    integer rounding, and the counts just below the bisection's answer are
    checked as well.  For an expert, whose n partial sums of A bytes each
    are all live at the join, more tiles cost activation memory, so n is
    scanned upwards from its weight bound until the partial sums alone
    would not fit.

    An oversize ``block`` of a `transformer` graph (graph attributes
    ``config``, ``batch``, ``seq_len``, ``dtype``, ``granularity="block"``),
    or an oversize embedding holding its norm, is first replaced by its
    operators, built by `transformer` from the same
    config at ``granularity="op"`` (so their bytes sum to the block's
    exactly); the operators are then treated like any other node.

    A node stays whole, and is listed in ``untiled`` with the reason, when
    its op is not in `TILE_AXES`, its split dimension is unknown, its
    activations alone fill the capacity, its join cannot fit (a cat join
    needs 2 · f · A), or no count of tiles fits.
    A plan of the tiled graph is then INFEASIBLE naming that node.

    Complexity: O(n + e), plus O(t log U) numpy work per tiled node, t its tiles.

    Examples
    --------
    >>> from cachefit.graphs import from_layers
    >>> g = from_layers([{"name": "a", "weight_bytes": 100, "activation_bytes": 8, "op": "linear"}])
    >>> g.nodes["a"]["out_features"] = 4
    >>> t = tile(g, 60)
    >>> list(t), [t.nodes[v]["weight_bytes"] for v in t]
    (['a.tile.0', 'a.tile.1', 'a'], [50, 50, 0])
    >>> t.nodes["a"]["op"], t.nodes["a"]["join"], t.nodes["a.tile.1"]["tile"]
    ('concat', 'cat', (1, 2))
    >>> t.graph["tiled"]
    {'a': {'tiles': 2, 'join': 'cat', 'axis': 'out_features'}}
    """
    if isinstance(graph, LayerTable):
        raise InputError("`graph` must be a networkx.DiGraph with node `op` attributes to be tiled, "
                         "got a LayerTable")
    validate(graph)
    capacity = parse_capacity(capacity)
    memory = check_memory(memory)
    chunk_fraction = check_chunk_fraction(chunk_fraction)
    table = LayerTable.from_graph(graph)
    intervals = Intervals(table, memory, chunk_fraction)
    blocks = [node for position, node in enumerate(table.ids)
              if intervals.size(position, position + 1) > capacity
              and _expandable(graph, node, graph.nodes[node])]
    if blocks:
        graph = _expand_blocks(graph, blocks)
        table = LayerTable.from_graph(graph)
        intervals = Intervals(table, memory, chunk_fraction)
    ids = table.ids
    incoming = intervals.incoming if intervals.has_live else None

    plans, untiled = {}, {}
    for position, node in enumerate(ids):
        if intervals.size(position, position + 1) <= capacity:
            continue
        data = graph.nodes[node]
        op = data.get("op")
        if op not in TILE_AXES:
            untiled[node] = (f"node {node!r} cannot be tiled: its op {op!r} is not matmul-like"
                             f" (tileable ops: {', '.join(TILE_AXES)})")
            continue
        axis, join = TILE_AXES[op]
        units = data.get(axis)
        if isinstance(units, bool) or not isinstance(units, int) or units < 2:
            untiled[node] = (f"node {node!r} cannot be tiled: op {op!r} needs an integer `{axis}` >= 2, "
                             f"has {units!r}")
            continue
        if intervals.has_live:
            # Live at the node: its inputs and the activations passing by it.
            # Of those, the ones consumed after it stay live past its join:
            # incoming[p + 1] less the node's own output when that is used later.
            live_in = int(incoming[position])
            own = int(intervals.terms.live[position]) if table.last_use[position] > position else 0
            passing = int(incoming[position + 1]) - own
            site = _Site(data, live_in, passing, memory, chunk_fraction, join)
        else:
            site = _Site(data, 0, 0, memory, chunk_fraction, join)
        n, detail = _plan_tiles(site, units, capacity)
        if n is None:
            untiled[node] = f"node {node!r} cannot be tiled: {detail}"
            continue
        plans[node] = (axis, join, detail)

    result = nx.DiGraph(**copy.deepcopy(dict(graph.graph)))
    result.graph.update(
        tiled={node: {"tiles": len(counts), "join": join, "axis": axis}
               for node, (axis, join, counts) in plans.items()},
        untiled=untiled, tile_capacity=capacity, tile_memory=memory, tile_chunk_fraction=chunk_fraction)
    entry, exit_ = {}, {}
    for node, data in graph.nodes(data=True):
        if node not in plans:
            result.add_node(node, **copy.deepcopy(dict(data)))
            entry[node], exit_[node] = [node], node
            continue
        axis, join, counts = plans[node]
        tiles, join_attrs = _tile_nodes(node, data, axis, join, counts)
        for tile_id, attrs in tiles:
            if tile_id in graph:
                raise InputError(f"`graph` already has a node {tile_id!r}; cannot name the tiles of {node!r}")
            result.add_node(tile_id, **attrs)
        result.add_node(node, **join_attrs)  # the join keeps the parent's id
        tile_ids = [tile_id for tile_id, _ in tiles]
        result.add_edges_from((tile_id, node) for tile_id in tile_ids)
        entry[node], exit_[node] = tile_ids, node
    for u, v, data in graph.edges(data=True):
        for target in entry[v]:
            result.add_edge(exit_[u], target, **copy.deepcopy(dict(data)))
    if plans or untiled:
        logger.info("tile: %d node(s) tiled into %d tiles; %d oversize node(s) left whole",
                    len(plans), sum(len(c) for _, _, c in plans.values()), len(untiled))
    return result
