"""Stage plans (`cachefit.stages`), balance by flops in the solvers, and the `stages`/`pipeline` commands."""

import json

import pytest
from click.testing import CliRunner
from hypothesis import example, given, settings
from hypothesis import strategies as st

import cachefit
from cachefit import InputError, Status
from cachefit.cli_stages import pipeline_command, stages_command
from cachefit.units import format_count
from cachefit.graphs import from_layers
from cachefit.result import graph_to_data
from cachefit.solvers import brute, cpsat, dp
from cachefit.stages import min_devices, stages
from cachefit.testing import assert_valid_plan, chains, dags


def with_flops(graph, flops):
    """A copy of `graph` with a ``flops`` attribute on each node (in node order)."""
    graph = graph.copy()
    for node, value in zip(graph, flops):
        graph.nodes[node]["flops"] = value
    return graph


@st.composite
def chains_with_flops(draw, max_nodes=10, capacity=100):
    light = draw(st.booleans())  # light nodes: several per group, so the balance has room to choose
    graph = draw(chains(min_nodes=1, max_nodes=max_nodes, capacity=capacity,
                        max_weight=capacity // 6 if light else None, max_activation=capacity // 10 if light else None,
                        max_buffer=capacity // 10 if light else None, exact_fit=not light))
    flops = draw(st.lists(st.one_of(st.just(0), st.integers(1, 50)), min_size=len(graph), max_size=len(graph)))
    return with_flops(graph, flops)


@st.composite
def dags_with_flops(draw, max_nodes=7, capacity=100):
    graph = draw(dags(min_nodes=1, max_nodes=max_nodes, capacity=capacity))
    flops = draw(st.lists(st.integers(0, 40), min_size=len(graph), max_size=len(graph)))
    return with_flops(graph, flops)


def group_flops(graph, plan):
    return [sum(graph.nodes[node].get("flops", 0) for node in group) for group in plan.partitions]


def layers(weights, flops):
    graph = from_layers([{"name": f"l{i}", "weight_bytes": w} for i, w in enumerate(weights)])
    return with_flops(graph, flops)


class TestFlopsBalance:
    """balance="flops": the largest group's flops is minimised; bytes still within the capacity."""

    @settings(max_examples=150, deadline=None, derandomize=True)
    @given(chains_with_flops(), st.sampled_from(["liveness", "additive"]), st.data())
    @example(graph=with_flops(from_layers([50, 50, 50]), [0, 0, 0]), memory="additive", data=None)
    def test_dp_equals_brute_on_chains(self, graph, memory, data):
        k = None
        if data is not None:
            k = data.draw(st.integers(0, len(graph))) or None  # 0: the fewest groups
        exact = brute(graph, 100, memory=memory, k=k, balance="flops")
        plan = dp(graph, 100, memory=memory, k=k, balance="flops")
        assert_valid_plan(graph, plan)
        assert plan.status == exact.status
        if exact.ok:
            assert plan.k == exact.k
            assert plan.stats["bottleneck_flops"] == exact.stats["bottleneck_flops"] == max(group_flops(graph, exact))
            assert plan.stats["flops"] == group_flops(graph, plan)
            # among the flops-optimal plans, both minimise Σ S² of the bytes
            assert sum(s * s for s in plan.sizes) == sum(s * s for s in exact.sizes)
            assert plan.stats["balance"] == exact.stats["balance"] == "flops"
            assert plan.bottleneck == max(plan.sizes)

    @settings(max_examples=25, deadline=None, derandomize=True)
    @given(dags_with_flops(max_nodes=6), st.data())
    def test_cpsat_equals_brute_on_dags(self, graph, data):
        k = data.draw(st.integers(0, len(graph))) or None
        exact = brute(graph, 100, k=k, balance="flops")
        plan = cpsat(graph, 100, k=k, balance="flops", time_limit_s=10)
        assert_valid_plan(graph, plan)
        if exact.ok:
            assert plan.ok and plan.k == exact.k
            assert plan.stats["bottleneck_flops"] >= exact.stats["bottleneck_flops"]
            if plan.status == Status.OPTIMAL:
                assert plan.stats["bottleneck_flops"] == exact.stats["bottleneck_flops"]
        else:
            assert not plan.ok

    def test_flops_and_memory_balance_differ(self):
        graph = layers([10, 10, 10, 10, 40, 40], [8, 8, 8, 8, 1, 1])
        by_flops = dp(graph, 100, memory="additive", k=2, balance="flops")
        by_memory = dp(graph, 100, memory="additive", k=2)
        assert by_flops.partitions == (("l0", "l1"), ("l2", "l3", "l4", "l5"))
        assert by_flops.stats["flops"] == [16, 18] and by_flops.stats["bottleneck_flops"] == 18
        assert by_memory.bottleneck == 80 and max(group_flops(graph, by_memory)) > 18
        assert by_flops.bottleneck == 100
        assert "bottleneck_flops" not in by_memory.stats
        for plan in (by_flops, by_memory):
            assert_valid_plan(graph, plan)

    def test_capacity_binds_before_flops(self):
        # the flops optimum ({l0..l2}, {l3}) would need 120 B: the capacity forces another cut
        graph = layers([40, 40, 40, 40], [1, 1, 1, 10])
        plan = dp(graph, 100, memory="additive", k=2, balance="flops")
        assert plan.partitions == (("l0", "l1"), ("l2", "l3")) and plan.stats["bottleneck_flops"] == 11

    def test_no_flops_attribute_counts_zero(self):
        graph = from_layers([30, 30, 30])
        plan = dp(graph, 100, memory="additive", k=3, balance="flops")
        assert plan.ok and plan.stats["flops"] == [0, 0, 0] and plan.stats["bottleneck_flops"] == 0

    def test_bad_flops_named(self):
        graph = with_flops(from_layers([30, 30]), [5, -1])
        with pytest.raises(InputError, match=r"node '1'.*`flops`"):
            dp(graph, 100, balance="flops")
        assert dp(graph, 100).ok  # memory balance ignores flops

    def test_bad_balance(self):
        with pytest.raises(InputError, match=r"`balance` must be one of 'memory', 'flops', got 'time'"):
            dp(from_layers([1]), 10, balance="time")
        with pytest.raises(InputError, match=r"`balance` must be one of 'memory', 'flops', got 'time'"):
            cachefit.plan(from_layers([1]), 10, balance="time")

    @pytest.mark.parametrize("solver", ["greedy", "dp", "cpsat", "brute", "auto"])
    def test_every_solver_accepts_balance(self, solver):
        graph = layers([10, 10, 10, 10, 40, 40], [8, 8, 8, 8, 1, 1])
        plan = cachefit.plan(graph, 100, solver=solver, memory="additive", k=2, balance="flops")
        assert_valid_plan(graph, plan)
        assert plan.ok and plan.k == 2 and plan.stats["balance"] == "flops"
        assert plan.stats["flops"] == group_flops(graph, plan)
        if solver == "greedy":
            assert plan.status == Status.FEASIBLE
        else:
            assert plan.stats["bottleneck_flops"] == 18

    def test_plan_json_keeps_flops_stats(self):
        graph = layers([10, 10, 10, 10, 40, 40], [8, 8, 8, 8, 1, 1])
        plan = cachefit.plan(graph, 100, solver="dp", memory="additive", k=2, balance="flops")
        again = cachefit.Plan.from_json(plan.to_json())
        assert again.stats["bottleneck_flops"] == 18 and cachefit.check(again).ok


class TestStages:
    def graph(self):
        return layers([30] * 6, [1, 1, 1, 1, 4, 4])

    def test_exactly_devices_groups_balanced_by_flops(self):
        plan = stages(self.graph(), devices=3, device_capacity=100, memory="additive")
        assert plan.ok and plan.k == 3 and plan.capacity == 100
        assert plan.stats["flops"] == [3, 5, 4] and plan.stats["bottleneck_flops"] == 5
        assert plan.stats["min_devices"] == 2 and plan.stats["devices"] == 3
        assert plan.stats["params"] == [0, 0, 0]
        assert cachefit.check(plan).ok

    def test_reserve_lowers_the_capacity(self):
        plan = stages(self.graph(), devices=3, device_capacity=100, reserve=40, memory="additive")
        assert plan.ok and plan.capacity == 60 and all(size <= 60 for size in plan.sizes)
        assert plan.stats["reserve"] == 40 and plan.stats["min_devices"] == 3
        assert cachefit.check(plan).ok

    def test_too_few_devices(self):
        plan = stages(self.graph(), devices=2, device_capacity=100, reserve=40, memory="additive")
        assert plan.status == Status.INFEASIBLE and plan.k == 0
        assert plan.stats["min_devices"] == 3
        assert "the smallest device count that fits is 3" in plan.reason
        assert "2 device(s) of 100 B − 40 B reserve = 60 B each" in plan.reason

    def test_min_devices_is_the_smallest(self):
        graph = cachefit.instances.load("llama-2-7b")
        fewest = min_devices(graph, "8GB", reserve="1GiB")
        assert fewest == 3 and stages(graph, devices=fewest, device_capacity="8GB", reserve="1GiB").ok
        assert not stages(graph, devices=fewest - 1, device_capacity="8GB", reserve="1GiB").ok

    def test_more_devices_than_nodes(self):
        plan = stages(self.graph(), devices=7, device_capacity=100, memory="additive")
        assert plan.status == Status.INFEASIBLE and "at most 6, one node per stage" in plan.reason

    def test_oversize_node(self):
        plan = stages(layers([30, 120], [1, 1]), devices=2, device_capacity=100, memory="additive")
        assert plan.status == Status.INFEASIBLE and plan.stats["min_devices"] is None
        assert "node 'l1' needs" in plan.reason and "no number of devices fits" in plan.reason

    @pytest.mark.parametrize("kwargs, message", [
        ({"devices": 0}, r"`devices` must be a positive integer, got 0"),
        ({"devices": 2.0}, r"`devices` must be a positive integer, got 2.0"),
        ({"balance": "time"}, r"`balance` must be one of 'flops', 'memory', got 'time'"),
        ({"solver": "magic"}, r"`solver` must be one of"),
        ({"reserve": 100}, r"`reserve` \(100 B\) must be less than `device_capacity` \(100 B\)"),
        ({"reserve": "-1"}, r"`reserve`"),
        ({"device_capacity": "h100-l3"}, r"`device_capacity`"),
    ])
    def test_bad_input(self, kwargs, message):
        options = {"devices": 2, "device_capacity": 100, **kwargs}
        with pytest.raises(InputError, match=message):
            stages(self.graph(), **options)

    def test_llama_405b_on_16_h100(self):
        graph = cachefit.instances.load("llama-3.1-405b")
        plan = stages(graph, devices=16, device_capacity="h100-hbm", reserve="8GiB")
        assert plan.ok and plan.k == 16 and plan.status == Status.OPTIMAL
        assert plan.capacity == 80 * 10**9 - 8 * 2**30
        assert cachefit.check(plan).ok
        fewest = plan.stats["min_devices"]
        assert fewest == min_devices(graph, "h100-hbm", reserve="8GiB")
        assert not stages(graph, devices=fewest - 1, device_capacity="h100-hbm", reserve="8GiB").ok
        assert sum(plan.stats["params"]) == graph.graph["params"]
        # by flops no stage can do better than the mean, and the blocks come in whole units
        block = graph.nodes["block.0"]["flops"]
        assert plan.stats["bottleneck_flops"] <= sum(plan.stats["flops"]) / 16 + block

    @pytest.mark.parametrize("balance", ["flops", "memory"])
    @settings(max_examples=30, deadline=None, derandomize=True)
    @given(graph=chains_with_flops(max_nodes=9), devices=st.integers(1, 5))
    def test_every_stage_plan_checks(self, balance, graph, devices):
        plan = stages(graph, devices=devices, device_capacity=100, balance=balance)
        assert_valid_plan(graph, plan)
        if plan.ok:
            assert plan.k == devices
        else:
            assert plan.status == Status.INFEASIBLE and "min_devices" in plan.stats


class TestCli:
    def test_stages_table(self, tmp_path):
        model = tmp_path / "model.json"
        graph = layers([30 * 2**20] * 6, [1, 1, 1, 1, 4, 4])
        model.write_text(json.dumps(graph_to_data(graph)))
        out = tmp_path / "stages.json"
        result = CliRunner().invoke(stages_command, [str(model), "--devices", "3", "--device-capacity", "100MiB",
                                                     "--memory", "additive", "--json", str(out)])
        assert result.exit_code == 0, result.output
        assert "3 stage(s), balanced by flops" in result.output
        text = " ".join(result.output.split())
        assert "smallest device count that fits 2 (in the model's execution order)" in text
        plan = cachefit.Plan.from_json(out)
        assert plan.k == 3 and cachefit.check(plan).ok

    def test_stages_infeasible(self):
        result = CliRunner().invoke(stages_command, ["llama-3.1-405b", "--devices", "8", "--device-capacity",
                                                     "h100-hbm", "--reserve", "8GiB"])
        text = " ".join(result.output.split())
        assert result.exit_code == 1
        assert "INFEASIBLE" in text and "the smallest device count that fits is 12" in text
        assert "8 device(s) of 80.0 GB − 8.0 GiB reserve = 66.5 GiB" in text

    def test_stages_bad_input(self):
        result = CliRunner().invoke(stages_command, ["gpt2", "--devices", "2", "--device-capacity", "h100-hbm",
                                                     "--reserve", "100GB"])
        assert result.exit_code == 2 and "`reserve`" in result.output

    def test_format_count(self):
        assert format_count(0, "FLOP") == "0 FLOP"
        assert format_count(1.5e15, "FLOP") == "1.5 PFLOP"

    def test_pipeline_two_processes(self, tmp_path):
        pytest.importorskip("torch.distributed.pipelining")
        config = {"model_type": "llama", "name": "tiny-llama", "hidden_size": 32, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64,
                  "vocab_size": 64}
        graph = cachefit.graphs.transformer(config, batch=2, seq_len=8, granularity="block")
        plan = stages(graph, devices=2, device_capacity="1MiB")
        path = tmp_path / "plan.json"
        plan.to_json(path)
        out = tmp_path / "run.json"
        result = CliRunner().invoke(pipeline_command, [str(path), "--schedule", "1f1b", "--microbatches", "2",
                                                       "--warmup", "0", "--iters", "1", "--json", str(out)])
        assert result.exit_code == 0, result.output
        assert "equivalence with the single-process model: PASS" in result.output
        data = json.loads(out.read_text())
        assert data["equivalent"] and data["stages"] == 2 and data["schedule"] == "1f1b"

    def test_pipeline_refuses_a_plan_without_groups(self, tmp_path):
        plan = stages(layers([30, 120], [1, 1]), devices=2, device_capacity=100, memory="additive")
        assert not plan.ok
        path = tmp_path / "plan.json"
        plan.to_json(path)
        result = CliRunner().invoke(pipeline_command, [str(path), "--microbatches", "2"])
        assert result.exit_code == 1 and "no plan" in result.output
