"""Where a pipeline runtime cuts a stage plan: `split_spec`, and a graph as one module (imports torch).

A plan whose groups are pipeline stages (see `cachefit.stages.stages`) is
handed to ``torch.distributed.pipelining.pipeline(module, mb_args,
split_spec=...)``: `split_spec` says where the runtime cuts, one
``SplitPoint.BEGINNING`` at the first module of every group but the first.
(`cachefit.executor.pipeline` runs the stages, one process each.)

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

import numbers
import re

from torch import nn

from ..errors import InputError
from ..result import Plan
from .fingerprint import plan_graph

__all__ = ["StepsModule", "StageBoundary", "pipeline_module", "split_spec", "stage_groups"]


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

        self.inner = None

    def qualified_name(self, node):
        """The submodule name of `node` (a key of `split_spec`)."""
        return f"nodes.{self._names[node]}"

    def run_partition_major(self, stages, chunks):
        """Run each stage group by group over `chunks` row chunks (the micro-batches a stage holds).

        Parameters
        ----------
        stages : sequence of sequences of sequences of str
            Per pipeline stage, its on-chip groups as runs of this module's
            nodes (`cachefit.executor.stage.inner_groups`); together, every
            node once, in order.
        chunks : int
            The row chunks each group runs over before the next group starts
            (a positive integer that divides the rows of every value a stage
            reads from earlier ones, checked when the module runs).

        Notes
        -----
        Each stage after the first begins with a `StageBoundary` module (the
        point ``split_spec`` cuts at, called once per forward), which passes
        on the values that cross into the stage.  A stage splits the values
        it reads from earlier stages into `chunks` along dimension 0, runs
        group 1 on every chunk, then group 2, ..., and joins the values later
        stages read.  The math is the node order's: only the order of the
        calls changes.
        """
        if isinstance(chunks, bool) or not isinstance(chunks, numbers.Integral) or chunks < 1:
            raise InputError(f"`chunks` must be a positive integer of row chunks, got {chunks!r}")
        order = [node for stage in stages for group in stage for node in group]
        if order != list(self.node_ids):
            raise InputError("the on-chip groups of the stages must list every node once, in the model's order")
        reads = dict(zip(self.node_ids, self._reads))
        stage_of = {node: index for index, stage in enumerate(stages) for group in stage for node in group}
        plan = []
        for index, stage in enumerate(stages):
            members = [node for group in stage for node in group]
            later = {name for node in self.node_ids if stage_of[node] > index for name in reads[node]}
            later |= set(self.output_ids)
            before = set(self.input_ids) | {node for node in self.node_ids if stage_of[node] < index}
            taken = list(dict.fromkeys(name for node in members for name in reads[node] if name in before))
            crossing = [name for name in (*self.input_ids, *self.node_ids) if name in before
                        and (name in taken or name in later)]
            given = [node for node in members if node in later]
            plan.append((crossing, taken, [list(group) for group in stage], given))
        self.inner = (tuple(plan), int(chunks), reads)
        self.boundaries = nn.ModuleList(StageBoundary() for _ in stages[1:])
        return self

    def forward(self, *inputs):
        values = dict(zip(self.input_ids, inputs))
        if self.inner is not None:
            return self._forward_partition_major(values)
        for node, reads in zip(self.node_ids, self._reads):
            values[node] = self.nodes[self._names[node]](*(values[name] for name in reads))
        return self._outputs(values)

    def _outputs(self, values):
        outputs = tuple(values[name] for name in self.output_ids)
        return outputs[0] if len(outputs) == 1 else outputs

    def _forward_partition_major(self, values):
        import torch

        plan, chunks, reads = self.inner
        for index, (crossing, taken, groups, given) in enumerate(plan):
            if index:
                values.update(zip(crossing, self.boundaries[index - 1](*(values[name] for name in crossing))))
            parts = [dict() for _ in range(chunks)]
            for name in taken:
                rows = values[name].shape[0] if values[name].dim() else 0
                if not rows or rows % chunks:
                    raise InputError(f"value {name!r} has {rows} row(s) along dimension 0, which the {chunks} "
                                     "row chunks each group runs over do not divide")
                for part, piece in zip(parts, torch.chunk(values[name], chunks, dim=0)):
                    part[name] = piece
            for group in groups:
                for part in parts:
                    for node in group:
                        part[node] = self.nodes[self._names[node]](*(part[name] for name in reads[node]))
            for node in given:
                values[node] = torch.cat([part[node] for part in parts], dim=0)
        return self._outputs(values)


class StageBoundary(nn.Module):
    """Where a partition-major pipeline stage begins (`StepsModule.run_partition_major`): passes on the
    values that cross into the stage, so the runtime can cut before this call."""

    def forward(self, *values):
        return tuple(value.contiguous() for value in values)


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

    graph = plan_graph(plan)
    if graph.graph.get("source") in ("torch.fx", "torch.export"):
        raise InputError("the plan's graph was imported from a torch module (from_torch): split that "
                         "module itself, split_spec(plan, module) or run_pipeline(plan, module=module, "
                         "example_inputs=...)")
    built = build(graph, seed=seed, dtype=dtype, device=device)
    module = StepsModule(built).eval()
    return module, tuple(built.inputs[name] for name in module.input_ids)



def stage_groups(plan, graph):
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
    named = dict(module.named_modules())
    leaves = {str(attrs.get("target")) for _, attrs in graph.nodes(data=True)
              if str(attrs.get("target")) in named and str(attrs.get("target"))}

    from ..graphs.torch_import import _make_tracer

    try:
        traced = _make_tracer(leaves, ()).trace(module)
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


def _export_spec(graph, groups, module):
    """`split_spec` for a ``torch.export`` graph: each stage's first node must begin a module
    (`cachefit.executor.boundaries.module_boundaries`); the key is that module's name."""
    from torch.distributed.pipelining import SplitPoint

    from .boundaries import module_boundaries

    boundaries = module_boundaries(graph)
    spec = {}
    for index, group in enumerate(groups[1:], start=1):
        node = group[0]
        if node not in boundaries:
            raise InputError(
                f"stage {index} cannot begin at node {node!r}: no module call begins there, and "
                "torch.distributed.pipelining splits a forward only where a submodule is called; plan the "
                "stages with cachefit.stages, which cuts only where a module begins")
        try:
            module.get_submodule(boundaries[node])
        except AttributeError:
            raise InputError(f"`plan` does not match `module`: it has no submodule {boundaries[node]!r} "
                             f"(stage {index}); plan the module's own from_torch graph") from None
        spec[boundaries[node]] = SplitPoint.BEGINNING
    return spec


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
    O(nodes) after the trace.  For a graph captured with ``torch.export``
    (node ids are module names) no trace is needed: a stage may begin where
    a module call begins (`cachefit.executor.boundaries`), and the key is the
    outermost module beginning there, e.g. ``model.layers.4``.

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

    graph = plan_graph(plan)
    groups = stage_groups(plan, graph)
    if not isinstance(module, nn.Module):
        raise InputError(f"`module` must be a torch.nn.Module, got {type(module).__name__}")
    spec = {}
    if isinstance(module, StepsModule):
        missing = [node for node in graph if node not in module._names]
        if missing or len(module.node_ids) != graph.number_of_nodes():
            raise InputError(f"`module` was not built from the plan's graph (node {missing[:1] or '?'} differs): "
                             "use pipeline_module(plan)")
        if module.inner is not None:  # partition-major inside the stages: cut at each stage's boundary module
            if len(module.boundaries) != len(groups) - 1:
                raise InputError(f"`module` runs {len(module.boundaries) + 1} partition-major stage(s), the plan "
                                 f"has {len(groups)}")
            return {f"boundaries.{index}": SplitPoint.BEGINNING for index in range(len(groups) - 1)}
        for group in groups[1:]:
            spec[module.qualified_name(group[0])] = SplitPoint.BEGINNING
        return spec
    if graph.graph.get("source") == "torch.export":
        return _export_spec(graph, groups, module)
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
