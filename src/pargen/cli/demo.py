"""`pargen demo`: fast vs sequential sampling on every bundled generative model, as an HTML report."""
from __future__ import annotations

import html
import time
from pathlib import Path

import torch

from .. import checkpoint, images
from ..errors import PargenError
from ..evaluation import bench as benchmod
from ..samplers import flow
from . import tarflow as tf
from .common import labels_for, raster_sampler


def _tarflow_section(out: Path, quick: bool) -> dict:
    path = checkpoint.resolve("tarflow-mnist")
    model, meta = checkpoint.load(path)
    guidance = tf.default_guidance(meta, None, None, None)
    n = 16 if quick else 32
    seeds = list(range(n))
    y = labels_for(model, seeds, None)
    t0 = time.perf_counter()
    seq, _ = tf.generate(model, seeds, y, flow.SEQUENTIAL, 0.0, guidance, True, 16, progress=False)
    t_seq = time.perf_counter() - t0
    plan, tol, desc = tf.resolve_plan(path, "auto", 16, None, None, quiet=True)
    t0 = time.perf_counter()
    fast, _ = tf.generate(model, seeds, y, plan, tol, guidance, True, 16, progress=False)
    t_fast = time.perf_counter() - t0
    images.save_grid(seq, out / "tarflow_sequential.png", nrow=8, scale=3)
    images.save_grid(fast, out / "tarflow_fast.png", nrow=8, scale=3)
    print(f"  tarflow: {n} images sequential {t_seq:.2f}s, {desc} {t_fast:.2f}s")
    records = tf.bench(model, path, [1] if quick else [1, 16], 2 if quick else 5, None, guidance, 0,
                       naive=False)
    tf._plot_residuals(model, guidance, 0, out / "tarflow_residuals.png")
    return {"title": "TarFlow + GS-Jacobi (MNIST)", "records": records,
            "images": [("sequential (KV cache)", "tarflow_sequential.png"), (desc, "tarflow_fast.png"),
                       ("Jacobi residual per block", "tarflow_residuals.png")],
            "note": f"max |pixel difference| between the two grids: {(seq - fast).abs().max().item():.1e}"}


def _diffusion_section(out: Path, quick: bool) -> dict:
    from . import diffusion as dm

    path = checkpoint.resolve("denoiser-mnist-lite")
    model, meta = checkpoint.load(path)
    # the sampler its calibration found fastest in parallel (1000-step DDPM here), with those settings
    cal = meta.get("sample_defaults", {}).get("parallel", {})
    sampler = max(cal, key=lambda k: cal[k].get("speedup", 0.0), default=None)
    st = dm.settings(meta, sampler=sampler, method="picard")
    n = 2 if quick else 8  # one image per batch (below): the slowest section
    seeds = list(range(n))
    y = labels_for(model, seeds, None)
    t0 = time.perf_counter()
    # one image per batch: where a Picard window costs least on this machine (`max_batch` in the checkpoint JSON)
    seq, _ = dm.generate(model, seeds, y, dm.dataclasses.replace(st, method="sequential"), 1, progress=False)
    t_seq = time.perf_counter() - t0
    t0 = time.perf_counter()
    fast, _ = dm.generate(model, seeds, y, st, 1, progress=False)
    t_fast = time.perf_counter() - t0
    images.save_grid(seq, out / "diffusion_sequential.png", nrow=8, scale=3)
    images.save_grid(fast, out / "diffusion_fast.png", nrow=8, scale=3)
    print(f"  diffusion: {n} images sequential {t_seq:.2f}s, {st.describe()} {t_fast:.2f}s")
    records = dm.bench(model, meta, [st.sampler], [1], 1 if quick else 3, 0)
    dm.plot_convergence(model, meta, out / "diffusion_convergence.png", sampler=st.sampler)
    return {"title": f"Diffusion with window Picard ({path.stem}, {st.sampler} {st.steps} steps)",
            "records": records,
            "images": [(f"sequential {st.sampler}", "diffusion_sequential.png"), (st.describe(), "diffusion_fast.png"),
                       ("Picard convergence over rounds", "diffusion_convergence.png")],
            "note": f"max |pixel difference| between the two grids: {(seq - fast).abs().max().item():.1e}. "
                    + _calibration_note(meta)}


def _calibration_note(meta: dict) -> str:
    """What `pargen calibrate diffusion` found per sampler, from the checkpoint JSON."""
    parts, target = [], None
    for name, rec in meta.get("sample_defaults", {}).get("parallel", {}).items():
        if "speedup" in rec:
            target = rec["max_abs_err_target"]
            verdict = f"up to batch {rec['max_batch']}" if rec["max_batch"] else "so auto stays sequential"
            parts.append(f"{name} {rec['steps']} steps: window {rec['window']}, tol {rec['tol']:g}, "
                         f"{rec['speedup']:.2f}x at batch 1, {verdict}")
    if not parts:
        return "This checkpoint is not calibrated (`pargen calibrate diffusion`)."
    return f"pargen calibrate diffusion (max abs error {target:g} against the sequential images): " + \
        "; ".join(parts) + "."


def _var_section(out: Path, quick: bool) -> dict:
    from ..samplers import autoregressive as AR
    from .common import tokenizer_for

    model, meta = checkpoint.load(checkpoint.resolve("var-mnist"))
    tok = tokenizer_for(meta["tokenizer"], model.config, "cpu")
    cfg = meta.get("sample_defaults", {}).get("guidance", 1.5)
    y = labels_for(model, list(range(16)), None)

    def run(kv: bool):
        def go():
            r = AR.sample(model, tok, y, cfg=cfg, kv_cache=kv, generator=torch.Generator().manual_seed(0))
            return r.img, {"rounds": r.rounds, "nfe": r.nfe, "scale_seconds": r.scale_seconds}
        return go

    records = benchmod.run("var", benchmod.Method("re-run prefix", run(False)),
                           [benchmod.Method("kv-cache", run(True))], batch=16, seed=0, repeats=2 if quick else 5)
    seq, _ = run(False)()
    fast, cost = run(True)()
    images.save_grid(seq.mul(2).sub(1), out / "var_nocache.png", nrow=8, scale=3)
    images.save_grid(fast.mul(2).sub(1), out / "var_kv.png", nrow=8, scale=3)
    _bar([f"{p}x{p}" for p in model.config.patch_nums], [1e3 * t for t in cost["scale_seconds"]],
         "time per VAR scale, batch 16 (ms)", out / "var_scale_time.png")
    print(f"  var: 16 images, {len(model.config.patch_nums)} scales")
    return {"title": "VAR next-scale prediction (MNIST)", "records": records,
            "images": [("re-running the prefix at every scale", "var_nocache.png"), ("KV cache", "var_kv.png"),
                       ("time per scale", "var_scale_time.png")],
            "note": f"max |pixel difference| between the two grids: {(seq - fast).abs().max().item():.1e}"}


def _ctf_section(out: Path, quick: bool) -> dict:
    from .common import tokenizer_for

    loaded = {}
    for name in ("raster-mnist", "c2f-mnist"):
        model, meta = checkpoint.load(checkpoint.resolve(name))
        loaded[name] = (model, meta, tokenizer_for(meta["tokenizer"], model.config, "cpu"))
    y = labels_for(loaded["raster-mnist"][0], [0], None)

    def run(name: str, method: str):
        fn = raster_sampler(*loaded[name], method=method)

        def go():
            r = fn(y, torch.Generator().manual_seed(0))
            return r.img, {"rounds": r.rounds, "nfe": r.nfe}
        return go

    records = benchmod.run("raster", benchmod.Method("raster sequential", run("raster-mnist", "sequential")),
                           [benchmod.Method("raster jacobi", run("raster-mnist", "jacobi"))], batch=1, seed=0,
                           repeats=2 if quick else 5)
    records += benchmod.run("ctf", benchmod.Method("ctf sequential", run("c2f-mnist", "sequential")),
                            [benchmod.Method("ctf jacobi", run("c2f-mnist", "jacobi"))], batch=1, seed=0,
                            repeats=2 if quick else 5)
    ys = labels_for(loaded["raster-mnist"][0], list(range(16)), None)
    for name in ("raster-mnist", "c2f-mnist"):
        img = raster_sampler(*loaded[name])(ys, torch.Generator().manual_seed(0)).img
        images.save_grid(img.mul(2).sub(1), out / f"{name}.png", nrow=8, scale=3)
    print("  raster AR and coarse-to-fine: 16 images each")
    return {"title": "Raster AR and coarse-to-fine with Jacobi decoding (MNIST, batch 1)", "records": records,
            "images": [("raster AR", "raster-mnist.png"), ("coarse-to-fine", "c2f-mnist.png")],
            "note": "Jacobi decoding returns the sequential tokens (max_abs_err 0) in fewer sequential calls."}


def _bar(labels: list[str], values: list[float], title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3))
    ax.bar(labels, values, color="#4c72b0")
    ax.set_title(title)
    ax.set_xlabel("scale")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _render(sections: list[dict]) -> str:
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>pargen demo</title><style>"
             "body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
             "text-align:right}figure{display:inline-block;margin:0 1em 1em 0;vertical-align:top}"
             "img{image-rendering:pixelated;max-width:520px}</style></head><body>",
             "<h1>pargen demo</h1><p>Each model is sampled by its sequential baseline and by pargen's fast sampler on "
             "the same noise. Speed-up is the ratio of wall-clock medians in one process; errors are against the "
             "sequential output.</p>"]
    cols = ["method", "batch", "rounds", "nfe", "wall_s_median", "speedup", "max_abs_err", "rel_err"]
    for s in sections:
        parts.append(f"<h2>{html.escape(s['title'])}</h2><table id='speed'><tr>"
                     + "".join(f"<th>{c}</th>" for c in cols) + "</tr>")
        for r in s["records"]:
            cells = []
            for c in cols:
                v = r.get(c)
                cells.append(f"{v:.3g}" if isinstance(v, float) else html.escape(str(v)))
            parts.append("<tr>" + "".join(f"<td>{v}</td>" for v in cells) + "</tr>")
        parts.append("</table>")
        for caption, src in s["images"]:
            parts.append(f"<figure><img src='{src}' alt='{html.escape(caption)}'>"
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        parts.append(f"<p>{html.escape(s['note'])}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def cmd_demo(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sections = []
    builders = [("var-mnist", _var_section), ("tarflow-mnist", _tarflow_section),
                ("denoiser-mnist-lite", _diffusion_section), ("c2f-mnist", _ctf_section)]
    for name, build in builders:
        try:
            checkpoint.resolve(name)
        except PargenError:
            print(f"  skipping {name}: not bundled")
            continue
        print(f"demo: {name}")
        t0 = time.perf_counter()
        with torch.inference_mode(False):
            sections.append(build(out, args.quick))
        print(f"  ({time.perf_counter() - t0:.1f} s)")
    if not sections:
        raise PargenError("no bundled generative checkpoints found")
    (out / "index.html").write_text(_render(sections))
    for s in sections:
        print(benchmod.table(s["records"]))
    print(f"report: {out / 'index.html'}")
    return 0
