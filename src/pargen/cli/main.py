"""`pargen` command line. The only place that picks device, dtype and threads."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..errors import PargenError
from . import commands


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _nonneg_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not 0 <= v < float("inf"):  # NaN fails too
        raise argparse.ArgumentTypeError(f"expected a finite non-negative number, got {s}")
    return v


def _positive_float(s: str) -> float:
    v = _nonneg_float(s)
    if v == 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s}")
    return v


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (hyper-threads share a core's arithmetic units, and
    torch's threads spin-wait, so one thread per physical core is the fast setting)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores = set()
    for c in cpus:
        try:
            base = Path(f"/sys/devices/system/cpu/cpu{c}/topology")
            cores.add(((base / "physical_package_id").read_text().strip(), (base / "core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(c)))
    return max(1, len(cores))


def default_threads() -> int:
    """Physical cores this process may use, shared among the processes of a torchrun job on this machine."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, physical_cores() // max(1, local))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pargen",
        description="Fast visual generative models. Train, sample, evaluate and benchmark VAR-family, TarFlow "
                    "and diffusion models; parallel samplers are measured against the sequential one.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  pargen demo --quick                       # fast vs sequential sampling on the bundled models\n"
               "  pargen sample tarflow-mnist --n 16 --out grid.png --method auto\n"
               "  pargen train classifier-mnist --data mnist --steps 2000 --out runs/clf\n"
               "  pargen bench tarflow --batch 1 16 --json bench.json\n")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N, mps (default: cpu)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch CPU threads (default: the physical cores this process may use, divided among the "
                        "processes of a torchrun job; several jobs on one machine: give each its share)")
    p.add_argument("--dist-timeout", type=_positive_float, default=120.0, metavar="SECONDS",
                   help="under torchrun: how long a process waits for the others at a collective before it exits "
                        "with an error naming itself (default 120; gloo's own default is 30 minutes)")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a model preset on a dataset",
                       description="Train a registered model preset. Checkpoints (safetensors + JSON + training "
                                   "state) are written atomically to --out; --resume continues exactly.")
    t.add_argument("model", help="preset name, e.g. tarflow-mnist, classifier-mnist (see `pargen list`)")
    t.add_argument("--data", required=True, help="mnist | fashion-mnist | digits | emoji | folder:PATH")
    t.add_argument("--size", type=_positive_int, default=None, help="resize images to SIZE x SIZE")
    t.add_argument("--out", required=True, help="checkpoint path (without suffix)")
    t.add_argument("--steps", type=_positive_int, default=1000)
    t.add_argument("--batch-size", type=_positive_int, default=64)
    t.add_argument("--lr", type=_nonneg_float, default=1e-3)
    t.add_argument("--warmup", type=int, default=100)
    t.add_argument("--schedule", choices=["cosine", "constant"], default="cosine")
    t.add_argument("--ema", type=_nonneg_float, default=0.999, help="EMA decay (0: off)")
    t.add_argument("--ema-warmup", action="store_true",
                   help="ramp the EMA decay as min(ema, (1 + t) / (10 + t)) so that a short run's checkpoint is not "
                        "mostly its initial weights (off by default: the bundled recipes were trained without it)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--ckpt-every", type=_positive_int, default=500)
    t.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override model config fields")
    t.add_argument("--resume", action="store_true", help="continue from --out's training state")
    t.add_argument("--init", default=None, metavar="CKPT",
                   help="fine-tune: start from these weights (same family and shapes; --set may change "
                        "non-shape fields, e.g. attn_scale_cap=2)")
    t.add_argument("--export-fp16", default=None, metavar="PATH", help="also write fp16 weights here at the end")
    t.add_argument("--export-diffusers", default=None, metavar="DIR",
                   help="unet presets: also write a diffusers DDPMPipeline directory (fp16) here at the end")
    t.add_argument("--eval", action="store_true", help="report test accuracy / bits per dim at the end")
    t.add_argument("--tokenizer", default=None, metavar="CKPT",
                   help="token models: the frozen tokenizer to train on (VAR: msvq, raster AR: vq)")

    sub.add_parser("list", help="list model presets, datasets and bundled checkpoints")

    commands.add_parsers(sub, _positive_int, _nonneg_float)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # recorded as the recipe of exported checkpoints
    import torch

    from .. import distributed

    torch.set_num_threads(args.threads or default_threads())
    distributed.TIMEOUT_S = args.dist_timeout
    try:
        if args.device != "cpu":
            from ..pipelines import parse_device

            parse_device(args.device)
        code = int(commands.run(args) or 0)
        distributed.finish()  # a no-op unless launched by torchrun
        return code
    except PargenError as e:
        print(f"pargen: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # gloo's timeout or a lost connection: this process names itself and leaves
        rank, world = distributed.world()
        if world == 1 or not (isinstance(e, torch.distributed.DistError) or "gloo" in str(e)):
            raise
        reason = str(e).strip().splitlines()[0].split("] ")[-1][:200]
        print(f"pargen: error: process {rank} of {world} lost the others ({reason}); a process stopped or died "
              f"(waits are limited by --dist-timeout, now {args.dist_timeout:g} s)", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("pargen: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
