"""Model → networkx DAG builders (docs/concepts.md §3), and tiling.

Every builder returns a new `networkx.DiGraph` whose nodes carry
``weight_bytes``, ``activation_bytes`` and ``buffer_bytes``, inserted in a
topological order that is the model's execution order.

Builders: `from_layers` (a list of sizes), `transformer` (an HF-style config
mapping), `from_hf_config` (a local ``config.json``), `from_torch` (a PyTorch
module, via torch.fx or torch.export; the ``torch`` extra), `from_onnx` (an
ONNX model; the ``onnx`` extra) and `from_checkpoint` (a Hugging Face
checkpoint folder, weights sized from its safetensors headers).  `tile` splits layers too large for a capacity.
"""

from ..validation import validate
from .checkpoint import from_checkpoint
from .hf import from_hf_config
from .layers import from_layers
from .onnx_import import from_onnx
from .tile import tile
from .torch_import import from_torch
from .transformer import param_count, transformer

__all__ = ["validate", "from_layers", "transformer", "param_count", "from_hf_config", "from_torch",
           "from_onnx", "from_checkpoint", "tile"]
