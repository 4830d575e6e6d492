import json
import re

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cachefit
from cachefit import InputError, Plan, check, estimate, instances
from cachefit.cli import main
from cachefit.deploy import Deployment, deploy, stage_graph
from cachefit.graphs import from_layers
from cachefit.result import read_plan

from strategies import capacities, graphs


def chain():
    graph = from_layers([{"weight_bytes": 300, "activation_bytes": 50, "flops": 1000}] * 6)
    graph.graph.update(batch=1, seq_len=1)
    return graph


class TestDeploy:
    def test_two_levels_checked(self):
        result = deploy(chain(), devices=2, device_capacity=1200, capacity=400, solver="greedy")
        assert result.ok and result.devices == 2
        assert result.stages.partitions == (("0", "1", "2"), ("3", "4", "5"))
        assert [group.k for group in result.groups] == [3, 3] and result.k == 6
        assert all(report.ok for report in result.check())

    def test_stage_input_counts_the_received_activation(self):
        graph = chain()
        sub = stage_graph(graph, ("3", "4", "5"), 1)
        assert list(sub) == ["2", "3", "4", "5"]
        assert sub.nodes["2"] == {"op": "stage_input", "weight_bytes": 0, "activation_bytes": 50, "buffer_bytes": 0,
                                  "flops": 0, "params": 0}
        assert sub.graph["name"].endswith("stage 1") and "stage" not in graph.graph

    def test_stage_plan_failure_is_reported(self):
        result = deploy(chain(), devices=1, device_capacity=1000, capacity=400)
        assert not result.ok and result.groups == ()
        assert "the smallest device count that fits is 3" in result.stages.reason

    def test_on_chip_failure_is_reported(self):
        result = deploy(chain(), devices=2, device_capacity=1200, capacity=200, solver="greedy")
        assert not result.ok and result.stages.ok
        assert all(str(group.status) == "INFEASIBLE" for group in result.groups)

    def test_stage_graphs_bottleneck_and_memory(self):
        """What on-chip advice reads of a deployment: each stage's graph, the largest group, the on-chip model
        (gpt2 on 2 devices: stage 1's lm_head carries its own copy of the tied table, 77,194,752 B)."""
        graph = instances.load("gpt2")
        result = deploy(graph, devices=2, device_capacity="1GiB", capacity="20MiB", tile=True, chunk_tokens="auto",
                        solver="greedy")
        assert result.ok and all(report.ok for report in result.check())
        subs = result.stage_graphs()
        assert [sorted(v for v in sub if sub.nodes[v].get("op") != "stage_input") for sub in subs] == [
            sorted(nodes) for nodes in result.stages.partitions]
        assert subs[1].nodes["lm_head"]["weight_bytes"] == 77_194_752
        assert result.bottleneck == max(group.bottleneck for group in result.groups) <= 20 * 2**20
        assert result.memory == "liveness" and result.stages.memory == "liveness+kv"
        failed = deploy(graph, devices=2, device_capacity="1GiB", capacity="20MiB", solver="greedy")
        assert failed.stages.ok and not failed.ok and failed.bottleneck == 0 and len(failed.stage_graphs()) == 2
        none = deploy(graph, devices=1, device_capacity="100MiB", capacity="20MiB")
        assert none.stage_graphs() == () and none.memory is None and none.bottleneck == 0

    def test_json_round_trip(self, tmp_path):
        result = deploy(chain(), devices=2, device_capacity=1200, capacity=400, solver="greedy")
        path = tmp_path / "d.json"
        result.to_json(path)
        again = Deployment.from_json(path)
        assert again.stages.partitions == result.stages.partitions
        assert [group.partitions for group in again.groups] == [group.partitions for group in result.groups]
        assert all(check(group).ok for group in again.groups)

    def test_bad_json(self):
        with pytest.raises(InputError, match=r'^not a cachefit plan: expected "format": "cachefit.plan"$'):
            Deployment.from_json('{"format": "cachefit.planx"}')
        with pytest.raises(InputError, match=r"^unsupported plan version None; this cachefit reads versions 1 and 2$"):
            Deployment.from_json('{"format": "cachefit.plan"}')

    def test_estimate_places_groups_by_stage(self):
        result = deploy(chain(), devices=2, device_capacity=1200, capacity=400, solver="greedy")
        predicted = estimate(result, "h100")
        assert predicted.devices == 2
        assert [group.device for group in predicted.groups] == [0, 0, 0, 1, 1, 1]
        # stage 1's first group receives the activation of node 2 from device 0
        assert predicted.groups[3].input_bytes == 50
        with pytest.raises(InputError, match=r"^`devices` is fixed by the deployment's 2 stages, got 3$"):
            estimate(result, "h100", devices=3)

    def test_decode_transformer(self):
        graph = instances.load("llama-3.1-8b", phase="decode", context=1024, batch=4)
        result = deploy(graph, devices=2, device_capacity="h100-hbm", capacity="h100-l2", tile=True, solver="greedy")
        assert result.ok and all(report.ok for report in result.check())
        kv = sum(data.get("kv_bytes", 0) for group in result.groups for _, data in group.graph.nodes(data=True))
        assert kv == graph.graph["kv_bytes"]


class TestDeployCli:
    def test_deploy_then_estimate(self, tmp_path):
        path = tmp_path / "d.json"
        runner = CliRunner()
        result = runner.invoke(main, ["deploy", "llama-3.1-8b", "--phase", "decode", "--context", "1024", "--batch",
                                      "4", "--devices", "2", "--device-capacity", "h100-hbm", "--capacity",
                                      "h100-l2", "--tile", "--solver", "greedy", "--json", str(path)])
        assert result.exit_code == 0, result.output
        assert "check: ok (3 plans recomputed independently" in result.output
        data = json.loads(path.read_text())
        assert (data["format"], data["version"]) == ("cachefit.plan", 2)
        result = runner.invoke(main, ["estimate", str(path), "--device", "h100"])
        assert result.exit_code == 0, result.output
        assert "each stage's groups on its device" in result.output


class TestDeployKv:
    def test_stages_count_the_cache_and_on_chip_follows_kv(self):
        graph = from_layers([{"weight_bytes": 300, "activation_bytes": 50, "flops": 1000}] * 4)
        graph.graph.update(batch=1, seq_len=1)
        for node in graph:
            graph.nodes[node]["kv_bytes"] = 100
        streamed = deploy(graph, devices=2, device_capacity=1000, capacity=400, solver="greedy")
        assert streamed.stages.memory == "liveness+kv" and streamed.stages.sizes == (900, 950)  # 600 W + 200 KV + live
        assert [group.memory for group in streamed.groups] == ["liveness", "liveness"]
        resident = deploy(graph, devices=2, device_capacity=1000, capacity=500, kv="resident", solver="greedy")
        assert [group.memory for group in resident.groups] == ["liveness+kv", "liveness+kv"]
        assert all(report.ok for report in resident.check())


def legacy(result):
    """The unreleased ``cachefit.deployment`` form of `result`."""
    return json.dumps({"format": "cachefit.deployment", "version": 1, "stages": result.stages.to_dict(),
                       "groups": [group.to_dict() for group in result.groups]})


class TestPlanFileVersion2:
    def test_layout(self):
        result = deploy(chain(), devices=2, device_capacity=1200, capacity=400, solver="greedy")
        data = json.loads(result.to_json())
        assert {key: data[key] for key in ("format", "version", "devices", "device_capacity", "capacity", "status",
                                           "k", "reason")} == {
            "format": "cachefit.plan", "version": 2, "devices": 2, "device_capacity": 1200, "capacity": 400,
            "status": "FEASIBLE", "k": 6, "reason": ""}
        assert data["stage_level"]["memory"] == "liveness+kv" and data["stage_level"]["status"] == "OPTIMAL"
        assert [(stage["device"], stage["nodes"], stage["size"]) for stage in data["stages"]] == [
            (0, ["0", "1", "2"], 1050), (1, ["3", "4", "5"], 1100)]
        # each stage's on-chip plan is an ordinary (version 1) plan file
        inner = Plan.from_dict(data["stages"][1]["plan"])
        assert inner.k == 3 and check(inner).ok and "2" in inner.graph

    def test_round_trip_and_read_plan(self, tmp_path):
        result = deploy(chain(), devices=2, device_capacity=1200, capacity=400, solver="greedy")
        path = tmp_path / "d.json"
        result.to_json(path)
        again = read_plan(path)
        assert isinstance(again, Deployment)
        assert again.stages.partitions == result.stages.partitions and again.stages.sizes == result.stages.sizes
        assert [group.partitions for group in again.groups] == [group.partitions for group in result.groups]
        assert (again.devices, again.k, again.capacity, again.device_capacity) == (2, 6, 400, 1200)
        assert check(again).ok and all(again.check())
        single = cachefit.plan(chain(), 400, solver="greedy")
        assert isinstance(read_plan(single.to_json()), Plan)

    def test_failed_stage_level_round_trips(self):
        result = deploy(chain(), devices=1, device_capacity=1000, capacity=400)
        again = read_plan(result.to_json())
        assert not again.ok and again.status == "INFEASIBLE" and again.devices == 1 and again.capacity == 400
        assert again.reason.startswith("stages: 1 device(s) of 1000 B")
        assert check(again).ok  # a consistent plan without groups

    def test_legacy_deployment_file_is_read(self):
        result = deploy(chain(), devices=2, device_capacity=1200, capacity=400, solver="greedy")
        again = read_plan(legacy(result))
        assert again.k == 6 and check(again).ok

    def test_versions(self):
        result = deploy(chain(), devices=2, device_capacity=1200, capacity=400, solver="greedy")
        data = json.loads(result.to_json())
        for version in (3, 0, "2", True, None):
            with pytest.raises(InputError, match=rf"^unsupported plan version {re.escape(repr(version))}; "
                                                 r"this cachefit reads versions 1 and 2$"):
                read_plan(json.dumps({**data, "version": version}))
        with pytest.raises(InputError, match=r"^this is a two-level plan \(version 2: stages across devices, on-chip "
                                             r"groups in each\), not a single-level plan; `cachefit check`/`estimate`/"
                                             r"`show` and cachefit.result.read_plan read it, and each stage's \"plan\" "
                                             r"field is a single-level plan$"):
            Plan.from_json(result.to_json())
        single = cachefit.plan(chain(), 400, solver="greedy").to_json()
        with pytest.raises(InputError, match=r"^this is a single-level plan \(version 1\)"):
            Deployment.from_json(single)

    @pytest.mark.parametrize("change, message", [
        (lambda d: d.update(k=7), r"^plan field 'k' is 7, but the stages give 6$"),
        (lambda d: d.update(status="OPTIMAL"), r"^plan field 'status' is 'OPTIMAL', but the stages give 'FEASIBLE'$"),
        (lambda d: d.update(devices=3), r"^plan field 'devices' is 3, but the stages give 2$"),
        (lambda d: d["stages"][1].update(device=0),
         r"^plan field 'stages\[1\]\.device' must be 1 \(stage i runs on device i\), got 0$"),
        (lambda d: d["stages"][0].pop("nodes"), r"^plan field 'stages\[0\]\.nodes' is missing$"),
        (lambda d: d["stages"][1]["nodes"].__setitem__(2, 7),
         r"^plan field 'stages\[1\]\.nodes\[2\]' must be a node id \(a string\), got int$"),
        (lambda d: d["stages"][0].update(plan=None),
         r"^plan field 'stages\[0\]\.plan' is null, but other stages have an on-chip plan: either every stage "
         r"has one or none has$"),
        (lambda d: d["stages"].__setitem__(1, []), r"^plan field 'stages\[1\]' must be an object, got list$"),
        (lambda d: d.pop("stage_level"), r"^plan field 'stage_level' is missing$"),
        (lambda d: d["stage_level"].update(memory=3), r"^plan field 'stage_level\.memory' has the wrong type: int$"),
        (lambda d: d["stage_level"].update(status="DONE"),
         r"^plan field 'stage_level\.status' must be one of OPTIMAL, FEASIBLE, INFEASIBLE, UNKNOWN, got 'DONE'$"),
        (lambda d: d["stage_level"].update(stats=[]), r"^plan field 'stage_level\.stats' has the wrong type: list$"),
        (lambda d: d.update(capacity="50MiB"), r"^plan field 'capacity' has the wrong type: str$"),
        (lambda d: d["graph"]["nodes"][0].update(weight_bytes=-1),
         r"^plan field 'graph': node '0': `weight_bytes` must be a non-negative integer, got -1$"),
        (lambda d: d["stages"][1]["plan"].update(sizes=["a"]),
         r"^plan field 'stages\[1\]\.plan\.sizes' must be a list of integers$"),
        (lambda d: d["stages"][0]["plan"].pop("memory"), r"^plan field 'stages\[0\]\.plan\.memory' is missing$"),
        (lambda d: d["stages"][1]["plan"].update(version=5),
         r"^plan field 'stages\[1\]\.plan': unsupported plan version 5; this cachefit reads versions 1 and 2$"),
        (lambda d: d["stages"][1]["plan"]["graph"]["nodes"][1].update(activation_bytes=-5),
         r"^plan field 'stages\[1\]\.plan\.graph': node '3': `activation_bytes` must be a non-negative integer, "
         r"got -5$"),
        (lambda d: d["stages"][1]["plan"]["graph"]["nodes"][0].pop("id"),
         r"^plan field 'stages\[1\]\.plan\.graph': nodes\[0\] must be an object with an \"id\"$"),
    ])
    def test_malformed(self, change, message):
        data = json.loads(deploy(chain(), devices=2, device_capacity=1200, capacity=400, solver="greedy").to_json())
        change(data)
        with pytest.raises(InputError, match=message):
            read_plan(json.dumps(data))


class TestCheckBothLevels:
    def data(self):
        return json.loads(deploy(chain(), devices=2, device_capacity=1200, capacity=400, solver="greedy").to_json())

    def test_forged_stage_size(self):
        data = self.data()
        data["stages"][0]["size"] = 1000
        report = check(read_plan(json.dumps(data)))
        assert not report.ok
        assert report.violations == ("stages: stated sizes [1000, 1100] differ from recomputed [1050, 1100]",)

    def test_on_chip_graph_lighter_than_its_stage(self):
        data = self.data()
        inner = data["stages"][1]["plan"]
        node = next(node for node in inner["graph"]["nodes"] if node["id"] == "4")
        node["weight_bytes"] = 200
        inner["sizes"] = [size - 100 if index == 1 else size for index, size in enumerate(inner["sizes"])]
        report = check(read_plan(json.dumps(data)))
        assert report.violations == ("stage 1 on chip: the on-chip graph holds 800 B of weight_bytes, its stage 900 B",
                                     "stage 1 on chip: node '4' has weight_bytes 200 B on chip, 300 B in the model")

    def test_missing_stage_input(self):
        data = self.data()
        inner = data["stages"][1]["plan"]
        inner["graph"]["nodes"] = [node for node in inner["graph"]["nodes"] if node["id"] != "2"]
        inner["graph"]["edges"] = [edge for edge in inner["graph"]["edges"] if edge["source"] != "2"]
        report = check(read_plan(json.dumps(data)))
        assert "stage 1 on chip: stage_input '2' is missing" in report.violations

    def test_on_chip_plan_of_another_stage(self):
        data = self.data()
        data["stages"][0]["plan"], data["stages"][1]["plan"] = data["stages"][1]["plan"], data["stages"][0]["plan"]
        data["k"] = 6
        with pytest.raises(InputError, match=re.escape("plan field 'stages[0].plan.graph.graph.stage' must be 0 "
                                                       "(the on-chip graph of stage 0), got 1")):
            read_plan(json.dumps(data))
        plan = read_plan(json.dumps(self.data()))
        report = check(Deployment(plan.stages, plan.groups[::-1]))  # built in memory: the checker's own finding
        assert report.violations == (
            "stage 0 on chip: the on-chip graph's `stage` is 1, not 0",
            "stage 0 on chip: stage_input '2' stands for a node of this stage (a stage input is the output of a "
            "producer in an earlier stage)",
            "stage 0 on chip: 3 stage node(s) are not in the on-chip graph, first '0'",
            "stage 0 on chip: 3 on-chip node(s) are not nodes of this stage, first '3'",
            "stage 1 on chip: the on-chip graph's `stage` is 0, not 1",
            "stage 1 on chip: stage_input '2' is missing",
            "stage 1 on chip: 3 stage node(s) are not in the on-chip graph, first '3'",
            "stage 1 on chip: 3 on-chip node(s) are not nodes of this stage, first '0'")


class TestPlanDevices:
    def test_api(self):
        result = cachefit.plan(chain(), 400, devices=2, device_capacity=1200, solver="greedy")
        assert isinstance(result, Deployment) and result.k == 6 and check(result).ok
        assert [group.memory for group in result.groups] == ["liveness", "liveness"]
        resident = cachefit.plan(chain(), 400, devices=2, device_capacity=1200, solver="greedy", memory="liveness+kv")
        assert [group.memory for group in resident.groups] == ["liveness+kv", "liveness+kv"]

    @pytest.mark.parametrize("kwargs, message", [
        ({"devices": 2}, r"^`devices` plans stages across devices and needs `device_capacity` too$"),
        ({"device_capacity": 1200}, r"^`device_capacity` plans stages across devices and needs `devices` too$"),
        ({"devices": 2, "device_capacity": 1200, "k": 3},
         r"^`k` fixes the number of groups of a single-level plan; with `devices`, each stage gets its fewest "
         r"on-chip groups \(got k=3\)$"),
    ])
    def test_bad_arguments(self, kwargs, message):
        with pytest.raises(InputError, match=message):
            cachefit.plan(chain(), 400, **kwargs)

    def test_cli_plan_check_estimate_show(self, tmp_path):
        path = tmp_path / "p.json"
        runner = CliRunner()
        result = runner.invoke(main, ["plan", "llama-3.1-8b", "--phase", "decode", "--context", "1024", "--batch", "4",
                                      "--devices", "2", "--device-capacity", "h100-hbm", "--capacity", "h100-l2",
                                      "--tile", "--solver", "greedy", "--json", str(path), "-q"])
        assert result.exit_code == 0, result.output
        assert "check: ok (3 plans recomputed independently" in result.output
        assert json.loads(path.read_text())["version"] == 2
        result = runner.invoke(main, ["check", str(path)])
        assert result.exit_code == 0, result.output
        assert result.output.startswith("ok: 2 stage(s) within 74.5 GiB each (status OPTIMAL); ")
        result = runner.invoke(main, ["estimate", str(path), "--device", "h100"])
        assert result.exit_code == 0, result.output
        result = runner.invoke(main, ["show", str(path)])
        assert result.exit_code == 0 and "2 device(s) × on-chip groups" in result.output
        result = runner.invoke(main, ["show", str(path), "--plot", str(tmp_path / "p.png")])
        assert result.exit_code == 2
        assert "`--plot`/`--dot` draw a single-level plan; PLAN_FILE is a two-level plan (version 2)" in result.output

    def test_cli_check_violations(self, tmp_path):
        data = json.loads(deploy(chain(), devices=2, device_capacity=1200, capacity=400, solver="greedy").to_json())
        data["stages"][0]["size"] = 1000
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(data))
        result = CliRunner().invoke(main, ["check", str(path)])
        assert result.exit_code == 1
        assert result.output.splitlines() == [
            "1 violation(s):", "  - stages: stated sizes [1000, 1100] differ from recomputed [1050, 1100]"]

    def test_run_refuses_version_2_in_one_line(self, tmp_path):
        path = tmp_path / "p.json"
        deploy(chain(), devices=2, device_capacity=1200, capacity=400, solver="greedy").to_json(path)
        result = CliRunner().invoke(main, ["run", str(path)])
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
        assert "this is a two-level plan (version 2" in result.output

    def test_cli_refuses_single_level_options(self, tmp_path):
        layers = tmp_path / "layers.json"
        layers.write_text(json.dumps([300] * 6))
        for extra, flag in ((["--k", "3"], "--k"), (["--solver", "all"], "--solver all")):
            result = CliRunner().invoke(main, ["plan", str(layers), "-c", "400", "--devices", "2",
                                               "--device-capacity", "1200", *extra])
            assert result.exit_code == 2
            assert f"`{flag}` applies to a single-level plan, not with `--devices`" in result.output


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), graph=graphs(min_nodes=1, max_nodes=8), devices=st.integers(1, 3),
       kv=st.sampled_from(["streamed", "resident"]))
def test_property_every_deployment_round_trips_and_checks(data, graph, devices, kv):
    """Whatever deploy returns, its version-2 file reads back equal and passes the check of both levels."""
    for node in graph:
        graph.nodes[node]["kv_bytes"] = data.draw(st.integers(0, 50), label=f"kv {node}")
    total = sum(d["weight_bytes"] + d["activation_bytes"] + d["buffer_bytes"] + d["kv_bytes"]
                for _, d in graph.nodes(data=True))
    device_capacity = data.draw(st.integers(1, total + 1), label="device_capacity")
    capacity = data.draw(capacities(graph), label="capacity")
    result = deploy(graph, devices=devices, device_capacity=device_capacity, capacity=capacity, kv=kv,
                    solver="greedy")
    again = read_plan(result.to_json())
    assert isinstance(again, Deployment)
    assert (again.status, again.k, again.devices, again.capacity) == (result.status, result.k, result.devices,
                                                                      result.capacity)
    assert again.stages == result.stages and again.groups == result.groups
    assert check(again).ok and all(again.check())


@pytest.mark.parametrize("name, options", [
    ("qwen1.5-moe-a2.7b", {"phase": "decode", "context": 256}),  # expert tiles joined by a sum
    ("bert-large", {"granularity": "op"}),  # the embedding that holds its norm
])
def test_real_models_check_at_both_levels_after_a_round_trip(name, options):
    graph = instances.load(name, **options)
    result = deploy(graph, devices=3, device_capacity="h100-hbm", capacity="h100-l2", tile=True, solver="greedy",
                    kv="resident")
    again = read_plan(result.to_json())
    assert result.ok and again.k == result.k
    report = check(again)
    assert report.ok, report.violations


def _tied_llama(**options):
    """llama-3.1-8b's config with its embedding tied to the LM head (as Llama 3.2 1B/3B ship)."""
    from pathlib import Path

    from cachefit.graphs import transformer

    config = json.loads((Path(instances.__file__).parent / "data" / "llama-3.1-8b.json").read_text())["config"]
    return transformer({**config, "tie_word_embeddings": True}, **options)


def _unmarked_sizes(plan, graph):
    """The stage sizes of `plan`'s split over `graph` as it was built (no table copy counted)."""
    return tuple(cachefit.memory.group_sizes(graph, plan.partitions, memory=plan.memory))


class TestTiedHeadAcrossStages:
    """A stage holding a tied LM head but not its embedding holds its own copy of the table."""

    GPT2_TABLE = 50257 * 768 * 2  # vocab × width × bf16: 77,194,752 B
    LLAMA_TABLE = 128256 * 4096 * 2  # 1,050,673,152 B

    @pytest.mark.parametrize("devices, device_capacity", [(2, "240MB"), (3, "200MB"), (4, "150MB")])
    def test_gpt2_stage_counts_the_table(self, devices, device_capacity):
        graph = instances.load("gpt2", phase="decode", context=1000, batch=4)
        assert graph.nodes["lm_head"]["weight_bytes"] == 0 and graph.nodes["lm_head"]["tied_to"] == "embed"
        result = deploy(graph, devices=devices, device_capacity=device_capacity, capacity="h100-l2", tile=True,
                        solver="greedy")
        assert result.ok, result.reason
        stages = result.stages
        assert "embed" in stages.partitions[0] and "lm_head" in stages.partitions[-1]
        plain = _unmarked_sizes(stages, graph)
        assert stages.sizes[:-1] == plain[:-1]
        assert stages.sizes[-1] == plain[-1] + self.GPT2_TABLE <= stages.capacity
        assert stages.stats["table_copies"] == {"lm_head": self.GPT2_TABLE}
        assert graph.nodes["lm_head"]["weight_bytes"] == 0  # the input graph is not changed
        # The on-chip level of the last stage counts it too: Σ weights of the groups holding the head's tiles.
        last = result.groups[-1]
        head = [v for v in last.graph if last.graph.nodes[v].get("parent") == "lm_head" or v == "lm_head"]
        assert sum(last.graph.nodes[v]["weight_bytes"] for v in head) == self.GPT2_TABLE
        assert all(report.ok for report in result.check())
        again = read_plan(result.to_json())
        assert again.stages.sizes == stages.sizes and all(report.ok for report in again.check())

    def test_the_copy_decides_the_split(self):
        """Balanced by bytes, the last stage's table moves blocks to the first stage."""
        from cachefit.solvers import SOLVERS
        from cachefit.ties import with_table_copies

        graph = instances.load("gpt2", phase="decode", context=1000, batch=4)
        result = cachefit.stages(graph, devices=2, device_capacity="10GB", memory="liveness+kv", balance="memory")
        blind = SOLVERS["dp"](graph, 10**10, memory="liveness+kv", k=2, balance="memory")  # the split without the rule
        assert result.partitions != blind.partitions
        assert len(result.partitions[0]) > len(blind.partitions[0])
        blind_sizes = cachefit.memory.group_sizes(with_table_copies(graph, blind.partitions), blind.partitions,
                                                  memory="liveness+kv")
        assert max(result.sizes) < max(blind_sizes)  # what the blind split really needs is more
        assert str(result.status) == "OPTIMAL" and check(result).ok  # forced apart: the claim stands

    @pytest.mark.parametrize("devices", [2, 3, 4])
    def test_tied_llama(self, devices):
        graph = _tied_llama(batch=8, seq_len=1, phase="decode", context=4096)
        assert graph.nodes["lm_head"]["tied_to"] == "embed"
        result = deploy(graph, devices=devices, device_capacity="h100-hbm", capacity="h100-l2", tile=True,
                        solver="greedy", kv="streamed")
        assert result.ok, result.reason
        plain = _unmarked_sizes(result.stages, graph)
        assert result.stages.sizes[-1] - plain[-1] == self.LLAMA_TABLE
        assert result.groups[-1].graph.nodes["lm_head"].get("op") == "concat"  # tiled on chip
        assert sum(data["weight_bytes"] for v, data in result.groups[-1].graph.nodes(data=True)
                   if data.get("parent") == "lm_head") == self.LLAMA_TABLE
        assert all(report.ok for report in result.check())

    def test_one_device_counts_no_copy(self):
        graph = instances.load("gpt2", phase="decode", context=1000, batch=4)
        result = cachefit.stages(graph, devices=1, device_capacity="h100-hbm", memory="liveness+kv")
        assert result.sizes == _unmarked_sizes(result, graph) and "table_copies" not in result.stats

    def test_checker_recomputes_the_copy(self):
        graph = instances.load("gpt2", phase="decode", context=1000, batch=4)
        data = json.loads(deploy(graph, devices=3, device_capacity="200MB", capacity="h100-l2", tile=True,
                                 solver="greedy").to_json())
        head = next(node for node in data["graph"]["nodes"] if node["id"] == "lm_head")
        head.update(weight_bytes=0, table_copy_bytes=0)  # the plan as it was before: no copy
        reports = read_plan(json.dumps(data)).check()
        assert ("node 'lm_head' (stage 2) counts 0 B of table copy (table_copy_bytes); its stage needs "
                f"{self.GPT2_TABLE} B for the table it shares with 'embed'") in reports[0].violations
        assert not reports[-1].ok  # the on-chip graph still holds the table its stage no longer counts

    def test_claims_weakened_when_a_tie_can_share_a_stage(self):
        """A tied node right after its owner: a split may keep them together, so OPTIMAL is not claimed."""
        layers = [{"name": "embed", "op": "embedding", "weight_bytes": 4 * 10**8, "activation_bytes": 10**6},
                  {"name": "proj", "op": "linear", "weight_bytes": 0, "activation_bytes": 10**6},
                  *({"name": f"layer.{i}", "weight_bytes": 3 * 10**8, "activation_bytes": 10**6} for i in range(4))]
        graph = from_layers(layers)
        graph.nodes["proj"]["tied_to"] = "embed"  # no shape: its copy is the owner's weight_bytes
        from cachefit.ties import forced_apart

        assert not forced_apart(graph, 2) and forced_apart(graph, 6)
        result = cachefit.stages(graph, devices=2, device_capacity="1.2GB", memory="liveness", balance="memory")
        assert result.ok and str(result.status) == "FEASIBLE" and check(result).ok  # dp's OPTIMAL, weakened
        together = any({"embed", "proj"} <= set(group) for group in result.partitions)
        assert result.stats["table_copies"] == ({} if together else {"proj": 4 * 10**8})
        # 1 GB: only a split that keeps proj with embed fits (2 GB with the copy > 2 devices): found, no copy.
        result = cachefit.stages(graph, devices=2, device_capacity="1GB", memory="liveness", balance="memory")
        assert result.ok and str(result.status) == "FEASIBLE" and check(result).ok
        assert result.partitions[0][:2] == ("embed", "proj") and result.stats["table_copies"] == {}
        # 0.8 GB: no split fits even without copies: INFEASIBLE stands.
        result = cachefit.stages(graph, devices=2, device_capacity="0.8GB", memory="liveness", balance="memory")
        assert str(result.status) == "INFEASIBLE"


class TestStageLevelChunkFraction:
    """The stage level holds a micro-batch's activations whole (f = 1) whatever the on-chip level streams."""

    def test_on_chip_chunks_stage_level_whole(self):
        graph = instances.load("llama-3.1-8b", seq_len=4096, batch=1)
        result = deploy(graph, devices=2, device_capacity="h100-hbm", capacity="512MiB", tile=True,
                        chunk_tokens=512, solver="greedy")
        assert result.ok, result.reason
        assert result.stages.chunk_fraction == 1.0
        assert all(group.chunk_fraction == 512 / 4096 for group in result.groups)
        # The stage sizes are the whole micro-batch's: the model at f = 1, not at the on-chip fraction.
        whole = cachefit.memory.group_sizes(result.stages.graph, result.stages.partitions,
                                            memory=result.stages.memory, chunk_fraction=1.0)
        streamed = cachefit.memory.group_sizes(result.stages.graph, result.stages.partitions,
                                               memory=result.stages.memory, chunk_fraction=512 / 4096)
        assert tuple(whole) == result.stages.sizes and all(w > s for w, s in zip(whole, streamed))
        assert all(report.ok for report in result.check())
        data = json.loads(result.to_json())
        assert data["stage_level"]["chunk_fraction"] == 1.0

    def test_checker_refuses_a_streamed_stage_level(self):
        graph = instances.load("llama-3.1-8b", seq_len=4096, batch=1)
        data = json.loads(deploy(graph, devices=2, device_capacity="h100-hbm", capacity="512MiB", tile=True,
                                 chunk_tokens=512, solver="greedy").to_json())
        data["stage_level"]["chunk_fraction"] = 0.125
        stage_report = read_plan(json.dumps(data)).check()[0]
        assert ("the stage level holds each micro-batch's activations whole (chunk fraction 1), got 0.125"
                in stage_report.violations)
        data["stage_level"].update(chunk_fraction=1.0, memory="liveness")
        stage_report = read_plan(json.dumps(data)).check()[0]
        assert ("the stage level counts the KV cache in device memory (a '+kv' model), got 'liveness'"
                in stage_report.violations)


def test_cli_says_which_stage_counts_a_table_copy(tmp_path):
    result = CliRunner().invoke(main, ["plan", "gpt2", "--phase", "decode", "--context", "1000", "--batch", "4",
                                       "--devices", "3", "--device-capacity", "200MB", "--capacity", "h100-l2",
                                       "--tile", "--json", str(tmp_path / "p.json")])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert ("tied: lm_head (stage 2) shares its table with 'embed' in another stage; stage 2 counts its own copy, "
            "77,194,752 B (73.6 MiB)") in text
    check_run = CliRunner().invoke(main, ["check", str(tmp_path / "p.json")])
    assert check_run.exit_code == 0, check_run.output


def test_imported_tie_in_another_dtype_is_checked_by_the_owners_bytes():
    """A bf16 table read (cast) by an op of an fp32 import: its copy is the owner's 12,800 B, on both sides."""
    torch = pytest.importorskip("torch")
    from cachefit.graphs.torch_import import from_torch

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(100, 64).to(torch.bfloat16)
            self.l1, self.l2 = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)

        def forward(self, x):
            h = self.l2(torch.relu(self.l1(self.emb(x).float())))
            return h @ self.emb.weight.t().float()

    graph = from_torch(Model().eval(), torch.zeros(2, 8, dtype=torch.long))
    total = sum(data["weight_bytes"] + data["activation_bytes"] for _, data in graph.nodes(data=True))
    deployment = cachefit.deploy(graph, devices=2, device_capacity=total, capacity=total)
    copies = {node: data["table_copy_bytes"] for sub in deployment.stage_graphs()
              for node, data in sub.nodes(data=True) if data.get("table_copy_bytes")}
    assert list(copies.values()) == [100 * 64 * 2]
    assert cachefit.check(deployment).ok
