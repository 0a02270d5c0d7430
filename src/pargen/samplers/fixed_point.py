"""The fixed-point engine: solve a causal (triangular) system x[:, t] = F_t(x[:, :t]) along axis 1 in parallel.

Sequential sampling evaluates F one position at a time. Jacobi iteration evaluates F on a whole window of
positions per pass from the current guess; causality makes position t exact after at most t - start + 1
passes (Song et al., ICML 2021, arXiv 2002.03629). Gauss-Seidel-Jacobi (Liu & Qin, arXiv 2505.12849) splits
the axis into segments solved one after another, Jacobi inside each. A sliding window advances as soon as
leading positions converge (the ParaDiGMS scheme over time steps). All are `solve` with different segment
boundaries and windows; sequential sampling is `solve(..., window=1)`.

The model side is a `CausalOperator`, which holds the committed prefix as context (e.g. a KV cache).

Stopping rule, per sample and per position, independent of batch size and of the number of positions:
    err[b, t] = rms_features(x_new[b, t] - x[b, t]) / rms_segment(x_new[b])
A sample's frontier (its first unconverged position) advances past every leading position with err <= tol, and
always by at least one (the frontier position only reads final positions, so its new value is exact). Positions
behind a sample's own frontier are frozen, and a converged position keeps the value that was fed forward, so a
sample's answer does not depend on the rest of the batch and committed context always matches the answer.

Divergence (non-finite values, or a residual that grows for `patience` passes in a row) is not clamped away: the
segment is restarted from its initial guess and solved sequentially, and the fallback is recorded.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import Tensor


class CausalOperator(Protocol):
    def __call__(self, x: Tensor, start: int, stop: int) -> Tensor:
        """F(x)[:, start:stop] (B, stop - start, ...). x[:, :start] is final and was committed."""

    def commit(self, x: Tensor, stop: int) -> None:
        """x[:, :stop] is final; keep it as context for later calls (called with increasing `stop`)."""


@dataclass
class SegmentStats:
    start: int
    stop: int
    iters: int = 0  # passes (operator calls) spent on this segment
    converged: bool = True  # False when the iteration cap stopped it first
    fallback: bool = False  # True when divergence sent it to the sequential solver
    residuals: list[float] = field(default_factory=list)  # max err over batch and active positions, per pass


@dataclass
class FixedPointResult:
    x: Tensor
    segments: list[SegmentStats]
    rounds: int  # sequential operator calls
    nfe: int  # positions evaluated per sample, summed over calls

    @property
    def iters(self) -> list[int]:
        return [s.iters for s in self.segments]

    @property
    def converged(self) -> bool:
        return all(s.converged for s in self.segments)


Callback = Callable[[dict], None]


def _errors(new: Tensor, old: Tensor, scale: Tensor) -> Tensor:
    """err (B, n): per-position RMS change relative to the sample's scale (B,)."""
    B, n = new.shape[:2]
    d = (new - old).reshape(B, n, -1).double()
    return d.pow(2).mean(2).sqrt() / scale[:, None]


def _rms(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).double().pow(2).mean(1).sqrt().clamp_min(1e-30)


def _leading_run(ok: Tensor) -> Tensor:
    """(B, n) bool -> (B,) length of the leading run of True."""
    return ok.to(torch.int64).cumprod(1).sum(1)


class _Diverged(Exception):
    pass


def _iterate(op: CausalOperator, x: Tensor, lo: int, hi: int, tol: float, cap: int, window: int | None,
             patience: int, stats: SegmentStats, counters: list[int], callback: Callback | None) -> None:
    """Solve positions [lo, hi) in place; positions < lo are committed. Raises _Diverged."""
    B = x.shape[0]
    frontier = torch.full((B,), lo, dtype=torch.int64, device=x.device)
    c = lo
    rising = 0
    while c < hi:
        if stats.iters == cap:
            stats.converged = False
            break
        stop = hi if window is None else min(hi, c + window)
        out = op(x, c, stop)
        counters[0] += 1
        counters[1] += stop - c
        stats.iters += 1
        if window == 1:  # one position per pass: exact at once (the sequential sampler's path, kept lean)
            x[:, c] = out[:, 0]
            c += 1
            op.commit(x, c)
            continue
        if not bool(torch.isfinite(out).all()):
            raise _Diverged
        old = x[:, c:stop]
        pos = torch.arange(c, stop, device=x.device)
        active = pos[None, :] >= frontier[:, None]  # (B, n): not yet frozen
        shape = (B, stop - c) + (1,) * (x.dim() - 2)
        # the scale is the sample's RMS over the whole segment, so it does not depend on where others stand
        seg = x[:, lo:hi].clone()
        seg[:, c - lo: stop - lo] = torch.where(active.view(shape), out, old)
        err = torch.where(active, _errors(out, old, _rms(seg)), torch.zeros((), dtype=torch.float64, device=x.device))
        # a position whose change is within tolerance keeps its current value: that value is what this pass
        # fed forward, so everything computed from it (e.g. cached keys) stays consistent with the answer
        x[:, c:stop] = torch.where((active & (err > tol)).view(shape), out, old)
        res = float(err.max())
        if stats.residuals and res > stats.residuals[-1] and res > tol:
            rising += 1
            if rising >= patience:
                raise _Diverged
        else:
            rising = 0
        stats.residuals.append(res)
        # advance each sample's frontier: at least one position, then every leading converged one
        off = frontier - c  # (B,) >= 0
        idx = torch.arange(stop - c, device=x.device)
        ok = (err <= tol) | (idx[None, :] < off[:, None])
        run = _leading_run(ok)
        frontier = torch.maximum(c + run, torch.clamp(frontier + 1, max=stop))
        new_c = int(frontier.min())
        if callback is not None:
            callback({"start": lo, "stop": hi, "iter": stats.iters, "residual": res, "committed": new_c})
        if new_c > c:
            op.commit(x, new_c)
            c = new_c
    if c < hi:
        op.commit(x, hi)


def solve(op: CausalOperator, x0: Tensor, *, segments: list[int] | None = None, tol: float = 0.0,
          max_iters: int | list[int | None] | None = None, window: int | None = None, patience: int = 4,
          callback: Callback | None = None) -> FixedPointResult:
    """Solve x = F(x) along axis 1 of x0 (the initial guess), segment by segment.

    Args:
        segments: segment lengths summing to x0.shape[1] (default: one segment, i.e. Jacobi).
        tol: stopping threshold on the per-position relative change (0: iterate to the exact solution).
        max_iters: passes allowed per segment (one value or one per segment; None: the segment length, enough
            for the exact solution by causality).
        window: positions evaluated per pass (None: up to the segment end); 1 gives the sequential solver.
    """
    T = x0.shape[1]
    segments = list(segments) if segments is not None else [T]
    if sum(segments) != T or any(s <= 0 for s in segments):
        raise ValueError(f"segment lengths {segments} must be positive and sum to {T}")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    caps = max_iters if isinstance(max_iters, list) else [max_iters] * len(segments)
    if len(caps) != len(segments):
        raise ValueError(f"{len(caps)} iteration caps for {len(segments)} segments")
    x = x0.clone()
    counters = [0, 0]
    all_stats = []
    lo = 0
    for length, cap in zip(segments, caps):
        hi = lo + length
        stats = SegmentStats(lo, hi)
        guess = x[:, lo:hi].clone()
        try:
            _iterate(op, x, lo, hi, tol, cap if cap is not None else length, window, patience, stats, counters,
                     callback)
        except _Diverged:
            # restart this segment from its guess and solve it one position at a time (exact by construction)
            stats.fallback, stats.converged = True, True
            x[:, lo:hi] = guess
            _iterate(op, x, lo, hi, 0.0, -1, 1, patience, stats, counters, callback)
        all_stats.append(stats)
        lo = hi
    return FixedPointResult(x, all_stats, rounds=counters[0], nfe=counters[1])


def jacobi(op: CausalOperator, x0: Tensor, *, tol: float = 0.0, max_iters: int | None = None,
           callback: Callback | None = None) -> FixedPointResult:
    """Jacobi iteration over the whole axis."""
    return solve(op, x0, tol=tol, max_iters=max_iters, callback=callback)


def gs_jacobi(op: CausalOperator, x0: Tensor, segments: int | list[int], *, tol: float = 0.0,
              max_iters: int | list[int | None] | None = None, callback: Callback | None = None) -> FixedPointResult:
    """Gauss-Seidel across segments, Jacobi inside each; `segments` is a count (near-equal split) or lengths."""
    return solve(op, x0, segments=split(x0.shape[1], segments) if isinstance(segments, int) else segments,
                 tol=tol, max_iters=max_iters, callback=callback)


def sequential(op: CausalOperator, x0: Tensor, callback: Callback | None = None) -> FixedPointResult:
    """One position per call: the reference every parallel solve is tested against."""
    return solve(op, x0, window=1, callback=callback)


def split(T: int, n: int) -> list[int]:
    """n near-equal segment lengths summing to T."""
    if not 1 <= n <= T:
        raise ValueError(f"number of segments must be in [1, {T}], got {n}")
    q, r = divmod(T, n)
    return [q + (i < r) for i in range(n)]


class FunctionOperator:
    """A `CausalOperator` from a plain function f(x) -> F(x) over the whole prefix (no cache; for tests)."""

    def __init__(self, f: Callable[[Tensor], Tensor]):
        self.f = f

    def __call__(self, x: Tensor, start: int, stop: int) -> Tensor:
        return self.f(x[:, :stop])[:, start:stop]

    def commit(self, x: Tensor, stop: int) -> None:
        pass
