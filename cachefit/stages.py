"""`stages`: cut a model into pipeline stages, one per device, balanced by compute under a memory cap.

When a model outgrows one accelerator it runs as a pipeline: stage i on
device i, the activations handed from stage to stage.  A stage plan is an
ordinary `Plan` with exactly one group per device, each group within the
device's memory less a reserve (for the KV cache, the runtime's workspace,
fragmentation), balanced by ``flops`` (the stage times) or by bytes.
`cachefit.executor.pipeline` hands such a plan to
``torch.distributed.pipelining``.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from numbers import Integral

import numpy as np

from .devices import parse_capacity
from .errors import InputError
from .memory import LayerTable, group_sizes
from .result import Status
from .ties import COPY_KEY, forced_apart, tied_nodes, with_table_copies
from .units import format_bytes, parse_bytes

__all__ = ["stages", "min_devices", "format_device", "BALANCES"]

logger = logging.getLogger(__name__)

#: What a stage plan balances: the largest stage's ``flops``, or its bytes.
BALANCES = ("flops", "memory")


def _node_values(graph, key):
    if isinstance(graph, LayerTable):
        graph = graph.graph
    if graph is None:
        return None
    return {node: int(data.get(key) or 0) for node, data in graph.nodes(data=True)}


def min_devices(graph, device_capacity, *, reserve=0, memory="liveness"):
    """The fewest devices of `device_capacity` − `reserve` that hold `graph` as stages in its node order.

    Parameters
    ----------
    graph : networkx.DiGraph or LayerTable
    device_capacity : int or str
        Bytes, a byte string or a device name (``"h100-hbm"``).
    reserve : int or str
        Bytes kept free on every device.
    memory : {"liveness", "additive"}

    Returns
    -------
    int or None
        The fewest contiguous runs of the node order that each fit (greedy
        cutting, exact for a fixed order since sizes are monotone); None when
        a node does not fit one device even alone.

    Examples
    --------
    >>> from cachefit.graphs import from_layers
    >>> min_devices(from_layers([30, 30, 30, 30]), 100, reserve=50, memory="additive")
    4
    """
    from .solvers import greedy

    capacity = _stage_capacity(device_capacity, reserve)
    plan = greedy(graph, capacity, memory=memory)
    return plan.k if plan.ok else None


def format_device(num_bytes):
    """A device's memory in the units it is sold in: decimal (``'80.0 GB'``) when a whole number of
    MB and not of MiB, else binary.

    Examples
    --------
    >>> format_device(80 * 10**9), format_device(80 * 2**30), format_device(100)
    ('80.0 GB', '80.0 GiB', '100 B')
    """
    decimal = num_bytes % 10**6 == 0 and num_bytes % 2**20 != 0
    return format_bytes(num_bytes, binary=not decimal)


def _allowed_starts(graph, boundaries):
    """The nodes a stage may begin at under `boundaries` (see `stages`), or None for any node."""
    if isinstance(boundaries, str):
        if boundaries == "any":
            return None
        if boundaries != "auto":
            raise InputError(f"`boundaries` must be 'auto', 'any' or a collection of node ids, got {boundaries!r}")
        from .executor.boundaries import stage_boundaries

        digraph = graph.graph if isinstance(graph, LayerTable) else graph
        return None if digraph is None else stage_boundaries(digraph)
    try:
        return set(boundaries)
    except TypeError:
        raise InputError(f"`boundaries` must be 'auto', 'any' or a collection of node ids, got "
                         f"{type(boundaries).__name__}") from None


def _stage_capacity(device_capacity, reserve):
    total = parse_capacity(device_capacity, name="device_capacity")
    reserved = parse_bytes(reserve, name="reserve")
    if reserved >= total:
        raise InputError(f"`reserve` ({format_bytes(reserved)}) must be less than `device_capacity` "
                         f"({format_bytes(total)})")
    return total - reserved


def stages(graph, *, devices, device_capacity, balance="flops", reserve=0, memory="liveness", solver="dp",
           time_limit_s=None, boundaries="auto"):
    """A pipeline-stage plan: exactly `devices` groups, each within one device, balanced.

    Parameters
    ----------
    graph : networkx.DiGraph or LayerTable
        The model graph (``flops`` node attributes for ``balance="flops"``:
        `cachefit.graphs.transformer`, the embedded models and
        `from_hf_config` fill them; a node without one counts 0, so a graph
        without any, e.g. from `from_torch`, is balanced by Σ S² of its bytes).
    devices : int
        Number of stages (one per device).
    device_capacity : int or str
        Memory of one device: bytes, a byte string (``"80GB"``) or a device
        name (``"h100-hbm"``, ``"h200-hbm"``, ``"a100-hbm"``).
    balance : {"flops", "memory"}
        Minimise the largest stage's ``flops`` (the slowest stage sets a
        pipeline's pace) or its bytes; either way every stage fits.
    reserve : int or str
        Bytes kept free on every device (KV cache, workspace); the plan's
        capacity is ``device_capacity − reserve``.
    memory : {"liveness", "additive"}
        The memory model (see the README's memory models); liveness counts every activation a
        stage holds or passes on.
    solver : str
        A solver of `cachefit.solvers.SOLVERS`; ``"dp"`` (the default) keeps
        the node order, which a pipeline runtime needs, and is exact for it.
    time_limit_s : float, optional
        For solvers that search.
    boundaries : "auto", "any" or collection of str
        Nodes a stage may begin at.  ``"auto"`` (default): for a graph that
        ``from_torch`` captured with ``torch.export``, only nodes where a
        module call begins (`cachefit.executor.boundaries`), the cuts
        ``torch.distributed.pipelining`` can make; any node otherwise.
        ``"any"``: no constraint.  With a constraint the stages are solved
        by `cachefit.stage_cuts.cut_at_boundaries` (the smallest bottleneck
        among runs that begin at allowed nodes; `solver` is not used).

    Returns
    -------
    Plan
        ``k == devices`` groups within ``device_capacity − reserve`` bytes (the
        plan's ``capacity``, so `cachefit.check` checks every stage against
        it).  ``stats``: ``devices``, ``device_capacity``, ``reserve``,
        ``min_devices`` (the fewest devices that fit in the node order, None
        when a node exceeds one device), ``balance``, ``flops`` and
        ``params`` per stage, ``bottleneck_flops``; ``table_copies`` (node →
        bytes) when a tied node is in another stage than its owner: the
        plan's graph then counts that table in the node's ``weight_bytes``
        (`cachefit.ties`; ``table_copy_bytes`` marks it).  INFEASIBLE when the model
        cannot be cut into `devices` stages that fit, with the reason and the
        smallest device count that would fit (also when `devices` exceeds the
        number of nodes: a stage cannot be empty).

    Raises
    ------
    InputError
        `devices` not a positive integer, an unknown `balance` or `solver`,
        a bad capacity or a reserve not below it.

    Notes
    -----
    The solver gets ``k=devices`` and ``balance``.  With ``"flops"`` and
    ``dp``, the bottleneck is the smallest possible largest stage flops among
    partitions of the node order into `devices` runs that each fit (a
    greedy probe that cuts when either the flops bound or the capacity would
    be exceeded is exact, both being monotone in the run), then Σ S² of the
    bytes is minimised among those.  `min_devices` is one greedy pass:
    O(n log n).

    Examples
    --------
    >>> from cachefit.graphs import from_layers
    >>> graph = from_layers([30] * 6)
    >>> for node, flops in zip(graph, [1, 1, 1, 1, 4, 4]):
    ...     graph.nodes[node]["flops"] = flops
    >>> plan = stages(graph, devices=3, device_capacity=100, memory="additive")
    >>> plan.partitions, plan.stats["flops"], plan.stats["min_devices"]
    ((('0', '1', '2'), ('3', '4'), ('5',)), [3, 5, 4], 2)
    >>> bad = stages(graph, devices=1, device_capacity=100, memory="additive")
    >>> bad.status, bad.stats["min_devices"]
    (<Status.INFEASIBLE: 'INFEASIBLE'>, 2)
    """
    from .solvers import SOLVERS

    if isinstance(devices, bool) or not isinstance(devices, Integral) or devices < 1:
        raise InputError(f"`devices` must be a positive integer, got {devices!r}")
    devices = int(devices)
    if balance not in BALANCES:
        raise InputError(f"`balance` must be one of {', '.join(map(repr, BALANCES))}, got {balance!r}")
    if solver not in SOLVERS:
        raise InputError(f"`solver` must be one of {', '.join(SOLVERS)}, got {solver!r}")
    capacity = _stage_capacity(device_capacity, reserve)
    total = parse_capacity(device_capacity, name="device_capacity")
    digraph = graph.graph if isinstance(graph, LayerTable) else graph
    tied = devices > 1 and digraph is not None and bool(tied_nodes(digraph))
    # With ties, solve as if every tied node were apart from its owner (each counts its table copy);
    # `_exact_copies` then marks the split found and says whether the solver's claims still hold.
    presumed = with_table_copies(digraph) if tied else graph
    fewest = min_devices(graph, total, reserve=total - capacity, memory=memory)
    if tied and fewest is not None and fewest > 1:
        fewest = min_devices(presumed, total, reserve=total - capacity, memory=memory)
    allowed = _allowed_starts(graph, boundaries)

    def solve(subject):
        if allowed is not None:
            from .stage_cuts import cut_at_boundaries

            return cut_at_boundaries(subject, capacity, k=devices, allowed=allowed, memory=memory, balance=balance)
        return SOLVERS[solver](subject, capacity, memory=memory, k=devices, time_limit_s=time_limit_s,
                               balance=balance)

    result = solve(presumed)
    if tied:
        result = _exact_copies(result, digraph, devices, solve)
    stats = {"devices": devices, "device_capacity": total, "reserve": total - capacity, "min_devices": fewest,
             "balance": balance}
    if not result.ok:
        where = (f"{devices} device(s) of {format_device(total)} − {format_bytes(total - capacity)} reserve "
                 f"= {format_bytes(capacity)} each")
        if fewest is None:
            # The solver's own reason would advise tiling or streaming the KV cache, on-chip choices that do not
            # apply to a device: say what does.
            return replace(result, reason=f"{where}: {_oversize_reason(presumed, capacity, memory)}",
                           stats={**result.stats, **stats})
        else:
            hint = f"the smallest device count that fits is {fewest}"
            nodes = result.graph.number_of_nodes() if hasattr(result.graph, "number_of_nodes") else None
            if nodes is not None and devices > nodes:
                hint += f" (and at most {nodes}, one node per stage)"
        logger.info("stages: %s: %s", where, result.reason)
        return replace(result, reason=f"{where}: {result.reason}; {hint}", stats={**result.stats, **stats})
    flops = _node_values(result.graph, "flops")
    params = _node_values(result.graph, "params")
    group_flops = [sum(flops[node] for node in group) for group in result.partitions] if flops else []
    stats.update(flops=group_flops, bottleneck_flops=max(group_flops, default=0),
                 params=[sum(params[node] for node in group) for group in result.partitions] if params else [])
    return result.with_stats(**stats)


def _exact_copies(result, graph, devices, solve):
    """`result` (solved with every tied node's table copy counted) with the copies of its own split.

    Exact when `forced_apart` (every split of `devices` runs in the node
    order separates each tied node from its owners: the embedded and
    Hugging Face transformers).  Otherwise a split keeping a tied node with
    its owner was judged by a larger size than it has, so the claims are
    weakened: OPTIMAL becomes FEASIBLE; with no plan, the graph without any
    copy is solved too: no plan there proves INFEASIBLE, and a plan there
    whose own copies fit is returned (FEASIBLE), else UNKNOWN.
    """
    exact = forced_apart(graph, devices)
    if result.ok:
        return _marked(result, graph, weaken=not exact)
    result = replace(result, graph=graph)  # no split, no copies: the model's own bytes
    if exact or result.status != Status.INFEASIBLE:
        return result
    relaxed = solve(graph)
    if not relaxed.ok:
        return result
    candidate = _marked(relaxed, graph, weaken=True)
    if candidate.bottleneck <= candidate.capacity:
        return candidate
    return replace(result, status=Status.UNKNOWN,
                   reason=f"{result.reason} (counting a table copy for every tied node; a split that keeps a "
                          "tied node with its owner may fit)")


def _marked(result, graph, *, weaken):
    """`result` over `graph` marked with its split's table copies, sizes recomputed (`weaken`: at most FEASIBLE)."""
    marked = with_table_copies(graph, result.partitions)
    sizes = tuple(int(size) for size in group_sizes(marked, result.partitions, memory=result.memory,
                                                     chunk_fraction=result.chunk_fraction))
    copies = {node: data[COPY_KEY] for node, data in marked.nodes(data=True) if data.get(COPY_KEY)}
    stats = {**result.stats, "table_copies": copies}
    status = result.status
    if weaken and status == Status.OPTIMAL:
        status = Status.FEASIBLE
        stats["claims"] = "not proved: a tied node may share a stage with its owner, which the search did not weigh"
    return replace(result, graph=marked, sizes=sizes, bottleneck=max(sizes), status=status, stats=stats)


def _oversize_reason(graph, capacity, memory):
    """Why no number of devices of `capacity` bytes holds `graph`: its largest node alone, and what helps."""
    from .memory import alone_sizes, as_table

    table = as_table(graph)
    alone = alone_sizes(table, memory)
    over = np.flatnonzero(alone > capacity)
    helps = ("no number of devices fits: only a larger device_capacity (or a smaller reserve) does (the stage "
             "level keeps nodes whole; tiling splits nodes for the on-chip level, and tensor parallelism is not "
             "modelled)")
    if not over.size:  # each node fits alone, but not with the activations that pass it in the node order
        return f"a node with the activations live across it in the node order exceeds one device's " \
               f"{format_bytes(capacity)} ({capacity} B); {helps}"
    index = int(over[np.argmax(alone[over])])  # the largest (the first of equal ones), as the solvers name it
    return (f"node {table.ids[index]!r} needs {format_bytes(int(alone[index]))} ({int(alone[index])} B) alone "
            f"(weights, KV cache and live activations), more than one device's {format_bytes(capacity)} "
            f"({capacity} B)" + (f"; {len(over)} node(s) exceed one device" if len(over) > 1 else "")
            + f"; {helps}")
