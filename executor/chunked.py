"""Chunked prefill: chunks of c < seq_len tokens inside a sequence, with a K/V buffer per attention (imports torch).

A chunk of c tokens at position p of its sequence attends causally to the
keys and values of tokens 0 .. p + c − 1 of that sequence.  `ChunkedAttention`
wraps one `cachefit.executor.nodes.Attention`: it keeps a K/V buffer of one
sequence (``seq_len`` rows per KV head, filled as chunks arrive), appends each
chunk's K/V (after RoPE at the chunk's own positions) and attends the chunk's
queries over the buffer with the causal mask j ≤ p + i (and j > p + i − w on
a sliding-window layer of window w, as the unchunked module does; the buffer
still holds the whole sequence).  Position ids continue across chunks by
construction: every chunk's store reads its rows of the model inputs
(``@positions`` = token index mod seq_len).

Every schedule feeds each group the chunks of a pass in order (partition-major:
for group, for chunk; token-major: for chunk, for group), so each attention
sees a sequence's chunks in order and its cursor p wraps to 0 at each
sequence's end.  A call of whole sequences (rows a multiple of seq_len, as the
unchunked reference and ``batched`` make) runs the wrapped module unchanged.

On CUDA (untested on a GPU: none was available; the logic is tested with
the CPU stand-in of torch.cuda), a schedule whose graphs hold whole passes
or whole chunks-in-order (partition-major, token-major, fused) captures each
chunk's slice positions as they were at capture, which are the positions
every replay needs, because a pass always starts every sequence at 0.
``partition-major-replay`` captures one chunk's graph per group and replays
it per chunk: there the position is a tensor (`replay_positions`) filled
before each replay, and the chunk attends over the whole zeroed buffer with
the keys after it masked, so the captured shapes are fixed.

Imported Hugging Face models (torch.export) whose attention modules the
import recognised run chunked too: `ChunkedSdpa` replaces each attention's
``scaled_dot_product_attention`` call and `ChunkPositions` the position ids
in the program exported for one chunk (`cachefit.executor.export_chunked`).

What this does not do: chunks that span two sequences (c must divide
seq_len), non-causal attention (a chunk would need later tokens), BERT's
pooler (it reads each sequence's first row), torch.fx models and imported
models whose attention is not recognised (their attention runs as the
module's own traced operations over whole samples, with no K/V buffer and
no position offset; `imported_refusal` names the module).  Each is refused
by name; whole-sequence chunks still run.

The planner's side is `cachefit.graphs.kv.prefix_tokens` (the K/V the last
chunk's prefix holds) and the ``+kv`` memory models that count it.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .nodes import Attention, Block, Join, LatentAttention, Linear, Norm, Pooler, rotate, window_mask

__all__ = ["ChunkedAttention", "ChunkedLatentAttention", "ChunkedSdpa", "ChunkPositions", "Sequence",
           "enable_chunked_prefill", "release_chunked", "plan_chunk_tokens", "prepare_chunks", "kv_prefix_note",
           "planned_kv", "kv_buffers",
           "reset_chunked", "replay_positions", "imported_attention", "imported_refusal"]

logger = logging.getLogger(__name__)


class _Chunked(nn.Module):
    """What both chunked attentions share: the wrapped module, the cursor, and where a chunk lies.

    Positions come from one of two places.  By default (``position`` None)
    the Python cursor: chunks arrive in order, the cursor advances by each
    and wraps to 0 at a sequence's end, and a chunk attends over the buffer
    rows filled so far.  A CUDA schedule that captures one chunk's graph once
    and replays it per chunk sets ``position`` (`replay_positions`): a 0-d
    integer tensor holding the chunk's first position, which it updates
    before every replay; the chunk then attends over the whole buffer with
    keys after it masked, so every shape is fixed.
    """

    position = None

    def __init__(self, attention, key):
        super().__init__()
        if not attention.causal:
            raise InputError(f"node {key!r}: non-causal attention cannot be chunked inside a sequence (a chunk "
                             "would need the keys of later tokens); run whole-sequence chunks")
        self.attention, self.key, self.cursor = attention, key, 0

    @property
    def seq_len(self):
        return self.attention.seq_len

    def _where(self, rows, device):
        """(positions of the chunk's rows as a 1-d tensor, keys to attend: the buffer rows 0 .. end − 1)."""
        if self.position is not None:
            return self.position + torch.arange(rows, device=device), self.seq_len
        start = self.cursor
        if start + rows > self.seq_len:
            raise InputError(f"node {self.key!r}: a chunk of {rows} tokens at position {start} spans two "
                             f"sequences of {self.seq_len}; chunk_tokens must divide seq_len")
        self.cursor = (start + rows) % self.seq_len
        return torch.arange(start, start + rows, device=device), start + rows


def _buffer(current, shape, like):
    """`current` when it fits `like` (dtype, device), else a zeroed buffer of `shape`.

    Zeroed, not empty: a chunk that attends over the whole buffer (masked)
    multiplies the rows after it by zero weights, and garbage NaNs would
    survive that.
    """
    if current is not None and current.dtype == like.dtype and current.device == like.device:
        return current
    return torch.zeros(shape, dtype=like.dtype, device=like.device)


class _ChunkedKV(_Chunked):
    """A chunked attention that keeps one sequence's keys and values per KV head (`_attend`)."""

    def __init__(self, attention, key):
        super().__init__(attention, key)
        self._key_buffer = self._value_buffer = None

    def kv_tensors(self):
        """The K/V buffers allocated so far (key, value)."""
        return [buffer for buffer in (self._key_buffer, self._value_buffer) if buffer is not None]

    def _attend(self, q, k, v, positions, end, window, scale=None):
        """Write the chunk's keys and values (1, kv_heads, rows, dim) at `positions` into the buffers and
        attend its queries (1, heads, rows, dim) over buffer rows 0 .. `end` − 1, causally (and within
        `window`); each KV head serves heads / kv_heads consecutive query heads."""
        kv_heads, heads = k.shape[1], q.shape[1]
        keys = self._key_buffer = _buffer(self._key_buffer, (1, kv_heads, self.seq_len, k.shape[-1]), k)
        values = self._value_buffer = _buffer(self._value_buffer, (1, kv_heads, self.seq_len, v.shape[-1]), v)
        keys.index_copy_(2, positions, k)
        values.index_copy_(2, positions, v)
        k, v = keys[:, :, :end], values[:, :, :end]
        if kv_heads != heads:
            repeat = heads // kv_heads
            k, v = (x[:, :, None].expand(1, kv_heads, repeat, *x.shape[2:]).reshape(1, heads, *x.shape[2:])
                    for x in (k, v))
        # key j ≤ query position p + i (and j > p + i − w under a sliding window w)
        mask = window_mask(positions, end, window, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


class ChunkedAttention(_ChunkedKV):
    """An `Attention` that also takes chunks of c < seq_len rows of one sequence, in order.

    Attributes
    ----------
    attention : Attention
        The wrapped module (it holds no parameters: bytes are unchanged).
    cursor : int
        Tokens of the current sequence already in the K/V buffer.
    position : torch.Tensor or None
        See `_Chunked`.
    """

    def _heads(self, x, heads):
        return x.view(1, -1, heads, self.attention.head_dim).transpose(1, 2)

    def forward(self, q, k, v):
        rows, inner = q.shape[0], self.attention
        if rows % self.seq_len == 0:  # whole sequences: the plain module
            self.cursor = 0
            return inner(q, k, v)
        positions, end = self._where(rows, q.device)
        q, k, v = self._heads(q, inner.heads), self._heads(k, inner.kv_heads), self._heads(v, inner.kv_heads)
        if inner.rope:
            cos, sin = inner.cos.index_select(0, positions), inner.sin.index_select(0, positions)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        out = self._attend(q, k, v, positions, end, inner.window)
        return out.transpose(1, 2).reshape(rows, inner.heads * inner.head_dim)


class ChunkedLatentAttention(_Chunked):
    """A `LatentAttention` (DeepSeek MLA) that also takes chunks of c < seq_len rows of one sequence, in order.

    Its cache is the latent: each token's ``kv_a`` row (kv_lora_rank +
    qk_rope_head_dim values, the planner's per-token K/V), one sequence of
    them.  A chunk appends its rows, re-expands the latents of the rows it
    attends to through the layer's own ``kv_a_norm`` and ``kv_b`` modules
    (referenced, not owned: their weights stay with their nodes) to per-head
    keys and values, takes its own rows from its ``kv_b`` input, rotates the
    shared RoPE key at each row's position and attends causally.

    Attributes
    ----------
    attention : LatentAttention
    cursor : int
        Tokens of the current sequence already in the latent buffer.
    position : torch.Tensor or None
        See `_Chunked`.
    """

    def __init__(self, attention, key, expand):
        super().__init__(attention, key)
        object.__setattr__(self, "_expand", expand)  # not a submodule: kv_a_norm and kv_b belong to their nodes
        self._latent_buffer = None

    def kv_tensors(self):
        """The latent buffer allocated so far."""
        return [self._latent_buffer] if self._latent_buffer is not None else []

    def forward(self, q, kv_a, kv_b):
        rows, inner = q.shape[0], self.attention
        if rows % self.seq_len == 0:
            self.cursor = 0
            return inner(q, kv_a, kv_b)
        positions, end = self._where(rows, q.device)
        buffer = self._latent_buffer = _buffer(self._latent_buffer, (self.seq_len, kv_a.shape[-1]), kv_a)
        buffer.index_copy_(0, positions, kv_a)
        expanded = self._expand(buffer[:end]).index_copy(0, positions, kv_b)  # the chunk's own rows as given
        attended = torch.arange(end, device=q.device)
        key, value = inner.keys_values(expanded, inner.shared_key(buffer[:end], attended))
        mask = window_mask(positions, end, None, q.device)
        out = F.scaled_dot_product_attention(inner.query(q, positions), key, value, attn_mask=mask)
        return out.transpose(1, 2).reshape(rows, inner.heads * inner.v_dim)


class Sequence(NamedTuple):
    """What `_Chunked` reads of a wrapped attention that is not a cachefit module (an imported model's)."""

    seq_len: int
    causal: bool = True


class ChunkedSdpa(_ChunkedKV):
    """An imported model's ``aten.scaled_dot_product_attention`` call, run on chunks of c < seq_len tokens in order.

    The call of a recognised Hugging Face attention module
    (`cachefit.graphs.torch_import_hf`) in a program exported for one chunk
    (batch 1, c tokens): its query, key and value arrive as the module
    computed them for the chunk (RoPE applied at the chunk's positions; the
    key and value repeated to every query head when the module repeats them
    first).  It keeps the K/V of one sequence: ``kv_heads`` × seq_len ×
    head_dim per tensor (of a repeated key or value, every
    ``heads / kv_heads``-th head: the KV heads themselves), writes the
    chunk's rows at its positions and attends the chunk's queries over rows
    0 .. p + c − 1 with the causal mask (and the sliding window w of a local
    layer), at the call's own ``scale``.  The mask the exported program
    built for a lone chunk is not read.

    Attributes
    ----------
    kv_heads : int
    window : int or None
    cursor, position
        See `_Chunked`.
    """

    def __init__(self, node, input_names, *, seq_len, kv_heads, window, key):
        super().__init__(Sequence(int(seq_len)), key)
        self.args_template, self.kwargs_template = node.args, node.kwargs
        self.input_names = tuple(input_names)
        self.kv_heads, self.window = int(kv_heads), window

    def forward(self, *values):
        from torch.fx.node import map_arg

        lookup = dict(zip(self.input_names, values))
        args = map_arg(self.args_template, lambda n: lookup[n.name])
        kwargs = map_arg(self.kwargs_template, lambda n: lookup[n.name])
        query, key, value = args[:3]
        scale = kwargs.get("scale", args[6] if len(args) > 6 else None)
        if query.shape[0] != 1 or key.shape[1] % self.kv_heads or query.shape[1] % self.kv_heads:
            raise InputError(f"module {self.key!r}: a chunk's query {tuple(query.shape)} and key "
                             f"{tuple(key.shape)} are not one sequence's rows of {self.kv_heads} KV heads")
        stride = key.shape[1] // self.kv_heads  # repeat_kv repeats each KV head `stride` times, consecutively
        positions, end = self._where(query.shape[2], query.device)
        return self._attend(query, key[:, ::stride], value[:, ::stride], positions, end, self.window, scale)


class ChunkPositions(_Chunked):
    """An imported model's position ids for chunks in order: HF's ``arange(c) + past_seen_tokens``.

    Replaces that ``add`` of a program exported for one chunk (where
    ``past_seen_tokens`` is 0): it returns the chunk's positions p .. p + c − 1
    in its sequence, so position embeddings and RoPE continue across chunks.
    """

    def __init__(self, seq_len, key):
        super().__init__(Sequence(int(seq_len)), key)

    def kv_tensors(self):
        """None: positions hold no K/V."""
        return []

    def forward(self, arange):
        positions, _ = self._where(arange.shape[0], arange.device)
        return positions.to(arange.dtype)


_SEQUENCE_MIXERS = (Attention, LatentAttention, _Chunked)


def _attention_sites(steps):
    """(node, container, name, module) of every sequence-mixing module of `steps`."""
    sites = []
    for step in steps:
        module = step.module
        if isinstance(module, (*_SEQUENCE_MIXERS, Pooler)):
            sites.append((step.node, step, "module", module))
        elif isinstance(module, Block):
            for name, inner in module.layers.items():
                if isinstance(inner, _SEQUENCE_MIXERS):
                    sites.append((f"{step.node}.{name}", module.layers, name, inner))
    return sites


def _latent_expander(node, container, by_node):
    """The function re-expanding latent rows to ``kv_b`` rows for latent attention `node`: its layer's
    ``kv_a_norm`` then ``kv_b`` modules (a block's own, or the steps feeding the attention's ``kv_b``: one
    linear, or the tiles of a tiled one and their join)."""
    if isinstance(container, nn.ModuleDict):
        norm, kv_b = container["kv_a_norm"], container["kv_b"]
        return lambda latent: kv_b(norm(latent))
    join = by_node.get(container.inputs[2])
    tiles = [join] if join is not None and isinstance(join.module, Linear) else \
        [by_node.get(name) for name in (join.inputs if join is not None and isinstance(join.module, Join) else ())]
    feeds = {tile.inputs for tile in tiles if tile is not None and isinstance(tile.module, Linear)}
    norm = by_node.get(next(iter(feeds))[0]) if len(feeds) == 1 and len(next(iter(feeds))) == 1 else None
    if not tiles or None in tiles or norm is None or not isinstance(norm.module, Norm):
        raise InputError(f"node {node!r}: latent attention re-expands the earlier chunks' latents through its "
                         f"layer's kv_a_norm and kv_b; {container.inputs[2]!r} is not kv_b (a linear module, or its "
                         "tiles joined) fed by that norm; run whole-sequence chunks")
    if len(tiles) == 1 and tiles[0] is join:
        return lambda latent: join.module(norm.module(latent))
    return lambda latent: join.module(*(tile.module(norm.module(latent)) for tile in tiles))


def enable_chunked_prefill(model):
    """Wrap every attention module of `model` in a `ChunkedAttention` (idempotent), in place.

    Raises
    ------
    InputError
        Naming the first module that cannot be chunked inside a sequence: a
        pooler, a non-causal attention, a latent attention whose kv_b cannot
        be found, or the attention of an imported (torch.fx or torch.export)
        model.
    """
    if model.source != "graph":
        raise imported_refusal(model)
    sites = _attention_sites(model.steps)
    for node, _, _, module in sites:
        if isinstance(module, Pooler):
            raise InputError(f"node {node!r}: a pooler reads each sequence's first row and cannot be chunked "
                             "inside a sequence; run whole-sequence chunks")
    by_node = {step.node: step for step in model.steps}
    for node, container, name, module in sites:
        if isinstance(module, (Attention, LatentAttention)):
            wrapped = (ChunkedAttention(module, node) if isinstance(module, Attention)
                       else ChunkedLatentAttention(module, node, _latent_expander(node, container, by_node)))
            if isinstance(container, nn.ModuleDict):
                container[name] = wrapped
            else:
                setattr(container, name, wrapped)
    model.whole_sequences = False
    logger.info("chunked prefill: %d attention module(s) keep a K/V buffer per sequence", len(sites))
    return model


def imported_attention(graph):
    """(node, module type) of the first attention of an imported graph (`cachefit.graphs.from_torch`), or None.

    An attention is a node whose module type names one (``GPT2Attention``,
    ``LlamaAttention``, ``MultiheadAttention``: the attention module's own
    operations, its core) or whose op does (``scaled_dot_product_attention``).
    """
    for node, data in graph.nodes(data=True):
        kind = str(data.get("module_type", ""))
        if "attention" in kind.lower() or "attention" in str(data.get("op", "")).lower():
            return node, kind or str(data.get("op"))
    return None


def imported_refusal(model, found=None, reason=None):
    """The `InputError` refusing chunks inside a sequence of an imported model, naming its attention module.

    `found` is (module, module type), default `imported_attention`'s;
    `reason` says why it cannot be chunked (default: an imported model's
    attention runs as its own traced operations over whole samples).
    """
    found = found or imported_attention(model.graph)
    whole = "run whole-sequence chunks (whole samples of dimension 0)"
    if found is None:
        return InputError(f"an imported ({model.source}) model's chunks are whole samples of dimension 0; a chunk "
                          f"inside a sample cannot run: {whole}")
    node, kind = found
    reason = reason or ("it runs as the module's own traced operations over whole samples of dimension 0, with no "
                        "K/V buffer for the earlier chunks' keys and values and no position offset")
    return InputError(f"module {node!r} ({kind}): the attention of an imported ({model.source}) model cannot be "
                      f"chunked inside a sequence: {reason}; {whole}")


def kv_buffers(steps):
    """The K/V buffers the chunked attention modules of `steps` have allocated (key and value each)."""
    return [buffer for _, _, _, module in _attention_sites(steps)
            if isinstance(module, _Chunked) for buffer in module.kv_tensors()]


def replay_positions(model, enable=True):
    """Give every chunked attention of `model` one shared position tensor (returned), or take it away.

    With `enable`, a 0-d int64 tensor on the model's device (0) that every
    `ChunkedAttention` and `ChunkedLatentAttention` reads its chunk's first
    position from (see `_Chunked`): a schedule that replays one captured
    chunk graph per chunk fills it before each replay.  None when the model
    has no chunked attention.  With `enable` False, every module goes back
    to its Python cursor (at 0) and None is returned.
    """
    modules = [module for *_, module in _attention_sites(model.steps) if isinstance(module, _Chunked)]
    position = torch.zeros((), dtype=torch.int64, device=model.device) if enable and modules else None
    for module in modules:
        module.position, module.cursor = position, 0
    return position


def reset_chunked(model):
    """Put every chunked attention of `model` back at the start of a sequence (cursor 0)."""
    for _, _, _, module in _attention_sites(model.steps):
        if isinstance(module, _Chunked):
            module.cursor = 0


def release_chunked(model):
    """Drop the K/V (or latent) buffers every chunked attention of `model` allocated, back at cursor 0.

    A run calls it when it ends, so a model kept after `run` holds no
    sequence's keys and values (on CUDA: no device memory); the next chunk
    allocates them again.
    """
    for _, _, _, module in _attention_sites(model.steps):
        if isinstance(module, _Chunked):
            module.cursor = 0
            for name in ("_key_buffer", "_value_buffer", "_latent_buffer"):
                if getattr(module, name, None) is not None:
                    setattr(module, name, None)


def plan_chunk_tokens(plan, model):
    """The chunk the plan was made for: chunk_fraction × batch × seq_len tokens (nearest integer)."""
    from ..graphs.kv import chunk_tokens

    return chunk_tokens(plan.chunk_fraction, model.tokens)


def prepare_chunks(plan, model, chunk_tokens, micro_batches):
    """(chunk_tokens, micro_batches, notes) for a run, enabling chunked prefill where the chunk needs it.

    With neither given, the run streams the plan's chunk (`plan_chunk_tokens`)
    when it divides the pass; a chunk inside a sequence that the model cannot
    run falls back to the whole pass, said in a note naming the module.  A
    chunk asked for explicitly that the model cannot run is refused.

    Raises
    ------
    InputError
        An explicit chunk inside a sequence that does not divide seq_len, or
        that a module cannot run (naming it, see `enable_chunked_prefill`).
    """
    by_default = chunk_tokens is None and micro_batches is None
    if model.source != "graph":
        return _imported_chunks(plan, model, chunk_tokens, micro_batches, by_default)
    if by_default:
        planned = plan_chunk_tokens(plan, model)
        if planned >= model.tokens or model.tokens % planned or planned % model.tokens_per_row:
            return None, None, []
        chunk_tokens = planned
    asked = chunk_tokens
    if asked is None and _positive(micro_batches) and model.tokens % micro_batches == 0:
        asked = model.tokens // micro_batches
    if not _positive(asked) or model.tokens % asked:
        return chunk_tokens, micro_batches, []  # `check_chunks` refuses what does not cut the pass
    notes = [f"streams the plan's chunk: {asked:,} of {model.tokens:,} tokens per pass"] if by_default else []
    if asked % model.seq_len == 0 or not model.whole_sequences:
        return chunk_tokens, micro_batches, notes
    try:
        if model.seq_len % asked:
            raise InputError(f"`chunk_tokens` {asked} must divide seq_len = {model.seq_len} (a chunk inside a "
                             "sequence never spans two) or be a multiple of it")
        enable_chunked_prefill(model)
    except InputError as refusal:
        if not by_default:
            raise
        return None, None, [f"the plan's chunk of {asked:,} tokens cannot run here ({refusal}); "
                            "streams the whole pass"]
    notes = [f"{notes[0] if notes else f'chunks of {asked:,} tokens'}, inside sequences of {model.seq_len:,} "
             "(chunked prefill: a K/V buffer per attention)"]
    if any(isinstance(module, ChunkedLatentAttention) for *_, module in _attention_sites(model.steps)):
        notes.append("latent attention (MLA) caches each token's kv_a row (kv_lora_rank + qk_rope_head_dim) and "
                     "re-expands the earlier chunks' latents through its layer's kv_a_norm and kv_b every chunk: "
                     "their weights are read again where the attention runs (a group the plan may not count "
                     "them in)")
    return chunk_tokens, micro_batches, notes


def _imported_chunks(plan, model, chunk_tokens, micro_batches, by_default):
    """`prepare_chunks` for an imported model: whole samples, or chunks inside a sequence where it can.

    A chunk inside a sample runs when the import recognised the model's
    attention modules (``model.chunked_prefill``, set by
    `cachefit.executor.export.build_export`; `inside_sequences`).  By default
    the plan's chunk runs when it divides the pass; a plan chunk inside a
    sample that cannot run falls back to the whole pass with a note naming
    the attention module (`imported_refusal`).  An explicit chunk inside a
    sample that cannot run is refused with that message.
    """
    from fractions import Fraction

    if not by_default:
        asked = chunk_tokens
        if asked is None and _positive(micro_batches) and model.tokens % micro_batches == 0:
            asked = model.tokens // micro_batches
        if _positive(asked) and asked % model.tokens_per_row and model.tokens % asked == 0:
            return chunk_tokens, micro_batches, _inside_sequences(model, asked)
        return chunk_tokens, micro_batches, []
    if Fraction(plan.chunk_fraction) * model.tokens < model.tokens_per_row:
        planned = plan_chunk_tokens(plan, model)
        try:
            notes = _inside_sequences(model, planned)
        except InputError as refusal:
            samples = model.tokens // model.tokens_per_row
            return None, None, [f"the plan's chunk (fraction {plan.chunk_fraction:g} of a pass of {samples:,} "
                                f"sample(s)) lies inside a sample and cannot run here ({refusal}); streams the "
                                "whole pass"]
        return planned, None, [f"streams the plan's chunk: {planned:,} of {model.tokens:,} tokens per pass",
                               *notes]
    planned = plan_chunk_tokens(plan, model)
    if planned >= model.tokens or model.tokens % planned or planned % model.tokens_per_row:
        return None, None, []
    return planned, None, [f"streams the plan's chunk: {planned:,} of {model.tokens:,} tokens per pass"]


def _inside_sequences(model, chunk):
    """Rebuild imported `model` for chunks of `chunk` tokens inside its sequences; the notes to show.

    Raises
    ------
    InputError
        The model's attention was not recognised (naming the module), or
        `chunk` does not divide seq_len.
    """
    if model.chunked_prefill is None:
        raise imported_refusal(model)
    seq_len = int(model.graph.graph.get("seq_len") or model.seq_len)  # a static export's model.seq_len is the pass
    if seq_len % chunk:
        raise InputError(f"`chunk_tokens` {chunk} must divide seq_len = {seq_len} (a chunk inside a "
                         "sequence never spans two) or be a multiple of it")
    model.chunked_prefill(chunk)
    return [f"chunks of {chunk:,} tokens inside sequences of {seq_len:,} (chunked prefill of an imported "
            "model: each recognised attention module keeps a K/V buffer per sequence; position ids continue "
            "across chunks)"]


def _positive(value):
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


class PlannedKV(NamedTuple):
    """The plan's chunked-prefill K/V term (`planned_kv`)."""

    per_group: list
    tokens: int
    resident: bool


def planned_kv(plan, groups):
    """The `PlannedKV` of `plan` over its `groups` (plan node ids), or None when it has no K/V term.

    Per group: Σ over its attention nodes of kv_prefix(v) =
    kv_bytes_per_token(v) × the earlier tokens the last chunk attends to
    (`cachefit.graphs.kv.node_prefix_bytes`: s − c, or w − 1 under a sliding
    window w), at the plan's dtype; ``tokens`` is the uncapped s − c;
    ``resident`` when the plan's memory model counts it in S(P) (``+kv``),
    else it is streamed.
    """
    from ..graphs.kv import node_prefix_bytes, prefix_tokens
    from .fingerprint import plan_graph

    graph = plan_graph(plan)
    per_node = node_prefix_bytes(graph, plan.chunk_fraction)
    if not any(per_node.values()):
        return None
    tokens = prefix_tokens(graph.graph.get("seq_len", 1), graph.graph.get("batch", 1), plan.chunk_fraction)
    return PlannedKV([sum(per_node.get(node, 0) for node in group) for group in groups], tokens,
                     plan.memory.endswith("+kv"))


def kv_prefix_note(planned):
    """A note with the planned chunked-prefill K/V per group (a `PlannedKV`), or None when there is none."""
    if planned is None:
        return None
    where = "in S(P), resident" if planned.resident else "streamed, not in S(P)"
    return (f"planned chunked-prefill K/V per group ({where}; {planned.tokens:,} tokens before the last chunk): "
            + ", ".join(f"{value:,} B" for value in planned.per_group))
