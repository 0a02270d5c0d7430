"""Official FoundationVision/LlamaGen c2i checkpoints (`c2i_B_256.pt` ... `c2i_3B_384.pt`, `vq_ds16_c2i.pt`).

The GPT's parameter names are pargen's (`models/raster_ar.py` uses the official layout), so its state dict loads
strictly as it is; the configuration is read off the shapes (the head count is not in them: it is LlamaGen's for
the preset of that width and depth, else `heads=` must be given). The VQ tokenizer is the LDM convolutional
stack pargen shares with VAR (`tokenizers/conv.py`) under other names: every official key is mapped to one pargen
key (the separate q / k / v 1x1 convolutions of the attention blocks are fused into pargen's `qkv`), every pargen
key must be filled, and `quantize.codebook_used` (a training statistic) is the one key dropped.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint
from ..checkpoint import load_state
from ..errors import PargenError
from ..models.raster_ar import LLAMAGEN, RasterAR, RasterARConfig
from ..tokenizers.vq import VQConfig, VQVAE
from . import read_state, strip_prefixes

HEADS = {(w, d): h for w, d, h in LLAMAGEN.values()}
DROPPED_VQ = ("quantize.codebook_used",)


def _gpt_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip DDP / compile prefixes and the KV-cache buffers `setup_caches` leaves in a state dict."""
    return {k: v for k, v in strip_prefixes(sd).items()
            if ".attention.kv_cache." not in k and k not in ("freqs_cis", "causal_mask")}


def gpt_config(sd: dict[str, torch.Tensor], image_size: int = 256, heads: int | None = None,
               downsample: int = 16) -> RasterARConfig:
    """RasterARConfig of an official c2i GPT state dict at `image_size` pixels over a stride-`downsample` VQ."""
    try:
        V, C = sd["tok_embeddings.weight"].shape
        classes = sd["cls_embedding.embedding_table.weight"].shape[0] - 1
        qkv = sd["layers.0.attention.wqkv.weight"].shape[0]
        hidden = sd["layers.0.feed_forward.w1.weight"].shape[0]
    except KeyError as e:
        raise PargenError(f"not a LlamaGen c2i GPT state dict: missing {e}") from None
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k)))
    if heads is None:
        if (C, depth) not in HEADS:
            raise PargenError(f"width {C} x depth {depth} is not a LlamaGen preset; give the head count (--heads)")
        heads = HEADS[C, depth]
    hd = C // heads
    kv, rem = divmod(qkv // hd - heads, 2)
    if C % heads or rem or kv < 1:
        raise PargenError(f"wqkv has {qkv} rows: not {heads} query heads of width {hd} plus key/value heads")
    if image_size % downsample:
        raise PargenError(f"image size {image_size} is not a multiple of the tokenizer's stride {downsample}")
    cfg = RasterARConfig(vocab_size=V, grid=image_size // downsample, depth=depth, width=C, heads=heads,
                         kv_heads=0 if kv == heads else kv, ffn_multiple=256, num_classes=classes)
    if cfg.ffn_hidden != hidden:  # LlamaGen: 8/3 C rounded up to a multiple of 256 (no ffn_dim_multiplier)
        raise PargenError(f"feed-forward width {hidden} is not LlamaGen's {cfg.ffn_hidden} for width {C}")
    return cfg


def load_gpt(src: str | os.PathLike | dict[str, Any], image_size: int = 256, heads: int | None = None,
             downsample: int = 16) -> RasterAR:
    """An official LlamaGen c2i GPT (path or state dict) as a `RasterAR`, strictly (every key and shape)."""
    sd = _gpt_state(read_state(src, "LlamaGen GPT state dict"))
    model = RasterAR(gpt_config(sd, image_size, heads, downsample))
    load_state(model, sd, str(src) if not isinstance(src, dict) else "the LlamaGen GPT state dict")
    return model.eval()


def vq_key(k: str, levels: int) -> str:
    """The pargen name of an official VQ key (attention q / k / v map to `qkv` and are fused by the caller)."""
    k = re.sub(r"\.attn\.(\d+)\.(q|k|v)\.", r".attn.\1.qkv.", k)
    k = re.sub(r"\.mid\.1\.(q|k|v)\.", ".mid.1.qkv.", k)
    k = re.sub(r"\.mid\.0\.", ".mid.block_1.", k)
    k = re.sub(r"\.mid\.1\.", ".mid.attn_1.", k)
    k = re.sub(r"\.mid\.2\.", ".mid.block_2.", k)
    m = re.match(r"(encoder|decoder)\.conv_blocks\.(\d+)\.(.*)$", k)
    if m:
        side, i, rest = m.group(1), int(m.group(2)), m.group(3)
        rest = re.sub(r"^res\.", "block.", rest)
        # the official decoder lists its levels from the lowest resolution; pargen's `up` is indexed by level
        k = f"encoder.down.{i}.{rest}" if side == "encoder" else f"decoder.up.{levels - 1 - i}.{rest}"
    return k


def vq_config(sd: dict[str, torch.Tensor], image_size: int | None = None) -> VQConfig:
    try:
        V, D = sd["quantize.embedding.weight"].shape
        ch, cin = sd["encoder.conv_in.weight"].shape[:2]
        z = sd["encoder.conv_out.weight"].shape[0]
    except KeyError as e:
        raise PargenError(f"not a LlamaGen VQ state dict: missing {e}") from None
    levels = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.conv_blocks\.(\d+)\.", k)))
    mult = tuple(sd[f"encoder.conv_blocks.{i}.res.0.conv2.weight"].shape[0] // ch for i in range(levels))
    blocks = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.conv_blocks\.0\.res\.(\d+)\.", k)))
    return VQConfig(vocab_size=V, code_dim=D, z_channels=z, ch=ch, ch_mult=mult, num_res_blocks=blocks,
                    in_channels=cin, img_size=image_size or 16 * 2 ** (levels - 1))  # 16x16 tokens


def vq_state(sd: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """An official VQ state dict under pargen's names: each key renamed once, attention q / k / v fused."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if k in DROPPED_VQ:
            continue
        new = vq_key(k, levels)
        part = re.search(r"\.(q|k|v)\.(weight|bias)$", k)
        if part and ".qkv." in new:
            fused.setdefault(new, {})[part.group(1)] = v
        elif new in out:
            raise PargenError(f"LlamaGen VQ key {k!r} maps to {new!r}, which another key already filled")
        else:
            out[new] = v
    for new, qkv in fused.items():
        if set(qkv) != {"q", "k", "v"}:
            raise PargenError(f"{new}: the official attention block lacks {sorted({'q', 'k', 'v'} - set(qkv))}")
        out[new] = torch.cat((qkv["q"], qkv["k"], qkv["v"]))
    return out


def load_vq(src: str | os.PathLike | dict[str, Any], image_size: int | None = None) -> VQVAE:
    """An official LlamaGen VQ model (path or state dict) as a `VQVAE`, strictly: every official key but
    `quantize.codebook_used` is used once, every pargen key is filled, shapes equal."""
    sd = read_state(src, "LlamaGen VQ state dict")
    sd = strip_prefixes(sd)
    cfg = vq_config(sd, image_size)
    model = VQVAE(cfg)
    out = vq_state(sd, len(cfg.ch_mult))
    own = model.state_dict()
    out.update({k: own[k] for k in own if k.endswith("ema_vocab_hit_SV")})  # pargen's usage EMA starts at zero
    load_state(model, out, str(src) if not isinstance(src, dict) else "the LlamaGen VQ state dict")
    return model.eval()


def convert(gpt_pt: str | os.PathLike, vq_pt: str | os.PathLike | None, out: str | os.PathLike,
            image_size: int = 256, heads: int | None = None) -> tuple[Path, Path | None]:
    """An official LlamaGen c2i GPT (and its VQ, which sampling images needs) as pargen checkpoints `out` and
    `out-vq`, the model naming its tokenizer relative to itself; returns both stems (None without a VQ)."""
    vq = load_vq(vq_pt, image_size) if vq_pt else None
    gpt = load_gpt(gpt_pt, image_size, heads, 16 if vq is None else vq.config.downsample)
    meta = {"converted_from": Path(gpt_pt).name, "size": image_size}
    vq_out = None
    if vq is not None:
        if vq.config.vocab_size != gpt.config.vocab_size:
            raise PargenError(f"{vq_pt} has {vq.config.vocab_size} codes, {gpt_pt} predicts {gpt.config.vocab_size}")
        vq_out = checkpoint.save(f"{checkpoint.stem(out)}-vq", vq, {"converted_from": Path(vq_pt).name})
        meta["tokenizer"] = checkpoint.link(vq_out, out)
    return checkpoint.save(out, gpt, meta), vq_out
