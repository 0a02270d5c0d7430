"""Single-scale VQ tokenizer and the raster-order AR model: causality, KV cache = full recomputation, sampling."""
from functools import partial

import pytest
import torch

from pargen import registry
from pargen.samplers import autoregressive as AR


@pytest.fixture(scope="module")
def vq():
    torch.manual_seed(0)
    return registry.create("vq-tiny").eval()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1)
    m = registry.create("raster-tiny").eval()
    for p in m.output.parameters():  # the head starts at zero; give the test model non-trivial logits
        torch.nn.init.normal_(p, std=0.5)
    return m


def test_vq_codes_are_the_nearest_normalised_codes_and_decode(vq):
    img = torch.rand(3, 1, 16, 16) * 2 - 1
    idx = vq.img_to_indices(img)
    assert idx.shape == (3, 16) and idx.dtype == torch.long  # 16px / 4 = 4x4 grid
    f = vq.encode(img).permute(0, 2, 3, 1).reshape(-1, 4)
    cos = f @ torch.nn.functional.normalize(vq.quantize.embedding.weight, dim=1).T
    assert torch.equal(idx.flatten(), cos.argmax(1))
    out = vq(img)
    assert out.rec.shape == img.shape and out.hits.shape == (1, 64) and out.hits.sum() == 48
    zq = vq.quantize.lookup(idx, 4, 4)
    assert torch.allclose(zq.norm(dim=1), torch.ones(3, 4, 4), atol=1e-5)
    assert vq.indices_to_img(idx).shape == img.shape


def test_vq_training_lowers_the_loss_with_dead_code_restart():
    from pargen import data
    from pargen.training.loop import TrainConfig, train
    from pargen.training.losses import vq_loss

    ds = data.load("digits", "train", 16)
    torch.manual_seed(0)
    res = train(registry.create("vq-tiny"), ds, partial(vq_loss, restart=True),
                TrainConfig(steps=30, batch_size=16, lr=2e-3, warmup=5, ema=0.0), progress=False)
    assert sum(res.losses[-5:]) < 0.8 * sum(res.losses[:5])
    with torch.no_grad():
        used = res.model.eval().img_to_indices(ds.float(slice(0, 256))).unique().numel()
    assert used > 32, used  # more than half of the 64 codes


def test_class_token_rope_row_and_rope_is_a_rotation(model):
    from pargen.models.raster_ar import rope_2d

    rope = model.rope
    assert rope.shape == (17, 8, 2)  # class token + 4x4 grid; head_dim 32 / 2 heads = 16: 8 pairs
    assert torch.equal(rope[0], torch.zeros(8, 2))  # LlamaGen's table: the class token's q and k vanish
    ident = rope_2d(4, 16, 10000.0, "identity")
    assert torch.equal(ident[0, :, 0], torch.ones(8)) and torch.equal(ident[0, :, 1], torch.zeros(8))
    assert torch.equal(ident[1:], rope[1:])
    assert torch.equal(rope[1:5, :4, 0], torch.ones(4, 4))  # grid row 0: the row pairs do not rotate
    assert torch.equal(rope[1:17:4, 4:, 0], torch.ones(4, 4))  # grid column 0: the column pairs do not rotate
    assert not torch.equal(rope[2, 4:, 0], torch.ones(4))
    x = torch.randn(2, 2, 17, 16)
    from pargen.models.raster_ar import apply_rope
    assert torch.allclose(apply_rope(x, ident).norm(dim=-1), x.norm(dim=-1), atol=1e-5)


def test_logits_are_causal(model):
    g = torch.Generator().manual_seed(0)
    tok = torch.randint(64, (2, 16), generator=g)
    lab = torch.tensor([3, -1])
    base = model(lab, tok)
    assert base.shape == (2, 16, 64)
    tok2 = tok.clone()
    tok2[:, 7] = (tok[:, 7] + 1) % 64
    out = model(lab, tok2)
    # logits at position i read tokens < i: changing token 7 changes positions 8.. only
    assert torch.allclose(out[:, :8], base[:, :8], atol=1e-6)
    assert (out[:, 8:] - base[:, 8:]).abs().amax() > 1e-4
    other = model(torch.tensor([4, 5]), tok)
    assert (other[:, 0] - base[:, 0]).abs().amax() > 1e-4  # the class token conditions everything


def test_kv_cached_windows_match_the_full_forward(model):
    g = torch.Generator().manual_seed(1)
    tok = torch.randint(64, (2, 16), generator=g)
    lab = torch.tensor([1, 2])
    full = model(lab, tok)
    cache = model.new_cache(2, like=full)
    pieces, pos = [], 0
    for n in (1, 4, 3, 8):  # class token, then windows of tokens
        h = model.embed(lab if pos == 0 else None, tok[:, max(pos - 1, 0): pos - 1 + n] if pos else tok[:, :n - 1])
        pieces.append(model.run(h, pos, cache))
        cache.commit(n)
        pos += n
    assert torch.allclose(torch.cat(pieces, 1), full, atol=1e-5)


@pytest.mark.parametrize("cfg, temperature", [(1.0, 1.0), (2.5, 1.0), (2.5, 0.0)])
def test_jacobi_decoding_reproduces_sequential_sampling(model, vq, cfg, temperature):
    lab = torch.tensor([0, 5, -1])
    kw = dict(cfg=cfg, temperature=temperature, top_k=20)
    a = AR.sample_raster(model, vq, lab, generator=torch.Generator().manual_seed(3), **kw)
    assert a.rounds == 16 and a.nfe == 16 and a.img.shape == (3, 1, 16, 16) and 0 <= a.img.min() <= a.img.max() <= 1
    for window in (None, 4):
        b = AR.sample_raster(model, vq, lab, generator=torch.Generator().manual_seed(3), method="jacobi",
                             window=window, **kw)
        assert torch.equal(a.tokens, b.tokens) and b.rounds <= 16 and b.result.converged
        assert not any(s.fallback for s in b.result.segments)
    c = AR.sample_raster(model, vq, lab, generator=torch.Generator().manual_seed(4), **kw)
    assert torch.equal(a.tokens, c.tokens) == (temperature == 0)  # only greedy decoding ignores the seed


def test_tokens_follow_the_model_distribution(model, vq):
    """Gumbel-max draws: the first token's frequencies over many seeds match softmax(logits / T)."""
    lab = torch.full((4000,), 2)
    with torch.no_grad():
        p = (model.run(model.embed(lab[:1], None))[0, -1] / 0.7).softmax(-1)
        op = AR.RasterOperator(model, lab, 1.0, 0.7, 0, 0.0,
                               AR.exponential_noise(4000, 16, 64, torch.Generator().manual_seed(0)))
        toks = op(torch.zeros(4000, 16, dtype=torch.long), 0, 1)[:, 0]
    freq = toks.bincount(minlength=64).double() / len(toks)
    assert (freq - p.double()).abs().max() < 0.03


def test_raster_training_lowers_the_loss():
    from pargen import data
    from pargen.training.loop import TrainConfig, train
    from pargen.training.losses import raster_loss

    ds = data.load("digits", "train", 16)
    torch.manual_seed(0)
    tok = registry.create("vq-tiny").eval().requires_grad_(False)
    res = train(registry.create("raster-tiny"), ds, partial(raster_loss, tokenizer=tok),
                TrainConfig(steps=25, batch_size=16, lr=3e-3, warmup=3, ema=0.0), progress=False)
    assert res.losses[0] == pytest.approx(torch.log(torch.tensor(64.0)).item(), rel=1e-3)  # zero head: uniform
    assert sum(res.losses[-5:]) < 0.9 * sum(res.losses[:5])


def test_speculative_jacobi_decoding_keeps_the_model_distribution_in_fewer_calls(model, vq):
    lab = torch.full((2000,), 2)
    with torch.no_grad():
        p0 = model.run(model.embed(lab[:1], None))[0, -1].softmax(-1).double()  # p(x0)
        grid = torch.zeros(64, 16, dtype=torch.long)
        grid[:, 0] = torch.arange(64)
        p1 = (p0[:, None] * model(lab[:64], grid)[:, 1].softmax(-1).double()).sum(0)  # p(x1) = sum p(x0) p(x1|x0)
        op = AR.RasterOperator(model, lab, 1.0, 1.0, 0, 0.0, None)
        toks, rounds, nfe = AR.speculative_jacobi(op, 2000, 16, 64, 8, torch.Generator().manual_seed(0))
    for i, p in ((0, p0), (1, p1)):
        freq = toks[:, i].bincount(minlength=64).double() / len(lab)
        assert (freq - p).abs().max() < 0.035, i  # 2000 draws: standard error <= 0.011
    calls = [AR.sample_raster(model, vq, lab[:1], method="sjd", window=8, generator=torch.Generator().manual_seed(s))
             .rounds for s in range(10)]
    assert max(calls) <= 16 and sum(calls) < 16 * 10  # at least one token per call, sometimes more
    with pytest.raises(ValueError, match="temperature"):
        AR.sample_raster(model, vq, lab[:2], method="sjd", temperature=0)
