"""Streaming chunks: how many tokens pass through a group at once.

Under the ``liveness`` memory model a group holds its weights and a fraction
f = chunk_tokens / (batch × seq_len) of the activations live in it
(docs/concepts.md §4, §8): the input stream passes through each group in chunks of
``chunk_tokens`` tokens while the group's weights stay resident.  Smaller
chunks leave more room for weights (fewer groups) but each pass does less
work per weight byte, so `choose_chunk_tokens` picks the largest chunk among
those giving the fewest groups.

A chunk smaller than a sequence (chunked prefill) also makes every attention
node hold the K/V of the earlier tokens of its sequence that the chunk
attends to, which grows as the chunk shrinks: kv_bytes_per_token ×
(min(N + P, w − 1) − min(N, w − 1)) with P = c·(⌈s/c⌉ − 1) for a chunk of
c < s tokens after N cached tokens (the graph's ``context``, 0 by default),
w the node's sliding window (∞ on a global layer, where it is P;
`cachefit.graphs.kv.prefix_tokens`).  The
``+kv`` memory models count it in S(P) (resident); the plain ones stream
it.  The search probes with the plan's model, so under ``+kv`` it weighs
both effects, and on a model with local layers (gemma-2/3, Mistral) the
window's cap makes small chunks cheaper there than on global layers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .errors import InputError
from .memory import LayerTable, as_table, check_memory
from .progress import task

__all__ = ["ChunkChoice", "chunk_candidates", "choose_chunk_tokens", "graph_tokens"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChunkChoice:
    """The result of `choose_chunk_tokens`.

    Attributes
    ----------
    chunk_tokens : int
        The chosen chunk (tokens per pass).
    chunk_fraction : float
        chunk_tokens / tokens.
    tokens : int
        batch × seq_len of the graph.
    k : int or None
        Groups of the probe plan at the chosen chunk (None: no chunk gave a plan).
    probes : tuple of (int, int or None)
        Every chunk tried and the k its probe plan needed (None: no plan).
    """

    chunk_tokens: int
    chunk_fraction: float
    tokens: int
    k: int | None
    probes: tuple


def graph_tokens(graph):
    """batch × seq_len from the graph attributes ``batch`` and ``seq_len``.

    Raises
    ------
    InputError
        The graph lacks either attribute (or they are not positive integers).

    Examples
    --------
    >>> import networkx as nx
    >>> graph_tokens(nx.DiGraph(batch=4, seq_len=1024))
    4096
    """
    attributes = graph.graph if hasattr(graph, "graph") and isinstance(graph.graph, dict) else {}
    batch, seq_len = attributes.get("batch"), attributes.get("seq_len")
    for name, value in (("batch", batch), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"`chunk_tokens` needs the graph attributes `batch` and `seq_len` (positive "
                             f"integers) to turn tokens into a fraction; the graph's `{name}` is {value!r}: "
                             f"set graph.graph['{name}'] or use `chunk_fraction`")
    return batch * seq_len


def chunk_candidates(tokens):
    """Powers of two from 1 up to `tokens`, and `tokens` itself (no chunking).

    Examples
    --------
    >>> chunk_candidates(10)
    [1, 2, 4, 8, 10]
    >>> chunk_candidates(8)
    [1, 2, 4, 8]
    """
    candidates, chunk = [], 1
    while chunk < tokens:
        candidates.append(chunk)
        chunk *= 2
    candidates.append(tokens)
    return candidates


def choose_chunk_tokens(graph, capacity, *, solver="greedy", memory="liveness", tile=False,
                        time_limit_s=None):
    """The chunk size (tokens per pass) that gives the fewest groups, the largest among ties.

    Parameters
    ----------
    graph : networkx.DiGraph
        A model graph with graph attributes ``batch`` and ``seq_len``.
    capacity : int or str
        As in `cachefit.plan`.
    solver : str
        The solver that probes each chunk (default greedy: fast, and optimal
        in k for the graph's order).
    memory : str
        A name in `cachefit.memory.MODELS`.  Under ``additive`` activations
        are never scaled, every chunk gives the same k, and the full
        batch × seq_len is chosen; under ``+kv`` models a chunk inside a
        sequence adds each attention node's K/V prefix.
    tile : bool
        Tile the graph for each chunk (`cachefit.graphs.tile`) before probing,
        as ``cachefit.plan(..., tile=True)`` will.
    time_limit_s : float, optional
        Passed to each probe.

    Returns
    -------
    ChunkChoice
        When no chunk gives a plan, ``chunk_tokens`` is 1 (the smallest
        working set) and ``k`` is None: planning at it reports why.

    Raises
    ------
    InputError
        The graph lacks ``batch``/``seq_len``, or a bad `solver`, `memory`
        or `capacity`.

    Notes
    -----
    Candidates: the powers of two from 1 to tokens = batch × seq_len and
    tokens itself (`chunk_candidates`), at most ⌈log2 tokens⌉ + 1 of them,
    and every one is probed.  The probes are exhaustive, not a bisection:
    under a ``+kv`` model the chunked-prefill K/V term falls as f grows while
    the live activations rise, so k is not monotone in f; and with tiling the
    graph itself depends on f.  With ≤ 22 candidates for a 2^21-token batch
    the cost is a few greedy passes.

    Examples
    --------
    >>> import networkx as nx
    >>> g = nx.DiGraph(batch=1, seq_len=8)
    >>> for name in "ab":
    ...     g.add_node(name, weight_bytes=40, activation_bytes=16, buffer_bytes=0)
    >>> g.add_edge("a", "b")
    >>> choice = choose_chunk_tokens(g, 100)
    >>> choice.chunk_tokens, choice.k, choice.probes
    (4, 1, ((1, 1), (2, 1), (4, 1), (8, 2)))
    """
    from .solvers import SOLVERS

    if solver not in SOLVERS:
        raise InputError(f"`solver` must be one of {', '.join(SOLVERS)}, got {solver!r}")
    check_memory(memory)
    if isinstance(graph, LayerTable):
        raise InputError("`graph` must be a networkx.DiGraph with `batch` and `seq_len` attributes, "
                         "got a LayerTable")
    tokens = graph_tokens(graph)
    if tile:
        from .graphs import tile as tile_graph
    else:
        table = as_table(graph)  # flatten once, probe many times
    probes = []
    candidates = chunk_candidates(tokens)
    with task("chunk search" + (" (tiling each chunk)" if tile else ""), total=len(candidates)) as progress:
        for chunk in candidates:
            fraction = chunk / tokens
            probed = tile_graph(graph, capacity, memory=memory, chunk_fraction=fraction) if tile else table
            result = SOLVERS[solver](probed, capacity, memory=memory, chunk_fraction=fraction,
                                     time_limit_s=time_limit_s)
            probes.append((chunk, result.k if result.ok else None))
            progress.advance(detail=f"{chunk:,} tokens: " + (f"k = {result.k}" if result.ok else "no plan"))
    feasible = [(k, -chunk) for chunk, k in probes if k is not None]
    if feasible:
        k, negative = min(feasible)
        chunk = -negative
    else:
        k, chunk = None, 1
    logger.info("choose_chunk_tokens: %d of %d tokens per pass (k = %s); probes %s", chunk, tokens, k, probes)
    return ChunkChoice(chunk, chunk / tokens, tokens, k, tuple(probes))
