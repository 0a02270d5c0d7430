"""`pargen demo`: fast vs sequential sampling on every bundled generative model, as an HTML report."""
from __future__ import annotations

import html
import time
from pathlib import Path

import torch

from .. import checkpoint, images, pipelines
from ..errors import PargenError
from ..evaluation import bench as benchmod


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _tarflow_section(out: Path, quick: bool) -> dict:
    pipe = pipelines.load("tarflow-mnist")
    n = 16 if quick else 32
    seq, t_seq = _timed(lambda: pipe.sample(n, method="sequential", progress=False))
    fast, t_fast = _timed(lambda: pipe.sample(n, method="auto", progress=False))
    images.save_grid(seq.signed, out / "tarflow_sequential.png", nrow=8, scale=3)
    images.save_grid(fast.signed, out / "tarflow_fast.png", nrow=8, scale=3)
    print(f"  tarflow: {n} images sequential {t_seq:.2f}s, {fast.description} {t_fast:.2f}s")
    records = pipe.bench([1] if quick else [1, 16], 2 if quick else 5, naive=False, progress=True)
    pipe.plot_residuals(out / "tarflow_residuals.png")
    return {"title": "TarFlow + GS-Jacobi (MNIST)", "records": records,
            "images": [("sequential (KV cache)", "tarflow_sequential.png"), (fast.description, "tarflow_fast.png"),
                       ("Jacobi residual per block", "tarflow_residuals.png")],
            "note": f"max |pixel difference| between the two grids: {_diff(seq, fast):.1e}"}


def _diff(a, b) -> float:
    return (a.signed - b.signed).abs().max().item()


def _diffusion_section(out: Path, quick: bool) -> dict:
    pipe = pipelines.load("denoiser-mnist-lite")
    # the sampler its calibration found fastest in parallel (1000-step DDPM here), with those settings
    cal = pipe.calibrated
    sampler = max(cal, key=lambda k: cal[k].get("speedup", 0.0), default=None)
    st = pipe.settings("picard", sampler=sampler)
    n = 2 if quick else 8  # one image per batch (below): the slowest section
    # one image per batch: where a Picard window costs least on this machine (`max_batch` in the calibration)
    seq, t_seq = _timed(lambda: pipe.sample(n, method="sequential", batch_size=1, sampler=st.sampler, progress=True))
    fast, t_fast = _timed(lambda: pipe.sample(n, method="picard", batch_size=1, sampler=st.sampler, progress=True))
    images.save_grid(seq.signed, out / "diffusion_sequential.png", nrow=8, scale=3)
    images.save_grid(fast.signed, out / "diffusion_fast.png", nrow=8, scale=3)
    print(f"  diffusion: {n} images sequential {t_seq:.2f}s, {st.describe()} {t_fast:.2f}s")
    records = pipe.bench([st.sampler], [1], 1 if quick else 3, 0, progress=True)
    pipe.plot_convergence(out / "diffusion_convergence.png", sampler=st.sampler)
    return {"title": f"Diffusion with window Picard ({pipe.name}, {st.sampler} {st.steps} steps)",
            "records": records,
            "images": [(f"sequential {st.sampler}", "diffusion_sequential.png"), (st.describe(), "diffusion_fast.png"),
                       ("Picard convergence over rounds", "diffusion_convergence.png")],
            "note": f"max |pixel difference| between the two grids: {_diff(seq, fast):.1e}. "
                    + pipe.calibration_note()}


def _var_section(out: Path, quick: bool) -> dict:
    from ..rng import SampleRNG

    pipe = pipelines.load("var-mnist")
    seeds = list(range(16))
    y = pipe.labels(seeds)

    def run(kv: bool):
        st = pipe.settings(kv_cache=kv)
        return lambda: pipe.draw(y, SampleRNG(seeds), st)

    records = benchmod.run("var", benchmod.Method("re-run prefix", run(False)),
                           [benchmod.Method("kv-cache", run(True))], batch=16, seed=0, repeats=2 if quick else 5)
    seq, _ = run(False)()
    fast, cost = run(True)()
    images.save_grid(seq.mul(2).sub(1), out / "var_nocache.png", nrow=8, scale=3)
    images.save_grid(fast.mul(2).sub(1), out / "var_kv.png", nrow=8, scale=3)
    _bar([f"{p}x{p}" for p in pipe.model.config.patch_nums], cost["scale_ms"],
         "time per VAR scale, batch 16 (ms)", out / "var_scale_time.png")
    print(f"  var: 16 images, {len(pipe.model.config.patch_nums)} scales")
    return {"title": "VAR next-scale prediction (MNIST)", "records": records,
            "images": [("re-running the prefix at every scale", "var_nocache.png"), ("KV cache", "var_kv.png"),
                       ("time per scale", "var_scale_time.png")],
            "note": f"max |pixel difference| between the two grids: {(seq - fast).abs().max().item() * 2:.1e}"}


def _ctf_section(out: Path, quick: bool) -> dict:
    pipes = {name: pipelines.load(name) for name in ("raster-mnist", "c2f-mnist")}
    records = []
    for name, fam in (("raster-mnist", "raster"), ("c2f-mnist", "ctf")):
        p = pipes[name]
        y = p.labels([0])
        records += benchmod.run(fam, benchmod.Method(f"{fam} sequential", p.runner([0], y, "sequential")),
                                [benchmod.Method(f"{fam} jacobi", p.runner([0], y, "jacobi"))], batch=1, seed=0,
                                repeats=2 if quick else 5)
    for name, p in pipes.items():
        images.save_grid(p.sample(16, progress=False).signed, out / f"{name}.png", nrow=8, scale=3)
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
             "the same noise. Speed-up is the median of per-pair time ratios, baseline and method run interleaved in one "
             "process (a row marked noisy had pair ratios too far apart to trust); errors are against the "
             "sequential output.</p>"]
    cols = ["method", "batch", "rounds", "nfe", "wall_s_median", "speedup", "speedup_q1", "speedup_q3", "noisy",
            "max_abs_err", "rel_err"]
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
