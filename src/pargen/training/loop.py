"""One plain `train()` for every model family: AdamW, warm-up + cosine/constant LR, clipping, EMA, atomic
checkpoints, exact resume, and DDP (gloo on CPU) when launched under torchrun.

Exact resume: every random draw of step s comes from per-sample generators seeded by (seed, s) — the batch
indices and each sample's noise — so nothing but the weights, optimizer, EMA and step needs to be saved.
Under DDP each rank takes its slice of the same global batch with the same per-sample seeds, so N processes
compute what one process computes with the same global batch (up to reduction order).
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from .. import checkpoint, distributed
from ..config import check, to_dict
from ..data import ImageData
from ..errors import PargenError
from ..rng import SampleRNG, step_seeds


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64  # global batch (split over ranks under torchrun)
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup: int = 100
    schedule: str = "cosine"  # "cosine" or "constant" after warm-up
    weight_decay: float = 1e-4
    beta2: float = 0.95
    grad_clip: float = 1.0
    ema: float = 0.999  # 0 disables the EMA copy
    ema_warmup: bool = False  # decay min(ema, (1 + t) / (10 + t)) after t updates: a short run's EMA is not its init
    seed: int = 0
    ckpt_every: int = 500
    log_every: int = 25

    def __post_init__(self):
        check(self, zero_ok=("warmup",))
        if self.schedule not in ("cosine", "constant"):
            raise PargenError(f"schedule must be 'cosine' or 'constant', not {self.schedule!r}")
        if not 0 <= self.ema < 1:
            raise PargenError(f"ema must be in [0, 1), got {self.ema}")


def ema_decay(cfg: TrainConfig, updates: int) -> float:
    """The EMA decay of update number `updates` (from 0): `cfg.ema`, or with `ema_warmup` the usual ramp
    min(ema, (1 + t) / (10 + t)), under which the initial weights keep 1/10 x 2/11 x ... of the average."""
    return min(cfg.ema, (1 + updates) / (10 + updates)) if cfg.ema_warmup else cfg.ema


def lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return cfg.lr
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))


@dataclass
class TrainResult:
    model: torch.nn.Module  # EMA weights if EMA is on, else the raw weights
    losses: list[float] = field(default_factory=list)  # loss per step (this rank's, before all-reduce)
    seconds: float = 0.0


LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor | None, SampleRNG], torch.Tensor]


def train(model: torch.nn.Module, data: ImageData, loss_fn: LossFn, cfg: TrainConfig, out: str | Path | None = None,
          resume: bool = False, meta: dict[str, Any] | None = None, stop_after: int | None = None,
          progress: bool = True) -> TrainResult:
    """Train `model` on `data` with `loss_fn`; checkpoints go to `out` (weights = EMA) every `ckpt_every` steps.

    `stop_after` ends the run early (after that many total steps) as an interruption would; `resume` continues
    from `out`'s training state.
    """
    rank, world = distributed.init()
    if cfg.batch_size % world:
        raise PargenError(f"batch_size {cfg.batch_size} is not divisible by {world} processes")
    if len(data) == 0:
        raise PargenError("the dataset is empty")
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, cfg.beta2), weight_decay=cfg.weight_decay)
    ema = copy.deepcopy(model).eval().requires_grad_(False) if cfg.ema > 0 else None
    if ema is not None and rank == 0 and not cfg.ema_warmup and cfg.ema ** cfg.steps > 0.05:
        warnings.warn(f"an EMA with decay {cfg.ema:g} over {cfg.steps} steps still holds "
                      f"{100 * cfg.ema ** cfg.steps:.0f}% of the initial weights, and the checkpoint holds the "
                      f"EMA: train longer, lower --ema (e.g. {max(0.0, 1 - 3 / cfg.steps):.3g}) or add "
                      "--ema-warmup", stacklevel=2)
    start, losses = 0, []
    if out is not None and rank == 0:
        checkpoint.clean_stale_tmp(out)  # a write killed mid-way leaves its temp file; the checkpoint is intact
    if resume:
        if out is None:
            raise PargenError("resume needs the checkpoint path")
        state = checkpoint.load_state_file(out)
        where = f"training state {checkpoint.stem(out)}.state.pt"
        missing = [k for k in STATE_KEYS if k not in state or (k == "ema" and ema is not None and state[k] is None)]
        if missing:
            raise PargenError(f"{where} lacks {', '.join(missing)}; it cannot be resumed")
        checkpoint.load_state(model, state["model"], where)
        try:
            opt.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as e:
            raise PargenError(f"{where}: the optimizer state does not fit this model ({e})") from None
        if ema is not None:
            checkpoint.load_state(ema, state["ema"], where + " (EMA)")
        start, losses = int(state["step"]), list(state["losses"])
        step = checkpoint.run_meta(out).get("step")
        if step != start and rank == 0:  # state first, description last: a save was cut in between
            print(f"resume: {checkpoint.stem(out)}.json says step {step}, the training state step {start} (an "
                  "interrupted save); continuing from the training state, the next save rewrites all three")
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    meta = {**(meta or {}), "train": to_dict(cfg)}
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = tqdm(range(start, end), initial=start, total=cfg.steps, disable=not progress or rank != 0,
               desc="train", dynamic_ncols=True)
    t0 = time.perf_counter()
    model.train()
    try:
        _steps(bar, cfg, data, model, net, opt, ema, loss_fn, losses, rank, world, device, start, end, out, meta,
               progress, t0)
    except KeyboardInterrupt:
        done = len(losses)  # one loss per finished step (a Ctrl-C inside a step may leave its update applied)
        if out is not None and rank == 0 and done > start:
            _save(out, model, ema, opt, done, losses, meta)  # Ctrl-C: nothing trained is lost
            print(f"\ninterrupted: checkpoint saved at step {done} ({checkpoint.stem(out)}); --resume continues it")
        raise
    bar.close()
    return TrainResult(ema if ema is not None else model, losses, time.perf_counter() - t0)


def _steps(bar, cfg, data, model, net, opt, ema, loss_fn, losses, rank, world, device, start, end, out, meta,
           progress, t0) -> None:
    for step in bar:
        seeds = step_seeds(cfg.seed, step, cfg.batch_size)
        idx = torch.stack([torch.randint(len(data), (), generator=g) for g in SampleRNG(2 * seeds + 1).gens])
        idx, seeds = idx[rank::world], seeds[rank::world]  # this rank's slice of the global batch
        x = data.float(idx).to(device)
        y = None if data.labels is None else data.labels[idx].to(device)
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        loss = loss_fn(net, x, y, SampleRNG(2 * seeds, device))
        if not torch.isfinite(loss):
            raise PargenError(f"loss became {loss.item()} at step {step}; lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if ema is not None:
            decay = ema_decay(cfg, step)
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(pm, 1 - decay)
                for be, bm in zip(ema.buffers(), model.buffers()):
                    be.copy_(bm)
        losses.append(loss.item())
        done = step + 1
        if rank == 0 and progress and (done % cfg.log_every == 0 or done == end):
            rate = (done - start) * cfg.batch_size / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{sum(losses[-cfg.log_every:]) / len(losses[-cfg.log_every:]):.4f}",
                            img_s=f"{rate:.0f}", lr=f"{lr_at(cfg, step):.1e}")
        if out is not None and rank == 0 and (done % cfg.ckpt_every == 0 or done == end):
            _save(out, model, ema, opt, done, losses, meta)


STATE_KEYS = ("model", "optimizer", "ema", "step", "losses")


def _save(out, model, ema, opt, step, losses, meta) -> None:
    """Training state, then weights, then the JSON description, each stamped with the step: the description is
    the manifest written last, so a save cut short is detected (`checkpoint.load` refuses weights of another
    step; resume continues from the training state, which is complete by then). The state keeps a copy of the
    description, for a first save cut before its JSON (`checkpoint.run_meta`)."""
    checkpoint.save_state(out, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                "ema": None if ema is None else ema.state_dict(), "step": step, "losses": losses,
                                "meta": checkpoint.description(model, {**meta, "step": step})})
    checkpoint.save(out, ema if ema is not None else model, {**meta, "step": step})
