"""Automatic GS-Jacobi strategy for a TarFlow (the paper, arXiv 2505.12849, leaves it to hand tuning).

1. Diagnostics on training images, per block: the Convergence Ranking Metric
       CRM = ||mean_batch(exp(-a) * x)||_2 * ||W_a||_2 + ||W_b||_2
   (W_a, W_b the halves of proj_out.weight; matrix 2-norms, as the authors' code computes it) and the Initial
   Guessing Metric IGM(init) = ||mean_batch(F(init) - x)||_2, one Jacobi step from each candidate initial guess.
   We evaluate them with the true labels (the authors' code uses the mean class embedding).
2. Measurement on the sampler's own inputs: sequential sampling of a calibration batch gives every block's
   true input and output; each candidate (segments, initial guess, tolerance: 1, 3 or 10 times the given one)
   is run per block, timed, and checked against the sequential output. The fastest candidate within the error
   budget wins, per batch size, so easy blocks may stop earlier than tough ones; a parallel candidate must beat
   the sequential sampler by more than timing noise (MARGIN), or the block stays sequential.
3. The whole plan is verified end to end against sequential sampling; if the error exceeds the target the
   tolerance is tightened and the search repeats.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from .. import checkpoint
from ..errors import PargenError
from ..models.tarflow import TarFlow
from ..samplers import flow
from .bench import median_seconds

SEGMENT_CHOICES = (1, 2, 4, 8, 16)
INITS = ("z", "zero")
TOL_FACTORS = (1, 3, 10)
MARGIN = 0.9  # a parallel candidate must take at most this share of the sequential time: timing noise is ~5-10%
WINDOWS = (2, 4, 8, 16, 32)  # Picard windows tried for diffusion samplers
TOLS = (0.1, 0.03, 0.01, 0.003, 0.001, 3e-4, 1e-4, 3e-5, 1e-5)  # loosest first: per window, the first within the error


@torch.inference_mode()
def diagnostics(model: TarFlow, x: Tensor, y: Tensor | None) -> list[dict[str, float]]:
    """CRM and IGM per block, listed in sampling order (index 0 = last forward block)."""
    h = model.patchify(x)
    rows = []
    D = model.config.patch_dim
    for k, block in enumerate(model.blocks):
        z, _ = block(h, y)
        xs, zs = block.order(h), block.order(z)
        cond = block.cond_embed(y)
        raw = block.hidden(xs, 0, cond)
        raw = torch.cat([torch.zeros_like(raw[:, :1]), raw[:, :-1]], dim=1)
        a, b = block.split(raw)
        W = block.proj_out.weight
        w_a = torch.linalg.matrix_norm(W[:D], ord=2) if model.config.nvp else torch.zeros(())
        w_b = torch.linalg.matrix_norm(W[D:] if model.config.nvp else W, ord=2)
        crm = torch.linalg.matrix_norm((torch.exp(-a) * xs).mean(0), ord=2) * w_a + w_b
        igm = {}
        for init in INITS:
            guess = zs.clone()
            if init == "zero":
                guess[:, 1:] = 0
            g = block.hidden(guess, 0, cond)
            g = torch.cat([torch.zeros_like(g[:, :1]), g[:, :-1]], dim=1)
            ga, gb = block.split(g)
            step = zs * torch.exp(ga) + gb
            igm[init] = float(torch.linalg.matrix_norm((step - xs).mean(0), ord=2))
        rows.append({"block": k, "crm": float(crm), "igm_z": igm["z"], "igm_zero": igm["zero"]})
        h = z
    rows.reverse()
    total = sum(r["crm"] for r in rows)
    for i, r in enumerate(rows):
        r["sampling_index"] = i
        r["crm_percent"] = 100 * r["crm"] / total
    return rows


@dataclass
class Candidate:
    segments: int
    init: str
    tol: float
    seconds: float
    iters: list[int]
    rel_err: float


@torch.inference_mode()
def search(model: TarFlow, noise: Tensor, y: Tensor | None, tol: float, guidance: flow.Guidance,
           err_budget: float, repeats: int = 3, log=print) -> tuple[list[flow.BlockPlan], list[list[Candidate]]]:
    """Per block (sampling order): time every candidate on the true block inputs; keep the fastest within budget."""
    ref = flow.sample(model, noise, y, guidance=guidance, trace=True)
    T = model.config.seq_len
    n = len(model.blocks)
    plans, tables = [], []
    for i, k in enumerate(reversed(range(n))):
        z_in = model.patchify(ref.trace[i])
        x_out = model.patchify(ref.trace[i + 1])
        seq, seq_s = median_seconds(lambda: flow.invert_block(model, k, z_in, y, flow.SEQUENTIAL, guidance=guidance),
                                    repeats)
        cands = [Candidate(T, "z", 0.0, seq_s, seq.iters, 0.0)]
        for s in SEGMENT_CHOICES:
            if s >= T:
                continue
            for init in INITS:
                for t in (tol * f for f in TOL_FACTORS):
                    plan = flow.BlockPlan(segments=s, init=init, tol=t)
                    res, sec = median_seconds(lambda: flow.invert_block(model, k, z_in, y, plan, guidance=guidance),
                                              repeats)
                    err = float((res.x - x_out).norm() / x_out.norm())
                    cands.append(Candidate(s, init, t, sec, res.iters, err))
        ok = [c for c in cands[1:] if c.rel_err <= err_budget and c.seconds <= MARGIN * seq_s]
        best = min(ok, key=lambda c: c.seconds) if ok else cands[0]
        sequential = best.segments >= T
        cap = None if sequential else max(1, math.ceil(1.5 * max(best.iters)))
        plans.append(flow.BlockPlan(segments=best.segments, init=best.init, max_iters=cap,
                                    tol=None if sequential else best.tol))
        tables.append(cands)
        log(f"  block {i} (forward {k}): sequential {seq_s * 1e3:.1f} ms -> segments={best.segments} "
            f"init={best.init}" + ("" if sequential else f" tol={best.tol:.0e}") +
            f" {best.seconds * 1e3:.1f} ms, iters {best.iters}, rel err {best.rel_err:.1e}")
    return plans, tables


PLAN = ".plan.json"  # the record's suffix beside the checkpoint (or in the user directory for a bundled one)


def plan_to_json(plans: list[flow.BlockPlan], tol: float) -> dict[str, Any]:
    return {"tol": tol, "blocks": [asdict(p) for p in plans]}


def plan_from_json(d: dict[str, Any]) -> tuple[list[flow.BlockPlan], float]:
    try:
        return [flow.BlockPlan(**b) for b in d["blocks"]], float(d["tol"])
    except (KeyError, TypeError, ValueError) as e:
        raise PargenError(f"invalid sampling plan: {e}") from None


def load_plan(ckpt: str | Path, batch: int) -> tuple[list[flow.BlockPlan], float] | None:
    """The calibrated plan for the batch size closest to `batch` (None if the checkpoint has no plan)."""
    d, p = checkpoint.read_record(ckpt, PLAN)
    if d is None:
        return None
    by_batch = d.get("by_batch", {})
    if not by_batch:
        raise PargenError(f"sampling plan {p} holds no plans")
    key = min(by_batch, key=lambda b: abs(math.log(int(b)) - math.log(max(1, batch))))
    return plan_from_json(by_batch[key])


def picard_setting(error: Callable[[int, float], tuple[float, dict[str, Any]]],
                   seconds: Callable[[int, float], float], seq_s: float, max_err: float,
                   batches: list[int], batch_seconds: Callable[[int, int, float], tuple[float, float]],
                   desc: str = "calibrate", log: Callable[[str], None] = print) -> dict[str, Any]:
    """The window Picard setting of a diffusion sampler, chosen against its sequential answer (never assumed).

    Per window, the loosest tolerance whose `error(window, tol)` -> (max abs error, extras to record) stays within
    `max_err`; the fastest of these at batch 1 (`seconds(window, tol)`, against the sequential `seq_s`) is the
    setting, and it is used (`max_batch` >= 1) only if it beats the sequential sampler by more than timing noise;
    `max_batch` is then the largest of `batches` up to which `batch_seconds(B, window, tol)` -> (sequential,
    parallel) still does."""
    from tqdm import tqdm

    found = []
    for w in tqdm(WINDOWS, desc=desc, leave=False, dynamic_ncols=True):
        for tol in TOLS:
            err, extra = error(w, tol)
            if err <= max_err:
                sec = seconds(w, tol)
                found.append({"window": w, "tol": tol, "max_abs_err": err, **extra, "seconds": sec})
                log(f"  window {w:3d}: tol {tol:g}, max err {err:.1e}, "
                    + "".join(f"{k} {v}, " for k, v in extra.items()) + f"{sec * 1e3:.0f} ms ({seq_s / sec:.2f}x)")
                break
        else:
            log(f"  window {w:3d}: no tolerance in {TOLS} reaches {max_err:g}")
    rec: dict[str, Any] = {"max_batch": 0, "max_abs_err_target": max_err, "sequential_s": round(seq_s, 4)}
    best = min(found, key=lambda c: c["seconds"], default=None)
    if best is None:
        return rec
    rec.update({k: v for k, v in best.items() if k != "seconds"}, speedup=round(seq_s / best["seconds"], 3))
    if best["seconds"] <= MARGIN * seq_s:
        rec["max_batch"] = 1
        for B in sorted(b for b in batches if b > 1):
            s_seq, s_par = batch_seconds(B, best["window"], best["tol"])
            log(f"  batch {B}: sequential {s_seq * 1e3:.0f} ms, window Picard {s_par * 1e3:.0f} ms "
                f"({s_seq / s_par:.2f}x)")
            if s_par > MARGIN * s_seq:
                break
            rec["max_batch"] = B
    return rec
