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
        graph = instances.load("mistral-7b", phase="decode", context=8192)
        assert graph.nodes["block.0"]["kv_bytes"] == 2 * 8 * 128 * 2 * 4096
        assert "sliding window 4,096 of context 8,192" in graph.graph["kv_formula"]

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
        assert cached_tokens({"sliding_window": 100}, 500) == 100
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
