"""cachefit: cut a neural network into ordered groups that each fit on-chip memory.

The public API: `plan` (partition a graph), `check` (verify a plan
independently), `Plan` and `Status` (the result), the byte helpers and the
subpackages `graphs`, `solvers`, `instances`, `executor`, `bench`.
"""

from .api import plan
from .checker import CheckReport, check
from .devices import DEVICES, parse_capacity
from .errors import CachefitError, InputError
from .memory import MEMORY_MODELS, LayerTable, group_sizes
from .result import Plan, Status
from .stages import stages
from .estimate import Estimate, estimate
from .deploy import Deployment, deploy
from .units import format_bytes, parse_bytes
from . import graphs, instances, solvers  # noqa: E402  (subpackages users reach as attributes)

__version__ = "0.1.0"

__all__ = [
    "plan", "stages", "estimate", "Estimate", "deploy", "Deployment", "check", "CheckReport", "Plan", "Status", "LayerTable", "group_sizes", "MEMORY_MODELS",
    "DEVICES", "parse_capacity", "parse_bytes", "format_bytes", "CachefitError", "InputError",
    "graphs", "instances", "solvers", "__version__",
]
