"""Diffusion glue for the CLI: sampler settings from flags and checkpoint defaults, batched generation, bench and
calibration of the window Picard settings against the sequential sampler."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from ..errors import PargenError
from ..evaluation import bench as benchmod
from ..models.denoiser import Denoiser
from ..samplers import diffusion as D
from .common import labels_for, rank_share

METHODS = ("auto", "sequential", "picard", "block")
DEFAULT_STEPS = {"ddim": 100, "ddpm": 1000, "ode": 50}  # the ODE sampler takes two model calls per step


@dataclass(frozen=True)
class Settings:
    sampler: str = "ddim"
    steps: int = 100
    eta: float = 0.0
    guidance: float = 1.0
    method: str = "picard"
    window: int = 16
    tol: float = 0.1
    block: int = 20
    sweeps: int | None = 4
    anderson: int = 0

    def describe(self) -> str:
        s = f"{self.sampler} {self.steps} steps"
        if self.method == "picard":
            s += f", window Picard (window {self.window}, tol {self.tol:g}" + (
                f", Anderson {self.anderson})" if self.anderson else ")")
        elif self.method == "block":
            sweeps = f"{self.sweeps} sweeps" if self.sweeps else f"sweeps until tol {self.tol:g}"
            s += f", block Picard (blocks of {self.block} steps, {sweeps}" + (
                f", Anderson {self.anderson})" if self.anderson else ")")
        else:
            s += ", sequential"
        return s


def settings(meta: dict[str, Any], sampler: str | None = None, steps: int | None = None, eta: float | None = None,
             cfg: float | None = None, method: str = "auto", window: int | None = None, tol: float | None = None,
             block: int | None = None, sweeps: int | None = None, anderson: int | None = None,
             batch: int = 1) -> Settings:
    """Flags over the checkpoint's calibrated defaults (`sample_defaults.parallel` in its JSON, per sampler; see
    `calibrate`).

    "auto" is the calibrated parallel method up to its `max_batch` images per batch (where it was measured to win)
    and the sequential sampler above, and also wherever no calibration covers the run: a record holds for the
    steps and guidance it was measured at (and eta 0), since its tolerance was chosen against that sequential
    answer."""
    d = meta.get("sample_defaults", {})
    sampler = sampler or d.get("sampler", "ddim")
    if sampler not in D.SAMPLERS:
        raise PargenError(f"unknown sampler {sampler!r}; choose from {', '.join(D.SAMPLERS)}")
    if method not in METHODS:
        raise PargenError(f"method {method!r} is not a diffusion method; choose from {', '.join(METHODS)}")
    per = d.get("parallel", {}).get(sampler, {})
    pick = (lambda v, k, default: per.get(k, default) if v is None else v)
    s = Settings(sampler=sampler, steps=steps or DEFAULT_STEPS[sampler], eta=0.0 if eta is None else eta,
                 guidance=d.get("guidance", 1.0) if cfg is None else cfg, method=method,
                 window=pick(window, "window", 16), tol=pick(tol, "tol", 0.1), block=pick(block, "block", 20),
                 sweeps=pick(sweeps, "sweeps", 4), anderson=pick(anderson, "anderson", 0))
    if s.sampler != "ddim" and s.eta:
        raise PargenError("--eta applies to the ddim sampler only")
    if method == "auto":
        covered = bool(per) and (per.get("steps"), per.get("guidance"), 0.0) == (s.steps, s.guidance, s.eta)
        s = dataclasses.replace(s, method=per.get("method", "picard") if covered and batch <= per.get("max_batch", 0)
                                else "sequential")
    return s


def run(model: Denoiser, x_T: torch.Tensor, noise, y, st: Settings, steps: D.Steps, method: str | None = None,
        split_calls: bool = False, **over) -> D.DiffusionSample:
    st = dataclasses.replace(st, **over)
    eps = D.noise_predictor(model, st.guidance, split=split_calls)
    return D.sample(eps, x_T, steps, noise=noise, y=y,
                    method=method or st.method, window=st.window, tol=st.tol, block=st.block, sweeps=st.sweeps,
                    anderson=st.anderson)


def make_steps(model: Denoiser, st: Settings) -> D.Steps:
    try:
        return D.make_steps(model.alphas_cumprod, st.steps, st.sampler, st.eta)
    except ValueError as e:
        raise PargenError(str(e)) from None


def generate(model: Denoiser, seeds: list[int], y: torch.Tensor | None, st: Settings, batch_size: int,
             device: str = "cpu", progress: bool = True, split_calls: bool = False
             ) -> tuple[torch.Tensor, list[D.DiffusionSample]]:
    """Images for the given seeds, in chunks of batch_size; each image depends only on its seed and label.
    split_calls: every model call is split over the torchrun ranks (`D.shard`), guidance branches included."""
    steps = make_steps(model, st)
    cfg = model.config
    out, runs = [], []
    for i in tqdm(range(0, len(seeds), batch_size), disable=not progress or len(seeds) <= batch_size,
                  desc="sample", dynamic_ncols=True):
        s = seeds[i: i + batch_size]
        x_T, noise = D.draw(s, (cfg.in_channels, cfg.img_size, cfg.img_size), steps, device)
        res = run(model, x_T, noise, None if y is None else y[i: i + batch_size].to(device), st, steps,
                  split_calls=split_calls)
        out.append(res.x.clamp(-1, 1).cpu())
        runs.append(res)
    return torch.cat(out), runs


def cost(res: D.DiffusionSample) -> dict[str, Any]:
    return {"rounds": res.rounds, "nfe": res.nfe, "passes": sum(res.result.iters),
            "fallbacks": sum(s.fallback for s in res.result.segments)}


def call_cost_ratio(model: Denoiser, batch: int, rows: int, guidance: float, repeats: int = 20,
                    split: bool = False) -> dict[str, float]:
    """Median wall time of one model call on batch*rows images over one call on batch images (split: each call
    split over the torchrun ranks, as the sampler makes it)."""
    cfg = model.config
    eps = D.noise_predictor(model, guidance, split=split)

    @torch.no_grad()
    def timed(n: int) -> float:
        x = torch.randn(n, cfg.in_channels, cfg.img_size, cfg.img_size)
        t = torch.randint(0, cfg.train_steps, (n,))
        y = torch.zeros(n, dtype=torch.long) if cfg.num_classes else None
        return benchmod.median_seconds(lambda: eps(x, t, y), repeats)[1]

    one, many = timed(batch), timed(batch * rows)
    return {"call_s": one, "window_call_s": many, "ratio": many / one}


def bench(model: Denoiser, meta: dict[str, Any], samplers: list[str], batches: list[int], repeats: int,
          seed: int, split_calls: bool = False, **flags) -> list[dict[str, Any]]:
    """Per sampler and batch: sequential vs window Picard vs block Picard vs window Picard with Anderson mixing
    (depth: the setting's, else 3), on the same noise. `flags` override the checkpoint's settings.

    Under torchrun the ranks share the batch, or with `split_calls` every rank runs the whole batch and each model
    call (the sequential sampler's too) is split over them."""
    records = []
    shape = (model.config.in_channels, model.config.img_size, model.config.img_size)
    for name in samplers:
        st = settings(meta, sampler=name, **flags)
        steps = make_steps(model, st)
        for B in batches:
            seeds = list(range(seed, seed + B))
            seeds = seeds if split_calls else rank_share(seeds)  # all of them outside torchrun
            x_T, noise = D.draw(seeds, shape, steps)
            y = labels_for(model, seeds, None)

            ratio = call_cost_ratio(model, len(seeds), st.window, st.guidance, split=split_calls)
            extra = {"sampler": name, "steps": st.steps, "guidance": st.guidance,
                     "call_cost_ratio": round(ratio["ratio"], 2), **({"split": "calls"} if split_calls else {})}

            def measured(label: str, method: str, info: dict[str, Any], **over) -> benchmod.Method:
                def go():
                    res = run(model, x_T, noise, y, st, steps, method=method, split_calls=split_calls, **over)
                    return res.x, cost(res)
                # split calls: every rank computes the whole batch, so there is nothing to gather
                return benchmod.Method(label, go, {**extra, **info}, replicated=split_calls)

            aa = st.anderson or 3
            window = {"window": st.window, "tol": st.tol}
            methods = [measured("picard", "picard", window, anderson=0),
                       measured("block", "block", {"block": st.block, "sweeps": st.sweeps, "tol": st.tol},
                                anderson=0),
                       measured("picard+anderson", "picard", {**window, "anderson": aa}, anderson=aa)]
            print(f"  {dataclasses.replace(st, method='picard').describe()}, batch {B}: one call on "
                  f"{B * st.window} images costs {ratio['ratio']:.2f}x "
                  f"one call on {B}")
            records += benchmod.run("diffusion", measured("sequential", "sequential", {}), methods, batch=B,
                                    seed=seed, repeats=repeats)
    return records


WINDOWS = (2, 4, 8, 16, 32)
TOLS = (0.1, 0.03, 0.01, 0.003, 0.001, 3e-4, 1e-4)  # loosest first: per window, the first that meets the error
MARGIN = 0.9  # the parallel sampler must take at most this share of the sequential time (timing noise ~5-10%)


def calibrate(model: Denoiser, meta: dict[str, Any], samplers: list[str], max_err: float, seeds: list[int],
              batches: list[int], cfg: float | None = None, steps: int | None = None, repeats: int = 3,
              log=print) -> dict[str, dict[str, Any]]:
    """Window Picard settings per sampler, chosen against the sequential answer (never assumed).

    For every window, the loosest tolerance whose images stay within `max_err` (max abs, [-1, 1] scale) of the
    sequential sampler's on all calibration seeds; the fastest of these at batch 1 wins if it beats the sequential
    sampler by more than timing noise. `max_batch`: the largest of `batches` up to which it still does."""
    shape = (model.config.in_channels, model.config.img_size, model.config.img_size)
    out = {}
    for name in samplers:
        st = settings(meta, sampler=name, steps=steps, cfg=cfg, method="picard")
        sched = make_steps(model, st)

        def timed(ss: list[int], **over) -> float:  # median seconds of one batch of these seeds
            x, n = D.draw(ss, shape, sched)
            yy = labels_for(model, ss, None)
            return benchmod.median_seconds(lambda: run(model, x, n, yy, st, sched, **over), repeats)[1]

        x_T, noise = D.draw(seeds, shape, sched)
        y = labels_for(model, seeds, None)
        ref = run(model, x_T, noise, y, st, sched, method="sequential").x
        seq_s = timed(seeds[:1], method="sequential")
        log(f"{st.describe().split(',')[0]}: sequential {seq_s * 1e3:.0f} ms at batch 1; max abs error allowed "
            f"{max_err:g} on {len(seeds)} seeds")
        found = []
        for w in WINDOWS:
            for tol in TOLS:
                res = run(model, x_T, noise, y, st, sched, window=w, tol=tol, anderson=0)
                err = float((res.x - ref).abs().max())
                if err <= max_err:
                    sec = timed(seeds[:1], window=w, tol=tol, anderson=0)
                    found.append({"window": w, "tol": tol, "max_abs_err": err, "rounds": res.rounds,
                                  "seconds": sec})
                    log(f"  window {w:3d}: tol {tol:g}, max err {err:.1e}, rounds {res.rounds}, "
                        f"{sec * 1e3:.0f} ms ({seq_s / sec:.2f}x)")
                    break
            else:
                log(f"  window {w:3d}: no tolerance in {TOLS} reaches {max_err:g}")
        best = min(found, key=lambda c: c["seconds"], default=None)
        rec = {"method": "picard", "anderson": 0, "max_batch": 0, "guidance": st.guidance, "steps": st.steps,
               "max_abs_err_target": max_err, "seeds": len(seeds), "sequential_s": round(seq_s, 4)}
        if best is not None:
            rec.update(window=best["window"], tol=best["tol"], max_abs_err=best["max_abs_err"],
                       rounds=best["rounds"], speedup=round(seq_s / best["seconds"], 3))
        if best is not None and best["seconds"] <= MARGIN * seq_s:
            rec["max_batch"] = 1
            for B in sorted(b for b in batches if b > 1):
                ss = list(range(seeds[0], seeds[0] + B))
                s_seq, s_par = timed(ss, method="sequential"), timed(ss, window=best["window"], tol=best["tol"],
                                                                     anderson=0)
                log(f"  batch {B}: sequential {s_seq * 1e3:.0f} ms, window Picard {s_par * 1e3:.0f} ms "
                    f"({s_seq / s_par:.2f}x)")
                if s_par > MARGIN * s_seq:
                    break
                rec["max_batch"] = B
        log(f"  -> {name}: " + (f"window {rec['window']}, tol {rec['tol']:g}, up to batch {rec['max_batch']}"
                                if rec["max_batch"] else "sequential at every batch size"))
        out[name] = rec
    return out


def plot_convergence(model: Denoiser, meta: dict[str, Any], path, seed: int = 0, **flags) -> None:
    """Picard convergence over rounds for one image: how many steps are final after each sequential model call,
    for the checkpoint's window Picard, block Picard and window Picard with Anderson mixing (sequential: one
    step per call)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st = settings(meta, **flags)
    steps = make_steps(model, st)
    shape = (model.config.in_channels, model.config.img_size, model.config.img_size)
    x_T, noise = D.draw([seed], shape, steps)
    y = labels_for(model, [seed], None)
    eps = D.noise_predictor(model, st.guidance)
    ref = D.sample(eps, x_T, steps, noise=noise, y=y).x
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([0, steps.n], [0, steps.n], "k:", lw=1, label=f"sequential ({steps.n} rounds)")
    aa = st.anderson or 3
    for label, method, depth, style in [("window Picard", "picard", 0, "-"),
                                        (f"window Picard + Anderson {aa}", "picard", aa, "--"),
                                        (f"block Picard (blocks of {st.block})", "block", 0, "-")]:
        trace = []
        res = D.sample(eps, x_T, steps, noise=noise, y=y, method=method, window=st.window, tol=st.tol,
                       block=st.block, sweeps=st.sweeps, anderson=depth, callback=trace.append)
        err = (res.x - ref).abs().max().item()
        ax.plot(range(len(trace) + 1), [0] + [t["committed"] for t in trace], style,
                label=f"{label}: {res.rounds} rounds, max err {err:.1e}")
    ax.set_xlabel("sequential model calls (rounds)")
    ax.set_ylabel("steps final")
    ax.set_title(f"{st.sampler} {steps.n} steps, window {st.window}, tol {st.tol:g} (one image)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
