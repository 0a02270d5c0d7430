"""Image grids and files. Images are float tensors (B, C, H, W) in [-1, 1]."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def to_uint8(x: Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8."""
    return ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def grid(x: Tensor, nrow: int | None = None, pad: int = 2, scale: int = 1) -> Image.Image:
    """Tile images into one picture (white padding), optionally upscaled by an integer factor."""
    B, C, H, W = x.shape
    nrow = nrow or math.ceil(math.sqrt(B))
    rows = math.ceil(B / nrow)
    arr = to_uint8(x)
    canvas = np.full((rows * (H + pad) + pad, nrow * (W + pad) + pad, C), 255, dtype=np.uint8)
    for i in range(B):
        r, c = divmod(i, nrow)
        canvas[pad + r * (H + pad): pad + r * (H + pad) + H, pad + c * (W + pad): pad + c * (W + pad) + W] = arr[i]
    img = Image.fromarray(canvas[..., 0] if C == 1 else canvas)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return img


def save_grid(x: Tensor, path: str | Path, nrow: int | None = None, scale: int = 1) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid(x, nrow, scale=scale).save(path)
    return path


def save_each(x: Tensor, folder: str | Path, names: list[str]) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for a, name in zip(to_uint8(x), names):
        Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(folder / f"{name}.png")
