"""Recognised Hugging Face attention modules in an imported (torch.export) graph: their K/V per token.

An attention module is *recognised* when it is a transformers causal
self-attention module whose core is one ``scaled_dot_product_attention``
call (transformers' ``sdpa`` implementation, the default):
`attention_spec` reads it from the module (``config``, ``layer_idx``,
``head_dim``, ``is_causal``; not a cross-attention).  For each such module
`annotate_attention` marks the graph node whose operations hold that call
(the module's own run that attends, ``model.layers.0.self_attn#2``) with

``kv_bytes_per_token``
    2 × kv_heads × head_dim × bytes per element (`cachefit.graphs.kv`'s
    formula: a key and a value vector per KV head and token), at the
    graph's dtype;
``sliding_window``
    w on a local layer (`cachefit.graphs.kv.layer_window` over the module's
    config and layer index), as the planner's windows are read;

and, when any module is recognised and the model's one input is token ids
of shape (batch, seq_len), sets the graph attributes ``batch`` and
``seq_len``, so a plan can take chunks of tokens inside a sequence and
count the K/V of the earlier chunks (``+kv`` memory models).  The executor
runs exactly these modules chunked (`cachefit.executor.export_chunked`);
any other attention module is refused there by name.

torch is imported only inside the functions.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

from .kv import kv_bytes_per_token, layer_window

__all__ = ["AttentionSpec", "attention_spec", "annotate_attention", "is_sdpa"]

logger = logging.getLogger(__name__)


class AttentionSpec(NamedTuple):
    """What chunked prefill needs of a recognised attention module."""

    kv_heads: int
    head_dim: int
    layer: int
    window: int | None


def attention_spec(module):
    """The `AttentionSpec` of a transformers causal self-attention module, or None when not one.

    Reads ``config`` (``num_attention_heads``; ``num_key_value_heads``,
    else as many KV heads as heads), ``head_dim`` and ``layer_idx``; a module
    with ``is_causal`` False or ``is_cross_attention`` True is not one.
    """
    config = getattr(module, "config", None)
    layer, head_dim = getattr(module, "layer_idx", None), getattr(module, "head_dim", None)
    if config is None or not hasattr(config, "to_dict") or not type(module).__name__.endswith("Attention"):
        return None
    if not isinstance(layer, int) or not isinstance(head_dim, int) or head_dim < 1:
        return None
    if getattr(module, "is_causal", True) is not True or getattr(module, "is_cross_attention", False):
        return None
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if not isinstance(kv_heads, int) or kv_heads < 1:
        return None
    return AttentionSpec(kv_heads, head_dim, layer, layer_window(config.to_dict(), layer))


def is_sdpa(node):
    """Whether exported node `node` calls ``aten.scaled_dot_product_attention``."""
    import torch

    target = getattr(node, "target", None)
    return (isinstance(target, torch._ops.OpOverload)
            and target.overloadpacket is torch.ops.aten.scaled_dot_product_attention)


def annotate_attention(graph, ep, group, module, tensor_bytes):
    """Mark the nodes of `graph` holding a recognised attention's core (see the module docstring).

    `group` maps exported nodes to graph node names (the importer's runs);
    `tensor_bytes` is the importer's bytes of a tensor (its dtype override
    applied).  Works on the graph being built; returns the recognised
    modules' qualified names.
    """
    from .torch_export import _numel

    calls = {}
    for node in ep.graph.nodes:
        if is_sdpa(node) and node in group:
            calls.setdefault(group[node], []).append(node)
    recognised = []
    for name, nodes in calls.items():
        path = graph.nodes[name].get("module", "")
        spec = attention_spec(module.get_submodule(path)) if path and path != "root" else None
        if spec is None or len(nodes) != 1:
            continue
        key = nodes[0].args[1].meta.get("val")
        element = tensor_bytes(key) // max(_numel(key), 1)
        data = graph.nodes[name]
        data["kv_bytes_per_token"] = kv_bytes_per_token(
            {"num_key_value_heads": spec.kv_heads, "head_dim": spec.head_dim}, element)
        if spec.window is not None:
            data["sliding_window"] = spec.window
        recognised.append(path)
    inputs = [data for _, data in graph.nodes(data=True) if data.get("op") == "input"]
    if recognised and len(inputs) == 1 and len(inputs[0].get("shape", ())) == 2 \
            and str(inputs[0].get("dtype", "")).startswith(("int", "uint")):
        graph.graph["batch"], graph.graph["seq_len"] = (int(size) for size in inputs[0]["shape"])
    logger.debug("from_torch: %d recognised attention module(s)", len(recognised))
    return recognised
