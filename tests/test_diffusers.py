"""`pargen.diffusers.parallel`: any diffusers pipeline and scheduler, exact against the pipeline's own `__call__`.

Tiny random pipelines built locally (tests/tiny_pipes.py). The bound: at tol 0 the images (numpy, [0, 1]) are
within 2e-6 of the pipeline's own (batched denoiser calls round differently in the last bits of float32; one
denoiser call per window, `window=1`, is bit-exact); a loose tolerance must take fewer rounds and stay close."""
import json

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import pargen.diffusers as PD  # noqa: E402
from pargen.errors import PargenError  # noqa: E402

from . import tiny_pipes as T  # noqa: E402

EXACT = 2e-6
KW_SD = dict(prompt=["a cat", "a dog"], negative_prompt=["blurry", "dark"], num_inference_steps=8,
             guidance_scale=5.0, height=16, width=16)


def _image(seed: int = 0):
    from PIL import Image

    return Image.fromarray((np.random.RandomState(seed).rand(16, 16, 3) * 255).astype(np.uint8))


def _run(pipe, fast, **kw):
    """(the pipeline's own images, pargen's images, the generator states after each) from the same seed."""
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    ref = pipe(generator=g1, output_type="np", **kw).images
    out = fast(generator=g2, output_type="np", **kw).images
    assert torch.equal(g1.get_state(), g2.get_state())  # the same draws, and the generator left as the pipeline does
    return ref, out


def _check(pipe, window: int = 4, loose: float = 1e-2, close: float = 1e-3, **kw):
    exact = PD.parallel(pipe, window=window, tol=0)
    ref, out = _run(pipe, exact, **kw)
    assert out.shape == ref.shape and np.abs(out - ref).max() <= EXACT
    c = exact.cost
    # the first replay runs each solved model's first call for real (the UNet's, and a ControlNet's before it)
    assert c.calls >= 2 and c.rounds <= c.calls and c.evaluations >= c.rounds
    assert len(c.residuals) == c.rounds - len(exact.models)
    fast = PD.parallel(pipe, window=window, tol=loose)
    ref, out = _run(pipe, fast, **kw)
    assert fast.cost.rounds < c.calls and np.abs(out - ref).max() <= close
    return c, fast.cost


PIPELINES = {
    "ddpm": (lambda: T.ddpm("ddpm"), dict(batch_size=2, num_inference_steps=12, loose=1e-3)),
    "ddim": (lambda: T.ddpm("ddim"), dict(batch_size=2, num_inference_steps=12, loose=1e-3)),
    "dit": (T.dit, dict(class_labels=[1, 2], num_inference_steps=10, guidance_scale=4.0)),
    "stable-diffusion": (T.sd, KW_SD),
    "sd3-flow-match": (T.sd3, dict(prompt="a cat", negative_prompt="dark", num_inference_steps=8, guidance_scale=5.0,
                                   height=16, width=16)),
    "img2img": (lambda: T.sd(img2img=True), dict(KW_SD, image=_image(), strength=0.75)),
    "inpaint": (lambda: T.sd(inpaint=True), dict(KW_SD, image=_image(), mask_image=_image(1).convert("L"))),
    "controlnet": (T.sd_controlnet, dict(KW_SD, image=_image())),
    "multi-controlnet": (lambda: T.sd_controlnet(2), dict(KW_SD, image=[_image(), _image(1)],
                                                           controlnet_conditioning_scale=[1.0, 0.5])),
    "sdxl": (T.sdxl, KW_SD),
    "flux": (T.flux, dict(prompt="a cat", num_inference_steps=8, guidance_scale=3.5, height=16, width=16,
                          max_sequence_length=16, loose=1e-3)),
}


@pytest.mark.parametrize("name", list(PIPELINES))
def test_pipeline_output_equals_its_own_call(name):
    build, kw = PIPELINES[name]
    kw = dict(kw)
    _check(build(), loose=kw.pop("loose", 1e-2), **kw)


SCHEDULERS = ["DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
              "DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "HeunDiscreteScheduler", "PNDMScheduler",
              "LCMScheduler", "TCDScheduler", "DEISMultistepScheduler", "SASolverScheduler",
              "DPMSolverSinglestepScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
              "LMSDiscreteScheduler", "EDMEulerScheduler"]


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_schedulers_on_stable_diffusion_are_exact(scheduler):
    import inspect

    import diffusers

    cls = getattr(diffusers, scheduler)
    takes = inspect.signature(cls.__init__).parameters
    s = cls(**{k: v for k, v in dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                     num_train_timesteps=1000, steps_offset=1).items() if k in takes})
    # EDM's latents are on the sigma scale (up to 80): an absolute tol of 1e-2 is looser there
    exact, _ = _check(T.sd(s), loose=1e-3 if scheduler == "EDMEulerScheduler" else 1e-2, **KW_SD)
    if scheduler == "HeunDiscreteScheduler":  # two denoiser calls per step: positions are calls, not steps
        assert exact.calls == 2 * KW_SD["num_inference_steps"] - 1


def test_one_call_per_window_is_bit_exact_and_sequential_method_counts_calls():
    pipe = T.sd()
    ref, out = _run(pipe, PD.parallel(pipe, window=1, tol=0), **KW_SD)
    assert np.array_equal(ref, out)
    seq = PD.parallel(pipe, method="sequential")
    ref, out = _run(pipe, seq, **KW_SD)
    assert np.array_equal(ref, out) and seq.cost.rounds == seq.cost.calls == 8 and seq.cost.replays == 1


def test_output_carries_the_cost_and_text_encodes_once():
    pipe = T.sd()
    calls = []
    real = pipe.text_encoder.forward
    pipe.text_encoder.forward = lambda *a, **k: calls.append(1) or real(*a, **k)
    fast = PD.parallel(pipe, window=4, tol=1e-2)
    out = fast(generator=torch.Generator().manual_seed(0), output_type="np", **KW_SD)
    assert out.pargen is fast.cost and fast.cost.replays == fast.cost.rounds + 1
    assert len(calls) == 2  # prompt and negative prompt, once each for all replays
    assert "forward" not in pipe.unet.__dict__  # the denoiser is restored


def test_a_controlnet_is_solved_with_the_denoiser_not_rerun_in_every_replay():
    """A ControlNet's outputs feed the UNet at every step: pargen batches its calls in the same windows (one
    batched ControlNet call per round, as for the UNet), instead of running it for real in every replay."""
    import functools

    pipe = T.sd_controlnet()
    real, seen = pipe.controlnet.forward, []

    @functools.wraps(real)
    def counting(*a, **k):
        seen.append(a[0].shape[0] if a else k["sample"].shape[0])
        return real(*a, **k)

    pipe.controlnet.forward = counting
    try:
        fast = PD.parallel(pipe, window=4, tol=0)
        ref, out = _run(pipe, fast, **KW_SD, image=_image())
    finally:
        del pipe.controlnet.forward
    c = fast.cost
    steps = KW_SD["num_inference_steps"]
    assert np.abs(out - ref).max() <= EXACT and c.calls == 2 * steps  # a ControlNet and a UNet call per step
    # the pipeline's own 8 calls, then 1 in the first replay and one batched call per window: none in replays
    assert len(seen) == steps + 1 + len(c.residuals) and c.rounds == 2 + len(c.residuals)
    controlnet_inputs = sum(seen[steps:]) // 4  # 4 rows per call (2 prompts x guidance)
    assert controlnet_inputs < c.evaluations <= 2 * controlnet_inputs + 1  # and about as many UNet inputs


def test_what_the_pipeline_says_is_said_once_not_once_per_replay():
    """DDPMPipeline with an Euler scheduler logs a warning at every step (it never calls scale_model_input):
    the parallel call logs exactly what the pipeline's own call logs, and diffusers' log level is restored."""
    import logging

    from diffusers import EulerDiscreteScheduler

    pipe = T.ddpm()
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    log, records = logging.getLogger("diffusers"), []
    handler = logging.Handler()
    handler.emit = records.append
    log.addHandler(handler)
    level = log.level
    try:
        fast = PD.parallel(pipe, window=4, tol=1e-3)
        _run(pipe, fast, batch_size=1, num_inference_steps=12)
    finally:
        log.removeHandler(handler)
    said = [r for r in records if "scale_model_input" in r.getMessage()]
    assert fast.cost.replays > 2 and len(said) == 2 * 12  # 12 steps: the pipeline's own call, then pargen's
    assert log.level == level


def test_pargen_load_opens_a_pipeline_directory_with_the_same_calls(tmp_path):
    """`pargen.load` on a diffusers directory (here the bundled unet-mnist): `sample` returns the pipelines'
    `Output`, Picard at tol 0 equal to the pipeline's own loop, and a looser tolerance in fewer rounds."""
    import pargen

    d = pargen.load("unet-mnist")
    assert d.methods == ("auto", "sequential", "picard") and "DDPMPipeline" in repr(d)
    seq = d.sample([0, 1], method="sequential", steps=12)
    par = d.sample([0, 1], method="picard", steps=12, window=4, tol=0)
    assert seq.images.shape == (2, 1, 32, 32) and seq.method == "sequential" and seq.cost["rounds"] == 12
    assert par.method == "picard" and par.cost["rounds"] <= 12 and par.cost["calls"] == 12
    assert (par.images - seq.images).abs().max() <= EXACT
    assert d.sample([0, 1], method="picard", steps=12, window=4, tol=1e-3).cost["rounds"] < 12
    with pytest.raises(PargenError, match="method auto, sequential or picard"):
        d.sample([0], method="jacobi")
    from pargen.cli.main import main

    assert main(["sample", "unet-mnist", "-n", "1", "--steps", "4", "--out", str(tmp_path / "u.png")]) == 0
    assert (tmp_path / "u.png").exists()  # the command line takes the directory as --diffusers


def test_bad_input_is_a_one_line_error():
    with pytest.raises(PargenError, match="not a diffusers pipeline"):
        PD.parallel(object())
    pipe = T.sd()
    with pytest.raises(PargenError, match="window must be >= 1"):
        PD.parallel(pipe, window=0)
    with pytest.raises(PargenError, match="StableDiffusionPipeline: .*generator"):
        PD.parallel(pipe)(generator=[torch.Generator()] * 3, **KW_SD)
    del pipe.unet
    pipe.unet = None
    with pytest.raises(PargenError, match="has no denoiser pargen knows"):
        PD.parallel(pipe)


def test_cli_on_a_local_pipeline_directory(tmp_path, capsys):
    from pargen.cli.main import main

    pipe = T.ddpm("ddpm")  # stochastic: the per-seed generators must reach the scheduler's noise too
    d = tmp_path / "pipe"
    pipe.save_pretrained(d)
    seeds = [0, 1, 2]
    want = pipe(generator=[torch.Generator().manual_seed(s) for s in seeds], batch_size=3, num_inference_steps=12,
                output_type="np").images
    npz = tmp_path / "s.npz"
    assert main(["sample", "--diffusers", str(d), "-n", "3", "--steps", "12", "--method", "picard", "--window", "4",
                 "--tol", "0", "--batch-size", "2", "--out", str(tmp_path / "g.png"), "--npz", str(npz)]) == 0
    got = np.load(npz)["arr_0"]
    assert got.shape == (3, 8, 8, 1) and np.abs(got.astype(int) - np.round(want * 255).astype(int)).max() <= 1
    assert "DDPMPipeline + DDPMScheduler, Picard (window 4, tol 0)" in capsys.readouterr().out
    assert main(["calibrate", "diffusion", "--diffusers", str(d), "--steps", "12", "--seeds", "2", "--batch", "1",
                 "--max-err", "1e-2"]) == 0
    rec = json.loads((d / "pargen_calibration.json").read_text())["DDPMScheduler/12/None"]
    assert rec["max_abs_err"] <= 1e-2 and rec["rounds"] < rec["calls"] == 12
    js = tmp_path / "b.json"
    assert main(["bench", "diffusion", "--diffusers", str(d), "--steps", "12", "--batch", "1", "--repeats", "2",
                 "--scheduler", "DPMSolverMultistepScheduler", "--json", str(js)]) == 0
    recs = json.loads(js.read_text())
    assert [r["method"] for r in recs] == ["sequential", "picard"]
    assert recs[1]["scheduler"] == "DPMSolverMultistepScheduler" and recs[1]["rounds"] < recs[0]["rounds"] == 12
    from .test_cli import run_cli

    r = run_cli("sample", "--diffusers", str(tmp_path))
    assert r.returncode == 2 and "not a diffusers pipeline directory" in r.stderr
    r = run_cli("sample", "--diffusers", str(d), "--scheduler", "NoSuchScheduler")
    assert r.returncode == 2 and "no scheduler 'NoSuchScheduler'" in r.stderr
    r = run_cli("sample", "--diffusers", str(d), "--labels", "3")
    assert r.returncode == 2 and "takes no class labels" in r.stderr


def test_train_a_unet_export_it_as_a_pipeline_and_sample_it_in_parallel(tmp_path):
    from diffusers import DDPMPipeline

    from pargen.cli.main import main

    out, d = tmp_path / "unet", tmp_path / "pipe"
    assert main(["train", "unet-tiny", "--data", "digits", "--steps", "3", "--batch-size", "8", "--out", str(out),
                 "--export-diffusers", str(d)]) == 0
    assert (d / "model_index.json").exists() and "pargen train unet-tiny" in (d / "pargen_recipe.txt").read_text()
    pipe = DDPMPipeline.from_pretrained(str(d), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    assert next(pipe.unet.parameters()).dtype == torch.float32 and pipe.scheduler.config.clip_sample is False
    assert pipe.scheduler.config.prediction_type == "v_prediction"  # what the unet presets regress
    # pargen's training schedule is the exported scheduler's
    from pargen.models.denoiser import alphas_cumprod

    assert torch.allclose(pipe.scheduler.alphas_cumprod.double(), alphas_cumprod("linear", 1000), atol=1e-6)
    fast = PD.parallel(pipe, window=8, tol=0)
    ref, got = _run(pipe, fast, batch_size=2, num_inference_steps=20)
    assert np.abs(got - ref).max() <= EXACT and fast.cost.calls == 20


def test_unet_loss_regresses_v_or_epsilon():
    """The v-prediction target sqrt(ab) eps - sqrt(1 - ab) x0 (the epsilon one for `prediction=epsilon`)."""
    from pargen import registry
    from pargen.rng import SampleRNG
    from pargen.training.losses import denoiser_loss

    x = torch.rand(3, 1, 8, 8) * 2 - 1
    for pred in ("v_prediction", "epsilon"):
        model = registry.create("unet-tiny", prediction=pred)
        seen = {}

        def spy(xt, t, y, m=model):
            seen["xt"], seen["t"] = xt, t
            return torch.zeros_like(xt)

        model.forward = spy
        loss = denoiser_loss(model, x, None, SampleRNG([0, 1, 2]))
        ab = model.alphas_cumprod[seen["t"]].view(-1, 1, 1, 1)
        eps = (seen["xt"] - ab.sqrt() * x) / (1 - ab).sqrt()
        target = eps if pred == "epsilon" else ab.sqrt() * eps - (1 - ab).sqrt() * x
        assert loss.item() == pytest.approx(target.pow(2).mean().item(), rel=1e-4)
    with pytest.raises(ValueError, match="prediction"):
        registry.create("unet-tiny", prediction="sample")
