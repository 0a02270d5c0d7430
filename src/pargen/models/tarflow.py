"""TarFlow (Zhai et al., arXiv 2412.06329): a stack of causal-transformer affine autoregressive flows on patches.

Parameter names follow apple/ml-tarflow, so its state dicts load directly (see `pargen.convert.tarflow`).
This file holds the parallel math only; sampling (sequential, Jacobi, GS-Jacobi) is in `samplers/flow.py`.

Block k maps x -> z in its own token order (identity for even k, reversed for odd k):
    h = proj_out(transformer(proj_in(x) + pos [+ class])),  (a_t, b_t) = h_{t-1}  (a_0 = b_0 = 0)
    z_t = (x_t - b_t) * exp(-a_t),   logdet = -mean(a)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import check
from ..nn.attention import KVCache, attend, layer_norm
from ..registry import register_family, register_preset


@dataclass(frozen=True)
class TarFlowConfig:
    in_channels: int = 1
    img_size: int = 28
    patch_size: int = 4
    width: int = 128  # ml-tarflow `channels`
    num_blocks: int = 4
    layers_per_block: int = 2
    head_dim: int = 64
    expansion: int = 4
    nvp: bool = True  # False: volume-preserving (shift only) blocks with a learned prior variance
    num_classes: int = 0
    noise_std: float = 0.05  # Gaussian noise augmentation used in training and by the denoising step

    def __post_init__(self):
        check(self, ("width", "head_dim"), ("img_size", "patch_size"))

    @property
    def seq_len(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.patch_size**2


class Attention(nn.Module):
    def __init__(self, width: int, head_dim: int):
        super().__init__()
        if width % head_dim:
            raise ValueError(f"width {width} is not a multiple of head_dim {head_dim}")
        self.norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.heads, self.head_dim = width // head_dim, head_dim

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0, q_scale: Tensor | None = None) -> Tensor:
        B, n, C = x.shape
        qkv = self.qkv(layer_norm(x, self.norm)).view(B, n, 3 * self.heads, self.head_dim).transpose(1, 2)
        q, k, v = qkv.chunk(3, dim=1)  # (B, H, n, Dh) each
        if q_scale is not None:  # per-sample attention temperature (1 / temp), used by the unconditional branch
            q = q * q_scale
        o = attend(q, k, v, cache, layer, scale=1.0 / math.sqrt(self.head_dim))
        return self.proj(o.transpose(1, 2).reshape(B, n, C))


class MLP(nn.Module):
    def __init__(self, width: int, expansion: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.main = nn.Sequential(nn.Linear(width, width * expansion), nn.GELU(), nn.Linear(width * expansion, width))

    def forward(self, x: Tensor) -> Tensor:
        return self.main(layer_norm(x, self.norm))


class AttentionBlock(nn.Module):
    def __init__(self, width: int, head_dim: int, expansion: int):
        super().__init__()
        self.attention = Attention(width, head_dim)
        self.mlp = MLP(width, expansion)


class MetaBlock(nn.Module):
    """One flow step: a causal transformer predicting (a, b) of each token from the tokens before it."""

    def __init__(self, cfg: TarFlowConfig, flip: bool):
        super().__init__()
        T, D, W = cfg.seq_len, cfg.patch_dim, cfg.width
        self.flip, self.nvp = flip, cfg.nvp
        self.proj_in = nn.Linear(D, W)
        self.pos_embed = nn.Parameter(torch.randn(T, W) * 1e-2)
        self.class_embed = nn.Parameter(torch.randn(cfg.num_classes, 1, W) * 1e-2) if cfg.num_classes else None
        self.attn_blocks = nn.ModuleList(AttentionBlock(W, cfg.head_dim, cfg.expansion)
                                         for _ in range(cfg.layers_per_block))
        self.proj_out = nn.Linear(W, 2 * D if cfg.nvp else D)
        nn.init.zeros_(self.proj_out.weight)  # each block starts as a token-independent affine map

    def order(self, x: Tensor) -> Tensor:
        """Put a (B, T, D) sequence into this block's token order (its own inverse)."""
        return x.flip(1) if self.flip else x

    def cond_embed(self, y: Tensor | None) -> Tensor | None:
        """(B, 1, W) class embedding; label < 0 or y None -> the mean embedding (the unconditional branch)."""
        if self.class_embed is None:
            return None
        mean = self.class_embed.mean(0)  # (1, W)
        if y is None:
            return mean
        emb = self.class_embed[y.clamp(min=0)]  # (B, 1, W)
        return torch.where((y < 0).view(-1, 1, 1), mean, emb)

    def hidden(self, x: Tensor, start: int, cond: Tensor | None, cache: KVCache | None = None,
               q_scale: Tensor | None = None) -> Tensor:
        """Raw outputs h (B, n, 2D) for tokens x (B, n, D) at positions [start, start + n) of the block's order."""
        pos = self.pos_embed.flip(0) if self.flip else self.pos_embed
        h = self.proj_in(x) + pos[start: start + x.shape[1]]
        if cond is not None:
            h = h + cond
        for i, blk in enumerate(self.attn_blocks):
            h = h + blk.attention(h, cache, i, q_scale)
            h = h + blk.mlp(h)
        return self.proj_out(h)

    def split(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """(a, b) = log-scale and shift from raw outputs h."""
        if self.nvp:
            a, b = h.chunk(2, dim=-1)
            return a, b
        return torch.zeros_like(h), h

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x (B, T, D) in raster order -> (z in raster order, logdet (B,))."""
        xs = self.order(x)
        h = self.hidden(xs, 0, self.cond_embed(y))
        h = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)  # shift: token t gets h_{t-1}
        a, b = self.split(h)
        z = (xs - b) * torch.exp(-a.to(torch.promote_types(a.dtype, torch.float32))).to(a.dtype)
        return self.order(z), -a.mean(dim=(1, 2))


class FlowOutput(NamedTuple):
    z: Tensor  # (B, T, D)
    logdet: Tensor  # (B,) sum over blocks of per-dimension mean log-det
    block_outputs: list[Tensor]


@register_family("tarflow")
class TarFlow(nn.Module):
    Config = TarFlowConfig

    def __init__(self, cfg: TarFlowConfig):
        super().__init__()
        if cfg.img_size % cfg.patch_size:
            raise ValueError(f"img_size {cfg.img_size} is not a multiple of patch_size {cfg.patch_size}")
        self.config = cfg
        self.blocks = nn.ModuleList(MetaBlock(cfg, flip=bool(k % 2)) for k in range(cfg.num_blocks))
        # prior variance: ones for nvp; learned by EMA of z^2 in vp mode (ml-tarflow `update_prior`)
        self.register_buffer("var", torch.ones(cfg.seq_len, cfg.patch_dim))

    def patchify(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, T, C*p*p), unfold's feature order (channel, row, column)."""
        p = self.config.patch_size
        return F.unfold(x, p, stride=p).transpose(1, 2)

    def unpatchify(self, x: Tensor) -> Tensor:
        p, s = self.config.patch_size, self.config.img_size
        return F.fold(x.transpose(1, 2), (s, s), p, stride=p)

    def forward(self, x: Tensor, y: Tensor | None = None) -> FlowOutput:
        """Image (B, C, H, W) in [-1, 1] -> latent (B, T, D), log-det and every block's output."""
        h = self.patchify(x)
        logdet = torch.zeros((), dtype=x.dtype, device=x.device)
        outs = []
        for block in self.blocks:
            h, ld = block(h, y)
            logdet = logdet + ld
            outs.append(h)
        return FlowOutput(h, logdet, outs)

    def nll(self, z: Tensor, logdet: Tensor) -> Tensor:
        """Per-dimension negative log-likelihood without the Gaussian constant (the training loss)."""
        return 0.5 * z.pow(2).mean() - logdet.mean()

    def loss(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        return self.nll(*self(x, y)[:2])

    @torch.no_grad()
    def update_prior(self, z: Tensor, rate: float = 0.1) -> None:
        """vp mode: track the latent variance (EMA of z^2), as ml-tarflow does."""
        if not self.config.nvp:
            self.var.lerp_(z.pow(2).mean(0), rate)


def _preset(name: str, **kw) -> None:
    register_preset(name, "tarflow", TarFlowConfig(**kw))


_preset("tarflow-tiny", in_channels=1, img_size=8, patch_size=2, width=64, num_blocks=2, layers_per_block=1,
        num_classes=10)
_preset("tarflow-mnist", in_channels=1, img_size=28, patch_size=4, width=128, num_blocks=4, layers_per_block=2,
        num_classes=10, noise_std=0.05)
