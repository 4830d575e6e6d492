"""What every solver shares: input normalisation and Plan assembly.

A public solver validates and normalises all its input in one place
(`Problem.make`), runs its algorithm on positions of a `LayerTable`, and
hands the result to `finish`, which computes sizes with the memory model and
fills every field of the `Plan`.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass

import numpy as np

from ..devices import parse_capacity
from ..errors import InputError
from ..memory import Intervals, LayerTable, as_table, check_chunk_fraction, check_memory, group_sizes, kv_placement
from ..memory import alone_sizes as _alone_sizes
from ..result import Plan, Status
from ..validation import MAX_BYTES
from .bounds import lower_bound

__all__ = ["Problem", "finish", "no_plan", "alone_sizes", "oversize_node", "refuse", "check_k", "check_balance", "BALANCES"]

#: What a balanced plan minimises after k: the largest group's bytes, or its ``flops``.
BALANCES = ("memory", "flops")


def check_balance(balance):
    """Return `balance` if it names a balance, else raise `InputError`."""
    if balance not in BALANCES:
        raise InputError(f"`balance` must be one of {', '.join(map(repr, BALANCES))}, got {balance!r}")
    return balance

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Problem:
    """A solver's normalised input.

    ``capacity`` is in bytes, at most 2**62 (`cachefit.validation.MAX_BYTES`):
    a larger capacity is planned (and recorded in the plan) as 2**62, which
    every group of a valid graph fits, since a graph holds at most that
    many bytes in all.  ``time_limit_s`` is None or a positive finite number.

    ``balance`` is ``"memory"`` (the bottleneck is the largest group's
    bytes) or ``"flops"`` (the largest group's flops, every group still
    within the capacity); ``flops`` is then the per-position array
    (`LayerTable.flops_array`), else None.
    """

    table: LayerTable
    capacity: int
    memory: str
    chunk_fraction: float
    k: int | None
    time_limit_s: float | None
    seed: int
    started: float
    balance: str = "memory"
    flops: np.ndarray | None = None

    @classmethod
    def make(cls, graph, capacity, *, memory, chunk_fraction, k, time_limit_s, seed, balance="memory"):
        started = time.perf_counter()
        balance = check_balance(balance)
        table = as_table(graph)
        capacity = parse_capacity(capacity)
        if capacity > MAX_BYTES:  # a valid graph holds at most MAX_BYTES in all: every group fits
            logger.info("capacity %d B is beyond 2**62 B; planning with 2**62 B, which every group fits", capacity)
            capacity = MAX_BYTES
        memory = check_memory(memory)
        chunk_fraction = check_chunk_fraction(chunk_fraction)
        if k is not None and (isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1):
            raise InputError(f"`k` must be a positive integer or None, got {k!r}")
        if time_limit_s is not None and (isinstance(time_limit_s, bool) or not isinstance(time_limit_s, (int, float))
                                         or not 0 < time_limit_s < math.inf):
            raise InputError(f"`time_limit_s` must be a positive finite number of seconds, got {time_limit_s!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**31:
            raise InputError(f"`seed` must be an integer from 0 to 2**31 - 1, got {seed!r}")
        flops = table.flops_array() if balance == "flops" else None
        return cls(table, capacity, memory, chunk_fraction, None if k is None else int(k),
                   time_limit_s, int(seed), started, balance, flops)

    def group_flops(self, groups):
        """Σ flops of each group (lists or ranges of positions); needs ``balance="flops"``."""
        flops = self.flops
        return [int(flops[group.start:group.stop].sum()) if isinstance(group, range) and group.step == 1
                else int(sum(int(flops[p]) for p in group)) for group in groups]

    @functools.cached_property
    def _intervals(self):
        return Intervals(self.table, self.memory, self.chunk_fraction)

    def intervals(self):
        """Sizes of runs of the node order (built once per problem)."""
        return self._intervals

    def lower_bound(self):
        return lower_bound(self.table, self.capacity, memory=self.memory, chunk_fraction=self.chunk_fraction)

    def elapsed(self):
        return time.perf_counter() - self.started


def alone_sizes(problem):
    """Size of each node alone in a group, a lower bound on any group holding it (`cachefit.memory.alone_sizes`)."""
    return _alone_sizes(problem.table, problem.memory, problem.chunk_fraction, intervals=problem.intervals())


def oversize_node(problem):
    """The reason no plan can exist because a node cannot fit alone, or None.

    A node alone in a group still needs its own weights, its buffer, its own
    output and (liveness) every input it consumes, and under a ``+kv``
    model its KV cache; if that exceeds C, no grouping of any order can hold
    it.  The advice fits the node: tiling splits weights, never a KV cache,
    so a node whose resident cache fills the capacity alone is told to stream
    it (``kv="streamed"``), not to tile.
    """
    table = problem.table
    alone = alone_sizes(problem)
    over = np.flatnonzero(alone > problem.capacity)
    if not over.size:
        return None
    index = int(over[np.argmax(alone[over])])
    from ..units import format_bytes
    kv = _resident_kv(problem, index)
    parts = f"weights {format_bytes(int(table.weight[index]))}" + (f" + KV cache {format_bytes(kv)}" if kv else "")
    if problem.intervals().has_live:
        parts += f" + buffer {format_bytes(int(table.buffer[index]))} + live activations"
    else:
        parts += f" + activation {format_bytes(int(table.activation[index]))} + buffer {format_bytes(int(table.buffer[index]))}"
    if not kv:
        advice = "tile it (tile=True) or raise the capacity"
    elif kv >= problem.capacity or not table.weight[index]:
        what = "its KV cache alone fills the capacity" if kv >= problem.capacity else "it has no weights to tile"
        advice = (f"{what} and tiling does not split a KV cache: stream the cache "
                  "(kv='streamed', memory without '+kv'), shorten the context or batch, or raise the capacity")
    else:
        advice = ("tiling splits its weights, not its KV cache: tile it (tile=True), stream the cache "
                  "(kv='streamed', memory without '+kv') or raise the capacity")
    return (f"node {table.ids[index]!r} needs {format_bytes(int(alone[index]))} ({int(alone[index])} B) alone "
            f"({parts}) > capacity {format_bytes(problem.capacity)} ({problem.capacity} B)"
            + (f"; {over.size} node(s) are oversize in all" if over.size > 1 else "")
            + f"; {advice}")


def _resident_kv(problem, index):
    """The KV cache bytes node `index` keeps in its group under `problem`'s memory model (0 unless ``+kv``)."""
    if kv_placement(problem.memory) != "resident" or problem.table.graph is None:
        return 0
    return int(problem.table.graph.nodes[problem.table.ids[index]].get("kv_bytes") or 0)


def refuse(problem, solver):
    """The INFEASIBLE plan every solver gives before searching, or None.

    A node that cannot fit alone (`oversize_node`), or an explicit k above
    the number of nodes: both are proved without a search.
    """
    reason = oversize_node(problem) or check_k(problem, 0)
    return no_plan(problem, solver, Status.INFEASIBLE, reason) if reason else None


def check_k(problem, minimum_k):
    """The reason an explicit k is impossible, or None."""
    if problem.k is None:
        return None
    if problem.k > problem.table.n:
        return f"k = {problem.k} non-empty groups need at least {problem.k} nodes; the graph has {problem.table.n}"
    if problem.k < minimum_k:
        return f"k = {problem.k} is below the minimum number of groups, {minimum_k}"
    return None


def no_plan(problem, solver, status, reason, *, lower=None, stats=None):
    """A Plan without groups (INFEASIBLE or UNKNOWN) that states its reason."""
    if lower is None:
        lower = problem.lower_bound()
    logger.info("%s: %s: %s", solver, status, reason)
    stats = dict(stats or {})
    if problem.balance == "flops":
        stats["balance"] = "flops"
    return Plan((), (), problem.capacity, problem.memory, problem.chunk_fraction, solver, Status(status),
                0, int(lower), 0, problem.elapsed(), stats, reason, problem.table.graph or problem.table)


def finish(problem, solver, groups, *, status=None, lower=None, stats=None, sizes=None):
    """Assemble the Plan of `groups` (lists of positions, in execution order).

    Sizes come from `cachefit.memory`; a group over capacity or an empty group
    here is a solver bug and raises.  Status is OPTIMAL when k equals the
    lower bound (for k=None), else the `status` given (default FEASIBLE).
    With ``balance="flops"`` the stats get ``balance``, ``flops`` (per
    group) and ``bottleneck_flops``.
    """
    table = problem.table
    ids = table.ids
    partitions = tuple(ids[group.start:group.stop] if isinstance(group, range) and group.step == 1
                       else tuple(ids[p] for p in group) for group in groups)
    if sizes is None:
        sizes = group_sizes(table, partitions, memory=problem.memory, chunk_fraction=problem.chunk_fraction)
    sizes = tuple(int(size) for size in sizes)
    if any(not group for group in partitions) or any(size > problem.capacity for size in sizes):
        raise AssertionError(f"{solver} produced an empty or oversize group: sizes {sizes}, capacity {problem.capacity}")
    lower = problem.lower_bound() if lower is None else lower
    k = len(partitions)
    lower = int(lower)
    if lower > k:
        raise AssertionError(f"{solver}: lower bound {lower} exceeds the k = {k} of a valid plan")
    if status is None:
        status = Status.FEASIBLE
    if problem.k is None and k == lower:
        status = Status.OPTIMAL
    stats = dict(stats or {})
    if problem.balance == "flops":
        flops = problem.group_flops(groups)
        stats.update(balance="flops", flops=flops, bottleneck_flops=max(flops, default=0))
    return Plan(partitions, sizes, problem.capacity, problem.memory, problem.chunk_fraction, solver,
                Status(status), k, lower, max(sizes) if sizes else 0, problem.elapsed(), stats, "",
                table.graph if table.graph is not None else table)


def contiguous_groups(bounds):
    """Groups of positions from boundary positions [0, b1, ..., n]."""
    return [range(int(s), int(e)) for s, e in zip(bounds[:-1], bounds[1:])]
