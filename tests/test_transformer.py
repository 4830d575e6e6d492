"""Tests of cachefit.graphs.transformer: config normalisation, parameter
counts (re-derived here by hand), graph structure at both granularities and
the byte/flop conventions."""

import json
import math
import time

import networkx as nx
import pytest

from cachefit.errors import InputError
from cachefit.graphs.transformer import (
    MODEL_TYPES, normalize_config, param_breakdown, param_count, transformer)

DTYPE_SIZES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp8": 1, "int8": 1}

# Tiny configs of every family; small enough to build op graphs quickly.
LLAMA = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 3,
         "num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 160,
         "vocab_size": 100}
QWEN2 = dict(LLAMA, model_type="qwen2")
MIXTRAL = dict(LLAMA, model_type="mixtral", num_local_experts=4, num_experts_per_tok=2)
GPT2 = {"model_type": "gpt2", "n_embd": 48, "n_layer": 2, "n_head": 4, "n_positions": 32,
        "vocab_size": 90}
OPT = {"model_type": "opt", "hidden_size": 48, "num_hidden_layers": 2,
       "num_attention_heads": 4, "ffn_dim": 96, "max_position_embeddings": 32,
       "vocab_size": 90, "word_embed_proj_dim": 48}
BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 16,
        "type_vocab_size": 2, "vocab_size": 50}
FALCON = {"model_type": "falcon", "hidden_size": 48, "num_hidden_layers": 2,
          "num_attention_heads": 6, "multi_query": True, "parallel_attn": True,
          "bias": False, "vocab_size": 70}
FALCON40 = dict(FALCON, new_decoder_architecture=True, num_kv_heads=2)
PAPER_SHAPE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
               "head_dim": 16, "intermediate_size": 256, "vocab_size": 0, "mlp": "fc",
               "norm": "layernorm", "position_embedding": "none", "final_norm": False,
               "attention_bias": False, "mlp_bias": False}
ALL = {"llama": LLAMA, "qwen2": QWEN2, "mixtral": MIXTRAL, "gpt2": GPT2, "opt": OPT,
       "bert": BERT, "falcon": FALCON, "falcon40": FALCON40, "paper": PAPER_SHAPE}
SEQ = 16


def node_sum(graph, key):
    return sum(data[key] for _, data in graph.nodes(data=True))


def assert_insertion_order_is_topological(graph):
    position = {node: index for index, node in enumerate(graph)}
    assert all(position[u] < position[v] for u, v in graph.edges)


# --------------------------------------------------------------------------
# hand-derived parameter counts (independent of the module)
# --------------------------------------------------------------------------

def llama_params(h, layers, heads, kv, inter, vocab, *, tied=False, qkv_bias=False, experts=0):
    d = h // heads
    attention = 2 * h * h + 2 * h * kv * d + ((h + 2 * kv * d) if qkv_bias else 0)
    mlp = 3 * h * inter
    if experts:
        mlp = experts * mlp + h * experts  # experts + router
    return vocab * h * (1 if tied else 2) + layers * (attention + mlp + 2 * h) + h


def gpt2_params(h, layers, positions, vocab, inner=None):
    inner = inner or 4 * h
    block = 2 * 2 * h + 4 * (h * h + h) + (h * inner + inner) + (inner * h + h)
    return vocab * h + positions * h + layers * block + 2 * h


class TestParamCount:
    def test_llama_2_7b(self):
        cfg = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32,
               "num_attention_heads": 32, "intermediate_size": 11008, "vocab_size": 32000}
        assert param_count(cfg) == llama_params(4096, 32, 32, 32, 11008, 32000) == 6_738_415_616

    def test_gpt2_with_hf_field_names(self):
        cfg = {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12,
               "n_positions": 1024, "vocab_size": 50257, "n_inner": None}
        assert param_count(cfg) == gpt2_params(768, 12, 1024, 50257) == 124_439_808

    def test_tiny_families(self):
        assert param_count(LLAMA) == llama_params(64, 3, 8, 2, 160, 100)
        assert param_count(QWEN2) == llama_params(64, 3, 8, 2, 160, 100, qkv_bias=True)
        assert param_count(MIXTRAL) == llama_params(64, 3, 8, 2, 160, 100, experts=4)
        assert param_count(GPT2) == gpt2_params(48, 2, 32, 90)
        # OPT: learned positions have 2 extra rows; ffn_dim is the MLP width.
        assert param_count(OPT) == gpt2_params(48, 2, 34, 90, inner=96)

    def test_bert_is_post_ln_with_embedding_norm_and_pooler(self):
        h, inner = 32, 64
        block = 4 * (h * h + h) + (h * inner + inner) + (inner * h + h) + 2 * 2 * h
        embedding = (50 + 16 + 2) * h + 2 * h
        assert param_count(BERT) == embedding + 2 * block + (h * h + h)

    def test_falcon_parallel_multi_query(self):
        h, d = 48, 8
        block = h * (h + 2 * d) + h * h + 2 * h * 4 * h + 2 * h  # one shared LayerNorm
        assert param_count(FALCON) == 70 * h + 2 * block + 2 * h
        block40 = h * (h + 2 * 2 * d) + h * h + 2 * h * 4 * h + 2 * 2 * h  # two LayerNorms
        assert param_count(FALCON40) == 70 * h + 2 * block40 + 2 * h

    def test_tied_embedding_counted_once(self):
        untied = param_count(dict(LLAMA, tie_word_embeddings=False))
        assert param_count(dict(LLAMA, tie_word_embeddings=True)) == untied - 100 * 64

    def test_vocab_zero_means_no_embedding_and_no_head(self):
        h = 64
        block = 4 * h * h + 2 * h * 256 + 2 * 2 * h
        assert param_count(PAPER_SHAPE) == 2 * block

    def test_explicit_biases(self):
        biased = dict(LLAMA, attention_bias=True, mlp_bias=True)
        kv_width = 2 * 8
        extra = 3 * (64 + 2 * kv_width + 64 + 2 * 160 + 64)
        assert param_count(biased) == param_count(LLAMA) + extra
        only_qkv = dict(biased, attention_out_bias=False, mlp_bias=False)
        assert param_count(only_qkv) == param_count(QWEN2)

    def test_breakdown_adds_up(self):
        for cfg in ALL.values():
            parts = param_breakdown(cfg)
            assert parts["total"] == (parts["embedding"] + parts["blocks"]
                                      + parts["final_norm"] + parts["head"])
            assert parts["blocks"] == parts["per_block"] * normalize_config(cfg)["num_hidden_layers"]

    def test_breakdown_of_llama(self):
        assert param_breakdown(LLAMA) == {
            "embedding": 6400, "blocks": 3 * (2 * 64 * 64 + 2 * 64 * 16 + 3 * 64 * 160 + 128),
            "per_block": 2 * 64 * 64 + 2 * 64 * 16 + 3 * 64 * 160 + 128,
            "final_norm": 64, "head": 6400,
            "total": llama_params(64, 3, 8, 2, 160, 100)}


class TestNormalizeConfig:
    def test_llama_defaults(self):
        cfg = normalize_config(LLAMA)
        assert (cfg["mlp"], cfg["norm"], cfg["position_embedding"], cfg["hidden_act"]) == (
            "gated", "rmsnorm", "rope", "silu")
        assert cfg["head_dim"] == 8 and cfg["num_key_value_heads"] == 2
        assert cfg["tie_word_embeddings"] is False and cfg["causal"] is True

    @pytest.mark.parametrize("model_type", sorted(MODEL_TYPES))
    def test_every_model_type_has_every_default(self, model_type):
        assert set(MODEL_TYPES[model_type]) >= set(MODEL_TYPES["llama"])

    def test_no_model_type_gets_llama_defaults(self):
        cfg = dict(LLAMA)
        del cfg["model_type"]
        assert normalize_config(cfg) == dict(normalize_config(LLAMA), model_type=None)

    def test_gpt2_defaults_and_aliases(self):
        cfg = normalize_config(GPT2)
        assert cfg["hidden_size"] == 48 and cfg["intermediate_size"] == 192
        assert (cfg["mlp"], cfg["norm"], cfg["position_embedding"]) == ("fc", "layernorm", "learned")
        assert cfg["hidden_act"] == "gelu_tanh" and cfg["tie_word_embeddings"] is True

    def test_qwen2_has_qkv_bias_only(self):
        cfg = normalize_config(QWEN2)
        assert cfg["attention_bias"] is True and cfg["attention_out_bias"] is False
        assert cfg["mlp_bias"] is False

    def test_opt_translation(self):
        cfg = normalize_config(dict(OPT, enable_bias=False, do_layer_norm_before=False))
        assert cfg["attention_bias"] is False and cfg["mlp_bias"] is False
        assert cfg["norm_position"] == "post" and cfg["final_norm"] is False
        assert cfg["position_offset"] == 2 and cfg["hidden_act"] == "relu"

    def test_falcon_translation(self):
        cfg = normalize_config(FALCON)
        assert cfg["num_key_value_heads"] == 1 and cfg["parallel_attention"] is True
        assert cfg["parallel_norms"] == 1 and cfg["attention_bias"] is False
        cfg40 = normalize_config(FALCON40)
        assert cfg40["num_key_value_heads"] == 2 and cfg40["parallel_norms"] == 2
        assert normalize_config(dict(FALCON, alibi=True))["position_embedding"] == "none"

    def test_explicit_keys_override_defaults(self):
        cfg = normalize_config(dict(LLAMA, mlp="fc", norm="layernorm", hidden_act="relu"))
        assert (cfg["mlp"], cfg["norm"], cfg["hidden_act"]) == ("fc", "layernorm", "relu")

    def test_input_not_modified_and_json_ready(self):
        before = json.dumps(GPT2, sort_keys=True)
        cfg = normalize_config(GPT2)
        assert json.dumps(GPT2, sort_keys=True) == before
        assert json.loads(json.dumps(cfg)) == cfg

    @pytest.mark.parametrize("field, pattern", [
        ("hidden_size", r"`config` must give `hidden_size` \(or `n_embd`\): the model width"),
        ("num_hidden_layers", r"`config` must give `num_hidden_layers` \(or `n_layer`\)"),
        ("num_attention_heads", r"`config` must give `num_attention_heads` \(or `n_head`\)"),
        ("intermediate_size", r"`config` must give `intermediate_size` .*: the MLP width"),
        ("vocab_size", r"`config` must give `vocab_size`: the vocabulary size \(0 for no"),
    ])
    def test_missing_field(self, field, pattern):
        cfg = dict(LLAMA)
        del cfg[field]
        with pytest.raises(InputError, match=pattern):
            normalize_config(cfg)

    @pytest.mark.parametrize("field, value, pattern", [
        ("hidden_size", 0, r"`config\['hidden_size'\]` must be a positive integer, got 0"),
        ("hidden_size", 64.0, r"`config\['hidden_size'\]` must be a positive integer, got 64.0"),
        ("num_hidden_layers", True, r"`config\['num_hidden_layers'\]` must be a positive integer, got True"),
        ("num_attention_heads", "8", r"`config\['num_attention_heads'\]` must be a positive integer, got '8'"),
        ("vocab_size", -1, r"`config\['vocab_size'\]` must be an integer >= 0, got -1"),
        ("num_key_value_heads", 3, r"`config\['num_key_value_heads'\]` must divide `num_attention_heads` = 8, got 3"),
        ("mlp", "swiglu", r"`config\['mlp'\]` must be one of 'gated', 'fc', got 'swiglu'"),
        ("norm", "batchnorm", r"`config\['norm'\]` must be one of 'rmsnorm', 'layernorm', got 'batchnorm'"),
        ("position_embedding", "alibi", r"`config\['position_embedding'\]` must be one of 'rope', 'learned', 'none'"),
        ("head", "mlm", r"`config\['head'\]` must be one of 'lm', 'pooler', 'none', got 'mlm'"),
        ("hidden_act", "tanh", r"`config\['hidden_act'\]` must be one of gelu, .*, got 'tanh'"),
        ("rms_norm_eps", 0.0, r"`config\['rms_norm_eps'\]` must be a positive number, got 0.0"),
        ("tie_word_embeddings", "yes", r"`config\['tie_word_embeddings'\]` must be true or false, got 'yes'"),
        ("model_type", "t5", r"`config\['model_type'\]` must be one of bert, deepseek_v2, .*got 't5'"),
        ("parallel_norms", 3, r"`config\['parallel_norms'\]` must be 1 or 2, got 3"),
        ("num_local_experts", -2, r"`config\['num_local_experts'\]` must be an integer >= 0, got -2"),
    ])
    def test_invalid_field(self, field, value, pattern):
        with pytest.raises(InputError, match=pattern):
            normalize_config(dict(LLAMA, **{field: value}))

    def test_invalid_alias_is_named_as_given(self):
        with pytest.raises(InputError, match=r"`config\['n_embd'\]` must be a positive integer"):
            normalize_config(dict(GPT2, n_embd=-4))
        with pytest.raises(InputError, match=r"`config\['activation_function'\]` must be one of"):
            normalize_config(dict(GPT2, activation_function="mish"))

    def test_head_dim_required_when_not_integral(self):
        with pytest.raises(InputError, match=r"`config\['head_dim'\]` is required when "
                                             r"`hidden_size` 60 is not a multiple of "
                                             r"`num_attention_heads` 8"):
            normalize_config(dict(LLAMA, hidden_size=60))
        assert normalize_config(dict(LLAMA, hidden_size=60, head_dim=8))["head_dim"] == 8

    def test_not_a_mapping(self):
        with pytest.raises(InputError, match=r"`config` must be a mapping of HF config fields, got list"):
            normalize_config([("hidden_size", 64)])

    def test_structural_conflicts(self):
        with pytest.raises(InputError, match=r"`config` must give `max_position_embeddings` "
                                             r"\(or `n_positions`\): the rows of the learned"):
            normalize_config(dict(LLAMA, position_embedding="learned"))
        with pytest.raises(InputError, match=r"`config\['position_embedding'\]` 'learned' "
                                             r"needs an embedding, but `vocab_size` is 0"):
            normalize_config(dict(GPT2, vocab_size=0))
        with pytest.raises(InputError, match=r"`config\['embedding_norm'\]` must be false "
                                             r"when `vocab_size` is 0"):
            normalize_config(dict(PAPER_SHAPE, embedding_norm=True))
        with pytest.raises(InputError, match=r"`config\['parallel_attention'\]` must be false "
                                             r"when `norm_position` is 'post'"):
            normalize_config(dict(BERT, parallel_attention=True))
        with pytest.raises(InputError, match=r"`config\['word_embed_proj_dim'\]` must equal "
                                             r"`hidden_size`.*got 16"):
            normalize_config(dict(OPT, word_embed_proj_dim=16))

    def test_moe_fields(self):
        with pytest.raises(InputError, match=r"`config` must give `num_experts_per_tok`: "
                                             r"the experts each token is routed to"):
            normalize_config(dict(LLAMA, num_local_experts=4))
        with pytest.raises(InputError, match=r"`config\['num_experts_per_tok'\]` must be at "
                                             r"most `num_local_experts` = 4, got 5"):
            normalize_config(dict(MIXTRAL, num_experts_per_tok=5))


class TestTransformerArguments:
    @pytest.mark.parametrize("kwargs, pattern", [
        ({"batch": 0}, r"`batch` must be a positive integer, got 0"),
        ({"batch": 1.5}, r"`batch` must be a positive integer, got 1.5"),
        ({"seq_len": -3}, r"`seq_len` must be a positive integer, got -3"),
        ({"seq_len": True}, r"`seq_len` must be a positive integer, got True"),
        ({"dtype": "fp64"}, r"`dtype` must be one of fp32, bf16, fp16, fp8, int8, got 'fp64'"),
        ({"granularity": "layer"}, r"`granularity` must be one of 'block', 'op', got 'layer'"),
    ])
    def test_invalid(self, kwargs, pattern):
        with pytest.raises(InputError, match=pattern):
            transformer(LLAMA, **kwargs)

    def test_seq_len_beyond_learned_positions(self):
        with pytest.raises(InputError, match=r"`seq_len` must be at most the learned position "
                                             r"table's `max_position_embeddings` = 32, got 33"):
            transformer(GPT2, seq_len=33)
        assert transformer(GPT2, seq_len=32).graph["seq_len"] == 32

    def test_config_errors_propagate(self):
        with pytest.raises(InputError, match=r"`config` must give `hidden_size`"):
            transformer({"model_type": "llama"})

    def test_input_config_not_modified(self):
        cfg = dict(GPT2)
        transformer(cfg, seq_len=8, granularity="op")
        assert cfg == GPT2


class TestTransformerBlock:
    def test_chain_of_named_nodes(self):
        graph = transformer(LLAMA, seq_len=SEQ)
        assert list(graph) == ["embed", "block.0", "block.1", "block.2", "final_norm", "lm_head"]
        assert list(graph.edges) == list(zip(list(graph)[:-1], list(graph)[1:]))

    @pytest.mark.parametrize("name", sorted(ALL))
    def test_every_family_is_a_chain(self, name):
        graph = transformer(ALL[name], seq_len=SEQ)
        nodes = list(graph)
        assert list(graph.edges) == list(zip(nodes[:-1], nodes[1:]))
        assert all(isinstance(node, str) for node in nodes)

    def test_graph_attributes(self):
        graph = transformer(dict(LLAMA, name="tiny", source="here"), batch=3, seq_len=SEQ,
                            dtype="FP16")
        assert {key: graph.graph[key] for key in
                ("name", "dtype", "batch", "seq_len", "source", "granularity", "params")} == {
            "name": "tiny", "dtype": "fp16", "batch": 3, "seq_len": SEQ, "source": "here",
            "granularity": "block", "params": param_count(LLAMA)}
        assert graph.graph["config"] == normalize_config(LLAMA)
        json.dumps(graph.graph["config"])
        assert transformer(LLAMA).graph["name"] == "llama"
        assert transformer(LLAMA).graph["source"] == "config mapping"

    @pytest.mark.parametrize("dtype", sorted(DTYPE_SIZES))
    def test_weight_bytes_sum_to_params_times_dtype(self, dtype):
        for cfg in ALL.values():
            graph = transformer(cfg, seq_len=SEQ, dtype=dtype)
            assert node_sum(graph, "weight_bytes") == param_count(cfg) * DTYPE_SIZES[dtype]
            assert node_sum(graph, "params") == param_count(cfg)

    def test_activation_bytes_formula(self):
        batch, seq = 3, SEQ
        graph = transformer(LLAMA, batch=batch, seq_len=seq, dtype="fp32")
        for node in ("embed", "block.0", "block.2", "final_norm"):
            assert graph.nodes[node]["activation_bytes"] == batch * seq * 64 * 4
        assert graph.nodes["lm_head"]["activation_bytes"] == batch * seq * 100 * 4

    def test_byte_attributes_are_plain_non_negative_ints(self):
        for cfg in ALL.values():
            for _, data in transformer(cfg, seq_len=SEQ).nodes(data=True):
                for key in ("weight_bytes", "activation_bytes", "buffer_bytes", "params", "flops"):
                    assert type(data[key]) is int and data[key] >= 0
                assert data["buffer_bytes"] == 0

    def test_tied_head_has_no_weight(self):
        graph = transformer(GPT2, seq_len=SEQ)
        head = graph.nodes["lm_head"]
        assert head["weight_bytes"] == 0 and head["params"] == 0 and head["tied_to"] == "embed"
        assert (head["in_features"], head["out_features"]) == (48, 90)
        assert head["flops"] == 2 * 48 * 90 * SEQ
        embed = graph.nodes["embed"]
        assert embed["params"] == (90 + 32) * 48 and embed["num_positions"] == 32

    def test_untied_head_owns_its_weight(self):
        head = transformer(LLAMA, seq_len=SEQ).nodes["lm_head"]
        assert head["params"] == 100 * 64 and "tied_to" not in head

    def test_block_node_shapes(self):
        block = transformer(MIXTRAL, seq_len=SEQ).nodes["block.1"]
        assert block["op"] == "block" and block["layer"] == 1
        assert (block["hidden_size"], block["num_heads"], block["num_kv_heads"],
                block["head_dim"], block["intermediate_size"]) == (64, 8, 2, 8, 160)
        assert (block["mlp"], block["fn"], block["norm"], block["num_experts"],
                block["experts_per_token"]) == ("gated", "silu_mul", "rmsnorm", 4, 2)

    def test_bert_embedding_holds_its_norm_and_ends_with_pooler(self):
        graph = transformer(BERT, batch=2, seq_len=SEQ)
        assert list(graph) == ["embed", "block.0", "block.1", "pooler"]
        assert graph.nodes["embed"]["norm"] == "layernorm"
        assert graph.nodes["embed"]["params"] == (50 + 16 + 2) * 32 + 2 * 32
        pooler = graph.nodes["pooler"]
        assert pooler["op"] == "pooler" and pooler["fn"] == "tanh"
        assert pooler["activation_bytes"] == 2 * 32 * 2  # first token of each sequence

    def test_paper_shape_has_only_blocks(self):
        graph = transformer(PAPER_SHAPE, seq_len=SEQ)
        assert list(graph) == ["block.0", "block.1"]

    def test_block_flops_are_sum_of_op_flops(self):
        for cfg in ALL.values():
            blocks = transformer(cfg, seq_len=SEQ)
            ops = transformer(cfg, seq_len=SEQ, granularity="op")
            assert node_sum(blocks, "flops") == node_sum(ops, "flops")


class TestTransformerOp:
    @pytest.mark.parametrize("name", sorted(ALL))
    def test_dag_in_topological_insertion_order(self, name):
        graph = transformer(ALL[name], seq_len=SEQ, granularity="op")
        assert nx.is_directed_acyclic_graph(graph)
        assert_insertion_order_is_topological(graph)
        assert node_sum(graph, "params") == param_count(ALL[name])
        assert graph.graph["granularity"] == "op"

    def test_llama_block_ops_and_residual_edges(self):
        graph = transformer(LLAMA, seq_len=SEQ, granularity="op")
        block = [node[len("block.1."):] for node in graph if node.startswith("block.1.")]
        assert block == ["attn_norm", "q", "k", "v", "attn", "o", "attn_add", "mlp_norm",
                         "gate", "up", "act", "down", "mlp_add"]
        assert set(graph.predecessors("block.1.attn_add")) == {"block.0.mlp_add", "block.1.o"}
        assert set(graph.predecessors("block.1.mlp_add")) == {"block.1.attn_add", "block.1.down"}
        assert set(graph.predecessors("block.1.attn")) == {"block.1.q", "block.1.k", "block.1.v"}
        assert set(graph.predecessors("block.0.attn_norm")) == {"embed"}
        assert set(graph.predecessors("final_norm")) == {"block.2.mlp_add"}
        assert graph.number_of_edges() > len(graph) - 1  # the residual edges: not a chain

    def test_op_shapes(self):
        graph = transformer(QWEN2, batch=2, seq_len=SEQ, dtype="fp32", granularity="op")
        k = graph.nodes["block.0.k"]
        assert (k["op"], k["role"], k["in_features"], k["out_features"], k["bias"]) == (
            "linear", "k", 64, 16, True)
        assert k["params"] == 64 * 16 + 16 and k["flops"] == 2 * k["params"] * 2 * SEQ
        assert k["activation_bytes"] == 2 * SEQ * 16 * 4
        assert graph.nodes["block.0.o"]["bias"] is False
        attn = graph.nodes["block.0.attn"]
        assert (attn["num_heads"], attn["num_kv_heads"], attn["head_dim"], attn["causal"],
                attn["rope"]) == (8, 2, 8, True, True)
        assert attn["flops"] == 4 * 2 * SEQ * SEQ * 8 * 8 // 2
        assert attn["activation_bytes"] == 2 * SEQ * 64 * 4
        norm = graph.nodes["block.0.mlp_norm"]
        assert (norm["width"], norm["norm"], norm["eps"], norm["params"]) == (64, "rmsnorm", 1e-6, 64)
        act = graph.nodes["block.0.act"]
        assert (act["fn"], act["width"], act["flops"], act["activation_bytes"]) == (
            "silu_mul", 160, 0, 2 * SEQ * 160 * 4)
        assert graph.nodes["embed"]["num_embeddings"] == 100
        assert graph.nodes["embed"]["embedding_dim"] == 64

    def test_bert_is_post_ln_and_not_causal(self):
        graph = transformer(BERT, seq_len=SEQ, granularity="op")
        block = [node[len("block.0."):] for node in graph if node.startswith("block.0.")]
        assert block == ["q", "k", "v", "attn", "o", "attn_add", "attn_norm", "fc1", "act",
                         "fc2", "mlp_add", "mlp_norm"]
        assert list(graph)[:2] == ["embed", "embed_norm"]
        assert set(graph.predecessors("block.0.q")) == {"embed_norm"}
        assert set(graph.predecessors("block.0.attn_add")) == {"embed_norm", "block.0.o"}
        assert set(graph.predecessors("block.1.attn_add")) == {"block.0.mlp_norm", "block.1.o"}
        assert set(graph.predecessors("block.0.mlp_add")) == {"block.0.attn_norm", "block.0.fc2"}
        attn = graph.nodes["block.0.attn"]
        assert attn["causal"] is False and attn["flops"] == 4 * SEQ * SEQ * 4 * 8
        assert graph.nodes["block.0.act"]["fn"] == "gelu"
        assert set(graph.predecessors("pooler")) == {"block.1.mlp_norm"}

    def test_falcon_parallel_block(self):
        graph = transformer(FALCON, seq_len=SEQ, granularity="op")
        assert set(graph.predecessors("block.0.fc1")) == {"block.0.attn_norm"}
        assert set(graph.predecessors("block.0.add")) == {"embed", "block.0.o", "block.0.fc2"}
        assert graph.nodes["block.0.k"]["out_features"] == 8  # one kv head
        graph40 = transformer(FALCON40, seq_len=SEQ, granularity="op")
        assert set(graph40.predecessors("block.0.mlp_norm")) == {"embed"}
        assert set(graph40.predecessors("block.0.fc1")) == {"block.0.mlp_norm"}

    def test_moe_experts(self):
        batch, seq = 3, 5
        graph = transformer(MIXTRAL, batch=batch, seq_len=seq, granularity="op")
        block = [node[len("block.0."):] for node in graph if node.startswith("block.0.")]
        assert block[8:] == ["router", "expert.0", "expert.1", "expert.2", "expert.3",
                             "combine", "mlp_add"]
        rows = math.ceil(batch * seq * 2 / 4)
        expert = graph.nodes["block.0.expert.2"]
        assert (expert["op"], expert["expert"], expert["rows"]) == ("expert", 2, rows)
        assert expert["params"] == 3 * 64 * 160
        assert expert["activation_bytes"] == rows * 64 * 2
        assert expert["flops"] == 2 * expert["params"] * rows
        assert set(graph.predecessors("block.0.expert.2")) == {"block.0.mlp_norm", "block.0.router"}
        assert set(graph.predecessors("block.0.combine")) == {
            "block.0.router", *(f"block.0.expert.{j}" for j in range(4))}
        router = graph.nodes["block.0.router"]
        assert (router["out_features"], router["bias"], router["params"]) == (4, False, 64 * 4)
        assert graph.nodes["block.0.combine"]["activation_bytes"] == batch * seq * 64 * 2

    def test_layer_attribute_and_no_predecessor_without_embedding(self):
        graph = transformer(PAPER_SHAPE, seq_len=SEQ, granularity="op")
        assert graph.in_degree("block.0.attn_norm") == 0
        assert set(graph.predecessors("block.0.attn_add")) == {"block.0.o"}
        assert {graph.nodes[node]["layer"] for node in graph} == {0, 1}
        assert list(graph)[-1] == "block.1.mlp_add"

    def test_largest_model_is_fast(self):
        cfg = {"model_type": "llama", "hidden_size": 16384, "num_hidden_layers": 126,
               "num_attention_heads": 128, "num_key_value_heads": 8,
               "intermediate_size": 53248, "vocab_size": 128256}
        start = time.perf_counter()
        graph = transformer(cfg, granularity="op")
        assert time.perf_counter() - start < 0.5
        assert len(graph) == 126 * 13 + 3
        assert node_sum(graph, "params") == 405_853_388_800


class TestShapesMaterialise:
    """The shape attributes suffice to build each op as a torch module with the
    node's own parameter count (what the executor relies on)."""

    @staticmethod
    def module_params(torch, data):
        nn = torch.nn
        op = data["op"]
        if op in ("linear", "pooler"):
            if data.get("tied_to"):
                return 0
            return sum(p.numel() for p in nn.Linear(data["in_features"], data["out_features"],
                                                    bias=data["bias"], device="meta").parameters())
        if op == "embedding":
            tables = [nn.Embedding(data["num_embeddings"], data["embedding_dim"], device="meta")]
            for rows in (data["num_positions"], data["num_token_types"]):
                if rows:
                    tables.append(nn.Embedding(rows, data["embedding_dim"], device="meta"))
            return sum(p.numel() for t in tables for p in t.parameters())
        if op == "norm":
            if data["norm"] == "layernorm":
                module = nn.LayerNorm(data["width"], eps=data["eps"], device="meta")
            else:
                module = nn.RMSNorm(data["width"], eps=data["eps"], device="meta")
            return sum(p.numel() for p in module.parameters())
        if op == "expert":
            width, inner, bias = data["in_features"], data["intermediate_size"], data["bias"]
            shapes = ([(width, inner), (width, inner), (inner, width)] if data["mlp"] == "gated"
                      else [(width, inner), (inner, width)])
            return sum(p.numel() for a, b in shapes
                       for p in nn.Linear(a, b, bias=bias, device="meta").parameters())
        assert op in ("attention", "activation", "add", "moe_combine"), op
        return 0

    @pytest.mark.parametrize("name", sorted(ALL))
    def test_op_nodes(self, name):
        torch = pytest.importorskip("torch")
        graph = transformer(ALL[name], seq_len=SEQ, granularity="op")
        for node, data in graph.nodes(data=True):
            assert self.module_params(torch, data) == data["params"], node
