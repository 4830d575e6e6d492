"""Thin adapters that run other projects' sequence partitioners and return cachefit Plans.

Peers partition a sequence of per-layer weights into a given number of
parts; they know nothing of a capacity.  Each adapter takes a chain's
`LayerTable` and the k to aim at, passes the peer the additive per-layer
sizes (weight + activation + buffer bytes, the quantity the additive model
sums), turns the peer's answer (boundaries or blocks) into contiguous groups
and builds the `Plan` directly, with the real group sizes under the
benchmark's memory model.  An adapter never raises because a group is over
capacity, empty, or k is off: the plan is recorded as the peer made it and
`cachefit.check` judges it (``check_ok`` False for an oversize group).

Registered peers (each present only when its package imports):

``deepspeed.partition_balanced``
    `deepspeed.runtime.utils.partition_balanced(weights, num_parts)`: a
    pure-Python dynamic programme over (item, part, split) that minimises
    max − min of the part sums, O(k·n²).
``deepspeed.partition_uniform``
    `deepspeed.runtime.utils.partition_uniform(num_items, num_parts)`:
    equal item counts, sizes ignored.
``torchgpipe.blockpartition``
    `torchgpipe.balance.blockpartition.solve(sequence, partitions)`: the
    Bárány–Grinberg block-partition heuristic.

`PEERS` maps each name to a `Peer` record; `available_peers()` lists those
that import here.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import time
from dataclasses import dataclass
from typing import Callable


from cachefit.memory import group_sizes
from cachefit.result import Plan, Status

__all__ = ["Peer", "PEERS", "available_peers", "peer_plan", "skip_reason"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Peer:
    """A peer partitioner.

    Attributes
    ----------
    name : str
    module : str
        The module that must import for the peer to run.
    bounds : callable
        ``bounds(weights, k) -> list of boundary positions [0, ..., n]``,
        the adapter proper (weights: list of int).
    estimate_s : callable
        ``estimate_s(n, k) -> seconds``, a rough running-time estimate used
        to skip hopeless runs (see `skip_reason`).
    cost_note : str
        What `estimate_s` is based on.
    """

    name: str
    module: str
    bounds: Callable
    estimate_s: Callable
    cost_note: str


def _deepspeed_balanced(weights, k):
    from deepspeed.runtime.utils import partition_balanced
    return [int(b) for b in partition_balanced(weights, k)]


def _deepspeed_uniform(weights, k):
    from deepspeed.runtime.utils import partition_uniform
    return [int(b) for b in partition_uniform(len(weights), k)]


def _torchgpipe_blocks(weights, k):
    from torchgpipe.balance.blockpartition import solve
    blocks = solve(weights, k)
    bounds = [0]
    for block in blocks:
        bounds.append(bounds[-1] + len(block))
    return bounds


PEERS = {
    peer.name: peer
    for peer in (
        # Measured on the benchmark machine: 500 items, 16 parts, 4.2 s;
        # 2,000 items, 16 parts, 67 s: about 2 µs per inner step, k·n²/2 steps.
        Peer("deepspeed.partition_balanced", "deepspeed.runtime.utils", _deepspeed_balanced,
             lambda n, k: 2.1e-6 * k * n * n / 2, "k·n²/2 inner steps at ~2 µs each"),
        Peer("deepspeed.partition_uniform", "deepspeed.runtime.utils", _deepspeed_uniform,
             lambda n, k: 1e-7 * (n + k * k), "O(n + k²)"),
        # Fitted on (n, k) = (10³, 16), (10⁴, 16), (10⁴, 1250): 0.007 s, 0.48 s, 104 s.
        Peer("torchgpipe.blockpartition", "torchgpipe.balance.blockpartition", _torchgpipe_blocks,
             lambda n, k: 2.6e-9 * n ** 1.82 * k ** 1.23, "fitted n^1.82·k^1.23 (three measured points)"),
    )
}


def available_peers():
    """Names of the peers whose packages import here, and why the others do not.

    Importing a peer's package happens here, once, with its output silenced.

    Returns
    -------
    available : list of str
    missing : dict
        name -> reason.

    Examples
    --------
    >>> available, missing = available_peers()
    >>> sorted(available + list(missing)) == sorted(PEERS)
    True
    """
    available, missing = [], {}
    for name, peer in PEERS.items():
        try:
            # DeepSpeed announces its accelerator on import: keep it off the benchmark's output.
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                importlib.import_module(peer.module)
        except Exception as exc:  # ImportError, or a package that fails while importing
            missing[name] = f"{peer.module} does not import: {type(exc).__name__}: {exc}"
        else:
            available.append(name)
    return available, missing


def skip_reason(name, n, k, time_limit_s):
    """Why peer `name` is not run on n items and k parts within `time_limit_s`, or None.

    A run is skipped when its estimated time exceeds twice the time limit:
    it would only time out (the estimates are rough, so runs estimated up to
    2x the limit are tried and may time out).
    """
    peer = PEERS[name]
    estimate = peer.estimate_s(n, k)
    if time_limit_s is not None and estimate > 2 * time_limit_s:
        return (f"skipped (n too large): estimated {estimate:,.0f} s for n = {n:,}, k = {k:,} "
                f"({peer.cost_note}) > 2 x the {time_limit_s:g} s time limit")
    return None


def peer_plan(name, table, k, *, capacity, memory, chunk_fraction=1.0):
    """Run peer `name` on chain `table` with k parts and return its `Plan`.

    Parameters
    ----------
    name : str
        A key of `PEERS`.
    table : LayerTable
        A chain.
    k : int
        Number of parts to ask for.
    capacity : int
        Recorded in the plan so `check` can judge the sizes.
    memory, chunk_fraction
        The memory model the sizes are computed under.

    Returns
    -------
    Plan
        ``solver`` is the peer's name, ``status`` FEASIBLE (the peer proves
        nothing), ``wall_s`` the time of the peer's own call (input list
        conversion included, plan assembly excluded), ``lower_bound`` 0,
        ``stats`` with the raw boundaries' count.  Groups the peer leaves
        empty are kept (the checker reports them).

    Examples
    --------
    Only when DeepSpeed is installed (extra ``bench``):

    >>> from cachefit.memory import LayerTable
    >>> if "deepspeed.partition_uniform" in available_peers()[0]:
    ...     plan = peer_plan("deepspeed.partition_uniform", LayerTable.chain([5, 5, 5, 5]), 2,
    ...                      capacity=10, memory="additive")
    ...     assert plan.sizes == (10, 10) and plan.k == 2
    """
    peer = PEERS[name]
    started = time.perf_counter()
    weights = (table.weight + table.activation + table.buffer).tolist()
    bounds = peer.bounds(weights, int(k))
    wall_s = time.perf_counter() - started
    ids = table.ids
    partitions = tuple(tuple(ids[start:end]) for start, end in zip(bounds[:-1], bounds[1:]))
    covered = bounds[0] == 0 and bounds[-1] == table.n and all(a <= b for a, b in zip(bounds, bounds[1:]))
    if covered:
        sizes = tuple(int(size) for size in group_sizes(table, partitions, memory=memory,
                                                         chunk_fraction=chunk_fraction))
    else:  # a malformed answer: record it as is, the checker will say what is wrong
        sizes = tuple(0 for _ in partitions)
    return Plan(partitions=partitions, sizes=sizes, capacity=int(capacity), memory=memory,
                chunk_fraction=chunk_fraction, solver=name, status=Status.FEASIBLE, k=len(partitions),
                lower_bound=0, bottleneck=max(sizes, default=0), wall_s=wall_s,
                stats={"peer": name, "requested_k": int(k), "empty_groups": sum(1 for g in partitions if not g)},
                graph=table)
