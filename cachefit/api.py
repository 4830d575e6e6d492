"""`plan`: the library's entry point."""

from __future__ import annotations

from .errors import InputError

__all__ = ["plan"]


def plan(graph, capacity, *, solver="auto", memory="liveness", chunk_fraction=1.0, k=None,
         time_limit_s=None, seed=0):
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
        The memory model (DESIGN.md §4).
    chunk_fraction : float in (0, 1]
        Fraction of the activations resident at once (liveness model).
    k : int, optional
        Exactly k non-empty groups, balanced; default the fewest.
    time_limit_s : float, optional
        Time limit for solvers that search.
    seed : int
        Seed for solvers that randomise.

    Returns
    -------
    Plan
        Always a plan; ``status`` says whether it is OPTIMAL, FEASIBLE,
        INFEASIBLE (with ``reason``) or UNKNOWN.

    Examples
    --------
    >>> import cachefit
    >>> g = cachefit.graphs.from_layers([20 * 2**20] * 6)
    >>> p = cachefit.plan(g, "50MiB")
    >>> p.k, p.status, [cachefit.format_bytes(s) for s in p.sizes]
    (3, <Status.OPTIMAL: 'OPTIMAL'>, ['40.0 MiB', '40.0 MiB', '40.0 MiB'])
    """
    from .solvers import SOLVERS

    if solver not in SOLVERS:
        raise InputError(f"`solver` must be one of {', '.join(SOLVERS)}, got {solver!r}")
    return SOLVERS[solver](graph, capacity, memory=memory, chunk_fraction=chunk_fraction, k=k,
                           time_limit_s=time_limit_s, seed=seed)
