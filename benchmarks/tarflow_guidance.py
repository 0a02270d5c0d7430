"""Classifier FID of a TarFlow checkpoint over its sampling knobs: guidance scale (plain or annealed over the
tokens, ml-tarflow's `evaluate_fid.py` setting) and the prior temperature, sequential sampler with the denoising
step, seeds 0..n-1 against all 10,000 MNIST test images (the FID `pargen bench tarflow --fid` reports).

    python benchmarks/tarflow_guidance.py tarflow-mnist --json docs/tarflow_guidance.json
"""
from __future__ import annotations

import argparse

from pargen import pipelines
from pargen.evaluation import metrics
from pargen.evaluation.bench import write_json

GRID = [(1.0, 0.0, False), (1.0, 1.0, False), (1.0, 2.0, False), (1.0, 3.0, False), (1.0, 2.0, True),
        (1.0, 4.0, True), (1.0, 6.0, True)] + [(t, g, a) for t in (0.85, 0.7)
                                                for g, a in ((0.0, False), (2.0, False), (2.0, True), (4.0, True))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", nargs="?", default="tarflow-mnist")
    p.add_argument("-n", type=int, default=1000, help="samples per setting")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    pipe = pipelines.load(args.checkpoint)
    rows = []
    for temperature, cfg, annealed in GRID:
        out = pipe.sample(range(args.n), method="sequential", batch_size=100, cfg=cfg, annealed=annealed,
                          temperature=temperature, progress=False)
        rows.append({"temperature": temperature, "guidance": cfg, "annealed": annealed,
                     "fid": metrics.classifier_fid(out.signed)})
        print(f"temperature {temperature:g}, guidance {cfg:g}{' annealed' if annealed else ''}: "
              f"FID {rows[-1]['fid']:.2f}", flush=True)
    if args.json:
        write_json({"checkpoint": args.checkpoint, "n": args.n, "sampler": "sequential + denoising step",
                    "rows": rows}, args.json)
        print(f"json: {args.json}")


if __name__ == "__main__":
    main()
