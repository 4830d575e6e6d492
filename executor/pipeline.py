"""Run a stage plan on PyTorch's own pipelining runtime (``torch.distributed.pipelining``; imports torch).

A plan whose groups are pipeline stages (see `cachefit.stages.stages`) is
handed to ``torch.distributed.pipelining.pipeline(module, mb_args,
split_spec=...)``: `split_spec` says where the runtime cuts, one
``SplitPoint.BEGINNING`` at the first module of every group but the first.
`run_pipeline` then starts one process per stage on this machine, runs a
``ScheduleGPipe`` or ``Schedule1F1B`` over the micro-batches, checks the last
stage's output against a single-process run of the whole model
(``torch.testing.assert_close``) and reports per-stage time, the bubble and
the throughput.

Two kinds of module can be split:

* the user's own module, for a plan made over its ``from_torch`` graph: the
  boundary must be a submodule call (``split_spec`` keys are submodule
  names), made exactly once per forward; anything else (a function such as
  ``torch.relu`` or ``x + y``, a method, a shared submodule) is refused
  with an `InputError` naming the node;
* a graph the executor materialises (`cachefit.executor.build`: embedded
  models, HF configs, `linear_stack`), wrapped by `pipeline_module` in a
  `StepsModule` whose forward calls the node modules in the graph's order, so
  every node is a submodule and every boundary can be split.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import re
import socket
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import timedelta

import torch
from torch import nn

from ..errors import CachefitError, InputError
from ..memory import LayerTable
from ..result import Plan, write_text_atomic

__all__ = ["StepsModule", "pipeline_module", "split_spec", "run_pipeline", "run_stage", "PipelineResult",
           "StageReport", "PIPELINE_SCHEDULES", "bubble_fraction", "free_port"]

logger = logging.getLogger(__name__)

#: Schedule names accepted by `run_pipeline` -> the ``torch.distributed.pipelining`` class name.
PIPELINE_SCHEDULES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B"}

RESULT_FORMAT = "cachefit.pipeline"


def bubble_fraction(stages, microbatches):
    """The idle share of a fill-and-drain pipeline of equal stages: (S − 1) / (M + S − 1).

    GPipe and 1F1B (forward only or with backward) both have it: each stage
    waits S − 1 micro-batch slots out of M + S − 1.

    Examples
    --------
    >>> bubble_fraction(2, 4)
    0.2
    >>> bubble_fraction(1, 8)
    0.0
    """
    return (stages - 1) / (microbatches + stages - 1)


# -- the module --------------------------------------------------------------------------------------


class StepsModule(nn.Module):
    """A materialised graph as one ``nn.Module`` whose forward calls the nodes in order.

    Each node's module is a submodule ``nodes.<name>`` (the node id with
    every character outside ``[A-Za-z0-9_]`` replaced by ``_``, and a
    suffix when two ids collide), so ``torch.distributed.pipelining`` can
    split before any node.  ``forward(*inputs)`` takes the model inputs in
    the order of `input_ids` and returns the output (a tuple when the graph
    has several sinks).

    Attributes
    ----------
    node_ids : tuple of str
        The graph's nodes, in execution order.
    input_ids : tuple of str
        The model inputs the forward takes (``@tokens``, ``@positions`` or ``@input``).
    output_ids : tuple of str
        The graph's sinks.
    """

    def __init__(self, built):
        super().__init__()
        self.node_ids = tuple(step.node for step in built.steps)
        self.input_ids = tuple(built.inputs)
        self.output_ids = tuple(built.outputs)
        self._reads = tuple(tuple(step.inputs) for step in built.steps)
        names, taken = [], set()
        for node in self.node_ids:
            name = re.sub(r"\W", "_", node)
            if not name or name[0].isdigit():
                name = f"n_{name}"
            base, suffix = name, 1
            while name in taken:
                suffix += 1
                name = f"{base}_{suffix}"
            taken.add(name)
            names.append(name)
        self._names = dict(zip(self.node_ids, names))
        self.nodes = nn.ModuleDict({name: step.module for name, step in zip(names, built.steps)})

    def qualified_name(self, node):
        """The submodule name of `node` (a key of `split_spec`)."""
        return f"nodes.{self._names[node]}"

    def forward(self, *inputs):
        values = dict(zip(self.input_ids, inputs))
        for node, reads in zip(self.node_ids, self._reads):
            values[node] = self.nodes[self._names[node]](*(values[name] for name in reads))
        outputs = tuple(values[name] for name in self.output_ids)
        return outputs[0] if len(outputs) == 1 else outputs


def _plan_graph(plan):
    graph = plan.graph
    if isinstance(graph, LayerTable):
        graph = graph.to_graph()
    if graph is None:
        raise InputError("`plan` carries no graph; read it from its JSON file (Plan.from_json)")
    return graph


def pipeline_module(plan, *, seed=0, dtype=None, device="cpu"):
    """The `StepsModule` of a plan's graph and the inputs of one whole pass.

    Parameters
    ----------
    plan : cachefit.Plan or networkx.DiGraph
        A plan (its graph is used) or a graph that `cachefit.executor.build`
        materialises (embedded models, HF configs, `linear_stack`).
    seed : int
        Seeds the weights and the inputs (the same seed gives the same model
        in every process).
    dtype : str, optional
        fp32, bf16 or fp16; default float32 on the CPU, the graph's on CUDA.
    device : str or torch.device

    Returns
    -------
    (StepsModule, tuple of torch.Tensor)
        The module in eval mode, and its positional inputs (dimension 0 are
        rows: tokens for transformer graphs).

    Raises
    ------
    InputError
        The graph was imported from a torch module (split the user's module
        instead), or `build` refuses it.

    Examples
    --------
    >>> from cachefit.executor import linear_stack
    >>> module, inputs = pipeline_module(linear_stack(3, 8, batch=2, seq_len=4))
    >>> [name for name, _ in module.named_children()], tuple(inputs[0].shape)
    (['nodes'], (8, 8))
    >>> module.qualified_name("linear.1"), tuple(module(*inputs).shape)
    ('nodes.linear_1', (8, 8))
    """
    from .model import build

    graph = plan.graph if isinstance(plan, Plan) else plan
    if isinstance(graph, LayerTable):
        graph = graph.to_graph()
    if graph is not None and graph.graph.get("source") == "torch.fx":
        raise InputError("the plan's graph was imported from a torch module (source 'torch.fx'): split that "
                         "module itself, split_spec(plan, module) or run_pipeline(plan, module=module, "
                         "example_inputs=...)")
    built = build(graph, seed=seed, dtype=dtype, device=device)
    module = StepsModule(built).eval()
    return module, tuple(built.inputs[name] for name in module.input_ids)


# -- split_spec --------------------------------------------------------------------------------------


def _stage_groups(plan, graph):
    """The plan's groups, checked to be contiguous runs of the graph's node order, in order."""
    if not isinstance(plan, Plan):
        raise InputError(f"`plan` must be a cachefit.Plan, got {type(plan).__name__}")
    if not plan.ok:
        raise InputError(f"`plan` has no groups to run (status {plan.status}: {plan.reason})")
    order = list(graph)
    position = {node: index for index, node in enumerate(order)}
    expected = 0
    for index, group in enumerate(plan.partitions):
        for node in group:
            if node not in position:
                raise InputError(f"`plan` does not match its graph: node {node!r} of group {index} is not in it")
            if position[node] != expected:
                raise InputError(
                    f"stage {index} is not a contiguous run of the model's execution order at node {node!r} "
                    f"(position {position[node]}, expected {order[expected]!r} at {expected}): a pipeline "
                    "runtime cuts the forward at points, so every stage must be a run of consecutive nodes; "
                    "plan the stages with solver='dp', which keeps the order")
            expected += 1
    if expected != len(order):
        raise InputError(f"`plan` does not cover its graph: node {order[expected]!r} is in no group")
    return [list(group) for group in plan.partitions]


def _fx_boundaries(graph, module):
    """node id -> (fx op, submodule name or target, calls of that submodule) for a from_torch graph."""
    import torch.fx

    named = dict(module.named_modules())
    leaves = {str(attrs.get("target")) for _, attrs in graph.nodes(data=True)
              if str(attrs.get("target")) in named and str(attrs.get("target"))}

    class _Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m, qualified_name):
            return qualified_name in leaves or super().is_leaf_module(m, qualified_name)

    try:
        traced = _Tracer().trace(module)
    except Exception as exc:  # noqa: BLE001 - fx raises many kinds
        raise InputError(f"`module` cannot be traced with torch.fx: {type(exc).__name__}: {exc}") from None
    by_name = {node.name: node for node in traced.nodes}
    calls = {}
    for node in traced.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    found = {}
    for node_id, attrs in graph.nodes(data=True):
        fx_node = by_name.get(node_id) or by_name.get(attrs.get("fx_name") or "")
        if fx_node is None:
            found[node_id] = None
            continue
        target = str(fx_node.target) if fx_node.op == "call_module" else getattr(
            fx_node.target, "__name__", str(fx_node.target))
        found[node_id] = (fx_node.op, target, calls.get(target, 0) if fx_node.op == "call_module" else 0)
    return found


def split_spec(plan, module):
    """The ``split_spec`` of ``torch.distributed.pipelining.pipeline`` for a stage plan.

    Parameters
    ----------
    plan : cachefit.Plan
        A plan with one group per stage, each group a contiguous run of the
        graph's node order (the plans of `cachefit.stages.stages` and of
        ``solver="dp"`` are).
    module : torch.nn.Module
        For a plan over a ``from_torch`` graph, the module it was imported
        from; for a graph the executor materialises, the `StepsModule` of
        `pipeline_module`.

    Returns
    -------
    dict of str to torch.distributed.pipelining.SplitPoint
        ``{submodule name: SplitPoint.BEGINNING}`` for the first node of
        every group after the first, in stage order (empty for one group).

    Raises
    ------
    InputError
        The plan has no groups; a group is not a contiguous run of the node
        order; a plan node is not in `module`; or a stage would begin at a
        node where the runtime cannot split: an operation that is not a
        submodule call (a function such as ``torch.relu`` or ``x + y``, a
        tensor method, a model input), or a submodule called more than once
        per forward (each call would add a split).  The message names the node.

    Notes
    -----
    The runtime traces the forward with ``torch.export`` and cuts it where a
    split point's submodule is called, so a stage holds exactly the
    operations between two boundaries in execution order; with contiguous
    groups that are the plan's groups.  For a ``from_torch`` graph the
    module is traced with torch.fx, treating as leaves the submodules the
    graph's nodes name, so each plan node is found as its fx node.
    O(nodes) after the trace.

    Examples
    --------
    >>> import cachefit
    >>> from cachefit.executor import linear_stack
    >>> graph = linear_stack(4, 8, batch=2, seq_len=4)
    >>> plan = cachefit.plan(graph, 10**6, solver="dp", k=2)
    >>> module, _ = pipeline_module(plan)
    >>> {name: point.name for name, point in split_spec(plan, module).items()}
    {'nodes.linear_2': 'BEGINNING'}
    """
    from torch.distributed.pipelining import SplitPoint

    graph = _plan_graph(plan)
    groups = _stage_groups(plan, graph)
    if not isinstance(module, nn.Module):
        raise InputError(f"`module` must be a torch.nn.Module, got {type(module).__name__}")
    spec = {}
    if isinstance(module, StepsModule):
        missing = [node for node in graph if node not in module._names]
        if missing or len(module.node_ids) != graph.number_of_nodes():
            raise InputError(f"`module` was not built from the plan's graph (node {missing[:1] or '?'} differs): "
                             "use pipeline_module(plan)")
        for group in groups[1:]:
            spec[module.qualified_name(group[0])] = SplitPoint.BEGINNING
        return spec
    if graph.graph.get("source") != "torch.fx":
        raise InputError("`module` is a user module but the plan's graph was not imported with from_torch: "
                         "use the StepsModule of pipeline_module(plan)")
    calls = _fx_boundaries(graph, module)
    for index, group in enumerate(groups[1:], start=1):
        node = group[0]
        info = calls.get(node)
        if info is None:
            raise InputError(f"`plan` does not match `module`: node {node!r} (first of stage {index}) is not a "
                             "node of its torch.fx trace; plan the module's own from_torch graph")
        op, target, count = info
        if op != "call_module":
            kind = {"placeholder": "a model input", "call_function": f"a call of the function {target!r}",
                    "call_method": f"a call of the tensor method {target!r}",
                    "get_attr": f"a read of the attribute {target!r}"}.get(op, op)
            raise InputError(
                f"stage {index} cannot begin at node {node!r}: it is {kind}, not a submodule call, and "
                "torch.distributed.pipelining splits a forward only where a submodule is called (split_spec "
                "keys are submodule names); plan stages that begin at a module (another `devices` or "
                "`balance`), or wrap that operation in an nn.Module")
        if count != 1:
            raise InputError(
                f"stage {index} cannot begin at node {node!r}: its submodule {target!r} is called {count} "
                "times per forward, and a split point there would cut the forward at every call")
        spec[target] = SplitPoint.BEGINNING
    return spec


# -- results -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageReport:
    """One stage of a pipeline run.

    Attributes
    ----------
    index : int
    first, last : str
        The stage's first and last plan node.
    nodes : int
    params : int
        Parameters of the stage's module as the runtime built it (a weight
        shared with another stage, such as a tied embedding, counts in both).
    planned_bytes : int
        The plan's size S of the group.
    flops : int
        Σ ``flops`` of the group's nodes (0 where unknown).
    busy_ms : float
        Median over the timed steps of the stage's compute: its module's
        forward over all micro-batches (forward hooks, ``time.perf_counter``;
        on CUDA after a synchronize).
    step_ms : float
        Median time from the common barrier to this stage's end of the step.
    idle_fraction : float
        Median of 1 − busy / makespan of the step: waiting for the previous
        stage, sending, receiving and the schedule's own overhead.
    """

    index: int
    first: str
    last: str
    nodes: int
    params: int
    planned_bytes: int
    flops: int
    busy_ms: float
    step_ms: float
    idle_fraction: float


@dataclass(frozen=True)
class PipelineResult:
    """What `run_pipeline` measured.

    Attributes
    ----------
    schedule : str
        ``"gpipe"`` or ``"1f1b"``.
    microbatches, stages : int
    backend : str
    device : str
        ``"cpu"`` or ``"cuda"`` (one GPU per stage).
    rows : int
        Rows (dimension 0) of one step's inputs; ``tokens`` is rows × tokens per row.
    tokens : int
    makespan_ms, makespan_min_ms, makespan_max_ms : float
        Median, fastest and slowest step: from the barrier before it to the
        last stage's end of it.
    tokens_per_s : float
        tokens / median makespan.
    bubble_theoretical : float
        (S − 1) / (M + S − 1).
    bubble_measured : float
        The mean over stages of their median idle fraction: the bubble plus
        communication and scheduling overhead.
    stage_reports : tuple of StageReport
    equivalent : bool
        ``torch.testing.assert_close(pipelined, single-process, rtol, atol)`` passed.
    max_abs_diff, rel_error, rtol, atol : float
    warmup, iters : int
        Untimed and timed steps.
    wall_s : float
        The whole run: building, starting the processes, tracing, steps.
    notes : tuple of str
    output : torch.Tensor or tuple of torch.Tensor or None
        The pipelined output of the last step (on the CPU; not in the JSON).
    """

    schedule: str
    microbatches: int
    stages: int
    backend: str
    device: str
    rows: int
    tokens: int
    makespan_ms: float
    makespan_min_ms: float
    makespan_max_ms: float
    tokens_per_s: float
    bubble_theoretical: float
    bubble_measured: float
    stage_reports: tuple
    equivalent: bool
    max_abs_diff: float
    rel_error: float
    rtol: float
    atol: float
    warmup: int
    iters: int
    wall_s: float
    notes: tuple = field(default_factory=tuple)
    output: object = field(default=None, compare=False, repr=False)

    @property
    def equivalence_line(self):
        """One line stating the equivalence check and its result."""
        verdict = "PASS" if self.equivalent else "FAIL"
        return (f"equivalence with the single-process model: {verdict} (torch.testing.assert_close, "
                f"rtol={self.rtol:.0e}, atol={self.atol:.1e}; max |Δ| {self.max_abs_diff:.2e}, "
                f"rel {self.rel_error:.1e})")

    def to_dict(self):
        data = {item.name: getattr(self, item.name) for item in fields(self) if item.name != "output"}
        data["stage_reports"] = [asdict(stage) for stage in self.stage_reports]
        data["notes"] = list(self.notes)
        return {"format": RESULT_FORMAT, "version": 1, **data}

    def to_json(self, path=None):
        import json

        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            write_text_atomic(path, text + "\n")
        return text


# -- running -----------------------------------------------------------------------------------------


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
    outdir: str | None = None
    port: int | None = None


def _split_rows(inputs, microbatches):
    return tuple(tensor[: tensor.shape[0] // microbatches] for tensor in inputs)


def _schedule_class(name):
    import torch.distributed.pipelining as pipelining

    return getattr(pipelining, PIPELINE_SCHEDULES[name])


def _module_and_inputs(job):
    """The whole model (built on the CPU; `build_stage` moves the stage) and one step's inputs."""
    if job.module is None:
        return pipeline_module(job.plan, seed=job.seed, dtype=job.dtype, device="cpu")
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

    device = torch.device("cpu") if device is None else torch.device(device)
    module, inputs = _module_and_inputs(job)
    spec = split_spec(job.plan, module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own deprecation notices while tracing
        pipe = pipeline(module, _split_rows(inputs, job.microbatches), split_spec=spec)
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

    def after(_module, _args, _output):
        if on_cuda:
            torch.cuda.synchronize(device)
        busy[0] += time.perf_counter() - started[0]

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


def _stage_process(rank, job):
    """Entry point of one spawned stage process (module level, so spawn can import it)."""
    import torch.distributed as dist

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
            torch.save({"timings": result[0], "output": result[1]}, os.path.join(job.outdir, "last_stage.pt"))
    finally:
        dist.destroy_process_group()


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


def _wait(context, deadline):
    """Join the spawned processes until `deadline`; always leaves none running."""
    from torch.multiprocessing import ProcessRaisedException, ProcessExitedException

    try:
        while not context.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                raise CachefitError("the pipeline run exceeded `timeout_s`; its processes were stopped")
    except ProcessRaisedException as exc:
        raise CachefitError(f"stage process {exc.error_index} failed: {_error_line(str(exc))}") from None
    except ProcessExitedException as exc:
        raise CachefitError(f"a stage process exited: {exc}") from None
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
        for process in context.processes:
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join(5)


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


def _under_torchrun():
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def run_pipeline(plan, *, schedule="gpipe", microbatches, backend="gloo", module=None, example_inputs=None,
                 seed=0, dtype=None, warmup=1, iters=3, timeout_s=120.0, threads=1, launcher="spawn"):
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
    from .runner import compare_outputs

    started = time.perf_counter()
    _check_options(plan, schedule, microbatches, backend, warmup, iters, timeout_s, threads)
    if launcher not in ("spawn", "torchrun"):
        raise InputError(f"`launcher` must be 'spawn' or 'torchrun', got {launcher!r}")
    graph = _plan_graph(plan)
    _stage_groups(plan, graph)
    from_torch = graph.graph.get("source") == "torch.fx"
    if from_torch:
        if module is None or example_inputs is None:
            raise InputError("the plan's graph was imported with from_torch: pass that `module` and its "
                             "`example_inputs` (one step, batch along dimension 0)")
        inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
        if not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
            raise InputError("`example_inputs` must be a tensor or a tuple of tensors")
        reference_module = copy.deepcopy(module).eval()
        seq_len = int(graph.graph.get("seq_len") or 1)
        tokens_per_row, whole_sequences = seq_len, False
    else:
        if module is not None or example_inputs is not None:
            raise InputError("`module` and `example_inputs` are for plans over from_torch graphs; this plan's "
                             "graph is materialised from its nodes")
        local = int(os.environ.get("LOCAL_WORLD_SIZE", plan.k)) if launcher == "torchrun" else plan.k
        _check_host_memory(graph, local, dtype)
        reference_module, inputs = pipeline_module(plan, seed=seed, dtype=dtype)
        tokens_per_row, seq_len = 1, int(graph.graph["seq_len"])
        whole_sequences = any(attrs.get("op") in ("attention", "pooler", "block") for _, attrs in graph.nodes(data=True))
    rows = _check_rows(inputs, microbatches, tokens_per_row, seq_len, whole_sequences)
    split_spec(plan, reference_module)  # refuse a boundary the runtime cannot split before starting anything
    job = _Job(plan=plan, module=module if from_torch else None, inputs=inputs if from_torch else None,
               schedule=schedule, microbatches=microbatches, backend=backend, seed=seed, dtype=dtype,
               warmup=warmup, iters=iters, timeout_s=float(timeout_s), threads=threads)

    if launcher == "torchrun":
        result = _run_torchrun(job)
        if result is None:
            return None
        gathered, output = result
    else:
        gathered, output = _run_spawned(job)

    with torch.no_grad():
        reference = reference_module(*inputs)
    names = ("output",) if not isinstance(reference, (tuple, list)) else tuple(f"output.{i}" for i in range(len(reference)))
    as_dict = lambda value: dict(zip(names, value if isinstance(value, (tuple, list)) else (value,)))  # noqa: E731
    reference_dtype = next(iter(as_dict(reference).values())).dtype
    max_abs, rel, equivalent, rtol, atol = compare_outputs(as_dict(output), as_dict(reference), reference_dtype)
    result = _result(plan, graph, job, gathered, rows=rows, tokens=rows * tokens_per_row, equivalent=equivalent,
                     max_abs=max_abs, rel=rel, rtol=rtol, atol=atol, wall_s=time.perf_counter() - started)
    return replace(result, output=output)


def _run_spawned(job):
    import torch.multiprocessing as mp

    deadline = time.monotonic() + job.timeout_s
    with tempfile.TemporaryDirectory(prefix="cachefit-pipeline-") as outdir:
        job.outdir, job.port = outdir, free_port()
        logger.info("starting %d stage process(es) on 127.0.0.1:%d (%s, %s)", job.plan.k, job.port,
                    job.backend, job.schedule)
        context = mp.start_processes(_stage_process, args=(job,), nprocs=job.plan.k, join=False,
                                     start_method="spawn")
        _wait(context, deadline)
        path = os.path.join(outdir, "last_stage.pt")
        if not os.path.exists(path):
            raise CachefitError("the last stage wrote no output")
        saved = torch.load(path, weights_only=False)
    return saved["timings"], saved["output"]


def _run_torchrun(job):
    import torch.distributed as dist

    if not _under_torchrun():
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
        return run_stage(rank, world, job, device=device)
    finally:
        dist.destroy_process_group()


def _result(plan, graph, job, gathered, *, rows, tokens, equivalent, max_abs, rel, rtol, atol, wall_s):
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
    return PipelineResult(
        schedule=job.schedule, microbatches=job.microbatches, stages=plan.k, backend=job.backend,
        device="cuda" if job.backend == "nccl" else "cpu", rows=rows, tokens=tokens,
        makespan_ms=1000 * makespan, makespan_min_ms=1000 * min(makespans), makespan_max_ms=1000 * max(makespans),
        tokens_per_s=tokens / makespan if makespan > 0 else math.inf,
        bubble_theoretical=bubble_fraction(plan.k, job.microbatches),
        bubble_measured=statistics.fmean(report.idle_fraction for report in reports),
        stage_reports=tuple(reports), equivalent=bool(equivalent), max_abs_diff=float(max_abs),
        rel_error=float(rel), rtol=float(rtol), atol=float(atol), warmup=job.warmup, iters=job.iters,
        wall_s=wall_s, notes=tuple(notes))
