"""Resolve what a user names on the command line into a model graph.

`load_model(spec)` accepts an embedded model name (`cachefit.instances`), a
plan file (its graph is re-planned), a node-link graph JSON file, a JSON list
of layer sizes (`cachefit.graphs.from_layers`), or an HF-style ``config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import InputError
from .result import PLAN_FORMAT, graph_from_data
from .validation import validate

__all__ = ["load_model", "parse_dims"]


def load_model(spec, *, batch=None, seq_len=None, dtype="bf16", granularity="block", dims=None):
    """The graph that `spec` names (see the module docstring).

    `dims` maps the dynamic dimensions of an ONNX file to sizes
    (`cachefit.graphs.from_onnx`); it is ignored for other inputs.
    """
    from . import instances

    path = Path(spec)
    if not path.exists():
        if spec in instances.names():
            return instances.load(spec, batch=batch, seq_len=seq_len, dtype=dtype, granularity=granularity)
        raise InputError(f"`MODEL` {spec!r} is neither a file nor an embedded model; "
                         f"embedded models: {', '.join(instances.names())}")
    if path.is_dir():  # a checkpoint folder: config.json + safetensors, weights from their headers
        from .graphs.checkpoint import from_checkpoint, is_checkpoint
        if is_checkpoint(path):
            return from_checkpoint(path, dtype=dtype, granularity=granularity,
                                   **{k: v for k, v in (("batch", batch), ("seq_len", seq_len)) if v is not None})
    if path.suffix == ".onnx":
        from .graphs import from_onnx
        return from_onnx(path, dims=dims)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"`MODEL` file {str(path)!r} is not readable JSON: {exc}") from None
    if isinstance(data, list):
        from .graphs import from_layers
        return from_layers(data, name=path.stem)
    if isinstance(data, dict) and data.get("format") == PLAN_FORMAT:
        return validate(graph_from_data(data["graph"]))
    if isinstance(data, dict) and "nodes" in data:
        return validate(graph_from_data(data))
    if isinstance(data, dict) and ("model_type" in data or "hidden_size" in data or "n_embd" in data):
        from .graphs import from_hf_config
        kwargs = {"dtype": dtype, "granularity": granularity}
        if batch is not None:
            kwargs["batch"] = batch
        if seq_len is not None:
            kwargs["seq_len"] = seq_len
        return from_hf_config(data, **kwargs)
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
        if not name.strip() or not value.strip().isdigit() or int(value) < 1:
            raise InputError(f"`--dims` must look like 'batch=1,seq=128' (positive integers), got {text!r}")
        dims[name.strip()] = int(value)
    return dims
