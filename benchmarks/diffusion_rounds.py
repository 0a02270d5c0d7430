"""Fewest sequential rounds for a diffusion sampler within a pixel-error budget (rounds only, no wall time).

For 100-step DDIM (guidance 3) on a bundled denoiser: the adaptive window over all steps (window Picard, with and
without triangular Anderson mixing) at several tolerances, and a fixed number of sweeps K over all steps
(`method="block"` with one block, tol 0) with Anderson depths m. Each line is one run on the seeds given, with
its rounds and the max abs error of the final images against the sequential sampler's (same noise).

`--newton K` adds a reference that is not a parallel sampler: Newton's method on the whole trajectory with exact
Jacobians (float64; Jacobian-vector products by central differences), x[n+1] <- step_n(x_old[n]) +
J_n(x_old[n]) (x_new[n] - x_old[n]). Each sweep is one batched call over all steps plus N *sequential*
Jacobian-vector products, so it cannot run in K rounds. Anderson mixing (above) and ParaSolver-style corrections
approximate its Jacobians from earlier sweeps; its sweep count is what they would reach with exact ones.

    python benchmarks/diffusion_rounds.py --checkpoint denoiser-mnist --seeds 0 1 2 3 --json docs/diffusion_rounds.json
    python benchmarks/diffusion_rounds.py --plot docs/diffusion_rounds.png --from docs/diffusion_rounds*.json
"""
from __future__ import annotations

import argparse
import copy
import json

import torch

import pargen
from pargen.samplers import diffusion as D


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default="denoiser-mnist")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--sweeps", type=int, nargs="*", default=[7, 8, 9, 10, 11, 13])
    p.add_argument("--anderson", type=int, nargs="*", default=[0, 1, 2, 3])
    p.add_argument("--tols", type=float, nargs="*", default=[1e-3, 3e-4, 1e-4])
    p.add_argument("--newton", type=int, default=0, metavar="K",
                   help="also run K sweeps of exact-Jacobian Newton (a reference, see above; 0: skip)")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, metavar="PNG", help="error against rounds, one panel per study")
    p.add_argument("--from", dest="saved", nargs="+", default=None, metavar="JSON",
                   help="with --plot: draw these saved studies instead of measuring")
    args = p.parse_args()
    if args.saved:
        if not args.plot:
            p.error("--from needs --plot")
        studies = []
        for path in args.saved:
            with open(path) as f:
                studies.append(json.load(f))
        return plot(studies, args.plot)

    pipe = pargen.load(args.checkpoint)
    model = pipe.model
    eps = D.noise_predictor(model, args.cfg)
    steps = D.make_steps(model.alphas_cumprod, args.steps, "ddim")
    c = model.config
    x_T, _ = D.draw(args.seeds, (c.in_channels, c.img_size, c.img_size), steps)
    y = pipe.labels(args.seeds)
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
    if args.newton:
        for k, err in enumerate(newton(model, args.cfg, steps, x_T, y, args.newton), 1):
            rows.append({"kind": "newton (exact Jacobians, reference)", "sweeps": k, "max_abs_err": err})
            print(f"newton (exact Jacobians) {k} sweeps: max abs err {err:.1e}", flush=True)
    study = {"checkpoint": args.checkpoint, "seeds": args.seeds, "steps": args.steps, "cfg": args.cfg, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(study, f, indent=1)
        print(f"written to {args.json}")
    if args.plot:
        plot([study], args.plot)


def newton(model, cfg: float, steps: D.Steps, x_T, y, sweeps: int) -> list[float]:
    """Max abs error of the final images after each of `sweeps` exact Newton sweeps (deterministic samplers)."""
    if steps.stochastic or steps.kind == "ode":
        raise SystemExit("--newton needs a deterministic one-call step (ddim, eta 0)")
    m64 = copy.deepcopy(model).double()
    x_T = x_T.double()
    eps = D.noise_predictor(m64, cfg)
    ref = D.sample(eps, x_T, steps, y=y).x
    op = D.PicardOperator(eps, steps, x_T, None, y)
    B, N = x_T.shape[0], steps.n
    idx, rows = torch.arange(N).repeat(B), torch.arange(B).repeat_interleave(N)
    x = x_T[:, None].repeat(1, N, *(1,) * (x_T.dim() - 1))  # x[:, n]: the input of step n
    every = torch.arange(B)
    errs = []
    with torch.no_grad():
        for _ in range(sweeps):
            g = op.step(x.flatten(0, 1), idx, rows).view_as(x)  # the one batched call of this sweep
            new = x.clone()
            for n in range(N):  # the Newton recurrence, one Jacobian-vector product per step
                d = new[:, n] - x[:, n]
                out = g[:, n]
                if bool(d.any()):
                    h = (1e-5 / d.flatten(1).norm(dim=1).clamp_min(1e-300)).view(-1, *(1,) * (d.dim() - 1))
                    at = torch.full((B,), n)
                    out = out + (op.step(x[:, n] + h * d, at, every) - op.step(x[:, n] - h * d, at, every)) / (2 * h)
                if n + 1 < N:
                    new[:, n + 1] = out
            errs.append(float((out - ref).abs().max()))
            x = new
    return errs


def plot(studies: list[dict], path: str, budget: float = 2e-3, rounds: int = 7) -> None:
    """Max abs error against rounds (sweeps for Newton): fixed sweeps per Anderson depth, the adaptive window's
    runs as points, Newton dashed; the target (at most `rounds` rounds within `budget`) shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(studies), figsize=(5.2 * len(studies) + 2.4, 4), squeeze=False)
    for ax, st in zip(axes[0], studies):
        rows = st["rows"]
        depths = sorted({r["anderson"] for r in rows if "anderson" in r})
        for m, color in zip(depths, plt.cm.viridis([i / max(len(depths), 1) for i in range(len(depths))])):
            fixed = sorted((r["rounds"], r["max_abs_err"]) for r in rows
                           if r["kind"] == "fixed sweeps" and r["anderson"] == m)
            win = [(r["rounds"], r["max_abs_err"]) for r in rows if r["kind"] == "window" and r["anderson"] == m]
            label = "plain Picard" if m == 0 else f"Anderson {m}"
            if fixed:
                ax.plot(*zip(*fixed), "o-", color=color, ms=3, label=f"fixed sweeps, {label}")
            if win:
                ax.plot(*zip(*win), "^", color=color, ms=6, mfc="none", label=f"adaptive window, {label}")
        nt = sorted((r["sweeps"], r["max_abs_err"]) for r in rows if r["kind"].startswith("newton"))
        if nt:
            ax.plot(*zip(*nt), "k--", marker="s", ms=3, label="Newton, exact Jacobians (not parallel)")
        ax.fill_between([0, rounds], 1e-16, budget, color="tab:green", alpha=0.12, label="target")
        ax.axhline(budget, color="tab:green", lw=0.8)
        ax.set(yscale="log", xlabel="rounds (sequential model calls; Newton: sweeps)", ylabel="max abs error",
               xlim=(0, 21), ylim=(1e-6, 1e3),
               title=f"{st['checkpoint']}: DDIM {st['steps']}, guidance {st['cfg']:g}, {len(st['seeds'])} seeds")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="center right")
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    fig.savefig(path, dpi=110)
    print(f"plot written to {path}")


if __name__ == "__main__":
    main()
