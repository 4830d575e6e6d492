"""The independent checker: `check(plan, graph=None)`.

It recomputes every group size straight from the definition of the plan's
memory model, with plain Python over the graph: from `cachefit.memory.MODELS`
it reads only the model names and each model's ``reference`` function (no
solver code, no engine, no numpy), and checks coverage, order, capacity,
non-empty groups and the plan's own claims (k, sizes, bottleneck, lower
bound ≤ k).

A two-level plan (`cachefit.deploy.Deployment`) is checked level by level
(`check_levels`): the stage plan, each stage's on-chip plan, and the link
between them (each on-chip graph is its stage's nodes, with the
activations it receives as ``stage_input`` nodes).
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx

from .memory import MODELS, LayerTable
from .result import Status
from .units import DTYPE_BYTES

__all__ = ["CheckReport", "check", "check_levels"]


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

    Parameters
    ----------
    plan : Plan or cachefit.deploy.Deployment
        A two-level plan is checked by `check_levels` (`graph` is then not
        used) and reported as one: its violations name their level, its
        sizes are the stage sizes.
    graph : networkx.DiGraph or LayerTable, optional

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
    if hasattr(plan, "stages") and hasattr(plan, "groups"):  # a two-level plan: one report over both levels
        return _merge(check_levels(plan))
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


def check_levels(deployment):
    """Check both levels of a two-level plan: a report for the stage plan, then one per stage's on-chip plan.

    The stage report also holds the stage level's own rules, recomputed
    here: the chunk fraction is 1 (a stage holds each micro-batch's
    activations whole: inside a stage the on-chip groups run partition-major,
    so every group's output for the whole micro-batch is in device memory
    before the next group starts), the memory model keeps the KV cache
    (``+kv``), and a tied node in another stage than its owner counts that
    table (``table_copy_bytes``, the owner's num_embeddings × embedding_dim
    × dtype bytes for an embedding), a tied node with its owner counts none.

    Each on-chip report also holds the violations of the link to its stage:
    its graph's ``stage_input`` nodes must be exactly the producers outside
    the stage that feed it, each with its producer's ``activation_bytes``;
    every node of the stage must be in it (by id, or as the block it was
    expanded from); and its Σ ``weight_bytes`` and Σ ``kv_bytes`` must equal
    the stage's (tiling splits weights exactly).

    Returns
    -------
    tuple of CheckReport
        ``(stage report, stage 0 on-chip report, ...)``.
    """
    stages, groups = deployment.stages, tuple(deployment.groups)
    stage_report = check(stages)
    whole = stages.graph.to_graph() if isinstance(stages.graph, LayerTable) else stages.graph
    extra = []
    if stages.ok and len(groups) not in (0, stages.k):
        extra.append(f"the stage plan has {stages.k} stages but {len(groups)} on-chip plans")
    if stages.chunk_fraction != 1:
        extra.append(f"the stage level holds each micro-batch's activations whole (chunk fraction 1), "
                     f"got {stages.chunk_fraction}")
    if isinstance(stages.memory, str) and stages.memory in MODELS and not stages.memory.endswith("+kv"):
        extra.append(f"the stage level counts the KV cache in device memory (a '+kv' model), got {stages.memory!r}")
    if stages.ok and isinstance(whole, nx.DiGraph):
        extra.extend(_copy_violations(whole, stages.partitions))
    if extra:
        stage_report = CheckReport(False, (*stage_report.violations, *extra), stage_report.sizes)
    reports = [stage_report]
    for index, group in enumerate(groups):
        report = check(group)
        links = ()
        if stages.ok and index < len(stages.partitions) and isinstance(whole, nx.DiGraph):
            links = _link_violations(whole, stages.partitions[index], group.graph)
        reports.append(CheckReport(report.ok and not links, (*report.violations, *links), report.sizes))
    return tuple(reports)


#: The node attribute that marks a table copy a stage counts in a tied node's weight_bytes.
_COPY = "table_copy_bytes"


def _table_bytes(graph, node, absent):
    """The bytes of what `node` shares with its owners `absent`, from the owners' side.

    Owners that are embeddings with their shape: Σ num_embeddings ×
    embedding_dim × dtype bytes (the token tables); else a linear `node`
    with its shape: out_features × in_features × dtype bytes; else Σ the
    owners' weight_bytes.
    """
    element = DTYPE_BYTES.get(str(graph.graph.get("dtype", "")).lower())
    owners = [graph.nodes[owner] for owner in absent]
    if element and all(data.get("op") == "embedding" and data.get("num_embeddings") and data.get("embedding_dim")
                       for data in owners):
        return sum(int(data["num_embeddings"]) * int(data["embedding_dim"]) * element for data in owners)
    attrs = graph.nodes[node]
    if element and attrs.get("op") == "linear" and attrs.get("in_features") and attrs.get("out_features"):
        return int(attrs["in_features"]) * int(attrs["out_features"]) * element
    return sum(int(data.get("weight_bytes") or 0) for data in owners)


def _copy_violations(whole, partitions):
    """A tied node in another stage than its owner must count the table (``table_copy_bytes``), and only then."""
    stage_of = {node: index for index, group in enumerate(partitions) for node in group}
    violations = []
    for node, data in whole.nodes(data=True):
        tied = data.get("tied_to")
        owners = () if tied is None else (tied,) if isinstance(tied, str) else tuple(tied)
        absent = [owner for owner in owners if owner in whole and stage_of.get(owner) != stage_of.get(node)]
        wanted = _table_bytes(whole, node, absent) if absent else 0
        given = data.get(_COPY) or 0
        if given != wanted:
            violations.append(f"node {node!r} (stage {stage_of.get(node)}) counts {given} B of table copy "
                              f"({_COPY}); its stage needs {wanted} B for the table it shares with "
                              f"{', '.join(map(repr, absent)) or 'no owner in another stage'}")
        elif given > (data.get("weight_bytes") or 0):
            violations.append(f"node {node!r}: weight_bytes {data.get('weight_bytes')} B is less than its "
                              f"table copy {given} B")
    return violations


def _link_violations(whole, nodes, sub):
    """Why the on-chip graph `sub` is not the stage `nodes` of `whole` (empty when it is)."""
    if isinstance(sub, LayerTable):
        sub = sub.to_graph()
    if not isinstance(sub, nx.DiGraph):
        return ("the on-chip plan carries no graph",)
    members = set(nodes)
    missing = [node for node in nodes if node not in whole]
    if missing:
        return (f"stage node {missing[0]!r} is not in the model graph",)
    violations = []
    wanted = {u: whole.nodes[u].get("activation_bytes", 0)
              for v in nodes for u in whole.predecessors(v) if u not in members}
    given = {v: data.get("activation_bytes", 0) for v, data in sub.nodes(data=True) if data.get("op") == "stage_input"}
    for u in sorted(set(wanted) ^ set(given)):
        violations.append(f"stage_input {u!r} is {'missing' if u in wanted else 'not an input of this stage'}")
    for u in sorted(set(wanted) & set(given)):
        if wanted[u] != given[u]:
            violations.append(f"stage_input {u!r} has activation_bytes {given[u]} B, its producer {wanted[u]} B")
    expanded = set(sub.graph.get("expanded_blocks") or ())
    absent = [node for node in nodes if node not in expanded
              and (node not in sub or sub.nodes[node].get("op") == "stage_input")]
    if absent:
        violations.append(f"{len(absent)} stage node(s) are not in the on-chip graph, first {absent[0]!r}")
    for key in ("weight_bytes", "kv_bytes"):
        stage_total = sum(whole.nodes[v].get(key) or 0 for v in nodes)
        chip_total = sum(data.get(key) or 0 for _, data in sub.nodes(data=True) if data.get("op") != "stage_input")
        if stage_total != chip_total:
            violations.append(f"the on-chip graph holds {chip_total} B of {key}, its stage {stage_total} B")
    violations.extend(_untouched_violations(whole, nodes, sub, expanded))
    return tuple(violations)


def _untouched_violations(whole, nodes, sub, expanded):
    """Nodes the on-chip level kept as they are (not tiled, joined or expanded) keep their bytes and edges."""
    def untouched(node):
        data = sub.nodes[node] if node in sub else None
        return (data is not None and node not in expanded and "tile" not in data
                and data.get("op") not in ("concat", "stage_input"))

    kept = [node for node in nodes if untouched(node)]
    for node in kept:
        for key in ("activation_bytes", "buffer_bytes"):
            planned, stage = sub.nodes[node].get(key) or 0, whole.nodes[node].get(key) or 0
            if planned != stage:
                yield f"node {node!r} has {key} {planned} B on chip, {stage} B in the model"
    kept = set(kept)
    for u, v in whole.subgraph(kept).edges:
        if not sub.has_edge(u, v):
            yield f"the on-chip graph lacks the model's edge {u!r} -> {v!r}"


def _merge(reports):
    """One report of a two-level plan's reports, each violation prefixed by its level."""
    names = ["stages", *(f"stage {index} on chip" for index in range(len(reports) - 1))]
    violations = tuple(f"{name}: {violation}" for name, report in zip(names, reports) for violation in report.violations)
    return CheckReport(not violations, violations, reports[0].sizes)
