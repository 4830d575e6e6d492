"""Exact window repacking (`cachefit.solvers._window`): valid, never worse, contained, within its deadline.

Every plan is re-checked by `cachefit.check` after `finish` recomputes its
sizes; small DAGs are compared with `brute`.  No test measures wall time:
deadlines in the past and a simulated clock check the time promises.
"""

import os
import sys

import pytest
from hypothesis import given, settings, strategies as st

from cachefit import check
from cachefit.instances.families import generate
from cachefit.solvers import auto, brute, search
from cachefit.solvers import _cpsat_model as model_module
from cachefit.solvers import _window as window_module
from cachefit.solvers._common import Problem, finish
from cachefit.solvers._deadline import Deadline
from cachefit.solvers._schedule import Incumbent, ListScheduler
from cachefit.solvers.cpsat import activation_scale
from cachefit.testing import FakeClock, assert_valid_plan, dags

MODELS = ["additive", "liveness"]
SCALES = [100, 10**8, 10**10, 10**12]


def _problem(graph, capacity, memory, fraction=1.0, seed=0):
    return Problem.make(graph, capacity, memory=memory, chunk_fraction=fraction, k=None, time_limit_s=None, seed=seed)


def _incumbent(problem, groups):
    """An `Incumbent` of `groups` (positions), or None when they do not fit."""
    scheduler = ListScheduler(problem.table, problem.capacity, problem.memory, problem.chunk_fraction)
    sizes = scheduler.measure(groups, {})
    if sizes is None or max(sizes, default=0) > problem.capacity:
        return None
    return Incumbent(scheduler, groups, sizes)


def _scale(problem, incumbent):
    live = incumbent.packer.live
    return activation_scale(problem.chunk_fraction, sum(live), problem.capacity) if incumbent.packer.has_live else (1, 1)


def _repack(problem, incumbent, *, lower=0, deadline=None, contain=False):
    """Repack `incumbent` in place; the plan through the common `finish`, and the stats."""
    stats = window_module.repack_windows(problem, incumbent, lower, deadline or Deadline(60.0),
                                         scale=_scale(problem, incumbent), contain=contain)
    return finish(problem, "search", incumbent.groups, lower=0, stats=stats), stats


def _singletons(problem):
    return [[v] for v in range(problem.table.n)]


def _search_groups(problem, memory, seed=0):
    plan = search(problem.table, problem.capacity, memory=memory, seed=seed, time_limit_s=30)
    position = {node: index for index, node in enumerate(problem.table.ids)}
    return [[position[node] for node in group] for group in plan.partitions]


@settings(max_examples=60, deadline=None, derandomize=True)
@given(data=st.data(), scale=st.sampled_from(SCALES), memory=st.sampled_from(MODELS),
       fraction=st.sampled_from([1.0, 0.5, 1 / 3]))
def test_against_brute_from_one_node_per_group(data, scale, memory, fraction):
    # The worst start (every node alone): the windows must reach a valid plan, never below the optimum.
    capacity = scale + data.draw(st.integers(0, 7))
    graph = data.draw(dags(min_nodes=1, max_nodes=9, capacity=capacity))
    problem = _problem(graph, capacity, memory, fraction)
    incumbent = _incumbent(problem, _singletons(problem))
    if incumbent is None:  # a node alone overflows: nothing to repack
        return
    oracle = brute(graph, capacity, memory=memory, chunk_fraction=fraction)
    plan, stats = _repack(problem, incumbent)
    assert check(plan).ok
    assert oracle.ok and oracle.k <= plan.k <= problem.table.n
    assert stats["stop_reason"].startswith(("stall", "k meets the lower bound"))
    if stats["windows_improved"]:
        assert plan.k < problem.table.n


class TestRealScale:
    @pytest.mark.parametrize("memory", MODELS)
    def test_never_worse_than_its_start_and_checked(self, memory):
        graph, capacity = generate("dag-layered", 120, seed=3, capacity="tight", memory=memory)
        problem = _problem(graph, capacity, memory)
        start = _search_groups(problem, memory)
        incumbent = _incumbent(problem, start)
        plan, stats = _repack(problem, incumbent, contain=True)
        assert_valid_plan(graph, plan)
        assert plan.k <= len(start) - stats["windows_improved"]
        assert stats["slices"] >= 1 and "crashes" not in stats

    def test_bytes_of_1e12_per_node(self):
        graph, capacity = generate("dag-layered", 60, seed=1, capacity="tight", memory="liveness")
        for node in graph.nodes:  # the same instance at 1e4 times its bytes: ~1e11-1e12 per node
            for key in ("weight_bytes", "activation_bytes", "buffer_bytes"):
                graph.nodes[node][key] *= 10**4
        capacity *= 10**4
        problem = _problem(graph, capacity, "liveness")
        assert problem.table.weight.max() > 10**11
        incumbent = _incumbent(problem, _singletons(problem))
        plan, stats = _repack(problem, incumbent)
        assert_valid_plan(graph, plan)
        assert plan.k <= problem.table.n - stats["windows_improved"] < problem.table.n


class TestWindowModel:
    @pytest.mark.parametrize("memory", MODELS)
    def test_the_window_as_it_is_fits_the_model(self, memory):
        # Every window of a valid plan is a solution of its own sideways model: the carried and
        # after-window nodes state exactly what the groups outside it impose, no more.
        graph, capacity = generate("dag-layered", 120, seed=0, capacity="tight", memory=memory)
        problem = _problem(graph, capacity, memory)
        incumbent = _incumbent(problem, _search_groups(problem, memory))
        context = window_module._Context(problem, incumbent.packer, _scale(problem, incumbent))
        for start in range(0, incumbent.k - 4, 3):
            model, _, _ = window_module._window_model(context, incumbent, start, 4, 4, Deadline(60.0),
                                                      minimize_group=3)
            parameters = {**window_module.WINDOW_FROM_HINT, "fix_variables_to_their_hinted_value": True}
            result = model._solve_here(30.0, 1, 0, parameters)
            assert result["status"] == "OPTIMAL", (start, result)
            assert result["objective"] == incumbent.sizes[start + 3]  # the model's size of a group is exact


class TestDeadline:
    def test_a_deadline_in_the_past_builds_and_solves_nothing(self, monkeypatch):
        def refuse(*args, **kwargs):
            raise AssertionError("a window was built or solved after the deadline")

        monkeypatch.setattr(model_module.Model, "__init__", refuse)
        monkeypatch.setattr(window_module, "run_contained", refuse)
        graph, capacity = generate("dag-layered", 120, seed=0, capacity="tight", memory="liveness")
        problem = _problem(graph, capacity, "liveness")
        incumbent = _incumbent(problem, _singletons(problem))
        clock = FakeClock()
        deadline = Deadline(10.0, clock=clock)
        clock.now = 11.0
        plan, stats = _repack(problem, incumbent, deadline=deadline, contain=True)
        assert plan.k == problem.table.n and stats["stop_reason"] == "time limit" and stats["slices"] == 0

    @pytest.mark.parametrize("limit", [0.5, 3.0, 10.0])
    def test_every_solve_ends_before_the_deadline_on_a_simulated_machine(self, limit, monkeypatch, slow_builds):
        # Every solve uses its whole wall-clock limit and every build step takes a millisecond.
        clock = slow_builds
        deadline = Deadline(limit, clock=clock)
        solves = []

        def solve_takes_its_limit(self, time_limit_s, workers, seed, parameters, stall_s=None):
            assert 0 < time_limit_s <= deadline.remaining(), "a solve was given time past the deadline"
            solves.append(time_limit_s)
            clock.now += time_limit_s
            return {"status": "UNKNOWN", "wall_s": time_limit_s, "stop_reason": "time limit"}

        def in_process(solve, time_limit_s, *, kill_after_s=None):
            assert kill_after_s is not None and kill_after_s <= deadline.remaining() + 1e-9
            return solve()

        monkeypatch.setattr(model_module.Model, "_solve_here", solve_takes_its_limit)
        monkeypatch.setattr(window_module, "run_contained", in_process)
        graph, capacity = generate("dag-layered", 250, seed=0, capacity="tight", memory="liveness")
        problem = _problem(graph, capacity, "liveness")
        incumbent = _incumbent(problem, _search_groups(problem, "liveness"))
        plan, stats = _repack(problem, incumbent, deadline=deadline, contain=True)
        assert_valid_plan(graph, plan)
        assert clock.now <= limit and stats["stop_reason"] == "time limit"
        if limit >= 3.0:
            assert solves


class TestContainment:
    def test_a_backend_abort_loses_a_slice_not_the_caller(self, monkeypatch):
        def abort(self, *args, **kwargs):
            os.abort()

        monkeypatch.setattr(model_module.Model, "_solve_here", abort)
        graph, capacity = generate("dag-layered", 120, seed=0, capacity="tight", memory="additive")
        problem = _problem(graph, capacity, "additive")
        start = _singletons(problem)
        incumbent = _incumbent(problem, start)
        plan, stats = _repack(problem, incumbent, contain=True)
        assert_valid_plan(graph, plan)
        assert plan.k == len(start) and stats["crashes"] == 3
        assert stats["stop_reason"].startswith("stopped after 3 lost slices")


def test_deterministic_for_a_seed_when_a_stall_stops_it():
    graph, capacity = generate("dag-layered", 30, seed=2, capacity="tight", memory="liveness")
    plans = []
    for _ in range(2):
        problem = _problem(graph, capacity, "liveness", seed=5)
        incumbent = _incumbent(problem, _singletons(problem))
        plan, stats = _repack(problem, incumbent, contain=True)
        assert stats["stop_reason"].startswith("stall") and stats["windows_improved"] > 0
        plans.append(plan.partitions)
    assert plans[0] == plans[1]


class TestAuto:
    def test_a_dag_beyond_the_cell_threshold_gets_exact_windows(self, monkeypatch):
        solvers = sys.modules["cachefit.solvers"]
        monkeypatch.setattr(solvers, "AUTO_WINDOWS_CELLS", 1000)
        graph, capacity = generate("dag-layered", 120, seed=0, capacity="tight", memory="liveness")
        plan = auto(graph, capacity, memory="liveness", time_limit_s=4)
        assert_valid_plan(graph, plan)
        assert plan.stats["auto"].startswith("search with exact windows (the whole CP-SAT model would have ~")
        assert plan.stats["stop_reason"] and "setup_s" in plan.stats
        if plan.k > plan.lower_bound:  # the heuristics stalled above the bound: the windows ran
            assert plan.stats["stop_reason"].startswith(("exact windows: ", "stalled"))

    def test_small_dags_keep_search_then_cpsat(self, monkeypatch):
        # Five items without edges, in bins of 10: the bounds say 2, three is optimal; a model this small
        # goes to cpsat, which proves it.
        import networkx as nx

        module = sys.modules["cachefit.solvers.search"]
        monkeypatch.setattr(module, "fewest_groups", lambda *args, **kwargs: None)
        graph = nx.DiGraph()
        for index in range(5):
            graph.add_node(str(index), weight_bytes=4, activation_bytes=0, buffer_bytes=0)
        plan = auto(graph, 10, memory="additive", time_limit_s=5)
        assert check(plan).ok and plan.k == 3 and plan.status == "OPTIMAL"
        assert plan.stats["auto"].startswith("search (stalled")


def test_a_window_over_the_cell_budget_is_skipped_not_the_rest_of_the_sweep(monkeypatch):
    # The first two groups alone exceed every budget: the sweep goes on from the next start.
    real_cells = window_module._Context.cells

    def cells(self, incumbent, start, width):
        return 10**9 if start == 0 else real_cells(self, incumbent, start, width)

    monkeypatch.setattr(window_module._Context, "cells", cells)
    graph, capacity = generate("dag-layered", 30, seed=2, capacity="tight", memory="additive")
    problem = _problem(graph, capacity, "additive")
    incumbent = _incumbent(problem, _singletons(problem))
    plan, stats = _repack(problem, incumbent)
    assert_valid_plan(graph, plan)
    assert stats["windows_improved"] > 0 and stats["stop_reason"].startswith("stall")
    assert plan.partitions[0] == (problem.table.ids[0],)  # the first group was never in a window
