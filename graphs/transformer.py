"""Transformer models as cachefit graphs, built from Hugging Face style configs.

`transformer` turns a config mapping (the fields of a model's ``config.json``,
plus a few explicit cachefit keys where HF leaves the structure implicit) into
a `networkx.DiGraph` whose nodes carry the byte counts of DESIGN.md §3 and the
shapes an executor needs to materialise each node as a PyTorch module.
`param_count` and `param_breakdown` give the exact parameter count the graph
holds, from the same definitions.

Config keys
-----------
Read from the mapping (HF aliases in brackets; ``null`` counts as absent):

``hidden_size`` [``n_embd``], ``num_hidden_layers`` [``n_layer``],
``num_attention_heads`` [``n_head``], ``num_key_value_heads``
[``num_kv_heads``; falcon ``multi_query``] (default: the heads),
``head_dim`` (default hidden / heads), ``intermediate_size`` [``n_inner``,
``ffn_dim``, ``ffn_hidden_size``] (default 4 × hidden for ``mlp="fc"``),
``vocab_size`` (0: no embedding and no LM head), ``tie_word_embeddings``,
``max_position_embeddings`` [``n_positions``], ``type_vocab_size``,
``hidden_act`` [``activation_function``], ``norm_eps`` [``rms_norm_eps``,
``layer_norm_eps``, ``layer_norm_epsilon``], ``num_local_experts`` and
``num_experts_per_tok`` (mixture of experts), and the structural keys

=====================  =====================================================
``mlp``                ``"gated"`` (gate/up/down, SwiGLU) or ``"fc"`` (fc1/fc2)
``norm``               ``"rmsnorm"`` (weight) or ``"layernorm"`` (weight+bias)
``norm_position``      ``"pre"`` (GPT/Llama) or ``"post"`` (BERT)
``parallel_attention`` attention and MLP read the same input (falcon)
``parallel_norms``     1 (one shared norm, falcon-7b) or 2 (falcon-40b)
``position_embedding`` ``"rope"``, ``"learned"`` or ``"none"``
``position_offset``    extra rows of the learned table (OPT: 2)
``attention_bias``     bias on q, k, v (and o unless ``attention_out_bias``)
``attention_out_bias`` bias on the o projection
``mlp_bias``           bias on the MLP projections
``causal``             decoder (True) or encoder (False) attention
``embedding_norm``     a norm right after the embedding (BERT)
``final_norm``         a norm after the last block
``head``               ``"lm"`` (LM head), ``"pooler"`` (BERT pooler), ``"none"``
=====================  =====================================================

Each has a default per ``model_type`` (`MODEL_TYPES`); a config without
``model_type`` gets the Llama defaults.  OPT's ``enable_bias`` and
``do_layer_norm_before`` and falcon's ``bias``, ``parallel_attn``,
``new_decoder_architecture``, ``multi_query`` and ``alibi`` are translated.

Nodes
-----
Every node has the integer byte counts ``weight_bytes`` (params × dtype
bytes), ``activation_bytes`` (rows × output width × dtype bytes, rows =
batch × seq_len unless said otherwise) and ``buffer_bytes`` (always 0: the
attention core is assumed fused, flash-style, and never materialises the
seq × seq scores), plus ``op``, ``params`` (parameters the node owns) and
``flops`` (multiply-adds × 2: 2 × params × rows for linear-like nodes,
including the bias; 4 × batch × seq_len² × heads × head_dim for the attention
core, QKᵀ and AV, halved for causal attention; 0 for embeddings, norms,
activations, adds and the MoE combine).  The ``op`` values and their shape
keys:

==============  ==========================================================
``embedding``   ``num_embeddings``, ``embedding_dim``, ``num_positions``,
                ``position_offset``, ``num_token_types`` (+ ``norm``,
                ``eps`` when a block-granularity embedding holds its norm)
``norm``        ``width``, ``norm``, ``eps``
``linear``      ``in_features``, ``out_features``, ``bias``, ``role``
                (q k v o gate up down fc1 fc2 router lm_head);
                the LM head of a tied model has ``tied_to="embed"``
``attention``   ``num_heads``, ``num_kv_heads``, ``head_dim``, ``causal``,
                ``rope``
``activation``  ``fn`` (``silu_mul``/``gelu_mul``/... for gated MLPs: act(gate)
                × up; ``gelu``, ``gelu_tanh``, ``relu``, ``silu``), ``width``
``add``         ``width`` (residual add: the block input is a predecessor)
``expert``      ``expert``, ``in_features``, ``intermediate_size``, ``mlp``,
                ``fn``, ``bias``, ``rows``
``moe_combine`` ``num_experts``, ``experts_per_token``, ``width``
``pooler``      ``in_features``, ``out_features``, ``bias``, ``fn="tanh"``
``block``       a whole transformer block: every shape key above
==============  ==========================================================
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Integral, Real

import networkx as nx

from ..errors import InputError
from ..units import dtype_bytes
from . import kv

__all__ = [
    "transformer",
    "param_count",
    "param_breakdown",
    "normalize_config",
    "MODEL_TYPES",
    "GRANULARITIES",
]

#: The accepted `granularity` values.
GRANULARITIES = ("block", "op")

_LLAMA = {
    "mlp": "gated", "norm": "rmsnorm", "norm_position": "pre",
    "parallel_attention": False, "parallel_norms": 1,
    "position_embedding": "rope", "position_offset": 0, "type_vocab_size": 0,
    "attention_bias": False, "mlp_bias": False, "hidden_act": "silu",
    "tie_word_embeddings": False, "norm_eps": 1e-6, "causal": True,
    "embedding_norm": False, "head": "lm",
}

#: Structural defaults per HF ``model_type`` (a config's own keys win).
MODEL_TYPES = {
    "llama": dict(_LLAMA),
    "mistral": dict(_LLAMA),
    "mixtral": dict(_LLAMA),
    "qwen2": dict(_LLAMA, attention_bias=True, attention_out_bias=False),
    "gpt2": dict(_LLAMA, mlp="fc", norm="layernorm", position_embedding="learned",
                 attention_bias=True, mlp_bias=True, hidden_act="gelu_new",
                 tie_word_embeddings=True, norm_eps=1e-5),
    "opt": dict(_LLAMA, mlp="fc", norm="layernorm", position_embedding="learned",
                position_offset=2, attention_bias=True, mlp_bias=True, hidden_act="relu",
                tie_word_embeddings=True, norm_eps=1e-5),
    "bert": dict(_LLAMA, mlp="fc", norm="layernorm", norm_position="post",
                 position_embedding="learned", type_vocab_size=2, attention_bias=True,
                 mlp_bias=True, hidden_act="gelu", tie_word_embeddings=True, norm_eps=1e-12,
                 causal=False, embedding_norm=True, final_norm=False, head="pooler"),
    "falcon": dict(_LLAMA, mlp="fc", norm="layernorm", parallel_attention=True,
                   hidden_act="gelu", tie_word_embeddings=True, norm_eps=1e-5),
}

_ALIASES = {
    "hidden_size": ("n_embd",),
    "num_hidden_layers": ("n_layer",),
    "num_attention_heads": ("n_head",),
    "num_key_value_heads": ("num_kv_heads",),
    "intermediate_size": ("n_inner", "ffn_dim", "ffn_hidden_size"),
    "max_position_embeddings": ("n_positions",),
    "norm_eps": ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon"),
    "hidden_act": ("activation_function",),
}

# HF activation names -> the `fn` names the graph uses.
_ACTIVATIONS = {
    "silu": "silu", "swish": "silu", "relu": "relu", "gelu": "gelu",
    "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
    "gelu_tanh": "gelu_tanh",
}

_CHOICES = {
    "mlp": ("gated", "fc"),
    "norm": ("rmsnorm", "layernorm"),
    "norm_position": ("pre", "post"),
    "position_embedding": ("rope", "learned", "none"),
    "head": ("lm", "pooler", "none"),
}


# --------------------------------------------------------------------------
# config normalisation
# --------------------------------------------------------------------------

def _get(config, key):
    """Return (value, spelling) of `key` or its first present alias; None if absent."""
    for spelling in (key, *_ALIASES.get(key, ())):
        value = config.get(spelling)
        if value is not None:
            return value, spelling
    return None, key


def _field(config, key, *, default=None, minimum=1, what=""):
    value, spelling = _get(config, key)
    if value is None:
        if default is not None:
            return default
        aliases = _ALIASES.get(key, ())
        also = f" (or {', '.join(f'`{a}`' for a in aliases)})" if aliases else ""
        raise InputError(f"`config` must give `{key}`{also}: {what}")
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise InputError(f"`config['{spelling}']` must be {kind}, got {value!r}")
    return int(value)


def _flag(config, key, default):
    value = config.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InputError(f"`config['{key}']` must be true or false, got {value!r}")
    return value


def _choice(config, key, default):
    value = config.get(key)
    if value is None:
        return default
    if value not in _CHOICES[key]:
        raise InputError(f"`config['{key}']` must be one of "
                         f"{', '.join(map(repr, _CHOICES[key]))}, got {value!r}")
    return value


def normalize_config(config):
    """Validate an HF-style config and return its normalised, JSON-ready form.

    Parameters
    ----------
    config : mapping
        HF ``config.json`` fields and cachefit's structural keys (see the
        module docstring).  Unknown keys are ignored; the mapping is not
        modified.

    Returns
    -------
    dict
        Every key the builder uses, with defaults filled in, in a fixed order.

    Raises
    ------
    InputError
        A required field is missing, or a field has the wrong type or value;
        the message names the field.

    Examples
    --------
    >>> cfg = normalize_config({"model_type": "llama", "hidden_size": 64,
    ...     "num_hidden_layers": 2, "num_attention_heads": 4,
    ...     "intermediate_size": 128, "vocab_size": 100})
    >>> cfg["head_dim"], cfg["num_key_value_heads"], cfg["mlp"], cfg["norm"]
    (16, 4, 'gated', 'rmsnorm')
    """
    if not isinstance(config, Mapping):
        raise InputError(f"`config` must be a mapping of HF config fields, "
                         f"got {type(config).__name__}")
    model_type = config.get("model_type")
    if model_type is None:
        family = MODEL_TYPES["llama"]
    elif model_type in MODEL_TYPES:
        family = MODEL_TYPES[model_type]
    else:
        raise InputError(
            f"`config['model_type']` must be one of {', '.join(sorted(MODEL_TYPES))} "
            f"(or absent, for Llama-style defaults with explicit structural keys), "
            f"got {model_type!r}")
    family = dict(family)

    # Family-specific HF fields translated into cachefit's structural keys.
    if model_type == "opt":
        if config.get("enable_bias") is not None:
            family["attention_bias"] = family["mlp_bias"] = bool(config["enable_bias"])
        if config.get("do_layer_norm_before") is False:
            family.update(norm_position="post", final_norm=False)
        proj = config.get("word_embed_proj_dim")
        if proj is not None and proj != config.get("hidden_size"):
            raise InputError(
                f"`config['word_embed_proj_dim']` must equal `hidden_size` "
                f"(OPT's embedding projections are not modelled), got {proj!r}")
    if model_type == "falcon":
        if config.get("bias") is not None:
            family["attention_bias"] = family["mlp_bias"] = bool(config["bias"])
        if config.get("parallel_attn") is not None:
            family["parallel_attention"] = bool(config["parallel_attn"])
        if config.get("new_decoder_architecture"):
            family.update(parallel_attention=True, parallel_norms=2)
        if config.get("alibi"):
            family["position_embedding"] = "none"

    hidden = _field(config, "hidden_size", what="the model width")
    layers = _field(config, "num_hidden_layers", what="the number of transformer blocks")
    heads = _field(config, "num_attention_heads", what="the number of attention heads")
    kv_default = heads
    if (model_type == "falcon" and config.get("multi_query", True)
            and not config.get("new_decoder_architecture")):
        kv_default = 1
    kv_heads = _field(config, "num_key_value_heads", default=kv_default)
    if heads % kv_heads:
        raise InputError(f"`config['num_key_value_heads']` must divide "
                         f"`num_attention_heads` = {heads}, got {kv_heads}")
    if config.get("head_dim") is None and hidden % heads:
        raise InputError(f"`config['head_dim']` is required when `hidden_size` {hidden} "
                         f"is not a multiple of `num_attention_heads` {heads}")
    head_dim = _field(config, "head_dim", default=hidden // heads)

    mlp = _choice(config, "mlp", family["mlp"])
    intermediate = _field(config, "intermediate_size",
                          default=4 * hidden if mlp == "fc" else None,
                          what="the MLP width")
    vocab = _field(config, "vocab_size", minimum=0,
                   what="the vocabulary size (0 for no embedding and no LM head)")

    act_value, act_key = _get(config, "hidden_act")
    act_value = family["hidden_act"] if act_value is None else act_value
    if act_value not in _ACTIVATIONS:
        raise InputError(f"`config['{act_key}']` must be one of "
                         f"{', '.join(sorted(_ACTIVATIONS))}, got {act_value!r}")

    norm = _choice(config, "norm", family["norm"])
    eps_value, eps_key = _get(config, "norm_eps")
    eps = family["norm_eps"] if eps_value is None else eps_value
    if (isinstance(eps, bool) or not isinstance(eps, Real) or not math.isfinite(eps)
            or eps <= 0):
        raise InputError(f"`config['{eps_key}']` must be a positive number, got {eps!r}")

    norm_position = _choice(config, "norm_position", family["norm_position"])
    parallel = _flag(config, "parallel_attention", family["parallel_attention"])
    parallel_norms = _field(config, "parallel_norms", default=family["parallel_norms"])
    if parallel_norms not in (1, 2):
        raise InputError(f"`config['parallel_norms']` must be 1 or 2, got {parallel_norms}")
    if parallel and norm_position == "post":
        raise InputError("`config['parallel_attention']` must be false when "
                         "`norm_position` is 'post'")

    position = _choice(config, "position_embedding", family["position_embedding"])
    max_positions = 0
    if position == "learned":
        max_positions = _field(config, "max_position_embeddings",
                               what="the rows of the learned position table")
        if vocab == 0:
            raise InputError("`config['position_embedding']` 'learned' needs an "
                             "embedding, but `vocab_size` is 0")
    elif config.get("max_position_embeddings") is not None:
        max_positions = _field(config, "max_position_embeddings")
    position_offset = _field(config, "position_offset", minimum=0,
                             default=family["position_offset"])
    type_vocab = _field(config, "type_vocab_size", minimum=0,
                        default=family["type_vocab_size"])

    attention_bias = _flag(config, "attention_bias", family["attention_bias"])
    attention_out_bias = _flag(config, "attention_out_bias",
                               family.get("attention_out_bias", attention_bias))
    embedding_norm = _flag(config, "embedding_norm", family["embedding_norm"])
    if embedding_norm and vocab == 0:
        raise InputError("`config['embedding_norm']` must be false when `vocab_size` is 0 "
                         "(there is no embedding)")

    experts = _field(config, "num_local_experts", minimum=0, default=0)
    top_k = 0
    if experts:
        top_k = _field(config, "num_experts_per_tok",
                       what="the experts each token is routed to")
        if top_k > experts:
            raise InputError(f"`config['num_experts_per_tok']` must be at most "
                             f"`num_local_experts` = {experts}, got {top_k}")

    return {
        "model_type": model_type,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "intermediate_size": intermediate,
        "vocab_size": vocab,
        "tie_word_embeddings": _flag(config, "tie_word_embeddings",
                                     family["tie_word_embeddings"]),
        "mlp": mlp,
        "hidden_act": _ACTIVATIONS[act_value],
        "norm": norm,
        "norm_eps": float(eps),
        "norm_position": norm_position,
        "parallel_attention": parallel,
        "parallel_norms": parallel_norms if parallel else 1,
        "position_embedding": position,
        "max_position_embeddings": max_positions,
        "position_offset": position_offset if position == "learned" else 0,
        "type_vocab_size": type_vocab if vocab else 0,
        "attention_bias": attention_bias,
        "attention_out_bias": attention_out_bias,
        "mlp_bias": _flag(config, "mlp_bias", family["mlp_bias"]),
        "causal": _flag(config, "causal", family["causal"]),
        "num_local_experts": experts,
        "num_experts_per_tok": top_k,
        "embedding_norm": embedding_norm,
        "final_norm": _flag(config, "final_norm",
                            family.get("final_norm", norm_position == "pre")),
        "head": _choice(config, "head", family["head"]),
    }


# --------------------------------------------------------------------------
# node attribute makers (rows = tokens the node processes, size = dtype bytes)
# --------------------------------------------------------------------------

def _bytes(params, rows, width, size):
    return {"params": params, "weight_bytes": params * size,
            "activation_bytes": rows * width * size, "buffer_bytes": 0}


def _linear(role, in_features, out_features, bias, rows, size):
    params = in_features * out_features + (out_features if bias else 0)
    return {"op": "linear", "role": role, **_bytes(params, rows, out_features, size),
            "flops": 2 * params * rows, "in_features": in_features,
            "out_features": out_features, "bias": bias}


def _norm(role, cfg, rows, size):
    width = cfg["hidden_size"]
    params = width * (2 if cfg["norm"] == "layernorm" else 1)
    return {"op": "norm", "role": role, **_bytes(params, rows, width, size), "flops": 0,
            "width": width, "norm": cfg["norm"], "eps": cfg["norm_eps"]}


def _elementwise(op, role, width, rows, size, **shape):
    return {"op": op, "role": role, **_bytes(0, rows, width, size), "flops": 0,
            "width": width, **shape}


def _mlp_params(cfg):
    hidden, inner, bias = cfg["hidden_size"], cfg["intermediate_size"], cfg["mlp_bias"]
    if cfg["mlp"] == "gated":
        return 3 * hidden * inner + ((2 * inner + hidden) if bias else 0)
    return 2 * hidden * inner + ((inner + hidden) if bias else 0)


def _mlp_fn(cfg):
    return cfg["hidden_act"] + ("_mul" if cfg["mlp"] == "gated" else "")


def _mlp_ops(cfg, source, batch, seq_len, size):
    """The MLP's ops as (name, attrs, predecessors); the last one is its output."""
    hidden, inner, bias = cfg["hidden_size"], cfg["intermediate_size"], cfg["mlp_bias"]
    tokens = batch * seq_len
    experts, top_k = cfg["num_local_experts"], cfg["num_experts_per_tok"]
    if experts:
        # Each expert runs on its expected routed share of the tokens.
        rows = -(-tokens * top_k // experts)
        params = _mlp_params(cfg)
        ops = [("router", _linear("router", hidden, experts, False, tokens, size), [source])]
        names = []
        for index in range(experts):
            name = f"expert.{index}"
            names.append(name)
            ops.append((name, {"op": "expert", "role": "expert", "expert": index,
                               **_bytes(params, rows, hidden, size),
                               "flops": 2 * params * rows, "in_features": hidden,
                               "intermediate_size": inner, "mlp": cfg["mlp"],
                               "fn": _mlp_fn(cfg), "bias": bias, "rows": rows},
                        [source, "router"]))
        ops.append(("combine", _elementwise("moe_combine", "combine", hidden, tokens, size,
                                            num_experts=experts, experts_per_token=top_k),
                    ["router", *names]))
        return ops
    if cfg["mlp"] == "gated":
        return [
            ("gate", _linear("gate", hidden, inner, bias, tokens, size), [source]),
            ("up", _linear("up", hidden, inner, bias, tokens, size), [source]),
            ("act", _elementwise("activation", "act", inner, tokens, size, fn=_mlp_fn(cfg)),
             ["gate", "up"]),
            ("down", _linear("down", inner, hidden, bias, tokens, size), ["act"]),
        ]
    return [
        ("fc1", _linear("fc1", hidden, inner, bias, tokens, size), [source]),
        ("act", _elementwise("activation", "act", inner, tokens, size, fn=_mlp_fn(cfg)),
         ["fc1"]),
        ("fc2", _linear("fc2", inner, hidden, bias, tokens, size), ["act"]),
    ]


def _attention_ops(cfg, source, batch, seq_len, size):
    hidden, heads, kv_heads = (cfg["hidden_size"], cfg["num_attention_heads"],
                               cfg["num_key_value_heads"])
    head_dim, bias = cfg["head_dim"], cfg["attention_bias"]
    tokens = batch * seq_len
    flops = 4 * batch * seq_len * seq_len * heads * head_dim
    if cfg["causal"]:
        flops //= 2
    return [
        ("q", _linear("q", hidden, heads * head_dim, bias, tokens, size), [source]),
        ("k", _linear("k", hidden, kv_heads * head_dim, bias, tokens, size), [source]),
        ("v", _linear("v", hidden, kv_heads * head_dim, bias, tokens, size), [source]),
        ("attn", {"op": "attention", "role": "attn",
                  **_bytes(0, tokens, heads * head_dim, size), "flops": flops,
                  "num_heads": heads, "num_kv_heads": kv_heads, "head_dim": head_dim,
                  "causal": cfg["causal"], "rope": cfg["position_embedding"] == "rope"},
         ["q", "k", "v"]),
        ("o", _linear("o", heads * head_dim, hidden, cfg["attention_out_bias"], tokens, size),
         ["attn"]),
    ]


def block_ops(cfg, batch, seq_len, size):
    """One block's ops as (name, attrs, predecessors), in execution order.

    ``"@in"`` stands for the block's input; the last op is the block's output.
    """
    hidden, tokens = cfg["hidden_size"], batch * seq_len

    def add(role, *preds):
        return (role, _elementwise("add", role, hidden, tokens, size), list(preds))

    def norm(role, *preds):
        return (role, _norm(role, cfg, tokens, size), list(preds))

    if cfg["parallel_attention"]:
        ops = [norm("attn_norm", "@in")]
        mlp_input = "attn_norm"
        if cfg["parallel_norms"] == 2:
            ops.append(norm("mlp_norm", "@in"))
            mlp_input = "mlp_norm"
        ops += _attention_ops(cfg, "attn_norm", batch, seq_len, size)
        ops += _mlp_ops(cfg, mlp_input, batch, seq_len, size)
        ops.append(add("add", "@in", "o", ops[-1][0]))
        return ops
    if cfg["norm_position"] == "post":
        ops = _attention_ops(cfg, "@in", batch, seq_len, size)
        ops += [add("attn_add", "@in", "o"), norm("attn_norm", "attn_add")]
        ops += _mlp_ops(cfg, "attn_norm", batch, seq_len, size)
        ops += [add("mlp_add", "attn_norm", ops[-1][0]), norm("mlp_norm", "mlp_add")]
        return ops
    ops = [norm("attn_norm", "@in")]
    ops += _attention_ops(cfg, "attn_norm", batch, seq_len, size)
    ops += [add("attn_add", "@in", "o"), norm("mlp_norm", "attn_add")]
    ops += _mlp_ops(cfg, "mlp_norm", batch, seq_len, size)
    ops.append(add("mlp_add", "attn_add", ops[-1][0]))
    return ops


_block_ops = block_ops  # the old private name, kept for callers that used it


def _block_node(cfg, ops, index, batch, seq_len, size):
    params = sum(attrs["params"] for _, attrs, _ in ops)
    return {
        "op": "block", "layer": index, **_bytes(params, batch * seq_len, cfg["hidden_size"], size),
        "flops": sum(attrs["flops"] for _, attrs, _ in ops),
        "hidden_size": cfg["hidden_size"], "num_heads": cfg["num_attention_heads"],
        "num_kv_heads": cfg["num_key_value_heads"], "head_dim": cfg["head_dim"],
        "intermediate_size": cfg["intermediate_size"], "mlp": cfg["mlp"], "fn": _mlp_fn(cfg),
        "norm": cfg["norm"], "eps": cfg["norm_eps"], "norm_position": cfg["norm_position"],
        "parallel_attention": cfg["parallel_attention"], "parallel_norms": cfg["parallel_norms"],
        "attention_bias": cfg["attention_bias"],
        "attention_out_bias": cfg["attention_out_bias"], "mlp_bias": cfg["mlp_bias"],
        "causal": cfg["causal"], "rope": cfg["position_embedding"] == "rope",
        "num_experts": cfg["num_local_experts"], "experts_per_token": cfg["num_experts_per_tok"],
    }


def _embedding_node(cfg, batch, seq_len, size, *, with_norm):
    hidden, vocab = cfg["hidden_size"], cfg["vocab_size"]
    positions = (cfg["max_position_embeddings"] + cfg["position_offset"]
                 if cfg["position_embedding"] == "learned" else 0)
    params = (vocab + positions + cfg["type_vocab_size"]) * hidden
    attrs = {"op": "embedding", "role": "embed",
             **_bytes(params, batch * seq_len, hidden, size), "flops": 0,
             "num_embeddings": vocab, "embedding_dim": hidden, "num_positions": positions,
             "position_offset": cfg["position_offset"],
             "num_token_types": cfg["type_vocab_size"]}
    if with_norm:
        norm = _norm("embed_norm", cfg, batch * seq_len, size)
        for key in ("params", "weight_bytes"):
            attrs[key] += norm[key]
        attrs.update(norm=norm["norm"], eps=norm["eps"])
    return attrs


def _head_ops(cfg, batch, seq_len, size):
    """The nodes after the last block, as (name, attrs)."""
    hidden, vocab, tokens = cfg["hidden_size"], cfg["vocab_size"], batch * seq_len
    ops = []
    if cfg["final_norm"]:
        ops.append(("final_norm", _norm("final_norm", cfg, tokens, size)))
    if cfg["head"] == "lm" and vocab:
        attrs = _linear("lm_head", hidden, vocab, False, tokens, size)
        if cfg["tie_word_embeddings"]:
            attrs.update(params=0, weight_bytes=0, tied_to="embed")
        ops.append(("lm_head", attrs))
    elif cfg["head"] == "pooler":
        # BERT's pooler: dense + tanh on the first ([CLS]) token of each sequence.
        attrs = _linear("pooler", hidden, hidden, True, batch, size)
        attrs.update(op="pooler", fn="tanh")
        ops.append(("pooler", attrs))
    return ops


# --------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------

def param_breakdown(config):
    """Exact parameter counts by component, as the graph holds them.

    Parameters
    ----------
    config : mapping
        An HF-style config (see `transformer`).

    Returns
    -------
    dict
        ``embedding`` (token, position and token-type tables and the embedding
        norm), ``blocks`` (all blocks), ``per_block``, ``final_norm``,
        ``head`` (the untied LM head or the pooler; 0 for a tied LM head) and
        ``total``.

    Examples
    --------
    >>> cfg = {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12,
    ...        "n_positions": 1024, "vocab_size": 50257}
    >>> param_breakdown(cfg)["total"]
    124439808
    """
    cfg = normalize_config(config)
    per_block = sum(attrs["params"] for _, attrs, _ in _block_ops(cfg, 1, 1, 1))
    embedding = (_embedding_node(cfg, 1, 1, 1, with_norm=cfg["embedding_norm"])["params"]
                 if cfg["vocab_size"] else 0)
    tail = dict(_head_ops(cfg, 1, 1, 1))
    final_norm = tail["final_norm"]["params"] if "final_norm" in tail else 0
    head = sum(attrs["params"] for name, attrs in tail.items() if name != "final_norm")
    blocks = per_block * cfg["num_hidden_layers"]
    return {"embedding": embedding, "blocks": blocks, "per_block": per_block,
            "final_norm": final_norm, "head": head,
            "total": embedding + blocks + final_norm + head}


def param_count(config):
    """Total parameters of the model `config` describes, tied weights counted once.

    Equal to the sum of the ``params`` node attribute of `transformer`'s
    graph at either granularity.

    Examples
    --------
    >>> param_count({"model_type": "llama", "hidden_size": 4096,
    ...     "num_hidden_layers": 32, "num_attention_heads": 32,
    ...     "intermediate_size": 11008, "vocab_size": 32000})
    6738415616
    """
    return param_breakdown(config)["total"]


def _positive(value, name):
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise InputError(f"`{name}` must be a positive integer, got {value!r}")
    return int(value)


def transformer(config, *, batch=1, seq_len=2048, dtype="bf16", granularity="block", phase="prefill",
                context=None):
    """Build the graph of a transformer from an HF-style config.

    Parameters
    ----------
    config : mapping
        The model's ``config.json`` fields (see the module docstring for the
        keys read, their HF aliases and the per-``model_type`` defaults).
        Optional ``name`` (or ``_name_or_path``) and ``source`` keys label
        the graph.
    batch, seq_len : int
        Sequences per batch and tokens per sequence; activations are sized
        for the whole batch.
    dtype : str
        One of bf16, fp16, fp32, fp8, int8: bytes per weight and activation
        element.
    granularity : {"block", "op"}
        ``"block"``: a chain ``embed → block.0 → … → block.{L-1} →
        final_norm → lm_head`` (or ``pooler``).  ``"op"``: every block split
        into its ops (``block.{i}.attn_norm``, ``.q``, ``.k``, ``.v``,
        ``.attn``, ``.o``, ``.attn_add``, ``.mlp_norm``, ``.gate``/``.up``/
        ``.act``/``.down`` or ``.fc1``/``.act``/``.fc2`` or ``.router``/
        ``.expert.{j}``/``.combine``, ``.mlp_add``) with residual edges from
        the block input to its adds: a DAG.
    phase : {"prefill", "decode"}
        ``"decode"``: one generation step, `batch` new tokens (one per
        sequence, so the graph's ``seq_len`` is 1) attending to `context`
        cached tokens.  See `cachefit.graphs.kv`.
    context : int, optional
        Tokens already in the KV cache (decode default: `seq_len`; prefill
        default: 0).  Every attention node (every block node at block
        granularity) gets ``kv_bytes``, its layer's cache, and the flops of
        attending to it.

    Returns
    -------
    networkx.DiGraph
        Nodes in execution order (a topological order) with the attributes
        listed in the module docstring; graph attributes ``name``, ``dtype``,
        ``batch``, ``seq_len``, ``source``, ``granularity``, ``params`` and
        ``config`` (the normalised config).

    Raises
    ------
    InputError
        A config field, `batch`, `seq_len`, `dtype` or `granularity` is not
        valid, or `seq_len` exceeds a learned position table.

    Notes
    -----
    Tied embeddings are counted once: the shared matrix is in ``embed`` and
    the LM head has ``params = weight_bytes = 0`` and ``tied_to="embed"``
    (its ``flops`` still count the projection).  ``vocab_size`` 0 means no
    embedding and no LM head.  BERT is post-LN (each block ends with its
    norm; the embedding has its own norm, a separate ``embed_norm`` node at op
    granularity); its graph ends with the pooler (dense + tanh on the first
    token of each sequence, so its activation is batch × hidden), not an MLM
    head.  A mixture-of-experts MLP has a ``router`` (hidden → experts, no
    bias), one ``expert.{j}`` node per expert holding its whole MLP and
    sized for its expected share of the routed tokens,
    ``ceil(batch × seq_len × top_k / experts)`` rows, and a ``combine``.  At
    block granularity the block's ``params`` and ``flops`` are the sums over
    its ops and its activation is batch × seq_len × hidden.

    Building is O(layers × ops per block); Llama-3.1-405B at op granularity
    (126 blocks, 1,641 nodes) takes a few milliseconds.

    Examples
    --------
    >>> cfg = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
    ...        "num_attention_heads": 4, "num_key_value_heads": 2,
    ...        "intermediate_size": 128, "vocab_size": 100}
    >>> G = transformer(cfg, batch=2, seq_len=8)
    >>> list(G)
    ['embed', 'block.0', 'block.1', 'final_norm', 'lm_head']
    >>> G.nodes["block.0"]["activation_bytes"] == 2 * 8 * 64 * 2
    True
    >>> sum(d["weight_bytes"] for _, d in G.nodes(data=True)) == param_count(cfg) * 2
    True
    >>> H = transformer(cfg, batch=2, seq_len=8, granularity="op")
    >>> sorted(H.predecessors("block.0.attn_add"))
    ['block.0.o', 'embed']
    """
    cfg = normalize_config(config)
    batch = _positive(batch, "batch")
    seq_len = _positive(seq_len, "seq_len")
    phase, context = kv.check_phase(phase, context, seq_len)
    seq_len = 1 if phase == "decode" else seq_len
    size = dtype_bytes(dtype)
    dtype = str(dtype).lower()
    if granularity not in GRANULARITIES:
        raise InputError(f"`granularity` must be one of {', '.join(map(repr, GRANULARITIES))}, "
                         f"got {granularity!r}")
    if cfg["position_embedding"] == "learned" and context + seq_len > cfg["max_position_embeddings"]:
        what = "`seq_len` + `context`" if context else "`seq_len`"
        raise InputError(f"{what} must be at most the learned position table's "
                         f"`max_position_embeddings` = {cfg['max_position_embeddings']}, "
                         f"got {context + seq_len}")

    name = config.get("name") or config.get("_name_or_path") or cfg["model_type"] or "transformer"
    graph = nx.DiGraph(name=str(name), dtype=dtype, batch=batch, seq_len=seq_len,
                       source=str(config.get("source", "config mapping")),
                       granularity=granularity, config=cfg)
    by_op = granularity == "op"
    previous = None  # the node whose output feeds what comes next

    def append(node, attrs, preds):
        graph.add_node(node, **attrs)
        graph.add_edges_from((pred, node) for pred in preds if pred is not None)

    if cfg["vocab_size"]:
        append("embed", _embedding_node(cfg, batch, seq_len, size,
                                        with_norm=cfg["embedding_norm"] and not by_op), ())
        previous = "embed"
        if cfg["embedding_norm"] and by_op:
            append("embed_norm", _norm("embed_norm", cfg, batch * seq_len, size), [previous])
            previous = "embed_norm"

    ops = _block_ops(cfg, batch, seq_len, size)
    for index in range(cfg["num_hidden_layers"]):
        prefix = f"block.{index}"
        if not by_op:
            append(prefix, _block_node(cfg, ops, index, batch, seq_len, size), [previous])
            previous = prefix
            continue
        block_input = previous
        for local, attrs, preds in ops:
            append(f"{prefix}.{local}", dict(attrs, layer=index),
                   [block_input if pred == "@in" else f"{prefix}.{pred}" for pred in preds])
        previous = f"{prefix}.{ops[-1][0]}"

    for node, attrs in _head_ops(cfg, batch, seq_len, size):
        append(node, attrs, [previous])
        previous = node if node == "final_norm" else previous

    graph.graph["params"] = sum(attrs["params"] for _, attrs in graph.nodes(data=True))
    graph.graph["phase"] = phase
    if phase == "decode" or context:
        kv.annotate(graph, {**config, **cfg}, context=context, dtype_size=size)
    return graph

