"""Exact window repacking: large-neighbourhood search whose neighbourhood CP-SAT solves exactly.

`repack_windows` improves a valid plan by taking w consecutive groups
i..i+w−1, fixing everything before and after them, and asking CP-SAT
(`cachefit.solvers._cpsat_model.Model`, the one order encoding) for a
repacking of just those nodes into w − 1 groups (or a sideways move).
The model of a window is small (its nodes × w cells, at most
`MAX_WINDOW_CELLS`), so it is built in milliseconds whatever the size of
the graph, and CP-SAT's search runs where the model of the whole graph could
not even be built in the time limit.

Notes
-----
**Why a window can be solved alone.**  A group's size depends only on which
nodes lie before it, in it and after it (`cachefit.solvers.search` notes).
With the nodes before group i and after group i+w−1 fixed, every group
outside the window keeps its size, and the window's groups see:

- the outputs *carried* into the window (nodes before it with a consumer in
  it or after it): in the model they are nodes fixed in the window's first
  group with no bytes of their own but their live ones, so each is live
  from there to its last consumer in the window;
- consumers *after* the window: one node fixed in the window's last group
  with no bytes at all, a successor of every carried or window node that
  has a consumer after the window, so that such an output stays live to
  the window's end.

The model is `Model` with ``exact_k`` and these `cachefit.memory.Terms`;
exactly w − 1 groups is no restriction, since splitting a group never makes
a part larger under any model (a part's members, largest buffer and live
set are subsets of the group's).  CP-SAT only *proposes*: a repacking is
re-measured exactly (`cachefit.solvers._schedule.ListScheduler.measure`,
integer arithmetic of `cachefit.memory`) and kept only when it is valid and
fits; the parent re-measures the whole plan a child sends back; and the plan
a solver returns still goes through `finish` and `cachefit.check`.  A
window proved infeasible says nothing about the whole plan (another window,
or another order, may still do better): nothing is ever claimed from one.

**Which windows: a sweep.**  From a cursor at the first group, the widest
window whose model stays within the sweep's cell budget (`WINDOW_CELLS` at
first: about 5 groups) is asked first for one group fewer (skipped when
its nodes' summed bytes alone cannot fit in one group fewer), else for as
many groups with the last one as small as possible (a *sideways* move,
hinted with the window as it is: its free bytes move to the window's last
group, where the next window starts, so free bytes scattered over many
groups gather until a window can drop one).  The cursor then moves to the
window's last group, or stays after one group fewer.  A sweep to the end of
the plan without a move doubles the cell budget (wider windows: a larger
neighbourhood, slower solves), up to `MAX_WINDOW_CELLS`; a sweep of the
widest windows without a move is a *stall*.

**Contained, batched.**  The windows run in slices of `SLICE_S` seconds,
each in one child forked by `cachefit.solvers._cpsat_child.run_contained`:
an OR-Tools abort loses one slice (the plan in hand is kept), never the
caller, and a fork costs one slice, not one window.

**Deterministic** for a fixed seed when time is not what stops it: one
worker, a deterministic time limit per window
(`WINDOW_DETERMINISTIC_S`, CP-SAT's ``max_deterministic_time``), the sweep
a function of the plan, and a window cut by the end of a slice is tried
again whole in the next.

**Time.**  No window is built or solved past the deadline: a slice ends
`SLICE_MARGIN_S` before it, and each solve's wall-clock limit is what is
left of its slice.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from ..memory import LayerTable, Terms, get_model
from ._cpsat_child import CONTAINED, run_contained
from ._cpsat_model import SEARCH, SEARCH_FROM_HINT, BuildTimeout, Model
from ._deadline import Deadline

__all__ = ["repack_windows", "WINDOW_CELLS", "MAX_WINDOW_CELLS", "WINDOW_DETERMINISTIC_S", "WINDOW_SEARCH",
           "WINDOW_FROM_HINT", "SLICE_S", "SLICE_MARGIN_S"]

logger = logging.getLogger(__name__)

#: The most cells a window's model may have in the first sweep (Σ over its nodes of 2 + out-degree and
#: its carried nodes, times its groups less one): windows of about 5 groups on the tight dag-layered
#: instances, solved in ~0.1 s each.  On the 1,000-node liveness one, sweeps within 2,000 cells took k
#: from 73 to 70 in 8 s, within 8,000 cells (windows of ~12 groups, ~0.5 s each) to 71.
WINDOW_CELLS = 2000

#: After a sweep without a move the budget doubles, up to this; past it the search has stalled.
MAX_WINDOW_CELLS = 16000

#: CP-SAT's deterministic time limit per window (roughly seconds of one core) of `WINDOW_CELLS`; a wider
#: sweep's windows get proportionally more.
WINDOW_DETERMINISTIC_S = 0.3

#: Parameters of a window's solve: `SEARCH` without the LP relaxation, which on the windows of the tight
#: 1,000-node dag-layered liveness instance decides "w − 1 groups" about 3× faster (0.43 s against
#: 1.6 s for a window of 12 groups, the same windows found feasible).
WINDOW_SEARCH = {**SEARCH, "linearization_level": 0}

#: The same for a sideways move of a model with a live term, which starts from the window as it is
#: (presolve would lose that hint: `cachefit.solvers._cpsat_model.SEARCH_FROM_HINT`).
WINDOW_FROM_HINT = {**SEARCH_FROM_HINT, "linearization_level": 0}

#: Seconds one child runs windows before it sends its plan back.
SLICE_S = 3.0

#: Seconds a slice ends before the caller's deadline: CP-SAT can take 0.1–0.2 s past its limit to stop
#: on a loaded 2-core machine, and the child then sends its plan (`cachefit.solvers.cpsat` notes).
SLICE_MARGIN_S = 0.3

#: Seconds a window's solve keeps from its slice for CP-SAT to stop.
_STOP_S = 0.15

#: The shortest wall-clock limit a window is solved with (less is left: the window waits for the next slice).
_MIN_SOLVE_S = 0.05

#: The fewest groups a window takes (2 groups into 1 is the smallest repacking).
MIN_WIDTH = 2


def repack_windows(problem, incumbent, lower, deadline, *, scale, contain=CONTAINED):
    """Improve `incumbent` (a `cachefit.solvers._schedule.Incumbent`) by exact window repacking, in place.

    Parameters
    ----------
    problem : cachefit.solvers._common.Problem
    incumbent : Incumbent
        A valid plan of `problem`; replaced by every better plan found.
    lower : int
        A proven lower bound on k: the search stops when k reaches it.
    deadline : Deadline
        No window is built or solved past it.
    scale : (int, int)
        The activation scale of the CP-SAT model (`cachefit.solvers.cpsat.activation_scale`).
    contain : bool
        Run the slices in forked children (default where the platform can).

    Returns
    -------
    dict
        ``windows`` (solves), ``windows_improved`` (fewer groups),
        ``sideways`` (moves kept), ``slices`` (children), ``build_s`` and
        ``solve_s`` (summed over windows), ``build_max_s`` (the slowest
        build), ``windows_rejected`` when CP-SAT proposed a repacking that
        measured over capacity, ``crashes`` when a child was lost, and
        ``stop_reason``: ``"k meets the lower bound"``, ``"stall: ..."``,
        ``"time limit"``, or the crashes.
    """
    from ortools.sat.python import cp_model  # noqa: F401  (once here, not once per child: ~0.25 s each)

    context = _Context(problem, incumbent.packer, scale)
    state = {"cursor": 0, "moved": False, "cells": WINDOW_CELLS}
    stats = {"windows": 0, "windows_improved": 0, "sideways": 0, "slices": 0, "build_s": 0.0, "build_max_s": 0.0,
             "solve_s": 0.0}
    stop = None
    while stop is None:
        if incumbent.k <= lower:
            stop = "k meets the lower bound"
            break
        if deadline.remaining() <= SLICE_MARGIN_S + _STOP_S + 2 * _MIN_SOLVE_S:
            stop = "time limit"
            break
        slice_deadline = _slice_deadline(deadline)

        def run(slice_deadline=slice_deadline, state=dict(state)):
            return _slice(context, incumbent, lower, slice_deadline, state)

        if contain:
            result = run_contained(run, slice_deadline.remaining(), kill_after_s=deadline.remaining())
        else:
            result = run()
        stats["slices"] += 1
        if "groups" not in result:  # a crash or an overrun: the slice is lost, the plan in hand is kept
            stats["crashes"] = stats.get("crashes", 0) + 1
            stats["last_crash"] = result.get("crash", result.get("status"))
            logger.warning("exact windows: a slice was lost (%s)", stats["last_crash"])
            state = {**state, "cursor": state["cursor"] + 1}  # past the window that was lost with it
            if stats["crashes"] >= 3:
                stop = f"stopped after {stats['crashes']} lost slices ({stats['last_crash']})"
            continue
        for key in ("windows", "windows_improved", "sideways"):
            stats[key] += result[key]
        for key in ("build_s", "solve_s"):
            stats[key] = round(stats[key] + result[key], 3)
        stats["build_max_s"] = max(stats["build_max_s"], result["build_max_s"])
        if result["rejected"]:
            stats["windows_rejected"] = stats.get("windows_rejected", 0) + result["rejected"]
        if result["windows_improved"] or result["sideways"]:
            groups = result["groups"]
            sizes = context.measure_plan(groups)
            if sizes is None or len(groups) > incumbent.k:  # never expected: each window was measured in the child
                stop = "a child sent back a plan that does not measure valid; the plan in hand is kept"
                break
            incumbent.replace(groups, sizes)
        state = result["state"]
        if result["stop"] != "slice":
            stop = result["stop"]
    stats["stop_reason"] = stop
    return stats


class _Context:
    """What every window of one problem reads: the scheduler, the model's terms, the scale, out-degrees."""

    def __init__(self, problem, scheduler, scale):
        self.problem = problem
        self.capacity = problem.capacity
        self.scheduler = scheduler
        self.terms = get_model(problem.memory).terms(problem.table)
        self.scale = scale
        self.degree = np.bincount(problem.table.sources, minlength=problem.table.n)
        self.has_live = self.terms.live is not None
        self.summed = self.terms.summed.tolist()

    def may_drop(self, incumbent, start, width):
        """Whether the window's nodes could fit in width − 1 groups by their summed bytes alone (a necessary test)."""
        return sum(self.summed[v] for v in incumbent.window(start, width)) <= (width - 1) * self.capacity

    def measure_plan(self, groups):
        """Exact sizes of a whole plan, or None when it is not a valid plan of every node that fits."""
        n = self.problem.table.n
        if sorted(v for group in groups for v in group) != list(range(n)):
            return None
        sizes = self.scheduler.measure(groups, {})
        return sizes if sizes is not None and max(sizes, default=0) <= self.capacity else None

    def cells(self, incumbent, start, width):
        """An estimate of a window model's size (`WINDOW_CELLS`)."""
        nodes = incumbent.window(start, width)
        carried = int(((incumbent.part < start) & (incumbent.last >= start)).sum())
        return (int((2 + self.degree[nodes]).sum()) + carried) * (width - 1)


def _slice_deadline(deadline):
    """`SLICE_S` from now, or less: a slice ends `SLICE_MARGIN_S` before `deadline` (the rest when under 1.5 slices)."""
    left = deadline.remaining() - SLICE_MARGIN_S
    if left < 1.5 * SLICE_S:
        return Deadline(max(left, 0.0), start=deadline.now(), clock=deadline.clock)
    return Deadline(SLICE_S, start=deadline.now(), clock=deadline.clock)


def _slice(context, incumbent, lower, deadline, state):
    """Windows until `deadline`, a stall or k = `lower`; a JSON-able dict for the parent (module notes)."""
    counts = {"windows": 0, "windows_improved": 0, "sideways": 0, "rejected": 0, "build_s": 0.0, "build_max_s": 0.0,
              "solve_s": 0.0}
    stop = "slice"
    while True:
        if incumbent.k <= lower:
            stop = "k meets the lower bound"
            break
        if deadline.expired():
            break
        start = state["cursor"]
        width = _widest(context, incumbent, start, state["cells"])
        if width < MIN_WIDTH and start + MIN_WIDTH <= incumbent.k:  # two groups over the budget: the next start
            state["cursor"] = start + 1
            continue
        if width < MIN_WIDTH:  # the sweep has reached the end of the plan
            if not state["moved"]:
                if state["cells"] * 2 > MAX_WINDOW_CELLS:
                    stop = (f"stall: a whole sweep of windows of up to {state['cells']} cells found neither fewer "
                            "groups nor a sideways move")
                    break
                state["cells"] *= 2  # wider windows: a larger neighbourhood, slower to solve
            state.update(cursor=0, moved=False)
            continue
        kept = None
        for target in (width - 1, width):  # fewer groups, else a sideways move
            if target < width and not context.may_drop(incumbent, start, width):
                continue
            outcome = _solve_window(context, incumbent, start, width, target, deadline, state["cells"])
            counts["build_s"] += outcome["build_s"]
            counts["build_max_s"] = max(counts["build_max_s"], outcome["build_s"])
            counts["solve_s"] += outcome["solve_s"]
            if outcome["cut"]:  # cut by the end of the slice: this window is tried again whole in the next
                return _report(incumbent, state, counts, stop)
            counts["windows"] += 1
            kept = _keep(context, incumbent, start, width, outcome["groups"])
            if kept == "rejected":
                counts["rejected"] += 1
            elif kept:
                state["moved"] = True
                counts["windows_improved" if kept == "fewer" else "sideways"] += 1
                break
        if kept != "fewer":  # after fewer groups the same start is tried again on the new plan
            state["cursor"] = start + width - 1
    return _report(incumbent, state, counts, stop)


def _report(incumbent, state, counts, stop):
    counts["build_s"] = round(counts["build_s"], 4)
    counts["build_max_s"] = round(counts["build_max_s"], 4)
    counts["solve_s"] = round(counts["solve_s"], 4)
    return {"groups": incumbent.groups, "stop": stop, "state": state, **counts, "wall_s": 0.0}


def _keep(context, incumbent, start, width, found):
    """Replace the window by `found` when it is measured valid and better: "fewer", "sideways", "rejected" or None.

    Better: fewer groups, or as many with a smaller last group (its free
    bytes pushed towards the window's end, where the next window of the
    sweep starts).
    """
    if not found:
        return None
    sizes = context.scheduler.measure(found, incumbent.carried_into(start))
    if sizes is None or max(sizes) > context.capacity:  # CP-SAT proposed a repacking that does not fit
        return "rejected"
    if len(found) > width or (len(found) == width and sizes[-1] >= incumbent.sizes[start + width - 1]):
        return None
    incumbent.replace(incumbent.groups[:start] + found + incumbent.groups[start + width:],
                      incumbent.sizes[:start] + sizes + incumbent.sizes[start + width:])
    return "fewer" if len(found) < width else "sideways"


def _widest(context, incumbent, start, cells):
    """The widest window from `start` whose model stays within `cells` (less than `MIN_WIDTH` at the end)."""
    width = MIN_WIDTH
    while start + width <= incumbent.k and context.cells(incumbent, start, width) <= cells:
        width += 1
    return width - 1


def _solve_window(context, incumbent, start, width, target, deadline, cells=WINDOW_CELLS):
    """Repack one window into `target` groups (`width`: a sideways move); groups or None, times, and a cut flag."""
    outcome = {"groups": None, "build_s": 0.0, "solve_s": 0.0, "cut": False}
    if deadline.remaining() - _STOP_S < _MIN_SOLVE_S:  # no time for a solve: nothing is built
        outcome["cut"] = True
        return outcome
    began = time.perf_counter()
    sideways = target == width
    try:
        model, carried, nodes = _window_model(context, incumbent, start, width, target, deadline,
                                              minimize_group=target - 1 if sideways else None)
    except BuildTimeout:
        outcome["cut"] = True
        return outcome
    outcome["build_s"] = time.perf_counter() - began
    limit = deadline.remaining() - _STOP_S
    if limit < _MIN_SOLVE_S:
        outcome["cut"] = True
        return outcome
    parameters = {**(WINDOW_FROM_HINT if sideways and context.has_live else WINDOW_SEARCH),
                  "max_deterministic_time": WINDOW_DETERMINISTIC_S * cells / WINDOW_CELLS}
    result = model._solve_here(limit, 1, context.problem.seed, parameters)
    outcome["solve_s"] = float(result["wall_s"])
    if result["status"] not in ("OPTIMAL", "INFEASIBLE") and result["wall_s"] >= limit - 0.02:
        outcome["cut"] = True  # stopped by the wall clock, not by its work limit: not reproducible
        return outcome
    if "part" in result:
        part = result["part"]
        groups = [[] for _ in range(target)]
        for i, v in enumerate(nodes):
            groups[part[carried + i]].append(v)
        outcome["groups"] = [sorted(group) for group in groups if group]
    return outcome


def _window_model(context, incumbent, start, width, target, deadline, minimize_group=None):
    """The `Model` repacking groups start..start+width−1 into exactly `target` groups (module notes).

    Returns (model, number of carried nodes, the window's nodes).  Positions
    of the model's table: the carried nodes, the window's nodes, then (when
    an output is used after the window) the node that stands for everything
    after it.
    """
    nodes = incumbent.window(start, width)
    end = start + width
    carried = np.flatnonzero((incumbent.part < start) & (incumbent.last >= start))
    sub = np.concatenate([carried, np.asarray(nodes, dtype=np.int64)])
    position = {v: i for i, v in enumerate(sub.tolist())}
    first, m = len(carried), len(sub)
    leaving = np.flatnonzero(incumbent.last[sub] >= end)  # outputs used after the window
    size = m + (1 if len(leaving) else 0)
    sources, targets = [], []
    for v in nodes:
        for u in context.scheduler.predecessors[v]:  # every predecessor is carried or in the window
            sources.append(position[u])
            targets.append(position[v])
    sources = np.asarray(sources + leaving.tolist(), dtype=np.int64)
    targets = np.asarray(targets + [m] * len(leaving), dtype=np.int64)
    last_use = np.arange(size, dtype=np.int64)
    np.maximum.at(last_use, sources, targets)
    zeros = np.zeros(size, dtype=np.int64)
    table = LayerTable(tuple(map(str, range(size))), zeros, zeros, zeros, last_use, sources, targets, False)

    def column(values, own_bytes_of_carried):
        if values is None:
            return None
        out = np.zeros(size, dtype=np.int64)
        out[:m] = values[sub]
        if not own_bytes_of_carried:
            out[:first] = 0
        return out

    terms = context.terms
    window_terms = Terms(column(terms.summed, False), column(terms.peak, False), column(terms.live, True))
    earliest = np.zeros(size, dtype=np.int64)
    latest = np.full(size, target - 1, dtype=np.int64)
    latest[:first] = 0
    earliest[m:] = target - 1
    model = Model(table, context.capacity, None, context.scale, target, earliest, latest, None, exact_k=True,
                  objective=False, deadline=deadline, terms=window_terms, minimize_group=minimize_group)
    if target == width:  # the window as it is: a complete solution, CP-SAT's first incumbent
        part = [0] * first + [int(p) - start for p in incumbent.part[nodes].tolist()] + [target - 1] * (size - m)
        model.hint(part)
    return model, first, nodes
