"""The memory models: one registry entry each (`MODELS`), read by the engine and by the checker.

A model is a `MemoryModel`: its name, its formula in words, the per-node
byte terms the engine aggregates (`Terms`), and a plain-Python reference
definition of S(P) that the checker uses.  Every model has the shape

    S(P) = Σ_{v∈P} summed(v) + max_{v∈P} peak(v) + ⌈f · Σ_{u live in P} live(u)⌉

where u is live in the p-th group when part(u) ≤ p ≤ last(u) (last(u): the
largest group index among u's successors, part(u) when it has none), and a
term the model lacks counts 0.  ``additive`` has only the summed term,
``liveness`` all three.

The KV cache (decode, `cachefit.graphs.kv`) is a choice of each model, made
by its name: ``additive+kv`` and ``liveness+kv`` keep every node's
``kv_bytes`` resident with its group, like its weights (summed(v) gains
kv_bytes(v)); the plain names leave the cache out of S(P) (streamed from
off-chip memory at every step, which `cachefit.estimate` counts as traffic).
`with_kv` maps (model, ``"resident"``/``"streamed"``) to the name, so the
plan records the choice and the checker recomputes it.

Chunked prefill is the same choice.  When the chunk fraction f splits
sequences (c = f × batch × seq_len tokens per chunk, c < seq_len = s), every
node that holds an attention also needs the K/V of the earlier tokens of its
sequence that the chunk's queries attend to.  The sequence's new tokens
follow the N = ``context`` tokens already cached (the graph attribute; 0
when absent, `cachefit.graphs.kv.graph_context`), so chunk j starts at
position N + p, p = j·c; its first query reaches back furthest, to every
earlier token under causal attention and to N + p − w < t < N + p under a
sliding window of w tokens (HF's convention: the window counts the query
itself; the node's ``sliding_window``, `cachefit.graphs.kv.node_windows`).
That is attended(N + p) = min(N + p, w − 1) tokens, growing with p, so the
largest, which a resident group must hold, is the last chunk's.  The decode
cache ``kv_bytes`` already holds attended(N) = min(N, w − 1) of them, so the
chunk adds

    kv_prefix(v) = kv_bytes_per_token(v) × prefix_tokens(v),
    prefix_tokens(v) = attended(N + P) − attended(N)
                     = P                                without a window,
                     = min(N + P, w − 1) − min(N, w − 1)  with a sliding window w
                       (min(P, w − 1) when N = 0; 0 when N ≥ w − 1),
    P = c × (⌈s / c⌉ − 1)   (= s − c when c divides s; 0 when c ≥ s)

(`cachefit.graphs.kv`: kv_bytes_per_token = 2 × kv_heads × head_dim × dtype
bytes, or MLA's latent width × dtype bytes; the chunk is inside one
sequence, so one sequence's prefix).  The ``+kv`` models keep it resident:
summed(v) = weight + kv_bytes + kv_prefix(v) (cache and prefix together the
K/V of the last chunk's window, the largest the group holds); the plain
models stream it.  The ``+kv`` terms therefore depend on f
(``MemoryModel.chunked``).  The engine's terms take prefix_tokens from
`cachefit.graphs.kv.prefix_tokens` (the one home of the window convention,
which also caps the decode cache); the checker's reference counts, from the
mask's definition and separately, the earlier tokens in the window of the
last chunk's first query less those in the window of the first new token's
(the cache).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Callable

import math
import weakref
from numbers import Integral

import numpy as np

from ..errors import InputError
from ..validation import MAX_BYTES

__all__ = ["Terms", "MemoryModel", "MODELS", "MEMORY_MODELS", "KV_PLACEMENTS", "check_memory", "get_model", "with_kv",
           "kv_placement", "fold_resident_kv"]


@dataclass(frozen=True)
class Terms:
    """Per-position byte terms of one model over one `LayerTable` (int64 arrays).

    Attributes
    ----------
    summed : numpy.ndarray
        Bytes each node adds to its group.
    peak : numpy.ndarray or None
        Bytes of which a group needs only the largest (a scratch buffer);
        None when the model has no such term.
    live : numpy.ndarray or None
        Bytes a node produces that stay live from its group to its last
        consumer's group, scaled by the chunk fraction; None when the model
        has no such term.
    """

    summed: np.ndarray
    peak: np.ndarray | None = None
    live: np.ndarray | None = None


@dataclass(frozen=True)
class MemoryModel:
    """One memory model.

    Attributes
    ----------
    name : str
    formula : str
        S(P) in one line, for docs and messages.
    terms : callable
        ``terms(table) -> Terms``: the engine's (fast, numpy) view of the model.
    reference : callable
        ``reference(graph, groups, group_of, chunk_fraction) -> list of int``:
        S of every group straight from the definition, in plain Python over
        the networkx graph (no numpy, no engine code).  The checker calls
        this, so a bug in the engine cannot hide behind the same bug in the
        checker.
    chunked : bool
        The terms depend on the chunk fraction: ``terms(table,
        chunk_fraction)`` (the ``+kv`` models, whose chunked-prefill K/V term
        does).  Otherwise ``terms(table)``.
    """

    name: str
    formula: str
    terms: Callable
    reference: Callable
    chunked: bool = False

    def terms_at(self, table, chunk_fraction=1.0):
        """The model's `Terms` of `table` at chunk fraction `chunk_fraction` (what the engine reads)."""
        if self.chunked:
            return self.terms(table, chunk_fraction)
        return self.terms(table)


def _additive_terms(table):
    return Terms(table.weight + table.activation + table.buffer)


def _additive_reference(graph, groups, group_of, chunk_fraction):
    nodes = graph.nodes
    return [sum(nodes[v]["weight_bytes"] + nodes[v]["activation_bytes"] + nodes[v]["buffer_bytes"] for v in group)
            for group in groups]


def _liveness_terms(table):
    return Terms(table.weight, table.buffer, table.activation)


def _live_per_group(graph, groups, group_of, attribute):
    """Σ `attribute` of the nodes live in each group (part(u) ≤ p ≤ last(u)), plain Python."""
    nodes = graph.nodes
    delta = [0] * (len(groups) + 1)
    for u in graph.nodes:
        first = group_of[u]
        last = max((group_of[s] for s in graph.successors(u)), default=first)
        delta[first] += nodes[u][attribute]
        delta[max(first, last) + 1] -= nodes[u][attribute]
    live, result = 0, []
    for index in range(len(groups)):
        live += delta[index]
        result.append(live)
    return result


def _ceil_fraction(fraction, value):
    scaled = fraction * value
    return -((-scaled.numerator) // scaled.denominator)


def _liveness_reference(graph, groups, group_of, chunk_fraction):
    nodes = graph.nodes
    fraction = Fraction(chunk_fraction)
    live = _live_per_group(graph, groups, group_of, "activation_bytes")
    return [sum(nodes[v]["weight_bytes"] for v in group)
            + max((nodes[v]["buffer_bytes"] for v in group), default=0)
            + _ceil_fraction(fraction, live[index])
            for index, group in enumerate(groups)]


_KV_ARRAYS = weakref.WeakKeyDictionary()  # LayerTable -> (kv_bytes, kv_bytes_per_token, sliding_window) per position


def _kv_arrays(table):
    """``kv_bytes``, K/V bytes per token and sliding window (0: none) of every position as int64.

    Zeros for a table without a graph.
    """
    cached = _KV_ARRAYS.get(table)
    if cached is not None:
        return cached
    values = np.zeros(table.n, dtype=np.int64)
    per_token = np.zeros(table.n, dtype=np.int64)
    windows = np.zeros(table.n, dtype=np.int64)
    if table.graph is not None:
        from ..graphs.kv import node_kv_bytes_per_token, node_windows  # lazy: cachefit.graphs imports this package

        nodes = table.graph.nodes
        for index, node in enumerate(table.ids):
            value = nodes[node].get("kv_bytes")
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, Integral) or not 0 <= value <= MAX_BYTES:
                raise InputError(f"node {node!r}: `kv_bytes` must be a non-negative integer of bytes, got {value!r}")
            values[index] = value
        position = {node: index for index, node in enumerate(table.ids)}
        for node, value in node_kv_bytes_per_token(table.graph).items():
            if value > MAX_BYTES:
                raise InputError(f"node {node!r}: `kv_bytes_per_token` {value} is beyond 2**62 B")
            per_token[position[node]] = value
        for node, window in node_windows(table.graph).items():
            windows[position[node]] = min(window, MAX_BYTES)  # a window beyond any sequence caps nothing
    if int(values.sum(dtype=object)) + int(table.weight.sum(dtype=object)) > MAX_BYTES:
        raise InputError("the graph's weights and KV cache add up beyond 2**62 B (4 EiB), the most cachefit's "
                         "exact integer arithmetic holds for a graph")
    _KV_ARRAYS[table] = values, per_token, windows
    return values, per_token, windows


def _kv_array(table):
    """``kv_bytes`` of every position as int64 (0 where absent, or for a table without a graph)."""
    return _kv_arrays(table)[0]


def _graph_shape(graph):
    """(seq_len, batch, context) of a graph whose nodes cache K/V per token (`InputError` when it lacks them)."""
    from ..graphs.kv import graph_context

    attributes = graph.graph
    shape = attributes.get("seq_len"), attributes.get("batch")
    for name, value in zip(("seq_len", "batch"), shape):
        if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
            raise InputError(f"the graph's `{name}` must be a positive integer for its nodes' K/V per token "
                             f"(chunked prefill), got {value!r}")
    return int(shape[0]), int(shape[1]), graph_context(graph)


def _prefix_array(table, chunk_fraction):
    """kv_prefix(v) = kv_bytes_per_token(v) × prefix_tokens(v) of every position (int64, exact)."""
    from ..graphs.kv import prefix_tokens

    _, per_token, windows = _kv_arrays(table)
    if not per_token.any():
        return per_token
    seq_len, batch, context = _graph_shape(table.graph)
    tokens = np.zeros(table.n, dtype=np.int64)
    for window in np.unique(windows).tolist():  # a few distinct windows: 0 (none) and each local one
        tokens[windows == window] = prefix_tokens(seq_len, batch, chunk_fraction, window or None, context)
    total = int((per_token.astype(object) * tokens).sum()) + int(_kv_array(table).sum(dtype=object))
    if total + int(table.weight.sum(dtype=object)) > MAX_BYTES:
        raise InputError("the graph's weights and KV (cache and chunked-prefill prefix) add up beyond 2**62 B "
                         "(4 EiB), the most cachefit's exact integer arithmetic holds for a graph")
    return per_token * tokens


def _reference_prefix(graph, chunk_fraction):
    """kv_prefix of every attention node straight from the definition (plain Python, exact rationals).

    After the ``context`` cached tokens 0 … N − 1, the last chunk starts at
    position q = N + ``before``; its first query attends to the earlier
    tokens t with q − w < t < q and t ≥ 0 (every t < q without a window),
    which is the most any query of any chunk reaches back.  The cache
    (``kv_bytes``) holds those the first new token (position N) attends to;
    the prefix is the rest.
    """
    from ..graphs.kv import node_kv_bytes_per_token, node_windows

    per_token = node_kv_bytes_per_token(graph)
    if not per_token:
        return {}
    windows = node_windows(graph)
    seq_len, batch, context = _graph_shape(graph)
    scaled = Fraction(chunk_fraction) * (seq_len * batch)
    chunk = max(1, math.floor(scaled + Fraction(1, 2)))  # the nearest integer, halves up
    before = 0 if chunk >= seq_len else seq_len - (seq_len - 1) % chunk - 1  # start of the last chunk

    def earlier_keys(query, window):  # how many keys t < query the mask lets `query` attend to
        first = 0 if window is None else max(0, query - window + 1)  # earliest key in the window
        return query - first

    prefix = {}
    for node, value in per_token.items():
        window = windows.get(node)
        prefix[node] = value * (earlier_keys(context + before, window) - earlier_keys(context, window))
    return prefix


def _kv_resident(base_terms, base_reference):
    """A model's terms and reference with every node's KV (cache and chunked-prefill prefix) in its group."""
    def terms(table, chunk_fraction=1.0):
        base = base_terms(table)
        return Terms(base.summed + _kv_array(table) + _prefix_array(table, chunk_fraction), base.peak, base.live)

    def reference(graph, groups, group_of, chunk_fraction):
        nodes = graph.nodes
        prefix = _reference_prefix(graph, chunk_fraction)
        return [size + sum((nodes[v].get("kv_bytes") or 0) + prefix.get(v, 0) for v in group)
                for size, group in zip(base_reference(graph, groups, group_of, chunk_fraction), groups)]

    return terms, reference


#: Every memory model by name: the one list the solvers, `tile`, the bounds and the checker read.
MODELS = {
    "additive": MemoryModel(
        "additive", "S(P) = Σ_{v∈P} (weight + activation + buffer)",
        _additive_terms, _additive_reference),
    "liveness": MemoryModel(
        "liveness", "S(P) = Σ_{v∈P} weight + max_{v∈P} buffer + ⌈f · Σ_{u live in P} activation(u)⌉",
        _liveness_terms, _liveness_reference),
    "additive+kv": MemoryModel(
        "additive+kv", "S(P) = Σ_{v∈P} (weight + kv + kv_prefix + activation + buffer)",
        *_kv_resident(_additive_terms, _additive_reference), chunked=True),
    "liveness+kv": MemoryModel(
        "liveness+kv", "S(P) = Σ_{v∈P} (weight + kv + kv_prefix) + max_{v∈P} buffer "
        "+ ⌈f · Σ_{u live in P} activation(u)⌉",
        *_kv_resident(_liveness_terms, _liveness_reference), chunked=True),
}

#: Where the KV cache lives: out of S(P) (read from off-chip memory every step) or in its group.
KV_PLACEMENTS = ("streamed", "resident")


def with_kv(memory, kv):
    """The registry name of model `memory` with the KV cache `kv` (``"streamed"`` or ``"resident"``).

    >>> with_kv("liveness", "resident"), with_kv("liveness+kv", "streamed"), with_kv("additive", "streamed")
    ('liveness+kv', 'liveness', 'additive')
    """
    if kv not in KV_PLACEMENTS:
        raise InputError(f"`kv` must be one of {', '.join(map(repr, KV_PLACEMENTS))}, got {kv!r}")
    base = check_memory(memory).removesuffix("+kv")
    return check_memory(base + "+kv" if kv == "resident" else base)


def kv_placement(memory):
    """``"resident"`` when model `memory` keeps the KV cache in S(P), else ``"streamed"``."""
    return "resident" if check_memory(memory).endswith("+kv") else "streamed"

#: The model names, in registry order (kept for `cachefit.MEMORY_MODELS`).
MEMORY_MODELS = tuple(MODELS)


def check_memory(memory):
    """Return `memory` if it names a memory model, else raise `InputError`."""
    if not isinstance(memory, str) or memory not in MODELS:
        raise InputError(f"`memory` must be one of {', '.join(map(repr, MODELS))}, got {memory!r}")
    return memory


def get_model(memory):
    """The `MemoryModel` named `memory` (`InputError` for an unknown name)."""
    return MODELS[check_memory(memory)]


def fold_resident_kv(table, memory, chunk_fraction=1.0):
    """``(table', base)``: a ``+kv`` model's resident K/V folded into the weights of its plain model.

    Under ``additive+kv`` and ``liveness+kv`` every node's resident K/V (its
    cache plus its chunked-prefill prefix) is a summed term exactly like its
    weights, so the same sizes come out of the plain model (``additive``,
    ``liveness``) on a table whose ``weight`` column holds weight + K/V.
    Solvers plan that folded problem — every algorithm and bound written for
    the plain models then holds for the ``+kv`` ones — and record the ``+kv``
    name in the plan, whose sizes the checker recomputes from the original
    graph.  Other models come back unchanged.
    """
    memory = check_memory(memory)
    if kv_placement(memory) != "resident":
        return table, memory
    extra = _kv_array(table) + _prefix_array(table, chunk_fraction)
    total = sum(int(column.sum(dtype=object)) for column in (table.weight, extra, table.activation, table.buffer))
    if total > MAX_BYTES:  # every S(P) of the folded problem is at most this sum: keep it exact in int64
        raise InputError("the graph's weights, K/V, activations and buffers add up beyond 2**62 B (4 EiB), "
                         "the most cachefit's exact integer arithmetic holds for a graph")
    return replace(table, weight=table.weight + extra), memory.removesuffix("+kv")
