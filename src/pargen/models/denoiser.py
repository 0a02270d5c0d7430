"""A small class-conditional DiT noise predictor (Peebles & Xie, arXiv 2212.09748) and its VP noise schedule.

The network predicts epsilon from (x_t, t, y): patch tokens plus learned positions, adaLN-Zero blocks conditioned
on the timestep embedding plus the class embedding (index `num_classes` is the "no class" token used by
classifier-free guidance), and a zero-initialised linear head. With `skip`, a learned scalar of (t, y) times x_t
is added to the output: at high noise epsilon is close to x_t / sqrt(1 - alpha-bar), which a handful of coarse
tokens (e.g. four 14x14 patches of width 96: 384 numbers for 784 pixels) could not pass through. Small and
token-parallel on purpose: parallel-in-time sampling pays off on a CPU only when one batched call over a window of
steps costs far less than that many single calls, which a conv U-Net of useful size does not give (see
`../shared/research/diffusion.md`, section C).

The schedule is the discrete VP (DDPM) one: beta linear in [1e-4, 0.02] over 1000 steps (Ho et al.), or the
cosine alpha-bar of Nichol & Dhariwal; `alphas_cumprod` is kept in float64 for the samplers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import check
from ..registry import register_family, register_preset


@dataclass(frozen=True)
class DenoiserConfig:
    in_channels: int = 1
    img_size: int = 28
    patch_size: int = 4
    width: int = 128
    depth: int = 4
    heads: int = 4
    expansion: int = 4
    num_classes: int = 10  # 0: unconditional
    schedule: str = "linear"  # "linear" | "cosine"
    train_steps: int = 1000
    skip: bool = False  # add s(t, y) * x_t to the output: lets few, coarse tokens pass the full-resolution noise

    def __post_init__(self):
        check(self, ("width", "heads"), ("img_size", "patch_size"))

    @property
    def seq_len(self) -> int:
        return (self.img_size // self.patch_size) ** 2


def alphas_cumprod(kind: str, steps: int) -> Tensor:
    """alpha-bar_t for t = 0..steps-1 (float64)."""
    if kind == "linear":
        betas = torch.linspace(1e-4, 0.02, steps, dtype=torch.float64)
    elif kind == "cosine":
        s = 0.008
        f = torch.cos((torch.arange(steps + 1, dtype=torch.float64) / steps + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    else:
        raise ValueError(f"unknown schedule {kind!r}; use 'linear' or 'cosine'")
    return torch.cumprod(1 - betas, 0)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class Block(nn.Module):
    def __init__(self, width: int, heads: int, expansion: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, expansion * width), nn.GELU(approximate="tanh"),
                                 nn.Linear(expansion * width, width))
        self.ada = nn.Linear(width, 6 * width)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        B, n, C = x.shape
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(c).chunk(6, dim=1)
        q, k, v = self.qkv(modulate(self.norm1(x), sh1, sc1)).view(B, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, n, C)
        x = x + g1[:, None] * self.proj(a)
        return x + g2[:, None] * self.mlp(modulate(self.norm2(x), sh2, sc2))


@register_family("denoiser")
class Denoiser(nn.Module):
    """eps = model(x_t, t, y): x_t (B, C, H, W), t (B,) integer timesteps in [0, train_steps), y (B,) or None."""

    Config = DenoiserConfig

    def __init__(self, cfg: DenoiserConfig):
        super().__init__()
        if cfg.img_size % cfg.patch_size:
            raise ValueError(f"img_size {cfg.img_size} is not a multiple of patch_size {cfg.patch_size}")
        self.config = cfg
        w, p = cfg.width, cfg.patch_size
        self.patch = nn.Linear(cfg.in_channels * p * p, w)
        self.pos = nn.Parameter(torch.randn(1, cfg.seq_len, w) * 0.02)
        self.t_mlp = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
        self.y_embed = nn.Embedding(cfg.num_classes + 1, w)  # the last row is "no class"
        self.blocks = nn.ModuleList(Block(w, cfg.heads, cfg.expansion) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.head_ada = nn.Linear(w, 2 * w)
        self.head = nn.Linear(w, cfg.in_channels * p * p)
        self.skip = nn.Linear(w, 1) if cfg.skip else None
        # adaLN-Zero: every block starts as the identity, the output (and the skip gate) at zero
        for m in [*(b.ada for b in self.blocks), self.head_ada, self.head, *([self.skip] if cfg.skip else [])]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        self.register_buffer("alphas_cumprod", alphas_cumprod(cfg.schedule, cfg.train_steps), persistent=False)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        cfg = self.config
        B, C, H, W = x.shape
        if (C, H, W) != (cfg.in_channels, cfg.img_size, cfg.img_size):
            raise ValueError(f"expected images of shape {(cfg.in_channels, cfg.img_size, cfg.img_size)}, got "
                             f"{(C, H, W)}")
        p = cfg.patch_size
        h = self.patch(F.unfold(x, p, stride=p).transpose(1, 2)) + self.pos
        if y is None:
            y = torch.full((B,), -1, dtype=torch.long, device=x.device)
        y = torch.where(y < 0, torch.full_like(y, cfg.num_classes), y)  # -1 (dropped / unconditional) -> null
        c = F.silu(self.t_mlp(timestep_embedding(t.expand(B), cfg.width).to(h.dtype)) + self.y_embed(y))
        for blk in self.blocks:
            h = blk(h, c)
        shift, scale = self.head_ada(c).chunk(2, dim=1)
        h = self.head(modulate(self.norm(h), shift, scale))
        out = F.fold(h.transpose(1, 2), (H, W), p, stride=p)
        return out if self.skip is None else out + self.skip(c)[:, :, None, None] * x


def _preset(name: str, **kw) -> None:
    register_preset(name, "denoiser", DenoiserConfig(**kw))


_preset("denoiser-tiny", img_size=8, patch_size=2, width=32, depth=2, heads=2, num_classes=10)
_preset("denoiser-mnist", img_size=28, patch_size=7, width=192, depth=6, heads=6, num_classes=10)
# four tokens, narrow and deep: a batched call over a Picard window costs a small multiple of a single one on a CPU
_preset("denoiser-mnist-lite", img_size=28, patch_size=14, width=96, depth=12, heads=4, num_classes=10, skip=True)
