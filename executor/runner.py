"""Group runners and schedules: how the chunks of one pass go through a plan's groups (imports torch).

Vocabulary
----------
chunk
    ``chunk_tokens`` consecutive tokens of the pass (whole sequences when the
    model has attention: a micro-batch of sequences); a pass is
    ``micro_batches`` chunks.  Each chunk has its own *store*, a dict of the
    values (activations) that are live between groups.
task
    ``(g, c)``: group g runs chunk c, reading its inputs from store c and
    leaving there what later groups need.
segment
    A run of consecutive tasks captured as one CUDA graph.

Schedules (tasks, segments)
---------------------------
``partition-major``
    for g: for c: (g, c); one segment (one CUDA graph) per group: every chunk
    passes through the group while its weights stay resident; outputs are
    handed to the next group through the stores.
``partition-major-fused``
    the same tasks as one segment: one graph for the whole pass (CUDA only;
    the difference to partition-major is the cost of the group boundaries).
``partition-major-replay``
    the same task order, but each group's graph holds one chunk and is
    replayed once per chunk through static input/output buffers, with a copy
    in and out per chunk (CUDA only; `ReplaySchedule`).
``token-major``
    for c: for g: (g, c); one segment per chunk: each chunk through the
    whole model.
``batched``
    all chunks merged into one: for g: (g, 0) over the whole batch, one segment.
``eager``
    the unpartitioned model on the whole batch, step by step, no graphs
    (`BuiltModel.forward`); its output is the reference.

On the CPU every schedule runs eagerly, task by task.  On CUDA each segment
is warmed up eagerly on a side stream, captured once as a CUDA graph and
replayed every pass; the graphs of one schedule share a memory pool and
replay in capture order.
"""

from __future__ import annotations

import logging
import statistics
import time

import torch

from ..errors import InputError
from .cuda import count_kernels, kernel_node_count, new_cuda_graph

__all__ = ["GroupRunner", "make_runners", "check_chunks", "chunk_stores", "segments", "CpuSchedule",
           "GraphSchedule", "ReplaySchedule", "EagerSchedule", "measure_group_memory", "compare_outputs", "TOLERANCES"]

logger = logging.getLogger(__name__)

#: (rtol, atol / rms of the reference) of the equivalence check per compute dtype.
TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (3e-2, 3e-2), torch.float16: (1e-2, 1e-2)}


class GroupRunner:
    """The steps of one plan group, run on one chunk's store at a time.

    Attributes
    ----------
    index : int
    steps : list of Step
        The group's nodes, in the graph's node order.
    keep : frozenset of str
        Value ids a store still needs after this group (read by a later group,
        or a model output); everything else is dropped after the group ran.
    """

    def __init__(self, index, steps, keep):
        self.index, self.steps, self.keep = index, list(steps), frozenset(keep)

    def run(self, values):
        """Run the group on the chunk whose store is `values` (updated in place)."""
        for step in self.steps:
            values[step.node] = step(values)
        for name in [name for name in values if name not in self.keep]:
            del values[name]

    def __repr__(self):
        return f"GroupRunner({self.index}, {len(self.steps)} steps)"


def make_runners(model, groups):
    """One `GroupRunner` per group of node ids (in execution order)."""
    by_node = {step.node: step for step in model.steps}
    group_of = {node: index for index, group in enumerate(groups) for node in group}
    last_group = {}
    for step in model.steps:
        for name in step.inputs:
            last_group[name] = max(last_group.get(name, -1), group_of[step.node])
    runners = []
    for index, group in enumerate(groups):
        keep = {name for name, last in last_group.items() if last > index}
        keep.update(model.outputs)
        runners.append(GroupRunner(index, [by_node[node] for node in group], keep))
    return runners


def check_chunks(model, chunk_tokens, micro_batches):
    """Validate and complete (`chunk_tokens`, `micro_batches`) for `model`.

    Either may be None (derived from the other); together they must cover the
    pass exactly: chunk_tokens × micro_batches = batch × seq_len.  A model with
    attention or a pooler needs whole sequences per chunk.
    """
    tokens = model.tokens
    for name, value in (("chunk_tokens", chunk_tokens), ("micro_batches", micro_batches)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InputError(f"`{name}` must be a positive integer, got {value!r}")
    if chunk_tokens is None and micro_batches is None:
        micro_batches = 1
    if chunk_tokens is None:
        if tokens % micro_batches:
            raise InputError(f"`micro_batches` must divide the tokens of one pass, batch × seq_len = "
                             f"{tokens}, got {micro_batches}")
        chunk_tokens = tokens // micro_batches
    if micro_batches is None:
        if tokens % chunk_tokens:
            raise InputError(f"`chunk_tokens` must divide the tokens of one pass, batch × seq_len = "
                             f"{tokens}, got {chunk_tokens}")
        micro_batches = tokens // chunk_tokens
    if chunk_tokens * micro_batches != tokens:
        raise InputError(f"`chunk_tokens` × `micro_batches` must equal the tokens of one pass, batch × "
                         f"seq_len = {tokens}, got {chunk_tokens} × {micro_batches} = "
                         f"{chunk_tokens * micro_batches}")
    if model.whole_sequences and chunk_tokens % model.seq_len:
        raise InputError(f"`chunk_tokens` must be a multiple of seq_len = {model.seq_len}: attention needs "
                         f"whole sequences, so chunks are micro-batches of sequences; got {chunk_tokens}")
    if chunk_tokens % model.tokens_per_row:
        raise InputError(f"`chunk_tokens` must be a multiple of {model.tokens_per_row} (the tokens of one "
                         f"sample of the model input), got {chunk_tokens}")
    return chunk_tokens, micro_batches


def chunk_stores(model, chunk_tokens, micro_batches):
    """One store per chunk, holding views of the model inputs' rows of that chunk."""
    rows = chunk_tokens // model.tokens_per_row
    return [{name: tensor.narrow(0, index * rows, rows) for name, tensor in model.inputs.items()}
            for index in range(micro_batches)]


def segments(schedule, k, micro_batches):
    """The tasks of `schedule` cut into segments (see the module docstring).

    Examples
    --------
    >>> segments("partition-major", 2, 3)
    [[(0, 0), (0, 1), (0, 2)], [(1, 0), (1, 1), (1, 2)]]
    >>> segments("token-major", 2, 2)
    [[(0, 0), (1, 0)], [(0, 1), (1, 1)]]
    >>> segments("batched", 3, 1)
    [[(0, 0), (1, 0), (2, 0)]]
    """
    if schedule in ("partition-major", "partition-major-replay"):
        return [[(g, c) for c in range(micro_batches)] for g in range(k)]
    if schedule == "partition-major-fused":
        return [[(g, c) for g in range(k) for c in range(micro_batches)]]
    if schedule == "token-major":
        return [[(g, c) for g in range(k)] for c in range(micro_batches)]
    if schedule == "batched":
        return [[(g, 0) for g in range(k)]]
    raise InputError(f"no task list for schedule {schedule!r}")  # pragma: no cover


def _outputs(model, stores):
    return {name: torch.cat([store[name] for store in stores], dim=0) if len(stores) > 1
            else stores[0][name] for name in model.outputs}


def compare_outputs(outputs, reference, dtype):
    """(max_abs_diff, rel_error, equivalent, rtol, atol) of `outputs` against `reference`.

    ``equivalent`` is whether ``torch.testing.assert_close`` passes for every
    output with the dtype's `TOLERANCES` (atol scaled by the reference's RMS).
    """
    rtol, atol_scale = TOLERANCES.get(dtype, TOLERANCES[torch.float32])
    max_abs, num, den, ok, atol_used = 0.0, 0.0, 0.0, True, 0.0
    for name, ref in reference.items():
        out = outputs[name]
        ref64, out64 = ref.detach().double(), out.detach().double()
        if out64.shape != ref64.shape:
            return float("inf"), float("inf"), False, rtol, atol_scale
        diff = (out64 - ref64)
        max_abs = max(max_abs, float(diff.abs().max()) if diff.numel() else 0.0)
        num += float(diff.pow(2).sum())
        den += float(ref64.pow(2).sum())
        rms = float(ref64.pow(2).mean().sqrt()) if ref64.numel() else 0.0
        atol = atol_scale * max(rms, 1e-6)
        atol_used = max(atol_used, atol)
        try:
            torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
        except AssertionError:
            ok = False
    rel = (num ** 0.5) / (den ** 0.5) if den > 0 else (0.0 if num == 0 else float("inf"))
    if not (max_abs == max_abs):  # NaN never passes
        ok = False
    return max_abs, rel, ok, rtol, atol_used


class _Timing:
    """Median / min / max pass time and per-segment medians, milliseconds."""

    def __init__(self, totals, per_segment):
        self.median = statistics.median(totals)
        self.min, self.max = min(totals), max(totals)
        self.per_segment = ([statistics.median(column) for column in zip(*per_segment)]
                            if per_segment and per_segment[0] else None)


def _segment(schedule, name, model, runners, chunk_tokens, micro_batches):
    """Set what every segment-based schedule holds (``batched`` runs the whole batch as one chunk)."""
    schedule.name, schedule.model, schedule.runners = name, model, runners
    if name == "batched":
        schedule.chunk_tokens, schedule.micro_batches = model.tokens, 1
    else:
        schedule.chunk_tokens, schedule.micro_batches = chunk_tokens, micro_batches
    schedule.segments = segments(name, len(runners), schedule.micro_batches)


class CpuSchedule:
    """A schedule run eagerly (the CPU path): tasks in order, timed with ``time.perf_counter``."""

    graph_replays = 0

    def __init__(self, name, model, runners, chunk_tokens, micro_batches):
        _segment(self, name, model, runners, chunk_tokens, micro_batches)
        self.stores = None

    def prepare(self, l2=None, spans=None):
        """Nothing to capture on the CPU."""
        return 0

    @torch.no_grad()
    def _pass(self, marks=None):
        self.stores = chunk_stores(self.model, self.chunk_tokens, self.micro_batches)
        for segment in self.segments:
            for g, c in segment:
                self.runners[g].run(self.stores[c])
            if marks is not None:
                marks.append(time.perf_counter())

    def time(self, warmup, iters):
        for _ in range(warmup):
            self._pass()
        totals, per_segment = [], []
        for _ in range(iters):
            marks = [time.perf_counter()]
            self._pass(marks)
            totals.append((marks[-1] - marks[0]) * 1e3)
            per_segment.append([(b - a) * 1e3 for a, b in zip(marks, marks[1:])])
        return _Timing(totals, per_segment)

    def outputs(self):
        return _outputs(self.model, self.stores)

    def launches(self):
        """Module calls per pass: one per node per chunk it runs on."""
        calls = sum(len(self.runners[g].steps) for segment in self.segments for g, _ in segment)
        return calls, "module calls per pass (CPU: one per node per chunk)", None

    def release(self):
        self.stores = None


class EagerSchedule:
    """The unpartitioned model on the whole batch, no graphs (`BuiltModel.reference`: the user's
    own module for a torch.fx model); its output is the reference."""

    graph_replays = 0
    segments = ()

    def __init__(self, model):
        self.model = model
        self.result = None

    def prepare(self, l2=None, spans=None):
        return 0

    @torch.no_grad()
    def _pass(self):
        self.result = self.model.reference()

    def time(self, warmup, iters):
        device = self.model.device
        for _ in range(warmup):
            self._pass()
        totals = []
        for _ in range(iters):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                self._pass()
                end.record()
                end.synchronize()
                totals.append(start.elapsed_time(end))
            else:
                started = time.perf_counter()
                self._pass()
                totals.append((time.perf_counter() - started) * 1e3)
        return _Timing(totals, None)

    def outputs(self):
        return self.result

    def launches(self):
        if self.model.device.type == "cuda":
            count = count_kernels(self._pass, self.model.device)
            return count, "torch.profiler: CUDA kernels in one pass", None
        return len(self.model.steps), "module calls per pass (CPU: one per node)", None

    def release(self):
        self.result = None


class _CudaTimed:
    """Timing and read-back shared by the CUDA-graph schedules (they define `replay` and `graphs`)."""

    def time(self, warmup, iters):
        for _ in range(warmup):
            self.replay()
        torch.cuda.synchronize(self.model.device)
        totals, per_segment = [], []
        for _ in range(iters):
            events = [torch.cuda.Event(enable_timing=True) for _ in range(len(self.graphs) + 1)]
            events[0].record()
            self.replay(events)
            events[-1].synchronize()
            totals.append(events[0].elapsed_time(events[-1]))
            per_segment.append([a.elapsed_time(b) for a, b in zip(events, events[1:])])
        return _Timing(totals, per_segment)

    def outputs(self):
        torch.cuda.synchronize(self.model.device)
        return _outputs(self.model, self.stores)

    def release(self):
        """Reset the captured graphs and give their memory pool back."""
        for graph in self.graphs:
            try:
                graph.reset()
            except Exception:  # noqa: BLE001 - best effort before freeing the pool
                pass
        self.graphs, self.stores = [], None
        torch.cuda.synchronize(self.model.device)
        torch.cuda.empty_cache()


class GraphSchedule(_CudaTimed):
    """A schedule on CUDA: each segment captured once as a CUDA graph and replayed per pass."""

    def __init__(self, name, model, runners, chunk_tokens, micro_batches):
        _segment(self, name, model, runners, chunk_tokens, micro_batches)
        self.graphs, self.stores, self.kernel_nodes = [], None, None
        self.graph_replays = len(self.segments)

    @torch.no_grad()
    def prepare(self, l2=None, spans=None):
        """Warm up on a side stream, then capture every segment; returns kernel nodes given an L2 window.

        With `l2` (an entered `L2Persistence`) and `spans` (per group, the
        address and extent of its weight buffer), a segment that holds one
        group's tasks gets that group's window on each of its kernel nodes
        before the graph is instantiated.
        """
        device = self.model.device
        torch.cuda.synchronize(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            warm = chunk_stores(self.model, self.chunk_tokens, self.micro_batches)
            for segment in self.segments:
                for g, c in segment:
                    self.runners[g].run(warm[c])
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.synchronize(device)
        del warm
        self.stores = chunk_stores(self.model, self.chunk_tokens, self.micro_batches)
        pool, windows, node_counts = None, 0, []
        for segment in self.segments:
            graph, kept = new_cuda_graph()
            with torch.cuda.graph(graph, pool=pool):
                for g, c in segment:
                    self.runners[g].run(self.stores[c])
            if pool is None:  # the first graph's pool, shared by the later ones
                pool = graph.pool()
            groups = {g for g, _ in segment}
            if kept:
                node_counts.append(kernel_node_count(graph))
                if l2 is not None and spans is not None and len(groups) == 1:
                    base, extent = spans[next(iter(groups))]
                    windows += l2.window(graph, base, extent)
                graph.instantiate()
            self.graphs.append(graph)
        if node_counts and None not in node_counts:
            self.kernel_nodes = sum(node_counts)
        torch.cuda.synchronize(device)
        return windows

    def replay(self, events=None):
        for index, graph in enumerate(self.graphs):
            graph.replay()
            if events is not None:
                events[index + 1].record()

    def launches(self):
        """Kernels per pass: the kernel nodes of the replayed graphs (exact, cuda-bindings), else the
        CUDA kernel events torch.profiler records over one pass."""
        if self.kernel_nodes is not None:
            return self.kernel_nodes, "kernel nodes of the replayed CUDA graphs (cuda-bindings)", self.kernel_nodes
        count = count_kernels(self.replay, self.model.device)
        if count:
            return count, "torch.profiler: CUDA kernels in one pass of graph replays", None
        return None, "not measured (no cuda-bindings, no profiler kernel events)", None



class ReplaySchedule(_CudaTimed):
    """partition-major with one-chunk graphs (CUDA): each group captured once for one chunk, through
    static input and output buffers, and replayed once per chunk.

    Per chunk and group: a ``copy_`` into each static input (the values the
    group reads from earlier groups), one graph replay, a ``copy_`` out of
    each static output the later groups need.  The difference to
    ``partition-major`` (the chunk loop inside each group's graph) is the cost
    of replaying per chunk and of those copies.
    """

    def __init__(self, name, model, runners, chunk_tokens, micro_batches):
        self.name, self.model, self.runners = name, model, runners
        self.chunk_tokens, self.micro_batches = chunk_tokens, micro_batches
        self.graphs, self.stores, self.kernel_nodes = [], None, None
        self.graph_replays = len(runners) * micro_batches
        self.static_in, self.static_out, self.out_store = [], [], None

    def _live_in(self, runner):
        produced = {step.node for step in runner.steps}
        names = []
        for step in runner.steps:
            names.extend(name for name in step.inputs if name not in produced and name not in names)
        return names

    def _produced(self, runner):
        return [step.node for step in runner.steps if step.node in runner.keep]

    @torch.no_grad()
    def prepare(self, l2=None, spans=None):
        """Warm up (eagerly, partition-major, on a side stream), then capture one one-chunk graph per group."""
        device = self.model.device
        torch.cuda.synchronize(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        shapes = []
        with torch.cuda.stream(side):
            warm = chunk_stores(self.model, self.chunk_tokens, self.micro_batches)
            for runner in self.runners:
                shapes.append({name: warm[0][name] for name in self._live_in(runner)})
                for store in warm:
                    runner.run(store)
            # real chunk-0 values, not empty buffers: token ids must be valid indices when the warm-up runs
            static_in = [{name: value.clone() for name, value in inputs.items()} for inputs in shapes]
            for runner, inputs in zip(self.runners, static_in):  # warm the static-buffer path too
                values = dict(inputs)
                runner.run(values)
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.synchronize(device)
        del warm, values
        pool, windows, node_counts = None, 0, []
        for runner, inputs in zip(self.runners, static_in):
            graph, kept = new_cuda_graph()
            values = dict(inputs)
            with torch.cuda.graph(graph, pool=pool):
                runner.run(values)
            if pool is None:
                pool = graph.pool()
            self.static_in.append(inputs)
            self.static_out.append({name: values[name] for name in self._produced(runner)})
            if kept:
                node_counts.append(kernel_node_count(graph))
                if l2 is not None and spans is not None:
                    windows += l2.window(graph, *spans[runner.index])
                graph.instantiate()
            self.graphs.append(graph)
        if node_counts and None not in node_counts:
            self.kernel_nodes = sum(node_counts) * self.micro_batches
        # one output buffer per chunk for every value a later group reads
        self.out_store = [[{name: torch.empty_like(value) for name, value in outs.items()}
                           for outs in self.static_out] for _ in range(self.micro_batches)]
        torch.cuda.synchronize(device)
        return windows

    def replay(self, events=None):
        self.stores = chunk_stores(self.model, self.chunk_tokens, self.micro_batches)
        for index, (runner, graph) in enumerate(zip(self.runners, self.graphs)):
            live_in = self.static_in[index]
            for c, store in enumerate(self.stores):
                for name, buffer in live_in.items():
                    buffer.copy_(store[name])
                graph.replay()
                for name, buffer in self.out_store[c][index].items():
                    buffer.copy_(self.static_out[index][name])
                    store[name] = buffer
                for name in [name for name in store if name not in runner.keep]:
                    del store[name]
            if events is not None:
                events[index + 1].record()

    def launches(self):
        """Kernels per pass: graph kernel nodes × chunks plus one copy kernel per static buffer per
        chunk (exact, cuda-bindings), else torch.profiler's CUDA kernel events over one pass."""
        if self.kernel_nodes is not None:
            copies = self.micro_batches * sum(len(i) + len(o) for i, o in zip(self.static_in, self.static_out))
            return (self.kernel_nodes + copies,
                    "kernel nodes of the replayed CUDA graphs (cuda-bindings) + one copy per static buffer",
                    self.kernel_nodes)
        count = count_kernels(self.replay, self.model.device)
        if count:
            return count, "torch.profiler: CUDA kernels in one pass (replays and copies)", None
        return None, "not measured (no cuda-bindings, no profiler kernel events)", None

    def release(self):
        self.static_in, self.static_out, self.out_store = [], [], None
        super().release()


def _tensor_bytes(values):
    seen, total = set(), 0
    for value in values:
        if isinstance(value, torch.Tensor):
            key = (value.untyped_storage().data_ptr(), value.storage_offset(), value.numel())
            if key not in seen:
                seen.add(key)
                total += value.numel() * value.element_size()
    return total


@torch.no_grad()
def measure_group_memory(model, runners, chunk_tokens, micro_batches, weight_bytes):
    """Per group, the bytes it held while one chunk ran through it eagerly (CUDA).

    weights + the chunk's live values at the group's start + the peak of
    ``max_memory_allocated`` above the allocation before the group ran.
    """
    device = model.device
    store = chunk_stores(model, chunk_tokens, micro_batches)[0]
    measured = []
    for runner in runners:
        live = _tensor_bytes(store.values())
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        runner.run(store)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        measured.append(weight_bytes[runner.index] + live + max(peak, 0))
    return measured
