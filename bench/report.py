"""Benchmark output: ``results.json`` (documented fields), ``results.md`` (tables) and PNG plots.

`write_report(results, out_dir)` takes the object `cachefit.bench.solvers.run_benchmark`
returns and writes, in `out_dir`:

``results.json``
    ``{"format": "cachefit.bench.solvers", "version": 1, "machine": {...},
    "settings": {...}, "families": {...}, "peers": {...}, "runs": [...]}``;
    `MACHINE_FIELDS` and `RUN_FIELDS` document every field of the machine
    record and of a run; `validate_results` checks a document against them.
``results.md``
    the headline table, the scaling exponents, one table per family and
    the list of skipped or failed runs.
``wall_time_vs_n.png``, ``quality_by_family.png``, ``k_vs_lower_bound.png``
    with matplotlib's Agg backend when matplotlib is installed (extra
    ``plot``); without it the markdown says the plots were not made.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import statistics
import subprocess
from pathlib import Path

from cachefit.errors import InputError
from cachefit.result import write_text_atomic
from cachefit.units import format_bytes

from cachefit.machine import MACHINE_FIELDS as _BASE_FIELDS
from cachefit.machine import machine_info as _base_machine_info
from cachefit.machine import package_version as _version

from .timing import has_plan

__all__ = ["RESULTS_FORMAT", "RESULTS_VERSION", "MACHINE_FIELDS", "RUN_FIELDS", "machine_info", "results_document",
           "validate_results", "scaling_exponents", "headline_rows", "markdown", "write_plots", "write_report",
           "rewrite_report"]

logger = logging.getLogger(__name__)

RESULTS_FORMAT = "cachefit.bench.solvers"
RESULTS_VERSION = 1

_INT, _FLOAT, _STR, _BOOL, _NONE = (int,), (int, float), (str,), (bool,), (type(None),)

#: Fields of ``machine``: name -> (types, meaning); the keys of `cachefit.machine.machine_info` and three more.
MACHINE_FIELDS = {
    "cpu": (_STR, _BASE_FIELDS["cpu"]),
    "cores": (_INT, _BASE_FIELDS["cores"]),
    "ram_bytes": (_INT + _NONE, _BASE_FIELDS["ram_bytes"]),
    "os": (_STR, _BASE_FIELDS["os"]),
    "python": (_STR, _BASE_FIELDS["python"]),
    "versions": ((dict,), _BASE_FIELDS["versions"] + "; matplotlib too"),
    "git_commit": (_STR + _NONE, "`git describe --always --dirty` of the tree the benchmark ran from "
                                 "(-dirty: uncommitted changes), when known"),
    "date": (_STR, "UTC time the report was written, ISO 8601"),
}

#: Fields of each run: name -> (types, meaning).
RUN_FIELDS = {
    "instance": (_STR, "instance id: family/n=N/capacity mode/seed=S"),
    "family": (_STR, "instance family (cachefit.instances.families.FAMILIES)"),
    "n": (_INT, "nodes of the instance as built"),
    "n_requested": (_INT, "the n asked for (model-op picks the real model nearest in size)"),
    "edges": (_INT, "edges of the instance"),
    "capacity": (_INT, "capacity C in bytes"),
    "capacity_mode": (_STR, "tight or loose"),
    "memory": (_STR, "memory model the run used: additive or liveness"),
    "seed": (_INT, "instance seed"),
    "source": (_STR, "the graph's name (model-op: model, batch, seq_len); empty for chains"),
    "task": (_STR, "min-k (fewest groups, then balance) or balanced-k (peers: exactly k_target groups)"),
    "k_target": (_INT + _NONE, "k given to a balanced-k run (dp's minimum k); None for min-k"),
    "solver": (_STR, "solver or peer name"),
    "kind": (_STR, "cachefit (a registered solver) or peer"),
    "status": (_STR, "OPTIMAL, FEASIBLE, INFEASIBLE, UNKNOWN (the plan's), or error, timeout, crashed, "
                     "skipped (the runner's)"),
    "reason": (_STR, "why: the plan's reason, the error, or why the run was skipped"),
    "error": (_STR, "the exception (type: message) of an error, or what happened to a timeout or crash"),
    "k": (_INT + _NONE, "groups of the plan (None without a plan)"),
    "lower_bound": (_INT + _NONE, "the plan's proven lower bound on k (peers: 0, they prove nothing)"),
    "bottleneck": (_INT + _NONE, "largest group size in bytes"),
    "sum_sq": (_INT + _NONE, "Σ S(P)² over the groups, bytes² (exact integer)"),
    "wall_s": (_FLOAT + _NONE, "median wall time in seconds over wall_s_all"),
    "wall_s_all": ((list,), "every timed repeat, seconds"),
    "solver_wall_s": (_FLOAT + _NONE, "the plan's own wall_s of the last repeat"),
    "peak_rss_bytes": (_INT + _NONE, "peak resident set of the run's process during the solve (VmHWM after "
                                     "a reset, else ru_maxrss); includes the instance it inherited"),
    "memory_bytes": (_INT + _NONE, "peak_rss_bytes minus the resident set at the start of the run"),
    "check_ok": (_BOOL + _NONE, "cachefit.check passed on the plan (None: no check result)"),
    "violations": ((list,), "the checker's first three violations"),
    "stats": ((dict,), "the plan's scalar stats (solver counters); peers: requested_k, k_from"),
    "best_k": (_INT + _NONE, "smallest k among checked min-k plans of the instance"),
    "best_lower_bound": (_INT + _NONE, "largest lower bound stated on the instance by a min-k run that "
                                       "passed check"),
    "best_bottleneck": (_INT + _NONE, "smallest bottleneck among checked min-k plans with k = best_k"),
    "k_ratio": (_FLOAT + _NONE, "k / best_k (min-k runs with a plan)"),
    "bottleneck_ratio": (_FLOAT + _NONE, "bottleneck / best_bottleneck (plans with k = best_k)"),
}

_PLOTS = ("wall_time_vs_n.png", "quality_by_family.png", "k_vs_lower_bound.png")


def _git_commit():
    try:
        result = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], capture_output=True,
                                text=True, timeout=5,
                                cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def machine_info():
    """The machine record of ``results.json`` (fields in `MACHINE_FIELDS`).

    `cachefit.machine.machine_info` plus matplotlib's version, the git
    commit and the date.

    Examples
    --------
    >>> sorted(machine_info()) == sorted(MACHINE_FIELDS)
    True
    """
    base = _base_machine_info()
    return {**base, "cores": base["cores"] or 1,
            "versions": {**base["versions"], "matplotlib": _version("matplotlib")},
            "git_commit": _git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def results_document(results, *, machine=None):
    """The ``results.json`` object for `results` from `run_benchmark`."""
    return {"format": RESULTS_FORMAT, "version": RESULTS_VERSION,
            "machine": machine_info() if machine is None else machine,
            "settings": results["settings"], "families": results["families"], "peers": results["peers"],
            "runs": results["runs"]}


def _check_fields(record, fields, where):
    problems = []
    for key, (types, _) in fields.items():
        if key not in record:
            problems.append(f"{where}: field {key!r} is missing")
        elif not isinstance(record[key], types) or (isinstance(record[key], bool) and bool not in types):
            problems.append(f"{where}: field {key!r} has type {type(record[key]).__name__}")
    extra = sorted(set(record) - set(fields))
    if extra:
        problems.append(f"{where}: undocumented field(s) {', '.join(extra)}")
    return problems


def validate_results(document):
    """Check a ``results.json`` object against the documented fields.

    Returns
    -------
    list of str
        One line per problem; empty when the document is valid.

    Examples
    --------
    >>> validate_results({"format": "x"})[:1]
    ["'format' must be 'cachefit.bench.solvers', got 'x'"]
    """
    if not isinstance(document, dict):
        return ["the document is not a JSON object"]
    if document.get("format") != RESULTS_FORMAT:
        return [f"'format' must be {RESULTS_FORMAT!r}, got {document.get('format')!r}"]
    problems = []
    if document.get("version") != RESULTS_VERSION:
        problems.append(f"'version' must be {RESULTS_VERSION}, got {document.get('version')!r}")
    for key in ("machine", "settings", "families", "peers"):
        if not isinstance(document.get(key), dict):
            problems.append(f"{key!r} must be an object")
    if isinstance(document.get("machine"), dict):
        problems += _check_fields(document["machine"], MACHINE_FIELDS, "machine")
    runs = document.get("runs")
    if not isinstance(runs, list):
        return problems + ["'runs' must be a list"]
    for index, run in enumerate(runs):
        if not isinstance(run, dict):
            problems.append(f"runs[{index}] is not an object")
            continue
        problems += _check_fields(run, RUN_FIELDS, f"runs[{index}]")
        if run.get("status") in ("OPTIMAL", "FEASIBLE") and run.get("check_ok") is None and run.get("k"):
            problems.append(f"runs[{index}]: a plan without a check result")
    return problems


# -- analysis -----------------------------------------------------------------------------------

def _class_of(run):
    if run["family"].startswith("chain"):
        return "chain"
    if run["family"] == "model-op":
        return "model-op"
    return "dag"


def _solver_order(runs):
    order = {}
    for run in runs:
        order.setdefault(run["solver"], (run["kind"] == "peer", len(order)))
    return sorted(order, key=order.get)


def scaling_exponents(runs, *, min_n=100):
    """Least-squares slope of log(wall time) on log(n) per solver and instance class.

    Uses runs with a plan and n ≥ `min_n` (smaller instances measure
    process overhead, not the algorithm); timeouts and skipped runs are not
    points, so an exponent can understate a solver that timed out at the
    largest sizes (the ``excluded`` count says how many).

    Returns
    -------
    list of dict
        ``solver``, ``class`` (chain, dag, model-op), ``exponent`` (None with
        fewer than two distinct n), ``points``, ``n_min``, ``n_max``,
        ``excluded``.

    Examples
    --------
    >>> runs = [{"solver": "s", "kind": "cachefit", "family": "chain-uniform", "status": "OPTIMAL", "k": 1,
    ...          "n": n, "wall_s": 1e-6 * n, "task": "min-k"} for n in (100, 1000, 10000)]
    >>> round(scaling_exponents(runs)[0]["exponent"], 3)
    1.0
    """
    groups = {}
    for run in runs:
        if run["n"] < min_n or run["status"] == "skipped":
            continue
        groups.setdefault((run["solver"], _class_of(run)), []).append(run)
    rows = []
    for solver in _solver_order(runs):
        for klass in ("chain", "dag", "model-op"):
            group = groups.get((solver, klass))
            if not group:
                continue
            points = [(math.log(run["n"]), math.log(max(run["wall_s"], 1e-9)))
                      for run in group if has_plan(run) and run["wall_s"] is not None]
            excluded = len(group) - len(points)
            xs = sorted({x for x, _ in points})
            exponent = None
            if len(xs) >= 2:
                mean_x = statistics.fmean(x for x, _ in points)
                mean_y = statistics.fmean(y for _, y in points)
                sxx = sum((x - mean_x) ** 2 for x, _ in points)
                exponent = sum((x - mean_x) * (y - mean_y) for x, y in points) / sxx
            rows.append({"solver": solver, "class": klass, "exponent": exponent, "points": len(points),
                         "n_min": round(math.exp(xs[0])) if xs else None,
                         "n_max": round(math.exp(xs[-1])) if xs else None, "excluded": excluded})
    return rows


HEADLINE = (("chain", 1_000), ("chain", 10_000), ("chain", 100_000), ("chain", 1_000_000),
            ("dag", 50), ("dag", 200), ("dag", 1_000), ("model-op", 50), ("model-op", 200), ("model-op", 1_000))


def _format_time(seconds):
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def _cell(runs):
    """One headline cell: median time, worst ratios, and what went wrong."""
    if not runs:
        return "-"
    with_plan = [run for run in runs if has_plan(run)]
    parts = []
    if with_plan:
        parts.append(_format_time(statistics.median(run["wall_s"] for run in with_plan)))
        k_ratios = [run["k_ratio"] for run in with_plan if run["k_ratio"] is not None]
        b_ratios = [run["bottleneck_ratio"] for run in with_plan if run["bottleneck_ratio"] is not None]
        if k_ratios:
            parts.append(f"k×{max(k_ratios):.2f}")
        if b_ratios:
            parts.append(f"b×{max(b_ratios):.2f}")
        if runs[0]["kind"] == "cachefit":
            proved = sum(1 for run in with_plan if run["best_lower_bound"] is not None
                         and run["k"] == run["best_lower_bound"])
            parts.append(f"k opt {proved}/{len(runs)}")
        bad = sum(1 for run in with_plan if run["check_ok"] is False)
        if bad:
            parts.append(f"{bad}/{len(with_plan)} fail check")
    others = {}
    for run in runs:
        if not has_plan(run):
            label = "skipped" if run["status"] == "skipped" else run["status"]
            others[label] = others.get(label, 0) + 1
    parts += [f"{label} ×{count}" for label, count in sorted(others.items())]
    return " · ".join(parts)


def headline_rows(runs):
    """The headline table as rows: (label, {solver: cell text}) for chains 10³–10⁶ and DAGs 50–1,000.

    Random DAG rows pool ``dag-layered`` and ``dag-series-parallel``; model-op
    rows group by the requested n (the real graph's size is in the family
    table); ``dag-torch`` is in the family tables only.
    """
    rows = []
    for klass, n in HEADLINE:
        selected = [run for run in runs if _class_of(run) == klass and run["n_requested"] == n
                    and run["family"] != "dag-torch"]
        if not selected:
            continue
        label = {"chain": "chain", "dag": "random DAG", "model-op": "real model (op)"}[klass]
        instances = len({run["instance"] for run in selected})
        cells = {}
        for solver in _solver_order(selected):
            cells[solver] = _cell([run for run in selected if run["solver"] == solver])
        rows.append((f"{label}, n = {n:,} ({instances} inst.)", cells))
    return rows


def _md_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def headline_markdown(runs):
    rows = headline_rows(runs)
    solvers = _solver_order([run for run in runs])
    # a column that is skipped on every row (brute beyond 12 nodes) says nothing here
    solvers = [solver for solver in solvers
               if any(solver in cells and not cells[solver].startswith("skipped") for _, cells in rows)]
    return _md_table(["instances"] + solvers, [[label] + [cells.get(solver, "-") for solver in solvers]
                                                for label, cells in rows])


def _ratio(value):
    return "-" if value is None else f"{value:.3f}"


def markdown(document, *, plots=None, plot_note="", command=None):
    """The text of ``results.md`` for a results document."""
    machine, settings, runs = document["machine"], document["settings"], document["runs"]
    ram = format_bytes(machine["ram_bytes"]) if machine.get("ram_bytes") else "unknown"
    versions = ", ".join(f"{name} {version}" for name, version in machine["versions"].items() if version)
    lines = [
        "# cachefit solver benchmark",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} logical CPUs, {ram} RAM, {machine['os']}, "
        f"Python {machine['python']}; {versions}. Date: {machine['date']}"
        + (f"; commit {machine['git_commit']}" if machine.get("git_commit") else "") + ".",
        "",
        f"Mode: {settings['mode']}; per-run time limit {settings['time_limit_s']:g} s; fast runs repeated up to "
        f"{settings['repeats']} times (median); seed {settings['seed']}; one process per run "
        f"({settings['start_method']})."
        + (f" 1-minute load average {settings['load_average_start']} at the start, "
           f"{settings['load_average_end']} at the end (above 0, other processes shared the "
           f"{machine['cores']} CPUs and the times are upper bounds)."
           if settings.get("load_average_start") is not None else ""),
    ]
    if command:
        lines += ["", f"Command: `{command}`"]
    lines += [
        "",
        "Chains run under the additive memory model (the peers' objective), DAGs under liveness. "
        "Times are the solver call on a flattened `LayerTable` (flattening not timed). "
        "`k×` is k / the best checked k on the instance, `b×` the bottleneck / the best bottleneck among "
        "checked plans with that k (the worst over the instances in a cell). Peers run the balanced-k task: "
        "a chain into exactly dp's minimum k parts; their plans are judged by `cachefit.check` "
        "(\"fail check\": a group over capacity).",
        "",
        "## Headline",
        "",
        "Median time · worst k ratio · worst bottleneck ratio · `k opt m/N`: on m of the row's N instances "
        "the plan's k equals the best lower bound proved on it (k proved minimal). Rows pool the instances "
        "of a size: all chain families, or both random DAG families, tight and loose capacity. The ratios "
        "are against the best plan found, which is the optimum only where `k opt` says so.",
        "",
        headline_markdown(runs),
        "",
    ]
    missing_families = {name: info["reason"] for name, info in document["families"].items() if not info["available"]}
    if missing_families or document["peers"]["missing"]:
        lines += ["Not run here: " + "; ".join(f"{name} ({reason})" for name, reason in
                                               {**missing_families, **document["peers"]["missing"]}.items()), ""]
    lines += ["## Scaling", "",
              "Least-squares slope of log(wall time) against log(n), runs with a plan and n ≥ 100 "
              "(`excluded`: runs at those sizes without a plan — timeouts, errors — which are not points).", ""]
    scaling = scaling_exponents(runs)
    lines += [_md_table(["solver", "instances", "exponent", "points", "n range", "excluded"],
                        [[row["solver"], row["class"], "-" if row["exponent"] is None else f"{row['exponent']:.2f}",
                          row["points"], f"{row['n_min']:,}–{row['n_max']:,}" if row["n_min"] else "-",
                          row["excluded"]] for row in scaling]), ""]
    lines += ["## Plots", ""]
    if plots:
        lines += [f"![{name}]({name})" for name in plots] + [""]
    else:
        lines += [f"No plots: {plot_note or 'matplotlib is not installed (extra `plot`)'}.", ""]
    lines += _md_families(runs)
    lines += _md_failures(runs)
    return "\n".join(lines)


def _md_families(runs):
    """The "Per family" section of ``results.md``: one table per instance family."""
    lines = ["## Per family", ""]
    for family in dict.fromkeys(run["family"] for run in runs):
        selected = [run for run in runs if run["family"] == family]
        lines += [f"### {family}", ""]
        rows = []
        for run in sorted(selected, key=lambda run: (run["n"], run["capacity_mode"] != "tight")):
            rows.append([f"{run['n']:,}", run["capacity_mode"], format_bytes(run["capacity"]), run["solver"],
                         run["task"] if run["task"] == "min-k" else f"k = {run['k_target']}", run["status"],
                         _format_time(run["wall_s"]), "-" if run["k"] is None else run["k"],
                         "-" if run["lower_bound"] is None else run["lower_bound"],
                         _ratio(run["k_ratio"]), _ratio(run["bottleneck_ratio"]),
                         "-" if run["memory_bytes"] is None else format_bytes(run["memory_bytes"]),
                         {True: "ok", False: "FAIL", None: "-"}[run["check_ok"]]])
        lines += [_md_table(["n", "capacity", "C", "solver", "task", "status", "time", "k", "bound", "k ratio",
                             "bottleneck ratio", "memory", "check"], rows), ""]
        sources = sorted({run["source"] for run in selected if run["source"] and family == "model-op"})
        if sources:
            lines += ["Models: " + "; ".join(sources) + ".", ""]
    return lines


def _md_failures(runs):
    """Failures, timeouts and skipped peers; peer plans that fail the check; solvers skipped by a cap."""
    lines = []
    failures = [run for run in runs if run["status"] in ("error", "timeout", "crashed", "UNKNOWN", "INFEASIBLE")
                or (run["kind"] == "cachefit" and run["check_ok"] is False)
                or (run["kind"] == "peer" and run["status"] == "skipped")]
    if failures:
        lines += ["## Failures, timeouts and skipped peers", ""]
        lines += [_md_table(["instance", "solver", "status", "reason"],
                            [[run["instance"], run["solver"], run["status"],
                              (run["reason"] or "; ".join(run["violations"]))[:200]] for run in failures]), ""]
    peer_runs = [run for run in runs if run["kind"] == "peer" and has_plan(run)]
    if peer_runs:
        over = sum(1 for run in peer_runs if run["check_ok"] is False)
        lines += [f"Peer plans that fail `cachefit.check` (a group over the capacity they were not told): "
                  f"{over} of {len(peer_runs)}; each is marked FAIL in the family tables.", ""]
    capped = {}
    for run in runs:
        if run["kind"] == "cachefit" and run["status"] == "skipped":
            capped[run["solver"]] = capped.get(run["solver"], 0) + 1
    for solver, count in capped.items():
        reason = next(run["reason"] for run in runs if run["solver"] == solver and run["status"] == "skipped")
        lines += [f"{solver}: skipped on {count} instance(s) — {reason}.", ""]
    return lines


# -- plots --------------------------------------------------------------------------------------

def write_plots(document, out_dir):
    """Write the PNG plots; return (file names, note).  No matplotlib: ([], why)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "matplotlib is not installed (extra `plot`)"
    runs = document["runs"]
    out_dir = Path(out_dir)
    solvers = _solver_order(runs)
    colours = {solver: f"C{index % 10}" for index, solver in enumerate(solvers)}

    _plot_wall_time(plt, runs, solvers, colours, out_dir / _PLOTS[0])
    _plot_quality(plt, runs, solvers, colours, out_dir / _PLOTS[1])
    _plot_k_against_bound(plt, runs, solvers, colours, out_dir / _PLOTS[2])
    return list(_PLOTS), ""


def _plot_wall_time(plt, runs, solvers, colours, path):
    """Plot 1: wall time vs n, log-log, one line per solver, chains and DAGs apart."""
    classes = [klass for klass in ("chain", "dag", "model-op") if any(_class_of(run) == klass for run in runs)]
    figure, axes = plt.subplots(1, max(1, len(classes)), figsize=(5.4 * max(1, len(classes)), 4.8), squeeze=False)
    for axis, klass in zip(axes[0], classes):
        for solver in solvers:
            points = {}
            for run in runs:
                if run["solver"] == solver and _class_of(run) == klass and has_plan(run) and run["wall_s"]:
                    # random DAG and torch-module sizes differ slightly from the n asked for: pool by it
                    n = run["n_requested"] if klass == "dag" else run["n"]
                    points.setdefault(n, []).append(run["wall_s"])
            if points:
                ns = sorted(points)
                axis.plot(ns, [statistics.median(points[n]) for n in ns], marker="o", label=solver,
                          color=colours[solver])
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("nodes n")
        axis.set_ylabel("wall time (s), median over instances")
        axis.set_title({"chain": "chains", "dag": "random DAGs (+ torch)", "model-op": "real models (op level)"}[klass])
        axis.grid(True, which="both", alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _plot_quality(plt, runs, solvers, colours, path):
    """Plot 2: quality ratio per family: worst bottleneck ratio (bars) and worst k ratio (markers)."""
    families = list(dict.fromkeys(run["family"] for run in runs))
    figure, axes = plt.subplots(2, 1, figsize=(max(8, 1.6 * len(families) * 1.5), 7), sharex=True)
    width = 0.8 / max(1, len(solvers))
    for index, solver in enumerate(solvers):
        b_values, k_values = [], []
        for family in families:
            selected = [run for run in runs if run["solver"] == solver and run["family"] == family]
            b = [run["bottleneck_ratio"] for run in selected if run["bottleneck_ratio"] is not None]
            k = [run["k_ratio"] for run in selected if run["k_ratio"] is not None]
            b_values.append(max(b) if b else float("nan"))
            k_values.append(max(k) if k else float("nan"))
        xs = [position + index * width for position in range(len(families))]
        axes[0].bar(xs, b_values, width, label=solver, color=colours[solver])
        axes[1].bar(xs, k_values, width, label=solver, color=colours[solver])
    axes[0].set_ylabel("worst bottleneck / best")
    axes[1].set_ylabel("worst k / best k")
    for axis in axes:
        axis.set_ylim(bottom=0.9)
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.grid(True, axis="y", alpha=0.3)
    axes[1].set_xticks([position + 0.4 - width / 2 for position in range(len(families))])
    axes[1].set_xticklabels(families, rotation=20)
    axes[0].legend(fontsize=7, ncol=3)
    axes[0].set_title("quality per family (1.0 = best found; peers: balanced-k against dp)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _plot_k_against_bound(plt, runs, solvers, colours, path):
    """Plot 3: k against the best lower bound."""
    figure, axis = plt.subplots(figsize=(6.5, 6))
    largest = 1
    markers = "osD^vx+*"
    for index, solver in enumerate(solvers):
        points = [(run["best_lower_bound"], run["k"]) for run in runs
                  if run["solver"] == solver and run["task"] == "min-k" and has_plan(run)
                  and run["best_lower_bound"]]
        if points:
            largest = max(largest, max(max(point) for point in points))
            axis.scatter(*zip(*points), s=40 - 8 * index, alpha=0.7, label=solver, color=colours[solver],
                         marker=markers[index % len(markers)], facecolors="none" if index == 0 else None)
    axis.plot([1, largest], [1, largest], color="black", linewidth=0.8, label="k = bound")
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("best proven lower bound on k")
    axis.set_ylabel("k of the plan")
    axis.set_title("k against the lower bound (min-k runs)")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def rewrite_report(out_dir):
    """Rewrite results.md and the plots of `out_dir` from its results.json (no runs).

    The derived fields (``best_*`` and the ratios) are recomputed with
    `cachefit.bench.solvers.add_quality` and written back; measured fields
    are left as they are.

    Raises
    ------
    InputError
        No readable, valid results.json in `out_dir`.
    """
    out_dir = Path(out_dir)
    try:
        document = json.loads((out_dir / "results.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"`out_dir` must hold a readable results.json: {exc}") from None
    problems = validate_results(document)
    if problems:
        raise InputError("results.json does not match the documented fields: " + "; ".join(problems[:5]))
    from .solvers import add_quality

    add_quality(document["runs"])  # the derived fields follow the current definitions
    write_text_atomic(out_dir / "results.json", json.dumps(document, indent=1) + "\n")
    plots, note = write_plots(document, out_dir)
    md_path = out_dir / "results.md"
    write_text_atomic(md_path, markdown(document, plots=plots, plot_note=note,
                                        command=document["settings"].get("command")) + "\n")
    return {"json": out_dir / "results.json", "md": md_path, "plots": [out_dir / name for name in plots]}


def write_report(results, out_dir, *, command=None, machine=None):
    """Write results.json, results.md and the plots into `out_dir`; return their paths.

    Raises
    ------
    InputError
        The document fails `validate_results` (a bug: the runner and the
        documented fields disagree).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    document = results_document(results, machine=machine)
    if command:
        document["settings"] = {**document["settings"], "command": command}
    problems = validate_results(document)
    if problems:
        raise InputError("benchmark results do not match the documented fields: " + "; ".join(problems[:5]))
    json_path = out_dir / "results.json"
    write_text_atomic(json_path, json.dumps(document, indent=1) + "\n")
    try:
        plots, note = write_plots(document, out_dir)
    except Exception as exc:  # a plotting failure must not lose the numbers
        logger.warning("plots failed: %s", exc)
        plots, note = [], f"plotting failed: {type(exc).__name__}: {exc}"
    md_path = out_dir / "results.md"
    write_text_atomic(md_path, markdown(document, plots=plots, plot_note=note, command=command) + "\n")
    return {"json": json_path, "md": md_path, "plots": [out_dir / name for name in plots]}
