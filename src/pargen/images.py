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


def save_npz(x: Tensor, path: str | Path) -> Path:
    """The images as an ADM-style .npz: `arr_0`, (N, H, W, C) uint8 (what guided-diffusion's evaluator reads)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, arr_0=to_uint8(x))
    return path


def load_npz(path: str | Path) -> Tensor:
    """(N, C, H, W) in [-1, 1] from an ADM-style .npz (`arr_0`: N x H x W x C uint8, or N x H x W)."""
    from .errors import PargenError

    try:
        with np.load(path, allow_pickle=False) as f:
            arr = f["arr_0"] if "arr_0" in f else f[f.files[0]]
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise PargenError(f"{path} is not a readable .npz of images ({e})") from None
    if arr.dtype != np.uint8 or arr.ndim not in (3, 4):
        raise PargenError(f"{path}: expected arr_0 as N x H x W x C uint8, got {arr.dtype} {arr.shape}")
    if arr.ndim == 3:
        arr = arr[..., None]
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1)
