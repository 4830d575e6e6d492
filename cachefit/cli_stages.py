"""``cachefit stages`` and ``cachefit pipeline``: plan pipeline stages, and run them on PyTorch's runtime.

Registered in the main group by ``cachefit/cli.py``; also runs standalone as
``python -m cachefit.cli_stages stages|pipeline ...``.
"""

from __future__ import annotations

import os
import sys

import click
from rich.table import Table
from rich.text import Text

from .clikit import (EXIT_NO_PLAN, EXIT_OK, console, error_console, friendly, memory_option, model_options,
                     print_table)
from .errors import CachefitError, InputError
from .units import format_bytes, format_count

__all__ = ["stages_command", "pipeline_command", "stage_table"]


def stage_table(plan, *, title=None):
    """The rich table of a stage plan: stage, first .. last, nodes, params, flops, bytes, % of capacity."""
    flops = plan.stats.get("flops") or [0] * plan.k
    params = plan.stats.get("params") or [0] * plan.k
    table = Table(title=title)
    for column in ("stage", "first .. last", "nodes", "params", "flops", "bytes", "% of capacity"):
        table.add_column(column, justify="left" if column.startswith("first") else "right",
                         no_wrap=column.startswith("first"))
    for index, (group, size) in enumerate(zip(plan.partitions, plan.sizes)):
        span = group[0] if len(group) == 1 else f"{group[0]} .. {group[-1]}"
        table.add_row(str(index), Text(span), str(len(group)), format_count(params[index]),
                      format_count(flops[index], "FLOP"), format_bytes(size),
                      f"{100 * size / plan.capacity:.1f}%")
    return table


@click.command("stages")
@click.argument("model")
@click.option("--devices", "-n", type=int, required=True, help="Number of pipeline stages, one per device.")
@click.option("--device-capacity", required=True,
              help="Memory of one device: a name (h100-hbm, h200-hbm, a100-hbm) or bytes ('80GB', '75GiB').")
@click.option("--reserve", default="0", show_default=True,
              help="Bytes kept free on every device (KV cache, workspace), e.g. 10GiB.")
@click.option("--balance", type=click.Choice(["flops", "memory"]), default="flops", show_default=True,
              help="Minimise the largest stage's flops or its bytes (every stage fits either way).")
@memory_option()
@click.option("--solver", default="dp", show_default=True,
              help="dp keeps the execution order (what a pipeline runtime needs) and is exact for it.")
@model_options
@click.option("--time-limit", type=float, default=None, help="Seconds for solvers that search.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write the stage plan (self-contained JSON, runnable with `cachefit pipeline`) here.")
@friendly
def stages_command(model, devices, device_capacity, reserve, balance, memory, solver, batch, seq_len, dtype,
                   granularity, time_limit, json_path):
    """Cut MODEL into DEVICES pipeline stages that each fit one device, balanced by compute."""
    from .loading import load_model
    from .stages import format_device, stages

    graph = load_model(model, batch=batch, seq_len=seq_len, dtype=dtype, granularity=granularity)
    name = graph.graph.get("name", model)
    plan = stages(graph, devices=devices, device_capacity=device_capacity, balance=balance, reserve=reserve,
                  memory=memory, solver=solver, time_limit_s=time_limit)
    stats = plan.stats
    total, reserved = stats["device_capacity"], stats["reserve"]
    console.print(f"[bold]{name}[/]: {graph.number_of_nodes()} nodes, {graph.number_of_edges()} edges; "
                  f"{devices} device(s) of {format_device(total)} − {format_bytes(reserved)} reserve = "
                  f"{format_bytes(plan.capacity)} each", highlight=False)
    if plan.ok:
        print_table(stage_table(plan, title=f"{plan.k} stage(s), balanced by {balance}"))
        mean_flops = sum(stats["flops"]) / plan.k
        mean_bytes = sum(plan.sizes) / plan.k
        status = f"{plan.status} ({plan.solver}"
        if plan.status != "OPTIMAL" and stats.get("balance_optimal_for_order"):
            status += "; the balance is optimal for the model's execution order"
        minimised = {"flops": " (minimised)", "memory": ""}
        summary = [
            ("status", status + ")"),
            ("largest stage flops", f"{format_count(stats['bottleneck_flops'], 'FLOP')}, "
                                    f"{stats['bottleneck_flops'] / mean_flops:.3f} × the mean" + minimised[balance]
             if mean_flops else f"{format_count(0, 'FLOP')} (no node has flops)"),
            ("largest stage bytes", f"{format_bytes(plan.bottleneck)}, {plan.bottleneck / mean_bytes:.3f} × the "
                                    f"mean, {100 * plan.bottleneck / plan.capacity:.1f}% of capacity"
                                    + ("" if balance == "flops" else " (minimised)")),
        ]
    else:
        summary = [("status", f"[red]{plan.status}[/] ({plan.solver})"), ("reason", plan.reason)]
    fewest = stats.get("min_devices")
    summary.append(("smallest device count that fits",
                    "none (a node exceeds one device)" if fewest is None else
                    f"{fewest} (in the model's execution order)"))
    summary.append(("capacity per stage", f"{format_bytes(plan.capacity)} ({plan.capacity:,} B)"))
    summary.append(("memory model", memory))
    summary.append(("time", f"{plan.wall_s * 1000:.1f} ms"))
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    for key, value in summary:
        grid.add_row(key, Text.from_markup(value) if value.startswith("[red]") else Text(value))
    console.print(grid)
    if json_path and plan.ok:
        plan.to_json(json_path)
        console.print(f"stage plan written to {json_path}", highlight=False)
    sys.exit(EXIT_OK if plan.ok else EXIT_NO_PLAN)


def _pipeline_table(result):
    table = Table(title=f"{result.stages} stage(s), {result.schedule}, {result.microbatches} micro-batch(es), "
                        f"{result.backend} on {result.device}")
    for column in ("stage", "first .. last", "nodes", "params", "bytes", "flops", "busy ms", "step ms", "idle"):
        table.add_column(column, justify="left" if column.startswith("first") else "right",
                         no_wrap=column.startswith("first"))
    for stage in result.stage_reports:
        span = stage.first if stage.nodes == 1 else f"{stage.first} .. {stage.last}"
        table.add_row(str(stage.index), Text(span), str(stage.nodes), format_count(stage.params),
                      format_bytes(stage.planned_bytes), format_count(stage.flops, "FLOP"),
                      f"{stage.busy_ms:.2f}", f"{stage.step_ms:.2f}", f"{100 * stage.idle_fraction:.0f}%")
    return table


#: What `cachefit pipeline` says when it runs the stage level of a two-level plan, per `--inner`.
TWO_LEVEL_LINES = {
    "node-order": ("two-level plan: running its {n} stage(s) (the stage level, both levels checked first); inside "
                   "a stage each micro-batch runs the stage's nodes in order, not group by group (--inner "
                   "partition-major runs the on-chip groups group by group over all micro-batches)"),
    "partition-major": ("two-level plan: running its {n} stage(s) (both levels checked first); inside a stage the "
                        "on-chip groups run one after another, each over all micro-batches of the step (the stage "
                        "holds them all, so the stages do not overlap within a step)"),
}


def _stage_level(plan_file, inner="node-order"):
    """The plan `cachefit pipeline` runs and its stages' on-chip groups (None unless `inner` is partition-major).

    A version-1 plan runs as it is; of a version-2 plan, the stage level.
    A version-2 plan is checked at both levels and their link first
    (`cachefit.check`); a rejection exits 1 with one line, as `cachefit run`.
    """
    from .deploy import Deployment
    from .result import read_plan

    plan = read_plan(plan_file)
    if not isinstance(plan, Deployment):
        if inner == "partition-major":
            raise InputError("`--inner partition-major` runs the on-chip groups of a two-level plan (version 2, "
                             "`cachefit plan MODEL --devices N ...`); this is a single-level plan")
        return plan, None
    if not plan.ok:
        failed = next(level for level in (plan.stages, *plan.groups) if not level.ok)
        return failed, None
    from .checker import check

    report = check(plan)
    if not report.ok:
        more = len(report.violations) - 1
        error_console.print(f"[bold red]plan rejected:[/] `plan` fails cachefit.check: {report.violations[0]}"
                            + (f" (and {more} more)" if more else ""), highlight=False, soft_wrap=True)
        sys.exit(EXIT_NO_PLAN)
    console.print(TWO_LEVEL_LINES[inner].format(n=plan.stages.k), highlight=False, soft_wrap=True)
    if inner == "node-order":
        return plan.stages, None
    from .executor.stage import inner_groups

    groups = inner_groups(plan)
    planned, run = [group.k for group in plan.groups], [len(stage) for stage in groups]
    if planned != run:
        console.print(f"on-chip groups per stage as planned: {', '.join(map(str, planned))}; as run: "
                      f"{', '.join(map(str, run))} (a tiled node or an expanded block runs whole, in the last group "
                      "holding a piece of it, so a group as run may hold more than the on-chip capacity)",
                      highlight=False, soft_wrap=True)
    return plan.stages, groups


@click.command("pipeline")
@click.argument("plan_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--schedule", type=click.Choice(["gpipe", "1f1b"]), default="gpipe", show_default=True)
@click.option("--microbatches", "-m", type=int, required=True, help="Micro-batches per step.")
@click.option("--backend", type=click.Choice(["gloo", "nccl"]), default="gloo", show_default=True,
              help="gloo: every stage on the CPU; nccl: stage i on GPU i.")
@click.option("--warmup", type=int, default=1, show_default=True, help="Untimed steps.")
@click.option("--iters", type=int, default=3, show_default=True, help="Timed steps.")
@click.option("--timeout", "timeout_s", type=float, default=300.0, show_default=True,
              help="Seconds before the run is stopped (processes and collectives).")
@click.option("--threads", type=int, default=1, show_default=True, help="torch threads per stage process.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the weights and the inputs.")
@click.option("--compute-dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
              help="Dtype to compute in (default fp32 on the CPU, the graph's on CUDA).")
@click.option("--inner", type=click.Choice(["node-order", "partition-major"]), default="node-order",
              show_default=True,
              help="Inside a stage of a two-level plan: each micro-batch through the stage's nodes in order "
                   "(stages overlap), or the on-chip groups one after another over all micro-batches (each "
                   "group's weights read once per step; no overlap within a step).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write the result as JSON here.")
@friendly
def pipeline_command(plan_file, schedule, microbatches, backend, warmup, iters, timeout_s, threads, seed,
                     compute_dtype, inner, json_path):
    """Run the stages of PLAN_FILE on torch.distributed.pipelining, one process per stage, and check them.

    Started plainly, it spawns one process per stage on this machine
    (127.0.0.1).  Started by torchrun (RANK and WORLD_SIZE set, one process
    per stage, any number of nodes), each process runs its own stage and the
    last one reports.  The plan is checked first (cachefit check, then every
    node's module bytes against its planned weight bytes).  Exit codes: 0
    the output equals the single-process model's, 1 it differs, the run
    failed or the checks reject the plan, 2 bad input.  The stage processes
    end with this one, however it ends.
    """
    plan, groups = _stage_level(plan_file, inner)  # the file first: bad input is answered without importing torch
    if not plan.ok:
        error_console.print(f"[red]no plan[/]: {plan.status}: {plan.reason}", highlight=False, soft_wrap=True)
        sys.exit(EXIT_NO_PLAN)
    try:
        import torch  # noqa: F401
    except ImportError:
        raise InputError("`cachefit pipeline` needs PyTorch: pip install 'cachefit[torch]'") from None
    from .cli_run import exit_if_rejected
    from .executor.pipeline import run_pipeline, under_torchrun

    exit_if_rejected(plan)
    torchrun = under_torchrun()
    last = not torchrun or int(os.environ["RANK"]) == int(os.environ["WORLD_SIZE"]) - 1
    name = plan.graph.graph.get("name", plan_file)
    if last:
        where = "torchrun ranks" if torchrun else "processes on 127.0.0.1"
        console.print(f"{name}: {plan.k} stage(s) from {plan_file}; {plan.k} {where}, {backend}",
                      highlight=False)
    try:
        result = run_pipeline(plan, schedule=schedule, microbatches=microbatches, backend=backend, seed=seed,
                              dtype=compute_dtype, warmup=warmup, iters=iters, timeout_s=timeout_s,
                              threads=threads, launcher="torchrun" if torchrun else "spawn", inner=groups)
    except InputError:
        raise
    except CachefitError as exc:
        error_console.print(f"[bold red]run failed:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(EXIT_NO_PLAN)
    if result is None:  # a torchrun rank other than the last
        sys.exit(EXIT_OK)
    print_table(_pipeline_table(result))
    lines = [
        "busy: the stage's forward over all micro-batches; step: barrier to the stage's end; idle: "
        "1 − busy / slowest step",
        f"step: {result.makespan_ms:.2f} ms median (min {result.makespan_min_ms:.2f}, max "
        f"{result.makespan_max_ms:.2f}) over {result.iters} step(s) after {result.warmup} warm-up; "
        f"{result.tokens:,} tokens per step, {result.tokens_per_s:,.0f} tokens/s",
        f"bubble: {100 * result.bubble_theoretical:.1f}% in theory ("
        + (f"(S−1)/S = {result.stages - 1}/{result.stages}: partition-major stages hold the whole step"
           if groups is not None else
           f"(S−1)/(M+S−1) = {result.stages - 1}/{result.microbatches + result.stages - 1}")
        + f"), {100 * result.bubble_measured:.1f}% measured (mean idle share of the stages)",
        result.equivalence_line,
        *(f"note: {note}" for note in result.notes),
    ]
    console.print(Text("\n".join(lines)), highlight=False)
    if json_path:
        result.to_json(json_path)
        console.print(f"result written to {json_path}", highlight=False)
    sys.exit(EXIT_OK if result.equivalent else EXIT_NO_PLAN)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def _standalone():
    """cachefit stages and pipeline (standalone)."""


_standalone.add_command(stages_command)
_standalone.add_command(pipeline_command)


if __name__ == "__main__":  # pragma: no cover
    _standalone()
