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


def _check(pipe, window: int = 4, loose: float = 1e-2, close: float = 1e-3, path: str = "driven", **kw):
    exact = PD.parallel(pipe, window=window, tol=0)
    ref, out = _run(pipe, exact, **kw)
    assert out.shape == ref.shape and np.abs(out - ref).max() <= EXACT
    c = exact.cost
    assert c.path == path and (c.why is None) == (path == "driven"), (c.path, c.why)
    assert c.calls >= 2 and c.rounds <= c.calls and c.evaluations >= c.rounds
    assert 0 < c.model_s < c.wall_s and 0 < c.loop_s < c.wall_s and c.overhead_s > 0
    if path == "driven":  # the pipeline's call to its first step, the rounds, its call answered from the solution
        assert len(c.residuals) == c.rounds and c.replays == 2
    else:  # the first replay runs each solved model's first call for real (a ControlNet's, then the UNet's)
        assert len(c.residuals) == c.rounds - len(exact.models) and c.replays == len(c.residuals) + 2
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
    "inpaint": (lambda: T.sd(inpaint=True), dict(KW_SD, image=_image(), mask_image=_image(1).convert("L"),
                                                 path="replay")),
    "controlnet": (T.sd_controlnet, dict(KW_SD, image=_image(), path="replay")),
    "multi-controlnet": (lambda: T.sd_controlnet(2), dict(KW_SD, image=[_image(), _image(1)],
                                                           controlnet_conditioning_scale=[1.0, 0.5], path="replay")),
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
    c = seq.cost
    assert np.array_equal(ref, out) and c.path == "pipeline" and c.rounds == c.calls == 8 and c.replays == 0


def test_output_carries_the_cost_and_text_encodes_once():
    pipe = T.sd()
    calls = []
    real = pipe.text_encoder.forward
    pipe.text_encoder.forward = lambda *a, **k: calls.append(1) or real(*a, **k)
    fast = PD.parallel(pipe, window=4, tol=1e-2)
    out = fast(generator=torch.Generator().manual_seed(0), output_type="np", **KW_SD)
    assert out.pargen is fast.cost and fast.cost.path == "driven" and fast.cost.replays == 2
    assert len(calls) == 2  # prompt and negative prompt, once each for all replays
    assert "forward" not in pipe.unet.__dict__ and "step" not in pipe.scheduler.__dict__  # both restored


def test_a_callback_that_edits_the_latents_is_replayed_and_said_once():
    """A `callback_on_step_end` is part of the loop (here it damps the latents and logs): pargen replays the
    pipeline's whole call per round instead of driving its steps, the answer is the pipeline's own, and what the
    callback logs is said as often as in the pipeline's own call (8 steps), not once per replay."""
    import logging

    log, said = logging.getLogger("diffusers"), []
    handler = logging.Handler()
    handler.emit = lambda r: said.append(r.getMessage())
    log.addHandler(handler)
    level = log.level

    def damp(pipe, i, t, kw):
        log.warning("step %d", i)
        return {"latents": kw["latents"] * 0.9}

    try:
        pipe = T.sd()
        fast = PD.parallel(pipe, window=4, tol=0)
        ref, out = _run(pipe, fast, callback_on_step_end=damp, **KW_SD)
    finally:
        log.removeHandler(handler)
    c = fast.cost
    assert np.abs(out - ref).max() <= EXACT and c.path == "replay" and "callback_on_step_end" in c.why
    assert c.replays > 2 and said == [f"step {i}" for i in range(8)] * 2 and log.level == level


def test_ddpm_pipeline_takes_any_scheduler_by_its_protocol():
    """DDPMPipeline's loop never calls init_noise_sigma or scale_model_input, which an Euler scheduler needs
    (diffusers warns at every step): pargen's driven rounds apply the protocol, so its sequential and parallel
    answers are the correct loop's (test_scheduler_matrix_on_unet_mnist), and it warns at no step."""
    import logging

    from diffusers import EulerDiscreteScheduler

    pipe = T.ddpm()
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    log, records = logging.getLogger("diffusers"), []
    handler = logging.Handler()
    handler.emit = records.append
    log.addHandler(handler)
    try:
        fast = PD.parallel(pipe, window=4, tol=1e-3)
        fast(generator=torch.Generator().manual_seed(0), batch_size=1, num_inference_steps=12)
    finally:
        log.removeHandler(handler)
    assert fast.cost.path == "driven" and not [r for r in records if "scale_model_input" in r.getMessage()]


def test_a_noise_relative_tolerance_on_ddpm_and_ddim_and_a_clear_refusal_elsewhere():
    """tol_scale="noise" (ParaDiGMS' convention: tol relative to the step's noise std) is exact at tol 0 and saves
    rounds at 0.1 on DDPM- and DDIM-family schedulers; a scheduler without a noise variance is refused."""
    import diffusers

    betas = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
    for name in ("DDPMParallelScheduler", "DDIMScheduler"):
        pipe = T.sd(getattr(diffusers, name)(**betas))
        exact = PD.parallel(pipe, window=4, tol=0, tol_scale="noise")
        ref, out = _run(pipe, exact, **KW_SD)
        assert np.abs(out - ref).max() <= EXACT
        fast = PD.parallel(pipe, window=4, tol=0.1, tol_scale="noise")
        ref, out = _run(pipe, fast, **KW_SD)
        assert fast.cost.rounds < exact.cost.rounds and np.abs(out - ref).max() <= 5e-2, name
    pipe = T.sd(diffusers.EulerDiscreteScheduler(**betas))
    with pytest.raises(PargenError, match="needs a DDPM- or DDIM-family scheduler"):
        PD.parallel(pipe, tol_scale="noise")(**KW_SD)


MATRIX = ["DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
          "HeunDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler",
          "LMSDiscreteScheduler", "PNDMScheduler"]


@pytest.fixture(scope="module")
def unet_mnist():
    import pargen

    return pargen.load("unet-mnist").pipe


def _correct_loop(pipe, steps: int, batch: int, seed: int) -> np.ndarray:
    """The scheduler protocol written out by hand: noise scaled by init_noise_sigma, every input through
    scale_model_input, the generator passed to `step` only where it takes one; decoded as DDPMPipeline does."""
    import inspect

    from diffusers.utils.torch_utils import randn_tensor

    sched, unet, g = pipe.scheduler, pipe.unet, torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    x = randn_tensor((batch, unet.config.in_channels, size, size), generator=g, dtype=unet.dtype)
    sched.set_timesteps(steps)
    x = x * sched.init_noise_sigma
    kw = {"generator": g} if "generator" in inspect.signature(sched.step).parameters else {}
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(sched.scale_model_input(x, t), t).sample, t, x, **kw).prev_sample
    return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("scheduler", MATRIX)
def test_scheduler_matrix_on_unet_mnist(unet_mnist, scheduler):
    """Every scheduler on the bundled DDPMPipeline: pargen's sequential call is the correct loop bit for bit,
    its Picard call at tol 0 within the float rounding of batched calls (1e-5 on [0, 1]; PNDM's repeated
    timesteps carry it furthest). DDPMPipeline's own loop skips the protocol: see the README."""
    import diffusers

    pipe = unet_mnist
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    ref = _correct_loop(pipe, 10, 2, 0)
    for method, bound in (("sequential", 0.0), ("picard", 1e-5)):
        fast = PD.parallel(pipe, method=method, window=4, tol=0)
        out = fast(batch_size=2, num_inference_steps=10, generator=torch.Generator().manual_seed(0),
                   output_type="np").images
        c = fast.cost
        assert out.shape == ref.shape and np.abs(out - ref).max() <= bound, (method, np.abs(out - ref).max())
        assert c.path == "driven" and c.calls == len(pipe.scheduler.timesteps) and c.replays == 2
        assert (c.rounds == c.calls) if method == "sequential" else (c.rounds <= c.calls < c.evaluations)


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
