"""`linear_stack`: an executable chain of square linear layers, the executor's benchmark model.

A stack of ``n_layers`` bias-free ``width × width`` linear layers (``op="linear"``)
is the simplest model whose layers are large, equal and weight-bound: with
``width = 4096`` in BF16 each layer holds 32 MiB, so one layer fits an H100's
50 MiB L2 and two do not.  The graph carries the shape keys the executor
materialises (``in_features``, ``out_features``, ``bias``) and the byte counts
(``weight_bytes``, ``activation_bytes``, ``buffer_bytes``), so it can be planned like any other model.
"""

from __future__ import annotations

from numbers import Integral

import networkx as nx

from ..errors import InputError
from ..units import dtype_bytes

__all__ = ["linear_stack"]


def _positive(value, name):
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise InputError(f"`{name}` must be a positive integer, got {value!r}")
    return int(value)


def linear_stack(n_layers, width, *, dtype="bf16", batch=16, seq_len=512, bias=False):
    """A chain of `n_layers` linear layers of `width` × `width`.

    Parameters
    ----------
    n_layers, width : int
        Number of layers and their input = output width.
    dtype : str
        bf16, fp16, fp32, fp8 or int8 (bytes per weight and activation element).
    batch, seq_len : int
        The tokens one pass processes are ``batch × seq_len``; each layer's
        ``activation_bytes`` is ``batch × seq_len × width × dtype bytes``.
    bias : bool
        Give each layer a bias vector.

    Returns
    -------
    networkx.DiGraph
        Nodes ``linear.0 .. linear.{n-1}`` in order, each with ``op="linear"``,
        ``role="linear"``, ``in_features``, ``out_features``, ``bias``,
        ``params``, ``flops`` (2 × params × tokens) and the byte attributes;
        graph attributes ``name``, ``dtype``, ``batch``, ``seq_len``,
        ``source`` (``"cachefit.executor.linear_stack"``) and ``granularity``
        (``"op"``).

    Raises
    ------
    InputError
        A count is not a positive integer, or `dtype` is unknown.

    Notes
    -----
    O(n_layers).  The layers have no nonlinearity between them; the executor
    draws each weight with standard deviation ``1/sqrt(width)``, so the
    activations keep their scale through any depth.

    Examples
    --------
    >>> g = linear_stack(16, 4096)
    >>> g.number_of_nodes(), g.nodes["linear.0"]["weight_bytes"] == 32 * 2**20
    (16, True)
    >>> g.nodes["linear.0"]["activation_bytes"] == 16 * 512 * 4096 * 2
    True
    """
    n_layers = _positive(n_layers, "n_layers")
    width = _positive(width, "width")
    batch = _positive(batch, "batch")
    seq_len = _positive(seq_len, "seq_len")
    size = dtype_bytes(dtype)
    tokens = batch * seq_len
    params = width * width + (width if bias else 0)
    graph = nx.DiGraph(name=f"linear-stack-{n_layers}x{width}", dtype=str(dtype).lower(), batch=batch,
                       seq_len=seq_len, source="cachefit.executor.linear_stack", granularity="op")
    previous = None
    for index in range(n_layers):
        node = f"linear.{index}"
        graph.add_node(node, op="linear", role="linear", params=params, weight_bytes=params * size,
                       activation_bytes=tokens * width * size, buffer_bytes=0, flops=2 * params * tokens,
                       in_features=width, out_features=width, bias=bool(bias), layer=index)
        if previous is not None:
            graph.add_edge(previous, node)
        previous = node
    graph.graph["params"] = params * n_layers
    return graph
