import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from pargen import checkpoint, data, registry
from pargen.training.loop import TrainConfig, train
from pargen.training.losses import tarflow_loss

from .conftest import free_port, run_torchrun


def tiny_flow():
    torch.manual_seed(0)
    return registry.create("tarflow-tiny")


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path):
    ds = data.load("digits")
    cfg = TrainConfig(steps=12, batch_size=8, lr=3e-3, warmup=3, ckpt_every=4, log_every=4)
    full = train(tiny_flow(), ds, tarflow_loss, cfg, out=tmp_path / "full", progress=False)
    part = train(tiny_flow(), ds, tarflow_loss, cfg, out=tmp_path / "part", stop_after=5, progress=False)
    assert len(part.losses) == 5
    resumed = train(tiny_flow(), ds, tarflow_loss, cfg, out=tmp_path / "part", resume=True, progress=False)
    assert len(resumed.losses) == 12
    assert resumed.losses == full.losses  # bit-identical after the interruption
    a, _ = checkpoint.load(tmp_path / "full")
    b, _ = checkpoint.load(tmp_path / "part")
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), n


def test_ctrl_c_saves_the_steps_done_and_stale_temp_files_are_cleaned(tmp_path):
    ds = data.load("digits")
    cfg = TrainConfig(steps=12, batch_size=8, lr=3e-3, warmup=3, ckpt_every=100)
    calls = []

    def interrupted(model, x, y, rng):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # during step 4, before any --ckpt-every save
        return tarflow_loss(model, x, y, rng)

    out = tmp_path / "run"
    stale = tmp_path / ".run.safetensors.abc123.tmp"  # what a killed atomic write leaves
    stale.write_bytes(b"half")
    try:
        train(tiny_flow(), ds, interrupted, cfg, out=out, progress=False)
        raise AssertionError("the interrupt was swallowed")
    except KeyboardInterrupt:
        pass
    assert not stale.exists()
    assert checkpoint.read_meta(out)["step"] == 3 and checkpoint.load_state_file(out)["step"] == 3
    resumed = train(tiny_flow(), ds, tarflow_loss, cfg, out=out, resume=True, progress=False)
    full = train(tiny_flow(), ds, tarflow_loss, cfg, progress=False)
    assert resumed.losses == full.losses  # the three saved steps plus nine more: the uninterrupted run


def test_train_refuses_to_overwrite_or_to_resume_another_run(tmp_path):
    from pargen.cli.main import main

    out = tmp_path / "run"
    common = ["--steps", "2", "--batch-size", "4", "--out", str(out)]
    assert main(["train", "tarflow-tiny", "--data", "digits", *common]) == 0
    before = (tmp_path / "run.safetensors").read_bytes()
    r = subprocess.run([sys.executable, "-m", "pargen", "train", "tarflow-tiny", "--data", "digits", *common],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "already holds a checkpoint" in r.stderr and "Traceback" not in r.stderr
    for extra, msg in ((["--data", "mnist", "--size", "8"], "data 'digits' -> 'mnist'"),
                       (["--data", "digits", "--set", "num_blocks=3"], "config num_blocks 2 -> 3")):
        r = subprocess.run([sys.executable, "-m", "pargen", "train", "tarflow-tiny", *extra, *common, "--resume"],
                           capture_output=True, text=True)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "pargen", "train", "tarflow-tiny", "--data", "digits", "--steps", "2",
                        "--batch-size", "100000", "--out", str(tmp_path / "other")], capture_output=True, text=True)
    assert r.returncode == 2 and "larger than the" in r.stderr
    assert (tmp_path / "run.safetensors").read_bytes() == before  # nothing was overwritten


def test_losses_fall_and_batches_do_not_depend_on_batch_position(tmp_path):
    ds = data.load("digits")
    res = train(tiny_flow(), ds, tarflow_loss, TrainConfig(steps=40, batch_size=16, lr=3e-3, warmup=5,
                                                           ema=0.0), progress=False)
    assert sum(res.losses[-5:]) < sum(res.losses[:5])


DDP_SCRIPT = textwrap.dedent("""
    import sys, torch
    from pargen import checkpoint, data, distributed, registry
    from pargen.training.loop import TrainConfig, train
    from pargen.training.losses import tarflow_loss
    torch.manual_seed(0)
    model = registry.create("tarflow-tiny")
    cfg = TrainConfig(steps=6, batch_size=8, lr=3e-3, warmup=2, ema=0.0, ckpt_every=6)
    train(model, data.load("digits"), tarflow_loss, cfg, out=sys.argv[1], progress=False)
    distributed.finish()
""")


def test_ddp_two_processes_match_one_process(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(script), str(tmp_path / "one")], check=True, env=env, timeout=300)
    r = run_torchrun([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                      f"--master_port={free_port()}", str(script), str(tmp_path / "two")], env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, _ = checkpoint.load(tmp_path / "one")
    b, _ = checkpoint.load(tmp_path / "two")
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        # key biases have zero true gradient; Adam turns their reduction-order noise into ~1e-5 steps
        torch.testing.assert_close(p, q, atol=1e-4, rtol=1e-4, msg=n)


def test_under_torchrun_only_rank_0_reports_and_writes(tmp_path):
    out = tmp_path / "run"
    r = run_torchrun([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                      f"--master_port={free_port()}", "-m", "pargen", "train", "tarflow-tiny", "--data", "digits",
                      "--steps", "2", "--batch-size", "4", "--out", str(out), "--export-fp16", str(tmp_path / "h")],
                     env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
                     before_retry=lambda: [f.unlink() for f in tmp_path.iterdir() if f.name.startswith(("run", "h"))])
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("training tarflow-tiny") == 1 and r.stdout.count("done: 2 steps") == 1, r.stdout
    assert r.stdout.count("fp16 export") == 1
    assert checkpoint.read_meta(out)["step"] == 2 and checkpoint.read_meta(tmp_path / "h")["step"] == 2


def test_a_run_too_short_for_its_ema_is_warned_about():
    ds = data.load("digits")
    with pytest.warns(UserWarning, match=r"decay 0.999 over 4 steps still holds 100% .* lower --ema \(e.g. 0.25\)"):
        train(tiny_flow(), ds, tarflow_loss, TrainConfig(steps=4, batch_size=8, warmup=1), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 0.3^4 < 5%, and no EMA at all: silent
        train(tiny_flow(), ds, tarflow_loss, TrainConfig(steps=4, batch_size=8, warmup=1, ema=0.3), progress=False)
        train(tiny_flow(), ds, tarflow_loss, TrainConfig(steps=4, batch_size=8, warmup=1, ema=0.0), progress=False)


def test_ema_warmup_makes_a_short_run_save_its_training_not_its_init():
    """With the ramp min(ema, (1 + t) / (10 + t)) the EMA of 6 updates holds 1/10 x ... x 6/15 = 0.01% of the
    initial weights (without it 99.4%): the saved weights are the EMA recursion of the trained ones."""
    from pargen.training.loop import ema_decay

    ds, cfg = data.load("digits"), TrainConfig(steps=6, batch_size=8, warmup=1, ema_warmup=True)
    assert [round(ema_decay(cfg, t), 4) for t in (0, 1, 5, 10**5)] == [0.1, 0.1818, 0.4, 0.999]
    init = {k: v.clone() for k, v in tiny_flow().state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "too short for its EMA" warning
        ramped = train(tiny_flow(), ds, tarflow_loss, cfg, progress=False).model.state_dict()
    raw = train(tiny_flow(), ds, tarflow_loss, TrainConfig(steps=6, batch_size=8, warmup=1, ema=0.0),
                progress=False).model.state_dict()  # the same run's trained weights
    with pytest.warns(UserWarning, match="or add --ema-warmup"):
        plain = train(tiny_flow(), ds, tarflow_loss, TrainConfig(steps=6, batch_size=8, warmup=1),
                      progress=False).model.state_dict()
    k = "blocks.0.proj_in.weight"
    moved = (raw[k] - init[k]).norm()
    assert (ramped[k] - init[k]).norm() > 0.5 * moved  # the ramped EMA followed the training ...
    assert (plain[k] - init[k]).norm() < 0.02 * moved  # ... the plain one is still its initialisation
