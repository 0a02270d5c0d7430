"""Diffusion sampling: DDPM, DDIM and a probability-flow ODE sampler, sequential or parallel in time.

A discretised sampler is the recursion x[i+1] = step_i(x[i]) + s_i * xi_i over the time steps i = 0..N-1, from
x[0] = x_T, with the per-step noise xi_i drawn up front per sample so every method sees the same randomness.
Its trajectory is a causal system along the time axis, so the fixed-point engine solves it (one adapter, no
second copy of the iteration):

- sequential: one step per model call (`solve(window=1)`), the reference;
- window Picard (ParaDiGMS, Shih et al., arXiv 2305.16317): a sliding window of p steps, each pass one batched
  model call, rebuilding every state in the window from the window start plus running sums of increments,
      x[j+1] = x[c] + sum_{i=c..j} (step_i(x[i]) - x[i] + s_i xi_i),
  a step counts as converged when its change is below tol times that step's DDPM posterior noise std, and the
  window slides past the converged steps;
- block Picard (Chen, Ren, Ying, Rotskoff, arXiv 2405.15986): blocks of M steps solved one after another with K
  sweeps each (GS-Jacobi over time), the same prefix-sum update (the research note measures the integrating-factor
  form converging far more slowly);
- `anderson`: Anderson-type mixing of the last m sweeps inside the window (ParaTAA, Tang et al., ICML 2024).

Timesteps use diffusers' "leading" spacing and its conventions (final alpha-bar 1, DDPM "fixed_small" variance),
so the steps equal `DDIMParallelScheduler` / `DDPMParallelScheduler` ones (tested). x0 is not clipped.
The noise predictor is any callable eps(x, t, y): pargen's `Denoiser` or a `diffusers` `UNet2DModel` (see
`noise_predictor`). Under torchrun, `shard(eps)` (or `noise_predictor(..., split=True)`) splits each model call
across the ranks and gathers it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .. import distributed
from ..rng import SampleRNG
from . import fixed_point as fp

EpsFn = Callable[[Tensor, Tensor, Tensor | None], Tensor]
SAMPLERS = ("ddpm", "ddim", "ode")
METHODS = ("sequential", "picard", "block")


@dataclass(frozen=True)
class Steps:
    """A sampler's time grid and per-step coefficients (float64, length N)."""

    kind: str  # "ddpm" | "ddim" | "ode"
    t: Tensor  # model timesteps, decreasing
    t_next: Tensor  # the next grid timestep (-1 after the last)
    a: Tensor  # ddpm / ddim: step_i(x) = a_i x + b_i eps(x, t_i)
    b: Tensor
    s: Tensor  # std of the noise added at step i (0 for ddim eta=0 and ode)
    sigma: Tensor  # the ODE's noise level sqrt((1 - ab) / ab) at t_i
    sigma_next: Tensor  # ... at t_next (0 after the last step)
    ab: Tensor  # alpha-bar at t_i
    ab_next: Tensor
    noise_std: Tensor  # DDPM posterior std of each step: the scale of the Picard stopping rule

    @property
    def n(self) -> int:
        return len(self.t)

    @property
    def stochastic(self) -> bool:
        return bool((self.s > 0).any())


def make_steps(alphas_cumprod: Tensor, n: int, kind: str = "ddim", eta: float = 0.0) -> Steps:
    """N-step grid over a discrete VP schedule ("leading" spacing, t_i = (N - 1 - i) * (T // N))."""
    if kind not in SAMPLERS:
        raise ValueError(f"unknown sampler {kind!r}; use one of {SAMPLERS}")
    T = len(alphas_cumprod)
    if not 1 <= n <= T:
        raise ValueError(f"number of steps must be in [1, {T}], got {n}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    acp = alphas_cumprod.double().cpu()
    ratio = T // n
    t = torch.arange(n - 1, -1, -1, dtype=torch.int64) * ratio
    t_next = t - ratio
    ab = acp[t]
    ab_next = torch.where(t_next >= 0, acp[t_next.clamp_min(0)], torch.ones((), dtype=torch.float64))
    beta = 1 - ab / ab_next  # the effective beta of a (possibly skipping) step
    post_var = ((1 - ab_next) / (1 - ab) * beta).clamp_min(1e-20)  # diffusers' "fixed_small"
    zero = torch.zeros(n, dtype=torch.float64)
    if kind == "ddpm":
        c0 = ab_next.sqrt() * beta / (1 - ab)  # coefficient of x0_hat in the posterior mean
        cx = (1 - beta).sqrt() * (1 - ab_next) / (1 - ab)  # coefficient of x_t
        a, b = c0 / ab.sqrt() + cx, -c0 * (1 - ab).sqrt() / ab.sqrt()
        s = torch.where(t_next >= 0, post_var.sqrt(), zero)
    else:
        s = eta * ((1 - ab_next) / (1 - ab) * beta).sqrt() if kind == "ddim" else zero
        a = (ab_next / ab).sqrt()
        b = (1 - ab_next - s**2).clamp_min(0).sqrt() - a * (1 - ab).sqrt()
    sig = ((1 - ab) / ab).sqrt()
    sig_next = ((1 - ab_next) / ab_next).sqrt()
    return Steps(kind, t, t_next, a, b, s, sig, sig_next, ab, ab_next, post_var.sqrt())


def noise_predictor(model: torch.nn.Module, guidance: float = 1.0, split: bool = False) -> EpsFn:
    """eps(x, t, y) from pargen's `Denoiser` or a `diffusers` `UNet2DModel`, with classifier-free guidance.

    With guidance w != 1 and labels given, both branches run in one batched call: eps_u + w * (eps_c - eps_u).
    split: under torchrun, every model call (both branches' rows) is split across the ranks (`shard`), so even a
    single step of one image runs on two processes.
    """
    from ..models.denoiser import Denoiser

    ours = isinstance(model, Denoiser)
    if guidance != 1.0 and not ours:
        raise ValueError("classifier-free guidance needs the model's null class (label -1), which only pargen's "
                         "Denoiser has; use guidance=1 with other models")

    def call(x: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        if ours:
            return model(x, t, y)
        out = model(x, t) if y is None else model(x, t, class_labels=y)
        return out.sample if hasattr(out, "sample") else out

    if split:
        call = shard(call)

    def eps(x: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        if y is None or guidance == 1.0:
            return call(x, t, y)
        both = call(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, -1)]))
        c, u = both.chunk(2)
        return u + guidance * (c - u)

    return eps


def shard(eps: EpsFn) -> EpsFn:
    """Split every call's rows across the torchrun ranks (contiguous shares) and gather the results, so one
    window's model call runs on all processes (the same result as one process)."""
    if distributed.world()[1] == 1:
        return eps

    def call(x: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        mine = distributed.share(x.shape[0])
        part = eps(x[mine], t[mine], None if y is None else y[mine]) if mine.stop > mine.start else x[:0]
        return distributed.gather(part)

    return call


class PicardOperator:
    """The trajectory x (B, N, ...) as a causal operator: x[:, i] is the state after step i; x_T comes before.

    A call is one batched model call (two for the ODE's Heun step) over the steps each sample asks for, and
    returns the prefix-sum rebuild from each sample's own first open step; on one step it is the plain update.
    """

    def __init__(self, eps: EpsFn, steps: Steps, x_T: Tensor, noise: Tensor | None, y: Tensor | None):
        self.eps, self.steps, self.x_T, self.noise, self.y = eps, steps, x_T, noise, y
        self.coef = {k: getattr(steps, k).to(x_T.device, x_T.dtype)
                     for k in ("a", "b", "sigma", "sigma_next", "ab", "ab_next")}
        self.t, self.t_next = steps.t.to(x_T.device), steps.t_next.to(x_T.device)
        self.calls = 0  # sequential model calls
        self.evals = 0  # model evaluations (rows; the two guidance branches count once)

    def _eps(self, x: Tensor, t: Tensor, rows: Tensor) -> Tensor:
        self.calls += 1
        self.evals += x.shape[0]
        return self.eps(x, t, None if self.y is None else self.y[rows])

    def step(self, x: Tensor, idx: Tensor, rows: Tensor) -> Tensor:
        """step_i(x) (deterministic part) for states x (R, ...) at step indices idx (R,) of samples rows (R,)."""
        c = self.coef
        view = (-1,) + (1,) * (x.dim() - 1)
        e = self._eps(x, self.t[idx], rows)
        if self.steps.kind != "ode":
            return c["a"][idx].view(view) * x + c["b"][idx].view(view) * e
        # Heun on dx/dsigma = eps in the coordinates x / sqrt(ab) (DDIM is its Euler step); Euler onto sigma = 0
        h = (c["sigma_next"][idx] - c["sigma"][idx]).view(view)
        rs_next = c["ab_next"][idx].sqrt().view(view)
        xb = x * c["ab"][idx].rsqrt().view(view) + h * e
        two = (self.t_next[idx] >= 0).nonzero().flatten()  # every step but the last has a corrector
        if len(two):
            e2 = self._eps(xb[two] * rs_next[two], self.t_next[idx[two]], rows[two])
            xb = xb.index_add(0, two, h[two] * (e2 - e[two]) / 2)
        return xb * rs_next

    def __call__(self, x: Tensor, start: int, stop: int, need: Tensor | None = None) -> Tensor:
        B, n = x.shape[0], stop - start
        prev = x[:, start - 1: stop - 1] if start > 0 else torch.cat([self.x_T[:, None], x[:, : stop - 1]], 1)
        if need is None:
            need = torch.ones(B, n, dtype=torch.bool, device=x.device)
        b, k = need.nonzero(as_tuple=True)
        new = self.step(prev[b, k], start + k, b)
        if self.noise is not None:
            new = new + self.noise[b, start + k]
        if n == 1:
            return prev.index_put((b, k), new)
        # prefix-sum (Picard) rebuild from each sample's first open step, whose input is final
        d = torch.zeros_like(prev).index_put_((b, k), new - prev[b, k])
        first = need.to(torch.int8).argmax(1)
        base = prev[torch.arange(B, device=x.device), first]
        return base[:, None] + torch.cumsum(d, dim=1)

    def commit(self, x: Tensor, stop: int) -> None:
        pass


@dataclass
class DiffusionSample:
    x: Tensor  # final images (B, C, H, W)
    result: fp.FixedPointResult  # per-segment iterations, residuals, fallbacks
    rounds: int  # sequential model calls
    nfe: int  # model evaluations per sample

    @property
    def trajectory(self) -> Tensor:
        return self.result.x


def draw(seeds: list[int] | Tensor, shape: tuple[int, ...], steps: Steps, device: str | torch.device = "cpu",
         dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor | None]:
    """x_T (B, *shape) and the scaled per-step noise (B, N, *shape) (None for deterministic samplers).

    x_T is each sample's first draw, so it is the same for every sampler and step count."""
    rng = SampleRNG(seeds)
    x_T = rng.randn(*shape).to(device, dtype)
    if not steps.stochastic:
        return x_T, None
    xi = rng.randn(steps.n, *shape).to(device, dtype)
    return x_T, xi * steps.s.to(dtype).to(device).view(1, -1, *(1,) * len(shape))


def sample(eps: EpsFn, x_T: Tensor, steps: Steps, *, noise: Tensor | None = None, y: Tensor | None = None,
           method: str = "sequential", window: int = 16, tol: float = 0.1, block: int = 20, sweeps: int | None = 4,
           anderson: int = 0, callback: fp.Callback | None = None, differentiable: bool = False) -> DiffusionSample:
    """Run the sampler `steps` from x_T with the pre-drawn `noise` (see `draw`) by `method`.

    picard: sliding window of `window` steps, tolerance `tol` relative to each step's noise std (0: exact).
    block: blocks of `block` steps with at most `sweeps` sweeps each (None: until converged at `tol`).
    anderson: history depth of triangular Anderson mixing across sweeps (0: plain Picard).
    differentiable: keep the autograd graph from x_T and the noise to the output (its memory grows with the
    passes; the sequential path writes one step at a time and is slow to differentiate).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {METHODS}")
    if steps.stochastic and noise is None:
        raise ValueError("this sampler adds noise: pass the pre-drawn `noise` from `draw`")
    if noise is not None and noise.shape != (x_T.shape[0], steps.n) + x_T.shape[1:]:
        raise ValueError(f"noise must have shape {(x_T.shape[0], steps.n) + tuple(x_T.shape[1:])}, "
                         f"got {tuple(noise.shape)}")
    op = PicardOperator(eps, steps, x_T, noise, y)
    x0 = x_T[:, None].expand(x_T.shape[0], steps.n, *x_T.shape[1:])
    with torch.set_grad_enabled(differentiable):
        if method == "sequential":
            res = fp.solve(op, x0, window=1, callback=callback)
        elif method == "picard":
            if window < 1:
                raise ValueError(f"window must be >= 1, got {window}")
            res = fp.solve(op, x0, window=window, tol=tol, scale=steps.noise_std, carry=True,
                           anderson=anderson, callback=callback)
        else:
            if not 1 <= block <= steps.n:
                raise ValueError(f"block must be in [1, {steps.n}], got {block}")
            segs = [block] * (steps.n // block) + ([steps.n % block] if steps.n % block else [])
            res = fp.solve(op, x0, segments=segs, tol=tol, max_iters=sweeps, scale=steps.noise_std, carry=True,
                           anderson=anderson, callback=callback)
    return DiffusionSample(res.x[:, -1], res, rounds=op.calls, nfe=op.evals // x_T.shape[0])
