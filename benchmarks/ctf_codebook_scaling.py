"""Sampling cost of coarse-to-fine (CTF) against raster AR as the codebook grows.

CTF's speed claim (arXiv 2503.16194) is about large codebooks: stage 1 predicts one of K coarse labels per step
instead of one of V codes, and a single stage-2 pass then picks every fine label. The bundled MNIST models have
V = 1024, where a step's cost is the transformer, not the head, and CTF is 5% slower. This benchmark keeps the
bundled architectures (`raster-mnist`, `c2f-mnist`: width 128, depth 4, stage 2 depth 2, 8x8 tokens, K = 64) and
widens only the codebook, timing sequential sampling of the tokens (no decoder) in one process. Weights are
random: the cost of a sequential sampling step does not depend on them.

    python benchmarks/ctf_codebook_scaling.py --vocab 1024 4096 16384 --batch 1 16 --json docs/bench_ctf_codebook.json
"""
from __future__ import annotations

import argparse

import torch

from pargen.evaluation import bench as benchmod
from pargen.models.c2f import C2F, C2FConfig
from pargen.models.raster_ar import RasterAR, RasterARConfig
from pargen.samplers import autoregressive as AR


class TokensOnly:
    """A stand-in tokenizer that skips decoding: only token sampling is timed."""

    def indices_to_img(self, idx: torch.Tensor) -> torch.Tensor:
        return idx[:, :1].float().view(-1, 1, 1, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--coarse", type=int, default=64)
    p.add_argument("--cfg", type=float, default=2.5, help="guidance (both models run both branches)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    records = []
    for V in args.vocab:
        raster = RasterAR(RasterARConfig(vocab_size=V)).eval()
        ctf = C2F(C2FConfig(vocab_size=V, coarse=args.coarse)).eval()
        ctf.assign.copy_(torch.randperm(V) % args.coarse)
        params = {"raster": sum(p.numel() for p in raster.parameters()),
                  "ctf": sum(p.numel() for p in ctf.parameters())}
        for B in args.batch:
            y = torch.arange(B) % 10

            def run(fn, model):
                def go():
                    r = fn(model, TokensOnly(), y, cfg=args.cfg, generator=torch.Generator().manual_seed(0))
                    return r.img, {"rounds": r.rounds, "nfe": r.nfe}
                return go

            with torch.inference_mode():
                recs = benchmod.run("ctf-codebook", benchmod.Method("raster-ar", run(AR.sample_raster, raster)),
                                    [benchmod.Method("ctf", run(AR.sample_c2f, ctf), compare=False)],
                                    batch=B, seed=0, repeats=args.repeats)
            for r in recs:
                r.update(vocab=V, coarse=args.coarse, params=params["ctf" if r["method"] == "ctf" else "raster"])
            records += recs
            raster_s, ctf_s = recs[0]["wall_s_median"], recs[1]["wall_s_median"]
            print(f"V {V:6d}  batch {B:3d}  raster {raster_s * 1e3:7.1f} ms  ctf {ctf_s * 1e3:7.1f} ms  "
                  f"ctf speed-up {raster_s / ctf_s:.2f}x", flush=True)
    if args.json:
        benchmod.write_json(records, args.json)
        print(f"records written to {args.json}")


if __name__ == "__main__":
    main()
