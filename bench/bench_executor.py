"""Executor benchmark: a plan's schedule against its baselines on real PyTorch modules.

Run: ``python -m cachefit.bench.bench_executor [--device cpu|cuda] [--suite quick|gpu-check]
[--l2 off|on|both] [--json PATH] [--text PATH]``

Cases
-----
``stack32``
    16 BF16 linear layers of 4096 × 4096 (32 MiB each), 16 micro-batches of
    512 tokens, planned for the device's L2 (one layer per group).
``stack8``
    16 BF16 linear layers of 2048 × 2048 (8 MiB each), same chunks: several
    layers per group, many small kernels.
``gpt2``
    the embedded GPT-2 (124M) at op granularity, batch 16 × 256 tokens, 8
    micro-batches of 2 sequences, planned for the device's L2.  Its token
    embedding (73.6 MiB in BF16) does not fit a 50 or 60 MiB L2 alone: the
    graph is tiled when ``cachefit.graphs.tile`` exists, otherwise it is
    planned for the smallest capacity at which every node fits (said in the
    output).
``tiny-llama``, ``tiny-stack`` (suite ``quick``)
    a 2-layer Llama-like model (hidden 64, planned for 96 KiB) and 8 linear
    layers of 256 × 256 (planned for 300 KiB); seconds on a CPU.

Each case runs every schedule (`cachefit.executor.run` with
``schedule="all"``: eager, batched, token-major, partition-major and, on
CUDA, partition-major-fused and partition-major-replay), once without and (``--l2 on|both``, CUDA) once with the
L2 access-policy windows.  The tables print as they finish; `--json` writes
every `RunResult` and the target checks of issue 6 in one file.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from ..memory import Intervals, as_table
from ..result import write_text_atomic
from ..units import format_bytes
from ..machine import machine_line

__all__ = ["main", "CASES", "plan_case", "targets"]

CASES = {
    "stack32": {"kind": "stack", "layers": 16, "width": 4096, "batch": 16, "seq_len": 512, "micro_batches": 16},
    "stack8": {"kind": "stack", "layers": 16, "width": 2048, "batch": 16, "seq_len": 512, "micro_batches": 16},
    "gpt2": {"kind": "instance", "name": "gpt2", "batch": 16, "seq_len": 256, "micro_batches": 8},
    "tiny-llama": {"kind": "config", "batch": 4, "seq_len": 16, "micro_batches": 4, "capacity": 96 * 2**10,
                   "config": {"model_type": "llama", "name": "tiny-llama", "hidden_size": 64,
                              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                              "intermediate_size": 128, "vocab_size": 128}},
    "tiny-stack": {"kind": "stack", "layers": 8, "width": 256, "batch": 8, "seq_len": 64, "micro_batches": 8,
                   "capacity": 300 * 2**10},
}

SUITES = {"quick": ("tiny-stack", "tiny-llama"), "gpu-check": ("stack32", "stack8", "gpt2")}


def _graph(case):
    from .. import instances
    from ..executor import linear_stack
    from ..graphs import transformer

    if case["kind"] == "stack":
        return linear_stack(case["layers"], case["width"], dtype="bf16", batch=case["batch"],
                            seq_len=case["seq_len"])
    if case["kind"] == "instance":
        return instances.load(case["name"], batch=case["batch"], seq_len=case["seq_len"], dtype="bf16",
                              granularity="op")
    return transformer(case["config"], batch=case["batch"], seq_len=case["seq_len"], dtype="bf16",
                       granularity="op")


def plan_case(graph, capacity, chunk_fraction):
    """(plan, note): the greedy plan at `capacity`; if a node does not fit alone, tiled, else with
    every oversize node run as its own group.

    The last case builds the plan here (greedy cuts of the node order, an
    oversize node alone in its group): every other group fits `capacity`,
    and the note names the groups that do not (`cachefit.check` would
    report them), so the run still measures groups that fit L2.
    """
    from .. import graphs
    from ..api import plan as make_plan
    from ..result import Plan, Status

    plan = make_plan(graph, capacity, solver="greedy", chunk_fraction=chunk_fraction)
    if plan.ok:
        return plan, ""
    tile = getattr(graphs, "tile", None)
    if callable(tile):
        try:
            tiled = tile(graph, capacity, chunk_fraction=chunk_fraction)
            plan = make_plan(tiled, capacity, solver="greedy", chunk_fraction=chunk_fraction)
            if plan.ok:
                return plan, f"tiled with cachefit.graphs.tile to fit {format_bytes(capacity)}"
        except Exception as exc:  # noqa: BLE001 - fall back, and say so
            logging.getLogger(__name__).warning("tiling failed: %s", exc)
    table = as_table(graph)
    intervals = Intervals(table, "liveness", chunk_fraction)
    groups, start, count = [], 0, len(table.ids)
    while start < count:
        end = start + 1
        while end < count and int(intervals.size(start, end + 1)) <= capacity:
            end += 1
        groups.append((start, end))
        start = end
    sizes = tuple(int(intervals.size(a, b)) for a, b in groups)
    over = [(table.ids[a], size) for (a, b), size in zip(groups, sizes) if size > capacity]
    plan = Plan(partitions=tuple(tuple(table.ids[a:b]) for a, b in groups), sizes=sizes, capacity=int(capacity),
                memory="liveness", chunk_fraction=chunk_fraction, solver="greedy, oversize nodes alone (bench)",
                status=Status.FEASIBLE, k=len(groups), lower_bound=0, bottleneck=max(sizes), wall_s=0.0,
                graph=graph)
    names = ", ".join(f"{node} ({format_bytes(size)})" for node, size in over)
    return plan, (f"no tiling available: {len(over)} group(s) exceed {format_bytes(capacity)} because one node "
                  f"does not fit alone: {names}; every other group fits")


def targets(result):
    """Issue 6's targets, checked on one `RunResult`: list of (target, value, met)."""
    found = {schedule.name: schedule for schedule in result.schedules}
    checks = []
    if "partition-major" in found and "token-major" in found:
        ratio = found["token-major"].ms_per_pass / found["partition-major"].ms_per_pass
        checks.append(("partition-major ≥ 1.2× token-major (where groups fit L2)", f"{ratio:.2f}×", ratio >= 1.2))
    best = result.best
    if best is not None and "batched" in found:
        ratio = found["batched"].ms_per_pass / best.ms_per_pass
        checks.append((f"best schedule ({best.name}) ≥ 0.95× batched", f"{ratio:.2f}×", ratio >= 0.95))
    if result.replay_overhead_us_per_group is not None:
        value = result.replay_overhead_us_per_group
        checks.append(("graph replay overhead per group ≤ 10 µs (group graphs vs one graph)", f"{value:.2f} µs",
                       value <= 10))
    if result.replay_overhead_us_per_chunk is not None:
        value = result.replay_overhead_us_per_chunk
        checks.append(("replay per chunk, overhead per group and chunk ≤ 10 µs (copies included)",
                       f"{value:.2f} µs", value <= 10))
    checks.append(("every schedule equivalent to the unpartitioned model", str(result.equivalent),
                   result.equivalent))
    return checks


def _l2_bytes(device):
    import torch

    if device == "cuda":
        return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)) or 50 * 2**20
    return 50 * 2**20


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--suite", choices=tuple(SUITES), default=None,
                        help="quick (CPU default) or gpu-check (CUDA default)")
    parser.add_argument("--cases", nargs="*", default=None, help=f"cases to run, from {', '.join(CASES)}")
    parser.add_argument("--l2", choices=("off", "on", "both"), default="both")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--json", dest="json_path", default=None, help="write all results here")
    parser.add_argument("--text", dest="text_path", default=None, help="also write the printed tables here")
    args = parser.parse_args(argv)

    from rich.console import Console

    import torch

    from ..executor import render, run

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_executor: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    console = Console(record=True, width=180)
    suite = args.suite or ("gpu-check" if args.device == "cuda" else "quick")
    names = args.cases or list(SUITES[suite])
    capacity = _l2_bytes(args.device)
    l2_modes = [False] if args.device != "cuda" or args.l2 == "off" else (
        [True] if args.l2 == "on" else [False, True])
    console.print(f"cachefit executor benchmark, device {args.device}, capacity {format_bytes(capacity)} "
                  f"(the device's L2; tiny cases use their own), machine: {machine_line()}", highlight=False)
    records, failures = [], 0
    for name in names:
        case = CASES[name]
        graph = _graph(case)
        tokens = case["batch"] * case["seq_len"]
        micro_batches = case["micro_batches"]
        fraction = 1.0 / micro_batches
        started = time.perf_counter()
        used = case.get("capacity", capacity)
        plan, note = plan_case(graph, used, fraction)
        console.print(f"\n[bold]{name}[/]: {graph.number_of_nodes()} nodes, "
                      f"{format_bytes(sum(d['weight_bytes'] for _, d in graph.nodes(data=True)))} of weights, "
                      f"{tokens} tokens per pass in {micro_batches} chunks; plan k={plan.k} "
                      f"({plan.status}) at {format_bytes(used)}" + (f"; {note}" if note else ""),
                      highlight=False)
        if not plan.ok:
            console.print(f"[red]no plan[/]: {plan.reason}")
            failures += 1
            continue
        for l2 in l2_modes:
            result = run(plan, device=args.device, micro_batches=micro_batches, schedule="all",
                         l2_persist=l2, warmup=args.warmup, iters=args.iters)
            console.print(f"[bold]{name}[/], L2 persistence {'on' if l2 else 'off'}:")
            for renderable in render(result):
                console.print(renderable)
            checks = targets(result) if args.device == "cuda" else []
            for target, value, met in checks:
                console.print(f"  target: {target}: {value} -> {'met' if met else 'NOT met'}", highlight=False)
            failures += not result.equivalent
            records.append({"case": name, "l2_persist": l2, "capacity": used, "plan_note": note,
                            "targets": [{"target": t, "value": v, "met": m} for t, v, m in checks],
                            "result": result.to_dict()})
        console.print(f"({name}: {time.perf_counter() - started:.1f} s)", highlight=False)
    if args.json_path:
        write_text_atomic(args.json_path, json.dumps({"format": "cachefit.bench.executor", "version": 1,
                                                      "device": args.device, "machine": machine_line(),
                                                      "runs": records}, indent=2, default=str) + "\n")
    if args.text_path:
        write_text_atomic(args.text_path, console.export_text())
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
