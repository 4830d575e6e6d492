import dataclasses
import json

import pytest
from click.testing import CliRunner

from cachefit import Estimate, InputError, estimate, instances, plan
from cachefit.cli import main
from cachefit.devices import PRESETS, Device
from cachefit.graphs import from_layers

# Round figures so every expected number below is hand-computable.
TOY = Device("toy", "toy chip", "SRAM", 1000, "HBM", 10**6, 1e9, 1e10, 1e12,
             sources={key: "test" for key in ("on_chip_bytes", "memory_bytes", "memory_bandwidth",
                                              "on_chip_bandwidth", "peak_flops")})


def toy_plan(*, kv=0, chunk_fraction=1.0, memory="additive", phase="decode"):
    graph = from_layers([{"weight_bytes": 300, "activation_bytes": 50, "flops": 1000}] * 3)
    graph.graph.update(batch=4, seq_len=1, phase=phase, context=16)
    graph.nodes["1"]["kv_bytes"] = kv
    result = plan(graph, 450, solver="greedy", memory=memory, chunk_fraction=chunk_fraction)
    assert result.k == 3
    return result


class TestBytes:
    def test_one_device_by_hand(self):
        result = estimate(toy_plan(), TOY, launch_s=1e-6)
        assert isinstance(result, Estimate) and result.chunks == 1 and result.tokens_per_pass == 4
        partition = [group.partition_major.hbm_bytes for group in result.groups]
        assert partition == [300 + 0 + 50, 300 + 50 + 50, 300 + 50 + 50]
        assert [group.partition_major.on_chip_bytes for group in result.groups] == [350, 350, 350]
        assert [group.token_major.hbm_bytes for group in result.groups] == [300, 300, 300]
        assert [group.token_major.on_chip_bytes for group in result.groups] == [100, 150, 150]
        assert [group.batched.hbm_bytes for group in result.groups] == [400, 400, 350]
        first = result.groups[0].partition_major
        assert first.time_s == pytest.approx(350 / 1e9 + 1e-6) and first.bound == "launch"
        batched = result.schedule("batched")
        assert batched.hbm_bytes == 1150 and batched.launches == 1
        assert batched.time_s == pytest.approx(1150 / 1e9 + 1e-6)
        assert batched.time_per_output_token_s == batched.time_s
        assert batched.tokens_per_s == pytest.approx(4 / batched.time_s)
        assert not any(group.pinned for group in result.groups)

    def test_chunks_reload_weights_token_major(self):
        result = estimate(toy_plan(chunk_fraction=0.25, memory="liveness"), TOY, launch_s=0)
        assert result.chunks == 4
        group = result.groups[1]
        assert group.token_major.hbm_bytes == 4 * 300
        assert group.partition_major.hbm_bytes == 300 + 50 + 50
        assert group.partition_major.on_chip_bytes == 4 * 300 + 50
        assert group.partition_major.launches == group.token_major.launches == 4

    def test_pinned_groups_read_no_weights_from_hbm(self):
        result = estimate(toy_plan(), TOY, devices=3, launch_s=0)
        assert all(group.pinned for group in result.groups)
        assert [group.device for group in result.groups] == [0, 1, 2]
        assert [group.partition_major.hbm_bytes for group in result.groups] == [50, 100, 100]
        item = result.schedule("partition-major")
        assert item.time_s == pytest.approx(sum(g.partition_major.time_s for g in result.groups))
        assert item.stage_time_s == pytest.approx(max(g.partition_major.time_s for g in result.groups))

    def test_kv_streamed_vs_resident(self):
        streamed = estimate(toy_plan(kv=80), TOY, devices=3, kv="streamed")
        resident = estimate(toy_plan(kv=80), TOY, devices=3, kv="resident")
        assert streamed.groups[1].partition_major.hbm_bytes == 100 + 80
        assert resident.groups[1].partition_major.hbm_bytes == 100
        assert resident.groups[1].partition_major.on_chip_bytes == streamed.groups[1].partition_major.on_chip_bytes + 80
        unpinned = estimate(toy_plan(kv=80), TOY, devices=1, kv="resident")
        assert unpinned.groups[1].partition_major.hbm_bytes == 300 + 100 + 80

    def test_devices_dealt_contiguously(self):
        result = estimate(toy_plan(), TOY, devices=2)
        assert [group.device for group in result.groups] in ([0, 0, 1], [0, 1, 1])
        assert sum(group.pinned for group in result.groups) == 1

    def test_prefill_has_no_time_per_output_token(self):
        result = estimate(toy_plan(phase="prefill"), TOY)
        assert all(item.time_per_output_token_s is None for item in result.schedules)

    def test_result_is_frozen(self):
        result = estimate(toy_plan(), TOY)
        with pytest.raises(dataclasses.FrozenInstanceError):
            result.devices = 2


class TestRealModels:
    def test_llama_8b_decode_is_hbm_bound_and_counts_kv(self):
        graph = instances.load("llama-3.1-8b", phase="decode", context=4096, batch=8)
        result = estimate(plan(graph, "h100-hbm"), "h100")
        batched = result.schedule("batched")
        weights = sum(data["weight_bytes"] for _, data in graph.nodes(data=True))
        assert batched.bound == "HBM"
        assert batched.hbm_bytes >= weights + graph.graph["kv_bytes"]
        assert batched.time_s == pytest.approx(batched.hbm_bytes / 3.35e12 + 5e-6)

    def test_preset_by_capacity_name(self):
        result = estimate(toy_plan(), "mi300x-llc")
        assert result.device is PRESETS["mi300x"]


class TestErrors:
    def test_no_plan(self):
        graph = from_layers([100])
        with pytest.raises(InputError, match=r"^`plan` must hold groups \(status OPTIMAL or FEASIBLE\), got INFEASIBLE$"):
            estimate(plan(graph, 10), TOY)

    @pytest.mark.parametrize("kwargs, message", [
        ({"devices": 0}, r"^`devices` must be a positive integer, got 0$"),
        ({"kv": "swap"}, r"^`kv` must be one of 'streamed', 'resident', got 'swap'$"),
        ({"launch_s": -1}, r"^`launch_s` must be a non-negative number of seconds, got -1$"),
    ])
    def test_bad_options(self, kwargs, message):
        with pytest.raises(InputError, match=message):
            estimate(toy_plan(), TOY, **kwargs)

    def test_sram_chip_needs_a_chip_per_group(self):
        with pytest.raises(InputError, match=r"^`device` 'groq-lpu' has no off-chip memory, so every group needs "
                                             r"its own chip: `devices` must be at least k = 3, got 1$"):
            estimate(toy_plan(), "groq-lpu")

    def test_unknown_device(self):
        with pytest.raises(InputError, match=r"^`device` must be one of h100, "):
            estimate(toy_plan(), "tpu-v9")


class TestMeasured:
    def test_probe(self):
        pytest.importorskip("torch")
        from cachefit.estimate import measure_device

        device = measure_device(gemm_size=128, repeats=2)
        assert device.name == "measured" and device.peak_flops > 0
        assert device.memory_bandwidth > 0 and device.on_chip_bandwidth > 0
        assert device.sources["peak_flops"].startswith("measured: 128³ float32 GEMM")


class TestCli:
    def test_devices_sources(self):
        result = CliRunner().invoke(main, ["devices", "--sources"])
        assert result.exit_code == 0, result.output
        for name in PRESETS:
            assert f"{name}:" in result.output
        assert "B200" in result.output and "mi300x-llc" in result.output

    def test_plan_decode_then_estimate(self, tmp_path):
        path = tmp_path / "p.json"
        runner = CliRunner()
        result = runner.invoke(main, ["plan", "llama-3.1-8b", "--phase", "decode", "--context", "4096", "--batch",
                                      "8", "--capacity", "h100-hbm", "--json", str(path)])
        assert result.exit_code == 0, result.output
        assert "2 × 8 kv_heads × 128 head_dim × 2 B × 4,096 tokens × 8 batch = 134,217,728 B" in result.output
        assert "32 layers: 4,294,967,296 B" in result.output
        out = tmp_path / "e.json"
        result = runner.invoke(main, ["estimate", str(path), "--device", "h100", "--json", str(out)])
        assert result.exit_code == 0, result.output
        assert "assumptions" in result.output and "partition-major" in result.output
        data = json.loads(out.read_text())
        assert data["phase"] == "decode" and len(data["schedules"]) == 3

    def test_decode_refused_for_layer_lists(self, tmp_path):
        layers = tmp_path / "layers.json"
        layers.write_text("[100, 200]")
        result = CliRunner().invoke(main, ["plan", str(layers), "--capacity", "1KiB", "--phase", "decode"])
        assert result.exit_code == 2
        assert "need attention layers" in result.output


class TestSramChips:
    def test_everything_on_chip_and_no_launch_cost(self):
        result = estimate(toy_plan(kv=10), "groq-lpu", devices=3)
        assert result.kv == "resident" and result.launch_s == 0
        for item in result.schedules:
            assert item.hbm_bytes == 0 and item.on_chip_bytes > 0
        assert any("no off-chip memory" in note for note in result.assumptions)

    def test_streamed_kv_refused(self):
        with pytest.raises(InputError, match=r"^`kv` 'streamed' needs off-chip memory; `device` 'wse-3' has none"):
            estimate(toy_plan(), "wse-3", devices=3, kv="streamed")

    def test_group_over_sram_refused(self):
        graph = from_layers([{"weight_bytes": 300 * 10**6, "activation_bytes": 0}])
        with pytest.raises(InputError, match=r"^`device` 'groq-lpu' has no off-chip memory, but group 0 "
                                             r"\(300,000,000 B \+ KV 0 B\) exceeds its 230,000,000 B SRAM$"):
            estimate(plan(graph, "1GB"), "groq-lpu")

    def test_resident_kv_must_fit_with_the_group(self):
        result = estimate(toy_plan(kv=700), TOY, devices=3, kv="resident")
        assert [group.fits_on_chip for group in result.groups] == [True, False, True]
        assert not result.groups[1].pinned


class TestCalibrationBench:
    def test_tiny_case_rows(self):
        pytest.importorskip("torch")
        from cachefit.bench.bench_estimate import calibrate

        rows, assumptions = calibrate("tiny", iters=1)
        assert [row["schedule"] for row in rows] == ["partition-major", "token-major", "batched"]
        for row in rows:
            assert row["device"] == "measured" and row["equivalent"]
            assert row["measured_ms"] > 0 and row["estimate_ms"] > 0
            assert row["error"] == pytest.approx((row["estimate_ms"] - row["measured_ms"]) / row["measured_ms"])
        assert rows[0]["chunks"] == 2
        assert assumptions


class TestKvChoiceRecorded:
    def test_plan_with_resident_kv_sets_the_default(self):
        graph = from_layers([{"weight_bytes": 300, "activation_bytes": 50, "flops": 1000}] * 3)
        graph.graph.update(batch=4, seq_len=1, phase="decode", context=16)
        graph.nodes["1"]["kv_bytes"] = 80
        resident = plan(graph, 450, solver="greedy", memory="additive+kv")
        assert resident.sizes == (350, 430, 350)
        result = estimate(resident, TOY, devices=3)
        assert result.kv == "resident" and all(group.fits_on_chip for group in result.groups)
        assert result.groups[1].partition_major.hbm_bytes == 100
        assert estimate(resident, TOY, devices=3, kv="streamed").groups[1].partition_major.hbm_bytes == 180

    def test_cli_both_choices(self, tmp_path):
        runner = CliRunner()
        sizes = {}
        for kv in ("streamed", "resident"):
            path = tmp_path / f"{kv}.json"
            result = runner.invoke(main, ["plan", "llama-3.1-8b", "--phase", "decode", "--context", "4096", "--batch",
                                          "8", "--capacity", "h100-hbm", "--kv", kv, "--json", str(path)])
            assert result.exit_code == 0, result.output
            assert f"KV cache {kv}:" in result.output
            sizes[kv] = json.loads(path.read_text())["sizes"][0]
            assert runner.invoke(main, ["check", str(path)]).exit_code == 0
        assert sizes["resident"] - sizes["streamed"] == 4_294_967_296
