"""`from_torch`: a model graph from a PyTorch module, captured with torch.fx or torch.export.

torch.fx path: the module is traced symbolically (`torch.fx.Tracer`), then
the shapes of every value are propagated with fake tensors
(`FakeTensorMode`: tensors that carry shape and dtype on the meta device and
never allocate real storage), so even a model too large for the host's
memory can be imported when built on the meta device.  Each fx node that
computes a tensor becomes a graph node named like the fx node; parameters
are charged to the first node that uses them; the data flow gives the edges.

torch.export path (transformers' models, which fx cannot trace): see
`cachefit.graphs.torch_export`, one node per leaf module; recognised
attention modules carry their K/V per token (`cachefit.graphs.torch_import_hf`).

torch is imported only inside the functions (the ``torch`` extra).
"""

from __future__ import annotations

import logging
import operator

import networkx as nx

from ..errors import InputError
from ..units import dtype_bytes
from ..validation import validate

__all__ = ["from_torch", "VIEW_OPS", "CAPTURES"]

logger = logging.getLogger(__name__)

#: Methods and functions whose output is a view of their first argument
#: (shares its storage): they become nodes of 0 activation bytes whose
#: consumers also keep the viewed tensor live.  ``reshape``, ``flatten`` and
#: ``contiguous`` may copy, so they are counted as new tensors (conservative).
VIEW_OPS = frozenset({
    "view", "view_as", "transpose", "permute", "t", "unsqueeze", "squeeze", "expand",
    "expand_as", "unflatten", "narrow", "select", "detach", "chunk", "split", "unbind",
    "movedim", "swapaxes", "diagonal", "as_strided", "tensor_split",
})

#: The accepted `capture` values of `from_torch`.
CAPTURES = ("auto", "fx", "export")

_TORCH_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "int8": "int8",
                      "float8_e4m3fn": "fp8", "float8_e5m2": "fp8"}


def _target_name(node):
    target = node.target
    if isinstance(target, str):
        return target
    return getattr(target, "__name__", None) or str(target)


def _fetch(root, dotted):
    value = root
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _make_tracer(leaf_names, leaf_types):
    import torch.fx

    class _Tracer(torch.fx.Tracer):
        """A tracer that honours `leaf_modules` and remembers which submodule failed."""

        def __init__(self):
            super().__init__()
            self.failed = None

        def is_leaf_module(self, m, module_qualified_name):
            if module_qualified_name in leaf_names or (leaf_types and isinstance(m, leaf_types)):
                return True
            return super().is_leaf_module(m, module_qualified_name)

        def call_module(self, m, forward, args, kwargs):
            path = self.path_of_module(m)
            try:
                return super().call_module(m, forward, args, kwargs)
            except Exception:
                if self.failed is None:  # the innermost module sees the error first
                    self.failed = (path, type(m).__name__)
                raise

    return _Tracer()


def _record_values(graph_module, example_inputs):
    """(fx node name -> the value it computes, "fake" or "real", fx node name -> flops).

    Values are fake tensors where possible; flops are what
    `torch.utils.flop_counter.FlopCounterMode` counts while each node runs.
    """
    import torch
    import torch.fx
    from torch.utils.flop_counter import FlopCounterMode

    class _Recorder(torch.fx.Interpreter):
        def __init__(self, module, mode):
            super().__init__(module)
            self.mode = mode
            self.values, self.flops = {}, {}

        def run_node(self, node):
            counter = FlopCounterMode(display=False)
            if self.mode is None:
                with counter:
                    result = super().run_node(node)
            else:
                with self.mode, counter:
                    result = super().run_node(node)
            self.values[node.name] = result
            self.flops[node.name] = int(counter.get_total_flops())
            return result

    try:
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode(allow_non_fake_inputs=True)
        fake_inputs = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs]
        recorder = _Recorder(graph_module, mode)
        recorder.run(*fake_inputs)
        return recorder.values, "fake", recorder.flops
    except Exception as exc:  # an op without a fake kernel, or data-dependent control flow
        logger.info("from_torch: fake-tensor shape propagation failed (%s: %s); running the example "
                    "inputs for real", type(exc).__name__, exc)
    recorder = _Recorder(graph_module, None)
    try:
        with torch.no_grad():
            recorder.run(*example_inputs)
    except Exception as exc:
        failing = next(reversed(recorder.values), None)
        raise InputError(f"`example_inputs` could not be run through the traced module (after fx node "
                         f"{failing!r}): {type(exc).__name__}: {exc}") from exc
    return recorder.values, "real", recorder.flops


def _tensors(value):
    import torch
    from torch.utils._pytree import tree_leaves

    return [leaf for leaf in tree_leaves(value) if isinstance(leaf, torch.Tensor)]


def _dtype_name(torch_dtype):
    name = str(torch_dtype).replace("torch.", "")
    return _TORCH_DTYPE_NAMES.get(name, name)


def from_torch(module, example_inputs, *, dtype=None, leaf_modules=(), capture="auto",
               dynamic_shapes=None):
    """The graph of a PyTorch module, captured with torch.fx or torch.export.

    Parameters
    ----------
    module : torch.nn.Module
        The model; not modified.  Build it on the meta device
        (``with torch.device("meta"): ...``) to import a model larger than
        the host's memory.
    example_inputs : torch.Tensor or tuple
        The positional inputs of ``module.forward`` (real or meta tensors);
        they fix the activation shapes, batch included.
    dtype : str, optional
        bf16, fp16, fp32, fp8 or int8: the element size of every
        floating-point parameter and activation (integer tensors keep
        theirs).  Default: each tensor's own dtype.
    leaf_modules : iterable of str or type
        Submodules (qualified names such as ``"encoder.layer.3"``, or
        module classes) to keep as one opaque node instead of tracing into
        them: the way around code torch.fx cannot trace.
    capture : {"auto", "fx", "export"}
        ``"fx"``: torch.fx symbolic tracing, one node per fx node.
        ``"export"``: `torch.export` (non-strict), one node per leaf module
        named by its qualified name (`cachefit.graphs.torch_export`).
        ``"auto"`` (default): fx when it traces the module, else export (see
        Notes); export straight away when `dynamic_shapes` is given.
    dynamic_shapes : optional
        ``torch.export.Dim`` per input dimension, as `torch.export.export`
        takes them (export capture only); sizes are taken at the example
        inputs and the symbols listed in graph attribute ``dynamic_dims``.

    Returns
    -------
    networkx.DiGraph
        One node per fx node that computes a tensor or uses parameters
        (``call_module``, ``call_function``, ``call_method``) and one
        ``op="input"`` node per input tensor, named like the fx nodes, in
        execution order.  Node attributes: the byte counts, ``op``
        (``linear``, ``embedding``, ``conv``, else the module class or
        function name in lower case), ``target``, ``params`` (parameters it
        owns), ``shape`` and ``dtype`` of a single-tensor output; for linear,
        embedding and convolution the shape keys ``in_features``,
        ``out_features``, ``bias`` (``num_embeddings``, ``embedding_dim``;
        ``kernel_size``, ``groups``) that `cachefit.graphs.tile` needs;
        ``tied_to`` on a node whose parameters another node already owns;
        ``alias_of`` on a view; ``flops`` (FlopCounterMode's count of the
        node's operators on fake tensors).  Graph attributes ``name``,
        ``source`` (``"torch.fx"`` or ``"torch.export"``), ``capture``,
        ``dtype``, ``params``, ``shared`` (names of the parameters used by
        more than one node) and ``shape_propagation`` (``"fake"`` or
        ``"real"``).  Export graphs: see `cachefit.graphs.torch_export`
        (node attributes ``module``, ``module_type``, ``buffer_bytes`` = the
        largest temporary of the node's operators); a recognised Hugging
        Face attention's node also carries ``kv_bytes_per_token`` (and
        ``sliding_window`` on a local layer), and then a model whose input
        is token ids has graph attributes ``batch`` and ``seq_len``
        (`cachefit.graphs.torch_import_hf`).

    Raises
    ------
    InputError
        `module` is not an ``nn.Module``; torch.fx cannot trace it (the
        message names the innermost failing submodule and suggests
        ``leaf_modules``); the example inputs do not run; or a bad `dtype`
        or `leaf_modules` entry.

    Notes
    -----
    Weights: a node owns the parameters and buffers of its submodule
    (``call_module``) and those it reads through ``get_attr``; a tensor
    used by several nodes (tied embeddings) is counted once, on its first
    user in execution order, and later users name that node in
    ``tied_to``.  Parameters the forward never touches are not counted.

    Activations: the bytes of every tensor a node outputs.  A view (an op in
    `VIEW_OPS`, or ``getitem`` on a tuple) shares its input's storage, so it
    gets 0 bytes and its consumers get an edge from the viewed node as well,
    which keeps that tensor live as long as the view is used.  Ops that may
    copy (``reshape``, ``flatten``, indexing) count their output in full.

    Shapes come from fake tensors (no real computation); when an op has no
    fake kernel or a leaf module branches on tensor values, the example
    inputs are run for real instead (``shape_propagation="real"``).

    Which capture: measured on transformers 5.24 / torch 2.13 (GPT-2,
    Llama, BERT, Qwen2, Mixtral with small configs and ``use_cache=False``),
    a ResNet-style CNN and plain modules (``tests/test_torch_import.py``):
    torch.fx fails on every transformers model (control flow on proxies),
    torch.export captures all of them and the CNN and the plain modules;
    fx alone handles a forward that branches on tensor *values* (export
    refuses data-dependent control flow) when the branch sits in a
    ``leaf_modules`` entry.  ``"auto"`` tries fx first because the executor
    (``cachefit.executor``) runs plans by fx node names; models fx cannot
    trace get export graphs, whose node names are module FQNs
    (``model.layers.4``) as pipelining needs.

    Complexity: one trace and one propagation, O(fx nodes + edges).

    Examples
    --------
    >>> import torch
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> G = from_torch(mlp, torch.zeros(2, 8))
    >>> list(G)
    ['input_1', '_0', '_1', '_2']
    >>> G.nodes["_0"]["weight_bytes"], G.nodes["_0"]["activation_bytes"], G.nodes["_0"]["out_features"]
    (576, 128, 16)
    """
    import torch

    if not isinstance(module, torch.nn.Module):
        raise InputError(f"`module` must be a torch.nn.Module, got {type(module).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    elif isinstance(example_inputs, list):
        example_inputs = tuple(example_inputs)
    if not isinstance(example_inputs, tuple):
        raise InputError(f"`example_inputs` must be a tensor or a tuple of the forward's positional "
                         f"inputs, got {type(example_inputs).__name__}")
    if capture not in CAPTURES:
        raise InputError(f"`capture` must be one of {', '.join(map(repr, CAPTURES))}, got {capture!r}")
    if dynamic_shapes is not None and capture == "fx":
        raise InputError("`dynamic_shapes` needs `capture` 'export' or 'auto' (torch.fx does not take them)")
    override = None if dtype is None else dtype_bytes(dtype)
    leaf_names, leaf_types = _leaf_modules(module, leaf_modules)

    tensor_bytes = _tensor_size(override)
    fx_error = None
    if capture == "fx" or (capture == "auto" and dynamic_shapes is None):
        try:
            graph = _fx_graph(module, example_inputs, leaf_names, leaf_types, tensor_bytes)
        except _TraceFailed as exc:
            if capture == "fx":
                raise InputError(str(exc)) from exc.__cause__
            fx_error = exc
            logger.info("from_torch: torch.fx cannot trace %s (%s); capturing with torch.export",
                        type(module).__name__, exc)
        else:
            return _finish(graph, dtype)
    from .torch_export import ExportFailed, export_graph

    try:
        graph = export_graph(module, example_inputs, tensor_bytes=tensor_bytes,
                             dtype_name=_dtype_name, leaf_names=leaf_names, leaf_types=leaf_types,
                             dynamic_shapes=dynamic_shapes)
    except ExportFailed as exc:
        also = f"; torch.fx failed too: {fx_error}" if fx_error is not None else ""
        raise InputError(f"`module` cannot be captured by torch.export: {exc}{also}") from exc.__cause__
    return _finish(graph, dtype)


def _tensor_size(override):
    """Bytes a tensor is charged: `override` per floating-point element, else its own size."""
    from .torch_export import _numel

    def tensor_bytes(tensor):
        size = override if (override is not None and tensor.is_floating_point()) else tensor.element_size()
        return _numel(tensor) * size

    return tensor_bytes


def _finish(graph, dtype):
    if dtype is not None:
        graph.graph["dtype"] = dtype.lower()
    logger.debug("from_torch: %d nodes, %d edges, %d shared tensors (%s)", graph.number_of_nodes(),
                 graph.number_of_edges(), len(graph.graph["shared"]), graph.graph["source"])
    return validate(graph)


def _leaf_modules(module, leaf_modules):
    """(names, classes) from the `leaf_modules` argument, checked."""
    import torch

    if isinstance(leaf_modules, (str, type)):
        leaf_modules = (leaf_modules,)
    leaf_names, leaf_types = set(), []
    known = dict(module.named_modules())
    for entry in leaf_modules:
        if isinstance(entry, str):
            if entry not in known:
                raise InputError(f"`leaf_modules` entry {entry!r} is not a submodule of `module`")
            leaf_names.add(entry)
        elif isinstance(entry, type) and issubclass(entry, torch.nn.Module):
            leaf_types.append(entry)
        else:
            raise InputError(f"`leaf_modules` entries must be submodule names or nn.Module classes, "
                             f"got {entry!r}")
    return leaf_names, tuple(leaf_types)


class _TraceFailed(Exception):
    """torch.fx could not trace the module; the message says where and what to do."""


def _trace(module, leaf_names, leaf_types):
    import torch.fx

    tracer = _make_tracer(leaf_names, leaf_types)
    try:
        fx_graph = tracer.trace(module)
    except Exception as exc:
        if tracer.failed is not None:
            path, kind = tracer.failed
            raise _TraceFailed(
                f"`module` cannot be traced by torch.fx: submodule {path!r} ({kind}) failed: "
                f"{type(exc).__name__}: {exc}. Keep it as one opaque node: "
                f"from_torch(..., leaf_modules=[{path!r}])") from exc
        raise _TraceFailed(
            f"`module` cannot be traced by torch.fx: the forward of {type(module).__name__} itself failed: "
            f"{type(exc).__name__}: {exc}. Move the untraceable code into a submodule and name it in "
            "`leaf_modules`") from exc
    return fx_graph, torch.fx.GraphModule(tracer.root, fx_graph)


def _fx_graph(module, example_inputs, leaf_names, leaf_types, tensor_bytes):
    """The fx-granularity graph (not yet validated); _TraceFailed when fx cannot trace."""
    import torch

    fx_graph, graph_module = _trace(module, leaf_names, leaf_types)
    values, propagation, flops = _record_values(graph_module, example_inputs)
    graph = nx.DiGraph(name=type(module).__name__, source="torch.fx", shape_propagation=propagation,
                       capture="fx")
    kind = {}             # fx name -> "node", "alias", "weight" or "skip"
    bases = {}            # alias fx name -> graph nodes it views
    weight_refs = {}      # weight-kind fx name -> [(qualified name, tensor)]
    owners = _Owners(tensor_bytes)

    def sources(fx_node):
        """Graph nodes a consumer of `fx_node` must link from (empty for weights and non-tensors)."""
        if kind.get(fx_node.name) == "node":
            return [fx_node.name]
        if kind.get(fx_node.name) == "alias":
            return [fx_node.name, *bases[fx_node.name]]
        return []

    for fx_node in fx_graph.nodes:
        name, value = fx_node.name, values.get(fx_node.name)
        if fx_node.op == "output":
            continue
        if fx_node.op == "get_attr":
            attribute = _fetch(graph_module, fx_node.target)
            if isinstance(attribute, torch.Tensor):
                kind[name] = "weight"
                weight_refs[name] = [(fx_node.target, attribute)]
            else:
                kind[name] = "skip"
            continue
        tensors = _tensors(value)
        inputs = fx_node.all_input_nodes
        if fx_node.op == "placeholder":
            if not tensors:
                kind[name] = "skip"
                continue
            kind[name] = "node"
            graph.add_node(name, op="input", target=str(fx_node.target), params=0, weight_bytes=0,
                           activation_bytes=sum(tensor_bytes(t) for t in tensors), buffer_bytes=0,
                           flops=0, **_shape_attrs(tensors, value))
            continue

        target = _target_name(fx_node)
        first = fx_node.args[0] if fx_node.args and isinstance(fx_node.args[0], torch.fx.Node) else None
        is_view = (target in VIEW_OPS and fx_node.op in ("call_method", "call_function")) or (
            target == "getitem" and fx_node.target is operator.getitem and first is not None
            and not isinstance(values.get(first.name), torch.Tensor))
        if is_view and first is not None and kind.get(first.name) == "weight":
            kind[name] = "weight"  # a view of a parameter (e.g. weight.t()) is still that parameter
            weight_refs[name] = list(weight_refs[first.name])
            continue

        refs = _weight_refs(fx_node, graph_module, weight_refs)
        if not tensors and not refs:
            kind[name] = "skip"
            continue
        owned_bytes, owned_params, tied = owners.charge(name, refs)
        attrs = {"op": _op_name(fx_node, graph_module, target), "target": target,
                 "params": owned_params, "weight_bytes": owned_bytes,
                 "activation_bytes": 0 if is_view else sum(tensor_bytes(t) for t in tensors),
                 "buffer_bytes": 0, "flops": flops.get(name, 0)}
        attrs.update(_shape_attrs(tensors, value))
        attrs.update(_layer_attrs(fx_node, graph_module, refs))
        if tied:
            attrs["tied_to"] = tied[0] if len(tied) == 1 else tied
        kind[name] = "alias" if is_view else "node"
        if is_view:
            # The stored tensors this view shares: its input's, through chains of views.
            bases[name] = ([] if first is None else [first.name] if kind.get(first.name) == "node"
                           else list(bases.get(first.name, [])))
            attrs["alias_of"] = list(bases[name])
        graph.add_node(name, **attrs)
        for source in inputs:
            for producer in sources(source):
                graph.add_edge(producer, name)

    graph.graph.update(
        dtype=_dtype_name(max(owners.dtypes, key=owners.dtypes.get)) if owners.dtypes else None,
        params=sum(data["params"] for _, data in graph.nodes(data=True)),
        shared=owners.shared())
    return graph


def _weight_refs(fx_node, graph_module, weight_refs):
    """(qualified name, tensor) this node reads as weights: its submodule's, and get_attr inputs."""
    refs = []
    if fx_node.op == "call_module":
        submodule = graph_module.get_submodule(fx_node.target)
        refs += [(f"{fx_node.target}.{key}", t) for key, t in submodule.named_parameters()]
        refs += [(f"{fx_node.target}.{key}", t) for key, t in submodule.named_buffers()]
    for source in fx_node.all_input_nodes:
        refs += weight_refs.get(source.name, [])
    return refs


class _Owners:
    """Each weight tensor counted once, on the first node that reads it; later readers are tied."""

    def __init__(self, tensor_bytes):
        self.tensor_bytes = tensor_bytes
        self.owner, self.users, self.names, self.dtypes = {}, {}, {}, {}

    def charge(self, name, refs):
        """(bytes, params, tied-to nodes) that node `name` owns among `refs`."""
        import torch

        owned_bytes, owned_params, tied = 0, 0, []
        for qualified, tensor in refs:
            key = id(tensor)
            if key in self.owner:
                if self.owner[key] != name and self.owner[key] not in tied:
                    tied.append(self.owner[key])
                self.users[key] += self.owner[key] != name
                continue
            self.owner[key], self.users[key], self.names[key] = name, 1, qualified
            owned_bytes += self.tensor_bytes(tensor)
            if isinstance(tensor, torch.nn.Parameter):
                owned_params += tensor.numel()
            if tensor.is_floating_point():
                self.dtypes[tensor.dtype] = self.dtypes.get(tensor.dtype, 0) + tensor.numel()
        return owned_bytes, owned_params, tied

    def shared(self):
        return sorted(self.names[key] for key, count in self.users.items() if count > 1)


def _shape_attrs(tensors, value):
    import torch

    if len(tensors) == 1 and isinstance(value, torch.Tensor):
        return {"shape": [int(d) for d in value.shape], "dtype": _dtype_name(value.dtype)}
    return {}


def _op_name(fx_node, graph_module, target):
    import torch
    import torch.nn.functional as F

    if fx_node.op == "call_module":
        submodule = graph_module.get_submodule(fx_node.target)
        if isinstance(submodule, torch.nn.Linear):
            return "linear"
        if isinstance(submodule, torch.nn.Embedding):
            return "embedding"
        if isinstance(submodule, torch.nn.modules.conv._ConvNd):
            return "conv"
        return type(submodule).__name__.lower()
    if fx_node.op == "call_function":
        if fx_node.target is F.linear:
            return "linear"
        if fx_node.target is F.embedding:
            return "embedding"
        if fx_node.target in (F.conv1d, F.conv2d, F.conv3d):
            return "conv"
        if fx_node.target in (operator.add, torch.add, operator.iadd):
            return "add"
    return str(target).lower()


def _layer_attrs(fx_node, graph_module, refs):
    """The shape keys `tile` and an executor need, for linear, embedding and convolution."""
    import torch
    import torch.nn.functional as F

    if fx_node.op == "call_module":
        m = graph_module.get_submodule(fx_node.target)
        if isinstance(m, torch.nn.Linear):
            return {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None}
        if isinstance(m, torch.nn.Embedding):
            return {"num_embeddings": m.num_embeddings, "embedding_dim": m.embedding_dim}
        if isinstance(m, torch.nn.modules.conv._ConvNd):
            return {"in_features": m.in_channels, "out_features": m.out_channels, "bias": m.bias is not None,
                    "kernel_size": list(m.kernel_size), "groups": m.groups}
        return {}
    if fx_node.op != "call_function" or not refs:
        return {}
    weight = refs[0][1]
    if fx_node.target is F.linear and weight.dim() == 2:
        has_bias = (len(fx_node.args) > 2 and fx_node.args[2] is not None) or \
            fx_node.kwargs.get("bias") is not None
        return {"in_features": int(weight.shape[1]), "out_features": int(weight.shape[0]), "bias": has_bias}
    if fx_node.target is F.embedding and weight.dim() == 2:
        return {"num_embeddings": int(weight.shape[0]), "embedding_dim": int(weight.shape[1])}
    if fx_node.target in (F.conv1d, F.conv2d, F.conv3d):
        has_bias = (len(fx_node.args) > 2 and fx_node.args[2] is not None) or \
            fx_node.kwargs.get("bias") is not None
        return {"in_features": int(weight.shape[1]), "out_features": int(weight.shape[0]), "bias": has_bias}
    return {}
