"""Parallel Picard rounds against the dimension d, on a Gaussian target whose score is known exactly.

Chen, Ren, Ying and Rotskoff (arXiv 2405.15986) prove that block Picard sampling needs poly-logarithmically many
sequential rounds in d, where a sequential sampler needs a number of steps polynomial in d. Here no network
error can hide the effect: the target is a Gaussian N(0, diag(sigma^2)) in R^d (variances log-spaced in
[`--var-min`, 1], cycled over the coordinates), so the noise predictor is exact and linear,
eps(x, t) = sqrt(1 - ab_t) x / (ab_t sigma^2 + 1 - ab_t), and a deterministic sampler's output is exactly
alpha * x_T per coordinate: Gaussian, with a KL divergence to the target in closed form,
KL = sum_k (alpha_k^2 / sigma_k^2 - 1 - log(alpha_k^2 / sigma_k^2)) / 2. The samplers are pargen's own
(`pargen.samplers.diffusion.sample`) on a fine VP grid (linear beta 0.1 -> 20 over `--train-steps` levels):
the probability-flow ODE by Heun steps (`ode`) and by Euler steps (`ddim`, eta 0), and the SDE's ancestral
sampler (`ddpm`), whose output is Gaussian too, with a variance found exactly by probing its linear map
(`sde_variance`).

Per d (2 to 16,384): the fewest steps N(d) the sequential sampler needs for KL <= `--kl`, then block Picard on
the grid of N(d, kl / 2) steps, cut into `--blocks` blocks (the same count for every d: blocks of fixed length
in time, as in the paper), with the fewest sweeps K per block that bring the KL to `--kl` (searched, like
`pargen calibrate` searches its tolerance). Rounds are sequential model calls (Heun: two per step). Fits:
N = c d^a, and rounds = c (ln d)^b beside rounds = c d^a.

    python benchmarks/picard_dimension.py --json docs/picard_dimension.json --plot docs/picard_dimension.png
    python benchmarks/picard_dimension.py --samplers ddpm --update --json docs/picard_dimension.json
    python benchmarks/picard_dimension.py --plot docs/picard_dimension.png --from docs/picard_dimension.json
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from pargen.evaluation.bench import power_fit, write_json
from pargen.samplers import diffusion as D


def vp_alphas(train_steps: int, beta_min: float = 0.1, beta_max: float = 20.0) -> torch.Tensor:
    """alpha-bar of the continuous linear VP schedule at s = (t + 1) / T, t = 0..T-1 (float64)."""
    s = torch.arange(1, train_steps + 1, dtype=torch.float64) / train_steps
    return torch.exp(-(beta_min * s + (beta_max - beta_min) * s * s / 2))


class Gaussian:
    """N(0, diag(sigma^2)) in R^d, stored as its distinct variances and how many coordinates hold each."""

    def __init__(self, d: int, var_min: float, classes: int):
        g = min(d, classes)
        self.var = torch.logspace(math.log10(var_min), 0, g, dtype=torch.float64)
        self.count = torch.tensor([len(range(i, d, g)) for i in range(g)], dtype=torch.float64)
        self.d = d

    def eps(self, acp: torch.Tensor):
        def predict(x, t, y=None):
            ab = acp[t].view(-1, 1)
            return (1 - ab).sqrt() * x / (ab * self.var + 1 - ab)
        return predict

    def kl(self, alpha: torch.Tensor) -> float:
        """KL of N(0, diag(alpha^2)) (alpha per class) to the target."""
        return self.kl_var(alpha.square())

    def kl_var(self, var: torch.Tensor) -> float:
        """KL of N(0, diag(var)) (var per class) to the target."""
        r = var / self.var
        return float((self.count * (r - 1 - r.log()) / 2).sum())


def run_sampler(target: Gaussian, acp, kind: str, n: int, method: str = "sequential", blocks: int = 1,
                sweeps: int | None = None) -> tuple[float, int]:
    """(KL of the output to the target, sequential model calls) of one run."""
    steps = D.make_steps(acp, n, kind)
    kw = {"method": method} if method == "sequential" else {
        "method": method, "block": -(-n // blocks), "sweeps": sweeps, "tol": 0.0}
    if kind == "ddpm":
        var, rounds = sde_variance(target.eps(acp), steps, len(target.var), **kw)
        return target.kl_var(var), rounds
    x_T = torch.ones(1, len(target.var), dtype=torch.float64)
    out = D.sample(target.eps(acp), x_T, steps, **kw)
    return target.kl(out.x[0]), out.rounds


def sde_variance(eps, steps: D.Steps, g: int, chunk: int = 64, **kw) -> tuple[torch.Tensor, int]:
    """(output variance of each of g coordinates, sequential model calls) of pargen's DDPM sampler, exactly.

    With an exact linear score the sampler (sequential, or block Picard with a fixed number of sweeps) is a
    linear map of (x_T, xi_1..xi_N): x_0 = alpha x_T + sum_k c_k xi_k per coordinate, so its output is Gaussian
    with variance alpha^2 + sum_k c_k^2. One run with x_T = 1 and no noise gives alpha; runs whose sample j has
    x_T = 0 and unit noise at step j only give the c_k (`chunk` probes per run; the cost grows as N^2)."""
    n = steps.n
    one = D.sample(eps, torch.ones(1, g, dtype=torch.float64), steps,
                   noise=torch.zeros(1, n, g, dtype=torch.float64), **kw)
    var = one.x[0].square()
    noisy = (steps.s > 0).nonzero().flatten()
    for lo in range(0, len(noisy), chunk):
        k = noisy[lo: lo + chunk]
        noise = torch.zeros(len(k), n, g, dtype=torch.float64)
        noise[torch.arange(len(k)), k] = steps.s[k].view(-1, 1)
        out = D.sample(eps, torch.zeros(len(k), g, dtype=torch.float64), steps, noise=noise, **kw)
        var = var + out.x.square().sum(0)
    return var, one.rounds


def sde_variance_recursion(target: Gaussian, acp, n: int) -> torch.Tensor:
    """The sequential DDPM sampler's output variance by its one-line recursion, v <- m_i^2 v + s_i^2 with
    m_i = a_i + b_i eps_i(1) (the step's gain on a linear score): O(N), for the search of N(d); `sde_variance`
    gives the same numbers through pargen's sampler (tested)."""
    steps = D.make_steps(acp, n, "ddpm")
    gain = target.eps(acp)(torch.ones(n, len(target.var), dtype=torch.float64), steps.t)
    m = steps.a.view(-1, 1) + steps.b.view(-1, 1) * gain
    v = torch.ones(len(target.var), dtype=torch.float64)
    for i in range(n):
        v = m[i].square() * v + steps.s[i] ** 2
    return v


def kl_of(target: Gaussian, acp, kind: str, n: int) -> float:
    """KL of the sequential n-step sampler's output (closed form for every sampler)."""
    if kind == "ddpm":
        return target.kl_var(sde_variance_recursion(target, acp, n))
    return run_sampler(target, acp, kind, n)[0]


def fewest_steps(target: Gaussian, acp, kind: str, kl: float) -> int:
    """Smallest N with KL(sequential N-step sampler) <= kl (doubling, then bisection; the KL falls with N)."""
    hi = 1
    while kl_of(target, acp, kind, hi) > kl:
        hi *= 2
        if hi > len(acp):
            raise SystemExit(f"d = {target.d}: more than {len(acp)} steps needed; raise --train-steps")
    lo = hi // 2 + 1 if hi > 1 else 1
    while lo < hi:
        mid = (lo + hi) // 2
        if kl_of(target, acp, kind, mid) <= kl:
            hi = mid
        else:
            lo = mid + 1
    return hi


def fewest_sweeps(target: Gaussian, acp, kind: str, n: int, blocks: int, kl: float) -> tuple[int, float, int]:
    """(K, KL, rounds) of block Picard with the fewest sweeps per block reaching kl (K = the block length is the
    sequential answer, so a K always exists)."""
    block = -(-n // blocks)
    for k in range(1, block + 1):
        got, rounds = run_sampler(target, acp, kind, n, "block", blocks, k)
        if got <= kl:
            return k, got, rounds
    raise AssertionError("block Picard with as many sweeps as steps must equal the sequential sampler")


def run(args) -> dict:
    acp = vp_alphas(args.train_steps)
    res = {"what": "Picard rounds vs dimension, exact Gaussian score (benchmarks/picard_dimension.py)",
           "kl_target": args.kl, "blocks": args.blocks, "var_min": args.var_min, "classes": args.classes,
           "train_steps": args.train_steps,
           "paper": {"claim": "block Picard: O~(poly log d) sequential rounds; sequential: poly(d) steps "
                              "(bounds O~(d) SDE, O~(sqrt d) ODE)", "source": "arXiv 2405.15986"},
           "samplers": {}}
    for kind in args.samplers:
        rows = []
        for d in args.dims:
            target = Gaussian(d, args.var_min, args.classes)
            n_seq = fewest_steps(target, acp, kind, args.kl)
            # DDPM: the O(N) recursion (equal to the sampler, tested); the others: the sampler itself
            kl_seq, calls_seq = (kl_of(target, acp, kind, n_seq), n_seq) if kind == "ddpm" else \
                run_sampler(target, acp, kind, n_seq)
            row = {"d": d, "sequential_steps": n_seq, "sequential_calls": calls_seq, "sequential_kl": kl_seq}
            msg = f"{kind} d = {d:6d}: sequential {n_seq:5d} steps ({calls_seq} calls, KL {kl_seq:.2e})"
            if kind != "ddpm" or d <= args.sde_picard_max_d:
                n_grid = fewest_steps(target, acp, kind, args.kl / 2)
                k, kl_par, rounds = fewest_sweeps(target, acp, kind, n_grid, args.blocks, args.kl)
                row.update({"picard_grid_steps": n_grid, "picard_sweeps": k, "picard_rounds": rounds,
                            "picard_kl": kl_par})
                msg += (f"; block Picard on {n_grid} steps, {args.blocks} blocks x {k} sweeps = {rounds} rounds "
                        f"(KL {kl_par:.2e})")
            rows.append(row)
            print(msg, flush=True)
        ds = [r["d"] for r in rows]
        par = [r for r in rows if "picard_rounds" in r]
        res["samplers"][kind] = {
            "rows": rows,
            "fit_sequential_calls_vs_d": power_fit(ds, [r["sequential_calls"] for r in rows]),
            "fit_picard_rounds_vs_d": power_fit([r["d"] for r in par], [r["picard_rounds"] for r in par]),
            "fit_picard_rounds_vs_log_d": power_fit([math.log(r["d"]) for r in par],
                                                    [r["picard_rounds"] for r in par])}
        f = res["samplers"][kind]
        print(f"{kind}: sequential calls ~ d^{f['fit_sequential_calls_vs_d']['exponent']:.3f}; Picard rounds ~ "
              f"d^{f['fit_picard_rounds_vs_d']['exponent']:.3f} or (ln d)^"
              f"{f['fit_picard_rounds_vs_log_d']['exponent']:.3f}")
    return res


def plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for i, (kind, s) in enumerate(res["samplers"].items()):
        ds = [r["d"] for r in s["rows"]]
        fs, fp = s["fit_sequential_calls_vs_d"], s["fit_picard_rounds_vs_log_d"]
        axes[0].loglog(ds, [r["sequential_calls"] for r in s["rows"]], "o-", color=f"C{i}",
                       label=f"{kind} sequential (~ d^{fs['exponent']:.2f})")
        par = [r for r in s["rows"] if "picard_rounds" in r]
        axes[0].loglog([r["d"] for r in par], [r["picard_rounds"] for r in par], "s--", color=f"C{i}",
                       label=f"{kind} block Picard (~ (ln d)^{fp['exponent']:.2f})")
        axes[1].plot([math.log(r["d"]) for r in par], [r["picard_rounds"] for r in par], "s--", color=f"C{i}",
                     label=f"{kind} block Picard")
        for r in par:
            axes[1].annotate(f"K={r['picard_sweeps']}", (math.log(r["d"]), r["picard_rounds"]), fontsize=7,
                             xytext=(2, 4), textcoords="offset points", color=f"C{i}")
    axes[0].set_xlabel("dimension d")
    axes[0].set_ylabel(f"sequential model calls to KL <= {res['kl_target']:g}")
    axes[1].set_xlabel("ln d")
    axes[1].set_ylabel(f"block Picard rounds ({res['blocks']} blocks x K sweeps)")
    axes[1].set_ylim(bottom=0)
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Gaussian target, exact score: sequential steps vs block Picard rounds ({res['blocks']} blocks)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dims", type=int, nargs="+", default=[2, 8, 32, 128, 512, 2048, 8192, 16384])
    p.add_argument("--samplers", nargs="+", choices=["ode", "ddim", "ddpm"], default=["ode", "ddim", "ddpm"],
                   help="ode: Heun probability-flow ODE; ddim: its Euler step; ddpm: the SDE (ancestral) sampler")
    p.add_argument("--sde-picard-max-d", type=int, default=128,
                   help="block Picard of the SDE only up to this d: its exact output variance takes one probe per "
                        "noise step (cost ~ N^2); its sequential N(d) is computed for every d")
    p.add_argument("--update", action="store_true",
                   help="keep the samplers of an existing --json that this run does not compute (same settings)")
    p.add_argument("--kl", type=float, default=0.01, help="KL target (nats) for every sampler and d")
    p.add_argument("--blocks", type=int, default=8, help="block Picard blocks (the same for every d)")
    p.add_argument("--var-min", type=float, default=0.01, help="smallest coordinate variance of the target")
    p.add_argument("--classes", type=int, default=64, help="distinct variances (cycled over the coordinates)")
    p.add_argument("--train-steps", type=int, default=2**20,
                   help="levels of the discrete VP schedule: many more than the steps, so that the grid's integer "
                        "spacing T // N does not jump")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument("--from", dest="source", default=None, help="plot an earlier --json instead of running")
    args = p.parse_args()
    res = json.loads(Path(args.source).read_text()) if args.source else run(args)
    if args.update and args.json and not args.source and Path(args.json).exists():
        old = json.loads(Path(args.json).read_text())
        same = ("kl_target", "blocks", "var_min", "classes", "train_steps")
        if any(old.get(k) != res[k] for k in same):
            raise SystemExit(f"--update: {args.json} was made with other settings ({', '.join(same)})")
        res["samplers"] = {**{k: v for k, v in old["samplers"].items() if k not in res["samplers"]},
                           **res["samplers"]}
    if args.json and not args.source:
        write_json(res, args.json)
        print(f"json: {args.json}")
    if args.plot:
        plot(res, args.plot)


if __name__ == "__main__":
    main()
