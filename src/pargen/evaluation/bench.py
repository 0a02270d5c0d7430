"""Speed measurement: baseline and fast methods in one process, on the same model, inputs and noise.

Each method is a callable returning (output, cost); the harness warms every method up, then times `repeats`
rounds of baseline and methods interleaved, reading the clock only after the device has finished (`clock`),
and writes one record per method:
    family, method, baseline, batch, seed, processes, rounds, nfe, wall_s_median, wall_s_min, wall_s (every run),
    speedup (median of the per-pair ratios baseline / method), speedup_min / _max / _q1 / _q3, noisy,
    max_abs_err, rel_err, [fid, ...extra]
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm import tqdm

from .. import distributed


@dataclass
class Method:
    name: str
    run: Callable[[], tuple[Tensor, dict[str, Any]]]  # -> (output, {"rounds": .., "nfe": .., ...})
    extra: dict[str, Any] = field(default_factory=dict)
    compare: bool = True  # False: another model (errors against the baseline mean nothing, left empty)
    replicated: bool = False  # under torchrun every rank computes the whole output (not a share of the batch)


NOISY_SPREAD = 0.25  # pair ratios whose interquartile range exceeds this share of their median: a noisy machine


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for the device's queued kernels (CUDA / MPS run asynchronously); a no-op on the CPU."""
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_initialized() else "cpu")
    if kind == "cuda":
        torch.cuda.synchronize()
    elif kind == "mps":
        torch.mps.synchronize()


def clock(device: torch.device | str | None = None) -> float:
    """`time.perf_counter()` after the device has finished its queued work."""
    synchronize(device)
    return time.perf_counter()


def median_seconds(fn: Callable[[], Any], repeats: int, device: torch.device | str | None = None
                   ) -> tuple[Any, float]:
    """(last output, median wall seconds of `repeats` calls after one warm-up call), in this process only."""
    fn()
    times, out = [], None
    for _ in range(repeats):
        t0 = clock(device)
        out = fn()
        times.append(clock(device) - t0)
    return out, statistics.median(times)


def spread(ratios: list[float]) -> dict[str, Any]:
    """Median, min-max and quartiles of per-pair speed ratios, and whether they disagree enough (interquartile
    range over NOISY_SPREAD of the median) to call the machine noisy."""
    med = statistics.median(ratios)
    q1, q3 = (statistics.quantiles(ratios, n=4, method="inclusive")[::2] if len(ratios) > 1 else (med, med))
    return {"speedup": med, "speedup_min": min(ratios), "speedup_max": max(ratios), "speedup_q1": q1,
            "speedup_q3": q3, "noisy": bool((q3 - q1) > NOISY_SPREAD * med)}


def _once(m: Method, device, inner: int = 1) -> tuple[Tensor, dict[str, Any], float]:
    """One timed sample: `inner` runs back to back, their mean time. Under torchrun the ranks start together
    (barrier) and a sample's time is the slowest rank's."""
    _, world = distributed.world()
    if world > 1:
        dist.barrier()
    t0 = clock(device)
    for _ in range(inner):
        out, cost = m.run()
    took = torch.tensor((clock(device) - t0) / inner, dtype=torch.float64)
    if world > 1:
        dist.all_reduce(took, op=dist.ReduceOp.MAX)
    return out, cost, float(took)


def _whole(m: Method, out: Tensor, cost: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
    """Under torchrun: the batch's cost is its slowest share's, and the output every rank's rows in rank order
    (a replicated method's output is already whole on every rank)."""
    if distributed.world()[1] > 1:
        for k in ("rounds", "nfe"):
            if isinstance(cost.get(k), int):
                v = torch.tensor(cost[k])
                dist.all_reduce(v, op=dist.ReduceOp.MAX)
                cost = {**cost, k: int(v)}
    return (out if m.replicated else distributed.gather(out)), cost


def run(family: str, baseline: Method, methods: list[Method], *, batch: int, seed: int, repeats: int = 5,
        warmup: int = 1, reference: Tensor | None = None, device: torch.device | str | None = None,
        progress: bool = False, min_sample_s: float = 0.3) -> list[dict[str, Any]]:
    """Time the baseline and each method interleaved (B M1 M2, M1 M2 B, M2 B M1, ...: a slow spell of the machine
    hits every method alike, and no method always runs first or after the same one), after `warmup` untimed runs
    each. A timed sample of a method lasts at least about `min_sample_s` (short runs are repeated back to back
    and averaged, so that millisecond-scale interruptions do not decide a ratio). Speed-up: the median over repeats of the pair ratio
    baseline time / method time, with its min-max, quartiles and a `noisy` flag. Errors are measured in float64
    against `reference` when given (e.g. the float32 sequential answer of a bfloat16 run), else against the
    baseline's output. Under torchrun `batch` is the whole batch and each method runs on this rank's share."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    everyone = [baseline] + list(methods)
    inner = {}
    for m in everyone:
        for _ in range(warmup):
            m.run()
        t0 = clock(device)  # one more run, warm, sizes the samples
        m.run()
        took = clock(device) - t0
        inner[id(m)] = int(min(1000, max(1, round(min_sample_s / max(took, 1e-9)))))
    if distributed.world()[1] > 1:  # every rank must run the same number of times
        for m in everyone:
            v = torch.tensor(inner[id(m)])
            dist.all_reduce(v, op=dist.ReduceOp.MAX)
            inner[id(m)] = int(v)
    times = {id(m): [] for m in everyone}
    last: dict[int, tuple[Tensor, dict[str, Any]]] = {}
    for r in tqdm(range(repeats), desc=f"bench {family} batch {batch}", leave=False, disable=not progress):
        k = r % len(everyone)  # rotate the order: what runs first or after which method averages out over rounds
        for m in everyone[k:] + everyone[:k]:
            out, cost, took = _once(m, device, inner[id(m)])
            times[id(m)].append(took)
            last[id(m)] = (out, cost)
    last = {k: _whole(m, *last[k]) for m in everyone for k in [id(m)]}
    base_times = times[id(baseline)]
    ref = (last[id(baseline)][0] if reference is None else reference).double()
    records = []
    for m in everyone:
        out, cost = last[id(m)]
        ts = times[id(m)]
        diff = (out.double() - ref) if m.compare else None
        records.append({
            "family": family, "method": m.name, "baseline": baseline.name, "batch": batch, "seed": seed,
            "processes": distributed.world()[1],
            "rounds": cost.get("rounds"), "nfe": cost.get("nfe"),
            "wall_s_median": statistics.median(ts), "wall_s_min": min(ts), "wall_s": ts, "runs_per_sample": inner[id(m)],
            **spread([b / t for b, t in zip(base_times, ts)]),
            "max_abs_err": None if diff is None else diff.abs().max().item(),
            "rel_err": None if diff is None else (diff.norm() / ref.norm().clamp_min(1e-30)).item(),
            **({"error_reference": "float32 sequential"} if reference is not None else {}),
            **{k: v for k, v in cost.items() if k not in ("rounds", "nfe")}, **m.extra,
        })
    return records


def noisy(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records whose pair ratios disagreed too much to trust their speed-up."""
    return [r for r in records if r.get("noisy")]


def table(records: list[dict[str, Any]]) -> str:
    """A readable fixed-width table of bench records; the speed-up with its quartiles, `!` where noisy."""
    def speed(r):
        if r.get("speedup") is None:
            return "-"
        q = f" [{r['speedup_q1']:.2f}-{r['speedup_q3']:.2f}]" if "speedup_q1" in r else ""
        return f"{r['speedup']:.2f}x{q}" + (" !" if r.get("noisy") else "")

    cols = [("family", "{}"), ("method", "{}"), ("batch", "{}"), ("rounds", "{}"), ("nfe", "{}"),
            ("wall_s_median", "{:.4f}"), ("speedup", None), ("max_abs_err", "{:.1e}"), ("rel_err", "{:.1e}")]
    if any("fid" in r for r in records):
        cols.append(("fid", "{:.2f}"))
    if any("sampler" in r for r in records):
        cols.insert(1, ("sampler", "{}"))
    rows = [[c for c, _ in cols]]
    for r in records:
        rows.append([speed(r) if fmt is None else fmt.format(r[c]) if r.get(c) is not None else "-"
                     for c, fmt in cols])
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in rows]
    if noisy(records):
        lines.append(f"! noisy: the per-pair speed ratios of {len(noisy(records))} row(s) disagree by more than "
                     f"{NOISY_SPREAD:.0%} (interquartile range over median); another job is probably sharing "
                     "this machine, so do not trust those speed-ups")
    return "\n".join(lines)


def markdown(records: list[dict[str, Any]]) -> str:
    cols = ["method", "batch", "rounds", "nfe", "wall_s_median", "speedup", "max_abs_err", "rel_err"]
    if any("fid" in r for r in records):
        cols.append("fid")
    if any("sampler" in r for r in records):
        cols.insert(0, "sampler")

    def f(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"
        return "-" if v is None else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(f(r.get(c)) for c in cols) + " |" for r in records]
    return "\n".join(lines)


def power_fit(xs: list[float], ys: list[float]) -> dict[str, float]:
    """Least squares log y = log_prefactor + exponent * log x, with the Pearson r of (log x, log y) and the R^2."""
    lx = torch.tensor(xs, dtype=torch.float64).log()
    ly = torch.tensor(ys, dtype=torch.float64).log()
    cx, cy = lx - lx.mean(), ly - ly.mean()
    b = (cx * cy).sum() / cx.square().sum()
    r = (cx * cy).sum() / (cx.square().sum() * cy.square().sum()).sqrt()
    return {"exponent": b.item(), "log_prefactor": (ly.mean() - b * lx.mean()).item(), "pearson_r": r.item(),
            "r2": (r * r).item()}


def write_json(obj: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")
