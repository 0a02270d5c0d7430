"""Implementations of the `pargen` subcommands (argument parsing is in `main.py`)."""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from .. import checkpoint, data, registry
from ..errors import PargenError


def add_parsers(sub, positive_int, nonneg_float) -> None:
    """Subcommands other than train/list (added as families land)."""


def run(args: argparse.Namespace) -> int:
    return {"train": cmd_train, "list": cmd_list}[args.cmd](args)


def cmd_list(args) -> int:
    print("model presets:      " + ", ".join(registry.list_names()))
    print("datasets:           " + ", ".join(data.names()))
    bundled = sorted(p.stem for p in checkpoint.BUNDLED.glob("*.json"))
    print("bundled checkpoints: " + (", ".join(bundled) or "none"))
    return 0


def _check_data_fits(cfg, ds: data.ImageData) -> None:
    C, H, W = ds.shape
    want = (getattr(cfg, "in_channels", C), getattr(cfg, "img_size", H))
    if (C, H) != want or H != W:
        raise PargenError(f"dataset {ds.name} has images {C}x{H}x{W} but the model expects "
                          f"{want[0]}x{want[1]}x{want[1]} (use --size or --set in_channels=.. img_size=..)")
    k = getattr(cfg, "num_classes", 0)
    if k and (ds.labels is None or int(ds.labels.max()) >= k):
        raise PargenError(f"model has {k} classes but dataset {ds.name} "
                          + ("has no labels (use --set num_classes=0)" if ds.labels is None else
                             f"has labels up to {int(ds.labels.max())}"))


def cmd_train(args) -> int:
    from ..evaluation import metrics
    from ..training.loop import TrainConfig, train
    from ..training.losses import LOSSES

    family, cfg = registry.preset_config(args.model, args.set)
    ds = data.load(args.data, "train", args.size)
    _check_data_fits(cfg, ds)
    tcfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                       schedule=args.schedule, ema=args.ema, seed=args.seed, ckpt_every=args.ckpt_every)
    torch.manual_seed(args.seed)  # initial weights (the CLI owns global state; the library never seeds)
    model = registry.build(family, cfg).to(args.device)
    nparams = sum(p.numel() for p in model.parameters())
    print(f"training {args.model} ({family}, {nparams / 1e6:.2f}M parameters) on {ds.name} ({len(ds)} images)")
    meta = {"preset": args.model, "data": args.data, "size": args.size, "params": nparams}
    res = train(model, ds, LOSSES[family], tcfg, out=args.out, resume=args.resume, meta=meta)
    print(f"done: {len(res.losses)} steps, final loss {sum(res.losses[-50:]) / len(res.losses[-50:]):.4f}, "
          f"{res.seconds / 60:.1f} min; checkpoint {checkpoint.stem(args.out)}")
    extra = {"steps": len(res.losses), "train_minutes": round(res.seconds / 60, 2)}
    if args.eval:
        test = data.load(args.data, "test", args.size)
        model_eval = res.model.eval()
        if family == "classifier":
            extra["test_accuracy"] = metrics.accuracy(model_eval, test)
            print(f"test accuracy: {extra['test_accuracy']:.4f}")
        elif family == "tarflow":
            extra["test_bpd"] = metrics.bits_per_dim(model_eval, test)
            print(f"test bits/dim: {extra['test_bpd']:.4f}")
    if args.export_fp16:
        line = "pargen train " + " ".join(_argv_tail())
        meta_out = {**checkpoint.read_meta(args.out), **extra, "recipe": line}
        meta_out.pop("family", None), meta_out.pop("config", None)
        checkpoint.save(args.export_fp16, res.model, meta_out, dtype=torch.float16)
        print(f"fp16 export: {checkpoint.stem(args.export_fp16)}")
    return 0


def _argv_tail() -> list[str]:
    import shlex
    import sys

    argv = sys.argv[1:]
    return [shlex.quote(a) for a in argv[argv.index("train") + 1:]] if "train" in argv else []
