"""Sliding-window KV caches per layer (gemma2/gemma3 local/global layers, Mistral, Qwen2)."""

import pytest

from cachefit import instances
from cachefit.errors import InputError
from cachefit.graphs.kv import cached_tokens, layer_is_local

transformers = pytest.importorskip("transformers")


def hf_local_layers(config_class, **fields):
    config = config_class(**fields)
    return [kind == "sliding_attention" for kind in config.layer_types]


@pytest.mark.parametrize("family, config_class, fields", [
    ("gemma2", "Gemma2Config", {"num_hidden_layers": 42, "sliding_window": 4096}),
    ("gemma3_text", "Gemma3TextConfig", {"num_hidden_layers": 26, "sliding_window": 512}),
    ("gemma3_text", "Gemma3TextConfig", {"num_hidden_layers": 12, "sliding_window": 512,
                                         "sliding_window_pattern": 4}),
    ("qwen2", "Qwen2Config", {"num_hidden_layers": 8, "sliding_window": 64, "use_sliding_window": True,
                              "max_window_layers": 3}),
    ("qwen2", "Qwen2Config", {"num_hidden_layers": 8, "sliding_window": 64, "max_window_layers": 3}),
    ("qwen3", "Qwen3Config", {"num_hidden_layers": 8, "sliding_window": 64, "use_sliding_window": True,
                              "max_window_layers": 0}),
])
def test_local_layers_match_transformers(family, config_class, fields):
    expected = hf_local_layers(getattr(transformers, config_class), **fields)
    config = dict(fields, model_type=family)
    assert [layer_is_local(config, i) for i in range(fields["num_hidden_layers"])] == expected


def test_explicit_layer_types_win():
    config = {"model_type": "gemma2", "sliding_window": 10, "layer_types": ["full_attention", "sliding_attention"]}
    assert [cached_tokens(config, 100, i) for i in (0, 1)] == [100, 9]
    with pytest.raises(InputError, match=r"`config\['layer_types'\]` must be a list of strings"):
        layer_is_local({"sliding_window": 10, "layer_types": "sliding"}, 0)


def test_mistral_windows_every_layer():
    config = {"model_type": "mistral", "sliding_window": 4096}
    assert {cached_tokens(config, 8192, i) for i in range(32)} == {4095}
    assert cached_tokens(config, 8192) == 4095


def test_gemma3_1b_decode_cache_at_8192():
    """4 global layers × 8 MiB + 22 local layers × 511 tokens (window 512, the new token counted), not 26 × 8 MiB."""
    graph = instances.load("gemma-3-1b", phase="decode", context=8192)
    per_token = 2 * 1 * 256 * 2
    assert graph.graph["kv_bytes"] == 4 * per_token * 8192 + 22 * per_token * 511 == 45_066_240
    assert graph.graph["kv_layers"] == 26
    assert "on 4 global layers" in graph.graph["kv_formula"] and "on 22 local layers" in graph.graph["kv_formula"]
    by_op = instances.load("gemma-3-1b", phase="decode", context=8192, granularity="op")
    assert by_op.graph["kv_bytes"] == graph.graph["kv_bytes"]
    assert by_op.nodes["block.5.attn"]["kv_bytes"] == per_token * 8192  # every 6th layer is global
    assert by_op.nodes["block.4.attn"]["kv_bytes"] == per_token * 511


def test_gemma2_9b_decode_cache_at_its_last_position():
    """8,191 cached tokens + the new one fill gemma-2's 8,192 positions; local layers read 4,095 of them."""
    graph = instances.load("gemma-2-9b", phase="decode", context=8191)
    per_token = 2 * 8 * 256 * 2
    assert graph.graph["kv_bytes"] == 21 * per_token * 8191 + 21 * per_token * 4095
    assert graph.nodes["block.0"]["kv_bytes"] == per_token * 4095  # layer 0 is local
    assert graph.nodes["block.1"]["kv_bytes"] == per_token * 8191


@pytest.mark.parametrize("window, context", [(512, 8192), (512, 511), (512, 512), (512, 100), (4096, 4097), (1, 7)])
def test_decode_cache_is_what_transformers_attends_to(window, context):
    """The new token at position `context` attends, under HF's sliding mask, to exactly `cached_tokens` earlier keys."""
    import torch
    from transformers.masking_utils import sliding_window_causal_mask_function

    mask = sliding_window_causal_mask_function(window)
    keys = torch.arange(context + 1)
    attended = mask(0, 0, torch.tensor(context), keys)
    assert bool(attended[-1])  # itself
    assert int(attended[:-1].sum()) == cached_tokens({"sliding_window": window}, context)


def test_windows_marked_on_prefill_and_decode_graphs_alike():
    """One source: the node's `sliding_window`, set from the config for every phase, caps decode and prefix."""
    from cachefit.graphs.kv import node_windows

    prefill = node_windows(instances.load("gemma-2-9b", granularity="op"))
    decode = node_windows(instances.load("gemma-2-9b", granularity="op", phase="decode", context=8000))
    assert prefill == decode == {f"block.{i}.attn": 4096 for i in range(0, 42, 2)}
    assert node_windows(instances.load("mistral-7b")) == {f"block.{i}": 4096 for i in range(32)}
    assert node_windows(instances.load("qwen2.5-7b")) == {}  # use_sliding_window is false
    assert node_windows(instances.load("llama-3.1-8b")) == {}


def test_short_context_is_not_windowed():
    graph = instances.load("gemma-3-1b", phase="decode", context=256)
    assert graph.graph["kv_bytes"] == 26 * 2 * 256 * 2 * 256


def test_context_zero_keeps_the_layer_count():
    graph = instances.load("gpt2", phase="decode", context=0)
    assert graph.graph["kv_bytes"] == 0 and graph.graph["kv_layers"] == 12


@pytest.mark.parametrize("context", [131_072, 200_000, 10**11])
def test_context_beyond_max_positions_is_refused(context):
    """RoPE models too (llama-3.1-8b: 131,072 positions); both numbers are named."""
    with pytest.raises(InputError, match=rf"`context` \+ new tokens = {context + 1:,} exceeds the model's "
                                         r"`max_position_embeddings` = 131,072; a context of at most 131,071"):
        instances.load("llama-3.1-8b", phase="decode", context=context)
    assert instances.load("llama-3.1-8b", phase="decode", context=131_071).graph["context"] == 131_071


def test_cli_context_beyond_max_positions_exits_2():
    from click.testing import CliRunner

    from cachefit.cli import main

    result = CliRunner().invoke(main, ["plan", "llama-3.1-8b", "-c", "80GB", "--phase", "decode",
                                       "--context", "200000"])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "200,001 exceeds the model's `max_position_embeddings` = 131,072" in result.output


def test_decode_default_context_leaves_a_position_for_the_new_token():
    """gpt2's default prompt is 1,024 tokens; decode caches 1,023 so token 1,024 fits its 1,024 positions."""
    assert instances.load("gpt2", phase="decode").graph["context"] == 1023
    assert instances.load("llama-3.1-8b", phase="decode", seq_len=4096).graph["context"] == 4096
    with pytest.raises(InputError, match="must be at most the learned position table's"):
        instances.load("gpt2", phase="decode", context=1024)


def test_latent_attention_op_nodes_hold_the_cache():
    """DeepSeek's op-granularity attention is `mla_attention`: it holds the same cache as the block graph."""
    block = instances.load("deepseek-v2-lite", phase="decode", context=4096)
    by_op = instances.load("deepseek-v2-lite", phase="decode", context=4096, granularity="op")
    assert by_op.graph["kv_bytes"] == block.graph["kv_bytes"] == 27 * (512 + 64) * 2 * 4096
    assert by_op.graph["kv_layers"] == 27


def test_prefill_context_is_recorded_where_the_prefix_reads_it():
    """The builder records N in graph.graph['context'] (kv.annotate) for a prefill after a context; the plan's
    graph keeps it, so the chunked prefix is attended(N + P) − attended(N) there too."""
    import cachefit
    from cachefit.graphs.kv import graph_context, node_prefix_bytes

    g = instances.load("gemma-2-9b", seq_len=4096, context=2048)
    assert (g.graph["phase"], g.graph["context"], graph_context(g)) == ("prefill", 2048, 2048)
    assert graph_context(instances.load("gemma-2-9b", seq_len=4096)) == 0  # no context: nothing cached
    plan = cachefit.plan(g, "1GiB", memory="liveness+kv", chunk_tokens=1024, tile=True, solver="greedy")
    assert plan.graph.graph["context"] == 2048 and cachefit.check(plan).ok
    prefix = node_prefix_bytes(plan.graph, plan.chunk_fraction)
    assert prefix["block.0"] == 8192 * 2047 and prefix["block.1"] == 8192 * 3072  # local, global layer


class TestTiledWindows:
    """Tiling rebuilds a block graph at operator granularity from its config: the local layers keep their window."""

    @pytest.mark.parametrize("phase, context", [("decode", 8000), ("prefill", 2048)])
    def test_gemma2_tiled_keeps_windows(self, phase, context):
        from cachefit.graphs.tile import tile
        from cachefit.instances import load

        graph = load("gemma-2-9b", phase=phase, context=context, seq_len=1 if phase == "decode" else 512, batch=1)
        tiled = tile(graph, 64 * 2**20)
        attention = {node: data for node, data in tiled.nodes(data=True) if data.get("op") == "attention"}
        assert len(attention) == 42
        for node, data in attention.items():
            layer = int(node.split(".")[1])
            block = graph.nodes[f"block.{layer}"]
            assert data.get("sliding_window") == block.get("sliding_window")
            assert data["kv_bytes"] == block["kv_bytes"]
        local = [data for data in attention.values() if data.get("sliding_window")]
        assert len(local) == 21 and all(data["sliding_window"] == 4096 for data in local)
        # 2 × 8 kv_heads × 256 head_dim × 2 B × min(context, w − 1) tokens
        assert all(data["kv_bytes"] == 2 * 8 * 256 * 2 * min(context, 4095) for data in local)
