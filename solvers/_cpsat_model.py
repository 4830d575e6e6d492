"""The CP-SAT model of a grouping (order encoding), built by one `_add_*` step per concern.

`cachefit.solvers.cpsat` decides what to solve and what to claim; this module
only states the model and reads a solve back.  Built on OR-Tools' snake_case
API (the CamelCase one is deprecated in 9.15).
"""

from __future__ import annotations

import time

import numpy as np

from ..memory import get_model
from ._cpsat_child import run_contained

__all__ = ["Model", "BuildTimeout", "SEARCH", "SEARCH_FROM_HINT", "CERTIFY"]

#: Parameters of the search solves.  ``presolve_inclusion_work_limit = 0`` switches off the
#: inclusion-detection presolve, which on 9.15 certifies wrong optima on models with large
#: coefficients (it alone breaks the 6-node instance pinned in tests/test_cpsat.py); other
#: presolve rules are still suspect, so no claim rests on these solves alone.
SEARCH = {"presolve_inclusion_work_limit": 0}

#: Parameters of the search solves of a hinted model with a live term: CP-SAT 9.15's presolve loses a
#: complete, feasible hint of such a model (on the 250-node tight dag-layered liveness instance the
#: hinted plan, fixed, solves at once, yet with presolve no solution appears in 5 s with 1 or 2
#: workers; without presolve the hint is the first incumbent).  So those solves start from the hint.
SEARCH_FROM_HINT = {**SEARCH, "cp_model_presolve": False}

#: Parameters of the certifying solves: no presolve, no LP relaxation, one worker.  What is
#: left is CP-SAT's exact integer propagation and clause learning, the part of the solver a
#: claim can rest on (cachefit.solvers.cpsat notes).
CERTIFY = {"cp_model_presolve": False, "linearization_level": 0, "num_workers": 1}


class BuildTimeout(Exception):
    """The model could not be built before its deadline."""


def _constant(value):
    return isinstance(value, int)


class Model:
    """The CP-SAT model of one solve: at most `groups` groups, or exactly `groups` with ``exact_k``.

    Variables (order encoding):

    - ``started[v][p]`` = 1 iff part(v) ≤ p; a constant outside v's domain.
    - ``x[v][p]`` = started[v][p] − started[v][p−1]: v is in group p.
    - ``used[p]``: group p is non-empty (at most `groups`; used groups form a prefix).
    - ``live[u][p]`` ≥ [part(u) ≤ p ≤ last(u)] (liveness): forced up by
      ``live[u][p] ≥ started[u][p] − started[z][p−1]`` for z = u and every
      successor z of u (z is in group p or later, u in p or earlier).
      Over-counting only tightens, and the bottleneck objective pushes it
      down, so the feasible groupings are exactly the valid ones.
    - ``buffer[p]`` ≥ b_v·x[v][p]: the largest buffer of group p.
    - ``act[p]``: den·act[p] ≥ num·Σ_u a_u·live[u][p] (`activation_scale`).
    - ``size[p]`` = Σ w·x + buffer[p] + act[p] (liveness) or Σ (w+a+b)·x
      (additive), ≤ C; with ``exact_k`` also ≤ the bottleneck variable, or,
      with `flops`, Σ flops·x[v][p] ≤ the bottleneck instead.

    With ``exact_k`` the bottleneck lies in [`bottleneck_low`,
    `bottleneck_high`]; ``objective=False`` leaves out the objective (a
    decision model: "is there a grouping within these bounds?").
    `deadline` (a `cachefit.solvers._deadline.Deadline`) bounds the build
    and `hint`: past it a builder raises `BuildTimeout`.  `terms` (a
    `cachefit.memory.Terms` of `table`) replaces `memory`'s own terms: a
    window of a plan (`cachefit.solvers._window`) states what is carried
    into it as nodes fixed in its first group with no bytes of their own
    but their live ones.  `minimize_group` (with ``exact_k``) replaces the
    objective by the size of that group (a window's sideways move).
    """

    def __init__(self, table, capacity, memory, scale, groups, earliest, latest, reach, *, exact_k,
                 minimum_groups=1, bottleneck_low=0, bottleneck_high=None, flops=None, objective=True,
                 deadline=None, terms=None, minimize_group=None):
        from ortools.sat.python import cp_model

        self.cp_model = cp_model
        self.model = cp_model.CpModel()
        self.table = table
        self.n = table.n
        self.groups = groups
        self.capacity = capacity
        self.deadline = deadline
        self.has_objective = objective
        self.hinted = False
        self.earliest = np.minimum(earliest, groups - 1).tolist()
        self.latest = np.minimum(latest, groups - 1).tolist()
        self._add_variables()
        self._add_precedence()
        self._add_group_use(exact_k, minimum_groups)
        self._add_capacity(get_model(memory).terms(table) if terms is None else terms, scale, reach)
        if minimize_group is not None:  # a window's sideways move (`cachefit.solvers._window`)
            self.bottleneck = None
            self.model.minimize(self.sizes[minimize_group])
        else:
            self._add_objective(exact_k, minimum_groups, bottleneck_low, bottleneck_high, flops, objective)

    # -- building -------------------------------------------------------------------------------
    def _check_clock(self):
        if self.deadline is not None and self.deadline.expired():
            raise BuildTimeout()

    def _before(self, v, p):
        """started[v][p − 1]: v is in a group before p (0 for p = 0)."""
        return 0 if p == 0 else self.started[v][p - 1]

    def _add_variables(self):
        """started[v][p] (with started[v][p] → started[v][p+1]) and x[v][p]."""
        model, K = self.model, self.groups
        self.started, self.x = [], []
        for v in range(self.n):
            self._check_clock()
            first, last = self.earliest[v], self.latest[v]
            row = [0] * first + [model.new_bool_var(f"started_{v}_{p}") for p in range(first, last)]
            row += [1] * (K - len(row))
            for p in range(first, last - 1):
                model.add_implication(row[p], row[p + 1])
            self.started.append(row)
            members = [0] * K
            for p in range(first, last + 1):
                members[p] = model.new_bool_var(f"x_{v}_{p}")
                model.add(members[p] == row[p] - self._before(v, p))
            self.x.append(members)

    def _add_precedence(self):
        """part(u) ≤ part(v) for every edge u→v: started[v][p] → started[u][p]."""
        model, earliest, latest = self.model, self.earliest, self.latest
        for u, v in zip(self.table.sources.tolist(), self.table.targets.tolist()):
            self._check_clock()
            # Below both domains both are 0, from both latest groups on both are 1: nothing to state.
            for p in range(min(earliest[u], earliest[v]), max(latest[u], latest[v])):
                later, earlier = self.started[v][p], self.started[u][p]
                if _constant(later) and _constant(earlier):
                    if later > earlier:
                        model.add_bool_or([])  # empty domains: no plan with this many groups
                elif _constant(later):
                    if later == 1:
                        model.add(earlier == 1)
                elif _constant(earlier):
                    if earlier == 0:
                        model.add(later == 0)
                else:
                    model.add_implication(later, earlier)

    def _add_group_use(self, exact_k, minimum_groups):
        """used[p]: the used groups form a prefix (symmetry breaking) and each is non-empty."""
        model, K = self.model, self.groups
        if exact_k:
            used = [1] * K
        else:
            used = [1 if p < minimum_groups else model.new_bool_var(f"used_{p}") for p in range(K)]
            for p in range(K - 1):
                if not _constant(used[p + 1]) and not _constant(used[p]):
                    model.add_implication(used[p + 1], used[p])
            # An unused group p means every node is in a group before p.  (Implied by the
            # clauses on sinks alone, but stated for every node it tightens the relaxation.)
            for p in range(1, K):
                self._check_clock()
                if _constant(used[p]):
                    continue
                for v in range(self.n):
                    done = self.started[v][p - 1]
                    if _constant(done):
                        if done == 0:
                            model.add(used[p] == 1)
                    else:
                        model.add_bool_or([used[p], done])
        for p in range(K):
            members = [self.x[v][p] for v in range(self.n) if not _constant(self.x[v][p])]
            model.add(sum(members) >= used[p])
        self.used = used

    def _weighted(self, coefficients, p):
        """Σ coefficients[v]·x[v][p] over the nodes that may be in group p."""
        terms = [(c, self.x[v][p]) for v, c in enumerate(coefficients) if c and not _constant(self.x[v][p])]
        return self.cp_model.LinearExpr.weighted_sum([var for _, var in terms], [c for c, _ in terms])

    def _live_terms(self, live, reach):
        """Per group, the (live_u, live[u][p]) terms of the outputs live in it (`live`: the model's live term)."""
        model, table, K = self.model, self.table, self.groups
        successors = table.successors()
        live_terms = [[] for _ in range(K)]
        for u in range(self.n):
            self._check_clock()
            if not live[u]:
                continue
            if table.last_use[u] == u:  # no successor: live only in its own group
                for p in range(K):
                    if not _constant(self.x[u][p]):
                        live_terms[p].append((live[u], self.x[u][p]))
                continue
            succ = successors[u]
            if reach is not None and len(succ) > 1:  # a successor with a later successor below it never decides last(u)
                succ = [z for z, dominated in zip(succ, reach[np.ix_(succ, succ)].any(axis=1)) if not dominated]
            horizon = max(self.latest[u], *(self.latest[z] for z in succ))
            for p in range(self.earliest[u], horizon + 1):
                produced = self.started[u][p]
                forcing = [gone for gone in (self._before(z, p) for z in [u, *succ])
                           if not (_constant(gone) and gone == 1)]
                if not forcing or (_constant(produced) and produced == 0):
                    continue
                flag = model.new_bool_var(f"live_{u}_{p}")
                for gone in forcing:
                    model.add(flag >= produced - gone)
                live_terms[p].append((live[u], flag))
                self.live_flags.append((u, p, flag))
        return live_terms

    def _add_capacity(self, terms, scale, reach):
        """size[p] = Σ summed·x + peak[p] + act[p] ≤ C over the model's terms (`cachefit.memory.Terms`).

        peak[p] ≥ the largest peak term in group p, act[p] ≥ ⌈f·Σ live outputs⌉;
        a term the model lacks is left out: additive is Σ (w + a + b)·x,
        liveness Σ w·x + the largest buffer + the live activations.
        """
        model = self.model
        numerator, denominator = scale
        summed = terms.summed.tolist()
        peak = terms.peak.tolist() if terms.peak is not None else [0] * self.n
        self.live_flags = []  # (u, p, live[u][p]) of the flags, for `hint`
        self.buffers, self.acts = {}, {}  # p -> buffer[p], p -> act[p] where they exist
        self.terms, self.scale = terms, scale
        live_terms = self._live_terms(terms.live.tolist(), reach) if terms.live is not None else None
        max_peak = max(peak) if self.n else 0
        LinearExpr = self.cp_model.LinearExpr
        self.sizes = []
        for p in range(self.groups):
            self._check_clock()
            term = self._weighted(summed, p)
            if max_peak:
                largest = model.new_int_var(0, max_peak, f"buffer_{p}")
                self.buffers[p] = largest
                for v in range(self.n):
                    if peak[v] and not _constant(self.x[v][p]):
                        model.add(largest >= peak[v] * self.x[v][p])
                term = term + largest
            if live_terms and live_terms[p]:
                live_sum = LinearExpr.weighted_sum([var for _, var in live_terms[p]], [a for a, _ in live_terms[p]])
                if (numerator, denominator) == (1, 1):
                    term = term + live_sum
                else:
                    act = model.new_int_var(0, self.capacity, f"act_{p}")
                    self.acts[p] = act
                    model.add(denominator * act >= numerator * live_sum)
                    term = term + act
            self.sizes.append(term)
            model.add(term <= self.capacity)

    def _add_objective(self, exact_k, minimum_groups, low, high, flops, objective):
        """Exactly k: minimise the bottleneck (bytes or flops); at most k: minimise the groups used."""
        model, K = self.model, self.groups
        self.bottleneck = None
        if not exact_k:
            model.add(sum(self.used) >= minimum_groups)
            if objective:
                model.minimize(sum(self.used))
            return
        if flops is not None:
            top = int(sum(flops)) if high is None else high
            self.bottleneck = model.new_int_var(min(low, top), top, "bottleneck_flops")
            self.flops = flops
            loads = [self._weighted(flops, p) for p in range(K)]
        else:
            top = self.capacity if high is None else high
            self.bottleneck = model.new_int_var(min(low, top), top, "bottleneck")
            loads = self.sizes
        for load in loads:
            model.add(load <= self.bottleneck)
        if objective:
            model.minimize(self.bottleneck)

    # -- hints and solving ----------------------------------------------------------------------
    def hint(self, part):
        """Hint a complete assignment from a group index per node (positions).

        Every variable is hinted, the auxiliary ones (live flags, buffers,
        scaled activations, the bottleneck) at the least value the
        constraints allow, so a valid plan is a complete feasible solution
        that CP-SAT takes as its first incumbent without a repair search.
        """
        model = self.model
        self._hint_auxiliary(part)
        self.hinted = True
        for v in range(self.n):
            self._check_clock()
            for p in range(self.groups):
                var = self.started[v][p]
                if not _constant(var):
                    model.add_hint(var, 1 if part[v] <= p else 0)
                var = self.x[v][p]
                if not _constant(var):
                    model.add_hint(var, 1 if part[v] == p else 0)
        top = max(part) if len(part) else -1
        for p, var in enumerate(self.used):
            if not _constant(var):
                model.add_hint(var, 1 if p <= top else 0)

    def _hint_auxiliary(self, part):
        """Hints of live[u][p], buffer[p], act[p] and the bottleneck for the grouping `part`."""
        model, K, table = self.model, self.groups, self.table
        part = np.asarray(part, dtype=np.int64)
        last = part.copy()  # the group of u's last consumer (u's own for a sink)
        np.maximum.at(last, table.sources, part[table.targets])
        live_sum = np.zeros(K, dtype=object)
        live = self.terms.live.tolist() if self.terms.live is not None else None
        for u, p, flag in self.live_flags:
            value = 1 if part[u] <= p <= last[u] else 0
            model.add_hint(flag, value)
        if live is not None:
            for u in range(self.n):  # every output is live from its group to its last consumer's
                for p in range(int(part[u]), int(last[u]) + 1):
                    live_sum[p] += live[u]
        summed = self.terms.summed.tolist()
        peak = self.terms.peak.tolist() if self.terms.peak is not None else [0] * self.n
        sizes = [0] * K
        largest = [0] * K
        for v in range(self.n):
            sizes[int(part[v])] += summed[v]
            largest[int(part[v])] = max(largest[int(part[v])], peak[v])
        numerator, denominator = self.scale
        for p in range(K):
            if p in self.buffers:
                model.add_hint(self.buffers[p], largest[p])
                sizes[p] += largest[p]
            if live is not None:
                act = -((-numerator * int(live_sum[p])) // denominator)
                if p in self.acts:
                    model.add_hint(self.acts[p], act)
                sizes[p] += act
        if self.bottleneck is not None:
            if getattr(self, "flops", None) is not None:
                loads = [0] * K
                for v in range(self.n):
                    loads[int(part[v])] += self.flops[v]
            else:
                loads = sizes
            model.add_hint(self.bottleneck, int(max(loads)))

    def solve(self, time_limit_s, workers, seed, parameters=SEARCH, *, stall_s=None, kill_after_s=None):
        """Solve in a contained child (`run_contained`); a dict of status, objective, bound, part, stop_reason.

        CP-SAT stops at `time_limit_s`, when it proves its answer, or (with
        `stall_s`) when neither its incumbent nor its bound has moved for
        `stall_s` seconds (`_Watch`).  The parent kills the child
        `kill_after_s` seconds after the fork at the latest.
        """
        time_limit_s = max(time_limit_s, 0.001)
        return run_contained(lambda: self._solve_here(time_limit_s, workers, seed, parameters, stall_s),
                             time_limit_s, kill_after_s=kill_after_s)

    def _solve_here(self, time_limit_s, workers, seed, parameters, stall_s=None):
        cp_model = self.cp_model
        solver = cp_model.CpSolver()
        solver.parameters.max_time_in_seconds = time_limit_s
        solver.parameters.num_workers = workers
        solver.parameters.random_seed = seed
        if workers > 1:
            # Deterministic parallel search: the default portfolio shares
            # solutions between threads as they come, which depends on timing.
            solver.parameters.interleave_search = True
        for name, value in parameters.items():
            setattr(solver.parameters, name, value)
        watch = _Watch(solver, time.perf_counter() + time_limit_s, stall_s)
        try:
            code = solver.solve(self.model, watch.callback(cp_model))
        finally:
            watch.close()
        status = {cp_model.OPTIMAL: "OPTIMAL", cp_model.FEASIBLE: "FEASIBLE",
                  cp_model.INFEASIBLE: "INFEASIBLE", cp_model.MODEL_INVALID: "MODEL_INVALID"}.get(code, "UNKNOWN")
        result = {"status": status, "wall_s": solver.wall_time, "branches": solver.num_branches,
                  "conflicts": solver.num_conflicts, "stop_reason": watch.stop_reason(status)}
        if status in ("OPTIMAL", "FEASIBLE"):
            result["objective"] = int(round(solver.objective_value))
            result["bound"] = int(np.ceil(solver.best_objective_bound - 1e-9))
            result["part"] = self._parts(solver)
        return result

    def _parts(self, solver):
        """Each node's group in the solution: first[v] + the started[v][p] variables that are 0 (order encoding)."""
        rows, indices, first = [], [], []
        for v, row in enumerate(self.started):
            first.append(self.earliest[v])
            for var in row:
                if not _constant(var):
                    rows.append(v)
                    indices.append(var.index)
        solution = solver.response_proto.solution
        values = np.fromiter(solution, dtype=np.int64, count=len(solution))
        zeros = np.bincount(np.asarray(rows, dtype=np.int64), weights=1 - values[np.asarray(indices, dtype=np.int64)],
                            minlength=self.n) if rows else np.zeros(self.n)
        return (np.asarray(first, dtype=np.int64) + zeros.astype(np.int64)).tolist()


#: How often the watchdog of a solve looks at the clock (seconds).
_WATCH_EVERY_S = 0.05


class _Watch:
    """Stops a CP-SAT solve at its end time or when it stalls; says why the solve stopped.

    A stall is `stall_s` seconds in which neither a new incumbent (solution
    callback) nor a better bound (``best_bound_callback``) arrived; before
    the first of them the window is twice as long, from the start of the
    solve (loading and presolving a large model is not yet a stall, but a
    solve that finds nothing at all, not even its hint, is).  A watchdog thread calls
    ``solver.stop_search()``; CP-SAT then returns its best solution, with the
    status it has proved (FEASIBLE unless it proved optimality meanwhile).
    The end time is CP-SAT's own limit too; the watchdog only makes sure a
    long presolve or model load cannot run past it.
    """

    def __init__(self, solver, end, stall_s):
        import threading

        self.solver = solver
        self.end = end
        self.stall_s = stall_s
        self.started = time.perf_counter()
        self.last_change = None  # no incumbent or bound yet
        self.stopped = None
        self.done = threading.Event()
        solver.best_bound_callback = self._moved
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def callback(self, cp_model):
        watch = self

        class _Incumbents(cp_model.CpSolverSolutionCallback):
            def on_solution_callback(self):
                watch._moved()

        return _Incumbents()

    def _moved(self, *_):
        self.last_change = time.perf_counter()

    def _run(self):
        while not self.done.wait(_WATCH_EVERY_S):
            now = time.perf_counter()
            if now >= self.end:
                self.stopped = "time limit"
            elif self.stall_s is not None and (now - self.last_change >= self.stall_s if self.last_change is not None
                                               else now - self.started >= 2 * self.stall_s):
                self.stopped = f"stall: neither the incumbent nor the bound moved for {self.stall_s:.3g} s"
            else:
                continue
            self.solver.stop_search()
            return

    def close(self):
        self.done.set()
        self.thread.join()

    def stop_reason(self, status):
        if status in ("OPTIMAL", "INFEASIBLE"):
            return "proved"
        return self.stopped or "time limit"
