"""The `cachefit` command line.

Exit codes: 0 success, 1 no plan (INFEASIBLE/UNKNOWN) or a plan with
violations, 2 bad input.  Bad input never prints a Python traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.table import Table
from rich.text import Text

from .cli_show import plot_option, print_advice, write_pictures
from .clikit import (EXIT_NO_PLAN, EXIT_OK, OneLineGroup, console, friendly, kv_default, memory_option,
                     model_options, print_table, stream_options, write_plan)
from .errors import InputError
from .progress import cli_reporter, reporting, task
from .units import format_bytes, format_count


@click.group(cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cachefit")
def main():
    """Cut a neural network into ordered groups that each fit on-chip memory."""


@main.command()
@click.option("--sources", is_flag=True, help="Also show where each model's figures come from.")
@friendly
def models(sources):
    """List the embedded models (no download)."""
    from . import instances

    table = Table(title="embedded models (BF16 weights)")
    table.add_column("name")
    for column in ("params", "weight bytes", "layers"):
        table.add_column(column, justify="right")
    if sources:
        table.add_column("source", overflow="fold")
    for name in instances.names():
        info = instances.info(name)
        row = [name, f"{info['params']:,}", format_bytes(info["weight_bytes"], binary=False), str(info["layers"])]
        table.add_row(*row, *([Text(str(info["source"]))] if sources else []))
    console.print(table)


def _bytes_both(num_bytes):
    text = format_bytes(num_bytes)
    return text if num_bytes < 1024 else f"{text} ({num_bytes:,} B)"


def print_plan(plan, *, max_rows=40):
    """Print a plan's groups and summary as tables."""
    from .result import Status

    if plan.ok:
        table = Table(title=f"{plan.k} group(s), capacity {format_bytes(plan.capacity)}")
        for column in ("group", "first .. last node", "nodes", "size", "% of capacity"):  # node names never wrap
            table.add_column(column, justify="left" if column.startswith("first") else "right",
                             no_wrap=column.startswith("first"))
        rows = list(enumerate(zip(plan.partitions, plan.sizes)))
        shown = rows if len(rows) <= max_rows else rows[: max_rows - 5] + [None] + rows[-5:]
        for row in shown:
            if row is None:
                table.add_row("…", f"{len(rows) - max_rows + 4} more groups", "", "", "")
                continue
            index, (group, size) = row
            span = group[0] if len(group) == 1 else f"{group[0]} .. {group[-1]}"
            table.add_row(str(index), Text(span), str(len(group)), format_bytes(size),
                          f"{100 * size / plan.capacity:.1f}%")
        print_table(table)
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column()
    colour = {Status.OPTIMAL: "green", Status.FEASIBLE: "yellow"}.get(plan.status, "red")
    summary.add_row("status", f"[{colour}]{plan.status}[/]")
    summary.add_row("solver", plan.solver + (f" (auto chose {plan.stats['auto']})" if "auto" in plan.stats else ""))
    summary.add_row("k", str(plan.k))
    summary.add_row("lower bound", str(plan.lower_bound))
    if plan.ok:
        summary.add_row("bottleneck", _bytes_both(plan.bottleneck))
        if plan.stats.get("balance") == "flops":
            summary.add_row("largest group flops", format_count(plan.stats["bottleneck_flops"], "FLOP") + " (minimised)")
        summary.add_row("balance", f"{plan.balance:.3f} (largest / mean group)" if plan.balance else "-")
    summary.add_row("memory model", plan.memory + (f", chunk fraction {plan.chunk_fraction:g}"
                                                   if plan.memory.startswith("liveness") else ""))
    summary.add_row("capacity", _bytes_both(plan.capacity))
    summary.add_row("time", f"{plan.wall_s * 1000:.1f} ms")
    if plan.reason:
        summary.add_row("reason", Text(plan.reason))
    console.print(summary)


@main.command("plan")
@click.argument("model")
@click.option("--capacity", "-c", required=True,
              help="Bytes ('50MiB', '50MB', 4096) or a device: h100-l2, h200-l2, a100-l2, h100-hbm, ...")
@click.option("--solver", default="auto", show_default=True,
              help="A registered solver (see `cachefit solvers`), or 'all' to run every one side by side.")
@memory_option()
@click.option("--chunk-fraction", type=float, default=1.0, show_default=True,
              help="Fraction of the activations resident at once (liveness model).")
@model_options
@click.option("--k", "k", type=int, default=None, help="Exactly k groups, balanced (default: the fewest).")
@click.option("--dims", default=None, metavar="NAME=N,...",
              help="Sizes of an ONNX file's dynamic dimensions, e.g. --dims batch=1,seq=128.")
@click.option("--balance", default="memory", show_default=True, type=click.Choice(["memory", "flops"]),
              help="Once k is fixed, minimise the largest group's bytes or its flops (groups still fit in bytes).")
@click.option("--time-limit", type=float, default=None, help="Seconds for solvers that search.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write the plan (self-contained JSON) here.")
@click.option("--tile", is_flag=True, default=False,
              help="Split layers too large for the capacity into tiles that fit (matmul-like ops).")
@stream_options(decode=True, kv=True, chunk_tokens="auto")
@click.option("--devices", type=int, default=None,
              help="Two levels: pipeline stages across N devices (KV counted, balanced by flops), "
                   "the fewest on-chip groups of --capacity inside each; needs --device-capacity.")
@click.option("--device-capacity", default=None, help="Memory of one device with --devices: bytes or a name (h100-hbm).")
@click.option("--reserve", default="0", show_default=True, help="Bytes kept free on every device (with --devices).")
@plot_option
@click.option("--quiet", "-q", is_flag=True, default=False, help="No progress lines (they go to stderr on a terminal).")
@friendly
def plan_command(model, capacity, solver, memory, chunk_fraction, batch, seq_len, dtype, granularity, k, dims, balance,
                 time_limit, json_path, tile, chunk_tokens, plot, dot, quiet, phase, context, kv=None,
                 devices=None, device_capacity=None, reserve="0"):
    """Plan MODEL for a capacity.

    \b
    MODEL is one of:
      an embedded model name   (`cachefit models` lists them; nothing is downloaded)
      an HF config.json        (a local file; --batch, --seq-len, --dtype, --granularity apply)
      an .onnx file            (--dims names its dynamic dimensions)
      a plan file              (cachefit plan --json ...: its graph is planned again)
      a node-link graph .json  (networkx node-link data with the byte attributes)
      a .json list of layers   (byte sizes, or objects with weight_bytes, ...)

    With --devices N --device-capacity C, the plan has two levels: N pipeline
    stages (one per device) and the fewest on-chip groups inside each; the
    --json file is then a version-2 plan file.
    """
    from .memory import with_kv

    memory = with_kv(memory, kv_default(kv, model))
    two_level = {"devices": devices, "device_capacity": device_capacity, "reserve": reserve}
    with reporting(cli_reporter(quiet)):
        _plan_command(model, capacity, solver, memory, chunk_fraction, batch, seq_len, dtype, granularity, k, dims,
                      balance, time_limit, json_path, tile, chunk_tokens, plot, dot, phase, context, two_level)


def _plan_command(model, capacity, solver, memory, chunk_fraction, batch, seq_len, dtype, granularity, k, dims,
                  balance, time_limit, json_path, tile, chunk_tokens, plot, dot, phase="prefill", context=None,
                  two_level=None):
    from .api import plan as make_plan
    from .devices import parse_capacity
    from .loading import load_model, parse_dims

    capacity = parse_capacity(capacity)
    graph = load_model(model, batch=batch, seq_len=seq_len, dtype=dtype, granularity=granularity,
                       dims=parse_dims(dims) if dims else None, phase=phase, context=context)
    if phase != "prefill" or context:
        from .cli_estimate import print_kv
        print_kv(graph, model, memory=memory)
    name = Path(model).stem if Path(model).exists() else graph.graph.get("name", model)  # a file: its name
    console.print(f"[bold]{name}[/]: {graph.number_of_nodes()} nodes, "
                  f"{graph.number_of_edges()} edges", highlight=False)
    if chunk_tokens is not None and chunk_tokens != "auto":
        if not chunk_tokens.isdigit():
            raise InputError(f"`--chunk-tokens` must be a positive integer or 'auto', got {chunk_tokens!r}")
        chunk_tokens = int(chunk_tokens)
    if solver == "all" and (plot or dot):
        raise InputError("`--plot` and `--dot` draw one plan: give `--solver NAME`, not 'all'")
    if two_level and (two_level["devices"] is not None or two_level["device_capacity"] is not None):
        sys.exit(_plan_devices(graph, name, capacity, solver=solver, memory=memory, chunk_fraction=chunk_fraction,
                               k=k, time_limit=time_limit, tile=tile, chunk_tokens=chunk_tokens, balance=balance,
                               json_path=json_path, pictures=bool(plot or dot), **two_level))
    if solver == "all":
        sys.exit(compare_solvers(graph, capacity, memory=memory, chunk_fraction=chunk_fraction, k=k,
                                 time_limit_s=time_limit, tile=tile, chunk_tokens=chunk_tokens, json_path=json_path,
                                 balance=balance))
    with task(f"planning {name}"):
        result = make_plan(graph, capacity, solver=solver, memory=memory, chunk_fraction=chunk_fraction, k=k,
                           time_limit_s=time_limit, tile=tile, chunk_tokens=chunk_tokens, balance=balance)
    if tile:
        expanded = result.stats["expanded_blocks"]
        console.print((f"split {expanded} whole-block node(s) into their operators; " if expanded else "")
                      + f"tiled {result.stats['tiled_nodes']} node(s) into {result.stats['tiles']} tiles; "
                      f"{len(result.stats['untiled'])} oversize node(s) could not be tiled", highlight=False)
    if chunk_tokens is not None:
        tokens = graph.graph["batch"] * graph.graph["seq_len"]
        console.print(f"chunk: {result.stats['chunk_tokens']:,} of {tokens:,} tokens per pass "
                      f"(fraction {result.chunk_fraction:.6g})", highlight=False)
    if tile or chunk_tokens is not None:
        console.print(f"tiling and chunk search took {result.stats['prepare_s'] * 1000:.1f} ms "
                      "(not in the solver time below)", highlight=False)
    if result.ok:
        from .cli_estimate import print_prefix_kv
        print_prefix_kv(result, memory=memory)
    print_plan(result)
    if result.status == "INFEASIBLE":
        print_advice(click.get_current_context(), graph, result)
    if not result.ok:
        write_pictures(result, plot=plot, dot=dot)  # says that there is nothing to draw
    if json_path:
        write_plan(result, json_path)
    if result.ok:
        write_pictures(result, plot=plot, dot=dot, title=name)
    sys.exit(EXIT_OK if result.ok else EXIT_NO_PLAN)


def _plan_devices(graph, name, capacity, *, devices, device_capacity, reserve, solver, memory, chunk_fraction, k,
                  time_limit, tile, chunk_tokens, balance, json_path, pictures):
    """`plan --devices N --device-capacity C`: the two-level plan, both levels checked; returns the exit code."""
    from .api import plan as make_plan
    from .cli_estimate import print_deployment

    for given, flag in ((solver == "all", "--solver all"), (k is not None, "--k"), (pictures, "--plot/--dot")):
        if given:
            raise InputError(f"`{flag}` applies to a single-level plan, not with `--devices`")
    with task(f"planning {name} on {devices} device(s)"):
        result = make_plan(graph, capacity, solver=solver, memory=memory, chunk_fraction=chunk_fraction,
                           time_limit_s=time_limit, tile=tile, chunk_tokens=chunk_tokens, balance=balance,
                           devices=devices, device_capacity=device_capacity, reserve=reserve)
    if tile and result.groups:
        tiled = sum(group.stats.get("tiled_nodes", 0) for group in result.groups)
        untiled = sum(len(group.stats.get("untiled", ())) for group in result.groups)
        console.print(f"tiled {tiled} node(s) over all stages; {untiled} oversize node(s) could not be tiled",
                      highlight=False)
    reports = print_deployment(result)
    if result.stages.ok and not result.ok:  # an on-chip level failed: the same planned advice as one level
        print_advice(click.get_current_context(), graph, result)
    if json_path:
        write_plan(result, json_path)
    return EXIT_OK if result.ok and all(reports) else EXIT_NO_PLAN


def compare_solvers(graph, capacity, *, memory, chunk_fraction, k, time_limit_s, tile, chunk_tokens, json_path,
                    balance="memory"):
    """`plan --solver all`: every solver on the same (tiled, chunked) problem, side by side.

    Returns the exit code.  With `json_path`, the best plan (fewest groups,
    then smallest bottleneck) is written.  Only plans that `cachefit.check`
    accepts compete: a solver's plan with a violation is shown, never chosen.
    """
    from .api import plan as make_plan
    from .checker import check
    from .solvers import compare

    if tile or chunk_tokens is not None:  # prepare once (tiling, chunk choice), then compare on that problem
        prepared = make_plan(graph, capacity, solver="greedy", memory=memory, chunk_fraction=chunk_fraction,
                             tile=tile, chunk_tokens=chunk_tokens)
        graph, chunk_fraction = prepared.graph, prepared.chunk_fraction
    plans = compare(graph, capacity, memory=memory, chunk_fraction=chunk_fraction, k=k, time_limit_s=time_limit_s,
                    balance=balance)
    table = Table(title=f"every solver, capacity {format_bytes(capacity)}")
    for column in ("solver", "status", "k", "lower bound", "bottleneck", "balance", "time", "check"):
        table.add_column(column, justify="left" if column in ("solver", "status") else "right")
    passed = []
    for result in plans:
        report = check(result)
        if result.ok and report.ok:
            passed.append(result)
        table.add_row(result.solver, str(result.status), str(result.k), str(result.lower_bound),
                      format_bytes(result.bottleneck) if result.ok else "-",
                      f"{result.balance:.3f}" if result.balance else "-", f"{result.wall_s * 1000:.1f} ms",
                      "ok" if report.ok else f"[red]{len(report.violations)} violation(s)[/]")
    print_table(table)
    rejected = [result.solver for result in plans if result.ok and not any(result is kept for kept in passed)]
    if rejected:
        console.print(Text(f"not chosen, rejected by the checker: {', '.join(rejected)}"))
    if not passed:
        console.print(Text(f"no plan: {plans[0].reason}" if not rejected else
                           f"no plan passes the checker (rejected: {', '.join(rejected)})"))
        return EXIT_NO_PLAN
    best = min(passed, key=lambda result: (result.k, result.bottleneck, result.status != "OPTIMAL"))
    proven = max(result.lower_bound for result in plans)
    console.print(f"best: {best.solver} (k = {best.k}, bottleneck {format_bytes(best.bottleneck)}); "
                  f"best proven lower bound {proven}" + (": k is optimal" if best.k == proven else ""),
                  highlight=False)
    if json_path:
        write_plan(best, json_path)
    return EXIT_OK


@main.command("check")
@click.argument("plan_file", type=click.Path(exists=True, dir_okay=False))
@friendly
def check_command(plan_file):
    """Check PLAN_FILE independently: coverage, order, sizes, capacity (both levels of a two-level plan)."""
    from .result import read_plan

    plan = read_plan(Path(plan_file))
    from .checker import check  # after parsing: a malformed file is refused without loading numpy
    report = check(plan)
    if report.ok and hasattr(plan, "stages"):
        console.print(f"[green]ok[/]: {len(plan.stages.partitions)} stage(s) within "
                      f"{format_bytes(plan.device_capacity)} each (status {plan.stages.status}); {plan.k} on-chip "
                      f"group(s) within {format_bytes(plan.capacity)}; status {plan.status}; all sizes recomputed "
                      "at both levels", highlight=False, soft_wrap=True)
        sys.exit(EXIT_OK if plan.ok else EXIT_NO_PLAN)
    if report.ok:
        console.print(f"[green]ok[/]: {plan.k} group(s), status {plan.status}, all sizes recomputed "
                      f"and within {format_bytes(plan.capacity)}", highlight=False)
        sys.exit(EXIT_OK if plan.ok else EXIT_NO_PLAN)
    console.print(f"[red]{len(report.violations)} violation(s)[/]:")
    for violation in report.violations:
        console.print(Text(f"  - {violation}"), highlight=False, soft_wrap=True)
    sys.exit(EXIT_NO_PLAN)


@main.command("solvers")
def solvers_command():
    """List the registered solvers."""
    from .solvers import SOLVERS

    for name, function in SOLVERS.items():
        summary = (function.__doc__ or "").strip().splitlines()[0]
        console.print(f"[bold]{name}[/]: {summary}", highlight=False)


def _register_commands():
    """Commands defined in their own modules (they import their heavy parts lazily)."""
    from .cli_bench import bench
    from .cli_run import run
    from .cli_show import show_command
    from .cli_stages import pipeline_command, stages_command

    main.add_command(bench)
    main.add_command(run)
    main.add_command(stages_command)
    main.add_command(pipeline_command)
    main.add_command(show_command)
    for command in __import__("cachefit.cli_estimate", fromlist=["COMMANDS"]).COMMANDS:
        main.add_command(command)


_register_commands()


if __name__ == "__main__":  # pragma: no cover
    main()
