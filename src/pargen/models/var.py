"""VAR next-scale prediction transformer (Tian et al., arXiv 2404.02905), computing what FoundationVision/VAR does.

Tokens are the scales of a multi-scale residual VQ (`tokenizers/msvq.py`): the class embedding is the start token
and the AdaLN condition; each position adds a learned absolute position and its scale's level embedding.
Blocks are AdaLN self-attention blocks (gamma1, gamma2, scale1, scale2, shift1, shift2), attention logits are
s_h cos(q, k) with a learned per-head temperature s_h = exp(min(scale_mul, log 100)) when `attn_l2_norm`.
Training sees all scales at once under the block-causal mask (a token sees its own and every coarser scale);
sampling runs one scale per call with an explicit KV cache (see `samplers/autoregressive.py`).
Parameter and buffer names follow `models/var.py` / `models/basic_var.py`, so official state dicts load directly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import check
from ..nn.attention import KVCache, attend
from ..nn.lowrank import PolySpec, PolyState, poly_attention
from ..registry import register_family, register_preset


@dataclass(frozen=True)
class VARConfig:
    vocab_size: int = 4096
    z_channels: int = 32  # Cvae: the tokenizer's latent channels
    depth: int = 16
    width: int = 0  # 0: 64 * depth (the reference's rule)
    heads: int = 0  # 0: depth
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    attn_l2_norm: bool = True
    shared_aln: bool = False
    norm_eps: float = 1e-6
    cond_drop_rate: float = 0.1
    drop_path_rate: float = 0.0
    attn_scale_cap: float = 100.0  # the head scales s_h are clamped to this (the reference: 100)

    def __post_init__(self):
        check(self, ("C", "H"))

    @property
    def C(self) -> int:
        return self.width or 64 * self.depth

    @property
    def H(self) -> int:
        return self.heads or self.depth

    @property
    def L(self) -> int:
        return sum(p * p for p in self.patch_nums)

    def begin_ends(self) -> list[tuple[int, int]]:
        out, cur = [], 0
        for pn in self.patch_nums:
            out.append((cur, cur + pn * pn))
            cur += pn * pn
        return out


class SelfAttention(nn.Module):
    def __init__(self, C: int, H: int, l2_norm: bool, scale_cap: float = 100.0):
        super().__init__()
        self.heads, self.head_dim, self.l2_norm = H, C // H, l2_norm
        self.poly: PolySpec | None = None  # low-rank attention (set by VAR.set_lowrank)
        self.blocks: list[int] = []  # token count of each scale (the block-causal structure)
        if l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, H, 1, 1), 4.0).log())
            self.max_scale_mul = math.log(scale_cap)
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(C, 3 * C, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(C)), nn.Parameter(torch.zeros(C))
        self.register_buffer("zero_k_bias", torch.zeros(C))
        self.proj = nn.Linear(C, C)

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The attention inputs (B, H, L, Dh) each; logits are self.scale * q.k (q carries s_h when l2-normed)."""
        B, L, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        q, k, v = F.linear(x, self.mat_qkv.weight, bias).view(B, L, 3, self.heads, self.head_dim).permute(
            2, 0, 3, 1, 4).unbind(0)
        if self.l2_norm:
            q = F.normalize(q, dim=-1).mul(self.head_scales().view(1, -1, 1, 1))
            k = F.normalize(k, dim=-1)
        return q, k, v

    def forward(self, x: Tensor, mask: Tensor | None = None, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        B, L, C = x.shape
        q, k, v = self.qkv(x)
        if self.poly is not None:  # running state while sampling, block-wise cumulative sums under the mask
            if cache is not None:
                o = cache.poly.setdefault(layer, PolyState(self.poly, self.scale)).attend(q, k, v)
            else:
                o = poly_attention(q, k, v, self.scale, self.poly, None if mask is None else self._blocks(L))
        elif cache is not None:  # one scale sees itself and every cached (coarser) scale: no mask
            o = attend(q, k, v, cache, layer, scale=self.scale, causal=False)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return self.proj(o.transpose(1, 2).reshape(B, L, C))

    def head_scales(self) -> Tensor:
        """s_h (H,): the logit bound of each head under l2-normalised attention."""
        return self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp().flatten()

    def _blocks(self, n: int) -> list[int]:
        out, cur = [], 0
        for b in self.blocks:
            if cur >= n:
                break
            out.append(b)
            cur += b
        if cur != n:
            raise ValueError(f"{n} tokens do not end at a scale boundary")
        return out


class FFN(nn.Module):
    def __init__(self, C: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(C, hidden), nn.Linear(hidden, C)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DropPath(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class AdaLNSelfAttn(nn.Module):
    def __init__(self, cfg: VARConfig, drop_path: float):
        super().__init__()
        C = cfg.C
        self.C, self.shared = C, cfg.shared_aln
        self.attn = SelfAttention(C, cfg.H, cfg.attn_l2_norm, cfg.attn_scale_cap)
        self.ffn = FFN(C, round(C * cfg.mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(C, eps=cfg.norm_eps, elementwise_affine=False)
        self.drop_path = DropPath(drop_path)
        if self.shared:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, C) / C**0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(C, 6 * C))

    def forward(self, x: Tensor, cond: Tensor, mask: Tensor | None = None, cache: KVCache | None = None,
                layer: int = 0) -> Tensor:
        mod = (self.ada_gss + cond) if self.shared else self.ada_lin(cond).view(-1, 1, 6, self.C)
        g1, g2, s1, s2, sh1, sh2 = mod.unbind(2)
        x = x + self.drop_path(self.attn(self.ln_wo_grad(x).mul(s1.add(1)).add_(sh1), mask, cache, layer).mul_(g1))
        return x + self.drop_path(self.ffn(self.ln_wo_grad(x).mul(s2.add(1)).add_(sh2)).mul(g2))


class AdaLNBeforeHead(nn.Module):
    def __init__(self, C: int, eps: float):
        super().__init__()
        self.C = C
        self.ln_wo_grad = nn.LayerNorm(C, eps=eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(C, 2 * C))

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x).mul(scale.add(1)).add_(shift)


@register_family("var")
class VAR(nn.Module):
    Config = VARConfig

    def __init__(self, cfg: VARConfig):
        super().__init__()
        self.config = cfg
        C, L = cfg.C, cfg.L
        if C % cfg.H:
            raise ValueError(f"width {C} is not a multiple of heads {cfg.H}")
        self.word_embed = nn.Linear(cfg.z_channels, C)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)  # index num_classes: unconditional
        self.pos_start = nn.Parameter(torch.empty(1, 1, C))
        self.pos_1LC = nn.Parameter(torch.empty(1, L, C))
        self.lvl_embed = nn.Embedding(len(cfg.patch_nums), C)
        lvl = torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(cfg.patch_nums)]).view(1, L)
        self.register_buffer("lvl_1L", lvl)
        mask = torch.where(lvl.view(L, 1) >= lvl.view(1, L), 0.0, -torch.inf).view(1, 1, L, L)
        self.register_buffer("attn_bias_for_masking", mask.contiguous())
        if cfg.shared_aln:
            self.shared_ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(C, 6 * C))
        dpr = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # linear over depth
        self.blocks = nn.ModuleList(AdaLNSelfAttn(cfg, dpr[i]) for i in range(cfg.depth))
        self.head_nm = AdaLNBeforeHead(C, cfg.norm_eps)
        self.head = nn.Linear(C, cfg.vocab_size)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02) -> None:
        """The reference's `init_weights` (std sqrt(1/(3C)) truncated normal; scaled heads and AdaLN)."""
        C, depth = self.config.C, self.config.depth
        std = math.sqrt(1 / C / 3)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for p in (self.pos_start, self.pos_1LC):
            nn.init.trunc_normal_(p, std=std)
        self.head.weight.mul_(init_head)
        self.head.bias.zero_()
        self.head_nm.ada_lin[-1].weight.mul_(init_adaln)
        self.head_nm.ada_lin[-1].bias.zero_()
        for b in self.blocks:
            b.attn.proj.weight.div_(math.sqrt(2 * depth))
            b.ffn.fc2.weight.div_(math.sqrt(2 * depth))
            if not b.shared:
                w = b.ada_lin[-1].weight
                w[2 * C:].mul_(init_adaln)
                w[:2 * C].mul_(init_adaln_gamma)
                b.ada_lin[-1].bias.zero_()

    def set_lowrank(self, layers: list[int] | None, spec: PolySpec | None) -> None:
        """Use polynomial (low-rank) attention of `spec` in `layers` (None: every layer) and exact attention in
        the others; `spec=None` makes every layer exact again. Applies to sampling and teacher forcing."""
        depth = self.config.depth
        chosen = set(range(depth) if layers is None else layers)
        if not chosen <= set(range(depth)):
            raise ValueError(f"layers {sorted(chosen)} out of range for depth {depth}")
        for i, b in enumerate(self.blocks):
            b.attn.poly = spec if (spec is not None and i in chosen) else None
            b.attn.blocks = [p * p for p in self.config.patch_nums]

    def lowrank_layers(self) -> list[int]:
        return [i for i, b in enumerate(self.blocks) if b.attn.poly is not None]

    def condition(self, label: Tensor) -> tuple[Tensor, Tensor]:
        """(start-token embedding (B, C), AdaLN condition for the blocks) of labels (num_classes = no class)."""
        cond = self.class_emb(label)
        return cond, (self.shared_ada_lin(cond).view(-1, 1, 6, self.config.C) if self.config.shared_aln else cond)

    def logits(self, h: Tensor, cond: Tensor) -> Tensor:
        return self.head(self.head_nm(h.float(), cond).to(self.head.weight.dtype)).float()

    def forward(self, label: Tensor, x_wo_first: Tensor, cond_drop: float | None = None,
                generator: torch.Generator | None = None) -> Tensor:
        """Teacher-forced logits (B, L, V) from labels (B,) and the tokenizer's next-scale inputs (B, L-1, Cvae).

        Labels are replaced by the null class with probability `cond_drop` (default: the config's), drawing
        `rand(B)` from `generator` (None: torch's global generator, as the reference does)."""
        cfg = self.config
        B = x_wo_first.shape[0]
        p = cfg.cond_drop_rate if cond_drop is None else cond_drop
        if p > 0:
            drop = torch.rand(B, device=label.device, generator=generator) < p
            label = torch.where(drop, cfg.num_classes, label)
        cond, ada = self.condition(label)
        sos = cond.unsqueeze(1) + self.pos_start
        x = torch.cat((sos, self.word_embed(x_wo_first.float())), 1)
        x = x + self.lvl_embed(self.lvl_1L.expand(B, -1)) + self.pos_1LC
        for b in self.blocks:
            x = b(x, ada, self.attn_bias_for_masking)
        return self.logits(x, cond)

    def loss(self, logits: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
        """Mean cross-entropy over all tokens of all scales (the reference's uniform 1/L weights)."""
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                               label_smoothing=label_smoothing)


def _preset(name: str, **kw) -> None:
    register_preset(name, "var", VARConfig(**kw))


_preset("var-tiny", vocab_size=64, z_channels=16, depth=2, width=128, heads=2, num_classes=10,
        patch_nums=(1, 2, 3, 4))
_preset("var-d16", depth=16)  # var_d16.pth
_preset("var-mnist", vocab_size=512, z_channels=16, depth=4, width=128, heads=4, num_classes=10,
        patch_nums=(1, 2, 3, 4, 6, 8))
