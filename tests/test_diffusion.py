import os
import subprocess
import sys

import pytest
import torch

from pargen import registry
from pargen.models.denoiser import Denoiser, DenoiserConfig, alphas_cumprod
from pargen.samplers import diffusion as D

N = 40  # sampler steps in these tests


def toy_eps(seed: int = 0):
    """A float64 noise predictor that behaves like a trained one: the exact eps for Gaussian data of std 0.5 plus
    0.3 x a random class-conditional Denoiser (a raw random net is not self-consistent and DDIM amplifies it)."""
    torch.manual_seed(seed)
    net = registry.create("denoiser-tiny").double().eval()
    for p in net.parameters():
        p.data += 0.05 * torch.randn_like(p)
    acp = net.alphas_cumprod

    def eps(x, t, y):
        ab = acp[t].view(-1, 1, 1, 1)
        return (1 - ab).sqrt() * x / (0.25 * ab + 1 - ab) + 0.3 * net(x, t, y)

    return eps, acp


def setup(kind: str, seeds=(3, 4), eta: float = 0.0, n: int = N):
    eps, acp = toy_eps()
    steps = D.make_steps(acp, n, kind, eta=eta)
    x_T, noise = D.draw(list(seeds), (1, 8, 8), steps, dtype=torch.float64)
    y = torch.tensor([1, 7][: len(seeds)])
    return eps, steps, x_T, noise, y


@pytest.mark.parametrize("kind,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.7), ("ode", 0.0)])
def test_parallel_samplers_reproduce_sequential_at_zero_tolerance(kind, eta):
    eps, steps, x_T, noise, y = setup(kind, eta=eta)
    seq = D.sample(eps, x_T, steps, noise=noise, y=y)
    calls_per_step = 2 if kind == "ode" else 1
    assert seq.rounds == seq.nfe == calls_per_step * N - (kind == "ode")
    runs = [dict(method="picard", window=8, tol=0.0), dict(method="picard", window=N, tol=0.0, anderson=3),
            dict(method="block", block=10, sweeps=10, tol=0.0), dict(method="block", block=7, sweeps=None, tol=0.0)]
    for kw in runs:
        par = D.sample(eps, x_T, steps, noise=noise, y=y, **kw)
        assert not any(s.fallback for s in par.result.segments), kw
        assert par.rounds <= seq.rounds, kw  # each pass makes at least one more step final
        torch.testing.assert_close(par.x, seq.x, atol=1e-10, rtol=0, msg=str(kw))
        torch.testing.assert_close(par.trajectory, seq.trajectory, atol=1e-10, rtol=0)


def rounds_study():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "diffusion_rounds.py"
    spec = importlib.util.spec_from_file_location("diffusion_rounds", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_newton_reference_of_the_rounds_study_is_exact_and_needs_fewer_sweeps_than_picard(tmp_path):
    """benchmarks/diffusion_rounds.py --newton: exact after at most N sweeps (causality), and in fewer than the
    plain fixed sweeps it is a bound for."""
    study = rounds_study()
    torch.manual_seed(0)
    net = registry.create("denoiser-tiny").eval()
    for p in net.parameters():
        p.data += 0.05 * torch.randn_like(p)
    n = 10
    steps = D.make_steps(net.alphas_cumprod, n, "ddim")
    x_T, _ = D.draw([3, 4], (1, 8, 8), steps)
    y = torch.tensor([1, 7])
    errs = study.newton(net, 3.0, steps, x_T, y, n)
    assert len(errs) == n and errs[-1] < 1e-10
    eps = D.noise_predictor(net.double(), 3.0)
    ref = D.sample(eps, x_T.double(), steps, y=y).x
    picard = [float((D.sample(eps, x_T.double(), steps, y=y, method="block", block=n, sweeps=k, tol=0.0).x - ref)
                    .abs().max()) for k in range(1, n + 1)]
    first = (lambda e: next(k for k, v in enumerate(e, 1) if v < 1e-9))
    assert first(errs) < first(picard) <= n
    with pytest.raises(SystemExit, match="deterministic"):
        study.newton(net, 3.0, D.make_steps(net.alphas_cumprod, n, "ddpm"), x_T, y, 1)
    rows = ([{"kind": "fixed sweeps", "anderson": 0, "rounds": k, "max_abs_err": e} for k, e in enumerate(picard, 1)]
            + [{"kind": "newton (exact Jacobians, reference)", "sweeps": k, "max_abs_err": e}
               for k, e in enumerate(errs, 1)])
    png = tmp_path / "rounds.png"
    study.plot([{"checkpoint": "denoiser-tiny", "steps": n, "cfg": 3.0, "seeds": [3, 4], "rows": rows}], str(png))
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_picard_cuts_rounds_and_error_follows_tolerance():
    eps, steps, x_T, noise, y = setup("ddim", n=100)
    seq = D.sample(eps, x_T, steps, y=y)
    errs, rounds = [], []
    for tol in (0.1, 0.01, 1e-4):
        par = D.sample(eps, x_T, steps, y=y, method="picard", window=16, tol=tol)
        errs.append(float((par.x - seq.x).abs().max()))
        rounds.append(par.rounds)
        assert par.result.converged and par.nfe <= 16 * par.rounds
    assert rounds[0] <= 25 and all(r < 100 for r in rounds)
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-4
    assert rounds[0] <= rounds[1] <= rounds[2]


def test_block_picard_fixed_sweeps_costs_k_rounds_per_block():
    eps, steps, x_T, noise, y = setup("ddpm")
    par = D.sample(eps, x_T, steps, noise=noise, y=y, method="block", block=10, sweeps=3, tol=0.0)
    assert par.result.iters == [3, 3, 3, 3] and par.rounds == 12
    more = D.sample(eps, x_T, steps, noise=noise, y=y, method="block", block=10, sweeps=6, tol=0.0)
    seq = D.sample(eps, x_T, steps, noise=noise, y=y)
    assert (more.x - seq.x).abs().max() < (par.x - seq.x).abs().max()


def test_differentiable_sampling_gives_the_sequential_gradient_at_full_sweeps():
    eps, steps, x_T, noise, y = setup("ddpm", n=12)
    assert D.sample(eps, x_T.requires_grad_(), steps, noise=noise, y=y).x.grad_fn is None  # default: no graph
    grads = []
    for kw in ({}, {"method": "block", "block": 4, "sweeps": 4, "tol": 0.0}):
        out = D.sample(eps, x_T, steps, noise=noise, y=y, differentiable=True, **kw).x
        grads.append(torch.autograd.grad(out.square().sum(), x_T)[0])
    assert grads[0].abs().max() > 0 and torch.allclose(grads[0], grads[1], rtol=1e-9, atol=1e-12)


def test_anderson_cuts_rounds_on_a_long_window():
    eps, steps, x_T, noise, y = setup("ddpm", seeds=(5,), n=100)
    seq = D.sample(eps, x_T, steps, noise=noise, y=y)
    plain = D.sample(eps, x_T, steps, noise=noise, y=y, method="picard", window=32, tol=0.01)
    aa = D.sample(eps, x_T, steps, noise=noise, y=y, method="picard", window=32, tol=0.01, anderson=3)
    assert aa.rounds < plain.rounds
    assert (aa.x - seq.x).abs().max() < 1e-3 and (plain.x - seq.x).abs().max() < 1e-3


def test_parallel_answer_is_batch_independent():
    eps, steps, x_T, noise, y = setup("ddpm", seeds=(3, 4))
    both = D.sample(eps, x_T, steps, noise=noise, y=y, method="picard", window=12, tol=0.05)
    for i in range(2):
        one = D.sample(eps, x_T[i:i + 1], steps, noise=noise[i:i + 1], y=y[i:i + 1], method="picard", window=12,
                       tol=0.05)
        torch.testing.assert_close(one.x[0], both.x[i], atol=1e-12, rtol=0)


def test_noise_is_drawn_per_sample_and_x_T_is_shared_by_samplers():
    acp = alphas_cumprod("linear", 1000)
    ddpm, ddim = D.make_steps(acp, 50, "ddpm"), D.make_steps(acp, 20, "ddim")
    a, na = D.draw([1, 2], (1, 4, 4), ddpm)
    b, nb = D.draw([2], (1, 4, 4), ddpm)
    c, nc = D.draw([1, 2], (1, 4, 4), ddim)
    assert nc is None and torch.equal(a, c) and torch.equal(a[1], b[0]) and torch.equal(na[1], nb[0])
    assert na.shape == (2, 50, 1, 4, 4) and float(na[:, -1].abs().max()) == 0.0  # the last DDPM step adds no noise


def test_guidance_batches_both_branches_in_one_call():
    calls = []
    net = registry.create("denoiser-tiny").eval()

    def spy(module, args):
        calls.append(args[0].shape[0])

    net.register_forward_pre_hook(spy)
    eps = D.noise_predictor(net, guidance=3.0)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([5, 5]), torch.tensor([1, 2])
    with torch.no_grad():
        out = eps(x, t, y)
        c, u = net(x, t, y), net(x, t, None)
    assert calls == [4, 2, 2]
    torch.testing.assert_close(out, u + 3.0 * (c - u), atol=1e-5, rtol=1e-5)


def test_bad_arguments_raise_clear_errors():
    eps, steps, x_T, noise, y = setup("ddpm")
    with pytest.raises(ValueError, match="pre-drawn"):
        D.sample(eps, x_T, steps, y=y)
    with pytest.raises(ValueError, match="noise must have shape"):
        D.sample(eps, x_T, steps, noise=noise[:, :5], y=y)
    with pytest.raises(ValueError, match="unknown method"):
        D.sample(eps, x_T, steps, noise=noise, method="magic")
    with pytest.raises(ValueError, match="block must be"):
        D.sample(eps, x_T, steps, noise=noise, method="block", block=0)
    with pytest.raises(ValueError, match="unknown sampler"):
        D.make_steps(alphas_cumprod("linear", 1000), 10, "euler")
    with pytest.raises(ValueError, match="number of steps"):
        D.make_steps(alphas_cumprod("linear", 1000), 2000)
    with pytest.raises(ValueError, match="unknown schedule"):
        alphas_cumprod("sigmoid", 10)


# -- diffusers interoperability ---------------------------------------------------------------------------------

def _unet():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D",) * 2,
                                 up_block_types=("UpBlock2D",) * 2).double().eval()
    return diffusers, unet


def _schedulers(diffusers):
    kw = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", clip_sample=False,
              timestep_spacing="leading")
    return diffusers.DDIMParallelScheduler(set_alpha_to_one=True, **kw), diffusers.DDPMParallelScheduler(**kw)


def test_steps_match_diffusers_parallel_schedulers_batch_step_no_noise():
    diffusers, unet = _unet()
    ddim_s, ddpm_s = _schedulers(diffusers)
    acp = ddim_s.alphas_cumprod  # the schedulers' float32 table, so only the update formulas are compared
    eps = D.noise_predictor(unet)
    for sched, kind in [(ddim_s, "ddim"), (ddpm_s, "ddpm")]:
        sched.set_timesteps(20)
        steps = D.make_steps(acp, 20, kind)
        assert torch.equal(steps.t, sched.timesteps.long())
        x = torch.randn(3, 6, 1, 8, 8, dtype=torch.float64)  # (batch, window of steps 4..9, ...)
        op = D.PicardOperator(eps, steps, x[:, 0], None, None)
        with torch.no_grad():
            ours = op.step(x.flatten(0, 1), torch.arange(4, 10).repeat(3), torch.arange(3).repeat_interleave(6))
            e = eps(x.flatten(0, 1), steps.t[4:10].repeat(3), None)
            ref = sched.batch_step_no_noise(e, steps.t[4:10].repeat(3), x.flatten(0, 1))
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)  # diffusers forms coefficients in float32
        if kind == "ddpm":  # the noise scale is the scheduler's variance (ParaDiGMS pre-samples with it)
            var = torch.stack([ddpm_s._get_variance(int(t)) for t in steps.t[:-1]]).double()
            torch.testing.assert_close(steps.s[:-1] ** 2, var, atol=1e-12, rtol=1e-6)


def test_window_picard_on_a_diffusers_unet_matches_the_diffusers_sequential_loop():
    diffusers, unet = _unet()
    ddim_s, ddpm_s = _schedulers(diffusers)
    acp = ddim_s.alphas_cumprod
    eps = D.noise_predictor(unet)
    for sched, kind in [(ddim_s, "ddim"), (ddpm_s, "ddpm")]:
        sched.set_timesteps(25)
        steps = D.make_steps(acp, 25, kind)
        x_T, noise = D.draw([0, 1], (1, 8, 8), steps, dtype=torch.float64)
        x = x_T
        with torch.no_grad():
            for i, t in enumerate(sched.timesteps):
                e = unet(x, t).sample
                if kind == "ddim":
                    x = sched.step(e, t, x).prev_sample
                else:
                    x = sched.batch_step_no_noise(e, t.repeat(2), x) + noise[:, i]
            # tol 1e-9, not 0: a batched convolution may differ from a single one in the last bits (the kernel
            # depends on the CPU), so a zero change may never happen and the window would only creep
            par = D.sample(eps, x_T, steps, noise=noise, method="picard", window=10, tol=1e-9)
        assert par.rounds < 25 and not any(s.fallback for s in par.result.segments)
        torch.testing.assert_close(par.x, x, atol=1e-5, rtol=1e-5)  # float32 coefficients on their side


# -- torchrun -----------------------------------------------------------------------------------------------------

SHARD_SCRIPT = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {tests!r})
from test_diffusion import setup
from pargen import distributed
from pargen.samplers import diffusion as D
if "RANK" in __import__("os").environ:
    dist.init_process_group("gloo")
eps, steps, x_T, noise, y = setup("ddpm", seeds=(3, 4, 5), n=30)
calls = []
def counted(x, t, y):
    calls.append(x.shape[0])
    return eps(x, t, y)
res = D.sample(D.shard(counted), x_T, steps, noise=noise, y=torch.tensor([1, 2, 3]), method="picard", window=7,
               tol=0.01)
if not dist.is_initialized() or dist.get_rank() == 0:
    torch.save({{"x": res.x, "rounds": res.rounds, "rows": max(calls)}}, sys.argv[1])
distributed.finish()
"""


def test_window_split_across_two_torchrun_processes_matches_one(tmp_path):
    # here, not at the top: the script above imports this file as a plain module
    from .conftest import free_port, run_torchrun

    script = tmp_path / "shard.py"
    script.write_text(SHARD_SCRIPT.format(tests=os.path.dirname(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(script), str(tmp_path / "one.pt")], check=True, env=env, timeout=300)
    r = run_torchrun([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                      f"--master_port={free_port()}", str(script), str(tmp_path / "two.pt")], env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one["rounds"] == two["rounds"]
    assert one["rows"] == 21 and two["rows"] == 11  # a full window of 3 x 7 rows, split over the ranks
    torch.testing.assert_close(one["x"], two["x"], atol=1e-12, rtol=0)


def test_denoiser_skip_adds_a_learned_multiple_of_x_t():
    cfg = DenoiserConfig(img_size=8, patch_size=4, width=16, depth=1, heads=2, skip=True)
    net = Denoiser(cfg).eval()
    with torch.no_grad():
        net.skip.bias.fill_(0.5)  # the head starts at zero, so the output is the skip term alone
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(net(x, torch.tensor([1, 500, 999]), torch.tensor([0, 1, -1])), 0.5 * x)
    plain = Denoiser(DenoiserConfig(img_size=8, patch_size=4, width=16, depth=1, heads=2))
    assert not any(k.startswith("skip") for k in plain.state_dict())  # older checkpoints still load
