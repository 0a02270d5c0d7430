"""`pargen bench ctf`: coarse-to-fine (CTF) against the raster AR baseline on the same tokenizer: classifier FID
and Inception-style score over guidance, sampling wall time and model calls, and Jacobi decoding of both."""
from __future__ import annotations

import torch

from .. import checkpoint, data
from ..errors import PargenError
from ..evaluation import bench as benchmod
from ..evaluation import metrics
from .common import labels_for, raster_sampler, sample_in_chunks, tokenizer_for


def speed(models: dict[str, tuple], batches: list[int], repeats: int, seed: int, window: int | None) -> list[dict]:
    """Wall time and calls: raster sequential (baseline) vs its Jacobi and speculative Jacobi decoding and vs
    CTF (another model), and CTF sequential vs CTF with a Jacobi / speculatively decoded stage 1."""
    records = []
    for B in batches:
        y = labels_for(models["raster"][0], list(range(seed, seed + B)), None)

        def method(name: str, key: str, how: str, compare: bool = True) -> benchmod.Method:
            fn = raster_sampler(*models[key], method=how, window=window)

            def go():
                r = fn(y, torch.Generator().manual_seed(seed))
                return r.img, {"rounds": r.rounds, "nfe": r.nfe, "tokens_per_call": r.tokens_per_call}
            return benchmod.Method(name, go, compare=compare)

        # Jacobi decoding gives the same images; speculative Jacobi decoding other draws from the same distribution
        records += benchmod.run("ctf", method("raster-ar", "raster", "sequential"),
                                [method("raster-ar-jacobi", "raster", "jacobi"),
                                 method("raster-ar-sjd", "raster", "sjd", compare=False),
                                 method("ctf", "ctf", "sequential", compare=False)],
                                batch=B, seed=seed, repeats=repeats)
        records += benchmod.run("ctf", method("ctf", "ctf", "sequential"),
                                [method("ctf-jacobi", "ctf", "jacobi"), method("ctf-sjd", "ctf", "sjd", compare=False)],
                                batch=B, seed=seed, repeats=repeats)
    return records


def quality(models: dict[str, tuple], guidance: list[float], n: int, seed: int,
            method: str = "sequential") -> list[dict]:
    """FID / KID / IS of n samples per model and guidance scale (labels seed mod 10, 50 images per generator),
    against the first max(n, 1000) MNIST test images as `pargen eval` does."""
    clf, _ = checkpoint.load(checkpoint.resolve("classifier-mnist"))
    real = data.load("mnist", "test").float()[: max(n, 1000)]
    feats = metrics.classifier_features(clf)
    rows = []
    for key in [k for k in ("raster", "ctf") if k in models]:
        model, meta, tok = models[key]
        y = labels_for(model, list(range(seed, seed + n)), None)
        for s in guidance:
            fn = raster_sampler(model, meta, tok, cfg=s, method=method)
            fake = sample_in_chunks(fn, y, seed, f"{key} guidance {s:g}")
            sc = metrics.scores(real, fake, feats, clf)
            rows.append({"model": key, "guidance": s, "n": n, "method": method, **sc})
            print(f"  {key:6s} {method} guidance {s:<4g} FID {sc['fid']:6.2f}  IS {sc['is']:.2f}", flush=True)
    return rows


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for key, label in (("raster", "raster AR (LlamaGen-style)"), ("ctf", "coarse-to-fine")):
        rs = [r for r in rows if r["model"] == key]
        for ax, metric in zip(axes, ("fid", "is")):
            ax.plot([r["guidance"] for r in rs], [r[metric] for r in rs], "o-", label=label)
    for ax, name in zip(axes, ("classifier FID (lower is better)", "Inception-style score (classifier)")):
        ax.set_xlabel("guidance scale")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load_pair(ctf_name: str, raster_name: str, device: str) -> dict[str, tuple]:
    """(model, meta, tokenizer) of the CTF checkpoint and its raster baseline, checked to share a tokenizer."""
    out = {}
    for key, name, family in (("ctf", ctf_name, "c2f"), ("raster", raster_name, "raster")):
        model, meta = checkpoint.load(checkpoint.resolve(name))
        if meta["family"] != family:
            raise PargenError(f"{name} is a {meta['family']} checkpoint, not {family}")
        out[key] = (model.to(device).eval(), meta, tokenizer_for(meta.get("tokenizer"), model.config, device))
    if out["ctf"][1].get("tokenizer") != out["raster"][1].get("tokenizer"):
        raise PargenError("CTF and the raster baseline must share a tokenizer to be compared")
    return out


def summary(rows: list[dict]) -> dict[str, dict]:
    """Each model at its best guidance (lowest FID)."""
    out = {}
    for k in ("raster", "ctf"):
        b = min((r for r in rows if r["model"] == k), key=lambda r: r["fid"])
        out[k] = {"guidance": b["guidance"], "fid": b["fid"], "is": b["is"]}
    return out
