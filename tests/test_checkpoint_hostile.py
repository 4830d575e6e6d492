"""Hostile checkpoint folders: every one is a one-line InputError (CLI exit 2), never a hang or traceback."""

import json
import os
import struct

import pytest
from click.testing import CliRunner

from cachefit.cli import main
from cachefit.errors import InputError
from cachefit.graphs import from_checkpoint, from_hf_config
from cachefit.graphs.checkpoint import read_checkpoint, read_safetensors_header

GPT2 = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 1024, "vocab_size": 100}


def safetensors_bytes(header):
    raw = header.encode() if isinstance(header, str) else json.dumps(header).encode()
    data_bytes = 4
    return struct.pack("<Q", len(raw)) + raw + b"\0" * data_bytes


def folder_with(tmp_path, *, index=None, shards=None, config=GPT2):
    folder = tmp_path / "ck"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    shard = {"wte.weight": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}}
    for name, header in ({"model.safetensors": shard} if shards is None else shards).items():
        (folder / name).write_bytes(safetensors_bytes(header))
    if index is not None:
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def one_line_exit_2(folder, *args):
    result = CliRunner().invoke(main, ["plan", str(folder), "-c", "1GB", *args])
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output
    return result.output


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/hostname", "sub/../../x.safetensors"])
def test_index_cannot_name_a_file_outside_the_folder(tmp_path, shard):
    (tmp_path / "outside.safetensors").write_bytes(safetensors_bytes({}))
    folder = folder_with(tmp_path, index={"weight_map": {"wte.weight": shard}})
    with pytest.raises(InputError, match=r"names shard .*; a shard must be a file inside the checkpoint "
                                         r"folder \(no absolute path, no `\.\.`\)"):
        read_checkpoint(folder)
    assert "a shard must be a file inside" in one_line_exit_2(folder)


@pytest.mark.parametrize("value", [5, None, ["model.safetensors"], ""])
def test_index_shard_names_must_be_strings(tmp_path, value):
    folder = folder_with(tmp_path, index={"weight_map": {"wte.weight": value}})
    with pytest.raises(InputError, match="tensor 'wte.weight' must name its shard file as a string"):
        read_checkpoint(folder)
    one_line_exit_2(folder)


def test_index_without_weight_map_object(tmp_path):
    folder = folder_with(tmp_path, index={"weight_map": ["model.safetensors"]})
    with pytest.raises(InputError, match="must be JSON with a `weight_map` object"):
        read_checkpoint(folder)


def test_fifo_shard_is_refused_without_blocking(tmp_path):
    folder = folder_with(tmp_path, index={"weight_map": {"wte.weight": "pipe.safetensors"}})
    os.mkfifo(folder / "pipe.safetensors")  # nobody writes: opening it for reading would block
    with pytest.raises(InputError, match="is not a regular file"):
        read_checkpoint(folder)
    assert "is not a regular file" in one_line_exit_2(folder)


def test_symlinked_shard_inside_a_cache_snapshot_is_read(tmp_path):
    """The HF cache links snapshot files to ../../blobs; the folder's own links are followed."""
    blob = tmp_path / "blob"
    blob.write_bytes(safetensors_bytes({"wte.weight": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}}))
    folder = folder_with(tmp_path, shards={}, index={"weight_map": {"wte.weight": "model.safetensors"}})
    os.symlink(blob, folder / "model.safetensors")
    assert read_checkpoint(folder)["wte.weight"]["bytes"] == 4


def test_deeply_nested_header_is_one_line(tmp_path):
    header = "[" * 200_000 + "]" * 200_000
    folder = folder_with(tmp_path, shards={"model.safetensors": header})
    with pytest.raises(InputError, match="has a header that is nested too deeply"):
        read_safetensors_header(folder / "model.safetensors")
    assert "nested too deeply" in one_line_exit_2(folder)


def test_deeply_nested_index_is_one_line(tmp_path):
    folder = folder_with(tmp_path)
    (folder / "model.safetensors.index.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(InputError, match="checkpoint index .* is nested too deeply"):
        read_checkpoint(folder)


def test_gpt2_folder_defaults_to_its_1024_positions(tmp_path):
    """The default seq_len (2048) is capped by the config's positions, as from_hf_config does."""
    graph = from_checkpoint(folder_with(tmp_path))
    assert graph.graph["seq_len"] == 1024
    assert from_hf_config(GPT2).graph["seq_len"] == 1024
    result = CliRunner().invoke(main, ["plan", str(tmp_path / "ck"), "-c", "1GB"])
    assert result.exit_code == 0, result.output


def test_checkpoint_decode_builds_the_kv_cache(tmp_path):
    graph = from_checkpoint(folder_with(tmp_path), phase="decode", context=64)
    assert graph.graph["phase"] == "decode" and graph.graph["context"] == 64
    # 2 × 4 heads × 16 head_dim × 2 B (bf16) × 64 tokens × 1 batch, on each of the 2 layers
    assert graph.graph["kv_bytes"] == 2 * (2 * 4 * 16 * 2 * 64)


def test_hf_config_model_type_not_a_string(tmp_path):
    with pytest.raises(InputError, match=r"`config\['model_type'\]` must be a string .* got \['llama'\]"):
        from_hf_config({"model_type": ["llama"], "hidden_size": 64})
    with pytest.raises(InputError, match=r"its `architectures` \[\['x'\]\] name no supported family"):
        from_hf_config({"architectures": [["x"]], "hidden_size": 64})


def test_hf_config_file_is_read_with_the_limits(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(InputError, match="`path_or_mapping` .* is nested too deeply"):
        from_hf_config(path)
    os.mkfifo(tmp_path / "fifo.json")
    with pytest.raises(InputError, match="not a regular file"):
        from_hf_config(tmp_path / "fifo.json")
