"""TarFlow glue for the CLI: method names -> block plans, batched generation, bench and calibration."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .. import checkpoint
from ..errors import PargenError
from ..evaluation import bench as benchmod
from ..evaluation import calibrate as cal
from ..models.tarflow import TarFlow
from ..samplers import flow
from .common import labels_for, rank_share

METHODS = ("auto", "sequential", "jacobi", "gs-jacobi")
DEFAULT_TOL = 1e-5


def resolve_plan(ckpt: Path | None, method: str, batch: int, tol: float | None, segments: int | None,
                 quiet: bool = False) -> tuple[list[flow.BlockPlan] | flow.BlockPlan, float, str]:
    """(plan, tolerance, description) for a method name."""
    if method == "sequential":
        return flow.SEQUENTIAL, 0.0, "sequential (KV cache)"
    if method == "jacobi":
        return flow.JACOBI, DEFAULT_TOL if tol is None else tol, "jacobi"
    if method == "gs-jacobi":
        return flow.BlockPlan(segments=segments or 4), DEFAULT_TOL if tol is None else tol, \
            f"gs-jacobi ({segments or 4} segments)"
    if method == "auto":
        found = cal.load_plan(ckpt, batch) if ckpt is not None else None
        if found is None:
            if not quiet:
                print("no calibrated plan next to the checkpoint (run `pargen calibrate tarflow CKPT`); using Jacobi")
            return flow.JACOBI, DEFAULT_TOL if tol is None else tol, "jacobi (no plan)"
        plans, ptol = found
        return plans, ptol if tol is None else tol, "gs-jacobi (calibrated plan)"
    raise PargenError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def default_guidance(meta: dict[str, Any], scale: float | None, annealed: bool | None,
                     attn_temp: float | None) -> flow.Guidance:
    d = meta.get("sample_defaults", {})
    return flow.Guidance(scale=d.get("guidance", 0.0) if scale is None else scale,
                         annealed=d.get("annealed", False) if annealed is None else annealed,
                         attn_temp=d.get("attn_temp", 1.0) if attn_temp is None else attn_temp)


def generate(model: TarFlow, seeds: list[int], y: torch.Tensor | None, plan, tol: float, guidance: flow.Guidance,
             denoise: bool, batch_size: int, device: str = "cpu", progress: bool = True,
             ) -> tuple[torch.Tensor, list[flow.FlowSample]]:
    """Images for the given seeds, in chunks of batch_size; each image depends only on its seed and label."""
    out, runs = [], []
    for i in tqdm(range(0, len(seeds), batch_size), disable=not progress or len(seeds) <= batch_size,
                  desc="sample", dynamic_ncols=True):
        s = seeds[i: i + batch_size]
        yb = None if y is None else y[i: i + batch_size].to(device)
        res = flow.sample(model, flow.noise(model, s, device), yb, plan=plan, tol=tol, guidance=guidance)
        x = flow.denoise(model, res.x, yb) if denoise else res.x
        out.append(x.cpu())
        runs.append(res)
    return torch.cat(out), runs


def cost(res: flow.FlowSample) -> dict[str, Any]:
    return {"rounds": res.rounds, "nfe": res.nfe, "iters_per_block": [r.iters for r in res.blocks],
            "fallbacks": sum(s.fallback for r in res.blocks for s in r.segments)}


def bench(model: TarFlow, ckpt: Path, batches: list[int], repeats: int, tol: float | None,
          guidance: flow.Guidance, seed: int, naive: bool = True) -> list[dict[str, Any]]:
    """Sequential vs Jacobi vs GS-Jacobi (calibrated plan) on the same noise, per batch size."""
    records = []
    for B in batches:
        seeds = rank_share(list(range(seed, seed + B)))  # all of them outside torchrun
        z = flow.noise(model, seeds)
        y = labels_for(model, seeds, None)

        def runner(plan, t):
            def run():
                res = flow.sample(model, z, y, plan=plan, tol=t, guidance=guidance)
                return res.x, cost(res)
            return run

        seq_plan, _, _ = resolve_plan(ckpt, "sequential", B, None, None)
        methods = []
        jplan, jtol, _ = resolve_plan(ckpt, "jacobi", B, tol, None)
        methods.append(benchmod.Method("jacobi", runner(jplan, jtol), {"tol": jtol}))
        aplan, atol, desc = resolve_plan(ckpt, "auto", B, tol, None, quiet=True)
        methods.append(benchmod.Method("gs-jacobi-auto" if "calibrated" in desc else "gs-jacobi-auto(no plan)",
                                       runner(aplan, atol), {"tol": atol}))
        if naive:
            methods.append(benchmod.Method("sequential-no-cache", _naive_runner(model, z, y, guidance)))
        records += benchmod.run("tarflow", benchmod.Method("sequential", runner(seq_plan, 0.0)), methods,
                                batch=B, seed=seed, repeats=repeats)
    return records


def _naive_runner(model: TarFlow, z: torch.Tensor, y, guidance: flow.Guidance):
    """The straightforward per-token sampler: each token re-runs the block's transformer on the whole prefix."""
    from ..samplers import fixed_point

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


def calibrate(model: TarFlow, ckpt: Path, train_x: torch.Tensor, train_y, batches: list[int], tol: float,
              target_err: float, guidance: flow.Guidance, seed: int, plot: Path | None) -> dict[str, Any]:
    rows = cal.diagnostics(model, train_x, train_y)
    print("per-block diagnostics (sampling order; CRM: large = tough block, IGM: smaller = better initial guess)")
    print(f"{'idx':>4} {'fwd':>4} {'CRM':>10} {'CRM %':>7} {'IGM(z)':>10} {'IGM(zero)':>10}")
    for r in rows:
        print(f"{r['sampling_index']:>4} {r['block']:>4} {r['crm']:>10.3f} {r['crm_percent']:>6.1f}% "
              f"{r['igm_z']:>10.3f} {r['igm_zero']:>10.3f}")
    by_batch = {}
    for B in batches:
        seeds = list(range(seed, seed + B))
        z = flow.noise(model, seeds)
        y = labels_for(model, seeds, None)
        t = tol
        for attempt in range(4):
            print(f"batch {B}: searching plans at tol {t:.1e}")
            plans, _ = cal.search(model, z, y, t, guidance, err_budget=target_err / 2)
            ref = flow.sample(model, z, y, guidance=guidance)
            got = flow.sample(model, z, y, plan=plans, tol=t, guidance=guidance)
            err = float((got.x - ref.x).norm() / ref.x.norm())
            print(f"batch {B}: end-to-end rel err {err:.2e} (target {target_err:.0e}), rounds {got.rounds} "
                  f"vs {ref.rounds}")
            if err <= target_err:
                break
            t /= 4
        else:
            raise PargenError(f"could not reach relative error {target_err} at batch {B}")
        by_batch[str(B)] = {**cal.plan_to_json(plans, t), "rel_err": err, "rounds": got.rounds,
                            "sequential_rounds": ref.rounds}
    doc = {"checkpoint": ckpt.name, "target_rel_err": target_err, "diagnostics": rows, "by_batch": by_batch}
    path = cal.plan_path(ckpt)
    checkpoint.atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=2) + "\n"))
    print(f"plan saved to {path}")
    if plot is not None:
        _plot_residuals(model, guidance, seed, plot)
    return doc


def _plot_residuals(model: TarFlow, guidance: flow.Guidance, seed: int, path: Path) -> None:
    """Residual against Jacobi iteration for every block (tolerance 0, batch 4)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = list(range(seed, seed + 4))
    res = flow.sample(model, flow.noise(model, seeds), labels_for(model, seeds, None), plan=flow.JACOBI,
                      tol=0.0, guidance=guidance)
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, r in enumerate(res.blocks):
        ax.semilogy(range(1, len(r.segments[0].residuals) + 1), [max(v, 1e-16) for v in r.segments[0].residuals],
                    label=f"block {i} (sampling order)")
    ax.set_xlabel("Jacobi iteration")
    ax.set_ylabel("max relative change")
    ax.set_title("TarFlow Jacobi convergence per block")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"residual plot saved to {path}")
