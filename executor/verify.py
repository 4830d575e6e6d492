"""What the executor verifies before it allocates anything: the plan, then each node's module bytes.

Execution starts with verification (`cachefit.executor.run`,
`cachefit.executor.run_pipeline`, ``cachefit run``, ``cachefit pipeline``):

1. `verify_plan`: `cachefit.check` recomputes the plan from its graph
   (coverage, order, sizes, capacity, chunk fraction); a plan it rejects is
   refused with its first violation.
2. `verify_module_bytes`: every node the executor would materialise is built
   on PyTorch's ``meta`` device (shapes only, no memory), and its parameter
   count × the graph dtype's bytes per element is compared with the node's
   planned ``weight_bytes``; a node whose shapes and byte counts disagree is
   refused, naming it and both byte counts.  A plan file edited to claim
   small weights for huge shapes is refused here, before a single weight is
   allocated.

Both raise `PlanRejected`, an `InputError` that ``cachefit run`` and
``cachefit pipeline`` turn into exit 1, as ``cachefit check`` does for a
plan with violations (a file that is not a plan at all is exit 2).
"""

from __future__ import annotations

import logging

from ..errors import InputError
from ..ties import without_table_copies
from ..units import DTYPE_BYTES
from .fingerprint import plan_graph

__all__ = ["PlanRejected", "plan_graph", "is_onnx_graph", "refuse_onnx", "verify_plan", "verify_module_bytes", "verify_execution",
           "module_weight_bytes"]

logger = logging.getLogger(__name__)


class PlanRejected(InputError):
    """A plan that `cachefit.check` rejects, or whose node modules disagree with its byte counts."""


def verify_plan(plan):
    """Refuse `plan` unless `cachefit.check` passes it.

    Raises
    ------
    PlanRejected
        ``"`plan` fails cachefit.check: <first violation> (and N more)"``.
    InputError
        `plan` is not a plan or carries no graph.

    Examples
    --------
    >>> import dataclasses, cachefit
    >>> plan = cachefit.plan(cachefit.graphs.from_layers([10, 20]), 40, solver="greedy")
    >>> verify_plan(dataclasses.replace(plan, capacity=-5))
    Traceback (most recent call last):
    ...
    cachefit.executor.verify.PlanRejected: `plan` fails cachefit.check: capacity -5 is not positive
    """
    from ..checker import check
    from ..result import Plan

    if not isinstance(plan, Plan):
        raise InputError(f"`plan` must be a cachefit.Plan, got {type(plan).__name__}")
    report = check(plan, plan_graph(plan))
    if not report.ok:
        more = len(report.violations) - 1
        raise PlanRejected(f"`plan` fails cachefit.check: {report.violations[0]}"
                           + (f" (and {more} more)" if more else ""))


class _MetaFactory:
    """A `ParamFactory` that draws nothing: every weight is an empty tensor on the meta device."""

    def __init__(self):
        import torch

        self.device = torch.device("meta")

    def normal(self, key, shape, std=1.0, mean=0.0):
        import torch

        return torch.empty(tuple(shape), dtype=torch.float32, device=self.device)


def module_weight_bytes(graph, element_bytes):
    """Per node, the parameter bytes of the module the executor would build, computed on the meta device.

    Parameters
    ----------
    graph : networkx.DiGraph
        A graph `cachefit.executor.build` materialises.
    element_bytes : int
        Bytes per parameter (the graph's dtype).

    Returns
    -------
    dict of str to int
        Node id -> parameters it owns × `element_bytes` (0 for a tied head,
        which borrows its embedding's table).

    Notes
    -----
    Nothing is allocated: modules are built on ``torch.device("meta")``.
    O(nodes).
    """
    import torch

    from .nodes import make_node_module

    meta = torch.device("meta")
    seq_len = int(graph.graph.get("seq_len") or 1)
    tiles = {}
    for node, attrs in graph.nodes(data=True):
        if attrs.get("tile") is not None and attrs.get("parent") is not None:
            tiles.setdefault(attrs["parent"], []).append(node)
    modules, result = {}, {}
    for node in graph:
        module = make_node_module(graph, node, seq_len=seq_len, factory=_MetaFactory(), dtype=torch.float32,
                                  device=meta, tiles=tiles, modules=modules)
        modules[node] = module
        owned = sum(parameter.numel() for parameter in module.parameters()) \
            if isinstance(module, torch.nn.Module) else 0
        result[node] = owned * element_bytes
    return result


def is_onnx_graph(graph):
    """Whether `graph` was imported from an ONNX model (``from_onnx``: nodes carry ``op_type``)."""
    return "dims" in graph.graph and any("op_type" in attrs for _, attrs in graph.nodes(data=True))


def refuse_onnx(graph):
    """Refuse an ONNX graph in one line: the executor runs PyTorch modules (see docs/executor.md)."""
    if is_onnx_graph(graph):
        raise InputError("the plan's graph was imported from ONNX, and cachefit.executor runs PyTorch modules "
                         "only: import the PyTorch model with cachefit.graphs.from_torch and run that plan "
                         "(cachefit.executor.run(plan, model=module, example_inputs=...))")


def verify_module_bytes(graph):
    """Refuse `graph` when a node's module would hold other than its planned ``weight_bytes``.

    Raises
    ------
    PlanRejected
        ``"node 'x': its module's parameters take 256000000000 B (shapes ×
        bf16), the plan counts 2048 B weight_bytes; ..."`` for the first such node.
    InputError
        The graph was imported from ONNX (`refuse_onnx`).

    Notes
    -----
    Graphs imported from a torch module (``source`` ``"torch.fx"`` or
    ``"torch.export"``) run with
    the user's own module and are not checked here; nor are graphs whose
    dtype has no fixed element size (the comparison needs one).
    """
    refuse_onnx(graph)
    if graph.graph.get("source") in ("torch.fx", "torch.export"):
        return
    dtype = str(graph.graph.get("dtype", "")).lower()
    if dtype not in DTYPE_BYTES:
        logger.info("module bytes not compared: the graph's dtype %r has no fixed element size", dtype)
        return
    # A table copy counted for a stage (cachefit.ties) is not built where the owner is in this graph.
    graph = without_table_copies(graph)
    built = module_weight_bytes(graph, DTYPE_BYTES[dtype])
    for node, module_bytes in built.items():
        planned = int(graph.nodes[node].get("weight_bytes", 0))
        if module_bytes != planned:
            raise PlanRejected(
                f"node {node!r}: its module's parameters take {module_bytes:,} B (shapes × {dtype}), the plan "
                f"counts {planned:,} B of weight_bytes; the node's shape attributes and byte counts disagree, "
                "so the plan's sizes are not the model's")


def verify_execution(plan):
    """Both checks, in order: `verify_plan`, then `verify_module_bytes` of the plan's graph.

    Raises
    ------
    PlanRejected
        The first check that fails, in one line.
    """
    verify_plan(plan)
    verify_module_bytes(plan_graph(plan))
