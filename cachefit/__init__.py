"""cachefit: cut a neural network into ordered groups that each fit on-chip memory.

The public API: `plan` (partition a graph), `check` (verify a plan
independently), `Plan` and `Status` (the result), the byte helpers and the
subpackages `graphs`, `solvers`, `instances`, `executor`, `bench`.
"""

import importlib
import sys
import types

# Public names resolve on first use (PEP 562), so `cachefit --help` or a
# refused input does not pay for networkx, numpy or the solvers.
_EXPORTS = {
    "plan": "api", "check": "checker", "CheckReport": "checker", "DEVICES": "devices",
    "parse_capacity": "devices", "CachefitError": "errors", "InputError": "errors",
    "MEMORY_MODELS": "memory", "LayerTable": "memory", "group_sizes": "memory", "Plan": "result",
    "Status": "result", "stages": "stages", "Estimate": "estimate", "estimate": "estimate",
    "Deployment": "deploy", "deploy": "deploy", "format_bytes": "units", "parse_bytes": "units",
}
_SUBPACKAGES = ("graphs", "instances", "solvers")


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBPACKAGES))


class _Package(types.ModuleType):
    """Keeps `cachefit.stages`, `.estimate`, `.deploy` the functions.

    Importing a submodule sets the package attribute of the same name to the
    module; for the public functions that share their module's name, the
    function stays (the module remains in `sys.modules`).
    """

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


__version__ = "0.1.0"

__all__ = [
    "plan", "stages", "estimate", "Estimate", "deploy", "Deployment", "check", "CheckReport", "Plan", "Status", "LayerTable", "group_sizes", "MEMORY_MODELS",
    "DEVICES", "parse_capacity", "parse_bytes", "format_bytes", "CachefitError", "InputError",
    "graphs", "instances", "solvers", "__version__",
]
