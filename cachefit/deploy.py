"""`deploy`: devices × on-chip groups in one plan — pipeline stages across devices, on-chip groups inside each.

A `Deployment` has two levels:

- ``stages``: an ordinary stage plan (`cachefit.stages`): exactly one group
  per device, each within the device's memory (``device_capacity`` less a
  reserve) with its layers' KV cache counted (memory model ``NAME+kv``),
  its micro-batch's activations whole (chunk fraction 1: the on-chip groups
  run partition-major, so a group's outputs for the whole micro-batch are
  in device memory before the next group runs) and a copy of every tied
  table whose owner is in another stage (`cachefit.ties`), balanced by flops;
- ``groups``: for every stage, an ordinary plan of that stage's nodes for the
  on-chip ``capacity`` (the fewest groups, optionally tiled and chunked).

A stage's sub-graph holds its own nodes plus one ``stage_input`` node per
activation it receives from an earlier stage (no weights, no flops, the
producer's ``activation_bytes``), so the memory model counts those
activations as live in the groups that consume them, exactly as in the
whole graph.

Both levels are plain `Plan` objects, so `cachefit.check` verifies each one
independently, and the link between them: each on-chip plan's graph is its
stage's nodes (`Deployment.check`, `cachefit.checker.check_levels`).

The JSON form is a plan file of version 2 (version 1 is a single-level
`Plan`; `cachefit.result.read_plan` reads both)::

    {"format": "cachefit.plan", "version": 2,
     "graph": <the whole model graph, node-link data>,
     "devices": N, "device_capacity": <bytes per stage>, "capacity": <on-chip bytes>,
     "status": "FEASIBLE", "k": <on-chip groups in all>, "reason": "",
     "stage_level": {"memory", "chunk_fraction", "solver", "status", "lower_bound",
                     "bottleneck", "wall_s", "reason", "stats"},
     "stages": [{"device": i, "nodes": [ids], "size": <bytes>,
                 "plan": <a self-contained version-1 plan of the stage's sub-graph>}, ...]}

The top-level fields describe the whole deployment (the reader refuses a
file where they disagree with the stages); ``stage_level`` holds the stage
plan's own claims; each stage's ``plan`` can be cut out and read, checked
or run as an ordinary plan file.  Tensor parallelism is not modelled: a
device holds whole nodes (or tiles of them made for the on-chip level).

Examples
--------
>>> from cachefit import instances
>>> graph = instances.load("llama-3.1-8b", phase="decode", context=1024, batch=4)
>>> plan = deploy(graph, devices=2, device_capacity="h100-hbm", capacity="h100-l2", tile=True, solver="greedy")
>>> plan.ok, plan.devices, [group.k for group in plan.groups]
(True, 2, [208, 186])
>>> all(report.ok for report in plan.check())
True
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass

import networkx as nx

from .errors import InputError
from .memory import with_kv
from .result import PLAN_FORMAT, PLAN_VERSION, TWO_LEVEL_VERSION, Plan, Status, check_capacity, check_version, \
    graph_to_data, write_text_atomic

__all__ = ["Deployment", "deploy", "plan_two_level", "DEPLOYMENT_FORMAT", "DEPLOYMENT_VERSION", "stage_graph",
           "stage_graphs"]

logger = logging.getLogger(__name__)

#: The format name of the unreleased first form of a deployment file (still read; written as version 2).
DEPLOYMENT_FORMAT = "cachefit.deployment"
#: The plan-file version of a deployment (``"format": "cachefit.plan"``).
DEPLOYMENT_VERSION = TWO_LEVEL_VERSION


@dataclass(frozen=True)
class Deployment:
    """A two-level plan: ``stages`` (one group per device) and, per stage, its on-chip ``groups`` plan.

    Attributes
    ----------
    stages : Plan
        The stage plan; its ``capacity`` is the device memory less the reserve.
    groups : tuple of Plan
        The on-chip plan of each stage's sub-graph (`stage_graph`), in
        stage order; empty when the stage plan failed.
    on_chip_capacity : int, optional
        The on-chip capacity asked for (kept for a deployment whose stage
        plan failed; otherwise the on-chip plans carry it).
    """

    stages: Plan
    groups: tuple
    on_chip_capacity: int | None = None

    @property
    def ok(self):
        """Both levels hold groups."""
        return self.stages.ok and bool(self.groups) and all(group.ok for group in self.groups)

    @property
    def devices(self):
        """Number of stages (devices); the number asked for when the stage plan failed."""
        return self.stages.k if self.stages.ok else int(self.stages.stats.get("devices", 0))

    @property
    def device_capacity(self):
        """The bytes each stage must fit (device memory less the reserve)."""
        return self.stages.capacity

    @property
    def k(self):
        """On-chip groups over all devices."""
        return sum(group.k for group in self.groups)

    @property
    def bottleneck(self):
        """The largest on-chip group over all stages in bytes (0 when an on-chip plan has no groups)."""
        return max((group.bottleneck for group in self.groups), default=0) if self.ok else 0

    @property
    def memory(self):
        """The on-chip memory model (the stages count the KV cache either way), None without on-chip plans."""
        return self.groups[0].memory if self.groups else None

    def stage_graphs(self):
        """Each stage's sub-graph (`stage_graph`), the graphs its on-chip plans partition; () when the stages failed."""
        return stage_graphs(self.stages) if self.stages.ok else ()

    @property
    def capacity(self):
        """The on-chip capacity in bytes (that of the first stage's plan), None when unknown."""
        return self.groups[0].capacity if self.groups else self.on_chip_capacity

    @property
    def graph(self):
        """The whole model graph (the stage plan's)."""
        return self.stages.graph

    @property
    def status(self):
        """FEASIBLE when both levels hold groups, else the status of the first level or stage that failed.

        Never OPTIMAL: each plan's own claim is in that plan (the stage
        split is not chosen to minimise the total of on-chip groups).
        """
        failed = next((plan for plan in (self.stages, *self.groups) if not plan.ok), None)
        return Status.FEASIBLE if failed is None else failed.status

    @property
    def reason(self):
        """Why the deployment has no plan, naming the level ("" when `ok`)."""
        if not self.stages.ok:
            return f"stages: {self.stages.reason}"
        if not self.groups:
            return "no on-chip plans"
        index = next((index for index, group in enumerate(self.groups) if not group.ok), None)
        return "" if index is None else f"stage {index} on chip: {self.groups[index].reason}"

    def check(self):
        """`cachefit.check` of the stage plan, then of every stage's on-chip plan (a tuple of reports).

        Each on-chip report also holds the violations of its link to the
        stage (`cachefit.checker.check_levels`).
        """
        from .checker import check_levels

        return check_levels(self)

    def to_dict(self):
        """The JSON object: a version-2 plan file (see `cachefit.deploy` and docs/concepts.md)."""
        stages = self.stages
        if stages.graph is None:
            raise InputError("this deployment carries no graph, so it cannot be written self-contained")
        return {
            "format": PLAN_FORMAT, "version": TWO_LEVEL_VERSION,
            "graph": graph_to_data(stages.graph),
            "devices": self.devices, "device_capacity": stages.capacity, "capacity": self.capacity,
            "status": str(self.status), "k": self.k, "reason": self.reason,
            "stage_level": {"memory": stages.memory, "chunk_fraction": stages.chunk_fraction,
                            "solver": stages.solver, "status": str(stages.status), "lower_bound": stages.lower_bound,
                            "bottleneck": stages.bottleneck, "wall_s": stages.wall_s, "reason": stages.reason,
                            "stats": stages.stats},
            "stages": [{"device": index, "nodes": list(nodes), "size": size,
                        "plan": self.groups[index].to_dict() if index < len(self.groups) else None}
                       for index, (nodes, size) in enumerate(zip(stages.partitions, stages.sizes))],
        }

    def to_json(self, path=None):
        """The JSON text; with `path`, also written atomically."""
        text = json.dumps(self.to_dict())
        if path is not None:
            write_text_atomic(path, text + "\n")
        return text

    @classmethod
    def from_json(cls, source):
        """Read a deployment from JSON text or a path (a version-2 plan file).

        Raises
        ------
        InputError
            Not JSON, not a two-level plan, or a field malformed (one line naming it).
        """
        from .limits import parse_json, read_json_file

        if isinstance(source, os.PathLike) or (isinstance(source, str) and not source.lstrip().startswith("{")):
            data = read_json_file(source, what="plan file")
        else:
            data = parse_json(source, what="plan")
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data):
        """Build a deployment from its JSON object (version 2; the unreleased ``cachefit.deployment`` form too)."""
        if isinstance(data, dict) and data.get("format") == DEPLOYMENT_FORMAT:
            return _from_legacy(cls, data)
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise InputError(f"not a cachefit plan: expected \"format\": \"{PLAN_FORMAT}\"")
        if data.get("version") == PLAN_VERSION:
            raise InputError("this is a single-level plan (version 1): read it with cachefit.Plan.from_json "
                             "or cachefit.result.read_plan")
        check_version(data)
        _require(data, {"graph": dict, "devices": int, "device_capacity": int, "status": str, "k": int,
                        "stage_level": dict, "stages": list}, "")
        level = data["stage_level"]
        _require(level, {"memory": str, "chunk_fraction": (int, float), "solver": str, "status": str,
                         "lower_bound": int, "bottleneck": int, "wall_s": (int, float)}, "stage_level.")
        _require(level, {"stats": dict, "reason": str}, "stage_level.", optional=True)
        if level["status"] not in Status.__members__:
            raise InputError(f"plan field 'stage_level.status' must be one of {', '.join(Status.__members__)}, "
                             f"got {level['status']!r}")
        entries = data["stages"]
        for index, entry in enumerate(entries):
            where = f"stages[{index}]"
            if not isinstance(entry, dict):
                raise InputError(f"plan field '{where}' must be an object, got {type(entry).__name__}")
            _require(entry, {"device": int, "nodes": list, "size": int, "plan": (dict, type(None))}, f"{where}.")
            if entry["device"] != index:
                raise InputError(f"plan field '{where}.device' must be {index} (stage i runs on device i), "
                                 f"got {entry['device']}")
            for position, node in enumerate(entry["nodes"]):
                if not isinstance(node, str):
                    raise InputError(f"plan field '{where}.nodes[{position}]' must be a node id (a string), "
                                     f"got {type(node).__name__}")
        stage_data = {**level, "format": PLAN_FORMAT, "version": PLAN_VERSION, "graph": data["graph"],
                      "capacity": data["device_capacity"], "k": len(entries),
                      "partitions": [entry["nodes"] for entry in entries],
                      "sizes": [entry["size"] for entry in entries], "stats": level.get("stats", {}),
                      "reason": level.get("reason", "")}
        groups = [entry["plan"] for entry in entries if entry["plan"] is not None]
        if groups and len(groups) != len(entries):
            index = next(index for index, entry in enumerate(entries) if entry["plan"] is None)
            raise InputError(f"plan field 'stages[{index}].plan' is null, but other stages have an on-chip plan: "
                             "either every stage has one or none has")
        capacity = data.get("capacity")
        if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int)):
            raise InputError(f"plan field 'capacity' has the wrong type: {type(capacity).__name__}")
        check_capacity(data["device_capacity"], "device_capacity")
        if capacity is not None:
            check_capacity(capacity, "capacity")
        for index, group in enumerate(groups):
            graph = group.get("graph") if isinstance(group, dict) else None
            stage = graph.get("graph", {}).get("stage") if isinstance(graph, dict) and \
                isinstance(graph.get("graph"), dict) else None
            if stage is not None and stage != index:
                raise InputError(f"plan field 'stages[{index}].plan.graph.graph.stage' must be {index} (the "
                                 f"on-chip graph of stage {index}), got {stage!r}")
        stage_plan = _read_at("", lambda: Plan.from_dict(stage_data))  # every field of it was checked above but the graph
        result = cls(stage_plan, tuple(_read_at(f"stages[{index}].plan.", lambda group=group: Plan.from_dict(group))
                                       for index, group in enumerate(groups)), capacity)
        _agree(result, data)
        return result


def _require(data, expected, prefix, *, optional=False):
    """Refuse a missing field or one of the wrong type (`InputError` naming its path, ``prefix`` + key)."""
    for key, kind in expected.items():
        if key not in data:
            if optional:
                continue
            raise InputError(f"plan field '{prefix}{key}' is missing")
        if not isinstance(data[key], kind) or isinstance(data[key], bool):
            raise InputError(f"plan field '{prefix}{key}' has the wrong type: {type(data[key]).__name__}")


def _read_at(prefix, read):
    """`read()`, with an `InputError` from a nested single-level plan renamed to the field's path in the file.

    ``plan field 'sizes' ...`` read at ``stages[3].plan.`` becomes ``plan field
    'stages[3].plan.sizes' ...``; a node's bad value (``node 'x': ...``) is in
    the ``graph`` field; any other message is prefixed with the plan's path.
    """
    import re

    try:
        return read()
    except InputError as error:
        message = str(error)
        match = re.match(r"plan field '([^']*)'(.*)", message, re.S)
        if match:
            raise InputError(f"plan field '{prefix}{match[1]}'{match[2]}") from None
        field = f"{prefix}graph" if message.startswith("node ") else prefix.rstrip(".") or "graph"
        raise InputError(f"plan field '{field}': {message}") from None


def _agree(result, data):
    """Refuse a file whose whole-deployment fields disagree with its levels."""
    stated = {"devices": data["devices"], "device_capacity": data["device_capacity"], "k": data["k"],
              "status": data["status"], "capacity": data.get("capacity")}
    actual = {"devices": result.devices, "device_capacity": result.device_capacity, "k": result.k,
              "status": str(result.status), "capacity": result.capacity}
    for key, value in stated.items():
        if value != actual[key]:
            raise InputError(f"plan field {key!r} is {value!r}, but the stages give {actual[key]!r}")


def _from_legacy(cls, data):
    """A ``cachefit.deployment`` version-1 object (written before two-level plan files were version 2)."""
    if data.get("version") != 1:
        raise InputError(f"unsupported deployment version {data.get('version')!r}; re-plan it with "
                         "`cachefit plan MODEL --devices N ...`")
    if not isinstance(data.get("groups"), list):
        raise InputError("deployment field 'groups' must be a list of plans")
    return cls(Plan.from_dict(data.get("stages")), tuple(Plan.from_dict(group) for group in data["groups"]))


#: What a node's consumers read of it beyond its bytes: the marks they order their inputs by (``role``,
#: ``expert``, ``tile``: `cachefit.executor.nodes.order_inputs`) and a routed expert's ``rows`` (its output is
#: sized for the tokens routed to it), which a stage_input standing for it carries.
INPUT_MARKS = ("role", "expert", "tile", "rows")


def _input_marks(graph, node):
    """`node`'s ``INPUT_MARKS`` (an unmarked concat's: those of the tile it joins), for the stage_input standing for it."""
    attrs = graph.nodes[node]
    if attrs.get("op") == "concat" and "role" not in attrs:
        first = next(iter(graph.predecessors(node)), None)
        attrs = graph.nodes[first] if first is not None else attrs
    return {key: attrs[key] for key in INPUT_MARKS if key in attrs}


def stage_graph(graph, nodes, index):
    """The sub-graph of stage `index` (its `nodes`) with a ``stage_input`` node per activation it receives.

    A ``stage_input`` node keeps its producer's id and ``activation_bytes``
    (weights, buffer and flops 0), and what its consumers read of it
    (``INPUT_MARKS``: an MoE combine takes the router, the experts by index,
    the shared expert and its gate; read through an unmarked concat to the
    tile it joins).  Returns a new graph;
    `graph` is not changed.
    """
    members = set(nodes)
    inputs = [u for u in dict.fromkeys(p for v in nodes for p in graph.predecessors(v)) if u not in members]
    sub = nx.DiGraph(**{key: value for key, value in graph.graph.items()})
    sub.graph.update(name=f"{graph.graph.get('name', 'model')} stage {index}", stage=index)
    for u in inputs:
        sub.add_node(u, op="stage_input", weight_bytes=0, activation_bytes=graph.nodes[u]["activation_bytes"],
                     buffer_bytes=0, flops=0, params=0, **_input_marks(graph, u))
    for v in nodes:
        sub.add_node(v, **graph.nodes[v])
    sub.add_edges_from((u, v) for v in nodes for u in graph.predecessors(v))
    return sub


def stage_graphs(stage_plan):
    """`stage_graph` of every stage of `stage_plan` (a feasible stage `Plan`), in stage order.

    Built from the stage plan's graph, which holds its tied tables' copies
    (`cachefit.ties`).
    """
    return tuple(stage_graph(stage_plan.graph, nodes, index) for index, nodes in enumerate(stage_plan.partitions))


def deploy(graph, *, devices, device_capacity, capacity, reserve=0, balance="flops", memory="liveness",
           kv="streamed", solver="auto", tile=False, chunk_tokens=None, chunk_fraction=1.0, time_limit_s=None,
           group_balance="memory"):
    """Stages across `devices` devices, and the fewest on-chip groups of `capacity` inside each.

    Parameters
    ----------
    graph : networkx.DiGraph
        The model graph.
    devices : int
        Pipeline stages, one per device.
    device_capacity, reserve : int or str
        Device memory and the bytes kept free on each (as in `cachefit.stages`).
    capacity : int or str
        The on-chip capacity every group of every stage must fit.
    balance : {"flops", "memory"}
        What the stages balance (the slowest stage sets a pipeline's pace).
    memory, solver, tile, chunk_tokens, chunk_fraction, time_limit_s
        As in `cachefit.plan`, for the on-chip level (the stage level uses
        `memory` and ``dp``, which keeps the node order).
    group_balance : {"memory", "flops"}
        `cachefit.plan`'s ``balance`` for each stage's on-chip plan.
    kv : {"streamed", "resident"}
        Where the on-chip level keeps each layer's KV cache (``kv_bytes``):
        in its group's size (``resident``, memory model ``NAME+kv``) or
        read from the device's memory at every step (``streamed``).  The
        stage level always counts the cache: it lives in the device's memory
        either way.

    Returns
    -------
    Deployment
        With no on-chip plans when the stages do not fit (the stage plan says
        why); a stage whose nodes do not fit `capacity` has an INFEASIBLE
        on-chip plan with its reason.

    Raises
    ------
    InputError
        As `cachefit.stages` and `cachefit.plan` for bad arguments.
    """
    from .api import plan as make_plan
    from .stages import stages

    from .devices import parse_capacity

    if not isinstance(graph, nx.DiGraph):
        raise InputError(f"`graph` must be a networkx.DiGraph, got {type(graph).__name__}")
    on_chip_capacity = parse_capacity(capacity)
    started = time.perf_counter()
    # One call, one time limit: the stage level and every stage's on-chip plan share it.
    stage_plan = stages(graph, devices=devices, device_capacity=device_capacity, balance=balance, reserve=reserve,
                        memory=with_kv(memory, "resident"),
                        time_limit_s=None if time_limit_s is None else time_limit_s / (devices + 1))
    memory = with_kv(memory, kv)
    if not stage_plan.ok:
        return Deployment(stage_plan, (), on_chip_capacity)
    groups = []
    subs = stage_graphs(stage_plan)  # with their table copies (`cachefit.ties`)
    for index, (nodes, sub) in enumerate(zip(stage_plan.partitions, subs)):
        share = None
        if time_limit_s is not None:  # what is left, shared by the stages not planned yet
            left = time_limit_s - (time.perf_counter() - started)
            share = max(left, 1e-3) / (len(stage_plan.partitions) - index)
        groups.append(make_plan(sub, on_chip_capacity, solver=solver, memory=memory, tile=tile,
                                chunk_tokens=chunk_tokens, chunk_fraction=chunk_fraction, time_limit_s=share,
                                balance=group_balance))
        logger.info("deploy: stage %d: %d nodes, %s, k = %d", index, len(nodes), groups[-1].status, groups[-1].k)
    return Deployment(stage_plan, tuple(groups), on_chip_capacity)


def plan_two_level(graph, capacity, *, devices, device_capacity, reserve=0, solver="auto", memory="liveness",
                   chunk_fraction=1.0, k=None, time_limit_s=None, tile=False, chunk_tokens=None, balance="memory"):
    """`cachefit.plan` with ``devices=``/``device_capacity=``: a `deploy` whose on-chip memory model is `memory`.

    The KV choice is `memory`'s (``NAME+kv`` keeps the cache in each on-chip
    group); the stages always count it and are balanced by flops; `balance`
    applies inside each stage's on-chip plan.

    Raises
    ------
    InputError
        Only one of `devices` and `device_capacity` given, or `k` given
        (the number of on-chip groups is each stage's fewest).
    """
    from .memory import kv_placement

    if devices is None or device_capacity is None:
        given, needed = ("devices", "device_capacity") if devices is not None else ("device_capacity", "devices")
        raise InputError(f"`{given}` plans stages across devices and needs `{needed}` too")
    if k is not None:
        raise InputError(f"`k` fixes the number of groups of a single-level plan; with `devices`, each stage gets "
                         f"its fewest on-chip groups (got k={k!r})")
    return deploy(graph, devices=devices, device_capacity=device_capacity, capacity=capacity, reserve=reserve,
                  memory=memory, kv=kv_placement(memory), solver=solver, tile=tile, chunk_tokens=chunk_tokens,
                  chunk_fraction=chunk_fraction, time_limit_s=time_limit_s, group_balance=balance)
