"""`cachefit show PLAN.json`: pictures of a plan; and what `plan` prints besides its table.

`plan` calls `print_advice` when a plan is INFEASIBLE and `write_pictures`
for ``--plot``/``--dot``; `show` draws a plan file the same way.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click
from rich.text import Text

from .clikit import EXIT_NO_PLAN, EXIT_OK, console, error_console, friendly
from .errors import InputError
from .units import format_bytes

__all__ = ["show_command", "print_advice", "write_pictures", "command_line"]


def command_line(ctx, changes=None):
    """The `cachefit` command of click context `ctx` (its non-default options) with `changes` applied.

    `changes` maps parameter names (``capacity``, ``tile``, ``chunk_tokens``,
    ``granularity``, ``batch``) to new values; a value of True is a flag.
    Output options (``--json``, ``--plot``, ``--dot``, ``--quiet``) are left out.
    """
    from .advice import capacity_text

    params = dict(ctx.params)
    for name, value in (changes or {}).items():
        params[name] = capacity_text(value) if name == "capacity" else value
    words = ["cachefit", ctx.info_name]
    for parameter in ctx.command.params:
        if isinstance(parameter, click.Argument):
            words.append(shlex.quote(str(params[parameter.name])))
    for parameter in ctx.command.params:
        name = parameter.name
        if (isinstance(parameter, click.Argument) or name in ("json_path", "plot", "dot", "quiet")
                or params.get(name) is None or params.get(name) == parameter.default
                or params.get(name) is False):
            continue
        flag = max(parameter.opts, key=len)
        words += [flag] if params[name] is True else [flag, shlex.quote(str(params[name]))]
    return " ".join(words)


def print_advice(ctx, graph, plan):
    """Say what would make `plan` (INFEASIBLE) feasible, each suggestion planned first.

    `ctx` is the `plan` command's click context: its options are the
    settings the suggestions change, and the printed commands are its own
    command line with the changes applied.  `plan` may be a two-level
    `Deployment` whose stages fit: the advice is then for its on-chip level,
    each command planned with both levels (``--devices`` kept).
    """
    from .advice import suggest
    from .instances import names

    params = ctx.params
    model = params["model"]
    rebuild = None
    if not Path(model).exists() and model in names():  # embedded: batch and granularity can change
        from .loading import load_model

        extra = {name: params[name] for name in ("phase", "context") if name in params}  # as `plan` loads it

        def rebuild(batch, granularity):
            return load_model(model, batch=batch, seq_len=params["seq_len"], dtype=params["dtype"],
                              granularity=granularity, **extra)
    chunk_tokens = params.get("chunk_tokens")
    if chunk_tokens not in (None, "auto"):
        chunk_tokens = int(chunk_tokens)
    two_level = hasattr(plan, "stages")
    levels = ({"devices": params["devices"], "device_capacity": params["device_capacity"],
               "reserve": params["reserve"]} if two_level else {})
    advice = suggest(graph, plan.capacity, memory=plan.memory, chunk_fraction=params.get("chunk_fraction", 1.0),
                     k=params.get("k"), tile=bool(params.get("tile")), chunk_tokens=chunk_tokens, rebuild=rebuild,
                     batch=params.get("batch") or graph.graph.get("batch"), granularity=params.get("granularity"),
                     **levels)
    if two_level:
        console.print("[bold]what would fit on chip[/] (every command below was planned first, stages and every "
                      "stage's on-chip groups, greedy on chip):", highlight=False, soft_wrap=True)
    else:
        console.print("[bold]what would fit[/] (every command below was planned first, with greedy):",
                      highlight=False)
    if advice.min_capacity is not None:
        exact = advice.min_capacity_exact
        if not params.get("tile") and (params.get("k") is None or params.get("chunk_tokens") != "auto"):
            order = f"the {plan.devices} stages' node orders" if two_level else "this node order"
            note = f"the least for {order} is {format_bytes(exact)} ({exact:,} B)"
            if advice.capacity_lower_bound < exact and params.get("k") is None:
                note += f", {format_bytes(advice.capacity_lower_bound)} for any order"
        else:
            note = f"the least found is {format_bytes(exact)} ({exact:,} B), to 0.5 % by bisection"
        _print_suggestion(ctx, advice.min_capacity, f"a larger capacity ({note}):")
    else:
        console.print("  no capacity gives a plan with these settings", highlight=False)
    if advice.suggestions:
        changed = len(advice.suggestions[0].changes)
        console.print(f"  at {format_bytes(plan.capacity)}, the fewest changes that fit "
                      f"({changed} option{'s' if changed > 1 else ''}):", highlight=False, soft_wrap=True)
        for suggestion in advice.suggestions:
            _print_suggestion(ctx, suggestion, None)
    elif advice.considered:
        flags = {"tile": "--tile", "chunk_tokens": "--chunk-tokens auto", "kv": "--kv streamed",
                 "granularity": "--granularity op", "batch": "a smaller --batch"}
        named = [flags[name] for name in advice.considered]
        what = f"{named[0]} does not give" if len(named) == 1 else f"no combination of {', '.join(named)} gives"
        console.print(f"  at {format_bytes(plan.capacity)}: {what} a plan", highlight=False, soft_wrap=True)
    else:
        console.print(f"  at {format_bytes(plan.capacity)}: nothing else to try: {_why_not(params, graph, rebuild)}",
                      highlight=False, soft_wrap=True)
    return advice


def _why_not(params, graph, rebuild):
    """Why none of the options `suggest` changes applies (for the message)."""
    reasons = []
    if params.get("tile"):
        reasons.append("--tile is set")
    if params.get("chunk_tokens") == "auto":
        reasons.append("--chunk-tokens auto is set")
    elif params.get("memory") == "additive":
        reasons.append("chunks do not change the additive model")
    else:
        reasons.append("--chunk-tokens needs a graph with batch and seq_len")
    if rebuild is None:
        reasons.append("--granularity and --batch change embedded models only")
    return "; ".join(reasons)


def _print_suggestion(ctx, suggestion, heading):
    if heading:
        console.print(Text(f"  {heading}"), soft_wrap=True)
    console.print(Text(f"    {command_line(ctx, suggestion.changes)}", style="bold"), soft_wrap=True)
    stages = f" on-chip groups over {suggestion.plan.devices} stages" if hasattr(suggestion.plan, "stages") else ""
    console.print(f"      → k = {suggestion.k:,}{stages}, bottleneck {format_bytes(suggestion.plan.bottleneck)}",
                  highlight=False)


def write_pictures(plan, *, plot=None, dot=None, title=None):
    """Write `plan`'s picture (``--plot``, PNG/SVG/PDF by suffix) and Graphviz file (``--dot``).

    A plan without groups writes nothing and says so on stderr.
    """
    if not plan.ok:
        if plot or dot:
            error_console.print(f"nothing to draw: the plan is {plan.status} (no groups); no file written",
                                highlight=False, soft_wrap=True)
        return
    if plot:
        from .plot import plot_plan

        plot_plan(plan, plot, title=title)
        console.print(f"picture written to {plot}", highlight=False, soft_wrap=True)
    if dot:
        from .dot import write_dot

        write_dot(plan, dot)
        svg = shlex.quote(str(Path(dot).with_suffix(".svg")))
        console.print(f"Graphviz DOT written to {dot} (draw it: dot -Tsvg {shlex.quote(str(dot))} -o {svg})",
                      highlight=False, soft_wrap=True)


def plot_option(function):
    """The ``--plot``/``--dot`` options (for `plan` and `show`)."""
    function = click.option("--dot", "dot", type=click.Path(dir_okay=False), default=None,
                            help="Write the plan as Graphviz DOT (groups as clusters).")(function)
    return click.option("--plot", "plot", type=click.Path(dir_okay=False), default=None, callback=_picture_suffix,
                        help="Draw the plan: .png, .svg or .pdf (needs matplotlib: the `plot` extra).")(function)


def _picture_suffix(context, parameter, value):
    """Refuse a ``--plot`` name whose suffix is no picture format before any work is done."""
    from .plot import PICTURE_FORMATS

    suffix = Path(value).suffix.lower().lstrip(".") if value else None
    if value and suffix not in PICTURE_FORMATS:
        raise click.UsageError(f"`--plot` {value!r}: the file name must end in .png, .svg or .pdf, got "
                               f"{('.' + suffix) if suffix else 'no suffix'}")
    return value


@click.command("show")
@click.argument("plan_file", type=click.Path(exists=True, dir_okay=False))
@plot_option
@friendly
def show_command(plan_file, plot, dot):
    """Print PLAN_FILE's groups; draw them with --plot, write Graphviz with --dot.

    A two-level plan (version 2) is shown as its stages, one row per device
    (--plot and --dot draw single-level plans only).
    """
    from .cli import print_plan
    from .result import read_plan

    plan = read_plan(Path(plan_file))
    if hasattr(plan, "stages") and (plot or dot):
        raise InputError("`--plot`/`--dot` draw a single-level plan; PLAN_FILE is a two-level plan (version 2): "
                         "`cachefit show` without them lists its stages")
    name = plan.graph.graph.get("name") if hasattr(plan.graph, "graph") else None
    console.print(f"[bold]{name or Path(plan_file).stem}[/] (from {plan_file})", highlight=False)
    if hasattr(plan, "stages"):
        from .cli_estimate import print_deployment

        reports = print_deployment(plan)
        sys.exit(EXIT_OK if plan.ok and all(reports) else EXIT_NO_PLAN)
    print_plan(plan)
    write_pictures(plan, plot=plot, dot=dot, title=name or Path(plan_file).stem)
    sys.exit(EXIT_OK if plan.ok else EXIT_NO_PLAN)
