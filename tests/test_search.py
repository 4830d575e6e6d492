import sys

import networkx as nx
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from cachefit import LayerTable, check, group_sizes
from cachefit.instances.families import generate
from cachefit.solvers import SOLVERS, auto, brute, search
from cachefit.solvers._schedule import ListScheduler
from cachefit.solvers._schedule import Incumbent
from cachefit.testing import dags

MODELS = ["additive", "liveness"]
SCALES = [100, 10**8, 10**10, 10**12]


def _bins(items, name="bins"):
    """Nodes without edges: plain bin packing."""
    graph = nx.DiGraph(name=name)
    for index, item in enumerate(items):
        graph.add_node(str(index), weight_bytes=item, activation_bytes=0, buffer_bytes=0)
    return graph


def _diamond():
    graph = nx.DiGraph()
    for name, weight in zip("abcd", (10, 30, 50, 20)):
        graph.add_node(name, weight_bytes=weight, activation_bytes=0, buffer_bytes=0)
    graph.add_edges_from([("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")])
    return graph


class TestSearch:
    def test_registered(self):
        assert SOLVERS["search"] is search

    def test_beats_the_given_order_on_a_diamond(self):
        plan = search(_diamond(), 60, memory="additive")
        assert plan.k == 2 and plan.status == "OPTIMAL" and check(plan).ok
        assert plan.stats["stop_reason"] == "the search over cuts proved k"
        heuristic = search(_diamond(), 60, memory="additive", cuts=False)
        assert heuristic.k == 2 and heuristic.stats["stop_reason"] == "k meets the lower bound"

    def test_stalls_when_the_bound_is_not_met(self):
        # L2 says 2 bins for five 4s in bins of 10; only two 4s share a bin, so 3 is optimal and unproved.
        plan = search(_bins([4] * 5), 10, memory="additive", stall_attempts=50, cuts=False)
        assert plan.k == 3 and plan.lower_bound == 2 and plan.status == "FEASIBLE"
        assert plan.stats["stop_reason"] == "stalled: 50 window repackings in a row without fewer groups"
        assert plan.stats["windows"] == 50

    def test_time_limit_is_a_stop_reason(self):
        plan = search(_bins([4] * 5), 10, memory="additive", time_limit_s=1e-9, cuts=False)
        assert plan.ok and plan.stats["stop_reason"] == "time limit"

    def test_oversize_node_is_infeasible(self):
        plan = search(_bins([4, 11]), 10, memory="additive")
        assert plan.status == "INFEASIBLE" and "'1'" in plan.reason

    def test_explicit_k(self):
        plan = search(_diamond(), 60, memory="additive", k=3)
        assert plan.k == 3 and check(plan).ok
        assert search(_diamond(), 60, memory="additive", k=1).status == "INFEASIBLE"

    def test_empty_graph(self):
        plan = search(nx.DiGraph(), 10)
        assert plan.k == 0 and plan.status == "OPTIMAL"

    def test_deterministic_for_a_seed(self):
        graph, capacity = generate("dag-layered", 120, seed=3, capacity="tight", memory="liveness")
        first = search(graph, capacity, seed=5, time_limit_s=60, stall_attempts=300, cuts=False)
        second = search(graph, capacity, seed=5, time_limit_s=60, stall_attempts=300, cuts=False)
        assert first.partitions == second.partitions and first.stats["windows"] == second.stats["windows"]

    @pytest.mark.parametrize("family", ["dag-layered", "dag-series-parallel"])
    @pytest.mark.parametrize("memory", MODELS)
    def test_no_worse_than_greedy_on_the_given_order(self, family, memory):
        graph, capacity = generate(family, 200, seed=1, capacity="tight", memory=memory)
        plan = search(graph, capacity, memory=memory, stall_attempts=200)
        assert check(plan).ok
        assert plan.k <= SOLVERS["greedy"](graph, capacity, memory=memory).k


@settings(max_examples=25, deadline=None, derandomize=True)
@given(data=st.data(), memory=st.sampled_from(MODELS), fraction=st.sampled_from([1.0, 0.5, 1 / 3]),
       seed=st.integers(0, 3))
def test_window_repacking_keeps_every_size_exact(data, memory, fraction, seed):
    # After any number of repackings the incumbent's sizes are the checker's sizes of its groups.
    graph, capacity = generate("dag-layered", data.draw(st.integers(20, 80)), seed=seed, capacity="tight",
                               memory=memory)
    table = LayerTable.from_graph(graph)
    packer = ListScheduler(table, capacity, memory, fraction)
    rng = np.random.default_rng(seed)
    packed = packer.pack(list(range(table.n)), {}, [-v for v in range(table.n)])
    if packed is None:
        return
    incumbent = Incumbent(packer, *packed)
    for _ in range(30):
        width = int(rng.integers(1, min(4, incumbent.k) + 1))
        start = int(rng.integers(0, incumbent.k - width + 1))
        incumbent.try_window(start, width, rng.random(table.n).tolist(), str(rng.choice(["fit", "free", "strict"])))
    partitions = [[table.ids[v] for v in group] for group in incumbent.groups]
    assert group_sizes(graph, partitions, memory=memory, chunk_fraction=fraction) == incumbent.sizes
    assert max(incumbent.sizes) <= capacity
    assert sorted(v for group in incumbent.groups for v in group) == list(range(table.n))


@settings(max_examples=100, deadline=None, derandomize=True)
@given(data=st.data(), scale=st.sampled_from(SCALES), memory=st.sampled_from(MODELS),
       fraction=st.sampled_from([1.0, 0.5, 1 / 3]))
def test_against_brute_no_false_claim(data, scale, memory, fraction):
    capacity = scale + data.draw(st.integers(0, 7))
    graph = data.draw(dags(max_nodes=9, capacity=capacity))
    oracle = brute(graph, capacity, memory=memory, chunk_fraction=fraction)
    plan = search(graph, capacity, memory=memory, chunk_fraction=fraction, stall_attempts=40,
                  cuts=data.draw(st.booleans()))
    if not oracle.ok:
        assert not plan.ok
        return
    if not plan.ok:  # every construction overflowed: allowed only under liveness, never a false claim
        assert memory == "liveness" and plan.status == "UNKNOWN"
        return
    assert check(plan).ok
    assert plan.lower_bound <= oracle.k <= plan.k
    if plan.status == "OPTIMAL":
        assert plan.k == oracle.k


class TestAuto:
    def test_stops_when_the_search_meets_the_bound(self):
        plan = auto(_diamond(), 60, memory="additive")
        assert plan.solver == "search" and plan.status == "OPTIMAL"
        assert plan.stats["auto"] == "search: k meets the lower bound"
        assert plan.stats["stop_reason"] == "the search over cuts proved k"

    def test_says_why_it_stopped_when_a_gap_is_left_to_cpsat(self, monkeypatch):
        # As on a wide graph: the search over cuts gives up, the heuristics stall above the bound.
        module = sys.modules["cachefit.solvers.search"]  # the package's `search` attribute is the function
        monkeypatch.setattr(module, "fewest_groups", lambda *args, **kwargs: None)
        plan = auto(_bins([4] * 5), 10, memory="additive", time_limit_s=5)
        assert check(plan).ok and plan.k == 3
        assert plan.stats["auto"].startswith("search (stalled")
        # cpsat proves 3 on five items, closing the gap the bounds left.
        assert plan.status == "OPTIMAL" and plan.lower_bound == 3
        assert plan.stats["stop_reason"] == "k meets the lower bound"

    def test_chain_goes_to_dp(self):
        plan = auto(_chain(), 100)
        assert plan.stats["auto"] == "dp (chain)" and plan.stats["stop_reason"] == "dp is exact for a chain"

    def test_bad_time_limit_is_bad_input(self):
        with pytest.raises(ValueError, match="`time_limit_s` must be a positive finite number of seconds"):
            auto(_diamond(), 60, time_limit_s=-1)


def _chain():
    graph = nx.DiGraph()
    for name in "ab":
        graph.add_node(name, weight_bytes=40, activation_bytes=0, buffer_bytes=0)
    graph.add_edge("a", "b")
    return graph


def test_auto_keeps_cpsats_proof_that_no_plan_exists(monkeypatch):
    # When the search finds nothing and cpsat proves infeasibility, auto reports the proof.
    from cachefit.result import Status
    from cachefit.solvers._common import Problem, no_plan

    module = sys.modules["cachefit.solvers"]

    def unknown(graph, capacity, **options):
        problem = Problem.make(graph, capacity, **{k: v for k, v in options.items() if k != "deadline"})
        return no_plan(problem, "search", Status.UNKNOWN, "nothing found")

    def infeasible(graph, capacity, **options):
        problem = Problem.make(graph, capacity, **{k: v for k, v in options.items() if k != "deadline"})
        return no_plan(problem, "cpsat", Status.INFEASIBLE, "proved")

    monkeypatch.setattr(module, "search", unknown)
    monkeypatch.setattr(module, "cpsat", infeasible)
    plan = auto(_diamond(), 60, memory="additive", time_limit_s=5)
    assert plan.status == "INFEASIBLE" and plan.solver == "cpsat"
