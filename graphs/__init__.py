"""Model → networkx DAG builders (DESIGN.md §3).

Every builder returns a new `networkx.DiGraph` whose nodes carry
``weight_bytes``, ``activation_bytes`` and ``buffer_bytes``, inserted in a
topological order that is the model's execution order.
"""

from ..validation import validate
from .layers import from_layers
try:
    from .transformer import param_count, transformer
except ImportError:  # TEMP
    pass

__all__ = ["validate", "from_layers", "transformer", "param_count"]
