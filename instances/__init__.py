"""The embedded model library: published model configs as cachefit graphs.

Each model is one JSON file in ``data/`` (shipped as package data and read
with `importlib.resources`, so wheels and editable installs both work) with

``name``
    the instance name (equal to the file name without ``.json``);
``kind``
    ``"transformer"`` (built by `cachefit.graphs.transformer.transformer`
    from ``config``) or ``"layers"`` (a chain of the dense layers listed in
    ``config["layers"]``, each with ``params`` and ``out_features``);
``source``
    where the figures come from, e.g. ``"meta-llama/Llama-2-7b-hf
    config.json"``;
``config``
    the HF config fields (plus cachefit's structural keys where HF leaves
    them implicit);
``params_reference``, ``params_reference_source`` (optional)
    the rounded parameter count the model card states, e.g. ``"7B"``;
``batch``, ``seq_len`` (optional)
    the instance's default batch and sequence length (else 1 and 2048);
``notes`` (optional)
    modelling choices worth knowing.

Examples
--------
>>> "llama-3.1-8b" in names()
True
>>> info("llama-3.1-8b")["params"]
8030261248
>>> G = load("gpt2")
>>> G.graph["seq_len"], G.number_of_nodes()
(1024, 15)
"""

from __future__ import annotations

import copy
import functools
import json
from importlib import resources

import networkx as nx

from ..errors import InputError
from ..graphs.transformer import GRANULARITIES, normalize_config, param_count, transformer
from ..units import dtype_bytes

__all__ = ["names", "load", "config", "info", "DEFAULT_BATCH", "DEFAULT_SEQ_LEN"]

#: Batch and sequence length of an instance that does not set its own.
DEFAULT_BATCH = 1
DEFAULT_SEQ_LEN = 2048

_KINDS = ("transformer", "layers")


@functools.lru_cache(maxsize=1)
def _library():
    """name -> parsed JSON record, read once from the package data."""
    records = {}
    for entry in resources.files(__name__).joinpath("data").iterdir():
        if not entry.name.endswith(".json"):
            continue
        record = json.loads(entry.read_text(encoding="utf-8"))
        name = entry.name[: -len(".json")]
        if record.get("name") != name or record.get("kind") not in _KINDS:
            raise InputError(f"instance file `{entry.name}` must have `name` {name!r} and "
                             f"`kind` in {_KINDS}, got {record.get('name')!r}, "
                             f"{record.get('kind')!r}")
        records[name] = record
    return records


def _record(name):
    library = _library()
    if name not in library:
        raise InputError(f"`name` must be one of the embedded models "
                         f"({', '.join(sorted(library))}), got {name!r}")
    return library[name]


def names():
    """Sorted names of the embedded models.

    Examples
    --------
    >>> names()[:3]
    ['bert-large', 'deepseek-v2-lite', 'deepseek-v3']
    """
    return sorted(_library())


def config(name):
    """A copy of the config stored for model `name` (HF fields for a transformer).

    Raises
    ------
    InputError
        `name` is not an embedded model; the message lists the known names.

    Examples
    --------
    >>> config("llama-2-7b")["intermediate_size"]
    11008
    """
    return copy.deepcopy(_record(name)["config"])


def _layer_params(record):
    return sum(layer["params"] for layer in record["config"]["layers"])


def info(name, *, dtype="bf16"):
    """Summary of model `name`: its size and where the figures come from.

    Returns
    -------
    dict
        ``name``, ``kind``, ``params`` (exact, tied weights once),
        ``weight_bytes`` (params × bytes of `dtype`), ``layers`` (transformer
        blocks, or dense layers), ``source``, ``params_reference`` (the model
        card's rounded figure, or None), ``batch`` and ``seq_len`` (defaults).

    Examples
    --------
    >>> summary = info("llama-2-7b")
    >>> summary["params"], summary["weight_bytes"], summary["params_reference"]
    (6738415616, 13476831232, '7B')
    """
    record = _record(name)
    if record["kind"] == "layers":
        params, layers = _layer_params(record), len(record["config"]["layers"])
    else:
        params = param_count(record["config"])
        layers = normalize_config(record["config"])["num_hidden_layers"]
    return {
        "name": name,
        "kind": record["kind"],
        "params": params,
        "weight_bytes": params * dtype_bytes(dtype),
        "layers": layers,
        "source": record["source"],
        "params_reference": record.get("params_reference"),
        "batch": record.get("batch", DEFAULT_BATCH),
        "seq_len": record.get("seq_len", DEFAULT_SEQ_LEN),
    }


def _layers_graph(record, *, batch, seq_len, dtype, granularity):
    """A chain of dense layers; `granularity` has nothing finer to split."""
    size, tokens = dtype_bytes(dtype), batch * seq_len
    graph = nx.DiGraph(name=record["name"], dtype=str(dtype).lower(), batch=batch,
                       seq_len=seq_len, source=record["source"], granularity=granularity,
                       config=copy.deepcopy(record["config"]))
    previous = None
    for index, layer in enumerate(record["config"]["layers"]):
        node = layer.get("name", f"linear.{index}")
        params = layer["params"]
        attrs = {"op": layer.get("op", "linear"), "role": "linear", "params": params,
                 "weight_bytes": params * size,
                 "activation_bytes": tokens * layer["out_features"] * size,
                 "buffer_bytes": 0, "flops": 2 * params * tokens,
                 "out_features": layer["out_features"], "bias": layer.get("bias", False)}
        if "in_features" in layer:
            attrs["in_features"] = layer["in_features"]
        graph.add_node(node, **attrs)
        if previous is not None:
            graph.add_edge(previous, node)
        previous = node
    graph.graph["params"] = _layer_params(record)
    return graph


def _positive_or_none(value, argument):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"`{argument}` must be a positive integer or None, got {value!r}")
    return value


def load(name, *, batch=None, seq_len=None, dtype="bf16", granularity="block", phase="prefill", context=None):
    """The graph of embedded model `name`.

    Parameters
    ----------
    name : str
        One of `names()`.
    batch, seq_len : int or None
        None takes the instance's default (its ``batch``/``seq_len`` fields,
        else 1 and 2048).
    dtype : str
        bf16, fp16, fp32, fp8 or int8.
    granularity : {"block", "op"}
        As in `cachefit.graphs.transformer.transformer`; a ``"layers"``
        instance is a chain of dense layers at either granularity.
    phase, context
        ``"decode"`` and the tokens already in the KV cache, as in
        `transformer` (a ``"layers"`` instance has no attention: prefill only).

    Returns
    -------
    networkx.DiGraph
        Graph attributes ``name`` and ``source`` are the instance's.

    Raises
    ------
    InputError
        Unknown `name` (the message lists the known names), or a bad
        `batch`, `seq_len`, `dtype` or `granularity`.

    Examples
    --------
    >>> G = load("paper-4x15gb")
    >>> [G.nodes[v]["weight_bytes"] for v in G]
    [15000000000, 15000000000, 15000000000, 15000000000]
    >>> G.nodes["linear.0"]["activation_bytes"] == 128 * 10000 * 16384 * 2
    True
    """
    record = _record(name)
    batch = _positive_or_none(batch, "batch") or record.get("batch", DEFAULT_BATCH)
    seq_len = _positive_or_none(seq_len, "seq_len") or record.get("seq_len", DEFAULT_SEQ_LEN)
    if record["kind"] == "layers":
        dtype_bytes(dtype)
        if phase != "prefill" or context:
            raise InputError(f"`phase` {phase!r} with `context` needs attention layers; "
                             f"{name!r} is a chain of dense layers (prefill only)")
        if granularity not in GRANULARITIES:
            raise InputError(f"`granularity` must be one of "
                             f"{', '.join(map(repr, GRANULARITIES))}, got {granularity!r}")
        return _layers_graph(record, batch=batch, seq_len=seq_len, dtype=dtype,
                             granularity=granularity)
    model = dict(record["config"], name=record["name"], source=record["source"])
    return transformer(model, batch=batch, seq_len=seq_len, dtype=dtype,
                       granularity=granularity, phase=phase, context=context)
