"""Solver comparison benchmark: every registered solver and peer on seeded instance families.

`run_benchmark` builds the selected instances (`cachefit.instances.families`),
runs every selected solver on each, one process per run, then the peers on
the chains (the balanced-k task), computes quality ratios, and returns the
results object that `cachefit.bench.report.write_report` writes as
``results.json``, ``results.md`` and PNG plots.  The CLI is
``cachefit bench solvers`` (`cachefit.cli_bench`).

Two tasks are measured:

``min-k``
    ``solver(instance, capacity)`` with k=None: the fewest groups, then the
    smallest bottleneck.  Every registered solver except ``auto`` (which
    only dispatches to the others) runs it; ``brute`` only where n ≤ 12.
``balanced-k``
    the peers' own task: a chain into exactly k parts, k being the minimum
    k that ``dp`` found (or, without ``dp``, the smallest k of a checked
    plan).  Peers take no capacity; their plan is recorded as they made it
    and `cachefit.check` judges it, so an oversize group shows as
    ``check_ok`` False.  The reference is ``dp``'s min-k plan, which is the
    smallest bottleneck over all k-part splits.

Isolation: each run is a child process (``fork`` where the platform has it,
else ``spawn``, where an extra solver must be a module-level function so it
can be pickled) that solves, reports, then checks and reports again.  The
parent waits at most ``1.25 × time limit + min(5 s, time limit)`` for the
solve (plus the repeat budget) and a separate allowance for the check; a run that raises is
recorded as ``error`` (with the exception), one that outlives its allowance
is killed and recorded as ``timeout``, one that dies (a signal, the kernel's
out-of-memory killer, a failed allocation in C++) as ``crashed`` with its
exit code.  The child's data segment is capped (`memory_limit_bytes` above
what it inherited) so a memory blow-up fails inside that run.

Timing: wall time of the solver call on a `LayerTable` (the instance is
flattened once, in the parent, before any run; flattening is not timed);
a run faster than the repeat budget is repeated up to `repeats` times and
the median reported.  Peers are timed on their own call only (input list
conversion included, building the cachefit Plan excluded).  Memory: the
child resets its peak-RSS mark (``/proc/self/clear_refs``) before the solve
and reads ``VmHWM`` after it; ``memory_bytes`` is that peak minus the RSS at
the start (where the kernel does not support the reset, ``ru_maxrss``).
"""

from __future__ import annotations

import contextlib

import importlib
import logging
import multiprocessing
import os
import re
import resource
import statistics
import time
import traceback
from dataclasses import dataclass

from cachefit.checker import check
from cachefit.errors import InputError
from cachefit.instances.families import CAPACITY_MODES, FAMILIES, available, generate
from cachefit.memory import LayerTable

from .timing import has_plan

__all__ = ["InstanceSpec", "QUICK_SIZES", "FULL_SIZES", "RUNNER_STATUSES", "instance_specs", "select_solvers",
           "load_solver", "run_benchmark", "add_quality"]

logger = logging.getLogger(__name__)

#: Statuses the runner gives a run that produced no plan record of its own.
RUNNER_STATUSES = ("error", "timeout", "crashed", "skipped")

#: Node counts per family in ``--quick`` mode and in the full mode.
QUICK_SIZES = {
    "chain-uniform": (10, 200, 1_000), "chain-lognormal": (10, 200, 1_000), "chain-spiky": (10, 200, 1_000),
    "dag-layered": (10, 50), "dag-series-parallel": (10, 50), "model-op": (50,), "dag-torch": (50,),
}
FULL_SIZES = {
    "chain-uniform": (10, 1_000, 10_000, 100_000, 1_000_000),
    "chain-lognormal": (10, 1_000, 10_000, 100_000, 1_000_000),
    "chain-spiky": (10, 1_000, 10_000, 100_000, 1_000_000),
    "dag-layered": (10, 50, 200, 1_000),
    "dag-series-parallel": (10, 50, 200, 1_000),
    "model-op": (50, 200, 400, 1_000),
    "dag-torch": (50, 200),
}

#: Defaults of the two modes: per-run time limit (s), repeats of fast runs.
QUICK_DEFAULTS = {"time_limit_s": 5.0, "repeats": 3}
FULL_DEFAULTS = {"time_limit_s": 30.0, "repeats": 5}

#: Solver names never benchmarked (``auto`` only dispatches to the others).
EXCLUDED_SOLVERS = ("auto",)
#: Largest n per solver (brute force is exponential).
SIZE_CAPS = {"brute": 12}

REPEAT_BUDGET_S = 2.0
CHECK_TIMEOUT_S = 300.0
DEFAULT_MEMORY_LIMIT = 8 << 30


@dataclass(frozen=True)
class InstanceSpec:
    """One benchmark instance: what `families.generate` is called with."""

    family: str
    n: int
    capacity_mode: str
    seed: int
    memory: str

    @property
    def name(self):
        return f"{self.family}/n={self.n}/{self.capacity_mode}/seed={self.seed}"


def instance_specs(*, quick=False, families=None, ns=None, seed=0, capacity_modes=CAPACITY_MODES, memory=None):
    """The instances to run: every selected family × size × capacity mode.

    Parameters
    ----------
    quick : bool
        Sizes from `QUICK_SIZES` instead of `FULL_SIZES`.
    families : sequence of str, optional
        Default: every family.
    ns : sequence of int, optional
        Sizes for every selected family instead of the mode's table.
    seed : int
    capacity_modes : sequence of {"tight", "loose"}
    memory : str, optional
        Memory model for every instance (default: each family's).

    Returns
    -------
    list of InstanceSpec

    Raises
    ------
    InputError
        An unknown family, a size < 1, an unknown capacity mode.

    Examples
    --------
    >>> [spec.name for spec in instance_specs(quick=True, families=["chain-uniform"], ns=[8])]
    ['chain-uniform/n=8/tight/seed=0', 'chain-uniform/n=8/loose/seed=0']
    """
    families = list(FAMILIES) if not families else list(families)
    for family in families:
        if family not in FAMILIES:
            raise InputError(f"`family` must be one of {', '.join(FAMILIES)}, got {family!r}")
    for mode in capacity_modes:
        if mode not in CAPACITY_MODES:
            raise InputError(f"`capacity_modes` must hold {' or '.join(CAPACITY_MODES)}, got {mode!r}")
    if ns is not None:
        for n in ns:
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise InputError(f"`n` must be positive integers, got {n!r}")
    table = QUICK_SIZES if quick else FULL_SIZES
    specs = []
    for family in families:
        for n in (ns if ns else table[family]):
            for mode in capacity_modes:
                specs.append(InstanceSpec(family, int(n), mode, int(seed), memory or FAMILIES[family].memory))
    return specs


def load_solver(spec):
    """A solver function from ``"module:function"`` (for ``--extra-solver NAME=module:function``).

    Raises
    ------
    InputError
        Not of the form module:function, or it does not import.

    Examples
    --------
    >>> load_solver("cachefit.solvers:greedy").__name__
    'greedy'
    """
    module_name, _, attribute = str(spec).partition(":")
    if not module_name or not attribute:
        raise InputError(f"`extra solver` must be 'module:function', got {spec!r}")
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise InputError(f"`extra solver` {spec!r} cannot be loaded: {exc}") from None
    if not callable(function):
        raise InputError(f"`extra solver` {spec!r} is not callable")
    return function


def select_solvers(names=None, extra=None):
    """name -> solver function: the registry (less `EXCLUDED_SOLVERS`), filtered, plus extras.

    Parameters
    ----------
    names : sequence of str, optional
        Keep only these (registered or extra) names.
    extra : mapping of str to callable, optional
        More solvers with the common signature, e.g. from ``--extra-solver``.

    Raises
    ------
    InputError
        A name that is neither registered nor extra.

    Examples
    --------
    >>> sorted(select_solvers(["greedy"]))
    ['greedy']
    """
    from cachefit.solvers import SOLVERS

    pool = {name: function for name, function in SOLVERS.items() if name not in EXCLUDED_SOLVERS}
    pool.update(extra or {})
    if not names:
        return pool
    unknown = [name for name in names if name not in pool]
    if unknown:
        raise InputError(f"`solver` must be among {', '.join(pool)}, got {', '.join(map(repr, unknown))}")
    return {name: pool[name] for name in names}


# -- the child process --------------------------------------------------------------------------

def _proc_status(field):
    try:
        with open("/proc/self/status") as stream:
            match = re.search(rf"^{field}:\s+(\d+) kB", stream.read(), re.MULTILINE)
        return int(match.group(1)) * 1024 if match else None
    except OSError:
        return None


def _reset_peak():
    """Reset the kernel's peak-RSS mark of this process; True if it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as stream:
            stream.write("5")
        return True
    except OSError:
        return False


def _peak_bytes(reset_ok):
    if reset_ok:
        peak = _proc_status("VmHWM")
        if peak is not None:
            return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _plan_fields(plan):
    sizes = [int(size) for size in plan.sizes]
    return {"plan_status": str(plan.status), "k": int(plan.k), "lower_bound": int(plan.lower_bound),
            "bottleneck": int(plan.bottleneck), "sum_sq": sum(size * size for size in sizes),
            "solver_wall_s": float(plan.wall_s), "reason": plan.reason,
            "stats": {key: value for key, value in plan.stats.items()
                      if isinstance(value, (int, float, str, bool)) or value is None}}


def _call(job):
    """One solve of `job`: a registered solver's call, or a peer through its adapter."""
    if job["kind"] == "peer":
        from .peers import peer_plan
        return peer_plan(job["peer"], job["table"], job["k"], capacity=job["capacity"], memory=job["memory"])
    return job["function"](job["table"], job["capacity"], memory=job["memory"], time_limit_s=job["time_limit_s"],
                           seed=job["seed"])


def _child(connection, job):
    """Solve, send the result, check, send the check (runs in the child process)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        limit = job.get("memory_limit_bytes")
        if limit:
            data = _proc_status("VmData") or 0
            resource.setrlimit(resource.RLIMIT_DATA, (data + int(limit), resource.RLIM_INFINITY))
        rss_start = _proc_status("VmRSS") or 0
        reset_ok = _reset_peak()
        times, plan = [], None
        while True:
            started = time.perf_counter()
            plan = _call(job)
            elapsed = time.perf_counter() - started
            times.append(plan.wall_s if job["kind"] == "peer" else elapsed)
            if len(times) >= job["repeats"] or sum(times) + times[-1] > REPEAT_BUDGET_S:
                break
        peak = _peak_bytes(reset_ok)
        message = {"phase": "solved", "wall_s": statistics.median(times), "wall_s_all": times,
                   "peak_rss_bytes": peak, "memory_bytes": max(0, peak - rss_start), **_plan_fields(plan)}
        connection.send(message)
        report = check(plan, job.get("check_graph"))
        connection.send({"phase": "checked", "check_ok": bool(report.ok), "violations": list(report.violations[:3])})
    except BaseException as exc:  # everything a run can throw is recorded, nothing escapes
        try:
            connection.send({"phase": "error", "error": f"{type(exc).__name__}: {exc}"[:500],
                             "traceback": traceback.format_exc()[-2000:]})
        except Exception:
            pass
    finally:
        connection.close()


def _context():
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def _fail(outcome, phase, status, why):
    """Record a run that ended without an answer: as its status while solving, as an unknown check after."""
    if phase == "solve":
        outcome["status"] = status
        outcome["error"] = why
    else:
        outcome["check_ok"] = None
        outcome["violations"] = [f"check: {why}"]


def _execute(job, *, solve_timeout_s, check_timeout_s):
    """Run `job` in a child process; return the parent's view of it as a dict."""
    context = _context()
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(sender, job), daemon=True)
    process.start()
    sender.close()
    outcome = {}
    deadline = time.monotonic() + solve_timeout_s
    phase = "solve"
    try:
        while True:
            if receiver.poll(0.02):
                try:
                    message = receiver.recv()
                except (EOFError, OSError):
                    process.join(1.0)
                    _fail(outcome, phase, "crashed", f"the process died (exit code {process.exitcode})")
                    break
                if message["phase"] == "error":
                    outcome.update(status="error" if phase == "solve" else outcome.get("status", "error"),
                                   error=message["error"], traceback=message["traceback"])
                    if phase == "check":
                        outcome["check_ok"] = False
                        outcome["violations"] = [f"check raised {message['error']}"]
                    break
                if message["phase"] == "solved":
                    outcome.update(message)
                    outcome["status"] = message["plan_status"]
                    phase = "check"
                    deadline = time.monotonic() + check_timeout_s
                    continue
                if message["phase"] == "checked":
                    outcome.update(message)
                    break
            if not process.is_alive() and not receiver.poll(0.05):
                process.join()
                _fail(outcome, phase, "crashed", f"the process died (exit code {process.exitcode})")
                break
            if time.monotonic() > deadline:
                limit = solve_timeout_s if phase == "solve" else check_timeout_s
                _fail(outcome, phase, "timeout", f"no result within {limit:g} s; killed")
                break
    finally:
        if process.is_alive():
            process.kill()
        process.join(5.0)
        receiver.close()
    return outcome


# -- records ------------------------------------------------------------------------------------

def _blank_record(spec, instance_info, solver, kind, task, k_target):
    return {
        "instance": spec.name, "family": spec.family, "n": instance_info["n"], "n_requested": spec.n,
        "edges": instance_info["edges"], "capacity": instance_info["capacity"],
        "capacity_mode": spec.capacity_mode, "memory": spec.memory, "seed": spec.seed,
        "source": instance_info["source"], "task": task, "k_target": k_target, "solver": solver, "kind": kind,
        "status": "skipped", "reason": "", "error": "", "k": None, "lower_bound": None, "bottleneck": None,
        "sum_sq": None, "wall_s": None, "wall_s_all": [], "solver_wall_s": None, "peak_rss_bytes": None,
        "memory_bytes": None, "check_ok": None, "violations": [], "stats": {},
        "best_k": None, "best_lower_bound": None, "best_bottleneck": None, "k_ratio": None,
        "bottleneck_ratio": None,
    }


def _fill(record, outcome):
    for key in ("status", "error", "k", "lower_bound", "bottleneck", "sum_sq", "wall_s", "wall_s_all",
                "solver_wall_s", "peak_rss_bytes", "memory_bytes", "check_ok", "violations", "stats"):
        if key in outcome:
            record[key] = outcome[key]
    if outcome.get("reason"):
        record["reason"] = outcome["reason"]
    if record["status"] in ("error", "timeout", "crashed") and not record["reason"]:
        record["reason"] = record["error"]
    if record["status"] in ("INFEASIBLE", "UNKNOWN") and record["k"] == 0:
        record["k"] = None
        record["bottleneck"] = None
        record["sum_sq"] = None
    return record


def add_quality(runs):
    """Fill ``best_*``, ``k_ratio`` and ``bottleneck_ratio`` of every run, per instance.

    best_k is the smallest k of a min-k plan that passed `check` (a checked
    plan proves that k is reachable); best_lower_bound the largest lower
    bound stated by a min-k run whose result passed `check`; best_bottleneck the smallest bottleneck among
    checked min-k plans with k = best_k.  k_ratio = k / best_k for min-k
    runs with a checked plan; bottleneck_ratio = bottleneck / best_bottleneck
    for those whose k = best_k, and for the peers' balanced-k runs with k =
    best_k (computed whether or not the peer's plan fits the capacity: an
    oversize peer plan shows as ``check_ok`` False beside its ratio).
    """
    by_instance = {}
    for run in runs:
        by_instance.setdefault(run["instance"], []).append(run)
    for group in by_instance.values():
        for run in group:
            run["k_ratio"] = run["bottleneck_ratio"] = None
        checked = [run for run in group if run["task"] == "min-k" and has_plan(run) and run["check_ok"]]
        bounds = [run["lower_bound"] for run in group
                  if run["task"] == "min-k" and run["lower_bound"] is not None and run["check_ok"]]
        best_k = min((run["k"] for run in checked), default=None)
        best_bottleneck = min((run["bottleneck"] for run in checked if run["k"] == best_k), default=None)
        best_lower = max(bounds, default=None)
        for run in group:
            run["best_k"], run["best_lower_bound"], run["best_bottleneck"] = best_k, best_lower, best_bottleneck
            if not has_plan(run) or best_k is None or (run["task"] == "min-k" and not run["check_ok"]):
                continue
            if run["task"] == "min-k":
                run["k_ratio"] = run["k"] / best_k
            if best_bottleneck and run["k"] == best_k:
                run["bottleneck_ratio"] = run["bottleneck"] / best_bottleneck
    return runs


# -- the benchmark ------------------------------------------------------------------------------

def _quiet_import_peers():
    """Import the peers' packages once in the parent (children inherit them)."""
    from .peers import available_peers

    return available_peers()


def _load_average():
    """The 1-minute load average (other work on the machine skews timings), or None."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _instance_info(spec, instance, capacity):
    table = instance if isinstance(instance, LayerTable) else LayerTable.from_graph(instance)
    source = ""
    if table.graph is not None:
        graph = table.graph.graph
        source = graph.get("name", "")
        if spec.family == "model-op":
            source = f"{graph.get('name')} batch={graph.get('batch')} seq_len={graph.get('seq_len')}"
    return table, {"n": table.n, "edges": int(len(table.sources)), "capacity": int(capacity), "source": source}


def run_benchmark(*, quick=False, families=None, ns=None, solvers=None, extra_solvers=None, peers=None,
                  time_limit_s=None, repeats=None, seed=0, memory=None, capacity_modes=CAPACITY_MODES,
                  memory_limit_bytes=DEFAULT_MEMORY_LIMIT, check_timeout_s=CHECK_TIMEOUT_S, progress=None):
    """Run the benchmark and return its results object (see `cachefit.bench.report`).

    Parameters
    ----------
    quick : bool
        Quick mode: small sizes, 5 s time limit, 3 repeats (defaults).
    families, ns, seed, memory, capacity_modes
        Instance selection, see `instance_specs`.
    solvers : sequence of str, optional
        Solver names (registered or extra; peers by name too).  Default: all.
    extra_solvers : mapping of str to callable, optional
        Solvers to run besides the registry's.
    peers : sequence of str, optional
        Peer names (default: every importable peer; ``[]`` for none).
    time_limit_s : float, optional
        Per-run limit, passed to each solver as ``time_limit_s``; the run is
        killed at 1.25× plus min(5 s, 1×) plus the repeat budget.
    repeats : int, optional
        Repeats of runs faster than the repeat budget (median reported).
    memory_limit_bytes : int or None
        Cap on the memory one run may allocate beyond what it inherited.
    check_timeout_s : float
        Allowance for `cachefit.check` in the child.
    progress : rich.progress.Progress, optional
        A started progress bar to advance; default: report through
        `cachefit.progress` (one task, advanced per run; the CLI shows it).

    Returns
    -------
    dict
        ``settings``, ``families`` (availability), ``peers`` (available,
        missing), ``runs`` (one record per run; fields in
        `cachefit.bench.report.RUN_FIELDS`).  Machine info is added by
        `cachefit.bench.report.results_document`.

    Raises
    ------
    InputError
        Bad selection (unknown family or solver, bad size).
    """
    defaults = QUICK_DEFAULTS if quick else FULL_DEFAULTS
    time_limit_s = defaults["time_limit_s"] if time_limit_s is None else float(time_limit_s)
    repeats = defaults["repeats"] if repeats is None else int(repeats)
    if not time_limit_s > 0:
        raise InputError(f"`time_limit_s` must be positive, got {time_limit_s!r}")
    if repeats < 1:
        raise InputError(f"`repeats` must be at least 1, got {repeats!r}")
    load_start = _load_average()
    chosen, peers, available_peer_names, missing_peers = _selection(solvers, extra_solvers, peers)

    specs = instance_specs(quick=quick, families=families, ns=ns, seed=seed, memory=memory,
                           capacity_modes=capacity_modes)
    family_status = {}
    for family in dict.fromkeys(spec.family for spec in specs):
        ok, reason = available(family)
        family_status[family] = {"available": ok, "reason": reason}
    specs = [spec for spec in specs if family_status[spec.family]["available"]]

    solve_timeout = 1.25 * time_limit_s + min(5.0, time_limit_s) + REPEAT_BUDGET_S
    limits = {"time_limit_s": time_limit_s, "repeats": repeats, "memory_limit_bytes": memory_limit_bytes,
              "solve_timeout_s": solve_timeout, "check_timeout_s": check_timeout_s}
    with contextlib.ExitStack() as stack:
        if progress is None:
            progress = _TaskProgress(stack)
        task = progress.add_task("benchmark", total=len(specs) * (len(chosen) + len(peers)))
        runs = _run_specs(specs, chosen, peers, family_status, limits, progress, task)
    add_quality(runs)
    settings = {"mode": "quick" if quick else "full", "time_limit_s": time_limit_s, "repeats": repeats,
                "repeat_budget_s": REPEAT_BUDGET_S, "seed": seed, "memory_override": memory,
                "memory_limit_bytes": memory_limit_bytes, "capacity_modes": list(capacity_modes),
                "solvers": list(chosen), "peers": peers,
                "families": list(family_status), "sizes": sorted({spec.n for spec in specs}),
                "start_method": _context().get_start_method(),
                "load_average_start": load_start, "load_average_end": _load_average()}
    return {"settings": settings, "families": family_status,
            "peers": {"available": available_peer_names, "missing": missing_peers}, "runs": runs}


class _TaskProgress:
    """The rich ``Progress`` calls `run_benchmark` makes, reported through `cachefit.progress`
    (shown only where the CLI installed a reporter)."""

    def __init__(self, stack):
        self._stack, self._handle = stack, None

    def add_task(self, name, total=None):
        from cachefit.progress import task

        self._handle = self._stack.enter_context(task(name, total=total))
        return name

    def update(self, _task, *, description=None, **_):
        self._handle.update(detail=description)

    def advance(self, _task, steps=1):
        self._handle.advance(steps)


def _run_specs(specs, chosen, peers, family_status, limits, progress, task):
    """The run records of every instance in `specs` (a family that fails to build is marked unavailable)."""
    runs = []
    for spec in specs:
        progress.update(task, description=f"{spec.name}: generating")
        try:
            instance, capacity = generate(spec.family, spec.n, seed=spec.seed, capacity=spec.capacity_mode,
                                          memory=spec.memory)
        except Exception as exc:  # a family that fails to build is recorded, not fatal
            logger.warning("instance %s failed to build: %s", spec.name, exc)
            family_status[spec.family] = {"available": False, "reason": f"{spec.name}: {type(exc).__name__}: {exc}"}
            progress.advance(task, len(chosen) + len(peers))
            continue
        table, info = _instance_info(spec, instance, capacity)
        check_graph = table.to_graph() if table.graph is None else table.graph
        instance_runs = _run_solvers(spec, info, table, capacity, check_graph, chosen, limits, progress, task)
        instance_runs.extend(_run_peers(spec, info, table, capacity, check_graph, instance_runs, peers,
                                        limits["time_limit_s"], limits["repeats"], limits["memory_limit_bytes"],
                                        limits["solve_timeout_s"], limits["check_timeout_s"], progress,
                                        task))
        runs.extend(instance_runs)
        del check_graph, table, instance
    return runs


def _selection(solvers, extra_solvers, peers):
    """(solvers to run by name, peers to run, importable peer names, missing peers: name -> why).

    `solvers` may name registered solvers, extra solvers and peers alike;
    with no `peers` given, the peers it names run (all importable ones when
    it names nothing).
    """
    available_peer_names, missing_peers = _quiet_import_peers()
    names = list(solvers) if solvers else None
    peer_selection = [name for name in (names or []) if name in available_peer_names or name in missing_peers]
    solver_selection = [name for name in (names or []) if name not in peer_selection]
    if names and not solver_selection:
        chosen = {}
    else:
        chosen = select_solvers(solver_selection or None, extra_solvers)
    if peers is None:
        peers = peer_selection if names else available_peer_names
    peers = [name for name in peers if name in available_peer_names]
    return chosen, peers, available_peer_names, missing_peers


def _run_solvers(spec, info, table, capacity, check_graph, chosen, limits, progress, task):
    """One min-k run record per cachefit solver in `chosen` on one instance (over its size cap: skipped)."""
    records = []
    for name, function in chosen.items():
        if progress is not None:
            progress.update(task, description=f"{spec.name}: {name}")
        record = _blank_record(spec, info, name, "cachefit", "min-k", None)
        cap = SIZE_CAPS.get(name)
        if cap is not None and table.n > cap:
            record["reason"] = f"skipped (n too large): {name} handles n <= {cap}"
        else:
            job = {"kind": "cachefit", "function": function, "table": table, "capacity": capacity,
                   "memory": spec.memory, "time_limit_s": limits["time_limit_s"], "seed": spec.seed,
                   "repeats": limits["repeats"], "check_graph": check_graph,
                   "memory_limit_bytes": limits["memory_limit_bytes"]}
            _fill(record, _execute(job, solve_timeout_s=limits["solve_timeout_s"],
                                   check_timeout_s=limits["check_timeout_s"]))
        records.append(record)
        if progress is not None:
            progress.advance(task)
    return records


def _run_peers(spec, info, table, capacity, check_graph, instance_runs, peers, time_limit_s, repeats,
               memory_limit_bytes, solve_timeout, check_timeout_s, progress, task):
    from .peers import skip_reason

    if not peers or FAMILIES[spec.family].kind != "chain":  # peers partition sequences: chain families only
        if progress is not None:
            progress.advance(task, len(peers))
        return []
    records = []
    dp_runs = [run for run in instance_runs if run["solver"] == "dp" and has_plan(run) and run["check_ok"]]
    checked = [run for run in instance_runs if has_plan(run) and run["check_ok"]]
    if dp_runs:
        k, k_source = dp_runs[0]["k"], "dp"
    elif checked:
        k, k_source = min(run["k"] for run in checked), "best checked plan"
    else:
        k, k_source = None, None
    for name in peers:
        if progress is not None:
            progress.update(task, description=f"{spec.name}: {name}")
        record = _blank_record(spec, info, name, "peer", "balanced-k", k)
        if k is None:
            record["reason"] = "skipped: no checked min-k plan to take k from"
        elif (reason := skip_reason(name, table.n, k, time_limit_s)) is not None:
            record["reason"] = reason
        else:
            job = {"kind": "peer", "peer": name, "table": table, "k": k, "capacity": capacity, "memory": spec.memory,
                   "repeats": repeats, "check_graph": check_graph, "memory_limit_bytes": memory_limit_bytes}
            _fill(record, _execute(job, solve_timeout_s=solve_timeout, check_timeout_s=check_timeout_s))
            record["stats"] = {**record["stats"], "k_from": k_source}
        records.append(record)
        if progress is not None:
            progress.advance(task)
    return records
