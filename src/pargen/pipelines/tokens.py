"""Token-model pipelines: VAR (next-scale), raster AR and coarse-to-fine (next-token; Jacobi and speculative Jacobi
decoding). Batches draw from one random stream per image, so an image depends on its seed only; the bench of VAR
against its uncached self and a raster model, and of CTF against the raster baseline."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor
from tqdm import tqdm

from .. import checkpoint
from ..errors import PargenError
from ..evaluation import bench as benchmod
from ..evaluation import metrics
from ..nn.attention import KVCache
from ..rng import SampleRNG
from ..samplers import autoregressive as AR
from . import Pipeline, family, load, tokenizer_for

LOWRANK_KINDS = ("taylor", "chebyshev")


@dataclass(frozen=True)
class VARSettings:
    method: str = "sequential"
    cfg: float = 1.5
    top_k: int = 0
    top_p: float = 0.0
    kv_cache: bool = True
    lowrank_layers: tuple[int, ...] | None = None  # with lowrank_degree: these layers (None: all) low-rank
    lowrank_degree: int | None = None
    lowrank_kind: str = "taylor"

    def describe(self) -> str:
        lr = "" if self.lowrank_degree is None else (
            f", low-rank {self.lowrank_kind} degree {self.lowrank_degree} in layers "
            f"{'all' if self.lowrank_layers is None else list(self.lowrank_layers)}")
        return f"VAR next-scale{'' if self.kv_cache else ' (no KV cache)'}, cfg {self.cfg:g}, top-k {self.top_k}, " \
               f"top-p {self.top_p:g}{lr}"


def _top(top_k: int | None, top_p: float | None) -> tuple[int, float]:
    k, p = (top_k or 0), (top_p or 0.0)
    if k < 0:
        raise PargenError(f"top_k must be >= 0 (0: all tokens), not {k}")
    if not 0 <= p <= 1:
        raise PargenError(f"top_p must be in [0, 1] (0: off), not {p}")
    return k, p


def _tokenizer_path(pipe: Pipeline) -> Path | None:
    """Where a token model's tokenizer is (its checkpoint names it relative to itself), to tell whether two models
    share one."""
    name = pipe.meta.get("tokenizer")
    return checkpoint.resolve(name, pipe.path.parent).resolve() if name else None


@family("var")
class VARPipeline(Pipeline):
    family = "var"
    methods = ("auto", "sequential")
    options = ("cfg", "top_k", "top_p", "kv_cache", "lowrank_layers", "lowrank_degree", "lowrank_kind")

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.tokenizer = tokenizer_for(self.meta.get("tokenizer"), self.model.config, self.device, self.dtype,
                                       self.path.parent)

    def settings(self, method: str = "auto", batch: int = 1, cfg: float | None = None, top_k: int | None = None,
                 top_p: float | None = None, kv_cache: bool | None = None, lowrank_layers=None,
                 lowrank_degree: int | None = None, lowrank_kind: str | None = None) -> VARSettings:
        """`auto` is the KV-cached next-scale sampler (VAR has one sampler; its speed comes from the model)."""
        self.check(method, {})
        k, p = _top(top_k, top_p)
        depth = self.model.config.depth
        if lowrank_layers is None and (lowrank_degree is not None or lowrank_kind is not None):
            raise PargenError("low-rank attention needs the layers it applies to (lowrank_layers: 'all' or a list; "
                              "see `pargen analyze var`)")
        if lowrank_layers is not None and lowrank_degree is None:
            lowrank_degree = 2
        if lowrank_kind is not None and lowrank_kind not in LOWRANK_KINDS:
            raise PargenError(f"lowrank_kind must be one of {', '.join(LOWRANK_KINDS)}, not {lowrank_kind!r}")
        layers = None if lowrank_layers in (None, "all") else tuple(sorted({int(i) for i in lowrank_layers}))
        if layers is not None and not set(layers) <= set(range(depth)):
            raise PargenError(f"low-rank layers {list(layers)} out of range for depth {depth}")
        return VARSettings("sequential", self.defaults.get("guidance", 1.5) if cfg is None else cfg, k, p,
                           True if kv_cache is None else kv_cache, layers, lowrank_degree, lowrank_kind or "taylor")

    def _attention(self, st: VARSettings) -> None:
        from ..nn.lowrank import PolySpec

        try:
            spec = None if st.lowrank_degree is None else PolySpec(st.lowrank_degree, st.lowrank_kind)
            self.model.set_lowrank(None if st.lowrank_layers is None else list(st.lowrank_layers), spec)
        except ValueError as e:
            raise PargenError(str(e)) from None

    def run(self, seeds: list[int], labels: Tensor | None, st: VARSettings, progress: bool | None = None
            ) -> tuple[Tensor, dict[str, Any]]:
        return self.draw(labels, SampleRNG(seeds, self.device), st)

    def draw(self, labels: Tensor, generator, st: VARSettings) -> tuple[Tensor, dict[str, Any]]:
        self._attention(st)
        r = AR.sample(self.model, self.tokenizer, labels, cfg=st.cfg, top_k=st.top_k, top_p=st.top_p,
                      generator=generator, kv_cache=st.kv_cache)
        return r.img, {"rounds": r.rounds, "nfe": r.nfe, "scale_ms": [round(1e3 * t, 2) for t in r.scale_seconds]}

    def bench(self, batches: list[int] = (1, 16), repeats: int = 5, cfg: float | None = None, seed: int = 0,
              raster: str | None = "raster-mnist", fid: int | None = None, progress: bool = False,
              log: Callable[[str], None] = print) -> list[dict[str, Any]]:
        """KV-cached next-scale sampling against the same model re-running its prefix at every scale (same
        tokens), and against a raster-order AR model over the same final token grid (another model: the paper's
        ratio), sequential and Jacobi-decoded; interleaved, on the same labels and seeds."""
        self.check_bench(batches, fid)
        c = self.model.config
        st = self.settings(cfg=cfg)
        rp = None
        if raster:
            rp = load(raster, self.device, self.dtype)
            if rp.family != "raster":
                raise PargenError(f"{rp.name} is a {rp.family} checkpoint, not a raster AR model")
            grid = c.patch_nums[-1]
            if rp.shape != self.shape or rp.model.config.tokens != grid * grid:  # the paper's comparison
                raise PargenError(f"{rp.name} makes {'x'.join(map(str, rp.shape or ()))} images from "
                                  f"{rp.model.config.tokens} tokens, {self.name} {'x'.join(map(str, self.shape))} "
                                  f"from a final {grid}x{grid} grid: compare with a raster model of the same images "
                                  "and grid, or none (raster=None, --raster none)")
        log(f"bench var: {self.name}, {len(c.patch_nums)} scales (L = {c.L}), batches {list(batches)}, cfg "
            f"{st.cfg:g}" + (f"; raster AR {rp.name} ({rp.model.config.tokens} tokens, cfg "
                             f"{rp.settings().cfg:g})" if rp else "") + f"; {torch.get_num_threads()} threads")
        records = []
        for B in batches:
            seeds = list(range(seed, seed + B))
            y = self.labels(seeds)

            def var_run(kv: bool):
                s = self.settings(cfg=cfg, kv_cache=kv)
                return lambda: self.draw(y, SampleRNG(seeds, self.device), s)

            branches = 2  # VAR always runs the conditional and the unconditional branch
            var_kv = benchmod.Method("kv-cache", var_run(True),
                                     {"kv_cache_mib": KVCache.bytes_for(c.depth, branches * B, c.L, c.C) / 2**20})
            records += benchmod.run("var", benchmod.Method("no-kv-cache", var_run(False)), [var_kv], batch=B,
                                    seed=seed, repeats=repeats, device=self.device, progress=progress)
            if rp:
                rc = rp.model.config
                nb = 1 if rp.settings().cfg == 1 else 2
                base = benchmod.Method("raster-ar", rp.runner(seeds, y, "sequential"),
                                       {"kv_cache_mib": KVCache.bytes_for(rc.depth, nb * B, rc.tokens, rc.width)
                                        / 2**20})
                var_vs = benchmod.Method("var-kv-cache", var_kv.run, var_kv.extra, compare=False)  # a ratio only
                records += benchmod.run("var", base, [benchmod.Method("raster-ar-jacobi", rp.runner(seeds, y,
                                                                                                    "jacobi")),
                                                      var_vs], batch=B, seed=seed, repeats=repeats,
                                        device=self.device, progress=progress)
        if fid:
            scores = {"kv-cache": metrics.classifier_fid(self.sample(list(range(seed, seed + fid)), batch_size=50,
                                                                     cfg=cfg).signed)}
            if rp:
                scores["raster-ar"] = metrics.classifier_fid(rp.sample(list(range(seed, seed + fid)),
                                                                       batch_size=50).signed)
            for r in records:
                key = {"no-kv-cache": "kv-cache", "var-kv-cache": "kv-cache"}.get(r["method"], r["method"])
                if key in scores:
                    r["fid"], r["fid_n"] = scores[key], fid
        return records


@dataclass(frozen=True)
class RasterSettings:
    method: str = "sequential"
    cfg: float = 1.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    window: int | None = None
    aux_temperature: float | None = None  # CTF stage 2
    mask_to_cluster: bool | None = None  # CTF stage 2
    what: str = "raster AR"

    def describe(self) -> str:
        aux = "" if self.aux_temperature is None else (
            f" / {self.aux_temperature:g}, cluster mask {'on' if self.mask_to_cluster else 'off'}")
        how = {"sequential": "sequential", "jacobi": "Jacobi decoding", "sjd": "speculative Jacobi decoding"}
        win = f" (window {self.window or 16})" if self.method != "sequential" else ""
        return f"{self.what} {how[self.method]}{win}, cfg {self.cfg:g}, temperature {self.temperature:g}{aux}, " \
               f"top-k {self.top_k}, top-p {self.top_p:g}"


@family("raster", "c2f")
class RasterPipeline(Pipeline):
    """Raster AR (`raster`) and coarse-to-fine (`c2f`) checkpoints: next-token decoding in raster order,
    sequential, Jacobi (the same tokens in fewer calls) or speculative Jacobi (the same distribution)."""

    methods = ("auto", "sequential", "jacobi", "sjd")

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.family = self.meta["family"]
        self.ctf = self.family == "c2f"
        self.options = ("cfg", "temperature", "top_k", "top_p", "window") + (
            ("aux_temperature", "mask_to_cluster") if self.ctf else ())
        # a converted GPT without its VQ still decodes tokens (bench raster times them); images need the VQ
        self.tokenizer = tokenizer_for(self.meta.get("tokenizer"), self.model.config, self.device, self.dtype,
                                       self.path.parent) if self.meta.get("tokenizer") or self.ctf else None

    def settings(self, method: str = "auto", batch: int = 1, cfg: float | None = None,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 window: int | None = None, aux_temperature: float | None = None,
                 mask_to_cluster: bool | None = None) -> RasterSettings:
        """`auto` is the sequential decoder: on this CPU Jacobi decoding wins only at batch 1 and by little
        (`pargen bench ctf`), and no calibration records where it does."""
        self.check(method, {})
        d = self.defaults
        k, p = _top(top_k, top_p)
        t = d.get("temperature", 1.0) if temperature is None else temperature
        if method == "sjd" and t <= 0:
            raise PargenError("speculative Jacobi decoding samples; use temperature > 0 (or method jacobi)")
        if window is not None and window < 1:
            raise PargenError(f"window must be >= 1, not {window}")
        extra = {}
        if self.ctf:
            extra = dict(aux_temperature=d.get("aux_temperature", 1.0) if aux_temperature is None else aux_temperature,
                         mask_to_cluster=d.get("mask_to_cluster", True) if mask_to_cluster is None else mask_to_cluster)
        return RasterSettings("sequential" if method == "auto" else method,
                              d.get("guidance", 1.0) if cfg is None else cfg, t, k, p, window,
                              what="coarse-to-fine" if self.ctf else "raster AR", **extra)

    def draw(self, labels: Tensor, generator, st: RasterSettings) -> tuple[Tensor, dict[str, Any]]:
        kw = dict(cfg=st.cfg, temperature=st.temperature, top_k=st.top_k, top_p=st.top_p, method=st.method,
                  window=st.window, generator=generator)
        if self.ctf:
            r = AR.sample_c2f(self.model, self.tokenizer, labels, aux_temperature=st.aux_temperature,
                              mask_to_cluster=st.mask_to_cluster, **kw)
        else:
            r = AR.sample_raster(self.model, self.tokenizer, labels, **kw)
        # without a tokenizer: the tokens (bench compares them; the decode would cost every method the same)
        return r.img if r.img is not None else r.tokens.float(), {"rounds": r.rounds, "nfe": r.nfe,
                                                                   "tokens_per_call": r.tokens_per_call}

    def run(self, seeds: list[int], labels: Tensor | None, st: RasterSettings, progress: bool | None = None
            ) -> tuple[Tensor, dict[str, Any]]:
        if self.tokenizer is None:
            raise PargenError(f"{self.name} has no tokenizer to decode images with (convert it with its VQ: "
                              "pargen convert llamagen GPT.pt VQ.pt --out DIR); bench raster times its tokens")
        if st.method != "sjd":
            return self.draw(labels, SampleRNG(seeds, self.device), st)
        # speculative Jacobi decoding draws a batch-dependent number of random numbers: one image per call
        imgs, costs = [], []
        for i, s in enumerate(seeds):
            x, c = self.draw(labels[i: i + 1], self.generator(s), st)
            imgs.append(x)
            costs.append(c)
        n = len(costs)
        return torch.cat(imgs), {"rounds": sum(c["rounds"] for c in costs), "nfe": sum(c["nfe"] for c in costs) / n,
                                 "tokens_per_call": sum(c["tokens_per_call"] for c in costs) / n}

    def runner(self, seeds: list[int], labels: Tensor, method: str, **kw: Any) -> Callable:
        """A bench run: the whole batch in one call (speculative Jacobi decoding too, from one generator)."""
        st = self.settings(method, **kw)
        return lambda: self.draw(labels, SampleRNG(seeds, self.device) if method != "sjd"
                                 else self.generator(seeds[0]), st)

    def bench(self, batches: list[int] = (1, 16), repeats: int = 5, seed: int = 0, raster: str = "raster-mnist",
              window: int | None = None, cfg: float | None = None, progress: bool = False,
              log: Callable[[str], None] = print) -> list[dict[str, Any]]:
        """CTF against its raster baseline on the same tokenizer: raster sequential vs its Jacobi and speculative
        Jacobi decoding and vs CTF (another model), then CTF sequential vs CTF with a Jacobi / speculatively
        decoded stage 1; interleaved. A raster checkpoint is benched against itself only."""
        self.check_memory(max(batches), max(batches))
        base = self
        if self.ctf:
            base = load(raster, self.device, self.dtype)
            if base.family != "raster":
                raise PargenError(f"{base.name} is a {base.family} checkpoint, not a raster AR model")
            if _tokenizer_path(base) != _tokenizer_path(self):
                raise PargenError("CTF and the raster baseline must share a tokenizer to be compared")
        records = []
        for B in batches:
            seeds = list(range(seed, seed + B))
            y = self.labels(seeds)

            def m(name: str, pipe: RasterPipeline, how: str, compare: bool = True) -> benchmod.Method:
                return benchmod.Method(name, pipe.runner(seeds, y, how, window=window, cfg=cfg), compare=compare)

            # Jacobi decoding gives the same images; speculative Jacobi decoding other draws from the distribution
            others = [m("raster-ar-jacobi", base, "jacobi"), m("raster-ar-sjd", base, "sjd", compare=False)]
            if self.ctf:
                others.append(m("ctf", self, "sequential", compare=False))
            records += benchmod.run("ctf" if self.ctf else "raster", m("raster-ar", base, "sequential"), others,
                                    batch=B, seed=seed, repeats=repeats, device=self.device, progress=progress)
            if self.ctf:
                records += benchmod.run("ctf", m("ctf", self, "sequential"),
                                        [m("ctf-jacobi", self, "jacobi"), m("ctf-sjd", self, "sjd", compare=False)],
                                        batch=B, seed=seed, repeats=repeats, device=self.device, progress=progress)
        return records

    def quality(self, guidance: list[float], n: int, seed: int = 0, method: str = "sequential",
                log: Callable[[str], None] = print) -> list[dict[str, Any]]:
        """FID / KID / IS of n samples per guidance scale against the first max(n, 1000) MNIST test images, as
        `pargen eval` does. Speculative Jacobi decoding draws 50 images per call from one generator (a draw
        from the same distribution; per-seed images would take one call per image)."""
        from .. import data

        clf, _ = checkpoint.load(checkpoint.resolve("classifier-mnist"))
        real = data.load("mnist", "test").float()[: max(n, 1000)]
        feats = metrics.classifier_features(clf)
        rows = []
        key = "ctf" if self.ctf else "raster"
        for s in tqdm(guidance, desc=f"{key} quality", leave=False, dynamic_ncols=True):
            if method == "sjd":  # per seed, SJD runs one image per call; for a distribution, 50 per generator
                st, y = self.settings("sjd", cfg=s), self.labels(list(range(seed, seed + n)))
                fake = torch.cat([self.draw(y[i: i + 50], self.generator(seed + i), st)[0]
                                  for i in range(0, n, 50)]).mul(2).sub(1)
            else:
                fake = self.sample(list(range(seed, seed + n)), method=method, batch_size=50, cfg=s,
                                   progress=False).signed
            sc = metrics.scores(real, fake, feats, clf)
            rows.append({"model": key, "guidance": s, "n": n, "method": method, **sc})
            log(f"  {key:6s} {method} guidance {s:<4g} FID {sc['fid']:6.2f}  IS {sc['is']:.2f}")
        return rows
