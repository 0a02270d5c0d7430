"""Per-sample random streams: sample i draws from its own generator seeded by seeds[i].

A sample's noise then depends only on its seed, never on the batch it is in, its position, the number of
processes, or the order of sequential vs parallel sampling (EDM's `StackedRandomGenerator`). The library never
calls `torch.manual_seed`.
"""
from __future__ import annotations

import torch
from torch import Tensor


class SampleRNG:
    def __init__(self, seeds: Tensor | list[int], device: torch.device | str = "cpu"):
        seeds = seeds.tolist() if isinstance(seeds, Tensor) else list(seeds)
        self.device = torch.device(device)
        self.gens = [torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds]

    def __len__(self) -> int:
        return len(self.gens)

    def randn(self, *shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """(B, *shape) standard normal."""
        return torch.stack([torch.randn(shape, generator=g, device=self.device, dtype=dtype) for g in self.gens])

    def rand(self, *shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
        return torch.stack([torch.rand(shape, generator=g, device=self.device, dtype=dtype) for g in self.gens])

    def randint(self, high: int, *shape: int) -> Tensor:
        return torch.stack([torch.randint(high, shape, generator=g, device=self.device) for g in self.gens])

    def exponential(self, *shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """(B, *shape) standard exponential (-log of it is Gumbel noise)."""
        return torch.stack([torch.empty(shape, device=self.device, dtype=dtype).exponential_(generator=g)
                            for g in self.gens])

    def multinomial(self, probs: Tensor) -> Tensor:
        """One draw per row of probs (B, ..., V) -> (B, ...), row i from sample i's stream."""
        if len(probs) != len(self.gens):
            raise ValueError(f"{len(probs)} rows of probabilities for {len(self.gens)} sample streams")
        V = probs.shape[-1]
        return torch.stack([torch.multinomial(p.reshape(-1, V), 1, replacement=True, generator=g).view(p.shape[:-1])
                            for p, g in zip(probs, self.gens)])


Generator = torch.Generator | SampleRNG  # one stream for the batch, or one per sample


def step_seeds(seed: int, step: int, batch: int) -> Tensor:
    """Seeds for the `batch` samples of training step `step`: distinct across steps and runs."""
    base = (seed * 1_000_003 + step) * 65_537
    return torch.arange(base, base + batch, dtype=torch.int64) % (2**62)
