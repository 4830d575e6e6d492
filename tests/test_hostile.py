"""Hostile inputs answered in one line with exit 2 (issue 10), in-process through click's CliRunner.

`bench/hostile.py` runs the full table (118 rows) as subprocesses with time
and memory; this is a representative subset that runs in a few seconds.
"""

import json
import os

import pytest
from click.testing import CliRunner

from cachefit import InputError
from cachefit.bench.hostile import make_files
from cachefit.cli import main
from cachefit.graphs import from_hf_config
from cachefit.instances import config as instance_config
from cachefit.instances import info, names
from cachefit.limits import (MAX_JSON_DEPTH, check_config_size, check_tokens, max_file_bytes, parse_json,
                             read_json_file, read_text_file)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_files(tmp_path_factory.mktemp("hostile"))


ROWS = [
    # (args, start of the one-line message)
    (["plan", "{empty}", "-c", "1MB"], "error: `MODEL` file '{empty}' is not valid JSON: Expecting value"),
    (["plan", "{empty_list}", "-c", "1MB"], "error: `MODEL` '{empty_list}' holds no layers or nodes"),
    (["plan", "{deep}", "-c", "1MB"], "error: `MODEL` file '{deep}' is nested too deeply"),
    (["plan", "{deeper}", "-c", "1MB"], "error: `MODEL` file '{deeper}' is nested too deeply"),
    (["plan", "{latin1}", "-c", "1MB"], "error: `MODEL` file '{latin1}' is not UTF-8 text (byte 0xe9 at offset 11)"),
    (["plan", "{bigint}", "-c", "1MB"], "error: `MODEL` file '{bigint}' is not valid JSON: a number has more digits"),
    (["plan", "{nan}", "-c", "1MB"], "error: `MODEL` file '{nan}' is not valid JSON: NaN is not a JSON number"),
    (["plan", "{negative}", "-c", "1MB"], "error: node '0': `weight_bytes` must be a non-negative integer, got -5"),
    (["plan", "{bool_sizes}", "-c", "1MB"], "error: node '0': `weight_bytes` must be a non-negative integer, got True"),
    (["plan", "{id_true}", "-c", "1MB"], "error: `MODEL` file '{id_true}': nodes[0] has id True; node ids must be "
                                         "strings"),
    (["plan", "{id_float}", "-c", "1MB"], "error: `MODEL` file '{id_float}': nodes[0] has id 1.5"),
    (["plan", "{dup_ids}", "-c", "1MB"], "error: `MODEL` file '{dup_ids}': duplicate node id 'a' (nodes[2])"),
    (["plan", "{cyclic}", "-c", "1MB"], "error: the graph has a cycle"),
    (["plan", "{self_loop}", "-c", "1MB"], "error: the graph has a cycle: self-loop on node 'b'"),
    (["plan", "{edge_unknown}", "-c", "1MB"], "error: `MODEL` file '{edge_unknown}': edges[0] target 'ghost' is "
                                              "not a listed node id"),
    (["plan", "{missing_attr}", "-c", "1MB"], "error: node 'a': missing `weight_bytes`"),
    (["plan", "{hidden_2_40}", "-c", "1GB"], "error: `config['hidden_size']` must be at most 16,777,216, got "
                                             "1,099,511,627,776"),
    (["plan", "{model_type_list}", "-c", "1GB"], "error: `MODEL` file '{model_type_list}': `model_type` must be a "
                                                 "string, got ['llama']"),
    (["plan", "{layers_1e9}", "-c", "1GB"], "error: `config` (1,000,000,000 layers × 17 operators per layer) would "
                                            "make 17,000,000,004 nodes"),
    (["plan", "{experts_1e6}", "-c", "1GB"], "error: `config['num_local_experts']` must be at most 65,536"),
    (["plan", "{llama}", "-c", "1GB", "--batch", "1000000000000"], "error: `batch` must be at most 4,294,967,296"),
    (["plan", "{llama}", "-c", "1GB", "--batch", "1e12"], "error: Invalid value for '--batch': '1e12' is not a "
                                                          "valid integer."),
    (["plan", "llama-3.1-8b", "-c", "1GB", "--batch", str(2**31)], "error: `batch` × `seq_len` = "),
    (["plan", "{two}", "-c", "1e1000000"], "error: `capacity` is too large to be a number of bytes"),
    (["plan", "{two}", "-c", "1MB", "--dims", "batch=x"], "error: `--dims` must look like `--dims batch=1,seq=128`"),
    (["plan", "/dev/zero", "-c", "1MB"], "error: `MODEL` file '/dev/zero' is not a regular file"),
    (["plan", "{fifo}", "-c", "1MB"], "error: `MODEL` file '{fifo}' is not a regular file"),
    (["plan", "{no_config_dir}", "-c", "1MB"], "error: `MODEL` '{no_config_dir}' is a folder without a config.json"),
    (["plan", "meta-llama/Llama-3.1-8B", "-c", "1GB"], "error: `MODEL` 'meta-llama/Llama-3.1-8B' is not a local "
                                                       "file; it looks like a Hugging Face hub id"),
    (["plan", "{two}", "-c", "1MB", "--json", "{out_missing}"], "error: `--json` '{out_missing}': cannot write the "
                                                                "plan there: No such file or directory"),
    (["check", "{plan_stats_list}"], "error: plan field 'stats' has the wrong type: list (expected an object)"),
    (["check", "{plan_chunk_nan}"], "error: plan file '{plan_chunk_nan}' is not valid JSON: NaN is not a JSON number"),
    (["check", "{plan_id_true}"], "error: plan field 'graph': nodes[0] has id True; node ids must be strings"),
    (["check", "/dev/zero"], "error: plan file '/dev/zero' is not a regular file"),
]


@pytest.mark.parametrize("args, message", ROWS, ids=[" ".join(row[0][:2]) for row in ROWS])
def test_one_line_exit_2(files, args, message):
    result = CliRunner().invoke(main, [arg.format(**files) for arg in args])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(message.format(**files)), result.output
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output


@pytest.mark.parametrize("name, message", [("symlink_loop", "a loop of symbolic links"),
                                           ("dangling", "no such file")])
def test_symlink_loop_and_dangling_link(files, name, message):
    result = CliRunner().invoke(main, ["plan", files[name], "-c", "1MB"])
    assert result.exit_code == 2
    assert result.output == f"error: cannot read `MODEL` file {files[name]!r}: {message}\n"


class TestFileLimits:
    def test_size_checked_before_reading(self, tmp_path, monkeypatch):
        path = tmp_path / "big.json"
        path.write_text("[" + "1," * 60 + "1]")
        monkeypatch.setenv("CACHEFIT_MAX_FILE_BYTES", "100")
        with pytest.raises(InputError, match=r"`MODEL` file '.*big.json' is 123 bytes; cachefit reads files of at "
                                             r"most 100 bytes \(set CACHEFIT_MAX_FILE_BYTES to raise the limit\)"):
            read_json_file(path, what="`MODEL` file")

    def test_default_and_bad_override(self, monkeypatch):
        assert max_file_bytes() == 16 * 2**20
        monkeypatch.setenv("CACHEFIT_MAX_FILE_BYTES", "lots")
        with pytest.raises(InputError, match=r"environment variable CACHEFIT_MAX_FILE_BYTES must be a positive"):
            max_file_bytes()

    def test_utf8_bom_accepted(self, tmp_path):
        path = tmp_path / "bom.json"
        path.write_bytes(b"\xef\xbb\xbf[1, 2]")
        assert read_json_file(path, what="`x`") == [1, 2]

    def test_folder_and_missing(self, tmp_path):
        with pytest.raises(InputError, match=r"is a folder, not a file"):
            read_text_file(tmp_path, what="`x`")
        with pytest.raises(InputError, match=r"cannot read `x` '.*nope': no such file"):
            read_text_file(tmp_path / "nope", what="`x`")

    def test_depth_limit_is_exact(self):
        assert parse_json("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH, what="`x`")
        with pytest.raises(InputError, match=r"nested too deeply"):
            parse_json("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1), what="`x`")

    def test_values_counted_before_parsing(self, monkeypatch):
        monkeypatch.setenv("CACHEFIT_MAX_NODES", "4")
        assert parse_json('[{}, {"a": []}]', what="`x`") == [{}, {"a": []}]  # 4 brackets, 1 comma
        with pytest.raises(InputError, match=r"`x` holds about 9 JSON values; cachefit reads at most 8, twice "
                                             r"its node limit \(set CACHEFIT_MAX_NODES to raise it\)"):
            parse_json("[1, 2, 3, 4, 5, 6, 7, 8, 9]", what="`x`")

    def test_layer_list_node_limit(self, tmp_path, monkeypatch):
        path = tmp_path / "layers.json"
        path.write_text(json.dumps([1] * 11))
        monkeypatch.setenv("CACHEFIT_MAX_NODES", "10")
        result = CliRunner().invoke(main, ["plan", str(path), "-c", "1MB"])
        assert result.exit_code == 2 and "would make 11 nodes; cachefit plans graphs of at most 10" in result.output


class TestConfigLimits:
    LLAMA = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256}

    @pytest.mark.parametrize("name", [name for name in names() if info(name)["kind"] != "layers"])
    def test_every_embedded_model_passes_at_op_granularity(self, name):
        check_config_size(instance_config(name), batch=8, seq_len=8192, granularity="op")

    def test_from_hf_config_refuses_before_building(self):
        with pytest.raises(InputError, match=r"`config` \(1,000,000,000 layers"):
            from_hf_config(dict(self.LLAMA, num_hidden_layers=10**9))
        with pytest.raises(InputError, match=r"`config\['vocab_size'\]` must be at most 16,777,216"):
            from_hf_config(dict(self.LLAMA, vocab_size=2**30))

    def test_figures_beyond_the_estimate_refused(self):
        with pytest.raises(InputError, match=r"`config` is too large for cachefit: one node would need about "
                                             r"1.52e\+23 flops \(at most 1.15e\+18; width 1,048,576"):
            check_config_size(dict(self.LLAMA, vocab_size=2**24, hidden_size=2**20, num_attention_heads=2**10),
                              batch=2**16, seq_len=2**16)

    def test_field_errors_come_from_the_builder(self):
        with pytest.raises(InputError, match=r"`config\['num_hidden_layers'\]` must be a positive integer, got -3"):
            check_config_size(dict(self.LLAMA, num_hidden_layers=-3))

    @pytest.mark.parametrize("batch, seq_len, message", [
        (0, None, r"`batch` must be a positive integer, got 0"),
        (True, None, r"`batch` must be a positive integer, got True"),
        (2**20, 2**13, r"`batch` × `seq_len` = 8,589,934,592 tokens; cachefit sizes at most 4,294,967,296"),
        (None, 2**33, r"`seq_len` must be at most 4,294,967,296"),
    ])
    def test_tokens(self, batch, seq_len, message):
        with pytest.raises(InputError, match=message):
            check_tokens(batch, seq_len)


def test_valid_inputs_still_plan(files, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["plan", files["checkpoint"], "-c", "80GB"])
    assert result.exit_code == 0, result.output
    if "onnx_unsorted" in files:
        result = runner.invoke(main, ["plan", files["onnx_unsorted"], "-c", "1MB", "--json",
                                      str(tmp_path / "p.json")])
        assert result.exit_code == 0, result.output
        assert runner.invoke(main, ["check", str(tmp_path / "p.json")]).exit_code == 0
    assert os.path.exists(files["plan_ok"])
