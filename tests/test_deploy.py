import json

import pytest
from click.testing import CliRunner

from cachefit import InputError, check, estimate, instances
from cachefit.cli import main
from cachefit.deploy import Deployment, deploy, stage_graph
from cachefit.graphs import from_layers


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
        assert "check: ok (3 plans recomputed independently)" in result.output
        assert json.loads(path.read_text())["format"] == "cachefit.deployment"
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
