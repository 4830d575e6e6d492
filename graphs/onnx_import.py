"""`from_onnx`: a model graph from an ONNX file or ``ModelProto``.

ONNX shape inference gives every intermediate tensor a shape; initializers
(and ``Constant`` nodes) are the weights, charged to the first node that
reads them; every other node output is an activation.  Weights are sized
from their declared dims, so a model whose weights live in external data
files is imported without reading them.

onnx is imported only inside the function (the ``onnx`` extra).
"""

from __future__ import annotations

import heapq
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path

import networkx as nx

from ..errors import InputError
from ..validation import validate

__all__ = ["from_onnx", "ONNX_ELEMENT_BITS"]

logger = logging.getLogger(__name__)

#: Bits per element of each ONNX `TensorProto` data type (by its number).
ONNX_ELEMENT_BITS = {
    1: 32,   # FLOAT
    2: 8,    # UINT8
    3: 8,    # INT8
    4: 16,   # UINT16
    5: 16,   # INT16
    6: 32,   # INT32
    7: 64,   # INT64
    9: 8,    # BOOL
    10: 16,  # FLOAT16
    11: 64,  # DOUBLE
    12: 32,  # UINT32
    13: 64,  # UINT64
    14: 64,  # COMPLEX64
    15: 128,  # COMPLEX128
    16: 16,  # BFLOAT16
    17: 8, 18: 8, 19: 8, 20: 8,  # FLOAT8 variants
    21: 4, 22: 4,  # UINT4, INT4
    23: 4,  # FLOAT4E2M1
}

_DIM_KEYS = {"batch": ("batch", "batch_size", "N"), "seq_len": ("seq_len", "sequence_length", "sequence", "seq")}


def _bytes(count, data_type, what):
    bits = ONNX_ELEMENT_BITS.get(data_type)
    if bits is None:
        raise InputError(f"{what} has ONNX element type {data_type}, whose size cachefit does not know")
    return -(-count * bits // 8)


def _load(path_or_model):
    import onnx

    if isinstance(path_or_model, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(path_or_model)  # never modify the caller's model
        return model, str(path_or_model.graph.name or "onnx model"), "onnx"
    if not isinstance(path_or_model, (str, os.PathLike)):
        raise InputError(f"`path_or_model` must be a path to an .onnx file or an onnx.ModelProto, "
                         f"got {type(path_or_model).__name__}")
    path = Path(path_or_model)
    if not path.is_file():
        raise InputError(f"`path_or_model` {str(path)!r} is not a file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise InputError(f"`path_or_model` {str(path)!r} is not a readable ONNX model: {exc}") from None
    return model, path.stem, str(path)


def _check_dims(dims):
    if dims is None:
        return {}
    if not isinstance(dims, Mapping):
        raise InputError(f"`dims` must map dimension names to positive integers, got {type(dims).__name__}")
    for key, value in dims.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"`dims[{key!r}]` must be a positive integer, got {value!r}")
    return dict(dims)


def _fix_dims(value_infos, dims):
    """Replace symbolic dims named in `dims` by their values, in place (on our copy)."""
    for info in value_infos:
        tensor_type = info.type.tensor_type
        for dim in tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param in dims:
                dim.dim_value = dims[dim.dim_param]


def _shape(info, tensor, dims):
    """The concrete shape of a value info; InputError naming a dimension that is not fixed."""
    tensor_type = info.type.tensor_type
    if not tensor_type.HasField("shape"):
        raise InputError(f"`path_or_model`: tensor {tensor!r} has no shape after ONNX shape inference; "
                         "cachefit cannot size it")
    shape = []
    for axis, dim in enumerate(tensor_type.shape.dim):
        if dim.HasField("dim_value"):
            shape.append(dim.dim_value)
        elif dim.HasField("dim_param") and dim.dim_param in dims:
            shape.append(dims[dim.dim_param])
        elif dim.HasField("dim_param"):
            raise InputError(f"`dims` must give the dynamic dimension {dim.dim_param!r} "
                             f"(axis {axis} of tensor {tensor!r}), e.g. dims={{{dim.dim_param!r}: 1}} "
                             f"(command line: --dims {dim.dim_param}=1)")
        else:
            raise InputError(f"`path_or_model`: axis {axis} of tensor {tensor!r} has an unknown size "
                             "after shape inference and no name to fix it with `dims`")
    return shape


def _node_label(node, index):
    return node.name or f"{node.op_type}_{index}"


def _consumed(node):
    """Names a node reads: its inputs and, for control flow, every name read inside its subgraphs."""
    names = list(node.input)
    pending = [node]
    while pending:
        for attribute in pending.pop().attribute:
            for subgraph in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                for inner in subgraph.node:
                    names.extend(inner.input)
                    pending.append(inner)
    return names


def _sort_nodes(onnx_graph):
    """Put the graph's nodes in a topological order, in place (Kahn's algorithm, stable).

    A file already in order keeps it.  Duplicate node names, a tensor with
    two producers and a cycle are refused (InputError naming the node or
    tensor).  O(nodes + inputs) plus a heap: O(n log n).
    """
    nodes = list(onnx_graph.node)
    seen, producer = {}, {}
    for index, node in enumerate(nodes):
        if node.name:
            if node.name in seen:
                raise InputError(f"`path_or_model`: two ONNX nodes are named {node.name!r} (nodes {seen[node.name]} "
                                 f"and {index}); node names must be unique")
            seen[node.name] = index
        for output in filter(None, node.output):
            if output in producer:
                raise InputError(f"`path_or_model`: tensor {output!r} is produced by two nodes "
                                 f"({_node_label(nodes[producer[output]], producer[output])!r} and "
                                 f"{_node_label(node, index)!r})")
            producer[output] = index
    successors = [[] for _ in nodes]
    waiting = [0] * len(nodes)
    for index, node in enumerate(nodes):
        for before in {producer[name] for name in _consumed(node) if name in producer}:
            if before == index:
                raise InputError(f"`path_or_model`: the ONNX graph has a cycle: node "
                                 f"{_node_label(node, index)!r} reads its own output")
            successors[before].append(index)
            waiting[index] += 1
    ready = [index for index, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        index = heapq.heappop(ready)
        order.append(index)
        for after in successors[index]:
            waiting[after] -= 1
            if waiting[after] == 0:
                heapq.heappush(ready, after)
    if len(order) < len(nodes):
        raise InputError(f"`path_or_model`: the ONNX graph has a cycle through node "
                         f"{_node_label(*_on_cycle(nodes, waiting, producer))!r}")
    if order != sorted(order):
        logger.debug("from_onnx: nodes reordered topologically")
        reordered = []
        for index in order:
            copy = type(nodes[index])()
            copy.CopyFrom(nodes[index])
            reordered.append(copy)
        del onnx_graph.node[:]
        onnx_graph.node.extend(reordered)


def _on_cycle(nodes, waiting, producer):
    """(node, index) of a node on a cycle among the nodes Kahn's algorithm could not place."""
    index = next(position for position, count in enumerate(waiting) if count)
    visited = set()
    while index not in visited:  # walk backwards through unplaced producers until one repeats
        visited.add(index)
        index = next(producer[name] for name in _consumed(nodes[index])
                     if name in producer and waiting[producer[name]])
    return nodes[index], index


def from_onnx(path_or_model, *, dims=None):
    """The graph of an ONNX model.

    Parameters
    ----------
    path_or_model : str, os.PathLike or onnx.ModelProto
        An ``.onnx`` file (external weight data is not read: sizes come from
        the declared dims) or a loaded model (not modified).
    dims : mapping of str to int, optional
        Values of the model's symbolic (dynamic) dimensions, e.g.
        ``{"batch": 1, "sequence": 2048}``.  ``batch`` / ``batch_size`` and
        ``seq_len`` / ``sequence_length`` / ``sequence`` / ``seq`` also
        become the graph's ``batch`` and ``seq_len`` attributes (needed for
        ``chunk_tokens``).

    Returns
    -------
    networkx.DiGraph
        One ``op="input"`` node per graph input that is not an initializer,
        then one node per ONNX node (``Constant`` nodes are weights, not
        nodes), in the file's order when it is topological, as ONNX requires,
        else in the stable topological order of their data flow,
        named by the node's ``name`` (``{op_type}_{index}`` when empty).
        Node attributes: the byte counts, ``op`` (``linear`` for a MatMul or
        Gemm with a 2-D weight initializer, with ``in_features``,
        ``out_features`` and ``bias``; ``embedding`` for a Gather from a 2-D
        initializer, with ``num_embeddings`` and ``embedding_dim``; ``conv``
        with ``in_features``/``out_features`` = channels; else the
        ``op_type`` in lower case), ``op_type``, ``params`` (weight elements
        owned), ``outputs``; ``tied_to`` when a node's initializers were
        counted by an earlier node.  Graph attributes ``name``, ``source``
        (the path, or ``"onnx"``), ``params``, ``dims``, ``shared`` (names of
        initializers read by several nodes) and ``batch``/``seq_len`` when
        `dims` gives them.

    Raises
    ------
    InputError
        Not an ONNX model; shape inference fails; a dynamic dimension that
        `dims` does not fix (the message names it and the tensor); a tensor
        left without a shape; a bad `dims`; two nodes with the same name, a
        tensor with two producers, or a cycle (the message names a node on it).

    Notes
    -----
    Weights: each initializer (and each ``Constant`` output) is counted once,
    on the first node in order that reads it, with its declared element type
    (a shared initializer — tied embeddings — is in one node only).
    Activations: the sum over a node's outputs of elements × element size.
    Edges: from the producer of each input tensor.  Subgraphs of control-flow
    nodes (If, Loop) are not entered: such a node is one node with its own
    outputs.  Complexity: shape inference plus O(nodes + tensors).

    Examples
    --------
    >>> import numpy as np
    >>> from onnx import TensorProto, helper, numpy_helper
    >>> w = numpy_helper.from_array(np.zeros((8, 4), np.float32), "w")
    >>> g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "tiny",
    ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
    ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], [w])
    >>> G = from_onnx(helper.make_model(g), dims={"batch": 2})
    >>> [(v, G.nodes[v]["weight_bytes"], G.nodes[v]["activation_bytes"]) for v in G]
    [('x', 0, 64), ('mm', 128, 32)]
    """
    import onnx

    dims = _check_dims(dims)
    model, label, source = _load(path_or_model)
    _fix_dims(model.graph.input, dims)
    _sort_nodes(model.graph)
    try:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception as exc:
        raise InputError(f"`path_or_model`: ONNX shape inference failed: {exc}") from None
    onnx_graph = model.graph

    infos = {}
    for info in list(onnx_graph.input) + list(onnx_graph.value_info) + list(onnx_graph.output):
        infos.setdefault(info.name, info)
    weights = {}  # tensor name -> (bytes, elements, dims)
    for initializer in onnx_graph.initializer:
        count = math.prod(initializer.dims)
        weights[initializer.name] = (_bytes(count, initializer.data_type, f"initializer {initializer.name!r}"),
                                     count, list(initializer.dims))
    for node in onnx_graph.node:
        if node.op_type == "Constant" and not node.domain:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            for output in node.output:
                if value is not None:
                    count = math.prod(value.dims)
                    weights[output] = (_bytes(count, value.data_type, f"constant {output!r}"), count,
                                       list(value.dims))
                else:  # value_float(s)/value_int(s): tiny scalars or lists
                    weights[output] = (0, 0, [])

    graph = nx.DiGraph(name=onnx_graph.name or label, source=source, dims=dict(dims))
    for key, spellings in _DIM_KEYS.items():
        for spelling in spellings:
            if spelling in dims:
                graph.graph[key] = dims[spelling]
                break
    producer = {}
    for info in onnx_graph.input:
        if info.name in weights:
            continue
        shape = _shape(info, info.name, dims)
        graph.add_node(info.name, op="input", op_type="input", params=0, weight_bytes=0,
                       activation_bytes=_bytes(math.prod(shape), info.type.tensor_type.elem_type,
                                               f"input {info.name!r}"),
                       buffer_bytes=0, shape=shape)
        producer[info.name] = info.name

    owner, readers = {}, {}
    used_ids = set(graph.nodes)
    for index, node in enumerate(onnx_graph.node):
        if node.op_type == "Constant" and not node.domain:
            continue
        node_id = node.name or f"{node.op_type}_{index}"
        if node_id in used_ids:
            node_id = f"{node_id}_{index}"
        used_ids.add(node_id)
        owned_bytes, owned_params, tied = 0, 0, []
        for tensor in node.input:
            if tensor not in weights:
                continue
            readers[tensor] = readers.get(tensor, 0) + 1
            if tensor in owner:
                if owner[tensor] != node_id and owner[tensor] not in tied:
                    tied.append(owner[tensor])
                continue
            owner[tensor] = node_id
            owned_bytes += weights[tensor][0]
            owned_params += weights[tensor][1]
        activation = 0
        outputs = [output for output in node.output if output]
        for output in outputs:
            info = infos.get(output)
            if info is None:
                raise InputError(f"`path_or_model`: tensor {output!r} (output of node {node_id!r}) has no "
                                 "type or shape after ONNX shape inference; cachefit cannot size it")
            shape = _shape(info, output, dims)
            activation += _bytes(math.prod(shape), info.type.tensor_type.elem_type, f"tensor {output!r}")
        attrs = {"op": node.op_type.lower(), "op_type": node.op_type, "params": owned_params,
                 "weight_bytes": owned_bytes, "activation_bytes": activation, "buffer_bytes": 0,
                 "outputs": outputs}
        attrs.update(_layer_attrs(node, weights))
        attrs["flops"] = node_flops(node, _shape_reader(weights, infos, dims))
        if tied:
            attrs["tied_to"] = tied[0] if len(tied) == 1 else tied
        graph.add_node(node_id, **attrs)
        for tensor in node.input:
            if tensor in producer:
                graph.add_edge(producer[tensor], node_id)
        for output in outputs:
            producer[output] = node_id

    graph.graph["params"] = sum(data["params"] for _, data in graph.nodes(data=True))
    graph.graph["shared"] = sorted(name for name, count in readers.items() if count > 1)
    logger.debug("from_onnx: %d nodes, %d edges", graph.number_of_nodes(), graph.number_of_edges())
    return validate(graph)


def _attribute(node, name, default):
    for attribute in node.attribute:
        if attribute.name == name:
            return attribute.i
    return default


def _layer_attrs(node, weights):
    """``op`` and shape keys for the matmul-like ONNX ops `tile` can split."""
    inputs = list(node.input)
    if node.op_type == "MatMul" and len(inputs) == 2 and inputs[1] in weights and len(weights[inputs[1]][2]) == 2:
        rows, cols = weights[inputs[1]][2]
        return {"op": "linear", "in_features": rows, "out_features": cols, "bias": False}
    if node.op_type == "Gemm" and len(inputs) >= 2 and inputs[1] in weights and len(weights[inputs[1]][2]) == 2:
        rows, cols = weights[inputs[1]][2]
        if _attribute(node, "transB", 0):
            rows, cols = cols, rows
        return {"op": "linear", "in_features": rows, "out_features": cols,
                "bias": len(inputs) > 2 and bool(inputs[2])}
    if (node.op_type == "Gather" and inputs and inputs[0] in weights and len(weights[inputs[0]][2]) == 2
            and _attribute(node, "axis", 0) == 0):
        rows, cols = weights[inputs[0]][2]
        return {"op": "embedding", "num_embeddings": rows, "embedding_dim": cols}
    if node.op_type == "Conv" and len(inputs) >= 2 and inputs[1] in weights and len(weights[inputs[1]][2]) >= 3:
        shape = weights[inputs[1]][2]
        return {"op": "conv", "in_features": shape[1] * _attribute(node, "group", 1), "out_features": shape[0],
                "bias": len(inputs) > 2 and bool(inputs[2]), "groups": _attribute(node, "group", 1)}
    return {}


# --------------------------------------------------------------------------
# flops from operator shapes
# --------------------------------------------------------------------------

_ATTENTION_OPS = ("Attention", "MultiHeadAttention", "GroupQueryAttention")


def _shape_reader(weights, infos, dims):
    """tensor name -> its concrete shape, or None when unknown (flops are then not counted)."""
    def shape_of(tensor):
        if tensor in weights:
            return weights[tensor][2]
        info = infos.get(tensor)
        if info is None:
            return None
        try:
            return _shape(info, tensor, dims)
        except InputError:
            return None

    return shape_of


def node_flops(node, shape_of):
    """Flops (2 per multiply-add) of one ONNX node, from its operands' shapes.

    Counted: MatMul (2 · |out| · K), Gemm (the same, bias not counted),
    Conv (2 · |out| · Cin/groups · kernel), ConvTranspose (2 · |in| ·
    Cout/groups · kernel) and the attention ops (ONNX ``Attention``,
    com.microsoft ``Attention``/``MultiHeadAttention``/``GroupQueryAttention``:
    QKᵀ and AV, 2 · S_k · (|Q| + |out|), plus the packed input projection of
    com.microsoft ``Attention``).  Everything else (element-wise ops,
    norms, softmax, reshapes) counts 0, as FlopCounterMode does.

    Parameters
    ----------
    node : onnx.NodeProto
    shape_of : callable
        Tensor name -> list of ints, or None when unknown.

    Returns
    -------
    int
        0 when a needed shape is unknown.
    """
    inputs = [shape_of(name) if name else None for name in node.input]
    outputs = [shape_of(name) if name else None for name in node.output]
    out = outputs[0] if outputs else None
    if out is None:
        return 0
    if node.op_type in ("MatMul", "Gemm") and inputs and inputs[0]:
        depth = inputs[0][0] if node.op_type == "Gemm" and _attribute(node, "transA", 0) else inputs[0][-1]
        return 2 * math.prod(out) * depth
    if node.op_type == "Conv" and len(inputs) > 1 and inputs[1]:
        return 2 * math.prod(out) * math.prod(inputs[1][1:])
    if node.op_type == "ConvTranspose" and len(inputs) > 1 and inputs[0] and inputs[1]:
        return 2 * math.prod(inputs[0]) * math.prod(inputs[1][1:])
    if node.op_type in _ATTENTION_OPS:
        return _attention_flops(node, inputs, out)
    return 0


def _attention_flops(node, inputs, out):
    query = inputs[0] if inputs else None
    if query is None:
        return 0
    projection = 0
    if node.domain == "com.microsoft" and node.op_type == "Attention":
        # input [B, S, hidden] times packed weights [hidden, 3 * hidden]
        weights = inputs[1] if len(inputs) > 1 else None
        if weights is None:
            return 0
        projection = 2 * math.prod(query) * weights[-1]
        query = list(out)
        keys = query[1]
    else:
        key = inputs[1] if len(inputs) > 1 else None
        if key is None:
            keys = query[-2] if len(query) == 4 else query[1]  # packed QKV: self-attention
        else:
            keys = key[-2] if len(key) == 4 else key[1]
    return projection + 2 * keys * (math.prod(query) + math.prod(out))
