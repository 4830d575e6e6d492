"""Materialise a graph as a runnable PyTorch program: `build` and `BuiltModel` (imports torch).

A `BuiltModel` is a list of `Step`s, one per graph node in the graph's node
order, each a module with seeded random weights and the ids of the values it
reads; plus the model inputs (token ids and positions for a model with an
embedding, else a hidden-state tensor), the output ids (the graph's sinks)
and the graph's fingerprint.  `cachefit.executor.run` cuts the steps into
the plan's groups and runs them chunk by chunk.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..errors import InputError
from ..memory import LayerTable
from ..validation import validate
from .fingerprint import check_plan_groups, check_same_graph, graph_fingerprint
from .nodes import ParamFactory, logical_attrs, make_node_module, order_inputs

__all__ = ["Step", "BuiltModel", "build", "torch_dtype", "TORCH_DTYPES", "pack_group_weights"]

logger = logging.getLogger(__name__)

#: cachefit dtype names -> torch dtypes the executor computes in.
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: Byte alignment of each parameter inside a group's contiguous weight buffer.
ALIGNMENT = 256


def torch_dtype(dtype, *, graph_dtype=None, device="cpu"):
    """The torch dtype to compute in.

    None takes the graph's dtype on CUDA and float32 on the CPU (the CPU
    reference computes in float32: bf16 matrix products on a CPU are slow
    and round differently from one chunk size to another).
    """
    if dtype is None:
        if torch.device(device).type != "cuda":
            return torch.float32
        dtype = graph_dtype or "bf16"
    if isinstance(dtype, torch.dtype):
        if dtype not in TORCH_DTYPES.values():
            raise InputError(f"`dtype` must be one of {', '.join(TORCH_DTYPES)}, got {dtype}")
        return dtype
    name = str(dtype).lower()
    if name not in TORCH_DTYPES:
        raise InputError(f"`dtype` must be one of {', '.join(TORCH_DTYPES)} (fp8 and int8 graphs run with "
                         f"an explicit `dtype`), got {dtype!r}")
    return TORCH_DTYPES[name]


@dataclass
class Step:
    """One node: ``values[node] = module(*(values[i] for i in inputs))``."""

    node: str
    module: object
    inputs: tuple

    def __call__(self, values):
        return self.module(*(values[name] for name in self.inputs))


@dataclass
class BuiltModel:
    """A graph materialised as PyTorch modules on one device.

    Attributes
    ----------
    graph : networkx.DiGraph
        The graph it was built from.
    fingerprint : str
        `graph_fingerprint` of that graph.
    steps : list of Step
        One per node, in the graph's node order.
    inputs : dict of str to torch.Tensor
        The model inputs for one whole pass (``@tokens`` and ``@positions``,
        or ``@input``), dimension 0 indexed by ``rows / tokens_per_row``.
    tokens_per_row : int
        Tokens per row of dimension 0 of the inputs (1 for transformer
        graphs, whose rows are tokens; ``seq_len`` for a torch.fx model whose
        dimension 0 is the batch).
    outputs : tuple of str
        The value ids the model returns (the graph's sinks).
    device, dtype : torch.device, torch.dtype
    tokens : int
        Tokens per pass (batch × seq_len).
    seq_len : int
    whole_sequences : bool
        Chunks must hold whole sequences (the model has attention or a pooler).
    group_buffers : list of torch.Tensor
        After `pack_group_weights`: each group's contiguous weight buffer.
    source : str
        ``"graph"`` (modules made from node attributes) or ``"torch.fx"``.
    whole_forward : callable or None
        For a torch.fx model: calls the user's module on the whole pass.
    chunked_prefill : callable or None
        For an imported model whose attention modules were recognised:
        ``chunked_prefill(chunk_tokens)`` rebuilds the steps, in place, for
        chunks inside a sequence (`cachefit.executor.export_chunked`).
    step_groups : list of list of str or None
        The plan's groups as step names, where steps are not plan nodes (an
        imported model's); None: the plan's own groups.
    """

    graph: object
    fingerprint: str
    steps: list
    inputs: dict
    outputs: tuple
    device: object
    dtype: object
    tokens: int
    seq_len: int
    whole_sequences: bool
    tokens_per_row: int = 1
    source: str = "graph"
    group_buffers: list = field(default_factory=list)
    packed_for: tuple = ()
    whole_forward: object = None
    chunked_prefill: object = None
    step_groups: list | None = None

    def parameters(self, nodes=None):
        """The distinct parameters of the steps of `nodes` (all steps when None)."""
        seen, result = set(), []
        wanted = None if nodes is None else set(nodes)
        for step in self.steps:
            if wanted is not None and step.node not in wanted:
                continue
            if not isinstance(step.module, torch.nn.Module):
                continue
            for parameter in step.module.parameters():
                if id(parameter) not in seen:
                    seen.add(id(parameter))
                    result.append(parameter)
        return result

    def weight_bytes(self, nodes=None):
        """Bytes of the distinct parameters of `nodes` (all when None)."""
        return sum(p.numel() * p.element_size() for p in self.parameters(nodes))

    def node_params(self, node):
        """Parameters the step of `node` owns (a tied head owns none)."""
        step = next(step for step in self.steps if step.node == node)
        if not isinstance(step.module, torch.nn.Module):
            return 0
        return sum(p.numel() for p in step.module.parameters())

    @torch.no_grad()
    def reference(self):
        """The unpartitioned model's outputs on the whole pass (the equivalence reference).

        The user's own module for a torch.fx model, else `forward`.
        """
        if self.whole_forward is not None:
            result = self.whole_forward()
            result = result if isinstance(result, (tuple, list)) else (result,)
            return dict(zip(self.outputs, result))
        return self.forward()

    @torch.no_grad()
    def forward(self, inputs=None):
        """The unpartitioned model on the whole batch: every step in node order.

        Returns the dict of output id -> tensor.  Values are dropped after
        their last use.
        """
        values = dict(self.inputs if inputs is None else inputs)
        last_use = {}
        for index, step in enumerate(self.steps):
            for name in step.inputs:
                last_use[name] = index
        keep = set(self.outputs)
        for index, step in enumerate(self.steps):
            values[step.node] = step(values)
            for name in step.inputs:
                if last_use.get(name) == index and name not in keep:
                    values.pop(name, None)
        return {name: values[name] for name in self.outputs}


def _as_graph(graph):
    if isinstance(graph, LayerTable):
        graph = graph.to_graph()
    return validate(graph)


def _positive_attr(graph, key):
    value = graph.graph.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"`graph` must have a positive integer graph attribute `{key}` (the tokens a pass "
                         f"runs are batch × seq_len), got {value!r}")
    return value


def _source_width(graph, node):
    attrs = graph.nodes[node]
    op = attrs.get("op")
    if op == "linear":
        if attrs.get("in_features") is not None:
            return int(attrs["in_features"])
        out = int(attrs["out_features"])
        return (int(attrs["params"]) - (out if attrs.get("bias") else 0)) // out
    if op in ("norm", "activation", "add"):
        return int(attrs["width"])
    if op in ("expert", "pooler"):
        return int(attrs["in_features"])
    if op == "block":
        return int(attrs["hidden_size"])
    raise InputError(f"node {node!r} ({op}) has no input in the graph and cannot take the model input")


def _stage_input_width(graph, node, tokens):
    """Features per token of ``stage_input`` `node`: its ``activation_bytes`` / (rows × dtype bytes).

    rows: the producer's ``rows`` where it has them (a routed expert's output is
    sized for the tokens routed to it, though the executor's expert returns every
    token's row), else `tokens`.
    """
    from ..units import DTYPE_BYTES

    element = DTYPE_BYTES.get(str(graph.graph.get("dtype", "")).lower())
    if graph.in_degree(node):
        raise InputError(f"stage_input {node!r} has predecessors; a stage input must be a source of its stage graph")
    rows = int(graph.nodes[node].get("rows") or tokens)
    width, rest = divmod(int(graph.nodes[node].get("activation_bytes", 0)), rows * (element or 0) or 1)
    if element is None or rest or width < 1:
        raise InputError(f"stage_input {node!r}: activation_bytes {graph.nodes[node].get('activation_bytes')!r} is "
                         f"not tokens ({tokens}) × features × dtype bytes; the executor cannot shape this input")
    return width


def build(graph, plan=None, *, seed=0, dtype=None, device="cpu"):
    """Materialise `graph` as PyTorch modules with seeded random weights.

    Parameters
    ----------
    graph : networkx.DiGraph
        A graph whose nodes say what they compute: from
        `cachefit.graphs.transformer` (op or block granularity, tiles
        honoured) or `cachefit.executor.linear_stack`, or an embedded layers
        instance whose nodes are linear layers.  (A graph imported from a
        torch module runs with that module instead: pass it to
        `cachefit.executor.run` as `model`.)
    plan : cachefit.Plan, optional
        When given, the plan must belong to `graph` (same fingerprint), and
        each group's weights are placed in one contiguous buffer, so one L2
        access-policy window can cover them.
    seed : int
        Seeds the weights (per weight name, see `cachefit.executor.nodes`)
        and the input tokens.
    dtype : str or torch.dtype, optional
        fp32, bf16 or fp16; default the graph's dtype on CUDA, fp32 on CPU.
    device : str or torch.device
        ``"cpu"`` or ``"cuda"`` (``"cuda:N"``).

    Returns
    -------
    BuiltModel

    Raises
    ------
    InputError
        A node cannot be materialised (no ``op``, an unknown op, shapes that
        do not add up), the graph lacks ``batch``/``seq_len``, `dtype` or
        `device` is not usable, or `plan` belongs to another graph.

    Notes
    -----
    O(parameters): every weight is drawn once (a tile draws its parent's
    weight and keeps its slice).  Each step's parameter count equals its
    node's ``params``; a tied LM head borrows the embedding's table and owns
    no parameter.

    Examples
    --------
    >>> from cachefit.graphs import transformer
    >>> cfg = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1,
    ...        "num_attention_heads": 4, "intermediate_size": 64, "vocab_size": 50}
    >>> g = transformer(cfg, batch=2, seq_len=4, granularity="op")
    >>> model = build(g)
    >>> all(model.node_params(v) == g.nodes[v]["params"] for v in g)
    True
    >>> tuple(model.forward()["lm_head"].shape)
    (8, 50)
    """
    graph = _as_graph(graph)
    from .verify import refuse_onnx

    refuse_onnx(graph)
    if graph.graph.get("source") in ("torch.fx", "torch.export"):
        raise InputError(f"`graph` was imported from a torch module (source {graph.graph['source']!r}): run it "
                         "with that module, "
                         "cachefit.executor.run(plan, model=module, example_inputs=...)")
    device = _device(device)
    dtype = torch_dtype(dtype, graph_dtype=graph.graph.get("dtype"), device=device)
    batch, seq_len = _positive_attr(graph, "batch"), _positive_attr(graph, "seq_len")
    tokens = batch * seq_len
    if plan is not None:
        check_same_graph(plan, graph_fingerprint(graph), "`graph`")

    factory = ParamFactory(seed, device)
    tiles = {}
    for node, attrs in graph.nodes(data=True):
        if attrs.get("tile") is not None and attrs.get("parent") is not None:
            tiles.setdefault(attrs["parent"], []).append(node)

    steps, modules = [], {}
    whole_sequences = False
    input_widths, stage_widths = {}, {}
    uses_tokens = False
    for node in graph:
        attrs = graph.nodes[node]
        module = make_node_module(graph, node, seq_len=seq_len, factory=factory, dtype=dtype, device=device,
                                  tiles=tiles, modules=modules)
        module.eval()
        modules[node] = module
        preds = list(graph.predecessors(node))
        if attrs.get("op") == "stage_input":
            inputs = [f"@{node}"]
            stage_widths[node] = _stage_input_width(graph, node, tokens)
        elif preds:
            inputs = order_inputs(node, attrs, preds, lambda pred: logical_attrs(graph, pred))
        elif attrs.get("op") == "embedding":
            inputs, uses_tokens = ["@tokens", "@positions"], True
        else:
            inputs = ["@input"]
            input_widths[node] = _source_width(graph, node)
        if attrs.get("op") in ("attention", "mla_attention", "pooler", "block"):
            whole_sequences = True
        steps.append(Step(node, module, tuple(inputs)))

    generator = torch.Generator(device="cpu")
    generator.manual_seed(int(seed))
    inputs = {}
    if uses_tokens:
        vocab = min(int(graph.nodes[s.node]["num_embeddings"]) for s in steps if "@tokens" in s.inputs)
        inputs["@tokens"] = torch.randint(0, vocab, (tokens,), generator=generator).to(device)
        inputs["@positions"] = (torch.arange(tokens) % seq_len).to(device)
    if input_widths:
        widths = set(input_widths.values())
        if len(widths) > 1:
            raise InputError(f"`graph` has input nodes of different widths {sorted(widths)}; the executor "
                             "feeds every input node the same model input")
        inputs["@input"] = torch.randn(tokens, widths.pop(), generator=generator).to(device=device,
                                                                                         dtype=dtype)
    for node, width in stage_widths.items():  # activations from earlier stages: seeded per node
        inputs[f"@{node}"] = torch.randn(tokens, width, generator=generator).to(device=device, dtype=dtype)
    outputs = tuple(node for node in graph if graph.out_degree(node) == 0)
    model = BuiltModel(graph=graph, fingerprint=graph_fingerprint(graph), steps=steps, inputs=inputs,
                       outputs=outputs, device=device, dtype=dtype, tokens=tokens, seq_len=seq_len,
                       whole_sequences=whole_sequences)
    if plan is not None:
        pack_group_weights(model, check_plan_groups(plan, graph))
    logger.info("built %s: %d steps, %d parameters, %s on %s", graph.graph.get("name"), len(steps),
                sum(p.numel() for p in model.parameters()), dtype, device)
    return model


def _device(device):
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"`device` must be 'cpu' or 'cuda', got {device!r}: {exc}") from None
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"`device` must be 'cpu' or 'cuda', got {str(device)!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("`device` is 'cuda' but torch sees no CUDA device")
    return device


@torch.no_grad()
def pack_group_weights(model, groups):
    """Move each group's parameters into one contiguous buffer per group.

    Parameters
    ----------
    model : BuiltModel
    groups : list of list of str
        Node ids per group, in execution order.

    Returns
    -------
    list of (int, int)
        Per group, (address of its buffer, bytes from the buffer's start to the
        end of its last parameter).

    Notes
    -----
    Each parameter keeps its values; its ``data`` becomes a view into the
    group's buffer at an offset aligned to 256 bytes.  A parameter shared by
    two groups (a tied table) stays in the first group that uses it.  O(weight
    bytes) for the copy.
    """
    placed, spans, buffers = set(), [], []
    for group in groups:
        parameters = [p for p in model.parameters(group) if id(p) not in placed]
        offsets, total = [], 0
        for parameter in parameters:
            total = -(-total // ALIGNMENT) * ALIGNMENT
            offsets.append(total)
            total += parameter.numel() * parameter.element_size()
        buffer = torch.empty(max(total, 1), dtype=torch.uint8, device=model.device)
        for parameter, offset in zip(parameters, offsets):
            nbytes = parameter.numel() * parameter.element_size()
            view = buffer[offset:offset + nbytes].view(parameter.dtype).view(parameter.shape)
            view.copy_(parameter.data)
            parameter.data = view
            placed.add(id(parameter))
        buffers.append(buffer)
        spans.append((buffer.data_ptr(), total))
    model.group_buffers = buffers
    model.packed_for = tuple(tuple(group) for group in groups)
    return spans
