"""Execution starts with verification: `cachefit.check`, then each node's module bytes (issue 10, item 5).

Every plan below is one that `cachefit check` rejects, or one whose node
shapes disagree with its byte counts (so running it would allocate what the
plan does not count).  `run`, `run_pipeline`, ``cachefit run`` and
``cachefit pipeline`` refuse each in one line before anything is allocated:
exit 1 for a plan the checks reject, as ``cachefit check`` does, exit 2 for
a file that is not a plan.
"""

import dataclasses
import json

import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402

import cachefit  # noqa: E402
from cachefit import InputError  # noqa: E402
from cachefit.cli_run import run as run_command  # noqa: E402
from cachefit.cli_stages import pipeline_command  # noqa: E402
from cachefit.executor import PlanRejected, linear_stack, run, verify_module_bytes, verify_plan  # noqa: E402
from cachefit.executor.verify import module_weight_bytes  # noqa: E402
from cachefit.graphs import transformer  # noqa: E402

LLAMA = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": 64}


def good_plan(k=2, layers=4):
    return cachefit.plan(linear_stack(layers, 16, batch=2, seq_len=4), 10**6, solver="dp", k=k)


def rejected_plans():
    """name -> (plan that `cachefit.check` rejects, the violation its message names)."""
    plan = good_plan()
    return {
        "capacity -5": (dataclasses.replace(plan, capacity=-5), "capacity -5 is not positive"),
        "false sizes": (dataclasses.replace(plan, sizes=(1, 1)), "stated sizes [1, 1] differ from recomputed"),
        "empty group": (dataclasses.replace(plan, partitions=plan.partitions + ((),), k=3,
                                            sizes=plan.sizes + (0,)), "group 2 is empty"),
        "chunk_fraction 2": (dataclasses.replace(plan, chunk_fraction=2.0), "chunk_fraction 2.0 is not in (0, 1]"),
    }


def huge_shapes_plan():
    """A valid plan whose node 'linear.1' claims 512 B of weights but has 10^5 × 10^5 × bf16 = 20 GB of shape."""
    graph = linear_stack(3, 16, batch=2, seq_len=4)
    graph.nodes["linear.1"].update(in_features=100_000, out_features=100_000)
    plan = cachefit.plan(graph, 10**6, solver="dp", k=2)
    assert cachefit.check(plan).ok
    return plan


HUGE_MESSAGE = (r"node 'linear.1': its module's parameters take 20,000,000,000 B \(shapes × bf16\), the plan "
                r"counts 512 B of weight_bytes")


class TestVerifyPlan:
    @pytest.mark.parametrize("name", sorted(rejected_plans()))
    def test_check_failures_are_refused(self, name):
        plan, violation = rejected_plans()[name]
        with pytest.raises(PlanRejected, match="`plan` fails cachefit.check: " + violation.replace("[", r"\[")
                           .replace("(", r"\(").replace(")", r"\)")):
            verify_plan(plan)

    def test_a_good_plan_passes(self):
        verify_plan(good_plan())

    def test_rejected_is_bad_input(self):
        assert issubclass(PlanRejected, InputError) and issubclass(PlanRejected, ValueError)


class TestModuleBytes:
    def test_matches_every_builder(self):
        """Embedded graphs, tiled graphs, tied heads, experts: every node's module has its planned bytes."""
        from cachefit.graphs.tile import tile

        for graph in (linear_stack(3, 8), transformer(LLAMA, batch=2, seq_len=4, granularity="op"),
                      transformer(LLAMA, batch=2, seq_len=4, granularity="block"),
                      transformer(dict(LLAMA, tie_word_embeddings=True), batch=2, seq_len=4, granularity="op"),
                      transformer(dict(LLAMA, model_type="mixtral", num_local_experts=4, num_experts_per_tok=2),
                                  batch=2, seq_len=4, granularity="op")):
            verify_module_bytes(graph)
            verify_module_bytes(tile(graph, "3KiB", memory="liveness", chunk_fraction=0.25))

    def test_tied_head_owns_nothing(self):
        graph = transformer(dict(LLAMA, tie_word_embeddings=True), batch=2, seq_len=4, granularity="op")
        assert module_weight_bytes(graph, 2)["lm_head"] == 0 == graph.nodes["lm_head"]["weight_bytes"]

    def test_huge_shapes_are_refused_before_allocation(self):
        with pytest.raises(PlanRejected, match=HUGE_MESSAGE):
            verify_module_bytes(huge_shapes_plan().graph)

    def test_a_shape_one_off_is_refused(self):
        graph = linear_stack(2, 16)
        graph.nodes["linear.0"]["out_features"] = 17
        with pytest.raises(PlanRejected, match=r"node 'linear.0': its module's parameters take 544 B"):
            verify_module_bytes(graph)


class TestRunRefuses:
    @pytest.mark.parametrize("name", sorted(rejected_plans()))
    def test_run(self, name):
        plan, violation = rejected_plans()[name]
        with pytest.raises(PlanRejected, match="`plan` fails cachefit.check"):
            run(plan, micro_batches=2, iters=1, warmup=0)

    def test_run_huge_shapes(self):
        with pytest.raises(PlanRejected, match=HUGE_MESSAGE):
            run(huge_shapes_plan(), micro_batches=2, iters=1, warmup=0)

    @pytest.mark.parametrize("name", ["capacity -5", "chunk_fraction 2"])
    def test_run_pipeline(self, name):
        from cachefit.executor.pipeline import run_pipeline

        plan, violation = rejected_plans()[name]
        with pytest.raises(PlanRejected, match="`plan` fails cachefit.check: " + violation.split(" (")[0]):
            run_pipeline(plan, microbatches=2)

    def test_run_pipeline_huge_shapes(self):
        from cachefit.executor.pipeline import run_pipeline

        with pytest.raises(PlanRejected, match=HUGE_MESSAGE):
            run_pipeline(huge_shapes_plan(), microbatches=2)


def write(tmp_path, plan, name="plan.json"):
    path = tmp_path / name
    plan.to_json(path)
    return path


class TestCli:
    @pytest.mark.parametrize("name", sorted(rejected_plans()))
    @pytest.mark.parametrize("command", ["run", "pipeline"])
    def test_rejected_plan_exit_1_one_line(self, tmp_path, name, command):
        plan, violation = rejected_plans()[name]
        path = write(tmp_path, plan)
        if command == "run":
            result = CliRunner().invoke(run_command, [str(path), "--micro-batches", "2", "--iters", "1"])
        else:
            result = CliRunner().invoke(pipeline_command, [str(path), "--microbatches", "2"])
        assert result.exit_code == 1, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("plan rejected: `plan` fails cachefit.check: ")
        assert violation in lines[0] and "Traceback" not in result.output

    @pytest.mark.parametrize("command", ["run", "pipeline"])
    def test_huge_shapes_exit_1(self, tmp_path, command):
        path = write(tmp_path, huge_shapes_plan())
        if command == "run":
            result = CliRunner().invoke(run_command, [str(path), "--micro-batches", "2"])
        else:
            result = CliRunner().invoke(pipeline_command, [str(path), "--microbatches", "2"])
        assert result.exit_code == 1, result.output
        assert "plan rejected: node 'linear.1': its module's parameters take 20,000,000,000 B" in result.output

    @pytest.mark.parametrize("command", ["run", "pipeline"])
    def test_not_a_plan_exit_2(self, tmp_path, command):
        path = tmp_path / "plan.json"
        data = json.loads(good_plan().to_json())
        data["capacity"] = "lots"
        path.write_text(json.dumps(data))
        if command == "run":
            result = CliRunner().invoke(run_command, [str(path)])
        else:
            result = CliRunner().invoke(pipeline_command, [str(path), "--microbatches", "2"])
        assert result.exit_code == 2 and "plan field 'capacity' has the wrong type: str" in result.output

    def test_plan_file_with_format_after_4096_characters_is_run_as_a_plan(self, tmp_path):
        """Recognised by parsing: the "format" key may stand anywhere in the object."""
        plan = good_plan(k=2, layers=32)
        data = json.loads(plan.to_json())
        data = {"graph": data.pop("graph"), **data}  # the graph first: "format" far from the start
        text = json.dumps(data)
        assert text.index('"format"') > 4096
        path = tmp_path / "late.json"
        path.write_text(text)
        result = CliRunner().invoke(run_command, [str(path), "--micro-batches", "2", "--iters", "1", "--warmup",
                                                  "0", "--schedule", "partition-major"])
        assert result.exit_code == 0, result.output
        assert "plan: 2 group(s) (dp, OPTIMAL)" in result.output
        result = CliRunner().invoke(run_command, [str(path), "--capacity", "1MiB"])
        assert result.exit_code == 2 and "`--capacity` applies to a MODEL" in result.output
