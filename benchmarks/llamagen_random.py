"""A randomly initialised LlamaGen c2i GPT at an official size, written as a pargen checkpoint, so the raster
decoders can be timed at real size without downloading weights:

    python benchmarks/llamagen_random.py --preset llamagen-b --out runs/gpt-b
    pargen bench raster --checkpoint runs/gpt-b --batch 1 --repeats 3 --cfg 4 --json docs/bench_llamagen_b.json

The official initialisation (every Linear / Embedding N(0, 0.02)) except the output layer, which LlamaGen zeroes:
a zero head gives uniform logits whatever the prefix, so every decoder would be trivially right on its first
guess; here it is drawn N(0, 0.02) like the rest, so each token depends on the ones before it. No tokenizer is
attached (`bench raster` then times the token decoding alone: the VQ decode costs every method the same).
"""
from __future__ import annotations

import argparse

import torch

from pargen import checkpoint, registry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llamagen-b", choices=[n for n in registry.list_names()
                                                               if n.startswith("llamagen-")])
    ap.add_argument("--grid", type=int, default=16, help="tokens per side (16: 256 px, 24: 384 px)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    family, cfg = registry.preset_config(args.preset, [f"grid={args.grid}"])
    model = registry.build(family, cfg)
    torch.nn.init.normal_(model.output.weight, std=0.02)
    n = sum(p.numel() for p in model.parameters())
    out = checkpoint.save(args.out, model, {"preset": args.preset, "init": f"random (seed {args.seed}); output "
                                            "layer N(0, 0.02) instead of LlamaGen's zeros", "params": n})
    print(f"{args.preset}: {n / 1e6:.1f}M parameters, {cfg.tokens} tokens of {cfg.vocab_size} -> {out}")


if __name__ == "__main__":
    main()
