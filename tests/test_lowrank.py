"""Polynomial-method (low-rank) attention and its running-state form inside VAR."""
import math

import pytest
import torch
import torch.nn.functional as F

from pargen import registry
from pargen.nn.lowrank import (PolySpec, PolyState, exp_poly, exp_poly_error, monomial_features, poly_attention,
                               taylor_bound)


def _qkv(n=60, d=6, s=1.0, seed=0, batch=2, heads=3):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(batch, heads, n, d, generator=g, dtype=torch.float64), dim=-1) * s
    k = F.normalize(torch.randn(batch, heads, n, d, generator=g, dtype=torch.float64), dim=-1)
    v = torch.randn(batch, heads, n, d, generator=g, dtype=torch.float64)
    return q, k, v


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_symmetric_features_give_powers_of_the_dot_product_with_the_stated_rank():
    a, b = torch.randn(2, 5, 7, dtype=torch.float64).unbind(0)
    feats_a, feats_b = monomial_features(a, 4), monomial_features(b, 4)
    for j, (fa, fb) in enumerate(zip(feats_a, feats_b)):
        assert fa.shape[-1] == math.comb(7 + j - 1, j)  # multisets of size j: no repeated monomials
        assert torch.allclose((fa * fb).sum(-1), (a * b).sum(-1) ** j, rtol=1e-10)
    assert sum(f.shape[-1] for f in feats_a) == PolySpec(4).rank(7) == math.comb(11, 4)
    with pytest.raises(ValueError, match="rank"):
        monomial_features(torch.zeros(1, 64), 9)


@pytest.mark.parametrize("kind", ["taylor", "chebyshev"])
def test_high_degree_matches_exact_attention(kind):
    q, k, v = _qkv(s=1.0, d=4)
    exact = F.scaled_dot_product_attention(q, k, v, scale=1.0)
    assert _rel(poly_attention(q, k, v, scale=1.0, spec=PolySpec(10, kind)), exact) < 1e-8


@pytest.mark.parametrize("kind", ["taylor", "chebyshev"])
def test_error_falls_with_degree_and_with_the_entry_bound(kind):
    errs = {}
    for s in (0.5, 1.0, 2.0):
        q, k, v = _qkv(s=s)
        exact = F.scaled_dot_product_attention(q, k, v, scale=1.0)
        for g in (2, 4, 6):
            errs[s, g] = _rel(poly_attention(q, k, v, scale=1.0, spec=PolySpec(g, kind)), exact)
    for s in (0.5, 1.0, 2.0):
        assert errs[s, 2] > errs[s, 4] > errs[s, 6], errs
    for g in (2, 4, 6):
        assert errs[0.5, g] < errs[1.0, g] < errs[2.0, g], errs
    assert errs[2.0, 2] > 1e-3 and errs[0.5, 6] < 1e-6  # the method is approximate, and exact in the limit


def test_per_entry_error_and_the_taylor_bound():
    for beta in (0.5, 1.0, 2.0):
        for g in (2, 4, 6):
            err = exp_poly_error(PolySpec(g, "taylor"), beta)
            assert err <= taylor_bound(g, beta) * (1 + 1e-9)
            assert exp_poly_error(PolySpec(g, "chebyshev"), beta) < err  # near-minimax beats Taylor at the edges


def test_normaliser_stays_positive_where_the_polynomial_would_not():
    c = exp_poly(PolySpec(1, "taylor"), 3.0)  # 1 + x is negative on [-3, -1)
    x = torch.linspace(-3, 3, 1001, dtype=torch.float64).numpy()
    assert (c[0] + c[1] * x).min() > 0 and c[0] > 1
    q, k, v = _qkv(s=3.0)
    out = poly_attention(q, k, v, scale=1.0, spec=PolySpec(1))
    assert torch.isfinite(out).all()


def test_block_causal_form_equals_the_running_state_and_exact_masked_attention():
    q, k, v = _qkv(n=1 + 4 + 9 + 16, d=4, s=1.0)
    blocks = [1, 4, 9, 16]
    spec = PolySpec(10, "taylor")
    full = poly_attention(q, k, v, scale=1.0, spec=spec, blocks=blocks, bound=torch.ones(3, dtype=torch.float64))
    state, outs, cur = PolyState(spec, 1.0, bound=torch.ones(3, dtype=torch.float64)), [], 0
    for n in blocks:
        outs.append(state.attend(q[..., cur: cur + n, :], k[..., cur: cur + n, :], v[..., cur: cur + n, :]))
        cur += n
    assert torch.allclose(torch.cat(outs, -2), full, atol=1e-12)
    ids = torch.repeat_interleave(torch.arange(4), torch.tensor(blocks))
    exact = F.scaled_dot_product_attention(q, k, v, attn_mask=ids[:, None] >= ids[None, :], scale=1.0)
    assert _rel(full, exact) < 1e-8
    assert state.nbytes() == (spec.rank(4) * 4 + spec.rank(4)) * 2 * 3 * 8  # independent of the token count


@pytest.fixture(scope="module")
def small_var():
    """A small VAR with head dimension 8 and capped head scales, weights large enough for peaked attention."""
    torch.manual_seed(0)
    var = registry.create("var-tiny", depth=2, width=32, heads=4, patch_nums=(1, 2, 3), attn_scale_cap=1.0,
                          vocab_size=32, z_channels=8).eval()
    with torch.no_grad():
        for b in var.blocks:
            b.attn.mat_qkv.weight.normal_(0, 0.3)
            b.ada_lin[-1].weight.normal_(0, 0.3)
        var.head.weight.normal_(0, 0.3)
    return var


def test_var_lowrank_teacher_forcing_matches_exact_at_high_degree(small_var):
    var, c = small_var, small_var.config
    assert all((b.attn.head_scales() <= 1.0 + 1e-6).all() for b in var.blocks)
    g = torch.Generator().manual_seed(1)
    y, x = torch.tensor([0, 3]), torch.randn(2, c.L - 1, c.z_channels, generator=g)
    with torch.no_grad():
        exact = var(y, x, cond_drop=0)
        var.set_lowrank([1], PolySpec(8))
        assert var.lowrank_layers() == [1]
        high = var(y, x, cond_drop=0)
        var.set_lowrank(None, PolySpec(1))
        low = var(y, x, cond_drop=0)
        var.set_lowrank(None, None)
    assert var.lowrank_layers() == []
    assert _rel(high, exact) < 1e-5 and _rel(low, exact) > 1e-3  # measured 1.7e-7 and 4.8e-3
    with pytest.raises(ValueError, match="out of range"):
        var.set_lowrank([5], PolySpec(2))


def test_var_sampling_with_running_states_draws_the_exact_tokens_at_high_degree(small_var):
    from pargen.samplers import autoregressive as AR

    var = small_var
    vae = registry.create("msvq-var-tiny", vocab_size=32, z_channels=8, patch_nums=(1, 2, 3), img_size=48,
                          ch_mult=(1, 1, 1, 1, 2)).eval()
    y = torch.tensor([1, 2, 5])
    with torch.no_grad():
        ref = AR.sample(var, vae, y, cfg=1.5, generator=torch.Generator().manual_seed(0))
        var.set_lowrank(None, PolySpec(8, "chebyshev"))
        lo = AR.sample(var, vae, y, cfg=1.5, generator=torch.Generator().manual_seed(0))
        var.set_lowrank(None, None)
    assert all(torch.equal(a, b) for a, b in zip(ref.indices, lo.indices))
    assert torch.equal(lo.f_hat, ref.f_hat)  # the same tokens decode to the same map
