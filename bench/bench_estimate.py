"""Calibration: `cachefit.estimate` against `cachefit.executor.run`, schedule by schedule.

Run: ``python -m cachefit.bench.bench_estimate [--device cpu|cuda] [--preset h100] [--json PATH]``

For each case the plan is made with the chunk fraction 1 / micro-batches,
run by the executor (partition-major, token-major, batched; fp32 on the CPU,
the graph's dtype on CUDA), and estimated with the device measured on the
machine at hand (`cachefit.estimate.measure_device`: copy-bandwidth and
GEMM probes) and, with ``--preset``, with a preset's figures.  The error is
(estimate − measured) / measured per schedule: negative means the roofline
floor is below the run, which is what a floor should be.

Cases
-----
``stack``
    8 linear layers of 512 × 512, 8 sequences × 256 tokens in 8
    micro-batches, planned for 3 MiB (fp32: 2 layers per group).
``llama``
    a 4-block Llama-like model (hidden 256, MLP 704, 8 heads, 4 KV heads) at
    op granularity, 8 × 128 tokens in 8 micro-batches, planned for 2 MiB.
``tiny``
    4 linear layers of 64 × 64 (a smoke test).
"""

from __future__ import annotations

import argparse
import json
import sys

from ..result import write_text_atomic

__all__ = ["CASES", "DEFAULT_CASES", "calibrate", "main"]

CASES = {
    "stack": {"kind": "stack", "layers": 8, "width": 512, "batch": 8, "seq_len": 256, "micro_batches": 8,
              "capacity": 3 * 2**20},
    "llama": {"kind": "config", "batch": 8, "seq_len": 128, "micro_batches": 8, "capacity": 2 * 2**20,
              "config": {"model_type": "llama", "name": "calib-llama", "hidden_size": 256, "num_hidden_layers": 4,
                         "num_attention_heads": 8, "num_key_value_heads": 4, "intermediate_size": 704,
                         "vocab_size": 512}},
    "tiny": {"kind": "stack", "layers": 4, "width": 64, "batch": 2, "seq_len": 16, "micro_batches": 2,
             "capacity": 40 * 2**10},
}

#: The cases `main` runs by default (``tiny`` is for tests).
DEFAULT_CASES = ("stack", "llama")

_SCHEDULES = ("partition-major", "token-major", "batched")


def _graph(case, dtype):
    from ..executor import linear_stack
    from ..graphs import transformer

    if case["kind"] == "stack":
        return linear_stack(case["layers"], case["width"], dtype=dtype, batch=case["batch"], seq_len=case["seq_len"])
    return transformer(case["config"], batch=case["batch"], seq_len=case["seq_len"], dtype=dtype, granularity="op")


def calibrate(name, *, device="cpu", presets=(), iters=3):
    """Rows (case, schedule, device figures, estimated ms, measured ms, error) for case `name`."""
    from ..api import plan as make_plan
    from ..estimate import estimate, measure_device
    from ..executor import run

    case = CASES[name]
    dtype = "fp32" if device == "cpu" else "bf16"
    graph = _graph(case, dtype)
    plan = make_plan(graph, case["capacity"], solver="greedy", chunk_fraction=1 / case["micro_batches"])
    if not plan.ok:
        raise RuntimeError(f"case {name}: no plan: {plan.reason}")
    result = run(plan, device=device, micro_batches=case["micro_batches"], schedule=list(_SCHEDULES), dtype=dtype,
                 warmup=1, iters=iters)
    measured = {item.name: item.ms_per_pass for item in result.schedules}
    rows = []
    for figures in (measure_device(device), *presets):
        predicted = estimate(plan, figures)
        for item in predicted.schedules:
            ms = item.time_s * 1e3
            rows.append({"case": name, "k": plan.k, "chunks": predicted.chunks, "device": predicted.device.name,
                         "schedule": item.schedule, "estimate_ms": ms, "measured_ms": measured[item.schedule],
                         "error": (ms - measured[item.schedule]) / measured[item.schedule], "bound": item.bound,
                         "equivalent": next(s.equivalent for s in result.schedules if s.name == item.schedule)})
    return rows, predicted.assumptions


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m cachefit.bench.bench_estimate", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--preset", action="append", default=[], help="Also estimate with a preset's figures.")
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES))
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    rows = []
    print(f"{'case':6} {'k':>4} {'chunks':>6} {'device':9} {'schedule':16} {'estimate':>11} {'measured':>11} "
          f"{'error':>8}  bound")
    for name in args.cases.split(","):
        case_rows, _ = calibrate(name, device=args.device, presets=tuple(args.preset), iters=args.iters)
        for row in case_rows:
            print(f"{row['case']:6} {row['k']:>4} {row['chunks']:>6} {row['device']:9} {row['schedule']:16} "
                  f"{row['estimate_ms']:>8.3f} ms {row['measured_ms']:>8.3f} ms {100 * row['error']:>+7.1f}%  "
                  f"{row['bound']}{'' if row['equivalent'] else '  (NOT equivalent)'}", flush=True)
        rows += case_rows
    if args.json:
        write_text_atomic(args.json, json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
