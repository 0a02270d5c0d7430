"""Helpers shared by the family glue modules of the CLI."""
from __future__ import annotations

from typing import Callable

import torch
from tqdm import tqdm

from .. import checkpoint
from ..errors import PargenError


def labels_for(model: torch.nn.Module, seeds: list[int], labels: list[int] | None) -> torch.Tensor | None:
    """Class labels for a conditional model: --labels cycled, or seed mod classes (None if unconditional)."""
    k = model.config.num_classes
    if not k:
        if labels:
            raise PargenError("this model is unconditional; drop --labels")
        return None
    if labels:
        if any(not 0 <= v < k for v in labels):
            raise PargenError(f"labels must be in [0, {k - 1}]")
        return torch.tensor([labels[i % len(labels)] for i in range(len(seeds))])
    return torch.tensor([s % k for s in seeds])


def rank_share(seeds: list[int]) -> list[int]:
    """This torchrun rank's share of the seeds (all of them in one process); an error if some rank gets none."""
    from .. import distributed

    _, world = distributed.world()
    if len(seeds) < world:
        raise PargenError(f"{len(seeds)} images cannot be shared by {world} processes; use at least {world}")
    return seeds[distributed.share(len(seeds))]


def shared(fn: Callable[[list[int]], torch.Tensor], seeds: list[int]) -> torch.Tensor:
    """fn(seeds) -> images, run by every torchrun rank on its share of the seeds and gathered (fn(seeds) in one
    process); right when an image depends only on its seed."""
    from .. import distributed

    return distributed.gather(fn(rank_share(seeds)))


def raster_settings(meta: dict, cfg: float | None = None, temperature: float | None = None, top_k: int = 0,
                    top_p: float = 0.0, aux_temperature: float | None = None, mask_to_cluster: bool | None = None,
                    method: str = "sequential", window: int | None = None) -> dict:
    """Sampler keywords for a raster or c2f checkpoint: its `sample_defaults` where an argument is None."""
    d = meta.get("sample_defaults", {})
    kw = dict(cfg=d.get("guidance", 1.0) if cfg is None else cfg,
              temperature=d.get("temperature", 1.0) if temperature is None else temperature,
              top_k=top_k, top_p=top_p, method=method, window=window)
    if meta["family"] == "c2f":
        kw.update(aux_temperature=d.get("aux_temperature", 1.0) if aux_temperature is None else aux_temperature,
                  mask_to_cluster=d.get("mask_to_cluster", True) if mask_to_cluster is None else mask_to_cluster)
    return kw


def raster_sampler(model, meta: dict, tok, **settings) -> Callable:
    """(labels, generator) -> RasterSample for a raster or c2f checkpoint (`raster_settings` keywords)."""
    from ..samplers import autoregressive as AR

    kw = raster_settings(meta, **settings)
    fn = AR.sample_c2f if meta["family"] == "c2f" else AR.sample_raster
    return lambda y, g: fn(model, tok, y, generator=g, **kw)


def sample_in_chunks(fn: Callable, labels: torch.Tensor, seed: int, desc: str | None = None,
                     size: int = 50) -> torch.Tensor:
    """Images in [-1, 1] for FID: fn(labels chunk, generator) -> sample with `.img` in [0, 1], `size` labels per
    call, chunk i drawing from a generator seeded seed + i. Under torchrun the chunks are shared by the ranks and
    every rank receives all images."""
    from .. import distributed

    chunks = range(0, len(labels), size)
    chunks = chunks[distributed.share(len(chunks))]
    part = torch.cat([fn(labels[i: i + size], torch.Generator().manual_seed(seed + i)).img
                      for i in tqdm(chunks, desc=desc, leave=False, disable=desc is None)])
    return distributed.gather(part).mul(2).sub(1)


def load(name: str, device: str):
    """(model on device, meta, path) of a bundled name or a checkpoint path."""
    path = checkpoint.resolve(name)
    model, meta = checkpoint.load(path)
    return model.to(device), meta, path


def tokenizer_for(name: str | None, cfg, device: str):
    """The frozen tokenizer a token model trains or samples on (multi-scale for VAR, single-scale for raster
    models), checked against the model's config."""
    want = "msvq" if hasattr(cfg, "patch_nums") else "vq"
    if not name:
        raise PargenError(f"this model needs --tokenizer CKPT (a trained {want} checkpoint)")
    tok, meta = checkpoint.load(checkpoint.resolve(name))
    if meta["family"] != want:
        raise PargenError(f"{name} is a {meta['family']} checkpoint; this model needs a {want} tokenizer")
    t = tok.config
    if want == "msvq":
        fits = (t.vocab_size, t.z_channels, tuple(t.patch_nums)) == (cfg.vocab_size, cfg.z_channels,
                                                                     tuple(cfg.patch_nums))
        what = lambda o: f"vocab {o.vocab_size}, {o.z_channels} channels, scales {tuple(o.patch_nums)}"  # noqa: E731
    else:
        fits = (t.vocab_size, t.grid) == (cfg.vocab_size, cfg.grid)
        what = lambda o: f"vocab {o.vocab_size}, {o.grid}x{o.grid} tokens"  # noqa: E731
    if not fits:
        raise PargenError(f"tokenizer {name} ({what(t)}) does not fit the model ({what(cfg)})")
    return tok.to(device).eval().requires_grad_(False)
