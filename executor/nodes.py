"""PyTorch modules for the nodes of a cachefit transformer graph (imports torch).

One module per node ``op`` of `cachefit.graphs.transformer` (see its module
docstring for the shape keys), with seeded random weights of exactly the
node's shapes, so a module's parameter count equals the node's ``params``.
Every activation is a 2-D ``[rows, width]`` tensor, rows being tokens (a
pooler's rows are sequences); sequences are ``seq_len`` consecutive rows.

Weights are drawn per *logical* weight: the generator of ``block.3.q``'s
weight is seeded from (`seed`, ``"block.3.q/weight"``), never from the order
of construction.  A tile (``tile=(i, n)``, ``parent=...``) draws its parent's
whole weight and keeps its slice, and a block at block granularity draws its
ops' weights under the op-granularity ids (``block.3`` + ``.q``).  So a model
tiled or not, at op or block granularity, computes the same function, which
is what the equivalence tests compare.

Modelling choices, stated where they differ from a production model:

* attention is computed exactly with ``scaled_dot_product_attention`` over
  whole sequences; RoPE uses theta 10000 and the rotate-half convention;
  falcon's ALiBi is not modelled (no positional term);
* a mixture-of-experts layer is evaluated densely: each expert runs on every
  token of its input and ``moe_combine`` weights the expert outputs by the
  routed top-k scores of its model family (`moe_routing`: Mixtral's
  renormalised softmax, DeepSeek-V3's scaled sigmoid, ...; zero for experts
  a token is not routed to), then adds the shared expert (gated by
  sigmoid(shared_gate) in Qwen2-MoE).  The result is exactly the routed
  MoE's, for any chunking, and
  the graph has fixed shapes (CUDA graphs need them), but an expert does
  ``experts / experts_per_token`` times its routed work, so MoE timings are
  not representative;
* norms and softmaxes compute in float32 and return the model dtype.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..graphs.tile import TILE_AXES

__all__ = ["ParamFactory", "Part", "make_node_module", "order_inputs", "logical_attrs", "tile_part",
           "activation_function", "ACTIVATIONS", "SUPPORTED_OPS", "TILE_AXIS", "StageInput", "ForeignTable",
           "Routing", "moe_routing"]

#: The node ``op`` values the executor materialises.
SUPPORTED_OPS = ("embedding", "norm", "linear", "attention", "mla_attention", "activation", "add", "expert",
                 "moe_combine", "pooler", "block", "concat", "stage_input")

ROPE_THETA = 10000.0


def _gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


#: Activation functions by the ``fn`` name the graph uses (gated ones add ``_mul``).
ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": _gelu_tanh, "relu": F.relu, "tanh": torch.tanh}


def activation_function(fn, node="?"):
    """(function, gated) for an ``fn`` name such as ``"silu_mul"`` or ``"gelu_tanh"``.

    Examples
    --------
    >>> function, gated = activation_function("silu_mul")
    >>> function is F.silu, gated
    (True, True)
    """
    gated = isinstance(fn, str) and fn.endswith("_mul")
    base = fn[: -len("_mul")] if gated else fn
    if base not in ACTIVATIONS:
        raise InputError(f"node {node!r}: activation `fn` must be one of "
                         f"{', '.join(sorted(ACTIVATIONS))} (optionally with '_mul'), got {fn!r}")
    return ACTIVATIONS[base], gated


class ParamFactory:
    """Seeded weight draws keyed by name, on one device.

    ``normal(key, shape, std)`` draws N(0, std²) from a generator seeded with
    (`seed`, crc32(key)); the same key gives the same tensor on the same
    device whatever else was drawn before.
    """

    def __init__(self, seed, device):
        self.seed = int(seed)
        self.device = torch.device(device)

    def _generator(self, key):
        generator = torch.Generator(device=self.device)
        generator.manual_seed((self.seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63 - 1))
        return generator

    def normal(self, key, shape, std=1.0, mean=0.0):
        tensor = torch.randn(tuple(shape), generator=self._generator(key), device=self.device,
                             dtype=torch.float32)
        return tensor.mul_(std).add_(mean)


class Part:
    """The slice ``[offset, offset + width)`` of a dimension of size ``total`` that a tile holds."""

    def __init__(self, offset, width, total):
        self.offset, self.width, self.total = int(offset), int(width), int(total)

    def rows(self, tensor):
        return tensor[self.offset:self.offset + self.width]

    def cols(self, tensor):
        return tensor[:, self.offset:self.offset + self.width]

    def __repr__(self):
        return f"Part({self.offset}, {self.width}, {self.total})"


def _param(tensor, dtype):
    return nn.Parameter(tensor.to(dtype).contiguous(), requires_grad=False)


# --------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------

class Norm(nn.Module):
    """RMSNorm (weight) or LayerNorm (weight and bias) over the last dimension, in float32.

    With `leading` (DeepSeek's ``kv_a_norm``), an input wider than `width`
    is normed over its first `width` features only (the latent of ``kv_a``;
    the rest is the shared RoPE key, which the attention reads itself).
    """

    def __init__(self, key, width, kind, eps, factory, dtype, leading=False):
        super().__init__()
        if kind not in ("rmsnorm", "layernorm"):
            raise InputError(f"node {key!r}: `norm` must be 'rmsnorm' or 'layernorm', got {kind!r}")
        self.kind, self.eps, self.leading = kind, float(eps), leading
        self.weight = _param(factory.normal(f"{key}/weight", (width,), std=0.1, mean=1.0), dtype)
        self.bias = (_param(factory.normal(f"{key}/bias", (width,), std=0.02), dtype)
                     if kind == "layernorm" else None)

    def forward(self, x):
        if self.leading and x.shape[-1] > self.weight.shape[0]:
            x = x[..., :self.weight.shape[0]]
        x32 = x.float()
        if self.kind == "rmsnorm":
            y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
        else:
            y = F.layer_norm(x32, (x32.shape[-1],), self.weight.float(), self.bias.float(), self.eps)
        return y.to(x.dtype)


class Linear(nn.Module):
    """y = x Wᵀ + b; a tile holds a slice `part` of its parent's W (rows: output features, the
    default; columns: input features) and b; a tied head borrows its embedding's table."""

    def __init__(self, key, in_features, out_features, bias, factory, dtype, part=None, tied=None,
                 split="rows"):
        super().__init__()
        self.tied = None
        if isinstance(tied, ForeignTable):
            # The owner is on another device: this stage holds its own copy (counted in its weight_bytes,
            # cachefit.ties), a parameter of this module; a tile holds its rows of it.
            self.foreign = tied.owner
            self.weight = _param(tied.token if part is None else part.rows(tied.token), dtype)
            self.bias = None
            return
        if tied is not None:
            # Not registered as a submodule: the shared matrix is counted once, in its owner.
            object.__setattr__(self, "tied", tied)
            self.weight = None
            self.bias = None
            return
        if part is None:
            shape = (out_features, in_features)
        elif split == "rows":
            shape = (part.total, in_features)
        else:
            shape = (out_features, part.total)
        weight = factory.normal(f"{key}/weight", shape, std=1.0 / math.sqrt(shape[1]))
        if part is not None:
            weight = part.rows(weight) if split == "rows" else part.cols(weight)
        self.weight = _param(weight, dtype)
        self.bias = None
        if bias:
            vector = factory.normal(f"{key}/bias", (shape[0],), std=0.02)
            self.bias = _param(part.rows(vector) if part is not None and split == "rows" else vector, dtype)

    def forward(self, x):
        if self.tied is None:
            return F.linear(x, self.weight, self.bias)
        if isinstance(self.tied, TiedTable):
            return self.tied.linear(x)
        return F.linear(x, self.tied.token_weight())


class Embedding(nn.Module):
    """Token + learned position + token type (id 0) embeddings, optionally followed by a norm."""

    def __init__(self, key, attrs, factory, dtype, part=None):
        super().__init__()
        vocab, width = attrs["num_embeddings"], attrs["embedding_dim"]
        positions, types = attrs.get("num_positions", 0), attrs.get("num_token_types", 0)
        self.offset = int(attrs.get("position_offset", 0))
        total = part.total if part else width

        def table(name, rows):
            full = factory.normal(f"{key}/{name}", (rows, total), std=1.0)
            return _param(part.cols(full) if part else full, dtype)

        self.token = table("token", vocab)
        self.position = table("position", positions) if positions else None
        self.token_type = table("token_type", types) if types else None
        self.norm = None
        if attrs.get("norm"):
            if part is not None:
                raise InputError(f"node {key!r}: a tiled embedding cannot hold its norm")
            self.norm = Norm("embed_norm", width, attrs["norm"], attrs["eps"], factory, dtype)

    def token_weight(self):
        return self.token

    def forward(self, tokens, positions):
        x = F.embedding(tokens, self.token)
        if self.position is not None:
            x = x + F.embedding(positions + self.offset, self.position)
        if self.token_type is not None:
            x = x + self.token_type[0]
        return self.norm(x) if self.norm is not None else x


class TiedTable:
    """The token table of a tiled embedding, for a tied LM head: the tiles hold column slices of the
    table, so the head's product is the sum of each slice's product with its input columns (no
    copy of the table)."""

    def __init__(self, tiles):
        self.tiles = tiles

    def token_weight(self):
        return torch.cat([tile.token for tile in self.tiles], dim=1)

    def linear(self, x):
        out, offset = None, 0
        for tile in self.tiles:
            width = tile.token.shape[1]
            part = F.linear(x[:, offset:offset + width], tile.token)
            out = part if out is None else out + part
            offset += width
        return out


class ForeignTable:
    """The token table of an embedding in another pipeline stage, for a tied LM head in this one.

    Drawn with the owner's weight key (the same values as in the whole
    model); the head makes it a parameter of its own (the stage's copy,
    which its ``weight_bytes`` counts, `cachefit.ties`).
    """

    def __init__(self, owner, vocab, width, factory, dtype):
        self.owner = owner
        self.token = factory.normal(f"{owner}/token", (vocab, width), std=1.0).to(dtype)

    def token_weight(self):
        return self.token


class StageInput(nn.Module):
    """An activation received from an earlier pipeline stage (``op="stage_input"``, `cachefit.deploy`):
    the stage sub-model's input, passed through unchanged."""

    def forward(self, x):
        return x


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _register_rope(module, key, dim, seq_len, device):
    """Register RoPE's ``cos`` and ``sin`` tables (positions 0 .. seq_len − 1, `dim` features) on `module`."""
    if dim % 2:
        raise InputError(f"node {key!r}: RoPE needs an even head dimension, got {dim}")
    inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    module.register_buffer("cos", angles.cos(), persistent=False)
    module.register_buffer("sin", angles.sin(), persistent=False)


def rotate(x, cos, sin):
    """RoPE: x rotated by the angles of `cos` and `sin` (rows = positions), computed in float32."""
    x32 = x.float()
    return (x32 * cos + _rotate_half(x32) * sin).to(x.dtype)


def window_mask(queries, keys, window, device):
    """The causal mask of `queries` at positions ``queries`` over key positions 0 .. keys − 1.

    True where key j may be attended by query i: j ≤ i, and, under a sliding
    window w (HF transformers' convention, the query counted), j > i − w.
    `queries` is a 1-d tensor of positions.
    """
    at = queries[:, None]
    key = torch.arange(keys, device=device)[None, :]
    mask = key <= at
    if window is not None:
        mask &= key > at - window
    return mask


class Attention(nn.Module):
    """Exact multi-head / grouped-query attention over whole sequences of `seq_len` rows.

    A ``sliding_window`` w on the node (a local layer) restricts each query
    to the keys of its last w positions, itself included (HF transformers'
    convention); a window as long as the sequence changes nothing.
    """

    def __init__(self, key, attrs, seq_len, device):
        super().__init__()
        self.heads, self.kv_heads = int(attrs["num_heads"]), int(attrs["num_kv_heads"])
        self.head_dim, self.causal = int(attrs["head_dim"]), bool(attrs.get("causal", True))
        self.seq_len = int(seq_len)
        if self.heads % self.kv_heads:
            raise InputError(f"node {key!r}: `num_kv_heads` must divide `num_heads`")
        window = attrs.get("sliding_window")
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise InputError(f"node {key!r}: `sliding_window` must be a positive integer of tokens, got {window!r}")
        if window is not None and not self.causal:
            raise InputError(f"node {key!r}: a sliding window needs causal attention")
        self.window = window if window is not None and window < self.seq_len else None
        self.rope = bool(attrs.get("rope", False))
        if self.rope:
            _register_rope(self, key, self.head_dim, self.seq_len, device)

    def _heads(self, x, heads):
        return x.view(-1, self.seq_len, heads, self.head_dim).transpose(1, 2)

    def _rope(self, x):
        return rotate(x, self.cos, self.sin)

    def forward(self, q, k, v):
        q, k, v = self._heads(q, self.heads), self._heads(k, self.kv_heads), self._heads(v, self.kv_heads)
        if self.rope:
            q, k = self._rope(q), self._rope(k)
        if self.kv_heads != self.heads:
            # repeat_interleave along the heads, written as expand + reshape: no device-to-host
            # size query, so it can be captured in a CUDA graph
            repeat = self.heads // self.kv_heads
            k, v = (x[:, :, None].expand(x.shape[0], self.kv_heads, repeat, *x.shape[2:])
                    .reshape(x.shape[0], self.heads, *x.shape[2:]) for x in (k, v))
        if self.window is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            mask = window_mask(torch.arange(self.seq_len, device=q.device), self.seq_len, self.window, q.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2).reshape(-1, self.heads * self.head_dim)


class LatentAttention(nn.Module):
    """DeepSeek's multi-head latent attention (op ``mla_attention``) over whole sequences of `seq_len` rows.

    Inputs, per token: ``q`` = heads × (nope + rope) (each head's query: a
    part without position, then a RoPE part); ``kv_a`` = kv_lora_rank + rope
    (the compressed latent, then one RoPE key shared by every head);
    ``kv_b`` = heads × (nope + v) (each head's key part and value, expanded
    from the normed latent).  Each head attends with key = [k_nope, RoPE(k_pe)]
    and query = [q_nope, RoPE(q_pe)], scaled by 1/√(nope + rope), causally.
    No parameters: the projections are the graph's own ``q``, ``kv_a``,
    ``kv_a_norm`` and ``kv_b`` nodes.
    """

    def __init__(self, key, attrs, seq_len, device):
        super().__init__()
        self.heads, self.causal, self.seq_len = int(attrs["num_heads"]), bool(attrs.get("causal", True)), int(seq_len)
        self.nope, self.rope_dim = int(attrs["qk_nope_head_dim"]), int(attrs["qk_rope_head_dim"])
        self.v_dim = int(attrs["v_head_dim"])
        _register_rope(self, key, self.rope_dim, self.seq_len, device)

    def query(self, q, positions):
        """(sequences, heads, positions, nope + rope) queries at `positions` (a 1-d tensor), RoPE part rotated."""
        q = q.view(-1, positions.shape[0], self.heads, self.nope + self.rope_dim).transpose(1, 2)
        q_nope, q_pe = q.split([self.nope, self.rope_dim], dim=-1)
        rotated = rotate(q_pe, self.cos.index_select(0, positions), self.sin.index_select(0, positions))
        return torch.cat((q_nope, rotated), dim=-1)

    def shared_key(self, kv_a, positions):
        """The RoPE key shared by the heads, (sequences, 1, positions, rope), at `positions`, rotated."""
        k_pe = kv_a[:, kv_a.shape[-1] - self.rope_dim:].reshape(-1, 1, positions.shape[0], self.rope_dim)
        return rotate(k_pe, self.cos.index_select(0, positions), self.sin.index_select(0, positions))

    def keys_values(self, kv_b, k_pe):
        """Per-head keys [k_nope, k_pe] and values from the expanded ``kv_b`` rows and the shared key."""
        sequences = k_pe.shape[0]
        kv = kv_b.view(sequences, -1, self.heads, self.nope + self.v_dim).transpose(1, 2)
        k_nope, value = kv.split([self.nope, self.v_dim], dim=-1)
        key = torch.cat((k_nope, k_pe.expand(sequences, self.heads, *k_pe.shape[2:])), dim=-1)
        return key, value

    def forward(self, q, kv_a, kv_b):
        rows, positions = q.shape[0], torch.arange(self.seq_len, device=q.device)
        query = self.query(q, positions)
        key, value = self.keys_values(kv_b, self.shared_key(kv_a, positions))
        out = F.scaled_dot_product_attention(query, key, value, is_causal=self.causal)
        return out.transpose(1, 2).reshape(rows, self.heads * self.v_dim)


class Activation(nn.Module):
    """act(x), or act(gate) × up for a gated ``fn`` (``silu_mul``, ``gelu_mul``, ...)."""

    def __init__(self, key, fn):
        super().__init__()
        self.function, self.gated = activation_function(fn, key)

    def forward(self, *inputs):
        if self.gated:
            gate, up = inputs
            return self.function(gate) * up
        (x,) = inputs
        return self.function(x)


class Add(nn.Module):
    """The sum of the inputs (a residual add)."""

    def forward(self, *inputs):
        total = inputs[0]
        for other in inputs[1:]:
            total = total + other
        return total


class Expert(nn.Module):
    """One expert's whole MLP (gated or fc), run densely on every row of its input."""

    def __init__(self, key, attrs, factory, dtype, part=None):
        super().__init__()
        hidden, inner = int(attrs["in_features"]), int(attrs["intermediate_size"])
        bias = bool(attrs.get("bias", False))
        if part is not None and bias:
            raise InputError(f"node {key!r}: a tiled expert with biases is not supported")
        self.function, _ = activation_function(attrs.get("fn", "silu_mul"), key)
        self.gated = attrs.get("mlp", "gated") == "gated"
        width = part.width if part else inner
        # A tile holds an intermediate slice: its output is a partial sum of the expert's output.
        if self.gated:
            self.gate = Linear(f"{key}.gate", hidden, width, bias, factory, dtype, part=part)
            self.up = Linear(f"{key}.up", hidden, width, bias, factory, dtype, part=part)
        else:
            self.fc1 = Linear(f"{key}.fc1", hidden, width, bias, factory, dtype, part=part)
        self.out = Linear(f"{key}.{'down' if self.gated else 'fc2'}", width, hidden, bias, factory, dtype,
                          part=part, split="cols")

    def forward(self, x, *unused):
        if self.gated:
            inner = self.function(self.gate(x)) * self.up(x)
        else:
            inner = self.function(self.fc1(x))
        return self.out(inner)


class Routing:
    """How a mixture-of-experts layer turns router logits into per-expert weights (`moe_routing` builds one).

    ``scoring``: ``"softmax"`` or ``"sigmoid"`` of the logits; each token
    keeps its `top_k` experts, chosen among the best `top_groups` of
    `groups` equal groups of experts when `groups` > 1 (a group scored by
    ``group_score``: ``"max"``, its best expert, or ``"top2"``, the sum of its
    best two); the kept scores are divided by their sum when `normalise`,
    then multiplied by `scale`.
    """

    def __init__(self, scoring="softmax", normalise=True, scale=1.0, groups=1, top_groups=1, group_score="max"):
        self.scoring, self.normalise, self.scale = scoring, bool(normalise), float(scale)
        self.groups, self.top_groups, self.group_score = int(groups), int(top_groups), group_score

    def __repr__(self):
        return (f"Routing({self.scoring!r}, normalise={self.normalise}, scale={self.scale}, groups={self.groups}, "
                f"top_groups={self.top_groups}, group_score={self.group_score!r})")

    def weights(self, logits, top_k):
        """(tokens, experts) float32 weights: the routed score of each expert, 0 where not routed."""
        logits = logits.float()
        scores = torch.sigmoid(logits) if self.scoring == "sigmoid" else torch.softmax(logits, dim=-1)
        choice = scores
        if self.groups > 1:
            grouped = scores.view(scores.shape[0], self.groups, -1)
            group_scores = (grouped.max(dim=-1).values if self.group_score == "max"
                            else grouped.topk(2, dim=-1).values.sum(dim=-1))
            kept = torch.zeros_like(group_scores).scatter_(
                1, torch.topk(group_scores, self.top_groups, dim=-1).indices, 1.0)
            mask = kept[:, :, None].expand_as(grouped).reshape_as(scores).bool()
            if self.group_score == "max":  # DeepSeek-V2 zeroes the other groups' scores
                scores = choice = scores.masked_fill(~mask, 0.0)
            else:  # DeepSeek-V3 excludes them from the choice only
                choice = scores.masked_fill(~mask, float("-inf"))
        indices = torch.topk(choice, top_k, dim=-1).indices
        values = scores.gather(-1, indices)
        if self.normalise:
            values = values / (values.sum(dim=-1, keepdim=True) + (1e-20 if self.scoring == "sigmoid" else 0.0))
        return torch.zeros_like(scores).scatter_(-1, indices, values * self.scale)


#: model_type -> (the config fields and the transformers 5.24 defaults its router reads).  Keys:
#: scoring, norm_topk_prob (None: always normalised, as Mixtral), routed_scaling_factor, n_group,
#: topk_group, group_score, topk_method (DeepSeek-V2: "greedy" or "group_limited_greedy"); reads: the config
#: fields that family's router honours (default: those named among its keys), others are ignored as there.
_ROUTERS = {
    # DeepseekV3TopkRouter: sigmoid scores; group-limited top-k (a group: sum of its best two); the kept
    # sigmoid scores normalised (+1e-20) and scaled
    "deepseek_v3": dict(scoring="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5, n_group=8,
                        topk_group=4, group_score="top2",
                        reads=("norm_topk_prob", "routed_scaling_factor", "n_group", "topk_group")),
    # DeepseekV2TopkRouter: softmax; greedy or group-limited (a group: its best expert) top-k; scaled, never
    # normalised (transformers' DeepSeek-V2 reads no norm_topk_prob)
    "deepseek_v2": dict(scoring="softmax", norm_topk_prob=False, routed_scaling_factor=1.0, n_group=None,
                        topk_group=None, group_score="max", topk_method="greedy",
                        reads=("routed_scaling_factor", "n_group", "topk_group", "topk_method")),
    # Qwen2MoeTopKRouter / Qwen3MoeTopKRouter: softmax top-k, normalised only with norm_topk_prob
    "qwen2_moe": dict(scoring="softmax", norm_topk_prob=False),
    "qwen3_moe": dict(scoring="softmax", norm_topk_prob=False),
}


def moe_routing(config):
    """The `Routing` of a graph's ``config`` (`cachefit.graphs.transformer`'s normalised config, or None).

    Each field is the config's own where it has it, else the default of
    transformers 5.24's config class for its ``model_type`` (`_ROUTERS`);
    any other model (Mixtral, a config without a model_type) routes as
    Mixtral: softmax, top-k, renormalised.  DeepSeek's group-limited
    choice applies when ``n_group`` divides the experts into groups of at
    least two (DeepSeek-V3 scores a group by its best two; transformers
    cannot run a config where this fails, and the executor then chooses
    among all experts).  DeepSeek-V3's ``e_score_correction_bias`` (a buffer,
    zero as transformers initialises it; not a parameter the graph counts)
    is taken as zero.

    Examples
    --------
    >>> moe_routing({"model_type": "deepseek_v3", "num_local_experts": 256})
    Routing('sigmoid', normalise=True, scale=2.5, groups=8, top_groups=4, group_score='top2')
    >>> moe_routing({"model_type": "qwen2_moe", "norm_topk_prob": True}).normalise
    True
    >>> moe_routing(None)
    Routing('softmax', normalise=True, scale=1.0, groups=1, top_groups=1, group_score='max')
    """
    config = config or {}
    defaults = _ROUTERS.get(config.get("model_type"))
    if defaults is None:
        return Routing()

    def field(name):  # the config's value where the family's router reads that field, else the default
        value = config.get(name) if name in defaults.get("reads", defaults) else None
        return defaults.get(name) if value is None else value

    groups, top_groups = int(field("n_group") or 1), int(field("topk_group") or 1)
    experts, group_score = int(config.get("num_local_experts") or 0), defaults.get("group_score", "max")
    per_group = experts // groups if experts and not experts % groups else 0
    if field("topk_method") == "greedy" or groups < 2 or per_group < (2 if group_score == "top2" else 1):
        groups = top_groups = 1
    normalise = field("norm_topk_prob")
    return Routing(defaults["scoring"], normalise=True if normalise is None else normalise,
                   scale=field("routed_scaling_factor") or 1.0, groups=groups, top_groups=min(top_groups, groups),
                   group_score=group_score)


class MoECombine(nn.Module):
    """Σ_e w_e · expert_e (w: the `Routing` of the router logits), plus the shared expert, in float32.

    Inputs in `order_inputs`' order: the router's logits, the `num_experts`
    routed experts' outputs by index, then optionally the shared expert's
    output and, after it, its 1-wide gate (Qwen2-MoE), which scales the
    shared output by sigmoid(gate) (transformers' Qwen2MoeSparseMoeBlock);
    DeepSeek's shared experts are added as they are (DeepseekV3MoE).
    """

    def __init__(self, key, attrs, routing=None):
        super().__init__()
        self.top_k, self.num_experts = int(attrs["experts_per_token"]), int(attrs["num_experts"])
        self.routing = routing or Routing()

    def forward(self, logits, *inputs):
        experts, shared = inputs[:self.num_experts], inputs[self.num_experts:]
        weights = self.routing.weights(logits, self.top_k)
        out = weights[:, 0:1] * experts[0].float()
        for index in range(1, len(experts)):
            out = out + weights[:, index:index + 1] * experts[index].float()
        if shared:
            shared_out = shared[0].float()
            if len(shared) == 2:
                shared_out = torch.sigmoid(shared[1].float()) * shared_out
            out = out + shared_out
        return out.to(experts[0].dtype)


class Pooler(nn.Module):
    """BERT's pooler: dense + tanh on the first row of each sequence (a tile: a slice of the outputs)."""

    def __init__(self, key, attrs, seq_len, factory, dtype, part=None):
        super().__init__()
        self.seq_len = int(seq_len)
        out_features = part.width if part else attrs["out_features"]
        self.dense = Linear(key, attrs["in_features"], out_features, attrs.get("bias", True), factory, dtype,
                            part=part)
        self.function, _ = activation_function(attrs.get("fn", "tanh"), key)

    def forward(self, x):
        first = x.view(-1, self.seq_len, x.shape[-1])[:, 0]
        return self.function(self.dense(first))


class Join(nn.Module):
    """The node joining a tiled node's tiles: concatenation along the last dimension, or a sum
    for tiled experts (each tile computes a partial sum over its intermediate slice)."""

    def __init__(self, mode):
        super().__init__()
        self.mode = mode

    def forward(self, *tiles):
        if self.mode == "sum":
            out = tiles[0].float()
            for tile in tiles[1:]:
                out = out + tile.float()
            return out.to(tiles[0].dtype)
        return torch.cat(tiles, dim=-1)


class Block(nn.Module):
    """A whole transformer block (block granularity), built from the same ops as op granularity."""

    def __init__(self, key, config, seq_len, factory, dtype, device, window=None, layer=None):
        super().__init__()
        from ..graphs.transformer import block_ops

        self.ops = []  # (name, input names) in order; modules registered under sanitised names
        self.layers = nn.ModuleDict()
        ops = block_ops(config, 1, 1, 1, layer=layer)  # the layer picks a dense or an MoE MLP (DeepSeek, Qwen-MoE)
        logical = {name: attrs for name, attrs, _ in ops}
        for name, attrs, preds in ops:
            if attrs.get("op") == "attention" and window is not None:  # the block node's sliding window
                attrs = {**attrs, "sliding_window": window}
            module = _op_module(f"{key}.{name}", attrs, seq_len, factory, dtype, device, config=config)
            order = order_inputs(f"{key}.{name}", attrs, list(preds),
                                 lambda pred: logical.get(pred, {}))
            self.layers[name.replace(".", "_")] = module
            self.ops.append((name, tuple(order)))
        self.output = ops[-1][0]

    def forward(self, x):
        values = {"@in": x}
        for name, inputs in self.ops:
            values[name] = self.layers[name.replace(".", "_")](*(values[i] for i in inputs))
        return values[self.output]


# --------------------------------------------------------------------------
# graph node -> module
# --------------------------------------------------------------------------

def logical_attrs(graph, node):
    """A node's attributes, or for a join of tiles without its own ``role``, its first tile's."""
    attrs = graph.nodes[node]
    if attrs.get("op") == "concat" and "role" not in attrs:
        preds = list(graph.predecessors(node))
        if preds:
            return graph.nodes[preds[0]]
    return attrs


def order_inputs(node, attrs, preds, logical):
    """The predecessors of `node` in the order its module takes them.

    attention: q, k, v; gated activation: gate, up; moe_combine: the router,
    the experts by index, then the shared expert and its gate if any; expert: its input (the router edge is only an
    ordering edge); join: tiles by tile index; add: all; any other op: its
    single input.  Roles are read from the predecessors' ``role`` attributes;
    when absent the graph's predecessor order is kept.
    """
    op = attrs.get("op")
    roles = {pred: logical(pred).get("role") for pred in preds}

    def by_roles(wanted):
        found = [next((p for p in preds if roles[p] == role), None) for role in wanted]
        unmatched = [p for p in preds if p not in found]
        if found.count(None) == 1 and len(unmatched) == 1 and len(preds) == len(wanted):
            found[found.index(None)] = unmatched[0]  # one input without a role (a stage_input): the one left
        if None in found:
            if len(preds) != len(wanted):
                raise InputError(f"node {node!r} ({op}) needs inputs {', '.join(wanted)}, got {preds}")
            return list(preds)
        return found

    if op == "attention":
        return by_roles(("q", "k", "v"))
    if op == "mla_attention":
        return by_roles(("q", "kv_a", "kv_b"))
    if op == "activation" and str(attrs.get("fn", "")).endswith("_mul"):
        return by_roles(("gate", "up"))
    if op == "moe_combine":
        router = [p for p in preds if roles[p] == "router"]
        shared = [p for p in preds if roles[p] == "shared_expert"]
        gate = [p for p in preds if roles[p] == "shared_gate"]
        experts = [p for p in preds if roles[p] not in ("router", "shared_expert", "shared_gate")]
        if (len(router) != 1 or len(experts) != int(attrs["num_experts"]) or len(shared) > 1
                or len(gate) > len(shared)):
            raise InputError(f"node {node!r} (moe_combine) needs one router, {attrs['num_experts']} experts "
                             f"and optionally one shared_expert (then optionally its shared_gate) as inputs, "
                             f"got {preds}")
        experts.sort(key=lambda p: logical(p).get("expert", 0))
        return router + experts + shared + gate
    if op == "expert":
        data = [p for p in preds if roles[p] != "router"]
        if len(data) != 1:
            raise InputError(f"node {node!r} (expert) needs one input besides the router, got {preds}")
        return data
    if op == "concat":
        return sorted(preds, key=lambda p: tuple(logical(p).get("tile") or (0, 0))[0])
    if op == "add":
        if not preds:
            raise InputError(f"node {node!r} (add) has no inputs")
        return list(preds)
    if len(preds) != 1:
        raise InputError(f"node {node!r} ({op}) must have exactly one input, got {len(preds)}: {preds}")
    return list(preds)


def _op_module(key, attrs, seq_len, factory, dtype, device, part=None, tied=None, config=None):
    op = attrs.get("op")
    if op == "embedding":
        return Embedding(key, attrs, factory, dtype, part=part)
    if op == "norm":
        return Norm(key, attrs["width"], attrs["norm"], attrs["eps"], factory, dtype,
                    leading=attrs.get("role") == "kv_a_norm")
    if op == "linear":
        in_features = attrs.get("in_features")
        out_features = part.width if part else attrs.get("out_features")
        if out_features is None:
            raise InputError(f"node {key!r} (linear) has no `out_features`")
        if in_features is None:  # a layers-list instance: infer from the parameter count
            bias = out_features if attrs.get("bias") else 0
            in_features, rest = divmod(int(attrs["params"]) - bias, out_features)
            if rest or in_features < 1:
                raise InputError(f"node {key!r} (linear): `params` {attrs['params']} is not "
                                 f"in_features × {out_features}")
        return Linear(key, int(in_features), int(out_features), bool(attrs.get("bias", False)), factory,
                      dtype, part=part, tied=tied)
    if op == "attention":
        return Attention(key, attrs, seq_len, device)
    if op == "mla_attention":
        return LatentAttention(key, attrs, seq_len, device)
    if op == "activation":
        return Activation(key, attrs.get("fn"))
    if op == "add":
        return Add()
    if op == "expert":
        return Expert(key, attrs, factory, dtype, part=part)
    if op == "moe_combine":
        return MoECombine(key, attrs, routing=moe_routing(config))
    if op == "pooler":
        return Pooler(key, attrs, seq_len, factory, dtype, part=part)
    if op == "stage_input":
        return StageInput()
    if op == "block":
        if config is None:
            raise InputError(f"node {key!r} (block) needs the graph attribute `config` "
                             "(a graph from cachefit.graphs.transformer)")
        return Block(key, config, seq_len, factory, dtype, device, window=attrs.get("sliding_window"),
                     layer=attrs.get("layer"))
    raise InputError(f"node {key!r}: the executor cannot materialise op {op!r}; supported ops: "
                     f"{', '.join(SUPPORTED_OPS)}")


#: Ops whose tiles the executor materialises (its modules take a `Part` of the split dimension).
_TILED_OPS = ("linear", "pooler", "embedding", "expert")

#: op -> the attribute holding a tile's width: `cachefit.graphs.tile.TILE_AXES` (the one declaration)
#: restricted to the ops the executor can run tiled.
TILE_AXIS = {op: TILE_AXES[op][0] for op in _TILED_OPS}


def tile_part(graph, node, siblings):
    """The `Part` of its parent's split dimension that tile `node` holds.

    A tile's width is its axis attribute (`TILE_AXIS`: ``out_features``,
    ``embedding_dim`` or ``intermediate_size``) when every sibling carries
    ``tile_offset`` (as `cachefit.graphs.tile` writes them); otherwise it is
    read from the tile's own ``params`` (so it does not matter whether
    ``out_features`` names the slice or the parent).  Offsets follow the tile
    index.
    """
    def width(tile):
        attrs = graph.nodes[tile]
        op = attrs.get("op")
        if op not in TILE_AXIS:
            raise InputError(f"node {tile!r}: the executor cannot run a tile of op {op!r} "
                             f"(tiles of {', '.join(sorted(TILE_AXIS))} nodes are supported)")
        if all("tile_offset" in graph.nodes[t] for t in siblings):
            return int(attrs[TILE_AXIS[op]])
        params = int(attrs["params"])
        if op in ("linear", "pooler"):
            divisor = int(attrs["in_features"]) + (1 if attrs.get("bias") else 0)
        elif op == "embedding":
            divisor = (int(attrs["num_embeddings"]) + int(attrs.get("num_positions", 0))
                       + int(attrs.get("num_token_types", 0)))
        else:
            divisor = int(attrs["in_features"]) * (3 if attrs.get("mlp", "gated") == "gated" else 2)
        slice_width, rest = divmod(params, divisor)
        if rest or slice_width < 1:
            raise InputError(f"node {tile!r}: tile `params` {params} is not a whole slice of "
                             f"{divisor} parameters per output")
        return slice_width

    ordered = sorted(siblings, key=lambda tile: tuple(graph.nodes[tile]["tile"])[0])
    widths = {tile: width(tile) for tile in ordered}
    total, offset = sum(widths.values()), 0
    for tile in ordered:
        if tile == node:
            return Part(offset, widths[tile], total)
        offset += widths[tile]
    raise InputError(f"node {node!r} is not among its parent's tiles")  # pragma: no cover


def make_node_module(graph, node, *, seq_len, factory, dtype, device, tiles=None, modules=None):
    """The module for `node` of `graph` (see the module docstring).

    `tiles` maps a parent id to its tile ids; `modules` holds the modules
    built so far (a tied LM head borrows its embedding's table from there).
    """
    attrs = graph.nodes[node]
    op = attrs.get("op")
    if op is None:
        raise InputError(f"node {node!r} has no `op` attribute; the executor runs graphs whose nodes "
                         "say what they compute (cachefit.graphs.transformer, "
                         "cachefit.executor.linear_stack) or a torch module with from_torch graphs")
    if op == "concat":
        mode = attrs.get("join")
        if mode is None:
            kinds = {graph.nodes[p].get("op") for p in graph.predecessors(node)}
            mode = "sum" if kinds == {"expert"} else "cat"
        if mode not in ("cat", "sum"):
            raise InputError(f"node {node!r}: `join` must be 'cat' or 'sum', got {mode!r}")
        return Join(mode)
    part = None
    key = node
    if "tile" in attrs and attrs.get("tile") is not None:
        parent = attrs.get("parent")
        if parent is None:
            raise InputError(f"node {node!r} has `tile` but no `parent`")
        part = tile_part(graph, node, (tiles or {}).get(parent, [node]))
        key = parent
    tied = None
    if attrs.get("tied_to") is not None:
        owner, modules = attrs["tied_to"], modules or {}
        owner_tiles = [t for t in (tiles or {}).get(owner, []) if t in modules]
        if owner_tiles:
            owner_tiles.sort(key=lambda t: tuple(graph.nodes[t]["tile"])[0])
            tied = TiedTable([modules[t] for t in owner_tiles])
        elif owner in modules and hasattr(modules[owner], "token_weight"):
            tied = modules[owner]
        elif owner not in graph and graph.graph.get("stage") is not None and op == "linear":
            rows = part.total if part is not None else int(attrs["out_features"])
            tied = ForeignTable(owner, rows, int(attrs["in_features"]), factory, dtype)
        else:
            raise InputError(f"node {node!r} is tied to {owner!r}, which must be an embedding (or its tiles) "
                             "earlier in the graph")
    try:
        return _op_module(key, attrs, seq_len, factory, dtype, device, part=part, tied=tied,
                          config=graph.graph.get("config"))
    except KeyError as missing:  # a node attribute the module needs (a hand-built or edited graph)
        raise InputError(f"node {node!r} ({op}) lacks the attribute {missing.args[0]!r} its module needs") from None
