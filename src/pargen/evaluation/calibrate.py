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
from typing import Any

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
