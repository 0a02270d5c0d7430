"""Every bad input is a one-line error before the work starts, and nothing on disk changes.

The table runs `pargen` in-process (an uncaught exception fails the test, as a traceback would); a few cases run
as real processes to check the exit code and the stderr a user sees. The fuzz test feeds seeded random hostile
values and corrupted files to sample, train --resume and convert.
"""
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pargen import checkpoint
from pargen.cli.main import main

from .conftest import free_port


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step tarflow-tiny run on digits (weights, JSON and training state)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", "tarflow-tiny", "--data", "digits", "--steps", "2", "--batch-size", "4", "--ema", "0",
                 "--out", str(out)]) == 0
    return out


def copy_run(src: Path, dst: Path) -> Path:
    for suffix in checkpoint.FILES:
        shutil.copy(f"{src}{suffix}", f"{dst}{suffix}")
    return dst


def edit_config(run: Path, **fields) -> Path:
    meta = json.loads(Path(f"{run}.json").read_text())
    meta["config"].update(fields)
    Path(f"{run}.json").write_text(json.dumps(meta))
    return run


class Evil:
    def __reduce__(self):
        return (print, ("this ran",))


def workspace(tmp: Path, trained: Path) -> dict[str, str]:
    """The files the cases point at, by name."""
    w = {"tmp": str(tmp), "run": str(copy_run(trained, tmp / "run"))}
    (tmp / "file.txt").write_text("not a folder")
    w["file"] = str(tmp / "file.txt")
    for name, obj in (("tensor", torch.zeros(3)), ("list", [1, 2]), ("evil", {"w": Evil()})):
        torch.save(obj, tmp / f"{name}.pth")
        w[name] = str(tmp / f"{name}.pth")
    w["nan"] = str(edit_config(copy_run(trained, tmp / "nan"), noise_std=float("nan")))
    w["negwidth"] = str(edit_config(copy_run(trained, tmp / "negwidth"), width=-64))
    w["headdim"] = str(edit_config(copy_run(trained, tmp / "headdim"), head_dim=48))
    nokeys = copy_run(trained, tmp / "nokeys")
    state = torch.load(f"{nokeys}.state.pt", weights_only=True)
    del state["optimizer"]
    torch.save(state, f"{nokeys}.state.pt")
    w["nokeys"] = str(nokeys)
    cut = copy_run(trained, tmp / "cut")  # weights of step 2, description of step 1: a save cut short
    meta = json.loads(Path(f"{cut}.json").read_text())
    Path(f"{cut}.json").write_text(json.dumps({**meta, "step": 1}))
    w["interrupted"] = str(cut)
    nanw = copy_run(trained, tmp / "nanweights")  # a model that returns NaN
    state = load_file(f"{nanw}.safetensors")
    save_file({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()},
              f"{nanw}.safetensors", metadata={"step": "2"})
    w["nanweights"] = str(nanw)
    trunc = copy_run(trained, tmp / "trunc")
    data = Path(f"{trunc}.safetensors").read_bytes()
    Path(f"{trunc}.safetensors").write_bytes(data[: len(data) // 2])
    w["truncated"] = str(trunc)
    badjson = copy_run(trained, tmp / "badjson")
    Path(f"{badjson}.json").write_text(Path(f"{badjson}.json").read_text()[:40])
    w["badjson"] = str(badjson)
    folder = tmp / "images"
    folder.mkdir()
    from PIL import Image

    for i in range(3):
        Image.new("L", (8, 8), 40 * i).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    w["badfolder"] = str(folder)
    return w


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    return code, capsys.readouterr().err


S = "sample tarflow-mnist -n 1 --out {tmp}/s.png"
CASES = [
    # 1. training state is sacred
    ("train tarflow-tiny --data digits --steps 2 --batch-size 4 --ema 0 --out {run}", "already holds a checkpoint"),
    ("train tarflow-tiny --data mnist --size 8 --steps 4 --batch-size 4 --ema 0 --out {run} --resume",
     "data 'digits' -> 'mnist'"),
    ("train tarflow-tiny --data digits --set num_blocks=3 --steps 4 --batch-size 4 --ema 0 --out {run} --resume",
     "config num_blocks 2 -> 3"),
    ("train tarflow-tiny --data digits --steps 4 --batch-size 4 --ema 0 --out {nokeys} --resume", "lacks optimizer"),
    ("train tarflow-tiny --data digits --steps 4 --out {tmp}/none --resume", "not found"),
    ("train tarflow-tiny --data digits --steps 2 --batch-size 100000 --out {tmp}/big", "larger than the 1500"),
    ("sample {interrupted} -n 1 --out {tmp}/s.png", "a save was interrupted"),
    # 2. non-finite values and invalid model configs
    (S + " --cfg inf", "expected a finite non-negative number, got inf"),
    (S + " --cfg nan", "expected a finite non-negative number, got nan"),
    ("sample denoiser-mnist -n 1 --eta inf --out {tmp}/s.png", "expected a finite non-negative number"),
    ("train tarflow-tiny --data digits --lr inf --out {tmp}/r", "expected a finite non-negative number"),
    ("sample {nanweights} -n 2 --seed 5 --out {tmp}/s.png --npz {tmp}/s.npz", "non-finite pixels (first at seed 5)"),
    ("sample {nan} -n 1 --out {tmp}/s.png", "noise_std must be a finite non-negative number, not nan"),
    ("sample {negwidth} -n 1 --out {tmp}/s.png", "width must be a positive integer, not -64"),
    ("sample {headdim} -n 1 --out {tmp}/s.png", "width 64 is not a multiple of head_dim 48"),
    ("train tarflow-tiny --data digits --set width=-8 --out {tmp}/r", "width must be a positive integer"),
    ("train tarflow-tiny --data digits --warmup -5 --out {tmp}/r", "warmup must be a non-negative integer"),
    # 3. checked before the work: output paths, device, memory
    ("sample tarflow-mnist -n 1 --out {tmp}/grid", "expected a file ending in .png"),
    ("sample tarflow-mnist -n 1 --out {tmp}", "is a folder; give a file name"),
    ("sample tarflow-mnist -n 1 --out {file}/x.png", "is a file, not a folder"),
    (S + " --npz {tmp}/s.png", "expected a file ending in .npz"),
    (S + " --each {file}", "is a file; give a folder"),
    ("train tarflow-tiny --data digits --out {file}/run", "is a file, not a folder"),
    ("train tarflow-tiny --data digits --out {tmp}/r --export-fp16 {file}/x", "is a file, not a folder"),
    ("bench tarflow --json {tmp}/b.txt", "expected a file ending in .json"),
    ("calibrate tarflow tarflow-mnist --plot {tmp}/p.txt", "expected a file ending in .png"),
    ("eval tarflow-mnist --json {file}/e.json", "is a file, not a folder"),
    ("analyze var var-mnist --json {tmp}/a.csv", "expected a file ending in .json"),
    ("convert tarflow {tensor} --out {file}/c", "is a file, not a folder"),
    ("demo --quick --out {file}", "is a file; give a folder"),
    ("--device foo " + S, "unknown device"),
    ("--device cuda " + S, "no CUDA device"),
    ("sample tarflow-mnist -n 10000000 --batch-size 10000000 --out {tmp}/s.png", "GiB available"),
    ("bench tarflow --batch 100000000 --json {tmp}/b.json", "GiB available"),
    ("--threads 0 list", "expected a positive integer"),
    ("--dist-timeout 0 list", "expected a positive number"),
    # 4. family mismatches and malformed files
    ("train no-model --data digits --out {tmp}/r", "unknown model"),
    ("train tarflow-tiny --data nope --out {tmp}/r", "unknown dataset"),
    ("train tarflow-tiny --data digits --out {tmp}/r --batch-size -3", "positive integer"),
    ("train tarflow-mnist --data digits --out {tmp}/r", "expects 1x28x28"),
    ("train tarflow-tiny --data digits --out {tmp}/r --set depth=3", "bad override"),
    ("train tarflow-tiny --data folder:{badfolder} --size 8 --out {tmp}/r", "1 of the 4 image files"),
    ("sample missing-ckpt --out {tmp}/s.png", "no checkpoint"),
    ("sample classifier-mnist --out {tmp}/s.png", "classifier checkpoint"),
    ("sample vq-mnist --out {tmp}/s.png", "not a generator"),
    ("sample {truncated} --out {tmp}/s.png", "unreadable (truncated or not safetensors)"),
    ("sample {badjson} --out {tmp}/s.png", "is corrupt"),
    (S + " --method magic", "invalid choice"),
    (S + " --method picard", "samples with method auto, sequential, jacobi, gs-jacobi"),
    ("sample var-mnist -n 1 --method jacobi --out {tmp}/s.png", "samples with method auto, sequential; not 'jacobi'"),
    (S + " --window 4", "does not take window"),
    (S + " --seed 9223372036854775808", "seeds must be in [0, 2^63)"),
    (S + " --seed -1", "seeds must be in [0, 2^63)"),
    ("sample raster-mnist -n 1 --top-k -5 --out {tmp}/s.png", "top_k must be >= 0"),
    ("sample raster-mnist -n 1 --top-p 2 --out {tmp}/s.png", "top_p must be in [0, 1]"),
    ("sample denoiser-mnist -n 1 --method block --block 500 --steps 100 --out {tmp}/s.png", "longer than the 100"),
    ("sample var-mnist -n 1 --split calls --out {tmp}/s.png", "--split calls splits the model calls"),
    ("bench unknown-family", "invalid choice"),
    ("bench tarflow --checkpoint var-mnist", "bench tarflow takes tarflow checkpoints"),
    ("bench ctf --checkpoint raster-mnist", "raster-mnist is a raster checkpoint; bench ctf takes c2f checkpoints"),
    ("eval unet-mnist -n 2", "unet-mnist is a diffusers pipeline directory, not a pargen checkpoint"),
    ("convert tarflow {tensor} --out {tmp}/c", "holds a Tensor, not a TarFlow state dict"),
    ("convert tarflow {list} --out {tmp}/c", "holds a list, not a TarFlow state dict"),
    ("convert tarflow {evil} --out {tmp}/c", "not a plain tensor file; pargen never unpickles code"),
    ("convert var {evil} --vae {evil} --out {tmp}/c", "not a plain tensor file; pargen never unpickles code"),
    ("convert llamagen {evil} --out {tmp}/c", "not a plain tensor file; pargen never unpickles code"),
]


@pytest.mark.parametrize("line, message", CASES, ids=[c[0][:60] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(tmp_path, trained, capsys, line, message):
    w = workspace(tmp_path, trained)
    before = snapshot(tmp_path)
    code, err = run_main([a.format(**w) for a in line.split()], capsys)
    assert code == 2, err
    assert message in err
    assert len([ln for ln in err.splitlines() if "error:" in ln]) == 1, err
    assert snapshot(tmp_path) == before  # nothing written, nothing overwritten, no temp file left


@pytest.mark.parametrize("args, message", [
    (["sample", "tarflow-mnist", "--out", "grid"], "expected a file ending in .png"),
    (["--device", "cuda", "sample", "tarflow-mnist"], "no CUDA device"),
    (["sample", "tarflow-mnist", "--cfg", "inf"], "finite non-negative number"),
])
def test_a_real_process_prints_one_line_and_exits_2(tmp_path, args, message):
    r = subprocess.run([sys.executable, "-m", "pargen", *args], capture_output=True, text=True, cwd=tmp_path,
                       timeout=300)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


INT_FLAGS = ["-n", "--batch-size", "--steps", "--window", "--block", "--sweeps", "--segments", "--lowrank-degree"]
FLOAT_FLAGS = ["--cfg", "--tol", "--eta", "--top-p", "--temperature", "--attn-temp", "--aux-temperature"]
BAD_INT = ["-1", "0", "abc", "1.5", "", "nan", "-9223372036854775809"]
BAD_FLOAT = ["-1", "nan", "inf", "-inf", "1e309", "abc", "", "-0.5"]
BAD_SEED = ["-1", "9223372036854775808", "99999999999999999999999", "abc", "1.5"]


def test_fuzz_random_hostile_values_and_corrupted_files(tmp_path, trained, capsys):
    rng = random.Random(1234)
    w = workspace(tmp_path, trained)
    lines = []
    for _ in range(40):  # random CLI values: one to three hostile flags on an otherwise valid command
        argv = ["sample", rng.choice(["tarflow-mnist", "denoiser-mnist", "var-mnist", "raster-mnist"]), "-n", "1",
                "--out", f"{w['tmp']}/s.png"]
        for _ in range(rng.randint(1, 3)):
            kind = rng.random()
            if kind < 0.45:
                argv += [rng.choice(INT_FLAGS), rng.choice(BAD_INT)]
            elif kind < 0.9:
                argv += [rng.choice(FLOAT_FLAGS), rng.choice(BAD_FLOAT)]
            else:
                argv += ["--seed", rng.choice(BAD_SEED)]
        lines.append(argv)
    weights = Path(f"{w['run']}.safetensors").read_bytes()
    for i in range(16):  # corrupted weights, description and training state: cut short or overwritten at random
        run = copy_run(trained, tmp_path / f"broken{i}")
        suffix = rng.choice(checkpoint.FILES)
        blob = Path(f"{run}{suffix}").read_bytes()
        cut = rng.randrange(0, len(blob))
        Path(f"{run}{suffix}").write_bytes(blob[:cut] if i % 2 else bytes(rng.randrange(256) for _ in range(cut)))
        cmd = ({".state.pt": ["train", "tarflow-tiny", "--data", "digits", "--steps", "4", "--batch-size", "4",
                              "--ema", "0", "--resume", "--out", str(run)]}
               .get(suffix, ["sample", str(run), "-n", "1", "--out", f"{w['tmp']}/s.png"]))
        lines.append(cmd)
        pth = tmp_path / f"official{i}.pth"  # an official state dict cut short
        torch.save({"w": torch.randn(8, 8)}, pth)
        pth.write_bytes(pth.read_bytes()[: rng.randrange(1, pth.stat().st_size)])
        lines.append(["convert", rng.choice(["tarflow", "llamagen"]), str(pth), "--out", f"{w['tmp']}/conv{i}"])
    before = snapshot(tmp_path)
    for argv in lines:
        code, err = run_main(argv, capsys)
        assert code == 2 and "error:" in err and "Traceback" not in err, (argv, err)
    assert snapshot(tmp_path) == before
    assert Path(f"{w['run']}.safetensors").read_bytes() == weights


def test_a_first_save_cut_before_its_description_can_still_be_resumed(tmp_path, capsys):
    """The first save writes the training state, the weights, then the JSON: cut before the JSON, the run is
    resumed from the description kept in the state (and checked against it); a state without one says what to do."""
    run = tmp_path / "run"
    argv = ["train", "tarflow-tiny", "--data", "digits", "--batch-size", "4", "--ema", "0", "--out", str(run)]
    assert run_main(argv + ["--steps", "2"], capsys)[0] == 0
    Path(f"{run}.json").unlink()
    code, err = run_main(argv + ["--steps", "4"], capsys)
    assert code == 2 and "already holds a checkpoint" in err  # still refuses to overwrite
    code, err = run_main(argv + ["--steps", "4", "--set", "num_blocks=3", "--resume"], capsys)
    assert code == 2 and "config num_blocks 2 -> 3" in err  # checked against the state's copy
    assert run_main(argv + ["--steps", "4", "--resume"], capsys)[0] == 0
    assert checkpoint.read_meta(run)["step"] == 4 and len(checkpoint.load_state_file(run)["losses"]) == 4
    Path(f"{run}.json").unlink()
    state = checkpoint.load_state_file(run)
    del state["meta"]
    checkpoint.save_state(run, state)
    code, err = run_main(argv + ["--steps", "6", "--resume"], capsys)
    assert code == 2 and "no description run.json" in err and "delete run.* to start again" in err


def test_a_save_cut_short_is_detected_and_resume_recovers_from_the_training_state(tmp_path, monkeypatch):
    from pargen import registry
    from pargen.data import load
    from pargen.training.losses import tarflow_loss
    from pargen.training.loop import TrainConfig, train

    ds, out = load("digits"), tmp_path / "run"
    cfg = TrainConfig(steps=9, batch_size=4, ema=0.9, ckpt_every=3)
    torch.manual_seed(0)
    train(registry.create("tarflow-tiny"), ds, tarflow_loss, cfg, out=out, stop_after=3, progress=False)
    real = checkpoint.write_meta

    def killed(*a, **k):  # the process dies after the weights of the next save, before its description
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "write_meta", killed)
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        train(registry.create("tarflow-tiny"), ds, tarflow_loss, cfg, out=out, resume=True, stop_after=6,
              progress=False)
    monkeypatch.setattr(checkpoint, "write_meta", real)
    assert load_file(f"{out}.safetensors") is not None
    assert checkpoint.read_meta(out)["step"] == 3 and checkpoint.load_state_file(out)["step"] == 6
    with pytest.raises(Exception, match="holds the weights of step 6 but .* describes step 3"):
        checkpoint.load(out)
    torch.manual_seed(0)
    resumed = train(registry.create("tarflow-tiny"), ds, tarflow_loss, cfg, out=out, resume=True, progress=False)
    torch.manual_seed(0)
    full = train(registry.create("tarflow-tiny"), ds, tarflow_loss, cfg, progress=False)
    assert resumed.losses == full.losses
    model, meta = checkpoint.load(out)  # the next save rewrote all three from one step
    assert meta["step"] == 9
    for k, v in full.model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0, msg=k)


def test_weights_carry_their_step_and_unstamped_weights_still_load(tmp_path, trained):
    stamped = copy_run(trained, tmp_path / "run")
    _, meta = checkpoint.load(stamped)
    assert meta["step"] == 2
    state = load_file(f"{stamped}.safetensors")
    save_file(state, f"{stamped}.safetensors")  # no metadata: a bundled or hand-made file
    checkpoint.load(stamped)


STALL = """
import os, sys, time
import pargen.pipelines as P
from pargen.cli.main import main
if os.environ["RANK"] == "1":  # this process stalls, as a stopped (not killed) one would
    P.Pipeline.sample = lambda *a, **k: time.sleep(120)
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.dist
def test_a_stalled_process_makes_the_others_exit_within_the_timeout_naming_themselves(tmp_path):
    script = tmp_path / "stall.py"
    script.write_text(STALL)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={free_port()}", str(script), "--dist-timeout", "5", "sample", "var-mnist",
                        "-n", "2", "--out", str(tmp_path / "s.png")], capture_output=True, text=True, timeout=100)
    assert r.returncode != 0
    assert "pargen: error: process 0 of 2 lost the others" in r.stderr and "--dist-timeout, now 5 s" in r.stderr
    assert "[rank0]: Traceback" not in r.stderr
    assert not (tmp_path / "s.png").exists()
