import importlib

import networkx as nx
import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

from cachefit import InputError, LayerTable, Status, group_sizes
from cachefit.graphs import from_layers
from cachefit.memory import Intervals
from cachefit.solvers import brute, dp, greedy
from cachefit.solvers.dp import balanced_cut
from cachefit.solvers.greedy import greedy_bounds
from cachefit.testing import assert_valid_plan, chains, dags

dp_module = importlib.import_module("cachefit.solvers.dp")  # `cachefit.solvers.dp` is the function

MODELS = ["additive", "liveness"]
FRACTIONS = [1.0, 0.5, 0.25, 1 / 3]


def sum_squares(plan):
    return sum(size * size for size in plan.sizes)


def minimal_certificate(table, plan, memory, fraction):
    """No bottleneck below plan.bottleneck admits plan.k runs: greedy at B - 1 needs more (or none)."""
    intervals = Intervals(table, memory, fraction)
    bounds, _ = greedy_bounds(intervals, plan.bottleneck - 1)
    return bounds is None or len(bounds) - 1 > plan.k


def reference(sizes_of, n, k, capacity):
    """Brute-force DP over contiguous runs: (min bottleneck, min Σ S² at it) for exactly k runs."""
    infinity = (float("inf"), float("inf"))
    best = [[infinity] * (n + 1) for _ in range(k + 1)]
    best[0][0] = (0, 0)
    for j in range(1, k + 1):
        for e in range(j, n + 1):
            for s in range(j - 1, e):
                if best[j - 1][s] == infinity:
                    continue
                size = sizes_of(s, e)
                if size > capacity:
                    continue
                peak, squares = best[j - 1][s]
                best[j][e] = min(best[j][e], (max(peak, size), squares + size * size))
    bottleneck = best[k][n][0]
    # Σ S² among partitions whose runs are all <= bottleneck.
    squares = [[float("inf")] * (n + 1) for _ in range(k + 1)]
    squares[0][0] = 0
    for j in range(1, k + 1):
        for e in range(j, n + 1):
            for s in range(j - 1, e):
                size = sizes_of(s, e)
                if size <= bottleneck:
                    squares[j][e] = min(squares[j][e], squares[j - 1][s] + size * size)
    return bottleneck, squares[k][n]


class TestByHand:
    def test_empty(self):
        plan = dp(nx.DiGraph(), 10)
        assert_valid_plan(nx.DiGraph(), plan)
        assert plan.k == 0 and plan.status == Status.OPTIMAL

    def test_balances_the_fewest_groups(self):
        graph = from_layers([10] * 6)
        plan = dp(graph, 40, memory="additive")
        assert_valid_plan(graph, plan)
        assert plan.sizes == (30, 30) and plan.status == Status.OPTIMAL
        assert greedy(graph, 40, memory="additive").sizes == (40, 20)

    def test_explicit_k(self):
        graph = from_layers([40, 30, 20, 50, 10])
        plan = dp(graph, 100, memory="additive", k=2)
        assert plan.sizes == (70, 80) and plan.status == Status.OPTIMAL and plan.stats["min_k_for_order"] == 2

    def test_exact_fit(self):
        plan = dp(from_layers([25, 25, 25, 25]), 50, memory="additive")
        assert plan.sizes == (50, 50)

    def test_k_below_minimum_of_chain_is_infeasible(self):
        plan = dp(from_layers([30, 30, 30]), 60, memory="additive", k=1)
        assert plan.status == Status.INFEASIBLE and plan.reason == "k = 1 is below the minimum number of groups, 2"

    def test_k_above_nodes_is_infeasible(self):
        plan = dp(from_layers([30, 30, 30]), 60, k=4)
        assert plan.status == Status.INFEASIBLE
        assert plan.reason == "k = 4 non-empty groups need at least 4 nodes; the graph has 3"

    def test_bad_k(self):
        with pytest.raises(InputError, match="`k` must be a positive integer or None, got 0"):
            dp(from_layers([1]), 10, k=0)

    def test_dag_is_feasible_for_its_order(self):
        graph = nx.DiGraph()
        for node, weight in zip("abcd", (10, 30, 50, 20)):
            graph.add_node(node, weight_bytes=weight, activation_bytes=0, buffer_bytes=0)
        graph.add_edges_from([("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")])
        plan = dp(graph, 60, memory="additive")
        assert_valid_plan(graph, plan)
        # The order a, b, c, d needs 3 groups; {a, c} | {b, d} needs 2, so this is not proved.
        assert plan.k == 3 and plan.lower_bound == 2 and plan.status == Status.FEASIBLE
        assert plan.stats["balance_optimal_for_order"] is True
        unknown = dp(graph, 60, memory="additive", k=2)
        assert unknown.status == Status.UNKNOWN and "try solver='cpsat'" in unknown.reason

    def test_dag_node_that_cannot_fit_in_the_given_order(self):
        # a's activation passes through b on its way to c: b cannot fit in this order.
        graph = nx.DiGraph()
        graph.add_node("a", weight_bytes=0, activation_bytes=50, buffer_bytes=0)
        graph.add_node("b", weight_bytes=60, activation_bytes=0, buffer_bytes=0)
        graph.add_node("c", weight_bytes=0, activation_bytes=0, buffer_bytes=0)
        graph.add_edges_from([("a", "c")])
        plan = dp(graph, 100, memory="liveness")
        assert_valid_plan(graph, plan)
        assert plan.status == Status.UNKNOWN and plan.reason.startswith("node 'b' does not fit even alone")


@settings(max_examples=120, deadline=None, derandomize=True)
@given(graph=chains(max_nodes=10, capacity=100), memory=st.sampled_from(MODELS),
       fraction=st.sampled_from(FRACTIONS), k=st.one_of(st.none(), st.integers(1, 11)))
@example(graph=from_layers([25, 25, 25, 25]), memory="additive", fraction=1.0, k=None)
def test_matches_brute_force_on_chains(graph, memory, fraction, k):
    plan = dp(graph, 100, memory=memory, chunk_fraction=fraction, k=k)
    assert_valid_plan(graph, plan)
    if k is not None and k > graph.number_of_nodes():
        assert plan.status == Status.INFEASIBLE
    oracle = brute(graph, 100, memory=memory, chunk_fraction=fraction, k=k)
    assert plan.status == oracle.status
    if oracle.ok:
        assert (plan.k, plan.bottleneck, sum_squares(plan)) == (oracle.k, oracle.bottleneck, sum_squares(oracle))
        if k is None:
            assert plan.lower_bound == oracle.k
    if k is None:
        assert plan.k == greedy(graph, 100, memory=memory, chunk_fraction=fraction).k


@settings(max_examples=25, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(10, 40), memory=st.sampled_from(MODELS),
       fraction=st.sampled_from(FRACTIONS), buffers=st.booleans(), extra=st.integers(0, 6))
def test_matches_reference_dp_on_longer_chains(seed, n, memory, fraction, buffers, extra):
    rng = np.random.default_rng(seed)
    table = LayerTable.chain(rng.integers(0, 60, n), rng.integers(0, 20, n),
                             rng.integers(0, 20, n) if buffers else None)
    intervals = Intervals(table, memory, fraction)
    base = greedy(table, 200, memory=memory, chunk_fraction=fraction)
    k = min(n, base.k + extra)
    plan = dp(table, 200, memory=memory, chunk_fraction=fraction, k=k)
    assert_valid_plan(table, plan)
    bottleneck, squares = reference(intervals.size, n, k, 200)
    assert plan.k == k and plan.bottleneck == bottleneck and sum_squares(plan) == squares
    assert plan.stats["sum_squares_optimal"] is True


@pytest.mark.parametrize("memory,fraction,buffers,mode", [
    ("additive", 1.0, True, "exact"),
    ("liveness", 1.0, False, "exact"),
    ("liveness", 0.25, False, "float"),
    ("liveness", 1 / 3, False, "float"),
    ("liveness", 0.5, True, "search"),
])
def test_long_chain_is_minimal_in_every_probe_mode(memory, fraction, buffers, mode):
    rng = np.random.default_rng(7)
    n = 20_000
    weight = rng.integers(0, 1000, n)
    weight[rng.integers(0, n, 2000)] = 0  # zero-weight stretches
    table = LayerTable.chain(weight, rng.integers(0, 300, n), rng.integers(0, 100, n) if buffers else None)
    plan = dp(table, 400_000, memory=memory, chunk_fraction=fraction, k=64)
    assert plan.stats["probe"] == mode
    assert plan.k == 64 and plan.status == Status.OPTIMAL
    assert minimal_certificate(table, plan, memory, fraction)
    assert list(plan.sizes) == group_sizes(table, plan.partitions, memory=memory, chunk_fraction=fraction)
    assert max(plan.sizes) == plan.bottleneck <= 400_000


def test_sum_squares_budget_falls_back_to_a_bottleneck_optimal_plan(monkeypatch):
    table = LayerTable.chain([5, 1, 1, 1, 1, 1, 1, 1, 1, 5, 1, 1, 1, 1, 1, 1, 1])
    exact = dp(table, 100, memory="additive", k=4)
    monkeypatch.setattr(dp_module, "DP_PAIR_BUDGET", 3)
    fallback = dp(table, 100, memory="additive", k=4)
    assert_valid_plan(table, fallback)
    assert exact.stats["sum_squares_optimal"] is True and fallback.stats["sum_squares_optimal"] is False
    assert fallback.k == exact.k == 4 and fallback.bottleneck == exact.bottleneck
    assert sum_squares(fallback) >= sum_squares(exact)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(graph=dags(min_nodes=1, max_nodes=12, capacity=100), memory=st.sampled_from(MODELS), extra=st.integers(0, 3))
def test_dags_in_the_given_order_balance_no_worse_than_greedy(graph, memory, extra):
    base = greedy(graph, 100, memory=memory)
    if not base.ok:
        return
    k = min(graph.number_of_nodes(), base.k + extra)
    plan = dp(graph, 100, memory=memory, k=k)
    assert_valid_plan(graph, plan)
    assert plan.k == k and plan.bottleneck <= greedy(graph, 100, memory=memory, k=k).bottleneck
    assert plan.status in (Status.FEASIBLE, Status.OPTIMAL)
    order = list(graph.nodes)
    assert [node for group in plan.partitions for node in group] == order  # contiguous runs of the order


def test_balanced_cut_refuses_a_k_the_order_cannot_reach():
    table = LayerTable.chain([30, 30, 30])
    assert balanced_cut(table, 60, memory="additive", k=1) == (None, 2)
    bounds, order_k = balanced_cut(table, 60, memory="additive", k=3)
    assert bounds.tolist() == [0, 1, 2, 3] and order_k == 2


def test_balanced_cut_past_its_deadline_keeps_k_and_the_bottleneck():
    """The Σ S² stage stops at the deadline; k runs at the least bottleneck are kept (only Σ S² may grow)."""
    from cachefit.solvers._deadline import Deadline
    from cachefit.testing import FakeClock

    rng = np.random.default_rng(3)
    table = LayerTable.chain(rng.integers(10**8, 10**11, 400), rng.integers(0, 10**9, 400))
    clock = FakeClock()
    expired = Deadline(1.0, clock=clock)
    clock.now = 2.0
    for k in (40, 150, 399):
        full, _ = balanced_cut(table, 10**12, memory="liveness", k=k)
        cut, _ = balanced_cut(table, 10**12, memory="liveness", k=k, deadline=expired)
        sizes = [group_sizes(table, [[table.ids[v] for v in range(s, e)] for s, e in zip(b[:-1], b[1:])])
                 for b in (full, cut)]
        assert len(cut) == k + 1 and max(sizes[1]) == max(sizes[0])
        assert sum(x * x for x in sizes[1]) >= sum(x * x for x in sizes[0])


def test_split_to_k_splits_the_longest_leftmost_run_first():
    from cachefit.solvers.greedy import split_to_k

    def reference(bounds, k):  # the definition, one split at a time
        bounds = list(bounds)
        while len(bounds) - 1 < k:
            lengths = np.diff(bounds)
            index = int(np.argmax(lengths))
            bounds.insert(index + 1, bounds[index] + int(lengths[index]) // 2)
        return bounds

    rng = np.random.default_rng(0)
    for _ in range(500):
        n = int(rng.integers(1, 80))
        inner = sorted(set(rng.integers(1, n, size=int(rng.integers(0, n))).tolist())) if n > 1 else []
        bounds = [0, *inner, n]
        k = int(rng.integers(len(bounds) - 1, n + 1))
        assert split_to_k(bounds, k).tolist() == reference(bounds, k)
