import networkx as nx
import numpy as np
import pytest

from cachefit import LayerTable, check, group_sizes
from cachefit.instances.families import generate
from cachefit.solvers import brute, search
from cachefit.solvers.cuts import fewest_groups

from test_bounds import random_case, toy_models  # noqa: F401 (a fixture)

#: Cases of the seeded fuzz; a longer run: CACHEFIT_FUZZ_CASES=5000 python -m pytest tests/test_cuts.py
FUZZ_CASES = int(__import__("os").environ.get("CACHEFIT_FUZZ_CASES", "300"))


def _plan_is_valid(table, groups, capacity, memory, fraction):
    part = {v: index for index, group in enumerate(groups) for v in group}
    assert sorted(part) == list(range(table.n))
    assert all(part[u] <= part[v] for u, v in zip(table.sources.tolist(), table.targets.tolist()))
    sizes = group_sizes(table, [[table.ids[v] for v in group] for group in groups], memory=memory,
                        chunk_fraction=fraction)
    assert max(sizes, default=0) <= capacity


def test_seeded_fuzz_the_optimum_is_brute_forces():
    rng = np.random.default_rng(29)
    for _ in range(FUZZ_CASES):
        graph, capacity, memory, fraction = random_case(rng, max_nodes=10)
        oracle = brute(graph, capacity, memory=memory, chunk_fraction=fraction)
        table = LayerTable.from_graph(graph)
        result = fewest_groups(table, capacity, memory=memory, chunk_fraction=fraction)
        if not oracle.ok:
            assert result is None
            continue
        assert result.k == oracle.k == len(result.groups)
        _plan_is_valid(table, result.groups, capacity, memory, fraction)


def test_a_chain():
    result = fewest_groups(LayerTable.chain([40, 30, 20, 50, 10]), 60, memory="additive")
    assert (result.k, result.groups) == (3, [[0], [1, 2], [3, 4]])


def test_liveness_counts_what_passes_through():
    # a's output is consumed by c: with a and c apart, it is live in b's group too.
    graph = nx.DiGraph()
    for node, weight, activation in (("a", 40, 30), ("b", 40, 0), ("c", 40, 0)):
        graph.add_node(node, weight_bytes=weight, activation_bytes=activation, buffer_bytes=0)
    graph.add_edges_from([("a", "b"), ("b", "c"), ("a", "c")])
    table = LayerTable.from_graph(graph)
    assert fewest_groups(table, 100, memory="liveness").k == brute(graph, 100, memory="liveness").k == 3
    assert fewest_groups(table, 100, memory="additive").k == 2


def test_gives_up_on_a_wide_graph_within_its_budget():
    graph, capacity = generate("dag-layered", 300, seed=0, capacity="tight", memory="additive")
    assert fewest_groups(LayerTable.from_graph(graph), capacity, memory="additive", max_arcs=400 * 300) is None


@pytest.mark.parametrize("memory", ["additive", "liveness"])
def test_search_proves_a_series_parallel_graph(memory):
    graph, capacity = generate("dag-series-parallel", 120, seed=2, capacity="tight", memory=memory)
    plan = search(graph, capacity, memory=memory)
    assert plan.status == "OPTIMAL" and plan.stats["stop_reason"] == "the search over cuts proved k"
    assert check(plan).ok and plan.k == plan.lower_bound


def _registry_case(rng):
    """A random case under a model cuts and search never name (a toy or a +kv one), and brute's plan for it."""
    graph, capacity, _, fraction = random_case(rng, max_nodes=9)
    for v in graph.nodes:
        graph.nodes[v]["kv_bytes"] = int(rng.integers(0, capacity // 4 + 1)) if rng.random() < 0.5 else 0
    memory = str(rng.choice(["peak", "swapped", "additive+kv", "liveness+kv"]))
    return graph, capacity, memory, fraction, brute(graph, capacity, memory=memory, chunk_fraction=fraction)


def test_seeded_fuzz_registry_models(toy_models):
    """Group sizes come from the engine: models cuts never names (toys, +kv) get brute's optimum too."""
    rng = np.random.default_rng(31)
    for _ in range(FUZZ_CASES // 3):
        graph, capacity, memory, fraction, oracle = _registry_case(rng)
        table = LayerTable.from_graph(graph)
        result = fewest_groups(table, capacity, memory=memory, chunk_fraction=fraction)
        if not oracle.ok:
            assert result is None
            continue
        assert result.k == oracle.k == len(result.groups), memory
        _plan_is_valid(table, result.groups, capacity, memory, fraction)


def test_search_under_registry_models_makes_no_false_claim(toy_models):
    """search (list scheduling, repacking and dp's recut) under models it never names: valid, never below brute."""
    rng = np.random.default_rng(37)
    for case in range(FUZZ_CASES // 6):
        graph, capacity, memory, fraction, oracle = _registry_case(rng)
        plan = search(graph, capacity, memory=memory, chunk_fraction=fraction, stall_attempts=30, cuts=case % 2 == 0)
        assert check(plan).ok, (memory, check(plan).violations)
        if oracle.ok and plan.ok:
            assert plan.lower_bound <= oracle.k <= plan.k
            assert plan.status != "OPTIMAL" or plan.k == oracle.k
        else:
            assert not plan.ok
