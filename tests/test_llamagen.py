"""LlamaGen compatibility: pargen's raster AR model and VQ tokenizer against the official code's outputs
(`../shared/oracles/llamagen_tiny.pt`, FoundationVision/LlamaGen @ ce98ec41, made at 1 thread), the official
presets' state-dict shapes, `pargen convert llamagen`, and the fast decoders on the official tiny model."""
import argparse
import subprocess
import sys

import pytest
import torch

from pargen import registry
from pargen.convert import llamagen as L
from pargen.samplers import autoregressive as AR

from .conftest import oracle

B, N, V = 3, 16, 64


@pytest.fixture(scope="module")
def lg():
    return oracle("llamagen_tiny.pt")


@pytest.fixture(autouse=True)
def one_thread():
    """The oracle was made at 1 thread (at 2, some outputs move in the last bits)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def gpt(lg):
    return L.load_gpt(lg["gpt_state_dict"], image_size=16, heads=4, downsample=4)


@pytest.fixture(scope="module")
def vq(lg):
    return L.load_vq(lg["vq_state_dict"], image_size=16)


def test_oracle_config_is_read_off_the_state_dict(lg, gpt):
    c, o = gpt.config, lg["gpt_config"]
    assert (c.vocab_size, c.width, c.depth, c.heads, c.kv, c.num_classes, c.tokens) == (
        o["vocab_size"], o["dim"], o["n_layer"], o["n_head"], o["n_kv_head"], o["num_classes"], o["block_size"])
    assert c.ffn_hidden == 256 and c.class_rope == "zero"
    assert L.load_gpt(lg["gpt_gqa_state_dict"], 16, heads=4, downsample=4).config.kv == 2
    with pytest.raises(Exception, match="not a LlamaGen preset"):
        L.gpt_config(lg["gpt_state_dict"])  # width 64 x depth 2: the head count is not in the shapes


def test_oracle_teacher_forced_logits_and_grouped_query_attention(lg, gpt):
    lab, tok = lg["tf_labels"], lg["tf_tokens"]
    # bit for bit on the CPU that made the oracle; another CPU's float32 kernels move the last bits (3.5e-6 of
    # logits up to 7 on an AMX machine), so the bound is float32 rounding, not equality
    close = dict(rtol=0, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(gpt.run(gpt.embed(lab, tok)), lg["tf_eval_logits"], **close)
        assert torch.allclose(gpt(lab, tok), lg["tf_eval_logits"][:, :N], **close)
        gqa = L.load_gpt(lg["gpt_gqa_state_dict"], 16, heads=4, downsample=4)
        full = gqa.run(gqa.embed(lab, tok))
        assert torch.allclose(full, lg["gqa_tf_eval_logits"], **close)
        # pargen's KV cache holds the 2 key/value heads (the official cache crashes on grouped-query attention)
        cache = gqa.new_cache(B, like=gqa.rope)
        assert cache.k.shape[2] == 2
        steps = [gqa.run(gqa.embed(lab, None), 0, cache)]
        cache.commit(1)
        for i in range(N - 1):
            steps.append(gqa.run(gqa.embed(None, tok[:, i: i + 1]), i + 1, cache))
            cache.commit(1)
    torch.testing.assert_close(torch.cat(steps, 1), full[:, :N], atol=1e-5, rtol=0)


def test_oracle_kv_cache_prefill_and_decode_logits(lg, gpt):
    lab, tok = lg["tf_labels"], lg["tf_tokens"]
    cache = gpt.new_cache(B, like=gpt.rope)
    with torch.no_grad():
        steps = [gpt.run(gpt.embed(lab, None), 0, cache)]  # prefill: the class token
        cache.commit(1)
        for i in range(N - 1):
            steps.append(gpt.run(gpt.embed(None, tok[:, i: i + 1]), i + 1, cache))
            cache.commit(1)
    # the official cached path is itself 4.8e-6 from its full forward; the 17th position predicts nothing
    torch.testing.assert_close(torch.cat(steps, 1), lg["tf_kvcache_logits"][:, :N], atol=1e-5, rtol=0)


NAMES = ["seed0_cfg1_plain", "seed0_cfg1_topk10_topp0.9_temp0.9", "seed0_cfg4_plain",
         "seed0_cfg4_topk10_topp0.9_temp0.9", "seed1_cfg1_plain", "seed1_cfg1_topk10_topp0.9_temp0.9",
         "seed1_cfg4_plain", "seed1_cfg4_topk10_topp0.9_temp0.9", "seed0_cfg4_interval5_plain", "seed0_cfg4_greedy"]


def _official_run(gpt, lg, name, method="sequential", window=None):
    """pargen's decoder in the official call protocol: seed the global generator, draw the noise, decode."""
    p = lg["samples"][name]["params"]
    t = p["temperature"] if p["sample_logits"] else 0.0
    torch.manual_seed(p["seed"])
    noise = AR.exponential_noise(B, N, V) if t > 0 else None  # LlamaGen draws one (B, V) set per token
    kw = dict(cfg=p["cfg_scale"], temperature=t, top_k=p["top_k"], top_p=p["top_p"], noise=noise, method=method,
              window=window, cfg_interval=int(p["cfg_interval"]))
    x, rounds, nfe, res = AR.raster_tokens(gpt, lg["gen_labels"], **kw)
    return x, torch.get_rng_state(), rounds, kw


@pytest.mark.parametrize("name", NAMES)
def test_oracle_generate_same_tokens_probs_and_generator_state(lg, gpt, name):
    ref = lg["samples"][name]
    x, state, rounds, kw = _official_run(gpt, lg, name)
    assert len(lg["samples"]) == len(NAMES) and rounds == N
    assert torch.equal(x.to(torch.int32), ref["tokens"])
    assert torch.equal(state, ref["rng_state_after"])  # the same draws, in the same order, and nothing more
    op = AR.RasterOperator(gpt, lg["gen_labels"], kw["cfg"], ref["params"]["temperature"], kw["top_k"], kw["top_p"],
                           None, kw["cfg_interval"])
    with torch.no_grad():
        probs = op.probs(x, 0, N)  # every step's distribution in one teacher-forced pass over the drawn tokens
        logits = op.logits(x, 0, N)
    torch.testing.assert_close(probs, ref["step_probs"], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, ref["step_logits"], atol=1e-4, rtol=0)
    jx, jstate, jrounds, _ = _official_run(gpt, lg, name, method="jacobi", window=8)
    assert torch.equal(jx, x) and torch.equal(jstate, state) and jrounds <= N  # Jacobi: the same tokens


def test_oracle_cfg_interval_guides_the_first_tokens_only(lg, gpt):
    a = lg["samples"]["seed0_cfg4_interval5_plain"]["step_logits"]
    b = lg["samples"]["seed0_cfg4_plain"]["step_logits"]
    assert torch.equal(a[:, :1], b[:, :1])  # the same seed: identical up to the first token that differs
    op = AR.RasterOperator(gpt, lg["gen_labels"], 4.0, 1.0, 0, 0.0, None, cfg_interval=5)
    x = lg["samples"]["seed0_cfg4_interval5_plain"]["tokens"].long()
    with torch.no_grad():
        cond = gpt.run(gpt.embed(lg["gen_labels"], x[:, :-1]))
        got = op.logits(x, 0, N)
    assert torch.equal(got[:, 7:], cond[:, 7:])  # tokens 7.. are unguided
    assert (got[:, :7] - cond[:, :7]).abs().amax() > 1e-3


def test_oracle_vq_encode_quantise_decode(lg, vq):
    v = lg["vq"]
    with torch.no_grad():
        h = vq.encoder(v["input"])
        torch.testing.assert_close(h, v["encoder_out"], atol=1e-5, rtol=0)
        torch.testing.assert_close(vq.quant_conv(h), v["pre_quant"], atol=1e-5, rtol=0)
        idx = vq.img_to_indices(v["input"])
        assert torch.equal(idx.flatten(), v["indices"])
        zq = vq.quantize(vq.quant_conv(h))[0]
        torch.testing.assert_close(zq, v["quant"], atol=1e-6, rtol=0)
        torch.testing.assert_close(vq.decoder(vq.post_quant_conv(zq)), v["decoded"], atol=5e-5, rtol=0)
        entry = vq.quantize.lookup(idx, 4, 4)
        assert torch.equal(entry, v["codebook_entry_quant"])
        torch.testing.assert_close(vq.indices_to_img(idx), v["decode_code_of_indices"].clamp(-1, 1), atol=5e-5,
                                   rtol=0)
        for name, img in lg["vq_decode_code_of_samples"].items():
            toks = lg["samples"][name]["tokens"].long()
            torch.testing.assert_close(vq.indices_to_img(toks), img.clamp(-1, 1), atol=5e-5, rtol=0)


@pytest.mark.parametrize("preset", ["GPT-B", "GPT-L", "GPT-XL", "GPT-XXL", "GPT-XXXL", "GPT-3B"])
def test_official_gpt_presets_load_strictly(lg, preset):
    ref = lg["preset_shapes"][preset]
    with torch.device("meta"):
        model = registry.create(f"llamagen-{preset[4:].lower()}")
        sd = {k: torch.empty(s) for k, s in ref["shapes"].items()}
    own = {k: list(v.shape) for k, v in model.state_dict().items()}
    layer0 = {k: v for k, v in own.items() if not k.startswith("layers.") or k.startswith("layers.0.")}
    assert layer0 == ref["shapes"]  # the shapes file lists layer 0 and the shared tensors
    assert sum(p.numel() for p in model.parameters()) == ref["n_params"]
    assert (model.config.width, model.config.depth, model.config.heads) == (ref["dim"], ref["n_layer"], ref["n_head"])
    layers = {k.replace("layers.0.", f"layers.{i}."): v for k, v in sd.items() if k.startswith("layers.0.")
              for i in range(ref["n_layer"])}
    full = {**{k: v for k, v in sd.items() if not k.startswith("layers.")}, **layers}
    assert L.gpt_config(full) == model.config  # heads from the preset table, FFN and classes off the shapes
    assert set(full) == set(model.state_dict())


def test_official_vq16_loads_strictly(lg):
    ref = lg["preset_shapes"]["VQ-16"]
    with torch.device("meta"):
        sd = {k: torch.empty(s) for k, s in ref["shapes"].items()}
        cfg = L.vq_config(sd)
        model = registry.build("vq", cfg)
        mapped = L.vq_state(sd, len(cfg.ch_mult))
    assert (cfg.vocab_size, cfg.code_dim, cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.z_channels, cfg.grid) == (
        16384, 8, 128, (1, 1, 2, 2, 4), 2, 256, 16)
    own = {k: list(v.shape) for k, v in model.state_dict().items() if not k.endswith("ema_vocab_hit_SV")}
    assert {k: list(v.shape) for k, v in mapped.items()} == own  # every pargen key filled, every official one used
    assert sum(p.numel() for p in model.parameters()) == ref["n_params"]


def test_convert_cli_reads_training_checkpoints_and_refuses_code(lg, tmp_path):
    gpt_pt, vq_pt = tmp_path / "c2i_tiny.pt", tmp_path / "vq_tiny.pt"
    # as LlamaGen's train_c2i.py saves them: the weights under "model", argparse's namespace under "args"
    torch.save({"model": lg["gpt_state_dict"], "steps": 10, "args": argparse.Namespace(gpt_model="tiny")}, gpt_pt)
    torch.save({"model": lg["vq_state_dict"]}, vq_pt)
    out = tmp_path / "tiny"
    cmd = [sys.executable, "-m", "pargen", "convert", "llamagen", str(gpt_pt), str(vq_pt), "--out", str(out),
           "--image-size", "16", "--heads", "4"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "4x4 tokens of 64" in r.stdout
    import pargen

    pipe = pargen.load(out)
    res = pipe.sample([0, 1], labels=[3, 7], method="sequential", cfg=4.0)
    assert res.images.shape == (2, 3, 16, 16) and res.cost["rounds"] == N
    jac = pipe.sample([0, 1], labels=[3, 7], method="jacobi", cfg=4.0)
    assert torch.equal(jac.images, res.images)

    class Evil:  # a pickle that needs code to load
        def __reduce__(self):
            return (print, ("ran",))

    bad = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, bad)
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], listed)
    for f, msg in ((bad, "never unpickles code"), (listed, "holds a list"), (vq_pt, "not a LlamaGen c2i GPT")):
        r = subprocess.run([sys.executable, "-m", "pargen", "convert", "llamagen", str(f), "--out",
                            str(tmp_path / "x")], capture_output=True, text=True)
        assert r.returncode != 0 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert "ran" not in r.stdout


def test_speculative_jacobi_keeps_the_official_model_distribution(lg, gpt):
    """The first two tokens of SJD runs on the official tiny model follow p(x0) and p(x1) = sum p(x0) p(x1|x0)."""
    lab = torch.full((2000,), 3)
    with torch.no_grad():
        p0 = gpt.run(gpt.embed(lab[:1], None))[0, -1].softmax(-1).double()
        grid = torch.zeros(V, N, dtype=torch.long)
        grid[:, 0] = torch.arange(V)
        p1 = (p0[:, None] * gpt(lab[:V], grid)[:, 1].softmax(-1).double()).sum(0)
        op = AR.RasterOperator(gpt, lab, 1.0, 1.0, 0, 0.0, None)
        toks, rounds, nfe = AR.speculative_jacobi(op, 2000, N, V, 8, torch.Generator().manual_seed(0))
    for i, p in ((0, p0), (1, p1)):
        freq = toks[:, i].bincount(minlength=V).double() / len(lab)
        assert (freq - p).abs().max() < 0.035, i  # 2000 draws: standard error <= 0.011
    assert rounds <= N  # the batch waits for its slowest sample; one image alone often takes fewer calls
    calls = []
    for s in range(10):
        op = AR.RasterOperator(gpt, lab[:1], 1.0, 1.0, 0, 0.0, None)
        calls.append(AR.speculative_jacobi(op, 1, N, V, 8, torch.Generator().manual_seed(s))[1])
    assert max(calls) <= N and sum(calls) < N * 10


def test_ctf_stages_are_llamagen_blocks(lg):
    """A CTF model over a LlamaGen backbone: both stages carry the official layout (stage 1 a c2i GPT over the
    coarse labels; the auxiliary stage the same blocks, bidirectional, reading coarse labels)."""
    cfg = registry.preset_config("c2f-tiny", [])[1]
    import dataclasses

    cfg = dataclasses.replace(cfg, ffn_multiple=256, width=64, heads=4, aux_width=64, aux_heads=4, depth=2,
                              num_classes=10, coarse=64, vocab_size=256)
    model = registry.build("c2f", cfg)
    stage1 = {k[len("stage1."):]: v.shape for k, v in model.state_dict().items() if k.startswith("stage1.")}
    assert stage1 == {k: v.shape for k, v in lg["gpt_state_dict"].items()}
    model.stage1.load_state_dict(lg["gpt_state_dict"])  # an official GPT is a CTF stage 1, strictly
    aux = {k for k in model.state_dict() if k.startswith("aux.")}
    assert "aux.layers.0.attention.wqkv.weight" in aux and "aux.cls_embedding.embedding_table.weight" in aux


def test_bench_raster_times_the_tokens_of_a_gpt_without_tokenizer(lg, tmp_path):
    import json

    from pargen.cli.main import main
    from pargen.errors import PargenError

    assert main(["convert", "llamagen", str(_saved(lg, tmp_path)), "--out", str(tmp_path / "gpt"),
                 "--image-size", "64", "--heads", "4"]) == 0  # no VQ: stride 16, so 64 px is the 4x4 grid
    js = tmp_path / "b.json"
    assert main(["bench", "raster", "--checkpoint", str(tmp_path / "gpt"), "--batch", "2", "--repeats", "1",
                 "--cfg", "4", "--json", str(js)]) == 0
    recs = json.loads(js.read_text())
    assert [r["method"] for r in recs] == ["raster-ar", "raster-ar-jacobi", "raster-ar-sjd"]
    seq, jac, sjd = recs
    assert seq["rounds"] == N and jac["max_abs_err"] == 0 and jac["rounds"] <= N and sjd["max_abs_err"] is None
    with pytest.raises(PargenError, match="no tokenizer"):
        import pargen

        pargen.load(tmp_path / "gpt").sample([0])


def _saved(lg, tmp_path):
    path = tmp_path / "gpt.pt"
    torch.save(lg["gpt_state_dict"], path)
    return path


def test_token_models_without_a_tokenizer(tmp_path):
    """A raster GPT converted without its VQ loads (its tokens can be benched); VAR still needs its tokenizer."""
    import pargen
    from pargen import checkpoint
    from pargen.errors import PargenError

    checkpoint.save(tmp_path / "var", registry.create("var-tiny"))
    with pytest.raises(PargenError, match="needs --tokenizer"):
        pargen.load(tmp_path / "var")
    checkpoint.save(tmp_path / "raster", registry.create("raster-tiny"))
    assert pargen.load(tmp_path / "raster").tokenizer is None
