"""The independent checker: `check(plan, graph=None)`.

It recomputes every group size straight from the definition of the plan's
memory model, with plain Python over the graph: from `cachefit.memory.MODELS`
it reads only the model names and each model's ``reference`` function (no
solver code, no engine, no numpy), and checks coverage, order, capacity,
non-empty groups and the plan's own claims (k, sizes, bottleneck, lower
bound ≤ k).

A two-level plan (`cachefit.deploy.Deployment`) is checked level by level
(`check_levels`): the stage plan, each stage's on-chip plan, and the link
between them (each on-chip graph is its stage's nodes, attribute for
attribute, with the activations it receives as ``stage_input`` nodes).  For
a block the on-chip level expanded into operators, the reference is the
model rebuilt at operator granularity by `cachefit.graphs.transformer` from
the model graph's own config.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx

from .memory import MODELS, LayerTable
from .errors import short_repr
from .result import Status
from .ties import COPY_KEY, owners
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
                where = f"twice in group {index}" if group_of[node] == index else \
                    f"in groups {group_of[node]} and {index}"
                what = (" (this stage's stage_input: the output of that node, which runs in an earlier stage)"
                        if graph.nodes[node].get("op") == "stage_input" else "")
                violations.append(f"node {node!r}{what} is listed {where}")
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
    its graph's ``stage`` is the stage's index and its other graph
    attributes (``seq_len``, ``batch``, ``dtype``, ``context``, ``phase``,
    ``config``, ...) are the model graph's, but for those tiling adds; its
    ``stage_input`` nodes are exactly the producers outside the stage that
    feed it, each with its producer's ``activation_bytes`` and no other
    bytes; every node of the stage is in it (by id, or as the block it was
    expanded from) and no other; a node kept as it is carries exactly the
    model node's attributes (every one the memory models read:
    ``weight_bytes``, ``activation_bytes``, ``buffer_bytes``, ``kv_bytes``,
    ``kv_bytes_per_token``, ``sliding_window``, ``op``, ... and the rest), and
    the model's edges into it; a tiled node's tiles sum to its weights and
    output and carry its other attributes; an expanded block's operators
    are those `cachefit.graphs.transformer` builds from the model's config;
    and its Σ ``weight_bytes`` and Σ ``kv_bytes`` equal the stage's (tiling
    splits weights exactly).  Each violation names the node and attribute.

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
    operators = {}  # the model at operator granularity, built once if an on-chip graph expanded a block
    for index, group in enumerate(groups):
        report = check(group)
        links = ()
        if stages.ok and index < len(stages.partitions) and isinstance(whole, nx.DiGraph):
            links = _link_violations(whole, stages.partitions[index], group.graph, index, operators)
        reports.append(CheckReport(report.ok and not links, (*report.violations, *links), report.sizes))
    return tuple(reports)


def _table_bytes(graph, node, absent):
    """The bytes of what `node` shares with its owners `absent`, from the owners' side.

    A linear `node` (an LM head using the token table as its matrix) whose
    owners are embeddings with their shape: Σ num_embeddings × embedding_dim ×
    dtype bytes (the token tables); a linear `node` with its shape otherwise:
    out_features × in_features × dtype bytes; any other tied node (an
    imported op reading an owner's tensor, whose dtype may differ from the
    graph's): Σ the owners' weight_bytes.
    """
    element = DTYPE_BYTES.get(str(graph.graph.get("dtype", "")).lower())
    tables = [graph.nodes[owner] for owner in absent]
    attrs = graph.nodes[node]
    linear = bool(element and attrs.get("op") == "linear")
    if linear and all(data.get("op") == "embedding" and data.get("num_embeddings") and data.get("embedding_dim")
                      for data in tables):
        return sum(int(data["num_embeddings"]) * int(data["embedding_dim"]) * element for data in tables)
    if linear and attrs.get("in_features") and attrs.get("out_features"):
        return int(attrs["in_features"]) * int(attrs["out_features"]) * element
    return sum(int(data.get("weight_bytes") or 0) for data in tables)


def _copy_violations(whole, partitions):
    """A tied node in another stage than its owner must count the table (``table_copy_bytes``), and only then."""
    stage_of = {node: index for index, group in enumerate(partitions) for node in group}
    violations = []
    for node, data in whole.nodes(data=True):
        absent = [owner for owner in owners(data) if owner in whole and stage_of.get(owner) != stage_of.get(node)]
        wanted = _table_bytes(whole, node, absent) if absent else 0
        given = data.get(COPY_KEY) or 0
        if given != wanted:
            violations.append(f"node {node!r} (stage {stage_of.get(node)}) counts {given} B of table copy "
                              f"({COPY_KEY}); its stage needs {wanted} B for the table it shares with "
                              f"{', '.join(map(repr, absent)) or 'no owner in another stage'}")
        elif given > (data.get("weight_bytes") or 0):
            violations.append(f"node {node!r}: weight_bytes {data.get('weight_bytes')} B is less than its "
                              f"table copy {given} B")
    return violations


#: Graph attributes the on-chip level sets (its name, its stage index) or adds (tiling); every other
#: graph attribute of an on-chip graph must equal the model's (seq_len, batch, dtype, context, phase, config, ...).
_ON_CHIP_GRAPH_KEYS = frozenset({"name", "stage", "tiled", "untiled", "tile_capacity", "tile_memory",
                                 "tile_chunk_fraction", "expanded_blocks"})
#: The graph attributes every memory model may read, compared even when both graphs lack them.
_SHAPE_KEYS = ("seq_len", "batch", "dtype", "context", "phase", "config")
#: Node attributes a tile does not share with its parent: those `cachefit.graphs.tile` splits or sets.
_TILE_KEYS = frozenset({"weight_bytes", "params", "flops", "activation_bytes", "tile", "parent", "tile_offset", "join"})
#: The byte attributes the memory models read, which a stage input holds none of but its producer's output.
_NODE_BYTES = ("weight_bytes", "buffer_bytes", "kv_bytes", "kv_bytes_per_token", "sliding_window")


def _link_violations(whole, nodes, sub, index=None, operators=None):
    """Why the on-chip graph `sub` is not the stage `nodes` (stage `index`) of `whole` (empty when it is).

    `operators`: a dict caching `_operator_graph` of `whole` across stages.
    """
    if isinstance(sub, LayerTable):
        sub = sub.to_graph()
    if not isinstance(sub, nx.DiGraph):
        return ("the on-chip plan carries no graph",)
    members = set(nodes)
    missing = [node for node in nodes if node not in whole]
    if missing:
        return (f"stage node {missing[0]!r} is not in the model graph",)
    violations = list(_graph_violations(whole, sub, index))
    wanted = {u: whole.nodes[u].get("activation_bytes", 0)
              for v in nodes for u in whole.predecessors(v) if u not in members}
    given = {v: data.get("activation_bytes", 0) for v, data in sub.nodes(data=True) if data.get("op") == "stage_input"}
    for u in sorted(set(wanted) ^ set(given)):
        if u in members:
            violations.append(f"stage_input {u!r} stands for a node of this stage (a stage input is the output "
                              "of a producer in an earlier stage)")
        else:
            violations.append(f"stage_input {u!r} is {'missing' if u in wanted else 'not an input of this stage'}")
    for u in sorted(set(wanted) & set(given)):
        if wanted[u] != given[u]:
            violations.append(f"stage_input {u!r} has activation_bytes {given[u]} B, its producer {wanted[u]} B")
        for key in _NODE_BYTES:
            if sub.nodes[u].get(key):
                violations.append(f"stage_input {u!r} has {key} {sub.nodes[u][key]!r}; a stage input holds only "
                                  "its producer's output bytes")
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
    violations.extend(_node_violations(whole, nodes, sub, expanded))
    if expanded:
        violations.extend(_operator_violations(whole, nodes, sub, expanded, operators))
    violations.extend(_edge_violations(whole, nodes, sub, expanded))
    return tuple(violations)


def _graph_violations(whole, sub, index):
    """The on-chip graph is stage `index`'s, and its graph attributes (but its own) are the model's."""
    if index is not None and sub.graph.get("stage") != index:
        yield f"the on-chip graph's `stage` is {short_repr(sub.graph.get('stage'))}, not {index}"
    keys = (set(whole.graph) | set(sub.graph) | set(_SHAPE_KEYS)) - _ON_CHIP_GRAPH_KEYS
    for key in sorted(keys):
        planned, model = sub.graph.get(key), whole.graph.get(key)
        if planned != model:
            yield f"the on-chip graph's `{key}` {_difference(planned, model)}"


def _difference(planned, model):
    """How `planned` differs from `model`, in a few words (a dict: at its first differing key)."""
    if isinstance(planned, dict) and isinstance(model, dict):
        key = next(key for key in sorted({*planned, *model}, key=str) if planned.get(key) != model.get(key))
        return f"differs from the model's at {key!r}: {short_repr(planned.get(key))}, the model's {short_repr(model.get(key))}"
    return f"is {short_repr(planned)}, the model's {short_repr(model)}"


def _value(key, value):
    """`value` of the attribute `key` for a message: bytes with their unit, anything else as `cachefit.errors.short_repr`."""
    if key.endswith("_bytes") and isinstance(value, int) and not isinstance(value, bool):
        return f"{value} B"
    return short_repr(value)


def _node_violations(whole, nodes, sub, expanded):
    """Every stage node the on-chip level kept is the model's node, attribute for attribute; a tiled one is its tiles.

    A node kept as it is must carry exactly the model node's attributes
    (every one the memory models read, and the rest: the executor reads
    them).  A tiled node (`cachefit.graphs.tile`) is its join, which keeps
    the id with the node's full output and no weights, and its tiles,
    whose ``weight_bytes`` sum to the node's and which carry its other
    attributes but those tiling splits or sets.  Nodes of an expanded block
    are the block's operators (`_operator_violations`).
    """
    tiles = {}
    for tile_id, data in sub.nodes(data=True):
        if "tile" in data:
            tiles.setdefault(data.get("parent"), []).append(tile_id)
    members = set(nodes)
    alien = [node for node, data in sub.nodes(data=True) if not expanded and data.get("op") != "stage_input"
             and (data.get("parent") if "tile" in data else node) not in members]  # expanded: `_operator_violations`
    if alien:
        yield f"{len(alien)} on-chip node(s) are not nodes of this stage, first {alien[0]!r}"
    for node in nodes:
        if node in expanded or node not in sub:
            continue
        planned, model = sub.nodes[node], whole.nodes[node]
        if planned.get("op") == "stage_input":
            continue  # reported with the stage inputs
        if node not in tiles and "tile" not in planned:
            for key in sorted({*planned, *model}):
                if planned.get(key) != model.get(key):
                    yield (f"node {node!r} has {key} {_value(key, planned.get(key))} on chip, "
                           f"{_value(key, model.get(key))} in the model")
            continue
        if planned.get("op") != "concat" or planned.get("parent") != node:
            yield f"node {node!r} is tiled on chip, but its id is not its tiles' join (op 'concat', parent {node!r})"
            continue
        if planned.get("activation_bytes") != model.get("activation_bytes"):
            yield f"node {node!r}: its tiles' join has activation_bytes {short_repr(planned.get('activation_bytes'))}, " \
                  f"the model's node {model.get('activation_bytes')} B"
        for key in _NODE_BYTES:
            if planned.get(key):
                yield f"node {node!r}: its tiles' join has {key} {short_repr(planned[key])}, expected none"
        parts = tiles.get(node, ())
        outputs = [sub.nodes[tile_id].get("activation_bytes") for tile_id in parts]
        if planned.get("join") == "cat" and sum(output or 0 for output in outputs) != model.get("activation_bytes"):
            yield f"node {node!r}: its cat-joined tiles output {sum(output or 0 for output in outputs)} B of " \
                  f"activation_bytes, the model's node {model.get('activation_bytes')} B"
        elif planned.get("join") != "cat" and any(output != model.get("activation_bytes") for output in outputs):
            yield f"node {node!r}: each of its sum-joined tiles outputs the node's whole activation_bytes, " \
                  f"{model.get('activation_bytes')} B, got {outputs}"
        total = sum(sub.nodes[tile_id].get("weight_bytes") or 0 for tile_id in parts)
        if total != (model.get("weight_bytes") or 0):
            yield f"node {node!r}: its {len(parts)} tile(s) hold {total} B of weight_bytes, the model's node " \
                  f"{model.get('weight_bytes')} B"
        axis = planned.get("axis")
        for tile_id in parts:
            data = sub.nodes[tile_id]
            for key in sorted(({*data, *model} - _TILE_KEYS) - {axis}):
                if data.get(key) != model.get(key):
                    yield f"node {node!r}: tile {tile_id!r} has {key} {_value(key, data.get(key))} on chip, " \
                          f"{_value(key, model.get(key))} in the model"


def _operator_graph(whole):
    """`whole` rebuilt at operator granularity by `cachefit.graphs.transformer` from its own graph attributes.

    The reference for the operators of a block the on-chip level expanded
    (`cachefit.graphs.tile`); None when `whole` is not a transformer graph
    (then no block can have been expanded).
    """
    from .errors import InputError
    from .graphs.transformer import transformer

    attributes = whole.graph
    config = attributes.get("config")
    if not isinstance(config, dict):
        return None
    config = dict(config)
    if not config.get("max_position_embeddings"):
        config.pop("max_position_embeddings", None)  # 0 stands for "none" in the normalised form
    try:
        return transformer(config, batch=attributes.get("batch"), seq_len=attributes.get("seq_len"),
                           dtype=attributes.get("dtype", "bf16"), granularity="op",
                           phase=attributes.get("phase", "prefill"), context=attributes.get("context"))
    except InputError:
        return None


def _operator_violations(whole, nodes, sub, expanded, operators):
    """The operators of every expanded block are the model's operators, attribute for attribute.

    Each on-chip node that is not a stage node, a stage input, a tile or a
    join must be an operator of a block of this stage that the on-chip graph
    lists in ``expanded_blocks``, carrying exactly that operator's
    attributes (a tile of an operator: its attributes but those tiling
    splits or sets); every operator of an expanded block must be on chip.
    """
    if "graph" not in operators:
        operators["graph"] = _operator_graph(whole)
    ops = operators["graph"]
    members = set(nodes)
    unknown = sorted(expanded - members)
    if unknown:
        yield f"expanded_blocks names {len(unknown)} node(s) not in this stage, first {unknown[0]!r}"
    if ops is None:
        yield "the on-chip graph expands blocks, but the model graph is not a transformer graph"
        return
    blocks = expanded & members
    own = {}  # operator → the block it belongs to: "block.3.q" → "block.3" (one pass); the embedding holds its norm
    for operator in ops:
        block = ".".join(operator.split(".", 2)[:2])
        if block in blocks and operator != block:
            own[operator] = block
    if "embed" in blocks:
        own.update((operator, "embed") for operator in ("embed", "embed_norm") if operator in ops)
    for block in sorted(blocks - set(own.values())):
        yield f"node {block!r} is listed in expanded_blocks, but the model has no operators for it"
    tiled = {data.get("parent") for _, data in sub.nodes(data=True) if "tile" in data}
    for node, data in sub.nodes(data=True):
        if data.get("op") == "stage_input" or (node in members and node not in expanded):
            continue
        reference = node if "tile" not in data else data.get("parent")
        if reference not in own:
            if "tile" not in data or reference not in members:
                yield f"node {node!r} is on chip but is neither a node of this stage nor an operator of a block it " \
                      "expanded"
            continue
        model = ops.nodes[reference]
        if "tile" in data:
            skip = _TILE_KEYS | {sub.nodes[reference].get("axis") if reference in sub else None}
        elif reference in tiled:
            continue  # the join of a tiled operator: its tiles carry the operator's attributes
        else:
            skip = frozenset()
        for key in sorted(({*data, *model}) - skip):
            if data.get(key) != model.get(key):
                yield (f"node {node!r} (an operator of {own[reference]!r}) has {key} {_value(key, data.get(key))} "
                       f"on chip, {_value(key, model.get(key))} in the model")
    absent = sorted(part for part in own if part not in sub)
    if absent:
        yield f"{len(absent)} operator(s) of expanded blocks are not in the on-chip graph, first {absent[0]!r}"


def _edge_violations(whole, nodes, sub, expanded):
    """The model's edges into the stage's kept nodes (from kept nodes or stage inputs) are on chip."""
    def kept(node):
        data = sub.nodes[node] if node in sub else None
        return (data is not None and node not in expanded and "tile" not in data and data.get("op") != "stage_input"
                and not (data.get("op") == "concat" and data.get("parent") == node))

    members = set(nodes)
    for v in nodes:
        if not kept(v):
            continue
        for u in whole.predecessors(v):
            if (kept(u) if u in members else u in sub) and not sub.has_edge(u, v):
                yield f"the on-chip graph lacks the model's edge {u!r} -> {v!r}"


def _merge(reports):
    """One report of a two-level plan's reports, each violation prefixed by its level."""
    names = ["stages", *(f"stage {index} on chip" for index in range(len(reports) - 1))]
    violations = tuple(f"{name}: {violation}" for name, report in zip(names, reports) for violation in report.violations)
    return CheckReport(not violations, violations, reports[0].sizes)
