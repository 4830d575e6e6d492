"""`run`: execute a plan group by group, chunk by chunk, against its baselines (imports torch)."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch

from ..errors import InputError
from ..progress import task
from ..units import DTYPE_BYTES
from .chunked import kv_prefix_note, planned_kv, prepare_chunks, release_chunked
from .fingerprint import check_plan_groups, check_same_graph, plan_graph
from .model import BuiltModel, build, pack_group_weights
from .results import GroupReport, RunResult, ScheduleResult
from .runner import check_chunks, compare_outputs, make_runners, make_schedule, measure_group_memory
from .schedules import BASELINES, SCHEDULE_TABLE, SCHEDULES
from .verify import verify_module_bytes, verify_plan

__all__ = ["run", "resolve_schedules"]

logger = logging.getLogger(__name__)

def resolve_schedules(schedule, device):
    """The schedule names `schedule` stands for, in the order they run.

    ``"all"`` is every schedule of `SCHEDULE_TABLE` that applies: on the CPU
    the ``cuda_only`` ones (``partition-major-fused`` and
    ``partition-major-replay``) are left out (without graphs they are
    partition-major).  A list or tuple of names is accepted too.

    Examples
    --------
    >>> resolve_schedules("all", "cpu")
    ['eager', 'batched', 'token-major', 'partition-major']
    >>> resolve_schedules(["partition-major", "batched"], "cuda")
    ['batched', 'partition-major']
    """
    device = torch.device(device)
    if schedule == "all":
        names = [name for name, spec in SCHEDULE_TABLE.items() if device.type == "cuda" or not spec.cuda_only]
    else:
        names = [schedule] if isinstance(schedule, str) else list(schedule)
        for name in names:
            if name not in SCHEDULES:
                raise InputError(f"`schedule` must be 'all' or one of {', '.join(SCHEDULES)}, got {name!r}")
        names = [name for name in SCHEDULE_TABLE if name in names]
    return names


def _is_cuda(device):
    """Whether the run takes the CUDA path (graphs, events, memory counters) on `device`."""
    return device.type == "cuda"


def _machine(on_cuda):
    """`cachefit.machine.machine_info`, torch's version and, on CUDA, the GPU's keys."""
    from ..machine import gpu_info, machine_info

    info = machine_info()
    info["torch"] = torch.__version__
    if on_cuda:
        info.update(gpu_info())
    return info


def _resolve_model(plan, model, groups, *, device, dtype, seed, example_inputs):
    """(BuiltModel, groups) for `plan`; a model made from another graph is refused before anything runs."""
    if model is None:
        return build(plan.graph, plan, seed=seed, dtype=dtype, device=device), groups
    if isinstance(model, BuiltModel):
        check_same_graph(plan, model.fingerprint, "`model`")
        if device is not None and torch.device(device).type != model.device.type:
            raise InputError(f"`device` {str(device)!r} differs from the model's device "
                             f"{str(model.device)!r}; build the model on the device to run on")
        return model, groups
    if isinstance(model, torch.nn.Module) and plan.graph.graph.get("source") == "torch.export":
        from .export import build_export
        return build_export(plan.graph, model, example_inputs, groups=groups, device=device, dtype=dtype)
    if isinstance(model, torch.nn.Module):
        from .fx import build_fx
        return build_fx(plan.graph, model, example_inputs, groups=groups, device=device, dtype=dtype)
    raise InputError(f"`model` must be None, a BuiltModel (cachefit.executor.build) or a torch.nn.Module, "
                     f"got {type(model).__name__}")


def run(plan, model=None, *, device=None, chunk_tokens=None, micro_batches=None,
        schedule="partition-major", l2_persist=False, seed=0, dtype=None, warmup=None, iters=None,
        example_inputs=None, progress=None, stage=None):
    """Run `plan` group by group over the chunks of one pass, check it and time it.

    Parameters
    ----------
    plan : cachefit.Plan or cachefit.deploy.Deployment
        A plan with groups (OPTIMAL or FEASIBLE) that carries its graph; or a
        two-level plan, of which stage `stage` runs (`cachefit.executor.stage`).
    model : BuiltModel or torch.nn.Module, optional
        None: built from ``plan.graph`` (`build`, seeded random weights).  A
        `BuiltModel` must come from the plan's graph (same
        `graph_fingerprint`).  A ``torch.nn.Module`` is the user's own model
        for a plan over its torch.fx graph (see `cachefit.executor.fx`); it
        needs `example_inputs`.
    device : {"cpu", "cuda"}, optional
        Default: the device of `model` when it is a `BuiltModel`, else the CPU.
    chunk_tokens, micro_batches : int, optional
        The pass (batch × seq_len tokens of the graph) is cut into
        `micro_batches` chunks of `chunk_tokens` tokens; give either or both
        (chunk_tokens × micro_batches must equal batch × seq_len).  Neither:
        the plan's chunk (chunk_fraction × batch × seq_len) when it divides
        the pass, else the whole pass.  A chunk smaller than seq_len (it must
        divide it) runs chunked prefill (`cachefit.executor.chunked`: a K/V
        buffer per attention; on CUDA untested on a GPU); a module that cannot be chunked
        inside a sequence is refused by name.
    schedule : str or sequence of str
        ``"partition-major"`` (default), ``"token-major"``, ``"batched"``,
        ``"eager"``, ``"partition-major-fused"``, ``"partition-major-replay"``
        (the last two CUDA only) or ``"all"``; see `cachefit.executor.runner`.
    l2_persist : bool
        CUDA: set aside persisting L2 and put an access-policy window over
        each group's weights on every kernel node of the group's graph
        (partition-major); ignored on the CPU (said in the notes).
    seed : int
        Weights and inputs.
    dtype : str, optional
        fp32, bf16 or fp16; default the graph's dtype on CUDA, fp32 on CPU.
    warmup, iters : int, optional
        Untimed and timed passes per schedule (default 2 and 10 on the CPU,
        5 and 20 on CUDA).
    example_inputs : torch.Tensor or tuple, optional
        The whole pass's inputs for a ``torch.nn.Module`` model.
    progress : callable, optional
        Called with each `ScheduleResult` as soon as its schedule has run.
        (Every pass is also reported to `cachefit.progress` as task
        ``"run"``; the CLI shows it on a terminal.)
    stage : int, optional
        For a two-level plan (required there): the stage whose on-chip plan
        runs, on one device.  Both levels are checked first; the stage's
        ``stage_input`` activations are seeded random inputs and the
        reference is the stage sub-model run unpartitioned.

    Returns
    -------
    RunResult
        Per schedule: median ms per pass, tokens/s, per-group ms
        (partition-major), launches per pass, equivalence with the
        unpartitioned model (max abs difference, relative error, pass/fail);
        per group: planned size, weight bytes, measured bytes (CUDA); the
        speedups against each baseline, the HBM floor and the L2 status.

    Raises
    ------
    PlanRejected
        `cachefit.check` rejects the plan, or a node's module would hold
        other than its planned ``weight_bytes`` (computed on the meta device;
        both checked before anything is allocated, see
        `cachefit.executor.verify`).
    InputError
        The plan has no groups or does not run in order, the model was built
        from another graph (checked before anything runs), the chunking does
        not cover the pass, or an argument is out of range.

    Notes
    -----
    The unpartitioned model's output on the whole batch (the ``eager``
    schedule) is the reference for every schedule.  Cost: the build
    (O(parameters)), one CUDA graph capture per segment, then ``warmup +
    iters`` passes per schedule.

    Examples
    --------
    >>> import cachefit
    >>> from cachefit.executor import linear_stack
    >>> g = linear_stack(4, 32, batch=4, seq_len=8)
    >>> p = cachefit.plan(g, "5KiB", chunk_fraction=0.25, solver="greedy")
    >>> result = run(p, chunk_tokens=8, micro_batches=4, schedule="all", iters=1)
    >>> [s.name for s in result.schedules], result.equivalent, p.k
    (['eager', 'batched', 'token-major', 'partition-major'], True, 3)
    """
    device = _check_arguments(device, warmup, iters, schedule)
    plan = _one_level(plan, stage, model)
    groups = _verified_groups(plan, model)
    kv_planned = planned_kv(plan, groups)  # over the plan's own groups (an imported model's are completed below)
    if device is None and not isinstance(model, BuiltModel):
        device = torch.device("cpu")
    model, groups = _resolve_model(plan, model, groups, device=device, dtype=dtype, seed=seed,
                                   example_inputs=example_inputs)
    chunk_tokens, micro_batches, chunk_notes = prepare_chunks(plan, model, chunk_tokens, micro_batches)
    groups = model.step_groups or groups  # an imported model rebuilt for chunks inside a sequence has new steps
    names = resolve_schedules(schedule, "cuda" if _is_cuda(model.device) else "cpu")
    if model.step_groups and "batched" in names:  # its steps take one chunk's rows: no whole-pass call
        if schedule != "all":
            raise InputError("schedule 'batched' cannot run an imported model rebuilt for chunks inside a sequence "
                             "(its exported steps take one chunk); run the other schedules, or whole-sequence chunks")
        names.remove("batched")
        chunk_notes.append("batched left out of 'all': an imported model rebuilt for chunks inside a sequence "
                           "takes one chunk per call")
    chunk_tokens, micro_batches = check_chunks(model, chunk_tokens, micro_batches)
    on_cuda = _is_cuda(model.device)
    setup = _RunSetup.make(plan, model, groups, chunk_tokens, micro_batches, on_cuda=on_cuda,
                           warmup=(5 if on_cuda else 2) if warmup is None else warmup,
                           iters=(20 if on_cuda else 10) if iters is None else iters)
    notes = (_notes(plan, setup, l2_persist) + chunk_notes + [note for note in [kv_prefix_note(kv_planned)] if note]
             + _held_notes(setup, kv_planned))
    with torch.no_grad():
        reference = {name: tensor.clone() for name, tensor in model.reference().items()}
    l2 = _L2Record(requested=bool(l2_persist) and on_cuda)
    results = []
    try:
        with task("run", total=len(names) * (setup.warmup + setup.iters)) as bar:
            for name in names:
                result = _run_schedule(name, setup, reference, l2, on_pass=_pass_counter(bar, name, setup))
                results.append(result)
                if progress is not None:
                    progress(result)
    finally:
        release_chunked(model)  # a model kept after the run holds no sequence's K/V
    l2_info = l2.to_dict(bool(l2_persist))
    if l2.statuses and not l2_info.get("available"):
        notes.append(f"L2 persistence {l2.statuses[-1]}")
    return _assemble(plan, setup, tuple(results), l2_info, notes, kv_planned)


def _one_level(plan, stage, model):
    """`plan`, or stage `stage`'s on-chip plan of a two-level plan (`cachefit.executor.stage.stage_plan`)."""
    from .stage import is_deployment, stage_plan

    if not is_deployment(plan):
        if stage is not None:
            raise InputError(f"`stage` applies to a two-level plan (version 2); this plan has one level, "
                             f"got stage={stage!r}")
        return plan
    if model is not None:
        raise InputError("`model` is not supported with a two-level plan: each stage is built from its graph")
    return stage_plan(plan, stage)


def _check_arguments(device, warmup, iters, schedule):
    """The `device` as a torch.device (or None), after checking the plain arguments of `run`."""
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError):
            raise InputError(f"`device` must be 'cpu' or 'cuda', got {device!r}") from None
        if device.type not in ("cpu", "cuda"):
            raise InputError(f"`device` must be 'cpu' or 'cuda', got {str(device)!r}")
    for name, value in (("warmup", warmup), ("iters", iters)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < (0 if name == "warmup" else 1)):
            raise InputError(f"`{name}` must be an integer >= {0 if name == 'warmup' else 1}, got {value!r}")
    resolve_schedules(schedule, "cpu")  # bad names are refused before anything is built
    return device


def _verified_groups(plan, model):
    """The plan's groups, after `cachefit.check` and (for a graph the executor builds) the module bytes."""
    groups = check_plan_groups(plan)
    verify_plan(plan)
    if not isinstance(model, torch.nn.Module):  # the user's own module runs as it is
        verify_module_bytes(plan_graph(plan))
    return groups


@dataclass
class _RunSetup:
    """What every schedule of one `run` shares."""

    model: BuiltModel
    groups: list
    runners: list
    spans: list
    weight_by_group: list
    measured: list
    chunk_tokens: int
    micro_batches: int
    on_cuda: bool
    warmup: int
    iters: int
    bandwidth: float
    bandwidth_method: str
    held: list

    @classmethod
    def make(cls, plan, model, groups, chunk_tokens, micro_batches, *, on_cuda, warmup, iters):
        """Pack each group's weights, make the runners, measure bandwidth and what each group holds
        for one chunk (`cachefit.executor.held`; on CUDA also the allocator's peak)."""
        from .cuda import copy_bandwidth
        from .held import measure_held

        if model.packed_for != tuple(tuple(group) for group in groups):
            pack_group_weights(model, groups)
        weight_by_group = _group_weight_bytes(model, groups)
        runners = make_runners(model, groups)
        bandwidth, method = copy_bandwidth(model.device)
        measured = [None] * len(groups)
        if on_cuda:
            measured = measure_group_memory(model, runners, chunk_tokens, micro_batches, weight_by_group)
        held = measure_held(model, runners, groups, chunk_tokens, micro_batches)
        spans = [(buffer.data_ptr(), buffer.numel()) for buffer in model.group_buffers]
        return cls(model, groups, runners, spans, weight_by_group, measured, chunk_tokens, micro_batches,
                   on_cuda, warmup, iters, bandwidth, method, held)

    @property
    def floor_ms(self):
        """The HBM floor: every weight read once at the measured copy bandwidth, ms."""
        return self.model.weight_bytes() / self.bandwidth * 1e3


def _notes(plan, setup, l2_persist):
    """What the reader of the result should know about this run (a list of sentences)."""
    model, notes = setup.model, []
    run_fraction = setup.chunk_tokens / model.tokens
    if plan.memory == "liveness" and abs(plan.chunk_fraction - run_fraction) > 1e-12:
        notes.append(f"the plan was made for chunk fraction {plan.chunk_fraction:g}, this run streams "
                     f"chunks of {setup.chunk_tokens} of {model.tokens} tokens ({run_fraction:g}): planned sizes "
                     "assume the plan's fraction")
    graph_dtype = str(model.graph.graph.get("dtype", "")).lower()
    element = torch.empty((), dtype=model.dtype).element_size()
    if graph_dtype in DTYPE_BYTES and DTYPE_BYTES[graph_dtype] != element:
        notes.append(f"weights are allocated in {str(model.dtype).replace('torch.', '')} ({element} B per element); "
                     f"the plan counts {graph_dtype} ({DTYPE_BYTES[graph_dtype]} B): compare planned sizes "
                     "with that in mind")
    if any(model.graph.nodes[v].get("op") == "expert" for v in model.graph):
        notes.append("mixture of experts run densely (every expert on every token, weighted by the router): "
                     "exact output, but experts / experts_per_token times the routed expert work")
    notes += _stage_notes(model)
    if l2_persist and not setup.on_cuda:
        notes.append("--l2-persist applies to CUDA only; ignored on the CPU")
    return notes


def _held_notes(setup, kv_planned):
    """How the per-group held bytes were counted, and how the K/V buffers relate to the plan's K/V term."""
    held = [pair for pair in setup.held if pair[0] is not None]
    if not held:
        return []
    run, at_plan = held[0][0].dtype, held[0][1].dtype if held[0][1] is not None else None
    notes = ["held per group (one chunk, tensor bytes): weights + K/V buffers + the most the chunk's values took "
             "after any step of the group; not the allocator (temporaries inside one module call are not seen)"]
    if at_plan is not None and DTYPE_BYTES[at_plan] != setup.model.dtype.itemsize:
        factor = setup.model.dtype.itemsize / DTYPE_BYTES[at_plan]
        notes.append(f"held bytes are shown at the plan's dtype {at_plan} ({DTYPE_BYTES[at_plan]} B per element); "
                     f"as allocated in {run} ({setup.model.dtype.itemsize} B) floating tensors take {factor:g}× "
                     "that (JSON: groups[].held)")
    measured_kv = sum(pair[0].kv for pair in held)
    model, chunk = setup.model, setup.chunk_tokens
    if measured_kv and chunk < model.seq_len:
        before = chunk * (-(-model.seq_len // chunk) - 1)
        notes.append(f"K/V: each attention's buffer holds one sequence, {model.seq_len:,} tokens: the {before:,} "
                     f"before the last {chunk:,}-token chunk (the plan's K/V term: w − 1 of them on a layer with "
                     f"a sliding window w"
                     f"{'' if kv_planned is None else ', ' + ('in S(P)' if kv_planned.resident else 'streamed')}) "
                     f"and that chunk's own {chunk:,}, which the plan counts among the chunk's activations "
                     f"(measured K/V = planned × {model.seq_len:,} / {before:,} at the same dtype, without a window)")
    return notes


def _stage_notes(model):
    """Notes for a stage sub-model of a two-level plan (its received activations, a head tied across stages)."""
    notes = []
    received = [v for v in model.graph if model.graph.nodes[v].get("op") == "stage_input"]
    if received:
        notes.append(f"stage {model.graph.graph.get('stage')}: {len(received)} activation(s) from earlier stages "
                     f"({', '.join(received[:3])}{', ...' if len(received) > 3 else ''}) are seeded random inputs; "
                     "the reference is this stage's sub-model run unpartitioned")
    for step in model.steps:
        owner = getattr(step.module, "foreign", None)
        if owner is not None:
            weight = step.module.weight
            notes.append(f"{step.node} is tied to {owner!r} in another stage: this stage holds its own copy of "
                         f"the table ({weight.numel() * weight.element_size():,} B as allocated), counted in "
                         f"{step.node}'s group")
    return notes


@dataclass
class _L2Record:
    """What the L2 set-asides of a run's schedules reported."""

    requested: bool
    last: dict = field(default_factory=dict)
    statuses: list = field(default_factory=list)
    windows: int = 0

    def record(self, persistence):
        self.last = persistence.to_dict()
        self.statuses.append(persistence.status)

    def to_dict(self, requested):
        info = {"requested": requested, **self.last}
        if self.statuses:
            info["kernel_nodes_with_window"] = self.windows
        return info


def _pass_counter(bar, name, setup):
    """A callable that advances `bar` by one pass of schedule `name`, naming the pass."""
    count = [0]

    def on_pass():
        count[0] += 1
        kind = "warm-up" if count[0] <= setup.warmup else "timed"
        bar.advance(detail=f"{name}: pass {count[0]}/{setup.warmup + setup.iters} ({kind})")

    return on_pass


def _run_schedule(name, setup, reference, l2, on_pass=None):
    """Prepare, time, check and release one schedule; its `ScheduleResult`.

    The L2 set-aside and the windows exist only around the schedules whose
    graphs carry them (`ScheduleSpec.l2_window`).
    """
    from .cuda import L2Persistence

    model, spec = setup.model, SCHEDULE_TABLE[name]
    job = make_schedule(name, model, setup.runners, setup.chunk_tokens, setup.micro_batches,
                        on_cuda=setup.on_cuda)
    job.on_pass = on_pass
    with contextlib.ExitStack() as stack:
        stack.callback(job.release)
        persistence = None
        if l2.requested and spec.l2_window:
            persistence = L2Persistence(model.device)
            stack.callback(l2.record, persistence)  # after the set-aside is given back
            stack.enter_context(persistence)
        usable = persistence is not None and persistence.available
        windows = job.prepare(l2=persistence if usable else None, spans=setup.spans if usable else None)
        timing = job.time(setup.warmup, setup.iters)
        comparison = compare_outputs(job.outputs(), reference, model.dtype)
        launches = job.launches()
    l2.windows += windows
    floor_ms = setup.floor_ms
    logger.info("%s: %.3f ms/pass, equivalent=%s (max abs diff %.3g)", name, timing.median,
                comparison.equivalent, comparison.max_abs_diff)
    return ScheduleResult(
        name=name, ms_per_pass=timing.median, ms_min=timing.min, ms_max=timing.max,
        tokens_per_s=model.tokens / (timing.median / 1e3) if timing.median > 0 else float("inf"),
        per_group_ms=tuple(timing.per_segment) if spec.per_group_ms and timing.per_segment else None,
        launches_per_pass=launches.per_pass, launch_method=launches.method,
        graph_replays_per_pass=job.graph_replays if setup.on_cuda else 0,
        graph_kernel_nodes=launches.graph_kernel_nodes, max_abs_diff=comparison.max_abs_diff,
        rel_error=comparison.rel_error, equivalent=comparison.equivalent, rtol=comparison.rtol,
        atol=comparison.atol, hbm_floor_ratio=timing.median / floor_ms if floor_ms > 0 else None,
        l2_windows=windows)


def _speedups(results):
    """``speedups[s][b]`` = ms of baseline b / ms of schedule s, for every pair that ran."""
    by_name = {result.name: result for result in results}
    return {result.name: {base: by_name[base].ms_per_pass / result.ms_per_pass
                          for base in BASELINES if base in by_name and base != result.name
                          and result.ms_per_pass > 0}
            for result in results}


def _overheads(results, setup):
    """(µs per group boundary, µs per chunk replay) from the CUDA schedules that ran, else None."""
    by_name = {result.name: result.ms_per_pass for result in results}
    k = len(setup.groups)
    fused = by_name.get("partition-major-fused") if setup.on_cuda else None
    if fused is None:
        return None, None
    per_group = (by_name["partition-major"] - fused) * 1e3 / k if "partition-major" in by_name else None
    per_chunk = ((by_name["partition-major-replay"] - fused) * 1e3 / (k * setup.micro_batches)
                 if "partition-major-replay" in by_name else None)
    return per_group, per_chunk


def _assemble(plan, setup, results, l2_info, notes, kv_planned):
    """The `RunResult` of a run whose schedules gave `results`."""
    model, groups = setup.model, setup.groups
    group_reports = tuple(
        GroupReport(index=index, nodes=len(group), first=group[0] if group else "-",
                    last=group[-1] if group else "-",
                    planned_bytes=int(plan.sizes[index]) if index < len(plan.sizes) else 0,
                    weight_bytes=setup.weight_by_group[index], measured_bytes=setup.measured[index],
                    planned_kv_bytes=kv_planned.per_group[index] if kv_planned is not None else None,
                    held=setup.held[index][0], held_at_plan_dtype=setup.held[index][1])
        for index, group in enumerate(groups))
    per_group, per_chunk = _overheads(results, setup)
    machine = _machine(setup.on_cuda)
    timing_method = ("CUDA events around each pass (graph replays or eager launches), median"
                     if setup.on_cuda else "time.perf_counter around each pass, median")
    return RunResult(
        model=str(model.graph.graph.get("name", "model")), device=str(model.device),
        device_name=str(machine.get("gpu") if setup.on_cuda else machine.get("cpu", "cpu")),
        dtype=str(model.dtype).replace("torch.", ""), chunk_tokens=setup.chunk_tokens,
        micro_batches=setup.micro_batches, tokens_per_pass=model.tokens,
        run_chunk_fraction=setup.chunk_tokens / model.tokens,
        plan={"k": plan.k, "solver": plan.solver, "status": str(plan.status), "capacity": plan.capacity,
              "memory": plan.memory, "chunk_fraction": plan.chunk_fraction},
        groups=group_reports, schedules=results, speedups=_speedups(results), weight_bytes=model.weight_bytes(),
        copy_bandwidth=setup.bandwidth, bandwidth_method=setup.bandwidth_method, hbm_floor_ms=setup.floor_ms,
        replay_overhead_us_per_group=per_group, l2=l2_info, timing_method=timing_method, warmup=setup.warmup,
        iters=setup.iters, notes=tuple(notes), machine=machine, replay_overhead_us_per_chunk=per_chunk)


def _group_weight_bytes(model, groups):
    placed, result = set(), []
    for group in groups:
        total = 0
        for parameter in model.parameters(group):
            if id(parameter) not in placed:
                placed.add(id(parameter))
                total += parameter.numel() * parameter.element_size()
        result.append(total)
    return result
