"""`cachefit run --stage I` / `executor.run(deployment, stage=I)`: one stage of a two-level plan on one device."""

import json

import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402

import cachefit  # noqa: E402
from cachefit.cli import main  # noqa: E402
from cachefit.errors import InputError  # noqa: E402
from cachefit.executor import run  # noqa: E402
from cachefit.executor.verify import PlanRejected  # noqa: E402
from cachefit.graphs import transformer  # noqa: E402

TINY_GPT2 = {"model_type": "gpt2", "name": "tiny-gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 300,
             "n_positions": 64, "tie_word_embeddings": True}


def _deployment(granularity="op", on_chip=4, device=0.8):
    graph = transformer(TINY_GPT2, batch=2, seq_len=8, granularity=granularity)
    total = sum(data["weight_bytes"] for _, data in graph.nodes(data=True))
    deployment = cachefit.plan(graph, total // on_chip, devices=2, device_capacity=int(total * device),
                               solver="greedy")
    assert deployment.ok, deployment.reason
    return deployment


@pytest.fixture(scope="module")
def deployment():
    return _deployment()


@pytest.mark.parametrize("stage", [0, 1])
def test_each_stage_runs_every_schedule_equivalently(deployment, stage):
    result = run(deployment, stage=stage, schedule="all", warmup=0, iters=1)
    assert result.equivalent
    assert [s.name for s in result.schedules] == ["eager", "batched", "token-major", "partition-major"]
    assert len(result.groups) == deployment.groups[stage].k


def test_later_stage_takes_its_received_activations_and_a_head_tied_across_stages(deployment):
    sub = deployment.groups[1].graph
    received = [v for v in sub if sub.nodes[v]["op"] == "stage_input"]
    assert received and "lm_head" in sub and "embed" not in sub
    result = run(deployment, stage=1, schedule="partition-major", warmup=0, iters=1)
    assert result.equivalent
    assert any("seeded random inputs" in note for note in result.notes)
    elements = TINY_GPT2["vocab_size"] * TINY_GPT2["n_embd"]
    table, allocated = elements * 2, elements * 4  # planned in bf16; the CPU run allocates float32
    assert any("float32" in note for note in result.notes)
    assert (f"lm_head is tied to 'embed' in another stage: this stage holds its own copy of the table "
            f"({allocated:,} B as allocated), counted in lm_head's group") in result.notes
    # The plan counts the copy where the run allocates it: in the group that holds the head.
    assert sub.nodes["lm_head"]["weight_bytes"] == sub.nodes["lm_head"]["table_copy_bytes"] == table
    head_group = next(index for index, group in enumerate(deployment.groups[1].partitions) if "lm_head" in group)
    assert result.groups[head_group].weight_bytes >= allocated
    planned = cachefit.memory.group_sizes(sub, deployment.groups[1].partitions, memory=deployment.groups[1].memory)
    assert result.groups[head_group].planned_bytes == planned[head_group] >= table


def test_block_granularity_stage_runs():
    deployment = _deployment("block", on_chip=2, device=0.8)
    for stage in range(len(deployment.groups)):
        assert run(deployment, stage=stage, schedule="partition-major", warmup=0, iters=1).equivalent


def test_stage_is_required_and_checked(deployment):
    with pytest.raises(InputError, match=r"^this is a two-level plan \(version 2\) of 2 stage\(s\): 0 \("):
        run(deployment)
    with pytest.raises(InputError, match=r"`stage` must be an integer in 0\.\.1 \(the plan has 2 stage\(s\)\), got 2"):
        run(deployment, stage=2)
    with pytest.raises(InputError, match="`stage` applies to a two-level plan"):
        run(deployment.groups[0], stage=0)


def test_a_forged_stage_is_rejected_before_anything_runs(deployment, tmp_path):
    data = json.loads(deployment.to_json())
    data["stages"][1]["size"] += 1
    with pytest.raises((PlanRejected, InputError)):
        run(cachefit.result.read_plan(json.dumps(data)), stage=1)


def test_cli_stage(deployment, tmp_path):
    path = tmp_path / "p.json"
    deployment.to_json(path)
    runner = CliRunner()
    result = runner.invoke(main, ["run", str(path)])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "pass" not in result.output and "with --stage I" in result.output
    result = runner.invoke(main, ["run", str(path), "--stage", "1", "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert "tiny-gpt2 stage 1" in result.output
    assert json.loads((tmp_path / "r.json").read_text())["equivalent"] is True
    result = runner.invoke(main, ["run", str(path), "--stage", "7"])
    assert result.exit_code == 2
    assert "`stage` must be an integer in 0..1" in result.output


def test_cli_stage_on_a_single_level_plan_is_refused(deployment, tmp_path):
    path = tmp_path / "one.json"
    deployment.groups[0].to_json(path)
    result = CliRunner().invoke(main, ["run", str(path), "--stage", "0"])
    assert result.exit_code == 2
    assert "`--stage` applies to a two-level plan file (version 2)" in result.output


# -- the estimate next to the measurement (issue 12 item 4) ---------------------------------------------


def test_estimate_record_pairs_each_estimated_schedule_with_its_run():
    from cachefit.devices import get_device
    from cachefit.estimate import estimate
    from cachefit.executor import linear_stack
    from cachefit.executor.calibration import estimate_record, with_estimate

    graph = linear_stack(4, 32, batch=4, seq_len=8, dtype="fp32")
    plan = cachefit.plan(graph, "10KiB", chunk_fraction=0.25, solver="greedy")
    assert plan.k >= 2
    result = run(plan, micro_batches=4, schedule="all", warmup=0, iters=1)
    figures = get_device("h100")
    record = estimate_record(plan, result, figures)
    assert set(record["schedules"]) == {"partition-major", "token-major", "batched"}  # eager is not estimated
    predicted = estimate(plan, figures)
    for name, row in record["schedules"].items():
        assert row["estimate_ms"] == pytest.approx(predicted.schedule(name).time_s * 1e3)
        assert row["measured_ms"] == result.schedule(name).ms_per_pass
        assert row["error"] == pytest.approx((row["estimate_ms"] - row["measured_ms"]) / row["measured_ms"])
    assert record["chunks"] == record["run_chunks"] == 4 and record["notes"] == []
    assert json.loads(with_estimate(result, plan, figures).to_json())["estimate"]["schedules"].keys() == \
        record["schedules"].keys()


def test_estimate_record_says_when_the_run_differs_from_the_estimate(deployment):
    from cachefit.devices import get_device
    from cachefit.executor.calibration import estimate_record

    plan = deployment.groups[1]
    result = run(deployment, stage=1, micro_batches=2, schedule="partition-major", warmup=0, iters=1)
    record = estimate_record(plan, result, get_device("h100"))
    assert list(record["schedules"]) == ["partition-major"]
    assert record["notes"] == [
        "the estimate counts 1 chunk(s) per pass (the plan's chunk fraction), the run streamed 2",
        "the estimate counts the graph's bf16 bytes, the run computed in float32"]


def test_cli_json_carries_the_estimate(deployment, tmp_path):
    path = tmp_path / "p.json"
    deployment.to_json(path)
    out = tmp_path / "r.json"
    result = CliRunner().invoke(main, ["run", str(path), "--stage", "0", "--schedule", "partition-major",
                                       "--passes", "1", "--warmup", "0", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "estimate (measured device, probed now): partition-major" in result.output
    record = json.loads(out.read_text())["estimate"]
    assert record["device"]["name"] == "measured" and list(record["schedules"]) == ["partition-major"]
    assert record["schedules"]["partition-major"]["measured_ms"] > 0


# -- cachefit pipeline on a two-level plan: its stage level ----------------------------------------------


def test_cli_pipeline_runs_the_stage_level_of_a_two_level_plan(deployment, tmp_path):
    path = tmp_path / "p.json"
    deployment.to_json(path)
    result = CliRunner().invoke(main, ["pipeline", str(path), "-m", "2", "--iters", "1", "--warmup", "0",
                                       "--timeout", "240"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("two-level plan: running its 2 stage(s) (the stage level, both levels "
                                    "checked first); inside a stage each micro-batch runs the stage's nodes in order, "
                                    "not group by group (--inner partition-major runs the on-chip groups group by "
                                    "group over all micro-batches)")
    assert "PASS" in result.output


def test_inner_groups_follow_the_on_chip_plans(deployment):
    from cachefit.executor.stage import inner_groups

    groups = inner_groups(deployment)
    assert [[node for group in stage for node in group] for stage in groups] == \
        [list(nodes) for nodes in deployment.stages.partitions]
    # op granularity, no tiling: each on-chip group is a run of its stage's nodes, stage inputs left out
    for stage, plan in zip(groups, deployment.groups):
        assert stage == [[node for node in group if plan.graph.nodes[node]["op"] != "stage_input"]
                         for group in plan.partitions if any(plan.graph.nodes[node]["op"] != "stage_input"
                                                            for node in group)]


def test_partition_major_module_computes_the_same(deployment):
    from cachefit.executor.split import pipeline_module, split_spec
    from cachefit.executor.stage import inner_groups

    module, inputs = pipeline_module(deployment.stages)
    with torch.no_grad():
        reference = module(*inputs)
        module.run_partition_major(inner_groups(deployment), 2)
        torch.testing.assert_close(module(*inputs), reference)
    assert split_spec(deployment.stages, module) == {"boundaries.0": torch.distributed.pipelining.SplitPoint.BEGINNING}


@pytest.mark.parametrize("chunks", [0, -1, True, 2.0, "2"])
def test_partition_major_module_refuses_bad_chunks(deployment, chunks):
    from cachefit.executor.split import pipeline_module
    from cachefit.executor.stage import inner_groups

    module, _ = pipeline_module(deployment.stages)
    with pytest.raises(InputError, match="`chunks` must be a positive integer of row chunks"):
        module.run_partition_major(inner_groups(deployment), chunks)


def test_partition_major_module_refuses_chunks_that_do_not_divide_the_rows(deployment):
    from cachefit.executor.split import pipeline_module
    from cachefit.executor.stage import inner_groups

    module, inputs = pipeline_module(deployment.stages)
    rows = inputs[0].shape[0]
    for chunks in (rows + 1, rows * 2 + 1):
        module.run_partition_major(inner_groups(deployment), chunks)
        with pytest.raises(InputError, match=f"has {rows} row\\(s\\) along dimension 0, which the {chunks} row "
                                             "chunks each group runs over do not divide"):
            with torch.no_grad():
                module(*inputs)


def test_cli_pipeline_partition_major_inside_stages(deployment, tmp_path):
    path = tmp_path / "p.json"
    deployment.to_json(path)
    out = tmp_path / "r.json"
    result = CliRunner().invoke(main, ["pipeline", str(path), "-m", "2", "--iters", "1", "--warmup", "0",
                                       "--timeout", "240", "--inner", "partition-major", "--json", str(out)],
                                terminal_width=400)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("two-level plan: running its 2 stage(s) (both levels checked first); inside a "
                                    "stage the on-chip groups run one after another, each over all micro-batches")
    assert "PASS" in result.output
    text = " ".join(result.output.split())  # the console wraps long lines
    assert "bubble: 50.0% in theory ((S−1)/S = 1/2: partition-major stages hold the whole step)" in text
    record = json.loads(out.read_text())
    assert record["microbatches"] == 2 and record["equivalent"]
    assert any(note.startswith("partition-major stages: each stage holds the step's 2 micro-batch(es)")
               for note in record["notes"])


def test_cli_pipeline_partition_major_needs_two_levels(tmp_path):
    graph = transformer(TINY_GPT2, batch=2, seq_len=8)
    path = tmp_path / "one.json"
    cachefit.stages(graph, devices=2, device_capacity=10**9).to_json(path)
    result = CliRunner().invoke(main, ["pipeline", str(path), "-m", "2", "--inner", "partition-major"])
    assert result.exit_code == 2
    assert result.output.strip() == ("error: `--inner partition-major` runs the on-chip groups of a two-level plan "
                                     "(version 2, `cachefit plan MODEL --devices N ...`); this is a single-level plan")


def _forged(deployment, tmp_path, stage):
    """A plan file of `deployment` whose stage `stage` claims its first on-chip group is one byte larger."""
    data = json.loads(deployment.to_json())
    data["stages"][stage]["plan"]["sizes"][0] += 1
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    return path


def test_cli_pipeline_checks_both_levels_first(deployment, tmp_path):
    path = _forged(deployment, tmp_path, 1)
    result = CliRunner().invoke(main, ["pipeline", str(path), "-m", "2"])
    assert result.exit_code == 1
    assert result.output.startswith("plan rejected: `plan` fails cachefit.check: stage 1 on chip:")
    assert len(result.output.strip().splitlines()) == 1


def test_cli_run_stage_rejects_a_forged_two_level_plan(deployment, tmp_path):
    path = _forged(deployment, tmp_path, 0)
    result = CliRunner().invoke(main, ["run", str(path), "--stage", "1"])
    assert result.exit_code == 1
    assert result.output.startswith("plan rejected: `plan` fails cachefit.check: stage 0 on chip:")


def test_an_input_without_a_role_takes_the_role_left_over():
    from cachefit.executor.nodes import order_inputs

    roles = {"a": {"role": "v"}, "b": {}, "c": {"role": "q"}}
    assert order_inputs("attn", {"op": "attention"}, ["a", "b", "c"], roles.__getitem__) == ["c", "b", "a"]


def test_partition_major_stages_say_when_groups_run_merged(tmp_path, capsys):
    """Tiles of a node run whole, in the last group holding one: the pipeline says planned vs run group counts."""
    from cachefit.cli_stages import _stage_level
    from cachefit.executor.stage import inner_groups

    graph = transformer(TINY_GPT2, batch=2, seq_len=8, granularity="op")
    total = sum(data["weight_bytes"] for _, data in graph.nodes(data=True))
    deployment = cachefit.plan(graph, total // 12, devices=2, device_capacity=int(total * 0.8), solver="greedy",
                               tile=True)
    assert deployment.ok, deployment.reason
    planned = [group.k for group in deployment.groups]
    merged = [len(stage) for stage in inner_groups(deployment)]
    assert planned != merged  # the tiles of a node span groups here
    path = tmp_path / "p.json"
    deployment.to_json(path)
    _stage_level(str(path), "partition-major")
    text = " ".join(capsys.readouterr().out.split())
    assert (f"on-chip groups per stage as planned: {', '.join(map(str, planned))}; as run: "
            f"{', '.join(map(str, merged))}") in text
