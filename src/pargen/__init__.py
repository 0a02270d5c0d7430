"""pargen: fast visual generative models on one fixed-point engine.

The public API is small: `checkpoint.load/resolve`, `registry.create/list_names`, `data.load`, and the
samplers in `pargen.samplers` (`fixed_point`, `flow`).
"""
from . import checkpoint, data, registry  # noqa: F401

__version__ = "0.1.0"
