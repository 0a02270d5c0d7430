"""pargen.diffusers against diffusers' own ParaDiGMS pipeline, side by side on the same tiny Stable Diffusion.

`StableDiffusionParadigmsPipeline` (diffusers' copy of ParaDiGMS) with `DDPMParallelScheduler` (100 steps) and
with `DDIMParallelScheduler` (50 steps), and `pargen.diffusers.parallel` over the plain `StableDiffusionPipeline`
with the same scheduler, the same window and the same tolerance convention (tol relative to the step's noise std,
`tol_scale="noise"`), against the sequential pipeline: rounds (sequential denoiser calls), model evaluations, max
abs error of the images, wall time at batch 1 interleaved in one process (`pargen.evaluation.bench.run`), and for
pargen the time per round outside the model call (`overhead_s`) beside the model's (`model_s_per_round`).

    python benchmarks/diffusers_peer.py --steps 100 --ddim-steps 50 --window 8 --tols 0.1 0.01 \
        --json docs/bench_diffusers_peer.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import tiny_pipes as T  # noqa: E402

import pargen.diffusers as PD  # noqa: E402
from pargen.evaluation import bench as benchmod  # noqa: E402


def compare(sched, steps: int, args) -> list[dict]:
    """Sequential, the peer and pargen on one scheduler, at each tolerance."""
    from diffusers import StableDiffusionParadigmsPipeline

    pipe = T.sd(sched)
    peer = T._quiet(StableDiffusionParadigmsPipeline(
        **{k: v for k, v in pipe.components.items() if k != "image_encoder"}))
    kw = dict(prompt="a cat", num_inference_steps=steps, guidance_scale=args.guidance, height=16, width=16,
              output_type="pt")
    real = pipe.unet.forward
    seen = {"calls": 0, "rows": 0}

    def counting(*a, **k):
        seen["calls"] += 1
        seen["rows"] += a[0].shape[0] if a else k["sample"].shape[0]
        return real(*a, **k)

    def run_seq():
        seen.update(calls=0, rows=0)
        pipe.unet.forward = counting
        try:
            out = pipe(generator=torch.Generator().manual_seed(0), **kw).images * 2 - 1  # errors on [-1, 1]
        finally:
            del pipe.unet.forward
        return out, {"rounds": seen["calls"], "nfe": seen["rows"] // 2}  # two guidance branches per image

    def run_peer(tol):
        def go():
            seen.update(calls=0, rows=0)
            pipe.unet.forward = counting  # the peer shares the unet module
            try:
                out = peer(generator=torch.Generator().manual_seed(0), parallel=args.window, tolerance=tol,
                           **kw).images * 2 - 1
            finally:
                del pipe.unet.forward
            return out, {"rounds": seen["calls"], "nfe": seen["rows"] // 2}
        return go

    def run_pargen(tol):
        fast = PD.parallel(pipe, window=args.window, tol=tol, tol_scale="noise")

        def go():
            out = fast(generator=torch.Generator().manual_seed(0), **kw).images * 2 - 1
            c = fast.cost
            return out, {"rounds": c.rounds, "nfe": c.evaluations, "replays": c.replays, "path": c.path,
                         "overhead_s": c.overhead_s, "model_s_per_round": c.model_s / c.rounds}
        return go

    records = []
    for tol in args.tols:
        info = {"window": args.window, "tol": tol, "steps": steps, "scheduler": type(sched).__name__,
                "pipeline": "tiny StableDiffusionPipeline"}
        records += benchmod.run("diffusers", benchmod.Method("sequential", run_seq, info),
                                [benchmod.Method("diffusers-paradigms", run_peer(tol), info),
                                 benchmod.Method("pargen-picard", run_pargen(tol), info)],
                                batch=1, seed=0, repeats=args.repeats, progress=True)
    return records


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=100, help="DDPM steps")
    p.add_argument("--ddim-steps", type=int, default=50, help="DDIM steps (0: no DDIM comparison)")
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--tols", type=float, nargs="+", default=[0.1, 0.01])
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    from diffusers import DDIMParallelScheduler, DDPMParallelScheduler

    betas = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
    records = []
    for cls, steps in ((DDPMParallelScheduler, args.steps), (DDIMParallelScheduler, args.ddim_steps)):
        if steps:
            records += compare(cls(**betas), steps, args)
    print(benchmod.table(records))
    if args.json:
        benchmod.write_json(records, args.json)
        print(f"records written to {args.json}")


if __name__ == "__main__":
    main()
