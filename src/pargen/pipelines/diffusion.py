"""Diffusion pipeline: sampler settings from the checkpoint's defaults and calibration records, batched sampling
with per-seed noise, the bench, and the calibration of window Picard against the sequential sampler."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor
from tqdm import tqdm

from .. import checkpoint
from ..errors import PargenError
from ..evaluation import bench as benchmod
from ..evaluation.calibrate import picard_setting
from ..evaluation import metrics
from ..models.denoiser import alphas_cumprod
from ..samplers import diffusion as D
from . import Pipeline, family, share_seeds

METHODS = ("auto", "sequential", "picard", "block")
DEFAULT_STEPS = {"ddim": 100, "ddpm": 1000, "ode": 50}  # the ODE sampler takes two model calls per step
CALIBRATION = ".calibration.json"  # record suffix: {"parallel": {sampler: settings}}
LONG = 500  # samplers of at least this many model calls show a progress bar per call


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
    split_calls: bool = False  # under torchrun: every model call split over the ranks

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
        return s + f", guidance {self.guidance:g}" + (", model calls split over the processes" if self.split_calls
                                                      else "")


def resolve(defaults: dict[str, Any], method: str = "auto", batch: int = 1, sampler: str | None = None,
            steps: int | None = None, eta: float | None = None, cfg: float | None = None, window: int | None = None,
            tol: float | None = None, block: int | None = None, sweeps: int | None = None,
            anderson: int | None = None, split_calls: bool = False) -> Settings:
    """Arguments over a checkpoint's `sample_defaults` (with the calibrated `parallel` records per sampler).

    "auto" is the calibrated parallel method up to its `max_batch` images per batch (where it was measured to win)
    and the sequential sampler above, and also wherever no calibration covers the run: a record holds for the
    steps and guidance it was measured at (and eta 0), since its tolerance was chosen against that sequential
    answer."""
    sampler = sampler or defaults.get("sampler", "ddim")
    if sampler not in D.SAMPLERS:
        raise PargenError(f"unknown sampler {sampler!r}; choose from {', '.join(D.SAMPLERS)}")
    if method not in METHODS:
        raise PargenError(f"method {method!r} is not a diffusion method; choose from {', '.join(METHODS)}")
    per = defaults.get("parallel", {}).get(sampler, {})
    pick = (lambda v, k, default: per.get(k, default) if v is None else v)
    s = Settings(sampler=sampler, steps=steps or DEFAULT_STEPS[sampler], eta=0.0 if eta is None else eta,
                 guidance=defaults.get("guidance", 1.0) if cfg is None else cfg, method=method,
                 window=pick(window, "window", 16), tol=pick(tol, "tol", 0.1), block=pick(block, "block", 20),
                 sweeps=pick(sweeps, "sweeps", 4), anderson=pick(anderson, "anderson", 0), split_calls=split_calls)
    if s.sampler != "ddim" and s.eta:
        raise PargenError("--eta applies to the ddim sampler only")
    if s.method == "block" and s.block > s.steps:
        raise PargenError(f"block {s.block} is longer than the {s.steps} steps")
    if method == "auto":
        covered = bool(per) and (per.get("steps"), per.get("guidance"), 0.0) == (s.steps, s.guidance, s.eta)
        s = dataclasses.replace(s, method=per.get("method", "picard") if covered and batch <= per.get("max_batch", 0)
                                else "sequential")
    return s


@family("denoiser")
class DiffusionPipeline(Pipeline):
    family = "denoiser"
    methods = METHODS
    options = ("sampler", "steps", "eta", "cfg", "window", "tol", "block", "sweeps", "anderson", "split_calls")

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        c = self.model.config
        self.schedule = alphas_cumprod(c.schedule, c.train_steps)  # float64, whatever the model's dtype
        rec, self.record = checkpoint.read_record(self.path, CALIBRATION)
        self.calibrated = {**self.defaults.get("parallel", {}), **((rec or {}).get("parallel", {}))}

    def settings(self, method: str = "auto", batch: int = 1, **kw: Any) -> Settings:
        return resolve({**self.defaults, "parallel": self.calibrated}, method, batch, **kw)

    def steps(self, st: Settings) -> D.Steps:
        try:
            return D.make_steps(self.schedule, st.steps, st.sampler, st.eta)
        except ValueError as e:
            raise PargenError(str(e)) from None

    def draw(self, seeds: list[int], st: Settings) -> tuple[Tensor, Tensor | None]:
        """x_T and the per-step noise, in float32 on the model's device: the trajectory is integrated in float32
        whatever the model's dtype (only the model calls run in it)."""
        return D.draw(seeds, self.shape, self.steps(st), self.device)

    def predictor(self, st: Settings) -> D.EpsFn:
        eps = D.noise_predictor(self.model, st.guidance, split=st.split_calls)
        if self.dtype == torch.float32:
            return eps
        return lambda x, t, y: eps(x.to(self.dtype), t, y).to(x.dtype)

    def solve(self, x_T: Tensor, noise: Tensor | None, y: Tensor | None, st: Settings, progress: bool = False,
              **over: Any) -> D.DiffusionSample:
        """Run settings `st` (with `over` replacing some) from pre-drawn noise."""
        st = dataclasses.replace(st, **over)
        eps = self.predictor(st)
        steps = self.steps(st)
        bar = tqdm(total=steps.n, desc=f"{st.sampler} model calls", leave=False, dynamic_ncols=True,
                   disable=not progress)
        if progress:
            inner = eps

            def eps(x, t, yy):  # one update per model call: a round of the sampler
                bar.update()
                return inner(x, t, yy)
        try:
            return D.sample(eps, x_T, steps, noise=noise, y=y, method=st.method, window=st.window, tol=st.tol,
                            block=st.block, sweeps=st.sweeps, anderson=st.anderson)
        finally:
            bar.close()

    def run(self, seeds: list[int], labels: Tensor | None, st: Settings, progress: bool | None = None
            ) -> tuple[Tensor, dict[str, Any]]:
        x_T, noise = self.draw(seeds, st)
        long = st.steps * (2 if st.sampler == "ode" else 1) >= LONG
        res = self.solve(x_T, noise, labels, st, progress=bool(progress) if progress is not None else long)
        return res.x.clamp(-1, 1).add(1).mul(0.5), cost(res)

    # ---- bench
    def call_cost_ratio(self, batch: int, rows: int, guidance: float, repeats: int = 20,
                        split: bool = False) -> dict[str, float]:
        """Median wall time of one model call on batch*rows images over one call on batch images (split: each
        call split over the torchrun ranks, as the sampler makes it)."""
        cfg = self.model.config
        eps = D.noise_predictor(self.model, guidance, split=split)

        @torch.no_grad()
        def timed(n: int) -> float:
            x = torch.randn(n, *self.shape, device=self.device, dtype=self.dtype)
            t = torch.randint(0, cfg.train_steps, (n,), device=self.device)
            y = torch.zeros(n, dtype=torch.long, device=self.device) if cfg.num_classes else None
            return benchmod.median_seconds(lambda: eps(x, t, y), repeats, self.device)[1]

        one, many = timed(batch), timed(batch * rows)
        return {"call_s": one, "window_call_s": many, "ratio": many / one}

    def bench(self, samplers: list[str] = ("ddim", "ddpm", "ode"), batches: list[int] = (1, 16), repeats: int = 5,
              seed: int = 0, split_calls: bool = False, fid: int | None = None, progress: bool = False,
              log: Callable[[str], None] = print, **flags: Any) -> list[dict[str, Any]]:
        """Per sampler and batch: sequential vs window Picard vs block Picard vs window Picard with Anderson mixing
        (depth: the setting's, else 3), on the same noise, interleaved; `flags` override the checkpoint's
        settings. Under torchrun the ranks share the batch, or with `split_calls` every rank runs the whole batch
        and each model call (the sequential sampler's too) is split over them. `fid`: classifier FID of that many
        images for the sequential sampler and window Picard."""
        self.check_bench(batches, fid)
        records = []
        for name in samplers:
            st = self.settings("picard", sampler=name, split_calls=split_calls, **flags)
            for B in batches:
                seeds = list(range(seed, seed + B))
                seeds = seeds if split_calls else share_seeds(seeds)  # all of them outside torchrun
                x_T, noise = self.draw(seeds, st)
                y = self.labels(seeds)
                ratio = self.call_cost_ratio(len(seeds), st.window, st.guidance, split=split_calls)
                extra = {"sampler": name, "steps": st.steps, "guidance": st.guidance,
                         "call_cost_ratio": round(ratio["ratio"], 2), **({"split": "calls"} if split_calls else {})}

                def measured(label: str, info: dict[str, Any], **over) -> benchmod.Method:
                    def go():
                        res = self.solve(x_T, noise, y, st, **over)
                        return res.x, cost(res)
                    # split calls: every rank computes the whole batch, so there is nothing to gather
                    return benchmod.Method(label, go, {**extra, **info}, replicated=split_calls)

                aa = st.anderson or 3
                window = {"window": st.window, "tol": st.tol}
                methods = [measured("picard", window, method="picard", anderson=0),
                           measured("block", {"block": st.block, "sweeps": st.sweeps, "tol": st.tol},
                                    method="block", anderson=0),
                           measured("picard+anderson", {**window, "anderson": aa}, method="picard", anderson=aa)]
                log(f"  {st.describe()}, batch {B}: one call on {B * st.window} images costs {ratio['ratio']:.2f}x "
                    f"one call on {B}")
                reference = None
                if self.dtype != torch.float32:
                    ref = self.float32()
                    reference = ref.solve(x_T, noise, y, st, method="sequential").x
                records += benchmod.run("diffusion", measured("sequential", {}, method="sequential"), methods,
                                        batch=B, seed=seed, repeats=repeats, reference=reference,
                                        device=self.device, progress=progress)
        if fid:
            fids: dict[tuple[str, str], float] = {}
            for r in records:
                key = (r["sampler"], r["method"])
                if r["method"] not in ("sequential", "picard"):  # the others: see their error against sequential
                    continue
                if key not in fids:
                    # an image depends only on its seed, so any batch size gives the same images (up to float
                    # rounding): the sequential sampler runs 50 at a time, the parallel one 16
                    st = self.settings(r["method"], sampler=r["sampler"], **flags)
                    log(f"  FID of {fid} images: {st.describe()}")
                    out = self.sample(list(range(seed, seed + fid)), method=r["method"],
                                      batch_size=50 if r["method"] == "sequential" else 16,
                                      sampler=r["sampler"], **flags)
                    fids[key] = metrics.classifier_fid(out.signed)
                r["fid"], r["fid_n"] = fids[key], fid
        return records

    # ---- calibration
    def calibrate(self, samplers: list[str] = ("ddim", "ode"), max_err: float = 2e-3, seeds: int = 4,
                  batches: list[int] = (1, 2, 4, 16), cfg: float | None = None, steps: int | None = None,
                  seed: int = 1000, repeats: int = 3, log: Callable[[str], None] = print) -> dict[str, Any]:
        """Window Picard settings per sampler, chosen against the sequential answer (never assumed).

        For every window, the loosest tolerance whose images stay within `max_err` (max abs, [-1, 1] scale) of
        the sequential sampler's on `seeds` calibration images; the fastest of these at batch 1 wins if it beats
        the sequential sampler by more than timing noise. `max_batch`: the largest of `batches` up to which it
        still does. The records are written beside the checkpoint (or to the user directory for a bundled one)
        and `method="auto"` uses them from then on."""
        seeds = list(range(seed, seed + seeds))
        found = {}
        for name in samplers:
            st = self.settings("picard", sampler=name, steps=steps, cfg=cfg)

            def timed(ss: list[int], **over) -> float:  # median seconds of one batch of these seeds
                x, n = self.draw(ss, st)
                yy = self.labels(ss)
                return benchmod.median_seconds(lambda: self.solve(x, n, yy, st, **over), repeats, self.device)[1]

            x_T, noise = self.draw(seeds, st)
            y = self.labels(seeds)
            ref = self.solve(x_T, noise, y, st, method="sequential").x.double()
            seq_s = timed(seeds[:1], method="sequential")
            log(f"{name} {st.steps} steps: sequential {seq_s * 1e3:.0f} ms at batch 1; max abs error allowed "
                f"{max_err:g} on {len(seeds)} seeds")
            def error(w: int, tol: float) -> tuple[float, dict[str, Any]]:
                res = self.solve(x_T, noise, y, st, window=w, tol=tol, anderson=0)
                return float((res.x.double() - ref).abs().max()), {"rounds": res.rounds}

            def batch_seconds(B: int, w: int, tol: float) -> tuple[float, float]:
                ss = list(range(seeds[0], seeds[0] + B))
                return timed(ss, method="sequential"), timed(ss, window=w, tol=tol, anderson=0)

            rec = {"method": "picard", "anderson": 0, "guidance": st.guidance, "steps": st.steps, "seeds": len(seeds),
                   **picard_setting(error, lambda w, tol: timed(seeds[:1], window=w, tol=tol, anderson=0), seq_s,
                                    max_err, batches, batch_seconds, f"calibrate {name}", log)}
            log(f"  -> {name}: " + (f"window {rec['window']}, tol {rec['tol']:g}, up to batch {rec['max_batch']}"
                                    if rec["max_batch"] else "sequential at every batch size"))
            found[name] = rec
        doc = checkpoint.read_record(self.path, CALIBRATION)[0] or {}
        parallel = doc.setdefault("parallel", {})
        for name, rec in found.items():
            parallel[name] = {**parallel.get(name, {}), **rec}
        doc["checkpoint"] = self.name
        out = checkpoint.write_record(self.path, CALIBRATION, doc)
        self.calibrated.update(parallel)
        self.record = out
        log(f"settings saved to {out}")
        return found

    def plot_convergence(self, path: str | Path, seed: int = 0, **flags: Any) -> None:
        """Picard convergence over rounds for one image: how many steps are final after each sequential model
        call, for the checkpoint's window Picard, block Picard and window Picard with Anderson mixing
        (sequential: one step per call)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        st = self.settings("picard", **flags)
        steps = self.steps(st)
        x_T, noise = self.draw([seed], st)
        y = self.labels([seed])
        eps = self.predictor(st)
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

    def calibration_note(self) -> str:
        """What the calibration found per sampler, in one sentence."""
        parts, target = [], None
        for name, rec in self.calibrated.items():
            if "speedup" in rec:
                target = rec["max_abs_err_target"]
                verdict = f"up to batch {rec['max_batch']}" if rec["max_batch"] else "so auto stays sequential"
                parts.append(f"{name} {rec['steps']} steps: window {rec['window']}, tol {rec['tol']:g}, "
                             f"{rec['speedup']:.2f}x at batch 1, {verdict}")
        if not parts:
            return "This checkpoint is not calibrated (`pargen calibrate diffusion`)."
        return f"pargen calibrate diffusion (max abs error {target:g} against the sequential images): " + \
            "; ".join(parts) + "."


def cost(res: D.DiffusionSample) -> dict[str, Any]:
    return {"rounds": res.rounds, "nfe": res.nfe, "passes": sum(res.result.iters),
            "fallbacks": sum(s.fallback for s in res.result.segments)}
