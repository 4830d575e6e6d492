"""Module-granularity graphs of a PyTorch module captured with `torch.export`.

`export_graph` exports the module (non-strict, so Python control flow on
shapes and configs, as in Hugging Face transformers, is simply run), then
groups the exported ATen nodes by the module that ran them, read from each
node's ``nn_module_stack``:

* a leaf module (one without child modules, or one named in
  ``leaf_modules``) is one graph node named by its qualified name
  (``model.layers.0.self_attn.q_proj``);
* the operations a parent module runs between its children (residual adds,
  the attention core, mask building) form one node per contiguous run, named
  by the parent's qualified name, ``#1``, ``#2``, ... for its later runs
  (``model.layers.0``, ``model.layers.0#1``); the top module's own runs are
  named ``root``.

Runs are contiguous slices of the exported (topological) order, so the
grouped graph is acyclic.  Shapes come from the export's fake tensors (no
real computation; a module built on the meta device imports), flops from
`torch.utils.flop_counter`'s per-operator formulas on those shapes.

torch is imported only inside the functions (the ``torch`` extra).
"""

from __future__ import annotations

import logging

import networkx as nx

from .torch_import import _tensors

__all__ = ["export_graph", "ExportFailed", "ATEN_VIEWS"]

logger = logging.getLogger(__name__)

#: ATen operators whose output shares its first argument's storage.
ATEN_VIEWS = frozenset({
    "view", "_unsafe_view", "t", "transpose", "permute", "expand", "slice", "select", "unsqueeze",
    "squeeze", "alias", "as_strided", "split", "split_with_sizes", "unbind", "chunk", "detach",
    "diagonal", "narrow", "unflatten", "view_as", "expand_as", "lift_fresh", "_reshape_alias",
    "movedim", "swapaxes", "tensor_split",
})

ROOT = "root"


class ExportFailed(Exception):
    """torch.export could not capture the module (the caller may fall back to torch.fx)."""


def _concrete(value):
    """An int from an int or a SymInt (its hint: the example input's size)."""
    import torch

    if isinstance(value, torch.SymInt):
        node = value.node
        hint = node.hint if node.hint is not None else node.shape_env.size_hint(node.expr)
        return int(hint)
    return int(value)


def _numel(tensor):
    count = 1
    for dim in tensor.shape:
        count *= _concrete(dim)
    return count


def _op_name(node):
    target = node.target
    name = getattr(target, "_opname", None) or getattr(target, "__name__", str(target))
    return str(name).split(".")[0]


def _sdpa_flops(query, key, value):
    """QKᵀ and AV of `scaled_dot_product_attention` (2 flops per multiply-add)."""
    rows = 1
    for dim in query.shape[:-2]:
        rows *= _concrete(dim)
    q_len, depth = _concrete(query.shape[-2]), _concrete(query.shape[-1])
    k_len, v_depth = _concrete(key.shape[-2]), _concrete(value.shape[-1])
    return 2 * rows * q_len * k_len * (depth + v_depth)


def _matmul_flops(node, args):
    """Flops of the composite ATen ops FlopCounterMode's registry leaves out (its formulas
    cover their decompositions: mm, addmm, bmm, convolution)."""
    import torch

    aten = torch.ops.aten
    packet = node.target.overloadpacket
    out = node.meta.get("val")
    if not isinstance(out, torch.Tensor):
        return 0
    if packet is aten.linear:
        return 2 * _numel(out) * _concrete(args[1].shape[-1])
    if packet is aten.matmul or "grouped_mm" in str(packet):
        # grouped_mm (transformers' mixture of experts): each row meets one expert's matrix
        return 2 * _numel(out) * _concrete(args[0].shape[-1])
    if packet in (aten.conv1d, aten.conv2d, aten.conv3d):
        weight = args[1]
        per_output = 1
        for dim in weight.shape[1:]:
            per_output *= _concrete(dim)  # in_channels / groups x kernel
        return 2 * _numel(out) * per_output
    if packet is aten.scaled_dot_product_attention:
        return _sdpa_flops(*args[:3])
    return 0


def node_flops(node):
    """Flops of one exported ATen node from its operands' fake shapes (0 when unknown)."""
    import torch
    from torch.utils._pytree import tree_map
    from torch.utils.flop_counter import flop_registry

    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return 0

    def value(arg):
        return arg.meta.get("val") if isinstance(arg, torch.fx.Node) else arg

    args, kwargs = tree_map(value, (node.args, node.kwargs))
    packet = target.overloadpacket
    try:
        if packet in flop_registry:
            return _concrete(flop_registry[packet](*args, **kwargs, out_val=node.meta.get("val")))
        return _matmul_flops(node, args)
    except Exception as exc:  # noqa: BLE001 - a formula that does not fit these operands
        logger.debug("no flops for %s: %s: %s", node.name, type(exc).__name__, exc)
    return 0


def _export(module, example_inputs, dynamic_shapes):
    import torch

    try:
        return torch.export.export(module, example_inputs, dynamic_shapes=dynamic_shapes,
                                   strict=False)
    except Exception as exc:  # noqa: BLE001 - export raises many kinds
        raise ExportFailed(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") \
            from exc


def _group_key(node, leaf_of):
    """The qualified name of the module whose node `node` becomes (see the module docstring)."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = [path for path, _ in stack.values()]
    for path in paths:  # outermost first: a named leaf swallows its children
        if leaf_of(path):
            return path
    return paths[-1] if paths else ""


def _runs(ep, leaf_of):
    """fx node -> graph node name, for every call_function node that outputs a tensor."""
    group, seen, previous = {}, {}, None
    for node in ep.graph.nodes:
        if node.op != "call_function" or not _tensors(node.meta.get("val")):
            continue
        key = _group_key(node, leaf_of)
        if key != previous:
            seen[key] = seen.get(key, -1) + 1
            previous = key
        base = key or ROOT
        group[node] = base if seen[key] == 0 else f"{base}#{seen[key]}"
    return group


class _Weights:
    """Parameters, buffers and constants, each counted once on the first node that reads it."""

    def __init__(self, module, ep, tensor_bytes):
        import torch

        from torch.export.graph_signature import InputKind

        by_name = dict(module.named_parameters(remove_duplicate=False))
        by_name.update(module.named_buffers(remove_duplicate=False))
        self.tensor_bytes = tensor_bytes
        self.refs = {}  # placeholder name -> (qualified name, tensor, is a parameter)
        for spec in ep.graph_signature.input_specs:
            if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
                tensor = by_name.get(spec.target)
                if tensor is None:
                    tensor = ep.constants.get(spec.target, ep.state_dict.get(spec.target))
                if isinstance(tensor, torch.Tensor):
                    self.refs[spec.arg.name] = (spec.target, tensor,
                                                spec.kind == InputKind.PARAMETER)
        self.owner, self.users, self.names, self.dtypes = {}, {}, {}, {}

    def charge(self, graph_node, placeholder):
        """Count `placeholder`'s tensor on `graph_node` unless owned; (params, bytes, owner)."""
        qualified, tensor, is_param = self.refs[placeholder]
        key = id(tensor)
        if key in self.owner:
            if self.owner[key] != graph_node:
                self.users[key].add(graph_node)
                return 0, 0, self.owner[key]
            return 0, 0, None
        self.owner[key], self.users[key], self.names[key] = graph_node, {graph_node}, qualified
        if tensor.is_floating_point():
            self.dtypes[tensor.dtype] = self.dtypes.get(tensor.dtype, 0) + tensor.numel()
        return (tensor.numel() if is_param else 0), self.tensor_bytes(tensor), None

    def shared(self):
        return sorted(self.names[key] for key, users in self.users.items() if len(users) > 1)


def _leaf_test(module, leaf_names, leaf_types):
    cache = {}

    def leaf_of(path):
        if path not in cache:
            cache[path] = bool(path) and (path in leaf_names or (
                bool(leaf_types) and isinstance(module.get_submodule(path), leaf_types)))
        return cache[path]

    return leaf_of


def _module_attrs(module, path):
    """op, module type and the shape keys `tile` needs, for a node standing for submodule `path`."""
    import torch

    if path in ("", ROOT):
        return {"op": "function", "module_type": type(module).__name__}
    base = path.split("#")[0]
    try:
        sub = module.get_submodule(base)
    except AttributeError:
        return {"op": "function"}
    attrs = {"module_type": type(sub).__name__, "target": base}
    if "#" in path or any(True for _ in sub.children()):
        attrs["op"] = "function"  # a parent's own operations between its children
        return attrs
    if isinstance(sub, torch.nn.Linear):
        attrs.update(op="linear", in_features=sub.in_features, out_features=sub.out_features,
                     bias=sub.bias is not None)
    elif isinstance(sub, torch.nn.Embedding):
        attrs.update(op="embedding", num_embeddings=sub.num_embeddings,
                     embedding_dim=sub.embedding_dim)
    elif isinstance(sub, torch.nn.modules.conv._ConvNd):
        attrs.update(op="conv", in_features=sub.in_channels, out_features=sub.out_channels,
                     bias=sub.bias is not None, kernel_size=list(sub.kernel_size),
                     groups=sub.groups)
    else:
        attrs["op"] = type(sub).__name__.lower()
    return attrs


def _is_alias(node):
    """Whether `node`'s output shares its first argument's storage."""
    import torch

    name = _op_name(node)
    if name in ATEN_VIEWS:
        return True
    first = node.args[0] if node.args else None
    if name not in ("to", "contiguous", "type_as") or not isinstance(first, torch.fx.Node):
        return False
    before, after = first.meta.get("val"), node.meta.get("val")
    # `to` and `contiguous` return their input itself when nothing changes.
    return (isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor)
            and before.dtype == after.dtype and before.device == after.device
            and before.shape == after.shape and before.stride() == after.stride())


def _bases(ep, group):
    """fx node -> the fx node whose storage it shares (itself unless an alias)."""
    base = {}
    for node in ep.graph.nodes:
        first = node.args[0] if node.args else None
        if node in group and first in base and _is_alias(node):
            base[node] = base[first]
        elif node in group or node.op == "placeholder":
            base[node] = node
    return base


def export_graph(module, example_inputs, *, tensor_bytes, dtype_name, leaf_names=(),
                 leaf_types=(), dynamic_shapes=None):
    """The module-granularity graph of `module` (see the module docstring).

    Parameters
    ----------
    module : torch.nn.Module
    example_inputs : tuple
        The forward's positional inputs.
    tensor_bytes : callable
        Bytes a tensor is charged (the caller's dtype override applied).
    dtype_name : callable
        torch dtype -> cachefit dtype name.
    leaf_names, leaf_types : collection
        Submodule names and classes kept as one node.
    dynamic_shapes : optional
        Passed to `torch.export.export` (``torch.export.Dim`` per input
        dimension); sizes are taken at the example inputs.

    Returns
    -------
    networkx.DiGraph
        Not yet validated.

    Raises
    ------
    ExportFailed
        torch.export could not capture the module.
    """
    from .torch_import_hf import annotate_attention

    ep = _export(module, example_inputs, dynamic_shapes)
    group = _runs(ep, _leaf_test(module, set(leaf_names), tuple(leaf_types)))
    weights = _Weights(module, ep, tensor_bytes)
    user_inputs = {spec.arg.name for spec in ep.graph_signature.input_specs
                   if spec.kind.name == "USER_INPUT"}
    graph = nx.DiGraph(name=type(module).__name__, source="torch.export",
                       shape_propagation="fake", capture="export")
    for node in ep.graph.nodes:
        tensors = _tensors(node.meta.get("val"))
        if node.op == "placeholder" and node.name in user_inputs and tensors:
            group[node] = node.name
            graph.add_node(node.name, op="input", target=node.name, params=0, weight_bytes=0,
                           activation_bytes=sum(tensor_bytes(t) for t in tensors),
                           buffer_bytes=0, flops=0, **_shape(tensors, node, dtype_name))
    base = _bases(ep, group)
    _add_groups(graph, ep, group, base, weights, module, tensor_bytes, dtype_name)
    _charge_unread(graph, weights)
    annotate_attention(graph, ep, group, module, tensor_bytes)  # K/V per token of recognised HF attention
    graph.graph.update(params=sum(d["params"] for _, d in graph.nodes(data=True)),
                       shared=weights.shared(),
                       dtype=(dtype_name(max(weights.dtypes, key=weights.dtypes.get))
                              if weights.dtypes else None))
    dims = _dynamic_dims(ep, dynamic_shapes, example_inputs)
    if dims:
        graph.graph["dynamic_dims"] = dims
    return graph


def _charge_unread(graph, weights):
    """State a module holds but its forward never reads (BatchNorm's ``num_batches_tracked``
    in eval mode) is charged to that module's node, when the module ran."""
    modules = {data["module"]: node for node, data in graph.nodes(data=True)
               if "module" in data and "#" not in node}
    for placeholder, (qualified, _, _) in weights.refs.items():
        parts = qualified.split(".")
        owner = next((modules[".".join(parts[:cut])] for cut in range(len(parts) - 1, 0, -1)
                      if ".".join(parts[:cut]) in modules), None)
        if owner is None:
            continue
        params, owned, _ = weights.charge(owner, placeholder)
        graph.nodes[owner]["params"] += params
        graph.nodes[owner]["weight_bytes"] += owned


def _shape(tensors, node, dtype_name):
    import torch

    value = node.meta.get("val")
    if len(tensors) == 1 and isinstance(value, torch.Tensor):
        return {"shape": [_concrete(d) for d in value.shape], "dtype": dtype_name(value.dtype)}
    return {}


def _dynamic_dims(ep, dynamic_shapes, example_inputs):
    """Dimension name -> its size at the example inputs, for dimensions exported as dynamic.

    Names are the ``torch.export.Dim`` names when `dynamic_shapes` is a
    tuple aligned with the inputs, else the export's symbols (``s0``, ...).
    """
    import torch

    dims = {}
    if isinstance(dynamic_shapes, (tuple, list)):
        for spec, value in zip(dynamic_shapes, example_inputs):
            if isinstance(spec, dict) and isinstance(value, torch.Tensor):
                for axis, dim in spec.items():
                    if dim is not None and hasattr(dim, "__name__"):
                        dims[dim.__name__] = int(value.shape[axis])
        if dims:
            return dims
    for node in ep.graph.nodes:
        if node.op != "placeholder":
            continue
        for tensor in _tensors(node.meta.get("val")):
            for dim in tensor.shape:
                if isinstance(dim, torch.SymInt):
                    dims[str(dim.node.expr)] = _concrete(dim)
    return dims


def _add_groups(graph, ep, group, base, weights, module, tensor_bytes, dtype_name):
    """Add one graph node per group with its bytes, flops and edges (in execution order)."""
    members = {}
    for node, name in group.items():
        members.setdefault(name, []).append(node)
    for name, nodes in members.items():
        if name in graph:
            continue  # an input node
        inside = set(nodes)
        params = owned = flops = workspace = 0
        tied, edges = [], set()
        outputs = []
        for node in nodes:
            flops += node_flops(node)
            for arg in node.all_input_nodes:
                if arg.name in weights.refs:
                    p, b, owner = weights.charge(name, arg.name)
                    params, owned = params + p, owned + b
                    if owner is not None and owner not in tied:
                        tied.append(owner)
                elif arg in group and group[arg] != name:
                    edges.add(group[arg])
                    if base.get(arg) in group and group[base[arg]] != name:
                        edges.add(group[base[arg]])  # keep a viewed tensor live while used
            if any((user in group and user not in inside) or user.op == "output"
                   for user in node.users):
                outputs.append(node)
        kept = {base[node] for node in outputs if group.get(base[node]) == name}
        activation = sum(tensor_bytes(t) for node in kept
                         for t in _tensors(node.meta.get("val")))
        for node in nodes:  # the largest temporary: a lower bound on the run's workspace
            if node not in kept and base.get(node) is node:
                workspace = max(workspace, sum(tensor_bytes(t)
                                               for t in _tensors(node.meta.get("val"))))
        attrs = dict(_module_attrs(module, name), params=params, weight_bytes=owned,
                     activation_bytes=activation, buffer_bytes=workspace, flops=flops,
                     module=name.split("#")[0] or ROOT)
        last = [node for node in outputs if node.op == "call_function"]
        if len(last) == 1:
            attrs.update(_shape(_tensors(last[0].meta.get("val")), last[0], dtype_name))
        if tied:
            attrs["tied_to"] = tied[0] if len(tied) == 1 else tied
        graph.add_node(name, **attrs)
        graph.add_edges_from((source, name) for source in sorted(edges))
