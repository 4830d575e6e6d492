"""`from_checkpoint`: a model graph whose weights are what a checkpoint folder stores.

A Hugging Face checkpoint folder holds ``config.json`` and one or more
``*.safetensors`` shards (with ``model.safetensors.index.json`` naming the
shard of every tensor when there are several).  The graph is built from the
config (`cachefit.graphs.from_hf_config`); then every tensor's stored size is
read from its shard's header and charged to the graph node that holds it, so
a checkpoint quantised to FP8 or INT4, or stored in mixed precision, is
planned with the bytes it really has.

Only headers are read, never tensor data.  A safetensors file is, by its
documented format, an 8-byte little-endian header length ``N``, then ``N``
bytes of JSON mapping each tensor name to its ``dtype``, ``shape`` and
``data_offsets`` (begin and end, relative to the end of the header), then the
data.  The length is bounded before anything is read and every offset is
checked against the file size.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import struct
from pathlib import Path, PurePosixPath, PureWindowsPath

from ..errors import InputError
from ..limits import parse_json, read_json_file

__all__ = ["from_checkpoint", "read_safetensors_header", "read_checkpoint", "is_checkpoint",
           "MAX_HEADER_BYTES"]

logger = logging.getLogger(__name__)

#: The largest header accepted (the safetensors library's own limit is 100 MB).
MAX_HEADER_BYTES = 100_000_000

INDEX = "model.safetensors.index.json"

# safetensors dtype -> bits per element (sub-byte types are packed)
_DTYPE_BITS = {
    "F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8,
    "U64": 64, "U32": 32, "U16": 16, "U8": 8, "BOOL": 8, "F8_E4M3": 8, "F8_E5M2": 8,
    "F8_E8M0": 8, "F6_E2M3": 6, "F6_E3M2": 6, "F4": 4, "E8M0": 8,
}


def is_checkpoint(folder):
    """Whether `folder` holds a config.json and safetensors weights (or their index)."""
    folder = Path(folder)
    return folder.is_dir() and (folder / "config.json").is_file() and (
        (folder / INDEX).is_file() or any(folder.glob("*.safetensors")))


def _header_entry(path, name, entry, data_bytes):
    """(dtype, shape, stored bytes) of one header entry, checked."""
    if not isinstance(entry, dict):
        raise InputError(f"safetensors file {str(path)!r}: tensor {name!r} must be a JSON object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in _DTYPE_BITS:
        raise InputError(f"safetensors file {str(path)!r}: tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise InputError(f"safetensors file {str(path)!r}: tensor {name!r} must have a list of "
                         f"non-negative integer `shape`, got {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_bytes):
        raise InputError(f"safetensors file {str(path)!r}: tensor {name!r} has `data_offsets` "
                         f"{offsets!r} outside the file's {data_bytes} data bytes")
    numel = 1
    for dim in shape:
        numel *= dim
    stored = offsets[1] - offsets[0]
    if stored != -(-numel * _DTYPE_BITS[dtype] // 8):
        raise InputError(f"safetensors file {str(path)!r}: tensor {name!r} stores {stored} bytes, "
                         f"but {dtype} {shape} needs {-(-numel * _DTYPE_BITS[dtype] // 8)}")
    return dtype, shape, stored


def read_safetensors_header(path):
    """Tensor name -> ``{"dtype", "shape", "bytes"}`` from a safetensors file's header.

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    dict
        In header order; the ``__metadata__`` entry is left out.

    Raises
    ------
    InputError
        The file is shorter than its header says, the header length exceeds
        `MAX_HEADER_BYTES`, the header is not a JSON object, or an entry has
        an unknown dtype, a bad shape, or offsets outside the file or not
        matching its shape (one line naming the file and tensor).
    """
    path = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat refuses it before any read
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise InputError(f"safetensors file {str(path)!r} is not readable: {exc.strerror or exc}") from None
    with os.fdopen(descriptor, "rb") as handle:
        try:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise InputError(f"safetensors file {str(path)!r} is not a regular file "
                                 "(a folder, device, FIFO or socket)")
            size = info.st_size
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise InputError(f"safetensors file {str(path)!r} is shorter than its 8-byte header length")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES or 8 + length > size:
                raise InputError(f"safetensors file {str(path)!r} declares a {length}-byte header; "
                                 f"at most {min(MAX_HEADER_BYTES, max(size - 8, 0))} fit")
            raw = handle.read(length)
        except OSError as exc:
            raise InputError(f"safetensors file {str(path)!r} is not readable: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"safetensors file {str(path)!r} has a header that is not UTF-8 JSON: {exc}") from None
    # parse_json bounds the nesting depth and the value count (a 200,000-deep header is one line, not a
    # RecursionError) and refuses NaN and over-long integers
    header = parse_json(text, what=f"safetensors file {str(path)!r} has a header that")
    if not isinstance(header, dict):
        raise InputError(f"safetensors file {str(path)!r} has a header that is not a JSON object")
    data_bytes = size - 8 - length
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, stored = _header_entry(path, name, entry, data_bytes)
        tensors[name] = {"dtype": dtype, "shape": shape, "bytes": stored}
    return tensors


def _check_shard_name(folder, tensor, name):
    """Refuse an index entry whose shard is not a relative path inside `folder` (one line)."""
    where = f"`{INDEX}` in {str(folder)!r}: tensor {tensor!r}"
    if not isinstance(name, str) or not name:
        raise InputError(f"{where} must name its shard file as a string, got {name!r}")
    parts = PurePosixPath(name).parts
    if ("\\" in name or "\0" in name or PurePosixPath(name).is_absolute() or PureWindowsPath(name).drive
            or ".." in parts):
        raise InputError(f"{where} names shard {name!r}; a shard must be a file inside the checkpoint "
                         "folder (no absolute path, no `..`)")


def read_checkpoint(folder):
    """Tensor name -> ``{"dtype", "shape", "bytes", "file"}`` over a folder's shards.

    The index (``model.safetensors.index.json``) names the shards when
    present; else every ``*.safetensors`` file in the folder is read.

    Raises
    ------
    InputError
        No shards, an unreadable index (over `cachefit.limits.max_file_bytes`,
        not JSON, nested too deeply), a shard named by something other than
        a string or by a path that leaves the folder (absolute, ``..``), a
        shard that is not a regular file (a FIFO is refused before it is
        read), a tensor the index names that its shard lacks, a tensor in
        two shards, or a malformed header.

    Notes
    -----
    A shard may be a symbolic link: the Hugging Face cache's snapshot folders
    link every file to ``../../blobs/<hash>``, outside the folder.  The
    index, the untrusted part, can only name paths inside the folder.
    """
    folder = Path(folder)
    index = folder / INDEX
    if index.is_file():
        data = read_json_file(index, what="checkpoint index")
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise InputError(f"`{INDEX}` in {str(folder)!r} must be JSON with a `weight_map` object")
        for tensor, name in weight_map.items():
            _check_shard_name(folder, tensor, name)
        files = sorted(set(weight_map.values()))
    else:
        weight_map, files = None, sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise InputError(f"checkpoint folder {str(folder)!r} holds no *.safetensors files")
    tensors = {}
    for name in files:
        for tensor, info in read_safetensors_header(folder / name).items():
            if tensor in tensors:
                raise InputError(f"checkpoint folder {str(folder)!r}: tensor {tensor!r} is in both "
                                 f"{tensors[tensor]['file']!r} and {name!r}")
            tensors[tensor] = dict(info, file=name)
    for tensor, name in (weight_map or {}).items():
        if tensors.get(tensor, {}).get("file") != name:
            raise InputError(f"`{INDEX}` in {str(folder)!r} puts tensor {tensor!r} in {name!r}, "
                             "whose header does not hold it")
    return tensors


# --------------------------------------------------------------------------
# tensor name -> graph node
# --------------------------------------------------------------------------

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks)\.(\d+)\.(.+)$")

# Outside the blocks: (pattern, node at op granularity, node at block granularity).
_OUTSIDE = [
    (re.compile(r"(?:^|\.)project_in\."), "project_in", "project_in"),
    (re.compile(r"(?:^|\.)project_out\."), "project_out", "project_out"),
    (re.compile(r"(?:^|\.)(?:embeddings\.LayerNorm|emb_ln)\."), "embed_norm", "embed"),
    (re.compile(r"(?:^|\.)(?:embed_tokens|wte|wpe|embed_in|word_embeddings|position_embeddings|"
                r"token_type_embeddings|embed_positions)\."), "embed", "embed"),
    (re.compile(r"(?:^|\.)(?:lm_head|embed_out)\."), "lm_head", "lm_head"),
    (re.compile(r"(?:^|\.)pooler\."), "pooler", "pooler"),
    (re.compile(r"(?:^|\.)(?:norm|ln_f|final_layer_norm|final_layernorm)\.[^.]+$"), "final_norm",
     "final_norm"),
]

# Inside block i, on the name after ``layers.{i}.``: (pattern, op nodes), first match wins.
# ``{j}`` is replaced by the pattern's first group (an expert's index); ``*`` spreads the
# tensor over every node of that prefix (fused expert tensors); a tuple is "the first of
# these present in the graph".
_INSIDE = [
    (r"experts\.(\d+)\.", ["expert.{j}"]),
    (r"experts\.[^.]+$", ["expert.*"]),
    (r"shared_experts?\.", ["shared_expert"]),
    (r"shared_expert_gate\.", ["shared_gate"]),
    (r"(?:mlp|block_sparse_moe)\.gate\.(?:weight|bias|e_score_correction_bias)$", ["router"]),
    (r"q_a_proj\.", ["q_a"]), (r"q_a_layernorm\.", ["q_a_norm"]), (r"q_b_proj\.", ["q"]),
    (r"kv_a_proj_with_mqa\.", ["kv_a"]), (r"kv_a_layernorm\.", ["kv_a_norm"]),
    (r"kv_b_proj\.", ["kv_b"]),
    (r"(?:qkv_proj|query_key_value|c_attn|Wqkv)\.", ["q", "k", "v"]),
    (r"(?:q_proj|attention\.self\.query)\.", ["q"]),
    (r"(?:k_proj|attention\.self\.key)\.", ["k"]),
    (r"(?:v_proj|attention\.self\.value)\.", ["v"]),
    (r"q_norm\.", ["q_norm"]), (r"k_norm\.", ["k_norm"]),
    (r"(?:o_proj|out_proj|attn\.c_proj|attention\.dense|self_attention\.dense|"
     r"attention\.output\.dense)\.", ["o"]),
    (r"attention\.output\.LayerNorm\.", ["attn_norm"]),
    (r"(?:^|\.)output\.LayerNorm\.", ["mlp_norm"]),
    (r"gate_up_proj\.", ["gate", "up"]),
    (r"(?:gate_proj|w1)\.", ["gate"]), (r"(?:up_proj|w3)\.", ["up"]),
    (r"(?:down_proj|w2)\.", ["down"]),
    (r"(?:fc1|c_fc|dense_h_to_4h|intermediate\.dense)\.", ["fc1"]),
    (r"(?:fc2|mlp\.c_proj|dense_4h_to_h|(?:^|\.)output\.dense)\.", ["fc2"]),
    (r"pre_feedforward_layernorm\.", ["mlp_norm"]),
    (r"post_feedforward_layernorm\.", ["post_mlp_norm"]),
    (r"(?:input_layernorm|ln_1|self_attn_layer_norm|ln_attn)\.", ["attn_norm"]),
    (r"post_attention_layernorm\.", [("post_attn_norm", "mlp_norm")]),  # Gemma: after attention
    (r"(?:ln_2|final_layer_norm|ln_mlp)\.", ["mlp_norm"]),
]
_INSIDE = [(re.compile(pattern), nodes) for pattern, nodes in _INSIDE]


def _op_targets(graph, prefix, rest):
    """Op-granularity nodes of block `prefix` that tensor suffix `rest` belongs to."""
    for pattern, nodes in _INSIDE:
        match = pattern.search(rest)
        if match is None:
            continue
        index = match.group(1) if match.groups() else ""
        found = []
        for entry in nodes:
            for option in entry if isinstance(entry, tuple) else (entry,):
                if option.endswith("*"):
                    names = [v for v in graph if v.startswith(f"{prefix}.{option[:-1]}")]
                else:
                    names = [v for v in (f"{prefix}.{option.format(j=index)}",) if v in graph]
                if names:  # the first option present in the graph
                    found += names
                    break
        if found:
            return found
    # Unknown inside a block: spread over the block's nodes that hold parameters.
    return [v for v in graph if v.startswith(f"{prefix}.") and graph.nodes[v]["params"]]


def _targets(graph, name, layers, by_op):
    """Graph nodes tensor `name` is stored for (empty: it maps to none)."""
    match = _LAYER.search(name)
    if match is not None:
        index, rest = int(match.group(1)), match.group(2)
        if index >= layers:
            return []
        prefix = f"block.{index}"
        return _op_targets(graph, prefix, rest) if by_op else [prefix]
    for pattern, op_node, block_node in _OUTSIDE:
        if pattern.search(name):
            node = op_node if by_op and op_node in graph else block_node
            return [node] if node in graph else []
    return []


def _spread(graph, nodes, stored):
    """Split `stored` bytes over `nodes` in proportion to their parameters (exact total)."""
    weights = [max(graph.nodes[v]["params"], 0) for v in nodes]
    whole = sum(weights) or len(nodes)
    weights = weights if sum(weights) else [1] * len(nodes)
    shares = [stored * w // whole for w in weights]
    shares[-1] += stored - sum(shares)
    return zip(nodes, shares)


_CONFIG_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def _activation_dtype(folder, dtype):
    if dtype is not None:
        return dtype
    try:
        config = read_json_file(Path(folder) / "config.json", what="`config.json`")
    except InputError:
        return "bf16"  # from_hf_config reports the unreadable file
    stated = config.get("dtype") or config.get("torch_dtype") if isinstance(config, dict) else None
    return _CONFIG_DTYPES.get(stated, "bf16")


def _charge(graph, tensors, layers, by_op):
    """node -> {dtype: stored bytes}, and the names of tensors that map to no node."""
    stored, unmapped = {}, []
    for name, info in tensors.items():
        nodes = _targets(graph, name, layers, by_op)
        if not nodes:
            unmapped.append(name)
            continue
        for node, share in _spread(graph, nodes, info["bytes"]):
            by_dtype = stored.setdefault(node, {})
            by_dtype[info["dtype"]] = by_dtype.get(info["dtype"], 0) + share
    return stored, unmapped


def from_checkpoint(folder, *, batch=1, seq_len=None, dtype=None, granularity="block", phase="prefill",
                    context=None):
    """The graph of a checkpoint folder, weights sized from its safetensors headers.

    Parameters
    ----------
    folder : str or os.PathLike
        Holds ``config.json`` and ``*.safetensors`` shards (with
        ``model.safetensors.index.json`` when sharded).
    batch, seq_len : int
        As `cachefit.graphs.from_hf_config` (`seq_len` None: 2048, or the
        config's ``max_position_embeddings`` when that is smaller, so a GPT-2
        folder plans at 1,024).
    dtype : str, optional
        The activations' dtype; default the config's ``dtype`` /
        ``torch_dtype`` (bf16, fp16 or fp32), else bf16.  Weights are always
        the stored bytes.
    granularity : {"block", "op"}
    phase, context
        ``"decode"`` and the tokens already cached, as in
        `cachefit.graphs.transformer.transformer` (the KV cache is the
        config's, in the activations' dtype).

    Returns
    -------
    networkx.DiGraph
        The config's graph with every node that holds stored tensors given
        ``weight_bytes`` = their stored bytes and ``stored_dtypes`` (dtype ->
        bytes).  Graph attributes ``checkpoint`` (folder, files, tensors,
        bytes, bytes by dtype), ``unmapped_tensors`` (names of tensors that
        map to no node, also logged as a warning) and ``unstored_nodes``
        (nodes with parameters but no stored tensor: they keep the bytes
        the config implies).

    Raises
    ------
    InputError
        No config.json, no shards, a malformed index or header (one line
        naming the file and tensor), or a config `from_hf_config` rejects.

    Notes
    -----
    Tensors are matched to nodes by name: the layer index
    (``layers.{i}``, ``h.{i}``, ``layer.{i}``) picks the block, and at
    ``granularity="op"`` per-family name patterns pick the operator
    (``q_proj`` → ``q``, ``c_attn`` → q, k, v, ``experts.{j}`` →
    ``expert.{j}``, ...).  A fused tensor (``qkv_proj``, ``gate_up_proj``,
    fused experts) is split over its nodes in proportion to their
    parameters; a tensor inside a block that matches no pattern is spread
    the same way over the block's nodes.  Tensors of layers past
    ``num_hidden_layers`` (DeepSeek-V3's multi-token-prediction layer) and
    names outside every pattern are unmapped.  Reading is O(header bytes).
    """
    from .hf import from_hf_config

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise InputError(f"checkpoint folder {str(folder)!r} must hold a config.json")
    tensors = read_checkpoint(folder)
    graph = from_hf_config(folder, batch=batch, seq_len=seq_len, dtype=_activation_dtype(folder, dtype),
                           granularity=granularity, phase=phase, context=context)
    layers = graph.graph["config"]["num_hidden_layers"]
    stored, unmapped = _charge(graph, tensors, layers, granularity == "op")
    for node, by_dtype in stored.items():
        graph.nodes[node].update(weight_bytes=sum(by_dtype.values()), stored_dtypes=by_dtype)
    unstored = [v for v, data in graph.nodes(data=True)
                if data["params"] and v not in stored and "tied_to" not in data]
    dtypes = {}
    for info in tensors.values():
        dtypes[info["dtype"]] = dtypes.get(info["dtype"], 0) + info["bytes"]
    graph.graph.update(
        checkpoint={"folder": str(folder), "files": len({t["file"] for t in tensors.values()}),
                    "tensors": len(tensors), "bytes": sum(dtypes.values()), "dtypes": dtypes},
        unmapped_tensors=sorted(unmapped), unstored_nodes=unstored, source=str(folder))
    if unmapped:
        logger.warning("from_checkpoint: %d tensor(s) of %s map to no graph node and are not "
                       "planned: %s", len(unmapped), folder, ", ".join(sorted(unmapped)[:5])
                       + (", ..." if len(unmapped) > 5 else ""))
    if unstored:
        logger.warning("from_checkpoint: %d node(s) hold parameters but no stored tensor; they keep "
                       "the config's bytes: %s", len(unstored), ", ".join(unstored[:5]))
    return graph
