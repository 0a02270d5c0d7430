"""Local diffusers pipeline directories as pargen pipelines: loading (`pargen.load(DIR)`, the bundled
"unet-mnist"), the call for a list of seeds, calibration and the bench. The sampler itself is
`pargen.samplers.diffusers` (public as `pargen.diffusers.parallel`)."""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor

from ..errors import PargenError
from ..samplers.diffusers import find_denoiser, parallel
from . import Output, check_finite, seed_list


RECORD = "pargen_calibration.json"  # beside the pipeline's model_index.json


def load_pipeline(path: str, device: str = "cpu", scheduler: str | None = None,
                  dtype: torch.dtype = torch.float32):
    """A diffusers pipeline from a local directory (`save_pretrained`), optionally with another scheduler class
    built from its scheduler's config (e.g. "DPMSolverMultistepScheduler"); never downloads."""
    from ..checkpoint import pipeline_dir

    root = pipeline_dir(path)
    if root is None:
        raise PargenError(f"{path} is not a diffusers pipeline directory (no model_index.json)")
    import diffusers

    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(str(root), local_files_only=True, torch_dtype=dtype)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise PargenError(f"cannot load the pipeline in {path}: {str(e).splitlines()[0]}") from None
    find_denoiser(pipe)
    if scheduler:
        cls = getattr(diffusers, scheduler, None)
        if cls is None or not hasattr(cls, "from_config") or not scheduler.endswith("Scheduler"):
            raise PargenError(f"diffusers has no scheduler {scheduler!r}")
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def call_args(pipe, seeds: list[int], labels: list[int] | None = None, prompt: str | None = None,
              steps: int | None = None, guidance: float | None = None) -> dict[str, Any]:
    """Keyword arguments of `pipe(...)` for these seeds: one generator per image (an image depends on its seed
    only), and what the pipeline takes of labels, prompt, steps and guidance."""
    params = inspect.signature(pipe.__call__).parameters
    kw: dict[str, Any] = {"generator": [torch.Generator().manual_seed(s) for s in seeds], "output_type": "np"}
    if "class_labels" in params:
        if not labels:
            raise PargenError(f"{type(pipe).__name__} is class-conditional; give --labels")
        kw["class_labels"] = [labels[i % len(labels)] for i in range(len(seeds))]
    elif labels:
        raise PargenError(f"{type(pipe).__name__} takes no class labels")
    if "prompt" in params:
        kw["prompt"] = [prompt or ""] * len(seeds)
    elif prompt:
        raise PargenError(f"{type(pipe).__name__} takes no prompt")
    elif "batch_size" in params:
        kw["batch_size"] = len(seeds)
    if steps is not None:
        kw["num_inference_steps"] = steps
    if guidance is not None:
        if "guidance_scale" not in params:
            raise PargenError(f"{type(pipe).__name__} takes no guidance scale")
        kw["guidance_scale"] = guidance
    return kw


def images(out) -> Tensor:
    """A pipeline output's images as (N, C, H, W) float32 in [0, 1]."""
    x = out.images if hasattr(out, "images") else out[0]
    x = torch.as_tensor(x).float()
    return x.permute(0, 3, 1, 2).contiguous() if x.shape[-1] in (1, 3, 4) else x


def sample(path: str, pipe, seeds: list[int], method: str = "auto", batch_size: int = 16, steps: int | None = None,
           guidance: float | None = None, window: int | None = None, tol: float | None = None,
           labels: list[int] | None = None, prompt: str | None = None) -> tuple[Tensor, dict[str, Any], str]:
    """(images (N, C, H, W) in [0, 1], cost per batch (mean), description) of a pipeline directory's pipeline for
    these seeds, in batches; `method="auto"` follows the directory's calibration record."""
    from tqdm import tqdm

    st = settings(path, pipe, method, min(batch_size, len(seeds)), steps, guidance, window, tol)
    fast = parallel(pipe, st["method"], st["window"], st["tol"])
    imgs, costs = [], []
    for i in tqdm(range(0, len(seeds), batch_size), desc="sample", leave=False, disable=len(seeds) <= batch_size):
        imgs.append(images(fast(**call_args(pipe, seeds[i: i + batch_size], labels, prompt, steps, guidance))))
        check_finite(imgs[-1], seeds[i: i + batch_size], f"{type(pipe).__name__} ({st['method']})")
        costs.append(fast.cost)
    path = {"pipeline": "the pipeline's own loop", "driven": "driven steps", "replay": "replayed loop"}
    how = ("sequential" if st["method"] == "sequential" else
           f"Picard (window {st['window']}, tol {st['tol']:g}{', calibrated' if st['calibrated'] else ''})") + \
        f", {path.get(costs[-1].path, costs[-1].path)}"
    cost = {k: sum(getattr(c, k) for c in costs) / len(costs) for k in ("rounds", "calls", "evaluations")}
    return torch.cat(imgs), {**cost, **st}, f"{type(pipe).__name__} + {type(pipe.scheduler).__name__}, {how}"


class DiffusersDirectory:
    """A local diffusers pipeline directory behind the calls of `pargen.load`'s pipelines (`sample` returns the
    same `Output`; `calibrate` and `bench` write and return the same records): `pargen.load(DIR)` gives one."""

    family = "diffusers"
    methods = ("auto", "sequential", "picard")

    def __init__(self, path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 scheduler: str | None = None):
        self.path, self.pipe = str(path), load_pipeline(path, device, scheduler, dtype)
        self.name = self.path.rstrip("/").rsplit("/", 1)[-1]

    def __repr__(self) -> str:
        return f"DiffusersDirectory({self.name!r}, {type(self.pipe).__name__} + {type(self.pipe.scheduler).__name__})"

    def sample(self, seeds: int | list[int] = 16, labels: list[int] | None = None, method: str = "auto",
               batch_size: int = 16, steps: int | None = None, guidance: float | None = None,
               window: int | None = None, tol: float | None = None, prompt: str | None = None):
        """Images for `seeds` (one generator per seed), `method="auto"` as the directory's calibration says."""

        seeds = seed_list(seeds)
        x, cost, desc = sample(self.path, self.pipe, seeds, method, batch_size, steps, guidance, window, tol,
                               list(labels) if labels is not None else None, prompt)
        y = None if labels is None else torch.tensor([list(labels)[i % len(labels)] for i in range(len(seeds))])
        st = {k: cost[k] for k in ("method", "window", "tol", "calibrated")}
        return Output(x, seeds, y, st["method"], {**st, "steps": steps, "guidance": guidance},
                      {k: cost[k] for k in ("rounds", "calls", "evaluations")}, desc)

    def calibrate(self, steps: int | None = None, guidance: float | None = None, **kw: Any) -> dict[str, Any]:
        """The window and tolerance within `max_err` of the pipeline's own images (see `calibrate`)."""
        return calibrate(self.path, self.pipe, steps, guidance, **kw)

    def bench(self, batches: list[int] = (1, 16), repeats: int = 5, steps: int | None = None,
              guidance: float | None = None, **kw: Any) -> list[dict[str, Any]]:
        """The pipeline's own loop against Picard, interleaved (see `bench`)."""
        return bench(self.path, self.pipe, steps, guidance, list(batches), repeats, **kw)


def _record_key(pipe, steps: int | None, guidance: float | None) -> str:
    return f"{type(pipe.scheduler).__name__}/{steps}/{guidance}"


def read_record(path: str) -> dict[str, Any]:
    import json
    from pathlib import Path

    p = Path(path) / RECORD
    if not p.exists():
        return {}
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise PargenError(f"calibration record {p} is corrupt: {e}") from None


def settings(path: str, pipe, method: str, batch: int, steps: int | None, guidance: float | None,
             window: int | None = None, tol: float | None = None) -> dict[str, Any]:
    """method "auto": the calibrated window and tolerance for this scheduler, steps and guidance up to the batch
    where they were measured to win, else the pipeline's own sequential loop. Explicit windows / tols win."""
    if method not in ("auto", "sequential", "picard"):
        raise PargenError(f"a diffusers pipeline samples with method auto, sequential or picard, not {method!r}")
    rec = read_record(path).get(_record_key(pipe, steps, guidance), {})
    if method == "auto":
        method = "picard" if rec and batch <= rec.get("max_batch", 0) else "sequential"
    return {"method": method, "window": window or rec.get("window", 8), "tol": rec.get("tol", 1e-3) if tol is None
            else tol, "calibrated": bool(rec)}


def calibrate(path: str, pipe, steps: int | None, guidance: float | None, max_err: float = 2e-3, seeds: int = 4,
              batches: list[int] = (1, 2, 4, 16), seed: int = 1000, prompt: str | None = None,
              labels: list[int] | None = None, repeats: int = 3, log=print) -> dict[str, Any]:
    """Per window, the loosest tolerance whose images stay within `max_err` (max abs on the [-1, 1] scale) of the
    pipeline's own images on `seeds` images; the fastest at batch 1 is stored in DIR/pargen_calibration.json with
    the largest batch at which it still beats the sequential loop by more than timing noise."""
    import json
    from pathlib import Path

    from ..evaluation.bench import median_seconds
    from ..evaluation.calibrate import picard_setting

    ss = list(range(seed, seed + seeds))

    def run(s, **p):
        return images(parallel(pipe, **p)(**call_args(pipe, s, labels, prompt, steps, guidance)))

    def timed(s, **p) -> float:
        return median_seconds(lambda: run(s, **p), repeats)[1]

    def error(w: int, tol: float) -> tuple[float, dict[str, Any]]:
        fast = parallel(pipe, window=w, tol=tol)
        got = images(fast(**call_args(pipe, ss, labels, prompt, steps, guidance)))
        return float((got - ref).abs().max()) * 2, {"rounds": fast.cost.rounds, "calls": fast.cost.calls}

    def batch_seconds(B: int, w: int, tol: float) -> tuple[float, float]:
        sb = list(range(seed, seed + B))
        return timed(sb, method="sequential"), timed(sb, window=w, tol=tol)

    ref = run(ss, method="sequential")
    seq_s = timed(ss[:1], method="sequential")
    log(f"{type(pipe).__name__} + {type(pipe.scheduler).__name__}: sequential {seq_s * 1e3:.0f} ms at batch 1; "
        f"max abs error allowed {max_err:g} on {seeds} seeds")
    rec = {"seeds": seeds, **picard_setting(error, lambda w, tol: timed(ss[:1], window=w, tol=tol), seq_s, max_err,
                                            batches, batch_seconds, f"calibrate {type(pipe.scheduler).__name__}",
                                            log)}
    doc = read_record(path)
    doc[_record_key(pipe, steps, guidance)] = rec
    out = Path(path) / RECORD
    from ..checkpoint import atomic_write

    atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=2) + "\n"))
    log("  -> " + (f"window {rec['window']}, tol {rec['tol']:g}, up to batch {rec['max_batch']}" if rec["max_batch"]
                    else "sequential at every batch size") + f"; saved to {out}")
    return rec


def bench(path: str, pipe, steps: int | None, guidance: float | None, batches: list[int], repeats: int,
          seed: int = 0, window: int | None = None, tol: float | None = None, prompt: str | None = None,
          labels: list[int] | None = None, progress: bool = False) -> list[dict[str, Any]]:
    """The pipeline's own loop against Picard (the calibrated or given window and tolerance), interleaved."""
    from ..evaluation import bench as benchmod

    records = []
    for B in batches:
        st = settings(path, pipe, "picard", B, steps, guidance, window, tol)
        ss = list(range(seed, seed + B))

        def runner(**p):
            fast = parallel(pipe, **p)

            def go():
                out = images(fast(**call_args(pipe, ss, labels, prompt, steps, guidance)))
                c = fast.cost
                return out * 2 - 1, {"rounds": c.rounds, "nfe": c.evaluations, "calls": c.calls, "path": c.path,
                                     "overhead_s": c.overhead_s, "model_s_per_round":
                                     c.model_s / max(c.rounds, 1)}
            return go

        info = {"pipeline": type(pipe).__name__, "scheduler": type(pipe.scheduler).__name__, "steps": steps,
                "guidance": guidance}
        records += benchmod.run("diffusers", benchmod.Method("sequential", runner(method="sequential"), info),
                                [benchmod.Method("picard", runner(window=st["window"], tol=st["tol"]),
                                                 {**info, "window": st["window"], "tol": st["tol"],
                                                  "calibrated": st["calibrated"]})],
                                batch=B, seed=seed, repeats=repeats, progress=progress)
    return records
