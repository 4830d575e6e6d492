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
