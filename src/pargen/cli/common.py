"""Helpers shared by the family glue modules of the CLI."""
from __future__ import annotations

import torch

from ..errors import PargenError


def labels_for(model: torch.nn.Module, seeds: list[int], labels: list[int] | None) -> torch.Tensor | None:
    """Class labels for a conditional model: --labels cycled, or seed mod classes (None if unconditional)."""
    k = model.config.num_classes
    if not k:
        if labels:
            raise PargenError("this model is unconditional; drop --labels")
        return None
    if labels:
        if any(not 0 <= v < k for v in labels):
            raise PargenError(f"labels must be in [0, {k - 1}]")
        return torch.tensor([labels[i % len(labels)] for i in range(len(seeds))])
    return torch.tensor([s % k for s in seeds])
