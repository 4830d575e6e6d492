import pytest

from cachefit import InputError, instances, plan
from cachefit.graphs import from_hf_config, transformer
from cachefit.graphs.kv import cached_tokens, kv_bytes, kv_formula

LLAMA_8B_LAYER = 2 * 8 * 128 * 2 * 4096 * 8  # kv_heads 8, head_dim 128, bf16, context 4096, batch 8


def _kv(graph):
    return {node: data["kv_bytes"] for node, data in graph.nodes(data=True) if data.get("kv_bytes")}


class TestDecodeGraph:
    def test_llama_8b_block_granularity(self):
        graph = instances.load("llama-3.1-8b", phase="decode", context=4096, batch=8)
        kv = _kv(graph)
        assert set(kv) == {f"block.{i}" for i in range(32)}
        assert set(kv.values()) == {LLAMA_8B_LAYER} == {134_217_728}
        assert graph.graph["kv_bytes"] == 32 * LLAMA_8B_LAYER
        assert (graph.graph["phase"], graph.graph["context"], graph.graph["seq_len"], graph.graph["batch"]) == \
            ("decode", 4096, 1, 8)
        assert graph.nodes["block.0"]["activation_bytes"] == 8 * 4096 * 2  # batch tokens × hidden × 2 B

    def test_op_granularity_only_attention_nodes(self):
        graph = instances.load("llama-3.1-8b", phase="decode", context=4096, batch=8, granularity="op")
        kv = _kv(graph)
        assert set(kv) == {f"block.{i}.attn" for i in range(32)}
        assert sum(kv.values()) == graph.graph["kv_bytes"] == 32 * LLAMA_8B_LAYER

    def test_decode_flops_count_the_cache(self):
        prefill = instances.load("llama-3.1-8b", seq_len=1, batch=8, granularity="op")
        decode = instances.load("llama-3.1-8b", phase="decode", context=4096, batch=8, granularity="op")
        extra = decode.nodes["block.0.attn"]["flops"] - prefill.nodes["block.0.attn"]["flops"]
        assert extra == 4 * 8 * 1 * 4096 * 32 * 128
        assert decode.nodes["block.0.q"]["flops"] == prefill.nodes["block.0.q"]["flops"]

    def test_default_context_is_seq_len(self):
        graph = instances.load("llama-3.1-8b", phase="decode", seq_len=1000, batch=2)
        assert graph.graph["context"] == 1000 and graph.graph["seq_len"] == 1
        assert graph.nodes["block.3"]["kv_bytes"] == 2 * 8 * 128 * 2 * 1000 * 2

    def test_prefill_graph_unchanged(self):
        graph = instances.load("llama-3.1-8b")
        assert not _kv(graph) and "kv_bytes" not in graph.nodes["block.0"]
        assert graph.graph["phase"] == "prefill"

    def test_prefill_with_cached_prefix(self):
        graph = instances.load("llama-3.1-8b", seq_len=128, context=512)
        assert graph.nodes["block.0"]["kv_bytes"] == 2 * 8 * 128 * 2 * 512 * 1
        assert graph.graph["seq_len"] == 128

    def test_mistral_sliding_window_caps_cache(self):
        """The new token's window of 4,096 counts itself: it reads 4,095 cached tokens (HF keeps as many)."""
        graph = instances.load("mistral-7b", phase="decode", context=8192)
        assert graph.nodes["block.0"]["kv_bytes"] == 2 * 8 * 128 * 2 * 4095
        assert "4,095 tokens (sliding window 4,096, the new token's included, of context 8,192)" in \
            graph.graph["kv_formula"]

    def test_qwen_inactive_window_ignored(self):
        graph = instances.load("qwen2.5-7b", phase="decode", context=8192)
        config = instances.config("qwen2.5-7b")
        assert graph.nodes["block.0"]["kv_bytes"] == 2 * config["num_key_value_heads"] * 128 * 2 * 8192

    def test_from_hf_config_decode(self):
        config = dict(instances.config("llama-3.1-8b"))
        graph = from_hf_config(config, phase="decode", context=4096, batch=8)
        assert set(_kv(graph).values()) == {LLAMA_8B_LAYER}

    def test_tiling_keeps_kv(self):
        graph = instances.load("llama-3.1-8b", phase="decode", context=4096, batch=8)
        result = plan(graph, "h100-l2", tile=True, solver="greedy")
        assert result.ok
        assert sum(_kv(result.graph).values()) == 32 * LLAMA_8B_LAYER

    def test_learned_positions_bound_context(self):
        with pytest.raises(InputError, match=r"^`seq_len` \+ `context` must be at most the learned position "
                                             r"table's `max_position_embeddings` = 1024, got 1025$"):
            instances.load("gpt2", phase="decode", context=1024)


class TestFormulas:
    def test_mla_latent_cache(self):
        config = {"kv_lora_rank": 512, "qk_rope_head_dim": 64, "num_key_value_heads": 128, "head_dim": 192}
        assert kv_bytes(config, context=4096, batch=2, dtype_size=2) == (512 + 64) * 2 * 4096 * 2
        assert kv_formula(config, context=4096, batch=2, dtype_size=2).startswith(
            "(512 kv_lora_rank + 64 qk_rope_head_dim) × 2 B × 4,096 tokens × 2 batch")

    def test_mla_config_through_transformer(self):
        config = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "intermediate_size": 128, "vocab_size": 100, "kv_lora_rank": 16, "qk_rope_head_dim": 8}
        graph = transformer(config, phase="decode", context=10, batch=3)
        assert graph.nodes["block.0"]["kv_bytes"] == (16 + 8) * 2 * 10 * 3

    def test_window(self):
        assert cached_tokens({"sliding_window": 100}, 50) == 50
        assert cached_tokens({"sliding_window": 100}, 500) == 99
        assert cached_tokens({"sliding_window": 100}, 99) == 99
        assert cached_tokens({"sliding_window": 100, "use_sliding_window": False}, 500) == 500


class TestErrors:
    def test_bad_phase(self):
        with pytest.raises(InputError, match=r"^`phase` must be one of 'prefill', 'decode', got 'train'$"):
            instances.load("gpt2", phase="train")

    @pytest.mark.parametrize("bad", [-1, 1.5, True, "8"])
    def test_bad_context(self, bad):
        with pytest.raises(InputError, match=r"^`context` must be a non-negative integer \(tokens already in the "
                                             r"KV cache\), got "):
            instances.load("llama-3.1-8b", phase="decode", context=bad)

    def test_layers_instance_refuses_decode(self):
        with pytest.raises(InputError, match=r"needs attention layers; 'paper-4x15gb' is a chain of dense layers"):
            instances.load("paper-4x15gb", phase="decode", context=10)


# ---------------------------------------------------------------------------
# the KV cache in the memory models (NAME+kv: resident with its group)
# ---------------------------------------------------------------------------

from hypothesis import given, settings, strategies as st  # noqa: E402

from cachefit import check  # noqa: E402
from cachefit.memory import MODELS, group_sizes, kv_placement, with_kv  # noqa: E402
from cachefit.graphs import from_layers  # noqa: E402
from strategies import graphs  # noqa: E402
from test_memory import dag_grouping  # noqa: E402


class TestKvModels:
    @settings(max_examples=60, deadline=None)
    @given(st.data())
    def test_engine_matches_reference_with_kv(self, data):
        g = data.draw(graphs(min_nodes=1))
        for node in g:
            g.nodes[node]["kv_bytes"] = data.draw(st.integers(0, 50))
        memory = data.draw(st.sampled_from(["additive+kv", "liveness+kv"]))
        fraction = data.draw(st.sampled_from([1.0, 0.5, 1 / 3]))
        groups = dag_grouping(data.draw, g)
        group_of = {v: index for index, group in enumerate(groups) for v in group}
        reference = MODELS[memory].reference(g, groups, group_of, fraction)
        assert group_sizes(g, groups, memory=memory, chunk_fraction=fraction) == reference
        base = MODELS[memory.removesuffix("+kv")].reference(g, groups, group_of, fraction)
        assert reference == [size + sum(g.nodes[v]["kv_bytes"] for v in group) for size, group in zip(base, groups)]

    def test_resident_adds_exactly_the_cache(self):
        graph = instances.load("llama-3.1-8b", phase="decode", context=4096, batch=8)
        streamed = plan(graph, "h100-hbm", memory="liveness")
        resident = plan(graph, "h100-hbm", memory=with_kv("liveness", "resident"))
        assert resident.memory == "liveness+kv" and kv_placement(resident.memory) == "resident"
        assert resident.sizes[0] - streamed.sizes[0] == 32 * LLAMA_8B_LAYER == 4_294_967_296
        assert check(resident).ok and check(streamed).ok

    def test_checker_recomputes_the_cache(self):
        graph = from_layers([{"weight_bytes": 10, "activation_bytes": 1}] * 3)
        graph.nodes["1"]["kv_bytes"] = 7
        resident = plan(graph, 100, memory="additive+kv", solver="greedy")
        assert resident.sizes == (40,)
        from dataclasses import replace
        forged = replace(resident, sizes=(33,), bottleneck=33)  # the size without the cache
        report = check(forged)
        assert not report.ok and report.sizes == (40,)

    def test_resident_cache_makes_more_groups(self):
        graph = from_layers([{"weight_bytes": 10, "activation_bytes": 0}] * 4)
        for node in graph:
            graph.nodes[node]["kv_bytes"] = 10
        assert plan(graph, 40, memory="additive", solver="greedy").k == 1
        assert plan(graph, 40, memory="additive+kv", solver="greedy").k == 2

    @pytest.mark.parametrize("bad", [-1, 1.5, True, "3"])
    def test_bad_kv_bytes_named(self, bad):
        graph = from_layers([10, 10])
        graph.nodes["1"]["kv_bytes"] = bad
        with pytest.raises(InputError, match=r"^node '1': `kv_bytes` must be a non-negative integer of bytes, got "):
            plan(graph, 100, memory="liveness+kv", solver="greedy")

    def test_with_kv_errors(self):
        with pytest.raises(InputError, match=r"^`kv` must be one of 'streamed', 'resident', got 'swap'$"):
            with_kv("liveness", "swap")
        with pytest.raises(InputError, match=r"^`memory` must be one of "):
            with_kv("nope", "resident")
