"""Coarse-to-fine token prediction (CTF, Guo, Zhang, Shieh, arXiv 2503.16194) over a single-scale tokenizer.

The codebook's V codes are clustered into K coarse labels (`tokenizers/cluster.py`, stored in the `assign`
buffer). Stage 1 is the raster AR model (`RasterAR`, LlamaGen's layout) over the K coarse labels; stage 2, the
auxiliary model, reads the class token and every coarse label with bidirectional attention (the same blocks and 2D
rotary positions) and predicts all fine labels in one pass. Both train from the same batches with teacher forcing
(stage 2 sees the true coarse labels); sampling runs stage 1 token by token (or by Jacobi decoding), then stage 2
once, with its own temperature, optionally masked to the members of each predicted cluster.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import check
from ..registry import register_family, register_preset
from .raster_ar import RasterAR, RasterARConfig


@dataclass(frozen=True)
class C2FConfig:
    vocab_size: int = 1024  # fine labels: the tokenizer's codebook
    coarse: int = 64  # K coarse labels
    clusters: str = "kmeans"  # or "random" (the control)
    grid: int = 8
    depth: int = 4  # stage 1
    width: int = 128
    heads: int = 4
    aux_depth: int = 2  # stage 2
    aux_width: int = 128
    aux_heads: int = 4
    num_classes: int = 10
    ffn_multiple: int = 32  # both stages are LlamaGen blocks (`RasterAR`); LlamaGen's own models use 256
    class_rope: str = "zero"

    def __post_init__(self):
        check(self, ("width", "heads"), ("aux_width", "aux_heads"))

    def _shared(self) -> dict:
        return dict(grid=self.grid, num_classes=self.num_classes, ffn_multiple=self.ffn_multiple,
                    class_rope=self.class_rope)

    def stage1(self) -> RasterARConfig:
        return RasterARConfig(vocab_size=self.coarse, depth=self.depth, width=self.width, heads=self.heads,
                              **self._shared())

    def stage2(self) -> RasterARConfig:
        """Bidirectional: reads [class, coarse_0 .. coarse_{N-1}], predicts fine labels at positions 1..N."""
        return RasterARConfig(vocab_size=self.vocab_size, in_vocab=self.coarse, causal=False, depth=self.aux_depth,
                              width=self.aux_width, heads=self.aux_heads, **self._shared())


@register_family("c2f")
class C2F(nn.Module):
    Config = C2FConfig

    def __init__(self, cfg: C2FConfig):
        super().__init__()
        self.config = cfg
        self.stage1 = RasterAR(cfg.stage1())
        self.aux = RasterAR(cfg.stage2())
        self.register_buffer("assign", torch.arange(cfg.vocab_size) % cfg.coarse)  # fine -> coarse label

    @torch.no_grad()
    def set_clusters(self, codes: Tensor, seed: int = 0) -> None:
        """Cluster the tokenizer's code vectors (V, d) into the coarse labels (k-means or random, per config)."""
        from ..tokenizers.cluster import coarse_labels

        if codes.shape[0] != self.config.vocab_size:
            raise ValueError(f"{codes.shape[0]} codes for a vocabulary of {self.config.vocab_size}")
        self.assign.copy_(coarse_labels(codes, self.config.coarse, self.config.clusters, seed).to(self.assign))

    def forward(self, labels: Tensor, fine: Tensor) -> tuple[Tensor, Tensor]:
        """(stage-1 next-coarse-label CE, stage-2 fine-label CE given the true coarse labels)."""
        coarse = self.assign[fine]
        l1 = F.cross_entropy(self.stage1(labels, coarse).flatten(0, 1), coarse.flatten())
        l2 = F.cross_entropy(self._aux(labels, coarse).flatten(0, 1), fine.flatten())
        return l1, l2

    def _aux(self, labels: Tensor, coarse: Tensor) -> Tensor:
        return self.aux.run(self.aux.embed(labels, coarse))[:, 1:]

    def members(self) -> Tensor:
        """(K, m) the fine labels of each coarse label, padded with -1 to the largest cluster's size m."""
        order = torch.argsort(self.assign, stable=True)
        counts = torch.bincount(self.assign, minlength=self.config.coarse)
        start = torch.cumsum(counts, 0) - counts
        table = torch.full((self.config.coarse, int(counts.max())), -1, dtype=torch.long, device=self.assign.device)
        grouped = self.assign[order]
        table[grouped, torch.arange(len(order), device=order.device) - start[grouped]] = order
        return table

    def fine_logits(self, labels: Tensor, coarse: Tensor) -> Tensor:
        """Stage-2 logits (B, N, V) over all fine labels (the sampler restricts them to `members` when masked)."""
        return self._aux(labels, coarse)


register_preset("c2f-tiny", "c2f", C2FConfig(vocab_size=64, coarse=8, grid=4, depth=2, width=32, heads=2,
                                             aux_depth=1, aux_width=32, aux_heads=2))
register_preset("c2f-mnist", "c2f", C2FConfig(class_rope="identity"))  # on vq-mnist, stage 1 as raster-mnist
