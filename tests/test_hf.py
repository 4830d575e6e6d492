"""Tests for `cachefit.graphs.from_hf_config` (local HF config.json files)."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import cachefit
from cachefit import instances
from cachefit.cli import main
from cachefit.errors import InputError
from cachefit.graphs import from_hf_config, param_count
from cachefit.graphs.hf import SUPPORTED_MODEL_TYPES

DATA = Path(__file__).parent / "data" / "hf"

# (file in tests/data/hf, embedded instance built from the same figures, the
# parameter count Hugging Face reports for the model: sum of p.numel() over
# model.parameters() of the *Model / *ForCausalLM class, tied weights once).
FAMILIES = [
    ("gpt2.json", "gpt2", 124_439_808),
    ("llama-2-7b.json", "llama-2-7b", 6_738_415_616),
    ("mistral-7b.json", "mistral-7b", 7_241_732_096),
    ("mixtral-8x7b.json", "mixtral-8x7b", 46_702_792_704),
    ("qwen2.5-7b.json", "qwen2.5-7b", 7_615_616_512),
    ("bert-large.json", "bert-large", 335_141_888),
    ("opt-30b.json", "opt-30b", 29_974_540_288),
    ("falcon-7b.json", "falcon-7b", 6_921_720_704),
]


def total_params(graph):
    return sum(data["params"] for _, data in graph.nodes(data=True))


class TestParameterCounts:
    @pytest.mark.parametrize("granularity", ["block", "op"])
    @pytest.mark.parametrize("filename, instance, published", FAMILIES)
    def test_exact_against_instance_and_published(self, filename, instance, published, granularity):
        graph = from_hf_config(DATA / filename, seq_len=512, granularity=granularity)
        assert total_params(graph) == graph.graph["params"]
        assert graph.graph["params"] == instances.info(instance)["params"] == published

    @pytest.mark.parametrize("filename, instance, published", FAMILIES)
    def test_weight_bytes_are_params_times_dtype(self, filename, instance, published):
        graph = from_hf_config(DATA / filename, seq_len=128, dtype="fp32")
        assert sum(d["weight_bytes"] for _, d in graph.nodes(data=True)) == 4 * published

    def test_same_nodes_as_the_embedded_instance(self):
        ours = from_hf_config(DATA / "llama-2-7b.json", seq_len=2048, granularity="op")
        theirs = instances.load("llama-2-7b", seq_len=2048, granularity="op")
        assert list(ours) == list(theirs)
        assert list(ours.edges) == list(theirs.edges)
        for node in ours:
            for key in ("weight_bytes", "activation_bytes", "buffer_bytes", "params", "op"):
                assert ours.nodes[node][key] == theirs.nodes[node][key]

    def test_opt_350m_word_embed_projection(self):
        # OPT-350m embeds at 512, projects to 1024 and back (HF: 331,196,416 parameters).
        for granularity in ("block", "op"):
            graph = from_hf_config(DATA / "opt-350m.json", seq_len=2048, granularity=granularity)
            assert total_params(graph) == graph.graph["params"] == 331_196_416
            assert graph.nodes["project_in"]["in_features"] == 512
            assert graph.nodes["project_out"]["out_features"] == 512
            assert list(graph.predecessors("lm_head")) == ["project_out"]
            assert list(graph.successors("embed")) == ["project_in"]
            assert graph.nodes["lm_head"]["in_features"] == 512
            cachefit.graphs.validate(graph)

    def test_refinedweb_spelling_matches_falcon(self):
        old = from_hf_config(DATA / "falcon-7b-refinedweb.json")
        new = from_hf_config(DATA / "falcon-7b.json")
        assert old.graph["params"] == new.graph["params"] == instances.info("falcon-7b")["params"]

    def test_falcon_40b_spellings_agree(self):
        figures = {"hidden_size": 8192, "vocab_size": 65024, "parallel_attn": True, "bias": False}
        refined = from_hf_config(dict(figures, model_type="RefinedWeb", n_head=128, n_head_kv=8, n_layer=60))
        falcon = from_hf_config(dict(figures, model_type="falcon", num_attention_heads=128, num_kv_heads=8,
                                     num_hidden_layers=60, new_decoder_architecture=True))
        assert refined.graph["params"] == falcon.graph["params"]
        assert refined.graph["config"]["num_key_value_heads"] == 8
        assert refined.graph["config"]["parallel_norms"] == 2

    def test_model_type_inferred_from_architectures(self):
        graph = from_hf_config(DATA / "tiny-llama.json", seq_len=16)
        cfg = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 176, "num_attention_heads": 4,
               "num_hidden_layers": 2, "num_key_value_heads": 2, "vocab_size": 1000}
        assert graph.graph["params"] == param_count(cfg)

    def test_aliases_agree_with_canonical_names(self):
        canonical = {"model_type": "gpt2", "hidden_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4,
                     "intermediate_size": 200, "max_position_embeddings": 64, "vocab_size": 500}
        aliased = {"model_type": "gpt2", "n_embd": 96, "n_layer": 3, "n_head": 4, "n_inner": 200,
                   "n_positions": 64, "vocab_size": 500}
        assert from_hf_config(canonical, seq_len=64).graph["params"] == \
            from_hf_config(aliased, seq_len=64).graph["params"]

    def test_opt_ffn_dim_alias(self):
        base = {"model_type": "opt", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                "max_position_embeddings": 32, "vocab_size": 100}
        assert from_hf_config(dict(base, ffn_dim=300), seq_len=32).graph["params"] == \
            from_hf_config(dict(base, intermediate_size=300), seq_len=32).graph["params"]


class TestGraph:
    def test_attributes_and_shapes(self):
        graph = from_hf_config(DATA / "mistral-7b.json", batch=2, seq_len=1024, dtype="bf16")
        assert graph.graph["batch"] == 2 and graph.graph["seq_len"] == 1024
        assert graph.graph["source"].endswith("mistral-7b.json")
        assert graph.graph["name"] == "mistral-7b"
        assert graph.nodes["block.0"]["activation_bytes"] == 2 * 1024 * 4096 * 2
        cachefit.graphs.validate(graph)

    def test_name_from_name_or_path(self):
        assert from_hf_config(DATA / "llama-2-7b.json").graph["name"] == "meta-llama/Llama-2-7b-hf"

    def test_folder_holding_config_json(self, tmp_path):
        folder = tmp_path / "my-model"
        folder.mkdir()
        (folder / "config.json").write_text((DATA / "gpt2.json").read_text())
        graph = from_hf_config(folder, seq_len=64)
        assert graph.graph["name"] == "my-model"
        assert graph.graph["params"] == 124_439_808

    def test_mapping_is_not_modified(self):
        config = json.loads((DATA / "gpt2.json").read_text())
        before = json.dumps(config, sort_keys=True)
        from_hf_config(config, seq_len=64)
        assert json.dumps(config, sort_keys=True) == before

    def test_plans_and_checks(self):
        graph = from_hf_config(DATA / "gpt2.json", seq_len=128)
        # GPT-2's tied token table alone is 73.6 MiB in BF16: over 50 MiB untiled.
        assert cachefit.plan(graph, "h100-l2").status == "INFEASIBLE"
        plan = cachefit.plan(graph, "h100-l2", tile=True)
        assert plan.ok and cachefit.check(plan).ok
        assert plan.stats["tiled_nodes"] >= 1


class TestErrors:
    def test_unsupported_model_type_lists_supported(self):
        with pytest.raises(InputError, match=r"`model_type` 't5' is not supported; supported: "
                                              + ", ".join(SUPPORTED_MODEL_TYPES)):
            from_hf_config({"model_type": "t5", "d_model": 512})

    def test_no_model_type_and_unknown_architecture(self):
        with pytest.raises(InputError, match=r"`config` must give `model_type`"):
            from_hf_config({"architectures": ["T5ForConditionalGeneration"], "hidden_size": 8})

    def test_hub_name_is_never_downloaded(self):
        with pytest.raises(InputError, match=r"is not a local config.json .*never downloads"):
            from_hf_config("meta-llama/Llama-3.1-8B")

    def test_not_json(self, tmp_path):
        path = tmp_path / "config.json"
        path.write_text("{not json")
        with pytest.raises(InputError, match=r"`path_or_mapping` .* is not valid JSON"):
            from_hf_config(path)

    def test_json_not_an_object(self, tmp_path):
        path = tmp_path / "config.json"
        path.write_text("[1, 2]")
        with pytest.raises(InputError, match=r"must hold a JSON object, got list"):
            from_hf_config(path)

    def test_bad_argument_type(self):
        with pytest.raises(InputError, match=r"`path_or_mapping` must be a path to a config.json or a mapping"):
            from_hf_config(42)

    def test_missing_field_names_it(self):
        with pytest.raises(InputError, match=r"`config` must give `num_hidden_layers` \(or `n_layer`\)"):
            from_hf_config({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
                            "intermediate_size": 128, "vocab_size": 10})

    def test_bad_projection(self):
        with pytest.raises(InputError, match=r"`config\['word_embed_proj_dim'\]` must be a positive integer"):
            from_hf_config({"model_type": "opt", "hidden_size": 64, "num_hidden_layers": 1,
                            "num_attention_heads": 4, "max_position_embeddings": 8, "vocab_size": 10,
                            "word_embed_proj_dim": "wide"})


class TestCommandLine:
    def test_plan_a_config_json(self):
        result = CliRunner().invoke(main, ["plan", str(DATA / "gpt2.json"), "--capacity", "h100-l2",
                                           "--seq-len", "256", "--tile"])
        assert result.exit_code == 0, result.output
        assert "group(s)" in result.output

    def test_plan_unsupported_config_exits_2(self, tmp_path):
        path = tmp_path / "config.json"
        path.write_text(json.dumps({"model_type": "t5", "hidden_size": 8}))
        result = CliRunner().invoke(main, ["plan", str(path), "--capacity", "h100-l2"])
        assert result.exit_code == 2
        assert "not supported" in result.output


# Small configs of the families added after the first eight: (model_type, the
# family's own fields).  Widths are tiny so transformers builds them at once.
SMALL = {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 1000,
         "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
MLA = {"kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8,
       "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
       "n_shared_experts": 2, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1}
NEW_FAMILIES = [
    ("phi3", {}),
    ("gemma2", {"head_dim": 16}),
    ("gemma2", {"head_dim": 24, "tie_word_embeddings": False}),
    ("gemma3_text", {"head_dim": 16}),
    ("qwen2_moe", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                   "shared_expert_intermediate_size": 48}),
    ("qwen2_moe", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                   "shared_expert_intermediate_size": 48, "decoder_sparse_step": 2,
                   "mlp_only_layers": [2]}),
    ("qwen3", {"head_dim": 16}),
    ("qwen3_moe", {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                   "moe_intermediate_size": 32}),
    ("qwen3_moe", {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                   "moe_intermediate_size": 32, "mlp_only_layers": [0, 2]}),
    ("deepseek_v2", dict(MLA, q_lora_rank=None)),
    ("deepseek_v3", dict(MLA, q_lora_rank=24)),
    ("deepseek_v3", dict(MLA, q_lora_rank=24, attention_bias=True, first_k_dense_replace=2)),
    ("gpt_neox", {}),
    ("gpt_neox", {"use_parallel_residual": False}),
    ("starcoder2", {}),
    ("starcoder2", {"use_bias": False, "tie_word_embeddings": False}),
]


def transformers_count(model_type, fields):
    """Parameters of transformers' own model for the config, built on the meta device."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.AutoConfig.for_model(model_type, **fields)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters()), config.to_dict()  # tied once


class TestNewFamilies:
    @pytest.mark.parametrize("model_type, fields", NEW_FAMILIES)
    def test_parameters_equal_transformers_own_count(self, model_type, fields):
        expected, config = transformers_count(model_type, dict(SMALL, **fields))
        for granularity in ("block", "op"):
            graph = from_hf_config(config, seq_len=16, granularity=granularity)
            assert total_params(graph) == graph.graph["params"] == expected

    @pytest.mark.parametrize("model_type", sorted({m for m, _ in NEW_FAMILIES}))
    def test_supported(self, model_type):
        assert model_type in SUPPORTED_MODEL_TYPES

    def test_deepseek_first_layers_are_dense(self):
        config = dict(SMALL, **MLA, model_type="deepseek_v3", q_lora_rank=24)
        graph = from_hf_config(config, seq_len=16)
        assert [graph.nodes[f"block.{i}"]["num_experts"] for i in range(3)] == [0, 4, 4]
        ops = from_hf_config(config, seq_len=16, granularity="op")
        assert "block.0.gate" in ops and "block.0.router" not in ops
        assert {"block.1.router", "block.1.expert.3", "block.1.shared_expert"} <= set(ops)
        assert ops.nodes["block.1.shared_expert"]["intermediate_size"] == 2 * 32
        assert ops.nodes["block.1.attn"]["op"] == "mla_attention"
        assert sorted(ops.predecessors("block.1.q")) == ["block.1.q_a_norm"]

    def test_gemma_norms_each_branch_before_its_add(self):
        config = dict(SMALL, model_type="gemma3_text", head_dim=16)
        ops = from_hf_config(config, seq_len=16, granularity="op")
        assert sorted(ops.predecessors("block.0.attn_add")) == ["block.0.post_attn_norm", "embed"]
        assert list(ops.predecessors("block.0.post_mlp_norm")) == ["block.0.down"]
        assert ops.nodes["block.0.q_norm"]["params"] == 16
        assert ops.nodes["block.0.q_norm"]["activation_bytes"] == 16 * 4 * 16 * 2

    def test_normalised_config_normalises_to_itself(self):
        from cachefit.graphs.transformer import normalize_config

        for model_type, fields in NEW_FAMILIES:
            config = dict(SMALL, **fields, model_type=model_type)
            once = normalize_config(config)
            assert normalize_config(once) == once
            json.dumps(once)

    def test_bad_dense_layers(self):
        config = dict(SMALL, model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2,
                      dense_layers=[5])
        with pytest.raises(InputError, match=r"`config\['dense_layers'\]` must list layer "
                                             r"indices in \[0, 3\), got \[5\]"):
            from_hf_config(config)

    def test_mla_needs_its_widths(self):
        config = dict(SMALL, model_type="deepseek_v3")
        with pytest.raises(InputError, match=r"`config` must give `kv_lora_rank`"):
            from_hf_config(config)
