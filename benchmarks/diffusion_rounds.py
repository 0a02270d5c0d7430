"""Fewest sequential rounds for a diffusion sampler within a pixel-error budget (rounds only, no wall time).

For 100-step DDIM (guidance 3) on a bundled denoiser: the adaptive window over all steps (window Picard, with and
without triangular Anderson mixing) at several tolerances, and a fixed number of sweeps K over all steps
(`method="block"` with one block, tol 0) with Anderson depths m. Each line is one run on the seeds given, with
its rounds and the max abs error of the final images against the sequential sampler's (same noise).

    python benchmarks/diffusion_rounds.py --checkpoint denoiser-mnist --seeds 0 1 2 3 --json docs/diffusion_rounds.json
"""
from __future__ import annotations

import argparse
import json

from pargen import checkpoint
from pargen.cli.common import labels_for
from pargen.samplers import diffusion as D


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default="denoiser-mnist")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--sweeps", type=int, nargs="+", default=[7, 8, 9, 10, 11, 13])
    p.add_argument("--anderson", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--tols", type=float, nargs="+", default=[1e-3, 3e-4, 1e-4])
    p.add_argument("--json", default=None)
    args = p.parse_args()

    model, _ = checkpoint.load(checkpoint.resolve(args.checkpoint))
    eps = D.noise_predictor(model, args.cfg)
    steps = D.make_steps(model.alphas_cumprod, args.steps, "ddim")
    c = model.config
    x_T, _ = D.draw(args.seeds, (c.in_channels, c.img_size, c.img_size), steps)
    y = labels_for(model, args.seeds, None)
    ref = D.sample(eps, x_T, steps, y=y).x
    rows = []

    def record(kind: str, **kw) -> None:
        r = D.sample(eps, x_T, steps, y=y, **kw)
        row = {"kind": kind, **kw, "rounds": r.rounds, "max_abs_err": float((r.x - ref).abs().max())}
        rows.append(row)
        print(f"{kind:14s} {kw}: {r.rounds} rounds, max abs err {row['max_abs_err']:.1e}", flush=True)

    for m in args.anderson:
        for tol in args.tols:
            record("window", method="picard", window=args.steps, tol=tol, anderson=m)
    for m in args.anderson:
        for k in args.sweeps:
            record("fixed sweeps", method="block", block=args.steps, sweeps=k, tol=0.0, anderson=m)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"checkpoint": args.checkpoint, "seeds": args.seeds, "steps": args.steps, "cfg": args.cfg,
                       "rows": rows}, f, indent=1)
        print(f"written to {args.json}")


if __name__ == "__main__":
    main()
