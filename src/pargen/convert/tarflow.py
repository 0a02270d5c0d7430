"""Load apple/ml-tarflow state dicts (`*.pth`) into pargen's TarFlow; the key names are the same.

The official files hold no config, so it is read off the tensor shapes (in_channels must be given: the patch
dimension C*p*p does not separate C from p).
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from .. import checkpoint
from ..checkpoint import load_state
from ..errors import PargenError
from . import read_state, strip_prefixes
from ..models.tarflow import TarFlow, TarFlowConfig


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip DDP/compile prefixes and the constant `attn_mask` buffers (pargen builds masks on the fly)."""
    return {k: v for k, v in strip_prefixes(state).items() if not k.endswith(".attn_mask")}


def infer_config(state: dict[str, torch.Tensor], in_channels: int = 3, noise_std: float = 0.05) -> TarFlowConfig:
    state = clean_state_dict(state)
    try:
        width, patch_dim = state["blocks.0.proj_in.weight"].shape
        seq_len = state["blocks.0.pos_embed"].shape[0]
        out_dim = state["blocks.0.proj_out.weight"].shape[0]
        num_classes = state["blocks.0.class_embed"].shape[0] if "blocks.0.class_embed" in state else 0
    except KeyError as e:
        raise PargenError(f"not a TarFlow state dict: key {e} is missing") from None
    num_blocks = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    layers = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.0\.attn_blocks\.(\d+)\.", k)))
    p2, rem = divmod(patch_dim, in_channels)
    p = math.isqrt(p2)
    side = math.isqrt(seq_len)
    if rem or p * p != p2 or side * side != seq_len:
        raise PargenError(f"cannot read a square image config from patch dim {patch_dim} and {seq_len} tokens "
                          f"with in_channels={in_channels}")
    hidden = state["blocks.0.attn_blocks.0.mlp.main.0.weight"].shape[0]
    return TarFlowConfig(in_channels=in_channels, img_size=side * p, patch_size=p, width=width,
                         num_blocks=num_blocks, layers_per_block=layers, head_dim=64,
                         expansion=hidden // width, nvp=out_dim == 2 * patch_dim, num_classes=num_classes,
                         noise_std=noise_std)


def from_state_dict(state: dict[str, torch.Tensor], in_channels: int = 3, noise_std: float = 0.05,
                    source: str = "state dict") -> TarFlow:
    """A TarFlow holding the weights of an ml-tarflow state dict."""
    cfg = infer_config(state, in_channels, noise_std)
    model = TarFlow(cfg)
    load_state(model, clean_state_dict(state), source)
    return model.eval()


def load_official(path: str | Path, in_channels: int = 3, noise_std: float = 0.05) -> TarFlow:
    """Read an official ml-tarflow `.pth` (e.g. `afhq_model_8_768_8_8_0.07.pth`) safely."""
    state = read_state(path, "TarFlow state dict")
    return from_state_dict(state, in_channels, noise_std, str(path))


def convert(pth: str | Path, out: str | Path, in_channels: int = 3, noise_std: float = 0.05) -> Path:
    """An official ml-tarflow `.pth` as the pargen checkpoint `out` (for `pargen.load(out)`)."""
    return checkpoint.save(out, load_official(pth, in_channels, noise_std), {"converted_from": Path(pth).name})
