"""The machinery of the papers'-claims scripts in benchmarks/ (their figures live in docs/, not here)."""
import importlib.util
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1] / "benchmarks"


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_picard_dimension_kl_is_exact_and_full_sweeps_give_the_sequential_answer():
    P = script("picard_dimension")
    target = P.Gaussian(d=10, var_min=0.1, classes=4)
    assert target.count.tolist() == [3, 3, 2, 2] and len(target.var) == 4
    assert target.kl(target.var.sqrt()) == pytest.approx(0, abs=1e-12)  # alpha = sigma: the target itself
    r = 1.21  # one coordinate with alpha^2 / sigma^2 = r contributes (r - 1 - ln r) / 2
    alpha = target.var.sqrt().clone()
    alpha[0] *= math.sqrt(r)
    assert target.kl(alpha) == pytest.approx(3 * (r - 1 - math.log(r)) / 2, rel=1e-12)
    acp = P.vp_alphas(512)
    for kind in ("ode", "ddim"):
        seq, calls = P.run_sampler(target, acp, kind, 24)
        assert calls == (47 if kind == "ode" else 24)  # Heun: two calls a step, one on the last
        full, _ = P.run_sampler(target, acp, kind, 24, "block", blocks=4, sweeps=6)  # sweeps = block length
        assert full == pytest.approx(seq, rel=1e-9, abs=1e-15)
        n = P.fewest_steps(target, acp, kind, 0.01)
        assert P.run_sampler(target, acp, kind, n)[0] <= 0.01 < P.run_sampler(target, acp, kind, n - 1)[0]
        k, kl, rounds = P.fewest_sweeps(target, acp, kind, n, 4, 0.02)
        assert kl <= 0.02 and (k == 1 or P.run_sampler(target, acp, kind, n, "block", 4, k - 1)[0] > 0.02)


def test_picard_dimension_sde_variance_is_exact():
    """The DDPM sampler's output variance from the gradient of its linear map equals the one-line recursion
    (sequential), equals the sequential one with full sweeps, and equals the variance from probes of the map (one
    unit noise at a time), which predict a random run by linearity."""
    P = script("picard_dimension")
    from pargen.samplers import diffusion as D

    target, acp, n = P.Gaussian(d=10, var_min=0.1, classes=4), P.vp_alphas(1024), 24
    eps, steps = target.eps(acp), D.make_steps(acp, n, "ddpm")
    seq, calls = P.sde_variance(eps, steps, 4, method="sequential")
    assert calls == n and torch.allclose(seq, P.sde_variance_recursion(target, acp, n), rtol=1e-12, atol=0)
    block = {"method": "block", "block": 6, "tol": 0.0}
    full, _ = P.sde_variance(eps, steps, 4, **block, sweeps=6)
    assert torch.allclose(full, seq, rtol=1e-12, atol=0)
    two, rounds = P.sde_variance(eps, steps, 4, **block, sweeps=2)
    assert rounds == 8 and (two - seq).abs().max() > 1e-3  # 4 blocks x 2 sweeps: not the sequential answer yet
    x_T, noise = D.draw(list(range(3)), (4,), steps, dtype=torch.float64)
    out = D.sample(eps, x_T, steps, noise=noise, **block, sweeps=2).x
    gain = D.sample(eps, torch.ones(1, 4, dtype=torch.float64), steps,
                    noise=torch.zeros(1, n, 4, dtype=torch.float64), **block, sweeps=2).x[0]
    unit = torch.zeros(n, n, 4, dtype=torch.float64)
    unit[torch.arange(n), torch.arange(n)] = 1.0
    c = D.sample(eps, torch.zeros(n, 4, dtype=torch.float64), steps, noise=unit, **block, sweeps=2).x  # (N, 4)
    assert torch.allclose(gain * x_T + torch.einsum("bkg,kg->bg", noise, c), out, rtol=0, atol=1e-12)
    assert torch.allclose(gain.square() + (c * steps.s.view(-1, 1)).square().sum(0), two, rtol=1e-12, atol=0)
    assert P.kl_of(target, acp, "ddpm", n) == pytest.approx(target.kl_var(seq), rel=1e-10)
    assert P.run_sampler(target, acp, "ddpm", n, "block", 4, 2) == (pytest.approx(target.kl_var(two)), 8)


def test_picard_dimension_mixture_score_quantiles_and_exact_w2():
    """The mixture's noise predictor is -sqrt(1 - ab) times the score of the noised density (autograd), its
    quantile function inverts its cdf, and the quadrature W2 is exact where the answer is known."""
    P = script("picard_dimension")
    target, acp = P.Mixture(d=3, sep=2.0, s=0.5, w=0.3), P.vp_alphas(1000)
    m1, m2 = target.means(target.w)
    t = torch.tensor([0, 300, 999])
    x = torch.linspace(-3, 3, 7, dtype=torch.float64).repeat(3, 1).requires_grad_()
    ab = acp[t].view(-1, 1)
    v = ab * 0.25 + 1 - ab
    comp = torch.stack([math.log(w) - (x - ab.sqrt() * m) ** 2 / (2 * v) for w, m in ((0.3, m1), (0.7, m2))])
    score, = torch.autograd.grad(torch.logsumexp(comp, 0).sum(), x)
    assert torch.allclose(target.eps(acp)(x.detach(), t), -(1 - ab).sqrt() * score, rtol=1e-12, atol=1e-12)
    assert torch.allclose(target.cdf(target.q), P.normal_cdf(target.z), rtol=0, atol=1e-15)
    low = target.z < -4  # the lower tail to relative precision (the upper one is its mirror)
    assert torch.allclose(target.cdf(target.q[low]), P.normal_cdf(target.z[low]), rtol=1e-10, atol=0)
    assert target.error(target.q) == 0 and target.error(target.q + 0.1) == pytest.approx(3 * 0.01, rel=1e-12)
    with pytest.raises(ValueError, match="not increasing"):
        target.error(target.q.flip(0))
    # sep = 0: the target is N(0, s^2), the ODE's output is linear, alpha * z, and its W2^2 is (alpha - s)^2
    gauss = P.Mixture(d=1, sep=0.0, s=0.5)
    out = P.D.sample(gauss.eps(acp), gauss.start(), P.D.make_steps(acp, 6, "ode")).x[0]
    alpha = out[-1] / gauss.z[-1]
    assert torch.allclose(out, alpha * gauss.z, rtol=1e-12, atol=1e-14)
    assert P.run_sampler(gauss, acp, "ode", 6)[0] == pytest.approx(float((alpha - 0.5) ** 2), rel=1e-9)


def test_picard_dimension_two_sample_estimate_and_the_sde_law_on_a_grid():
    """The two-sample W2^2 agrees with the exact quadrature within its stated noise and a pure shift gives its
    square; the DDPM law carried on a grid gives the exact W2 of the Gaussian case (sep = 0, by the variance
    recursion) and agrees with the two-sample estimate on the mixture."""
    P = script("picard_dimension")
    target, acp, gen = P.Mixture(d=1), P.vp_alphas(1000), torch.Generator().manual_seed(0)
    exact = [target.exact(2**16, gen) for _ in range(4)]
    e, noise = P.two_sample_w2(exact[0] + 0.2, *exact[1:])
    assert 0 < noise < 0.01 and abs(e - 0.04) < 4 * noise
    e, noise = P.two_sample_w2(*exact)
    assert abs(e) < 4 * noise
    x, calls = P.draws(target, acp, "ddim", 8, 2**16, seed=0, chunk=2**14)
    assert x.shape == (2**16,) and calls == 8
    e, noise = P.two_sample_w2(x, *exact[1:])
    assert abs(e - P.run_sampler(target, acp, "ddim", 8)[0]) < 4 * noise and noise < 0.1 * e
    block, _ = P.draws(target, acp, "ddpm", 8, 2**10, seed=5, method="block", block=4, sweeps=4, tol=0.0)
    assert torch.allclose(block, P.draws(target, acp, "ddpm", 8, 2**10, seed=5)[0], rtol=0, atol=1e-12)
    gauss, acp = P.Mixture(d=1, sep=0.0, s=0.5), P.vp_alphas(2**14)
    for n in (16, 128):
        v = P.sde_variance_recursion(P.Gaussian(1, 0.25, 1), acp, n)[0]
        assert P.sde_law_w2(gauss, acp, n) == pytest.approx(float((v.sqrt() - 0.5) ** 2), rel=1e-3)
    x, _ = P.draws(target, acp, "ddpm", 32, 2**17, seed=1)
    e, noise = P.two_sample_w2(x, *(target.exact(2**17, gen) for _ in range(3)))
    law = P.sde_law_w2(target, acp, 32)
    assert abs(e - law) < 4 * noise and noise < 0.1 * law
    wide = target.like(64)
    assert P.kl_of(wide, acp, "ddpm", 32) == pytest.approx(64 * law) and wide.cache is target.cache


def test_lowrank_threshold_degree_bound_turn_and_synthetic_heads():
    T = script("lowrank_threshold")
    from pargen.nn.lowrank import taylor_bound

    for beta in (0.3, 2.0, 9.0):
        g = T.degree_needed(beta, 1e-4)
        assert taylor_bound(g, beta) <= 1e-4 < taylor_bound(g - 1, beta)
    rows = [{"rho": 0.1, "rank_exponent": 0.5}, {"rho": 0.3, "rank_exponent": 0.9}, {"rho": 0.5, "rank_exponent": 1.3}]
    assert T.turn(rows) == pytest.approx(0.35)
    assert T.turn(rows[:2]) is None
    from pargen.nn.lowrank import PolySpec

    small, beta = T.synthetic_error(4, 0.3, PolySpec(3, "chebyshev"), head_dim=4)
    assert beta == pytest.approx(0.09)  # entries +-R, logits q.k / d: the bound is exactly R^2
    large, _ = T.synthetic_error(4, 2.5, PolySpec(3, "chebyshev"), head_dim=4)
    assert small < 1e-3 < large


def test_var_scaling_fit_params_and_evaluation_on_a_tiny_model():
    V = script("var_scaling")
    from pargen.evaluation.bench import power_fit

    f = power_fit([1e3, 1e4, 1e5], [2.0 * x ** -0.25 for x in (1e3, 1e4, 1e5)])
    assert f["exponent"] == pytest.approx(-0.25) and f["log_prefactor"] == pytest.approx(math.log(2))
    assert f["pearson_r"] == pytest.approx(-1.0) and f["r2"] == pytest.approx(1.0)
    g = power_fit([1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0])  # scattered: |r| < 1, R^2 = r^2
    assert abs(g["pearson_r"]) < 1 and g["r2"] == pytest.approx(g["pearson_r"] ** 2)
    from pargen import data, registry
    from pargen.pipelines import tokenizer_for

    cfg = V.model_config(1, 16)
    assert (cfg.depth, cfg.C, cfg.H) == (1, 16, 1)
    torch.manual_seed(0)
    model = registry.build("var", cfg)
    n = V.non_embedding_params(model)
    assert 0 < n < sum(p.numel() for p in model.parameters())
    tok = tokenizer_for("msvq-mnist", cfg, "cpu")
    loss, err = V.evaluate(model, tok, data.load("mnist", "test", 32), 8, batch=4)
    assert 0 < loss < 2 * math.log(cfg.vocab_size) and 0 < err <= 1


def test_tarflow_peer_machinery_without_the_peer(tmp_path):
    """The peer side-by-side script: the paper's per-block lists, call counting and the clamp switch on a stand-in
    module loaded as the peer's (all restored afterwards), each side's speed-up from per-round ratios, and a clear
    refusal of a folder that is not the peer's checkout. (The peer itself is not in CI; its figures are in
    docs/bench_tarflow_peer.json.)"""
    P = script("tarflow_peer")
    s = P.peer_strategy(4, 0, 7, 32, 10)
    assert s == {"num_GS_list": [7, 1, 1, 1], "max_jacobi_list": [32, 10, 10, 10], "guess_list": [0, 0, 0, 0]}
    with pytest.raises(SystemExit, match="not a checkout of encoreus/GS-Jacobi_for_TarFlow"):
        P.load_peer(tmp_path)
    (tmp_path / "GS_Jacobi_sampling.py").write_text(
        "import torch\n\n\nclass MetaBlock:\n    def reverse_substep(self, x, y=None):\n"
        "        return torch.clamp(x, -3, 3)\n")
    peer = P.load_peer(tmp_path)
    x = torch.full((2, 5, 3), 4.0)
    with P.counted(peer) as seen:
        for _ in range(3):
            out = peer.MetaBlock().reverse_substep(x)
    assert seen == {"calls": 3, "rows": 15} and out.max() == 3
    with P.unclamped(peer):
        assert torch.equal(peer.MetaBlock().reverse_substep(x), x)  # the peer's own code, its clamp the identity
    assert peer.torch is torch and peer.MetaBlock().reverse_substep(x).max() == 3
    assert peer.MetaBlock.reverse_substep.__name__ == "reverse_substep"  # the counter is gone
    recs = [{"method": "pargen sequential", "wall_s": [2.0, 4.0, 2.0]},
            {"method": "pargen auto", "wall_s": [1.0, 1.0, 2.0]},
            {"method": "peer sequential", "wall_s": [3.0, 3.0, 3.0]},
            {"method": "peer jacobi", "wall_s": [1.0, 3.0, 1.5]}]
    P.own_speedups(recs, "pargen sequential")
    P.own_speedups(recs, "peer sequential")
    assert [r["speedup_vs_own_sequential"] for r in recs] == [1.0, 2.0, 1.0, 2.0]


def test_official_samplers_puts_the_checkout_on_the_path_only_while_it_runs(tmp_path, monkeypatch, capsys):
    """The official-sampler comparison runs the official code from a checkout (not in CI; figures in
    docs/bench_official_samplers.json): a folder that is not one is refused by name; a checkout's modules are
    importable inside the block and forgotten after it (VAR and LlamaGen both have a top-level `utils`)."""
    import sys

    O = script("official_samplers")
    with pytest.raises(SystemExit, match="not a checkout of FoundationVision/VAR"):
        with O.official_code(str(tmp_path), "models/var.py", "FoundationVision/VAR"):
            pass
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "var.py").write_text("")
    (tmp_path / "utils_for_test.py").write_text("WHERE = 'var checkout'\n")
    before = sys.path[:]
    with O.official_code(str(tmp_path), "models/var.py", "FoundationVision/VAR"):
        import utils_for_test

        assert utils_for_test.WHERE == "var checkout"
    assert sys.path == before and "utils_for_test" not in sys.modules
    monkeypatch.setattr("sys.argv", ["official_samplers.py"])
    with pytest.raises(SystemExit):
        O.main()
    assert "give --var and / or --llamagen" in capsys.readouterr().err


def test_sjd_peer_runs_the_peer_on_the_cpu_clock_and_refuses_a_wrong_checkout(tmp_path, monkeypatch):
    """The SJD side-by-side script (the peer needs transformers 4.4x, not in CI; figures in
    docs/bench_sjd_peer.json): CUDA's timing calls answered on the CPU clock (milliseconds between two records,
    as CUDA events report), torch otherwise the same, and a folder that is not the peer's checkout refused by name."""
    S = script("sjd_peer")
    clock = iter([10.0, 10.25])
    monkeypatch.setattr(S.time, "perf_counter", lambda: next(clock))
    shim = S._TorchOnCPU()
    a, b = shim.cuda.Event(enable_timing=True), shim.cuda.Event(enable_timing=True)
    a.record()
    shim.cuda.synchronize()
    b.record()
    assert a.elapsed_time(b) == 250.0 and shim.zeros(2).shape == (2,) and shim.float32 is torch.float32
    with pytest.raises(SystemExit, match="not a checkout of tyshiwo1/Accelerating-T2I-AR-with-SJD"):
        S.load_peer(str(tmp_path))
