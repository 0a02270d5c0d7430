"""Coarse labels for a codebook (CTF, Guo et al., arXiv 2503.16194): k-means of the code vectors into K clusters,
or a random balanced assignment (the control that should fail). Codes are l2-normalised first, as the decoder
sees them (so k-means is effectively cosine k-means)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

KINDS = ("kmeans", "random")


def coarse_labels(codes: Tensor, k: int, kind: str = "kmeans", seed: int = 0) -> Tensor:
    """(V,) cluster index in [0, k) of every code (V, d)."""
    V = codes.shape[0]
    if not 1 <= k <= V:
        raise ValueError(f"number of clusters must be in [1, {V}], got {k}")
    if kind == "random":
        rng = np.random.default_rng(seed)
        return torch.as_tensor(rng.permutation(np.arange(V) % k), dtype=torch.long)
    if kind != "kmeans":
        raise ValueError(f"cluster kind must be one of {KINDS}, not {kind!r}")
    from sklearn.cluster import KMeans

    x = F.normalize(codes.detach().float(), dim=1).cpu().numpy().astype(np.float64)
    km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(x)
    return torch.as_tensor(km.labels_, dtype=torch.long)
