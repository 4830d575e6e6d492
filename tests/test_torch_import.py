"""Tests for `cachefit.graphs.from_torch` (torch.fx import)."""

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

import cachefit  # noqa: E402
from cachefit.errors import InputError  # noqa: E402
from cachefit.graphs import from_torch, validate  # noqa: E402


def unique_state_bytes(module, *, buffers=True):
    """Σ numel × element_size over the module's unique parameters (and buffers)."""
    tensors = {id(p): p for p in module.parameters()}
    if buffers:
        tensors.update({id(b): b for b in module.buffers()})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def total(graph, key):
    return sum(data[key] for _, data in graph.nodes(data=True))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 64)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(64, 8, bias=False)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ResidualConvBlock(nn.Module):
    def __init__(self, channels=8):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + x)


class TinyTransformer(nn.Module):
    """Embedding, one pre-norm block (MHA + MLP) and an LM head tied to the embedding."""

    def __init__(self, vocab=50, width=16, heads=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, tokens):
        h = self.embed(tokens)
        a = self.norm1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        h = h + self.down(F.gelu(self.up(self.norm2(h))))
        return self.head(h)


class FunctionalTiedHead(nn.Module):
    """The tied head written with F.linear on the embedding's weight (a get_attr in fx)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(30, 8)
        self.mix = nn.Linear(8, 8)

    def forward(self, tokens):
        return F.linear(self.mix(self.embed(tokens)), self.embed.weight)


class Branches(nn.Module):
    """x -> (left, right) -> concat -> out: two paths that rejoin."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(12, 12)
        self.left = nn.Linear(12, 6)
        self.right = nn.Sequential(nn.Linear(12, 6), nn.ReLU())
        self.out = nn.Linear(12, 3)

    def forward(self, x):
        h = self.stem(x)
        return self.out(torch.cat([self.left(h), self.right(h)], dim=-1))


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # torch.fx cannot trace a branch on a tensor's value
            return x * 2
        return x


class HasUntraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.gate = DataDependent()
        self.post = nn.Linear(4, 2)

    def forward(self, x):
        return self.post(self.gate(self.pre(x)))


class TestMLP:
    def test_nodes_weights_and_activations(self):
        module = MLP()
        graph = from_torch(module, torch.zeros(5, 16))
        assert list(graph) == ["x", "fc1", "act", "fc2"]
        assert list(graph.edges) == [("x", "fc1"), ("fc1", "act"), ("act", "fc2")]
        for name in ("fc1", "fc2"):
            sub = getattr(module, name)
            assert graph.nodes[name]["weight_bytes"] == sum(p.numel() * p.element_size() for p in sub.parameters())
        assert total(graph, "weight_bytes") == unique_state_bytes(module)
        assert graph.nodes["x"]["activation_bytes"] == 5 * 16 * 4
        assert graph.nodes["fc1"]["activation_bytes"] == 5 * 64 * 4
        assert graph.nodes["fc2"]["activation_bytes"] == 5 * 8 * 4
        assert graph.nodes["fc1"]["op"] == "linear"
        assert (graph.nodes["fc2"]["in_features"], graph.nodes["fc2"]["out_features"],
                graph.nodes["fc2"]["bias"]) == (64, 8, False)
        assert graph.graph["source"] == "torch.fx" and graph.graph["dtype"] == "fp32"
        assert graph.graph["shape_propagation"] == "fake"
        assert graph.graph["params"] == sum(p.numel() for p in module.parameters())

    def test_dtype_override(self):
        module = MLP()
        graph = from_torch(module, torch.zeros(5, 16), dtype="bf16")
        assert total(graph, "weight_bytes") == 2 * sum(p.numel() for p in module.parameters())
        assert graph.nodes["fc1"]["activation_bytes"] == 5 * 64 * 2
        assert graph.graph["dtype"] == "bf16"

    def test_module_is_not_modified(self):
        module = MLP()
        before = {k: v.clone() for k, v in module.state_dict().items()}
        from_torch(module, torch.randn(3, 16))
        after = module.state_dict()
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before)

    def test_json_round_trip_of_a_plan(self):
        graph = from_torch(MLP(), torch.zeros(5, 16))
        plan = cachefit.plan(graph, 6000)
        assert plan.ok
        again = cachefit.Plan.from_json(plan.to_json())
        assert cachefit.check(again).ok


class TestResidualConv:
    def test_skip_connection_and_buffers(self):
        module = ResidualConvBlock().eval()
        graph = from_torch(module, torch.zeros(2, 8, 6, 6))
        validate(graph)
        # the block input feeds conv1 and, through the skip, the add
        assert set(graph.successors("x")) == {"conv1", "add"}
        assert set(graph.predecessors("add")) == {"bn2", "x"}
        # BatchNorm's running statistics are resident state too: counted with the parameters
        assert total(graph, "weight_bytes") == unique_state_bytes(module)
        assert graph.nodes["bn1"]["weight_bytes"] == unique_state_bytes(module.bn1)
        assert graph.nodes["conv1"]["op"] == "conv"
        assert graph.nodes["conv1"]["out_features"] == 8
        assert graph.nodes["add"]["activation_bytes"] == 2 * 8 * 6 * 6 * 4

    def test_weights_equal_unique_params_without_buffers(self):
        module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
        graph = from_torch(module, torch.zeros(1, 3, 8, 8))
        assert total(graph, "weight_bytes") == unique_state_bytes(module, buffers=False)


class TestTiedTransformer:
    def test_shared_weight_counted_once_on_first_user(self):
        module = TinyTransformer()
        graph = from_torch(module, torch.zeros(2, 7, dtype=torch.long))
        validate(graph)
        assert total(graph, "weight_bytes") == unique_state_bytes(module)
        assert graph.nodes["embed"]["weight_bytes"] == 50 * 16 * 4
        assert graph.nodes["head"]["weight_bytes"] == 0
        assert graph.nodes["head"]["tied_to"] == "embed"
        assert graph.graph["shared"] == ["embed.weight"]
        assert graph.nodes["head"]["activation_bytes"] == 2 * 7 * 50 * 4
        assert graph.nodes["tokens"]["activation_bytes"] == 2 * 7 * 8  # int64 ids
        # MHA returns a tuple; [0] is a view of it, so it holds no bytes of its own
        assert graph.nodes["getitem"]["activation_bytes"] == 0
        assert graph.nodes["getitem"]["alias_of"] == ["attn"]
        # residual edges: the embedding output reaches the first add
        assert "embed" in set(graph.predecessors("add"))

    def test_functional_tied_head(self):
        module = FunctionalTiedHead()
        graph = from_torch(module, torch.zeros(3, 5, dtype=torch.long))
        assert total(graph, "weight_bytes") == unique_state_bytes(module)
        assert graph.nodes["linear"]["op"] == "linear"
        assert graph.nodes["linear"]["weight_bytes"] == 0
        assert graph.nodes["linear"]["tied_to"] == "embed"
        assert (graph.nodes["linear"]["in_features"], graph.nodes["linear"]["out_features"]) == (8, 30)

    def test_plan_checks(self):
        graph = from_torch(TinyTransformer(), torch.zeros(2, 7, dtype=torch.long))
        plan = cachefit.plan(graph, 16 * 1024)
        assert plan.ok and cachefit.check(plan).ok


class TestBranches:
    def test_rejoining_dag(self):
        module = Branches()
        graph = from_torch(module, torch.zeros(4, 12))
        validate(graph)
        assert set(graph.successors("stem")) == {"left", "right_0"}
        assert set(graph.predecessors("cat")) == {"left", "right_1"}
        assert list(graph.successors("cat")) == ["out"]
        assert total(graph, "weight_bytes") == unique_state_bytes(module)
        assert graph.nodes["cat"]["activation_bytes"] == 4 * 12 * 4

    def test_views_keep_their_base_live(self):
        class Viewer(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(6, 6)
                self.out = nn.Linear(3, 3)

            def forward(self, x):
                h = self.fc(x)
                return self.out(h.view(-1, 2, 3).transpose(0, 1)[0])

        graph = from_torch(Viewer(), torch.zeros(4, 6))
        assert graph.nodes["view"]["activation_bytes"] == 0
        assert graph.nodes["transpose"]["alias_of"] == ["fc"]
        # the consumer of the views keeps `fc`'s output live: an edge from it
        assert "fc" in set(graph.predecessors("transpose"))


class TestUntraceable:
    def test_error_names_the_submodule_and_suggests_leaf_modules(self):
        with pytest.raises(InputError, match=r"submodule 'gate' \(DataDependent\) failed: .*"
                                              r"leaf_modules=\['gate'\]"):
            from_torch(HasUntraceable(), torch.ones(2, 4))

    def test_leaf_modules_by_name_or_class(self):
        module = HasUntraceable()
        for leaves in (["gate"], [DataDependent], "gate"):
            graph = from_torch(module, torch.ones(2, 4), leaf_modules=leaves)
            assert list(graph) == ["x", "pre", "gate", "post"]
            assert graph.nodes["gate"]["op"] == "datadependent"
            assert graph.nodes["gate"]["activation_bytes"] == 2 * 4 * 4
            # the leaf branches on values, so fake tensors cannot run it
            assert graph.graph["shape_propagation"] == "real"

    def test_top_level_failure(self):
        with pytest.raises(InputError, match=r"the forward of DataDependent itself failed"):
            from_torch(DataDependent(), torch.ones(2))

    def test_bad_arguments(self):
        with pytest.raises(InputError, match=r"`module` must be a torch.nn.Module, got int"):
            from_torch(3, torch.ones(1))
        with pytest.raises(InputError, match=r"`example_inputs` must be a tensor or a tuple"):
            from_torch(MLP(), {"x": torch.ones(1, 16)})
        with pytest.raises(InputError, match=r"`leaf_modules` entry 'nope' is not a submodule"):
            from_torch(MLP(), torch.ones(1, 16), leaf_modules=["nope"])
        with pytest.raises(InputError, match=r"`leaf_modules` entries must be submodule names"):
            from_torch(MLP(), torch.ones(1, 16), leaf_modules=[3])
        with pytest.raises(InputError, match=r"`dtype` must be one of"):
            from_torch(MLP(), torch.ones(1, 16), dtype="fp64")
        with pytest.raises(InputError, match=r"`example_inputs` could not be run"):
            from_torch(MLP(), torch.ones(1, 5))


class TestMeta:
    def test_meta_module_never_allocates(self):
        # 10 GB of fp32 weights and 1.6 GB of activations, all on the meta device.
        with torch.device("meta"):
            module = nn.Sequential(nn.Linear(50_000, 50_000), nn.ReLU(), nn.Linear(50_000, 10))
        graph = from_torch(module, torch.empty(8_000, 50_000, device="meta"))
        assert graph.nodes["_0"]["weight_bytes"] == (50_000 * 50_000 + 50_000) * 4
        assert graph.nodes["_0"]["activation_bytes"] == 8_000 * 50_000 * 4
        assert graph.graph["shape_propagation"] == "fake"


class TestTiling:
    def test_tiled_torch_graph_plans_and_checks(self):
        module = MLP()
        graph = from_torch(module, torch.zeros(5, 16))
        capacity = 3_000  # fc1 holds 4,352 B of weights, fc2 2,048 B: both must be tiled
        plan = cachefit.plan(graph, capacity, tile=True)
        assert plan.ok and cachefit.check(plan).ok
        assert plan.stats["tiled_nodes"] == 2
        assert plan.graph.graph["tiled"]["fc1"]["tiles"] == 4  # 4352/4 + 320 + 1280 <= 3000 < 4352/3 + 1600
        assert total(plan.graph, "weight_bytes") == unique_state_bytes(module)
        assert cachefit.plan(graph, capacity).status == "INFEASIBLE"


# --------------------------------------------------------------------------
# torch.export capture, flops, transformers' own models
# --------------------------------------------------------------------------

class ResNetLike(nn.Module):
    """A torchvision-style CNN: stem, two residual stages, pooled linear head."""

    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = ResidualConvBlock(8)
        self.layer2 = ResidualConvBlock(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class ValueBranch(nn.Module):
    """Branches on a tensor value: torch.export refuses it, fx does with a leaf module."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x)
        return y if y.sum() > 0 else -y


def flops_of(graph):
    return sum(data["flops"] for _, data in graph.nodes(data=True))


def counted_flops(module, inputs):
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(*inputs)
    return counter.get_total_flops()


class TestExportCapture:
    def test_plain_module_by_module_names(self):
        module, x = MLP(), torch.zeros(4, 16)
        graph = from_torch(module, x, capture="export")
        assert list(graph) == ["x", "fc1", "act", "fc2"]
        assert graph.graph["source"] == "torch.export" and graph.graph["capture"] == "export"
        assert graph.nodes["fc1"]["op"] == "linear" and graph.nodes["fc1"]["out_features"] == 64
        assert total(graph, "weight_bytes") == unique_state_bytes(module)
        assert graph.nodes["fc1"]["activation_bytes"] == 4 * 64 * 4
        assert flops_of(graph) == counted_flops(module, (x,)) == 2 * 4 * (16 * 64 + 64 * 8)

    def test_cnn_weights_buffers_and_flops(self):
        module, x = ResNetLike().eval(), torch.zeros(2, 3, 16, 16)
        graph = from_torch(module, x, capture="export")
        assert total(graph, "weight_bytes") == unique_state_bytes(module)
        assert graph.graph["params"] == sum(p.numel() for p in module.parameters())
        assert {"stem.0", "layer1.conv1", "layer1.bn1", "layer1", "layer2.conv2", "fc"} <= set(graph)
        assert graph.nodes["layer1.conv1"]["op"] == "conv"
        assert flops_of(graph) == counted_flops(module, (x,))

    def test_residual_runs_of_a_parent_are_separate_nodes(self):
        graph = from_torch(ResidualConvBlock(), torch.zeros(1, 8, 4, 4), capture="export")
        # relu(bn1) runs in the block itself between its children, then the add + relu
        assert ["root", "root#1"] == [v for v in graph if v.startswith("root")]
        assert sorted(graph.predecessors("root#1")) == ["bn2", "x"]

    def test_tied_weights_counted_once(self):
        module = TinyTransformer()
        graph = from_torch(module, torch.zeros(2, 6, dtype=torch.long), capture="export")
        assert graph.nodes["head"]["tied_to"] == "embed" and graph.nodes["head"]["params"] == 0
        assert graph.graph["params"] == sum(p.numel() for p in module.parameters())

    def test_dtype_override(self):
        graph = from_torch(MLP(), torch.zeros(4, 16), capture="export", dtype="bf16")
        assert graph.nodes["fc1"]["weight_bytes"] == (16 * 64 + 64) * 2
        assert graph.graph["dtype"] == "bf16"

    def test_dynamic_batch_and_sequence(self):
        batch, seq = torch.export.Dim("batch", max=64), torch.export.Dim("seq", max=512)
        module = TinyTransformer()
        tokens = torch.zeros(3, 10, dtype=torch.long)
        graph = from_torch(module, tokens, dynamic_shapes=({0: batch, 1: seq},))
        assert graph.graph["capture"] == "export"
        assert graph.graph["dynamic_dims"] == {"batch": 3, "seq": 10}
        assert graph.nodes["up"]["activation_bytes"] == 3 * 10 * 64 * 4

    def test_meta_device_module(self):
        with torch.device("meta"):
            module = ResNetLike()
        graph = from_torch(module, torch.zeros(2, 3, 16, 16, device="meta"), capture="export")
        assert total(graph, "weight_bytes") == unique_state_bytes(module)

    def test_leaf_module_keeps_a_subtree_whole(self):
        graph = from_torch(ResNetLike(), torch.zeros(1, 3, 8, 8), capture="export", leaf_modules=["layer1"])
        assert "layer1" in graph and not any(v.startswith("layer1.") for v in graph)

    def test_auto_prefers_fx_and_falls_back_to_export(self):
        assert from_torch(MLP(), torch.zeros(2, 16)).graph["capture"] == "fx"
        transformers = pytest.importorskip("transformers")
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, vocab_size=128, use_cache=False, pad_token_id=0))
        graph = from_torch(model.eval(), torch.zeros(1, 8, dtype=torch.long))
        assert graph.graph["capture"] == "export" and "model.layers.1.mlp.down_proj" in graph

    def test_value_branch_needs_fx_with_a_leaf(self):
        module = nn.Sequential(ValueBranch(), nn.Linear(4, 2))
        with pytest.raises(InputError, match=r"^`module` cannot be captured by torch.export: ") as error:
            from_torch(module, torch.ones(2, 4), capture="export", leaf_modules=["0"])
        assert "\n" not in str(error.value)
        graph = from_torch(module, torch.ones(2, 4), leaf_modules=["0"])
        assert graph.graph["capture"] == "fx" and graph.graph["shape_propagation"] == "real"

    def test_bad_capture_arguments(self):
        with pytest.raises(InputError, match=r"`capture` must be one of 'auto', 'fx', 'export', got 'jit'"):
            from_torch(MLP(), torch.zeros(2, 16), capture="jit")
        with pytest.raises(InputError, match=r"`dynamic_shapes` needs `capture` 'export' or 'auto'"):
            from_torch(MLP(), torch.zeros(2, 16), capture="fx", dynamic_shapes=({0: None},))


class TestFxFlops:
    def test_flops_equal_flop_counter(self):
        module, x = ResNetLike().eval(), torch.zeros(2, 3, 16, 16)
        graph = from_torch(module, x, capture="fx")
        assert flops_of(graph) == counted_flops(module, (x,)) > 0

    def test_balance_by_flops(self):
        graph = from_torch(MLP(), torch.zeros(4, 16))
        plan = cachefit.plan(graph, 10**6, solver="dp", k=2, balance="flops")
        assert cachefit.check(plan).ok


def transformers_models():
    """(name, model, tokens): transformers' own models with small configs, random weights."""
    transformers = pytest.importorskip("transformers")
    small = dict(num_hidden_layers=4, num_attention_heads=4, vocab_size=256, pad_token_id=0,
                 bos_token_id=1, eos_token_id=2)
    llama_like = dict(small, hidden_size=64, intermediate_size=128, num_key_value_heads=2, use_cache=False)
    return [
        ("gpt2", lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_embd=64, n_layer=4, n_head=4, n_positions=64, vocab_size=256, use_cache=False,
            bos_token_id=1, eos_token_id=2))),
        ("llama", lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama_like))),
        ("bert", lambda: transformers.BertModel(transformers.BertConfig(
            hidden_size=64, intermediate_size=128, **small))),
        ("qwen2", lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**llama_like))),
        ("mixtral", lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(
            **llama_like, num_local_experts=4, num_experts_per_tok=2))),
    ]


@pytest.mark.parametrize("index", range(5), ids=["gpt2", "llama", "bert", "qwen2", "mixtral"])
def test_transformers_models_import_and_plan(index):
    name, build = transformers_models()[index]
    torch.manual_seed(0)
    model = build().eval()
    tokens = torch.randint(3, 256, (2, 16))
    graph = from_torch(model, tokens)
    assert graph.graph["capture"] == "export"
    assert graph.graph["params"] == sum(p.numel() for p in model.parameters())  # tied once
    state = unique_state_bytes(model)
    assert total(graph, "weight_bytes") == state
    layer = {"gpt2": "transformer.h.2", "bert": "encoder.layer.2"}.get(name, "model.layers.2")
    assert any(v.startswith(layer + ".") for v in graph)
    assert flops_of(graph) > 0
    everything = total(graph, "weight_bytes") + total(graph, "activation_bytes")
    plan = cachefit.plan(graph, everything // 4, solver="greedy")
    assert plan.k >= 3 and cachefit.check(plan).ok
