"""Coarse-to-fine token prediction: clustering, the two stages, sampling and its cluster mask."""
from functools import partial

import pytest
import torch

from pargen import registry
from pargen.samplers import autoregressive as AR
from pargen.tokenizers.cluster import coarse_labels


def test_kmeans_groups_nearby_codes_and_random_is_balanced():
    g = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=1)
    codes = (centres.repeat_interleave(16, 0) + 0.01 * torch.randn(64, 8, generator=g))
    lab = coarse_labels(codes, 4, "kmeans")
    assert lab.shape == (64,) and lab.unique().numel() == 4
    for i in range(4):  # each true group lands in one cluster
        assert lab[16 * i: 16 * (i + 1)].unique().numel() == 1
    rnd = coarse_labels(codes, 4, "random", seed=1)
    assert torch.equal(rnd.bincount(), torch.full((4,), 16))
    with pytest.raises(ValueError):
        coarse_labels(codes, 65)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    vq = registry.create("vq-tiny").eval()
    model = registry.create("c2f-tiny").eval()
    model.set_clusters(vq.quantize.embedding.weight)
    with torch.no_grad():  # non-trivial heads for the sampling tests
        model.stage1.output.weight.normal_(0, 0.5)
        model.aux.output.weight.normal_(0, 0.5)
    return model, vq


def test_stage_two_is_bidirectional_and_stage_one_causal(setup):
    model, _ = setup
    lab = torch.tensor([1, 2])
    coarse = torch.randint(8, (2, 16), generator=torch.Generator().manual_seed(0))
    out = model.fine_logits(lab, coarse)
    coarse2 = coarse.clone()
    coarse2[:, 10] = (coarse[:, 10] + 1) % 8
    out2 = model.fine_logits(lab, coarse2)
    assert out.shape == (2, 16, 64) and (out2[:, :10] - out[:, :10]).abs().amax() > 1e-5  # sees later labels
    l1, l2 = model(lab, torch.randint(64, (2, 16)))
    assert l1.ndim == 0 and l2.ndim == 0 and torch.isfinite(l1 + l2)


@pytest.mark.parametrize("mask", [True, False])
def test_sampling_keeps_fine_labels_in_their_clusters_when_masked(setup, mask):
    model, vq = setup
    lab = torch.tensor([0, 3, -1, 5])
    r = AR.sample_c2f(model, vq, lab, cfg=2.0, generator=torch.Generator().manual_seed(0), mask_to_cluster=mask)
    assert r.tokens.shape == (4, 16) and r.coarse.shape == (4, 16) and r.rounds == 17 and r.nfe == 32
    inside = model.assign[r.tokens] == r.coarse
    assert bool(inside.all()) if mask else not bool(inside.all())
    j = AR.sample_c2f(model, vq, lab, cfg=2.0, generator=torch.Generator().manual_seed(0), mask_to_cluster=mask,
                      method="jacobi")
    assert torch.equal(j.tokens, r.tokens) and j.rounds <= 17  # Jacobi decoding of stage 1: same images


def test_members_table_and_draw_among_members_follow_the_masked_softmax(setup):
    model, _ = setup
    table = model.members()
    for k in range(model.config.coarse):
        assert sorted(v for v in table[k].tolist() if v >= 0) == torch.nonzero(model.assign == k).flatten().tolist()
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 1, model.config.vocab_size, generator=g).mul(2).expand(40_000, 1, -1)
    cand = table[3].expand(40_000, 1, -1)
    draws = AR.pick_among(logits, cand, AR.exponential_noise(40_000, 1, table.shape[1], g), 1.0)[:, 0]
    want = logits[0, 0].masked_fill(model.assign != 3, -torch.inf).softmax(-1)
    freq = torch.bincount(draws, minlength=model.config.vocab_size).double() / len(draws)
    assert freq[model.assign != 3].sum() == 0  # only members are drawn ...
    assert (freq - want.double()).abs().max() < 0.01  # ... with the masked softmax's probabilities (4 sigma)


def test_training_lowers_both_losses_from_uniform():
    from pargen import data
    from pargen.training.loop import TrainConfig, train
    from pargen.training.losses import c2f_loss

    ds = data.load("digits", "train", 16)
    torch.manual_seed(0)
    tok = registry.create("vq-tiny").eval().requires_grad_(False)
    model = registry.create("c2f-tiny")
    model.set_clusters(tok.quantize.embedding.weight)
    res = train(model, ds, partial(c2f_loss, tokenizer=tok), TrainConfig(steps=25, batch_size=16, lr=3e-3, warmup=3,
                ema=0.0), progress=False)
    assert res.losses[0] == pytest.approx(float(torch.log(torch.tensor(8.0 * 64))), rel=1e-3)  # zero heads
    assert sum(res.losses[-5:]) < 0.9 * sum(res.losses[:5])
