"""Run the user's own torch module along a plan made over its torch.fx graph (imports torch).

`build_fx` traces the module with ``torch.fx.symbolic_trace`` and turns every
fx node into a `Step` that calls what the node calls (the submodule, the
function or the method, with the node's own argument structure).  Plan nodes
are matched to fx nodes by name (a plan node id is the fx node's name, or the
node carries ``fx_name`` / ``target`` naming it).  fx nodes the plan does not
name (getattr, size, view, ...) join the group of their latest input; a
``get_attr`` node (a parameter used through a function) joins the group of its
first user, so its weight is packed with that group's.

The module is deep-copied before it is moved to the device (the caller's
module is never modified).  Chunks split every input along dimension 0
(samples); ``tokens_per_row`` is the graph's ``seq_len`` (1 when absent).
"""

from __future__ import annotations

import copy

import torch
import torch.fx
from torch import nn

from ..errors import InputError
from .fingerprint import graph_fingerprint
from .model import BuiltModel, Step, torch_dtype

__all__ = ["build_fx", "FxCall", "Concat"]


class FxCall(nn.Module):
    """Calls one fx node's target with its argument structure, the input values substituted."""

    def __init__(self, node, root, input_names):
        super().__init__()
        self.op, self.target = node.op, node.target
        self.args_template, self.kwargs_template = node.args, node.kwargs
        self.input_names = tuple(input_names)
        self.call = None
        if node.op == "call_module":
            self.call = root.get_submodule(node.target)
        elif node.op == "get_attr":
            value = root
            for part in str(node.target).split("."):
                value = getattr(value, part)
            if isinstance(value, nn.Parameter):
                self.attr = value  # registered as this step's parameter
            else:  # a buffer or constant (a plain attribute set first would clash with the buffer's name)
                self.register_buffer("attr", value if isinstance(value, torch.Tensor) else torch.as_tensor(value),
                                     persistent=False)
        self._map_arg = torch.fx.node.map_arg

    def forward(self, *values):
        if self.op == "get_attr":
            return self.attr
        lookup = dict(zip(self.input_names, values))
        args = self._map_arg(self.args_template, lambda n: lookup[n.name])
        kwargs = self._map_arg(self.kwargs_template, lambda n: lookup[n.name])
        if self.op == "call_module":
            return self.call(*args, **kwargs)
        if self.op == "call_function":
            return self.target(*args, **kwargs)
        if self.op == "call_method":
            obj, *rest = args
            return getattr(obj, self.target)(*rest, **kwargs)
        raise InputError(f"fx node op {self.op!r} cannot run as a step")  # pragma: no cover


def _plan_names(graph, fx_nodes):
    """plan node id -> fx node name: by the id (or ``fx_name``) as an fx node name, else by a
    ``target`` naming a called submodule; one fx node per plan node."""
    by_name = {node.name: node for node in fx_nodes}
    by_target = {str(node.target): node for node in fx_nodes if node.op == "call_module"}
    mapping, taken = {}, {}
    for node_id, attrs in graph.nodes(data=True):
        if attrs.get("tile") is not None and attrs.get("parent") is not None:
            continue  # a tile runs as its slice of the parent's fx node (see `_tile_steps`)
        found = None
        for candidate in (node_id, attrs.get("fx_name")):
            if candidate is not None and candidate in by_name:
                found = by_name[candidate].name
                break
        if found is None and attrs.get("target") in by_target:
            found = by_target[attrs["target"]].name
        if found is None:
            raise InputError(f"`plan` does not match `model`: plan node {node_id!r} is not a node of the "
                             "traced module (by fx name or module target); plan the module's own "
                             "from_torch graph")
        if found in taken:
            raise InputError(f"`plan` does not match `model`: plan nodes {taken[found]!r} and {node_id!r} "
                             f"both name fx node {found!r}")
        mapping[node_id], taken[found] = found, node_id
    return mapping


def build_fx(graph, module, example_inputs, *, groups, device=None, dtype=None):
    """A `BuiltModel` running `module` along `graph`'s nodes, and the plan's groups completed.

    Parameters
    ----------
    graph : networkx.DiGraph
        The plan's graph (from ``cachefit.graphs.from_torch`` or built from
        the same fx trace).
    module : torch.nn.Module
        The user's model (deep-copied, put in eval mode).
    example_inputs : torch.Tensor or tuple of torch.Tensor
        The inputs of one whole pass; dimension 0 is the batch.
    groups : list of list of str
        The plan's groups (plan node ids).
    device : str or torch.device, optional
        Default the CPU.
    dtype : str, optional
        Cast floating parameters and inputs (default: leave them).

    Returns
    -------
    (BuiltModel, list of list of str)
        The model (its steps are named after the plan nodes where they
        match, else after the fx nodes) and the groups with every step in one
        (a plan's ``op="input"`` nodes, the module's inputs, are not steps).

    Raises
    ------
    InputError
        No `example_inputs`, the module cannot be traced (the message names
        the error), a plan node is not in the trace, or the fx graph's data
        flow goes from a later group to an earlier one.
    """
    if example_inputs is None:
        raise InputError("`example_inputs` is required to run a torch.nn.Module: the inputs of one whole pass, "
                         "batch along dimension 0")
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
        raise InputError("`example_inputs` must be a tensor or a tuple of tensors")
    device = torch.device(device or "cpu")
    module = copy.deepcopy(module).eval()
    try:
        traced = torch.fx.symbolic_trace(module)
    except Exception as exc:  # noqa: BLE001 - fx raises many kinds
        raise InputError(f"`model` cannot be traced with torch.fx: {type(exc).__name__}: {exc}") from None
    target_dtype = torch_dtype(dtype, device=device) if dtype is not None else None
    traced = traced.to(device)
    if target_dtype is not None:
        traced = traced.to(target_dtype)
    fx_nodes = list(traced.graph.nodes)
    mapping = _plan_names(graph, fx_nodes)
    step_name = {fx: plan for plan, fx in mapping.items()}
    group_of = {mapping[node]: index for index, group in enumerate(groups) for node in group if node in mapping}

    placeholders = [node for node in fx_nodes if node.op == "placeholder"]
    if len(placeholders) != len(inputs):
        raise InputError(f"`example_inputs` must hold {len(placeholders)} tensor(s), one per input of the "
                         f"module's forward, got {len(inputs)}")
    _complete_groups(fx_nodes, group_of)

    def value_id(node):
        return f"@{node.name}" if node.op == "placeholder" else step_name.get(node.name, node.name)

    tiles = _tiles_by_parent(graph, groups)
    steps = []
    completed = [[] for _ in groups]
    for node in fx_nodes:
        if node.op in ("placeholder", "output"):
            continue
        input_nodes = list(node.all_input_nodes)
        reads = tuple(value_id(arg) for arg in input_nodes)
        if value_id(node) in tiles:
            _tile_steps(node, traced, tiles[value_id(node)], reads, group_of, steps, completed,
                        [arg.name for arg in input_nodes])
            continue
        call = FxCall(node, traced, [arg.name for arg in input_nodes])
        steps.append(Step(value_id(node), call, reads))
        completed[group_of[node.name]].append(value_id(node))
    output = next(node for node in fx_nodes if node.op == "output")
    result = output.args[0]
    result_nodes = list(result) if isinstance(result, (tuple, list)) else [result]
    if not all(isinstance(node, torch.fx.Node) and node.op != "placeholder" for node in result_nodes):
        raise InputError("`model` must return a tensor or a tuple of tensors computed from its inputs")

    batch = inputs[0].shape[0]
    seq_len = graph.graph.get("seq_len") or 1
    tokens_per_row = int(seq_len) if isinstance(seq_len, int) and seq_len > 0 else 1
    model_inputs = _model_inputs(placeholders, inputs, device, target_dtype)
    parameters = list(traced.parameters())
    model_dtype = parameters[0].dtype if parameters else (target_dtype or torch.float32)
    model = BuiltModel(graph=graph, fingerprint=graph_fingerprint(graph), steps=steps, inputs=model_inputs,
                       outputs=tuple(value_id(node) for node in result_nodes), device=device, dtype=model_dtype,
                       tokens=batch * tokens_per_row, seq_len=tokens_per_row, whole_sequences=False,
                       tokens_per_row=tokens_per_row, source="torch.fx")
    ordered = [model_inputs[f"@{node.name}"] for node in placeholders]
    model.whole_forward = lambda: traced(*ordered)
    return model, completed


class Concat(nn.Module):
    """Joins tile outputs along `dim` (the parent's output, rebuilt from its slices)."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, *parts):
        return torch.cat(parts, dim=self.dim)


def _tiles_by_parent(graph, groups):
    """parent id -> [(tile id, offset, width, group index)] for the plan's tile nodes, in tile order."""
    group_index = {node: index for index, group in enumerate(groups) for node in group}
    tiles = {}
    for node, attrs in graph.nodes(data=True):
        if attrs.get("tile") is None or attrs.get("parent") is None:
            continue
        if attrs.get("join") != "cat":
            raise InputError(f"tile {node!r} is joined by {attrs.get('join')!r}; a user module's tiles run "
                             "only as output slices joined by concatenation")
        axis = {"linear": "out_features", "conv": "out_features", "embedding": "embedding_dim"}.get(attrs.get("op"))
        if axis is None:
            raise InputError(f"tile {node!r} is of a {attrs.get('op')!r} node; a user module's tiles run for "
                             "linear, conv and embedding modules")
        tiles.setdefault(attrs["parent"], []).append(
            (int(attrs["tile"][0]), node, int(attrs["tile_offset"]), int(attrs[axis]), group_index[node]))
    return {parent: [entry[1:] for entry in sorted(entries)] for parent, entries in tiles.items()}


def _sliced(module, offset, width):
    """A copy of `module` computing output units [offset, offset + width) (its own weight slice)."""
    if isinstance(module, nn.Linear):
        part = nn.Linear(module.in_features, width, bias=module.bias is not None)
        part.weight.data = module.weight.data[offset:offset + width].clone()
    elif isinstance(module, nn.Embedding):
        part = nn.Embedding(module.num_embeddings, width, padding_idx=module.padding_idx)
        part.weight.data = module.weight.data[:, offset:offset + width].clone()
        return part
    elif isinstance(module, nn.modules.conv._ConvNd) and module.groups == 1:
        part = copy.deepcopy(module)
        part.out_channels = width
        part.weight = nn.Parameter(module.weight.data[offset:offset + width].clone())
        if module.bias is None:
            return part
    else:
        raise InputError(f"a tile of module {type(module).__name__} cannot run: tiles of a user module run for "
                         "nn.Linear, nn.Embedding and ungrouped convolutions")
    if module.bias is not None:
        part.bias = nn.Parameter(module.bias.data[offset:offset + width].clone())
    return part


def _tile_steps(node, traced, tiles, reads, group_of, steps, completed, input_names):
    """One step per tile of fx node `node` (its module's slice, in the tile's group) and the join."""
    if node.op != "call_module":
        raise InputError(f"tiles of {node.name!r} cannot run: it is not a submodule call")
    module = traced.get_submodule(node.target)
    earliest = max((group_of.get(name, 0) for name in input_names), default=0)
    join_group = group_of[node.name]
    names = []
    for tile_id, offset, width, group in tiles:
        if not earliest <= group <= join_group:
            raise InputError(f"`plan` cannot run `model` in order: tile {tile_id!r} (group {group}) must lie "
                             f"between its inputs' group {earliest} and its join's group {join_group}")
        call = FxCall(node, traced, input_names)
        call.call = _sliced(module, offset, width)
        steps.append(Step(tile_id, call, reads))
        completed[group].append(tile_id)
        names.append(tile_id)
    dim = 1 if isinstance(module, nn.modules.conv._ConvNd) else -1
    steps.append(Step(node.name, Concat(dim), tuple(names)))
    completed[join_group].append(node.name)


def _complete_groups(fx_nodes, group_of):
    """Give every fx node a group (updating `group_of`) and check that the data flow runs in order.

    A node the plan does not name goes with its latest input (a ``get_attr``
    with its first user).
    """
    users = {node.name: [user for user in node.users] for node in fx_nodes}
    # Group of every fx node: the plan's, else the latest input's (get_attr: the first user's).
    for node in fx_nodes:
        if node.op in ("placeholder", "output") or node.name in group_of:
            continue
        if node.op != "get_attr":
            group_of[node.name] = max((group_of.get(arg.name, 0) for arg in node.all_input_nodes), default=0)
    for node in reversed(fx_nodes):
        if node.op == "get_attr" and node.name not in group_of:
            group_of[node.name] = min((group_of.get(user.name, 0) for user in users[node.name]), default=0)
    for node in fx_nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        for arg in node.all_input_nodes:
            if arg.op != "placeholder" and group_of[arg.name] > group_of[node.name]:
                raise InputError(f"`plan` cannot run `model` in order: fx node {node.name!r} (group "
                                 f"{group_of[node.name]}) reads {arg.name!r} from later group "
                                 f"{group_of[arg.name]}")


def _model_inputs(placeholders, inputs, device, target_dtype):
    """``{"@<placeholder>": tensor}`` on `device` (floating tensors cast to `target_dtype`), one batch."""
    batch = inputs[0].shape[0]
    model_inputs = {}
    for node, tensor in zip(placeholders, inputs):
        if tensor.shape[0] != batch:
            raise InputError("every tensor in `example_inputs` must have the same dimension 0 (the batch)")
        tensor = tensor.to(device)
        if target_dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(target_dtype)
        model_inputs[f"@{node.name}"] = tensor
    return model_inputs
