"""Time limits are promises about the whole call: each phase of cpsat, search and auto stops at the deadline.

No test here measures wall time.  The solvers read one injected
`Deadline` whose clock the test controls, and the tests check structure:
with the clock already past the deadline no phase runs (nothing is built,
forked, packed, searched or rebalanced) and a valid plan still comes back;
on a simulated machine where every CP-SAT solve uses its whole limit and
every step of a model build takes a millisecond, every solve is started
with a limit that ends before the deadline, the builds stop at their
budget, and the simulated clock at return is within the limit.
"""

import sys

import pytest

from cachefit import Status
from cachefit.instances.families import generate
from cachefit.solvers import auto, cpsat, search
from cachefit.solvers import _cpsat_model as model_module
from cachefit.solvers._common import Problem, no_plan
from cachefit.solvers._deadline import Deadline, slack_s
from cachefit.testing import FakeClock, assert_valid_plan

MODELS = ["additive", "liveness"]


def _instance(memory, n=250):
    return generate("dag-layered", n, seed=0, capacity="tight", memory=memory)


def _forbid(monkeypatch, target, name, what):
    def refuse(*args, **kwargs):
        raise AssertionError(f"{what} ran after the deadline")

    monkeypatch.setattr(target, name, refuse)


@pytest.fixture
def expired():
    """A 10 s deadline whose clock already reads 11 s: every phase must be skipped."""
    clock = FakeClock()
    deadline = Deadline(10.0, clock=clock)
    clock.now = 11.0
    return deadline


@pytest.fixture
def nothing_runs(monkeypatch):
    """Fail the test if a model is built, a child forked, a list schedule packed, cuts searched or dp run."""
    cpsat_module = sys.modules["cachefit.solvers.cpsat"]
    search_module = sys.modules["cachefit.solvers.search"]
    schedule_module = sys.modules["cachefit.solvers._schedule"]
    bounds_module = sys.modules["cachefit.solvers.bounds"]
    _forbid(monkeypatch, model_module.Model, "__init__", "a CP-SAT model build")
    _forbid(monkeypatch, model_module, "run_contained", "a CP-SAT solve")
    _forbid(monkeypatch, schedule_module.ListScheduler, "_fill", "list scheduling")
    _forbid(monkeypatch, cpsat_module, "cut_order", "dp on a hint order")
    _forbid(monkeypatch, search_module, "cut_order", "dp's rebalancing")
    _forbid(monkeypatch, sys.modules["cachefit.solvers.cuts"], "_next_level", "the search over cuts")
    _forbid(monkeypatch, bounds_module, "head_tail_bound", "the head-tail bound")
    _forbid(monkeypatch, bounds_module, "span_bound", "the span bound")


class TestExpiredDeadline:
    @pytest.mark.parametrize("memory", MODELS)
    def test_cpsat_skips_every_phase_and_returns_the_given_orders_plan(self, memory, expired, nothing_runs):
        graph, capacity = _instance(memory)
        plan = cpsat(graph, capacity, memory=memory, workers=1, deadline=expired)
        assert_valid_plan(graph, plan)
        assert plan.ok and "not rebalanced (no time for dp)" in plan.stats["hint"]
        assert plan.stats["phase1"].startswith("skipped") and plan.stats["phase2"].startswith("skipped")
        assert plan.stats["stop_reason"].startswith("the model is too large for the time limit (10 s)")
        assert plan.status == (Status.OPTIMAL if plan.k == plan.lower_bound else Status.FEASIBLE)

    @pytest.mark.parametrize("memory", MODELS)
    def test_search_skips_every_phase(self, memory, expired, monkeypatch):
        search_module = sys.modules["cachefit.solvers.search"]
        _forbid(monkeypatch, search_module, "cut_order", "dp's rebalancing")
        _forbid(monkeypatch, sys.modules["cachefit.solvers.cuts"], "_next_level", "the search over cuts")
        _forbid(monkeypatch, sys.modules["cachefit.solvers.bounds"], "head_tail_bound", "the head-tail bound")
        graph, capacity = _instance(memory)
        plan = search(graph, capacity, memory=memory, deadline=expired)
        assert_valid_plan(graph, plan)
        assert plan.ok and plan.stats["windows"] == 0 and plan.stats["rebalanced"] is False
        assert plan.stats["stop_reason"] in ("time limit", "k meets the lower bound")

    @pytest.mark.parametrize("memory", MODELS)
    def test_search_with_a_fixed_k_splits_without_the_sum_of_squares_stage(self, memory, expired, monkeypatch):
        """With k asked for, dp still cuts the order into k groups, but its Σ S² stage (O(k·n) pairs) is skipped."""
        dp_module = sys.modules["cachefit.solvers.dp"]
        real = dp_module._min_sum_squares
        pairs = []

        def counted(*args, **kwargs):
            result = real(*args, **kwargs)
            pairs.append(result[1])
            return result

        monkeypatch.setattr(dp_module, "_min_sum_squares", counted)
        graph, capacity = _instance(memory)
        k = search(graph, capacity, memory=memory, time_limit_s=1.0).k + 5
        pairs.clear()
        plan = search(graph, capacity, memory=memory, k=k, deadline=expired)
        assert_valid_plan(graph, plan)
        assert plan.ok and plan.k == k and plan.stats["rebalanced"] is True
        assert pairs == [0]  # called once, stopped before its first layer
        assert plan.stats["stop_reason"] in ("time limit", f"k meets the k asked for ({k})")

    def test_auto_runs_no_second_solver(self, expired, monkeypatch):
        solvers = sys.modules["cachefit.solvers"]
        _forbid(monkeypatch, solvers, "cpsat", "cpsat")
        _forbid(monkeypatch, solvers, "dp", "dp")
        monkeypatch.setattr(solvers, "AUTO_WINDOWS_CELLS", 10**9)  # the path of small DAGs: search, then cpsat
        graph, capacity = _instance("liveness")
        plan = auto(graph, capacity, memory="liveness", deadline=expired)
        assert_valid_plan(graph, plan)
        assert plan.ok and plan.stats["auto"] in ("search (no time left for another solver)",
                                                  "search: k meets the lower bound")

    def test_auto_with_exact_windows_builds_and_solves_nothing(self, expired, monkeypatch):
        solvers = sys.modules["cachefit.solvers"]
        _forbid(monkeypatch, solvers, "cpsat", "cpsat")
        _forbid(monkeypatch, solvers, "dp", "dp")
        _forbid(monkeypatch, model_module.Model, "__init__", "a CP-SAT model build")
        _forbid(monkeypatch, sys.modules["cachefit.solvers._window"], "run_contained", "a window's solve")
        _forbid(monkeypatch, sys.modules["cachefit.solvers.search"], "cut_order", "dp's rebalancing")
        monkeypatch.setattr(solvers, "AUTO_WINDOWS_CELLS", 0)
        graph, capacity = _instance("liveness")
        plan = auto(graph, capacity, memory="liveness", deadline=expired)
        assert_valid_plan(graph, plan)
        assert plan.ok and plan.stats["auto"].startswith("search with exact windows")
        assert plan.stats["stop_reason"] in ("time limit", "k meets the lower bound")
        assert "exact_windows" not in plan.stats  # the heuristics stopped on the time limit: no window was tried


class TestSimulatedMachine:
    """Every solve takes its whole limit and every build step a millisecond, on the fake clock."""

    @pytest.mark.parametrize("memory", MODELS)
    @pytest.mark.parametrize("limit", [0.5, 2.0, 10.0])
    def test_cpsat_ends_within_its_limit(self, memory, limit, monkeypatch, slow_builds):
        clock = slow_builds
        deadline = Deadline(limit, clock=clock)
        solves = []

        def solve_takes_its_limit(self, time_limit_s, workers, seed, parameters=model_module.SEARCH, *,
                                  stall_s=None, kill_after_s=None):
            assert 0 < time_limit_s <= deadline.remaining(), "a solve was given time past the deadline"
            assert kill_after_s is not None and kill_after_s <= deadline.remaining() + 1e-9
            solves.append((clock.now, time_limit_s))
            clock.now += time_limit_s
            return {"status": "UNKNOWN", "wall_s": time_limit_s, "stop_reason": "time limit"}

        monkeypatch.setattr(model_module.Model, "solve", solve_takes_its_limit)
        graph, capacity = _instance(memory)
        plan = cpsat(graph, capacity, memory=memory, workers=1, deadline=deadline)
        assert_valid_plan(graph, plan)
        assert plan.ok
        assert clock.now <= limit, f"the simulated call ended at {clock.now} s > {limit} s"
        assert all(start + seconds <= limit for start, seconds in solves)
        assert plan.stats["stop_reason"].startswith(("time limit", "the model is too large for the time limit"))
        if limit >= 10:  # the phases did run (and were cut): a build finished and a solve used its time
            assert solves and any(key.endswith("_build_s") for key in plan.stats), plan.stats

    @pytest.mark.parametrize("limit", [2.0, 10.0])
    def test_auto_shares_one_deadline(self, limit, monkeypatch):
        clock = FakeClock()
        deadline = Deadline(limit, clock=clock)
        seen = {}
        solvers = sys.modules["cachefit.solvers"]
        real_search = solvers.search

        def search_uses_its_share(*args, deadline, **options):
            seen["search_end"] = deadline.end
            plan = real_search(*args, deadline=deadline, **options)
            clock.now = deadline.end  # the search used all of its share
            return plan

        def cpsat_gets_the_rest(*args, deadline, **options):
            seen["cpsat_end"] = deadline.end
            seen["cpsat_left"] = deadline.remaining()
            problem = Problem.make(*args, **options)
            return no_plan(problem, "cpsat", Status.UNKNOWN, "not run in this test")

        monkeypatch.setattr(solvers, "search", search_uses_its_share)
        monkeypatch.setattr(solvers, "cpsat", cpsat_gets_the_rest)
        monkeypatch.setattr(solvers, "AUTO_WINDOWS_CELLS", 10**9)
        graph, capacity = _instance("liveness")
        plan = auto(graph, capacity, memory="liveness", deadline=deadline)
        assert_valid_plan(graph, plan)
        assert seen["search_end"] == pytest.approx(solvers.AUTO_SEARCH_SHARE * limit)
        assert seen["cpsat_end"] == limit and seen["cpsat_left"] == pytest.approx(limit * (1 - solvers.AUTO_SEARCH_SHARE))


class TestStall:
    def test_a_solve_that_does_not_move_stops_on_a_stall(self):
        # The 250-node tight liveness instance: CP-SAT finds nothing within seconds, so neither the
        # incumbent nor the bound moves; a 0.3 s stall window ends the 60 s solve and says so.
        from cachefit.memory import as_table
        from cachefit.solvers.bounds import head_tail, reachability

        graph, capacity = _instance("liveness")
        table = as_table(graph)
        from cachefit.solvers.cpsat import _domains

        reach = reachability(table)
        groups = 35
        earliest, latest = _domains(table.n, groups, head_tail(table, capacity, memory="liveness", reach=reach))
        model = model_module.Model(table, capacity, "liveness", (1, 1), groups, earliest, latest, reach,
                                   exact_k=False, minimum_groups=28)
        result = model.solve(60.0, 1, 0, stall_s=0.3)
        assert result["stop_reason"].startswith("stall: neither the incumbent nor the bound moved")
        assert result["status"] in ("UNKNOWN", "FEASIBLE")  # a stopped solve claims nothing

    def test_a_proved_solve_says_so(self):
        from cachefit.memory import LayerTable
        import numpy as np

        table = LayerTable.chain([40, 30, 20, 50, 10])
        model = model_module.Model(table, 60, "additive", (1, 1), 5, np.zeros(5, dtype=np.int64),
                                   np.full(5, 4), None, exact_k=False)
        result = model.solve(30.0, 1, 0, stall_s=5.0)
        assert result["status"] == "OPTIMAL" and result["stop_reason"] == "proved" and result["objective"] == 3


def test_the_documented_slack():
    assert slack_s(0.5) == 0.25 and slack_s(10) == 0.5 and slack_s(30) == 1.5
