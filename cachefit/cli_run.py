"""``cachefit run``: execute a plan with PyTorch and compare it with its baselines.

Registered in the main group by ``cachefit/cli.py`` (``main.add_command(run)``);
also runs standalone as ``python -m cachefit.cli_run``.
"""

from __future__ import annotations

import sys

import click
from rich.markup import escape
from rich.table import Table

from .clikit import EXIT_NO_PLAN, EXIT_OK, console, error_console, friendly, memory_option, model_options, print_table
from .errors import InputError
from .executor.schedules import SCHEDULES

__all__ = ["run", "exit_if_rejected"]

_SCHEDULE_CHOICES = ("all", *SCHEDULES)


def _read_json(path):
    """The parsed JSON of regular file `path`, or None when it is not JSON text (a model for `load_model`).

    Read with `cachefit.limits.read_json_file`, so a file over the file-size
    limit is refused here with that limit's message.
    """
    from .limits import max_file_bytes, read_json_file

    try:
        return read_json_file(path, what="`MODEL`")
    except InputError:
        if path.stat().st_size > max_file_bytes():
            raise
        return None


def exit_if_rejected(plan):
    """Exit 1 with one line when the executor would refuse `plan` (`cachefit.executor.verify`).

    As ``cachefit check``: a plan with violations is exit 1 (a file that is
    not a plan is exit 2, from `Plan.from_json`).  Nothing is allocated.
    """
    from .executor.verify import PlanRejected, verify_execution

    try:
        verify_execution(plan)
    except PlanRejected as exc:
        error_console.print(f"[bold red]plan rejected:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(EXIT_NO_PLAN)


def _load_plan(spec, *, capacity, solver, memory, batch, seq_len, dtype, granularity, chunk_tokens,
               micro_batches, tile=False, stage=None):
    """A plan file as it is, or MODEL planned for `capacity` at the run's chunk fraction.

    A plan file is a JSON object whose ``"format"`` is ``"cachefit.plan"``,
    wherever the key stands in the file; anything else is a model.
    """
    from pathlib import Path

    from .api import plan as make_plan
    from .devices import parse_capacity
    from .loading import load_model
    from .deploy import Deployment
    from .result import PLAN_FORMAT, TWO_LEVEL_VERSION, Plan

    path = Path(spec)
    data = _read_json(path) if path.is_file() and path.suffix != ".onnx" else None
    if isinstance(data, dict) and data.get("format") == PLAN_FORMAT:
        if capacity is not None:
            raise InputError("`--capacity` applies to a MODEL; a plan file already has its capacity")
        if data.get("version") == TWO_LEVEL_VERSION:
            from .executor.stage import stage_plan

            deployment = Deployment.from_dict(data)
            failed = next((level for level in (deployment.stages, *deployment.groups) if not level.ok), None)
            return failed or stage_plan(deployment, stage)  # a failed level: "no plan" (exit 1)
        if stage is not None:
            raise InputError("`--stage` applies to a two-level plan file (version 2)")
        return Plan.from_dict(data)
    if stage is not None:
        raise InputError("`--stage` applies to a two-level plan file (version 2), not to a MODEL")
    graph = load_model(spec, batch=batch, seq_len=seq_len, dtype=dtype, granularity=granularity)
    tokens = int(graph.graph.get("batch", 1)) * int(graph.graph.get("seq_len", 1))
    if chunk_tokens is not None:
        fraction = min(1.0, chunk_tokens / tokens)
    elif micro_batches is not None:
        fraction = 1.0 / micro_batches
    else:
        fraction = 1.0
    options = {"tile": True} if tile else {}
    return make_plan(graph, parse_capacity(capacity or "h100-l2"), solver=solver, memory=memory,
                     chunk_fraction=fraction, **options)


def _with_estimate(result, plan):
    """`result` with the estimate next to each schedule's measurement (one device probe), said in a line each."""
    from .executor.calibration import with_estimate

    result = with_estimate(result, plan)
    record = result.estimate
    for name, row in record["schedules"].items():
        console.print(f"estimate ({record['device']['name']} device, probed now): {name} {row['estimate_ms']:.3f} ms "
                      f"vs measured {row['measured_ms']:.3f} ms per pass ({100 * row['error']:+.1f}%, "
                      f"{row['bound']}-bound)", highlight=False, soft_wrap=True)
    for note in record["notes"]:
        console.print(f"estimate note: {note}", highlight=False, soft_wrap=True)
    return result


#: The CPU quick check `cachefit run` makes when no schedule or pass count is given.
QUICK_SCHEDULES, QUICK_WARMUP, QUICK_PASSES = ("eager", "partition-major"), 1, 3


def _run_defaults(device, schedule, warmup, iters):
    """(schedule, warmup, iters) to run: on a CPU with none of them given, the quick check (said on
    the console, with how to ask for the full comparison); else 'all' and the executor's counts."""
    if device == "cpu" and schedule is None and warmup is None and iters is None:
        console.print(f"quick check: partition-major against eager (the reference), {QUICK_WARMUP} warm-up + "
                      f"{QUICK_PASSES} timed passes; every schedule: --schedule all --passes 10",
                      highlight=False)
        return list(QUICK_SCHEDULES), QUICK_WARMUP, QUICK_PASSES
    return schedule or "all", warmup, iters


@click.command("run")
@click.argument("model")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--micro-batches", type=int, default=None,
              help="Chunks per pass; chunk-tokens × micro-batches = batch × seq_len.")
@click.option("--schedule", type=click.Choice(_SCHEDULE_CHOICES), default=None,
              help="Which schedule(s) to run; 'all' runs the plan's and every baseline.  Default: on a CPU "
                   "a quick check, partition-major against eager (the reference); on CUDA 'all'.")
@click.option("--l2-persist", is_flag=True,
              help="CUDA: persisting-L2 window over each group's weights on its graph's kernel nodes.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write the full result as JSON here, with the estimate (cachefit.estimate on this device, "
                   "probed once) next to each schedule's measurement.")
@click.option("--capacity", "-c", default=None,
              help="For a MODEL: plan for this capacity (bytes, '50MiB', or a device such as h100-l2; "
                   "default h100-l2).")
@click.option("--solver", default="greedy", show_default=True,
              help="For a MODEL: the solver.  Default greedy, not plan's auto: a run measures execution, so it "
                   "plans in the model's order in milliseconds rather than search for the fewest groups.")
@click.option("--tile", is_flag=True, help="For a MODEL: split nodes too large for the capacity (graphs.tile).")
@memory_option(plus_kv=True)
@model_options(granularity="op", chunk_tokens="int",
               granularity_why="not plan's block: a MODEL is planned for an on-chip capacity (h100-l2 unless "
                               "--capacity), and operator nodes, the smallest, fit where whole blocks do not.")
@click.option("--compute-dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
              help="Dtype to compute in (default: the graph's on CUDA, fp32 on the CPU).")
@click.option("--warmup", type=int, default=None,
              help="Untimed passes per schedule (CPU quick check 1, CPU 2, CUDA 5).")
@click.option("--passes", "--iters", "iters", type=int, default=None,
              help="Timed passes per schedule (CPU quick check 3, CPU 10, CUDA 20).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--stage", type=int, default=None,
              help="For a two-level plan file (version 2): run this stage's on-chip plan on one device; its "
                   "received activations are seeded inputs and the reference is the stage sub-model.")
@click.option("--quiet", "-q", is_flag=True, help="No progress line (it is shown only on a terminal, on stderr).")
@friendly
def run(model, device, chunk_tokens, micro_batches, schedule, l2_persist, json_path, capacity, solver, tile, memory,
        batch, seq_len, dtype, granularity, compute_dtype, warmup, iters, seed, stage, quiet):
    """Run MODEL (a plan file, or a model to plan first) group by group and time it against its baselines.

    The plan is checked first (cachefit check, then every node's module
    bytes against its planned weight bytes; nothing is allocated before),
    and every schedule's output against the unpartitioned model's.  Exit
    codes: 0 all outputs equivalent, 1 no plan, a plan the checks reject or
    an output differs, 2 bad input.

    On a CPU, with no --schedule, --warmup or --passes, the run is a quick
    check: partition-major against eager, 1 warm-up and 3 timed passes.
    The full comparison of every schedule: --schedule all --passes 10.
    Progress (per schedule and pass) goes to stderr on a terminal; --quiet
    silences it.
    """
    from .executor.verify import PlanRejected, verify_plan
    from .progress import cli_reporter, reporting
    from .units import format_bytes

    # Input first, torch after: a bad file or a plan the checker rejects is answered without importing torch.
    try:
        plan = _load_plan(model, capacity=capacity, solver=solver, memory=memory, batch=batch, seq_len=seq_len,
                          dtype=dtype, granularity=granularity, chunk_tokens=chunk_tokens,
                          micro_batches=micro_batches, tile=tile, stage=stage)
        if plan.ok:
            verify_plan(plan)
    except PlanRejected as exc:  # a plan whose check fails: as `cachefit check`, exit 1
        error_console.print(f"[bold red]plan rejected:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(EXIT_NO_PLAN)
    if not plan.ok:
        error_console.print(f"[red]no plan[/]: {plan.status}: {plan.reason}", highlight=False, soft_wrap=True)
        sys.exit(EXIT_NO_PLAN)
    try:
        import torch  # noqa: F401
    except ImportError:
        raise InputError("`cachefit run` needs PyTorch: pip install 'cachefit[torch]'") from None
    from .executor import render
    from .executor import run as execute

    exit_if_rejected(plan)
    console.print(f"plan: {plan.k} group(s) ({plan.solver}, {plan.status}) within "
                  f"{format_bytes(plan.capacity)}; running on {device}", highlight=False)
    schedule, warmup, iters = _run_defaults(device, schedule, warmup, iters)
    with reporting(cli_reporter(quiet)):
        result = execute(plan, device=device, chunk_tokens=chunk_tokens, micro_batches=micro_batches,
                         schedule=schedule, l2_persist=l2_persist, seed=seed, dtype=compute_dtype,
                         warmup=warmup, iters=iters)
    for renderable in render(result):
        if isinstance(renderable, Table):
            print_table(renderable)  # never cut to "bloc…" when piped
        else:
            console.print(renderable)
    if json_path:
        result = _with_estimate(result, plan)
        result.to_json(json_path)
        console.print(f"result written to {json_path}", highlight=False)
    sys.exit(EXIT_OK if result.equivalent else EXIT_NO_PLAN)


if __name__ == "__main__":  # pragma: no cover
    run()
