"""What a run measured: `RunResult` (`run`), `PipelineResult` (`run_pipeline`), their parts and JSON (no torch).

Every figure says how it was measured (``*_method`` fields), and every
schedule's output carries its equivalence check against the unpartitioned
model, so a JSON file read alone is enough to judge a run.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

from ..result import write_text_atomic
from .schedules import BASELINES, SCHEDULES

__all__ = ["ScheduleResult", "GroupReport", "HeldBytes", "RunResult", "SCHEDULES", "BASELINES", "RESULT_FORMAT",
           "StageReport", "PipelineResult", "PIPELINE_RESULT_FORMAT", "bubble_fraction"]

RESULT_FORMAT = "cachefit.run"
PIPELINE_RESULT_FORMAT = "cachefit.pipeline"

@dataclass(frozen=True)
class ScheduleResult:
    """One schedule's timing and equivalence check.

    Attributes
    ----------
    name : str
        A name in `SCHEDULES`.
    ms_per_pass : float
        Median wall time of one pass (all micro-batches through the whole
        model), milliseconds.
    ms_min, ms_max : float
        Fastest and slowest timed pass.
    tokens_per_s : float
        Tokens per pass / median pass time.
    per_group_ms : tuple of float or None
        Median time of each group (all chunks through it); partition-major only.
    launches_per_pass : int or None
        Kernels (CUDA) or module calls (CPU) per pass; see `launch_method`.
    launch_method : str
    graph_replays_per_pass : int
        CUDA graph launches per pass (0 on CPU and for ``eager``).
    graph_kernel_nodes : int or None
        Kernel nodes in the graphs one pass replays (cuda-bindings), when known.
    max_abs_diff, rel_error : float
        Against the unpartitioned model's output: max |out − ref| and
        ‖out − ref‖₂ / ‖ref‖₂ over all outputs.
    equivalent : bool
        ``torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)`` passed.
    rtol, atol : float
    hbm_floor_ratio : float or None
        ms_per_pass / the run's HBM floor (weight bytes / copy bandwidth).
    l2_windows : int
        Kernel nodes of this schedule's graphs given an L2 access-policy window.
    """

    name: str
    ms_per_pass: float
    ms_min: float
    ms_max: float
    tokens_per_s: float
    per_group_ms: tuple | None
    launches_per_pass: int | None
    launch_method: str
    graph_replays_per_pass: int
    graph_kernel_nodes: int | None
    max_abs_diff: float
    rel_error: float
    equivalent: bool
    rtol: float
    atol: float
    hbm_floor_ratio: float | None
    l2_windows: int = 0


@dataclass(frozen=True)
class HeldBytes:
    """What a group held while one chunk ran through it, in tensor bytes (`cachefit.executor.held`).

    Attributes
    ----------
    weights : int
        The group's parameters.
    kv : int
        The K/V buffers of its attention layers (chunked prefill: one
        sequence of keys and values per layer; 0 for whole-sequence chunks).
    boundary : int
        The chunk's values handed to the group (its store when it starts).
    activations : int
        The most the chunk's store held after any of the group's steps
        (the boundary values included).
    dtype : str
        The dtype whose element sizes the floating tensors are counted in:
        the run's (as allocated) or the plan's.
    """

    weights: int
    kv: int
    boundary: int
    activations: int
    dtype: str

    @property
    def total(self):
        """weights + kv + activations: the group's measured working set for one chunk."""
        return self.weights + self.kv + self.activations


@dataclass(frozen=True)
class GroupReport:
    """A plan group: its planned size and what it held when it ran.

    Attributes
    ----------
    index : int
    nodes : int
        Node count.
    first, last : str
        First and last node id.
    planned_bytes : int
        The plan's size S of the group (under the plan's memory model and
        chunk fraction).
    weight_bytes : int
        Bytes of the group's parameters as allocated (tied tables once, in
        the first group that uses them).
    measured_bytes : int or None
        CUDA: the group's weights + the bytes of the chunk's values live when
        the group starts + the peak of ``torch.cuda.max_memory_allocated``
        above the allocation before it, while one chunk ran through the
        group eagerly.  None on the CPU (not measured).
    planned_kv_bytes : int or None
        The plan's chunked-prefill K/V of the group at the plan's dtype:
        Σ kv_bytes_per_token × the tokens of a sequence before its last
        chunk (in `planned_bytes` under a ``+kv`` memory model, else
        streamed); None when the plan has no such term.
    held : HeldBytes or None
        What the group held for one chunk, counted in tensor bytes as
        allocated (the run's dtype).
    held_at_plan_dtype : HeldBytes or None
        The same tensors counted at the plan's dtype (floating tensors'
        elements × its bytes per element): the figures to compare with
        `planned_bytes` and `planned_kv_bytes`.
    """

    index: int
    nodes: int
    first: str
    last: str
    planned_bytes: int
    weight_bytes: int
    measured_bytes: int | None
    planned_kv_bytes: int | None = None
    held: HeldBytes | None = None
    held_at_plan_dtype: HeldBytes | None = None


@dataclass(frozen=True)
class RunResult:
    """Everything `cachefit.executor.run` measured.

    Attributes
    ----------
    model : str
        The graph's name.
    device, device_name : str
        ``"cpu"``/``"cuda:0"`` and the processor's name.
    dtype : str
        The torch dtype the run computed in.
    chunk_tokens, micro_batches, tokens_per_pass : int
    run_chunk_fraction : float
        chunk_tokens / tokens_per_pass.
    plan : dict
        ``k``, ``solver``, ``status``, ``capacity``, ``memory``,
        ``chunk_fraction`` of the plan that ran.
    groups : tuple of GroupReport
    schedules : tuple of ScheduleResult
        In the order they ran.
    speedups : dict
        ``speedups[s][b]`` = ms of baseline b / ms of schedule s.
    weight_bytes : int
        Parameter bytes of the whole model.
    copy_bandwidth : float
        Bytes/s (read + written) of a measured copy; see `bandwidth_method`.
    bandwidth_method : str
    hbm_floor_ms : float
        weight_bytes / copy_bandwidth: the time to read every weight once.
    replay_overhead_us_per_group : float or None
        CUDA: (partition-major − partition-major-fused) / k, µs; the cost of a
        group boundary (one graph launch) when both ran.
    replay_overhead_us_per_chunk : float or None
        CUDA: (partition-major-replay − partition-major-fused) / (k × micro_batches),
        µs; the cost of replaying a group's one-chunk graph per chunk,
        copies in and out included.
    l2 : dict
        L2 persistence: requested, status, set-aside and window counts.
    timing_method : str
    warmup, iters : int
    estimate : dict or None
        `cachefit.executor.calibration.estimate_record`: per estimated
        schedule, the estimate's and the run's ms per pass and the relative
        error (set by ``cachefit run --json``; None otherwise).
    notes : tuple of str
    machine : dict
    """

    model: str
    device: str
    device_name: str
    dtype: str
    chunk_tokens: int
    micro_batches: int
    tokens_per_pass: int
    run_chunk_fraction: float
    plan: dict
    groups: tuple
    schedules: tuple
    speedups: dict
    weight_bytes: int
    copy_bandwidth: float
    bandwidth_method: str
    hbm_floor_ms: float
    replay_overhead_us_per_group: float | None
    l2: dict
    timing_method: str
    warmup: int
    iters: int
    notes: tuple = ()
    machine: dict = field(default_factory=dict)
    replay_overhead_us_per_chunk: float | None = None
    estimate: dict | None = None

    @property
    def equivalent(self):
        """Every schedule's output passed the equivalence check."""
        return all(schedule.equivalent for schedule in self.schedules)

    def schedule(self, name):
        """The `ScheduleResult` named `name` (KeyError if it did not run)."""
        for schedule in self.schedules:
            if schedule.name == name:
                return schedule
        raise KeyError(name)

    @property
    def best(self):
        """The fastest schedule that passed the equivalence check (None if none did)."""
        passed = [schedule for schedule in self.schedules if schedule.equivalent]
        return min(passed, key=lambda schedule: schedule.ms_per_pass) if passed else None

    def to_dict(self):
        """The JSON object: ``{"format": "cachefit.run", "version": 1, ...}``."""
        data = asdict(self)
        data["equivalent"] = self.equivalent
        data["best"] = self.best.name if self.best else None
        return {"format": RESULT_FORMAT, "version": 1, **data}

    def to_json(self, path=None, *, indent=2):
        """The JSON text; with `path`, also written atomically."""
        text = json.dumps(self.to_dict(), indent=indent, default=str)
        if path is not None:
            write_text_atomic(path, text + "\n")
        return text


# -- pipeline runs (cachefit.executor.pipeline.run_pipeline) -------------------------------------------


def bubble_fraction(stages, microbatches):
    """The idle share of a fill-and-drain pipeline of equal stages: (S − 1) / (M + S − 1).

    GPipe and 1F1B (forward only or with backward) both have it: each stage
    waits S − 1 micro-batch slots out of M + S − 1.

    Examples
    --------
    >>> bubble_fraction(2, 4)
    0.2
    >>> bubble_fraction(1, 8)
    0.0
    """
    return (stages - 1) / (microbatches + stages - 1)


@dataclass(frozen=True)
class StageReport:
    """One stage of a pipeline run.

    Attributes
    ----------
    index : int
    first, last : str
        The stage's first and last plan node.
    nodes : int
    params : int
        Parameters of the stage's module as the runtime built it (a weight
        shared with another stage, such as a tied embedding, counts in both).
    planned_bytes : int
        The plan's size S of the group.
    flops : int
        Σ ``flops`` of the group's nodes (0 where unknown).
    busy_ms : float
        Median over the timed steps of the stage's compute: its module's
        forward over all micro-batches (forward hooks, ``time.perf_counter``;
        on CUDA after a synchronize).
    step_ms : float
        Median time from the common barrier to this stage's end of the step.
    idle_fraction : float
        Median of 1 − busy / makespan of the step: waiting for the previous
        stage, sending, receiving and the schedule's own overhead.
    """

    index: int
    first: str
    last: str
    nodes: int
    params: int
    planned_bytes: int
    flops: int
    busy_ms: float
    step_ms: float
    idle_fraction: float


@dataclass(frozen=True)
class PipelineResult:
    """What `run_pipeline` measured.

    Attributes
    ----------
    schedule : str
        ``"gpipe"`` or ``"1f1b"``.
    microbatches, stages : int
    backend : str
    device : str
        ``"cpu"`` or ``"cuda"`` (one GPU per stage).
    rows : int
        Rows (dimension 0) of one step's inputs; ``tokens`` is rows × tokens per row.
    tokens : int
    makespan_ms, makespan_min_ms, makespan_max_ms : float
        Median, fastest and slowest step: from the barrier before it to the
        last stage's end of it.
    tokens_per_s : float
        tokens / median makespan.
    bubble_theoretical : float
        (S − 1) / (M + S − 1).
    bubble_measured : float
        The mean over stages of their median idle fraction: the bubble plus
        communication and scheduling overhead.
    stage_reports : tuple of StageReport
    equivalent : bool
        ``torch.testing.assert_close(pipelined, single-process, rtol, atol)`` passed.
    max_abs_diff, rel_error, rtol, atol : float
    warmup, iters : int
        Untimed and timed steps.
    wall_s : float
        The whole run: building, starting the processes, tracing, steps.
    notes : tuple of str
    output : torch.Tensor or tuple of torch.Tensor or None
        The pipelined output of the last step (on the CPU; not in the JSON).
    """

    schedule: str
    microbatches: int
    stages: int
    backend: str
    device: str
    rows: int
    tokens: int
    makespan_ms: float
    makespan_min_ms: float
    makespan_max_ms: float
    tokens_per_s: float
    bubble_theoretical: float
    bubble_measured: float
    stage_reports: tuple
    equivalent: bool
    max_abs_diff: float
    rel_error: float
    rtol: float
    atol: float
    warmup: int
    iters: int
    wall_s: float
    notes: tuple = field(default_factory=tuple)
    output: object = field(default=None, compare=False, repr=False)

    @property
    def equivalence_line(self):
        """One line stating the equivalence check and its result."""
        verdict = "PASS" if self.equivalent else "FAIL"
        return (f"equivalence with the single-process model: {verdict} (torch.testing.assert_close, "
                f"rtol={self.rtol:.0e}, atol={self.atol:.1e}; max |Δ| {self.max_abs_diff:.2e}, "
                f"rel {self.rel_error:.1e})")

    def to_dict(self):
        data = {item.name: getattr(self, item.name) for item in fields(self) if item.name != "output"}
        data["stage_reports"] = [asdict(stage) for stage in self.stage_reports]
        data["notes"] = list(self.notes)
        return {"format": PIPELINE_RESULT_FORMAT, "version": 1, **data}

    def to_json(self, path=None):
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            write_text_atomic(path, text + "\n")
        return text
