"""TarFlow pipeline: method names -> block plans (the calibrated GS-Jacobi plan for `auto`), batched sampling with
the denoising step, calibration of the plan (CRM / IGM, timed per block, verified end to end) and the bench."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from .. import checkpoint
from ..errors import PargenError
from ..evaluation import bench as benchmod
from ..evaluation import calibrate as cal
from ..evaluation import metrics
from ..samplers import fixed_point, flow
from . import Pipeline, family, share_seeds

DEFAULT_TOL = 1e-5


@dataclass(frozen=True)
class FlowSettings:
    method: str
    plan: Any  # a BlockPlan for every block, or a list in sampling order
    tol: float
    guidance: flow.Guidance
    denoise: bool = True
    source: str = ""  # where the plan came from
    temperature: float = 1.0  # the prior noise is drawn with this std (1: the model's own distribution)

    def describe(self) -> str:
        what = {"sequential": "sequential (KV cache)", "jacobi": "jacobi"}.get(self.method, self.source)
        g = self.guidance
        return (f"{what}, tol {self.tol:g}, guidance {g.scale:g}" + (" annealed" if g.annealed and g.scale else "")
                + ("" if self.temperature == 1 else f", temperature {self.temperature:g}")
                + ("" if self.denoise else ", no denoising step"))


@family("tarflow")
class TarFlowPipeline(Pipeline):
    family = "tarflow"
    methods = ("auto", "sequential", "jacobi", "gs-jacobi")
    options = ("tol", "segments", "cfg", "annealed", "attn_temp", "denoise", "temperature")

    def guidance(self, cfg: float | None = None, annealed: bool | None = None,
                 attn_temp: float | None = None) -> flow.Guidance:
        d = self.defaults
        return flow.Guidance(scale=d.get("guidance", 0.0) if cfg is None else cfg,
                             annealed=d.get("annealed", False) if annealed is None else annealed,
                             attn_temp=d.get("attn_temp", 1.0) if attn_temp is None else attn_temp)

    def temperature(self, t: float | None = None) -> float:
        return self.defaults.get("temperature", 1.0) if t is None else t

    def settings(self, method: str = "auto", batch: int = 1, tol: float | None = None, segments: int | None = None,
                 cfg: float | None = None, annealed: bool | None = None, attn_temp: float | None = None,
                 denoise: bool | None = None, temperature: float | None = None) -> FlowSettings:
        """`auto`: the calibrated plan for the batch size nearest `batch` (`pargen calibrate tarflow`); the
        sequential sampler where the checkpoint has none. `temperature` scales the prior noise (default: the
        checkpoint's, else 1)."""
        self.check(method, {})
        st = self._settings(method, batch, tol, segments, cfg, annealed, attn_temp, denoise)
        t = self.temperature(temperature)
        return st if t == 1 else dataclasses.replace(st, temperature=t)

    def _settings(self, method, batch, tol, segments, cfg, annealed, attn_temp, denoise) -> FlowSettings:
        g = self.guidance(cfg, annealed, attn_temp)
        dn = True if denoise is None else denoise
        if method == "sequential":
            return FlowSettings("sequential", flow.SEQUENTIAL, 0.0, g, dn)
        if method == "jacobi":
            return FlowSettings("jacobi", flow.JACOBI, DEFAULT_TOL if tol is None else tol, g, dn)
        if method == "gs-jacobi":
            return FlowSettings("gs-jacobi", flow.BlockPlan(segments=segments or 4), DEFAULT_TOL if tol is None
                                else tol, g, dn, f"gs-jacobi ({segments or 4} segments)")
        found = cal.load_plan(self.path, batch)
        if found is None:
            return FlowSettings("sequential", flow.SEQUENTIAL, 0.0, g, dn,
                                "sequential (no calibrated plan: `pargen calibrate tarflow`)")
        plans, ptol = found
        T = self.model.config.seq_len
        kind = "sequential" if all(b.segments >= T for b in plans) else "gs-jacobi"  # the plan may keep every block
        return FlowSettings("gs-jacobi", plans, ptol if tol is None else tol, g, dn, f"{kind} (calibrated plan)")

    def noise(self, seeds: list[int], temperature: float | None = None) -> Tensor:
        """The latent noise of these seeds at `temperature` (default: the checkpoint's)."""
        t = self.temperature(temperature)
        z = flow.noise(self.model, seeds, self.device)
        return z if t == 1 else z * t

    def run(self, seeds: list[int], labels: Tensor | None, st: FlowSettings, progress: bool | None = None
            ) -> tuple[Tensor, dict[str, Any]]:
        res = flow.sample(self.model, self.noise(seeds, st.temperature), labels, plan=st.plan, tol=st.tol,
                          guidance=st.guidance)
        x = flow.denoise(self.model, res.x, labels) if st.denoise else res.x
        return x.add(1).mul(0.5), cost(res)

    # ---- calibration
    def calibrate(self, data_name: str | None = None, batches: list[int] | None = None, tol: float = 1e-5,
                  target_err: float = 1e-4, cfg: float | None = None, seed: int = 1000, plot: str | None = None,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
        """CRM / IGM per block on 256 training images, then per batch size the fastest plan per block within the
        error budget, verified end to end (the tolerance is tightened until the whole plan meets `target_err`).
        A checkpoint that names no dataset (a converted official one) and no `data_name`: the diagnostics run on
        256 of the model's own samples (sequential, no denoising step), which come from the distribution the
        blocks see when sampling. The record is written beside the checkpoint, or to the user directory for a
        bundled one."""
        model = self.model
        guidance = self.guidance(cfg)
        name = data_name or self.meta.get("data")
        if name is None:
            log(f"{self.name} names no dataset: diagnostics on 256 of its own samples (sequential)")
        x, y, _ = self.reference_images(256, name, "train", seed)
        rows = cal.diagnostics(model, x.to(dtype=self.dtype), y if model.config.num_classes else None)
        log("per-block diagnostics (sampling order; CRM: large = tough block, IGM: smaller = better initial guess)")
        log(f"{'idx':>4} {'fwd':>4} {'CRM':>10} {'CRM %':>7} {'IGM(z)':>10} {'IGM(zero)':>10}")
        for r in rows:
            log(f"{r['sampling_index']:>4} {r['block']:>4} {r['crm']:>10.3f} {r['crm_percent']:>6.1f}% "
                f"{r['igm_z']:>10.3f} {r['igm_zero']:>10.3f}")
        by_batch = {}
        for B in batches or [1, 16]:
            seeds = list(range(seed, seed + B))
            z, yb = self.noise(seeds), self.labels(seeds)
            t = tol
            for _ in range(4):
                log(f"batch {B}: searching plans at tol {t:.1e}")
                plans, _ = cal.search(model, z, yb, t, guidance, err_budget=target_err / 2, log=log)
                ref = flow.sample(model, z, yb, guidance=guidance)
                got = flow.sample(model, z, yb, plan=plans, tol=t, guidance=guidance)
                err = float((got.x - ref.x).double().norm() / ref.x.double().norm())
                log(f"batch {B}: end-to-end rel err {err:.2e} (target {target_err:.0e}), rounds {got.rounds} "
                    f"vs {ref.rounds}")
                if err <= target_err:
                    break
                t /= 4
            else:
                raise PargenError(f"could not reach relative error {target_err} at batch {B}")
            by_batch[str(B)] = {**cal.plan_to_json(plans, t), "rel_err": err, "rounds": got.rounds,
                                "sequential_rounds": ref.rounds}
        doc = {"checkpoint": self.name, "target_rel_err": target_err, "diagnostics": rows, "by_batch": by_batch}
        out = checkpoint.write_record(self.path, cal.PLAN, doc)
        log(f"plan saved to {out}")
        if plot is not None:
            self.plot_residuals(plot, guidance, seed)
            log(f"residual plot saved to {plot}")
        return doc

    def plot_residuals(self, path: str | Path, guidance: flow.Guidance | None = None, seed: int = 0) -> None:
        """Residual against Jacobi iteration for every block (tolerance 0, batch 4)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        seeds = list(range(seed, seed + 4))
        res = flow.sample(self.model, self.noise(seeds), self.labels(seeds), plan=flow.JACOBI, tol=0.0,
                          guidance=guidance or self.guidance())
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, r in enumerate(res.blocks):
            v = r.segments[0].residuals
            ax.semilogy(range(1, len(v) + 1), [max(e, 1e-16) for e in v], label=f"block {i} (sampling order)")
        ax.set_xlabel("Jacobi iteration")
        ax.set_ylabel("max relative change")
        ax.set_title("TarFlow Jacobi convergence per block")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)

    # ---- bench
    def bench(self, batches: list[int] = (1, 16), repeats: int = 5, tol: float | None = None,
              cfg: float | None = None, seed: int = 0, naive: bool = True, fid: int | None = None,
              progress: bool = False) -> list[dict[str, Any]]:
        """Sequential vs Jacobi vs the `auto` plan (and the uncached per-token sampler) on the same noise, per batch
        size, interleaved; errors against the float32 sequential answer. `fid`: classifier FID of that many
        samples for the sequential and the auto sampler."""
        self.check_bench(batches, fid)
        records = []
        for B in batches:
            seeds = share_seeds(list(range(seed, seed + B)))
            z, y = self.noise(seeds), self.labels(seeds)

            def runner(st: FlowSettings):
                def go():
                    res = flow.sample(self.model, z, y, plan=st.plan, tol=st.tol, guidance=st.guidance)
                    return res.x, cost(res)
                return go

            seq = self.settings("sequential", B, cfg=cfg)
            auto = self.settings("auto", B, tol=tol, cfg=cfg)
            jac = self.settings("jacobi", B, tol=tol, cfg=cfg)
            methods = [benchmod.Method("jacobi", runner(jac), {"tol": jac.tol}),
                       benchmod.Method("gs-jacobi-auto" if auto.method == "gs-jacobi" else "auto(no plan)",
                                       runner(auto), {"tol": auto.tol})]
            if naive:
                methods.append(benchmod.Method("sequential-no-cache", _naive_runner(self.model, z, y, seq.guidance)))
            records += benchmod.run("tarflow", benchmod.Method("sequential", runner(seq)), methods, batch=B,
                                    seed=seed, repeats=repeats, reference=self._reference(z, y, seq),
                                    device=self.device, progress=progress)
        if fid:
            for method, name in (("sequential", "sequential"), ("auto", "gs-jacobi-auto")):
                # the batch-1 plan is the most parallel one; results do not depend on the batch they run in
                out = self.sample(list(range(seed, seed + fid)), method=method, batch_size=16, tol=tol, cfg=cfg)
                score = metrics.classifier_fid(out.signed)
                for r in records:
                    if r["method"] == name:
                        r["fid"], r["fid_n"] = score, fid
        return records

    def _reference(self, z: Tensor, y: Tensor | None, st: FlowSettings) -> Tensor | None:
        """The float32 sequential answer of a reduced-precision pipeline (None in float32: the baseline is it)."""
        if self.dtype == torch.float32:
            return None
        ref = self.float32()
        return flow.sample(ref.model, z.float(), y, plan=flow.SEQUENTIAL, guidance=st.guidance).x


def cost(res: flow.FlowSample) -> dict[str, Any]:
    return {"rounds": res.rounds, "nfe": res.nfe, "iters_per_block": [r.iters for r in res.blocks],
            "fallbacks": sum(s.fallback for r in res.blocks for s in r.segments)}


def _naive_runner(model, z: Tensor, y, guidance: flow.Guidance):
    """The straightforward per-token sampler: each token re-runs the block's transformer on the whole prefix."""
    def run():
        with torch.inference_mode():
            x = z * model.var.sqrt()
            rounds = nfe = 0
            for k in reversed(range(len(model.blocks))):
                block = model.blocks[k]
                zs = block.order(x)
                op = flow.BlockOperator(model, k, zs, y, guidance, cached=False)
                f = (lambda xp, op=op: op(xp, 0, xp.shape[1]))
                res = fixed_point.sequential(fixed_point.FunctionOperator(f), zs.clone())
                x = block.order(res.x)
                rounds += res.rounds
                nfe += sum(range(1, zs.shape[1] + 1))
            return model.unpatchify(x), {"rounds": rounds, "nfe": nfe * (2 if guidance.active else 1)}

    return run
