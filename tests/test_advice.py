"""`cachefit.advice`: every suggestion gives a plan, the capacity is the least, the CLI says it in its syntax."""

import shlex

import pytest
from click.testing import CliRunner
from hypothesis import example, given, settings
from hypothesis import strategies as st

import cachefit
from cachefit.advice import capacity_text, smallest_capacity, suggest
from cachefit.cli import main
from cachefit.errors import InputError
from cachefit.loading import load_model
from cachefit.testing import dags
from cachefit.units import parse_bytes


def rebuild_of(name):
    def rebuild(batch, granularity):
        return load_model(name, batch=batch, granularity=granularity)
    return rebuild


def assert_planned(graph, suggestion, capacity, **settings):
    """Plan the suggestion independently of `suggest` and check it."""
    changes = dict(suggestion.changes)
    options = {**settings, **{name: value for name, value in changes.items() if name in ("tile", "chunk_tokens")}}
    plan = cachefit.plan(graph, changes.get("capacity", capacity), solver="greedy", **options)
    assert plan.ok and plan.k == suggestion.k
    assert cachefit.check(plan).ok


class TestCapacityText:
    @given(st.integers(min_value=1, max_value=2**50))
    @example(104499200)
    @example(5 * 2**20 + 1)
    def test_at_least_and_close(self, num_bytes):
        text = capacity_text(num_bytes)
        assert num_bytes <= parse_bytes(text) <= num_bytes * 1.01 + 1

    def test_round_figures(self):
        assert capacity_text(120 * 2**20) == "120MiB"
        assert capacity_text(999) == "999"


class TestSmallestCapacity:
    @settings(max_examples=40, deadline=None)
    @given(dags(max_nodes=8, capacity=100), st.sampled_from(["liveness", "additive"]))
    def test_greedy_fits_exactly_from_there(self, graph, memory):
        for_order, any_order = smallest_capacity(graph, memory=memory)
        if not len(graph):
            return
        assert any_order <= for_order
        assert cachefit.plan(graph, for_order, solver="greedy", memory=memory).ok
        if for_order > 1:
            assert not cachefit.plan(graph, for_order - 1, solver="greedy", memory=memory).ok

    @settings(max_examples=30, deadline=None)
    @given(dags(max_nodes=7, capacity=100))
    def test_no_order_fits_below_the_bound(self, graph):
        _, any_order = smallest_capacity(graph)
        if any_order > 1:
            assert not cachefit.plan(graph, any_order - 1, solver="brute").ok


class TestSuggest:
    def test_gpt2_block_at_50mib(self):
        graph = load_model("gpt2")
        advice = suggest(graph, "50MiB", rebuild=rebuild_of("gpt2"))
        assert advice.min_capacity_exact == 104499200  # lm_head's logits alone
        assert advice.min_capacity.options() == ["--capacity", "100MiB"]
        assert [s.options() for s in advice.suggestions] == [["--tile", "--chunk-tokens", "auto"]]
        assert advice.suggestions[0].k == 6
        assert_planned(graph, advice.suggestions[0], "50MiB")
        assert_planned(graph, advice.min_capacity, "50MiB")

    def test_tiled_gpt2_needs_only_the_chunk(self):
        graph = load_model("gpt2")
        advice = suggest(graph, "50MiB", tile=True, rebuild=rebuild_of("gpt2"))
        assert [s.options() for s in advice.suggestions] == [["--chunk-tokens", "auto"]]
        assert "tile" not in advice.suggestions[0].changes
        assert_planned(graph, advice.suggestions[0], "50MiB", tile=True)
        # the bisection's capacity, tiled, gives a plan and half a percent less does not
        exact = advice.min_capacity_exact
        assert cachefit.plan(graph, exact, solver="greedy", tile=True).ok
        assert not cachefit.plan(graph, int(exact * 0.99), solver="greedy", tile=True).ok

    def test_paper_model_untiled(self):
        graph = load_model("paper-4x15gb")
        advice = suggest(graph, "h100-l2", rebuild=rebuild_of("paper-4x15gb"))
        assert [s.options() for s in advice.suggestions] == [["--tile", "--chunk-tokens", "auto"]]
        assert advice.suggestions[0].k == 1152
        assert advice.min_capacity_exact == 15 * 10**9 + 2 * 128 * 10000 * 16384 * 2  # a layer, its input and output
        assert_planned(graph, advice.suggestions[0], "h100-l2")

    def test_a_smaller_batch(self):
        graph = load_model("paper-shape", batch=64)
        advice = suggest(graph, "1GiB", rebuild=rebuild_of("paper-shape"))
        batches = [s.changes["batch"] for s in advice.suggestions if "batch" in s.changes]
        assert batches == [4]
        for suggestion in advice.suggestions:
            rebuilt = load_model("paper-shape", batch=suggestion.changes.get("batch", 64),
                                 granularity=suggestion.changes.get("granularity", "block"))
            assert_planned(rebuilt, suggestion, "1GiB")
        for batch in batches:  # the largest batch: one more does not fit
            bigger = load_model("paper-shape", batch=batch + 1)
            assert not cachefit.plan(bigger, "1GiB", solver="greedy").ok

    def test_nothing_fits(self):
        graph = cachefit.graphs.from_layers([{"name": "norm", "weight_bytes": 100, "op": "layernorm"}])
        advice = suggest(graph, 50)
        assert advice.suggestions == ()
        assert advice.min_capacity.changes == {"capacity": 100}

    def test_an_explicit_k_gets_the_least_bottleneck(self):
        graph = load_model("gpt2")
        advice = suggest(graph, "200MiB", k=1)
        assert advice.min_capacity_exact == cachefit.group_sizes(graph, [list(graph.nodes)])[0]
        two = suggest(graph, "60MiB", k=6)
        dp = cachefit.plan(graph, "10GiB", solver="dp", k=6)
        assert two.min_capacity_exact == dp.bottleneck
        assert cachefit.plan(graph, two.min_capacity_exact, solver="greedy", k=6).ok
        assert not cachefit.plan(graph, two.min_capacity_exact - 1, solver="dp", k=6).ok

    def test_settings_that_fit_already(self):
        graph = load_model("gpt2")
        advice = suggest(graph, "1GiB")
        assert advice.fits and advice.suggestions == ()
        assert advice.min_capacity.changes == {"capacity": parse_bytes("100MiB")}

    def test_bad_input(self):
        with pytest.raises(InputError, match=r"^`graph` must be a networkx.DiGraph \(the model as asked for\), "
                                             r"got LayerTable$"):
            suggest(cachefit.LayerTable.chain([1, 2]), 10)
        with pytest.raises(InputError, match=r"^`rebuild` must be a function rebuild\(batch=..., granularity=...\) "
                                             r"or None, got 3$"):
            suggest(load_model("gpt2"), "50MiB", rebuild=3)
        with pytest.raises(InputError, match="^`capacity` must be"):  # parse_capacity's own message
            suggest(load_model("gpt2"), -1)

    def test_every_try_is_recorded(self):
        graph = load_model("gpt2")
        advice = suggest(graph, "50MiB")
        assert ({"tile": True}, None) in advice.tried
        assert ({"tile": True, "chunk_tokens": "auto"}, 6) in advice.tried


class TestResnetLike:
    """A user module (conv-bn-relu basic blocks) from `from_torch`: batch norms cannot be tiled."""

    def test_tiled_at_8mib(self):
        pytest.importorskip("torch")
        from resnet_like import resnet_like_graph

        graph = resnet_like_graph(batch=4)
        assert not cachefit.plan(graph, "8MiB", tile=True, solver="greedy").ok
        advice = suggest(graph, "8MiB", tile=True, batch=4,
                         rebuild=lambda batch, granularity: resnet_like_graph(batch=batch))
        assert [s.changes for s in advice.suggestions] == [{"batch": 1}]
        assert cachefit.plan(resnet_like_graph(batch=1), "8MiB", tile=True, solver="greedy").ok
        assert cachefit.plan(graph, advice.min_capacity.changes["capacity"], tile=True, solver="greedy").ok


class TestCli:
    def run(self, *args):
        return CliRunner().invoke(main, list(args))

    def test_gpt2_advice_is_a_command_that_works(self):
        result = self.run("plan", "gpt2", "--capacity", "50MiB")
        assert result.exit_code == 1
        commands = [line.strip() for line in result.output.splitlines() if line.strip().startswith("cachefit plan")]
        assert commands == ["cachefit plan gpt2 --capacity 100MiB",
                            "cachefit plan gpt2 --capacity 50MiB --tile --chunk-tokens auto"]
        for command in commands:
            again = self.run(*shlex.split(command)[1:])
            assert again.exit_code == 0, again.output

    def test_tiled_advice_does_not_repeat_tile(self):
        result = self.run("plan", "gpt2", "--capacity", "50MiB", "--tile")
        assert "cachefit plan gpt2 --capacity 50MiB --tile --chunk-tokens auto" in result.output
        assert "gpt2 --capacity 50MiB --tile --tile" not in result.output

    def test_no_advice_for_a_plan(self):
        result = self.run("plan", "gpt2", "--capacity", "h100-hbm")
        assert result.exit_code == 0 and "what would fit" not in result.output


class TestCliMessages:
    def test_help_lists_what_model_can_be(self):
        result = CliRunner().invoke(main, ["plan", "--help"])
        for kind in ("embedded model name", "config.json", ".onnx", "plan file", "node-link graph", "list of layers"):
            assert kind in result.output

    def test_a_user_module_file_says_what_was_tried(self, tmp_path):
        pytest.importorskip("torch")
        import json

        from resnet_like import resnet_like_graph
        from cachefit.result import graph_to_data

        model = tmp_path / "resnet18.json"
        model.write_text(json.dumps(graph_to_data(resnet_like_graph(batch=4))))
        result = CliRunner().invoke(main, ["plan", str(model), "--capacity", "8MiB", "--solver", "greedy"])
        assert result.exit_code == 1
        assert result.output.startswith("resnet18: ")
        assert "at 8.0 MiB: --tile does not give a plan" in result.output
        tiled = CliRunner().invoke(main, ["plan", str(model), "--capacity", "8MiB", "--solver", "greedy", "--tile"])
        assert ("nothing else to try: --tile is set; --chunk-tokens needs a graph with batch and seq_len; "
                "--granularity and --batch change embedded models only") in tiled.output
        command = next(line.strip() for line in tiled.output.splitlines() if line.strip().startswith("cachefit plan"))
        assert command == f"cachefit plan {model} --capacity 24.75MiB --solver greedy --tile"
        assert CliRunner().invoke(main, shlex.split(command)[1:]).exit_code == 0


class TestStageLevelAdvice:
    """An INFEASIBLE stage level is told about devices and device memory, never about tiling."""

    @pytest.fixture(scope="class")
    def llama70(self):
        from cachefit import instances

        return instances.load("llama-3.1-70b", phase="decode", context=2048)

    def test_more_devices_or_more_memory(self, llama70):
        from cachefit.advice import suggest_devices
        from cachefit.stages import stages

        advice = suggest_devices(llama70, devices=1, device_capacity="h100-hbm", memory="liveness+kv")
        assert advice.devices == 2 and advice.oversize_node is None
        assert advice.device_capacity == 133 * 2**30
        fewest, exact, rounded = advice.plans
        assert fewest.k == 2 and fewest.ok and rounded.capacity == 133 * 2**30 and rounded.ok
        assert all(cachefit.check(plan).ok for plan in advice.plans)
        # The exact least: one byte less and one device cannot hold the model.
        assert exact.ok and exact.capacity == max(exact.sizes) > 140 * 10**9
        assert not stages(llama70, devices=1, device_capacity=exact.capacity - 1, memory="liveness+kv").ok
        assert not stages(llama70, devices=1, device_capacity="h100-hbm", memory="liveness+kv").ok
        assert advice.options() == [(["--devices", "2"], "the fewest devices of the capacity asked for"),
                                    (["--device-capacity", "133GiB"],
                                     "memory per device (142,807,662,592 B, within 1 % of the least) for the "
                                     "devices asked for")]

    def test_reserve_is_kept(self, llama70):
        from cachefit.advice import suggest_devices

        advice = suggest_devices(llama70, devices=2, device_capacity="h100-hbm", reserve="10GB",
                                 memory="liveness+kv")
        assert advice.devices == 3
        assert all(plan.stats["reserve"] == 10**10 for plan in advice.plans)
        assert advice.plans[-1].stats["device_capacity"] == advice.device_capacity

    def test_node_larger_than_a_device(self, llama70):
        from cachefit.advice import suggest_devices
        from cachefit.stages import stages

        plan = stages(llama70, devices=3, device_capacity="1GB", memory="liveness+kv")
        assert plan.status == "INFEASIBLE" and "tile it" not in plan.reason
        assert plan.reason.startswith("3 device(s) of 1.0 GB − 0 B reserve = 953.7 MiB each: node 'lm_head' needs "
                                      "2.0 GiB (2101619200 B) alone")
        assert plan.reason.endswith("no number of devices fits: only a larger device_capacity (or a smaller "
                                    "reserve) does (the stage level keeps nodes whole; tiling splits nodes for the "
                                    "on-chip level, and tensor parallelism is not modelled)")
        advice = suggest_devices(llama70, devices=3, device_capacity="1GB", memory="liveness+kv")
        assert advice.devices is None and advice.oversize_node == "lm_head" and advice.oversize_bytes == 2101619200
        assert advice.device_capacity == 45 * 2**30 and advice.plans[-1].ok

    def test_cli_says_it(self, tmp_path):
        from click.testing import CliRunner

        from cachefit.cli import main

        result = CliRunner().invoke(main, ["plan", "llama-3.1-70b", "--phase", "decode", "--context", "2048",
                                           "--devices", "1", "--device-capacity", "h100-hbm", "--capacity",
                                           "h100-l2"], terminal_width=200)
        assert result.exit_code == 1, result.output
        assert "advice for the stage level (each planned before it is printed):" in result.output
        assert "  --devices 2: the fewest devices of 80.0 GB that hold the model" in result.output
        assert ("  --device-capacity 133GiB: 142,807,662,592 B per device (reserve included, within 1 % of the "
                "least) holds the model on 1 device(s)") in result.output
        assert "tile" not in result.output.lower()
        tiny = CliRunner().invoke(main, ["plan", "llama-3.1-70b", "--phase", "decode", "--context", "2048",
                                         "--devices", "3", "--device-capacity", "1GB", "--capacity", "h100-l2"],
                                  terminal_width=400)
        assert tiny.exit_code == 1
        assert "only a larger --device-capacity helps" in tiny.output and "--devices" not in tiny.output


class TestTwoLevelAdvice:
    """Issue 12: a two-level plan whose stages fit but an on-chip level does not gets planned advice, for the
    whole two-level command (each suggestion a `Deployment`: stages, then every stage's greedy on-chip plan)."""

    def test_gpt2_two_devices(self):
        """gpt2 on 2 devices of 1 GiB at 20 MiB on chip: the least capacity is stage 1's, whose lm_head holds its
        own copy of the tied table (73.6 MiB) and the 98 MiB logits: 181,693,952 B, not the one-level 99.7 MiB."""
        from cachefit.deploy import deploy

        graph = load_model("gpt2")
        asked = cachefit.plan(graph, "20MiB", solver="greedy", devices=2, device_capacity="1GiB")
        assert asked.stages.ok and not asked.ok
        advice = suggest(graph, "20MiB", devices=2, device_capacity="1GiB")
        stage_minimum = [smallest_capacity(sub)[0] for sub in asked.stage_graphs()]
        assert advice.min_capacity_exact == max(stage_minimum) == 181_693_952 > smallest_capacity(graph)[0]
        assert advice.min_capacity.changes == {"capacity": parse_bytes("174MiB")}
        assert [(s.changes, s.k) for s in advice.suggestions] == [({"tile": True, "chunk_tokens": "auto"}, 20)]
        for suggestion in (advice.min_capacity, *advice.suggestions):  # each re-planned here, both levels checked
            assert suggestion.plan.devices == 2 and suggestion.plan.ok
            options = {name: value for name, value in suggestion.changes.items() if name != "capacity"}
            again = deploy(graph, devices=2, device_capacity="1GiB", solver="greedy",
                           capacity=suggestion.changes.get("capacity", "20MiB"), **options)
            assert again.ok and again.k == suggestion.k and all(report.ok for report in again.check())
        below = deploy(graph, devices=2, device_capacity="1GiB", capacity=advice.min_capacity_exact - 1)
        assert below.stages.ok and not below.ok  # the least for the stages' orders: one byte less fails

    def test_settings_refused_as_plan_refuses_them(self):
        with pytest.raises(InputError, match=r"^`devices` plans stages across devices and needs `device_capacity` "
                                             r"too$"):
            suggest(load_model("gpt2"), "20MiB", devices=2)

    def test_failed_stage_level_gets_no_on_chip_capacity(self):
        advice = suggest(load_model("gpt2"), "20MiB", devices=1, device_capacity="100MiB")
        assert advice.min_capacity is None and advice.suggestions == ()


class TestTwoLevelCli:
    def run(self, *args):
        return CliRunner().invoke(main, list(args), terminal_width=400)

    def test_gpt2_advice_is_a_two_level_command_that_works(self):
        result = self.run("plan", "gpt2", "--devices", "2", "--device-capacity", "1GiB", "--capacity", "20MiB")
        assert result.exit_code == 1, result.output
        lines = [line.rstrip() for line in result.output.splitlines()]
        start = lines.index("what would fit on chip (every command below was planned first, stages and every stage's "
                            "on-chip groups, greedy on chip):")
        assert lines[start:] == [
            lines[start],
            "  a larger capacity (the least for the 2 stages' node orders is 173.3 MiB (181,693,952 B)):",
            "    cachefit plan gpt2 --capacity 174MiB --devices 2 --device-capacity 1GiB",
            "      → k = 4 on-chip groups over 2 stages, bottleneck 173.3 MiB",
            "  at 20.0 MiB, the fewest changes that fit (2 options):",
            "    cachefit plan gpt2 --capacity 20MiB --tile --chunk-tokens auto --devices 2 --device-capacity 1GiB",
            "      → k = 20 on-chip groups over 2 stages, bottleneck 19.9 MiB",
        ]
        for command in (lines[start + 2].strip(), lines[start + 5].strip()):
            again = self.run(*shlex.split(command)[1:])
            assert again.exit_code == 0, again.output
            assert "check: ok (3 plans recomputed independently" in again.output

    def test_llama_70b_decode_tile(self):
        """The issue's case: embed alone needs 2.0 GiB of an H100's 50 MiB L2; --tile fits (greedy: 2,882 groups)."""
        result = self.run("plan", "llama-3.1-70b", "--phase", "decode", "--context", "2048", "--devices", "4",
                          "--device-capacity", "h100-hbm", "--capacity", "h100-l2")
        assert result.exit_code == 1, result.output
        assert ("INFEASIBLE: stage 0 on chip: node 'embed' needs 2.0 GiB (2101362688 B) alone" in result.output)
        assert ("  at 50.0 MiB, the fewest changes that fit (1 option):\n"
                "    cachefit plan llama-3.1-70b --capacity h100-l2 --tile --phase decode --context 2048 --devices 4 "
                "--device-capacity h100-hbm\n"
                "      → k = 2,882 on-chip groups over 4 stages, bottleneck 50.0 MiB") in result.output
        assert ("  a larger capacity (the least for the 4 stages' node orders is 2.0 GiB (2,101,619,200 B)):\n"
                "    cachefit plan llama-3.1-70b --capacity 1.96875GiB --phase decode --context 2048 --devices 4 "
                "--device-capacity h100-hbm\n") in result.output

    def test_no_on_chip_advice_when_the_stages_fail(self):
        result = self.run("plan", "gpt2", "--devices", "1", "--device-capacity", "100MiB", "--capacity", "20MiB")
        assert result.exit_code == 1
        assert "advice for the stage level" in result.output and "what would fit on chip" not in result.output
