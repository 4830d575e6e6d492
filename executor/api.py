"""`run`: execute a plan group by group, chunk by chunk, against its baselines (imports torch)."""

from __future__ import annotations

import logging

import torch

from ..errors import InputError
from ..units import DTYPE_BYTES
from .fingerprint import check_plan_groups, graph_fingerprint
from .model import BuiltModel, build, pack_group_weights
from .results import BASELINES, SCHEDULES, GroupReport, RunResult, ScheduleResult
from .runner import (CpuSchedule, EagerSchedule, GraphSchedule, ReplaySchedule, check_chunks, compare_outputs,
                     make_runners, measure_group_memory)

__all__ = ["run", "resolve_schedules"]

logger = logging.getLogger(__name__)

_ORDER = ("eager", "batched", "token-major", "partition-major", "partition-major-fused", "partition-major-replay")
_CUDA_ONLY = ("partition-major-fused", "partition-major-replay")
_L2_SCHEDULES = ("partition-major", "partition-major-replay")  # one group per graph: a window per graph


def resolve_schedules(schedule, device):
    """The schedule names `schedule` stands for, in the order they run.

    ``"all"`` is every schedule of `SCHEDULES` that applies: on the CPU
    ``partition-major-fused`` and ``partition-major-replay`` are left out
    (without graphs they are partition-major).  A list or tuple of names is accepted too.

    Examples
    --------
    >>> resolve_schedules("all", "cpu")
    ['eager', 'batched', 'token-major', 'partition-major']
    >>> resolve_schedules(["partition-major", "batched"], "cuda")
    ['batched', 'partition-major']
    """
    device = torch.device(device)
    if schedule == "all":
        names = [name for name in _ORDER if device.type == "cuda" or name not in _CUDA_ONLY]
    else:
        names = [schedule] if isinstance(schedule, str) else list(schedule)
        for name in names:
            if name not in SCHEDULES:
                raise InputError(f"`schedule` must be 'all' or one of {', '.join(SCHEDULES)}, got {name!r}")
        names = [name for name in _ORDER if name in names]
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
        planned = graph_fingerprint(plan.graph)
        if planned != model.fingerprint:
            raise InputError(f"`plan` does not match `model`: the plan's graph (fingerprint {planned[:12]}) "
                             f"is not the graph the model was built from ({model.fingerprint[:12]}); node "
                             "ids, shapes or byte counts differ")
        if device is not None and torch.device(device).type != model.device.type:
            raise InputError(f"`device` {str(device)!r} differs from the model's device "
                             f"{str(model.device)!r}; build the model on the device to run on")
        return model, groups
    if isinstance(model, torch.nn.Module):
        from .fx import build_fx
        return build_fx(plan.graph, model, example_inputs, groups=groups, device=device, dtype=dtype)
    raise InputError(f"`model` must be None, a BuiltModel (cachefit.executor.build) or a torch.nn.Module, "
                     f"got {type(model).__name__}")


def run(plan, model=None, *, device=None, chunk_tokens=None, micro_batches=None,
        schedule="partition-major", l2_persist=False, seed=0, dtype=None, warmup=None, iters=None,
        example_inputs=None):
    """Run `plan` group by group over the chunks of one pass, check it and time it.

    Parameters
    ----------
    plan : cachefit.Plan
        A plan with groups (OPTIMAL or FEASIBLE) that carries its graph.
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
        (chunk_tokens × micro_batches must equal batch × seq_len).  A model
        with attention needs whole sequences per chunk (chunk_tokens a
        multiple of seq_len): chunks are micro-batches of sequences.
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
    groups = check_plan_groups(plan)
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
    if device is None and not isinstance(model, BuiltModel):
        device = torch.device("cpu")
    model, groups = _resolve_model(plan, model, groups, device=device, dtype=dtype, seed=seed,
                                   example_inputs=example_inputs)
    device = model.device
    chunk_tokens, micro_batches = check_chunks(model, chunk_tokens, micro_batches)
    on_cuda = _is_cuda(device)
    names = resolve_schedules(schedule, "cuda" if on_cuda else "cpu")
    warmup = (5 if on_cuda else 2) if warmup is None else warmup
    iters = (20 if on_cuda else 10) if iters is None else iters

    if model.packed_for != tuple(tuple(group) for group in groups):
        pack_group_weights(model, groups)
    spans = [(buffer.data_ptr(), buffer.numel()) for buffer in model.group_buffers]
    weight_by_group = _group_weight_bytes(model, groups)
    runners = make_runners(model, groups)
    notes = []
    run_fraction = chunk_tokens / model.tokens
    if plan.memory == "liveness" and abs(plan.chunk_fraction - run_fraction) > 1e-12:
        notes.append(f"the plan was made for chunk fraction {plan.chunk_fraction:g}, this run streams "
                     f"chunks of {chunk_tokens} of {model.tokens} tokens ({run_fraction:g}): planned sizes "
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

    from .cuda import L2Persistence, copy_bandwidth
    bandwidth, bandwidth_method = copy_bandwidth(device)
    total_weight = model.weight_bytes()
    floor_ms = total_weight / bandwidth * 1e3

    measured = [None] * len(groups)
    if on_cuda:
        measured = measure_group_memory(model, runners, chunk_tokens, micro_batches, weight_by_group)

    with torch.no_grad():
        reference = {name: tensor.clone() for name, tensor in model.reference().items()}

    l2_info = {"requested": bool(l2_persist)}
    if l2_persist and not on_cuda:
        notes.append("--l2-persist applies to CUDA only; ignored on the CPU")
    l2_windows_total, l2_statuses = 0, []
    results = []
    for name in names:
        if name == "eager":
            job = EagerSchedule(model)
        elif on_cuda and name == "partition-major-replay":
            job = ReplaySchedule(name, model, runners, chunk_tokens, micro_batches)
        elif on_cuda:
            job = GraphSchedule(name, model, runners, chunk_tokens, micro_batches)
        else:
            job = CpuSchedule(name, model, runners, chunk_tokens, micro_batches)
        # The set-aside and the windows exist only around the schedules whose graphs carry them.
        persistence = None
        if l2_persist and on_cuda and name in _L2_SCHEDULES:
            persistence = L2Persistence(device).__enter__()
        try:
            usable = persistence is not None and persistence.available
            windows = job.prepare(l2=persistence if usable else None, spans=spans if usable else None)
            timing = job.time(warmup, iters)
            outputs = job.outputs()
            max_abs, rel, ok, rtol, atol = compare_outputs(outputs, reference, model.dtype)
            launches, launch_method, graph_nodes = job.launches()
        finally:
            if persistence is not None:
                persistence.__exit__(None, None, None)
                l2_info.update(persistence.to_dict())
                l2_statuses.append(persistence.status)
            job.release()
        l2_windows_total += windows
        tokens_per_s = model.tokens / (timing.median / 1e3) if timing.median > 0 else float("inf")
        per_group = (tuple(timing.per_segment)
                     if name in ("partition-major", "partition-major-replay") and timing.per_segment else None)
        results.append(ScheduleResult(
            name=name, ms_per_pass=timing.median, ms_min=timing.min, ms_max=timing.max,
            tokens_per_s=tokens_per_s, per_group_ms=per_group, launches_per_pass=launches,
            launch_method=launch_method, graph_replays_per_pass=job.graph_replays if on_cuda else 0,
            graph_kernel_nodes=graph_nodes, max_abs_diff=max_abs, rel_error=rel, equivalent=ok,
            rtol=rtol, atol=atol, hbm_floor_ratio=timing.median / floor_ms if floor_ms > 0 else None,
            l2_windows=windows))
        logger.info("%s: %.3f ms/pass, equivalent=%s (max abs diff %.3g)", name, timing.median, ok, max_abs)
    if l2_statuses:
        l2_info["kernel_nodes_with_window"] = l2_windows_total
        if not l2_info.get("available"):
            notes.append(f"L2 persistence {l2_statuses[-1]}")

    by_name = {result.name: result for result in results}
    speedups = {result.name: {base: by_name[base].ms_per_pass / result.ms_per_pass
                              for base in BASELINES if base in by_name and base != result.name
                              and result.ms_per_pass > 0}
                for result in results}
    overhead = None
    if on_cuda and "partition-major" in by_name and "partition-major-fused" in by_name:
        overhead = ((by_name["partition-major"].ms_per_pass - by_name["partition-major-fused"].ms_per_pass)
                    * 1e3 / len(groups))
    chunk_overhead = None
    if on_cuda and "partition-major-replay" in by_name and "partition-major-fused" in by_name:
        chunk_overhead = ((by_name["partition-major-replay"].ms_per_pass
                           - by_name["partition-major-fused"].ms_per_pass) * 1e3 / (len(groups) * micro_batches))
    group_reports = tuple(
        GroupReport(index=index, nodes=len(group), first=group[0] if group else "-",
                    last=group[-1] if group else "-",
                    planned_bytes=int(plan.sizes[index]) if index < len(plan.sizes) else 0,
                    weight_bytes=weight_by_group[index], measured_bytes=measured[index])
        for index, group in enumerate(groups))
    machine = _machine(on_cuda)
    timing_method = ("CUDA events around each pass (graph replays or eager launches), median"
                     if on_cuda else "time.perf_counter around each pass, median")
    return RunResult(
        model=str(model.graph.graph.get("name", "model")), device=str(device),
        device_name=str(machine.get("gpu") if on_cuda else machine.get("cpu", "cpu")),
        dtype=str(model.dtype).replace("torch.", ""), chunk_tokens=chunk_tokens, micro_batches=micro_batches,
        tokens_per_pass=model.tokens, run_chunk_fraction=run_fraction,
        plan={"k": plan.k, "solver": plan.solver, "status": str(plan.status), "capacity": plan.capacity,
              "memory": plan.memory, "chunk_fraction": plan.chunk_fraction},
        groups=group_reports, schedules=tuple(results), speedups=speedups, weight_bytes=total_weight,
        copy_bandwidth=bandwidth, bandwidth_method=bandwidth_method, hbm_floor_ms=floor_ms,
        replay_overhead_us_per_group=overhead, l2=l2_info, timing_method=timing_method, warmup=warmup,
        iters=iters, notes=tuple(notes), machine=machine, replay_overhead_us_per_chunk=chunk_overhead)


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
