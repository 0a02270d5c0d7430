"""What every codebook quantizer here shares: dead-code restart and the tokenizer output type."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn


class VQOutput(NamedTuple):
    rec: Tensor
    vq_loss: Tensor
    hits: Tensor  # (S, V) code counts per scale (S = 1 for a single-scale tokenizer)
    f: Tensor  # encoder latent (B, C, h, w) in the codebook's space


@torch.no_grad()
def restart_dead_codes(embedding: nn.Embedding, usage: Tensor, hits: Tensor, pool: Tensor, pick: Tensor,
                       decay: float = 0.99, threshold: float = 0.03) -> int:
    """Dead-code restart, so a small dataset uses its whole codebook: update the usage EMA `usage` (S, V) with
    this step's `hits` (S, V) and move every code whose summed usage fell below `threshold` onto a latent vector
    of the batch (`pool` (N, C), rows chosen by `pick` (>= number of dead codes) indices). Returns the count.
    Under torchrun, hits are summed over ranks and rank 0's choice is broadcast, so replicas stay equal."""
    dist_on = torch.distributed.is_available() and torch.distributed.is_initialized()
    if dist_on:
        torch.distributed.all_reduce(hits)
    usage.mul_(decay).add_(hits, alpha=1 - decay)
    dead = (usage.sum(0) < threshold).nonzero().flatten()
    if len(dead):
        embedding.weight[dead] = pool[pick[: len(dead)] % len(pool)].to(embedding.weight.dtype)
        usage[:, dead] = usage.mean(1, keepdim=True)  # a fresh start
    if dist_on:
        torch.distributed.broadcast(embedding.weight.data, 0)
        torch.distributed.broadcast(usage, 0)
    return len(dead)
