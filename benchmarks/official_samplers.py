"""pargen's samplers against the official ones on the same weights: FoundationVision/VAR and FoundationVision/LlamaGen.

Every speed-up pargen reports is measured from its own sequential sampler; this shows that baseline is not a straw
man. The official models are built from their own code (a checkout given by `--var` / `--llamagen`, imported, never
copied) at an official size with random weights (their own initialisation; LlamaGen's zero output layer drawn
N(0, 0.02) instead, as in `llamagen_random.py`), their state dicts are read by pargen's converters, and both sides
sample from the same seed in the official protocol:

- VAR: `VAR.autoregressive_infer_cfg(B, labels, g_seed, cfg, top_k, top_p)` against `samplers.autoregressive.sample`
  with a generator seeded alike (the same tokens, so images equal to float rounding);
- LlamaGen: `autoregressive.models.generate.generate` after `torch.manual_seed(seed)` against pargen's raster decoder
  on the exponential noise the official multinomial draws (the same tokens), and pargen's Jacobi decoding (the same
  tokens in fewer calls).

Timing interleaved in one process (`pargen.evaluation.bench.run`), the official sampler the baseline; errors are
max abs differences of the images on [0, 1] (VAR) and of the token ids (LlamaGen: 0 means every token equal).

    python benchmarks/official_samplers.py --var PATH/TO/VAR --llamagen PATH/TO/LlamaGen \
        --json docs/bench_official_samplers.json
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any

import torch

from pargen.convert.llamagen import load_gpt
from pargen.convert.var import load_vae, load_var
from pargen.evaluation import bench as benchmod
from pargen.samplers import autoregressive as AR


@contextlib.contextmanager
def official_code(path: str, marker: str, repo: str):
    """An official repository's checkout on the import path while the block runs (its code is run, not copied);
    afterwards its modules are forgotten, since the VAR and LlamaGen checkouts both have a top-level `utils`."""
    p = Path(path).resolve()
    if not (p / marker).exists():
        raise SystemExit(f"{path} is not a checkout of {repo} (no {marker})")
    sys.path.insert(0, str(p))
    try:
        yield p
    finally:
        sys.path.remove(str(p))
        for name, m in list(sys.modules.items()):
            if str(getattr(m, "__file__", None) or "").startswith(str(p)):
                del sys.modules[name]


def var_side(path: str, depth: int, batch: int, cfg: float, top_k: int, top_p: float, seed: int,
             repeats: int) -> list[dict[str, Any]]:
    with official_code(path, "models/var.py", "FoundationVision/VAR"):
        from models.var import VAR  # the official classes, constructed directly: `build_vae_var` would switch off
        from models.vqvae import VQVAE  # torch's own initialisation process-wide (its reset_parameters patch)
        return _var(VAR, VQVAE, depth, batch, cfg, top_k, top_p, seed, repeats)


def _var(VAR, VQVAE, depth: int, batch: int, cfg: float, top_k: int, top_p: float, seed: int, repeats: int):
    torch.manual_seed(seed)
    pn = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # the 256-px release
    vae = VQVAE(vocab_size=4096, z_channels=32, ch=160, test_mode=True, share_quant_resi=4, v_patch_nums=pn).eval()
    var = VAR(vae_local=vae, num_classes=1000, depth=depth, embed_dim=64 * depth, num_heads=depth, norm_eps=1e-6,
              shared_aln=False, cond_drop_rate=0.1, attn_l2_norm=True, patch_nums=pn, flash_if_available=False,
              fused_if_available=False)
    var.init_weights(init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02, init_std=-1)
    var.eval()
    ours_vae, ours = load_vae(vae.state_dict(), pn), load_var(var.state_dict())
    labels = torch.arange(batch) * 97 % 1000

    def official():
        with torch.inference_mode():
            img = var.autoregressive_infer_cfg(batch, labels, g_seed=seed, cfg=cfg, top_k=top_k, top_p=top_p)
        return img, {"rounds": len(pn), "nfe": sum(p * p for p in pn)}

    def pargen():
        with torch.inference_mode():
            out = AR.sample(ours, ours_vae, labels, cfg=cfg, top_k=top_k, top_p=top_p,
                            generator=torch.Generator().manual_seed(seed))
        return out.img, {"rounds": out.rounds, "nfe": out.nfe}

    n = sum(p.numel() for p in var.parameters())
    extra = {"model": f"VAR-d{depth} ({n / 1e6:.0f}M, random weights)", "cfg": cfg, "top_k": top_k, "top_p": top_p}
    return benchmod.run("var", benchmod.Method("official", official, extra),
                        [benchmod.Method("pargen", pargen, extra)], batch=batch, seed=seed, repeats=repeats,
                        progress=True)


def llamagen_side(path: str, name: str, batch: int, cfg: float, top_k: int, top_p: float, seed: int, repeats: int,
                  window: int) -> list[dict[str, Any]]:
    with official_code(path, "autoregressive/models/gpt.py", "FoundationVision/LlamaGen"):
        from autoregressive.models.generate import generate
        from autoregressive.models.gpt import GPT_models
        return _llamagen(generate, GPT_models, name, batch, cfg, top_k, top_p, seed, repeats, window)


def _llamagen(generate, GPT_models, name: str, batch: int, cfg: float, top_k: int, top_p: float, seed: int,
              repeats: int, window: int):
    torch.manual_seed(seed)
    gpt = GPT_models[name](vocab_size=16384, block_size=256, num_classes=1000, cls_token_num=1, model_type="c2i")
    torch.nn.init.normal_(gpt.output.weight, std=0.02)  # the official zero head would make every token uniform
    gpt.eval()
    ours = load_gpt({k: v for k, v in gpt.state_dict().items()}, image_size=256)
    labels = torch.arange(batch) * 97 % 1000
    N, V = ours.config.tokens, ours.config.vocab_size

    def official():
        torch.manual_seed(seed)
        with torch.inference_mode():
            tokens = generate(gpt, labels, N, cfg_scale=cfg, temperature=1.0, top_k=top_k, top_p=top_p,
                              sample_logits=True)
        return tokens.float(), {"rounds": N, "nfe": N}

    def pargen(method: str):
        def go():
            torch.manual_seed(seed)  # the official draws: one exponential set per token (see research/llamagen.md)
            noise = AR.exponential_noise(batch, N, V)
            with torch.inference_mode():
                x, rounds, nfe, _ = AR.raster_tokens(ours, labels, cfg, 1.0, top_k, top_p, noise, method=method,
                                                     window=window)
            return x.float(), {"rounds": rounds, "nfe": nfe // batch}
        return go

    n = sum(p.numel() for p in gpt.parameters())
    extra = {"model": f"LlamaGen {name} ({n / 1e6:.0f}M, random weights)", "cfg": cfg, "top_k": top_k,
             "top_p": top_p}
    return benchmod.run("raster", benchmod.Method("official", official, extra),
                        [benchmod.Method("pargen", pargen("sequential"), extra),
                         benchmod.Method("pargen jacobi", pargen("jacobi"), {**extra, "window": window})],
                        batch=batch, seed=seed, repeats=repeats, progress=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--var", default=None, help="a checkout of github.com/FoundationVision/VAR")
    p.add_argument("--llamagen", default=None, help="a checkout of github.com/FoundationVision/LlamaGen")
    p.add_argument("--var-depth", type=int, default=16)
    p.add_argument("--llamagen-model", default="GPT-B")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--window", type=int, default=16, help="pargen's Jacobi decoding: tokens per pass")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if not (args.var or args.llamagen):
        p.error("give --var and / or --llamagen")
    records = []
    if args.var:  # the official sample scripts' settings: VAR cfg 4, top-k 900, top-p 0.96; LlamaGen cfg 4, top-k 2000
        records += var_side(args.var, args.var_depth, args.batch, 4.0, 900, 0.96, args.seed, args.repeats)
    if args.llamagen:
        records += llamagen_side(args.llamagen, args.llamagen_model, args.batch, 4.0, 2000, 1.0, args.seed,
                                 args.repeats, args.window)
    for r in records:
        print(f"{r['model']:36s} {r['method']:14s} rounds {r['rounds']:4d}  {r['wall_s_median']:7.2f} s  "
              f"{r['speedup']:.2f}x the official ({r['speedup_q1']:.2f}-{r['speedup_q3']:.2f})  max abs diff "
              f"{r['max_abs_err']:.1e}" + ("  NOISY" if r["noisy"] else ""))
    if args.json:
        benchmod.write_json(records, args.json)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
