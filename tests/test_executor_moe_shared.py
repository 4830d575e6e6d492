"""Mixture-of-experts layers with shared experts in the executor: DeepSeek-V2/V3 and Qwen2-MoE.

The executor's MoE layer (router, experts, shared expert, Qwen2-MoE's shared
gate, combine) against transformers' own module with the same weights, and
whole plans of these models run partitioned against unpartitioned.
"""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import cachefit  # noqa: E402
from cachefit.errors import InputError  # noqa: E402
from cachefit.executor import build, run  # noqa: E402
from cachefit.executor.nodes import MoECombine, moe_routing, order_inputs  # noqa: E402
from cachefit.executor.verify import module_weight_bytes  # noqa: E402
from cachefit.graphs.hf import from_hf_config  # noqa: E402

pytestmark = pytest.mark.slow

BATCH, SEQ = 2, 16

#: DeepSeek-V3 with latent attention, one dense layer, then routed + shared experts (the reviewer's config).
DEEPSEEK_V3 = dict(model_type="deepseek_v3", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=128, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
                   n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24,
                   qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, vocab_size=97,
                   max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False)
#: 16 experts: transformers' default 8 groups of 2, the best 4 groups kept (group-limited routing).
DEEPSEEK_V3_GROUPED = dict(DEEPSEEK_V3, n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=2)
DEEPSEEK_V2 = dict(DEEPSEEK_V3, model_type="deepseek_v2", q_lora_rank=None, n_shared_experts=2)
QWEN2_MOE = dict(model_type="qwen2_moe", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=128, moe_intermediate_size=32,
                 shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2, vocab_size=97,
                 max_position_embeddings=64)
#: Qwen2-MoE whose first layer is dense (mlp_only_layers), so blocks differ by layer.
QWEN2_MOE_MIXED = dict(QWEN2_MOE, mlp_only_layers=[0])

MODELS = {"deepseek_v3": DEEPSEEK_V3, "qwen2_moe": QWEN2_MOE, "qwen2_moe_mixed": QWEN2_MOE_MIXED,
          "deepseek_v2": DEEPSEEK_V2}


# --------------------------------------------------------------------------
# against transformers' module
# --------------------------------------------------------------------------

def _hf_config(config):
    """The transformers config object of a cachefit test config (the same fields)."""
    fields = {key: value for key, value in config.items() if key != "model_type"}
    classes = {"deepseek_v3": transformers.DeepseekV3Config, "deepseek_v2": transformers.DeepseekV2Config,
               "qwen2_moe": transformers.Qwen2MoeConfig}
    hf = classes[config["model_type"]](**fields)
    hf._experts_implementation = "eager"
    return hf


def _hf_moe(config):
    hf = _hf_config(config)
    if config["model_type"] == "qwen2_moe":
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
        return Qwen2MoeSparseMoeBlock(hf).eval()
    if config["model_type"] == "deepseek_v2":
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe
        return DeepseekV2Moe(hf).eval()
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    return DeepseekV3MoE(hf).eval()


def _copy_mlp(target, expert):
    target.gate_proj.weight.copy_(expert.gate.weight)
    target.up_proj.weight.copy_(expert.up.weight)
    target.down_proj.weight.copy_(expert.out.weight)


def _load(hf_moe, modules, layer, experts):
    """Copy the executor's weights of `layer`'s MoE nodes into transformers' module."""
    prefix = f"block.{layer}"
    with torch.no_grad():
        hf_moe.gate.weight.copy_(modules[f"{prefix}.router"].weight)
        for index in range(experts):
            expert = modules[f"{prefix}.expert.{index}"]
            hf_moe.experts.gate_up_proj[index].copy_(torch.cat((expert.gate.weight, expert.up.weight)))
            hf_moe.experts.down_proj[index].copy_(expert.out.weight)
        shared = modules[f"{prefix}.shared_expert"]
        if hasattr(hf_moe, "shared_expert_gate"):
            _copy_mlp(hf_moe.shared_expert, shared)
            hf_moe.shared_expert_gate.weight.copy_(modules[f"{prefix}.shared_gate"].weight)
        else:
            _copy_mlp(hf_moe.shared_experts, shared)


def _executor_moe(model, layer, x):
    """The executor's MoE of `layer` on `x`: its nodes run in graph order with their own input order."""
    prefix = f"block.{layer}."
    values = {f"block.{layer}.mlp_norm": x}
    for step in model.steps:
        if step.node.startswith(prefix) and step.node[len(prefix):].split(".")[0] in (
                "router", "expert", "shared_expert", "shared_gate", "combine"):
            values[step.node] = step.module(*(values[name] for name in step.inputs))
    return values[f"block.{layer}.combine"]


class TestAgainstTransformers:
    """The executor's MoE layer computes transformers 5's module, shared expert and routing included."""

    @pytest.mark.parametrize("name,config", [("qwen2_moe", QWEN2_MOE), ("deepseek_v3_grouped", DEEPSEEK_V3_GROUPED),
                                             ("deepseek_v2", DEEPSEEK_V2)])
    def test_moe_layer_matches_transformers(self, name, config):
        graph = from_hf_config(config, batch=BATCH, seq_len=SEQ, granularity="op")
        model = build(graph, dtype=torch.float32)
        modules = {step.node: step.module for step in model.steps}
        hf_moe = _hf_moe(config)
        experts = graph.nodes["block.1.combine"]["num_experts"]
        _load(hf_moe, modules, 1, experts)
        x = torch.randn(BATCH * SEQ, 64, generator=torch.Generator().manual_seed(3))
        expected = hf_moe(x.view(BATCH, SEQ, 64)).reshape(BATCH * SEQ, 64)
        torch.testing.assert_close(_executor_moe(model, 1, x), expected.detach(), rtol=1e-5, atol=1e-5)

    def test_ungrouped_deepseek_v3_matches_transformers_with_one_group(self):
        """4 experts cannot form transformers' default 8 groups (it fails on such a config): the executor
        chooses among all experts, which is transformers with n_group = topk_group = 1."""
        graph = from_hf_config(DEEPSEEK_V3, batch=BATCH, seq_len=SEQ, granularity="op")
        model = build(graph, dtype=torch.float32)
        modules = {step.node: step.module for step in model.steps}
        assert modules["block.1.combine"].routing.groups == 1
        hf_moe = _hf_moe(dict(DEEPSEEK_V3, n_group=1, topk_group=1))
        _load(hf_moe, modules, 1, 4)
        x = torch.randn(BATCH * SEQ, 64, generator=torch.Generator().manual_seed(4))
        expected = hf_moe(x.view(BATCH, SEQ, 64)).reshape(BATCH * SEQ, 64)
        torch.testing.assert_close(_executor_moe(model, 1, x), expected.detach(), rtol=1e-5, atol=1e-5)

    @pytest.mark.parametrize("normalise", [False, True])
    def test_qwen_norm_topk_prob_is_read_from_the_config(self, normalise):
        """A config field the router reads (here norm_topk_prob) wins over transformers' default."""
        config = dict(QWEN2_MOE, norm_topk_prob=normalise)
        graph = from_hf_config(QWEN2_MOE, batch=BATCH, seq_len=SEQ, granularity="op")
        model = build(graph, dtype=torch.float32)
        modules = {step.node: step.module for step in model.steps}
        modules["block.1.combine"].routing = moe_routing({**graph.graph["config"], "norm_topk_prob": normalise})
        hf_moe = _hf_moe(config)
        _load(hf_moe, modules, 1, 4)
        x = torch.randn(BATCH * SEQ, 64, generator=torch.Generator().manual_seed(5))
        expected = hf_moe(x.view(BATCH, SEQ, 64)).reshape(BATCH * SEQ, 64)
        torch.testing.assert_close(_executor_moe(model, 1, x), expected.detach(), rtol=1e-5, atol=1e-5)


class TestRouting:
    def test_family_defaults_are_transformers_defaults(self):
        v3 = moe_routing({"model_type": "deepseek_v3", "num_local_experts": 256})
        assert (v3.scoring, v3.normalise, v3.scale, v3.groups, v3.top_groups) == ("sigmoid", True, 2.5, 8, 4)
        v2 = moe_routing({"model_type": "deepseek_v2", "num_local_experts": 64})
        assert (v2.scoring, v2.normalise, v2.scale, v2.groups) == ("softmax", False, 1.0, 1)
        qwen = moe_routing({"model_type": "qwen2_moe", "num_local_experts": 60})
        assert (qwen.scoring, qwen.normalise, qwen.scale) == ("softmax", False, 1.0)
        mixtral = moe_routing({"model_type": "mixtral", "num_local_experts": 8})
        assert (mixtral.scoring, mixtral.normalise, mixtral.scale) == ("softmax", True, 1.0)

    def test_config_fields_win(self):
        routing = moe_routing({"model_type": "deepseek_v2", "num_local_experts": 160, "topk_method":
                               "group_limited_greedy", "n_group": 8, "topk_group": 3, "routed_scaling_factor": 16.0})
        assert (routing.groups, routing.top_groups, routing.scale, routing.group_score) == (8, 3, 16.0, "max")

    def test_weights_are_the_scaled_normalised_sigmoid_top_k(self):
        logits = torch.tensor([[2.0, -1.0, 0.5, 1.0]])
        weights = moe_routing({"model_type": "deepseek_v3", "num_local_experts": 4}).weights(logits, 2)
        top = torch.sigmoid(torch.tensor([2.0, 1.0]))
        torch.testing.assert_close(weights, torch.tensor([[top[0], 0.0, 0.0, top[1]]]) / top.sum() * 2.5)


# --------------------------------------------------------------------------
# whole plans: partitioned against unpartitioned
# --------------------------------------------------------------------------

def _plan(config, granularity, chunk_fraction, capacity=None):
    """A greedy plan in a quarter of the model's weights and activations (3 groups or more), or `capacity`."""
    graph = from_hf_config(config, batch=BATCH, seq_len=SEQ, granularity=granularity)
    if capacity is None:
        capacity = sum(data["weight_bytes"] + data["activation_bytes"] for _, data in graph.nodes(data=True)) // 4
    plan = cachefit.plan(graph, capacity, solver="greedy", memory="liveness+kv", chunk_fraction=chunk_fraction,
                         tile=True)
    assert plan.ok and cachefit.check(plan).ok
    return plan


class TestRun:
    @pytest.mark.parametrize("name", sorted(MODELS))
    @pytest.mark.parametrize("granularity", ["op", "block"])
    @pytest.mark.parametrize("chunk_fraction", [4 / 32, 1.0], ids=["chunked", "whole"])
    def test_partitioned_matches_unpartitioned(self, name, granularity, chunk_fraction):
        plan = _plan(MODELS[name], granularity, chunk_fraction)
        assert plan.k >= 3
        result = run(plan, schedule=["partition-major", "token-major"], iters=1, warmup=0)
        assert result.equivalent and all(schedule.equivalent for schedule in result.schedules)
        assert result.chunk_tokens == (4 if chunk_fraction < 1 else BATCH * SEQ)

    def test_tiled_shared_expert_runs(self):
        """A shared expert split into tiles (joined by a sum) still reaches the combine as the shared expert."""
        plan = _plan(QWEN2_MOE, "op", 4 / 32, capacity="16KiB")
        assert "block.1.shared_expert.tile.1" in plan.graph
        assert plan.graph.nodes["block.1.shared_expert"]["op"] == "concat"  # the join keeps the node's name
        result = run(plan, schedule=["partition-major"], iters=1, warmup=0)
        assert result.equivalent


class TestWeightBytes:
    @pytest.mark.parametrize("name", sorted(MODELS))
    @pytest.mark.parametrize("granularity", ["op", "block"])
    def test_every_module_holds_its_nodes_weight_bytes(self, name, granularity):
        graph = from_hf_config(MODELS[name], batch=BATCH, seq_len=SEQ, granularity=granularity)
        built = module_weight_bytes(graph, 2)  # bf16
        assert built == {node: graph.nodes[node]["weight_bytes"] for node in graph}
        if granularity == "op":
            # the shared expert: n_shared × moe_intermediate_size (DeepSeek) or its own width (Qwen), gated MLP
            inner = graph.graph["config"]["shared_expert_intermediate_size"]
            assert built["block.1.shared_expert"] == 3 * 64 * inner * 2
            if "qwen" in name:
                assert built["block.1.shared_gate"] == 64 * 2
        else:
            # a dense first layer is a smaller block than a mixture-of-experts one
            assert (built["block.0"] < built["block.1"]) == (name != "qwen2_moe")


class TestRefusals:
    def test_combine_without_router_named(self):
        attrs = {"op": "moe_combine", "num_experts": 2}
        roles = {"e0": "expert", "e1": "expert", "s": "shared_expert"}
        with pytest.raises(InputError, match=r"^node 'block\.1\.combine' \(moe_combine\) needs one router, 2 experts "
                                             r"and optionally one shared_expert \(then optionally its shared_gate\) "
                                             r"as inputs, got \['e0', 'e1', 's'\]$"):
            order_inputs("block.1.combine", attrs, ["e0", "e1", "s"], lambda p: {"role": roles[p]})

    def test_gate_without_shared_expert_refused(self):
        attrs = {"op": "moe_combine", "num_experts": 1}
        roles = {"r": "router", "e0": "expert", "g": "shared_gate"}
        with pytest.raises(InputError, match=r"^node 'c' \(moe_combine\) needs one router, 1 experts"):
            order_inputs("c", attrs, ["r", "e0", "g"], lambda p: {"role": roles[p]})

    def test_inputs_ordered_router_experts_shared_gate(self):
        attrs = {"op": "moe_combine", "num_experts": 2}
        attrs_of = {"g": {"role": "shared_gate"}, "s": {"role": "shared_expert"}, "e1": {"role": "expert", "expert": 1},
                    "e0": {"role": "expert", "expert": 0}, "r": {"role": "router"}}
        assert order_inputs("c", attrs, ["g", "s", "e1", "e0", "r"], attrs_of.get) == ["r", "e0", "e1", "s", "g"]

    def test_combine_adds_the_gated_shared_expert(self):
        combine = MoECombine("c", {"experts_per_token": 1, "num_experts": 2})
        logits = torch.tensor([[0.0, 5.0]])
        experts = (torch.ones(1, 3), 2 * torch.ones(1, 3))
        shared, gate = 10 * torch.ones(1, 3), torch.zeros(1, 1)
        torch.testing.assert_close(combine(logits, *experts), 2 * torch.ones(1, 3))
        torch.testing.assert_close(combine(logits, *experts, shared), 12 * torch.ones(1, 3))
        torch.testing.assert_close(combine(logits, *experts, shared, gate), 7 * torch.ones(1, 3))


class TestRoutingFieldsKept:
    """The graph's normalised config keeps the routing fields, so the executor routes as the model's own config says."""

    @pytest.mark.parametrize("name, normalise, scale", [("qwen3-30b-a3b", True, 1.0), ("qwen1.5-moe-a2.7b", False, 1.0),
                                                         ("deepseek-v3", True, 2.5), ("deepseek-v2-lite", False, 1.0)])
    def test_embedded_moe_routing(self, name, normalise, scale):
        from cachefit import instances
        from cachefit.executor.nodes import moe_routing

        graph = instances.load(name, seq_len=8, batch=1)
        routing = moe_routing(graph.graph["config"])
        assert routing.normalise is normalise
        assert routing.scale == scale

    def test_config_field_overrides_family_default(self):
        from cachefit.executor.nodes import moe_routing
        from cachefit.graphs.transformer import transformer

        config = {"model_type": "qwen2_moe", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
                  "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 100, "num_experts": 4,
                  "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64}
        for flag in (True, False):
            graph = transformer({**config, "norm_topk_prob": flag}, batch=1, seq_len=4)
            assert graph.graph["config"]["norm_topk_prob"] is flag
            assert moe_routing(graph.graph["config"]).normalise is flag


class TestStageCutInsideMoE:
    """A pipeline stage that begins inside an MoE layer receives the router's, experts' and shared expert's outputs."""

    @pytest.mark.parametrize("name", ["qwen2_moe", "deepseek_v3"])
    def test_every_stage_runs(self, name):
        import cachefit
        from cachefit.executor import run
        from cachefit.graphs.hf import from_hf_config

        graph = from_hf_config(MODELS[name], granularity="op", seq_len=8, batch=1)
        total = sum(data["weight_bytes"] for _, data in graph.nodes(data=True))
        inside = 0
        for devices in (2, 3, 4):
            deployment = cachefit.deploy(graph, devices=devices, device_capacity=2 * total // devices,
                                         capacity="64KiB")
            assert deployment.ok and cachefit.check(deployment).ok
            for stage, sub in enumerate(deployment.stage_graphs()):
                received = {data.get("role") for _, data in sub.nodes(data=True) if data.get("op") == "stage_input"}
                inside += bool(received & {"expert", "shared_expert", "shared_gate", "router"})
                result = run(deployment, stage=stage, schedule=["partition-major"], warmup=0, iters=1)
                assert result.equivalent, (devices, stage)
        assert inside  # at least one cut falls inside an MoE layer


class TestFieldsEachRouterReads:
    """A config field that transformers' router for the family ignores is ignored here too."""

    def test_deepseek_v2_never_normalises(self):
        from cachefit.executor.nodes import moe_routing

        assert moe_routing({"model_type": "deepseek_v2", "norm_topk_prob": True}).normalise is False

    def test_deepseek_v3_always_limits_by_group(self):
        from cachefit.executor.nodes import moe_routing

        routing = moe_routing({"model_type": "deepseek_v3", "num_local_experts": 256, "topk_method": "greedy"})
        assert (routing.groups, routing.top_groups) == (8, 4)

    def test_missing_attribute_is_named(self):
        import networkx as nx

        from cachefit.errors import InputError
        from cachefit.executor.nodes import make_node_module

        graph = nx.DiGraph(dtype="fp32")
        graph.add_node("block.0.combine", op="moe_combine", experts_per_token=2)
        with pytest.raises(InputError, match=r"^node 'block\.0\.combine' \(moe_combine\) lacks the attribute "
                                             r"'num_experts' its module needs$"):
            make_node_module(graph, "block.0.combine", seq_len=4, factory={}, dtype=torch.float32, device="cpu")
