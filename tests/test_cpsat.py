import os
import random
import subprocess
import sys
import time

import networkx as nx
import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

from cachefit import InputError, Status
from cachefit.graphs import from_layers
from cachefit.memory import as_table, scale_activation
from cachefit.solvers import brute, cpsat, dp, greedy
from cachefit.solvers import _cpsat_child as child_module
from cachefit.solvers._cpsat_child import run_contained
from cachefit.solvers._cpsat_model import BuildTimeout, Model
from cachefit.solvers._deadline import Deadline
from cachefit.solvers.cpsat import activation_scale
from cachefit.testing import assert_valid_plan, dags
from test_bounds import toy_models  # noqa: F401 (a fixture)

MODELS = ["additive", "liveness"]


def diamond(weights=(10, 30, 50, 20), activation=0):
    graph = nx.DiGraph()
    for node, weight in zip("abcd", weights):
        graph.add_node(node, weight_bytes=weight, activation_bytes=activation, buffer_bytes=0)
    graph.add_edges_from([("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")])
    return graph


def layered(n, seed, *, per_group=10):
    """A random layered DAG whose capacity fits about `per_group` nodes (same family as the bench)."""
    rng = random.Random(seed)
    graph = nx.DiGraph()
    layers, index = [], 0
    while index < n:
        width = min(rng.randint(2, 6), n - index)
        layers.append(list(range(index, index + width)))
        index += width
    for v in range(n):
        graph.add_node(str(v), weight_bytes=rng.randint(1, 1000), activation_bytes=rng.randint(1, 200),
                       buffer_bytes=rng.randint(0, 100))
    for depth in range(1, len(layers)):
        for v in layers[depth]:
            for u in rng.sample(layers[depth - 1], min(len(layers[depth - 1]), rng.randint(1, 3))):
                graph.add_edge(str(u), str(v))
    return graph, per_group * 650


class TestByHand:
    def test_beats_the_given_order(self):
        graph = diamond()
        plan = cpsat(graph, 60, memory="additive", workers=1)
        assert_valid_plan(graph, plan)
        assert plan.k == 2 and plan.status == Status.OPTIMAL and plan.partitions == (("a", "c"), ("b", "d"))
        assert dp(graph, 60, memory="additive").k == 3

    def test_liveness_counts_activations_passing_through(self):
        # a's output goes to d: it is live in every group from a's to d's.
        graph = diamond(weights=(10, 30, 30, 10), activation=10)
        plan = cpsat(graph, 60, memory="liveness", workers=1)
        assert_valid_plan(graph, plan)
        oracle = brute(graph, 60, memory="liveness")
        assert (plan.k, plan.bottleneck) == (oracle.k, oracle.bottleneck)

    def test_explicit_k_is_balanced_and_proved(self):
        graph = from_layers([10] * 6)
        plan = cpsat(graph, 60, memory="additive", k=3, workers=1)
        assert plan.sizes == (20, 20, 20) and plan.status == Status.OPTIMAL
        assert plan.stats["bottleneck_optimal"] is True

    def test_k_below_lower_bound_is_infeasible(self):
        plan = cpsat(from_layers([30, 30, 30]), 60, memory="additive", k=1, workers=1)
        assert plan.status == Status.INFEASIBLE and plan.reason == "k = 1 is below the minimum number of groups, 2"

    def test_k_below_the_optimum_is_proved_infeasible(self):
        # Every bound says 2 groups; the search proves 3 (found by brute force over small DAGs).
        graph = nx.DiGraph()
        for node, weight in enumerate((50, 40, 50, 20, 40)):
            graph.add_node(str(node), weight_bytes=weight, activation_bytes=0, buffer_bytes=0)
        graph.add_edges_from([("0", "4"), ("1", "2"), ("2", "3"), ("2", "4"), ("3", "4")])
        best = cpsat(graph, 100, memory="additive", workers=1)
        assert best.k == 3 and best.status == Status.OPTIMAL and best.stats["phase1"] == "OPTIMAL"
        plan = cpsat(graph, 100, memory="additive", k=2, workers=1)
        assert plan.status == Status.INFEASIBLE
        assert plan.reason == "no valid grouping has exactly k = 2 groups within the capacity"

    def test_bad_workers(self):
        with pytest.raises(InputError, match="`workers` must be a positive integer or None, got 0"):
            cpsat(from_layers([1]), 10, workers=0)

    def test_chunk_fraction_without_exact_scaling_falls_back_to_the_hint(self):
        # 0.1's float is 3602879701896397 / 2^55: den·C overflows int64 for any C above 127 bytes.
        graph = diamond(weights=(1000, 3000, 5000, 2000), activation=1000)
        plan = cpsat(graph, 7000, memory="liveness", chunk_fraction=0.1, workers=1)
        assert_valid_plan(graph, plan)
        assert "no exact small-integer scaling" in plan.stats["fallback"]
        assert plan.status == (Status.OPTIMAL if plan.k == plan.lower_bound else Status.FEASIBLE)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(graph=dags(max_nodes=9, capacity=100), memory=st.sampled_from(MODELS),
       fraction=st.sampled_from([1.0, 0.5, 1 / 3]), k=st.one_of(st.none(), st.none(), st.integers(1, 9)))
@example(graph=diamond(), memory="additive", fraction=1.0, k=None)
def test_matches_brute_force(graph, memory, fraction, k):
    plan = cpsat(graph, 100, memory=memory, chunk_fraction=fraction, k=k, workers=1, time_limit_s=20)
    assert_valid_plan(graph, plan)
    if k is not None and k > graph.number_of_nodes():
        assert plan.status == Status.INFEASIBLE
        return
    oracle = brute(graph, 100, memory=memory, chunk_fraction=fraction, k=k)
    assert plan.status == oracle.status  # small instances are solved to optimality well within the limit
    if oracle.ok:
        assert plan.k == oracle.k and plan.lower_bound <= plan.k
        assert plan.stats["bottleneck_optimal"] is True and plan.bottleneck == oracle.bottleneck


@settings(max_examples=8, deadline=None, derandomize=True)
@given(graph=dags(min_nodes=15, max_nodes=30, capacity=100, edge_probability=0.15), memory=st.sampled_from(MODELS))
def test_never_worse_than_greedy_on_larger_dags(graph, memory):
    plan = cpsat(graph, 100, memory=memory, workers=2, time_limit_s=2)
    base = greedy(graph, 100, memory=memory)
    assert_valid_plan(graph, plan)
    if base.ok:
        assert plan.ok and plan.k <= base.k
        assert plan.lower_bound <= plan.k


def test_timeout_returns_a_valid_plan_with_a_bound():
    graph, capacity = layered(200, 2)  # hint k = 21, bounds 20: not settled within a second
    plan = cpsat(graph, capacity, memory="additive", time_limit_s=1, workers=2)
    assert_valid_plan(graph, plan)
    assert plan.ok and plan.lower_bound <= plan.k
    assert plan.stats["gap"] == plan.k - plan.lower_bound
    assert plan.status == (Status.OPTIMAL if plan.stats["gap"] == 0 else Status.FEASIBLE)


def test_tiny_time_limit_never_raises():
    graph, capacity = layered(300, 1)
    plan = cpsat(graph, capacity, memory="liveness", time_limit_s=0.01, workers=1)
    assert_valid_plan(graph, plan)
    assert plan.ok and plan.lower_bound <= plan.k


def test_deterministic_for_a_fixed_seed_and_worker_count():
    graph, capacity = layered(14, 3, per_group=5)  # fewest groups 4; k = 5 is proved in about a second
    runs = [cpsat(graph, capacity, memory="liveness", k=5, seed=5, workers=2, time_limit_s=30) for _ in range(2)]
    assert runs[0].stats["bottleneck_optimal"] is True
    assert runs[0].partitions == runs[1].partitions


def test_groups_run_in_order_and_nodes_are_topological_within_groups():
    graph, capacity = layered(30, 2, per_group=5)
    plan = cpsat(graph, capacity, memory="liveness", workers=2, time_limit_s=1)
    assert_valid_plan(graph, plan)
    order = {node: index for index, node in enumerate(graph.nodes)}
    for group in plan.partitions:
        assert list(group) == sorted(group, key=order.get)
    group_of = {node: index for index, group in enumerate(plan.partitions) for node in group}
    assert all(group_of[u] <= group_of[v] for u, v in graph.edges)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(fraction=st.sampled_from([1.0, 0.5, 0.25, 0.75, 1 / 3, 2 / 3, 0.2, 0.3, 0.1, 1 / 7]),
       x=st.integers(0, 10**12))
def test_activation_scale_is_exact(fraction, x):
    scale = activation_scale(fraction, 10**12, 10**9)
    if scale is None:
        return
    numerator, denominator = scale
    assert -((-x * numerator) // denominator) == scale_activation(x, fraction)


def test_activation_scale_examples():
    assert activation_scale(0.75, 10**12, 10**9) == (3, 4)
    assert activation_scale(1 / 3, 10**12, 10**9) == (1, 3)
    assert activation_scale(0.1, 10**12, 10**9) is None
    # 1/3's float is just below 1/3: equal up to 2^54, and cpsat's check refuses larger totals.
    assert activation_scale(1 / 3, 2**60, 10**9) is None


# -- Claims, containment and time limits (issue 10) ------------------------------------------------

def large_coefficient_dag():
    """CP-SAT 9.15's presolve claims 15,464,867,035 optimal here at k = 2; the optimum is 14,464,867,035."""
    graph = nx.DiGraph()
    for node, weight in zip("abcdef", (0, 4464867035, 10**9, 10**10, 6 * 10**9, 58 * 10**8)):
        graph.add_node(node, weight_bytes=weight, activation_bytes=0, buffer_bytes=0)
    graph.add_edges_from([("a", "d"), ("b", "f"), ("e", "f")])
    return graph


class TestClaims:
    def test_large_coefficients_give_the_true_optimum(self):
        graph = large_coefficient_dag()
        plan = cpsat(graph, 21 * 10**9, memory="additive", k=2)
        assert_valid_plan(graph, plan)
        assert plan.bottleneck == 14_464_867_035 == brute(graph, 21 * 10**9, memory="additive", k=2).bottleneck
        assert plan.status == Status.OPTIMAL and plan.stats["bottleneck_optimal"] is True
        assert plan.stats["bottleneck_certificate"].startswith("re-proved")

    def test_a_claim_that_cannot_be_re_proved_is_downgraded(self, monkeypatch):
        cpsat_module = sys.modules["cachefit.solvers.cpsat"]
        monkeypatch.setattr(cpsat_module, "CERTIFY", {**cpsat_module.CERTIFY, "max_time_in_seconds": 1e-9})
        graph = large_coefficient_dag()
        plan = cpsat(graph, 21 * 10**9, memory="additive", k=2, workers=1)
        assert_valid_plan(graph, plan)
        assert plan.status == Status.FEASIBLE and plan.stats["bottleneck_optimal"] is False
        assert plan.stats["bottleneck_certificate"].startswith("not re-proved")
        assert plan.stats["bottleneck_bound"] <= 14_464_867_035

    def test_k_is_certified_by_the_bound_or_a_second_proof(self):
        graph = nx.DiGraph()  # bounds say 2, the optimum is 3 (see test_k_below_the_optimum_is_proved_infeasible)
        for node, weight in enumerate((50, 40, 50, 20, 40)):
            graph.add_node(str(node), weight_bytes=weight * 10**9, activation_bytes=0, buffer_bytes=0)
        graph.add_edges_from([("0", "4"), ("1", "2"), ("2", "3"), ("2", "4"), ("3", "4")])
        plan = cpsat(graph, 100 * 10**9, memory="additive")
        assert plan.k == 3 and plan.status == Status.OPTIMAL and plan.lower_bound == 3
        assert plan.stats["k_certificate"].startswith("re-proved")


ABORT_SCRIPT = """
import networkx as nx, cachefit
weights = [5000000035, 13000000091, 20000000140, 4483884439, 3000000021, 6581608860, 1000000007]
activations = [5000000035, 1000000007, 2385586504, 2072564213, 5976070958, 12000000084, 0]
edges = [(0, 1), (0, 2), (0, 4), (0, 5), (1, 4), (1, 5), (1, 6), (2, 3), (2, 5), (2, 6), (3, 5), (3, 6),
         (4, 6), (5, 6)]
graph = nx.DiGraph()
for v, (w, a) in enumerate(zip(weights, activations)):
    graph.add_node(str(v), weight_bytes=w, activation_bytes=a, buffer_bytes=0)
graph.add_edges_from((str(u), str(v)) for u, v in edges)
plan = cachefit.plan(graph, 25233565468, memory="liveness", chunk_fraction=0.5, solver=SOLVER)
assert cachefit.check(plan).ok, cachefit.check(plan).violations
print(plan.status, plan.k, plan.bottleneck, plan.stats.get("backend_crash", "-"))
"""


class TestContainment:
    @pytest.mark.parametrize("solver", ["auto", "cpsat"])
    def test_the_abort_instance_returns_a_plan_and_the_process_lives(self, solver):
        # With 2 workers OR-Tools 9.15 aborts on this model (Check failed: heuristics.fixed_search != nullptr);
        # the solve runs in a forked child, so the caller gets a plan.  Run in a subprocess to be safe.
        script = ABORT_SCRIPT.replace("solver=SOLVER", f"solver={solver!r}")
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        status, k, bottleneck, _ = done.stdout.split(maxsplit=3)
        assert (status, int(k)) == ("OPTIMAL", 4)
        if solver == "cpsat":  # brute force's bottleneck; auto may pick a solver that does not minimise it
            assert int(bottleneck) == 24192793413

    def test_a_child_that_aborts_is_reported_not_fatal(self):
        result = run_contained(os.abort, 10)
        assert result["status"] == "CRASHED" and "SIGABRT" in result["crash"]

    def test_a_child_that_overruns_is_killed(self, monkeypatch):
        monkeypatch.setattr(child_module, "GRACE_S", 0.2)
        result = run_contained(lambda: time.sleep(30) or {}, 0.1)
        assert result["status"] == "UNKNOWN" and "killed" in result["crash"]

    def test_a_child_is_killed_at_the_callers_deadline(self):
        # kill_after_s (the caller's deadline) comes before the solve's own limit plus GRACE_S
        result = run_contained(lambda: time.sleep(30) or {}, 60, kill_after_s=0.2)
        assert result["status"] == "UNKNOWN" and "was killed" in result["crash"]

    def test_the_answer_comes_back_from_the_child(self):
        assert run_contained(lambda: {"status": "OPTIMAL", "wall_s": 0.0, "pid": os.getpid()}, 10)["pid"] != os.getpid()

    @pytest.mark.parametrize("handling", ["ignored", "reaped by the application"])
    def test_a_crash_is_reported_when_the_application_reaps_children(self, handling):
        """Servers often ignore SIGCHLD or reap every child in a handler: the crash is still only reported."""
        import signal

        def reap_all(*_):
            try:
                while os.waitpid(-1, os.WNOHANG)[0]:
                    pass
            except ChildProcessError:
                pass

        previous = signal.signal(signal.SIGCHLD, signal.SIG_IGN if handling == "ignored" else reap_all)
        try:
            result = run_contained(os.abort, 10)
            answered = run_contained(lambda: {"status": "OPTIMAL", "wall_s": 0.0}, 10)
        finally:
            signal.signal(signal.SIGCHLD, previous)
        assert result["status"] == "CRASHED"
        assert "SIGABRT" in result["crash"] or "collected elsewhere" in result["crash"]
        assert answered["status"] == "OPTIMAL"

    @pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads /proc (Linux)")
    def test_no_child_is_left_behind(self):
        """A child that answered is reaped before the call returns (it was left a zombie until the next call)."""
        pids = [run_contained(lambda: {"status": "OPTIMAL", "wall_s": 0.0, "pid": os.getpid()}, 10)["pid"]
                for _ in range(3)]
        assert not child_module._EXITING
        assert not [pid for pid in pids if os.path.exists(f"/proc/{pid}")]


class TestTimeBudget:
    def test_a_model_that_cannot_be_built_in_time_degrades_to_the_hint(self, monkeypatch):
        monkeypatch.setattr(sys.modules["cachefit.solvers.cpsat"], "BUILD_S_PER_CELL", 1.0)
        graph, capacity = layered(40, 8)  # a hint above the lower bound (on seed 1 the cut bound proves the hint)
        plan = cpsat(graph, capacity, memory="liveness", time_limit_s=2, workers=1)
        assert_valid_plan(graph, plan)
        assert plan.ok and plan.stats["phase1"].startswith("skipped: a model of ~")
        assert plan.status == (Status.OPTIMAL if plan.k == plan.lower_bound else Status.FEASIBLE)

    def test_the_build_stops_at_its_deadline(self):
        graph, capacity = layered(40, 1)
        table = as_table(graph)
        with pytest.raises(BuildTimeout):
            Model(table, capacity, "additive", (1, 1), 5, np.zeros(40, dtype=np.int64), np.full(40, 4), None,
                  exact_k=False, deadline=Deadline(1, start=time.perf_counter() - 2))


def test_registry_models_it_never_names(toy_models):
    """The CP-SAT model is built from the registry's terms: toy and +kv models get valid plans, no false claim."""
    from cachefit import check
    from test_cuts import _registry_case

    rng = np.random.default_rng(41)
    for _ in range(12):
        graph, capacity, memory, fraction, oracle = _registry_case(rng)
        plan = cpsat(graph, capacity, memory=memory, chunk_fraction=fraction, workers=1, time_limit_s=20)
        assert check(plan).ok, (memory, check(plan).violations)
        assert plan.ok == oracle.ok, memory
        if plan.ok:
            assert plan.lower_bound <= oracle.k <= plan.k
            assert plan.status != Status.OPTIMAL or plan.k == oracle.k


def test_stop_reason_does_not_blame_model_size_when_the_hint_meets_the_bound():
    """phase1 skipped because the hint meets the lower bound is a proof, not a model too large for the limit."""
    import cachefit
    from cachefit.instances import families

    graph, capacity = families.generate("dag-layered", 60, seed=2, capacity="tight")
    plan = cachefit.plan(graph, capacity, solver="cpsat", time_limit_s=1)
    assert plan.status == "OPTIMAL"
    assert plan.stats["phase1"] == "skipped: the hint meets the lower bound"
    assert not plan.stats["stop_reason"].startswith("the model is too large")
