import dataclasses
from pathlib import Path

import pytest
import torch

from pargen import registry
from pargen.convert.var import load_vae, vae_config
from pargen.errors import PargenError

from .conftest import oracle


@pytest.fixture(scope="module")
def var_oracle():
    return oracle("var_tiny.pt")


@pytest.fixture(scope="module")
def vae(var_oracle):
    return load_vae(var_oracle["vae_state_dict"], patch_nums=var_oracle["config"]["patch_nums"])


def test_oracle_vae_config_is_read_off_the_state_dict(var_oracle, vae):
    c = vae.config
    assert (c.vocab_size, c.z_channels, c.ch, c.ch_mult, c.share_quant_resi, c.img_size) == \
        (64, 16, 32, (1, 1, 2, 2, 4), 4, 64)
    assert c == registry.preset_config("msvq-var-tiny")[1]
    torch.testing.assert_close(torch.tensor(vae.quantize.quant_resi.ticks), var_oracle["vae"]["phi_ticks"])


def test_oracle_tokenizer_indices_fhat_and_teacher_forcing_input(var_oracle, vae):
    v = var_oracle["vae"]
    with torch.no_grad():
        torch.testing.assert_close(vae.encode(v["img"]), v["f_BChw"], atol=1e-5, rtol=1e-5)
        idx = vae.quantize.encode(v["f_BChw"])
        for got, ref in zip(idx, v["gt_idx_Bl"], strict=True):
            assert torch.equal(got, ref)
        assert [torch.equal(a, b) for a, b in zip(vae.img_to_indices(v["img"]), v["gt_idx_Bl"])] == [True] * 4
        for got, ref in zip(vae.quantize.encode(v["f_BChw"], to_fhat=True), v["fhat_per_scale"], strict=True):
            torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(vae.quantize.fhat_from_indices(v["gt_idx_Bl"]), v["fhat_per_scale"][-1],
                                   atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(vae.quantize.teacher_forcing_input(v["gt_idx_Bl"]), v["x_BLCv_wo_first_l"],
                                   atol=1e-6, rtol=1e-6)


def test_oracle_reconstruction_and_vq_training_forward(var_oracle, vae):
    v = var_oracle["vae"]
    with torch.no_grad():
        # the random decoder amplifies float32 rounding ~200x (a 1e-7 change of f_hat moves pixels by 2e-5; in
        # float64 ours is 1.4e-5 from the exact value, the reference 2.9e-5), hence 5e-5 here
        torch.testing.assert_close(vae.indices_to_img(v["gt_idx_Bl"]), v["rec_img"], atol=5e-5, rtol=1e-5)
        out = vae(v["img"])
    torch.testing.assert_close(out.rec, v["vae_forward_rec"], atol=5e-5, rtol=1e-5)
    torch.testing.assert_close(out.vq_loss, v["vq_loss"], atol=1e-7, rtol=1e-5)
    assert out.hits.shape == (4, 64) and out.hits.sum(1).tolist() == [4 * pn * pn for pn in (1, 2, 3, 4)]


def test_oracle_sampling_update_matches_teacher_forcing(var_oracle, vae):
    """next_input (sampling) rebuilds the same f_hat and next-scale maps as the teacher-forcing input."""
    v = var_oracle["vae"]
    q = vae.quantize
    B, C = 4, q.Cvae
    f_hat = torch.zeros(B, C, 4, 4)
    maps = []
    with torch.no_grad():
        for si, pn in enumerate(q.patch_nums):
            h = q.embedding(v["gt_idx_Bl"][si]).transpose(1, 2).reshape(B, C, pn, pn)
            f_hat, nxt = q.next_input(si, f_hat, h)
            if nxt is not None:
                maps.append(nxt.flatten(2).transpose(1, 2))
    torch.testing.assert_close(torch.cat(maps, 1), v["x_BLCv_wo_first_l"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(f_hat, v["fhat_per_scale"][-1], atol=1e-6, rtol=1e-6)


def test_official_vae_layout_on_the_meta_device():
    """vae_ch160v4096z32.pth: 324 keys; encoder 44.11M, decoder 64.65M, quantizer 0.17M parameters."""
    with torch.device("meta"):
        m = registry.create("msvq-var-f16")
    sd = m.state_dict()
    assert len(sd) == 324
    shapes = {"encoder.conv_out.weight": (32, 640, 3, 3), "decoder.conv_in.weight": (640, 32, 3, 3),
              "decoder.conv_out.weight": (3, 160, 3, 3), "quantize.ema_vocab_hit_SV": (10, 4096),
              "quantize.embedding.weight": (4096, 32), "quantize.quant_resi.qresi_ls.3.weight": (32, 32, 3, 3),
              "post_quant_conv.weight": (32, 32, 3, 3), "encoder.down.4.attn.1.qkv.weight": (1920, 640, 1, 1),
              "decoder.up.4.attn.2.proj_out.weight": (640, 640, 1, 1), "decoder.up.1.upsample.conv.weight":
              (160, 160, 3, 3)}
    for k, s in shapes.items():
        assert tuple(sd[k].shape) == s, k
    count = lambda mod: round(sum(p.numel() for p in mod.parameters()) / 1e6, 2)  # noqa: E731
    assert (count(m.encoder), count(m.decoder), count(m.quantize)) == (44.11, 64.65, 0.17)
    assert vae_config({k: torch.empty(v.shape) for k, v in sd.items()}) == m.config


def test_official_format_pth_loads_with_weights_only(tmp_path, var_oracle):
    path = tmp_path / "vae.pth"
    torch.save(var_oracle["vae_state_dict"], path)
    model = load_vae(path, patch_nums=(1, 2, 3, 4))
    assert torch.equal(model.quantize.embedding.weight, var_oracle["vae_state_dict"]["quantize.embedding.weight"])
    bad = dict(var_oracle["vae_state_dict"])
    bad.pop("post_quant_conv.bias")
    with pytest.raises(PargenError, match="does not match"):
        load_vae(bad, patch_nums=(1, 2, 3, 4))
    with pytest.raises(PargenError, match="pass patch_nums"):
        load_vae(var_oracle["vae_state_dict"])
    with pytest.raises(PargenError, match="no such file"):
        load_vae(tmp_path / "missing.pth")


# -- transformer -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def var_model(var_oracle):
    from pargen.convert.var import load_var

    return load_var(var_oracle["var_state_dict"])


def test_oracle_var_config_and_mask(var_oracle, var_model):
    assert var_model.config == registry.preset_config("var-tiny")[1]
    assert torch.equal(var_model.attn_bias_for_masking, var_oracle["train"]["attn_bias_for_masking"])


def test_oracle_training_forward_logits_loss_and_gradients(var_oracle, var_model):
    t, x = var_oracle["train"], var_oracle["vae"]["x_BLCv_wo_first_l"]
    model = var_model.train()
    model.zero_grad()
    torch.manual_seed(t["torch_seed_before_forward"])  # the reference draws the cond-drop mask from torch's RNG
    logits = model(t["label_B"], x)
    torch.testing.assert_close(logits, t["logits_BLV"], atol=1e-5, rtol=1e-5)
    loss = model.loss(logits, t["gt_BL"])
    torch.testing.assert_close(loss, t["loss"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model.loss(logits.detach(), t["gt_BL"], 0.1), t["loss_label_smooth_0p1"],
                               atol=1e-6, rtol=1e-6)
    loss.backward()
    params = dict(model.named_parameters())
    assert set(t["grads"]) == {n for n, p in params.items() if p.requires_grad}
    for name, g in t["grads"].items():
        torch.testing.assert_close(params[name].grad, g, atol=1e-6, rtol=1e-5, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(model(t["label_B"], x, cond_drop=0.0), t["logits_BLV_no_cond_drop"],
                                   atol=1e-5, rtol=1e-5)
    model.eval()


@pytest.mark.parametrize("setting", ["cfg1.5_plain", "cfg4_topk20_topp0.9", "cfg1.5_smooth", "uncond_label-1",
                                     "label_None_sampled"])
def test_oracle_next_scale_sampling(var_oracle, var_model, vae, setting):
    from pargen.samplers import autoregressive as AR

    o = var_oracle["infer"][setting]
    kw = dict(o["kwargs"])
    g = torch.Generator().manual_seed(kw.pop("g_seed"))
    res = AR.sample(var_model, vae, kw.pop("label_B"), batch=4, generator=g, trace=True, **kw)
    assert res.rounds == 4
    for si, step in enumerate(res.trace):
        assert torch.equal(step["idx_Bl"], o["idx_Bl"][si]), f"scale {si}"  # same random numbers, same tokens
        for key in ("logits_after_cfg", "h_BChw", "f_hat"):
            torch.testing.assert_close(step[key], o[key][si], atol=1e-5, rtol=1e-5, msg=f"{key} scale {si}")
        if step["next_token_map_Cvae"] is not None:  # (the reference repeats f_hat at the last scale)
            torch.testing.assert_close(step["next_token_map_Cvae"], o["next_token_map_Cvae"][si], atol=1e-5,
                                       rtol=1e-5)
    torch.testing.assert_close(res.img, o["img"], atol=5e-5, rtol=1e-5)  # decoder amplification, see above


def test_uncached_sampling_gives_the_same_tokens(var_oracle, var_model, vae):
    from pargen.samplers import autoregressive as AR

    kw = dict(cfg=4.0, top_k=20, top_p=0.9)
    a = AR.sample(var_model, vae, torch.tensor([1, 7, 3, 9]), generator=torch.Generator().manual_seed(3), **kw)
    b = AR.sample(var_model, vae, torch.tensor([1, 7, 3, 9]), generator=torch.Generator().manual_seed(3),
                  kv_cache=False, **kw)
    assert all(torch.equal(p, q) for p, q in zip(a.indices, b.indices))
    torch.testing.assert_close(a.img, b.img, atol=1e-5, rtol=1e-5)


def test_official_var_d16_layout_on_the_meta_device(tmp_path):
    """var_d16.pth: 220 keys, C 1024, 16 heads, L 680, 310.28M parameters, and the config read back from them."""
    from pargen.convert.var import var_config

    with torch.device("meta"):
        m = registry.create("var-d16")
    sd = m.state_dict()
    assert len(sd) == 220
    shapes = {"pos_start": (1, 1, 1024), "pos_1LC": (1, 680, 1024), "lvl_1L": (1, 680),
              "attn_bias_for_masking": (1, 1, 680, 680), "word_embed.weight": (1024, 32),
              "class_emb.weight": (1001, 1024), "lvl_embed.weight": (10, 1024),
              "blocks.15.attn.scale_mul_1H11": (1, 16, 1, 1), "blocks.0.attn.zero_k_bias": (1024,),
              "blocks.3.attn.mat_qkv.weight": (3072, 1024), "blocks.0.ffn.fc1.weight": (4096, 1024),
              "blocks.0.ada_lin.1.weight": (6144, 1024), "head_nm.ada_lin.1.weight": (2048, 1024),
              "head.weight": (4096, 1024)}
    for k, s in shapes.items():
        assert tuple(sd[k].shape) == s, k
    assert sd["lvl_1L"].dtype == torch.int64
    assert round(sum(p.numel() for p in m.parameters()) / 1e6, 2) == 310.28
    fake = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in sd.items()}
    fake["lvl_1L"] = torch.cat([torch.full((p * p,), i) for i, p in enumerate(m.config.patch_nums)]).view(1, -1)
    assert var_config(fake) == dataclasses.replace(m.config, width=1024, heads=16)  # the depth rule, spelled out


def test_official_format_var_pth_loads_with_weights_only(tmp_path, var_oracle):
    from pargen.convert.var import load_var

    path = tmp_path / "var.pth"
    torch.save(var_oracle["var_state_dict"], path)
    assert torch.equal(load_var(path).head.weight, var_oracle["var_state_dict"]["head.weight"])
    bad = {k: v for k, v in var_oracle["var_state_dict"].items() if k != "head.bias"}
    with pytest.raises(PargenError, match="does not match"):
        load_var(bad)


def test_inpainting_forces_known_tokens_at_every_scale(var_oracle, var_model, vae):
    from pargen.samplers import autoregressive as AR

    img = var_oracle["vae"]["img"]
    everything = AR.known_region(vae, img, torch.ones(4, 1, 64, 64))
    res = AR.sample(var_model, vae, torch.tensor([1, 7, 3, 9]), generator=torch.Generator().manual_seed(0),
                    known=everything)
    for got, ref in zip(res.indices, var_oracle["vae"]["gt_idx_Bl"], strict=True):
        assert torch.equal(got, ref)  # all known: the sampler reproduces the encoding ...
    with torch.no_grad():
        # ... and its image (f_hat summed while sampling vs. re-summed from the indices: float32 order, ~2e-5)
        torch.testing.assert_close(res.img, vae.indices_to_img(res.indices).add(1).mul(0.5), atol=1e-4, rtol=1e-4)
    keep = torch.ones(4, 1, 64, 64)
    keep[:, :, 16:48, 16:48] = 0  # in-paint the centre
    region = AR.known_region(vae, img, keep)
    assert [int(m.sum()) for m in region.mask] == [4, 16, 4 * 8, 4 * 12]  # only the centre cells are generated
    part = AR.sample(var_model, vae, torch.tensor([1, 7, 3, 9]), generator=torch.Generator().manual_seed(0),
                     known=region)
    free = AR.sample(var_model, vae, torch.tensor([1, 7, 3, 9]), generator=torch.Generator().manual_seed(0))
    changed = 0
    for si, (got, m) in enumerate(zip(part.indices, region.mask)):
        assert torch.equal(got[m], region.indices[si][m])
        changed += int((got[~m] != free.indices[si][~m]).sum())
    assert changed > 0  # the generated tokens see the forced context


def test_vq_training_restarts_dead_codes_and_uses_more_of_the_codebook():
    from functools import partial

    from pargen import data
    from pargen.training.loop import TrainConfig, train
    from pargen.training.losses import vq_loss

    ds = data.load("digits", "train", 32)
    used = {}
    for restart in (False, True):
        torch.manual_seed(0)
        model = registry.create("msvq-mnist", vocab_size=128)
        res = train(model, ds, partial(vq_loss, restart=restart), TrainConfig(steps=30, batch_size=16, lr=2e-3,
                    warmup=5, ema=0.0), progress=False)
        assert sum(res.losses[-5:]) < sum(res.losses[:5])
        with torch.no_grad():
            idx = res.model.eval().img_to_indices(ds.float(slice(0, 256)))
        used[restart] = len(torch.cat([i.flatten() for i in idx]).unique())
    assert used[True] > 1.5 * used[False], used  # measured 82 vs 47 of 128 codes


def test_convert_official_var_and_vae_then_sample(tmp_path, var_oracle):
    from pargen import checkpoint
    from pargen.cli.main import main

    torch.save(var_oracle["var_state_dict"], tmp_path / "var.pth")
    torch.save(var_oracle["vae_state_dict"], tmp_path / "vae.pth")
    out = tmp_path / "conv" / "var-tiny"
    assert main(["convert", "var", str(tmp_path / "var.pth"), "--vae", str(tmp_path / "vae.pth"),
                 "--out", str(out)]) == 0
    var, meta = checkpoint.load(out)
    assert meta["tokenizer"] == "var-tiny-vae"  # named relative to the model's folder: the two move together
    tok, tmeta = checkpoint.load(out.parent / meta["tokenizer"])
    assert meta["family"] == "var" and tmeta["family"] == "msvq" and tok.config.patch_nums == var.config.patch_nums
    assert torch.equal(var.head.weight, var_oracle["var_state_dict"]["head.weight"])
    assert main(["sample", str(out), "--n", "2", "--out", str(tmp_path / "g.png")]) == 0
    assert main(["convert", "var", str(tmp_path / "var.pth"), "--out", str(out)]) == 2  # --vae is required


def test_a_converted_model_and_its_tokenizer_move_together(tmp_path, var_oracle, monkeypatch, capsys):
    """Converted with relative paths, then moved and loaded from elsewhere: the tokenizer is found beside the
    model; without it, one line says where it was looked for."""
    import pargen
    from pargen.cli.main import main
    from pargen.errors import PargenError

    torch.save(var_oracle["var_state_dict"], tmp_path / "var.pth")
    torch.save(var_oracle["vae_state_dict"], tmp_path / "vae.pth")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert main(["convert", "var", "../var.pth", "--vae", "../vae.pth", "--out", "models/var-tiny"]) == 0
    ref = pargen.load("models/var-tiny").sample([3, 4]).images
    from pargen.convert import var as convert_var  # the library call the command is a shell over

    out, vae_out = convert_var.convert("../var.pth", "../vae.pth", "lib/var-tiny")
    assert (out, vae_out) == (Path("lib/var-tiny"), Path("lib/var-tiny-vae"))
    assert torch.equal(pargen.load(out).sample([3, 4]).images, ref)
    (tmp_path / "work" / "models").rename(tmp_path / "moved")
    monkeypatch.chdir(tmp_path)
    assert torch.equal(pargen.load("moved/var-tiny").sample([3, 4]).images, ref)
    with pytest.raises(PargenError, match="raster-mnist makes 1x32x32 images from 64 tokens, var-tiny 3x64x64"):
        pargen.load("moved/var-tiny").bench(batches=[1], repeats=1)  # the MNIST raster baseline is no peer here
    capsys.readouterr()
    assert main(["analyze", "var", "moved/var-tiny", "--degrees", "1", "--n", "2"]) == 0  # no dataset named
    assert "analyze var-tiny: 2 of its own samples, head dimension 64" in capsys.readouterr().out
    assert main(["analyze", "var", "moved/var-tiny", "--degrees", "1", "--data", "mnist"]) == 2
    assert "mnist has images 1x64x64, var-tiny makes 3x64x64" in capsys.readouterr().err
    for f in (tmp_path / "moved").glob("var-tiny-vae.*"):
        f.unlink()
    capsys.readouterr()
    assert main(["sample", "moved/var-tiny", "--n", "2", "--out", "g.png"]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint 'var-tiny-vae' (not in moved, beside the checkpoint that names it;" in err, err
