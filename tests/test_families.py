"""Tests of cachefit.instances.families: determinism, sizes, DAG-ness, capacities."""

import networkx as nx
import numpy as np
import pytest

import cachefit
from cachefit.errors import InputError
from cachefit.instances import families
from cachefit.instances.families import FAMILIES, available, capacity_for, generate
from cachefit.memory import LayerTable

RANDOM = ["chain-uniform", "chain-lognormal", "chain-spiky", "dag-layered", "dag-series-parallel"]


def _table(instance):
    return instance if isinstance(instance, LayerTable) else LayerTable.from_graph(instance)


def _same(a, b):
    ta, tb = _table(a), _table(b)
    return (ta.ids == tb.ids and all(np.array_equal(getattr(ta, key), getattr(tb, key))
                                     for key in ("weight", "activation", "buffer", "sources", "targets")))


@pytest.mark.parametrize("family", [name for name in FAMILIES if available(name)[0]])
@pytest.mark.parametrize("mode", ["tight", "loose"])
def test_deterministic_for_a_seed(family, mode):
    first, cap_first = generate(family, 40, seed=3, capacity=mode)
    second, cap_second = generate(family, 40, seed=3, capacity=mode)
    assert cap_first == cap_second
    assert _same(first, second)


@pytest.mark.parametrize("family", RANDOM)
def test_seed_changes_the_instance(family):
    first, _ = generate(family, 60, seed=0)
    second, _ = generate(family, 60, seed=1)
    assert not _same(first, second)


@pytest.mark.parametrize("family", RANDOM)
@pytest.mark.parametrize("n", [1, 2, 7, 50, 333])
def test_random_families_have_exactly_n_nodes(family, n):
    instance, capacity = generate(family, n, seed=n)
    table = _table(instance)
    assert table.n == n
    assert isinstance(capacity, int) and capacity > 0


@pytest.mark.parametrize("family", ["chain-uniform", "chain-lognormal", "chain-spiky"])
def test_chains_are_layer_tables(family):
    table, _ = generate(family, 500, seed=0)
    assert isinstance(table, LayerTable) and table.is_chain and table.graph is None
    assert (table.weight >= 0).all() and (table.activation >= 0).all()


@pytest.mark.parametrize("family", ["dag-layered", "dag-series-parallel", "model-op"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dag_families_are_valid_dags(family, seed):
    graph, _ = generate(family, 120, seed=seed)
    assert isinstance(graph, nx.DiGraph)
    assert nx.is_directed_acyclic_graph(graph)
    cachefit.graphs.validate(graph)  # byte attributes and topological insertion order
    assert nx.is_weakly_connected(graph)


def test_layered_dag_width_is_at_most_eight():
    graph, _ = generate("dag-layered", 300, seed=5)
    depth = {}
    for node in graph:  # insertion order is topological
        depth[node] = max((depth[p] + 1 for p in graph.predecessors(node)), default=0)
    widths = np.bincount(list(depth.values()))
    assert widths.max() <= 8


def test_series_parallel_has_skip_and_branch_joins():
    graph, _ = generate("dag-series-parallel", 200, seed=0)
    ops = nx.get_node_attributes(graph, "op")
    joins = [node for node in graph if ops[node] in ("add", "concat")]
    assert joins and all(graph.in_degree(node) >= 2 for node in joins)


def test_model_op_picks_the_real_model_nearest_in_size():
    graph, _ = generate("model-op", 1000, seed=0)
    assert graph.graph["name"] in ("llama-2-70b", "llama-3.1-70b")
    assert graph.graph["granularity"] == "op"
    small, _ = generate("model-op", 150, seed=0)
    assert small.graph["name"] == "gpt2"


@pytest.mark.parametrize("family", [name for name in FAMILIES if available(name)[0]])
@pytest.mark.parametrize("mode", ["tight", "loose"])
def test_every_instance_is_feasible_in_its_order(family, mode):
    instance, capacity = generate(family, 80, seed=2, capacity=mode)
    plan = cachefit.plan(instance, capacity, solver="greedy", memory=FAMILIES[family].memory)
    assert plan.ok, plan.reason
    assert cachefit.check(plan).ok


def test_tight_needs_more_groups_than_loose():
    for family in ("chain-uniform", "dag-layered"):
        tight, cap_tight = generate(family, 400, seed=0, capacity="tight")
        loose, cap_loose = generate(family, 400, seed=0, capacity="loose")
        assert cap_tight < cap_loose
        memory = FAMILIES[family].memory
        k_tight = cachefit.plan(tight, cap_tight, solver="greedy", memory=memory).k
        k_loose = cachefit.plan(loose, cap_loose, solver="greedy", memory=memory).k
        assert k_tight > 2 * k_loose


def test_capacity_is_never_below_the_largest_single_node():
    table = LayerTable.chain([5, 100, 5, 5])
    assert capacity_for(table, "tight", memory="additive") == 100
    assert capacity_for(table, "loose", memory="additive") == 100


def test_large_chain_is_fast_and_exact_size():
    table, capacity = generate("chain-uniform", 200_000, seed=0)
    assert table.n == 200_000 and capacity > 0


def test_memory_defaults_to_the_family_model():
    assert generate("chain-uniform", 50, seed=0)[1] == generate("chain-uniform", 50, seed=0, memory="additive")[1]
    assert generate("dag-layered", 50, seed=0)[1] == generate("dag-layered", 50, seed=0, memory="liveness")[1]


def test_liveness_capacity_covers_live_activations():
    # b and c both consume a's output: under liveness c alone needs its weight, its
    # output and a's output still live, more than any node's weight + activation.
    table = LayerTable.from_graph(cachefit.graphs.from_layers([10, 10, 10]))
    graph = nx.DiGraph()
    for name, weight in (("a", 1), ("b", 1), ("c", 1)):
        graph.add_node(name, weight_bytes=weight, activation_bytes=50, buffer_bytes=0)
    graph.add_edges_from([("a", "b"), ("b", "c"), ("a", "c")])
    live = LayerTable.from_graph(graph)
    assert capacity_for(live, "loose", memory="liveness") >= 1 + 50 + 50 + 50
    assert capacity_for(table, "loose", memory="additive") >= 10


@pytest.mark.parametrize("kwargs, message", [
    ({"family": "nope", "n": 5}, "`family` must be one of"),
    ({"family": "chain-uniform", "n": 0}, "`n` must be a positive integer"),
    ({"family": "chain-uniform", "n": 5, "capacity": "snug"}, "`capacity` must be one of"),
    ({"family": "chain-uniform", "n": 5, "memory": "fancy"}, "`memory` must be one of"),
])
def test_bad_input(kwargs, message):
    with pytest.raises(InputError, match=message):
        generate(seed=0, **kwargs)


def test_torch_family_reports_why_it_is_unavailable(monkeypatch):
    monkeypatch.delattr(cachefit.graphs, "from_torch", raising=False)
    ok, reason = available("dag-torch")
    assert not ok and "from_torch" in reason
    with pytest.raises(InputError, match="`family` 'dag-torch' is not available"):
        generate("dag-torch", 10, seed=0)


def test_torch_family_when_available():
    pytest.importorskip("torch")
    if not available("dag-torch")[0]:
        pytest.skip(available("dag-torch")[1])
    graph, capacity = generate("dag-torch", 30, seed=0)
    assert nx.is_directed_acyclic_graph(graph) and graph.number_of_nodes() >= 10
    assert cachefit.check(cachefit.plan(graph, capacity, solver="greedy")).ok


def test_families_are_documented():
    assert set(FAMILIES) == set(families._BUILDERS)
    for name, family in FAMILIES.items():
        assert family.name == name and family.kind in ("chain", "dag") and family.description
