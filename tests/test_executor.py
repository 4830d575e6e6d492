"""The executor: materialisation, plan checks, schedules, equivalence with the unpartitioned model.

CPU tests run everywhere torch is installed; tests marked ``gpu`` run the
same checks on CUDA (skipped without a device by tests/conftest.py).
"""

import json

import networkx as nx
import pytest

torch = pytest.importorskip("torch")

import cachefit  # noqa: E402
from cachefit import InputError  # noqa: E402
from cachefit.executor import (build, check_plan_groups, graph_fingerprint, linear_stack,  # noqa: E402
                               render, run)
from cachefit.executor.model import pack_group_weights  # noqa: E402
from cachefit.graphs import transformer  # noqa: E402
from cachefit.result import Plan, graph_from_data, graph_to_data  # noqa: E402

CONFIGS = {
    "llama": {"model_type": "llama", "name": "tiny-llama", "hidden_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 128},
    "gpt2": {"model_type": "gpt2", "name": "tiny-gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4,
             "n_positions": 32, "vocab_size": 128},
    "mixtral": {"model_type": "mixtral", "name": "tiny-mixtral", "hidden_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 128,
                "num_local_experts": 4, "num_experts_per_tok": 2},
    "bert": {"model_type": "bert", "name": "tiny-bert", "hidden_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 128,
             "max_position_embeddings": 32},
    "falcon": {"model_type": "falcon", "name": "tiny-falcon", "hidden_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 4, "vocab_size": 128},
    "opt": {"model_type": "opt", "name": "tiny-opt", "hidden_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 4, "ffn_dim": 128, "vocab_size": 128, "max_position_embeddings": 32},
}

def plan_greedy(graph, capacity, **kwargs):
    """`cachefit.plan` with the greedy solver: fast, deterministic, and free of ortools (absent on the GPU image)."""
    return cachefit.plan(graph, capacity, solver="greedy", **kwargs)



@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: the tiny models are faster and timings steadier on a shared 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(name, *, granularity="op", batch=4, seq_len=8):
    return transformer(CONFIGS[name], batch=batch, seq_len=seq_len, granularity=granularity)


def quick_run(plan, model=None, **kwargs):
    kwargs.setdefault("warmup", 0)
    kwargs.setdefault("iters", 1)
    return run(plan, model, **kwargs)


def tile_node(graph, node, n):
    """A copy of `graph` with `node` split into `n` tiles along its output (an expert: its
    intermediate dimension) and a ``concat`` node, keeping the id, joining them.

    The conventions the executor reads: tiles carry ``tile=(i, n)``, ``parent``, the parent's
    ``op``/``role`` and their own ``params``/``weight_bytes``; the join has ``op="concat"``.
    """
    attrs = graph.nodes[node]
    op = attrs["op"]
    if op == "linear":
        full, per = attrs["out_features"], attrs["in_features"] + (1 if attrs.get("bias") else 0)
        width_key = "out_features"
    elif op == "embedding":
        full = attrs["embedding_dim"]
        per = attrs["num_embeddings"] + attrs.get("num_positions", 0) + attrs.get("num_token_types", 0)
        width_key = "embedding_dim"
    elif op == "expert":
        full, per = attrs["intermediate_size"], attrs["in_features"] * (3 if attrs["mlp"] == "gated" else 2)
        width_key = "intermediate_size"
    else:
        raise ValueError(op)
    size = attrs["weight_bytes"] // max(attrs["params"], 1) if attrs["params"] else 2
    widths = [full // n + (1 if i < full % n else 0) for i in range(n)]
    result = nx.DiGraph()
    result.graph.update(graph.graph)
    for v, data in graph.nodes(data=True):
        if v != node:
            result.add_node(v, **data)
            continue
        for i, width in enumerate(widths):
            params = per * width
            result.add_node(f"{node}.tile{i}", **{**data, width_key: width, "params": params,
                                                  "weight_bytes": params * size, "tile": (i, n),
                                                  "parent": node})
        result.add_node(node, op="concat", parent=node, params=0, weight_bytes=0,
                        activation_bytes=data["activation_bytes"], buffer_bytes=0)
    for u, v in graph.edges():
        if v == node:
            for i in range(n):
                result.add_edge(u, f"{node}.tile{i}")
        else:
            result.add_edge(u, v)
    for i in range(n):
        result.add_edge(f"{node}.tile{i}", node)
    return result


# --------------------------------------------------------------------------
# fingerprint, linear_stack
# --------------------------------------------------------------------------

class TestFingerprint:
    def test_json_round_trip_keeps_it(self):
        graph = tiny("mixtral")
        assert graph_fingerprint(graph) == graph_fingerprint(graph_from_data(graph_to_data(graph)))
        plan = plan_greedy(graph, "10MiB")
        assert graph_fingerprint(Plan.from_json(plan.to_json()).graph) == graph_fingerprint(graph)

    def test_changes_with_bytes_shapes_order_and_edges(self):
        graph = tiny("llama")
        base = graph_fingerprint(graph)
        for key, value in (("activation_bytes", 1), ("out_features", 65), ("weight_bytes", 3)):
            changed = graph.copy()
            changed.nodes["block.0.q"][key] = value
            assert graph_fingerprint(changed) != base, key
        edges = graph.copy()
        edges.remove_edge("embed", "block.0.attn_add")
        assert graph_fingerprint(edges) != base
        assert graph_fingerprint(tiny("llama", batch=2)) != base

    def test_does_not_mutate_and_rejects_other_types(self):
        graph = tiny("llama")
        before = graph_to_data(graph)
        graph_fingerprint(graph)
        assert graph_to_data(graph) == before
        with pytest.raises(InputError, match="`graph` must be a networkx.DiGraph or a LayerTable"):
            graph_fingerprint([1, 2])


class TestLinearStack:
    def test_bytes_and_shapes(self):
        graph = linear_stack(16, 4096)
        assert list(graph)[:2] == ["linear.0", "linear.1"] and graph.number_of_edges() == 15
        node = graph.nodes["linear.3"]
        assert node["weight_bytes"] == 32 * 2**20 and node["params"] == 4096 * 4096
        assert node["activation_bytes"] == 16 * 512 * 4096 * 2
        assert linear_stack(2, 8, bias=True, dtype="fp32").nodes["linear.0"]["weight_bytes"] == (64 + 8) * 4

    @pytest.mark.parametrize("kwargs, match", [
        ({"n_layers": 0, "width": 8}, "`n_layers` must be a positive integer, got 0"),
        ({"n_layers": 2, "width": True}, "`width` must be a positive integer, got True"),
        ({"n_layers": 2, "width": 8, "batch": -1}, "`batch` must be a positive integer"),
    ])
    def test_errors(self, kwargs, match):
        with pytest.raises(InputError, match=match):
            linear_stack(**kwargs)


# --------------------------------------------------------------------------
# build
# --------------------------------------------------------------------------

class TestBuild:
    @pytest.mark.parametrize("name", sorted(CONFIGS))
    @pytest.mark.parametrize("granularity", ["op", "block"])
    def test_parameter_count_of_every_node_equals_params(self, name, granularity):
        graph = tiny(name, granularity=granularity)
        model = build(graph)
        for node in graph:
            assert model.node_params(node) == graph.nodes[node]["params"], node
        assert sum(p.numel() for p in model.parameters()) == graph.graph["params"]

    @pytest.mark.parametrize("name", ["llama", "mixtral", "bert", "falcon"])
    def test_op_and_block_granularity_compute_the_same_function(self, name):
        op = build(tiny(name), seed=3).forward()
        block = build(tiny(name, granularity="block"), seed=3).forward()
        assert op.keys() == block.keys()
        for key in op:
            torch.testing.assert_close(op[key], block[key])

    def test_tied_head_borrows_the_embedding_table(self):
        model = build(tiny("gpt2"))
        head = next(step for step in model.steps if step.node == "lm_head").module
        embed = next(step for step in model.steps if step.node == "embed").module
        assert head.tied is embed and model.node_params("lm_head") == 0

    def test_seed_decides_weights_and_inputs(self):
        graph = tiny("llama")
        a, b, c = build(graph, seed=1), build(graph, seed=1), build(graph, seed=2)
        torch.testing.assert_close(a.forward()["lm_head"], b.forward()["lm_head"])
        assert not torch.equal(a.forward()["lm_head"], c.forward()["lm_head"])

    def test_shapes_and_dtype(self):
        model = build(tiny("bert"), dtype="bf16")
        out = model.forward()
        assert tuple(out["pooler"].shape) == (4, 64) and out["pooler"].dtype == torch.bfloat16
        assert model.dtype == torch.bfloat16 and build(tiny("bert")).dtype == torch.float32

    def test_layers_instance_and_linear_stack(self):
        graph = linear_stack(3, 16, batch=2, seq_len=4)
        out = build(graph).forward()["linear.2"]
        assert tuple(out.shape) == (8, 16)

    def test_does_not_mutate_the_graph(self):
        graph = tiny("mixtral")
        before = graph_to_data(graph)
        build(graph, plan_greedy(graph, "1MiB"))
        assert graph_to_data(graph) == before

    @pytest.mark.parametrize("change, match", [
        (lambda g: g.nodes["block.0.q"].pop("op"), "node 'block.0.q' has no `op` attribute"),
        (lambda g: g.nodes["block.0.q"].update(op="conv2d"), "cannot materialise op 'conv2d'"),
        (lambda g: g.graph.pop("batch"), "graph attribute `batch`"),
        (lambda g: g.nodes["block.0.act"].update(fn="swoosh_mul"), "activation `fn` must be one of"),
    ])
    def test_bad_graphs(self, change, match):
        graph = tiny("llama")
        change(graph)
        with pytest.raises(InputError, match=match):
            build(graph)

    def test_bad_dtype_and_device(self):
        graph = tiny("llama")
        with pytest.raises(InputError, match="`dtype` must be one of fp32, bf16, fp16"):
            build(graph, dtype="fp8")
        with pytest.raises(InputError, match="`device` must be 'cpu' or 'cuda'"):
            build(graph, device="meta")

    def test_plan_of_another_graph_is_refused(self):
        plan = plan_greedy(tiny("llama"), "1MiB")
        with pytest.raises(InputError, match="`plan` does not match `graph`: the plan.s graph \\(fingerprint"):
            build(tiny("llama", batch=2), plan)


class TestTiles:
    @pytest.mark.parametrize("name, node, n", [
        ("llama", "block.0.q", 2), ("llama", "lm_head", 3), ("llama", "embed", 4), ("llama", "block.1.down", 3),
        ("mixtral", "block.0.expert.1", 3), ("gpt2", "embed", 2), ("bert", "block.0.fc1", 5),
    ])
    def test_tiled_model_computes_the_untiled_function(self, name, node, n):
        graph = tiny(name)
        tiled = tile_node(graph, node, n)
        cachefit.graphs.validate(tiled)
        assert sum(d["params"] for _, d in tiled.nodes(data=True)) == graph.graph["params"]
        model = build(tiled, seed=5)
        for v in tiled:
            assert model.node_params(v) == tiled.nodes[v]["params"], v
        reference = build(graph, seed=5).forward()
        out = model.forward()
        for key in reference:
            torch.testing.assert_close(out[key], reference[key], rtol=1e-5, atol=1e-5)

    def test_tiled_plan_runs_equivalently(self):
        graph = tile_node(tile_node(tiny("llama"), "embed", 2), "block.1.up", 2)
        plan = plan_greedy(graph, "40KiB", chunk_fraction=0.5)
        assert plan.ok and plan.k > 2
        result = quick_run(plan, micro_batches=2, schedule="all")
        assert result.equivalent and all(s.max_abs_diff < 1e-4 for s in result.schedules)
        untiled = build(tiny("llama")).forward()["lm_head"]
        tiled = build(graph).forward()["lm_head"]
        torch.testing.assert_close(tiled, untiled, rtol=1e-5, atol=1e-5)

    @pytest.mark.parametrize("name, granularity", [("gpt2", "op"), ("mixtral", "op"), ("bert", "block"),
                                                   ("llama", "block")])
    def test_graphs_tile_output_runs_equivalently(self, name, granularity):
        tile = getattr(cachefit.graphs, "tile", None)
        if tile is None:
            pytest.skip("needs cachefit.graphs.tile")
        graph = tiny(name, granularity=granularity)
        tiled = tile(graph, "20KiB", chunk_fraction=0.5)
        assert any("tile" in d for _, d in tiled.nodes(data=True))
        plan = plan_greedy(tiled, "20KiB", chunk_fraction=0.5)
        assert plan.ok, plan.reason
        reference = build(graph, seed=2).forward()
        out = build(tiled, seed=2).forward()
        for key in reference:
            torch.testing.assert_close(out[key], reference[key], rtol=1e-5, atol=1e-5)
        assert quick_run(plan, micro_batches=2, schedule="all").equivalent

    def test_tile_without_parent_is_refused(self):
        graph = tile_node(tiny("llama"), "block.0.q", 2)
        del graph.nodes["block.0.q.tile0"]["parent"]
        with pytest.raises(InputError, match="has `tile` but no `parent`"):
            build(graph)


# --------------------------------------------------------------------------
# run: equivalence on the CPU
# --------------------------------------------------------------------------

class TestRunEquivalence:
    @pytest.mark.parametrize("name, capacity, micro_batches", [
        ("llama", "48KiB", 4), ("llama", "200KiB", 2), ("llama", "10MiB", 1),
        ("gpt2", "60KiB", 2), ("mixtral", "200KiB", 4), ("bert", "60KiB", 2), ("falcon", "60KiB", 4),
        ("opt", "40KiB", 2),
    ])
    def test_every_schedule_matches_the_unpartitioned_model(self, name, capacity, micro_batches):
        graph = tiny(name)
        plan = plan_greedy(graph, capacity, chunk_fraction=1 / micro_batches)
        assert plan.ok, plan.reason
        result = quick_run(plan, micro_batches=micro_batches, schedule="all")
        assert [s.name for s in result.schedules] == ["eager", "batched", "token-major", "partition-major"]
        for schedule in result.schedules:
            assert schedule.equivalent and schedule.max_abs_diff < 1e-4 and schedule.rel_error < 1e-5, schedule
        assert result.plan["k"] == plan.k == len(result.groups)

    def test_block_granularity_plan(self):
        plan = plan_greedy(tiny("mixtral", granularity="block"), "200KiB", chunk_fraction=0.5)
        assert plan.k >= 2
        assert quick_run(plan, chunk_tokens=16, schedule="all").equivalent

    def test_partitioned_output_equals_model_output(self):
        graph = tiny("llama")
        plan = plan_greedy(graph, "48KiB", chunk_fraction=0.25)
        model = build(graph, plan, seed=7)
        expected = model.forward()["lm_head"].clone()
        result = quick_run(plan, model, chunk_tokens=8, schedule="partition-major")
        assert result.schedules[0].max_abs_diff < 1e-5
        torch.testing.assert_close(build(graph, seed=7).forward()["lm_head"], expected)

    def test_launch_counts_and_timings_on_cpu(self):
        graph = tiny("llama")
        plan = plan_greedy(graph, "48KiB", chunk_fraction=0.25)
        result = quick_run(plan, micro_batches=4, schedule="all", iters=2)
        nodes = graph.number_of_nodes()
        counts = {s.name: s.launches_per_pass for s in result.schedules}
        assert counts == {"eager": nodes, "batched": nodes, "token-major": 4 * nodes, "partition-major": 4 * nodes}
        pm = result.schedule("partition-major")
        assert len(pm.per_group_ms) == plan.k and all(ms > 0 for ms in pm.per_group_ms)
        assert pm.ms_min <= pm.ms_per_pass <= pm.ms_max and pm.tokens_per_s > 0
        assert set(result.speedups["partition-major"]) == {"token-major", "batched", "eager"}
        ratio = result.speedups["partition-major"]["token-major"]
        assert ratio == pytest.approx(result.schedule("token-major").ms_per_pass / pm.ms_per_pass)
        assert result.hbm_floor_ms == pytest.approx(result.weight_bytes / result.copy_bandwidth * 1e3)
        assert all(group.measured_bytes is None for group in result.groups)
        assert result.replay_overhead_us_per_group is None and result.best is not None

    def test_group_weight_bytes_are_the_allocated_parameters(self):
        graph = tiny("llama")
        plan = plan_greedy(graph, "48KiB", chunk_fraction=0.25)
        result = quick_run(plan, micro_batches=4)
        assert sum(g.weight_bytes for g in result.groups) == result.weight_bytes
        assert result.weight_bytes == graph.graph["params"] * 4  # fp32 on the CPU
        for group, nodes in zip(result.groups, plan.partitions):
            expected = sum(graph.nodes[v]["params"] for v in nodes) * 4
            assert group.weight_bytes == expected and group.planned_bytes == plan.sizes[group.index]

    def test_l2_persist_is_ignored_on_cpu_with_a_note(self):
        plan = plan_greedy(linear_stack(2, 16, batch=2, seq_len=4), "10MiB")
        result = quick_run(plan, l2_persist=True)
        assert any("CUDA only" in note for note in result.notes) and result.l2 == {"requested": True}

    def test_note_when_run_fraction_differs_from_plan(self):
        plan = plan_greedy(linear_stack(2, 16, batch=2, seq_len=4), "10MiB", chunk_fraction=1.0)
        result = quick_run(plan, micro_batches=2)
        assert any("chunk fraction 1" in note for note in result.notes)


class TestRunRefusals:
    def test_model_from_another_graph_is_refused_before_anything_runs(self):
        plan = plan_greedy(tiny("llama"), "48KiB", chunk_fraction=0.5)
        other = build(tiny("llama", seq_len=16))

        def boom(*args):
            raise AssertionError("a step ran")

        for step in other.steps:
            step.module = boom
        with pytest.raises(InputError, match="`plan` does not match `model`"):
            run(plan, other, micro_batches=2)

    def test_infeasible_plan_is_refused(self):
        plan = plan_greedy(tiny("llama"), "1KiB")
        assert not plan.ok
        with pytest.raises(InputError, match="`plan` must hold groups"):
            run(plan)

    def test_plan_out_of_order_or_incomplete(self):
        graph = linear_stack(3, 8, batch=1, seq_len=4)
        good = plan_greedy(graph, "10MiB", k=3)
        import dataclasses
        backwards = dataclasses.replace(good, partitions=(("linear.1",), ("linear.0",), ("linear.2",)))
        with pytest.raises(InputError, match="edge 'linear.0' -> 'linear.1' goes from group 1 back to group 0"):
            run(backwards)
        missing = dataclasses.replace(good, partitions=(("linear.0",), ("linear.1",)))
        with pytest.raises(InputError, match="leaves 1 node"):
            run(missing)
        assert check_plan_groups(good) == [["linear.0"], ["linear.1"], ["linear.2"]]

    @pytest.mark.parametrize("kwargs, match", [
        ({"chunk_tokens": 8, "micro_batches": 2}, r"chunk_tokens` × `micro_batches` must equal the tokens of one "
                                                  r"pass, batch × seq_len = 32, got 8 × 2 = 16"),
        ({"chunk_tokens": 3}, "`chunk_tokens` must divide the tokens of one pass"),  # 4 runs: chunked prefill
        ({"micro_batches": 3}, "`micro_batches` must divide the tokens of one pass"),
        ({"micro_batches": 0}, "`micro_batches` must be a positive integer, got 0"),
        ({"schedule": "fast"}, "`schedule` must be 'all' or one of"),
        ({"iters": 0}, "`iters` must be an integer >= 1"),
        ({"device": "tpu"}, "`device` must be 'cpu' or 'cuda'"),
    ])
    def test_bad_arguments(self, kwargs, match):
        plan = plan_greedy(tiny("llama"), "10MiB")
        with pytest.raises(InputError, match=match):
            run(plan, **kwargs)

    def test_rows_without_attention_need_not_be_whole_sequences(self):
        plan = plan_greedy(linear_stack(2, 16, batch=2, seq_len=8), "10MiB")
        assert quick_run(plan, chunk_tokens=4, schedule="all").equivalent


class TestPacking:
    def test_each_group_in_one_contiguous_buffer(self):
        graph = tiny("mixtral")
        plan = plan_greedy(graph, "200KiB", chunk_fraction=0.5)
        model = build(graph, plan)
        groups = check_plan_groups(plan)
        assert len(model.group_buffers) == len(groups) == plan.k
        for group, buffer in zip(groups, model.group_buffers):
            start, end = buffer.data_ptr(), buffer.data_ptr() + buffer.numel()
            for parameter in model.parameters(group):
                assert start <= parameter.data_ptr() and parameter.data_ptr() + parameter.nbytes <= end
                assert (parameter.data_ptr() - start) % 256 == 0

    def test_packing_keeps_values(self):
        graph = tiny("gpt2")
        model = build(graph, seed=4)
        before = model.forward()["lm_head"].clone()
        spans = pack_group_weights(model, [[v for v in graph if v < "block.1"], [v for v in graph if v >= "block.1"]])
        assert len(spans) == 2 and all(extent > 0 for _, extent in spans)
        torch.testing.assert_close(model.forward()["lm_head"], before)


# --------------------------------------------------------------------------
# the user's own module (torch.fx)
# --------------------------------------------------------------------------

class Branchy(torch.nn.Module):
    """An MLP with a skip connection, a branch that rejoins and a parameter used through a function."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)
        self.left, self.right = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)
        self.scale = torch.nn.Parameter(torch.linspace(0.5, 1.5, 16))

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        y = self.fc2(h) + x
        y = self.left(y) * torch.sigmoid(self.right(y))
        return (y * self.scale).softmax(-1)


def fx_graph(module, example):
    """The module's graph: `cachefit.graphs.from_torch` when present, else a from_torch-style graph
    (one node per call with a tensor output, named after the fx node)."""
    from_torch = getattr(cachefit.graphs, "from_torch", None)
    if from_torch is not None:
        return from_torch(module, (example,))
    from torch.fx.passes.shape_prop import ShapeProp

    traced = torch.fx.symbolic_trace(module)
    ShapeProp(traced).propagate(example)
    graph = nx.DiGraph(name="branchy", batch=example.shape[0], seq_len=1, source="torch.fx", dtype="fp32")
    calls = [n for n in traced.graph.nodes if n.op in ("call_module", "call_function", "call_method")]
    names = {n.name for n in calls}
    for node in calls:
        weights = (sum(p.numel() * 4 for p in traced.get_submodule(node.target).parameters())
                   if node.op == "call_module" else 0)
        graph.add_node(node.name, op=node.op, weight_bytes=weights,
                       activation_bytes=node.meta["tensor_meta"].shape.numel() * 4, buffer_bytes=0)
        graph.add_edges_from((arg.name, node.name) for arg in node.all_input_nodes if arg.name in names)
    return graph


class TestTorchModule:
    def test_split_module_matches_the_module(self):
        module, x = Branchy(), torch.randn(8, 16)
        graph = fx_graph(module, x)
        plan = plan_greedy(graph, 4000, chunk_fraction=0.25)
        assert plan.ok and plan.k >= 3
        result = quick_run(plan, module, example_inputs=x, micro_batches=4, schedule="all")
        assert result.equivalent and all(s.max_abs_diff < 1e-5 for s in result.schedules)
        # the scale parameter joins the group of its user (the multiply), not group 0
        assert result.groups[-1].weight_bytes >= 16 * 4
        assert sum(g.weight_bytes for g in result.groups) == sum(p.nbytes for p in module.parameters())

    def test_caller_module_is_not_modified(self):
        module, x = Branchy(), torch.randn(4, 16)
        before = {k: v.clone() for k, v in module.state_dict().items()}
        plan = plan_greedy(fx_graph(module, x), "1MiB")
        quick_run(plan, module, example_inputs=x, micro_batches=2)
        assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
        assert module.training

    def test_tied_weight_through_a_function(self):
        class TinyLM(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.emb, self.l1, self.norm = torch.nn.Embedding(50, 16), torch.nn.Linear(16, 16), torch.nn.LayerNorm(16)

            def forward(self, tokens):
                h = self.emb(tokens)
                h = self.norm(h + torch.relu(self.l1(h)))
                return h @ self.emb.weight.T

        module, tokens = TinyLM(), torch.randint(0, 50, (4, 6))
        if getattr(cachefit.graphs, "from_torch", None) is None:
            pytest.skip("needs cachefit.graphs.from_torch")
        plan = plan_greedy(cachefit.graphs.from_torch(module, (tokens,)), "1MiB", k=3)
        result = quick_run(plan, module, example_inputs=tokens, micro_batches=2, schedule="all")
        assert result.equivalent and all(s.max_abs_diff < 1e-5 for s in result.schedules)
        # the shared table is packed once, with its first user
        assert sum(g.weight_bytes for g in result.groups) == sum(p.nbytes for p in module.parameters())

    def test_refusals(self):
        module, x = Branchy(), torch.randn(4, 16)
        graph = fx_graph(module, x)
        plan = plan_greedy(graph, "1MiB")
        with pytest.raises(InputError, match="`example_inputs` is required"):
            run(plan, module)
        stranger = nx.relabel_nodes(graph, {"fc1": "encoder"})
        stranger.nodes["encoder"]["target"] = "encoder"
        with pytest.raises(InputError, match="plan node 'encoder' is not a node of the traced module"):
            run(plan_greedy(stranger, "1MiB"), module, example_inputs=x)
        with pytest.raises(InputError, match="`model` must be None, a BuiltModel"):
            run(plan, "model")


# --------------------------------------------------------------------------
# results, rendering, CLI
# --------------------------------------------------------------------------

class TestResults:
    def test_json_and_render(self, tmp_path):
        from rich.console import Console

        plan = plan_greedy(tiny("llama"), "48KiB", chunk_fraction=0.5)
        result = quick_run(plan, micro_batches=2, schedule="all")
        path = tmp_path / "run.json"
        result.to_json(path)
        data = json.loads(path.read_text())
        assert data["format"] == "cachefit.run" and data["equivalent"] is True
        assert [s["name"] for s in data["schedules"]] == ["eager", "batched", "token-major", "partition-major"]
        assert data["groups"][0]["planned_bytes"] == plan.sizes[0] and data["best"] in {
            s["name"] for s in data["schedules"]}
        console = Console(record=True, width=200)
        for renderable in render(result):
            console.print(renderable)
        text = console.export_text()
        for expected in ("partition-major", "PASS", "HBM floor", "vs token-major", "planned", "measured K/V",
                         "tensor bytes at bf16"):
            assert expected in text


class TestCli:
    def test_run_plan_file(self, tmp_path):
        from click.testing import CliRunner

        from cachefit.cli_run import run as run_command

        plan = plan_greedy(tiny("llama"), "48KiB", chunk_fraction=0.25)
        plan_path, out = tmp_path / "plan.json", tmp_path / "result.json"
        plan.to_json(plan_path)
        result = CliRunner().invoke(run_command, [str(plan_path), "--device", "cpu", "--chunk-tokens", "8",
                                                  "--micro-batches", "4", "--schedule", "all", "--json", str(out),
                                                  "--iters", "1", "--warmup", "0"])
        assert result.exit_code == 0, result.output
        assert "4/4 schedule(s) pass" in result.output and "(PASS)" in result.output
        assert "partition-major" in result.output
        assert json.loads(out.read_text())["micro_batches"] == 4

    def test_run_graph_file_plans_first(self, tmp_path):
        from click.testing import CliRunner

        from cachefit.cli_run import run as run_command

        path = tmp_path / "stack.json"
        path.write_text(json.dumps(graph_to_data(linear_stack(4, 64, batch=2, seq_len=16))))
        runner = CliRunner()
        result = runner.invoke(run_command, [str(path), "--capacity", "20KiB", "--micro-batches", "4",
                                             "--iters", "1", "--warmup", "0"])
        assert result.exit_code == 0, result.output
        assert "plan: 2 group(s)" in result.output
        result = runner.invoke(run_command, [str(path), "--capacity", "1KiB"])
        assert result.exit_code == 1 and "no plan" in result.output
        result = runner.invoke(run_command, [str(path), "--micro-batches", "5"])
        assert result.exit_code == 2 and "`micro_batches` must divide" in result.output
        assert "Traceback" not in result.output


# --------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------

@pytest.mark.gpu
class TestCuda:
    @pytest.mark.parametrize("name, dtype", [("llama", "bf16"), ("mixtral", "bf16"), ("gpt2", "fp32"),
                                             ("bert", "bf16")])
    def test_graph_schedules_match_eager(self, name, dtype):
        graph = tiny(name, batch=8, seq_len=16)
        plan = plan_greedy(graph, "60KiB", chunk_fraction=0.25)
        assert plan.ok
        result = run(plan, device="cuda", dtype=dtype, micro_batches=4, schedule="all", warmup=1, iters=3)
        assert [s.name for s in result.schedules][-2:] == ["partition-major-fused", "partition-major-replay"]
        assert result.equivalent, [(s.name, s.max_abs_diff, s.rel_error) for s in result.schedules]
        pm = result.schedule("partition-major")
        assert pm.graph_replays_per_pass == plan.k and len(pm.per_group_ms) == plan.k
        assert result.schedule("token-major").graph_replays_per_pass == 4
        assert result.schedule("batched").graph_replays_per_pass == 1
        assert result.schedule("partition-major-replay").graph_replays_per_pass == 4 * plan.k
        assert result.replay_overhead_us_per_group is not None and result.replay_overhead_us_per_chunk is not None
        assert all(g.measured_bytes is not None and g.measured_bytes >= g.weight_bytes for g in result.groups)

    def test_cuda_output_close_to_cpu_reference(self):
        graph = tiny("llama", batch=4, seq_len=16)
        plan = plan_greedy(graph, "48KiB", chunk_fraction=0.5)
        cpu = build(graph, plan, seed=1).forward()["lm_head"]
        gpu_model = build(graph, plan, seed=1, device="cuda", dtype="fp32")
        # different RNG streams per device: compare the structure, not the values
        assert tuple(gpu_model.forward()["lm_head"].shape) == tuple(cpu.shape)
        result = run(plan, gpu_model, micro_batches=2, schedule="partition-major", warmup=1, iters=2)
        assert result.device.startswith("cuda") and result.equivalent

    def test_l2_persist_window_on_stack(self):
        graph = linear_stack(4, 1024, batch=4, seq_len=256)
        plan = plan_greedy(graph, "4MiB", chunk_fraction=0.25)
        assert plan.k == 4
        result = run(plan, device="cuda", micro_batches=4, schedule=["partition-major", "batched"],
                     l2_persist=True, warmup=1, iters=3)
        assert result.equivalent
        assert result.l2["requested"] and result.l2["status"]
        if result.l2.get("available"):
            assert result.schedule("partition-major").l2_windows > 0
            assert result.l2["kernel_nodes_with_window"] == result.schedule("partition-major").l2_windows
        else:  # unavailable must be said, never silent
            assert any("L2 persistence" in note for note in result.notes)
        assert result.schedule("partition-major").launches_per_pass

    def test_refusal_before_capture_on_cuda(self):
        plan = plan_greedy(tiny("llama"), "48KiB", chunk_fraction=0.5)
        other = build(tiny("gpt2"), device="cuda")
        with pytest.raises(InputError, match="`plan` does not match `model`"):
            run(plan, other, micro_batches=2)


@pytest.mark.parametrize("name", ["cachefit.executor", "cachefit.executor.fingerprint", "cachefit.executor.stack",
                                  "cachefit.executor.model", "cachefit.executor.nodes", "cachefit.executor.runner",
                                  "cachefit.executor.api", "cachefit.executor.results",
                                  "cachefit.executor.report", "cachefit.executor.cuda", "cachefit.executor.fx"])
def test_doctests(name):
    """The executor's docstring examples (its package folder is mapped, so the repo-wide walk misses it)."""
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
