"""Transformer models as cachefit graphs, built from Hugging Face style configs.

`transformer` turns a config mapping (the fields of a model's ``config.json``,
plus a few explicit cachefit keys where HF leaves the structure implicit) into
a `networkx.DiGraph` whose nodes carry the byte counts of docs/concepts.md §3 and the
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
``sandwich_norms``     norm the attention and MLP outputs before each add (Gemma)
``qk_norm``            per-head RMSNorm of q and k (Qwen3, Gemma 3)
``attention``          ``"mha"`` or ``"mla"`` (DeepSeek's multi-head latent
                       attention: ``q_lora_rank`` (0: none), ``kv_lora_rank``,
                       ``qk_nope_head_dim``, ``qk_rope_head_dim``, ``v_head_dim``)
``dense_layers``       layers that keep a dense MLP in a mixture-of-experts model
=====================  =====================================================

Mixture of experts also reads ``moe_intermediate_size`` (an expert's width;
default ``intermediate_size``), ``shared_expert_intermediate_size`` (one
always-on expert; 0: none) and ``shared_expert_gate`` (its 1-wide gate).

Each has a default per ``model_type`` (`MODEL_TYPES`); a config without
``model_type`` gets the Llama defaults.  A family's own HF fields are
translated by its entry in ``_TRANSLATORS`` (one small function each): OPT's
``enable_bias`` and ``do_layer_norm_before``; falcon's ``bias``,
``parallel_attn``, ``new_decoder_architecture``, ``multi_query`` and
``alibi``; GPT-NeoX's ``use_parallel_residual``; StarCoder2's ``use_bias``;
Qwen-MoE's ``decoder_sparse_step``, ``mlp_only_layers`` and shared expert;
DeepSeek's ``first_k_dense_replace``, ``n_shared_experts`` and null
``q_lora_rank``.  ``num_experts`` and ``n_routed_experts`` spell
``num_local_experts``.

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

=================  ==========================================================
``embedding``      ``num_embeddings``, ``embedding_dim``, ``num_positions``,
                   ``position_offset``, ``num_token_types`` (+ ``norm``,
                   ``eps`` when a block-granularity embedding holds its norm)
``norm``           ``width``, ``norm``, ``eps``
``linear``         ``in_features``, ``out_features``, ``bias``, ``role``
                   (q k v o gate up down fc1 fc2 router lm_head, and
                   q_a kv_a kv_b shared_gate);
                   the LM head of a tied model has ``tied_to="embed"``
``attention``      ``num_heads``, ``num_kv_heads``, ``head_dim``, ``causal``,
                   ``rope``
``activation``     ``fn`` (``silu_mul``/``gelu_mul``/... for gated MLPs: act(gate)
                   × up; ``gelu``, ``gelu_tanh``, ``relu``, ``silu``), ``width``
``add``            ``width`` (residual add: the block input is a predecessor)
``expert``         ``expert`` (absent on ``shared_expert``), ``in_features``,
                   ``intermediate_size``, ``mlp``, ``fn``, ``bias``, ``rows``
``moe_combine``    ``num_experts``, ``experts_per_token``, ``width``
``head_norm``      ``width`` (= ``head_dim``), ``num_heads``, ``norm``, ``eps``
``mla_attention``  ``num_heads``, ``qk_nope_head_dim``, ``qk_rope_head_dim``,
                   ``v_head_dim``, ``causal``
``pooler``         ``in_features``, ``out_features``, ``bias``, ``fn="tanh"``
``block``          a whole transformer block: every shape key above
=================  ==========================================================
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
    "ROUTING_KEYS",
]

#: MoE routing fields the graph's normalised config keeps (sizes do not depend on them; the executor
#: routes with them, `cachefit.executor.nodes.moe_routing`, each family's transformers default where absent).
ROUTING_KEYS = ("norm_topk_prob", "routed_scaling_factor", "n_group", "topk_group", "topk_method", "scoring_func")

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
    "phi3": dict(_LLAMA),
    "gemma2": dict(_LLAMA, sandwich_norms=True, hidden_act="gelu_pytorch_tanh",
                   tie_word_embeddings=True),
    "gemma3_text": dict(_LLAMA, sandwich_norms=True, qk_norm=True,
                        hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True),
    "qwen2_moe": dict(_LLAMA, attention_bias=True, attention_out_bias=False),
    "qwen3": dict(_LLAMA, qk_norm=True),
    "qwen3_moe": dict(_LLAMA, qk_norm=True),
    "deepseek_v2": dict(_LLAMA, attention="mla"),
    "deepseek_v3": dict(_LLAMA, attention="mla"),
    "gpt_neox": dict(_LLAMA, mlp="fc", norm="layernorm", parallel_norms=2,
                     attention_bias=True, mlp_bias=True, hidden_act="gelu", norm_eps=1e-5),
    "starcoder2": dict(_LLAMA, mlp="fc", norm="layernorm", attention_bias=True, mlp_bias=True,
                       hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True, norm_eps=1e-5),
}

_ALIASES = {
    "hidden_size": ("n_embd",),
    "num_hidden_layers": ("n_layer",),
    "num_attention_heads": ("n_head",),
    "num_key_value_heads": ("num_kv_heads",),
    "intermediate_size": ("n_inner", "ffn_dim", "ffn_hidden_size"),
    "max_position_embeddings": ("n_positions",),
    "norm_eps": ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"),
    "hidden_act": ("activation_function", "hidden_activation"),
    "num_local_experts": ("num_experts", "n_routed_experts"),
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


def _opt(config):
    """OPT: ``enable_bias``, ``do_layer_norm_before``; no embedding projections here."""
    proj = config.get("word_embed_proj_dim")
    if proj is not None and proj != config.get("hidden_size"):
        raise InputError(
            f"`config['word_embed_proj_dim']` must equal `hidden_size` "
            f"(OPT's embedding projections are not modelled), got {proj!r}")
    found = {}
    if config.get("enable_bias") is not None:
        found["attention_bias"] = found["mlp_bias"] = bool(config["enable_bias"])
    if config.get("do_layer_norm_before") is False:
        found.update(norm_position="post", final_norm=False)
    return found


def _falcon(config):
    """Falcon: ``bias``, ``parallel_attn``, ``new_decoder_architecture``, ``alibi``, multi-query."""
    found = {}
    if config.get("bias") is not None:
        found["attention_bias"] = found["mlp_bias"] = bool(config["bias"])
    if config.get("parallel_attn") is not None:
        found["parallel_attention"] = bool(config["parallel_attn"])
    if config.get("new_decoder_architecture"):
        found.update(parallel_attention=True, parallel_norms=2)
    elif config.get("multi_query", True):
        found["num_key_value_heads"] = 1
    if config.get("alibi"):
        found["position_embedding"] = "none"
    return found


def _gpt_neox(config):
    """GPT-NeoX: ``use_parallel_residual`` (two norms, attention and MLP side by side)."""
    return {"parallel_attention": bool(config.get("use_parallel_residual", True))}


def _starcoder2(config):
    """StarCoder2: ``use_bias`` on every projection."""
    if config.get("use_bias") is None:
        return {}
    return dict.fromkeys(("attention_bias", "attention_out_bias", "mlp_bias"), bool(config["use_bias"]))


def _qwen_moe(config):
    """Qwen MoE: layers listed in ``mlp_only_layers`` or off ``decoder_sparse_step`` stay dense."""
    found = {}
    if config.get("shared_expert_intermediate_size"):
        found["shared_expert_gate"] = True
    layers, step = config.get("num_hidden_layers"), config.get("decoder_sparse_step") or 1
    if isinstance(layers, Integral) and isinstance(step, Integral) and step > 0:
        only = set(config.get("mlp_only_layers") or ())
        found["dense_layers"] = [i for i in range(layers) if i in only or (i + 1) % step]
    return found


def _deepseek(config):
    """DeepSeek-V2/V3: the first ``first_k_dense_replace`` layers dense; shared experts."""
    found = {}
    k, layers = config.get("first_k_dense_replace"), config.get("num_hidden_layers")
    if isinstance(k, Integral) and isinstance(layers, Integral):
        found["dense_layers"] = list(range(min(int(k), int(layers))))
    shared, inner = config.get("n_shared_experts"), config.get("moe_intermediate_size")
    if isinstance(shared, Integral) and isinstance(inner, Integral):
        found["shared_expert_intermediate_size"] = int(shared) * int(inner)
    if config.get("q_lora_rank") is None and "q_lora_rank" in config:
        found["q_lora_rank"] = 0  # HF writes null for "no low-rank query"
    return found


#: model_type -> the function that translates that family's own HF fields
#: into cachefit's keys (each applied only where the config does not give the
#: key itself, under any spelling).
_TRANSLATORS = {
    "opt": _opt,
    "falcon": _falcon,
    "gpt_neox": _gpt_neox,
    "starcoder2": _starcoder2,
    "qwen2_moe": _qwen_moe,
    "qwen3_moe": _qwen_moe,
    "deepseek_v2": _deepseek,
    "deepseek_v3": _deepseek,
}

#: model_type -> HF fields that family's own model code never reads (GPT-NeoX
#: has no grouped-query attention, DeepSeek's latent attention no key/value
#: heads, whatever a config says), dropped first.
_UNREAD = {family: ("num_key_value_heads", "num_kv_heads")
           for family in ("gpt_neox", "deepseek_v2", "deepseek_v3")}


def _family_view(config):
    """(model_type, structural defaults, config with the family's translations filled in)."""
    if not isinstance(config, Mapping):
        raise InputError(f"`config` must be a mapping of HF config fields, "
                         f"got {type(config).__name__}")
    model_type = config.get("model_type")
    if model_type is not None and model_type not in MODEL_TYPES:
        raise InputError(
            f"`config['model_type']` must be one of {', '.join(sorted(MODEL_TYPES))} "
            f"(or absent, for Llama-style defaults with explicit structural keys), "
            f"got {model_type!r}")
    family = dict(MODEL_TYPES[model_type or "llama"])
    view = {key: value for key, value in config.items()
            if key not in _UNREAD.get(model_type, ())}
    translate = _TRANSLATORS.get(model_type)
    for key, value in (translate(config) if translate else {}).items():
        if _get(config, key)[0] is None:
            view[key] = value
    return model_type, family, view


def _shape_fields(view, family):
    """Widths, heads, vocabulary, activation and norm: the fields every family reads."""
    hidden = _field(view, "hidden_size", what="the model width")
    heads = _field(view, "num_attention_heads", what="the number of attention heads")
    kv_heads = _field(view, "num_key_value_heads", default=heads)
    if heads % kv_heads:
        raise InputError(f"`config['num_key_value_heads']` must divide "
                         f"`num_attention_heads` = {heads}, got {kv_heads}")
    if view.get("head_dim") is None and hidden % heads:
        raise InputError(f"`config['head_dim']` is required when `hidden_size` {hidden} "
                         f"is not a multiple of `num_attention_heads` {heads}")
    mlp = _choice(view, "mlp", family["mlp"])
    act_value, act_key = _get(view, "hidden_act")
    act_value = family["hidden_act"] if act_value is None else act_value
    if act_value not in _ACTIVATIONS:
        raise InputError(f"`config['{act_key}']` must be one of "
                         f"{', '.join(sorted(_ACTIVATIONS))}, got {act_value!r}")
    eps_value, eps_key = _get(view, "norm_eps")
    eps = family["norm_eps"] if eps_value is None else eps_value
    if (isinstance(eps, bool) or not isinstance(eps, Real) or not math.isfinite(eps)
            or eps <= 0):
        raise InputError(f"`config['{eps_key}']` must be a positive number, got {eps!r}")
    return {
        "hidden_size": hidden,
        "num_hidden_layers": _field(view, "num_hidden_layers",
                                    what="the number of transformer blocks"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": _field(view, "head_dim", default=hidden // heads),
        "intermediate_size": _field(view, "intermediate_size",
                                    default=4 * hidden if mlp == "fc" else None,
                                    what="the MLP width"),
        "vocab_size": _field(view, "vocab_size", minimum=0,
                             what="the vocabulary size (0 for no embedding and no LM head)"),
        "mlp": mlp,
        "hidden_act": _ACTIVATIONS[act_value],
        "norm": _choice(view, "norm", family["norm"]),
        "norm_eps": float(eps),
    }


def _layout_fields(view, family, vocab):
    """Norm placement, parallel attention, positions, biases, embedding norm and head."""
    norm_position = _choice(view, "norm_position", family["norm_position"])
    parallel = _flag(view, "parallel_attention", family["parallel_attention"])
    parallel_norms = _field(view, "parallel_norms", default=family["parallel_norms"])
    if parallel_norms not in (1, 2):
        raise InputError(f"`config['parallel_norms']` must be 1 or 2, got {parallel_norms}")
    if parallel and norm_position == "post":
        raise InputError("`config['parallel_attention']` must be false when "
                         "`norm_position` is 'post'")
    position = _choice(view, "position_embedding", family["position_embedding"])
    max_positions = 0
    if position == "learned":
        max_positions = _field(view, "max_position_embeddings",
                               what="the rows of the learned position table")
        if vocab == 0:
            raise InputError("`config['position_embedding']` 'learned' needs an "
                             "embedding, but `vocab_size` is 0")
    elif view.get("max_position_embeddings") is not None:  # 0: the normalised "none"
        max_positions = _field(view, "max_position_embeddings", minimum=0)
    position_offset = _field(view, "position_offset", minimum=0, default=family["position_offset"])
    type_vocab = _field(view, "type_vocab_size", minimum=0, default=family["type_vocab_size"])
    attention_bias = _flag(view, "attention_bias", family["attention_bias"])
    embedding_norm = _flag(view, "embedding_norm", family["embedding_norm"])
    if embedding_norm and vocab == 0:
        raise InputError("`config['embedding_norm']` must be false when `vocab_size` is 0 "
                         "(there is no embedding)")
    return {
        "tie_word_embeddings": _flag(view, "tie_word_embeddings", family["tie_word_embeddings"]),
        "norm_position": norm_position,
        "parallel_attention": parallel,
        "parallel_norms": parallel_norms if parallel else 1,
        "sandwich_norms": _flag(view, "sandwich_norms", family.get("sandwich_norms", False)),
        "qk_norm": _flag(view, "qk_norm", family.get("qk_norm", False)),
        "position_embedding": position,
        "max_position_embeddings": max_positions,
        "position_offset": position_offset if position == "learned" else 0,
        "type_vocab_size": type_vocab if vocab else 0,
        "attention_bias": attention_bias,
        "attention_out_bias": _flag(view, "attention_out_bias",
                                    family.get("attention_out_bias", attention_bias)),
        "mlp_bias": _flag(view, "mlp_bias", family["mlp_bias"]),
        "causal": _flag(view, "causal", family["causal"]),
        "embedding_norm": embedding_norm,
        "final_norm": _flag(view, "final_norm", family.get("final_norm", norm_position == "pre")),
        "head": _choice(view, "head", family["head"]),
    }


def _moe_fields(view, layers, intermediate):
    """Experts, their width, shared experts and which layers stay dense."""
    experts = _field(view, "num_local_experts", minimum=0, default=0)
    if not experts:
        return {"num_local_experts": 0, "num_experts_per_tok": 0, "moe_intermediate_size": 0,
                "shared_expert_intermediate_size": 0, "shared_expert_gate": False,
                "dense_layers": []}
    top_k = _field(view, "num_experts_per_tok", what="the experts each token is routed to")
    if top_k > experts:
        raise InputError(f"`config['num_experts_per_tok']` must be at most "
                         f"`num_local_experts` = {experts}, got {top_k}")
    dense = view.get("dense_layers") or []
    if (not isinstance(dense, (list, tuple)) or any(
            isinstance(i, bool) or not isinstance(i, Integral) or not 0 <= i < layers for i in dense)):
        raise InputError(f"`config['dense_layers']` must list layer indices in [0, {layers}), "
                         f"got {dense!r}")
    return {
        "num_local_experts": experts,
        "num_experts_per_tok": top_k,
        "moe_intermediate_size": _field(view, "moe_intermediate_size", default=intermediate),
        "shared_expert_intermediate_size": _field(view, "shared_expert_intermediate_size",
                                                  minimum=0, default=0),
        "shared_expert_gate": _flag(view, "shared_expert_gate", False),
        "dense_layers": sorted({int(i) for i in dense}),
    }


def _attention_fields(view, family):
    """``attention`` "mha", or "mla" with its low-rank widths (DeepSeek-V2/V3)."""
    kind = view.get("attention") or family.get("attention", "mha")
    if kind not in ("mha", "mla"):
        raise InputError(f"`config['attention']` must be 'mha' or 'mla', got {kind!r}")
    if kind == "mha":
        return {"attention": "mha"}
    what = "multi-head latent attention's width"
    return {
        "attention": "mla",
        "q_lora_rank": _field(view, "q_lora_rank", minimum=0, default=0),
        "kv_lora_rank": _field(view, "kv_lora_rank", what=what),
        "qk_nope_head_dim": _field(view, "qk_nope_head_dim", what=what),
        "qk_rope_head_dim": _field(view, "qk_rope_head_dim", what=what),
        "v_head_dim": _field(view, "v_head_dim", what=what),
    }


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

    Notes
    -----
    Three steps: the family's structural defaults (`MODEL_TYPES`), the
    family's own HF fields translated into cachefit keys by its translator
    (`_TRANSLATORS`, one small function per family that needs one; a key the
    config gives itself wins), then the fields every family shares, read by
    the same few readers.  Normalising a normalised config returns it.

    Examples
    --------
    >>> cfg = normalize_config({"model_type": "llama", "hidden_size": 64,
    ...     "num_hidden_layers": 2, "num_attention_heads": 4,
    ...     "intermediate_size": 128, "vocab_size": 100})
    >>> cfg["head_dim"], cfg["num_key_value_heads"], cfg["mlp"], cfg["norm"]
    (16, 4, 'gated', 'rmsnorm')
    """
    model_type, family, view = _family_view(config)
    shape = _shape_fields(view, family)
    return {
        "model_type": model_type,
        **shape,
        **_layout_fields(view, family, shape["vocab_size"]),
        **_moe_fields(view, shape["num_hidden_layers"], shape["intermediate_size"]),
        **_attention_fields(view, family),
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


def _norm(role, cfg, rows, size, width=None):
    width = cfg["hidden_size"] if width is None else width
    params = width * (2 if cfg["norm"] == "layernorm" else 1)
    return {"op": "norm", "role": role, **_bytes(params, rows, width, size), "flops": 0,
            "width": width, "norm": cfg["norm"], "eps": cfg["norm_eps"]}


def _elementwise(op, role, width, rows, size, **shape):
    return {"op": op, "role": role, **_bytes(0, rows, width, size), "flops": 0,
            "width": width, **shape}


def _mlp_params(cfg, inner=None):
    hidden, bias = cfg["hidden_size"], cfg["mlp_bias"]
    inner = cfg["intermediate_size"] if inner is None else inner
    if cfg["mlp"] == "gated":
        return 3 * hidden * inner + ((2 * inner + hidden) if bias else 0)
    return 2 * hidden * inner + ((inner + hidden) if bias else 0)


def _mlp_fn(cfg):
    return cfg["hidden_act"] + ("_mul" if cfg["mlp"] == "gated" else "")


def _is_moe_layer(cfg, layer):
    """Whether block `layer` (None: a typical block) has experts rather than a dense MLP."""
    if not cfg["num_local_experts"]:
        return False
    return layer is None or layer not in cfg.get("dense_layers", ())


def _expert(cfg, role, index, inner, rows, size):
    """One expert (or the shared expert) holding its whole MLP, run on `rows` tokens."""
    params = _mlp_params(cfg, inner)
    attrs = {"op": "expert", "role": role, **_bytes(params, rows, cfg["hidden_size"], size),
             "flops": 2 * params * rows, "in_features": cfg["hidden_size"],
             "intermediate_size": inner, "mlp": cfg["mlp"], "fn": _mlp_fn(cfg),
             "bias": cfg["mlp_bias"], "rows": rows}
    if index is not None:
        attrs["expert"] = index
    return attrs


def _moe_ops(cfg, source, tokens, size):
    """Router, routed experts, shared expert (and its gate), combine."""
    hidden, experts, top_k = cfg["hidden_size"], cfg["num_local_experts"], cfg["num_experts_per_tok"]
    inner = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
    rows = -(-tokens * top_k // experts)  # each expert runs on its expected share of the tokens
    ops = [("router", _linear("router", hidden, experts, False, tokens, size), [source])]
    names = [f"expert.{index}" for index in range(experts)]
    ops += [(name, _expert(cfg, "expert", index, inner, rows, size), [source, "router"])
            for index, name in enumerate(names)]
    shared = cfg.get("shared_expert_intermediate_size", 0)
    if shared:
        ops.append(("shared_expert", _expert(cfg, "shared_expert", None, shared, tokens, size),
                    [source]))
        names.append("shared_expert")
        if cfg.get("shared_expert_gate"):
            ops.append(("shared_gate", _linear("shared_gate", hidden, 1, False, tokens, size),
                        [source]))
            names.append("shared_gate")
    ops.append(("combine", _elementwise("moe_combine", "combine", hidden, tokens, size,
                                        num_experts=experts, experts_per_token=top_k),
                ["router", *names]))
    return ops


def _mlp_ops(cfg, source, batch, seq_len, size, *, moe=None):
    """The MLP's ops as (name, attrs, predecessors); the last one is its output.

    `moe` None: experts when the config has them.
    """
    hidden, inner, bias = cfg["hidden_size"], cfg["intermediate_size"], cfg["mlp_bias"]
    tokens = batch * seq_len
    if cfg["num_local_experts"] if moe is None else moe:
        return _moe_ops(cfg, source, tokens, size)
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


def _mla_ops(cfg, source, batch, seq_len, size):
    """Multi-head latent attention (DeepSeek-V2/V3): low-rank query and key/value paths."""
    hidden, heads, bias = cfg["hidden_size"], cfg["num_attention_heads"], cfg["attention_bias"]
    tokens = batch * seq_len
    q_rank, kv_rank = cfg["q_lora_rank"], cfg["kv_lora_rank"]
    nope, rope, v_dim = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    q_width = heads * (nope + rope)
    if q_rank:
        ops = [("q_a", _linear("q_a", hidden, q_rank, bias, tokens, size), [source]),
               ("q_a_norm", _norm("q_a_norm", cfg, tokens, size, q_rank), ["q_a"]),
               ("q", _linear("q", q_rank, q_width, False, tokens, size), ["q_a_norm"])]
    else:
        ops = [("q", _linear("q", hidden, q_width, False, tokens, size), [source])]
    flops = 2 * batch * seq_len * seq_len * heads * (nope + rope + v_dim)
    if cfg["causal"]:
        flops //= 2
    return ops + [
        ("kv_a", _linear("kv_a", hidden, kv_rank + rope, bias, tokens, size), [source]),
        ("kv_a_norm", _norm("kv_a_norm", cfg, tokens, size, kv_rank), ["kv_a"]),
        ("kv_b", _linear("kv_b", kv_rank, heads * (nope + v_dim), False, tokens, size),
         ["kv_a_norm"]),
        ("attn", {"op": "mla_attention", "role": "attn",
                  **_bytes(0, tokens, heads * v_dim, size), "flops": flops, "num_heads": heads,
                  "qk_nope_head_dim": nope, "qk_rope_head_dim": rope, "v_head_dim": v_dim,
                  "causal": cfg["causal"]}, ["q", "kv_a", "kv_b"]),
        ("o", _linear("o", heads * v_dim, hidden, bias, tokens, size), ["attn"]),
    ]


def _qk_norm(role, cfg, heads, tokens, size, pred):
    """Qwen3/Gemma3's per-head RMSNorm of q or k (one ``head_dim`` weight shared by the heads)."""
    head_dim = cfg["head_dim"]
    attrs = _norm(role, cfg, tokens, size, head_dim)
    attrs.update(op="head_norm", activation_bytes=tokens * heads * head_dim * size,
                 num_heads=heads)
    return (role, attrs, [pred])


def _attention_ops(cfg, source, batch, seq_len, size):
    if cfg.get("attention") == "mla":
        return _mla_ops(cfg, source, batch, seq_len, size)
    hidden, heads, kv_heads = (cfg["hidden_size"], cfg["num_attention_heads"],
                               cfg["num_key_value_heads"])
    head_dim, bias = cfg["head_dim"], cfg["attention_bias"]
    tokens = batch * seq_len
    flops = 4 * batch * seq_len * seq_len * heads * head_dim
    if cfg["causal"]:
        flops //= 2
    ops = [
        ("q", _linear("q", hidden, heads * head_dim, bias, tokens, size), [source]),
        ("k", _linear("k", hidden, kv_heads * head_dim, bias, tokens, size), [source]),
        ("v", _linear("v", hidden, kv_heads * head_dim, bias, tokens, size), [source]),
    ]
    q, k = "q", "k"
    if cfg.get("qk_norm"):
        ops += [_qk_norm("q_norm", cfg, heads, tokens, size, "q"),
                _qk_norm("k_norm", cfg, kv_heads, tokens, size, "k")]
        q, k = "q_norm", "k_norm"
    return ops + [
        ("attn", {"op": "attention", "role": "attn",
                  **_bytes(0, tokens, heads * head_dim, size), "flops": flops,
                  "num_heads": heads, "num_kv_heads": kv_heads, "head_dim": head_dim,
                  "causal": cfg["causal"], "rope": cfg["position_embedding"] == "rope"},
         [q, k, "v"]),
        ("o", _linear("o", heads * head_dim, hidden, cfg["attention_out_bias"], tokens, size),
         ["attn"]),
    ]


def block_ops(cfg, batch, seq_len, size, layer=None):
    """One block's ops as (name, attrs, predecessors), in execution order.

    ``"@in"`` stands for the block's input; the last op is the block's output.
    `layer` picks a dense or a mixture-of-experts MLP for models that mix
    them (DeepSeek's first layers, Qwen-MoE's ``mlp_only_layers``); None
    gives a typical block (experts when the model has any).
    """
    hidden, tokens = cfg["hidden_size"], batch * seq_len
    moe = _is_moe_layer(cfg, layer)

    def add(role, *preds):
        return (role, _elementwise("add", role, hidden, tokens, size), list(preds))

    def norm(role, *preds):
        return (role, _norm(role, cfg, tokens, size), list(preds))

    def mlp(source):
        return _mlp_ops(cfg, source, batch, seq_len, size, moe=moe)

    if cfg["parallel_attention"]:
        ops = [norm("attn_norm", "@in")]
        mlp_input = "attn_norm"
        if cfg["parallel_norms"] == 2:
            ops.append(norm("mlp_norm", "@in"))
            mlp_input = "mlp_norm"
        ops += _attention_ops(cfg, "attn_norm", batch, seq_len, size)
        ops += mlp(mlp_input)
        ops.append(add("add", "@in", "o", ops[-1][0]))
        return ops
    if cfg["norm_position"] == "post":
        ops = _attention_ops(cfg, "@in", batch, seq_len, size)
        ops += [add("attn_add", "@in", "o"), norm("attn_norm", "attn_add")]
        ops += mlp("attn_norm")
        ops += [add("mlp_add", "attn_norm", ops[-1][0]), norm("mlp_norm", "mlp_add")]
        return ops
    sandwich = cfg.get("sandwich_norms", False)
    ops = [norm("attn_norm", "@in")]
    ops += _attention_ops(cfg, "attn_norm", batch, seq_len, size)
    if sandwich:  # Gemma 2/3: the attention and MLP outputs are normed before each add
        ops.append(norm("post_attn_norm", "o"))
    ops += [add("attn_add", "@in", ops[-1][0]), norm("mlp_norm", "attn_add")]
    ops += mlp("mlp_norm")
    if sandwich:
        ops.append(norm("post_mlp_norm", ops[-1][0]))
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
        "num_experts": cfg["num_local_experts"] if _is_moe_layer(cfg, index) else 0,
        "experts_per_token": cfg["num_experts_per_tok"] if _is_moe_layer(cfg, index) else 0,
        **{key: cfg[key] for key in ("qk_norm", "sandwich_norms") if cfg.get(key)},
        **({"attention": "mla"} if cfg.get("attention") == "mla" else {}),
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
        norm), ``blocks`` (all blocks), ``per_block`` (one typical block:
        one with experts when the model has any), ``final_norm``,
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
    per_block = sum(attrs["params"] for _, attrs, _ in block_ops(cfg, 1, 1, 1))
    dense_layers = len(cfg["dense_layers"]) if cfg["num_local_experts"] else 0
    dense_block = sum(attrs["params"] for _, attrs, _ in block_ops(
        cfg, 1, 1, 1, layer=cfg["dense_layers"][0])) if dense_layers else 0
    embedding = (_embedding_node(cfg, 1, 1, 1, with_norm=cfg["embedding_norm"])["params"]
                 if cfg["vocab_size"] else 0)
    tail = dict(_head_ops(cfg, 1, 1, 1))
    final_norm = tail["final_norm"]["params"] if "final_norm" in tail else 0
    head = sum(attrs["params"] for name, attrs in tail.items() if name != "final_norm")
    blocks = per_block * (cfg["num_hidden_layers"] - dense_layers) + dense_block * dense_layers
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
        Tokens already in the KV cache (decode default: `seq_len`, capped
        so that the new token still has a position: at most
        ``max_position_embeddings`` - 1; prefill default: 0).  A context
        whose tokens, with the new ones, exceed ``max_position_embeddings``
        is refused.  Every attention node (every block node at block
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
    defaulted = context is None
    phase, context = kv.check_phase(phase, context, seq_len)
    seq_len = 1 if phase == "decode" else seq_len
    if defaulted and phase == "decode" and cfg["max_position_embeddings"] > 0:
        context = min(context, cfg["max_position_embeddings"] - seq_len)  # the prompt fills the positions
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
    if (phase == "decode" or context) and 0 < cfg["max_position_embeddings"] < context + seq_len:
        raise InputError(f"`context` + new tokens = {context + seq_len:,} exceeds the model's "
                         f"`max_position_embeddings` = {cfg['max_position_embeddings']:,}; "
                         f"a context of at most {cfg['max_position_embeddings'] - seq_len:,} tokens fits")

    name = config.get("name") or config.get("_name_or_path") or cfg["model_type"] or "transformer"
    kept = {key: config[key] for key in (*kv.WINDOW_KEYS, *ROUTING_KEYS) if key in config and key not in cfg}
    graph = nx.DiGraph(name=str(name), dtype=dtype, batch=batch, seq_len=seq_len,
                       source=str(config.get("source", "config mapping")),
                       granularity=granularity, config={**cfg, **kept})
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

    kinds = {}  # dense or MoE -> the block's ops (DeepSeek and Qwen-MoE mix the two)
    for index in range(cfg["num_hidden_layers"]):
        moe = _is_moe_layer(cfg, index)
        if moe not in kinds:
            kinds[moe] = block_ops(cfg, batch, seq_len, size, layer=index)
        ops = kinds[moe]
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
    kv.mark_windows(graph, {**config, **cfg})  # local layers' `sliding_window`: prefill's K/V prefix reads it too
    if phase == "decode" or context:
        kv.annotate(graph, {**config, **cfg}, context=context, dtype_size=size)
    return graph

