"""Run a stage plan on PyTorch's own pipelining runtime, one process per stage (imports torch).

`run_pipeline` checks the plan (`cachefit.check`, then each node's module
bytes, see `cachefit.executor.verify`), cuts the model where
`cachefit.executor.split.split_spec` says, starts one process per stage on
this machine (or runs as one ``torchrun`` rank), runs a ``ScheduleGPipe`` or
``Schedule1F1B`` over the micro-batches, checks the last stage's output
against a single-process run of the whole model
(``torch.testing.assert_close``) and reports per-stage time, the bubble and
the throughput (`cachefit.executor.results.PipelineResult`).

Processes
---------
The stage processes die with this one, whatever ends it: each child asks
the kernel to kill it when its parent dies (Linux ``prctl(PR_SET_PDEATHSIG,
SIGKILL)``; elsewhere a thread that polls the parent's pid), so a SIGKILL
of the parent leaves no stage running.  While the stages run, SIGTERM and
SIGHUP (when they have their default action) raise ``SystemExit`` here, so
the stages are stopped by the same cleanup as a failure or a Ctrl-C; the
stages ignore SIGINT and leave it to this process.  The last stage sends its
output back over a pipe: no file or folder is written.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import io
import logging
import math
import os
import re
import signal
import socket
import statistics
import sys
import threading
import time
import warnings
from dataclasses import dataclass, replace
from datetime import timedelta

import torch

from ..errors import CachefitError, InputError
from .fingerprint import plan_graph
from .results import PIPELINE_RESULT_FORMAT as RESULT_FORMAT
from .results import PipelineResult, StageReport, bubble_fraction
from .split import StepsModule, pipeline_module, split_spec, stage_groups
from .verify import verify_module_bytes, verify_plan

__all__ = ["StepsModule", "pipeline_module", "split_spec", "run_pipeline", "run_stage", "PipelineResult",
           "StageReport", "PIPELINE_SCHEDULES", "INNER_ORDERS", "bubble_fraction", "free_port", "under_torchrun",
           "RESULT_FORMAT"]

logger = logging.getLogger(__name__)

#: Schedule names accepted by `run_pipeline` -> the ``torch.distributed.pipelining`` class name.
PIPELINE_SCHEDULES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B"}

#: Graph sources whose plans run with the user's own module (`from_torch`).
FROM_TORCH_SOURCES = ("torch.fx", "torch.export")

#: The environment ``torchrun`` sets for every rank.
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def under_torchrun():
    """Whether this process is a rank started by ``torchrun`` (`TORCHRUN_ENV` all set)."""
    return all(key in os.environ for key in TORCHRUN_ENV)


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]



@dataclass
class _Job:
    """What every stage process needs (pickled to the spawned processes)."""

    plan: object
    module: object          # the user's module, or None: rebuild from the plan's graph
    inputs: tuple           # the user's example inputs, or None
    schedule: str
    microbatches: int
    backend: str
    seed: int
    dtype: object
    warmup: int
    iters: int
    timeout_s: float
    threads: int
    inner: object = None    # per stage, its on-chip groups (runs of its nodes): partition-major stages
    chunks: int = 1         # the row chunks each group of a partition-major stage runs over
    port: int | None = None
    parent_pid: int | None = None
    result_pipe: object = None  # the write end of the pipe the last stage sends its output through


def _split_rows(inputs, microbatches):
    return tuple(tensor[: tensor.shape[0] // microbatches] for tensor in inputs)


def _schedule_class(name):
    import torch.distributed.pipelining as pipelining

    return getattr(pipelining, PIPELINE_SCHEDULES[name])


def _module_and_inputs(job):
    """The whole model (built on the CPU; `build_stage` moves the stage) and one step's inputs."""
    if job.module is None:
        module, inputs = pipeline_module(job.plan, seed=job.seed, dtype=job.dtype, device="cpu")
        if job.inner is not None:
            module.run_partition_major(job.inner, job.chunks)
        return module, inputs
    return job.module.eval(), tuple(job.inputs)


def _first_stage_inputs(pipe):
    """Positions of the model inputs the runtime's first stage takes, in its argument order.

    ``torch.export`` drops a model input nothing reads (a transformer's
    positions when the model has no learned position table), and the runtime
    hands ``step``'s arguments to the first stage as they are, so only the
    inputs it reads may be passed.  An input read first by a later stage
    cannot be delivered (the runtime feeds inputs to the first stage only).
    """
    nodes = list(pipe.split_gm.graph.nodes)
    placeholders = [node for node in nodes if node.op == "placeholder"]
    calls = [node for node in nodes if node.op == "call_module"]
    first = calls[0]
    for index, node in enumerate(placeholders):
        late = [user for user in node.users if user is not first]
        if late:
            raise InputError(f"model input {index} is read by a later stage ({late[0].target}) and not by the "
                             "first: torch.distributed.pipelining feeds the model inputs to the first stage only")
    position = {node: index for index, node in enumerate(placeholders)}
    return [position[arg] for arg in first.args]


def _contiguous_inputs(pipe):
    """Make every stage receive its activations into contiguous buffers.

    The runtime allocates a stage's receive buffers with the strides its
    inputs had while tracing, and gloo refuses a non-contiguous buffer (an
    expanded attention mask has stride 0); the sending stage hands on
    contiguous tensors (`run_stage`'s forward hook), so contiguous buffers
    receive the same values.
    """
    for _, submodule in pipe.split_gm.named_children():
        graph = getattr(submodule, "graph", None)
        if graph is None:
            continue
        for node in graph.nodes:
            value = node.meta.get("val") if node.op == "placeholder" else None
            if isinstance(value, torch.Tensor) and not value.is_contiguous():
                node.meta["val"] = value.contiguous()


def run_stage(rank, world_size, job, *, device=None):
    """Run this process's stage of `job` (the process group is already initialised).

    Builds the whole module (every rank traces it), cuts it with
    `split_spec`, runs ``warmup + iters`` steps of the schedule and gathers
    every stage's timings on the last rank.

    Returns
    -------
    (list of dict, torch.Tensor or tuple) on the last rank, else None
        Each stage's timings (``busy`` and ``step`` seconds per timed step,
        ``params``), and the pipelined output of the last step.
    """
    import torch.distributed as dist
    from torch.distributed.pipelining import pipeline
    from torch.utils._pytree import tree_map

    device = torch.device("cpu") if device is None else torch.device(device)
    module, inputs = _module_and_inputs(job)
    spec = split_spec(job.plan, module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own deprecation notices while tracing
        pipe = pipeline(module, _split_rows(inputs, job.microbatches), split_spec=spec)
    _contiguous_inputs(pipe)
    if pipe.num_stages != world_size:
        raise CachefitError(f"the runtime cut the module into {pipe.num_stages} stage(s), the plan has "
                            f"{world_size}")
    feed = _first_stage_inputs(pipe)
    stage = pipe.build_stage(rank, device)
    stage.submod.eval()
    schedule = _schedule_class(job.schedule)(stage, job.microbatches)
    busy = [0.0]
    started = [0.0]
    on_cuda = device.type == "cuda"

    def before(_module, _args):
        if on_cuda:
            torch.cuda.synchronize(device)
        started[0] = time.perf_counter()

    def after(_module, _args, output):
        if on_cuda:
            torch.cuda.synchronize(device)
        busy[0] += time.perf_counter() - started[0]
        # gloo sends only contiguous tensors; a stage may end on a view (a transposed or expanded mask)
        return tree_map(lambda value: value.contiguous() if isinstance(value, torch.Tensor) else value, output)

    stage.submod.register_forward_pre_hook(before)
    stage.submod.register_forward_hook(after)
    step_inputs = tuple(inputs[index].to(device) for index in feed)
    timings = {"rank": rank, "busy": [], "step": [], "params": sum(p.numel() for p in stage.submod.parameters())}
    output = None
    with torch.no_grad():
        for iteration in range(job.warmup + job.iters):
            dist.barrier()
            busy[0] = 0.0
            begin = time.perf_counter()
            output = schedule.step(*step_inputs) if rank == 0 else schedule.step()
            if on_cuda:
                torch.cuda.synchronize(device)
            if iteration >= job.warmup:
                timings["step"].append(time.perf_counter() - begin)
                timings["busy"].append(busy[0])
    gathered = [None] * world_size if rank == world_size - 1 else None
    dist.gather_object(timings, gathered, dst=world_size - 1)
    if rank != world_size - 1:
        return None
    if isinstance(output, (tuple, list)):
        output = tuple(t.detach().cpu() for t in output)
    else:
        output = output.detach().cpu()
    return gathered, output


# -- process lifetime ---------------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid):
    """End this process when `parent_pid` ends: ``PR_SET_PDEATHSIG`` on Linux, else a polling thread.

    Returns how (``"prctl"`` or ``"watchdog"``).  A parent that died before
    the call ends this process at once.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
        if armed:
            if os.getppid() != parent_pid:
                os._exit(1)
            return "prctl"
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="cachefit-parent-watch", daemon=True).start()
    return "watchdog"


def _watch_parent(parent_pid, interval_s=0.5):
    while os.getppid() == parent_pid:
        time.sleep(interval_s)
    os._exit(1)


def _raise_exit(signum, _frame):
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _signals_stop_the_run():
    """While stage processes run: SIGTERM and SIGHUP raise SystemExit (when they had their default action).

    Python's default for them ends the process without running ``finally``
    blocks, which would leave the stage processes to the kernel; raising
    lets the cleanup that stops them run.  Only the main thread can set
    handlers; elsewhere this does nothing.
    """
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for number in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if number is not None and signal.getsignal(number) == signal.SIG_DFL:
                previous[number] = signal.signal(number, _raise_exit)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _stop(processes):
    """Terminate, then kill, every process still alive; wait for each."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join(5)


def _wait(context, deadline, reader):
    """Join the spawned processes until `deadline`, reading the last stage's output from `reader`.

    Always leaves none running, and removes the error files torch writes for
    a failed process.  Returns the bytes the last stage sent (None if none).
    """
    from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

    payload = None
    try:
        while True:
            if payload is None and reader.poll():
                payload = reader.recv_bytes()
            if context.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
                break
            if time.monotonic() > deadline:
                raise CachefitError("the pipeline run exceeded `timeout_s`; its processes were stopped")
        if payload is None and reader.poll():
            payload = reader.recv_bytes()
        return payload
    except ProcessRaisedException as exc:
        raise CachefitError(f"stage process {exc.error_index} failed: {_error_line(str(exc))}") from None
    except ProcessExitedException as exc:
        raise CachefitError(f"a stage process exited: {exc}") from None
    finally:
        _stop(context.processes)
        for path in getattr(context, "error_files", ()):
            with contextlib.suppress(OSError):
                os.unlink(path)


def _stage_process(rank, job):
    """Entry point of one spawned stage process (module level, so spawn can import it)."""
    import torch.distributed as dist

    _die_with_parent(job.parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops every stage
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(job.threads)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(job.port)
    device = None
    if job.backend == "nccl":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    dist.init_process_group(job.backend, rank=rank, world_size=job.plan.k,
                            timeout=timedelta(seconds=job.timeout_s))
    try:
        result = run_stage(rank, job.plan.k, job, device=device)
        if result is not None:
            buffer = io.BytesIO()
            torch.save({"timings": result[0], "output": result[1]}, buffer)
            job.result_pipe.send_bytes(buffer.getvalue())
        _quiesce()
    finally:
        dist.destroy_process_group()


def _run_spawned(job):
    import torch.multiprocessing as mp

    deadline = time.monotonic() + job.timeout_s
    reader, writer = mp.get_context("spawn").Pipe(duplex=False)
    job.port, job.parent_pid, job.result_pipe = free_port(), os.getpid(), writer
    logger.info("starting %d stage process(es) on 127.0.0.1:%d (%s, %s)", job.plan.k, job.port,
                job.backend, job.schedule)
    try:
        with _signals_stop_the_run():
            context = mp.start_processes(_stage_process, args=(job,), nprocs=job.plan.k, join=False,
                                         start_method="spawn")
            payload = _wait(context, deadline, reader)
    finally:
        reader.close()
        writer.close()
        job.result_pipe = None
    if payload is None:
        raise CachefitError("the last stage sent no output")
    saved = torch.load(io.BytesIO(payload), weights_only=False)
    return saved["timings"], saved["output"]


def _run_torchrun(job):
    import torch.distributed as dist

    if not under_torchrun():
        raise InputError("launcher='torchrun' needs the environment torchrun sets (RANK, WORLD_SIZE, "
                         "MASTER_ADDR, MASTER_PORT)")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world != job.plan.k:
        raise InputError(f"torchrun started {world} process(es); the plan has {job.plan.k} stage(s)")
    device = None
    if job.backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    torch.set_num_threads(job.threads)
    dist.init_process_group(job.backend, timeout=timedelta(seconds=job.timeout_s))
    try:
        result = run_stage(rank, world, job, device=device)
        _quiesce()
        return result
    finally:
        dist.destroy_process_group()


def _quiesce():
    """Wait until every stage has finished before any tears its connections down.

    A rank that destroyed its process group while a peer's gloo threads still
    had work in flight on their shared connection aborted one of the two
    processes ("terminate called without an active exception", SIGABRT) —
    seen once under load in a 2-stage run whose stages had both finished.
    Only on the success path: after a failure the other ranks may never come.
    """
    import torch.distributed as dist

    dist.barrier()


def _check_options(plan, schedule, microbatches, backend, warmup, iters, timeout_s, threads):
    if schedule not in PIPELINE_SCHEDULES:
        raise InputError(f"`schedule` must be one of {', '.join(PIPELINE_SCHEDULES)}, got {schedule!r}")
    for name, value, low in (("microbatches", microbatches, 1), ("warmup", warmup, 0), ("iters", iters, 1),
                             ("threads", threads, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InputError(f"`{name}` must be an integer ≥ {low}, got {value!r}")
    if schedule == "1f1b" and microbatches < plan.k:
        raise InputError(f"`microbatches` must be at least the number of stages ({plan.k}) for the 1F1B "
                         f"schedule, got {microbatches}")
    if backend not in ("gloo", "nccl"):
        raise InputError(f"`backend` must be 'gloo' (CPU) or 'nccl' (one GPU per stage), got {backend!r}")
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise InputError(f"`timeout_s` must be a positive number of seconds, got {timeout_s!r}")
    if backend == "nccl":
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if available < plan.k:
            raise InputError(f"`backend` 'nccl' places one stage per GPU: the plan has {plan.k} stage(s), this "
                             f"machine has {available} GPU(s); use backend='gloo' to run on the CPU")


def _check_rows(inputs, microbatches, tokens_per_row, seq_len, whole_sequences):
    rows = int(inputs[0].shape[0])
    if any(int(tensor.shape[0]) != rows for tensor in inputs):
        raise InputError("every model input must have the same dimension 0 (the rows micro-batches split)")
    if rows % microbatches:
        raise InputError(f"`microbatches` must divide the {rows} rows of one step, got {microbatches}")
    per = rows // microbatches
    if whole_sequences and (per * tokens_per_row) % seq_len:
        raise InputError(f"`microbatches` = {microbatches} gives micro-batches of {per * tokens_per_row} tokens, "
                         f"not whole sequences of {seq_len} (the model has attention): choose a divisor of "
                         f"{rows * tokens_per_row // seq_len}")
    return rows


def _error_line(text):
    """The ``Type: message`` line of a child's traceback text (the last such line), else its last line."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    found = [line for line in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b.*:", line)]
    return found[-1] if found else (lines[-1] if lines else text)


def _check_host_memory(graph, processes, dtype):
    """Refuse to materialise a model that the stage processes' copies would not fit in host memory."""
    from .model import torch_dtype

    params = sum(int(attrs.get("params") or 0) for _, attrs in graph.nodes(data=True))
    element = torch.empty((), dtype=torch_dtype(dtype, graph_dtype=graph.graph.get("dtype"))).element_size()
    needed = params * element * (processes + 1)  # every stage process and this one build the whole model
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not every platform reports it
        return
    if needed > available:
        from ..units import format_bytes

        raise InputError(f"the plan's model has {params:,} parameters: {processes + 1} process(es) each "
                         f"materialising it need about {format_bytes(needed)}, and this machine has "
                         f"{format_bytes(available)} free; run a smaller model on the CPU, or real "
                         "weights per stage on GPUs with your own loader")


#: How a stage runs its micro-batches: each through the stage's nodes in order (the runtime's micro-batches),
#: or held together and run group by group over the stage's on-chip groups.
INNER_ORDERS = ("node-order", "partition-major")


def run_pipeline(plan, *, schedule="gpipe", microbatches, backend="gloo", module=None, example_inputs=None,
                 seed=0, dtype=None, warmup=1, iters=3, timeout_s=120.0, threads=1, launcher="spawn",
                 inner=None):
    """Run a stage plan on ``torch.distributed.pipelining``, one process per stage, and check it.

    Parameters
    ----------
    plan : cachefit.Plan
        One group per stage (see `cachefit.stages.stages`), each a contiguous
        run of the node order.
    schedule : {"gpipe", "1f1b"}
        ``ScheduleGPipe`` or ``Schedule1F1B`` (forward only: with no loss
        both run every micro-batch through every stage in order).
    microbatches : int
        Micro-batches per step; must divide the rows of the inputs (whole
        sequences for models with attention).
    backend : {"gloo", "nccl"}
        ``gloo``: every stage on the CPU.  ``nccl``: stage i on ``cuda:i``
        (needs a GPU per stage).
    module, example_inputs : torch.nn.Module, tuple of torch.Tensor, optional
        For a plan over a ``from_torch`` graph: the module and the inputs of
        one step (batch along dimension 0).  Otherwise the plan's graph is
        materialised (`pipeline_module`) with `seed` and `dtype`.
    seed : int
    dtype : str, optional
        The dtype materialised graphs compute in (default float32 on the CPU).
    warmup, iters : int
        Untimed and timed steps.
    timeout_s : float
        Bound on the whole multi-process run and on every collective; the
        processes are stopped when it passes.
    threads : int
        torch threads per stage process.
    inner : list of list of list of str, optional
        Partition-major stages: per stage, its on-chip groups as runs of its
        nodes (`cachefit.executor.stage.inner_groups` of a two-level plan).
        Each stage then holds all `microbatches` of a step and runs its
        groups one after another, each over every micro-batch (a group's
        weights are read once per step, not once per micro-batch); the
        runtime gets the step as one micro-batch, so stage s starts when
        stage s − 1 has finished the whole step (no overlap between stages
        within a step: the bubble is (S − 1) / S).  GPipe only.  Default:
        the runtime's micro-batches, each through a stage's nodes in order.
    launcher : {"spawn", "torchrun"}
        ``spawn``: start the stage processes here (``torch.multiprocessing``,
        ``MASTER_ADDR=127.0.0.1`` and a free port).  ``torchrun``: this process
        is one rank started by ``torchrun`` (``RANK``, ``WORLD_SIZE``,
        ``MASTER_ADDR``, ``MASTER_PORT`` set), possibly on several nodes; it
        runs its own stage, and the last rank checks and reports.

    Returns
    -------
    PipelineResult or None
        None on every rank but the last under ``torchrun``.

    Raises
    ------
    InputError
        A bad option, a plan without groups, a boundary the runtime cannot
        split (`split_spec`), inputs the micro-batches do not divide, or too
        few GPUs for ``nccl``.
    CachefitError
        A stage process failed or the run exceeded `timeout_s` (the
        processes are stopped in every case).

    Notes
    -----
    The reference is the whole module run in this process on the whole
    batch; the pipelined output is the last stage's merged micro-batch
    outputs, compared with ``torch.testing.assert_close`` at the executor's
    tolerances (`cachefit.executor.runner.TOLERANCES`, atol scaled by the
    reference's RMS).  Every rank builds and traces the whole model, as the
    ``pipeline`` frontend does, so a model must fit a rank's host memory
    (refused up front when the processes' copies would not).  Two stage
    processes of a small model take about 5–10 s on two CPU cores, most of
    it starting Python and torch.

    Examples
    --------
    >>> import cachefit
    >>> from cachefit.executor import linear_stack
    >>> plan = cachefit.plan(linear_stack(4, 16, batch=2, seq_len=4), 10**6, solver="dp", k=2)
    >>> result = run_pipeline(plan, microbatches=2, warmup=0, iters=1)
    >>> result.equivalent, result.stages, [stage.first for stage in result.stage_reports]
    (True, 2, ['linear.0', 'linear.2'])
    >>> round(result.bubble_theoretical, 3)
    0.333
    """
    started = time.perf_counter()
    _check_options(plan, schedule, microbatches, backend, warmup, iters, timeout_s, threads)
    if launcher not in ("spawn", "torchrun"):
        raise InputError(f"`launcher` must be 'spawn' or 'torchrun', got {launcher!r}")
    graph = plan_graph(plan)
    stage_groups(plan, graph)
    verify_plan(plan)
    from_torch = graph.graph.get("source") in FROM_TORCH_SOURCES
    if inner is not None:
        if from_torch:
            raise InputError("`inner` (partition-major stages) runs graphs the executor materialises, not a "
                             "from_torch module")
        if schedule != "gpipe":
            raise InputError("`inner` (partition-major stages) hands the runtime one micro-batch per step: use "
                             "schedule='gpipe' (forward only, 1F1B would be the same)")
        if [[node for group in stage for node in group] for stage in inner] != [list(p) for p in plan.partitions]:
            raise InputError("`inner` must list each stage's nodes in its groups, in order "
                             "(cachefit.executor.stage.inner_groups)")
    reference_module, inputs, tokens_per_row = _reference(plan, graph, module, example_inputs, launcher=launcher,
                                                          seed=seed, dtype=dtype)
    rows = _check_rows(inputs, microbatches, tokens_per_row, int(graph.graph.get("seq_len") or 1),
                       _whole_sequences(graph) and not from_torch)
    split_spec(plan, reference_module)  # refuse a boundary the runtime cannot split before starting anything
    job = _Job(plan=plan, module=module if from_torch else None, inputs=inputs if from_torch else None,
               schedule=schedule, microbatches=1 if inner is not None else microbatches, backend=backend,
               seed=seed, dtype=dtype, warmup=warmup, iters=iters, timeout_s=float(timeout_s), threads=threads,
               inner=inner, chunks=microbatches if inner is not None else 1)

    if launcher == "torchrun":
        result = _run_torchrun(job)
        if result is None:
            return None
        gathered, output = result
    else:
        gathered, output = _run_spawned(job)

    equivalence = _compare(output, reference_module, inputs)
    result = _result(plan, graph, job, gathered, rows=rows, tokens=rows * tokens_per_row, equivalence=equivalence,
                     wall_s=time.perf_counter() - started)
    return replace(result, output=output)


def _whole_sequences(graph):
    """Micro-batches must hold whole sequences: the graph has attention, a pooler or whole blocks."""
    return any(attrs.get("op") in ("attention", "pooler", "block") for _, attrs in graph.nodes(data=True))


def _reference(plan, graph, module, example_inputs, *, launcher, seed, dtype):
    """(the whole model for the reference run, one step's inputs, tokens per input row).

    The user's module and inputs for a ``from_torch`` graph; else the
    plan's graph materialised, after its module bytes are verified against
    the plan and its copies are known to fit host memory.
    """
    if graph.graph.get("source") in FROM_TORCH_SOURCES:
        if module is None or example_inputs is None:
            raise InputError("the plan's graph was imported with from_torch: pass that `module` and its "
                             "`example_inputs` (one step, batch along dimension 0)")
        inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
        if not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
            raise InputError("`example_inputs` must be a tensor or a tuple of tensors")
        return copy.deepcopy(module).eval(), inputs, int(graph.graph.get("seq_len") or 1)
    if module is not None or example_inputs is not None:
        raise InputError("`module` and `example_inputs` are for plans over from_torch graphs; this plan's "
                         "graph is materialised from its nodes")
    verify_module_bytes(graph)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", plan.k)) if launcher == "torchrun" else plan.k
    _check_host_memory(graph, local, dtype)
    reference_module, inputs = pipeline_module(plan, seed=seed, dtype=dtype)
    return reference_module, inputs, 1


def _compare(output, reference_module, inputs):
    """The `Comparison` of the pipelined `output` with the whole module run here on `inputs`."""
    from .runner import compare_outputs

    from .export import tensor_leaves

    with torch.no_grad():
        reference = reference_module(*inputs)
    if not isinstance(reference, torch.Tensor):  # a ModelOutput, a dict, nested tuples: their tensors
        reference, output = tensor_leaves(reference), tensor_leaves(output)
    several = isinstance(reference, (tuple, list))
    names = tuple(f"output.{i}" for i in range(len(reference))) if several else ("output",)

    def as_dict(value):
        return dict(zip(names, value if isinstance(value, (tuple, list)) else (value,)))

    reference_dtype = next(iter(as_dict(reference).values())).dtype
    return compare_outputs(as_dict(output), as_dict(reference), reference_dtype)


def _result(plan, graph, job, gathered, *, rows, tokens, equivalence, wall_s):
    """The `PipelineResult` of a run whose stages reported `gathered`."""
    gathered = sorted(gathered, key=lambda item: item["rank"])
    makespans = [max(column) for column in zip(*(item["step"] for item in gathered))]
    reports = []
    for item, group, size in zip(gathered, plan.partitions, plan.sizes):
        idle = [1.0 - busy / span if span > 0 else 0.0 for busy, span in zip(item["busy"], makespans)]
        reports.append(StageReport(
            index=item["rank"], first=group[0], last=group[-1], nodes=len(group), params=int(item["params"]),
            planned_bytes=int(size), flops=int(sum(int(graph.nodes[node].get("flops") or 0) for node in group)),
            busy_ms=1000 * statistics.median(item["busy"]), step_ms=1000 * statistics.median(item["step"]),
            idle_fraction=statistics.median(idle)))
    makespan = statistics.median(makespans)
    notes = ["forward only (inference): GPipe and 1F1B differ only in the order of backward steps",
             "measured idle includes send/receive and schedule overhead, not only the bubble"]
    if job.backend == "gloo":
        notes.append(f"CPU stages with {job.threads} torch thread(s) each; timings measure this machine's CPU")
    if job.inner is not None:
        notes.append(f"partition-major stages: each stage holds the step's {job.chunks} micro-batch(es) and runs "
                     f"its {', '.join(str(len(stage)) for stage in job.inner)} on-chip group(s) one after another, "
                     "each over every micro-batch; the runtime passes the step as one micro-batch, so the stages do "
                     "not overlap within a step")
    return PipelineResult(
        schedule=job.schedule, microbatches=job.chunks if job.inner is not None else job.microbatches,
        stages=plan.k, backend=job.backend,
        device="cuda" if job.backend == "nccl" else "cpu", rows=rows, tokens=tokens,
        makespan_ms=1000 * makespan, makespan_min_ms=1000 * min(makespans), makespan_max_ms=1000 * max(makespans),
        tokens_per_s=tokens / makespan if makespan > 0 else math.inf,
        bubble_theoretical=bubble_fraction(plan.k, job.microbatches),
        bubble_measured=statistics.fmean(report.idle_fraction for report in reports),
        stage_reports=tuple(reports), equivalent=bool(equivalence.equivalent),
        max_abs_diff=float(equivalence.max_abs_diff), rel_error=float(equivalence.rel_error),
        rtol=float(equivalence.rtol), atol=float(equivalence.atol), warmup=job.warmup, iters=job.iters,
        wall_s=wall_s, notes=tuple(notes))
