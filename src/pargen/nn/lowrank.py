"""Polynomial-method (low-rank) attention: the efficient criterion of the fine-grained complexity analysis of VAR
(arXiv 2501.04377, built on Alman & Song, arXiv 2302.13214), made usable.

When every attention logit x = scale * q.k lies in [-beta, beta], replace exp(x) by a polynomial
P(x) = sum_j c_j x^j of degree g. Then P(scale Q K^T) = phi(Q) psi(K)^T exactly, with symmetric (deduplicated)
monomial features: psi_j(k) holds sqrt(j! / prod m_i!) prod k_i^{m_i} over the multisets m of size j, so
<psi_j(q), psi_j(k)> = (q.k)^j, and the coefficients c_j scale^j go on the query side only. The rank is
r = C(d + g, g) for head dimension d, and attention costs O(N r d) instead of O(N_q N_k d).

- `taylor`: c_j = 1 / j!; relative error <= e^{2 beta} beta^{g+1} / (g+1)! on the interval.
- `chebyshev`: interpolate exp at the Chebyshev points of [-beta, beta] (near-minimax, much smaller error at the
  same g), converted to monomial coefficients.
The interval is measured per head: beta = scale * max|q| * max|k| (Cauchy-Schwarz), which for VAR's
l2-normalised attention is exactly the learned head scale s_h. The normaliser is kept positive: if P dips to or
below zero anywhere on the interval, its constant term is raised until min P = 1e-3 exp(-beta).

Because VAR's mask is block-causal (a query sees its own and every earlier scale), the low-rank form keeps one
running state per head, S = sum psi(k) v^T and z = sum psi(k), updated once per scale (`PolyState`), in place of
the growing KV cache; teacher forcing takes cumulative sums over the blocks (`poly_attention(..., blocks=...)`).
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

KINDS = ("taylor", "chebyshev")


@dataclass(frozen=True)
class PolySpec:
    degree: int = 2
    kind: str = "taylor"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {self.kind!r}")
        if self.degree < 1:
            raise ValueError(f"degree must be >= 1, not {self.degree}")

    def rank(self, head_dim: int) -> int:
        return math.comb(head_dim + self.degree, self.degree)


@functools.lru_cache(maxsize=4096)
def exp_poly(spec: PolySpec, beta: float) -> np.ndarray:
    """Monomial coefficients c_0..c_g (float64, read-only) of the degree-g approximation of exp on [-beta, beta],
    with the positivity floor applied. Cached: sampling asks for the same head bounds at every scale."""
    g = spec.degree
    if spec.kind == "taylor":
        c = np.array([1 / math.factorial(j) for j in range(g + 1)])
    else:
        b = max(float(beta), 1e-6)
        cheb = np.polynomial.Chebyshev.interpolate(np.exp, g, domain=[-b, b])
        c = np.zeros(g + 1)
        coef = cheb.convert(kind=np.polynomial.Polynomial).coef
        c[: len(coef)] = coef
    lo = np.polynomial.polynomial.polyval(np.linspace(-beta, beta, 4097), c).min()
    floor = 1e-3 * math.exp(-beta)
    if lo < floor:
        c[0] += floor - lo
    c.flags.writeable = False
    return c


def exp_poly_error(spec: PolySpec, beta: float) -> float:
    """max over [-beta, beta] of |P(x) - e^x| / e^x (measured on a dense grid), the error per attention entry."""
    x = np.linspace(-beta, beta, 4097)
    return float(np.max(np.abs(np.polynomial.polynomial.polyval(x, exp_poly(spec, beta)) / np.exp(x) - 1)))


def taylor_bound(degree: int, beta: float) -> float:
    """The textbook relative-error bound e^{2 beta} beta^{g+1} / (g+1)! of the degree-g Taylor polynomial of exp on
    [-beta, beta], taken in logs so that high degrees and wide intervals neither overflow nor round to garbage."""
    if beta <= 0:
        return 0.0
    log_bound = 2 * beta + (degree + 1) * math.log(beta) - math.lgamma(degree + 2)
    return math.inf if log_bound > 709 else math.exp(log_bound)


@functools.lru_cache(maxsize=None)
def _monomials(d: int, j: int) -> tuple[Tensor, Tensor]:
    """Index tuples (m, j) of the multisets of size j from d coordinates, and their weights sqrt(j! / prod m_i!)."""
    idx = list(itertools.combinations_with_replacement(range(d), j))
    w = [math.sqrt(math.factorial(j) / math.prod(math.factorial(t.count(i)) for i in set(t))) for t in idx]
    return torch.tensor(idx, dtype=torch.long).view(-1, j), torch.tensor(w, dtype=torch.float64)


MAX_RANK = 200_000


def monomial_features(u: Tensor, degree: int) -> list[Tensor]:
    """[psi_0(u), ..., psi_g(u)] with <psi_j(a), psi_j(b)> = (a.b)^j, symmetric (no repeated monomials)."""
    r = math.comb(u.shape[-1] + degree, degree)
    if r > MAX_RANK:
        raise ValueError(f"degree {degree} on head dimension {u.shape[-1]} needs rank {r:,} features "
                         f"(limit {MAX_RANK:,}); use a lower degree")
    out = [u.new_ones(u.shape[:-1] + (1,)), u]
    for j in range(2, degree + 1):
        idx, w = _monomials(u.shape[-1], j)
        out.append(u[..., idx.to(u.device)].prod(-1) * w.to(u))
    return out[: degree + 1]


def head_bounds(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """beta per head (H,): scale * max |q| * max |k| over batch and positions of q, k (B, H, N, d)."""
    return scale * q.norm(dim=-1).amax(dim=(0, 2)) * k.norm(dim=-1).amax(dim=(0, 2))


def query_features(q: Tensor, spec: PolySpec, scale: float, beta: Tensor) -> Tensor:
    """phi(q) (B, H, N, r): psi_j(q) weighted by c_j(beta_h) scale^j per head."""
    coeffs = torch.tensor(np.stack([exp_poly(spec, float(b)) for b in beta.tolist()]), dtype=q.dtype,
                          device=q.device)  # (H, g + 1)
    parts = monomial_features(q, spec.degree)
    return torch.cat([p * (coeffs[:, j] * scale**j).view(1, -1, 1, 1) for j, p in enumerate(parts)], -1)


def key_features(k: Tensor, spec: PolySpec) -> Tensor:
    return torch.cat(monomial_features(k, spec.degree), -1)


def _read(fq: Tensor, S: Tensor, z: Tensor) -> Tensor:
    return (fq @ S) / (fq @ z.unsqueeze(-1))


def poly_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None, spec: PolySpec = PolySpec(),
                   blocks: list[int] | None = None, bound: Tensor | None = None) -> Tensor:
    """Low-rank softmax attention of q (B, H, Nq, d) over k, v (B, H, Nk, d): the call of
    `F.scaled_dot_product_attention` without a mask (`blocks=None`) or with VAR's block-causal mask (`blocks`:
    the block sizes, summing to N = Nq = Nk). `bound` (H,) overrides the measured logit bound per head."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    beta = head_bounds(q, k, scale) if bound is None else bound
    fq, fk = query_features(q, spec, scale, beta), key_features(k, spec)
    if blocks is None:
        return _read(fq, fk.transpose(-1, -2) @ v, fk.sum(-2))
    if sum(blocks) != q.shape[2] or q.shape[2] != k.shape[2]:
        raise ValueError(f"blocks {blocks} must sum to the sequence length {q.shape[2]}")
    out, S, z, cur = [], 0, 0, 0
    for n in blocks:
        kb, vb = fk[..., cur: cur + n, :], v[..., cur: cur + n, :]
        S, z = S + kb.transpose(-1, -2) @ vb, z + kb.sum(-2)
        out.append(_read(fq[..., cur: cur + n, :], S, z))
        cur += n
    return torch.cat(out, -2)


class PolyState:
    """The running state that replaces a KV cache under a block-causal mask: per head S = sum psi(k) v^T
    (r x d_v) and z = sum psi(k) (r). `attend` adds a block's keys, then its queries read (they see themselves)."""

    def __init__(self, spec: PolySpec, scale: float, bound: Tensor | None = None):
        self.spec, self.scale, self.bound = spec, scale, bound
        self.S = self.z = None
        self.kmax = None

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        fk = key_features(k, self.spec)
        S, z = fk.transpose(-1, -2) @ v, fk.sum(-2)
        self.S, self.z = (S, z) if self.S is None else (self.S + S, self.z + z)
        kn = k.norm(dim=-1).amax(dim=(0, 2))
        self.kmax = kn if self.kmax is None else torch.maximum(self.kmax, kn)
        beta = self.bound if self.bound is not None else self.scale * q.norm(dim=-1).amax(dim=(0, 2)) * self.kmax
        return _read(query_features(q, self.spec, self.scale, beta), self.S, self.z)

    def nbytes(self) -> int:
        return 0 if self.S is None else (self.S.numel() + self.z.numel()) * self.S.element_size()
