"""`deploy`: devices × on-chip groups in one plan — pipeline stages across devices, on-chip groups inside each.

A `Deployment` has two levels:

- ``stages``: an ordinary stage plan (`cachefit.stages`): exactly one group
  per device, each within the device's memory (``device_capacity`` less a
  reserve) with its layers' KV cache counted (memory model ``NAME+kv``),
  balanced by flops;
- ``groups``: for every stage, an ordinary plan of that stage's nodes for the
  on-chip ``capacity`` (the fewest groups, optionally tiled and chunked).

A stage's sub-graph holds its own nodes plus one ``stage_input`` node per
activation it receives from an earlier stage (no weights, no flops, the
producer's ``activation_bytes``), so the memory model counts those
activations as live in the groups that consume them, exactly as in the
whole graph.

Both levels are plain `Plan` objects, so `cachefit.check` verifies each one
independently (`Deployment.check`).  The JSON form is
``{"format": "cachefit.deployment", "version": 1, "stages": <plan>,
"groups": [<plan>, ...]}`` with every plan self-contained.  Tensor
parallelism is not modelled: a device holds whole nodes (or tiles of them
made for the on-chip level).

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
from dataclasses import dataclass
from pathlib import Path

import networkx as nx

from .errors import InputError
from .memory import with_kv
from .result import Plan, write_text_atomic

__all__ = ["Deployment", "deploy", "DEPLOYMENT_FORMAT", "stage_graph"]

logger = logging.getLogger(__name__)

DEPLOYMENT_FORMAT = "cachefit.deployment"
DEPLOYMENT_VERSION = 1


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
    """

    stages: Plan
    groups: tuple

    @property
    def ok(self):
        """Both levels hold groups."""
        return self.stages.ok and bool(self.groups) and all(group.ok for group in self.groups)

    @property
    def devices(self):
        """Number of stages (devices)."""
        return self.stages.k

    @property
    def k(self):
        """On-chip groups over all devices."""
        return sum(group.k for group in self.groups)

    @property
    def capacity(self):
        """The on-chip capacity in bytes (that of the first stage's plan), None without groups."""
        return self.groups[0].capacity if self.groups else None

    def check(self):
        """`cachefit.check` of the stage plan, then of every stage's on-chip plan (a tuple of reports)."""
        from .checker import check

        return (check(self.stages), *(check(group) for group in self.groups))

    def to_dict(self):
        """The JSON object (see the module docstring)."""
        return {"format": DEPLOYMENT_FORMAT, "version": DEPLOYMENT_VERSION, "stages": self.stages.to_dict(),
                "groups": [group.to_dict() for group in self.groups]}

    def to_json(self, path=None):
        """The JSON text; with `path`, also written atomically."""
        text = json.dumps(self.to_dict())
        if path is not None:
            write_text_atomic(path, text + "\n")
        return text

    @classmethod
    def from_json(cls, source):
        """Read a deployment from JSON text or a path.

        Raises
        ------
        InputError
            Not JSON, not a cachefit deployment, or a plan inside is malformed.
        """
        text = Path(source).read_text() if not str(source).lstrip().startswith("{") else source
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"deployment is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data):
        """Build a deployment from its JSON object."""
        if not isinstance(data, dict) or data.get("format") != DEPLOYMENT_FORMAT:
            raise InputError(f"not a cachefit deployment: expected \"format\": \"{DEPLOYMENT_FORMAT}\"")
        if data.get("version") != DEPLOYMENT_VERSION:
            raise InputError(f"unsupported deployment version {data.get('version')!r}; "
                             f"this cachefit reads version {DEPLOYMENT_VERSION}")
        if not isinstance(data.get("groups"), list):
            raise InputError("deployment field 'groups' must be a list of plans")
        return cls(Plan.from_dict(data.get("stages")), tuple(Plan.from_dict(group) for group in data["groups"]))


def stage_graph(graph, nodes, index):
    """The sub-graph of stage `index` (its `nodes`) with a ``stage_input`` node per activation it receives.

    A ``stage_input`` node keeps its producer's id and ``activation_bytes``
    (weights, buffer and flops 0).  Returns a new graph; `graph` is not changed.
    """
    members = set(nodes)
    inputs = [u for u in dict.fromkeys(p for v in nodes for p in graph.predecessors(v)) if u not in members]
    sub = nx.DiGraph(**{key: value for key, value in graph.graph.items()})
    sub.graph.update(name=f"{graph.graph.get('name', 'model')} stage {index}", stage=index)
    for u in inputs:
        sub.add_node(u, op="stage_input", weight_bytes=0, activation_bytes=graph.nodes[u]["activation_bytes"],
                     buffer_bytes=0, flops=0, params=0)
    for v in nodes:
        sub.add_node(v, **graph.nodes[v])
    sub.add_edges_from((u, v) for v in nodes for u in graph.predecessors(v))
    return sub


def deploy(graph, *, devices, device_capacity, capacity, reserve=0, balance="flops", memory="liveness",
           kv="streamed", solver="auto", tile=False, chunk_tokens=None, time_limit_s=None):
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
    memory, solver, tile, chunk_tokens, time_limit_s
        As in `cachefit.plan`, for the on-chip level (the stage level uses
        `memory` and ``dp``, which keeps the node order).
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

    if not isinstance(graph, nx.DiGraph):
        raise InputError(f"`graph` must be a networkx.DiGraph, got {type(graph).__name__}")
    stage_plan = stages(graph, devices=devices, device_capacity=device_capacity, balance=balance, reserve=reserve,
                        memory=with_kv(memory, "resident"), time_limit_s=time_limit_s)
    memory = with_kv(memory, kv)
    if not stage_plan.ok:
        return Deployment(stage_plan, ())
    groups = []
    for index, nodes in enumerate(stage_plan.partitions):
        sub = stage_graph(graph, nodes, index)
        groups.append(make_plan(sub, capacity, solver=solver, memory=memory, tile=tile, chunk_tokens=chunk_tokens,
                                time_limit_s=time_limit_s))
        logger.info("deploy: stage %d: %d nodes, %s, k = %d", index, len(nodes), groups[-1].status, groups[-1].k)
    return Deployment(stage_plan, tuple(groups))
