"""Raster-order autoregressive image model in LlamaGen's layout (Sun et al., arXiv 2406.06525;
FoundationVision/LlamaGen `autoregressive/models/gpt.py`, c2i): a class token (a learned embedding with a null class
for guidance) followed by the image tokens in raster order, pre-norm blocks with RMSNorm, SwiGLU feed-forward,
causal attention (optionally grouped-query) with 2D rotary positions (half of each head's pairs rotate with the
row, half with the column), no biases, a zero-initialised output head. Parameter names and shapes are the
official ones (`cls_embedding.embedding_table`, `layers.i.attention.wqkv`, `layers.i.feed_forward.w1` ...), so an
official GPT-B ... 3B state dict loads strictly (`convert/llamagen.py`).

Input position 0 is the class token and input position i >= 1 is token i - 1; the logits at position i predict
token i. The same `run` serves teacher-forced training (all positions at once), KV-cached sampling (one
position per call) and Jacobi decoding (a window of positions per call over a committed cache).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import check
from ..nn.attention import KVCache, attend
from ..registry import register_family, register_preset


@dataclass(frozen=True)
class RasterARConfig:
    vocab_size: int = 1024
    grid: int = 8  # tokens per side
    depth: int = 4
    width: int = 128
    heads: int = 4
    kv_heads: int = 0  # grouped-query attention: key/value heads (0: one per query head)
    ffn_multiple: int = 32  # SwiGLU hidden = 8/3 width rounded up to this (LlamaGen: 256)
    num_classes: int = 10
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    in_vocab: int = 0  # input token vocabulary (0: vocab_size); CTF's stage 2 reads coarse labels
    causal: bool = True  # False: bidirectional (CTF's stage 2)
    class_rope: str = "zero"  # the class token's rotary row: "zero" (LlamaGen's table) or "identity"

    def __post_init__(self):
        check(self, ("width", "heads"), ("heads", "kv"))

    @property
    def tokens(self) -> int:
        return self.grid * self.grid

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def kv(self) -> int:
        return self.kv_heads or self.heads

    @property
    def ffn_hidden(self) -> int:
        h = int(2 * 4 * self.width / 3)
        return -(-h // self.ffn_multiple) * self.ffn_multiple


def rope_2d(grid: int, head_dim: int, base: float, class_rope: str = "zero") -> Tensor:
    """(1 + grid^2, head_dim / 2, 2) cos/sin per input position, in float32 as LlamaGen's
    `precompute_freqs_cis_2d`: row frequencies on the first half of the pairs, column frequencies on the second.
    The class token's row is zeros there (its q and k vanish: it reaches the image tokens through V only);
    `class_rope="identity"` leaves it unrotated instead."""
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    f = torch.outer(torch.arange(grid), freqs)  # (grid, half / 2)
    ang = torch.cat((f[:, None, :].expand(-1, grid, -1), f[None, :, :].expand(grid, -1, -1)), -1)
    table = torch.stack((ang.cos(), ang.sin()), -1).flatten(0, 1)
    first = torch.zeros(1, half, 2)
    if class_rope == "identity":
        first[..., 0] = 1
    return torch.cat((first, table))


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate consecutive pairs of x (B, H, n, Dh) by rope (n, Dh / 2, 2), in float32."""
    xr = x.float().unflatten(-1, (-1, 2))
    c, s = rope[..., 0], rope[..., 1]
    out = torch.stack((xr[..., 0] * c - xr[..., 1] * s, xr[..., 1] * c + xr[..., 0] * s), -1)
    return out.flatten(-2).type_as(x)


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) in float32, cast back, times the weight (LlamaGen's op order)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, cfg: RasterARConfig):
        super().__init__()
        self.heads, self.kv, self.head_dim = cfg.heads, cfg.kv, cfg.head_dim
        self.wqkv = nn.Linear(cfg.width, (cfg.heads + 2 * cfg.kv) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.width, cfg.width, bias=False)

    def forward(self, x: Tensor, rope: Tensor, cache: KVCache | None, layer: int, causal: bool) -> Tensor:
        B, n, C = x.shape
        d = self.head_dim
        q, k, v = self.wqkv(x).split([self.heads * d, self.kv * d, self.kv * d], -1)
        q, k, v = (t.view(B, n, -1, d).transpose(1, 2) for t in (q, k, v))
        a = attend(apply_rope(q, rope), apply_rope(k, rope), v, cache, layer, d**-0.5, causal=causal)
        return self.wo(a.transpose(1, 2).reshape(B, n, C))


class FeedForward(nn.Module):
    def __init__(self, cfg: RasterARConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.width, cfg.ffn_hidden, bias=False)
        self.w3 = nn.Linear(cfg.width, cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.width, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes: int, width: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, width)  # row num_classes: the null class


class Block(nn.Module):
    def __init__(self, cfg: RasterARConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.width, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.width, cfg.norm_eps)

    def forward(self, x: Tensor, rope: Tensor, cache: KVCache | None, layer: int, causal: bool = True) -> Tensor:
        h = x + self.attention(self.attention_norm(x), rope, cache, layer, causal)
        return h + self.feed_forward(self.ffn_norm(h))


@register_family("raster")
class RasterAR(nn.Module):
    Config = RasterARConfig

    def __init__(self, cfg: RasterARConfig):
        super().__init__()
        if cfg.width % cfg.heads or (cfg.width // cfg.heads) % 4:
            raise ValueError(f"width {cfg.width} / heads {cfg.heads} must be a multiple of 4 (2D rotary pairs)")
        if cfg.heads % cfg.kv:
            raise ValueError(f"heads {cfg.heads} must be a multiple of kv_heads {cfg.kv}")
        if cfg.class_rope not in ("zero", "identity"):
            raise ValueError(f"class_rope must be 'zero' or 'identity', not {cfg.class_rope!r}")
        self.config = cfg
        self.cls_embedding = LabelEmbedder(cfg.num_classes, cfg.width)
        self.tok_embeddings = nn.Embedding(cfg.in_vocab or cfg.vocab_size, cfg.width)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = RMSNorm(cfg.width, cfg.norm_eps)
        self.output = nn.Linear(cfg.width, cfg.vocab_size, bias=False)
        self.register_buffer("rope", rope_2d(cfg.grid, cfg.head_dim, cfg.rope_base, cfg.class_rope), persistent=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.output.weight)

    def embed(self, labels: Tensor | None, tokens: Tensor | None) -> Tensor:
        """Inputs (B, n, C): the class token (when labels are given; -1 = null) then token embeddings."""
        parts = []
        if labels is not None:
            null = torch.where(labels < 0, self.config.num_classes, labels)
            parts.append(self.cls_embedding.embedding_table(null)[:, None])
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
        return KVCache.empty(c.depth, batch, c.kv, c.tokens, c.head_dim, like=like)


register_preset("raster-tiny", "raster", RasterARConfig(vocab_size=64, grid=4, depth=2, width=32, heads=2))
# on vq-mnist: 64 tokens of 1024 codes (trained with an unrotated class token)
register_preset("raster-mnist", "raster", RasterARConfig(class_rope="identity"))
# LlamaGen's class-conditional presets (`GPT_models`) over the VQ-16 tokenizer at 256 px (16x16 tokens; 384 px:
# --set grid=24); 1000 ImageNet classes, 16384 codes, FFN hidden a multiple of 256, head dim 64 (100 for 3B)
LLAMAGEN = {"B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1280, 36, 20), "XXL": (1536, 48, 24),
            "XXXL": (2560, 48, 40), "3B": (3200, 24, 32)}
for _name, (_w, _d, _h) in LLAMAGEN.items():
    register_preset(f"llamagen-{_name.lower()}", "raster",
                    RasterARConfig(vocab_size=16384, grid=16, depth=_d, width=_w, heads=_h, ffn_multiple=256,
                                   num_classes=1000))
