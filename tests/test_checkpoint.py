"""Tests for `cachefit.graphs.from_checkpoint` (checkpoint folders sized from safetensors headers)."""

import json
import logging
import struct

import pytest
from click.testing import CliRunner

import cachefit
from cachefit.cli import main
from cachefit.errors import InputError
from cachefit.graphs import from_checkpoint
from cachefit.graphs.checkpoint import MAX_HEADER_BYTES, read_checkpoint, read_safetensors_header

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

LLAMA = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, vocab_size=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def stored_bytes(folder):
    """Σ tensor bytes over the folder's shards, read with the safetensors package itself."""
    from safetensors import safe_open

    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as handle:
            for name in handle.keys():
                tensor = handle.get_tensor(name)
                total += tensor.numel() * tensor.element_size()
    return total


def weight_bytes(graph):
    return sum(data["weight_bytes"] for _, data in graph.nodes(data=True))


@pytest.fixture(scope="module")
def llama_bf16(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama-bf16")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def llama_mixed(tmp_path_factory):
    """bf16 weights except fp32 norms and an fp32 layer 1 MLP; sharded with an index."""
    folder = tmp_path_factory.mktemp("llama-mixed")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).to(torch.bfloat16)
    for name, module in model.named_modules():
        if name.endswith("norm") or name == "model.layers.1.mlp":
            module.to(torch.float32)
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="100KB")
    return folder


class TestHeaders:
    def test_bf16_folder(self, llama_bf16):
        tensors = read_checkpoint(llama_bf16)
        assert {info["dtype"] for info in tensors.values()} == {"BF16"}
        assert tensors["model.layers.0.self_attn.k_proj.weight"]["shape"] == [32, 64]
        assert sum(info["bytes"] for info in tensors.values()) == stored_bytes(llama_bf16)

    def test_sharded_index(self, llama_mixed):
        assert (llama_mixed / "model.safetensors.index.json").is_file()
        tensors = read_checkpoint(llama_mixed)
        assert len({info["file"] for info in tensors.values()}) > 1
        assert tensors["model.norm.weight"]["dtype"] == "F32"


@pytest.mark.parametrize("granularity", ["block", "op"])
class TestPlanned:
    def test_bf16_bytes_equal_the_files(self, llama_bf16, granularity):
        graph = from_checkpoint(llama_bf16, seq_len=32, granularity=granularity)
        assert weight_bytes(graph) == stored_bytes(llama_bf16) == graph.graph["checkpoint"]["bytes"]
        assert graph.graph["unmapped_tensors"] == [] and graph.graph["unstored_nodes"] == []
        assert graph.graph["dtype"] == "bf16"  # the config's dtype, for activations

    def test_mixed_dtypes(self, llama_mixed, granularity):
        graph = from_checkpoint(llama_mixed, seq_len=32, granularity=granularity)
        assert weight_bytes(graph) == stored_bytes(llama_mixed)
        config_only = cachefit.graphs.from_hf_config(llama_mixed, seq_len=32, granularity=granularity)
        assert weight_bytes(graph) > weight_bytes(config_only)  # the fp32 tensors cost more
        node = "block.1" if granularity == "block" else "block.1.down"
        assert "F32" in graph.nodes[node]["stored_dtypes"]
        if granularity == "op":
            assert graph.nodes["block.0.down"]["stored_dtypes"] == {"BF16": 128 * 64 * 2}
            assert graph.nodes["block.1.down"]["weight_bytes"] == 128 * 64 * 4
        plan = cachefit.plan(graph, weight_bytes(graph) // 2, solver="dp")
        assert cachefit.check(plan).ok


def test_unmapped_tensor_is_reported(tmp_path, caplog):
    from safetensors.torch import save_file

    config = dict(LLAMA, model_type="llama", num_hidden_layers=1)
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["model.layers.7.extra.weight"] = torch.zeros(4)  # a layer past num_hidden_layers
    state["mystery.weight"] = torch.zeros(2)
    save_file(state, tmp_path / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="cachefit.graphs.checkpoint"):
        graph = from_checkpoint(tmp_path, seq_len=8)
    assert graph.graph["unmapped_tensors"] == ["model.layers.7.extra.weight", "mystery.weight"]
    assert "2 tensor(s)" in caplog.text and "mystery.weight" in caplog.text


def write_raw(path, header_bytes, data=b"", length=None):
    length = len(header_bytes) if length is None else length
    path.write_bytes(struct.pack("<Q", length) + header_bytes + data)
    return path


class TestMalformed:
    def test_huge_length(self, tmp_path):
        path = write_raw(tmp_path / "a.safetensors", b"{}", length=2**62)
        with pytest.raises(InputError, match=r"declares a 4611686018427387904-byte header; at most 2 fit$"):
            read_safetensors_header(path)

    def test_length_past_the_limit(self, tmp_path):
        path = write_raw(tmp_path / "a.safetensors", b"{}", length=MAX_HEADER_BYTES + 1)
        with pytest.raises(InputError, match=r"declares a 100000001-byte header"):
            read_safetensors_header(path)

    def test_short_file(self, tmp_path):
        path = tmp_path / "a.safetensors"
        path.write_bytes(b"\x01\x02")
        with pytest.raises(InputError, match=r"is shorter than its 8-byte header length"):
            read_safetensors_header(path)

    def test_bad_json(self, tmp_path):
        path = write_raw(tmp_path / "a.safetensors", b"{not json")
        with pytest.raises(InputError, match=r"has a header that is not valid JSON: "):
            read_safetensors_header(path)

    def test_not_an_object(self, tmp_path):
        path = write_raw(tmp_path / "a.safetensors", b"[1, 2]")
        with pytest.raises(InputError, match=r"has a header that is not a JSON object$"):
            read_safetensors_header(path)

    def test_offsets_past_the_file(self, tmp_path):
        header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
        path = write_raw(tmp_path / "a.safetensors", header, data=b"\0" * 8)
        with pytest.raises(InputError, match=r"tensor 'w' has `data_offsets` \[0, 16\] outside the "
                                             r"file's 8 data bytes$"):
            read_safetensors_header(path)

    def test_offsets_not_matching_shape(self, tmp_path):
        header = json.dumps({"w": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 16]}}).encode()
        path = write_raw(tmp_path / "a.safetensors", header, data=b"\0" * 16)
        with pytest.raises(InputError, match=r"tensor 'w' stores 16 bytes, but BF16 \[4\] needs 8$"):
            read_safetensors_header(path)

    def test_unknown_dtype(self, tmp_path):
        header = json.dumps({"w": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}).encode()
        path = write_raw(tmp_path / "a.safetensors", header, data=b"\0")
        with pytest.raises(InputError, match=r"tensor 'w' has unknown dtype 'Q7'$"):
            read_safetensors_header(path)

    def test_metadata_and_fp8(self, tmp_path):
        header = json.dumps({"__metadata__": {"format": "pt"},
                             "w": {"dtype": "F8_E4M3", "shape": [2, 3], "data_offsets": [0, 6]},
                             "s": {"dtype": "F4", "shape": [3], "data_offsets": [6, 8]}}).encode()
        path = write_raw(tmp_path / "a.safetensors", header, data=b"\0" * 8)
        assert read_safetensors_header(path) == {
            "w": {"dtype": "F8_E4M3", "shape": [2, 3], "bytes": 6},
            "s": {"dtype": "F4", "shape": [3], "bytes": 2}}

    def test_index_names_a_missing_tensor(self, llama_bf16, tmp_path):
        import shutil

        folder = tmp_path / "ck"
        shutil.copytree(llama_bf16, folder)
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {"ghost.weight": "model.safetensors"}}))
        with pytest.raises(InputError, match=r"puts tensor 'ghost.weight' in 'model.safetensors', "
                                             r"whose header does not hold it$"):
            from_checkpoint(folder)

    def test_cli_malformed_header_exit_2(self, llama_bf16, tmp_path):
        import shutil

        folder = tmp_path / "ck"
        shutil.copytree(llama_bf16, folder)
        write_raw(folder / "model.safetensors", b"{}", length=2**40)
        result = CliRunner().invoke(main, ["plan", str(folder), "--capacity", "1MiB"])
        assert result.exit_code == 2 and "Traceback" not in result.output
        assert "declares a 1099511627776-byte header" in result.output


def test_cli_plans_a_checkpoint_folder(llama_mixed, tmp_path):
    out = tmp_path / "plan.json"
    result = CliRunner().invoke(main, ["plan", str(llama_mixed), "--capacity", "200KiB",
                                       "--seq-len", "32", "--json", str(out)])
    assert result.exit_code == 0, result.output
    plan = json.loads(out.read_text())
    graph_bytes = sum(node["weight_bytes"] for node in plan["graph"]["nodes"])
    assert graph_bytes == stored_bytes(llama_mixed)


# (model_type, fields) saved by transformers itself: every tensor must land on the node whose
# config-derived bytes it equals (fp32 checkpoints, so stored bytes = params × 4 per node).
SAVED_FAMILIES = [
    ("gpt2", {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 16}),
    ("mixtral", {"num_local_experts": 3, "num_experts_per_tok": 2}),
    ("qwen2_moe", {"num_experts": 3, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
                   "shared_expert_intermediate_size": 24}),
    ("qwen3", {"head_dim": 8}),
    ("gemma3_text", {"head_dim": 8}),
    ("phi3", {}),
    ("gpt_neox", {}),
    ("starcoder2", {}),
    ("deepseek_v3", {"q_lora_rank": 16, "kv_lora_rank": 8, "qk_nope_head_dim": 4, "qk_rope_head_dim": 4,
                     "v_head_dim": 4, "n_routed_experts": 3, "num_experts_per_tok": 2,
                     "moe_intermediate_size": 16, "n_shared_experts": 1, "first_k_dense_replace": 1,
                     "n_group": 1, "topk_group": 1}),
]


@pytest.mark.parametrize("model_type, fields", SAVED_FAMILIES, ids=[m for m, _ in SAVED_FAMILIES])
def test_every_tensor_lands_on_its_op(tmp_path, model_type, fields):
    base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=48, vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if model_type == "gpt2":  # GPT-2's config has its own spellings and no GQA or MLP width
        base = {key: base[key] for key in ("vocab_size", "bos_token_id", "eos_token_id")}
    config = transformers.AutoConfig.for_model(model_type, **dict(base, **fields))
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path, safe_serialization=True)
    graph = from_checkpoint(tmp_path, seq_len=8, granularity="op", dtype="fp32")
    expected = cachefit.graphs.from_hf_config(tmp_path, seq_len=8, granularity="op", dtype="fp32")
    buffers = {"deepseek_v3": {"block.1.router": 3 * 4}}.get(model_type, {})  # e_score_correction_bias
    for node, data in graph.nodes(data=True):
        assert data["weight_bytes"] == expected.nodes[node]["weight_bytes"] + buffers.get(node, 0), node
    assert graph.graph["unmapped_tensors"] == [] and graph.graph["unstored_nodes"] == []
    assert weight_bytes(graph) == stored_bytes(tmp_path)


def test_fp8_checkpoint_with_scales(tmp_path):
    """DeepSeek-V3-style FP8 storage: float8 projection weights plus per-block scale tensors."""
    from safetensors.torch import save_file

    config = dict(LLAMA, model_type="llama", torch_dtype="bfloat16")
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).to(torch.bfloat16)
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("_proj.weight"):
            state[name] = tensor.to(torch.float8_e4m3fn).contiguous()
            state[name.replace(".weight", ".weight_scale_inv")] = torch.ones(1, 1, dtype=torch.float32)
        else:
            state[name] = tensor.contiguous()
    save_file(state, tmp_path / "model.safetensors")
    graph = from_checkpoint(tmp_path, seq_len=8, granularity="op")
    assert weight_bytes(graph) == stored_bytes(tmp_path)
    assert graph.nodes["block.0.q"]["stored_dtypes"] == {"F8_E4M3": 64 * 64, "F32": 4}
    assert graph.nodes["block.0.attn_norm"]["stored_dtypes"] == {"BF16": 64 * 2}
    bf16 = cachefit.graphs.from_hf_config(tmp_path, seq_len=8, granularity="op")
    assert weight_bytes(graph) < weight_bytes(bf16)
