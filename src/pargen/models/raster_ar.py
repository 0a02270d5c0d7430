"""Raster-order autoregressive image model in the LlamaGen style (Sun et al., arXiv 2406.06525;
FoundationVision/LlamaGen `autoregressive/models/gpt.py`): a class token (a learned embedding with a null class
for guidance) followed by the image tokens in raster order, pre-norm blocks with RMSNorm, SwiGLU feed-forward,
causal attention with 2D rotary positions (half of each head's pairs rotate with the row, half with the
column; the class token is not rotated), no biases, a zero-initialised output head.

Input position 0 is the class token and input position i >= 1 is token i - 1; the logits at position i predict
token i. The same `run` serves teacher-forced training (all positions at once), KV-cached sampling (one
position per call) and Jacobi decoding (a window of positions per call over a committed cache).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.attention import KVCache, attend
from ..registry import register_family, register_preset


@dataclass(frozen=True)
class RasterARConfig:
    vocab_size: int = 1024
    grid: int = 8  # tokens per side
    depth: int = 4
    width: int = 128
    heads: int = 4
    ffn_multiple: int = 32  # SwiGLU hidden = 8/3 width rounded up to this
    num_classes: int = 10
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    in_vocab: int = 0  # input token vocabulary (0: vocab_size); CTF's stage 2 reads coarse labels
    causal: bool = True  # False: bidirectional (CTF's stage 2)

    @property
    def tokens(self) -> int:
        return self.grid * self.grid

    @property
    def ffn_hidden(self) -> int:
        h = int(2 * 4 * self.width / 3)
        return -(-h // self.ffn_multiple) * self.ffn_multiple


def rope_2d(grid: int, head_dim: int, base: float) -> Tensor:
    """(1 + grid^2, head_dim / 2, 2) cos/sin per input position: identity for the class token, then row
    frequencies on the first half of the pairs and column frequencies on the second, as LlamaGen's
    `precompute_freqs_cis_2d` (whose class-token row is zeros, which would erase the class token's q and k)."""
    half = head_dim // 2
    freqs = 1.0 / base ** (torch.arange(0, half, 2, dtype=torch.float64)[: half // 2] / half)
    t = torch.arange(grid, dtype=torch.float64)
    f = torch.outer(t, freqs)  # (grid, half / 2)
    ang = torch.cat((f[:, None, :].expand(-1, grid, -1), f[None, :, :].expand(grid, -1, -1)), -1).reshape(-1, half)
    ang = torch.cat((torch.zeros(1, half, dtype=torch.float64), ang))
    return torch.stack((ang.cos(), ang.sin()), -1).float()


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate consecutive pairs of x (B, H, n, Dh) by rope (n, Dh / 2, 2)."""
    xr = x.float().unflatten(-1, (-1, 2))
    c, s = rope[..., 0], rope[..., 1]
    out = torch.stack((xr[..., 0] * c - xr[..., 1] * s, xr[..., 1] * c + xr[..., 0] * s), -1)
    return out.flatten(-2).type_as(x)


class Block(nn.Module):
    def __init__(self, cfg: RasterARConfig):
        super().__init__()
        C = cfg.width
        self.heads, self.head_dim = cfg.heads, C // cfg.heads
        self.attention_norm = nn.RMSNorm(C, eps=cfg.norm_eps)
        self.wqkv = nn.Linear(C, 3 * C, bias=False)
        self.wo = nn.Linear(C, C, bias=False)
        self.ffn_norm = nn.RMSNorm(C, eps=cfg.norm_eps)
        self.w1 = nn.Linear(C, cfg.ffn_hidden, bias=False)
        self.w3 = nn.Linear(C, cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, C, bias=False)

    def forward(self, x: Tensor, rope: Tensor, cache: KVCache | None, layer: int, causal: bool = True) -> Tensor:
        B, n, C = x.shape
        q, k, v = self.wqkv(self.attention_norm(x)).view(B, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        a = attend(q, k, v, cache, layer, self.head_dim**-0.5, causal=causal)
        x = x + self.wo(a.transpose(1, 2).reshape(B, n, C))
        h = self.ffn_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


@register_family("raster")
class RasterAR(nn.Module):
    Config = RasterARConfig

    def __init__(self, cfg: RasterARConfig):
        super().__init__()
        if cfg.width % cfg.heads or (cfg.width // cfg.heads) % 4:
            raise ValueError(f"width {cfg.width} / heads {cfg.heads} must be a multiple of 4 (2D rotary pairs)")
        self.config = cfg
        self.cls_embedding = nn.Embedding(cfg.num_classes + 1, cfg.width)  # index num_classes: the null class
        self.tok_embeddings = nn.Embedding(cfg.in_vocab or cfg.vocab_size, cfg.width)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.RMSNorm(cfg.width, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.width, cfg.vocab_size, bias=False)
        self.register_buffer("rope", rope_2d(cfg.grid, cfg.width // cfg.heads, cfg.rope_base), persistent=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.output.weight)

    def embed(self, labels: Tensor | None, tokens: Tensor | None) -> Tensor:
        """Inputs (B, n, C): the class token (when labels are given; -1 = null) then token embeddings."""
        parts = []
        if labels is not None:
            parts.append(self.cls_embedding(torch.where(labels < 0, self.config.num_classes, labels))[:, None])
        if tokens is not None and tokens.shape[1]:
            parts.append(self.tok_embeddings(tokens))
        return torch.cat(parts, 1)

    def run(self, h: Tensor, start: int = 0, cache: KVCache | None = None) -> Tensor:
        """Logits (B, n, V) of inputs h (B, n, C) at input positions [start, start + n), over `cache`."""
        rope = self.rope[start: start + h.shape[1]]
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, cache, i, self.config.causal)
        return self.output(self.norm(h)).float()

    def forward(self, labels: Tensor, tokens: Tensor) -> Tensor:
        """Teacher forcing: logits (B, N, V) predicting tokens (B, N) from the class token and tokens[:, :-1]."""
        return self.run(self.embed(labels, tokens[:, :-1]))

    def new_cache(self, batch: int, like: Tensor) -> KVCache:
        c = self.config
        return KVCache.empty(c.depth, batch, c.heads, c.tokens, c.width // c.heads, like=like)


register_preset("raster-tiny", "raster", RasterARConfig(vocab_size=64, grid=4, depth=2, width=32, heads=2))
register_preset("raster-mnist", "raster", RasterARConfig())  # on vq-mnist: 64 tokens of 1024 codes
