"""pargen's library API: one pipeline per model family behind `pargen.load`.

    pipe = pargen.load("tarflow-mnist")            # a bundled name, a checkpoint path or a converted official one
    out = pipe.sample(seeds=16, method="auto")     # or "sequential", or a family method (`pipe.methods`)
    out.images                                     # (16, C, H, W) float32 in [0, 1], on the CPU
    out.cost, out.settings                         # what it cost (rounds, evaluations, per batch) and what ran
    pipe.calibrate(...); pipe.bench(...)           # the automatic settings; the timing records

The checkpoint's sampling defaults, the calibrated settings and the rule for `method="auto"` (the calibrated
parallel sampler where a calibration covers the run, the sequential one elsewhere) live in these objects, once;
the `pargen` command line parses arguments and prints over them. Calibration records are written beside a
user's checkpoint, or to the user directory (`checkpoint.user_dir()`) for a bundled one.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor
from tqdm import tqdm

from .. import checkpoint, distributed
from ..errors import PargenError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Output:
    """What `Pipeline.sample` returns."""

    images: Tensor  # (N, C, H, W) float32 in [0, 1], on the CPU
    seeds: list[int]
    labels: Tensor | None
    method: str  # the method that ran ("auto" resolved)
    settings: dict[str, Any]  # every setting that ran, defaults and calibration included
    cost: dict[str, Any]  # rounds: sequential model calls per batch (mean), nfe: evaluations per image, batches
    description: str = ""

    @property
    def signed(self) -> Tensor:
        """The images on the [-1, 1] scale (the one errors are reported on)."""
        return self.images * 2 - 1


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise PargenError(f"dtype {dtype} is not supported; use one of {', '.join(DTYPES)}")
        return dtype
    if dtype not in DTYPES:
        raise PargenError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def parse_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise PargenError(f"unknown device {device!r} (e.g. cpu, cuda, cuda:1, mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PargenError(f"device {device} asked for, but torch sees no CUDA device here")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise PargenError(f"device {device} asked for, but MPS is not available here")
    return dev


def seed_list(seeds: int | Iterable[int]) -> list[int]:
    """`16` -> seeds 0..15; an iterable of ints as given."""
    out = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not out:
        raise PargenError("no seeds to sample")
    if any(not 0 <= s < 2**63 for s in out):
        raise PargenError("seeds must be in [0, 2^63)")
    return out


def check_finite(images: Tensor, seeds: list[int], sampler: str) -> None:
    """Refuse a batch with a NaN or infinite pixel (before anything is written), naming the first bad seed."""
    finite = torch.isfinite(images.flatten(1)).all(1)
    if not bool(finite.all()):
        bad = seeds[int((~finite).nonzero()[0])]
        raise PargenError(f"{sampler} returned non-finite pixels (first at seed {bad}); check the settings "
                          "(guidance, temperature, tolerance)")


def share_seeds(seeds: list[int]) -> list[int]:
    """This torchrun rank's share of the seeds (all of them in one process); an error if some rank gets none."""
    _, world = distributed.world()
    if len(seeds) < world:
        raise PargenError(f"{len(seeds)} images cannot be shared by {world} processes; use at least {world}")
    return seeds[distributed.share(len(seeds))]


WORK_PER_PIXEL = 64  # a low count of the float32 working set per image pixel of one batch (see check_memory)


def available_memory() -> int | None:
    """Bytes the kernel reports available (Linux `MemAvailable`), or None where it does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class Pipeline:
    """A checkpoint with everything needed to sample it: model, tokenizer, defaults and calibration records."""

    family: str = ""
    methods: tuple[str, ...] = ("auto", "sequential")
    options: tuple[str, ...] = ()  # the keyword overrides `sample` takes

    def __init__(self, model: torch.nn.Module, meta: dict[str, Any], path: Path, device: torch.device,
                 dtype: torch.dtype):
        self.model, self.meta, self.path, self.device, self.dtype = model, meta, path, device, dtype

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def defaults(self) -> dict[str, Any]:
        return self.meta.get("sample_defaults", {})

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, methods={self.methods}, device={self.device}, " \
               f"dtype={str(self.dtype).replace('torch.', '')})"

    # ---- what every family shares
    @property
    def shape(self) -> tuple[int, int, int] | None:
        """(C, H, W) of the images this pipeline makes: the model's, or its tokenizer's (None without one)."""
        c = self.model.config
        if not hasattr(c, "img_size"):
            c = getattr(getattr(self, "tokenizer", None), "config", None)
        return None if c is None else (c.in_channels, c.img_size, c.img_size)

    def check_memory(self, n: int, batch: int) -> None:
        """Refuse, before any work, a run that cannot fit: `n` float32 images held twice (the batches and their
        concatenation) plus one batch's working set, counted low (WORK_PER_PIXEL floats a pixel; a transformer's
        activations and caches are more), against the memory the system reports available."""
        avail, shape = available_memory(), self.shape
        if avail is None or shape is None:
            return
        pixel = 4 * math.prod(shape)
        need = 2 * n * pixel + (batch * pixel * WORK_PER_PIXEL if self.device.type == "cpu" else 0)
        if need > avail:
            raise PargenError(f"{n:,} images of {'x'.join(map(str, shape))} in batches of {batch:,} need at least "
                              f"{need / 2**30:.1f} GiB, more than the {avail / 2**30:.1f} GiB available; sample "
                              "fewer images per run (-n) or smaller batches")

    def reference_images(self, n: int, data_name: str | None, split: str = "test", seed: int | None = None
                         ) -> tuple[Tensor, Tensor | None, str]:
        """n images on [-1, 1], their labels (None without) and what they are, to measure the model on: from
        `data_name` (the first n of `split`, or n drawn with `seed`), refused if its images are not the model's;
        without a dataset (a converted official checkpoint names none), the model's own sequential samples."""
        from .. import data

        if data_name is None:
            out = self.sample(list(range(seed or 0, (seed or 0) + n)), method="sequential", progress=False)
            return out.signed.to(self.device), out.labels, f"{n} of its own samples"
        ds = data.load(data_name, split, self.meta.get("size"))
        if tuple(ds.shape) != self.shape:
            raise PargenError(f"{data_name} has images {'x'.join(map(str, ds.shape))}, {self.name} makes "
                              f"{'x'.join(map(str, self.shape))}; pick another dataset (or none: its own samples)")
        idx = slice(0, n) if seed is None else \
            torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
        x = ds.float(idx).to(self.device)
        y = None if ds.labels is None else ds.labels[idx].to(self.device)
        return x, y, f"{len(x)} {split} images of {ds.name}"

    def check_bench(self, batches: list[int], fid: int | None = None) -> None:
        """Before a bench's work: its largest batch fits in memory, and the FID network scores these images."""
        self.check_memory(max(batches), max(batches))
        if fid:
            from ..evaluation import metrics

            metrics.check_fid_domain(self.shape)

    def check(self, method: str, overrides: dict[str, Any]) -> None:
        if method not in self.methods:
            raise PargenError(f"{self.name} ({self.family}) samples with method {', '.join(self.methods)}; "
                              f"not {method!r}")
        bad = sorted(k for k, v in overrides.items() if v is not None and k not in self.options)
        if bad:
            raise PargenError(f"{self.name} ({self.family}) does not take {', '.join(bad)}"
                              + (f"; its options: {', '.join(self.options)}" if self.options else ""))
        for k, v in overrides.items():
            if isinstance(v, float) and not math.isfinite(v):
                raise PargenError(f"{k} must be a finite number, not {v}")

    def labels(self, seeds: list[int], labels: Iterable[int] | Tensor | None = None) -> Tensor | None:
        """Class labels for a conditional model: `labels` cycled over the seeds, or seed mod classes (None for an
        unconditional model)."""
        k = self.model.config.num_classes
        labels = None if labels is None else [int(v) for v in (labels.tolist() if isinstance(labels, Tensor)
                                                                  else labels)]
        if not k:
            if labels:
                raise PargenError(f"{self.name} is unconditional; it takes no labels")
            return None
        if labels:
            if any(not 0 <= v < k for v in labels):
                raise PargenError(f"labels must be in [0, {k - 1}]")
            return torch.tensor([labels[i % len(labels)] for i in range(len(seeds))], device=self.device)
        return torch.tensor([s % k for s in seeds], device=self.device)

    def sample(self, seeds: int | Iterable[int] = 16, labels: Iterable[int] | Tensor | None = None,
               method: str = "auto", batch_size: int = 16, progress: bool | None = None,
               **overrides: Any) -> Output:
        """Images for `seeds` (an int n means seeds 0..n-1), in batches of `batch_size`; each image depends on its
        seed and label only, never on the batch. `method="auto"` is the checkpoint's calibrated parallel
        sampler where a calibration covers the run, else the sequential one; `overrides` are the family's
        `options`. Under torchrun the ranks share the seeds and every rank receives all images."""
        seeds = seed_list(seeds)
        if batch_size < 1:
            raise PargenError(f"batch_size must be >= 1, not {batch_size}")
        self.check(method, overrides)
        self.check_memory(len(seeds), min(batch_size, len(seeds)))
        y = self.labels(seeds, labels)
        st = self.settings(method, batch=min(batch_size, len(seeds)), **overrides)
        mine, shared = slice(0, len(seeds)), False
        _, world = distributed.world()
        if world > 1 and not getattr(st, "split_calls", False):
            if len(seeds) < world:
                raise PargenError(f"{len(seeds)} images cannot be shared by {world} processes; sample at least "
                                  f"{world}" + (" or split the model calls" if self.family == "denoiser" else ""))
            mine, shared = distributed.share(len(seeds)), True
        my_seeds, my_y = seeds[mine], None if y is None else y[mine]
        lead = distributed.world()[0] == 0
        show = lead and (progress if progress is not None else len(my_seeds) > batch_size)
        imgs, costs = [], []
        for i in tqdm(range(0, len(my_seeds), batch_size), desc=f"sample {self.name}", disable=not show,
                      dynamic_ncols=True, leave=False):
            s = my_seeds[i: i + batch_size]
            x, c = self.run(s, None if my_y is None else my_y[i: i + batch_size], st, progress if lead else False)
            check_finite(x, s, f"{self.name}: the {st.describe()} sampler")
            imgs.append(x.float().clamp(0, 1).cpu())
            costs.append(c)
        images = torch.cat(imgs)
        if shared:
            images = distributed.gather(images)
        n = len(costs)
        cost = {"rounds": sum(c["rounds"] for c in costs) / n, "nfe": sum(c["nfe"] for c in costs) / n,
                "batches": costs, **({"processes": world} if world > 1 else {})}
        return Output(images, seeds, None if y is None else y.cpu(), st.method, dataclasses.asdict(st), cost,
                      st.describe())

    # ---- what each family defines
    def settings(self, method: str = "auto", batch: int = 1, **overrides: Any):
        """The settings a run of `method` on batches of `batch` images uses (a frozen dataclass with `method`
        and `describe()`): the overrides over the checkpoint's defaults and calibration."""
        raise NotImplementedError

    def run(self, seeds: list[int], labels: Tensor | None, st, progress: bool | None = None
            ) -> tuple[Tensor, dict[str, Any]]:
        """One batch: (images in [0, 1] on the model's device, cost {"rounds", "nfe", ...}); `progress`: a bar per
        round for long samplers (None: the family decides)."""
        raise NotImplementedError

    def calibrate(self, **kw: Any) -> dict[str, Any]:
        raise PargenError(f"{self.family} checkpoints have nothing to calibrate (their `auto` is "
                          f"{self.settings().method})")

    def bench(self, **kw: Any) -> list[dict[str, Any]]:
        raise NotImplementedError

    # ---- helpers
    def float32(self) -> "Pipeline":
        """This pipeline in float32 (itself when it already is): the reference errors are measured against."""
        if self.dtype == torch.float32:
            return self
        if not hasattr(self, "_fp32"):
            self._fp32 = load(self.path, self.device, torch.float32)
        return self._fp32

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)


FAMILIES: dict[str, type[Pipeline]] = {}


def family(*names: str):
    def deco(cls):
        for n in names:
            FAMILIES[n] = cls
        return cls
    return deco


def load(name_or_path: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None
         ) -> Pipeline:
    """The pipeline of a bundled checkpoint name (e.g. "tarflow-mnist"), a checkpoint path, a `pargen convert`
    output, or a diffusers pipeline directory (`save_pretrained`; e.g. the bundled "unet-mnist"), which gives a
    `pargen.pipelines.diffusers.DiffusersDirectory` with the same `sample` / `calibrate` / `bench`. `dtype`: float32
    (default), bfloat16 or float16 for sampling."""
    from . import diffusion, tarflow, tokens  # noqa: F401  (they register their families)

    dev, dt = parse_device(device), parse_dtype(dtype)
    s = checkpoint.stem(name_or_path)
    if not s.with_name(s.name + ".json").exists() and checkpoint.pipeline_dir(name_or_path) is not None:
        from . import diffusers as PD

        return PD.DiffusersDirectory(str(name_or_path), dev, dt)
    path = checkpoint.resolve(str(name_or_path))
    model, meta = checkpoint.load(path)
    fam = meta["family"]
    if fam not in FAMILIES:
        gen = sorted(set(FAMILIES))
        raise PargenError(f"{path.name} is a {fam} checkpoint, not a generator; pipelines exist for "
                          f"{', '.join(gen)}")
    return FAMILIES[fam](model.to(dev, dt).eval().requires_grad_(False), meta, path, dev, dt)


def tokenizer_for(name: str | None, cfg, device: torch.device | str, dtype: torch.dtype = torch.float32,
                  near: Path | None = None):
    """The frozen tokenizer a token model trains or samples on (multi-scale for VAR, single-scale for raster
    models), checked against the model's config; `near`: the folder of the model's checkpoint, which names its
    tokenizer relative to it (`checkpoint.link`)."""
    want = "msvq" if hasattr(cfg, "patch_nums") else "vq"
    if not name:
        raise PargenError(f"this model needs --tokenizer CKPT (a trained {want} checkpoint)")
    tok, meta = checkpoint.load(checkpoint.resolve(name, near))
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
    return tok.to(device, dtype).eval().requires_grad_(False)


__all__ = ["Output", "Pipeline", "load", "tokenizer_for", "DTYPES"]
