"""Parallel (Picard) sampling for any `diffusers` pipeline, the public name of `pargen.samplers.diffusers`:

    fast = pargen.diffusers.parallel(pipe, window=8, tol=1e-3)
    out = fast(prompt, num_inference_steps=50, generator=torch.Generator().manual_seed(0))   # pipe's own output
    fast.cost                                         # path, rounds, model evaluations, overhead per round

A local pipeline directory (`save_pretrained`) opens with `pargen.load(DIR)` as a `DiffusersDirectory`.
"""
from .pipelines.diffusers import DiffusersDirectory, load_pipeline
from .samplers.diffusers import Cost, Parallel, parallel

__all__ = ["parallel", "Parallel", "Cost", "DiffusersDirectory", "load_pipeline"]
