"""Tests of cachefit.instances: the embedded model library.

Every model's parameter count is re-derived here from its published config
with an explicit formula, pinned to the exact figure, and compared with the
model card's rounded figure."""

import json
import re
from importlib import resources

import networkx as nx
import pytest

from cachefit import instances
from cachefit.errors import InputError
from cachefit.graphs.transformer import param_count

REQUIRED = ["gpt2", "gpt2-xl", "bert-large", "opt-30b", "llama-2-7b", "llama-2-70b",
            "llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b", "mistral-7b", "mixtral-8x7b",
            "qwen2.5-7b", "paper-4x15gb", "paper-shape"]

# name -> (formula from the published config, exact figure).  Per block of a
# Llama-style model: q and o are h*h, k and v are h*kv_dim, the gated MLP is
# 3*h*inter, two RMSNorm weights 2*h; plus untied embedding and LM head and
# the final norm.
EXPECTED = {
    # wte + wpe + 12 x (2 LN + q,k,v,o with bias + fc, proj with bias) + ln_f
    "gpt2": (50257 * 768 + 1024 * 768
             + 12 * (2 * 2 * 768 + 4 * (768 * 768 + 768) + (768 * 3072 + 3072)
                     + (3072 * 768 + 768)) + 2 * 768,
             124_439_808),
    "gpt2-xl": (50257 * 1600 + 1024 * 1600
                + 48 * (2 * 2 * 1600 + 4 * (1600 * 1600 + 1600) + (1600 * 6400 + 6400)
                        + (6400 * 1600 + 1600)) + 2 * 1600,
                1_557_611_200),
    # word + position + token type + embedding LN, 24 post-LN blocks, pooler
    "bert-large": ((30522 + 512 + 2) * 1024 + 2 * 1024
                   + 24 * (4 * (1024 * 1024 + 1024) + (1024 * 4096 + 4096)
                           + (4096 * 1024 + 1024) + 2 * 2 * 1024)
                   + (1024 * 1024 + 1024),
                   335_141_888),
    # tied embed_tokens, 2048 + 2 learned positions, biased linears, final LN
    "opt-30b": ((50272 + 2048 + 2) * 7168
                + 48 * (4 * (7168 * 7168 + 7168) + (7168 * 28672 + 28672)
                        + (28672 * 7168 + 7168) + 2 * 2 * 7168) + 2 * 7168,
                29_974_540_288),
    "llama-2-7b": (2 * 32000 * 4096 + 32 * (4 * 4096 ** 2 + 3 * 4096 * 11008 + 2 * 4096) + 4096,
                   6_738_415_616),
    "llama-2-70b": (2 * 32000 * 8192
                    + 80 * (2 * 8192 ** 2 + 2 * 8192 * 1024 + 3 * 8192 * 28672 + 2 * 8192) + 8192,
                    68_976_648_192),
    "llama-3.1-8b": (2 * 128256 * 4096
                     + 32 * (2 * 4096 ** 2 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096) + 4096,
                     8_030_261_248),
    "llama-3.1-70b": (2 * 128256 * 8192
                      + 80 * (2 * 8192 ** 2 + 2 * 8192 * 1024 + 3 * 8192 * 28672 + 2 * 8192)
                      + 8192,
                      70_553_706_496),
    "llama-3.1-405b": (2 * 128256 * 16384
                       + 126 * (2 * 16384 ** 2 + 2 * 16384 * 1024 + 3 * 16384 * 53248
                                + 2 * 16384) + 16384,
                       405_853_388_800),
    "mistral-7b": (2 * 32000 * 4096
                   + 32 * (2 * 4096 ** 2 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096) + 4096,
                   7_241_732_096),
    # 8 experts of 3*h*inter and a router h*8 per block
    "mixtral-8x7b": (2 * 32000 * 4096
                     + 32 * (2 * 4096 ** 2 + 2 * 4096 * 1024 + 8 * 3 * 4096 * 14336 + 4096 * 8
                             + 2 * 4096) + 4096,
                     46_702_792_704),
    # q, k, v biases (3584 + 2 * 512) per block
    "qwen2.5-7b": (2 * 152064 * 3584
                   + 28 * (2 * 3584 ** 2 + 2 * 3584 * 512 + (3584 + 2 * 512)
                           + 3 * 3584 * 18944 + 2 * 3584) + 3584,
                   7_615_616_512),
    # tied; fused qkv h x (h + 2 * 64) (multi-query); one LN per block; no biases
    "falcon-7b": (65024 * 4544
                  + 32 * (4544 * (4544 + 2 * 64) + 4544 ** 2 + 2 * 4544 * 18176 + 2 * 4544)
                  + 2 * 4544,
                  6_921_720_704),
    # untied; 32 MHA blocks (fused qkv and gate_up hold the same parameters)
    "phi-3-mini-4k": (2 * 32064 * 3072 + 32 * (4 * 3072 ** 2 + 3 * 3072 * 8192 + 2 * 3072) + 3072,
                      3_821_079_552),
    # tied; q 16 x 256 heads, k/v 8 x 256; four RMSNorms per block
    "gemma-2-9b": (256000 * 3584
                   + 42 * (2 * 3584 * 4096 + 2 * 3584 * 2048 + 3 * 3584 * 14336 + 4 * 3584)
                   + 3584,
                   9_241_705_984),
    # tied; as Gemma 2 plus q/k per-head norms of head_dim 256
    "gemma-3-1b": (262144 * 1152
                   + 26 * (2 * 1152 * 1024 + 2 * 1152 * 256 + 3 * 1152 * 6912 + 4 * 1152 + 2 * 256)
                   + 1152,
                   999_885_952),
    # q,k,v biases; router; 60 experts of 1408; shared expert of 5632 and its 1-wide gate
    "qwen1.5-moe-a2.7b": (2 * 151936 * 2048
                          + 24 * (4 * 2048 ** 2 + 3 * 2048 + 2048 * 60 + 60 * 3 * 2048 * 1408
                                  + 3 * 2048 * 5632 + 2048 + 2 * 2048) + 2048,
                          14_315_784_192),
    # q/k norms of head_dim 128
    "qwen3-8b": (2 * 151936 * 4096
                 + 36 * (2 * 4096 ** 2 + 2 * 4096 * 1024 + 3 * 4096 * 12288 + 2 * 4096 + 2 * 128)
                 + 4096,
                 8_190_735_360),
    # 32 x 128 query heads on a 2048 model; 128 experts of 768, top 8
    "qwen3-30b-a3b": (2 * 151936 * 2048
                      + 48 * (2 * 2048 * 4096 + 2 * 2048 * 512 + 2048 * 128
                              + 128 * 3 * 2048 * 768 + 2 * 2048 + 2 * 128) + 2048,
                      30_532_122_624),
    # MLA without a low-rank query: q 2048 x 16*(128+64), kv_a 2048 x (512+64) + norm 512,
    # kv_b 512 x 16*(128+128), o 16*128 x 2048; layer 0 dense, 26 MoE layers
    "deepseek-v2-lite": (2 * 102400 * 2048
                         + 27 * (2048 * 16 * 192 + 2048 * 576 + 512 + 512 * 16 * 256
                                 + 16 * 128 * 2048 + 2 * 2048)
                         + 3 * 2048 * 10944
                         + 26 * (2048 * 64 + 64 * 3 * 2048 * 1408 + 3 * 2048 * 2 * 1408)
                         + 2048,
                         15_706_484_224),
    # MLA with q_a 7168 x 1536 + norm; 3 dense layers; 58 layers of 256 routed + 1 shared
    "deepseek-v3": (2 * 129280 * 7168
                    + 61 * (7168 * 1536 + 1536 + 1536 * 128 * 192 + 7168 * 576 + 512
                            + 512 * 128 * 256 + 128 * 128 * 7168 + 2 * 7168)
                    + 3 * 3 * 7168 * 18432
                    + 58 * (7168 * 256 + 256 * 3 * 7168 * 2048 + 3 * 7168 * 2048)
                    + 7168,
                    671_026_404_352),
    # untied; two LayerNorms, fused qkv and dense with bias, fc MLP with bias
    "gpt-neox-20b": (2 * 50432 * 6144
                     + 44 * (2 * 2 * 6144 + 4 * (6144 ** 2 + 6144) + (6144 * 24576 + 24576)
                             + (24576 * 6144 + 6144)) + 2 * 6144,
                     20_554_567_680),
    # untied; GQA 4 x 128 k/v heads; every projection and norm biased
    "starcoder2-15b": (2 * 49152 * 6144
                       + 40 * (2 * (6144 ** 2 + 6144) + 2 * (6144 * 512 + 512)
                               + (6144 * 24576 + 24576) + (24576 * 6144 + 6144) + 2 * 2 * 6144)
                       + 2 * 6144,
                       15_957_889_024),
    # four 15 GB BF16 layers
    "paper-4x15gb": (4 * 15_000_000_000 // 2, 30_000_000_000),
    # 4 blocks: q,k,v,o 4096^2, fc1/fc2 4096*16384, two LayerNorms; no embedding/head
    "paper-shape": (4 * (4 * 4096 ** 2 + 2 * 4096 * 16384 + 2 * 2 * 4096), 805_371_904),
}


def reference_value(text):
    """'7B' -> 7e9, '124M' -> 124e6, '7.61B' -> 7.61e9."""
    match = re.fullmatch(r"([0-9.]+)([MB])", text)
    assert match, text
    return float(match.group(1)) * {"M": 1e6, "B": 1e9}[match.group(2)]


def significant_digits(text):
    return len(re.sub(r"[^0-9]", "", text).lstrip("0"))


class TestNames:
    def test_sorted_and_complete(self):
        names = instances.names()
        assert names == sorted(names)
        assert set(REQUIRED) <= set(names)
        assert set(names) == set(EXPECTED)

    def test_data_files_are_package_resources(self):
        folder = resources.files("cachefit.instances").joinpath("data")
        stems = sorted(entry.name[:-len(".json")] for entry in folder.iterdir()
                       if entry.name.endswith(".json"))
        assert stems == instances.names()


class TestDataFiles:
    @pytest.mark.parametrize("name", sorted(EXPECTED))
    def test_record(self, name):
        text = resources.files("cachefit.instances").joinpath("data", f"{name}.json").read_text()
        record = json.loads(text)
        assert record["name"] == name
        assert record["kind"] in ("transformer", "layers")
        assert isinstance(record["source"], str) and record["source"]
        assert isinstance(record["config"], dict)
        if not name.startswith("paper-"):
            assert record["source"].endswith("config.json")
            assert record["params_reference"] and record["params_reference_source"]

    def test_paper_shape_says_no_vocabulary(self):
        record = json.loads(resources.files("cachefit.instances")
                            .joinpath("data", "paper-shape.json").read_text())
        assert "No vocabulary figure is stated" in record["source"]
        assert record["config"]["vocab_size"] == 0


class TestParams:
    @pytest.mark.parametrize("name", sorted(EXPECTED))
    def test_exact_count(self, name):
        formula, exact = EXPECTED[name]
        assert formula == exact
        assert instances.info(name)["params"] == exact
        if instances.info(name)["kind"] == "transformer":
            assert param_count(instances.config(name)) == exact

    @pytest.mark.parametrize("name", sorted(n for n in EXPECTED if not n.startswith("paper-")))
    def test_matches_model_card_rounding(self, name):
        reference = instances.info(name)["params_reference"]
        # "7B" is a nominal size (within 5%); "124M", "46.7B", "7.61B" are precise (0.5%).
        tolerance = 0.005 if significant_digits(reference) >= 3 else 0.05
        exact = EXPECTED[name][1]
        assert abs(exact - reference_value(reference)) <= tolerance * reference_value(reference)

    def test_qwen_non_embedding_figure(self):
        # The Qwen2.5-7B card also states 6.53B non-embedding parameters.
        assert round((EXPECTED["qwen2.5-7b"][1] - 2 * 152064 * 3584) / 1e9, 2) == 6.53


class TestConfig:
    def test_hf_fields(self):
        cfg = instances.config("llama-3.1-8b")
        assert {key: cfg[key] for key in (
            "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "vocab_size", "tie_word_embeddings")} == {
            "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256,
            "tie_word_embeddings": False}
        assert instances.config("gpt2")["n_embd"] == 768

    def test_returns_a_copy(self):
        instances.config("llama-2-7b")["hidden_size"] = 1
        instances.config("paper-4x15gb")["layers"][0]["params"] = 1
        assert instances.config("llama-2-7b")["hidden_size"] == 4096
        assert instances.info("paper-4x15gb")["params"] == 30_000_000_000

    def test_unknown_name(self):
        with pytest.raises(InputError, match=r"`name` must be one of the embedded models "
                                             r"\(bert-large, .*gpt2, .*qwen2.5-7b, .*starcoder2-15b\), got 'gpt-5'"):
            instances.config("gpt-5")


class TestInfo:
    def test_fields(self):
        assert instances.info("llama-2-7b") == {
            "name": "llama-2-7b", "kind": "transformer", "params": 6_738_415_616,
            "weight_bytes": 2 * 6_738_415_616, "layers": 32,
            "source": "meta-llama/Llama-2-7b-hf config.json", "params_reference": "7B",
            "batch": 1, "seq_len": 2048}

    def test_dtype_and_layers(self):
        assert instances.info("gpt2", dtype="fp32")["weight_bytes"] == 4 * 124_439_808
        assert instances.info("gpt2-xl")["layers"] == 48
        assert instances.info("paper-4x15gb")["layers"] == 4
        assert instances.info("paper-4x15gb")["params_reference"] is None

    def test_weight_bytes_match_the_graph(self):
        for name in instances.names():
            graph = instances.load(name, seq_len=8)
            assert (sum(d["weight_bytes"] for _, d in graph.nodes(data=True))
                    == instances.info(name)["weight_bytes"])

    def test_errors(self):
        with pytest.raises(InputError, match=r"`name` must be one of the embedded models"):
            instances.info("nope")
        with pytest.raises(InputError, match=r"`dtype` must be one of fp32, bf16"):
            instances.info("gpt2", dtype="fp4")


class TestLoad:
    def test_defaults(self):
        graph = instances.load("llama-3.1-8b")
        assert (graph.graph["batch"], graph.graph["seq_len"], graph.graph["dtype"]) == (1, 2048, "bf16")
        assert graph.graph["name"] == "llama-3.1-8b"
        assert graph.graph["source"] == "meta-llama/Llama-3.1-8B config.json"
        assert instances.load("gpt2").graph["seq_len"] == 1024
        assert instances.load("bert-large").graph["seq_len"] == 512
        paper = instances.load("paper-shape")
        assert (paper.graph["batch"], paper.graph["seq_len"]) == (128, 10000)

    def test_overrides(self):
        graph = instances.load("mistral-7b", batch=4, seq_len=128, dtype="fp8", granularity="op")
        assert (graph.graph["batch"], graph.graph["seq_len"], graph.graph["dtype"],
                graph.graph["granularity"]) == (4, 128, "fp8", "op")
        assert graph.nodes["block.0.q"]["activation_bytes"] == 4 * 128 * 4096

    @pytest.mark.parametrize("name", sorted(EXPECTED))
    @pytest.mark.parametrize("granularity", ["block", "op"])
    def test_every_instance_builds(self, name, granularity):
        graph = instances.load(name, seq_len=64, granularity=granularity)
        assert nx.is_directed_acyclic_graph(graph)
        position = {node: index for index, node in enumerate(graph)}
        assert all(position[u] < position[v] for u, v in graph.edges)
        assert sum(d["params"] for _, d in graph.nodes(data=True)) == EXPECTED[name][1]
        if granularity == "block":
            nodes = list(graph)
            assert list(graph.edges) == list(zip(nodes[:-1], nodes[1:]))

    def test_tied_models(self):
        for name in ("gpt2", "gpt2-xl", "opt-30b", "falcon-7b"):
            head = instances.load(name, seq_len=8).nodes["lm_head"]
            assert head["tied_to"] == "embed" and head["weight_bytes"] == 0
        assert instances.load("llama-3.1-8b").nodes["lm_head"]["weight_bytes"] == 2 * 128256 * 4096

    def test_paper_4x15gb(self):
        graph = instances.load("paper-4x15gb")
        assert list(graph) == ["linear.0", "linear.1", "linear.2", "linear.3"]
        assert list(graph.edges) == [("linear.0", "linear.1"), ("linear.1", "linear.2"),
                                     ("linear.2", "linear.3")]
        for _, data in graph.nodes(data=True):
            assert data["op"] == "linear" and data["out_features"] == 16384
            assert data["weight_bytes"] == 15_000_000_000
            assert data["activation_bytes"] == 128 * 10000 * 16384 * 2
            assert data["buffer_bytes"] == 0 and "in_features" not in data
        assert graph.graph["batch"] == 128 and graph.graph["seq_len"] == 10000
        assert instances.load("paper-4x15gb", granularity="op").graph["granularity"] == "op"

    def test_paper_shape(self):
        graph = instances.load("paper-shape", seq_len=16)
        assert list(graph) == ["block.0", "block.1", "block.2", "block.3"]
        block = graph.nodes["block.0"]
        assert (block["num_heads"], block["head_dim"], block["hidden_size"],
                block["intermediate_size"], block["mlp"]) == (32, 128, 4096, 16384, "fc")
        assert block["activation_bytes"] == 128 * 16 * 4096 * 2

    @pytest.mark.parametrize("kwargs, pattern", [
        ({"batch": 0}, r"`batch` must be a positive integer or None, got 0"),
        ({"seq_len": "long"}, r"`seq_len` must be a positive integer or None, got 'long'"),
        ({"dtype": "fp64"}, r"`dtype` must be one of fp32, bf16, fp16, fp8, int8, got 'fp64'"),
        ({"granularity": "tile"}, r"`granularity` must be one of 'block', 'op', got 'tile'"),
    ])
    @pytest.mark.parametrize("name", ["gpt2", "paper-4x15gb"])
    def test_invalid_arguments(self, name, kwargs, pattern):
        with pytest.raises(InputError, match=pattern):
            instances.load(name, **kwargs)

    def test_seq_len_beyond_positions(self):
        with pytest.raises(InputError, match=r"`seq_len` must be at most the learned position "
                                             r"table's `max_position_embeddings` = 1024, got 2048"):
            instances.load("gpt2", seq_len=2048)

    def test_unknown_name(self):
        with pytest.raises(InputError, match=r"`name` must be one of the embedded models "
                                             r"\(bert-large, deepseek-v2-lite, deepseek-v3, falcon-7b, .*\), "
                                             r"got 'llama-4'"):
            instances.load("llama-4")
