"""`from_hf_config`: a model graph from a local Hugging Face ``config.json``.

The file (or an already parsed mapping) is read, its ``model_type`` checked
against the supported families, a few family-specific HF fields translated
into the keys `cachefit.graphs.transformer.transformer` reads, and the graph
built by `transformer` itself, so a config and the embedded instance made
from the same figures hold exactly the same parameters.

Nothing is ever downloaded: a name such as ``"meta-llama/Llama-3.1-8B"`` that
is not a local file or folder is an error that says how to get the file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from ..errors import InputError
from ..limits import check_config_size, read_json_file
from ..units import dtype_bytes
from .transformer import transformer

__all__ = ["from_hf_config", "SUPPORTED_MODEL_TYPES", "DEFAULT_SEQ_LEN", "default_seq_len"]

logger = logging.getLogger(__name__)

#: The HF ``model_type`` values `from_hf_config` builds.
SUPPORTED_MODEL_TYPES = ("bert", "deepseek_v2", "deepseek_v3", "falcon", "gemma2", "gemma3_text",
                         "gpt2", "gpt_neox", "llama", "mistral", "mixtral", "opt", "phi3", "qwen2",
                         "qwen2_moe", "qwen3", "qwen3_moe", "starcoder2")

# Other spellings of a supported model_type (the pre-transformers Falcon configs).
_MODEL_TYPE_ALIASES = {"RefinedWebModel": "falcon", "RefinedWeb": "falcon"}

# `architectures[0]` -> model_type, for configs that lack a model_type.
_ARCHITECTURES = {
    "LlamaForCausalLM": "llama", "LlamaModel": "llama",
    "MistralForCausalLM": "mistral", "MistralModel": "mistral",
    "MixtralForCausalLM": "mixtral", "MixtralModel": "mixtral",
    "Qwen2ForCausalLM": "qwen2", "Qwen2Model": "qwen2",
    "GPT2LMHeadModel": "gpt2", "GPT2Model": "gpt2",
    "OPTForCausalLM": "opt", "OPTModel": "opt",
    "BertModel": "bert", "BertForMaskedLM": "bert", "BertForPreTraining": "bert",
    "FalconForCausalLM": "falcon", "FalconModel": "falcon", "RWForCausalLM": "falcon",
    "Phi3ForCausalLM": "phi3", "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3_text",
    "Qwen2MoeForCausalLM": "qwen2_moe", "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe", "DeepseekV2ForCausalLM": "deepseek_v2",
    "DeepseekV3ForCausalLM": "deepseek_v3", "GPTNeoXForCausalLM": "gpt_neox",
    "Starcoder2ForCausalLM": "starcoder2",
}


def _read(path_or_mapping):
    """(config dict, label, source) from a path, a folder holding config.json, or a mapping."""
    if isinstance(path_or_mapping, Mapping):
        return dict(path_or_mapping), None, "config mapping"
    if not isinstance(path_or_mapping, (str, os.PathLike)):
        raise InputError(f"`path_or_mapping` must be a path to a config.json or a mapping of its "
                         f"fields, got {type(path_or_mapping).__name__}")
    path = Path(path_or_mapping)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():  # a FIFO or device exists: read_json_file refuses it without opening it blocking
        raise InputError(f"`path_or_mapping` {str(path_or_mapping)!r} is not a local config.json "
                         "or a folder holding one; cachefit never downloads: save the model's "
                         "config.json (e.g. from its Hugging Face page) and pass its path")
    data = read_json_file(path, what="`path_or_mapping`")  # size, file type, depth and NaN checked
    if not isinstance(data, dict):
        raise InputError(f"`path_or_mapping` {str(path)!r} must hold a JSON object, "
                         f"got {type(data).__name__}")
    label = path.parent.name if path.name == "config.json" and path.parent.name else path.stem
    return data, label, str(path)


def _model_type(config):
    model_type = config.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise InputError(f"`config['model_type']` must be a string (one of {', '.join(SUPPORTED_MODEL_TYPES)}), "
                         f"got {model_type!r}")
    if model_type is None:
        architectures = config.get("architectures") or []
        for architecture in architectures if isinstance(architectures, list) else []:
            if isinstance(architecture, str) and architecture in _ARCHITECTURES:
                return _ARCHITECTURES[architecture]
        raise InputError(f"`config` must give `model_type` (one of {', '.join(SUPPORTED_MODEL_TYPES)}); "
                         f"it has none and its `architectures` {architectures!r} name no supported family")
    model_type = _MODEL_TYPE_ALIASES.get(model_type, model_type)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise InputError(f"`model_type` {config.get('model_type')!r} is not supported; "
                         f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return model_type


def _translate(config, model_type):
    """The mapping `transformer` reads: HF fields that it does not know, renamed."""
    model = dict(config, model_type=model_type)
    if model_type == "falcon":
        # The RefinedWeb configs spell the key/value heads `n_head_kv`; newer
        # Falcon configs say how many norms a parallel block has.
        if model.get("num_kv_heads") is None and model.get("n_head_kv") is not None:
            model["num_kv_heads"] = model["n_head_kv"]
            if model.get("new_decoder_architecture") is None and model["n_head_kv"] > 1:
                model["new_decoder_architecture"] = True
        if model.get("num_ln_in_parallel_attn") is not None and model.get("parallel_norms") is None:
            model["parallel_norms"] = model["num_ln_in_parallel_attn"]
    if model_type == "gpt2" and model.get("n_inner") is None:
        model.pop("n_inner", None)  # GPT-2 writes null for "4 × n_embd"
    return model


def _opt_projection(config):
    """OPT's `word_embed_proj_dim` when it differs from `hidden_size`, else None."""
    projection = config.get("word_embed_proj_dim")
    hidden = config.get("hidden_size")
    if projection is None or projection == hidden:
        return None
    if isinstance(projection, bool) or not isinstance(projection, int) or projection < 1:
        raise InputError(f"`config['word_embed_proj_dim']` must be a positive integer, got {projection!r}")
    return projection


def _add_opt_projections(graph, projection, size):
    """Give an OPT graph built at `hidden_size` its narrower token table and two projections.

    OPT-350m embeds tokens at ``word_embed_proj_dim`` (512), projects them up
    to ``hidden_size`` (1024) before the blocks (``project_in``, no bias; the
    learned positions are added at hidden width after it) and back down
    before the tied LM head (``project_out``).  The returned graph is new.
    """
    import networkx as nx

    cfg = graph.graph["config"]
    hidden, vocab = cfg["hidden_size"], cfg["vocab_size"]
    tokens = graph.graph["batch"] * graph.graph["seq_len"]
    result = nx.DiGraph(**graph.graph)
    result.graph["config"] = dict(cfg, word_embed_proj_dim=projection)

    def projection_node(role, in_features, out_features):
        params = in_features * out_features
        return {"op": "linear", "role": role, "params": params, "weight_bytes": params * size,
                "activation_bytes": tokens * out_features * size, "buffer_bytes": 0,
                "flops": 2 * params * tokens, "in_features": in_features,
                "out_features": out_features, "bias": False}

    last_block_output = next(iter(graph.predecessors("lm_head"))) if "lm_head" in graph else None
    for node, data in graph.nodes(data=True):
        data = dict(data)
        if node == "embed":
            positions = data["num_positions"]
            data.update(params=vocab * projection + positions * hidden, embedding_dim=projection,
                        position_dim=hidden, activation_bytes=tokens * projection * size)
            data["weight_bytes"] = data["params"] * size
            result.add_node(node, **data)
            result.add_node("project_in", **projection_node("project_in", projection, hidden))
            result.add_edge("embed", "project_in")
            continue
        if node == "lm_head":
            result.add_node("project_out", **projection_node("project_out", hidden, projection))
            result.add_edge(last_block_output, "project_out")
            data.update(in_features=projection, flops=2 * projection * vocab * tokens)
            result.add_node(node, **data)
            result.add_edge("project_out", "lm_head")
            continue
        result.add_node(node, **data)
        for pred in graph.predecessors(node):
            result.add_edge("project_in" if pred == "embed" else pred, node)
    result.graph["params"] = sum(data["params"] for _, data in result.nodes(data=True))
    return result


#: The tokens per sequence when the caller gives none (capped by the model's positions).
DEFAULT_SEQ_LEN = 2048


def default_seq_len(config):
    """`DEFAULT_SEQ_LEN`, or the config's position count when that is smaller.

    >>> default_seq_len({"n_positions": 1024}), default_seq_len({"max_position_embeddings": 131072})
    (1024, 2048)
    """
    for key in ("max_position_embeddings", "n_positions"):
        positions = config.get(key)
        if isinstance(positions, int) and not isinstance(positions, bool) and positions > 0:
            return min(DEFAULT_SEQ_LEN, positions)
    return DEFAULT_SEQ_LEN


def from_hf_config(path_or_mapping, *, batch=1, seq_len=None, dtype="bf16", granularity="block",
                   phase="prefill", context=None):
    """The graph of a model described by a local Hugging Face ``config.json``.

    Parameters
    ----------
    path_or_mapping : str, os.PathLike or mapping
        A ``config.json`` file, a folder holding one, or the parsed fields.
        Never a hub name: nothing is downloaded.
    batch, seq_len : int
        Sequences per batch and tokens per sequence (activations are sized
        for the whole batch); `seq_len` None is `default_seq_len`: 2048, or
        the config's ``max_position_embeddings`` when smaller (GPT-2: 1024).
    dtype : str
        bf16, fp16, fp32, fp8 or int8 (the config's ``torch_dtype`` is not
        read: the deployment dtype is the caller's choice).
    granularity : {"block", "op"}
        One node per transformer block, or one per operator (see
        `cachefit.graphs.transformer.transformer`).
    phase, context
        ``"decode"`` and the tokens already cached, as in `transformer`.

    Returns
    -------
    networkx.DiGraph
        As built by `transformer`; graph attribute ``source`` is the file's
        path (or ``"config mapping"``) and ``name`` the config's
        ``_name_or_path``, else the folder (or file) name, else the family.

    Raises
    ------
    InputError
        No such local file (the message says cachefit never downloads), not
        JSON, a ``model_type`` outside `SUPPORTED_MODEL_TYPES` (the message
        lists them), or a config field `transformer` rejects.

    Notes
    -----
    Field spellings: every HF alias `transformer` reads (``n_embd``,
    ``n_layer``, ``n_head``, ``n_inner``, ``n_positions``, ``ffn_dim``,
    ``ffn_hidden_size``, ``num_kv_heads``, ``activation_function``,
    ``layer_norm_epsilon``, ...) plus, translated here: Falcon's
    RefinedWeb ``model_type`` names and ``n_head_kv``, Falcon's
    ``num_ln_in_parallel_attn``, GPT-2's ``n_inner: null`` (4 × width), a
    missing ``model_type`` inferred from ``architectures``, and OPT's
    ``word_embed_proj_dim``: when it differs from ``hidden_size``
    (OPT-350m) the token table is that narrow and two bias-free projections,
    ``project_in`` after the embedding and ``project_out`` before the tied LM
    head, are added, which reproduces HF's parameter count exactly.  The
    other families' quirks (Gemma's extra norms, DeepSeek's latent attention
    and dense first layers, Qwen-MoE's shared expert, ...) are translated by
    `cachefit.graphs.transformer.normalize_config`'s per-family translators;
    every family's count is tested against transformers' own model.

    Building is O(layers × ops per block), as `transformer`.

    Examples
    --------
    >>> G = from_hf_config({"model_type": "gpt2", "n_embd": 768, "n_layer": 12,
    ...     "n_head": 12, "n_inner": None, "n_positions": 1024, "vocab_size": 50257},
    ...     seq_len=1024)
    >>> G.graph["params"], list(G)[:2]
    (124439808, ['embed', 'block.0'])
    >>> from_hf_config({"model_type": "t5", "d_model": 512})
    Traceback (most recent call last):
    ...
    cachefit.errors.InputError: `model_type` 't5' is not supported; supported: bert, deepseek_v2, ...
    """
    config, label, source = _read(path_or_mapping)
    model_type = _model_type(config)
    model = _translate(config, model_type)
    projection = _opt_projection(model) if model_type == "opt" else None
    if projection is not None:
        model["word_embed_proj_dim"] = model.get("hidden_size")
    model["name"] = str(config.get("_name_or_path") or config.get("name") or label or model_type)
    model["source"] = source
    seq_len = default_seq_len(model) if seq_len is None else seq_len
    check_config_size(model, batch=batch, seq_len=seq_len, granularity=granularity)  # before allocating
    graph = transformer(model, batch=batch, seq_len=seq_len, dtype=dtype, granularity=granularity,
                        phase=phase, context=context)
    if projection is not None:
        graph = _add_opt_projections(graph, projection, dtype_bytes(dtype))
    logger.debug("from_hf_config: %s (%s): %d nodes, %d params", graph.graph["name"], model_type,
                 graph.number_of_nodes(), graph.graph["params"])
    return graph
