import json

import pytest
from click.testing import CliRunner

from cachefit import Plan, check
from cachefit.cli import main


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def layers_file(tmp_path):
    path = tmp_path / "layers.json"
    path.write_text(json.dumps([100, 200, 300, 400]))
    return path


class TestPlanCommand:
    def test_plan_layers_file_and_json(self, runner, layers_file, tmp_path):
        out = tmp_path / "plan.json"
        result = runner.invoke(main, ["plan", str(layers_file), "--capacity", "500B", "--json", str(out)])
        assert result.exit_code == 0, result.output
        assert "OPTIMAL" in result.output and "lower bound" in result.output and "% of capacity" in result.output
        plan = Plan.from_json(out)
        assert plan.k == 3 and check(plan).ok

    def test_infeasible_exit_1(self, runner, layers_file):
        result = runner.invoke(main, ["plan", str(layers_file), "--capacity", "300B"])
        assert result.exit_code == 1
        assert "INFEASIBLE" in result.output and "node '3' needs 400 B" in result.output

    def test_bad_capacity_exit_2_without_traceback(self, runner, layers_file):
        result = runner.invoke(main, ["plan", str(layers_file), "--capacity", "fifty"])
        assert result.exit_code == 2
        assert "error:" in result.output and "`capacity` must be" in result.output
        assert "Traceback" not in result.output

    def test_unknown_model_exit_2(self, runner):
        result = runner.invoke(main, ["plan", "no-such-model", "--capacity", "1MiB"])
        assert result.exit_code == 2 and "is neither a file nor an embedded model" in result.output

    def test_bad_file_exit_2(self, runner, tmp_path):
        path = tmp_path / "junk.json"
        path.write_text("{not json")
        result = runner.invoke(main, ["plan", str(path), "--capacity", "1MiB"])
        assert result.exit_code == 2 and "is not valid JSON" in result.output

    def test_help_everywhere(self, runner):
        for command in ([], ["plan"], ["check"], ["models"], ["solvers"]):
            result = runner.invoke(main, [*command, "--help"])
            assert result.exit_code == 0 and "Usage:" in result.output


class TestCheckCommand:
    def test_ok_and_violations(self, runner, layers_file, tmp_path):
        out = tmp_path / "plan.json"
        runner.invoke(main, ["plan", str(layers_file), "--capacity", "500B", "--json", str(out)])
        result = runner.invoke(main, ["check", str(out)])
        assert result.exit_code == 0 and result.output.startswith("ok:")
        data = json.loads(out.read_text())
        data["sizes"][0] += 1
        out.write_text(json.dumps(data))
        result = runner.invoke(main, ["check", str(out)])
        assert result.exit_code == 1 and "violation" in result.output and "differ from recomputed" in result.output

    def test_not_a_plan_exit_2(self, runner, layers_file):
        result = runner.invoke(main, ["check", str(layers_file)])
        assert result.exit_code == 2 and "not a cachefit plan" in result.output


class TestModelsCommand:
    def test_lists_embedded_models(self, runner):
        result = runner.invoke(main, ["models"], terminal_width=200)
        assert result.exit_code == 0
        for name in ("gpt2", "llama-3.1-70b", "paper-4x15gb"):
            assert name in result.output


class TestSolverAll:
    def test_side_by_side_and_best_written(self, runner, layers_file, tmp_path):
        out = tmp_path / "best.json"
        result = runner.invoke(main, ["plan", str(layers_file), "--capacity", "500B", "--solver", "all",
                                      "--json", str(out)], terminal_width=200)
        assert result.exit_code == 0, result.output
        for name in ("greedy", "dp", "cpsat", "brute"):
            assert name in result.output
        assert "best proven lower bound 3: k is optimal" in result.output
        plan = Plan.from_json(out)
        assert plan.k == 3 and check(plan).ok

    def test_all_infeasible_exit_1(self, runner, layers_file):
        result = runner.invoke(main, ["plan", str(layers_file), "--capacity", "300B", "--solver", "all"])
        assert result.exit_code == 1 and "no plan:" in result.output


class TestBalanceOption:
    def test_flops_balance_reported(self, runner, tmp_path):
        path = tmp_path / "layers.json"
        layers = [{"weight_bytes": 10, "flops": flops} for flops in (1, 1, 1, 9, 1, 1)]
        path.write_text(json.dumps(layers))
        result = runner.invoke(main, ["plan", str(path), "--capacity", "100B", "--k", "2", "--solver", "dp",
                                      "--balance", "flops", "--json", str(tmp_path / "p.json")], terminal_width=200)
        assert result.exit_code == 0, result.output
        assert "largest group flops" in result.output
        plan = Plan.from_json(tmp_path / "p.json")
        assert plan.stats["bottleneck_flops"] == 11 and check(plan).ok  # 1+1+1 | 9+1+1: the best cut in two


class TestSolverAllChecksPlans:
    def test_plan_that_fails_check_is_never_best(self, runner, layers_file, tmp_path, monkeypatch):
        # issue 10: an int64-wrapped plan (k=1, negative size) was picked as best
        import dataclasses

        import cachefit.solvers

        real_compare = cachefit.solvers.compare

        def compare_with_a_liar(graph, capacity, **options):
            plans = real_compare(graph, capacity, **options)
            honest = plans[0]
            liar = dataclasses.replace(honest, solver="liar", k=1, sizes=(-4096,), bottleneck=-4096,
                                       partitions=(tuple(node for group in honest.partitions for node in group),))
            return [liar, *plans]

        monkeypatch.setattr(cachefit.solvers, "compare", compare_with_a_liar)
        out = tmp_path / "best.json"
        result = runner.invoke(main, ["plan", str(layers_file), "--capacity", "500B", "--solver", "all",
                                      "--json", str(out)], terminal_width=200)
        assert result.exit_code == 0, result.output
        assert "not chosen, rejected by the checker: liar" in result.output and "best: liar" not in result.output
        plan = Plan.from_json(out)
        assert plan.solver != "liar" and plan.k == 3 and check(plan).ok


class TestOneLineErrors:
    @pytest.mark.parametrize("args, message", [
        (["plan", "LAYERS", "-c", "1MiB", "--k", "abc"], "error: Invalid value for '--k': 'abc' is not a valid "
                                                          "integer. (see `main plan --help`)"),
        (["plan"], "error: Missing argument 'MODEL'. (see `main plan --help`)"),
        (["frobnicate"], "error: No such command 'frobnicate'. (see `main --help`)"),
        (["plan", "LAYERS", "-c", "1e1000000"], "error: `capacity` is too large to be a number of bytes"),
        (["plan", "meta-llama/Llama-3.1-8B", "-c", "1MiB"],
         "error: `MODEL` 'meta-llama/Llama-3.1-8B' is not a local file; it looks like a Hugging Face hub id, and "
         "cachefit does not download: fetch the model's config.json (or the checkpoint folder)"),
        (["plan", "/dev/zero", "-c", "1MiB"], "error: `MODEL` file '/dev/zero' is not a regular file"),
        (["check", "/dev/zero"], "error: plan file '/dev/zero' is not a regular file"),
    ])
    def test_exit_2_one_line(self, runner, layers_file, args, message):
        args = [str(layers_file) if arg == "LAYERS" else arg for arg in args]
        result = runner.invoke(main, args)
        assert result.exit_code == 2, result.output
        assert result.output.startswith(message) and result.output.count("\n") == 1, result.output

    def test_missing_relative_file_is_not_called_a_hub_id(self, runner):
        result = runner.invoke(main, ["plan", "models/missing.json", "-c", "1MiB"])
        assert result.exit_code == 2 and "is neither a file nor an embedded model" in result.output

    def test_no_arguments_still_prints_help(self, runner):
        result = runner.invoke(main, [])
        assert "Usage:" in result.output and "Commands:" in result.output

    def test_folder_without_config(self, runner, tmp_path):
        result = runner.invoke(main, ["plan", str(tmp_path), "-c", "1MiB"])
        assert result.exit_code == 2 and "is a folder without a config.json" in result.output


class TestJsonWriteFailure:
    def test_missing_folder_names_json(self, runner, layers_file, tmp_path):
        target = tmp_path / "missing" / "plan.json"
        result = runner.invoke(main, ["plan", str(layers_file), "-c", "500B", "--json", str(target)])
        assert result.exit_code == 2
        assert f"error: `--json` '{target}': cannot write the plan there: No such file or directory; nothing was " \
               "written" in result.output
        assert ".tmp" not in result.output and not (tmp_path / "missing").exists()

    @pytest.mark.parametrize("solver", ["greedy", "all"])
    def test_disk_full_names_json_and_leaves_nothing(self, runner, layers_file, tmp_path, monkeypatch, solver):
        import errno
        import os

        def full(fd):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(os, "fsync", full)
        target = tmp_path / "plan.json"
        result = runner.invoke(main, ["plan", str(layers_file), "-c", "500B", "--solver", solver,
                                      "--json", str(target)])
        assert result.exit_code == 2
        assert "`--json`" in result.output and "No space left on device; nothing was written" in result.output
        assert sorted(p.name for p in tmp_path.iterdir()) == ["layers.json"]
