"""Forged two-level (version-2) plan files: each is refused, by the reader (exit 2) or by the checker (exit 1).

Every forgery edits what a stage's on-chip plan says of its nodes or its
graph so that a merged group seems to fit, and restates the sizes the
checker would recompute from the edited graph: only the link between the
stage and its on-chip graph (each kept node equal to the model's, tiles and
expanded operators to theirs, graph attributes to the model's) can catch it.
"""

import copy
import json
import re

import pytest
from click.testing import CliRunner

from cachefit import InputError, check, instances
from cachefit.cli import main
from cachefit.deploy import Deployment, deploy
from cachefit.result import Plan, read_plan
from cachefit.units import format_bytes

CAPACITY = 30 * 2**20


@pytest.fixture(scope="module")
def kv2(tmp_path_factory):
    """The reviewer's plan: gpt2 over 2 devices, 30 MiB on chip, tiled, 128-token chunks, KV resident."""
    path = tmp_path_factory.mktemp("kv2") / "kv2.json"
    result = CliRunner().invoke(main, ["plan", "gpt2", "--devices", "2", "--device-capacity", "400MB",
                                       "--capacity", "30MiB", "--tile", "--chunk-tokens", "128", "--kv", "resident",
                                       "--json", str(path)])
    assert result.exit_code == 0, result.output
    return json.loads(path.read_text())


def forge(data, mode):
    """The reviewer's forge1.py: edit stage 0's on-chip graph, merge block.1 and block.2, restate the claims."""
    data = copy.deepcopy(data)
    inner = data["stages"][0]["plan"]
    by_id = {node["id"]: node for node in inner["graph"]["nodes"]}
    if mode == "window":
        for block in ("block.1", "block.2"):
            by_id[block]["sliding_window"] = 1
    elif mode == "perTok":
        for block in ("block.1", "block.2"):
            by_id[block]["kv_bytes_per_token"] = 0
    elif mode == "seq":
        inner["graph"]["graph"]["seq_len"] = 128
    elif mode == "weights":  # 4 MiB of weights moved from the merged blocks to blocks left alone: Σ unchanged
        delta = 4 * 2**20
        by_id["block.1"]["weight_bytes"] -= delta
        by_id["block.7"]["weight_bytes"] += delta
        by_id["block.2"]["weight_bytes"] -= delta
        by_id["block.6"]["weight_bytes"] += delta
    parts = inner["partitions"]
    index = parts.index(["block.1"])
    parts[index:index + 2] = [["block.1", "block.2"]]
    inner["k"] = len(parts)
    sizes = check(Plan.from_dict(inner)).sizes  # the sizes of the forged graph, as the forger restates them
    inner.update(sizes=list(sizes), bottleneck=max(sizes), lower_bound=min(inner["lower_bound"], inner["k"]))
    data["k"] = sum(stage["plan"]["k"] for stage in data["stages"])
    return data, sizes[index]


FORGERIES = {
    "window": ["stage 0 on chip: node 'block.1' has sliding_window 1 on chip, None in the model",
               "stage 0 on chip: node 'block.2' has sliding_window 1 on chip, None in the model"],
    "perTok": ["stage 0 on chip: node 'block.1' has kv_bytes_per_token 0 on chip, None in the model",
               "stage 0 on chip: node 'block.2' has kv_bytes_per_token 0 on chip, None in the model"],
    "seq": ["stage 0 on chip: the on-chip graph's `seq_len` is 128, the model's 1024"],
    "weights": ["stage 0 on chip: node 'block.1' has weight_bytes 9981440 B on chip, 14175744 B in the model",
                "stage 0 on chip: node 'block.2' has weight_bytes 9981440 B on chip, 14175744 B in the model",
                "stage 0 on chip: node 'block.6' has weight_bytes 18370048 B on chip, 14175744 B in the model",
                "stage 0 on chip: node 'block.7' has weight_bytes 18370048 B on chip, 14175744 B in the model"],
}


class TestForgedOnChipGraphs:
    def test_the_honest_plan_checks(self, kv2):
        assert check(read_plan(json.dumps(kv2))).ok

    @pytest.mark.parametrize("mode", FORGERIES)
    def test_forgery_is_refused_naming_stage_node_and_attribute(self, kv2, mode):
        data, claimed = forge(kv2, mode)
        assert claimed <= CAPACITY  # the forged group seems to fit, where the merged blocks really need more:
        merged = read_plan(json.dumps(kv2)).groups[0]
        index = list(merged.partitions).index(("block.1",))
        real = check(Plan.from_dict({**kv2["stages"][0]["plan"],
                                     "partitions": data["stages"][0]["plan"]["partitions"],
                                     "sizes": data["stages"][0]["plan"]["sizes"],
                                     "k": data["stages"][0]["plan"]["k"]}))
        assert real.sizes[index] > CAPACITY  # ≈ 33 MiB > 30 MiB
        report = check(read_plan(json.dumps(data)))
        assert list(report.violations) == FORGERIES[mode]

    @pytest.mark.parametrize("mode", FORGERIES)
    def test_cli_check_exits_1(self, kv2, mode, tmp_path):
        data, _ = forge(kv2, mode)
        path = tmp_path / f"forged_{mode}.json"
        path.write_text(json.dumps(data))
        result = CliRunner().invoke(main, ["check", str(path)])
        assert result.exit_code == 1, result.output
        assert f"{len(FORGERIES[mode])} violation(s)" in result.output
        for line in FORGERIES[mode]:
            assert f"  - {line}\n" in result.output

    def test_any_kept_attribute_counts(self, kv2):
        data = copy.deepcopy(kv2)
        node = next(node for node in data["stages"][1]["plan"]["graph"]["nodes"] if node["id"] == "block.9")
        node["op"], node["layer"] = "linear", 3
        violations = check(read_plan(json.dumps(data))).violations
        assert "stage 1 on chip: node 'block.9' has layer 3 on chip, 9 in the model" in violations
        assert "stage 1 on chip: node 'block.9' has op 'linear' on chip, 'block' in the model" in violations

    def test_stage_input_holds_only_its_producers_output(self, kv2):
        data = copy.deepcopy(kv2)
        node = next(node for node in data["stages"][1]["plan"]["graph"]["nodes"] if node["id"] == "block.7")
        node["weight_bytes"] = 10**8
        report = check(read_plan(json.dumps(data)))
        assert ("stage 1 on chip: stage_input 'block.7' has weight_bytes 100000000; a stage input holds only its "
                "producer's output bytes") in report.violations

    def test_a_stage_input_listed_twice_is_named(self, kv2):
        data = copy.deepcopy(kv2)
        data["stages"][1]["plan"]["partitions"][0].insert(1, "block.7")
        assert check(read_plan(json.dumps(data))).violations == (
            "stage 1 on chip: node 'block.7' (this stage's stage_input: the output of that node, which runs in an "
            "earlier stage) is listed twice in group 0",)

    def test_a_node_of_another_stage_on_chip(self, kv2):
        data = copy.deepcopy(kv2)
        data["stages"][0]["nodes"].remove("block.7")
        data["stages"][1]["nodes"].insert(0, "block.7")
        data["stages"][1]["plan"]["partitions"][0].insert(0, "block.7")
        assert ("stage 0 on chip: 1 on-chip node(s) are not nodes of this stage, first 'block.7'"
                in check(read_plan(json.dumps(data))).violations)


@pytest.fixture(scope="module")
def expanded():
    """gpt2 at 128 tokens, 8 MiB on chip, tiled: stage 0 expands its blocks into operators and tiles the table."""
    plan = deploy(instances.load("gpt2", seq_len=128), devices=2, device_capacity="400MB", capacity="8MiB",
                  tile=True, solver="greedy")
    assert plan.groups[0].ok and plan.groups[0].graph.graph["expanded_blocks"]
    assert check(plan).ok
    return json.loads(plan.to_json())


class TestForgedOperatorsAndTiles:
    def edit(self, data, node_id, **changes):
        data = copy.deepcopy(data)
        node = next(node for node in data["stages"][0]["plan"]["graph"]["nodes"] if node["id"] == node_id)
        node.update(changes)
        return check(read_plan(json.dumps(data))).violations

    def test_operator_window(self, expanded):
        assert self.edit(expanded, "block.0.attn", sliding_window=1) == (
            "stage 0 on chip: node 'block.0.attn' (an operator of 'block.0') has sliding_window 1 on chip, None in "
            "the model",)

    def test_operator_weights_moved_between_operators(self, expanded):
        data = copy.deepcopy(expanded)
        nodes = {node["id"]: node for node in data["stages"][0]["plan"]["graph"]["nodes"]}
        nodes["block.0.q"]["weight_bytes"] -= 10**6
        nodes["block.0.k"]["weight_bytes"] += 10**6
        violations = check(read_plan(json.dumps(data))).violations
        assert len(violations) == 2 and all("weight_bytes" in line and "an operator of 'block.0'" in line
                                            for line in violations)

    def test_tile_output_shrunk(self, expanded):
        tile = next(node for node in expanded["stages"][0]["plan"]["graph"]["nodes"] if node["id"] == "embed.tile.3")
        violations = self.edit(expanded, "embed.tile.3", activation_bytes=0)
        assert (f"stage 0 on chip: node 'embed': its cat-joined tiles output "
                f"{expanded_embed_output(expanded) - tile['activation_bytes']} B of activation_bytes, the model's "
                f"node {expanded_embed_output(expanded)} B") in violations

    def test_tile_attribute(self, expanded):
        assert self.edit(expanded, "embed.tile.0", num_embeddings=1) == (
            "stage 0 on chip: node 'embed': tile 'embed.tile.0' has num_embeddings 1 on chip, 50257 in the model",)


def expanded_embed_output(data):
    return next(node for node in data["graph"]["nodes"] if node["id"] == "embed")["activation_bytes"]


class TestStageGraphAttributesAreRead:
    """A stage's on-chip graph is read as the top-level graph is (one function): one line, exit 2."""

    @pytest.mark.parametrize("key, value, message", [
        ("seq_len", "x", "plan field 'stages[0].plan.graph.graph.seq_len' must be a positive integer of tokens "
                         "(at most 4,294,967,296), got 'x'"),
        ("batch", 0, "plan field 'stages[0].plan.graph.graph.batch' must be a positive integer of sequences "
                     "(at most 4,294,967,296), got 0"),
        ("context", -1, "plan field 'stages[0].plan.graph.graph.context' must be a non-negative integer of tokens "
                        "(at most 4,294,967,296), got -1"),
        ("dtype", "fp 32", "plan field 'stages[0].plan.graph.graph.dtype' must name a data type (fp32, bf16, fp16, "
                           "fp8, int8, or a torch dtype such as float64 for an imported graph), got 'fp 32'"),
        ("phase", "train", "plan field 'stages[0].plan.graph.graph.phase' must be 'prefill' or 'decode', "
                           "got 'train'"),
        ("config", {"hidden_size": "x"}, "plan field 'stages[0].plan.graph.graph.config': `config['hidden_size']` "
                                         "must be a positive integer, got 'x'"),
        ("config", [1], "plan field 'stages[0].plan.graph.graph.config' must be an object, got list"),
        ("stage", 1, "plan field 'stages[0].plan.graph.graph.stage' must be 0 (the on-chip graph of stage 0), "
                     "got 1"),
    ])
    def test_refused(self, kv2, key, value, message, tmp_path):
        data = copy.deepcopy(kv2)
        data["stages"][0]["plan"]["graph"]["graph"][key] = value
        with pytest.raises(InputError, match=f"^{re.escape(message)}$"):
            read_plan(json.dumps(data))
        path = tmp_path / "p.json"
        path.write_text(json.dumps(data))
        for command in (["check"], ["show"], ["estimate"], ["run", "--stage", "0"]):
            result = CliRunner().invoke(main, [*command, str(path)])
            assert result.exit_code == 2, (command, result.output)
            assert result.output == f"error: {message}\n", command

    def test_top_level_graph_is_read_by_the_same_rules(self, kv2):
        data = copy.deepcopy(kv2)
        data["graph"]["graph"]["seq_len"] = "x"
        with pytest.raises(InputError, match=re.escape("plan field 'graph.graph.seq_len' must be a positive")):
            read_plan(json.dumps(data))
        single = copy.deepcopy(kv2["stages"][0]["plan"])
        single["graph"]["graph"]["dtype"] = 64
        with pytest.raises(InputError, match=re.escape("plan field 'graph.graph.dtype' must name a data type")):
            read_plan(json.dumps(single))

    @pytest.mark.parametrize("key, value, line", [
        ("batch", 4, "stage 0 on chip: the on-chip graph's `batch` is 4, the model's 1"),
        ("dtype", "fp32", "stage 0 on chip: the on-chip graph's `dtype` is 'fp32', the model's 'bf16'"),
        ("context", 7, "stage 0 on chip: the on-chip graph's `context` is 7, the model's None"),
    ])
    def test_valid_but_not_the_models(self, kv2, key, value, line):
        data = copy.deepcopy(kv2)
        data["stages"][0]["plan"]["graph"]["graph"][key] = value
        assert line in check(read_plan(json.dumps(data))).violations

    def test_config_differs(self, kv2):
        data = copy.deepcopy(kv2)
        data["stages"][1]["plan"]["graph"]["graph"]["config"]["num_key_value_heads"] = 1
        assert ("stage 1 on chip: the on-chip graph's `config` differs from the model's at 'num_key_value_heads': "
                "1, the model's 12") in check(read_plan(json.dumps(data))).violations


HUGE = 10**400


class TestCapacityBeyondAnyFloat:
    @pytest.mark.parametrize("where, field", [
        (lambda data: data.__setitem__("capacity", HUGE), "capacity"),
        (lambda data: data.__setitem__("device_capacity", HUGE), "device_capacity"),
        (lambda data: data["stages"][1]["plan"].__setitem__("capacity", HUGE), "stages[1].plan.capacity"),
        (lambda data: data.__setitem__("device_capacity", 2**62 + 1), "device_capacity"),
    ])
    def test_version_2(self, kv2, where, field, tmp_path):
        data = copy.deepcopy(kv2)
        where(data)
        path = tmp_path / "p.json"
        path.write_text(json.dumps(data))
        for command in (["check"], ["show"], ["estimate"], ["run", "--stage", "0"]):
            result = CliRunner().invoke(main, [*command, str(path)])
            assert result.exit_code == 2, (command, result.output)
            assert result.output.startswith(f"error: plan field '{field}' must be at most 2**62 B (4 EiB)")
            assert result.output.count("\n") == 1

    def test_version_1(self, kv2, tmp_path):
        single = copy.deepcopy(kv2["stages"][0]["plan"])
        single["capacity"] = HUGE
        path = tmp_path / "p.json"
        path.write_text(json.dumps(single))
        for command in (["check"], ["show"], ["estimate"]):
            result = CliRunner().invoke(main, [*command, str(path)])
            assert result.exit_code == 2, (command, result.output)
            assert result.output == ("error: plan field 'capacity' must be at most 2**62 B (4 EiB), the most "
                                     "cachefit's exact integer arithmetic holds, got an integer of 401 digits\n")

    def test_capacity_of_2_62_is_read(self, kv2):
        data = copy.deepcopy(kv2)
        data["stages"][1]["plan"]["capacity"] = 2**62
        assert read_plan(json.dumps(data)).groups[1].capacity == 2**62

    def test_format_bytes_takes_any_integer(self):
        assert format_bytes(HUGE) == "8.9e+384 PiB"
        assert format_bytes(2**62) == "4096.0 PiB"
        assert format_bytes(10**30, binary=False) == "1000000000000000.0 PB"


def test_launch_us_named_as_typed(kv2, tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(kv2))
    for typed, shown in (("-5", "-5"), ("-0.5", "-0.5"), ("nan", "nan")):
        result = CliRunner().invoke(main, ["estimate", str(path), f"--launch-us={typed}"])
        assert result.exit_code == 2
        assert result.output == f"error: `--launch-us` must be a non-negative number of microseconds, got {shown}\n"


def test_in_memory_deployment_with_a_forged_graph(kv2):
    """The checker, not only the reader: a Deployment built in memory with an edited on-chip graph."""
    plan = read_plan(json.dumps(kv2))
    graph = plan.groups[0].graph.copy()
    graph.nodes["block.3"]["activation_bytes"] = 0
    forged = Deployment(plan.stages, (Plan(**{**plan.groups[0].__dict__, "graph": graph}), *plan.groups[1:]))
    assert ("stage 0 on chip: node 'block.3' has activation_bytes 0 B on chip, "
            f"{plan.stages.graph.nodes['block.3']['activation_bytes']} B in the model") in check(forged).violations


def test_a_float64_import_reads_back(tmp_path):
    """Every plan file cachefit writes, it reads back: an fp64 module imported with from_torch has dtype 'float64'."""
    torch = pytest.importorskip("torch")
    import cachefit
    from cachefit.graphs.torch_import import from_torch

    module = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).double()
    graph = from_torch(module, torch.zeros(2, 8, dtype=torch.float64))
    assert graph.graph["dtype"] == "float64"
    plan = cachefit.plan(graph, "1KiB", solver="greedy")
    path = tmp_path / "p.json"
    plan.to_json(path)
    assert read_plan(path.read_text()).sizes == plan.sizes
    result = CliRunner().invoke(main, ["check", str(path)])
    assert result.exit_code == 0, result.output
