"""The executor's schedules, declared once: name, tasks, segments and flags (no torch).

Every part of the executor that needs to know something about a schedule
reads it here: `cachefit.executor.run` (which schedules ``"all"`` runs, on
which device, which get an L2 window, which report per-group times),
`cachefit.executor.runner.segments` (the tasks and how they are cut into
CUDA graphs), the results (`SCHEDULES`, `BASELINES`) and ``cachefit run``
(the ``--schedule`` choices).  Adding a schedule is one `ScheduleSpec` here
and, when its tasks are new, one case of `cachefit.executor.runner.segments`.

Examples
--------
>>> [spec.name for spec in SCHEDULE_TABLE.values() if spec.cuda_only]
['partition-major-fused', 'partition-major-replay']
>>> BASELINES
('token-major', 'batched', 'eager')
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ScheduleSpec", "SCHEDULE_TABLE", "SCHEDULES", "BASELINES", "schedule_spec"]


@dataclass(frozen=True)
class ScheduleSpec:
    """One schedule of `cachefit.executor.run`.

    Attributes
    ----------
    name : str
    tasks : str
        How the tasks (g, c) — group g on chunk c — are ordered and cut into
        segments (one CUDA graph each): ``"group"`` one segment per group,
        every chunk through it; ``"fused"`` the same tasks as one segment;
        ``"chunk"`` one segment per chunk, through every group; ``"batch"``
        the whole batch as one chunk, one segment; ``"reference"`` no tasks:
        the unpartitioned model.
    cuda_only : bool
        Differs from another schedule only when captured as CUDA graphs, so
        ``"all"`` leaves it out on the CPU.
    l2_window : bool
        Each of its graphs holds one group, so each can carry that group's
        persisting-L2 window (``l2_persist``).
    per_group_ms : bool
        Its segments are the groups: their times are reported per group.
    one_chunk_graphs : bool
        Each group's graph holds one chunk and is replayed per chunk
        (`cachefit.executor.runner.ReplaySchedule`).
    baseline : bool
        Every schedule is compared with it (`RunResult.speedups`).
    summary : str
        One line for help texts.
    """

    name: str
    tasks: str
    cuda_only: bool = False
    l2_window: bool = False
    per_group_ms: bool = False
    one_chunk_graphs: bool = False
    baseline: bool = False
    summary: str = ""


#: name -> spec, in the order ``"all"`` runs them (the reference first).
SCHEDULE_TABLE = {spec.name: spec for spec in (
    ScheduleSpec("eager", "reference", baseline=True,
                 summary="the unpartitioned model on the whole batch, no graphs (the reference)"),
    ScheduleSpec("batched", "batch", baseline=True,
                 summary="all chunks merged into one, through every group"),
    ScheduleSpec("token-major", "chunk", baseline=True,
                 summary="each chunk through the whole model, one graph per chunk"),
    ScheduleSpec("partition-major", "group", l2_window=True, per_group_ms=True,
                 summary="every chunk through a group while its weights stay resident, one graph per group"),
    ScheduleSpec("partition-major-fused", "fused", cuda_only=True,
                 summary="partition-major as one graph for the whole pass (CUDA)"),
    ScheduleSpec("partition-major-replay", "group", cuda_only=True, l2_window=True, per_group_ms=True,
                 one_chunk_graphs=True,
                 summary="partition-major with one-chunk graphs replayed per chunk (CUDA)"),
)}

#: Schedule names accepted by `cachefit.executor.run` (``"all"`` runs each that applies), in run order.
SCHEDULES = tuple(SCHEDULE_TABLE)

#: The baselines every schedule is compared with, the one nearest to partition-major first.
BASELINES = tuple(reversed([spec.name for spec in SCHEDULE_TABLE.values() if spec.baseline]))


def schedule_spec(name):
    """The `ScheduleSpec` of `name` (KeyError when there is none)."""
    return SCHEDULE_TABLE[name]
