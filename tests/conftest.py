import os

import pytest
from hypothesis import settings

settings.register_profile("default", max_examples=60, deadline=None, derandomize=True)
settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")


def pytest_collection_modifyitems(config, items):
    """Skip (never fail) tests marked `gpu` when no CUDA device is present."""
    import pytest

    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


#: The shape every tiny transformers model of the tests shares (`tiny_transformers`).
_TINY = dict(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def _tiny_transformers_model(name):
    """A tiny Hugging Face transformers model, seeded, in eval mode: gpt2, llama, llama-eager (eager attention),
    mistral (sliding window 5), qwen2, mixtral (4 experts, top 2) or bert (an encoder)."""
    import torch
    import transformers

    torch.manual_seed(0)
    if name == "gpt2":
        config = transformers.GPT2Config(vocab_size=256, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                         use_cache=False, bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(config).eval()
    if name == "bert":
        return transformers.BertModel(transformers.BertConfig(**_TINY)).eval()
    decoders = {"llama": ("LlamaConfig", "LlamaForCausalLM", {}),
                "llama-eager": ("LlamaConfig", "LlamaForCausalLM", {}),
                "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 5}),
                "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
                "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2})}
    config_class, model_class, extra = decoders[name]
    config = getattr(transformers, config_class)(**_TINY, num_key_value_heads=2, use_cache=False, **extra)
    if name == "llama-eager":
        config._attn_implementation = "eager"
    return getattr(transformers, model_class)(config).eval()


@pytest.fixture(scope="session")
def tiny_transformers():
    """`build(name)` -> a tiny transformers model (`_tiny_transformers_model`); skips without transformers."""
    pytest.importorskip("transformers")
    return _tiny_transformers_model


@pytest.fixture(scope="module")
def import_once():
    """`get(build, name, shape)` -> (module, token ids, from_torch graph), built and imported once per test module.

    `build(name)` makes the torch module; the token ids (seeded) have `shape`.
    """
    cache = {}

    def get(build, name, shape):
        if (name, shape) not in cache:
            import torch

            from cachefit.graphs import from_torch

            module = build(name)
            tokens = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(1))
            cache[name, shape] = (module, tokens, from_torch(module, tokens))
        return cache[name, shape]

    return get


@pytest.fixture
def slow_builds(monkeypatch):
    """A `cachefit.testing.FakeClock` on which every step of a CP-SAT model build takes a millisecond."""
    from cachefit.solvers import _cpsat_model
    from cachefit.testing import FakeClock

    clock = FakeClock()
    real_check = _cpsat_model.Model._check_clock

    def slow_check(self):
        clock.now += 1e-3
        real_check(self)

    monkeypatch.setattr(_cpsat_model.Model, "_check_clock", slow_check)
    return clock
