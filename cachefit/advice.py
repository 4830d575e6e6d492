"""`suggest`: what would make an INFEASIBLE plan feasible, each answer verified.

Two kinds of advice, both checked by planning them (with ``greedy``, which is
fast and optimal in k for the graph's node order) before they are returned:

the smallest capacity with the current settings
    Without tiling, exactly: for a fixed node order a plan exists as soon as
    every node fits in a group of its own *in that order* (each group of a
    plan holds a run around the node and runs only grow), so the smallest
    capacity is the largest single-node run size, taken at the smallest
    chunk when the chunk is chosen automatically; with an explicit k it is
    the least bottleneck of k groups in that order (``dp``).  A node alone also needs
    at least its weights, buffer, inputs and output in *any* order, so that
    figure is reported as a lower bound for every order.  With tiling the
    graph itself depends on the capacity, so the capacity is found by
    bisection (to 0.5 %) and verified.
the smallest change that fits the given capacity
    Among `tile`, ``chunk_tokens="auto"``, ``granularity="op"`` and a
    smaller batch (the largest that fits, by bisection: activations grow
    with the batch), the subsets with the fewest changes that give a plan.
    Changing the granularity or the batch rebuilds the model, so they are
    tried only when the caller passes `rebuild`.

A two-level plan (``devices`` and ``device_capacity``, `cachefit.deploy`)
gets the same advice for its on-chip level: every change is planned as the
whole two-level plan (stages, then every stage's on-chip groups), and the
smallest capacity for the node orders is the largest over the stages of
each stage's own (the stage split does not depend on the on-chip settings).

Library code never prints: `Advice` carries the numbers, and the CLI says
them in its own syntax (`Suggestion.options`).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field

import networkx as nx
import numpy as np

from .devices import parse_capacity
from .errors import InputError
from .memory import Intervals, as_table, check_memory, kv_placement, with_kv
from .progress import task
from .units import parse_bytes

__all__ = ["Advice", "Suggestion", "suggest", "smallest_capacity", "capacity_text", "DeviceAdvice", "suggest_devices"]

logger = logging.getLogger(__name__)

#: The changes `suggest` tries, in the order it reports them.
CHANGES = ("tile", "chunk_tokens", "kv", "granularity", "batch")


@dataclass(frozen=True)
class Suggestion:
    """One verified way to a plan.

    Attributes
    ----------
    changes : dict
        Option → value relative to the settings asked for, with the names of
        `cachefit.plan` and the CLI: ``capacity`` (bytes), ``tile`` (True),
        ``chunk_tokens`` (``"auto"``), ``kv`` (``"streamed"``: the memory
        model without ``+kv``), ``granularity`` (``"op"``), ``batch`` (int).
    plan : Plan
        The greedy plan that verified it (status OPTIMAL or FEASIBLE).
    """

    changes: dict
    plan: object = field(repr=False, compare=False)

    @property
    def k(self):
        """Groups of the verifying plan."""
        return self.plan.k

    def options(self):
        """The changes as CLI options, e.g. ``['--tile', '--chunk-tokens', 'auto']``.

        >>> Suggestion({"tile": True, "chunk_tokens": "auto", "capacity": 3 * 2**20}, None).options()
        ['--capacity', '3MiB', '--tile', '--chunk-tokens', 'auto']
        """
        words = []
        for name in ("capacity", *CHANGES):
            if name not in self.changes:
                continue
            value = self.changes[name]
            flag = "--" + name.replace("_", "-")
            if value is True:
                words.append(flag)
            else:
                words += [flag, capacity_text(value) if name == "capacity" else str(value)]
        return words


@dataclass(frozen=True)
class Advice:
    """The result of `suggest`.

    Attributes
    ----------
    capacity : int
        The capacity asked for (bytes).
    fits : bool
        The settings as asked for already give a (greedy) plan; then there
        are no `suggestions`, and `min_capacity` says how much room is left.
    min_capacity : Suggestion or None
        The smallest capacity found with the current settings (changes
        ``{"capacity": bytes}``, a round figure at or above the exact one);
        None when none was found.
    min_capacity_exact : int or None
        The exact smallest capacity in bytes for the graph's node order, when
        known (without tiling); with tiling, the bisection's figure.
    capacity_lower_bound : int
        No order of the (untiled) graph fits below this many bytes.
    suggestions : tuple of Suggestion
        The changes with the fewest options that fit `capacity`, fewest
        groups first; empty when none does.
    considered : tuple of str
        The options `suggest` could change here (``tile``, ``chunk_tokens``,
        ``kv``, ``granularity``, ``batch``): those not already set and applicable.
    tried : tuple of (dict, int or None)
        Every change tried and the k of its plan (None: no plan).
    """

    capacity: int
    fits: bool
    min_capacity: Suggestion | None
    min_capacity_exact: int | None
    capacity_lower_bound: int
    suggestions: tuple
    considered: tuple
    tried: tuple


def capacity_text(num_bytes, *, slack=0.01):
    """A short capacity string (`parse_bytes` syntax) of at least `num_bytes` and at most `slack` more.

    The largest binary unit not above `num_bytes`, in the coarsest step
    (1, 1/2, 1/4, ... 1/1024 of the unit: whole bytes, and at most ten
    decimals, so the text parses back exactly) that stays within `slack`;
    the exact byte count when none does.

    >>> capacity_text(104499200), capacity_text(1000), capacity_text(80 * 10**9), capacity_text(5 * 2**20 + 1)
    ('100MiB', '1000', '75GiB', '5.03125MiB')
    >>> capacity_text(80000000007, slack=0)
    '80000000007'
    """
    num_bytes = int(num_bytes)
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes < scale:
            continue
        step = scale
        while step >= max(1, scale >> 10):
            steps = -(-num_bytes // step)
            if steps * step <= num_bytes * (1 + slack):
                value = steps * step / scale  # a dyadic fraction: exact in a float
                return f"{value:.10f}".rstrip("0").rstrip(".") + unit
            step //= 2
        break  # not a round figure of its own unit: the exact byte count
    return str(num_bytes)


def smallest_capacity(graph, *, memory="liveness", chunk_fraction=1.0):
    """The smallest capacity at which `graph` has a plan in its node order, and a bound for any order.

    Parameters
    ----------
    graph : networkx.DiGraph or LayerTable
    memory : {"liveness", "additive"}
    chunk_fraction : float in (0, 1]

    Returns
    -------
    (int, int)
        ``(for_order, any_order_bound)``: greedy finds a plan in the graph's
        order exactly when the capacity is at least ``for_order``, the
        largest size of a node in a group of its own in that order; no
        grouping in any order fits below ``any_order_bound``, the largest
        node's weights + buffer + its inputs and output.

    Examples
    --------
    >>> import networkx as nx
    >>> g = nx.DiGraph()
    >>> for name, weight in zip("abc", (10, 30, 20)):
    ...     g.add_node(name, weight_bytes=weight, activation_bytes=4, buffer_bytes=0)
    >>> g.add_edges_from([("a", "b"), ("b", "c"), ("a", "c")])
    >>> smallest_capacity(g)
    (38, 38)
    """
    check_memory(memory)
    table = as_table(graph)
    if table.n == 0:
        return 0, 0
    intervals = Intervals(table, memory, chunk_fraction)
    for_order = int(intervals.sizes(np.arange(table.n + 1)).max())
    from .solvers._common import Problem, alone_sizes

    problem = Problem.make(table, max(for_order, 1), memory=memory, chunk_fraction=chunk_fraction, k=None,
                           time_limit_s=None, seed=0)
    return for_order, int(alone_sizes(problem).max())


def suggest(graph, capacity, *, memory="liveness", chunk_fraction=1.0, k=None, tile=False, chunk_tokens=None,
            rebuild=None, batch=None, granularity=None, devices=None, device_capacity=None, reserve=0):
    """What would give `graph` a plan at `capacity`: a larger capacity, or the fewest changes.

    Parameters
    ----------
    graph : networkx.DiGraph
        The model graph as asked for (before tiling).
    capacity : int or str
        The capacity asked for.
    memory, chunk_fraction, k, tile, chunk_tokens
        The settings asked for, as in `cachefit.plan`.
    rebuild : callable, optional
        ``rebuild(batch=..., granularity=...)`` returns the model's graph
        with those settings; without it the batch and the granularity are
        not changed.
    batch : int, optional
        The current batch (default: the graph's ``batch`` attribute); a
        smaller one is tried when it is above 1 and `rebuild` is given.
    granularity : {"block", "op"}, optional
        The current granularity (default: the graph's ``granularity``
        attribute); ``"op"`` is tried when it is ``"block"`` and `rebuild`
        is given.
    devices, device_capacity, reserve : optional
        A two-level plan, as in `cachefit.plan`: the advice is for its
        on-chip level (`capacity` is the on-chip capacity), and every
        suggestion is planned as the whole two-level plan, whose `Deployment`
        is the suggestion's ``plan`` (``k``: on-chip groups over all stages).

    Returns
    -------
    Advice
        Every suggestion in it was planned (``greedy``, on chip) and gave a plan.

    Raises
    ------
    InputError
        `graph` is not a networkx.DiGraph, `rebuild` is not callable, or a
        bad argument as `cachefit.plan` would refuse it.

    Notes
    -----
    At most 2⁴ subsets of changes are tried, each a greedy plan (with
    tiling and a chunk search when those are set); the batch by bisection
    over [1, batch), O(log batch) plans.  Every change is a plan with the
    same `k`.  With `devices`, each plan is a two-level plan: a stage plan
    and one greedy on-chip plan per stage.

    Examples
    --------
    >>> import cachefit
    >>> big = cachefit.graphs.from_layers([{"name": "fc", "weight_bytes": 120 * 2**20, "op": "linear"}])
    >>> big.nodes["fc"]["out_features"] = 1024
    >>> advice = suggest(big, "50MiB")
    >>> advice.fits
    False
    >>> capacity_text(advice.min_capacity_exact), advice.min_capacity.options()
    ('120MiB', ['--capacity', '120MiB'])
    >>> [(s.options(), s.k) for s in advice.suggestions]
    [(['--tile'], 3)]

    On two levels, with a second layer on a second device:

    >>> two = cachefit.graphs.from_layers([{"name": f"fc{i}", "weight_bytes": 120 * 2**20, "op": "linear"}
    ...                                    for i in range(2)])
    >>> for node in two:
    ...     two.nodes[node]["out_features"] = 1024
    >>> advice = suggest(two, "50MiB", devices=2, device_capacity="1GiB")
    >>> [(s.options(), s.k, s.plan.devices) for s in advice.suggestions]
    [(['--tile'], 6, 2)]
    """
    if not isinstance(graph, nx.DiGraph):
        raise InputError(f"`graph` must be a networkx.DiGraph (the model as asked for), got {type(graph).__name__}")
    if rebuild is not None and not callable(rebuild):
        raise InputError(f"`rebuild` must be a function rebuild(batch=..., granularity=...) or None, got {rebuild!r}")
    capacity = parse_capacity(capacity)
    check_memory(memory)
    current = {"tile": tile, "chunk_tokens": chunk_tokens, "chunk_fraction": chunk_fraction, "k": k,
               "memory": memory, "batch": batch or graph.graph.get("batch"),
               "granularity": granularity or graph.graph.get("granularity"),
               "devices": devices, "device_capacity": device_capacity, "reserve": reserve}
    tried = []
    with task("advice: what would fit", total=None) as progress:
        def attempt(changes, at_capacity=capacity):
            progress.update(detail=", ".join(f"{name}={value}" for name, value in changes.items()) or "as asked")
            result = _plan_with(graph, at_capacity, current, changes, rebuild)
            tried.append((dict(changes), result.k if result is not None and result.ok else None))
            return result if result is not None and result.ok else None

        asked = _plan_with(graph, capacity, current, {}, rebuild, strict=True)  # bad settings: refused here
        fits = asked.ok
        tried.append(({}, asked.k if fits else None))
        exact, minimum, lower = _min_capacity(_orders(graph, asked), capacity, current, attempt)
        options, can_batch = _options(graph, current, rebuild)
        suggestions = () if fits else _fewest_changes(options, can_batch, current["batch"], attempt)
    considered = tuple(name for name, _ in options) + (("batch",) if can_batch else ())
    return Advice(capacity, fits, minimum, exact, lower, suggestions, considered, tuple(tried))


def _plan_with(graph, capacity, current, changes, rebuild, *, strict=False):
    """The greedy plan of `graph` with `changes` applied to the `current` settings (None: not applicable).

    Two-level settings (``devices``) give a `Deployment`, greedy on chip.
    `strict` lets `cachefit.plan`'s `InputError` through (the settings as asked).
    """
    from .api import plan as make_plan

    settings = {**current, **{name: value for name, value in changes.items() if name != "capacity"}}
    if "batch" in changes or "granularity" in changes:
        graph = rebuild(batch=settings["batch"], granularity=settings["granularity"])
    chunk_fraction = settings["chunk_fraction"] if settings["chunk_tokens"] is None else 1.0
    memory = with_kv(settings["memory"], changes["kv"]) if "kv" in changes else settings["memory"]
    try:
        return make_plan(graph, changes.get("capacity", capacity), solver="greedy", memory=memory,
                         chunk_fraction=chunk_fraction, k=settings["k"], tile=settings["tile"],
                         chunk_tokens=settings["chunk_tokens"], devices=settings["devices"],
                         device_capacity=settings["device_capacity"], reserve=settings["reserve"])
    except InputError as exc:  # e.g. a batch the graph cannot be rebuilt with
        if strict:
            raise
        logger.info("advice: %s does not apply: %s", changes, exc)
        return None


def _orders(graph, asked):
    """The graphs whose node orders the on-chip groups follow: `graph`, or each stage's of a two-level plan.

    A two-level plan whose stage level failed has none (no on-chip capacity helps there).
    """
    if not hasattr(asked, "stages"):
        return [graph]
    return list(asked.stage_graphs())  # empty when the stage level failed


def _min_capacity(orders, capacity, current, attempt):
    """(exact bytes or None, verified Suggestion or None, any-order lower bound) for the current settings.

    `orders`: the graphs planned on chip (`_orders`); the figures are the largest over them.
    """
    if not orders:
        return None, None, 0
    fraction = current["chunk_fraction"]
    if current["chunk_tokens"] is not None:
        from .chunks import graph_tokens

        tokens = graph_tokens(orders[0])  # every stage keeps the model's batch × seq_len
        fraction = (1 if current["chunk_tokens"] == "auto" else current["chunk_tokens"]) / tokens
    figures = [smallest_capacity(graph, memory=current["memory"], chunk_fraction=fraction) for graph in orders]
    for_order, lower = max(figure[0] for figure in figures), max(figure[1] for figure in figures)
    if not current["tile"] and current["k"] is None:
        exact = for_order
    elif not current["tile"] and current["chunk_tokens"] != "auto":
        exact = _least_bottleneck(orders[0], current["k"], current["memory"], fraction)  # k: one level only
    else:
        exact = _bisect_capacity(capacity, for_order, attempt)
    if exact is None:
        return None, None, lower
    rounded = parse_bytes(capacity_text(exact))
    result = attempt({"capacity": rounded}) or attempt({"capacity": exact})
    if result is None:
        return exact, None, lower
    return exact, Suggestion({"capacity": result.capacity}, result), lower


def _least_bottleneck(graph, k, memory, chunk_fraction):
    """The least capacity for exactly `k` groups in the graph's order: dp's bottleneck (None: k > nodes).

    Greedy with that `k` fits there too: at that capacity greedy needs at
    most k groups, and splitting a group only shrinks it.
    """
    from .solvers import SOLVERS

    table = as_table(graph)
    roomy = 1 + sum(table.weight.tolist()) + sum(table.activation.tolist()) + sum(table.buffer.tolist())
    result = SOLVERS["dp"](graph, roomy, memory=memory, chunk_fraction=chunk_fraction, k=k)
    return result.bottleneck if result.ok else None


def _bisect_capacity(capacity, for_order, attempt):
    """The smallest capacity (to 0.5 %) that gives a plan, by doubling then bisection; None if none."""
    low, high = capacity, max(capacity + 1, for_order)
    for _ in range(64):
        if attempt({"capacity": high}):
            break
        low, high = high, 2 * high
    else:
        return None
    while high - low > max(1, high // 200):
        middle = (low + high) // 2
        if attempt({"capacity": middle}):
            high = middle
        else:
            low = middle
    return high


def _options(graph, current, rebuild):
    """([(option, value)] that may change, whether a smaller batch may be tried)."""
    options = []
    if not current["tile"]:
        options.append(("tile", True))
    streaming = current["memory"].removesuffix("+kv") == "liveness"  # chunks scale live activations only
    if current["chunk_tokens"] != "auto" and streaming and _has_tokens(graph):
        options.append(("chunk_tokens", "auto"))
    if kv_placement(current["memory"]) == "resident":
        options.append(("kv", "streamed"))
    if rebuild is not None and current["granularity"] == "block":
        options.append(("granularity", "op"))
    can_batch = rebuild is not None and isinstance(current["batch"], int) and current["batch"] > 1
    return options, can_batch


def _fewest_changes(options, can_batch, batch, attempt):
    """The suggestions with the fewest changes that fit, fewest groups first."""
    for size in range(1, len(options) + can_batch + 1):
        found = []
        for subset in itertools.combinations(options, size):
            result = attempt(dict(subset))
            if result is not None:
                found.append(Suggestion(dict(subset), result))
        if can_batch:
            for subset in itertools.combinations(options, size - 1):
                found += _smaller_batch(dict(subset), batch, attempt)
        if found:
            return tuple(sorted(found, key=lambda suggestion: suggestion.k))
    return ()


def _smaller_batch(changes, batch, attempt):
    """[Suggestion] with the largest batch below `batch` that fits with `changes`, or []."""
    smallest = attempt({**changes, "batch": 1})
    if smallest is None:
        return []
    low, best, high = 1, smallest, batch  # low fits, high does not
    while high - low > 1:
        middle = (low + high) // 2
        result = attempt({**changes, "batch": middle})
        if result is not None:
            low, best = middle, result
        else:
            high = middle
    return [Suggestion({**changes, "batch": low}, best)]


def _has_tokens(graph):
    attributes = getattr(graph, "graph", None)
    if not isinstance(attributes, dict):
        return False
    return all(isinstance(attributes.get(name), int) and attributes.get(name) > 0 for name in ("batch", "seq_len"))


@dataclass(frozen=True)
class DeviceAdvice:
    """What would make an INFEASIBLE stage level (`cachefit.stages`, `cachefit.deploy`) feasible, each planned.

    Only the device side can help there: the stage level keeps whole nodes
    (tiling and chunking are on-chip choices, and tensor parallelism is not
    modelled), so no other change is suggested.

    Attributes
    ----------
    devices : int or None
        The fewest devices of the capacity asked for that hold the model
        (verified by a stage plan); None when no count does (`oversize_node`).
    device_capacity : int or None
        Memory per device (reserve included) for the number of devices
        asked for: a round figure at most 1 % above the least (the least
        itself when the round one is not confirmed), verified by a stage
        plan at exactly that many bytes; None when that number exceeds the
        nodes.
    oversize_node : str or None
        A node that needs more than one device (less the reserve) alone.
    oversize_bytes : int
        What that node needs alone (0 when none).
    plans : tuple of Plan
        The stage plans that verified `devices` and `device_capacity`.
    """

    devices: int | None
    device_capacity: int | None
    oversize_node: str | None
    oversize_bytes: int
    plans: tuple = field(repr=False, compare=False, default=())

    def options(self):
        """Each way as CLI options and why, e.g. ``[(['--devices', '3'], 'the fewest devices ...'), ...]``."""
        ways = []
        if self.devices is not None:
            ways.append((["--devices", str(self.devices)], "the fewest devices of the capacity asked for"))
        if self.device_capacity is not None:
            ways.append((["--device-capacity", capacity_text(self.device_capacity, slack=0)],
                         f"memory per device ({self.device_capacity:,} B, within 1 % of the least) for the "
                         "devices asked for"))
        return ways


def suggest_devices(graph, *, devices, device_capacity, reserve=0, memory="liveness+kv", balance="flops"):
    """The fewest devices and the least device memory that hold `graph` as stages; each planned before returned.

    Parameters
    ----------
    graph : networkx.DiGraph
        The model graph (as `cachefit.stages` takes it).
    devices : int
        The number of devices asked for.
    device_capacity, reserve : int or str
        As in `cachefit.stages`.
    memory, balance : str
        As in `cachefit.stages` (the stage level's memory model).

    Returns
    -------
    DeviceAdvice

    Notes
    -----
    The least device memory for `devices` stages is the smallest largest
    stage among the splits of the node order into `devices` runs: a stage
    plan balanced by bytes on an unbounded device finds it (``dp`` is exact
    for the node order, table copies of tied nodes included), and a stage
    plan with exactly that many bytes (plus the reserve) confirms it.  The
    fewest devices start from the stage plan's greedy count and grow until a
    stage plan fits (at most the number of nodes).
    """
    from .memory import alone_sizes, group_sizes
    from .stages import stages, _stage_capacity

    capacity = _stage_capacity(device_capacity, reserve)
    total = parse_capacity(device_capacity, name="device_capacity")
    reserved = total - capacity
    nodes = list(graph)
    alone = alone_sizes(as_table(graph), memory)
    largest = int(np.argmax(alone)) if len(alone) else 0
    oversize = nodes[largest] if len(alone) and int(alone[largest]) > capacity else None
    plans = []
    fewest = None
    count = 1
    while oversize is None and count <= len(nodes):
        plan = stages(graph, devices=count, device_capacity=total, reserve=reserved, memory=memory, balance=balance)
        if plan.ok:
            fewest = count
            plans.append(plan)
            break
        floor = plan.stats.get("min_devices")
        if floor is None:
            break
        count = max(count + 1, floor)
    least = None
    if devices <= len(nodes):
        whole = int(group_sizes(graph, [nodes], memory=memory)[0])
        unbounded = stages(graph, devices=devices, device_capacity=2 * whole + reserved + 1, reserve=reserved,
                           memory=memory, balance="memory")
        if unbounded.ok:
            # The exact least, then a round figure within 1 % above it, each confirmed by a stage plan.
            exact = unbounded.bottleneck + reserved
            for candidate in (exact, parse_bytes(capacity_text(exact))):
                plan = stages(graph, devices=devices, device_capacity=candidate, reserve=reserved, memory=memory,
                              balance=balance)
                if not plan.ok:
                    break
                least = candidate
                plans.append(plan)
    return DeviceAdvice(fewest, least, oversize, int(alone[largest]) if oversize else 0, tuple(plans))
