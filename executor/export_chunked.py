"""Chunked prefill of an imported Hugging Face model: its program for one chunk, run chunk by chunk (imports torch).

A model imported with ``torch.export`` (`cachefit.executor.export`) runs as
its exported ATen operations, each a step in its plan node's group.  For
chunks of c < seq_len tokens inside a sequence, `rebuild_for_chunks`
exports the same module again for one chunk (batch 1, c token ids) and
groups its operations by the same module runs, so every plan node keeps its
group; three things change:

* the attention: every ``scaled_dot_product_attention`` call of a
  recognised attention module (the import marked its node with
  ``kv_bytes_per_token``, `cachefit.graphs.torch_import_hf`) becomes a
  `cachefit.executor.chunked.ChunkedSdpa`, which keeps that layer's K/V for
  one sequence, appends each chunk's and attends the chunk causally over
  the tokens before it (its sliding window honoured);
* the positions: Hugging Face models compute
  ``position_ids = arange(c) + past_seen_tokens``; that ``add`` (the first
  ``arange(c) + 0`` of the program) becomes a
  `cachefit.executor.chunked.ChunkPositions` returning p .. p + c − 1, so
  position embeddings (GPT-2's ``wpe``) and RoPE (Llama's ``rotary_emb``,
  computed once in the model and passed to every layer) continue across
  chunks;
* the rows: the pass's token ids are kept flat (batch × seq_len), a chunk
  is c consecutive ones inside one sequence, viewed as the (1, c) input the
  program takes; outputs of shape (1, c, ...) are compared with the whole
  model's outputs cut the same way.

The causal mask the program builds for a lone chunk is computed but not
read.  A model whose attention is not recognised (another implementation,
a custom module, a bidirectional encoder), or whose program computes its
positions otherwise, is refused by name; whole-sequence chunks still run.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..errors import InputError
from ..graphs.torch_import_hf import attention_spec, is_sdpa
from .chunked import ChunkedSdpa, ChunkPositions, imported_refusal
from .export import node_groups, program_steps
from .model import Step

__all__ = ["rebuild_for_chunks", "ChunkRows"]

logger = logging.getLogger(__name__)

_UNRECOGNISED = ("it is not a recognised Hugging Face causal self-attention (a transformers attention module with "
                 "config, layer_idx and head_dim whose core is one scaled_dot_product_attention call), so no K/V "
                 "buffer keeps the earlier chunks' keys and values")


class ChunkRows(nn.Module):
    """A chunk's token ids, c rows of the flat pass, as the (1, c) input of the program for one chunk."""

    def __init__(self, chunk):
        super().__init__()
        self.chunk = int(chunk)

    def forward(self, rows):
        if rows.shape[0] != self.chunk:
            raise InputError(f"this imported model runs chunks of {self.chunk} tokens inside a sequence; a call of "
                             f"{rows.shape[0]} tokens (schedule 'batched' runs the whole pass as one chunk) cannot "
                             "run: use partition-major or token-major")
        return rows.view(1, -1)


def _position_add(ep, chunk):
    """The ``add(arange(chunk), 0)`` computing the position ids (HF's ``arange(c) + past_seen_tokens``), or None."""
    aten = torch.ops.aten
    for node in ep.graph.nodes:
        if node.op != "call_function" or getattr(node.target, "overloadpacket", None) is not aten.add:
            continue
        first, second = (node.args + (None, None))[:2]
        if (isinstance(first, torch.fx.Node) and getattr(first.target, "overloadpacket", None) is aten.arange
                and second == 0 and tuple(first.meta["val"].shape) == (chunk,)):
            return node
    return None


def _check_attention_modules(model, covered):
    """Refuse, naming it, a module whose type names an attention and that holds no recognised attention."""
    def related(path):
        return any(path == done or path.startswith(done + ".") or done.startswith(path + ".") for done in covered)

    for node, data in model.graph.nodes(data=True):
        kind, path = str(data.get("module_type", "")), data.get("module", node)
        if "attention" in kind.lower() and not related(path):
            raise imported_refusal(model, (path, kind), _UNRECOGNISED)


def _attention_calls(ep, group_name, model, module, seq_len):
    """exported sdpa node -> its `ChunkedSdpa`; refuses a call outside a recognised attention."""
    replace = {}
    for node in ep.graph.nodes:
        if not is_sdpa(node):
            continue
        data = model.graph.nodes[group_name[node]]
        path = data.get("module", group_name[node])
        spec = attention_spec(module.get_submodule(path)) if data.get("kv_bytes_per_token") else None
        if spec is None:
            raise imported_refusal(model, (path, data.get("module_type", "?")), _UNRECOGNISED)
        replace[node] = ChunkedSdpa(node, [arg.name for arg in node.all_input_nodes], seq_len=seq_len,
                                    kv_heads=spec.kv_heads, window=data.get("sliding_window"), key=path)
    return replace


def _adapt_input(steps, completed, name, chunk):
    """Put a `ChunkRows` step named `name` before the steps reading ``@name``, which then read it."""
    value = f"@{name}"
    group_of = {node: index for index, group in enumerate(completed) for node in group}
    readers = [group_of[step.node] for step in steps if value in step.inputs]
    for step in steps:
        step.inputs = tuple(name if read == value else read for read in step.inputs)
    steps.insert(0, Step(name, ChunkRows(chunk), (value,)))
    completed[min(readers, default=0)].insert(0, name)


def rebuild_for_chunks(model, module, inputs, groups, chunk):
    """Rebuild imported `model` in place for chunks of `chunk` tokens inside its sequences (module docstring).

    Parameters
    ----------
    model : BuiltModel
        From `cachefit.executor.export.build_export`; its graph has
        ``seq_len`` and recognised attention nodes.
    module : torch.nn.Module
        The model's module (already on the device, in eval mode).
    inputs : tuple of torch.Tensor
        The pass's inputs: one tensor of token ids, (batch, seq_len).
    groups : list of list of str
        The plan's groups (plan node ids).
    chunk : int
        Tokens per chunk, dividing seq_len.

    Raises
    ------
    InputError
        Not one input of token ids; the module cannot be exported for one
        chunk or its runs are not the plan's nodes; an attention module that
        is not recognised (named); no HF position ids to continue.
    """
    graph = model.graph
    seq_len = int(graph.graph["seq_len"])
    if len(inputs) != 1 or inputs[0].dim() != 2 or inputs[0].is_floating_point() or inputs[0].shape[1] != seq_len:
        raise InputError(f"chunks inside a sequence of an imported model take one input of token ids, (batch, "
                         f"seq_len = {seq_len}); got {len(inputs)} input(s) of shapes "
                         f"{[tuple(x.shape) for x in inputs]}")
    tokens = inputs[0]
    try:
        ep = torch.export.export(module, (tokens[:1, :chunk],), strict=False)
    except Exception as exc:  # noqa: BLE001 - export raises many kinds
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise InputError(f"`model` cannot be captured by torch.export for one chunk of {chunk} tokens: "
                         f"{type(exc).__name__}: {first}") from None
    try:
        group_name = node_groups(ep, module, graph)
    except InputError as exc:
        raise InputError(f"the program of one {chunk}-token chunk does not split into the plan's module runs: "
                         f"{exc}") from None
    replace = _attention_calls(ep, group_name, model, module, seq_len)
    _check_attention_modules(model, {call.key for call in replace.values()})
    positions = _position_add(ep, chunk)
    if positions is None:
        raise InputError(f"`model` computes no position ids as Hugging Face models do (arange(seq_len) + "
                         f"past_seen_tokens) in its program for one {chunk}-token chunk, so positions cannot "
                         "continue across chunks; run whole-sequence chunks (whole samples of dimension 0)")
    replace[positions] = ChunkPositions(seq_len, group_name.get(positions, positions.name))
    group_index = {node: index for index, group in enumerate(groups) for node in group}
    steps, completed, model_inputs, outputs = program_steps(ep, group_name, group_index, len(groups),
                                                            (tokens.reshape(-1),), replace)
    by_name = {node.name: node for node in ep.graph.nodes}
    for output in outputs:
        shape = tuple(getattr(by_name[output].meta.get("val"), "shape", ()))
        if shape[:2] != (1, chunk):
            raise InputError(f"output {output!r} of the program for one {chunk}-token chunk has shape {shape}; "
                             f"chunks inside a sequence need outputs per token, (1, {chunk}, ...)")
    _adapt_input(steps, completed, next(iter(model_inputs))[1:], chunk)
    whole = model.whole_forward
    model.steps, model.inputs, model.outputs, model.step_groups = steps, model_inputs, outputs, completed
    model.tokens_per_row, model.seq_len, model.whole_sequences = 1, seq_len, False
    model.packed_for, model.group_buffers = (), []
    model.whole_forward = lambda: tuple(out.reshape(-1, chunk, *out.shape[2:]) for out in whole())
    model.chunked_prefill = None  # rebuilt once, for this chunk
    logger.info("chunked prefill of an imported model: %d attention call(s) keep K/V, chunks of %d of %d tokens",
                len(replace) - 1, chunk, seq_len)
    return completed
