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
from typing import NamedTuple

import torch

from ..errors import InputError
from .schedules import SCHEDULE_TABLE
from .cuda import count_kernels, kernel_node_count, new_cuda_graph

__all__ = ["GroupRunner", "make_runners", "check_chunks", "chunk_stores", "segments", "Schedule", "CpuSchedule",
           "GraphSchedule", "ReplaySchedule", "EagerSchedule", "make_schedule", "measure_group_memory",
           "compare_outputs", "Comparison", "Launches", "Timing", "TOLERANCES"]

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

    def run(self, values, on_step=None):
        """Run the group on the chunk whose store is `values` (updated in place).

        `on_step`, when given, is called with `values` after every step (before
        the values no later group reads are dropped).
        """
        for step in self.steps:
            values[step.node] = step(values)
            if on_step is not None:
                on_step(values)
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
    tasks = SCHEDULE_TABLE[schedule].tasks if schedule in SCHEDULE_TABLE else None
    if tasks == "group":
        return [[(g, c) for c in range(micro_batches)] for g in range(k)]
    if tasks == "fused":
        return [[(g, c) for g in range(k) for c in range(micro_batches)]]
    if tasks == "chunk":
        return [[(g, c) for g in range(k)] for c in range(micro_batches)]
    if tasks == "batch":
        return [[(g, 0) for g in range(k)]]
    raise InputError(f"no task list for schedule {schedule!r}")  # pragma: no cover


def _outputs(model, stores):
    return {name: torch.cat([store[name] for store in stores], dim=0) if len(stores) > 1
            else stores[0][name] for name in model.outputs}


class Comparison(NamedTuple):
    """An equivalence check of outputs against the reference (`compare_outputs`)."""

    max_abs_diff: float
    rel_error: float
    equivalent: bool
    rtol: float
    atol: float


class Launches(NamedTuple):
    """What one pass of a schedule launches: the count, how it was counted, and graph kernel nodes."""

    per_pass: int | None
    method: str
    graph_kernel_nodes: int | None = None


def compare_outputs(outputs, reference, dtype):
    """The `Comparison` (max_abs_diff, rel_error, equivalent, rtol, atol) of `outputs` against `reference`.

    ``equivalent`` is whether ``torch.testing.assert_close`` passes for every
    output with the dtype's `TOLERANCES` (atol scaled by the reference's RMS).
    """
    rtol, atol_scale = TOLERANCES.get(dtype, TOLERANCES[torch.float32])
    max_abs, num, den, ok, atol_used = 0.0, 0.0, 0.0, True, 0.0
    for name, ref in reference.items():
        out = outputs[name]
        ref64, out64 = ref.detach().double(), out.detach().double()
        if out64.shape != ref64.shape:
            return Comparison(float("inf"), float("inf"), False, rtol, atol_scale)
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
    return Comparison(max_abs, rel, ok, rtol, atol_used)


class Timing(NamedTuple):
    """Median / min / max pass time and per-segment medians, milliseconds."""

    median: float
    min: float
    max: float
    per_segment: list | None

    @classmethod
    def of(cls, totals, per_segment):
        """From the timed passes' totals and, per pass, the time of each segment."""
        columns = ([statistics.median(column) for column in zip(*per_segment)]
                   if per_segment and per_segment[0] else None)
        return cls(statistics.median(totals), min(totals), max(totals), columns)


class Schedule:
    """What `cachefit.executor.run` asks of a schedule; the segment-based ones share this constructor.

    A schedule is made, then ``prepare`` (capture graphs; returns the kernel
    nodes given an L2 window), ``time``, ``outputs``, ``launches`` and
    ``release``, in that order.  ``batched`` (a `ScheduleSpec` with tasks
    ``"batch"``) runs the whole batch as one chunk.

    Attributes
    ----------
    name : str
    spec : ScheduleSpec
        Its entry of `cachefit.executor.schedules.SCHEDULE_TABLE`.
    segments : list of list of (int, int)
        Its tasks cut into segments (`segments`).
    graph_replays : int
        CUDA graph launches per pass (0 without graphs).
    """

    graph_replays = 0
    #: Called with no argument after every pass, warm-up or timed (`cachefit.executor.run` reports
    #: progress with it); None: nothing.
    on_pass = None

    def passed(self):
        """One pass done (outside any timed region)."""
        if self.on_pass is not None:
            self.on_pass()

    def __init__(self, name, model, runners, chunk_tokens, micro_batches):
        self.name, self.spec, self.model, self.runners = name, SCHEDULE_TABLE[name], model, runners
        if self.spec.tasks == "batch":
            chunk_tokens, micro_batches = model.tokens, 1
        self.chunk_tokens, self.micro_batches = chunk_tokens, micro_batches
        self.segments = segments(name, len(runners), micro_batches) if runners is not None else ()
        self.stores = None

    def prepare(self, l2=None, spans=None):
        """Set up before timing; returns the kernel nodes given an L2 window (none by default)."""
        return 0

    def time(self, warmup, iters):  # pragma: no cover - every schedule defines it
        raise NotImplementedError

    def outputs(self):
        """The model outputs of the last pass, whole batch."""
        return _outputs(self.model, self.stores)

    def launches(self):  # pragma: no cover - every schedule defines it
        raise NotImplementedError

    def release(self):
        """Drop what the schedule holds."""
        self.stores = None


class CpuSchedule(Schedule):
    """A schedule run eagerly (the CPU path): tasks in order, timed with ``time.perf_counter``."""

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
            self.passed()
        totals, per_segment = [], []
        for _ in range(iters):
            marks = [time.perf_counter()]
            self._pass(marks)
            self.passed()
            totals.append((marks[-1] - marks[0]) * 1e3)
            per_segment.append([(b - a) * 1e3 for a, b in zip(marks, marks[1:])])
        return Timing.of(totals, per_segment)

    def launches(self):
        """Module calls per pass: one per node per chunk it runs on."""
        calls = sum(len(self.runners[g].steps) for segment in self.segments for g, _ in segment)
        return Launches(calls, "module calls per pass (CPU: one per node per chunk)")


class EagerSchedule(Schedule):
    """The unpartitioned model on the whole batch, no graphs (`BuiltModel.reference`: the user's
    own module for a torch.fx model); its output is the reference."""

    def __init__(self, model):
        super().__init__("eager", model, None, model.tokens, 1)
        self.result = None

    @torch.no_grad()
    def _pass(self):
        self.result = self.model.reference()

    def time(self, warmup, iters):
        device = self.model.device
        for _ in range(warmup):
            self._pass()
            self.passed()
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
            self.passed()
        return Timing.of(totals, None)

    def outputs(self):
        return self.result

    def launches(self):
        if self.model.device.type == "cuda":
            count = count_kernels(self._pass, self.model.device)
            return Launches(count, "torch.profiler: CUDA kernels in one pass")
        return Launches(len(self.model.steps), "module calls per pass (CPU: one per node)")

    def release(self):
        self.result = None


def _warm_up_on_side_stream(device, function):
    """Run `function` on a side stream (what capture needs first) and return its result."""
    torch.cuda.synchronize(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        result = function()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    return result


class _Captured(NamedTuple):
    graphs: list
    windows: int
    kernel_nodes: int | None


def _capture(bodies, l2):
    """Capture each ``(body, span)`` of `bodies` as one CUDA graph, all sharing one memory pool.

    `body` is called inside the capture; `span` is ``(address, bytes)`` of the
    weights to give a persisting-L2 window on the graph's kernel nodes, or
    None.  Graphs that keep their cudaGraph_t are counted and instantiated
    here (after the windows are set).  Returns the graphs, the kernel nodes
    given a window and the graphs' kernel nodes (None when unknown).
    """
    pool, windows, node_counts, graphs = None, 0, [], []
    for body, span in bodies:
        graph, kept = new_cuda_graph()
        with torch.cuda.graph(graph, pool=pool):
            body()
        if pool is None:  # the first graph's pool, shared by the later ones
            pool = graph.pool()
        if kept:
            node_counts.append(kernel_node_count(graph))
            if l2 is not None and span is not None:
                windows += l2.window(graph, *span)
            graph.instantiate()
        graphs.append(graph)
    kernel_nodes = sum(node_counts) if node_counts and None not in node_counts else None
    return _Captured(graphs, windows, kernel_nodes)


def _graph_launches(kernel_nodes, count_pass, device, *, copies=0, profiled="of graph replays"):
    """`Launches` of a graph schedule: exact kernel nodes (cuda-bindings), else torch.profiler's count."""
    if kernel_nodes is not None:
        method = "kernel nodes of the replayed CUDA graphs (cuda-bindings)"
        return Launches(kernel_nodes + copies, method + (" + one copy per static buffer" if copies else ""),
                        kernel_nodes)
    count = count_kernels(count_pass, device)
    if count:
        return Launches(count, f"torch.profiler: CUDA kernels in one pass {profiled}")
    return Launches(None, "not measured (no cuda-bindings, no profiler kernel events)")


class _CudaTimed(Schedule):
    """Timing and read-back shared by the CUDA-graph schedules (they define `replay`)."""

    def __init__(self, name, model, runners, chunk_tokens, micro_batches):
        super().__init__(name, model, runners, chunk_tokens, micro_batches)
        self.graphs, self.kernel_nodes = [], None

    def time(self, warmup, iters):
        for _ in range(warmup):
            self.replay()
            self.passed()
        torch.cuda.synchronize(self.model.device)
        totals, per_segment = [], []
        for _ in range(iters):
            events = [torch.cuda.Event(enable_timing=True) for _ in range(len(self.graphs) + 1)]
            events[0].record()
            self.replay(events)
            events[-1].synchronize()
            self.passed()
            totals.append(events[0].elapsed_time(events[-1]))
            per_segment.append([a.elapsed_time(b) for a, b in zip(events, events[1:])])
        return Timing.of(totals, per_segment)

    def outputs(self):
        torch.cuda.synchronize(self.model.device)
        return super().outputs()

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
        super().__init__(name, model, runners, chunk_tokens, micro_batches)
        self.graph_replays = len(self.segments)

    def _run_segment(self, stores, segment):
        for g, c in segment:
            self.runners[g].run(stores[c])

    @torch.no_grad()
    def prepare(self, l2=None, spans=None):
        """Warm up on a side stream, then capture every segment; returns kernel nodes given an L2 window.

        With `l2` (an entered `L2Persistence`) and `spans` (per group, the
        address and extent of its weight buffer), a segment that holds one
        group's tasks gets that group's window on each of its kernel nodes
        before the graph is instantiated.
        """
        def warm_up():
            warm = chunk_stores(self.model, self.chunk_tokens, self.micro_batches)
            for segment in self.segments:
                self._run_segment(warm, segment)

        _warm_up_on_side_stream(self.model.device, warm_up)
        self.stores = chunk_stores(self.model, self.chunk_tokens, self.micro_batches)
        bodies = []
        for segment in self.segments:
            groups = {g for g, _ in segment}
            span = spans[next(iter(groups))] if spans is not None and len(groups) == 1 else None
            bodies.append((lambda segment=segment: self._run_segment(self.stores, segment), span))
        captured = _capture(bodies, l2)
        self.graphs, self.kernel_nodes = captured.graphs, captured.kernel_nodes
        torch.cuda.synchronize(self.model.device)
        return captured.windows

    def replay(self, events=None):
        for index, graph in enumerate(self.graphs):
            graph.replay()
            if events is not None:
                events[index + 1].record()

    def launches(self):
        """Kernels per pass: the kernel nodes of the replayed graphs (exact, cuda-bindings), else the
        CUDA kernel events torch.profiler records over one pass."""
        return _graph_launches(self.kernel_nodes, self.replay, self.model.device)


class ReplaySchedule(_CudaTimed):
    """partition-major with one-chunk graphs (CUDA): each group captured once for one chunk, through
    static input and output buffers, and replayed once per chunk.

    Per chunk and group: a ``copy_`` into each static input (the values the
    group reads from earlier groups), one graph replay, a ``copy_`` out of
    each static output the later groups need.  The difference to
    ``partition-major`` (the chunk loop inside each group's graph) is the cost
    of replaying per chunk and of those copies.

    Chunks inside a sequence (chunked prefill) also fill one position tensor
    with the chunk's first position before each replay
    (`cachefit.executor.chunked.replay_positions`): the captured attention
    reads it instead of the Python cursor, which a replay never runs.
    """

    def __init__(self, name, model, runners, chunk_tokens, micro_batches):
        super().__init__(name, model, runners, chunk_tokens, micro_batches)
        self.graph_replays = len(runners) * micro_batches
        self.static_in, self.static_out, self.out_store = [], [], None
        self.position = None

    def _at_chunk(self, c):
        """Set chunk c's first position in its sequence, for chunked attention (no-op without it)."""
        if self.position is not None:
            self.position.fill_((c * self.chunk_tokens) % self.model.seq_len)

    def _live_in(self, runner):
        produced = {step.node for step in runner.steps}
        names = []
        for step in runner.steps:
            names.extend(name for name in step.inputs if name not in produced and name not in names)
        return names

    def _produced(self, runner):
        return [step.node for step in runner.steps if step.node in runner.keep]

    def _warm_up(self):
        """Run every chunk through every group eagerly; returns per group its live inputs of chunk 0."""
        warm = chunk_stores(self.model, self.chunk_tokens, self.micro_batches)
        shapes = []
        for runner in self.runners:
            shapes.append({name: warm[0][name] for name in self._live_in(runner)})
            for c, store in enumerate(warm):
                self._at_chunk(c)
                runner.run(store)
        # real chunk-0 values, not empty buffers: token ids must be valid indices when the warm-up runs
        static_in = [{name: value.clone() for name, value in inputs.items()} for inputs in shapes]
        self._at_chunk(0)
        for runner, inputs in zip(self.runners, static_in):  # warm the static-buffer path too
            runner.run(dict(inputs))
        return static_in

    @torch.no_grad()
    def prepare(self, l2=None, spans=None):
        """Warm up (eagerly, partition-major, on a side stream), then capture one one-chunk graph per group."""
        from .chunked import replay_positions

        self.position = replay_positions(self.model)
        self.static_in = _warm_up_on_side_stream(self.model.device, self._warm_up)
        values = [dict(inputs) for inputs in self.static_in]
        bodies = [(lambda runner=runner, store=store: runner.run(store),
                   spans[runner.index] if spans is not None else None)
                  for runner, store in zip(self.runners, values)]
        captured = _capture(bodies, l2)
        self.graphs = captured.graphs
        self.static_out = [{name: store[name] for name in self._produced(runner)}
                           for runner, store in zip(self.runners, values)]
        if captured.kernel_nodes is not None:
            self.kernel_nodes = captured.kernel_nodes * self.micro_batches
        # one output buffer per chunk for every value a later group reads
        self.out_store = [[{name: torch.empty_like(value) for name, value in outs.items()}
                           for outs in self.static_out] for _ in range(self.micro_batches)]
        torch.cuda.synchronize(self.model.device)
        return captured.windows

    def replay(self, events=None):
        self.stores = chunk_stores(self.model, self.chunk_tokens, self.micro_batches)
        for index, (runner, graph) in enumerate(zip(self.runners, self.graphs)):
            live_in = self.static_in[index]
            for c, store in enumerate(self.stores):
                for name, buffer in live_in.items():
                    buffer.copy_(store[name])
                self._at_chunk(c)
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
        copies = self.micro_batches * sum(len(i) + len(o) for i, o in zip(self.static_in, self.static_out))
        return _graph_launches(self.kernel_nodes, self.replay, self.model.device, copies=copies,
                               profiled="(replays and copies)")

    def release(self):
        from .chunked import replay_positions

        self.static_in, self.static_out, self.out_store = [], [], None
        if self.position is not None:
            self.position = replay_positions(self.model, enable=False)
        super().release()


def make_schedule(name, model, runners, chunk_tokens, micro_batches, *, on_cuda=None):
    """The `Schedule` that runs `name`: CUDA graphs when `on_cuda` (default: `model` is on CUDA), else eagerly."""
    spec = SCHEDULE_TABLE[name]
    if spec.tasks == "reference":
        return EagerSchedule(model)
    if not (model.device.type == "cuda" if on_cuda is None else on_cuda):
        return CpuSchedule(name, model, runners, chunk_tokens, micro_batches)
    kind = ReplaySchedule if spec.one_chunk_graphs else GraphSchedule
    return kind(name, model, runners, chunk_tokens, micro_batches)


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
    from .chunked import reset_chunked

    device = model.device
    store = chunk_stores(model, chunk_tokens, micro_batches)[0]
    measured = []
    reset_chunked(model)
    for runner in runners:
        live = _tensor_bytes(store.values())
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        runner.run(store)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        measured.append(weight_bytes[runner.index] + live + max(peak, 0))
    reset_chunked(model)  # the chunk moved chunked attention's cursors
    return measured
