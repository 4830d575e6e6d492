"""`plan`: the library's entry point."""

from __future__ import annotations

import time
from dataclasses import replace

from .errors import InputError

__all__ = ["plan"]


def plan(graph, capacity, *, solver="auto", memory="liveness", chunk_fraction=1.0, k=None,
         time_limit_s=None, seed=0, tile=False, chunk_tokens=None, balance="memory", devices=None,
         device_capacity=None, reserve=0):
    """Partition `graph` into ordered groups that each fit `capacity`.

    Parameters
    ----------
    graph : networkx.DiGraph or cachefit.memory.LayerTable
        A model graph (see `cachefit.graphs`).
    capacity : int or str
        Bytes, a byte string (``"50MiB"``, ``"50MB"``) or a device name
        (``"h100-l2"``; see `cachefit.devices.DEVICES`).
    solver : str
        A name in `cachefit.solvers.SOLVERS` (default ``"auto"``).
    memory : {"liveness", "additive"}
        The memory model (docs/concepts.md §4).
    chunk_fraction : float in (0, 1]
        Fraction of the activations resident at once (liveness model).
    k : int, optional
        Exactly k non-empty groups, balanced; default the fewest.
    time_limit_s : float, optional
        Time limit for solvers that search.
    seed : int
        Seed for solvers that randomise.
    tile : bool
        Split every node too large for the capacity into tiles that fit
        (`cachefit.graphs.tile`, at the plan's memory model and chunk) before
        solving; the plan's ``graph`` is then the tiled graph.
    chunk_tokens : int or "auto", optional
        Tokens per streaming pass: sets ``chunk_fraction = chunk_tokens /
        (batch × seq_len)`` from the graph's attributes.  ``"auto"`` picks the
        largest chunk among those giving the fewest groups
        (`cachefit.chunks.choose_chunk_tokens`, probed with greedy, tiling
        at each chunk when `tile` is set).
    balance : {"memory", "flops"}
        What is balanced once k is fixed: the largest group's bytes (the
        default), or its Σ ``flops`` (node attribute: `graphs.transformer`,
        the embedded models and `from_hf_config` fill it; a node without one,
        e.g. from `from_torch` or `from_layers`, counts 0), every group
        still within `capacity`.  With ``"flops"`` the plan records
        ``stats["balance"]``, ``stats["flops"]`` (per group) and
        ``stats["bottleneck_flops"]``; ``plan.bottleneck`` stays the largest
        size in bytes.  ``dp`` is exact for the node order, ``cpsat`` and
        ``brute`` over every grouping; ``greedy`` does not balance.
    devices, device_capacity, reserve : optional
        A two-level plan: `devices` pipeline stages of at most
        ``device_capacity − reserve`` bytes each (KV cache counted, balanced
        by flops), and inside each stage the fewest groups of `capacity`
        (`cachefit.deploy.plan_two_level`); a `cachefit.deploy.Deployment`
        is returned, written as a version-2 plan file.

    Returns
    -------
    Plan
        Always a plan; ``status`` says whether it is OPTIMAL, FEASIBLE,
        INFEASIBLE (with ``reason``) or UNKNOWN.  With `chunk_tokens`,
        ``stats["chunk_tokens"]`` (and for ``"auto"`` ``stats["chunk_probes"]``,
        chunk → k of each probe, None where no plan); with `tile`,
        ``stats["tiled_nodes"]`` (nodes split), ``stats["tiles"]`` (tiles
        made), ``stats["untiled"]`` (oversize nodes left whole, with why) and
        ``stats["expanded_blocks"]`` (transformer blocks replaced by their
        operators first); with either, ``stats["prepare_s"]``, the seconds
        spent choosing the chunk and tiling (not part of ``wall_s``, which
        times the solver).

    Raises
    ------
    InputError
        A bad argument (an unknown `balance`, a node's ``flops`` that is not
        a non-negative number when balancing by flops); `chunk_tokens` on a
        graph without ``batch`` and ``seq_len``; both `chunk_tokens` and a
        `chunk_fraction` other than 1.

    Examples
    --------
    >>> import cachefit
    >>> g = cachefit.graphs.from_layers([20 * 2**20] * 6)
    >>> p = cachefit.plan(g, "50MiB")
    >>> p.k, p.status, [cachefit.format_bytes(s) for s in p.sizes]
    (3, <Status.OPTIMAL: 'OPTIMAL'>, ['40.0 MiB', '40.0 MiB', '40.0 MiB'])
    >>> big = cachefit.graphs.from_layers([{"name": "fc", "weight_bytes": 120 * 2**20, "op": "linear"}])
    >>> big.nodes["fc"]["out_features"] = 1024
    >>> p = cachefit.plan(big, "50MiB", tile=True)
    >>> p.k, p.stats["tiled_nodes"], p.stats["tiles"], len(p.graph)
    (3, 1, 3, 4)
    """
    from .solvers import SOLVERS
    from .solvers._common import check_balance

    if devices is not None or device_capacity is not None:  # two levels: devices × on-chip groups
        from .deploy import plan_two_level

        return plan_two_level(graph, capacity, devices=devices, device_capacity=device_capacity, reserve=reserve,
                              solver=solver, memory=memory, chunk_fraction=chunk_fraction, k=k,
                              time_limit_s=time_limit_s, tile=tile, chunk_tokens=chunk_tokens, balance=balance)
    if solver not in SOLVERS:
        raise InputError(f"`solver` must be one of {', '.join(SOLVERS)}, got {solver!r}")
    check_balance(balance)
    if not isinstance(tile, bool):
        raise InputError(f"`tile` must be True or False, got {tile!r}")
    stats = {}
    started = time.perf_counter()
    if chunk_tokens is not None:
        from .chunks import choose_chunk_tokens, graph_tokens

        if chunk_fraction != 1.0:
            raise InputError(f"give `chunk_tokens` or `chunk_fraction`, not both (got chunk_tokens="
                             f"{chunk_tokens!r} and chunk_fraction={chunk_fraction!r})")
        tokens = graph_tokens(graph)
        if chunk_tokens == "auto":
            choice = choose_chunk_tokens(graph, capacity, memory=memory, tile=tile)
            chunk_tokens = choice.chunk_tokens
            stats["chunk_probes"] = {str(chunk): probe_k for chunk, probe_k in choice.probes}
        elif (isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int)
              or not 1 <= chunk_tokens <= tokens):
            raise InputError(f"`chunk_tokens` must be 'auto' or an integer from 1 to batch × seq_len = "
                             f"{tokens}, got {chunk_tokens!r}")
        chunk_fraction = chunk_tokens / tokens
        stats["chunk_tokens"] = chunk_tokens
    if tile:
        from .graphs import tile as tile_graph

        graph = tile_graph(graph, capacity, memory=memory, chunk_fraction=chunk_fraction)
        tiled, untiled = graph.graph["tiled"], graph.graph["untiled"]
        stats.update(tiled_nodes=len(tiled), tiles=sum(entry["tiles"] for entry in tiled.values()),
                     untiled=dict(untiled), expanded_blocks=len(graph.graph.get("expanded_blocks", ())))
    if stats:
        stats["prepare_s"] = time.perf_counter() - started
    result = SOLVERS[solver](graph, capacity, memory=memory, chunk_fraction=chunk_fraction, k=k,
                             time_limit_s=time_limit_s, seed=seed, balance=balance)
    if tile and stats["untiled"] and not result.ok:
        untiled = stats["untiled"]
        # explain the node the solver named, if it is one tiling had to leave whole
        example = next((why for node, why in untiled.items() if repr(node) in result.reason),
                       next(iter(untiled.values())))
        result = replace(result, reason=f"{result.reason}; {len(untiled)} oversize node(s) "
                                        f"could not be tiled, e.g. {example}")
    return result.with_stats(**stats) if stats else result
