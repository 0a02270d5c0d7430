"""Parallel Picard rounds against the dimension d, on a Gaussian and a Gaussian mixture whose scores are exact.

Chen, Ren, Ying and Rotskoff (arXiv 2405.15986) prove that block Picard sampling needs poly-logarithmically many
sequential rounds in d, where a sequential sampler needs a number of steps polynomial in d. Here no network
error can hide the effect: the target is a Gaussian N(0, diag(sigma^2)) in R^d (variances log-spaced in
[`--var-min`, 1], cycled over the coordinates), so the noise predictor is exact and linear,
eps(x, t) = sqrt(1 - ab_t) x / (ab_t sigma^2 + 1 - ab_t), and a deterministic sampler's output is exactly
alpha * x_T per coordinate: Gaussian, with a KL divergence to the target in closed form,
KL = sum_k (alpha_k^2 / sigma_k^2 - 1 - log(alpha_k^2 / sigma_k^2)) / 2. The samplers are pargen's own
(`pargen.samplers.diffusion.sample`) on a fine VP grid (linear beta 0.1 -> 20 over `--train-steps` levels):
the probability-flow ODE by Heun steps (`ode`) and by Euler steps (`ddim`, eta 0), and the SDE's ancestral
sampler (`ddpm`), whose output is Gaussian too, with a variance found exactly as the gradient of its linear map
(`sde_variance`).

Per d (2 to 16,384): the fewest steps N(d) the sequential sampler needs for KL <= `--kl`, then block Picard on
the grid of N(d, kl / 2) steps, cut into `--blocks` blocks (the same count for every d: blocks of fixed length
in time, as in the paper), with the fewest sweeps K per block that bring the KL to `--kl` (searched, like
`pargen calibrate` searches its tolerance). Rounds are sequential model calls (Heun: two per step). Fits:
N = c d^a, and rounds = c (ln d)^b beside rounds = c d^a.

The mixture (`Mixture`: d copies of a two-mode 1-D mixture, a mixture of 2^d Gaussians in R^d) repeats this
with a W2 target in R^d (`--w2`). Its score is separable, so W2^2 in R^d is d times a 1-D W2^2, computed, not
sampled: by quadrature for the ODE samplers (their 1-D output is a monotone map of x_T) and through the SDE
sampler's law carried on a grid (`sde_law_w2`); the two-sample estimate against exact draws is shown beside both
(`--check-values`, and `--sde-values` draws per step count of `--sde-grid`). Block Picard on the SDE is judged by
its coupled distance to the sequential sampler on the same randomness (`sde_mixture`).

    python benchmarks/picard_dimension.py --json docs/picard_dimension.json --plot docs/picard_dimension.png
    python benchmarks/picard_dimension.py --samplers ddpm --update --json docs/picard_dimension.json
    python benchmarks/picard_dimension.py --targets mixture --update --json docs/picard_dimension.json
    python benchmarks/picard_dimension.py --plot docs/picard_dimension.png --from docs/picard_dimension.json
"""
from __future__ import annotations

import argparse
import copy
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


    def start(self) -> torch.Tensor:
        """x_T of the deterministic samplers' one run: their output is alpha * x_T, so x_T = 1 gives alpha."""
        return torch.ones(1, len(self.var), dtype=torch.float64)

    def error(self, x: torch.Tensor) -> float:
        return self.kl(x)


class Mixture:
    """The product of d identical 1-D mixtures w N(m_1, s^2) + (1 - w) N(m_2, s^2), mean zero (m_1 = -(1 - w) sep,
    m_2 = w sep): a mixture of 2^d Gaussians in R^d whose score is exact and separable (each coordinate's noise
    prediction needs that coordinate only). Mean zero, so that the sampler's N(0, 1) start misses the noised
    target by second-order terms only, as for the Gaussian.

    So a sampler's output is a product of d identical 1-D laws and, for the quadratic cost, W2^2 in R^d is d times
    the 1-D W2^2 (the product of the coordinates' optimal couplings is optimal); n samples of R^d are n * d draws
    of the 1-D law. For the deterministic samplers the 1-D output is a monotone map of x_T, so its W2 to the target
    is exact by quadrature over x_T: W2^2 = int (T_N(z) - Q(Phi(z)))^2 phi(z) dz with Q the target's quantile
    function (the trapezoid rule on `nodes` points of [-`z_max`, `z_max`], spectrally accurate here)."""

    def __init__(self, d: int, sep: float = 2.0, s: float = 0.5, w: float = 0.3, nodes: int = 4001,
                 z_max: float = 7.5):
        self.d, self.sep, self.s, self.w = d, sep, s, w
        self.z = torch.linspace(-z_max, z_max, nodes, dtype=torch.float64)
        self.weight = (self.z[1] - self.z[0]) * torch.exp(-self.z.square() / 2) / math.sqrt(2 * math.pi)
        self.q = self.quantile_of_normal(self.z)
        self.cache: dict = {}  # d-independent results (the 1-D error of a step count), shared by `like`

    def like(self, d: int) -> "Mixture":
        """The same 1-D mixture in R^d, sharing this one's quadrature and cache."""
        other = copy.copy(self)
        other.d = d
        return other

    def memo(self, key, compute):
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]

    def means(self, w):
        return -(1 - w) * self.sep, w * self.sep

    def eps(self, acp: torch.Tensor):
        (m1, m2), w = self.means(self.w), self.w

        def predict(x, t, y=None):
            ab = acp[t].view(-1, 1)
            v = ab * self.s ** 2 + 1 - ab  # each component's variance at level t
            logit = (ab.sqrt() * (m2 - m1) * x - ab * (m2 ** 2 - m1 ** 2) / 2) / v + math.log((1 - w) / w)
            m = m1 + (m2 - m1) * torch.sigmoid(logit)  # E[component mean | x_t]
            return (1 - ab).sqrt() * (x - ab.sqrt() * m) / v
        return predict

    def cdf(self, x: torch.Tensor, w: float | torch.Tensor | None = None) -> torch.Tensor:
        w = self.w if w is None else w
        m1, m2 = self.means(w)
        return w * normal_cdf((x - m1) / self.s) + (1 - w) * normal_cdf((x - m2) / self.s)

    def quantile_of_normal(self, z: torch.Tensor) -> torch.Tensor:
        """Q(Phi(z)) by bisection, each side in its own tail (the upper one through the mirrored mixture, which
        is this one with w and 1 - w swapped), so that no probability near 1 loses its digits."""
        u = normal_cdf(-z.abs())
        w = torch.where(z <= 0, torch.tensor(self.w, dtype=torch.float64), 1 - self.w)
        lo = torch.full_like(z, -self.sep - 12 * self.s)
        hi = torch.full_like(z, self.sep + 12 * self.s)
        for _ in range(100):
            mid = (lo + hi) / 2
            below = self.cdf(mid, w) < u
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        x = (lo + hi) / 2
        return torch.where(z <= 0, x, -x)

    def exact(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """n exact draws of the 1-D target."""
        m1, m2 = self.means(self.w)
        first = (torch.rand(n, generator=gen, dtype=torch.float64) < self.w).double()
        return m2 + (m1 - m2) * first + self.s * torch.randn(n, generator=gen, dtype=torch.float64)

    def start(self) -> torch.Tensor:
        return self.z.view(1, -1)

    def error(self, x: torch.Tensor) -> float:
        """W2^2 in R^d of the deterministic output x = T_N(z) on the quadrature nodes."""
        if not bool((x[1:] > x[:-1]).all()):
            raise ValueError("the sampler's 1-D map is not increasing: its W2 is not given by the quantile coupling")
        return self.d * float((self.weight * (x - self.q).square()).sum())


def normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Phi by erfc: accurate in the lower tail, where torch.special.ndtr is off by 3e-4 (relative) at -7.5."""
    return torch.special.erfc(-x / math.sqrt(2)) / 2


def two_sample_w2(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, e: torch.Tensor, groups: int = 8
                  ) -> tuple[float, float]:
    """(estimate, noise) of the 1-D W2^2 between the laws of samples a and b: in each of `groups` disjoint groups
    the W2^2 of the empirical laws (sorted differences) minus that of two exact sample sets c, e of the same size
    (which removes the estimator's O(1/n) bias when a's law is near b's); mean and standard error over groups."""
    est = []
    for g in range(groups):
        part = [v[g::groups].sort().values for v in (a, b, c, e)]
        est.append(float((part[0] - part[1]).square().mean() - (part[2] - part[3]).square().mean()))
    t = torch.tensor(est, dtype=torch.float64)
    return float(t.mean()), float(t.std() / math.sqrt(groups))


def draws(target: Mixture, acp, kind: str, n: int, values: int, seed: int, chunk: int = 2**14,
          **kw) -> tuple[torch.Tensor, int]:
    """(`values` draws of the sampler's 1-D output law, sequential model calls): pargen's sampler on x_T and step
    noises from pargen's `draw` (seeded `seed`, `seed + 1`, ... per chunk of `chunk` coordinates, so that two
    methods given the same seed see the same randomness); `values / d` samples of R^d."""
    steps, out, rounds = D.make_steps(acp, n, kind), [], 0
    for i, lo in enumerate(range(0, values, chunk)):
        x_T, noise = D.draw([seed + i], (min(chunk, values - lo),), steps, dtype=torch.float64)
        res = D.sample(target.eps(acp), x_T, steps, noise=noise, **kw)
        out.append(res.x[0].clone())  # x is a view of the whole trajectory
        rounds = res.rounds
    return torch.cat(out), rounds


def run_sampler(target: Gaussian | Mixture, acp, kind: str, n: int, method: str = "sequential", blocks: int = 1,
                sweeps: int | None = None) -> tuple[float, int]:
    """(error of the output to the target: KL for the Gaussian, W2^2 for the mixture; sequential model calls)
    of one run."""
    steps = D.make_steps(acp, n, kind)
    kw = {"method": method} if method == "sequential" else {
        "method": method, "block": -(-n // blocks), "sweeps": sweeps, "tol": 0.0}
    if kind == "ddpm":
        if not isinstance(target, Gaussian):
            raise ValueError("the SDE's error on the mixture is a two-sample estimate (see `sde_mixture`)")
        var, rounds = sde_variance(target.eps(acp), steps, len(target.var), **kw)
        return target.kl_var(var), rounds
    out = D.sample(target.eps(acp), target.start(), steps, **kw)
    return target.error(out.x[0]), out.rounds


def sde_variance(eps, steps: D.Steps, g: int, **kw) -> tuple[torch.Tensor, int]:
    """(output variance of each of g coordinates, sequential model calls) of pargen's DDPM sampler, exactly.

    With an exact linear score the sampler (sequential, or block Picard with a fixed number of sweeps) is a
    linear map of (x_T, xi_1..xi_N): x_0 = alpha x_T + sum_k c_k s_k xi_k per coordinate, so its output is
    Gaussian with variance alpha^2 + sum_k c_k^2 s_k^2. The coefficients are the gradient of the output with
    respect to x_T and the step noises, at any point (the map is linear): one run of pargen's sampler, kept
    differentiable, and one backward pass; the tests check them against probes of the map, one unit noise at a
    time."""
    x_T, noise = D.draw([0], (g,), steps, dtype=torch.float64)
    x_T.requires_grad_()
    noise.requires_grad_()
    out = D.sample(eps, x_T, steps, noise=noise, differentiable=True, **kw)
    out.x.sum().backward()  # coordinates are independent: the sum's gradient holds each one's coefficients
    var = x_T.grad[0].square() + (noise.grad[0] * steps.s.view(-1, 1)).square().sum(0)
    return var.detach(), out.rounds


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


def kl_of(target: Gaussian | Mixture, acp, kind: str, n: int) -> float:
    """Error of the sequential n-step sampler's output: the Gaussian's KL in closed form for every sampler, the
    mixture's W2^2 by quadrature (the SDE's through its law on a grid, `sde_law_w2`)."""
    if kind == "ddpm":
        if isinstance(target, Mixture):
            return target.d * target.memo(("ddpm", n), lambda: sde_law_w2(target, acp, n))
        return target.kl_var(sde_variance_recursion(target, acp, n))
    return run_sampler(target, acp, kind, n)[0]


def sde_law_w2(target: Mixture, acp, n: int, h: float = 1e-3, half_width: float = 8.0) -> float:
    """The 1-D W2^2 to the target of the law of pargen's sequential n-step DDPM sampler, computed, not sampled.

    The law is carried on a grid of spacing h: each step moves every grid mass through the step's deterministic
    part, pargen's own (`PicardOperator.step`), spreads it onto the grid with quadratic weights (which keep its
    mass, mean and variance), and convolves with the step's Gaussian noise (a three-point kernel of the same
    variance where it is narrower than the grid). The last step adds no noise and is monotone, so the output's
    quantiles are that step applied to the quantiles of the law before it, and W2 follows by the quadrature of
    `Mixture.error`. On the Gaussian (sep = 0) this matches the exact variance recursion to 2e-4 (relative) at
    4,096 steps (tested at fewer)."""
    steps = D.make_steps(acp, n, "ddpm")
    if float(steps.s[-1]) != 0 or not bool((steps.s[:-1] > 0).all()):
        raise ValueError("expected noise at every DDPM step but the last")
    x = torch.arange(-half_width, half_width + h / 2, h, dtype=torch.float64)
    G = len(x)
    op = D.PicardOperator(target.eps(acp), steps, x.view(-1, 1), None, None)

    def step(v, i):
        return op.step(v.view(-1, 1), torch.full((len(v),), i), torch.zeros(len(v), dtype=torch.int64)).view(-1)

    p = torch.exp(-x.square() / 2) * (h / math.sqrt(2 * math.pi))  # x_T ~ N(0, 1): the mass at each node
    for i in range(n - 1):
        pos = (step(x, i) + half_width) / h
        k = pos.round().long().clamp(1, G - 2)
        f = pos - k
        mass = torch.zeros_like(p).index_add_(0, k - 1, p * (f * f - f) / 2).index_add_(0, k, p * (1 - f * f)) \
            .index_add_(0, k + 1, p * (f * f + f) / 2)
        var = float(steps.s[i]) ** 2
        if var < h * h:
            w, ker = 1, torch.tensor([var / (2 * h * h), 1 - var / (h * h), var / (2 * h * h)], dtype=torch.float64)
        else:
            w = min(G - 1, math.ceil(9 * math.sqrt(var) / h))
            ker = torch.exp(-(torch.arange(-w, w + 1, dtype=torch.float64) * h).square() / (2 * var))
            ker = ker / ker.sum()
        size = 1 << (G + 2 * w).bit_length()
        p = torch.fft.irfft(torch.fft.rfft(mass, size) * torch.fft.rfft(ker, size), size)[w: w + G]
    p = p.clamp_min(0)
    p = p / p.sum()

    def quantile(cdf, nodes, u):  # the piecewise-linear cdf through (nodes, cdf), inverted at u
        cdf = cdf.cummax(0).values
        j = torch.searchsorted(cdf, u).clamp(1, len(cdf) - 1)
        t = ((u - cdf[j - 1]) / (cdf[j] - cdf[j - 1]).clamp_min(1e-300)).clamp(0, 1)
        return nodes[j - 1] + t * (nodes[j] - nodes[j - 1])

    u = normal_cdf(-target.z.abs())  # each tail from its own side, as in `Mixture.quantile_of_normal`
    low = quantile(p.cumsum(0), x + h / 2, u)
    high = -quantile(p.flip(0).cumsum(0), -(x - h / 2).flip(0), u)
    return target.error(step(torch.where(target.z <= 0, low, high), n - 1)) / target.d


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


def sde_mixture(base: Mixture, acp, args, log=print) -> dict:
    """The SDE on the mixture. Per d: the fewest sequential steps to W2 <= eps (exact, `sde_law_w2`), then block
    Picard on the grid of W2 <= eps / 2 with the fewest sweeps whose answer lies within W2 <= eps / 2 of the
    sequential one on the same x_T and noises (coupled over `--picard-values` draws; W2 <= eps by the triangle
    inequality). Beside it, the two-sample estimate at the step counts of `--sde-grid` (`--sde-values` draws
    against as many exact ones), with the exact value."""
    eps2, rows = args.w2 ** 2, []
    for d in args.dims:
        target = base.like(d)
        n = fewest_steps(target, acp, "ddpm", eps2)
        n_grid = fewest_steps(target, acp, "ddpm", eps2 / 4)
        seq, _ = draws(target, acp, "ddpm", n_grid, args.picard_values, seed=7, chunk=2**12)
        block = -(-n_grid // args.blocks)
        for k in range(1, block + 1):
            par, rounds = draws(target, acp, "ddpm", n_grid, args.picard_values, seed=7, chunk=2**12,
                                method="block", block=block, sweeps=k, tol=0.0)
            gap = d * float((par - seq).square().mean())  # coupled: W2^2(Picard, sequential) <= gap
            if gap <= eps2 / 4:
                break
        rows.append({"d": d, "sequential_steps": n, "sequential_calls": n,
                     "sequential_w2sq": kl_of(target, acp, "ddpm", n), "picard_grid_steps": n_grid,
                     "picard_sweeps": k, "picard_rounds": rounds, "picard_w2sq_to_sequential_bound": gap})
        log(f"ddpm (mixture) d = {d:6d}: sequential {n:5d} steps; block Picard on {n_grid} steps, {args.blocks} "
            f"blocks x {k} sweeps = {rounds} rounds (W2^2 to the sequential <= {gap:.2e})", flush=True)
    gen = torch.Generator().manual_seed(2024)
    exact = [base.exact(args.sde_values, gen) for _ in range(3)]
    grid = []
    for n in args.sde_grid:
        x, _ = draws(base, acp, "ddpm", n, args.sde_values, seed=1)
        e, noise = two_sample_w2(x, *exact)
        grid.append({"steps": n, "w2sq_per_coordinate": e, "noise": noise,
                     "exact": kl_of(base.like(1), acp, "ddpm", n)})
        log(f"ddpm (mixture), {n:5d} steps: per-coordinate W2^2 {e:.3e} +- {noise:.1e} (two-sample, "
            f"{args.sde_values:,} draws), {grid[-1]['exact']:.3e} exact", flush=True)
    return {"grid": grid, "rows": rows, **fits(rows), "values": args.sde_values,
            "picard_values": args.picard_values}


def fits(rows: list[dict]) -> dict:
    seq = [r for r in rows if r.get("sequential_calls")]
    par = [r for r in rows if "picard_rounds" in r]
    out = {"fit_sequential_calls_vs_d": power_fit([r["d"] for r in seq], [r["sequential_calls"] for r in seq])}
    if len(par) >= 2:
        out["fit_picard_rounds_vs_d"] = power_fit([r["d"] for r in par], [r["picard_rounds"] for r in par])
        out["fit_picard_rounds_vs_log_d"] = power_fit([math.log(r["d"]) for r in par],
                                                      [r["picard_rounds"] for r in par])
    return out


def scan(make, acp, kind: str, level: float, dims, blocks: int, name: str = "kl", check=None, log=print) -> dict:
    """Per d: the fewest sequential steps to error <= level, then block Picard on the grid of level / 2 with the
    fewest sweeps reaching level (`make(d)` builds the target, whose error is called `name` in the rows;
    `check(target, n)` adds fields to a row)."""
    rows = []
    for d in dims:
        target = make(d)
        n_seq = fewest_steps(target, acp, kind, level)
        # DDPM: the O(N) recursion (equal to the sampler, tested); the others: the sampler itself
        err, calls = (kl_of(target, acp, kind, n_seq), n_seq) if kind == "ddpm" else \
            run_sampler(target, acp, kind, n_seq)
        row = {"d": d, "sequential_steps": n_seq, "sequential_calls": calls, f"sequential_{name}": err}
        msg = f"{kind} d = {d:6d}: sequential {n_seq:5d} steps ({calls} calls, error {err:.2e})"
        n_grid = fewest_steps(target, acp, kind, level / 2)
        k, err_par, rounds = fewest_sweeps(target, acp, kind, n_grid, blocks, level)
        row.update({"picard_grid_steps": n_grid, "picard_sweeps": k, "picard_rounds": rounds,
                    f"picard_{name}": err_par})
        msg += (f"; block Picard on {n_grid} steps, {blocks} blocks x {k} sweeps = {rounds} rounds "
                f"(error {err_par:.2e})")
        if check is not None:
            row.update(check(target, n_seq))
        rows.append(row)
        log(msg, flush=True)
    return {"rows": rows, **fits(rows)}


def run(args) -> dict:
    acp = vp_alphas(args.train_steps)
    res = {"what": "Picard rounds vs dimension, exact scores (benchmarks/picard_dimension.py)",
           "kl_target": args.kl, "blocks": args.blocks, "var_min": args.var_min, "classes": args.classes,
           "train_steps": args.train_steps,
           "paper": {"claim": "block Picard: O~(poly log d) sequential rounds; sequential: poly(d) steps "
                              "(bounds O~(d) SDE, O~(sqrt d) ODE)", "source": "arXiv 2405.15986"},
           "samplers": {}}
    if "gaussian" in args.targets:
        for kind in args.samplers:
            res["samplers"][kind] = scan(lambda d: Gaussian(d, args.var_min, args.classes), acp, kind, args.kl,
                                         args.dims, args.blocks)
            report(kind, res["samplers"][kind])
    if "mixture" in args.targets:
        mix = {"sep": args.sep, "std": args.std, "weight": args.weight, "w2_target": args.w2,
               "check_values": args.check_values, "samplers": {}}
        gen = torch.Generator().manual_seed(99)

        def check(target: Mixture, n: int, kind: str) -> dict:
            """The exact W2^2 beside the two-sample estimate of `--check-values` draws (scaled by d)."""
            if target.d > args.check_max_d:
                return {}
            x, _ = draws(target, acp, kind, n, args.check_values, seed=3)
            e, noise = two_sample_w2(x, *(target.exact(args.check_values, gen) for _ in range(3)))
            return {"two_sample_w2sq": target.d * e, "two_sample_noise": target.d * noise}

        base = Mixture(1, args.sep, args.std, args.weight)
        for kind in args.samplers:
            if kind == "ddpm":
                mix["samplers"][kind] = sde_mixture(base, acp, args)
            else:
                mix["samplers"][kind] = scan(base.like, acp, kind,
                                             args.w2 ** 2, args.dims, args.blocks, "w2sq",
                                             check=lambda t, n, kind=kind: check(t, n, kind))
            report(f"{kind} (mixture)", mix["samplers"][kind])
        res["mixture"] = mix
    return res


def report(name: str, f: dict) -> None:
    msg = f"{name}: sequential calls ~ d^{f['fit_sequential_calls_vs_d']['exponent']:.3f}"
    if "fit_picard_rounds_vs_d" in f:
        msg += (f"; Picard rounds ~ d^{f['fit_picard_rounds_vs_d']['exponent']:.3f} or (ln d)^"
                f"{f['fit_picard_rounds_vs_log_d']['exponent']:.3f}")
    print(msg, flush=True)


def plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("Gaussian", res["samplers"], f"KL <= {res['kl_target']:g}")]
    if "mixture" in res:
        panels.append(("Gaussian mixture", res["mixture"]["samplers"], f"W2 <= {res['mixture']['w2_target']:g}"))
    fig, axes = plt.subplots(len(panels), 3, figsize=(17, 4.4 * len(panels)), squeeze=False)
    for row, (title, samplers, goal) in zip(axes, panels):
        for i, (kind, s) in enumerate(samplers.items()):
            seq = [r for r in s["rows"] if r.get("sequential_calls")]
            fs = s["fit_sequential_calls_vs_d"]
            row[0].loglog([r["d"] for r in seq], [r["sequential_calls"] for r in seq], "o-", color=f"C{i}",
                          label=f"{kind} sequential (~ d^{fs['exponent']:.2f})")
            par = [r for r in s["rows"] if "picard_rounds" in r]
            if "fit_picard_rounds_vs_log_d" in s:
                fp = s["fit_picard_rounds_vs_log_d"]
                row[0].loglog([r["d"] for r in par], [r["picard_rounds"] for r in par], "s--", color=f"C{i}",
                              label=f"{kind} block Picard (~ (ln d)^{fp['exponent']:.2f})")
            row[1].plot([math.log(r["d"]) for r in par], [r["picard_rounds"] for r in par], "s--",
                        color=f"C{i}", label=f"{kind} block Picard")
            for r in par:
                row[1].annotate(f"K={r['picard_sweeps']}", (math.log(r["d"]), r["picard_rounds"]), fontsize=7,
                                xytext=(2, 4), textcoords="offset points", color=f"C{i}")
        row[0].set_xlabel("dimension d")
        row[0].set_ylabel(f"sequential model calls to {goal}")
        row[0].set_title(f"{title}, exact score")
        row[1].set_xlabel("ln d")
        row[1].set_ylabel(f"block Picard rounds ({res['blocks']} blocks x K sweeps)")
        row[1].set_ylim(bottom=0)
    g = axes[0][2]  # the Gaussian's KL is exact: its panel shows the sequential KL reached per d
    for i, (kind, s) in enumerate(res["samplers"].items()):
        g.semilogx([r["d"] for r in s["rows"]], [r["sequential_kl"] for r in s["rows"]], "o-", color=f"C{i}",
                   label=kind)
    g.set_xlabel("dimension d")
    g.set_ylabel("KL of the sequential sampler at N(d) (exact)")
    g.set_ylim(0, res["kl_target"] * 1.1)
    if "mixture" in res:
        m, e = axes[1][2], res["mixture"]
        ddpm = e["samplers"].get("ddpm")
        if ddpm:
            ns = [p["steps"] for p in ddpm["grid"]]
            m.errorbar(ns, [p["w2sq_per_coordinate"] for p in ddpm["grid"]], [p["noise"] for p in ddpm["grid"]],
                       fmt="o", color="C2", capsize=3, label=f"ddpm: two-sample ({ddpm['values']:,} draws)")
            m.plot(ns, [p["exact"] for p in ddpm["grid"]], "-", color="C2", label="ddpm: exact (law on a grid)")
        for i, kind in enumerate(e["samplers"]):
            rows = [r for r in e["samplers"][kind]["rows"] if "two_sample_w2sq" in r]
            if rows:
                m.errorbar([r["sequential_steps"] for r in rows], [r["two_sample_w2sq"] / r["d"] for r in rows],
                           [r["two_sample_noise"] / r["d"] for r in rows], fmt="x", color=f"C{i}", capsize=3,
                           label=f"{kind} at N(d): two-sample")
                m.plot([r["sequential_steps"] for r in rows], [r["sequential_w2sq"] / r["d"] for r in rows], "+",
                       color=f"C{i}", ms=10, label=f"{kind} at N(d): exact (quadrature)")
        m.set_xscale("log")
        m.set_yscale("log", nonpositive="mask")  # an estimate below zero (noise) is left out
        m.set_xlabel("sequential steps N")
        m.set_ylabel("per-coordinate W2^2 to the target")
        m.set_title("mixture: two-sample (+- noise) and exact W2")
    for ax in axes.flat:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot: {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dims", type=int, nargs="+", default=[2, 8, 32, 128, 512, 2048, 8192, 16384])
    p.add_argument("--targets", nargs="+", choices=["gaussian", "mixture"], default=["gaussian", "mixture"])
    p.add_argument("--samplers", nargs="+", choices=["ode", "ddim", "ddpm"], default=["ode", "ddim", "ddpm"],
                   help="ode: Heun probability-flow ODE; ddim: its Euler step; ddpm: the SDE (ancestral) sampler")
    p.add_argument("--update", action="store_true",
                   help="keep the targets and samplers of an existing --json that this run does not compute "
                        "(same settings)")
    p.add_argument("--kl", type=float, default=0.01, help="Gaussian: KL target (nats) for every sampler and d")
    p.add_argument("--blocks", type=int, default=8, help="block Picard blocks (the same for every d)")
    p.add_argument("--var-min", type=float, default=0.01, help="Gaussian: smallest coordinate variance")
    p.add_argument("--classes", type=int, default=64, help="Gaussian: distinct variances (cycled over coordinates)")
    p.add_argument("--w2", type=float, default=0.1, help="mixture: W2 target in R^d for every sampler and d")
    p.add_argument("--sep", type=float, default=2.0, help="mixture: distance between the two component means")
    p.add_argument("--std", type=float, default=0.5, help="mixture: std of each component")
    p.add_argument("--weight", type=float, default=0.3, help="mixture: weight of the lower component")
    p.add_argument("--sde-values", type=int, default=2**22,
                   help="mixture, SDE: draws of the 1-D output law per step count of the two-sample check beside the "
                        "exact W2 (n samples of R^d = this / d)")
    p.add_argument("--sde-grid", type=int, nargs="+",
                   default=[16, 23, 32, 45, 64, 91, 128, 181, 256, 362, 512, 724, 1024],
                   help="mixture, SDE: the step counts of that check")
    p.add_argument("--picard-values", type=int, default=2**16,
                   help="mixture, SDE: draws for the coupled distance of block Picard to the sequential sampler")
    p.add_argument("--check-values", type=int, default=2**20,
                   help="mixture, ODEs: draws of the two-sample estimate shown beside the exact W2")
    p.add_argument("--check-max-d", type=int, default=512, help="mixture, ODEs: two-sample check up to this d")
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
        same = ("kl_target", "blocks", "train_steps") + (("var_min", "classes") if "gaussian" in args.targets else ())
        if any(old.get(k) != res[k] for k in same):
            raise SystemExit(f"--update: {args.json} was made with other settings ({', '.join(same)})")
        res["samplers"] = {**{k: v for k, v in old["samplers"].items() if k not in res["samplers"]},
                           **res["samplers"]}
        if "mixture" in res and "mixture" in old:
            keys = ("sep", "std", "weight", "w2_target", "check_values")
            if any(old["mixture"][k] != res["mixture"][k] for k in keys):
                raise SystemExit(f"--update: {args.json}'s mixture was made with other settings ({', '.join(keys)})")
            res["mixture"]["samplers"] = {**old["mixture"]["samplers"], **res["mixture"]["samplers"]}
        elif "mixture" in old:
            res["mixture"] = old["mixture"]
    if args.json and not args.source:
        write_json(res, args.json)
        print(f"json: {args.json}")
    if args.plot:
        plot(res, args.plot)


if __name__ == "__main__":
    main()
