"""Speed measurement: baseline and fast methods in one process, on the same model, inputs and noise.

Each method is a callable returning (output, cost); the harness warms up, times `repeats` runs, and writes one
record per method with the schema documented in the README:
    family, method, baseline, batch, seed, rounds, nfe, wall_s_median, wall_s_min, speedup, max_abs_err,
    rel_err, [fid, ...extra]
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

from .. import distributed


@dataclass
class Method:
    name: str
    run: Callable[[], tuple[Tensor, dict[str, Any]]]  # -> (output, {"rounds": .., "nfe": .., ...})
    extra: dict[str, Any] = field(default_factory=dict)
    compare: bool = True  # False: another model (errors against the baseline mean nothing, left empty)
    replicated: bool = False  # under torchrun every rank computes the whole output (not a share of the batch)


def median_seconds(fn: Callable[[], Any], repeats: int) -> tuple[Any, float]:
    """(last output, median wall seconds of `repeats` calls after one warm-up call), in this process only."""
    fn()
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def _time(m: Method, repeats: int, warmup: int) -> tuple[Tensor, dict[str, Any], list[float]]:
    """Under torchrun each rank runs its share of the batch: runs start together (barrier), a run's time is the
    slowest rank's, so are its rounds and nfe, and the output is every rank's rows in rank order (a replicated
    method's output is already whole on every rank)."""
    _, world = distributed.world()
    for _ in range(warmup):
        m.run()
    times = []
    out, cost = None, {}
    for _ in range(repeats):
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        out, cost = m.run()
        took = torch.tensor(time.perf_counter() - t0, dtype=torch.float64)
        if world > 1:
            dist.all_reduce(took, op=dist.ReduceOp.MAX)
        times.append(float(took))
    if world > 1:  # the batch's cost is its slowest share's
        for k in ("rounds", "nfe"):
            if isinstance(cost.get(k), int):
                v = torch.tensor(cost[k])
                dist.all_reduce(v, op=dist.ReduceOp.MAX)
                cost = {**cost, k: int(v)}
    return (out if m.replicated else distributed.gather(out)), cost, times


def run(family: str, baseline: Method, methods: list[Method], *, batch: int, seed: int, repeats: int = 5,
        warmup: int = 1) -> list[dict[str, Any]]:
    """Time the baseline and each method; errors are measured against the baseline's output. Under torchrun,
    `batch` is the whole batch and each method runs on this rank's share of it (see `_time`)."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    ref, ref_cost, ref_times = _time(baseline, repeats, warmup)
    ref_med = statistics.median(ref_times)
    records = []
    for m, (out, cost, times) in [(baseline, (ref, ref_cost, ref_times))] + [(m, _time(m, repeats, warmup))
                                                                               for m in methods]:
        med = statistics.median(times)
        diff = (out.double() - ref.double()) if m.compare else None
        records.append({
            "family": family, "method": m.name, "baseline": baseline.name, "batch": batch, "seed": seed,
            "processes": distributed.world()[1],
            "rounds": cost.get("rounds"), "nfe": cost.get("nfe"),
            "wall_s_median": med, "wall_s_min": min(times), "speedup": ref_med / med,
            "max_abs_err": None if diff is None else diff.abs().max().item(),
            "rel_err": None if diff is None else (diff.norm() / ref.double().norm().clamp_min(1e-30)).item(),
            **{k: v for k, v in cost.items() if k not in ("rounds", "nfe")}, **m.extra,
        })
    return records


def table(records: list[dict[str, Any]]) -> str:
    """A readable fixed-width table of bench records."""
    cols = [("family", "{}"), ("method", "{}"), ("batch", "{}"), ("rounds", "{}"), ("nfe", "{}"),
            ("wall_s_median", "{:.4f}"), ("speedup", "{:.2f}x"), ("max_abs_err", "{:.1e}"), ("rel_err", "{:.1e}")]
    if any("fid" in r for r in records):
        cols.append(("fid", "{:.2f}"))
    if any("sampler" in r for r in records):
        cols.insert(1, ("sampler", "{}"))
    rows = [[c for c, _ in cols]]
    for r in records:
        rows.append([fmt.format(r[c]) if r.get(c) is not None else "-" for c, fmt in cols])
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in rows)


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


def write_json(obj: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")
