"""Exact multi-head attention with an explicit, preallocated KV cache.

The cache is a value the sampler holds (no module state; layers with low-rank attention keep their running state
in `poly` instead): keys/values for positions [0, length) are committed;
a call on n new tokens writes their keys/values at [length, length + n) and attends over [0, length + n), and
`commit(m)` keeps the first m of them. Writing in place avoids the O(T^2) copying of `torch.cat` caches.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class KVCache:
    k: Tensor  # (layers, B, H, T, Dh)
    v: Tensor  # (layers, B, H, T, Dh)
    length: int = 0
    poly: dict[int, Any] = field(default_factory=dict)  # layer -> running low-rank state (nn/lowrank.py)

    @classmethod
    def empty(cls, layers: int, batch: int, heads: int, max_len: int, head_dim: int, like: Tensor) -> "KVCache":
        shape = (layers, batch, heads, max_len, head_dim)
        return cls(like.new_empty(shape), like.new_empty(shape), 0)

    @staticmethod
    def bytes_for(layers: int, rows: int, tokens: int, width: int, itemsize: int = 4) -> int:
        """Memory of the keys and values of `tokens` positions (width = heads x head_dim) in `layers` layers."""
        return 2 * layers * rows * tokens * width * itemsize

    def commit(self, m: int) -> None:
        if self.length + m > self.k.shape[3]:
            raise ValueError(f"cache overflow: {self.length} + {m} > {self.k.shape[3]}")
        self.length += m


def attend(q: Tensor, k: Tensor, v: Tensor, cache: KVCache | None, layer: int, scale: float,
           causal: bool = True) -> Tensor:
    """Attention of q (B, H, n, Dh) over the cache plus the n new keys/values (B, H_kv, n, Dh); causal among the
    new ones. With fewer key/value heads than query heads (grouped-query attention) each serves H / H_kv
    consecutive query heads; the cache holds the H_kv heads only."""
    n = q.shape[2]
    rep = q.shape[1] // k.shape[1]
    if cache is None:
        if rep > 1:
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal and n > 1, scale=scale)
    start = cache.length
    cache.k[layer, :, :, start: start + n] = k
    cache.v[layer, :, :, start: start + n] = v
    k_all = cache.k[layer, :, :, : start + n]
    v_all = cache.v[layer, :, :, : start + n]
    if rep > 1:
        k_all, v_all = k_all.repeat_interleave(rep, 1), v_all.repeat_interleave(rep, 1)
    mask = None
    if causal and n > 1:
        # query i (absolute position start + i) sees keys j <= start + i
        mask = torch.arange(start + n, device=q.device) <= torch.arange(start, start + n, device=q.device)[:, None]
    return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, scale=scale)


def layer_norm(x: Tensor, norm: torch.nn.LayerNorm) -> Tensor:
    """LayerNorm computed in at least float32 (as ml-tarflow does), returned in x's dtype."""
    dt = torch.promote_types(x.dtype, torch.float32)
    w = None if norm.weight is None else norm.weight.to(dt)
    b = None if norm.bias is None else norm.bias.to(dt)
    return F.layer_norm(x.to(dt), norm.normalized_shape, w, b, norm.eps).to(x.dtype)
