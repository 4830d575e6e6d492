"""Tight DAGs: a solver of another checkout ("today") side by side with this one, in the same run.

Run::

    python -m cachefit.bench.bench_dag --today-python /path/to/other/venv/bin/python \\
        [--seeds 0 1] [--families dag-layered dag-series-parallel] [--nodes 250 500 1000] \\
        [--memory additive liveness] [--time-limit 10] [--solver auto] [--json out.json]

Every case (family, n, seed, memory model) is the bench's tight instance,
``cachefit.instances.families.generate(family, n, seed=seed,
capacity="tight", memory=memory)``.  Each side runs the solver in a fresh
child process whose working folder is a temporary one (so that the child
imports the ``cachefit`` its interpreter has installed, not one found in the
current folder), the two sides alternating case by case so that a change in
the machine's load hits both alike.  Each child regenerates the instance,
times the call a user makes, ``cachefit.plan(graph, capacity, solver=...)``,
from before it to after it returns (``wall_s``), re-checks the plan with
`cachefit.check` and prints one JSON line.

The summary is Σ(k − bound) per side, the count of cases where the new
side ends with a larger k than today's (the targets of the DAG-quality work:
the summed gap at least halves, no case gets worse), and each side's
largest wall time over the limit (a time limit is a promise about the whole
call; the documented slack is max(0.25 s, 5 %) of the limit).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

from .machine import machine_line

__all__ = ["run_case", "main"]

#: The child's program: one case in (argv[1], JSON), one JSON line out.
_CHILD = r"""
import json, sys, time
case = json.loads(sys.argv[1])
import cachefit
from cachefit import check
from cachefit.instances.families import generate
graph, capacity = generate(case["family"], case["n"], seed=case["seed"], capacity="tight", memory=case["memory"])
started = time.perf_counter()
plan = cachefit.plan(graph, capacity, solver=case["solver"], memory=case["memory"], time_limit_s=case["time_limit_s"],
                     seed=case["seed"])
wall = time.perf_counter() - started
report = check(plan)
print(json.dumps({"k": plan.k if plan.ok else None, "bound": plan.lower_bound, "status": str(plan.status),
                  "wall_s": round(wall, 3), "check": bool(report.ok), "solver": plan.solver,
                  "why": str(plan.stats.get("stop_reason", plan.stats.get("auto", ""))),
                  "setup_s": plan.stats.get("setup_s"),
                  "window_build_s": (plan.stats.get("exact_windows") or {}).get("build_s")
                  if isinstance(plan.stats.get("exact_windows"), dict) else None,
                  "package": cachefit.__file__}))
"""


def run_case(python, case, *, timeout_s):
    """Run one case in a child `python`; its JSON result, or ``{"error": ...}``."""
    with tempfile.TemporaryDirectory(prefix="cachefit-bench-dag-") as folder:
        try:
            done = subprocess.run([python, "-c", _CHILD, json.dumps(case)], cwd=folder, capture_output=True,
                                  text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout_s} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {done.returncode}: {tail}"}
    return json.loads(lines[-1])


def _cell(result):
    if "error" in result:
        return f"error: {result['error']}"
    flag = "" if result["check"] else " CHECK FAILED"
    return f"{result['k']}/{result['bound']}/{result['wall_s']:.2f}s{flag}"


def _summary(rows):
    def gap(side):
        return sum(row[side]["k"] - row[side]["bound"] for row in rows
                   if "error" not in row[side] and row[side]["k"] is not None)
    worse = [row for row in rows if "error" not in row["today"] and "error" not in row["new"]
             and row["new"]["k"] is not None and row["today"]["k"] is not None
             and row["new"]["k"] > row["today"]["k"]]
    def over(side):
        walls = [row[side]["wall_s"] - row["case"]["time_limit_s"] for row in rows if "error" not in row[side]]
        return round(max(walls), 3) if walls else None
    return {"gap_today": gap("today"), "gap_new": gap("new"), "worse": len(worse), "cases": len(rows),
            "over_today_s": over("today"), "over_new_s": over("new")}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--today-python", required=True, help="interpreter that imports today's cachefit")
    parser.add_argument("--new-python", default=sys.executable, help="interpreter of the new side (this one)")
    parser.add_argument("--families", nargs="+", default=["dag-layered", "dag-series-parallel"])
    parser.add_argument("--nodes", nargs="+", type=int, default=[250, 500, 1000])
    parser.add_argument("--memory", nargs="+", default=["additive", "liveness"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--time-limit", type=float, default=10.0, help="time_limit_s of both sides (s)")
    parser.add_argument("--solver", default="auto")
    parser.add_argument("--json", help="write the rows and summary here")
    args = parser.parse_args(argv)
    print(f"bench_dag: {args.solver}, time limit {args.time_limit:g} s; machine: {machine_line()}", flush=True)
    print("| instance | n | model | today k/bound/time | new k/bound/time |")
    print("| --- | --- | --- | --- | --- |", flush=True)
    rows = []
    timeout = max(60.0, 10 * args.time_limit)
    for family in args.families:
        for n in args.nodes:
            for seed in args.seeds:
                for memory in args.memory:
                    case = {"family": family, "n": n, "seed": seed, "memory": memory,
                            "time_limit_s": args.time_limit, "solver": args.solver}
                    today = run_case(args.today_python, case, timeout_s=timeout)
                    new = run_case(args.new_python, case, timeout_s=timeout)
                    rows.append({"case": case, "today": today, "new": new})
                    print(f"| {family} s{seed} | {n} | {memory} | {_cell(today)} | {_cell(new)} |", flush=True)
    summary = _summary(rows)
    print(f"Σ(k − bound): today {summary['gap_today']}, new {summary['gap_new']}; "
          f"cases with a larger k than today: {summary['worse']} of {summary['cases']}; largest wall time over "
          f"the limit: today {summary['over_today_s']} s, new {summary['over_new_s']} s", flush=True)
    if args.json:
        with open(args.json, "w") as stream:
            json.dump({"machine": machine_line(), "rows": rows, "summary": summary}, stream, indent=1)
    return summary


if __name__ == "__main__":
    main()
