"""pargen: fast visual generative models on one fixed-point engine.

The public API: `pargen.load(name_or_path)` returns the checkpoint's pipeline (`pipe.sample`, `pipe.calibrate`,
`pipe.bench`; see `pargen.pipelines`); below it, the samplers in `pargen.samplers` (`fixed_point`, `flow`,
`diffusion`, `autoregressive`) are pure functions over a model, and `checkpoint`, `registry`, `data` load and
build models and datasets.
"""
from . import checkpoint, data, registry  # noqa: F401
from .pipelines import Output, load  # noqa: F401

__version__ = "0.1.0"
