"""The CLI's shared options and output at 80 columns (issue 13 leftovers)."""

import os
import subprocess
import sys

import pytest


def _cachefit(*args, columns=80):
    env = {**os.environ, "COLUMNS": str(columns)}
    return subprocess.run([sys.executable, "-m", "cachefit.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.fixture(scope="module")
def gpt2_plan(tmp_path_factory):
    path = tmp_path_factory.mktemp("polish") / "g.json"
    done = _cachefit("plan", "gpt2", "-c", "50MiB", "--granularity", "op", "--tile", "--chunk-tokens", "auto",
                     "--json", str(path), "-q")
    assert done.returncode == 0, done.stderr
    return path, done.stdout


class TestEightyColumns:
    def test_plan_table_keeps_node_names_whole(self, gpt2_plan):
        _, output = gpt2_plan
        assert "│ block.0.mlp_norm .. block.3.attn_add │" in output
        table = [line for line in output.splitlines() if line[:1] in "┏┃┡│└"]
        assert table and "…" not in "".join(table)
        assert max(map(len, table)) <= 80

    def test_estimate_piped_never_cuts_numbers(self, gpt2_plan):
        path, _ = gpt2_plan
        done = _cachefit("estimate", str(path), "--device", "h100")
        assert done.returncode == 0, done.stderr
        tables = done.stdout.split("assumptions")[0]
        assert "…" not in tables
        assert "partition-major" in tables and "tokens/s" in tables and "1,321,522" in tables
        table_lines = [line for line in tables.splitlines() if line[:1] in "┏┃┡│└"]
        assert max(map(len, table_lines)) <= 80


class TestEstimateChecksFirst:
    @pytest.mark.parametrize("spoil", ["swap", "capacity", "drop"])
    def test_refuses_a_plan_check_rejects(self, gpt2_plan, tmp_path, spoil):
        import json

        from click.testing import CliRunner

        from cachefit.cli import main

        path, _ = gpt2_plan
        data = json.loads(path.read_text())
        if spoil == "swap":
            data["partitions"][0], data["partitions"][1] = data["partitions"][1], data["partitions"][0]
        elif spoil == "capacity":
            data["capacity"] = 10
        else:
            data["partitions"].pop()
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(data))
        runner = CliRunner()
        checked = runner.invoke(main, ["check", str(bad)])
        estimated = runner.invoke(main, ["estimate", str(bad), "--device", "h100"])
        assert checked.exit_code == 1 and estimated.exit_code == 1, estimated.output
        assert "nothing is estimated" in estimated.output and "tokens/s" not in estimated.output
        violations = [line for line in checked.output.splitlines() if line.startswith("  - ")]
        assert violations and all(line in estimated.output for line in violations)

    def test_accepts_a_plan_check_accepts(self, gpt2_plan):
        from click.testing import CliRunner

        from cachefit.cli import main

        path, _ = gpt2_plan
        result = CliRunner().invoke(main, ["estimate", str(path), "--device", "h100"])
        assert result.exit_code == 0 and "tokens/s" in result.output


class TestKvLines:
    def _plan(self, *args):
        from click.testing import CliRunner

        from cachefit.cli import main

        return CliRunner().invoke(main, ["plan", "gpt2", "-c", "50MiB", "-q", *args])

    def test_chunked_prefill_prints_its_kv_term(self):
        result = self._plan("--granularity", "op", "--tile", "--chunk-tokens", "auto")
        assert result.exit_code == 0
        assert ("K/V of the earlier chunks, per attention node (12): 3,072 B/token × 960 tokens before the last "
                "64-token chunk of 1,024 = 2,949,120 B; streamed: not in S(P)") in result.output

    def test_whole_sequences_print_no_kv_term(self):
        result = self._plan("--granularity", "op", "--tile", "--chunk-tokens", "1024")
        assert "K/V of the earlier chunks" not in result.output

    def test_empty_decode_context_says_so(self):
        result = self._plan("--phase", "decode", "--context", "0")
        assert "KV cache (decode, context 0 tokens): empty, no token is cached" in result.output
        assert "× 0 tokens" not in result.output and "0 layers" not in result.output


class TestSharedModelOptions:
    """Every command that takes a MODEL has the same model options, defaults and help."""

    COMMANDS = ("plan", "run", "stages", "deploy")

    def _params(self, name):
        from cachefit.cli import main

        return {param.name: param for param in main.commands[name].params}

    def test_same_options_and_defaults(self):
        shared = ("batch", "seq_len", "dtype", "granularity")
        reference = self._params("plan")
        for name in self.COMMANDS:
            params = self._params(name)
            for option in shared:
                assert params[option].default == reference[option].default or (name, option) == ("run", "granularity")
                assert params[option].help.startswith(reference[option].help.split(" Default ")[0])

    def test_a_different_default_says_why(self):
        params = self._params("run")
        assert params["granularity"].default == "op" and "Default op, not plan's block" in params["granularity"].help
        assert params["solver"].default == "greedy" and "not plan's auto" in params["solver"].help

    def test_decode_and_kv_options_are_the_same_in_plan_and_deploy(self):
        plan, deploy = self._params("plan"), self._params("deploy")
        for option in ("phase", "context", "kv", "chunk_tokens"):
            assert (plan[option].default, plan[option].help) == (deploy[option].default, deploy[option].help)

    def test_memory_offers_kv_where_there_is_no_kv_option(self):
        for name in self.COMMANDS:
            params = self._params(name)
            choices = set(getattr(params["memory"].type, "choices", ())) if "memory" in params else None
            if choices is not None and "kv" not in params:
                assert {"liveness+kv", "additive+kv"} <= choices or name == "stages", name

    def test_run_plans_a_model_with_a_kv_memory_model(self):
        from cachefit import cli_run

        plan = cli_run._load_plan("gpt2", capacity="100MiB", solver="greedy", memory="liveness+kv", batch=1,
                                  seq_len=64, dtype="bf16", granularity="op", chunk_tokens=16, micro_batches=None)
        assert plan.ok and plan.memory == "liveness+kv"


class TestCpsatProgress:
    def test_build_and_solve_phases_are_reported(self):
        import cachefit
        from cachefit.progress import Reporter, reporting

        class Recorder(Reporter):
            def __init__(self):
                self.names = []

            def start(self, name, total=None):
                self.names.append(name)
                return len(self.names)

        graph = cachefit.instances.load("gpt2")
        recorder = Recorder()
        with reporting(recorder):
            result = cachefit.plan(graph, "100MiB", solver="cpsat", time_limit_s=20)
        assert result.ok
        assert "CP-SAT phase2: building a 4-group model" in recorder.names  # k = 4 meets the bound: no phase 1
        assert any(name.startswith("CP-SAT phase2: solving (limit ") for name in recorder.names)
        plain = cachefit.plan(graph, "100MiB", solver="cpsat", time_limit_s=20)  # no reporter: same plan
        assert plain.partitions == result.partitions


class TestKvDefault:
    def test_replanning_a_resident_plan_keeps_its_kv(self, tmp_path):
        import json

        from click.testing import CliRunner

        from cachefit.cli import main

        runner = CliRunner()
        path = tmp_path / "kvr.json"
        first = runner.invoke(main, ["plan", "llama-3.1-8b", "-c", "20GB", "--phase", "decode", "--kv", "resident",
                                     "--solver", "dp", "--json", str(path), "-q"])
        assert first.exit_code == 0, first.output
        assert json.loads(path.read_text())["memory"] == "liveness+kv"
        again = tmp_path / "again.json"
        replanned = runner.invoke(main, ["plan", str(path), "-c", "20GB", "--solver", "dp", "--json", str(again),
                                         "-q"])
        assert replanned.exit_code == 0, replanned.output
        assert json.loads(again.read_text())["memory"] == "liveness+kv"
        streamed = tmp_path / "streamed.json"
        runner.invoke(main, ["plan", str(path), "-c", "20GB", "--solver", "dp", "--kv", "streamed",
                             "--json", str(streamed), "-q"])
        assert json.loads(streamed.read_text())["memory"] == "liveness"

    def test_a_model_defaults_to_streamed(self):
        from cachefit.clikit import kv_default

        assert kv_default(None, "gpt2") == "streamed" and kv_default("resident", "gpt2") == "resident"
