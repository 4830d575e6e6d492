"""Flops of `from_onnx` graphs, from operator shapes."""

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import cachefit  # noqa: E402
from cachefit.graphs import from_onnx  # noqa: E402


def weight(name, *shape):
    return numpy_helper.from_array(np.zeros(shape, dtype=np.float32), name)


def build(nodes, inputs, outputs, initializers=(), value_info=(), opset=17):
    graph = helper.make_graph(nodes, "flops", inputs, outputs, list(initializers), value_info=list(value_info))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                   helper.make_opsetid("com.microsoft", 1)])


def fvalue(name, *shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def test_matmul_gemm_conv():
    nodes = [
        helper.make_node("Conv", ["x", "cw"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["c"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "gw", "gb"], ["g"], name="gemm", transB=1),
        helper.make_node("MatMul", ["g", "mw"], ["y"], name="mm"),
    ]
    model = build(nodes, [fvalue("x", "batch", 3, 8, 8)], [fvalue("y", "batch", 5)],
                  [weight("cw", 4, 3, 3, 3), weight("gw", 16, 256), weight("gb", 16), weight("mw", 16, 5)])
    graph = from_onnx(model, dims={"batch": 2})
    assert graph.nodes["conv"]["flops"] == 2 * (2 * 4 * 8 * 8) * (3 * 3 * 3)
    assert graph.nodes["gemm"]["flops"] == 2 * (2 * 16) * 256
    assert graph.nodes["mm"]["flops"] == 2 * (2 * 5) * 16
    assert graph.nodes["flat"]["flops"] == 0 and graph.nodes["x"].get("flops", 0) == 0


def test_multi_head_attention():
    node = helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["o"], name="mha",
                            domain="com.microsoft", num_heads=4)
    model = build([node], [fvalue("q", 2, 16, 64), fvalue("k", 2, 24, 64), fvalue("v", 2, 24, 64)],
                  [fvalue("o", 2, 16, 64)])
    graph = from_onnx(model)
    # QKᵀ: 2·B·Sq·Sk·hidden, AV the same with the value width
    assert graph.nodes["mha"]["flops"] == 2 * 2 * 16 * 24 * 64 * 2


def test_balance_by_flops_and_stages():
    nodes = [helper.make_node("MatMul", [f"h{i}", f"w{i}"], [f"h{i + 1}"], name=f"mm{i}") for i in range(6)]
    model = build(nodes, [fvalue("h0", 4, 32)], [fvalue("h6", 4, 32)], [weight(f"w{i}", 32, 32) for i in range(6)])
    graph = from_onnx(model)
    assert sum(d.get("flops", 0) for _, d in graph.nodes(data=True)) == 6 * 2 * 4 * 32 * 32
    plan = cachefit.plan(graph, 10**6, solver="dp", k=3, balance="flops")
    assert cachefit.check(plan).ok and plan.k == 3
