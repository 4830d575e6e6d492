"""Run a plan with PyTorch: group by group, chunk by chunk (docs/executor.md); extra ``torch``.

`build` materialises a graph as PyTorch modules with seeded random weights of
the graph's exact shapes; `run` executes a plan's groups over the chunks of
one pass under a schedule (``partition-major``, the plan's own, and the
baselines ``token-major``, ``batched`` and ``eager``), checks every output
against the unpartitioned model and times it: CUDA graphs per group on a GPU,
the same schedules eagerly on the CPU (the numerical reference).
`graph_fingerprint` identifies the graph a plan belongs to; `linear_stack`
builds the executor's benchmark model.  `split_spec` and `run_pipeline`
hand a stage plan to ``torch.distributed.pipelining`` and run it with one
process per stage.

torch is imported only when a name that needs it is used, so
``import cachefit.executor`` works without torch.

Examples
--------
>>> from cachefit.executor import graph_fingerprint, linear_stack
>>> len(graph_fingerprint(linear_stack(2, 8)))
64
"""

from __future__ import annotations

import importlib

from .fingerprint import check_plan_groups, graph_fingerprint
from .verify import PlanRejected, verify_execution, verify_module_bytes, verify_plan
from .results import BASELINES, SCHEDULES, GroupReport, PipelineResult, RunResult, ScheduleResult, StageReport
from .schedules import SCHEDULE_TABLE, ScheduleSpec
from .stack import linear_stack

__all__ = ["build", "run", "BuiltModel", "GroupRunner", "RunResult", "ScheduleResult", "GroupReport",
           "graph_fingerprint", "check_plan_groups", "linear_stack", "render", "SCHEDULES", "BASELINES",
           "split_spec", "run_pipeline", "pipeline_module", "StepsModule", "PipelineResult", "StageReport",
           "SCHEDULE_TABLE", "ScheduleSpec", "PlanRejected", "verify_plan", "verify_module_bytes",
           "verify_execution"]

# name -> submodule that defines it (imported on first use: these import torch or rich)
_LAZY = {"build": "model", "BuiltModel": "model", "run": "api", "GroupRunner": "runner", "render": "report",
         "split_spec": "split", "run_pipeline": "pipeline", "pipeline_module": "split", "StepsModule": "split"}


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
