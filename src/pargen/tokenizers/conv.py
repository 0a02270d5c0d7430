"""The convolutional VQ-VAE backbone of VAR (the LDM / taming "vq-f16" layout, VAR's fused-qkv attention).

Parameter names follow FoundationVision/VAR (`models/basic_vae.py`), so its VAE state dicts load directly:
`encoder.conv_in`, `encoder.down.{i}.block.{j}` (+ `.attn.{j}` at the lowest resolution, `.downsample`),
`encoder.mid.{block_1, attn_1, block_2}`, `encoder.norm_out`, `encoder.conv_out`, and the mirror image in the
decoder (`decoder.up.{i}` is processed from the lowest resolution, i = levels-1, down to 0).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, 1, 1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        # SiLU in place on each fresh norm output: no second full-size activation (7% of a 256-px decode on CPU)
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(self.dropout(F.silu(self.norm2(h), inplace=True)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over pixels with one fused 1x1 qkv convolution."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = _norm(c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).view(B, 3, C, H * W).unbind(1)
        w = torch.softmax(torch.bmm(q.transpose(1, 2), k) * C**-0.5, dim=2)  # (B, HW_q, HW_k)
        h = torch.bmm(v, w.transpose(1, 2)).view(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 2, 0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _Level(nn.Module):
    def __init__(self, blocks: list[nn.Module], attn: list[nn.Module], resample: nn.Module | None, name: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        if attn:
            self.attn = nn.ModuleList(attn)
        if resample is not None:
            setattr(self, name, resample)


class _Mid(nn.Module):
    def __init__(self, c: int, dropout: float):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResnetBlock(c, c, dropout), AttnBlock(c), ResnetBlock(c, c, dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


def _run_level(level: nn.Module, h: Tensor) -> Tensor:
    attn = getattr(level, "attn", None)
    for j, blk in enumerate(level.block):
        h = blk(h)
        if attn is not None:
            h = attn[j](h)
    return h


class Encoder(nn.Module):
    def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z_channels: int,
                 in_channels: int = 3, dropout: float = 0.0, using_sa: bool = True, using_mid_sa: bool = True):
        super().__init__()
        n = len(ch_mult)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, 1, 1)
        mult_in = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        for i in range(n):
            cin, cout = ch * mult_in[i], ch * ch_mult[i]
            blocks = [ResnetBlock(cin if j == 0 else cout, cout, dropout) for j in range(num_res_blocks)]
            attn = [AttnBlock(cout) for _ in range(num_res_blocks)] if using_sa and i == n - 1 else []
            self.down.append(_Level(blocks, attn, Downsample(cout) if i != n - 1 else None, "downsample"))
        c = ch * ch_mult[-1]
        if not using_mid_sa:
            raise NotImplementedError("the mid attention block is part of every VAR VAE")
        self.mid = _Mid(c, dropout)
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, z_channels, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h)), inplace=True))


class Decoder(nn.Module):
    def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z_channels: int,
                 out_channels: int = 3, dropout: float = 0.0, using_sa: bool = True):
        super().__init__()
        n = len(ch_mult)
        c = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, c, 3, 1, 1)
        self.mid = _Mid(c, dropout)
        up = []
        for i in reversed(range(n)):
            cout = ch * ch_mult[i]
            blocks = [ResnetBlock(c if j == 0 else cout, cout, dropout) for j in range(num_res_blocks + 1)]
            attn = [AttnBlock(cout) for _ in range(num_res_blocks + 1)] if using_sa and i == n - 1 else []
            up.insert(0, _Level(blocks, attn, Upsample(cout) if i != 0 else None, "upsample"))
            c = cout
        self.up = nn.ModuleList(up)
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, out_channels, 3, 1, 1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for i in reversed(range(len(self.up))):
            h = _run_level(self.up[i], h)
            if hasattr(self.up[i], "upsample"):
                h = self.up[i].upsample(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))
