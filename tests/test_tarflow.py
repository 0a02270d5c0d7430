import math

import pytest
import torch

from pargen import registry
from pargen.convert.tarflow import clean_state_dict, from_state_dict, infer_config
from pargen.samplers import flow

from .conftest import oracle

CASES = ["cond_8x8_p2", "uncond_16x16_p4", "vp_8x8_p2"]
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def tar():
    return oracle("tarflow_tiny.pt")


def load_case(tar, name):
    case = tar["cases"][name]
    f = case["float32"]
    model = from_state_dict(f["state_dict"], in_channels=case["config"]["in_channels"])
    y = f["y"] if case["config"]["num_classes"] else None
    return model, f, y


@pytest.mark.parametrize("name", CASES)
def test_oracle_forward(tar, name):
    model, f, y = load_case(tar, name)
    with torch.no_grad():
        torch.testing.assert_close(model.patchify(f["x"]), f["patches"], atol=0, rtol=0)
        out = model(f["x"], y)
        torch.testing.assert_close(out.z, f["z"], **TOL)
        torch.testing.assert_close(out.logdet, f["logdets"], **TOL)
        assert len(out.block_outputs) == len(f["block_outputs"])
        for got, ref in zip(out.block_outputs, f["block_outputs"]):
            torch.testing.assert_close(got, ref, **TOL)
        torch.testing.assert_close(model.nll(out.z, out.logdet), f["loss"], **TOL)
        if "z_ydrop" in f:  # label -1 and y=None both mean the averaged class embedding
            torch.testing.assert_close(model(f["x"], f["y_drop"]).z, f["z_ydrop"], **TOL)
            torch.testing.assert_close(model(f["x"], None).z, f["z_ynone"], **TOL)


@pytest.mark.parametrize("name", CASES)
def test_oracle_roundtrip_and_sequential_sample(tar, name):
    model, f, y = load_case(tar, name)
    rt = flow.sample(model, model(f["x"], y).z.detach(), y)
    torch.testing.assert_close(rt.x, f["x_roundtrip"], **TOL)
    s = flow.sample(model, f["noise"], y, trace=True)
    torch.testing.assert_close(s.x, f["sample"], **TOL)
    assert len(s.trace) == len(f["sample_trace"])
    for got, ref in zip(s.trace, f["sample_trace"]):
        torch.testing.assert_close(got, ref, **TOL)
    T = model.config.seq_len
    assert s.rounds == model.config.num_blocks * T  # T - 1 model calls per block, plus the free first token
    assert s.nfe == model.config.num_blocks * T


@pytest.mark.parametrize("name", CASES)
def test_oracle_guidance_variants(tar, name):
    model, f, y = load_case(tar, name)
    assert len(f["sample_cfg"]) == 4
    for key, (kw, ref) in f["sample_cfg"].items():
        g = flow.Guidance(scale=kw["guidance"], on_a="a" in kw["guide_what"], on_b="b" in kw["guide_what"],
                          annealed=kw["annealed_guidance"], attn_temp=kw["attn_temp"])
        s = flow.sample(model, f["noise"], y, guidance=g)
        torch.testing.assert_close(s.x, ref, **TOL, msg=lambda m, key=key: f"{key}: {m}")
        assert s.guided and s.nfe == 2 * s.rounds


@pytest.mark.parametrize("name", CASES)
def test_oracle_denoising_step(tar, name):
    model, f, y = load_case(tar, name)
    lr = f["x"].numel() * model.config.noise_std ** 2
    assert math.isclose(lr, f["denoise_lr"], rel_tol=1e-9)
    torch.testing.assert_close(flow.denoise(model, f["sample"], y), f["sample_denoised"], **TOL)


@pytest.mark.parametrize("name", CASES)
def test_oracle_parallel_samplers_match_sequential_in_float64(tar, name):
    model, f, y = load_case(tar, name)
    model = model.double()
    noise = f["noise"].double()
    ref = flow.sample(model, noise, y)
    T = model.config.seq_len
    for plan in (flow.JACOBI, flow.BlockPlan(segments=4), flow.BlockPlan(segments=3, init="zero"),
                 [flow.BlockPlan(segments=2), flow.SEQUENTIAL] * (model.config.num_blocks // 2)):
        res = flow.sample(model, noise, y, plan=plan)
        torch.testing.assert_close(res.x, ref.x, atol=1e-10, rtol=0)
        assert all(sum(r.iters) <= T for r in res.blocks)
    g = flow.Guidance(scale=1.5, annealed=True, attn_temp=0.5)
    torch.testing.assert_close(flow.sample(model, noise, y, plan=flow.JACOBI, guidance=g).x,
                               flow.sample(model, noise, y, guidance=g).x, atol=1e-10, rtol=0)


def test_oracle_tolerance_trades_iterations_for_error(tar):
    model, f, y = load_case(tar, "cond_8x8_p2")
    ref = flow.sample(model, f["noise"], y)
    res = flow.sample(model, f["noise"], y, plan=flow.JACOBI, tol=1e-4)
    assert res.rounds < ref.rounds
    assert ((res.x - ref.x).norm() / ref.x.norm()).item() < 1e-3


def test_official_state_dict_keys_load_and_config_is_inferred(tar):
    case = tar["cases"]["cond_8x8_p2"]
    sd = case["float32"]["state_dict"]
    cfg = infer_config(sd, in_channels=3)
    assert (cfg.img_size, cfg.patch_size, cfg.width, cfg.num_blocks, cfg.layers_per_block, cfg.num_classes) == \
        (8, 2, 128, 4, 2, 10)
    assert set(clean_state_dict({"module." + k: v for k, v in sd.items()})) == set(
        registry.build("tarflow", cfg).state_dict())


def test_a_converted_official_model_calibrates_on_its_own_samples(tar, tmp_path, capsys):
    """An official checkpoint names no dataset: `calibrate` takes the model's own sequential samples for the CRM /
    IGM diagnostics and writes a plan beside it that `auto` then uses; a dataset of another shape is refused, and
    so are metrics whose network scores other images."""
    import pargen
    from pargen.cli.main import main
    from pargen.errors import PargenError

    torch.save(tar["cases"]["cond_8x8_p2"]["float32"]["state_dict"], tmp_path / "tf.pth")
    assert main(["convert", "tarflow", str(tmp_path / "tf.pth"), "--out", str(tmp_path / "m")]) == 0
    pipe = pargen.load(tmp_path / "m")
    said = []
    doc = pipe.calibrate(batches=[2], log=said.append)
    assert said[0] == "m names no dataset: diagnostics on 256 of its own samples (sequential)"
    assert [r["sampling_index"] for r in doc["diagnostics"]] == [0, 1, 2, 3] and (tmp_path / "m.plan.json").exists()
    assert doc["by_batch"]["2"]["rel_err"] <= 1e-4
    assert pipe.settings("auto", batch=2).source.endswith("(calibrated plan)")
    with pytest.raises(PargenError, match="digits has images 1x8x8, m makes 3x8x8"):
        pipe.calibrate(data_name="digits", batches=[2], log=said.append)
    # the MNIST metric network cannot score its 3x8x8 images: eval and bench --fid say so before sampling
    with pytest.raises(PargenError, match="the images are 3x8x8 but classifier-mnist scores 1x28x28"):
        pipe.bench(batches=[1], repeats=1, fid=10)
    assert main(["eval", str(tmp_path / "m"), "-n", "4"]) == 2
    assert "m's images are 3x8x8 but the metric network classifier-mnist scores 1x28x28" in capsys.readouterr().err


def test_tiny_model_properties():
    torch.manual_seed(0)
    model = registry.create("tarflow-tiny").double()
    for blk in model.blocks:  # give the blocks non-trivial outputs
        torch.nn.init.normal_(blk.proj_out.weight, std=0.05)
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64) * 2 - 1
    y = torch.tensor([3, 7])
    # causality: changing a patch leaves the (block-order) outputs before it unchanged
    blk = model.blocks[0]
    xs = model.patchify(x)
    z1, _ = blk(xs, y)
    xs2 = xs.clone()
    xs2[:, 5] += 1.0
    z2, _ = blk(xs2, y)
    torch.testing.assert_close(z1[:, :5], z2[:, :5], atol=0, rtol=0)
    # log-det equals the log |det| of the autograd Jacobian (per-dimension mean)
    one = xs[:1]

    def fwd(v):
        return blk(v.view_as(one), y[:1])[0].reshape(-1)

    J = torch.autograd.functional.jacobian(fwd, one.reshape(-1))
    _, ld = blk(one, y[:1])
    torch.testing.assert_close(ld[0], torch.linalg.slogdet(J)[1] / one.numel(), atol=1e-10, rtol=0)
    # inverse(forward(x)) == x
    out = model(x, y)
    torch.testing.assert_close(flow.sample(model, out.z.detach(), y).x, x, atol=1e-10, rtol=0)
    # one batch of 3 equals the three samples one at a time
    noise = torch.randn(3, 16, 4, dtype=torch.float64)
    yy = torch.tensor([1, 2, 3])
    both = flow.sample(model, noise, yy, plan=flow.JACOBI, tol=1e-6).x
    for i in range(3):
        alone = flow.sample(model, noise[i: i + 1], yy[i: i + 1], plan=flow.JACOBI, tol=1e-6).x
        torch.testing.assert_close(alone[0], both[i], atol=1e-9, rtol=0)


def test_bad_noise_shape_and_plans():
    model = registry.create("tarflow-tiny")
    with pytest.raises(ValueError, match="noise must be"):
        flow.sample(model, torch.randn(1, 5, 4))
    with pytest.raises(ValueError):
        flow.BlockPlan(init="ones")
    with pytest.raises(ValueError):
        flow.sample(model, torch.randn(1, 16, 4), plan=[flow.JACOBI] * 3)


def test_bits_per_dim_of_the_identity_flow_in_both_conventions():
    """With every block the identity (z = x, log-det 0) bits/dim is the standard normal's NLL of the evaluated
    data in 8-bit units: uniform dequantisation, or the training noise added."""
    from pargen.data import ImageData
    from pargen.evaluation.metrics import bits_per_dim

    model = registry.create("tarflow-tiny")
    for blk in model.blocks:
        torch.nn.init.zeros_(blk.proj_out.bias)
    images = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    data = ImageData(images, torch.arange(6) % 10, 10, "random")

    def nll_bits(x):
        return float(((0.5 * x.pow(2) + 0.5 * math.log(2 * math.pi) + math.log(128)) / math.log(2)).mean())

    gen = torch.Generator().manual_seed(3)
    uniform = (images.float() + torch.rand(images.shape, generator=gen)) / 256 * 2 - 1
    assert bits_per_dim(model, data, batch=4, seed=3) == pytest.approx(nll_bits(uniform), rel=1e-5)
    gen = torch.Generator().manual_seed(3)
    noisy = images.float() / 127.5 - 1 + 0.2 * torch.randn(images.shape, generator=gen)
    assert bits_per_dim(model, data, batch=6, seed=3, noise_std=0.2) == pytest.approx(nll_bits(noisy), rel=1e-5)
