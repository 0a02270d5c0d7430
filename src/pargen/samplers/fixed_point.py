"""The fixed-point engine: solve a causal (triangular) system x[:, t] = F_t(x[:, :t]) along axis 1 in parallel.

Sequential sampling evaluates F one position at a time. Jacobi iteration evaluates F on a whole window of
positions per pass from the current guess; causality makes position t exact after at most t - start + 1
passes (Song et al., ICML 2021, arXiv 2002.03629). Gauss-Seidel-Jacobi (Liu & Qin, arXiv 2505.12849) splits
the axis into segments solved one after another, Jacobi inside each. A sliding window (each sample's own, so
its answer does not depend on the batch) advances as soon as leading positions converge: the ParaDiGMS scheme
over time steps, where F is a Picard prefix sum. Triangular Anderson mixing (ParaTAA) can accelerate any of them.
All are `solve` with different segment boundaries and windows; sequential sampling is `solve(..., window=1)`.

The model side is a `CausalOperator`, which holds the committed prefix as context (e.g. a KV cache).

Stopping rule, per sample and per position, independent of batch size and of the number of positions:
    err[b, t] = rms_features(x_new[b, t] - x[b, t]) / rms_segment(x_new[b])
or, when the caller gives a per-position `scale` (e.g. the noise std of each diffusion step, as ParaDiGMS does),
    err[b, t] = rms_features(x_new[b, t] - x[b, t]) / scale[t].
A converged position (err <= tol) keeps the value that was fed forward in this pass. A sample's frontier (its
first non-final position) then advances past its leading run of converged positions plus the one after it: that
position's new value was computed from exactly the values now frozen, so it is final too (ParaDiGMS slides the
same way). Positions behind a sample's own frontier are frozen, so a sample's answer does not depend on the rest
of the batch and committed context (e.g. cached keys) always matches the answer.

Divergence (non-finite values, or a residual that grows for `patience` passes in a row) is not clamped away: the
segment is restarted from its initial guess and solved sequentially, and the fallback is recorded.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import Tensor


class CausalOperator(Protocol):
    def __call__(self, x: Tensor, start: int, stop: int, need: Tensor | None = None) -> Tensor:
        """F(x)[:, start:stop] (B, stop - start, ...). x[:, :start] is final and was committed.

        need (B, stop - start) bool, when given: the positions each sample asks for, a contiguous run starting at
        its own first non-final position (everything before it is final for that sample); other entries of the
        result are ignored, so an operator may skip them."""

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


def _errors(new: Tensor, old: Tensor) -> Tensor:
    """(B, n): per-position RMS change."""
    B, n = new.shape[:2]
    return (new - old).reshape(B, n, -1).double().pow(2).mean(2).sqrt()


def _rms(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).double().pow(2).mean(1).sqrt().clamp_min(1e-30)


def _leading_run(ok: Tensor) -> Tensor:
    """(B, n) bool -> (B,) length of the leading run of True."""
    return ok.to(torch.int64).cumprod(1).sum(1)


class _Diverged(Exception):
    pass


class _Anderson:
    """Triangular Anderson mixing over the last m passes (ParaTAA, Tang et al., ICML 2024), per sample.

    With residuals f = G(x) - x at input x and output g = G(x), and differences dF, dG between consecutive passes,
    position j of the next iterate is g_j - dG_j gamma_j, where gamma_j minimises ||f - dF gamma|| over positions
    <= j only (prefix sums of per-position Gram matrices), so the update keeps the system's causal structure.
    History is kept by absolute position and masked by what each sample evaluated, so a sample's update does not
    depend on the rest of the batch.
    """

    def __init__(self, m: int):
        self.m = m
        self.hist: list[tuple[int, Tensor, Tensor, Tensor]] = []  # (start, x, g, need) of recent passes

    @staticmethod
    def _aligned(start: int, t: Tensor, c: int, n: int) -> Tensor:
        out = t.new_zeros((t.shape[0], n) + t.shape[2:])
        lo, hi = max(start, c), min(start + t.shape[1], c + n)
        if hi > lo:
            out[:, lo - c: hi - c] = t[:, lo - start: hi - start]
        return out

    def __call__(self, x: Tensor, g: Tensor, need: Tensor, c: int) -> Tensor:
        B, n = need.shape
        self.hist = (self.hist + [(c, x.clone(), g.clone(), need)])[-(self.m + 1):]
        if len(self.hist) < 2:
            return g
        xs = [self._aligned(s, a, c, n).reshape(B, n, -1).double() for s, a, _, _ in self.hist]
        gs = [self._aligned(s, b, c, n).reshape(B, n, -1).double() for s, _, b, _ in self.hist]
        ms = [self._aligned(s, m, c, n) for s, _, _, m in self.hist]
        fs = [gg - xx for gg, xx in zip(gs, xs)]
        both = [(ms[i] & ms[i + 1] & need)[..., None].double() for i in range(len(fs) - 1)]
        dF = torch.stack([(fs[i + 1] - fs[i]) * both[i] for i in range(len(both))], 1)  # (B, k, n, D)
        dG = torch.stack([(gs[i + 1] - gs[i]) * both[i] for i in range(len(both))], 1)
        f = fs[-1] * need[..., None]
        A = torch.einsum("bpnd,bqnd->bnpq", dF, dF).cumsum(1)  # (B, n, k, k) prefix Gram matrices
        r = torch.einsum("bpnd,bnd->bnp", dF, f).cumsum(1)
        eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
        reg = 1e-10 * A.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None] + 1e-300
        gamma = torch.linalg.solve(A + reg * eye, r)  # (B, n, k)
        mixed = gs[-1] - torch.einsum("bpnd,bnp->bnd", dG, gamma)
        return mixed.view_as(g).to(g.dtype)


def _iterate(op: CausalOperator, x: Tensor, lo: int, hi: int, tol: float, cap: int, window: int | None,
             patience: int, stats: SegmentStats, counters: list[int], callback: Callback | None,
             scale: Tensor | None = None, carry: bool = False, anderson: int = 0) -> None:
    """Solve positions [lo, hi) in place; positions < lo are committed. Raises _Diverged."""
    B = x.shape[0]
    dev = x.device
    mixer = _Anderson(anderson) if anderson > 0 and window != 1 else None
    frontier = torch.full((B,), lo, dtype=torch.int64, device=dev)  # per sample: first non-final position
    filled = frontier.clone()  # per sample: positions < filled have been evaluated (or are committed)
    c = lo
    rising, last_seen = 0, float("inf")
    while c < hi:
        if stats.iters == cap:
            stats.converged = False
            break
        if window == 1:  # one position per pass: exact at once (the sequential sampler's path, kept lean)
            x[:, c] = op(x, c, c + 1)[:, 0]
            counters[0] += 1
            counters[1] += 1
            stats.iters += 1
            c += 1
            op.commit(x, c)
            continue
        end = torch.full_like(frontier, hi) if window is None else (frontier + window).clamp(max=hi)
        stop = int(end.max())
        pos = torch.arange(c, stop, device=dev)[None, :]
        need = (pos >= frontier[:, None]) & (pos < end[:, None])  # (B, n): each sample's own window
        shape = tuple(need.shape) + (1,) * (x.dim() - 2)
        if carry:  # positions a sample sees for the first time start from its latest state
            fresh = need & (pos >= filled[:, None]) & (filled[:, None] > 0)
            latest = x[torch.arange(B, device=dev), (filled - 1).clamp(min=0)]
            x[:, c:stop] = torch.where(fresh.view(shape), latest[:, None], x[:, c:stop])
        seen = need & (pos < filled[:, None])  # evaluated before: only their residual can rise
        filled = torch.maximum(filled, end)
        out = op(x, c, stop, need=need)
        counters[0] += 1
        counters[1] += int(need.sum(1).max())
        stats.iters += 1
        if not bool(torch.isfinite(out[need]).all()):
            raise _Diverged
        old = x[:, c:stop]
        out = torch.where(need.view(shape), out, old)  # what a sample did not ask for is not used
        if scale is None:
            # the scale is the sample's RMS over the whole segment, so it does not depend on where others stand
            seg = x[:, lo:hi].clone()
            seg[:, c - lo: stop - lo] = out
            den = _rms(seg)[:, None]
        else:
            den = scale[None, c:stop]
        err = torch.where(need, _errors(out, old) / den,  # control flow only: outside any autograd graph
                          torch.zeros((), dtype=torch.float64, device=dev)).detach()
        run = _leading_run((pos < frontier[:, None]) | (need & (err <= tol)))  # final or converged
        new = out
        if mixer is not None:  # the first non-converged position is final (see below): it keeps the exact value
            new = torch.where((pos - c == run[:, None]).view(shape), out, mixer(old, out, need, c))
        # a position whose change is within tolerance keeps its current value: that value is what this pass
        # fed forward, so everything computed from it (e.g. cached keys) stays consistent with the answer
        x[:, c:stop] = torch.where((need & (err > tol)).view(shape), new, old)
        res = float(err.max())
        if bool(seen.any()):  # divergence: the residual of already-seen positions grows `patience` passes in a row
            res_seen = float(err[seen].max())
            rising = rising + 1 if res_seen > max(last_seen, tol) else 0
            if rising >= patience:
                raise _Diverged
        last_seen = res
        stats.residuals.append(res)
        # advance each sample's frontier past its leading converged run and the position right after it: that
        # one was computed from inputs frozen at the values fed forward, so its new value is exact
        frontier = torch.minimum(c + run + 1, end)
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
          scale: Tensor | None = None, carry: bool = False, anderson: int = 0,
          callback: Callback | None = None) -> FixedPointResult:
    """Solve x = F(x) along axis 1 of x0 (the initial guess), segment by segment.

    Args:
        segments: segment lengths summing to x0.shape[1] (default: one segment, i.e. Jacobi).
        tol: stopping threshold on the per-position relative change (0: iterate to the exact solution).
        max_iters: passes allowed per segment (one value or one per segment; None: the segment length, enough
            for the exact solution by causality).
        window: positions evaluated per pass (None: up to the segment end); 1 gives the sequential solver.
        scale: (T,) per-position denominators of the stopping rule (default: each sample's RMS over the segment).
        carry: positions seen for the first time start from the latest state before them instead of x0 (the
            Picard initialisation of diffusion windows and blocks); x0 is used where no such state exists.
        anderson: history depth m of triangular Anderson mixing across passes (0: plain fixed-point passes).
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
    if scale is not None:
        if scale.shape != (T,):
            raise ValueError(f"scale must have shape ({T},), got {tuple(scale.shape)}")
        scale = scale.to(device=x0.device, dtype=torch.float64).clamp_min(1e-30)
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
                     callback, scale, carry, anderson)
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

    def __call__(self, x: Tensor, start: int, stop: int, need: Tensor | None = None) -> Tensor:
        return self.f(x[:, :stop])[:, start:stop]

    def commit(self, x: Tensor, stop: int) -> None:
        pass
