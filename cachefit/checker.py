"""The independent checker: `check(plan, graph=None)`.

It recomputes every group size straight from the definition of the plan's
memory model, with plain Python over the graph: from `cachefit.memory.MODELS`
it reads only the model names and each model's ``reference`` function (no
solver code, no engine, no numpy), and checks coverage, order, capacity,
non-empty groups and the plan's own claims (k, sizes, bottleneck, lower
bound ≤ k).
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx

from .memory import MODELS, LayerTable
from .result import Status

__all__ = ["CheckReport", "check"]


@dataclass(frozen=True)
class CheckReport:
    """Result of `check`.

    Attributes
    ----------
    ok : bool
        No violations.
    violations : tuple of str
        One sentence per violation.
    sizes : tuple of int
        The group sizes as the checker computes them.
    """

    ok: bool
    violations: tuple
    sizes: tuple

    def __bool__(self):
        return self.ok


def check(plan, graph=None):
    """Check `plan` against `graph` (default: the graph the plan carries).

    Returns
    -------
    CheckReport
        ``ok`` is True when the plan is consistent: for a plan with groups,
        every node is in exactly one non-empty group, no edge goes backwards
        (between groups, or inside a group's listed order),
        every recomputed size equals the stated one and fits the capacity,
        and k, bottleneck and lower bound agree; for a plan without groups
        (INFEASIBLE or UNKNOWN), it holds none and states a reason.

    Examples
    --------
    >>> import cachefit
    >>> g = cachefit.graphs.from_layers([30, 30, 30])
    >>> report = check(cachefit.plan(g, 60, solver="greedy"))
    >>> report.ok, report.sizes
    (True, (60, 30))
    """
    graph = plan.graph if graph is None else graph
    if isinstance(graph, LayerTable):
        graph = graph.to_graph()
    violations = []
    if not isinstance(graph, nx.DiGraph):
        return CheckReport(False, ("the plan carries no graph and none was given",), ())
    if not isinstance(plan.memory, str) or plan.memory not in MODELS:
        violations.append(f"unknown memory model {plan.memory!r}")
    if not (0 < plan.chunk_fraction <= 1):
        violations.append(f"chunk_fraction {plan.chunk_fraction} is not in (0, 1]")
    if plan.capacity <= 0:
        violations.append(f"capacity {plan.capacity} is not positive")
    if plan.status not in (Status.OPTIMAL, Status.FEASIBLE):
        if plan.partitions or plan.k:
            violations.append(f"a {plan.status} plan must hold no groups, it holds {len(plan.partitions)}")
        if not plan.reason:
            violations.append(f"a {plan.status} plan must state a reason")
        return CheckReport(not violations, tuple(violations), ())
    if violations:
        return CheckReport(False, tuple(violations), ())

    group_of = {}
    for index, group in enumerate(plan.partitions):
        if not group:
            violations.append(f"group {index} is empty")
        for node in group:
            if node not in graph:
                violations.append(f"group {index} holds {node!r}, which is not in the graph")
            elif node in group_of:
                violations.append(f"node {node!r} is in groups {group_of[node]} and {index}")
            else:
                group_of[node] = index
    missing = [node for node in graph.nodes if node not in group_of]
    if missing:
        violations.append(f"{len(missing)} node(s) in no group, first {missing[0]!r}")
    if violations:
        return CheckReport(False, tuple(violations), ())
    place = {node: index for group in plan.partitions for index, node in enumerate(group)}
    for u, v in graph.edges:
        if group_of[u] > group_of[v]:
            violations.append(f"edge {u!r} -> {v!r} goes backwards: group {group_of[u]} -> {group_of[v]}")
        elif group_of[u] == group_of[v] and place[u] > place[v]:
            violations.append(f"edge {u!r} -> {v!r} goes backwards inside group {group_of[u]}: "
                              "a group lists its nodes in execution order")
    groups = [list(group) for group in plan.partitions]
    sizes = tuple(MODELS[plan.memory].reference(graph, groups, group_of, plan.chunk_fraction))
    for index, size in enumerate(sizes):
        if size > plan.capacity:
            violations.append(f"group {index} needs {size} B > capacity {plan.capacity} B")
    if tuple(plan.sizes) != sizes:
        violations.append(f"stated sizes {list(plan.sizes)} differ from recomputed {list(sizes)}")
    if plan.k != len(groups):
        violations.append(f"k = {plan.k} but the plan holds {len(groups)} groups")
    if sizes and plan.bottleneck != max(sizes):
        violations.append(f"bottleneck {plan.bottleneck} B differs from the largest group {max(sizes)} B")
    if plan.lower_bound > len(groups):
        violations.append(f"lower bound {plan.lower_bound} exceeds k = {len(groups)}")
    return CheckReport(not violations, tuple(violations), sizes)
