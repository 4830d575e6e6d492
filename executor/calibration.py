"""The estimate next to the measurement: `cachefit.estimate` of a plan against the `RunResult` of running it.

`estimate_record` probes the device the run used once
(`cachefit.estimate.measure_device`: copy bandwidth and a GEMM), estimates
the plan on those figures, and pairs each estimated schedule
(partition-major, token-major, batched) with the run's median ms per pass,
as ``bench/bench_estimate.py`` does.  The error is (estimate − measured) /
measured: negative means the roofline floor is below the run.
"""

from __future__ import annotations

import dataclasses
import logging

__all__ = ["estimate_record", "with_estimate"]

logger = logging.getLogger(__name__)

#: Schedules that `cachefit.estimate` models, by the executor's schedule names.
ESTIMATED = ("partition-major", "token-major", "batched")


def estimate_record(plan, result, figures=None):
    """Per schedule: the estimated and measured ms per pass and the relative error.

    Parameters
    ----------
    plan : cachefit.Plan
        The plan that ran (for a two-level plan, the stage's on-chip plan).
    result : RunResult
        Its run.
    figures : cachefit.devices.Device, optional
        Device figures; default: measured now on the run's device (one probe).

    Returns
    -------
    dict
        ``device`` (name and figures), ``chunks`` (the estimate's, from the
        plan's chunk fraction), ``run_chunks``, ``notes`` and ``schedules``:
        name -> ``{"estimate_ms", "measured_ms", "error", "bound"}`` for each
        schedule that both ran and is estimated.
    """
    from ..estimate import estimate, measure_device

    figures = measure_device(result.device) if figures is None else figures
    predicted = estimate(plan, figures)
    rows = {}
    for item in predicted.schedules:
        ran = next((s for s in result.schedules if s.name == item.schedule), None)
        if ran is None or item.schedule not in ESTIMATED:
            continue
        ms = item.time_s * 1e3
        rows[item.schedule] = {"estimate_ms": ms, "measured_ms": ran.ms_per_pass,
                               "error": (ms - ran.ms_per_pass) / ran.ms_per_pass, "bound": item.bound}
    notes = []
    if predicted.chunks != result.micro_batches:
        notes.append(f"the estimate counts {predicted.chunks} chunk(s) per pass (the plan's chunk fraction), "
                     f"the run streamed {result.micro_batches}")
    graph_dtype = str(plan.graph.graph.get("dtype", "")) if plan.graph is not None else ""
    if graph_dtype and graph_dtype != result.dtype.replace("float32", "fp32").replace("bfloat16", "bf16") \
            .replace("float16", "fp16"):
        notes.append(f"the estimate counts the graph's {graph_dtype} bytes, the run computed in {result.dtype}")
    device = {"name": figures.name, "memory_bandwidth": figures.memory_bandwidth,
              "on_chip_bandwidth": figures.on_chip_bandwidth, "peak_flops": figures.peak_flops}
    return {"device": device, "chunks": predicted.chunks, "run_chunks": result.micro_batches,
            "notes": notes, "schedules": rows}


def with_estimate(result, plan, figures=None):
    """`result` with its ``estimate`` field set to `estimate_record` (a new RunResult)."""
    return dataclasses.replace(result, estimate=estimate_record(plan, result, figures))
