import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from pargen.cli.main import main

from .conftest import free_port, run_torchrun


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "pargen", *args], capture_output=True, text=True, timeout=600)


def test_train_then_sample_then_eval(tmp_path):
    out = tmp_path / "flow"
    argv = ["train", "tarflow-tiny", "--data", "digits", "--steps", "5", "--batch-size", "8",
            "--out", str(out), "--export-fp16", str(tmp_path / "flow16")]
    assert main(argv) == 0
    meta = json.loads((tmp_path / "flow16.json").read_text())
    assert meta["recipe"] == "pargen " + " ".join(argv) and meta["steps"] == 5
    grid = tmp_path / "g.png"
    assert main(["sample", str(out), "--n", "4", "--out", str(grid), "--method", "jacobi", "--each",
                 str(tmp_path / "each")]) == 0
    assert grid.exists() and len(list((tmp_path / "each").glob("*.png"))) == 4
    r = run_cli("eval", str(out), "--data", "digits", "--n", "8", "--classifier", str(out))
    assert r.returncode == 2 and "not a classifier" in r.stderr


def test_eval_of_a_tokenizer_reports_its_reconstruction_error_and_codebook_usage(tmp_path):
    from pargen import checkpoint, data

    out, js = tmp_path / "vq", tmp_path / "rec.json"
    assert main(["train", "vq-tiny", "--data", "digits", "--size", "16", "--steps", "3", "--batch-size", "8",
                 "--out", str(out)]) == 0
    assert main(["eval", str(out), "--data", "digits", "-n", "20", "--json", str(js), "--grid",
                 str(tmp_path / "rec.png")]) == 0
    assert Image.open(tmp_path / "rec.png").size == (2 * (16 * 18 + 2), 2 * (2 * 18 + 2))  # 16 over 16, 16 px
    rec = json.loads(js.read_text())
    tok, _ = checkpoint.load(out)
    x = data.load("digits", "test", tok.config.img_size).float(slice(0, 20))
    with torch.no_grad():
        idx = tok.img_to_indices(x)
        mse = float((tok.indices_to_img(idx) - x).double().pow(2).mean())
    assert rec["n"] == 20 and rec["mse"] == pytest.approx(mse, rel=1e-6)
    assert rec["psnr_db"] == pytest.approx(10 * np.log10(4 / mse), rel=1e-6)
    assert rec["codes_used"] == len(idx.unique()) <= rec["vocab_size"] == tok.config.vocab_size


def test_calibrate_tarflow_saves_a_plan_per_batch_that_meets_the_error_target(tmp_path):
    from pargen import checkpoint
    from pargen.evaluation import calibrate as cal
    from pargen.samplers import flow

    out = tmp_path / "flow"
    assert main(["train", "tarflow-tiny", "--data", "digits", "--steps", "5", "--batch-size", "8",
                 "--out", str(out)]) == 0
    assert main(["calibrate", "tarflow", str(out), "--data", "digits", "--batch", "1", "3", "--tol", "1e-5"]) == 0
    doc = json.loads(checkpoint.record_path(out, cal.PLAN).read_text())
    assert set(doc["by_batch"]) == {"1", "3"} and len(doc["diagnostics"]) == 2
    model, _ = checkpoint.load(out)
    T = model.config.seq_len
    for B in (1, 3):
        plans, tol = cal.load_plan(out, B)
        assert len(plans) == 2 and all(p.segments >= T or p.tol / tol in cal.TOL_FACTORS for p in plans)
        seeds = list(range(1000, 1000 + B))  # calibrate's default seeds and labels (seed mod 10)
        z, y = flow.noise(model, seeds), torch.tensor(seeds) % 10
        ref = flow.sample(model, z, y)
        got = flow.sample(model, z, y, plan=plans, tol=tol)  # the saved plan, checked here again
        err = float((got.x - ref.x).norm() / ref.x.norm())
        assert err <= doc["target_rel_err"] and got.rounds <= ref.rounds
        assert err == pytest.approx(doc["by_batch"][str(B)]["rel_err"], rel=1e-3, abs=1e-9)


def test_train_denoiser_then_sample_parallel_and_bench(tmp_path, capsys):
    out = tmp_path / "dn"
    assert main(["train", "denoiser-tiny", "--data", "digits", "--steps", "5", "--batch-size", "8",
                 "--out", str(out)]) == 0
    grid = tmp_path / "g.png"
    for method in ("sequential", "picard", "block"):
        assert main(["sample", str(out), "--n", "3", "--out", str(grid), "--method", method, "--sampler", "ddpm",
                     "--steps", "20", "--window", "5", "--cfg", "2"]) == 0
        assert grid.exists()
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "ddpm 20 steps, block Picard" in line
    r = run_cli("sample", str(out), "--sampler", "ode", "--eta", "0.5")
    assert r.returncode == 2 and "--eta applies to the ddim sampler only" in r.stderr
    r = run_cli("sample", str(out), "--steps", "5000")
    assert r.returncode == 2 and "number of steps" in r.stderr
    js = tmp_path / "bench.json"
    assert main(["bench", "diffusion", "--checkpoint", str(out), "--samplers", "ddim", "ode", "--batch", "2",
                 "--repeats", "1", "--json", str(js)]) == 0
    recs = json.loads(js.read_text())
    assert [(r["sampler"], r["method"]) for r in recs] == [(s, m) for s in ("ddim", "ode")
                                                           for m in ("sequential", "picard", "block",
                                                                     "picard+anderson")]
    for r in recs:
        assert r["rounds"] > 0 and r["call_cost_ratio"] > 0 and r["fallbacks"] == 0
        assert r["rounds"] == (100 if r["sampler"] == "ddim" else 99) or r["method"] != "sequential"


def test_train_tokenizer_then_var_on_it(tmp_path):
    tok, var = tmp_path / "tok", tmp_path / "var"
    assert main(["train", "msvq-mnist", "--data", "digits", "--size", "32", "--steps", "2", "--batch-size", "4",
                 "--out", str(tok)]) == 0
    assert main(["train", "var-mnist", "--data", "digits", "--size", "32", "--steps", "2", "--batch-size", "4",
                 "--tokenizer", str(tok), "--out", str(var)]) == 0
    assert json.loads((tmp_path / "var.json").read_text())["tokenizer"] == "tok"  # relative to var's folder
    grid = tmp_path / "v.png"
    assert main(["sample", str(var), "--n", "3", "--out", str(grid), "--top-k", "5", "--cfg", "2"]) == 0
    assert grid.exists()
    vq, raster = tmp_path / "vq", tmp_path / "raster"
    assert main(["train", "vq-mnist", "--data", "digits", "--size", "32", "--steps", "2", "--batch-size", "4",
                 "--out", str(vq)]) == 0
    assert main(["train", "raster-mnist", "--data", "digits", "--size", "32", "--steps", "2", "--batch-size", "4",
                 "--tokenizer", str(vq), "--out", str(raster)]) == 0
    assert main(["sample", str(raster), "--n", "2", "--out", str(tmp_path / "r.png"), "--cfg", "2",
                 "--method", "jacobi", "--window", "8"]) == 0
    js = tmp_path / "bench.json"
    assert main(["bench", "var", "--checkpoint", str(var), "--raster", str(raster), "--batch", "2", "--repeats", "1",
                 "--json", str(js)]) == 0
    recs = json.loads(js.read_text())
    assert [r["method"] for r in recs] == ["no-kv-cache", "kv-cache", "raster-ar", "raster-ar-jacobi", "var-kv-cache"]
    assert recs[1]["nfe"] == 130 and recs[0]["nfe"] == 1 + 5 + 14 + 30 + 66 + 130 and recs[1]["rounds"] == 6
    assert recs[1]["max_abs_err"] < 1e-4 and recs[1]["kv_cache_mib"] > 0  # same tokens with or without cache
    assert len(recs[1]["scale_ms"]) == 6 and recs[2]["rounds"] == recs[2]["nfe"] == 64
    assert recs[3]["max_abs_err"] == 0 and recs[3]["rounds"] <= 64  # Jacobi decoding: the same tokens
    assert recs[4]["max_abs_err"] is None and recs[4]["speedup"] > 0  # another model: a ratio, no error
    r = run_cli("train", "raster-mnist", "--data", "digits", "--size", "32", "--out", str(tmp_path / "x"),
                "--tokenizer", str(tok))
    assert r.returncode == 2 and "needs a vq tokenizer" in r.stderr
    r = run_cli("train", "var-mnist", "--data", "digits", "--size", "32", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "needs --tokenizer" in r.stderr
    r = run_cli("train", "var-mnist", "--data", "digits", "--size", "32", "--out", str(tmp_path / "x"),
                "--tokenizer", str(tok), "--set", "vocab_size=64")
    assert r.returncode == 2 and "does not fit the model" in r.stderr


def test_diffusion_auto_is_parallel_only_where_it_was_measured_to_win():
    from pargen.pipelines.diffusion import resolve

    d = {"guidance": 3.0, "parallel": {
        "ddim": {"method": "picard", "window": 4, "tol": 0.01, "max_batch": 2, "steps": 100, "guidance": 3.0},
        "ode": {"method": "picard", "window": 8, "tol": 0.001, "max_batch": 0, "steps": 50, "guidance": 3.0}}}
    assert resolve(d, batch=2).method == "picard" and resolve(d, batch=2).window == 4
    assert resolve(d, batch=3).method == "sequential"
    assert resolve(d, sampler="ode", batch=1).method == "sequential"  # never measured to win
    assert resolve(d, method="block", batch=64).method == "block"  # an explicit method is kept
    # the tolerance was chosen against the sequential answer at 100 steps, guidance 3, eta 0: nowhere else
    for flags in ({"steps": 50}, {"cfg": 1.0}, {"eta": 0.5}):
        st = resolve(d, batch=1, **flags)
        assert st.method == "sequential" and resolve(d, batch=1, method="picard", **flags).window == 4
    st = resolve(d, sampler="ddpm")  # no calibration at all
    assert (st.method, st.steps, st.window, st.guidance) == ("sequential", 1000, 16, 3.0)


def test_calibrate_diffusion_stores_settings_within_the_error_against_sequential(tmp_path):
    import pargen
    from pargen import checkpoint
    from pargen.evaluation import calibrate as cal
    from pargen.pipelines import diffusion as dm

    out = tmp_path / "dn"
    assert main(["train", "denoiser-tiny", "--data", "digits", "--steps", "5", "--batch-size", "8",
                 "--out", str(out)]) == 0
    before = checkpoint.read_meta(out)
    assert main(["calibrate", "diffusion", str(out), "--samplers", "ddim", "--steps", "20", "--seeds", "2",
                 "--max-err", "1e-3", "--batch", "1", "2"]) == 0
    assert checkpoint.read_meta(out) == before  # the record goes beside the checkpoint, not into it
    rec = json.loads(checkpoint.record_path(out, dm.CALIBRATION).read_text())["parallel"]["ddim"]
    assert rec["window"] in cal.WINDOWS and rec["tol"] in cal.TOLS and rec["max_batch"] in (0, 1, 2)
    pipe = pargen.load(out)  # a fresh pipeline reads the record
    st = pipe.settings("picard", steps=20)
    assert (st.window, st.tol) == (rec["window"], rec["tol"])
    x_T, noise = pipe.draw([1000, 1001], st)
    y = torch.tensor([0, 1])
    ref = pipe.solve(x_T, noise, y, st, method="sequential").x
    got = pipe.solve(x_T, noise, y, st)  # the stored window and tolerance, checked here again
    err = float((got.x.double() - ref.double()).abs().max())
    assert err == pytest.approx(rec["max_abs_err"], abs=1e-7) and err <= 1e-3
    assert got.rounds == rec["rounds"] < 20
    auto = pipe.settings("auto", batch=1, steps=20)
    assert auto.method == ("picard" if rec["max_batch"] >= 1 else "sequential")


DEMO_IMAGES = ("tarflow_sequential.png", "tarflow_fast.png", "tarflow_residuals.png", "diffusion_sequential.png",
               "diffusion_fast.png", "diffusion_convergence.png", "var_nocache.png", "var_kv.png",
               "var_scale_time.png", "raster-mnist.png", "c2f-mnist.png")


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    return out


def test_demo_quick_writes_a_report(demo_report):
    page = (demo_report / "index.html").read_text()
    assert "<table" in page and "speedup" in page
    for src in DEMO_IMAGES:
        assert f"src='{src}'" in page and (demo_report / src).stat().st_size > 0
    assert page.count("<h2>") == 4  # VAR, TarFlow, diffusion, raster AR + coarse-to-fine


# Appended to a copy of the page: after loading, it writes what the browser made of the images and tables.
PROBE = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images];
  const p = document.createElement('pre'); p.id = 'probe';
  p.textContent = JSON.stringify({images: imgs.length, tables: document.querySelectorAll('table').length,
    broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute('src'))});
  document.body.appendChild(p);
});</script>"""


def test_demo_report_renders_in_headless_chromium(demo_report, tmp_path):
    import shutil

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Debian's chromium is not installed here (.ci/run installs it)")
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'p'}"]
    page = (demo_report / "index.html").read_text()
    probe = demo_report / "probe.html"  # beside index.html, so the images resolve the same way
    probe.write_text(page.replace("</body>", PROBE + "</body>"))
    dom = subprocess.run(flags + ["--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    found = json.loads(dom.split('<pre id="probe">')[1].split("</pre>")[0])
    assert found == {"images": len(DEMO_IMAGES), "tables": 4, "broken": []}
    shot = tmp_path / "shot.png"
    subprocess.run(flags + ["--window-size=1200,2400", f"--screenshot={shot}", (demo_report / "index.html").as_uri()],
                   capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape == (2400, 1200) and pixels.min() < 50 and pixels.max() > 200  # text and images drawn


def test_eval_on_a_folder_of_images_two_sets_and_npz(tmp_path):
    from pargen import data, images
    from pargen.evaluation import metrics

    test = data.load("mnist", "test")
    a, b = test.float(slice(0, 40)), test.float(slice(40, 80))
    images.save_each(a, tmp_path / "a", [f"{i}" for i in range(40)])
    images.save_each(b, tmp_path / "b", [f"{i}" for i in range(40)])
    images.save_npz(b, tmp_path / "b.npz")
    out = tmp_path / "scores.json"
    assert main(["eval", f"folder:{tmp_path / 'a'}", "--n", "40", "--json", str(out)]) == 0
    scores = json.loads(out.read_text())
    assert scores["n"] == 40 and scores["classifier_fid"] >= 0 and 1 <= scores["classifier_is"] <= 10
    clf, _ = __import__("pargen").checkpoint.load(__import__("pargen").checkpoint.resolve("classifier-mnist"))
    want = metrics.scores(b, a, metrics.classifier_features(clf), clf)["fid"]  # PNG / npz round trips are exact
    for second in (["--folder", str(tmp_path / "b")], ["--npz", str(tmp_path / "b.npz")]):
        assert main(["eval", "--folder", str(tmp_path / "a"), *second, "--json", str(out)]) == 0
        got = json.loads(out.read_text())
        assert got["n"] == got["n_reference"] == 40 and got["classifier_fid"] == pytest.approx(want, rel=1e-6)
    # digits are 8x8 colour-less images: not what the MNIST classifier scores, so refused rather than scored
    images.save_each(data.load("digits", "test").float(slice(0, 12)), tmp_path / "d", [f"{i}" for i in range(12)])
    r = run_cli("eval", "--folder", str(tmp_path / "d"))
    assert r.returncode == 2 and "1x8x8 but the metric network classifier-mnist scores 1x28x28" in r.stderr


def test_lowrank_analyze_bench_and_sampling_on_the_bundled_var(tmp_path, capsys):
    rep = tmp_path / "an.json"
    assert main(["analyze", "var", "var-mnist", "--n", "4", "--degrees", "1", "2", "--max-err", "10",
                 "--json", str(rep)]) == 0
    r = json.loads(rep.read_text())
    assert len(r["layers"]) == 4 and len(r["layers"][0]["logit_bound"]) == 4
    assert r["recommended_layers"] == [0, 1, 2, 3]  # everything passes a loose error budget
    assert r["layers"][0]["errors"]["taylor2"]["rank"] == 561  # C(32 + 2, 2) on head dimension 32
    js = tmp_path / "lr.json"
    assert main(["bench", "lowrank", "--checkpoint", "var-mnist", "--sides", "4", "8", "12", "--fit-from", "4",
                 "--head-dim", "8", "--repeats", "1", "--json", str(js), "--plot", str(tmp_path / "p.png")]) == 0
    res = json.loads(js.read_text())
    assert [row["n"] for row in res["rows"]] == [4, 8, 12] and res["rank"] == 45
    assert res["exponent_exact_flops"] > res["exponent_lowrank_flops"] and (tmp_path / "p.png").exists()
    last = res["rows"][-1]
    per = last["per_scale"]
    assert per[-1]["side"] == 12 and last["tokens"] == sum(q["tokens"] for q in per)
    assert last["exact_flops"] == sum(q["exact_flops"] for q in per)
    assert res["model"]["attn_output_rel_err_per_layer"] and res["model"]["state_bytes_per_image"] > 0
    grid = tmp_path / "g.png"
    assert main(["sample", "var-mnist", "--n", "2", "--out", str(grid), "--lowrank-layers", "0,3"]) == 0
    assert "low-rank taylor degree 2 in layers [0, 3]" in capsys.readouterr().out
    r = run_cli("sample", "var-mnist", "--n", "1", "--out", str(grid), "--lowrank-layers", "7")
    assert r.returncode == 2 and "out of range" in r.stderr
    r = run_cli("analyze", "var", "var-mnist", "--degrees", "9")
    assert r.returncode == 2 and "pick lower --degrees" in r.stderr


def test_ctf_train_sample_and_bench_against_the_raster_baseline(tmp_path):
    vq, raster, ctf = tmp_path / "vq", tmp_path / "raster", tmp_path / "ctf"
    common = ["--data", "digits", "--size", "32", "--steps", "2", "--batch-size", "4"]
    assert main(["train", "vq-mnist", *common, "--out", str(vq)]) == 0
    assert main(["train", "raster-mnist", *common, "--tokenizer", str(vq), "--out", str(raster)]) == 0
    assert main(["train", "c2f-mnist", *common, "--tokenizer", str(vq), "--out", str(ctf),
                 "--set", "coarse=16"]) == 0
    assert main(["sample", str(ctf), "--n", "2", "--out", str(tmp_path / "c.png"), "--aux-temperature", "1.1",
                 "--no-cluster-mask"]) == 0
    js = tmp_path / "ctf.json"
    assert main(["bench", "ctf", "--checkpoint", str(ctf), "--raster", str(raster), "--batch", "2", "--repeats", "1",
                 "--fid", "50", "--guidance", "1", "2", "--plot", str(tmp_path / "q.png"), "--json", str(js)]) == 0
    out = json.loads(js.read_text())
    assert [r["method"] for r in out["speed"]] == ["raster-ar", "raster-ar-jacobi", "raster-ar-sjd", "ctf", "ctf",
                                                   "ctf-jacobi", "ctf-sjd"]
    assert out["speed"][1]["max_abs_err"] == 0 and out["speed"][5]["max_abs_err"] == 0  # Jacobi: same images
    assert out["speed"][4]["rounds"] == 65 and out["speed"][3]["max_abs_err"] is None
    assert out["speed"][2]["rounds"] <= 64 and out["speed"][6]["rounds"] <= 65  # SJD: at least a token per call
    assert [(r["model"], r["method"]) for r in out["sjd"]] == [("raster", "sjd"), ("ctf", "sjd")]
    assert len(out["quality"]) == 4 and {r["model"] for r in out["quality"]} == {"raster", "ctf"}
    assert out["best"]["ctf"]["guidance"] in (1, 2) and (tmp_path / "q.png").exists()


def torchrun(*args, procs: int = 2):
    return run_torchrun([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}",
                         f"--master_port={free_port()}", "-m", "pargen", *args], timeout=600,
                        env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.dist
@pytest.mark.parametrize("ckpt, extra, max_diff", [
    ("var-mnist", [], 0),  # one image per call with its own generator: bit-identical
    # batches of 2 + 1 rows instead of 3 (float32 order: at most one grey level); `--method auto` would pick by
    # the batch on each rank, so name the sampler
    ("denoiser-mnist", ["--steps", "8", "--method", "sequential"], 1),
])
def test_sample_under_torchrun_shares_the_seeds_and_gathers_the_same_images(tmp_path, ckpt, extra, max_diff):
    one, two = tmp_path / "one.png", tmp_path / "two.png"
    assert main(["sample", ckpt, "-n", "3", "--out", str(one), *extra]) == 0
    r = torchrun("sample", ckpt, "-n", "3", "--out", str(two), *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "seeds shared by 2 processes" in r.stdout
    a, b = (np.asarray(Image.open(p), dtype=np.int16) for p in (one, two))
    assert a.shape == b.shape and np.abs(a - b).max() <= max_diff


@pytest.mark.dist
def test_torchrun_with_fewer_images_than_processes_is_an_error():
    r = torchrun("sample", "var-mnist", "-n", "1", "--out", "unused.png")
    assert r.returncode != 0 and "1 images cannot be shared by 2 processes" in r.stderr


def test_readme_results_section_is_generated_from_the_bench_json(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "..", "docs", "make_results.py")
    r = subprocess.run([sys.executable, script, "--check"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    stale = tmp_path / "README.md"  # a changed figure is caught
    readme = open(os.path.join(os.path.dirname(script), "..", "README.md")).read()
    start = readme.index("<!-- results:start -->")
    section = readme[start:]
    figure = re.search(r"\*\*\d+\.\d+x\*\*", section).group()  # the first bold speed-up of the section
    stale.write_text(readme[:start] + section.replace(figure, "**99.99x**", 1))
    r = subprocess.run([sys.executable, script, "--check", "--readme", str(stale)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and "out of date" in r.stderr


@pytest.mark.dist
@pytest.mark.parametrize("split, batch", [("seeds", 2), ("calls", 1)])
def test_bench_under_torchrun_shares_the_batch_and_measures_the_same_errors(tmp_path, split, batch):
    """seeds: one image per rank, the same images as the one-process batch of two; calls: one image, every model
    call split over the ranks. Either way the same images, so the same rounds and errors."""
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    args = ["bench", "diffusion", "--samplers", "ddim", "--batch", str(batch), "--repeats", "1", "--tol", "0.01",
            "--split", split]
    assert main([*args, "--json", str(one)]) == 0
    r = torchrun(*args, "--json", str(two))
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert [(x["method"], x["batch"], x["processes"]) for x in b] == [(x["method"], batch, 2) for x in a]
    for x, y in zip(a, b):
        assert y["max_abs_err"] == pytest.approx(x["max_abs_err"], rel=1e-3, abs=1e-5)
        assert y["rounds"] == x["rounds"] and y["nfe"] >= y["rounds"] >= 1
        assert len(y["wall_s"]) == 1 and y["runs_per_sample"] >= 1 and "noisy" in y  # one timed sample, reported
        assert (y.get("split"), x.get("split")) == (("calls", "calls") if split == "calls" else (None, None))
    if split == "seeds":
        r = torchrun("bench", "var", "--batch", "2", "--repeats", "1")
        assert r.returncode != 0 and "bench var runs in one process" in r.stderr  # torchrun exits 1: a rank failed
