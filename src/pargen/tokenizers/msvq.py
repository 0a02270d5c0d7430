"""VAR's multi-scale residual VQ-VAE (Tian et al., arXiv 2404.02905), computing what FoundationVision/VAR does.

Encoding quantises the residual at each scale pn in `patch_nums`: area-downsample the residual to pn x pn, pick the
nearest code (squared L2 in the reference's `|z|^2 + |e|^2 - 2 z.e` form, so ties break the same way), upsample
the code map bicubically to the final map (not at the last scale), refine it with a phi convolution
`phi(h) = (1 - r) h + r conv(h)` and add it to f_hat. Phi convolutions are shared by the reference's tick rule.
Parameter names follow `models/vqvae.py` / `models/quant.py`, so official VAE state dicts load directly.
"""
from __future__ import annotations

from dataclasses import dataclass
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import check
from ..registry import register_family, register_preset
from .codebook import VQOutput
from .conv import Decoder, Encoder


@dataclass(frozen=True)
class MSVQConfig:
    vocab_size: int = 4096
    z_channels: int = 32  # Cvae
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    dropout: float = 0.0
    beta: float = 0.25
    quant_resi: float = 0.5
    share_quant_resi: int = 4  # 0: one phi per scale; 1: one shared phi; k > 1: k phis shared by the tick rule
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    in_channels: int = 3
    img_size: int = 256

    def __post_init__(self):
        check(self)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


class Phi(nn.Conv2d):
    def __init__(self, c: int, ratio: float):
        super().__init__(c, c, 3, 1, 1)
        self.ratio = abs(ratio)

    def forward(self, h: Tensor) -> Tensor:
        return h.mul(1 - self.ratio) + super().forward(h).mul_(self.ratio)


def _ticks(k: int) -> np.ndarray:
    return np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k) if k == 4 else np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k)


class PhiShared(nn.Module):
    def __init__(self, phi: Phi):
        super().__init__()
        self.qresi = phi

    def pick(self, at: float) -> Phi:
        return self.qresi


class PhiPartiallyShared(nn.Module):
    def __init__(self, phis: list[Phi]):
        super().__init__()
        self.qresi_ls = nn.ModuleList(phis)
        self.ticks = _ticks(len(phis))

    def pick(self, at: float) -> Phi:
        return self.qresi_ls[int(np.argmin(np.abs(self.ticks - at)))]


class PhiNonShared(nn.ModuleList):
    def __init__(self, phis: list[Phi]):
        super().__init__(phis)
        self.ticks = _ticks(len(phis))

    def pick(self, at: float) -> Phi:
        return self[int(np.argmin(np.abs(self.ticks - at)))]


class MultiScaleQuantizer(nn.Module):
    """`VectorQuantizer2`: codebook `embedding`, phi convolutions `quant_resi`, usage buffer `ema_vocab_hit_SV`."""

    def __init__(self, cfg: MSVQConfig):
        super().__init__()
        self.patch_nums, self.beta, C, K = tuple(cfg.patch_nums), cfg.beta, cfg.z_channels, len(cfg.patch_nums)
        self.vocab_size, self.Cvae = cfg.vocab_size, C
        s = cfg.share_quant_resi
        if s == 0:
            self.quant_resi = PhiNonShared([Phi(C, cfg.quant_resi) for _ in range(K)])
        elif s == 1:
            self.quant_resi = PhiShared(Phi(C, cfg.quant_resi))
        else:
            self.quant_resi = PhiPartiallyShared([Phi(C, cfg.quant_resi) for _ in range(s)])
        self.register_buffer("ema_vocab_hit_SV", torch.full((K, cfg.vocab_size), 0.0))
        self.embedding = nn.Embedding(cfg.vocab_size, C)

    def phi(self, si: int) -> Phi:
        return self.quant_resi.pick(si / (len(self.patch_nums) - 1))

    def nearest(self, z_NC: Tensor) -> Tensor:
        e = self.embedding.weight.detach()
        d = z_NC.square().sum(1, keepdim=True) + e.square().sum(1)
        return torch.argmin(d.addmm_(z_NC, e.T, alpha=-2, beta=1), dim=1)

    def _code_map(self, si: int, idx: Tensor, pn: int, H: int, W: int) -> Tensor:
        """phi_si(bicubic-upsampled embedding map) (B, C, H, W) of indices (B, pn*pn)."""
        h = self.embedding(idx.view(-1, pn, pn)).permute(0, 3, 1, 2)
        if si != len(self.patch_nums) - 1:
            h = F.interpolate(h, size=(H, W), mode="bicubic")
        return self.phi(si)(h.contiguous())

    def encode(self, f: Tensor, to_fhat: bool = False) -> list[Tensor]:
        """Indices (B, pn^2) per scale, or the cumulative f_hat (B, C, H, W) after each scale."""
        B, C, H, W = f.shape
        rest, f_hat = f.detach().clone(), torch.zeros_like(f)
        out = []
        last = len(self.patch_nums) - 1
        for si, pn in enumerate(self.patch_nums):
            z = F.interpolate(rest, size=(pn, pn), mode="area") if si != last else rest
            idx = self.nearest(z.permute(0, 2, 3, 1).reshape(-1, C)).view(B, pn * pn)
            h = self._code_map(si, idx, pn, H, W)
            f_hat.add_(h)
            rest.sub_(h)
            out.append(f_hat.clone() if to_fhat else idx)
        return out

    def fhat_from_indices(self, idx: list[Tensor]) -> Tensor:
        H = W = self.patch_nums[-1]
        f_hat = torch.zeros(idx[0].shape[0], self.Cvae, H, W, device=idx[0].device)
        for si, pn in enumerate(self.patch_nums):
            f_hat = f_hat + self._code_map(si, idx[si], pn, H, W)
        return f_hat

    def teacher_forcing_input(self, idx: list[Tensor]) -> Tensor:
        """(B, L - 1, Cvae): area-downsampled f_hat after each scale but the last, at the next scale's size."""
        B, H = idx[0].shape[0], self.patch_nums[-1]
        f_hat = torch.zeros(B, self.Cvae, H, H, device=idx[0].device)
        nxt = []
        for si in range(len(self.patch_nums) - 1):
            f_hat = f_hat + self._code_map(si, idx[si], self.patch_nums[si], H, H)
            pn = self.patch_nums[si + 1]
            nxt.append(F.interpolate(f_hat, size=(pn, pn), mode="area").view(B, self.Cvae, -1).transpose(1, 2))
        return torch.cat(nxt, 1)

    def next_input(self, si: int, f_hat: Tensor, h: Tensor) -> tuple[Tensor, Tensor | None]:
        """Sampling: add scale si's code map h (B, C, pn, pn) to f_hat; return it and the next scale's input."""
        H = self.patch_nums[-1]
        if si != len(self.patch_nums) - 1:
            f_hat = f_hat + self.phi(si)(F.interpolate(h, size=(H, H), mode="bicubic"))
            pn = self.patch_nums[si + 1]
            return f_hat, F.interpolate(f_hat, size=(pn, pn), mode="area")
        return f_hat + self.phi(si)(h), None

    def forward(self, f: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Training path: (straight-through f_hat, VQ loss, per-scale code hits (K, V))."""
        B, C, H, W = f.shape
        f_no_grad = f.detach()
        rest, f_hat = f_no_grad.clone(), torch.zeros_like(f)
        loss = f.new_zeros(())
        hits = []
        last = len(self.patch_nums) - 1
        for si, pn in enumerate(self.patch_nums):
            z = F.interpolate(rest, size=(pn, pn), mode="area") if si != last else rest
            idx = self.nearest(z.permute(0, 2, 3, 1).reshape(-1, C))
            hits.append(idx.bincount(minlength=self.vocab_size).float())
            h = self._code_map(si, idx.view(B, pn * pn), pn, H, W)
            f_hat = f_hat + h
            rest = rest - h
            loss = loss + F.mse_loss(f_hat.detach(), f).mul_(self.beta) + F.mse_loss(f_hat, f_no_grad)
        loss = loss / len(self.patch_nums)
        return (f_hat.detach() - f_no_grad) + f, loss, torch.stack(hits)


@register_family("msvq")
class MSVQVAE(nn.Module):
    """`VQVAE`: encoder -> quant_conv -> multi-scale quantizer -> post_quant_conv -> decoder."""

    Config = MSVQConfig

    def __init__(self, cfg: MSVQConfig):
        super().__init__()
        if cfg.img_size // cfg.downsample != cfg.patch_nums[-1]:
            raise ValueError(f"img_size {cfg.img_size} / {cfg.downsample} must equal the last patch_num "
                             f"{cfg.patch_nums[-1]}")
        self.config = cfg
        C = cfg.z_channels
        self.encoder = Encoder(cfg.ch, cfg.ch_mult, cfg.num_res_blocks, C, cfg.in_channels, cfg.dropout)
        self.decoder = Decoder(cfg.ch, cfg.ch_mult, cfg.num_res_blocks, C, cfg.in_channels, cfg.dropout)
        self.quantize = MultiScaleQuantizer(cfg)
        self.quant_conv = nn.Conv2d(C, C, 3, 1, 1)
        self.post_quant_conv = nn.Conv2d(C, C, 3, 1, 1)

    def encode(self, img: Tensor) -> Tensor:
        """Image in [-1, 1] -> latent f (B, Cvae, h, w)."""
        return self.quant_conv(self.encoder(img))

    def img_to_indices(self, img: Tensor) -> list[Tensor]:
        return self.quantize.encode(self.encode(img))

    def fhat_to_img(self, f_hat: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1)

    def indices_to_img(self, idx: list[Tensor]) -> Tensor:
        return self.fhat_to_img(self.quantize.fhat_from_indices(idx))

    def forward(self, img: Tensor) -> VQOutput:
        """Training path: reconstruction (not clamped, as in the reference), VQ loss, code hits, latent."""
        f = self.encode(img)
        f_hat, loss, hits = self.quantize(f)
        return VQOutput(self.decoder(self.post_quant_conv(f_hat)), loss, hits, f)


def _preset(name: str, **kw) -> None:
    register_preset(name, "msvq", MSVQConfig(**kw))


_preset("msvq-var-tiny", vocab_size=64, z_channels=16, ch=32, patch_nums=(1, 2, 3, 4), img_size=64)
_preset("msvq-var-f16", vocab_size=4096, z_channels=32, ch=160, img_size=256)  # vae_ch160v4096z32.pth
_preset("msvq-mnist", vocab_size=512, z_channels=16, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
        patch_nums=(1, 2, 3, 4, 6, 8), in_channels=1, img_size=32)
