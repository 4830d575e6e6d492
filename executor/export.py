"""Run the user's module along a plan over its ``torch.export`` graph (imports torch).

A graph that ``cachefit.graphs.from_torch`` captured with ``torch.export``
(``source="torch.export"``: Hugging Face transformers models, anything
torch.fx cannot trace) names its nodes after modules: a leaf module's
qualified name (``model.layers.0.self_attn.q_proj``), or a parent's own
operations between its children (``model.layers.0``, ``model.layers.0#1``).
`build_export` exports the module again, the same way, and groups the
exported ATen operations by the module that ran them with the importer's own
rule (`cachefit.graphs.torch_export`), so each plan node is the set of ATen
operations it stood for.  Every operation becomes a `Step` in that node's
group; a parameter, buffer or constant becomes a step with no inputs in the
group of its first reader (its weight is packed with that group's).

The batch (dimension 0 of every input) is exported as a dynamic dimension,
so the steps run on chunks of any number of samples; a model whose export
specialises the batch is refused when chunks would change it.  The module is
deep-copied and put in eval mode first; the equivalence reference is the
user's own module on the whole pass.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from ..errors import InputError
from .fingerprint import graph_fingerprint
from .model import BuiltModel, Step, torch_dtype

__all__ = ["build_export", "AtenCall", "Constant", "tensor_leaves", "recognised_attention", "node_groups",
           "program_steps"]

logger = logging.getLogger(__name__)


class AtenCall(nn.Module):
    """Calls one exported node's target with its argument structure, the input values substituted."""

    def __init__(self, node, input_names):
        super().__init__()
        self.target = node.target
        self.args_template, self.kwargs_template = node.args, node.kwargs
        self.input_names = tuple(input_names)

    def forward(self, *values):
        lookup = dict(zip(self.input_names, values))
        args = torch.fx.node.map_arg(self.args_template, lambda n: lookup[n.name])
        kwargs = torch.fx.node.map_arg(self.kwargs_template, lambda n: lookup[n.name])
        return self.target(*args, **kwargs)


class Constant(nn.Module):
    """A parameter (registered, so group packing moves it) or a buffer/constant, returned as is."""

    def __init__(self, value, is_parameter):
        super().__init__()
        if is_parameter:
            self.value = value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False)
        else:
            self.register_buffer("value", value, persistent=False)

    def forward(self):
        return self.value


def _as_inputs(example_inputs):
    if example_inputs is None:
        raise InputError("`example_inputs` is required to run a torch.nn.Module: the inputs of one whole pass, "
                         "batch along dimension 0")
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
        raise InputError("`example_inputs` must be a tensor or a tuple of tensors")
    batch = inputs[0].shape[0]
    if any(x.dim() == 0 or x.shape[0] != batch for x in inputs):
        raise InputError("every tensor in `example_inputs` must have the same dimension 0 (the batch)")
    return inputs


def _export(module, inputs):
    """(ExportedProgram, whether the batch is dynamic): dynamic batch first, else static shapes."""
    batch = torch.export.Dim("batch", min=1)
    dynamic = tuple({0: batch} for _ in inputs)
    try:
        return torch.export.export(module, inputs, dynamic_shapes=dynamic, strict=False), True
    except Exception as exc:  # noqa: BLE001 - export raises many kinds
        logger.info("export with a dynamic batch failed (%s: %s); exporting static shapes",
                    type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
    try:
        return torch.export.export(module, inputs, strict=False), False
    except Exception as exc:  # noqa: BLE001
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise InputError(f"`model` cannot be captured by torch.export: {type(exc).__name__}: {first}") from None


def _leaf_names(graph, module):
    """Submodules the importer kept whole (its ``leaf_modules``): a node named after a module with
    children, where no other node is named after one of those children."""
    names = [node for node in graph if "#" not in node]
    prefixes = {name[:index] for name in names for index, char in enumerate(name) if char == "."}
    return {name for name in names if name not in prefixes and _has_children(module, name)}


def node_groups(ep, module, graph):
    """exported node -> plan node id, for every operation that outputs a tensor (the importer's rule)."""
    from ..graphs.torch_export import _leaf_test, _runs

    group = _runs(ep, _leaf_test(module, _leaf_names(graph, module), ()))
    plan_nodes = {node for node, attrs in graph.nodes(data=True) if attrs.get("op") != "input"}
    found = set(group.values())
    missing, extra = sorted(plan_nodes - found), sorted(found - plan_nodes)
    if missing or extra:
        which = (f"plan node {missing[0]!r} is not a module run of the exported module" if missing
                 else f"the exported module runs {extra[0]!r}, which is not a plan node")
        raise InputError(f"`plan` does not match `model`: {which}; plan the module's own from_torch graph "
                         "(same module, same example inputs)")
    return group


def _has_children(module, name):
    try:
        return any(True for _ in module.get_submodule(name).children())
    except AttributeError:
        return False


def build_export(graph, module, example_inputs, *, groups, device=None, dtype=None):
    """A `BuiltModel` running `module` along an export graph's nodes, and the plan's groups completed.

    Parameters
    ----------
    graph : networkx.DiGraph
        The plan's graph, from ``from_torch`` with ``source="torch.export"``.
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
        The model (one step per exported operation, named after it) and
        the groups of step names, in the plan's group order.

    Raises
    ------
    InputError
        No `example_inputs`, the module cannot be exported, its module runs
        are not the plan's nodes, or data flows from a later group to an
        earlier one.
    """
    inputs = _as_inputs(example_inputs)
    device = torch.device(device or "cpu")
    target_dtype = torch_dtype(dtype, device=device) if dtype is not None else None
    module = copy.deepcopy(module).eval().to(device)
    if target_dtype is not None:
        module = module.to(target_dtype)
    inputs = tuple(_cast(x, device, target_dtype) for x in inputs)
    ep, dynamic = _export(module, inputs)
    group_name = node_groups(ep, module, graph)
    group_index = {node: index for index, group in enumerate(groups) for node in group}
    steps, completed, model_inputs, outputs = program_steps(ep, group_name, group_index, len(groups), inputs)

    batch = inputs[0].shape[0]
    seq_len = graph.graph.get("seq_len")
    tokens_per_row = int(seq_len) if isinstance(seq_len, int) and seq_len > 0 else 1
    model = BuiltModel(graph=graph, fingerprint=graph_fingerprint(graph), steps=steps, inputs=model_inputs,
                       outputs=outputs, device=device, dtype=_param_dtype(module, target_dtype),
                       tokens=batch * tokens_per_row, seq_len=tokens_per_row, whole_sequences=not dynamic,
                       tokens_per_row=tokens_per_row, source="torch.export")
    if not dynamic:  # the steps hold the example's batch: chunks must be the whole pass
        model.seq_len = model.tokens
    model.whole_forward = lambda: tensor_leaves(module(*inputs))
    if recognised_attention(graph):
        from .export_chunked import rebuild_for_chunks

        model.chunked_prefill = lambda chunk: rebuild_for_chunks(model, module, inputs, groups, chunk)
    return model, completed


def recognised_attention(graph):
    """Whether `graph` can take chunks inside a sequence: it has ``seq_len`` and attention nodes whose K/V
    the import counted (``kv_bytes_per_token``, `cachefit.graphs.torch_import_hf`)."""
    return bool(graph.graph.get("seq_len")) and any(data.get("kv_bytes_per_token")
                                                    for _, data in graph.nodes(data=True))


def _cast(tensor, device, target_dtype):
    tensor = tensor.to(device)
    if target_dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(target_dtype)
    return tensor


def _param_dtype(module, target_dtype):
    parameters = list(module.parameters())
    return parameters[0].dtype if parameters else (target_dtype or torch.float32)


def tensor_leaves(value):
    """The tensors of a model output, in order (a transformers ``ModelOutput`` by its fields)."""
    from torch.utils._pytree import tree_leaves

    if hasattr(value, "to_tuple"):  # transformers' ModelOutput
        value = value.to_tuple()
    return tuple(leaf for leaf in tree_leaves(value) if isinstance(leaf, torch.Tensor))


def _constants(ep):
    """placeholder name -> (tensor, is a parameter) for the program's parameters, buffers and constants."""
    from torch.export.graph_signature import InputKind

    found = {}
    for spec in ep.graph_signature.input_specs:
        if spec.kind == InputKind.PARAMETER:
            found[spec.arg.name] = (ep.state_dict[spec.target], True)
        elif spec.kind == InputKind.BUFFER:
            value = ep.state_dict.get(spec.target)
            found[spec.arg.name] = (value if value is not None else ep.constants[spec.target], False)
        elif spec.kind in (InputKind.CONSTANT_TENSOR, InputKind.CUSTOM_OBJ):
            found[spec.arg.name] = (ep.constants[spec.target], False)
    return found


def program_steps(ep, group_name, group_index, k, inputs, replace=None):
    """Steps in exported order, the completed groups, the model inputs and the output ids.

    `replace` maps exported nodes to modules run instead of their `AtenCall`
    (called with the node's input values, in ``all_input_nodes`` order).
    """
    replace = replace or {}
    nodes = list(ep.graph.nodes)
    constants = _constants(ep)
    user_inputs = [node for node in nodes if node.op == "placeholder" and node.name not in constants]
    if len(user_inputs) != len(inputs):
        raise InputError(f"`example_inputs` must hold {len(user_inputs)} tensor(s), one per tensor input of the "
                         f"module's forward, got {len(inputs)}")
    model_inputs = {f"@{node.name}": tensor for node, tensor in zip(user_inputs, inputs)}
    index = _complete(nodes, group_name, group_index, constants)
    value_id = {node: f"@{node.name}" for node in user_inputs}
    steps, completed = [], [[] for _ in range(k)]
    for node in nodes:
        if node.op == "output" or node in value_id:
            continue
        value_id[node] = node.name
        if node.op == "placeholder":
            value, is_parameter = constants[node.name]
            step = Step(node.name, Constant(value, is_parameter), ())
        else:
            reads = list(node.all_input_nodes)
            call = replace.get(node) or AtenCall(node, [arg.name for arg in reads])
            step = Step(node.name, call, tuple(value_id[arg] for arg in reads))
        steps.append(step)
        completed[index[node]].append(node.name)
    output = next(node for node in nodes if node.op == "output")
    results = [arg for arg in torch.utils._pytree.tree_leaves(output.args[0]) if isinstance(arg, torch.fx.Node)]
    user_outputs = _user_outputs(ep, results)
    for node in user_outputs:
        if node not in value_id or node.op == "placeholder":
            raise InputError("`model` must return tensors computed from its inputs")
    return steps, completed, model_inputs, tuple(value_id[node] for node in user_outputs)


def _user_outputs(ep, results):
    from torch.export.graph_signature import OutputKind

    specs = ep.graph_signature.output_specs
    if len(specs) != len(results):
        return results
    return [node for node, spec in zip(results, specs) if spec.kind == OutputKind.USER_OUTPUT]


def _complete(nodes, group_name, group_index, constants):
    """Group index of every computing node: the plan's, else its latest input's (a constant: its
    first reader's); refuses data flowing from a later group to an earlier one."""
    index = {}
    for node in nodes:
        if node.op != "call_function":
            continue
        if node in group_name:
            index[node] = group_index[group_name[node]]
        else:
            index[node] = max((index.get(arg, 0) for arg in node.all_input_nodes), default=0)
    for node in nodes:
        if node.op == "placeholder" and node.name in constants:
            readers = [index[user] for user in node.users if user in index]
            index[node] = min(readers, default=0)
    for node in nodes:
        if node.op != "call_function":
            continue
        for arg in node.all_input_nodes:
            if arg in index and index[arg] > index[node]:
                raise InputError(f"`plan` cannot run `model` in order: operation {node.name!r} (group "
                                 f"{index[node]}) reads {arg.name!r} from later group {index[arg]}")
    return index
