"""TarFlow sampling: invert the blocks (last first) with the fixed-point engine.

Inverting block k means solving x_t = z_t * exp(a_t(x_{<t})) + b_t(x_{<t}) for x, a causal system that
`BlockOperator` exposes to `fixed_point.solve`. A per-block `BlockPlan` picks the solver: sequential (one token
per call, KV-cached: the baseline), Jacobi, or GS-Jacobi with a segment count, an iteration cap and an initial guess.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..models.tarflow import TarFlow
from ..nn.attention import KVCache
from . import fixed_point
from .fixed_point import FixedPointResult


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance on the affine parameters (ml-tarflow): a <- a_c + w (a_c - a_u), same for b.

    The unconditional branch uses the mean class embedding and attention temperature `attn_temp` (how
    unconditional models get guidance). `annealed`: w grows linearly over the tokens, w * t / (T - 1).
    """

    scale: float = 0.0
    on_a: bool = True
    on_b: bool = True
    annealed: bool = False
    attn_temp: float = 1.0

    @property
    def active(self) -> bool:
        return self.scale > 0 and (self.on_a or self.on_b)


@dataclass(frozen=True)
class BlockPlan:
    """How to invert one block. segments >= T is the sequential sampler; 1 is Jacobi."""

    segments: int = 1
    max_iters: int | None = None  # passes per segment (None: segment length, i.e. exact)
    init: str = "z"  # initial guess: "z" (the block's input) or "zero" (z_0 then zeros)
    tol: float | None = None  # None: the tolerance given to `sample`

    def __post_init__(self):
        if self.init not in ("z", "zero"):
            raise ValueError(f"init must be 'z' or 'zero', not {self.init!r}")
        if self.segments < 1:
            raise ValueError(f"segments must be >= 1, got {self.segments}")


SEQUENTIAL = BlockPlan(segments=1 << 30)
JACOBI = BlockPlan(segments=1)


@dataclass
class FlowSample:
    x: Tensor  # (B, C, H, W) image
    blocks: list[FixedPointResult]  # in sampling order (last forward block first)
    guided: bool
    trace: list[Tensor] = field(default_factory=list)  # image after each inverted block (if asked)

    @property
    def rounds(self) -> int:
        return sum(r.rounds for r in self.blocks)

    @property
    def nfe(self) -> int:
        """Token evaluations per sample (x2 with guidance: both branches are evaluated)."""
        return sum(r.nfe for r in self.blocks) * (2 if self.guided else 1)


class BlockOperator:
    """x_t = z_t exp(a_t) + b_t for one block, in the block's token order, with an explicit KV cache."""

    def __init__(self, model: TarFlow, k: int, z: Tensor, y: Tensor | None, guidance: Guidance, cached: bool = True):
        cfg = model.config
        block = model.blocks[k]
        self.block, self.z, self.g = block, z, guidance
        B, T, _ = z.shape
        self.T = T
        cond = block.cond_embed(y)
        self.q_scale = None
        if guidance.active:  # both branches in one batched call: [conditional; unconditional]
            uncond = block.cond_embed(None)
            cond = None if cond is None else torch.cat([cond.expand(B, 1, -1), uncond.expand(B, 1, -1)])
            if guidance.attn_temp != 1.0:
                s = torch.ones(2 * B, 1, 1, 1, dtype=z.dtype, device=z.device)
                s[B:] = 1.0 / guidance.attn_temp
                self.q_scale = s
        self.cond = cond
        # without a cache (the naive baseline) every call must start at position 0 and recompute the prefix
        self.cache = KVCache.empty(cfg.layers_per_block, 2 * B if guidance.active else B, cfg.width // cfg.head_dim,
                                   T, cfg.head_dim, like=z) if cached else None

    def __call__(self, x: Tensor, start: int, stop: int, need: Tensor | None = None) -> Tensor:
        t0 = max(start - 1, 0)  # fed tokens t0 .. stop-2 give (a, b) for positions t0+1 .. stop-1
        toks = x[:, t0: stop - 1]
        if toks.shape[1] == 0:
            return self.z[:, :1]
        if self.g.active:
            toks = torch.cat([toks, toks])
        a, b = self.block.split(self.block.hidden(toks, t0, self.cond, self.cache, self.q_scale))
        if self.g.active:
            B = x.shape[0]
            w = self.g.scale
            if self.g.annealed:  # output position p gets w * p / (T - 1)
                w = torch.arange(t0 + 1, stop, dtype=a.dtype, device=a.device).view(1, -1, 1) * (w / (self.T - 1))
            a = a[:B] + w * (a[:B] - a[B:]) if self.g.on_a else a[:B]
            b = b[:B] + w * (b[:B] - b[B:]) if self.g.on_b else b[:B]
        out = self.z[:, t0 + 1: stop] * torch.exp(a.to(torch.promote_types(a.dtype, torch.float32))).to(a.dtype) + b
        if start == 0:
            out = torch.cat([self.z[:, :1], out], dim=1)  # the first token is unchanged by the flow
        return out

    def commit(self, x: Tensor, stop: int) -> None:
        if self.cache is not None:
            self.cache.commit(max(stop - 1, 0) - self.cache.length)


def invert_block(model: TarFlow, k: int, z: Tensor, y: Tensor | None, plan: BlockPlan, tol: float = 0.0,
                 guidance: Guidance = Guidance(), callback=None) -> FixedPointResult:
    """Invert block k: z (B, T, D) in raster order -> the block's input, with the result in raster order."""
    block = model.blocks[k]
    zs = block.order(z)
    op = BlockOperator(model, k, zs, y, guidance)
    x0 = zs.clone()
    if plan.init == "zero":
        x0[:, 1:] = 0
    T = zs.shape[1]
    t = tol if plan.tol is None else plan.tol
    if plan.segments >= T:
        res = fixed_point.sequential(op, x0, callback=callback)
    else:
        res = fixed_point.gs_jacobi(op, x0, plan.segments, tol=t, max_iters=plan.max_iters, callback=callback)
    res.x = block.order(res.x)
    return res


@torch.inference_mode()
def sample(model: TarFlow, noise: Tensor, y: Tensor | None = None, *,
           plan: BlockPlan | list[BlockPlan] = SEQUENTIAL, tol: float = 0.0, guidance: Guidance = Guidance(),
           trace: bool = False, callback=None) -> FlowSample:
    """Sample images from latent noise (B, T, D): blocks inverted last-first, each as its plan says.

    `plan` is one plan for every block or a list in sampling order (index 0 = the last forward block).
    """
    n = len(model.blocks)
    plans = plan if isinstance(plan, list) else [plan] * n
    if len(plans) != n:
        raise ValueError(f"{len(plans)} block plans for {n} blocks")
    cfg = model.config
    if noise.shape[1:] != (cfg.seq_len, cfg.patch_dim):
        raise ValueError(f"noise must be (B, {cfg.seq_len}, {cfg.patch_dim}), got {tuple(noise.shape)}")
    x = noise * model.var.sqrt()
    results, images = [], [model.unpatchify(x)] if trace else []
    for i, k in enumerate(reversed(range(n))):
        cb = None if callback is None else (lambda info, i=i: callback({"block": i, **info}))
        res = invert_block(model, k, x, y, plans[i], tol, guidance, cb)
        x = res.x
        results.append(res)
        if trace:
            images.append(model.unpatchify(x))
    return FlowSample(model.unpatchify(x), results, guidance.active, images)


def denoise(model: TarFlow, x: Tensor, y: Tensor | None = None, lr_scale: float = 1.0) -> Tensor:
    """Score-based denoising (one gradient step, Tweedie): x - lr * grad loss, lr = B*C*H*W * noise_std^2 * scale.

    The loss is a mean over batch and dimensions, so this is x + noise_std^2 * grad log p(x) per sample.
    """
    with torch.enable_grad(), torch.inference_mode(False):
        x = x.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(model.loss(x, y), x)
    lr = x.numel() * model.config.noise_std**2 * lr_scale
    return (x - lr * grad).detach()


def noise(model: TarFlow, seeds: list[int], device: torch.device | str = "cpu") -> Tensor:
    """Latent noise (B, T, D), one stream per seed: a sample depends on its seed only."""
    from ..rng import SampleRNG

    cfg = model.config
    return SampleRNG(seeds).randn(cfg.seq_len, cfg.patch_dim).to(device=device, dtype=model.var.dtype)
