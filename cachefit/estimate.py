"""`estimate`: how long a plan should take on a device, from a roofline of the bytes it moves.

For every group of a plan and every pass (one pass = the whole batch through
the whole model once: one prefill, or one decode step) the estimate counts
the bytes each schedule moves from off-chip memory (HBM) and from on-chip
memory, and the flops, and turns them into a time:

    t(group) = max(flops / peak, HBM bytes / HBM bandwidth, on-chip bytes / on-chip bandwidth)
               + launches × launch cost

Schedules (n = chunks per pass = ⌈1 / chunk_fraction⌉; W, KV, F = the group's
weight bytes, ``kv_bytes`` and flops; A_in, A_out = activations entering and
leaving it; A_int = activations made and used inside it):

``partition-major`` (layer-wise; the executor's default)
    a group's weights are loaded once per pass and every chunk streams
    through it, so its boundary activations for all chunks go to HBM:
    HBM = W + KV + A_in + A_out; on-chip = n · W + A_int.  n launches.
``token-major``
    each chunk runs through every group before the next chunk starts: the
    chunk's activations stay on chip, the weights are reloaded per chunk:
    HBM = n · W + KV; on-chip = A_int + A_in + A_out.  n launches.
``batched`` (the baseline: no on-chip groups)
    every node runs once on the whole batch; its weights come from HBM once
    and every activation is written to and read back from HBM:
    HBM = Σ_v (W_v + KV_v + act_v · (1 + consumers of v)); on-chip = 0.
    One launch per device and pass (the whole model as one graph).

A group is *pinned* when its device holds no other group and it fits the
device's on-chip memory: its weights (and its KV cache when ``kv="resident"``)
then stay on chip across passes and are read from there, not from HBM.  With
``devices`` > 1 the groups are dealt to devices in order, in contiguous runs
balanced by partition-major time (one group each when there are enough
devices); a pass then costs the sum of the devices' times (latency; the time
per output token in decode) and, with one batch in flight per device
(pipeline parallelism), the pipeline delivers a pass's tokens every
max(device time).  Tensor parallelism is not modelled.

Examples
--------
>>> from cachefit import instances, plan
>>> graph = instances.load("llama-3.1-8b", phase="decode", context=4096, batch=8)
>>> result = estimate(plan(graph, "h100-hbm"), "h100")
>>> batched = result.schedule("batched")
>>> batched.bound, round(batched.time_per_output_token_s * 1e3, 2)
('HBM', 6.08)
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from .devices import Device, get_device
from .errors import InputError
from .memory import KV_PLACEMENTS, kv_placement

__all__ = ["SCHEDULES", "KV_PLACEMENTS", "Traffic", "GroupEstimate", "ScheduleEstimate", "Estimate", "estimate",
           "measure_device"]

logger = logging.getLogger(__name__)

#: The execution schedules an estimate compares.
SCHEDULES = ("partition-major", "token-major", "batched")


#: Assumed cost of launching one group on one chunk (a CUDA-graph replay), seconds.
DEFAULT_LAUNCH_S = 5e-6


@dataclass(frozen=True)
class Traffic:
    """What one schedule does with one group (or device) in one pass.

    ``bound`` names the largest roofline term: ``"compute"``, ``"HBM"``,
    ``"on-chip"`` or ``"launch"`` (when launches cost more than the rest).
    """

    hbm_bytes: int
    on_chip_bytes: int
    flops: int
    launches: int
    time_s: float
    bound: str


@dataclass(frozen=True)
class GroupEstimate:
    """One group of the plan: its bytes and flops, where it runs, and each schedule's traffic."""

    index: int
    device: int
    nodes: int
    size_bytes: int
    weight_bytes: int
    kv_bytes: int
    input_bytes: int
    output_bytes: int
    internal_bytes: int
    flops: int
    pinned: bool
    fits_on_chip: bool
    chunks: int
    partition_major: Traffic
    token_major: Traffic
    batched: Traffic

    def traffic(self, schedule):
        """The `Traffic` of `schedule` (one of `SCHEDULES`)."""
        return getattr(self, _check_schedule(schedule).replace("-", "_"))


@dataclass(frozen=True)
class ScheduleEstimate:
    """One schedule over the whole plan, per pass.

    ``time_s`` is one pass through every device in turn (for decode, the
    time per output token); ``stage_time_s`` the slowest device's share,
    which sets a full pipeline's pace; ``tokens_per_s`` = tokens per pass /
    ``stage_time_s``.
    """

    schedule: str
    hbm_bytes: int
    on_chip_bytes: int
    flops: int
    launches: int
    time_s: float
    stage_time_s: float
    bound: str
    tokens_per_s: float
    time_per_output_token_s: float | None


@dataclass(frozen=True)
class Estimate:
    """The result of `estimate`: the device, the pass, per-group and per-schedule figures, the assumptions."""

    device: Device
    devices: int
    phase: str
    batch: int
    seq_len: int
    context: int
    tokens_per_pass: int
    chunks: int
    kv: str
    launch_s: float
    groups: tuple
    schedules: tuple
    assumptions: tuple

    def schedule(self, name):
        """The `ScheduleEstimate` of schedule `name`."""
        _check_schedule(name)
        return next(item for item in self.schedules if item.schedule == name)


def _check_schedule(name):
    if name not in SCHEDULES:
        raise InputError(f"`schedule` must be one of {', '.join(SCHEDULES)}, got {name!r}")
    return name


def _roofline(device, hbm_bytes, on_chip_bytes, flops, launches, launch_s):
    if device.memory_bandwidth is None:  # an SRAM-only chip: what would spill to HBM stays on chip (or its links)
        hbm_bytes, on_chip_bytes = 0, on_chip_bytes + hbm_bytes
    terms = {"compute": flops / device.peak_flops if device.peak_flops else 0.0,
             "HBM": hbm_bytes / device.memory_bandwidth if device.memory_bandwidth else 0.0,
             "on-chip": on_chip_bytes / device.on_chip_bandwidth if device.on_chip_bandwidth else 0.0}
    bound = max(terms, key=terms.get)
    launch = launches * launch_s
    if launch > terms[bound]:
        bound = "launch"
    return Traffic(int(hbm_bytes), int(on_chip_bytes), int(flops), int(launches),
                   max(terms.values()) + launch, bound)


def _group_bytes(graph, group):
    """(weight, kv, input, output, internal, flops) of `group` in `graph`."""
    members = set(group)
    nodes = graph.nodes
    weight = sum(nodes[v]["weight_bytes"] for v in group)
    kv = sum(int(nodes[v].get("kv_bytes", 0) or 0) for v in group)
    flops = sum(int(nodes[v].get("flops", 0) or 0) for v in group)
    inputs = {u for v in group for u in graph.predecessors(v) if u not in members}
    input_bytes = sum(nodes[u]["activation_bytes"] for u in inputs)
    output_bytes = internal = 0
    for v in group:
        successors = list(graph.successors(v))
        received = nodes[v].get("op") == "stage_input"  # an activation from the previous device (cachefit.deploy)
        if received:
            input_bytes += nodes[v]["activation_bytes"]
        elif not successors or any(s not in members for s in successors):
            output_bytes += nodes[v]["activation_bytes"]
        internal += nodes[v]["activation_bytes"] * ((not received) + sum(s in members for s in successors))
    return weight, kv, input_bytes, output_bytes, internal, flops


def _batched_bytes(graph, group, kv_placement, pinned):
    """HBM bytes of `group`'s nodes run one by one on the whole batch."""
    nodes = graph.nodes
    total = 0
    for v in group:
        data = nodes[v]
        kv = int(data.get("kv_bytes", 0) or 0)
        total += data["weight_bytes"] + (0 if (pinned and kv_placement == "resident") else kv)
        total += data["activation_bytes"] * (1 + graph.out_degree(v))
    return total


def _deal(times, devices):
    """Contiguous runs of `times` over at most `devices` devices minimising the largest run's sum.

    Among such runs, every device gets at least one group when there are as
    many groups as devices (more groups alone on a device, so more pinned).
    """
    k = len(times)
    if devices >= k:
        return list(range(k))
    low, high = max(times), sum(times)
    for _ in range(100):
        middle = (low + high) / 2
        runs, current = 1, 0.0
        for value in times:
            if current + value > middle and current > 0:
                runs, current = runs + 1, 0.0
            current += value
        low, high = (middle, high) if runs > devices else (low, middle)
    assignment, run, current = [], 0, 0.0
    for index, value in enumerate(times):
        # cut over the bound, and also once the groups left can each have a device of their own
        if current > 0 and (current + value > high or k - index <= devices - run - 1):
            run, current = run + 1, 0.0
        assignment.append(run)
        current += value
    return assignment


def _validate(plan, device, devices, kv, launch_s):
    if not getattr(plan, "ok", False):
        raise InputError(f"`plan` must hold groups (status OPTIMAL or FEASIBLE), got "
                         f"{getattr(plan, 'status', type(plan).__name__)}")
    graph = plan.stages.graph if hasattr(plan, "stages") else plan.graph
    if graph is None or not hasattr(graph, "nodes"):
        raise InputError("`plan` must carry its graph (a plan read from a file always does)")
    graph = _as_graph(graph)
    if isinstance(device, str) and device.strip().lower() == "measured":
        device = measure_device()
    device = get_device(device)
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise InputError(f"`devices` must be a positive integer, got {devices!r}")
    recorded = kv_placement((plan.groups[0] if hasattr(plan, "stages") else plan).memory)
    kv = kv or (recorded if recorded == "resident" else None) or (
        "streamed" if device.memory_bandwidth else "resident")
    if kv not in KV_PLACEMENTS:
        raise InputError(f"`kv` must be one of {', '.join(map(repr, KV_PLACEMENTS))}, got {kv!r}")
    if kv == "streamed" and device.memory_bandwidth is None:
        raise InputError(f"`kv` 'streamed' needs off-chip memory; `device` {device.name!r} has none: "
                         "use kv='resident'")
    if launch_s is None:
        launch_s = DEFAULT_LAUNCH_S if device.memory_bandwidth else 0.0
    if isinstance(launch_s, bool) or not isinstance(launch_s, (int, float)) or not 0 <= launch_s < math.inf:
        raise InputError(f"`launch_s` must be a non-negative number of seconds, got {launch_s!r}")
    if hasattr(plan, "stages"):
        if devices not in (1, plan.devices):
            raise InputError(f"`devices` is fixed by the deployment's {plan.devices} stages, got {devices}")
        devices = plan.devices
    if device.memory_bandwidth is None and devices < plan.k:
        raise InputError(f"`device` {device.name!r} has no off-chip memory, so every group needs its own chip: "
                         f"`devices` must be at least k = {plan.k}, got {devices}")
    return graph, device, devices, kv, launch_s


def _chunks(plan, tokens):
    """Chunks per pass of `plan`: ⌈tokens / chunk tokens⌉ under liveness (with or without ``+kv``) with f < 1, else 1."""
    fraction = plan.chunk_fraction if plan.memory.removesuffix("+kv") == "liveness" else 1.0
    return max(1, math.ceil(tokens / max(1, round(fraction * tokens)))) if fraction < 1 else 1


def _units(plan, tokens):
    """(graph, nodes, size, chunks, stage) of every on-chip group; stage None when groups are dealt here."""
    if hasattr(plan, "stages"):  # a Deployment: each stage's on-chip groups run on that stage's device
        return [(_as_graph(sub.graph), group, size, _chunks(sub, tokens), stage)
                for stage, sub in enumerate(plan.groups) for group, size in zip(sub.partitions, sub.sizes)]
    graph = _as_graph(plan.graph)
    return [(graph, group, size, _chunks(plan, tokens), None) for group, size in zip(plan.partitions, plan.sizes)]


def _as_graph(graph):
    return graph.to_graph() if hasattr(graph, "to_graph") else graph


def _group_traffic(device, shape, chunks, kv, launch_s, pinned):
    """Partition-major and token-major `Traffic` of one group from its byte counts."""
    weight, kv_bytes, inputs, outputs, internal, flops = shape
    kv_hbm = 0 if (pinned and kv == "resident") else kv_bytes
    kv_chip = kv_bytes - kv_hbm
    weight_hbm = 0 if pinned else weight
    partition = _roofline(device, weight_hbm + kv_hbm + inputs + outputs,
                          chunks * weight + internal + kv_chip, flops, chunks, launch_s)
    token = _roofline(device, (0 if pinned else chunks * weight) + kv_hbm,
                      (chunks * weight if pinned else 0) + internal + inputs + outputs + kv_chip,
                      flops, chunks, launch_s)
    return partition, token


def estimate(plan, device="h100", *, devices=1, kv=None, launch_s=None):
    """Predicted time of `plan` on `device` for partition-major, token-major and batched execution.

    Parameters
    ----------
    plan : Plan or cachefit.deploy.Deployment
        A plan with groups; its graph's ``flops``, ``kv_bytes`` and byte
        attributes, and its ``batch``, ``seq_len``, ``phase`` and ``context``
        graph attributes, are read.  A `Deployment`'s on-chip groups run on
        their stage's device (`devices` is then the stage count).
    device : str or Device
        A preset (`cachefit.devices.PRESETS`), a capacity name of one
        (``"h100-l2"``), a `Device`, or ``"measured"`` (`measure_device`).
    devices : int
        Devices the groups are dealt to (pipeline stages, in order).
    kv : {"streamed", "resident"}, optional
        Where the KV cache lives; default: the plan's choice (its memory
        model, ``NAME+kv`` for resident), else ``"streamed"`` (``"resident"``
        on a chip without off-chip memory).  Resident KV saves HBM reads
        only for pinned groups.
    launch_s : float, optional
        Seconds per launch of one group on one chunk; default 5 µs
        (`DEFAULT_LAUNCH_S`, a CUDA-graph replay) on a chip with off-chip
        memory, 0 on an SRAM-only chip (statically scheduled dataflow).

    Returns
    -------
    Estimate

    Raises
    ------
    InputError
        No plan, a bad device, `devices`, `kv` or `launch_s`, or a chip
        without off-chip memory given fewer devices than groups.

    Notes
    -----
    O(n + e) over the plan's graph, plus O(k log) to deal groups to devices.
    The model ignores interconnect transfers between devices, kernel
    inefficiency (every term runs at its peak) and overlap limits beyond
    the max() of the roofline.
    """
    graph, device, devices, kv, launch_s = _validate(plan, device, devices, kv, launch_s)
    batch, seq_len = int(graph.graph.get("batch") or 1), int(graph.graph.get("seq_len") or 1)
    phase, context = str(graph.graph.get("phase", "prefill")), int(graph.graph.get("context") or 0)
    units = _units(plan, batch * seq_len)
    shapes = [_group_bytes(sub, group) for sub, group, *_ in units]
    # A plan that did not count the KV cache in its groups fits on chip with it resident only if S + KV does.
    kv_outside = kv == "resident" and not _counts_kv(plan)
    fits = [device.on_chip_bytes is None or unit[2] + (shape[1] if kv_outside else 0) <= device.on_chip_bytes
            for unit, shape in zip(units, shapes)]
    if device.memory_bandwidth is None and not all(fits):
        index = fits.index(False)
        raise InputError(f"`device` {device.name!r} has no off-chip memory, but group {index} "
                         f"({units[index][2]:,} B + KV {shapes[index][1]:,} B) exceeds its "
                         f"{device.on_chip_bytes:,} B {device.on_chip_kind}")
    if units[0][4] is None:
        unpinned = [_group_traffic(device, shape, unit[3], kv, launch_s, False)[0] for unit, shape in zip(units, shapes)]
        assignment = _deal([traffic.time_s for traffic in unpinned], devices)
    else:
        assignment = [unit[4] for unit in units]
    per_device = [assignment.count(index) for index in range(max(assignment) + 1)]
    groups = [_group_estimate(index, unit, shape, fits[index], assignment[index],
                              per_device[assignment[index]] == 1, device, kv, launch_s)
              for index, (unit, shape) in enumerate(zip(units, shapes))]
    chunks = max(group.chunks for group in groups)
    schedules = tuple(_schedule(name, groups, len(per_device), device, launch_s, phase, batch * seq_len)
                      for name in SCHEDULES)
    result = Estimate(device, devices, phase, batch, seq_len, context, batch * seq_len, chunks, kv, launch_s,
                      tuple(groups), schedules, _assumptions(device, devices, kv, launch_s, chunks, fits, groups,
                                                              staged=units[0][4] is not None))
    logger.info("estimate: %s on %d × %s: %s", graph.graph.get("name"), devices, device.name,
                ", ".join(f"{item.schedule} {item.time_s * 1e3:.3f} ms" for item in schedules))
    return result


def _group_estimate(index, unit, shape, fits, device_index, alone, device, kv, launch_s):
    """The `GroupEstimate` of one group: pinned when alone on its device and on chip."""
    sub, group, size, chunks, _ = unit
    pinned = fits and alone
    partition, token = _group_traffic(device, shape, chunks, kv, launch_s, pinned)
    if not fits:  # the group cannot stay on chip: weights stream per chunk either way
        partition = token
    batched = _roofline(device, _batched_bytes(sub, group, kv, pinned), 0, shape[5], 0, launch_s)
    return GroupEstimate(index, device_index, len(group), size, *shape[:5], flops=shape[5], pinned=pinned,
                         fits_on_chip=fits, chunks=chunks, partition_major=partition, token_major=token,
                         batched=batched)


def _counts_kv(plan):
    """Whether the plan's memory model already put each group's KV cache in its size."""
    plans = plan.groups if hasattr(plan, "stages") else (plan,)
    return all(kv_placement(item.memory) == "resident" for item in plans)


def _schedule(name, groups, used_devices, device, launch_s, phase, tokens):
    key = name.replace("-", "_")
    device_times = [0.0] * used_devices
    launches = 0
    for group in groups:
        traffic = getattr(group, key)
        device_times[group.device] += traffic.time_s
        launches += traffic.launches
    if name == "batched":  # one launch per device and pass
        device_times = [value + launch_s for value in device_times]
        launches = used_devices
    totals = [sum(getattr(getattr(group, key), field) for group in groups)
              for field in ("hbm_bytes", "on_chip_bytes", "flops")]
    bounds = {}
    for group in groups:
        traffic = getattr(group, key)
        bounds[traffic.bound] = bounds.get(traffic.bound, 0.0) + traffic.time_s
    time_s, stage = sum(device_times), max(device_times)
    return ScheduleEstimate(name, *totals, launches, time_s, stage, max(bounds, key=bounds.get),
                            tokens / stage if stage else math.inf, time_s if phase == "decode" else None)


def _assumptions(device, devices, kv, launch_s, chunks, fits, groups, staged=False):
    notes = [f"device {device.label}: peak {device.peak_flops / 1e12:,.1f} TFLOP/s dense BF16, "
             + (f"off-chip {device.memory_bandwidth / 1e12:,.2f} TB/s" if device.memory_bandwidth
                else "no off-chip memory")
             + (f", on-chip {device.on_chip_bandwidth / 1e12:,.1f} TB/s" if device.on_chip_bandwidth else ""),
             "every roofline term runs at the device's peak figure (an optimistic floor on time)",
             f"launch cost {launch_s * 1e6:g} µs per group and chunk (batched: one launch per device and pass)",
             f"{chunks} chunk(s) per pass; KV cache {kv}"]
    if device.on_chip_bandwidth is None:
        notes.append(f"{device.name} on-chip bandwidth not published: on-chip reads are taken as free")
    if device.on_chip_bytes is None:
        notes.append(f"{device.name} on-chip capacity not published: every group is taken to fit on chip")
    if not all(fits):
        notes.append(f"{fits.count(False)} group(s) exceed the {device.on_chip_kind} "
                     f"({device.on_chip_bytes:,} B): their weights stream from HBM per chunk in every schedule")
    pinned = sum(group.pinned for group in groups)
    placed = "each stage's groups on its device" if staged else "groups dealt in order"
    notes.append(f"{devices} device(s), {placed}; {pinned} of {len(groups)} group(s) pinned "
                 "(alone on a device and on chip: weights read from HBM never)")
    if device.memory_bandwidth is None:
        notes.append("no off-chip memory: activations between groups move over chip-to-chip links, counted as "
                     "on-chip bytes; the KV cache is resident; no launch cost (statically scheduled)")
    if devices > 1:
        notes.append("pipeline: time per pass = sum over devices; tokens/s with one batch in flight per device; "
                     "interconnect transfers not counted; no tensor parallelism")
    return tuple(notes)


def measure_device(torch_device="cpu", *, gemm_size=1024, repeats=5):
    """A `Device` measured on this machine: a copy-bandwidth probe and a GEMM probe (imports torch).

    Off-chip bandwidth: a copy of a buffer far larger than any cache
    (`cachefit.executor.cuda.copy_bandwidth`, bytes read + written).
    On-chip bandwidth: the same copy of a 1 MiB buffer (cache-resident).
    Peak: a square GEMM of `gemm_size` in float32 on CPU, bfloat16 on CUDA.
    Capacities are not probed (None).
    """
    import time

    import torch

    from .executor.cuda import copy_bandwidth

    target = torch.device(torch_device)
    memory_bandwidth, method = copy_bandwidth(target, nbytes=256 * 2**20 if target.type == "cpu" else None,
                                              repeats=repeats)
    on_chip_bandwidth, _ = copy_bandwidth(target, nbytes=2**20, repeats=50, cached=False)
    dtype = torch.bfloat16 if target.type == "cuda" else torch.float32
    a = torch.randn(gemm_size, gemm_size, dtype=dtype, device=target)
    b = torch.randn(gemm_size, gemm_size, dtype=dtype, device=target)
    a @ b
    times = []
    for _ in range(repeats):
        if target.type == "cuda":
            torch.cuda.synchronize(target)
        started = time.perf_counter()
        a @ b
        if target.type == "cuda":
            torch.cuda.synchronize(target)
        times.append(time.perf_counter() - started)
    peak = 2 * gemm_size**3 / min(times)
    probe = f"{gemm_size}³ {str(dtype).removeprefix('torch.')} GEMM, best of {repeats}"
    return Device("measured", f"this machine ({target})", "cache", None, "DRAM" if target.type == "cpu" else "HBM",
                  None, memory_bandwidth, on_chip_bandwidth, peak,
                  sources={"memory_bandwidth": f"measured: {method}",
                           "on_chip_bandwidth": "measured: copy of 1 MiB (cache-resident), median of 50",
                           "peak_flops": f"measured: {probe}",
                           "on_chip_bytes": "not probed", "memory_bytes": "not probed"},
                  notes="figures measured now on this machine; a loaded machine measures low")
