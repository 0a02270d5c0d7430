"""A small CNN classifier, trained per dataset: its penultimate features drive pargen's FID/KID/IS.

Inception features are off-domain for 28x28 digits (Kynkäänniemi et al. 2023); a domain classifier is the
standard offline practice. Scores computed on it are reported as "classifier FID", not comparable to Inception FID.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from ..config import check
from ..registry import register_family, register_preset


@dataclass(frozen=True)
class ClassifierConfig:
    in_channels: int = 1
    img_size: int = 28
    num_classes: int = 10
    width: int = 32
    feature_dim: int = 128

    def __post_init__(self):
        check(self)


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(min(8, cout), cout), nn.ReLU(inplace=True))


@register_family("classifier")
class Classifier(nn.Module):
    Config = ClassifierConfig

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.config = cfg
        w = cfg.width
        self.body = nn.Sequential(
            _conv(cfg.in_channels, w), _conv(w, w), nn.MaxPool2d(2),  # (B, w, H/2, W/2)
            _conv(w, 2 * w), _conv(2 * w, 2 * w), nn.MaxPool2d(2),  # (B, 2w, H/4, W/4)
            _conv(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(),  # (B, 4w)
        )
        self.fc = nn.Linear(4 * w, cfg.feature_dim)
        self.head = nn.Linear(cfg.feature_dim, cfg.num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Images in [-1, 1] (B, C, H, W) -> (B, feature_dim); other sizes and RGB/gray are adapted."""
        if x.shape[1] != self.config.in_channels:
            x = x.mean(1, keepdim=True) if self.config.in_channels == 1 else x.expand(-1, self.config.in_channels, -1, -1)
        if x.shape[-1] != self.config.img_size:
            x = F.interpolate(x, size=(self.config.img_size,) * 2, mode="bilinear", align_corners=False)
        return F.relu(self.fc(self.body(x)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


register_preset("classifier-mnist", "classifier", ClassifierConfig())
register_preset("classifier-fashion-mnist", "classifier", ClassifierConfig())
register_preset("classifier-tiny", "classifier", ClassifierConfig(img_size=8, width=8, feature_dim=16))
