"""Resolve what a user names on the command line into a model graph.

`load_model(spec)` accepts an embedded model name (`cachefit.instances`), a
plan file (its graph is re-planned), a node-link graph JSON file, a JSON list
of layer sizes (`cachefit.graphs.from_layers`), an HF-style ``config.json``
or a folder holding one.  Files are read through `cachefit.limits` (size and
kind checked before reading); a name that looks like a Hugging Face hub id is
answered with what to download, since cachefit never downloads.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import InputError
from .limits import check_config_size, check_node_count, check_tokens, read_json_file

__all__ = ["load_model", "parse_dims"]

# owner/name as the Hugging Face hub spells repository ids
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_FILE_SUFFIXES = (".json", ".onnx", ".safetensors", ".bin", ".pt")  # 'models/x.json' is a missing file


def _exists(path):
    try:
        return os.path.lexists(path)
    except (OSError, ValueError):
        return False


def _missing(spec):
    """The InputError for a MODEL that is neither a file nor an embedded model."""
    from . import instances

    if isinstance(spec, str) and _HUB_ID.match(spec) and not spec.lower().endswith(_FILE_SUFFIXES):
        return InputError(f"`MODEL` {spec!r} is not a local file; it looks like a Hugging Face hub id, and "
                          f"cachefit does not download: fetch the model's config.json (or the checkpoint "
                          f"folder), e.g. `huggingface-cli download {spec} config.json`, and pass its local path")
    return InputError(f"`MODEL` {_short(spec)!r} is neither a file nor an embedded model; "
                      f"embedded models: {', '.join(instances.names())}")


def load_model(spec, *, batch=None, seq_len=None, dtype="bf16", granularity="block", dims=None, phase="prefill",
               context=None):
    """The graph that `spec` names (see the module docstring).

    `dims` maps the dynamic dimensions of an ONNX file to sizes
    (`cachefit.graphs.from_onnx`); it is ignored for other inputs.

    `phase` and `context` (decode with a KV cache, see
    `cachefit.graphs.transformer.transformer`) apply to embedded models, HF
    configs and checkpoint folders; other inputs ignore them (check ``graph.graph["phase"]``).

    Raises
    ------
    InputError
        Naming ``MODEL``: no such file or embedded model (a hub id is told
        what to fetch), a file that is not one of the accepted kinds, too
        large (`cachefit.limits`), not UTF-8 or not JSON, a graph that does
        not validate, or one without nodes (nothing to plan).
    """
    check_tokens(batch, seq_len)
    spec = os.fspath(spec)
    graph = _load_graph(spec, batch=batch, seq_len=seq_len, dtype=dtype, granularity=granularity, dims=dims,
                        kv_args={"phase": phase, "context": context})
    if graph.number_of_nodes() == 0:
        raise InputError(f"`MODEL` {_short(spec)!r} holds no layers or nodes: there is nothing to plan")
    return graph


def _short(text):
    return text if len(text) <= 200 else text[:200] + "…"


def _load_graph(spec, *, batch, seq_len, dtype, granularity, dims, kv_args):
    if not _exists(spec):
        from . import instances

        if spec in instances.names():
            defaults = instances.info(spec)
            check_tokens(batch or defaults["batch"], seq_len or defaults["seq_len"])
            if defaults["kind"] != "layers":
                check_config_size(instances.config(spec), batch=batch or defaults["batch"],
                                  seq_len=seq_len or defaults["seq_len"], granularity=granularity)
            return instances.load(spec, batch=batch, seq_len=seq_len, dtype=dtype, granularity=granularity,
                                  **kv_args)
        raise _missing(spec)
    path = Path(spec)
    if path.is_dir():
        from .graphs.checkpoint import from_checkpoint, is_checkpoint
        if is_checkpoint(path):  # a checkpoint folder: config.json + safetensors, weights from their headers
            return from_checkpoint(path, dtype=dtype, granularity=granularity, **kv_args,
                                   **{k: v for k, v in (("batch", batch), ("seq_len", seq_len)) if v is not None})
        if not (path / "config.json").is_file():
            raise InputError(f"`MODEL` {spec!r} is a folder without a config.json; pass a model file, "
                             "or a folder holding the model's config.json")
        path = path / "config.json"
    if path.suffix == ".onnx":
        from .graphs import from_onnx
        return from_onnx(path, dims=dims)
    data = read_json_file(path, what="`MODEL` file")
    from .result import PLAN_FORMAT, graph_from_data
    from .validation import validate

    if isinstance(data, list):
        from .graphs import from_layers
        check_node_count(len(data), what=f"`MODEL` file {str(path)!r}")
        return from_layers(data, name=path.stem)
    if isinstance(data, dict) and data.get("format") == PLAN_FORMAT:
        return validate(graph_from_data(data.get("graph"), what=f"`MODEL` plan file {str(path)!r}: field 'graph'"))
    if isinstance(data, dict) and "nodes" in data:
        return validate(graph_from_data(data, what=f"`MODEL` file {str(path)!r}"))
    if isinstance(data, dict) and ("model_type" in data or "hidden_size" in data or "n_embd" in data):
        from .graphs import from_hf_config
        if not isinstance(data.get("model_type", ""), str):
            raise InputError(f"`MODEL` file {str(path)!r}: `model_type` must be a string, got {data['model_type']!r}")
        kwargs = {"dtype": dtype, "granularity": granularity, **kv_args}
        if batch is not None:
            kwargs["batch"] = batch
        if seq_len is not None:
            kwargs["seq_len"] = seq_len
        return from_hf_config(path, **kwargs)
    raise InputError(f"`MODEL` file {str(path)!r} is not a plan, a node-link graph, a list of layer sizes "
                     "or an HF config.json")


def parse_dims(text):
    """``"batch=1,seq=128"`` → ``{"batch": 1, "seq": 128}`` (for ``--dims``).

    >>> parse_dims("batch=1, seq=128")
    {'batch': 1, 'seq': 128}
    """
    dims = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        value = value.strip()
        if not name.strip() or not value.isascii() or not value.isdigit() or len(value) > 12 or int(value) < 1:
            raise InputError(f"`--dims` must look like `--dims batch=1,seq=128` (positive integers below 10**12), "
                             f"got {_short(text)!r}")
        dims[name.strip()] = int(value)
    return dims
