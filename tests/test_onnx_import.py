"""Tests for `cachefit.graphs.from_onnx` on models built with onnx.helper."""

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from click.testing import CliRunner  # noqa: E402

import cachefit  # noqa: E402
from cachefit.cli import main  # noqa: E402
from cachefit.errors import InputError  # noqa: E402
from cachefit.graphs import from_onnx, validate  # noqa: E402


def weight(name, *shape, dtype=np.float32):
    return numpy_helper.from_array(np.zeros(shape, dtype=dtype), name)


def model(nodes, inputs, outputs, initializers=(), name="test"):
    graph = helper.make_graph(nodes, name, inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def matmul_chain(batch="batch"):
    """x[batch, 16] -> MatMul W1[16, 32] -> Relu -> MatMul W2[32, 8] -> y."""
    return model(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
         helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 8])],
        [weight("w1", 16, 32), weight("w2", 32, 8)])


class TestMatmulChain:
    def test_bytes_and_edges(self):
        graph = from_onnx(matmul_chain(), dims={"batch": 4})
        assert list(graph) == ["x", "mm1", "relu", "mm2"]
        assert list(graph.edges) == [("x", "mm1"), ("mm1", "relu"), ("relu", "mm2")]
        assert [graph.nodes[v]["weight_bytes"] for v in graph] == [0, 16 * 32 * 4, 0, 32 * 8 * 4]
        assert [graph.nodes[v]["activation_bytes"] for v in graph] == [4 * 16 * 4, 4 * 32 * 4, 4 * 32 * 4,
                                                                       4 * 8 * 4]
        mm1 = graph.nodes["mm1"]
        assert (mm1["op"], mm1["in_features"], mm1["out_features"], mm1["bias"]) == ("linear", 16, 32, False)
        assert graph.nodes["relu"]["op"] == "relu"
        assert graph.graph["params"] == 16 * 32 + 32 * 8
        assert graph.graph["batch"] == 4 and "seq_len" not in graph.graph

    def test_static_shapes_need_no_dims(self):
        graph = from_onnx(matmul_chain(batch=3))
        assert graph.nodes["mm2"]["activation_bytes"] == 3 * 8 * 4

    def test_dynamic_dimension_without_dims_names_it(self):
        with pytest.raises(InputError, match=r"`dims` must give the dynamic dimension 'batch' "
                                              r"\(axis 0 of tensor 'x'\), e.g. dims=\{'batch': 1\} "
                                              r"\(command line: --dims batch=1\)"):
            from_onnx(matmul_chain())

    def test_other_dimension_still_missing(self):
        chain = matmul_chain()
        chain.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "width"
        with pytest.raises(InputError, match=r"dynamic dimension 'width'"):
            from_onnx(chain, dims={"batch": 2})

    def test_model_is_not_modified(self):
        chain = matmul_chain()
        before = chain.SerializeToString()
        from_onnx(chain, dims={"batch": 2})
        assert chain.SerializeToString() == before

    def test_from_file_and_plan(self, tmp_path):
        path = tmp_path / "chain.onnx"
        onnx.save(matmul_chain(batch=2), str(path))
        graph = from_onnx(path)
        assert graph.graph["name"] == "test" and graph.graph["source"] == str(path)
        plan = cachefit.plan(graph, 4096)
        assert plan.ok and cachefit.check(plan).ok

    def test_command_line(self, tmp_path):
        path = tmp_path / "chain.onnx"
        onnx.save(matmul_chain(batch=2), str(path))
        result = CliRunner().invoke(main, ["plan", str(path), "--capacity", "2KiB", "--tile"])
        assert result.exit_code == 0, result.output
        assert "tiled 1 node(s)" in result.output


class TestResidualAdd:
    def test_skip_edge(self):
        residual = model(
            [helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
             helper.make_node("Add", ["x", "h"], ["y"], name="residual")],
            [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["batch", "seq", 8])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["batch", "seq", 8])],
            [weight("w", 8, 8, dtype=np.float16)])
        graph = from_onnx(residual, dims={"batch": 2, "seq": 5})
        validate(graph)
        assert set(graph.predecessors("residual")) == {"x", "proj"}
        assert graph.nodes["proj"]["weight_bytes"] == 8 * 8 * 2
        assert graph.nodes["residual"]["activation_bytes"] == 2 * 5 * 8 * 2
        assert (graph.graph["batch"], graph.graph["seq_len"]) == (2, 5)


class TestSharedInitializer:
    def test_counted_once(self):
        shared = model(
            [helper.make_node("MatMul", ["x", "w"], ["a"], name="first"),
             helper.make_node("MatMul", ["a", "w"], ["b"], name="second")],
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])],
            [helper.make_tensor_value_info("b", TensorProto.FLOAT, [2, 6])],
            [weight("w", 6, 6)])
        graph = from_onnx(shared)
        assert graph.nodes["first"]["weight_bytes"] == 6 * 6 * 4
        assert graph.nodes["second"]["weight_bytes"] == 0
        assert graph.nodes["second"]["tied_to"] == "first"
        assert graph.graph["shared"] == ["w"]
        assert sum(d["weight_bytes"] for _, d in graph.nodes(data=True)) == 6 * 6 * 4

    def test_tied_embedding_and_head(self):
        # Gather from the table, then MatMul with its transpose (tied LM head).
        tied = model(
            [helper.make_node("Gather", ["table", "ids"], ["h"], name="embed"),
             helper.make_node("Transpose", ["table"], ["table_t"], name="t"),
             helper.make_node("MatMul", ["h", "table_t"], ["logits"], name="head")],
            [helper.make_tensor_value_info("ids", TensorProto.INT64, [3])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [3, 20])],
            [weight("table", 20, 4)])
        graph = from_onnx(tied)
        embed = graph.nodes["embed"]
        assert (embed["op"], embed["num_embeddings"], embed["embedding_dim"]) == ("embedding", 20, 4)
        assert embed["weight_bytes"] == 20 * 4 * 4
        assert graph.nodes["t"]["weight_bytes"] == 0 and graph.nodes["t"]["tied_to"] == "embed"
        assert sum(d["weight_bytes"] for _, d in graph.nodes(data=True)) == 20 * 4 * 4


class TestOtherOps:
    def test_gemm_trans_b_with_bias_and_constants(self):
        gemm = model(
            [helper.make_node("Constant", [], ["scale"], name="c",
                              value=numpy_helper.from_array(np.ones((4,), np.float32))),
             helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="fc", transB=1),
             helper.make_node("Mul", ["h", "scale"], ["y"], name="scaled")],
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 10])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
            [weight("w", 4, 10), weight("b", 4)])
        graph = from_onnx(gemm)
        assert "c" not in graph  # a Constant is a weight, not a node
        fc = graph.nodes["fc"]
        assert (fc["op"], fc["in_features"], fc["out_features"], fc["bias"]) == ("linear", 10, 4, True)
        assert fc["weight_bytes"] == (40 + 4) * 4
        assert graph.nodes["scaled"]["weight_bytes"] == 4 * 4
        assert list(graph.predecessors("scaled")) == ["fc"]

    def test_unnamed_nodes_get_ids(self):
        unnamed = model([helper.make_node("Relu", ["x"], ["y"])],
                        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
        assert list(from_onnx(unnamed)) == ["x", "Relu_0"]

    def test_bad_arguments(self, tmp_path):
        with pytest.raises(InputError, match=r"`path_or_model` must be a path to an .onnx file"):
            from_onnx(3.5)
        with pytest.raises(InputError, match=r"is not a file"):
            from_onnx(tmp_path / "missing.onnx")
        garbage = tmp_path / "garbage.onnx"
        garbage.write_bytes(b"\x00not onnx at all")
        with pytest.raises(InputError, match=r"is not a readable ONNX model"):
            from_onnx(garbage)
        with pytest.raises(InputError, match=r"`dims\['batch'\]` must be a positive integer, got 0"):
            from_onnx(matmul_chain(), dims={"batch": 0})
        with pytest.raises(InputError, match=r"`dims` must map dimension names"):
            from_onnx(matmul_chain(), dims=[1])


class TestTiling:
    def test_tiled_onnx_graph_plans_and_checks(self):
        graph = from_onnx(matmul_chain(), dims={"batch": 4})
        # mm1 holds 2 KiB of weights: over a 1.5 KiB capacity, so it is tiled
        plan = cachefit.plan(graph, 1536, tile=True)
        assert plan.ok and cachefit.check(plan).ok
        assert plan.stats["tiled_nodes"] >= 1
        assert sum(d["weight_bytes"] for _, d in plan.graph.nodes(data=True)) == (16 * 32 + 32 * 8) * 4


class TestCommandLine:
    def test_dims_option(self, tmp_path):
        path = tmp_path / "chain.onnx"
        onnx.save(matmul_chain(), str(path))
        runner = CliRunner()
        missing = runner.invoke(main, ["plan", str(path), "--capacity", "1MiB"])
        assert missing.exit_code == 2 and "dynamic dimension 'batch'" in missing.output
        result = runner.invoke(main, ["plan", str(path), "--capacity", "1MiB", "--dims", "batch=4"])
        assert result.exit_code == 0, result.output
        bad = runner.invoke(main, ["plan", str(path), "--capacity", "1MiB", "--dims", "batch"])
        assert bad.exit_code == 2 and "`--dims` must look like `--dims batch=1,seq=128`" in bad.output


class TestNodeOrder:
    """ONNX files that list a node before the producer of its input (issue 10: edges were lost)."""

    def shuffled(self, order):
        chain = matmul_chain()
        nodes = list(chain.graph.node)
        del chain.graph.node[:]
        chain.graph.node.extend(nodes[index] for index in order)
        return chain

    @pytest.mark.parametrize("order", [(2, 0, 1), (1, 2, 0), (2, 1, 0)])
    def test_out_of_order_file_keeps_its_data_flow(self, order):
        graph = from_onnx(self.shuffled(order), dims={"batch": 4})
        assert list(graph) == ["x", "mm1", "relu", "mm2"]
        assert list(graph.edges) == [("x", "mm1"), ("mm1", "relu"), ("relu", "mm2")]
        plan = cachefit.plan(graph, 2048, memory="additive", k=2)
        assert cachefit.check(plan).ok

    def test_sort_is_stable_for_independent_branches(self):
        nodes = [helper.make_node("Relu", ["x"], ["b"], name="b"), helper.make_node("Relu", ["x"], ["a"], name="a"),
                 helper.make_node("Add", ["a", "b"], ["y"], name="add")]
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])]
        outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])]
        assert list(from_onnx(model(nodes[::-1], inputs, outputs))) == ["x", "a", "b", "add"]  # file order kept
        assert list(from_onnx(model(nodes, inputs, outputs))) == ["x", "b", "a", "add"]

    def test_cycle_refused_naming_a_node_on_it(self):
        nodes = [helper.make_node("Relu", ["x"], ["h"], name="first"),
                 helper.make_node("Add", ["h", "q"], ["p"], name="p_node"),
                 helper.make_node("Relu", ["p"], ["q"], name="q_node"),
                 helper.make_node("Relu", ["p"], ["y"], name="last")]
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])]
        outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])]
        with pytest.raises(InputError, match=r"the ONNX graph has a cycle through node '(p_node|q_node)'$"):
            from_onnx(model(nodes, inputs, outputs))

    def test_self_loop_refused(self):
        nodes = [helper.make_node("Add", ["x", "y"], ["y"], name="loop")]
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])]
        outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])]
        with pytest.raises(InputError, match=r"has a cycle: node 'loop' reads its own output"):
            from_onnx(model(nodes, inputs, outputs))

    def test_duplicate_node_names_refused(self):
        chain = matmul_chain()
        chain.graph.node[2].name = "mm1"
        with pytest.raises(InputError, match=r"two ONNX nodes are named 'mm1' \(nodes 0 and 2\); node names must be "
                                             r"unique"):
            from_onnx(chain, dims={"batch": 4})

    def test_tensor_with_two_producers_refused(self):
        chain = matmul_chain()
        chain.graph.node[2].output[0] = "h"
        with pytest.raises(InputError, match=r"tensor 'h' is produced by two nodes \('mm1' and 'mm2'\)"):
            from_onnx(chain, dims={"batch": 4})

    def test_caller_model_not_reordered(self):
        chain = self.shuffled((2, 0, 1))
        from_onnx(chain, dims={"batch": 4})
        assert [node.name for node in chain.graph.node] == ["mm2", "mm1", "relu"]
