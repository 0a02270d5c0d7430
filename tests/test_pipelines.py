"""The library API (`pargen.load(...).sample / .bench / .calibrate`): what the README shows runs, images depend on
their seed only, reduced precision stays close to float32, the auto rule and the calibration records, host syncs."""
import collections
import json
import re
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import pargen
from pargen import checkpoint
from pargen.errors import PargenError
from pargen.evaluation import bench as benchmod

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_library_examples_run(capsys):
    text = README.read_text()
    lib = text[text.index("## Library\n"):]
    lib = lib[: lib.index("\n## ", 1)]
    blocks = re.findall(r"```python\n(.*?)```", lib, re.S)
    assert len(blocks) >= 2
    for code in blocks[:2]:  # the pipeline API, then the engine-level samplers
        exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "torch.Size([8, 1, 28, 28]) tensor(True)" in out and "('auto', 'sequential', 'picard', 'block')" in out


CASES = [("tarflow-mnist", "jacobi", {}), ("denoiser-mnist-lite", "picard", dict(sampler="ddpm", steps=30)),
         ("var-mnist", "sequential", {}), ("raster-mnist", "jacobi", {}), ("c2f-mnist", "sequential", {}),
         ("c2f-mnist", "sjd", {})]


@pytest.mark.parametrize("name, method, kw", CASES)
def test_an_image_depends_on_its_seed_not_on_its_batch(name, method, kw):
    pipe = pargen.load(name)
    together = pipe.sample([3, 4, 5, 6, 7], method=method, batch_size=5, **kw)
    alone = pipe.sample([3, 4, 5, 6, 7], method=method, batch_size=2, **kw)
    assert together.images.shape[0] == 5 and together.method == method
    assert len(together.cost["batches"]) == 1 and len(alone.cost["batches"]) == 3
    # token models: the same tokens (images equal up to the batched decoder's float rounding)
    assert (together.images - alone.images).abs().max() < 1e-4
    assert together.images.min() >= 0 and together.images.max() <= 1


@pytest.mark.parametrize("name, kw, bound", [("tarflow-mnist", {}, 0.02), ("denoiser-mnist-lite",
                                             dict(sampler="ddim", steps=20), 0.03), ("var-mnist", {}, 0.15),
                                             ("raster-mnist", {}, 0.2), ("c2f-mnist", {}, 0.2)])
def test_bfloat16_sampling_on_cpu_stays_close_to_float32(name, kw, bound):
    ref = pargen.load(name).sample(4, method="sequential", **kw)
    pipe = pargen.load(name, dtype="bfloat16")
    assert next(pipe.model.parameters()).dtype == torch.bfloat16
    got = pipe.sample(4, method="sequential", **kw)
    err = (got.signed.double() - ref.signed.double()).abs()
    # token models may pick other tokens at bf16 (not required equal); the mean pixel error is bounded
    assert got.images.dtype == torch.float32 and bool(torch.isfinite(got.images).all())
    assert 0 < err.mean() < bound


def test_bfloat16_bench_measures_errors_against_the_float32_sequential_answer():
    recs = pargen.load("tarflow-mnist", dtype="bfloat16").bench(batches=[2], repeats=1, naive=False)
    seq = next(r for r in recs if r["method"] == "sequential")
    assert seq["error_reference"] == "float32 sequential" and 0 < seq["max_abs_err"] < 0.5


def test_methods_and_options_a_family_lacks_are_refused():
    with pytest.raises(PargenError, match="samples with method auto, sequential; not 'jacobi'"):
        pargen.load("var-mnist").sample(2, method="jacobi")
    with pytest.raises(PargenError, match="does not take window; its options: tol, segments"):
        pargen.load("tarflow-mnist").sample(2, window=4)
    with pytest.raises(PargenError, match="needs the layers"):
        pargen.load("var-mnist").sample(2, lowrank_degree=3)
    with pytest.raises(PargenError, match="finite"):
        pargen.load("raster-mnist").sample(2, cfg=float("inf"))
    with pytest.raises(PargenError, match="not a generator"):
        pargen.load("vq-mnist")
    with pytest.raises(PargenError, match="unknown dtype"):
        pargen.load("var-mnist", dtype="int8")


def test_tarflow_auto_without_a_plan_is_sequential_and_with_one_follows_it(tmp_path):
    src = checkpoint.resolve("tarflow-mnist")
    model, meta = checkpoint.load(src)
    own = checkpoint.save(tmp_path / "flow", model, {k: v for k, v in meta.items() if k not in ("family", "config")})
    pipe = pargen.load(own)
    st = pipe.settings("auto", batch=1)
    assert st.method == "sequential" and "no calibrated plan" in st.source
    out = pipe.sample(2, method="auto")
    assert out.method == "sequential" and out.cost["rounds"] == 196
    # the shipped plan, copied beside the checkpoint, is what auto follows
    (tmp_path / "flow.plan.json").write_text(src.with_name("tarflow-mnist.plan.json").read_text())
    st = pargen.load(own).settings("auto", batch=1)
    assert st.method == "gs-jacobi" and isinstance(st.plan, list) and len(st.plan) == len(model.blocks)


def test_tarflow_temperature_scales_the_prior_noise_and_is_a_checkpoint_default(tmp_path):
    from pargen.samplers import flow

    pipe = pargen.load("tarflow-mnist")
    out = pipe.sample([1, 2], method="sequential", temperature=0.5, denoise=False, cfg=0.0)
    y = pipe.labels([1, 2])
    want = flow.sample(pipe.model, 0.5 * flow.noise(pipe.model, [1, 2]), y).x.add(1).mul(0.5).clamp(0, 1)
    assert torch.equal(out.images, want) and "temperature 0.5" in out.description
    default = pipe.sample([1], method="sequential").description
    assert "temperature" not in default and "guidance 2 annealed" in default  # the checkpoint's defaults
    assert "annealed" not in pipe.sample([1], method="sequential", annealed=False).description
    model, meta = checkpoint.load(checkpoint.resolve("tarflow-mnist"))
    meta = {k: v for k, v in meta.items() if k not in ("family", "config")}
    own = checkpoint.save(tmp_path / "flow", model, {**meta, "sample_defaults": {"temperature": 0.5}})
    again = pargen.load(own).sample([1, 2], method="sequential", denoise=False, cfg=0.0)
    assert torch.equal(again.images, out.images) and again.settings["temperature"] == 0.5


def test_calibration_records_of_bundled_checkpoints_go_to_the_user_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("PARGEN_HOME", str(tmp_path / "home"))
    bundled = checkpoint.resolve("tarflow-mnist")
    shipped = bundled.with_name("tarflow-mnist.plan.json")
    assert checkpoint.record_path(bundled, ".plan.json") == tmp_path / "home" / "calibration" / "tarflow-mnist.plan.json"
    assert checkpoint.find_record(bundled, ".plan.json") == shipped  # until the user calibrates, the shipped one
    checkpoint.write_record(bundled, ".plan.json", {"by_batch": {}})
    assert checkpoint.find_record(bundled, ".plan.json") == tmp_path / "home" / "calibration" / "tarflow-mnist.plan.json"
    assert shipped.read_text().startswith("{") and "by_batch" in shipped.read_text()  # the package is untouched
    user = tmp_path / "mine"
    assert checkpoint.record_path(user, ".calibration.json") == tmp_path / "mine.calibration.json"


def test_bench_interleaves_and_reports_the_pair_ratio_spread():
    calls = []

    def method(name, out):
        return benchmod.Method(name, lambda: (calls.append(name) or out, {"rounds": 1}))

    base, fast = method("base", torch.zeros(3)), method("fast", torch.ones(3))
    recs = benchmod.run("x", base, [fast], batch=1, seed=0, repeats=4, warmup=1, min_sample_s=0)
    # warm-up and one sizing run each, then A B, B A, ...
    assert calls == ["base", "base", "fast", "fast"] + ["base", "fast", "fast", "base"] * 2
    b, f = recs
    ratios = sorted(x / y for x, y in zip(b["wall_s"], f["wall_s"]))
    assert f["speedup"] == pytest.approx((ratios[1] + ratios[2]) / 2)
    assert f["speedup_min"] == ratios[0] and f["speedup_max"] == ratios[-1] and f["max_abs_err"] == 1
    assert benchmod.spread([1.0, 1.02, 0.98, 1.01])["noisy"] is False
    wild = benchmod.spread([1.0, 4.6, 1.1, 118.0])  # the KV cache "118.67x" of a shared machine
    assert wild["noisy"] is True and wild["speedup_q1"] < wild["speedup"] < wild["speedup_q3"]
    assert "! noisy" in benchmod.table([{**f, **wild}])


def test_readme_results_refuse_a_noisy_bench_file(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_results", README.parent / "docs" / "make_results.py")
    mr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mr)
    rec = {"family": "x", "method": "m", "baseline": "m", "batch": 1, "rounds": 1, "wall_s_median": 1.0,
           "speedup": 1.0, "max_abs_err": 0.0, "noisy": True}
    with pytest.raises(mr.Noisy, match="noisy machine"):
        mr.speed_rows([rec], "model", "f.json")
    fast = {**rec, "method": "f", "speedup": 2.0, "speedup_q1": 1.9, "speedup_q3": 2.1, "noisy": False}
    rows = mr.speed_rows([{**rec, "noisy": False}, fast], "model", "f.json")
    assert len(rows) == 1 and "**2.00x** (1.90-2.10)" in rows[0]
    side = {**fast, "model": "VAR-d16", "max_abs_err": 0.0}
    (tmp_path / "bench_official_samplers.json").write_text(json.dumps([side, {**side, "noisy": True}]))
    with pytest.raises(mr.Noisy, match="bench_official_samplers.json: f measured on a noisy machine"):
        mr.official_lines(tmp_path)
    (tmp_path / "bench_official_samplers.json").write_text(json.dumps([side]))
    assert mr.official_lines(tmp_path)[-1] == "| VAR-d16 | 1 | f | 1 | 0 | 1 | **2.00x** (1.90-2.10) |"
    assert mr.tarflow_peer_lines(tmp_path) == []  # a side-by-side file that is absent gives no table


@contextmanager
def host_syncs():
    """Count the tensor -> Python conversions (each waits for the device) made inside the block."""
    counts = collections.Counter()
    names = ("item", "__bool__", "__int__", "__float__", "tolist", "numpy")
    orig = {n: getattr(torch.Tensor, n) for n in names}

    def counted(n):
        def f(self, *a, **k):
            counts[n] += 1
            return orig[n](self, *a, **k)
        return f

    for n in names:
        setattr(torch.Tensor, n, counted(n))
    try:
        yield counts
    finally:
        for n, f in orig.items():
            setattr(torch.Tensor, n, f)


@pytest.mark.parametrize("name, method, kw", [
    ("tarflow-mnist", "sequential", {}), ("denoiser-mnist-lite", "sequential", dict(sampler="ddim", steps=20)),
    ("var-mnist", "sequential", {}), ("raster-mnist", "sequential", {}), ("c2f-mnist", "sequential", {}),
    ("tarflow-mnist", "jacobi", {}), ("denoiser-mnist-lite", "picard", dict(sampler="ddim", steps=20, window=4)),
    ("raster-mnist", "jacobi", {})])
def test_host_syncs_only_where_the_stopping_rule_needs_them(name, method, kw):
    pipe = pargen.load(name)
    with host_syncs() as n:
        out = pipe.sample(2, method=method, **kw)
    total = sum(n.values())
    if method == "sequential":  # no per-step sync at all: a constant, whatever the 20-196 steps
        assert total <= 3, dict(n)
    else:  # the engine's stopping rule: frontier, convergence and residual, a few per round
        assert total <= 8 * out.cost["rounds"], dict(n)
    assert n["item"] == n["numpy"] == n["tolist"] == 0
