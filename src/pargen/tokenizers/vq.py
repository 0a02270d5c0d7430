"""Single-scale VQ-VAE with a large l2-normalised low-dimensional codebook, as LlamaGen's tokenizer
(FoundationVision/LlamaGen `tokenizer/tokenizer_image/vq_model.py`: `codebook_l2_norm=True`, 8-dim codes,
`quant_conv` / `post_quant_conv` 1x1 between the encoder's channels and the code space).

Latents and codes are compared after l2 normalisation (nearest code = largest cosine), the decoder sees
normalised codes, the loss is codebook MSE + beta x commitment MSE with a straight-through gradient, and dead
codes restart onto batch latents (`codebook.restart_dead_codes`) so a small dataset uses the whole codebook.
The encoder/decoder are the same convolutional stacks as VAR's tokenizer (`conv.py`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import check
from ..registry import register_family, register_preset
from .codebook import VQOutput
from .conv import Decoder, Encoder


@dataclass(frozen=True)
class VQConfig:
    vocab_size: int = 1024
    code_dim: int = 8
    z_channels: int = 16
    ch: int = 32
    ch_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    dropout: float = 0.0
    beta: float = 0.25
    in_channels: int = 1
    img_size: int = 32

    def __post_init__(self):
        check(self)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid(self) -> int:
        return self.img_size // self.downsample


class VectorQuantizer(nn.Module):
    """Nearest l2-normalised code; `ema_vocab_hit_SV` (1, V) is the usage EMA for dead-code restart."""

    def __init__(self, vocab_size: int, dim: int, beta: float):
        super().__init__()
        self.vocab_size, self.beta = vocab_size, beta
        self.embedding = nn.Embedding(vocab_size, dim)
        nn.init.uniform_(self.embedding.weight, -1 / vocab_size, 1 / vocab_size)
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(1, vocab_size))

    def codes(self) -> Tensor:
        return F.normalize(self.embedding.weight, dim=1)

    def nearest(self, z: Tensor) -> Tensor:
        """Indices (B, h*w) of the codes nearest to latents z (B, C, h, w)."""
        zf = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]), dim=1)
        return (zf @ self.codes().detach().T).argmax(1).view(z.shape[0], -1)

    def lookup(self, idx: Tensor, h: int, w: int) -> Tensor:
        """Normalised code map (B, C, h, w) of indices (B, h*w)."""
        e = F.normalize(self.embedding(idx), dim=-1)  # gather, then normalise: restarts may edit the table
        return e.view(idx.shape[0], h, w, -1).permute(0, 3, 1, 2)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(straight-through quantised latent, codebook + commitment loss, code hits (1, V))."""
        B, C, h, w = z.shape
        z = F.normalize(z, dim=1)
        idx = self.nearest(z)
        zq = self.lookup(idx, h, w)
        loss = F.mse_loss(zq, z.detach()) + self.beta * F.mse_loss(zq.detach(), z)
        return z + (zq - z).detach(), loss, idx.flatten().bincount(minlength=self.vocab_size).float()[None]


@register_family("vq")
class VQVAE(nn.Module):
    Config = VQConfig

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.z_channels, cfg.in_channels, cfg.dropout)
        self.decoder = Decoder(cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.z_channels, cfg.in_channels, cfg.dropout)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.code_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.code_dim, cfg.z_channels, 1)
        self.quantize = VectorQuantizer(cfg.vocab_size, cfg.code_dim, cfg.beta)

    def encode(self, img: Tensor) -> Tensor:
        """Image in [-1, 1] -> normalised latent (B, code_dim, h, w)."""
        return F.normalize(self.quant_conv(self.encoder(img)), dim=1)

    def img_to_indices(self, img: Tensor) -> Tensor:
        """Raster-order token indices (B, h*w)."""
        return self.quantize.nearest(self.encode(img))

    def indices_to_img(self, idx: Tensor) -> Tensor:
        g = self.config.grid
        return self.decoder(self.post_quant_conv(self.quantize.lookup(idx, g, g))).clamp(-1, 1)

    def forward(self, img: Tensor) -> VQOutput:
        """Training path: reconstruction (not clamped), VQ loss, code hits, normalised latent."""
        f = self.encode(img)
        zq, loss, hits = self.quantize(f)
        return VQOutput(self.decoder(self.post_quant_conv(zq)), loss, hits, f)


register_preset("vq-tiny", "vq", VQConfig(vocab_size=64, code_dim=4, z_channels=8, ch=32, ch_mult=(1, 1, 2),
                                          img_size=16))
register_preset("vq-mnist", "vq", VQConfig())  # 32x32 -> 8x8 tokens, 1024 codes of dim 8
