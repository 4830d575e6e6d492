"""Tests of the solver benchmark (cachefit.bench) and `cachefit bench solvers`."""

import json
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner

from cachefit.bench import report
from cachefit.bench.peers import PEERS, available_peers, peer_plan, skip_reason
from cachefit.bench.solvers import add_quality, instance_specs, run_benchmark, select_solvers
from cachefit.checker import check
from cachefit.cli_bench import bench
from cachefit.errors import InputError
from cachefit.memory import LayerTable
from cachefit.solvers import SOLVERS

BAD_SOLVERS = textwrap.dedent('''
    import os
    import time

    import numpy as np

    from cachefit.solvers import greedy


    def failing(graph, capacity, **options):
        raise RuntimeError("boom: deliberately failing solver")


    def hanging(graph, capacity, **options):
        time.sleep(3600)


    def dying(graph, capacity, **options):
        os._exit(3)


    def hungry(graph, capacity, **options):
        return np.ones(1 << 40)  # 8 TiB: fails under the run's memory cap


    def lying(graph, capacity, **options):
        from dataclasses import replace
        plan = greedy(graph, capacity, **options)
        return replace(plan, sizes=tuple(size - 1 for size in plan.sizes))
''')


@pytest.fixture
def bad_solvers(tmp_path, monkeypatch):
    (tmp_path / "cachefit_bad_solvers.py").write_text(BAD_SOLVERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "cachefit_bad_solvers"


def _registered():
    return [name for name in SOLVERS if name != "auto"]


class TestCommand:
    def test_quick_tiny_end_to_end(self, tmp_path, bad_solvers):
        out = tmp_path / "out"
        result = CliRunner().invoke(bench, [
            "solvers", "--quick", "--n", "8", "--family", "chain-uniform", "--time-limit", "1",
            "--out", str(out),
            "--extra-solver", f"failing={bad_solvers}:failing",
            "--extra-solver", f"hanging={bad_solvers}:hanging",
        ])
        assert result.exit_code == 0, result.output
        for name in ("results.json", "results.md"):
            assert (out / name).stat().st_size > 0
        document = json.loads((out / "results.json").read_text())
        assert report.validate_results(document) == []
        runs = document["runs"]
        assert {run["instance"] for run in runs} == {"chain-uniform/n=8/tight/seed=0",
                                                     "chain-uniform/n=8/loose/seed=0"}
        by = {(run["instance"], run["solver"]): run for run in runs}
        for instance in ("chain-uniform/n=8/tight/seed=0", "chain-uniform/n=8/loose/seed=0"):
            failing, hanging = by[(instance, "failing")], by[(instance, "hanging")]
            assert failing["status"] == "error" and "boom" in failing["error"]
            assert hanging["status"] == "timeout" and failing["k"] is None and hanging["k"] is None
            # every registered solver (brute too: n = 8 <= 12) still ran and was checked
            for name in _registered():
                run = by[(instance, name)]
                assert run["status"] in ("OPTIMAL", "FEASIBLE"), run
                assert run["check_ok"] is True
                assert run["k_ratio"] >= 1.0 and run["bottleneck_ratio"] >= 1.0
                assert run["wall_s"] > 0 and len(run["wall_s_all"]) >= 1
        available, _ = available_peers()
        for name in available:  # peers ran the balanced-k task on the chains
            assert any(run["solver"] == name and run["task"] == "balanced-k" for run in runs)
        plots = [name for name in ("wall_time_vs_n.png", "quality_by_family.png", "k_vs_lower_bound.png")
                 if (out / name).exists()]
        markdown = (out / "results.md").read_text()
        assert "## Headline" in markdown and "## Scaling" in markdown and "### chain-uniform" in markdown
        if plots:
            assert len(plots) == 3 and all(f"]({name})" in markdown for name in plots)
        else:
            assert "No plots:" in markdown
        assert "error" in markdown and "timeout" in markdown
        # the markdown and plots can be rewritten from results.json alone
        (out / "results.md").unlink()
        again = CliRunner().invoke(bench, ["report", str(out)])
        assert again.exit_code == 0, again.output
        assert (out / "results.md").read_text() == markdown

    def test_bad_family_is_a_one_line_error(self, tmp_path):
        result = CliRunner().invoke(bench, ["solvers", "--family", "nope", "--out", str(tmp_path)])
        assert result.exit_code == 2
        assert "`family` must be one of" in result.output

    def test_bad_extra_solver(self, tmp_path):
        result = CliRunner().invoke(bench, ["solvers", "--extra-solver", "x", "--out", str(tmp_path)])
        assert result.exit_code == 2 and "NAME=module:function" in result.output


class TestIsolation:
    def test_crash_and_memory_blowup_are_recorded(self, bad_solvers):
        from cachefit.bench.solvers import load_solver
        extra = {name: load_solver(f"{bad_solvers}:{name}") for name in ("dying", "hungry", "lying")}
        results = run_benchmark(quick=True, families=["chain-uniform"], ns=[6], capacity_modes=["tight"],
                                solvers=["greedy", "dying", "hungry", "lying"], extra_solvers=extra, peers=[],
                                time_limit_s=2, repeats=1, memory_limit_bytes=1 << 30)
        by = {run["solver"]: run for run in results["runs"]}
        assert by["dying"]["status"] == "crashed" and "exit code 3" in by["dying"]["error"]
        assert by["hungry"]["status"] in ("error", "crashed")
        assert by["hungry"]["status"] == "crashed" or "MemoryError" in by["hungry"]["error"]
        # a plan whose stated sizes are false is caught by the independent checker
        assert by["lying"]["check_ok"] is False and by["lying"]["violations"]
        assert by["lying"]["k_ratio"] is None
        assert by["greedy"]["check_ok"] is True and by["greedy"]["status"] == "OPTIMAL"


    def test_spawn_start_method_works_too(self, monkeypatch):
        import multiprocessing

        from cachefit.bench import solvers as runner
        monkeypatch.setattr(runner, "_context", lambda: multiprocessing.get_context("spawn"))
        results = run_benchmark(families=["chain-uniform"], ns=[5], capacity_modes=["loose"], solvers=["greedy"],
                                peers=[], time_limit_s=20, repeats=1)
        (run,) = results["runs"]
        assert run["status"] == "OPTIMAL" and run["check_ok"] is True
        assert results["settings"]["start_method"] == "spawn"


class TestQuality:
    def _run(self, solver, k, bottleneck, *, check_ok=True, task="min-k", lower=1):
        return {"instance": "i", "solver": solver, "task": task, "status": "FEASIBLE", "k": k,
                "bottleneck": bottleneck, "check_ok": check_ok, "lower_bound": lower,
                "k_ratio": None, "bottleneck_ratio": None}

    def test_ratios_against_the_best_checked_plan(self):
        runs = [self._run("a", 3, 100), self._run("b", 3, 80, lower=3), self._run("c", 4, 50),
                self._run("d", 2, 10, check_ok=False), self._run("peer", 3, 120, check_ok=False, task="balanced-k")]
        add_quality(runs)
        by = {run["solver"]: run for run in runs}
        assert by["a"]["best_k"] == 3 and by["a"]["best_bottleneck"] == 80 and by["a"]["best_lower_bound"] == 3
        assert by["a"]["k_ratio"] == 1.0 and by["a"]["bottleneck_ratio"] == pytest.approx(1.25)
        assert by["c"]["k_ratio"] == pytest.approx(4 / 3) and by["c"]["bottleneck_ratio"] is None
        assert by["peer"]["k_ratio"] is None and by["peer"]["bottleneck_ratio"] == pytest.approx(1.5)


class TestPeers:
    @pytest.mark.parametrize("name", list(PEERS))
    def test_adapter_plans_are_judged_by_check(self, name):
        if name not in available_peers()[0]:
            pytest.skip(f"{name} is not installed")
        rng = np.random.default_rng(0)
        table = LayerTable.chain(rng.integers(1, 100, 40), rng.integers(0, 10, 40))
        capacity = int((table.weight + table.activation).sum())  # everything fits: check must pass
        plan = peer_plan(name, table, 5, capacity=capacity, memory="additive")
        assert plan.k == 5 and plan.solver == name
        assert check(plan).ok
        tight = peer_plan(name, table, 5, capacity=plan.bottleneck - 1, memory="additive")
        report_ = check(tight)
        assert not report_.ok and any("capacity" in line for line in report_.violations)

    def test_deepspeed_is_skipped_when_hopeless(self):
        reason = skip_reason("deepspeed.partition_balanced", 1_000_000, 64, 30)
        assert reason.startswith("skipped (n too large)")
        assert skip_reason("deepspeed.partition_balanced", 50, 4, 30) is None


class TestSelection:
    def test_auto_is_not_benchmarked(self):
        assert "auto" not in select_solvers()
        assert set(select_solvers()) == set(_registered())

    def test_unknown_solver(self):
        with pytest.raises(InputError, match="`solver` must be among"):
            select_solvers(["nope"])

    def test_specs_cover_families_sizes_and_capacities(self):
        specs = instance_specs(quick=True, families=["dag-layered"], ns=[5, 9])
        assert [(spec.n, spec.capacity_mode) for spec in specs] == [(5, "tight"), (5, "loose"), (9, "tight"),
                                                                   (9, "loose")]
        assert all(spec.memory == "liveness" for spec in specs)

    def test_bad_size(self):
        with pytest.raises(InputError, match="`n` must be positive"):
            instance_specs(ns=[0])


class TestReport:
    def test_scaling_exponent_of_a_quadratic(self):
        runs = [{"solver": "s", "kind": "cachefit", "family": "dag-layered", "status": "OPTIMAL", "k": 2,
                 "n": n, "wall_s": 3e-7 * n * n, "task": "min-k"} for n in (100, 300, 1000, 3000)]
        (row,) = report.scaling_exponents(runs)
        assert row["exponent"] == pytest.approx(2.0) and row["class"] == "dag" and row["points"] == 4

    def test_validation_names_the_bad_field(self):
        document = {"format": report.RESULTS_FORMAT, "version": 1, "machine": report.machine_info(),
                    "settings": {}, "families": {}, "peers": {}, "runs": [{"instance": 3}]}
        problems = report.validate_results(document)
        assert any("field 'instance' has type int" in line for line in problems)
        assert any("field 'solver' is missing" in line for line in problems)
