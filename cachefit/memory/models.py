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
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

import weakref
from numbers import Integral

import numpy as np

from ..errors import InputError
from ..validation import MAX_BYTES

__all__ = ["Terms", "MemoryModel", "MODELS", "MEMORY_MODELS", "KV_PLACEMENTS", "check_memory", "get_model", "with_kv",
           "kv_placement"]


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
    """

    name: str
    formula: str
    terms: Callable
    reference: Callable


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


_KV_ARRAYS = weakref.WeakKeyDictionary()  # LayerTable -> kv_bytes per position (tables are immutable)


def _kv_array(table):
    """``kv_bytes`` of every position as int64 (0 where absent, or for a table without a graph)."""
    cached = _KV_ARRAYS.get(table)
    if cached is not None:
        return cached
    values = np.zeros(table.n, dtype=np.int64)
    if table.graph is not None:
        nodes = table.graph.nodes
        for index, node in enumerate(table.ids):
            value = nodes[node].get("kv_bytes")
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, Integral) or not 0 <= value <= MAX_BYTES:
                raise InputError(f"node {node!r}: `kv_bytes` must be a non-negative integer of bytes, got {value!r}")
            values[index] = value
    if int(values.sum(dtype=object)) + int(table.weight.sum(dtype=object)) > MAX_BYTES:
        raise InputError("the graph's weights and KV cache add up beyond 2**62 B (4 EiB), the most cachefit's "
                         "exact integer arithmetic holds for a graph")
    _KV_ARRAYS[table] = values
    return values


def _kv_resident(base_terms, base_reference):
    """A model's terms and reference with every node's ``kv_bytes`` added to its group like weights."""
    def terms(table):
        base = base_terms(table)
        return Terms(base.summed + _kv_array(table), base.peak, base.live)

    def reference(graph, groups, group_of, chunk_fraction):
        nodes = graph.nodes
        return [size + sum(nodes[v].get("kv_bytes") or 0 for v in group)
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
        "additive+kv", "S(P) = Σ_{v∈P} (weight + kv + activation + buffer)",
        *_kv_resident(_additive_terms, _additive_reference)),
    "liveness+kv": MemoryModel(
        "liveness+kv", "S(P) = Σ_{v∈P} (weight + kv) + max_{v∈P} buffer + ⌈f · Σ_{u live in P} activation(u)⌉",
        *_kv_resident(_liveness_terms, _liveness_reference)),
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
