"""``cachefit bench``: the benchmark commands (registered on the main CLI group).

``cachefit bench solvers [--quick] [--family F ...] [--solver S ...] [--n N ...]
[--out DIR] [--time-limit S] [--repeats R] [--capacity tight|loose] [--memory M] [--no-peers]
[--extra-solver NAME=module:function ...]``
runs `cachefit.bench.solvers.run_benchmark` with a progress bar and writes
``results.json``, ``results.md`` and the plots into DIR;
``cachefit bench report DIR`` rewrites the markdown and plots from DIR's
``results.json``.
"""

from __future__ import annotations

import shlex
import sys

import click

from .clikit import console, friendly
from .errors import InputError

__all__ = ["bench"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def bench():
    """Benchmarks: solver comparison on seeded instance families."""


def _extra_solvers(values):
    from cachefit.bench.solvers import load_solver

    extra = {}
    for value in values:
        name, separator, target = value.partition("=")
        if not separator or not name or not target:
            raise InputError(f"`--extra-solver` must be NAME=module:function, got {value!r}")
        extra[name] = load_solver(target)
    return extra


@bench.command("solvers")
@click.option("--quick", is_flag=True, help="Small sizes, 5 s per run: under 2 minutes on a 2-core machine.")
@click.option("--family", "families", multiple=True, metavar="NAME",
              help="Instance family (repeatable); default all. See cachefit.instances.families.FAMILIES.")
@click.option("--solver", "solvers", multiple=True, metavar="NAME",
              help="Solver or peer name (repeatable); default every registered solver but auto, and every "
                   "importable peer.")
@click.option("--n", "ns", multiple=True, type=int, metavar="N",
              help="Instance size for every selected family (repeatable); default the mode's sizes.")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Folder for results.json, results.md and the PNG plots (default: bench/results, "
                   "or bench/results-quick with --quick, so a quick run never overwrites a full one).")
@click.option("--time-limit", "time_limit_s", type=float, default=None,
              help="Seconds per run (default 5 quick, 30 full); the run is killed at 1.25x + min(5 s, 1x) "
                   "+ 2 s.")
@click.option("--repeats", type=int, default=None, help="Repeats of fast runs, median reported (default 3 quick, 5 full).")
@click.option("--seed", type=int, default=0, show_default=True, help="Instance seed.")
@click.option("--capacity", "capacity_modes", multiple=True, type=click.Choice(["tight", "loose"]),
              help="Capacity setting (repeatable); default both.")
@click.option("--memory", type=click.Choice(["additive", "liveness"]), default=None,
              help="Memory model for every instance (default: additive for chains, liveness for DAGs).")
@click.option("--no-peers", is_flag=True, help="Run no peer partitioners.")
@click.option("--extra-solver", "extra", multiple=True, metavar="NAME=MODULE:FUNCTION",
              help="Also benchmark this function (the common solver signature) under NAME (repeatable).")
@click.option("--quiet", "-q", is_flag=True, help="No progress line (it is shown only on a terminal, on stderr).")
@friendly
def solvers_command(quick, families, solvers, ns, out_dir, time_limit_s, repeats, seed, capacity_modes, memory,
                    no_peers, extra, quiet):
    """Compare every solver (and the peers, on chains) on seeded instance families.

    Progress (per run: instance and solver) goes to stderr when it is a
    terminal, through cachefit.progress; --quiet silences it.
    """
    from cachefit.bench.report import write_report
    from cachefit.bench.solvers import run_benchmark
    from cachefit.progress import cli_reporter, reporting

    extra_solvers = _extra_solvers(extra)
    if out_dir is None:
        out_dir = "bench/results-quick" if quick else "bench/results"
    with reporting(cli_reporter(quiet)):
        results = run_benchmark(quick=quick, families=families or None, ns=list(ns) or None,
                                solvers=list(solvers) or None, extra_solvers=extra_solvers,
                                peers=[] if no_peers else None, time_limit_s=time_limit_s, repeats=repeats,
                                seed=seed, memory=memory, capacity_modes=capacity_modes or ("tight", "loose"))
    command = "cachefit bench " + " ".join(shlex.quote(arg) for arg in sys.argv[sys.argv.index("solvers"):]) \
        if "solvers" in sys.argv else None
    paths = write_report(results, out_dir, command=command)
    runs = results["runs"]
    failed = sum(1 for run in runs if run["status"] in ("error", "timeout", "crashed"))
    unchecked = sum(1 for run in runs if run["check_ok"] is False)
    console.print(f"{len(runs)} runs: {failed} error/timeout/crash, {unchecked} plan(s) failing check, "
                  f"{sum(1 for run in runs if run['status'] == 'skipped')} skipped")
    console.print(f"wrote {paths['json']}, {paths['md']}"
                  + (", " + ", ".join(str(path) for path in paths["plots"]) if paths["plots"] else " (no plots)"))


@bench.command("report")
@click.argument("out_dir", type=click.Path(file_okay=False, exists=True))
@friendly
def report_command(out_dir):
    """Rewrite results.md and the plots in OUT_DIR from its results.json (runs nothing)."""
    from cachefit.bench.report import rewrite_report

    paths = rewrite_report(out_dir)
    console.print(f"wrote {paths['md']}" + (", " + ", ".join(str(path) for path in paths["plots"])
                                             if paths["plots"] else " (no plots)"))
