"""What each group holds while a chunk runs through it, counted in tensor bytes (imports torch).

`measure_held` runs the first chunk of a pass through every group in order
(as partition-major does) and counts, per group, the bytes of real tensors:

weights
    the group's parameters (tied tables once, in the first group using them);
kv
    the K/V buffers its attention layers allocated for chunked prefill
    (`cachefit.executor.chunked.ChunkedAttention`: ``key`` and ``value``,
    each kv_heads × seq_len × head_dim elements for one sequence); 0 when
    chunks hold whole sequences (attention then reads the chunk's own K/V);
boundary
    the chunk's values in its store when the group starts (what earlier
    groups handed over, the model inputs' rows of the chunk included);
activations
    the most the store held after any step of the group (the boundary
    values plus what the group produced, before the values no later group
    reads are dropped).

Boundary and activations leave out tensors that share a parameter's
storage: an imported (torch.export) graph hands its weights from step to
step as values, and they are counted once, among the weights.

Each is counted twice: as allocated (the run's dtype) and at the plan's
dtype (every floating tensor's elements × the plan's bytes per element;
integer tensors as allocated), so a float32 CPU run compares with a bf16
plan term by term.  Tensors sharing storage count once.  The counts are
tensor sizes, not the allocator: temporaries inside one module call (the
attention's scores, for one) are not seen; `measure_group_memory` reads
the CUDA allocator's peak instead.

Measuring leaves no state behind: chunked attention cursors are reset.
"""

from __future__ import annotations

import torch

from ..units import DTYPE_BYTES
from .chunked import kv_buffers, reset_chunked
from .results import HeldBytes
from .runner import chunk_stores

__all__ = ["measure_held", "plan_element_size"]


def plan_element_size(model):
    """Bytes per element of the plan's dtype (the graph's ``dtype``), or None when the graph has none."""
    return DTYPE_BYTES.get(str(model.graph.graph.get("dtype", "")).lower())


def _tensor_bytes(tensors, element):
    """Bytes of the distinct tensors of `tensors`; floating ones at `element` bytes per element when given."""
    seen, total = set(), 0
    for tensor in tensors:
        if not isinstance(tensor, torch.Tensor):
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel(), tensor.dtype)
        if key in seen:
            continue
        seen.add(key)
        size = element if element is not None and tensor.is_floating_point() else tensor.element_size()
        total += tensor.numel() * size
    return total


def _held(parameters, buffers, boundary, peak, element, dtype):
    return HeldBytes(weights=_tensor_bytes(parameters, element), kv=_tensor_bytes(buffers, element),
                     boundary=_tensor_bytes(boundary, element), activations=_tensor_bytes(peak, element),
                     dtype=dtype)


@torch.no_grad()
def measure_held(model, runners, groups, chunk_tokens, micro_batches):
    """Per group, (`HeldBytes` as allocated, `HeldBytes` at the plan's dtype or None) for one chunk.

    `groups` are the runners' groups of step names (for the parameters; a
    parameter already counted in an earlier group is not counted again).
    """
    element = plan_element_size(model)
    weights = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}

    def values(store):
        """The store's tensors that are not parameters (an imported graph hands its weights on as values)."""
        return [value for value in store.values()
                if not (isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() in weights)]

    run_dtype = str(model.dtype).replace("torch.", "")
    plan_dtype = str(model.graph.graph.get("dtype", "")).lower()
    store = chunk_stores(model, chunk_tokens, micro_batches)[0]
    placed, result = set(), []
    reset_chunked(model)
    try:
        for runner, group in zip(runners, groups):
            parameters = [p for p in model.parameters(group) if id(p) not in placed]
            placed.update(id(p) for p in parameters)
            boundary = values(store)
            peak = {"bytes": _tensor_bytes(boundary, None), "values": boundary}

            def after_step(step_values, peak=peak):
                held = values(step_values)
                size = _tensor_bytes(held, None)
                if size > peak["bytes"]:
                    peak.update(bytes=size, values=held)

            runner.run(store, on_step=after_step)
            buffers = kv_buffers(runner.steps)
            result.append((_held(parameters, buffers, boundary, peak["values"], None, run_dtype),
                           None if element is None else
                           _held(parameters, buffers, boundary, peak["values"], element, plan_dtype)))
    finally:
        reset_chunked(model)
    return result
