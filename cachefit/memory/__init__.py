"""Memory models and the group-size engine: the one home of S(P).

Layout
------
``models``
    The registry `MODELS` (name → `MemoryModel`).  A model is two things:
    its per-node byte terms (`Terms`: a summed term, an optional peak term
    of which a group holds the largest, an optional live term scaled by the
    chunk fraction f with the exact rounding ⌈f·x⌉), which is all the engine
    needs; and a plain-Python reference definition of S(P) over the graph.
``engine``
    Every size query, for every model: `Intervals` (runs of a node order:
    sizes, the longest fit from a start, the earliest start for an end,
    greedy cuts and counts), `OpenGroup` (a group built node by node, for
    list schedulers), `group_sizes` (any grouping of a DAG),
    `alone_sizes` (a node in a group of its own) and `sizes_alone` (the same
    with live bytes the caller counts, for tiles).
``table``
    `LayerTable`, the graph flattened into numpy arrays in its node order,
    with `LayerTable.successors` and `LayerTable.reorder`.
``scale``
    ⌈f·x⌉ computed exactly (f's float taken as the rational it denotes), so
    the solvers, the checker and a reader with pencil and paper agree to the
    byte.

The models shipped (each also as ``NAME+kv``, which keeps every node's K/V
resident with its group like its weights: its ``kv_bytes`` cache of N =
``context`` tokens and, when chunks split sequences, the chunked-prefill
prefix, kv_bytes_per_token × (attended(N + P) − attended(N)) with attended
capped at w − 1 under a sliding window w; see `models` and `with_kv`):

``additive``
    The seed paper's formula: S(P) = Σ_{v∈P} (weight + activation + buffer).
``liveness``
    The working set: S(P) = Σ_{v∈P} weight + max_{v∈P} buffer
    + ⌈f · Σ_{u live in P} activation(u)⌉, where u is live in the p-th group
    when part(u) ≤ p ≤ last(u), last(u) being the largest group index among
    u's successors (part(u) when u has none), and f ∈ (0, 1] the streaming
    (chunk) fraction.

Why the checker reads the registry but not the engine
-----------------------------------------------------
`cachefit.check` must not trust the code it checks.  It takes from
`MODELS` only the list of names and each model's ``reference`` function,
which recomputes S(P) from the definition in plain Python over the networkx
graph (no numpy, no prefix sums, no probes).  The solvers take each model's
``terms`` and run them through the engine.  A model therefore has two
independent implementations side by side in one entry, and every solver
test that passes its plan through `check` compares them.

Adding a model means one new `MODELS` entry (its ``terms`` and its
``reference``) plus tests; every solver, `tile`, the bounds that read
sizes, and the checker pick it up from the registry.
"""

from __future__ import annotations

from .engine import Intervals, OpenGroup, alone_sizes, group_sizes, sizes_alone
from .models import (KV_PLACEMENTS, MEMORY_MODELS, MODELS, MemoryModel, Terms, check_memory, fold_resident_kv,
                     get_model, kv_placement, with_kv)
from .scale import check_chunk_fraction, scale_activation, scale_activation_array
from .table import LayerTable, as_table

__all__ = [
    "MEMORY_MODELS",
    "MODELS",
    "MemoryModel",
    "Terms",
    "LayerTable",
    "Intervals",
    "OpenGroup",
    "check_memory",
    "get_model",
    "with_kv",
    "fold_resident_kv",
    "kv_placement",
    "KV_PLACEMENTS",
    "check_chunk_fraction",
    "scale_activation",
    "scale_activation_array",
    "group_sizes",
    "alone_sizes",
    "sizes_alone",
    "as_table",
]
