"""Official FoundationVision/VAR checkpoints (`vae_ch160v4096z32.pth`, `var_d*.pth`): plain state dicts, read with
`torch.load(weights_only=True)`, whose key names pargen's modules share; the configuration is read off the shapes."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint
from ..errors import PargenError
from . import read_state
from ..models.var import VAR, VARConfig
from ..tokenizers.msvq import MSVQConfig, MSVQVAE

VAR_PATCH_NUMS = {10: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)}  # the 256-px release


def vae_config(sd: dict[str, torch.Tensor], patch_nums: tuple[int, ...] | None = None) -> MSVQConfig:
    """MSVQConfig from an official VAE state dict (patch_nums given, or VAR's for its number of scales)."""
    try:
        V, C = sd["quantize.embedding.weight"].shape
        K = sd["quantize.ema_vocab_hit_SV"].shape[0]
        ch = sd["encoder.conv_in.weight"].shape[0]
    except KeyError as e:
        raise PargenError(f"not a VAR VAE state dict: missing {e}") from None
    levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.down."))
    ch_mult = tuple(sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in range(levels))
    blocks = 1 + max(int(k.split(".")[4]) for k in sd if k.startswith("encoder.down.0.block."))
    n_phi = sum(1 for k in sd if k.startswith("quantize.quant_resi.") and k.endswith(".weight"))
    share = 1 if "quantize.quant_resi.qresi.weight" in sd else (n_phi if any(
        ".qresi_ls." in k for k in sd) else 0)
    if patch_nums is None:
        if K not in VAR_PATCH_NUMS:
            raise PargenError(f"the state dict has {K} scales; pass patch_nums")
        patch_nums = VAR_PATCH_NUMS[K]
    if len(patch_nums) != K:
        raise PargenError(f"patch_nums {patch_nums} has {len(patch_nums)} scales, the state dict {K}")
    cfg = MSVQConfig(vocab_size=V, z_channels=C, ch=ch, ch_mult=ch_mult, num_res_blocks=blocks,
                     share_quant_resi=share, patch_nums=tuple(patch_nums),
                     in_channels=sd["encoder.conv_in.weight"].shape[1])
    return dataclasses.replace(cfg, img_size=patch_nums[-1] * cfg.downsample)


def load_vae(src: str | os.PathLike | dict[str, Any], patch_nums: tuple[int, ...] | None = None) -> MSVQVAE:
    """An official VAR VAE (path or state dict) as an `MSVQVAE`, strictly: every key and shape must match."""
    sd = read_state(src, "VAR VAE state dict")
    model = MSVQVAE(vae_config(sd, patch_nums))
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise PargenError(f"VAE state dict does not match: {str(e).splitlines()[0]}") from None
    return model.eval()


def var_config(sd: dict[str, torch.Tensor]) -> VARConfig:
    """VARConfig from an official VAR state dict (scales read off the `lvl_1L` buffer)."""
    try:
        C = sd["pos_start"].shape[-1]
        lvl = sd["lvl_1L"].flatten()
        V = sd["head.weight"].shape[0]
        Cvae = sd["word_embed.weight"].shape[1]
        classes = sd["class_emb.weight"].shape[0] - 1
    except KeyError as e:
        raise PargenError(f"not a VAR state dict: missing {e}") from None
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    counts = torch.bincount(lvl).tolist()
    patch_nums = tuple(int(round(n ** 0.5)) for n in counts)
    heads = sd["blocks.0.attn.scale_mul_1H11"].shape[1] if "blocks.0.attn.scale_mul_1H11" in sd else depth
    hidden = sd["blocks.0.ffn.fc1.weight"].shape[0]
    return VARConfig(vocab_size=V, z_channels=Cvae, depth=depth, width=C, heads=heads, mlp_ratio=hidden / C,
                     num_classes=classes, patch_nums=patch_nums,
                     attn_l2_norm="blocks.0.attn.scale_mul_1H11" in sd, shared_aln="shared_ada_lin.1.weight" in sd)


def load_var(src: str | os.PathLike | dict[str, Any]) -> VAR:
    """An official VAR transformer (path or state dict), strictly."""
    sd = read_state(src, "VAR state dict")
    model = VAR(var_config(sd))
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise PargenError(f"VAR state dict does not match: {str(e).splitlines()[0]}") from None
    return model.eval()


def convert(var_pth: str | os.PathLike, vae_pth: str | os.PathLike, out: str | os.PathLike,
            patch_nums: tuple[int, ...] | None = None) -> tuple[Path, Path]:
    """Official VAR transformer + its VAE as pargen checkpoints `out` and `out-vae` (the model names its
    tokenizer relative to itself, so the two move together); returns both stems, for `pargen.load(out)`."""
    var = load_var(var_pth)
    vae = load_vae(vae_pth, tuple(patch_nums) if patch_nums else var.config.patch_nums)
    if vae.config.vocab_size != var.config.vocab_size or vae.config.z_channels != var.config.z_channels:
        raise PargenError(f"{vae_pth} (vocab {vae.config.vocab_size}, {vae.config.z_channels} channels) does not "
                          f"fit {var_pth} (vocab {var.config.vocab_size}, {var.config.z_channels})")
    vae_out = checkpoint.save(f"{checkpoint.stem(out)}-vae", vae, {"converted_from": Path(vae_pth).name})
    return checkpoint.save(out, var, {"converted_from": Path(var_pth).name, "tokenizer": checkpoint.link(vae_out, out),
                                      "size": vae.config.img_size}), vae_out
