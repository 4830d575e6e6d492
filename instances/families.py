"""Instance families for benchmarks: seeded random chains and DAGs, real models, torch modules.

``generate(family, n, *, seed, capacity="tight")`` returns ``(instance,
capacity_bytes)``: a `LayerTable` (chain families, which reach 10⁶ layers
without building a networkx graph) or a `networkx.DiGraph` (DAG families),
and a capacity chosen for that instance.  The same arguments always give the
same instance, byte for byte.

Families (`FAMILIES` maps each name to a `Family` record):

``chain-uniform``
    weights uniform in [1, 64] MiB, activations uniform in [0, 8] MiB.
``chain-lognormal``
    heavy-tailed: weights and activations log-normal (σ = 1.5).
``chain-spiky``
    a few huge layers (100× the typical weight) among small ones.
``dag-layered``
    random layered DAGs: layers of width 1–8, each node fed by 1–3 nodes of
    the previous layer, occasional skip edges from older layers.
``dag-series-parallel``
    residual blocks (a path plus a skip edge into an add node) and branchy
    blocks (2–4 parallel paths joined by a concat node) in sequence.
``model-op``
    the operator-level graph of an embedded real model
    (`cachefit.instances.load` with ``granularity="op"``): the model whose
    graph size is nearest `n`, at a batch and sequence length drawn from
    the seed (capped at the model's context length); the instance's own
    node count is reported, not `n`.
``dag-torch``
    a small residual/branchy torch module imported with
    `cachefit.graphs.from_torch` (needs torch and that importer; see
    `available`).

Chains default to the ``additive`` memory model (the seed paper's formula,
and the objective the peers' sequence partitioners balance), DAG families to
``liveness``; `generate`'s `memory` overrides it, and the capacity is computed
under the model used.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import networkx as nx
import numpy as np

from ..errors import InputError
from ..memory import Intervals, LayerTable, check_memory

__all__ = ["FAMILIES", "Family", "CAPACITY_MODES", "generate", "available", "capacity_for"]

logger = logging.getLogger(__name__)

MiB = 1 << 20

#: The two capacity settings of every instance.
CAPACITY_MODES = ("tight", "loose")


@dataclass(frozen=True)
class Family:
    """An instance family.

    Attributes
    ----------
    name : str
    kind : {"chain", "dag"}
        Chains are returned as `LayerTable`, DAGs as `networkx.DiGraph`.
    memory : str
        The memory model the family is benchmarked under by default.
    description : str
    """

    name: str
    kind: str
    memory: str
    description: str


FAMILIES = {
    family.name: family
    for family in (
        Family("chain-uniform", "chain", "additive", "chain, weights U[1, 64] MiB, activations U[0, 8] MiB"),
        Family("chain-lognormal", "chain", "additive", "chain, heavy-tailed log-normal weights and activations"),
        Family("chain-spiky", "chain", "additive", "chain, a few huge layers (100x) among small ones"),
        Family("dag-layered", "dag", "liveness", "random layered DAG, layer width 1-8, skip edges"),
        Family("dag-series-parallel", "dag", "liveness", "residual and branchy blocks in sequence"),
        Family("model-op", "dag", "liveness", "op-level graph of an embedded real model, batch/seq from the seed"),
        Family("dag-torch", "dag", "liveness", "small residual/branchy torch module via graphs.from_torch"),
    )
}


def available(family):
    """Whether `family` can be generated here: ``(True, "")`` or ``(False, reason)``.

    Only ``dag-torch`` has requirements: torch and `cachefit.graphs.from_torch`.

    Examples
    --------
    >>> available("chain-uniform")
    (True, '')
    """
    _family(family)
    if family != "dag-torch":
        return True, ""
    from .. import graphs
    if getattr(graphs, "from_torch", None) is None:
        return False, "cachefit.graphs.from_torch is not available in this version"
    try:
        import torch  # noqa: F401
    except ImportError:
        return False, "torch is not installed (extra `torch`)"
    return True, ""


def _family(family):
    if family not in FAMILIES:
        raise InputError(f"`family` must be one of {', '.join(FAMILIES)}, got {family!r}")
    return FAMILIES[family]


def generate(family, n, *, seed, capacity="tight", memory=None):
    """A seeded instance of `family` with about `n` nodes, and its capacity.

    Parameters
    ----------
    family : str
        A key of `FAMILIES`.
    n : int
        Number of nodes (exact for random families; ``model-op`` takes the
        real model nearest in size, ``dag-torch`` the module depth nearest).
    seed : int
        Seed of `numpy.random.default_rng`; same seed, same instance.
    capacity : {"tight", "loose"}
        ``"tight"`` aims at about n/8 groups, ``"loose"`` at about √n/2
        (see `capacity_for`).
    memory : str, optional
        The memory model (a name in `cachefit.memory.MODELS`) the capacity
        is computed for (default: the family's).

    Returns
    -------
    instance : LayerTable or networkx.DiGraph
        A `LayerTable` for chain families, a DiGraph for DAG families.
    capacity_bytes : int

    Raises
    ------
    InputError
        Unknown `family` or `capacity`, `n` < 1, or a family that is not
        `available` here.

    Notes
    -----
    Generation is O(n) numpy work for chains and O(n + e) for DAGs.

    Examples
    --------
    >>> table, cap = generate("chain-uniform", 1000, seed=0)
    >>> table.n, table.is_chain
    (1000, True)
    >>> again, cap_again = generate("chain-uniform", 1000, seed=0)
    >>> bool((again.weight == table.weight).all()) and cap == cap_again
    True
    >>> graph, _ = generate("dag-layered", 50, seed=1)
    >>> graph.number_of_nodes(), nx.is_directed_acyclic_graph(graph)
    (50, True)
    """
    spec = _family(family)
    if capacity not in CAPACITY_MODES:
        raise InputError(f"`capacity` must be one of {', '.join(map(repr, CAPACITY_MODES))}, got {capacity!r}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise InputError(f"`n` must be a positive integer, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise InputError(f"`seed` must be an integer, got {seed!r}")
    memory = check_memory(spec.memory if memory is None else memory)
    ok, reason = available(family)
    if not ok:
        raise InputError(f"`family` {family!r} is not available: {reason}")
    n, seed = int(n), int(seed)
    rng = np.random.default_rng([seed, _FAMILY_SALT[family]])
    instance = _BUILDERS[family](n, rng)
    table = instance if isinstance(instance, LayerTable) else LayerTable.from_graph(instance)
    return instance, capacity_for(table, capacity, memory=memory)


def capacity_for(table, mode, *, memory):
    """The capacity of an instance: ``max(C_min, ⌈total / target⌉)``.

    ``C_min`` is the largest size of a single node alone at its place in the
    node order (so a one-node-per-group plan exists in that order: every
    instance is feasible); ``total`` is Σ (weight + activation + buffer);
    ``target`` is max(3, n // 8) groups for ``"tight"`` and
    max(2, round(√n / 2)) for ``"loose"``.  The resulting minimum k is near
    the target (not equal: group sizes are lumpy, liveness adds live
    activations, and C_min may dominate).

    Examples
    --------
    >>> table = LayerTable.chain([10, 10, 10, 10])
    >>> capacity_for(table, "tight", memory="additive"), capacity_for(table, "loose", memory="additive")
    (14, 20)
    """
    n = table.n
    # Each node alone at its position s, the run [s, s + 1) (chunk fraction 1): under
    # liveness that counts every earlier output still live at s, not only its inputs.
    singles = Intervals(table, memory).sizes(np.arange(n + 1))
    minimum = int(singles.max()) if n else 1
    total = int(table.weight.sum() + table.activation.sum() + table.buffer.sum())
    target = max(3, n // 8) if mode == "tight" else max(2, round(math.sqrt(n) / 2))
    return max(minimum, -(-total // target), 1)


# -- chains ---------------------------------------------------------------------------------------

def _chain_uniform(n, rng):
    weight = rng.integers(1 * MiB, 64 * MiB, size=n, endpoint=True, dtype=np.int64)
    activation = rng.integers(0, 8 * MiB, size=n, endpoint=True, dtype=np.int64)
    return LayerTable.chain(weight, activation)


def _lognormal_bytes(rng, median, sigma, size):
    values = rng.lognormal(mean=math.log(median), sigma=sigma, size=size)
    return np.minimum(np.ceil(values), 1 << 40).astype(np.int64)


def _chain_lognormal(n, rng):
    weight = _lognormal_bytes(rng, 4 * MiB, 1.5, n)
    activation = _lognormal_bytes(rng, 1 * MiB, 1.5, n)
    return LayerTable.chain(weight, activation)


def _chain_spiky(n, rng):
    weight = rng.integers(MiB // 2, 4 * MiB, size=n, endpoint=True, dtype=np.int64)
    activation = rng.integers(0, MiB, size=n, endpoint=True, dtype=np.int64)
    huge = max(1, min(n // 50, 3 + n // 10_000))
    positions = rng.choice(n, size=huge, replace=False)
    weight[positions] = rng.integers(150 * MiB, 250 * MiB, size=huge, endpoint=True, dtype=np.int64)
    return LayerTable.chain(weight, activation)


# -- DAGs -----------------------------------------------------------------------------------------

def _add_node(graph, rng, name, *, weight_median=4 * MiB, activation_median=MiB, op="op"):
    graph.add_node(name, op=op,
                   weight_bytes=int(_lognormal_bytes(rng, weight_median, 1.0, 1)[0]),
                   activation_bytes=int(_lognormal_bytes(rng, activation_median, 0.7, 1)[0]),
                   buffer_bytes=int(rng.integers(0, MiB // 4, endpoint=True)) if rng.random() < 0.2 else 0)


def _dag_layered(n, rng):
    graph = nx.DiGraph(name=f"dag-layered-{n}", source="cachefit.instances.families")
    layers, count = [], 0
    while count < n:
        width = min(int(rng.integers(1, 8, endpoint=True)), n - count)
        layers.append([f"n{count + i}" for i in range(width)])
        count += width
    for depth, layer in enumerate(layers):
        for node in layer:
            _add_node(graph, rng, node)
        if depth == 0:
            continue
        previous = layers[depth - 1]
        for node in layer:
            fan_in = int(rng.integers(1, min(3, len(previous)), endpoint=True))
            for source in rng.choice(len(previous), size=fan_in, replace=False):
                graph.add_edge(previous[int(source)], node)
            if depth >= 2 and rng.random() < 0.15:
                older = layers[int(rng.integers(0, depth - 1))]
                graph.add_edge(older[int(rng.integers(len(older)))], node)
        for source in previous:  # every output is consumed by the next layer
            if graph.out_degree(source) == 0:
                graph.add_edge(source, layer[int(rng.integers(len(layer)))])
    return graph


def _dag_series_parallel(n, rng):
    graph = nx.DiGraph(name=f"dag-series-parallel-{n}", source="cachefit.instances.families")
    names = iter(f"n{i}" for i in range(n))
    count = 0

    def new(op):
        nonlocal count
        node = next(names)
        _add_node(graph, rng, node, op=op)
        count += 1
        return node

    tail = new("input")
    while count < n:
        left = n - count
        kind = rng.choice(["residual", "branchy", "single"], p=[0.45, 0.35, 0.2])
        if kind == "residual" and left >= 3:
            length = int(rng.integers(1, min(4, left - 1), endpoint=True))
            head = tail
            for _ in range(length):
                node = new("layer")
                graph.add_edge(head, node)
                head = node
            join = new("add")
            graph.add_edge(head, join)
            graph.add_edge(tail, join)  # the skip connection
            tail = join
        elif kind == "branchy" and left >= 3:
            branches = int(rng.integers(2, 4, endpoint=True))
            ends = []
            for _ in range(branches):
                if n - count < 2:
                    break
                length = int(rng.integers(1, 3, endpoint=True))
                head = tail
                for _ in range(min(length, n - count - 1)):
                    node = new("branch")
                    graph.add_edge(head, node)
                    head = node
                ends.append(head)
            join = new("concat")
            for end in ends:
                graph.add_edge(end, join)
            tail = join
        else:
            node = new("layer")
            graph.add_edge(tail, node)
            tail = node
    return graph


#: (batch, seq_len) settings drawn for ``model-op`` instances.
MODEL_SHAPES = ((1, 512), (1, 2048), (4, 2048), (8, 4096))


def _model_sizes():
    from . import load, names
    sizes = {}
    for name in names():
        sizes[name] = load(name, granularity="op", batch=1, seq_len=128).number_of_nodes()
    return sizes


_MODEL_SIZES = None


def _model_op(n, rng):
    global _MODEL_SIZES
    from . import config, load
    if _MODEL_SIZES is None:
        _MODEL_SIZES = _model_sizes()
    distance = {name: abs(math.log(size) - math.log(n)) for name, size in _MODEL_SIZES.items() if size >= 8}
    best = min(distance.values())
    nearest = sorted(name for name, value in distance.items() if value <= best + 1e-9 or
                     abs(_MODEL_SIZES[name] - n) <= 0.05 * n)
    name = nearest[int(rng.integers(len(nearest)))]
    batch, seq_len = MODEL_SHAPES[int(rng.integers(len(MODEL_SHAPES)))]
    settings = config(name)
    context = settings.get("max_position_embeddings") or settings.get("n_positions")
    if context:  # never longer than the model's context (learned position tables refuse it)
        seq_len = min(seq_len, int(context))
    return load(name, granularity="op", batch=batch, seq_len=seq_len)


def _dag_torch(n, rng):
    import torch
    from torch import nn

    from .. import graphs

    width = int(rng.choice([64, 128, 256]))

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(width)
            self.up = nn.Linear(width, 2 * width)
            self.act = nn.GELU()
            self.down = nn.Linear(2 * width, width)

        def forward(self, x):
            return x + self.down(self.act(self.up(self.norm(x))))

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.left = nn.Linear(width, width // 2)
            self.right = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width // 2))

        def forward(self, x):
            return torch.cat([self.left(x), self.right(x)], dim=-1)

    kinds = rng.choice(["residual", "branchy"], size=max(1, n // 5), p=[0.6, 0.4])
    blocks = nn.Sequential(*[Residual() if kind == "residual" else Branchy() for kind in kinds])
    batch = int(rng.choice([8, 32, 128]))
    return graphs.from_torch(blocks, (torch.zeros(batch, width),))


_BUILDERS = {
    "chain-uniform": _chain_uniform,
    "chain-lognormal": _chain_lognormal,
    "chain-spiky": _chain_spiky,
    "dag-layered": _dag_layered,
    "dag-series-parallel": _dag_series_parallel,
    "model-op": _model_op,
    "dag-torch": _dag_torch,
}

# A fixed number per family so two families never share a random stream for one seed.
_FAMILY_SALT = {name: index for index, name in enumerate(FAMILIES)}
