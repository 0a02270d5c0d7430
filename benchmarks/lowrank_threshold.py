"""The low-rank criterion is a threshold: polynomial attention against R / sqrt(log L) on synthetic VAR attention.

Ke et al. (arXiv 2501.04377, after Alman & Song, arXiv 2302.13214): when the entries of Q and K are bounded by
R = o(sqrt(log n)), VAR's attention has an n^{2+o(1)} algorithm (the polynomial method); for R = Omega(sqrt(log n))
none is sub-quartic under SETH. Here, on synthetic VAR attention (the block-causal mask of VAR's 10-scale pyramid
stretched to a final side n, L tokens, Q and K entries +-R, logits q.k / d as in the analysis, so the logit bound
is exactly beta = R^2):

- the measured attention-output error of one fixed polynomial (`--degree`, `--kind`, head dimension `--head-dim`)
  against the exact attention, per n, as R grows;
- the degree the Taylor polynomial needs (by its error bound) for a fixed per-entry error `--eps` on [-beta, beta],
  and the degree g* it needs for 1/L (the analysis' 1/poly(n)), and
  the rank it costs, C(d + g*, g*) with d = round(ln L) (the analysis' d = O(log n)), as an exponent of L: below 1
  the low-rank form is cheaper than the L x L attention matrix, at and above 1 it is not. Where that exponent
  crosses 1 is the turn; plotted against rho = R / sqrt(ln L) the turns of all n fall together.

The bundled VAR models go on the same axes (R = sqrt(beta) of each layer's measured logit bound, `pargen analyze
var`, on MNIST test images): where their layers sit relative to the turn.

    python benchmarks/lowrank_threshold.py --json docs/lowrank_threshold.json --plot docs/lowrank_threshold.png
    python benchmarks/lowrank_threshold.py --plot docs/lowrank_threshold.png --from docs/lowrank_threshold.json
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from pargen.evaluation.bench import write_json
from pargen.evaluation.lowrank import block_mask, pyramid
from pargen.nn import lowrank as LR

TARGET = "1/L"  # per-entry relative error the degree must reach (the analysis' 1/poly(n))


def degree_needed(beta: float, eps: float) -> int:
    """Smallest degree g whose Taylor polynomial of exp has relative error at most eps on [-beta, beta], by its
    bound (`nn.lowrank.taylor_bound`; a float64 polynomial cannot even represent a 1/L relative error at -beta
    once e^{2 beta} exceeds 1e16, so the bound, not a measurement, decides)."""
    g = 1
    while LR.taylor_bound(g, beta) > eps:
        g += 1
    return g


def rank_exponent(degree: int, tokens: int) -> tuple[int, float]:
    d = max(2, round(math.log(tokens)))
    r = math.comb(d + degree, degree)
    return d, math.log(r) / math.log(tokens)


@torch.no_grad()
def synthetic_error(side: int, R: float, spec: LR.PolySpec, head_dim: int, seed: int = 0) -> tuple[float, float]:
    """(measured relative error of the attention output, measured logit bound) on one synthetic head."""
    blocks = [p * p for p in pyramid(side)]
    L = sum(blocks)
    g = torch.Generator().manual_seed(seed)
    q, k = (R * (torch.randint(0, 2, (1, 1, L, head_dim), generator=g) * 2 - 1).double() for _ in range(2))
    v = torch.randn(1, 1, L, head_dim, generator=g, dtype=torch.float64)
    scale = 1.0 / head_dim  # logits q.k / d: |logit| <= R^2
    exact = F.scaled_dot_product_attention(q, k, v, attn_mask=block_mask(blocks), scale=scale)
    approx = LR.poly_attention(q, k, v, scale, spec, blocks)
    err = ((approx - exact).norm() / exact.norm()).item()
    return err, float(LR.head_bounds(q, k, scale)[0])


def turn(rows: list[dict]) -> float | None:
    """rho where the rank exponent first reaches 1 (linear interpolation between the grid points)."""
    for a, b in zip(rows, rows[1:]):
        if a["rank_exponent"] < 1 <= b["rank_exponent"]:
            t = (1 - a["rank_exponent"]) / (b["rank_exponent"] - a["rank_exponent"])
            return a["rho"] + t * (b["rho"] - a["rho"])
    return None


def bundled_layers(names: list[str], spec: LR.PolySpec, images: int, eps: float) -> list[dict]:
    """Every layer and head of the bundled VAR models: R = sqrt(logit bound), its rho, the degree it needs for
    1/L and the measured error of `spec` (the model's own head dimension)."""
    import pargen
    from pargen import data
    from pargen.evaluation import lowrank as EL

    out = []
    for name in names:
        pipe = pargen.load(name)
        ds = data.load(pipe.meta.get("data") or "mnist", "test", pipe.meta.get("size"))
        x, y = ds.float(slice(0, images)), ds.labels[:images]
        rep = EL.analyze(pipe.model, pipe.tokenizer, x, y, [spec], max_err=1.0)
        L = rep["tokens"]
        for row in rep["layers"]:
            for h, beta in enumerate(row["logit_bound"]):
                R = math.sqrt(beta)
                g = degree_needed(beta, 1 / L)
                out.append({"model": name, "layer": row["layer"], "head": h, "tokens": L, "beta": beta, "R": R,
                            "rho": R / math.sqrt(math.log(L)), "degree_needed": g,
                            "degree_needed_fixed_error": degree_needed(beta, eps),
                            "rank_exponent": rank_exponent(g, L)[1],
                            "error_fixed_degree": row["errors"][f"{spec.kind}{spec.degree}"]["measured"][h]})
    return out


def run(args) -> dict:
    spec = LR.PolySpec(args.degree, args.kind)
    res = {"what": "low-rank threshold on synthetic VAR attention (benchmarks/lowrank_threshold.py)",
           "fixed": {"degree": args.degree, "kind": args.kind, "head_dim": args.head_dim}, "target": TARGET,
           "fixed_error": args.eps,
           "paper": {"threshold": "R = o(sqrt(log n)) -> n^(2+o(1)); R = Omega(sqrt(log n)) -> no sub-quartic "
                                  "algorithm under SETH", "source": "arXiv 2501.04377"}, "curves": []}
    for side in args.sides:
        L = sum(p * p for p in pyramid(side))
        rows = []
        for rho in args.rhos:
            R = rho * math.sqrt(math.log(L))
            err, beta = synthetic_error(side, R, spec, args.head_dim) if L <= args.max_tokens else (None, R * R)
            g = degree_needed(R * R, 1 / L)
            d, e = rank_exponent(g, L)
            rows.append({"R": R, "rho": rho, "beta": beta, "error_fixed_degree": err,
                         "entry_bound_fixed_degree": LR.exp_poly_error(spec, R * R),
                         "degree_needed_fixed_error": degree_needed(R * R, args.eps), "degree_needed": g,
                         "rank_dim": d, "rank_exponent": e})
        res["curves"].append({"side": side, "tokens": L, "sqrt_log_L": math.sqrt(math.log(L)), "rows": rows,
                              "turn_rho": turn(rows)})
        t = res["curves"][-1]["turn_rho"]
        print(f"side {side:4d} ({L:6d} tokens): rank exponent reaches 1 at rho = "
              + (f"{t:.3f}" if t is not None else "beyond the grid"))
    res["layers"] = bundled_layers(args.models, spec, args.images, args.eps) if args.models else []
    for r in res["layers"]:
        print(f"{r['model']} layer {r['layer']} head {r['head']}: rho {r['rho']:.3f}, degree needed "
              f"{r['degree_needed']}, {spec.kind}{spec.degree} error {r['error_fixed_degree']:.4f}")
    return res


def plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    f = res["fixed"]
    for i, c in enumerate(res["curves"]):
        xs = [r["rho"] for r in c["rows"]]
        lab = f"n = {c['side']} (L = {c['tokens']})"
        if c["rows"][0]["error_fixed_degree"] is not None:
            axes[0].semilogy(xs, [r["error_fixed_degree"] for r in c["rows"]], "o-", ms=3, color=f"C{i}", label=lab)
        axes[1].plot(xs, [r["degree_needed_fixed_error"] for r in c["rows"]], "o-", ms=3, color=f"C{i}", label=lab)
        axes[2].plot(xs, [r["degree_needed"] / math.log(c["tokens"]) for r in c["rows"]], "o-", ms=3, color=f"C{i}",
                     label=lab)
        axes[3].plot(xs, [r["rank_exponent"] for r in c["rows"]], "o-", ms=3, color=f"C{i}", label=lab)
        if c["turn_rho"] is not None:
            axes[3].axvline(c["turn_rho"], color=f"C{i}", ls=":", lw=1)
    for m, marker in zip(sorted({r["model"] for r in res["layers"]}), "sDv^"):
        rs = [r for r in res["layers"] if r["model"] == m]
        kw = dict(marker=marker, ls="none", color="k", ms=6, mfc="none", label=f"{m} (layers x heads)")
        axes[0].semilogy([r["rho"] for r in rs], [max(r["error_fixed_degree"], 1e-12) for r in rs], **kw)
        axes[1].plot([r["rho"] for r in rs], [r["degree_needed_fixed_error"] for r in rs], **kw)
        axes[2].plot([r["rho"] for r in rs], [r["degree_needed"] / math.log(r["tokens"]) for r in rs], **kw)
        axes[3].plot([r["rho"] for r in rs], [r["rank_exponent"] for r in rs], **kw)
    axes[3].axhline(1, color="k", lw=1)
    axes[0].set_ylabel(f"attention-output error, {f['kind']} degree {f['degree']} (d = {f['head_dim']})")
    axes[1].set_ylabel(f"Taylor degree needed for error {res['fixed_error']:g}")
    axes[2].set_ylabel("Taylor degree needed for error 1/L, / ln L")
    axes[3].set_ylabel("log rank / log L (1: no cheaper than exact)")
    for ax in axes:
        ax.set_xlabel("rho = R / sqrt(ln L)")
        ax.grid(True, which="both", alpha=0.3)
    axes[3].legend(fontsize=7)
    fig.suptitle("Low-rank VAR attention against the entry bound R (synthetic heads; bundled VAR layers in black)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sides", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256], help="final token-map sides n")
    p.add_argument("--max-tokens", type=int, default=12000,
                   help="measure the fixed-degree error only up to this many tokens (the exact L x L attention)")
    p.add_argument("--rhos", type=float, nargs="+",
                   default=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2, 1.4, 1.7, 2.0])
    p.add_argument("--degree", type=int, default=3)
    p.add_argument("--eps", type=float, default=1e-3, help="the fixed per-entry error of the second panel")
    p.add_argument("--kind", choices=LR.KINDS, default="chebyshev")
    p.add_argument("--head-dim", type=int, default=8)
    p.add_argument("--models", nargs="*", default=["var-mnist", "var-mnist-lowrank"])
    p.add_argument("--images", type=int, default=16, help="test images teacher-forced through each bundled model")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument("--from", dest="source", default=None, help="plot an earlier --json instead of running")
    args = p.parse_args()
    res = json.loads(Path(args.source).read_text()) if args.source else run(args)
    if args.json and not args.source:
        write_json(res, args.json)
        print(f"json: {args.json}")
    if args.plot:
        plot(res, args.plot)


if __name__ == "__main__":
    main()
