"""Run the docstring examples of every cachefit module and the README's Python example."""

import doctest
import importlib
import pkgutil
from pathlib import Path

import pytest

import cachefit

OPTIONAL = {"torch", "onnx", "matplotlib"}


SUBPACKAGES = ("graphs", "solvers", "instances", "executor", "bench")  # mapped from their own folders


def modules():
    names = {"cachefit"}
    for info in pkgutil.walk_packages(cachefit.__path__, "cachefit."):
        names.add(info.name)
    for sub in SUBPACKAGES:
        package = importlib.import_module(f"cachefit.{sub}")
        names.add(package.__name__)
        for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            names.add(info.name)
    return sorted(names)


@pytest.mark.parametrize("name", modules())
def test_module_doctests(name):
    try:
        module = importlib.import_module(name)
    except ImportError as exc:  # a module of an optional extra
        if exc.name in OPTIONAL:
            pytest.skip(f"{name} needs {exc.name}")
        raise
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def test_readme_examples():
    readme = Path(__file__).resolve().parents[1] / "README.md"
    result = doctest.testfile(str(readme), module_relative=False,
                              optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
