"""pargen's speculative Jacobi decoding beside the SJD authors' own, on the same raster model.

The peer is the reference code of Teng et al. (speculative Jacobi decoding, github.com/tyshiwo1/
Accelerating-T2I-AR-with-SJD), run from a checkout, never copied: its LlamaGen model class takes `raster-mnist`
(LlamaGen's key names), its `renew_llamagen` / `renew_sampler` turn it into their SJD sampler, and
`LlamaGenSolver.generate` samples (class-conditional, guidance 2 as the checkpoint's default, all 1,024 codes, the
same window of 16 tokens, random initial drafts as in their scripts). Two things are supplied around their code,
not in it: `raster-mnist` was trained with its class token unrotated, so their RoPE table gets identity rows for it
(their `precompute_freqs_cis_2d` wrapped), and their sampler times itself with CUDA events, which a CPU lacks
(`torch.cuda.Event` / `synchronize` given perf_counter stand-ins in their module). Their code targets transformers
4.4x: run this with such a Python, e.g. `python -m venv --system-site-packages v && v/bin/pip install
transformers==4.45.2 absl-py`.

Per seed (label = seed mod 10): the sequential calls each sampler makes for the 64 tokens, mean over `--seeds`;
then, interleaved at batch 1, the wall time of pargen's sequential decoder, pargen's SJD and theirs. Both SJDs draw
from the model's distribution with their own random numbers, so their images differ; what compares is the cost.

    v/bin/python benchmarks/sjd_peer.py --peer PATH/TO/Accelerating-T2I-AR-with-SJD --json docs/bench_sjd_peer.json
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
import types
from pathlib import Path

import torch

import pargen
from pargen.evaluation import bench as benchmod


class _Event:
    """A CUDA timing event's interface, on the CPU clock."""

    def __init__(self, **_):
        self.t = 0.0

    def record(self):
        self.t = time.perf_counter()

    def elapsed_time(self, other: "_Event") -> float:
        return 1000 * (other.t - self.t)


class _TorchOnCPU:
    """torch as the peer's sampler module sees it, with CUDA's timing calls answered on the CPU."""

    cuda = types.SimpleNamespace(Event=_Event, synchronize=lambda: None)

    def __getattr__(self, name):
        return getattr(torch, name)


def load_peer(path: str):
    """The peer's LlamaGen model module, its solver and its sampler module (imported from the checkout)."""
    root = Path(path)
    if not (root / "llamagen" / "llamagen_solver.py").exists():
        raise SystemExit(f"{path} is not a checkout of tyshiwo1/Accelerating-T2I-AR-with-SJD")
    import transformers

    if tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (4, 46):
        raise SystemExit(f"the peer's sampler needs transformers 4.4x (this Python has {transformers.__version__}); "
                         "see this script's docstring")
    sys.path[:0] = [str(root), str(root / "lumina_mgpt")]
    import llamagen.llamagen as model_module
    import llamagen.llamagen_solver as solver_module
    import scheduler.jacobi_iteration_lumina_mgpt as sampler_module

    sampler_module.torch = _TorchOnCPU()
    return model_module, solver_module, sampler_module


def peer_model(modules, pipe, window: int, cfg: float):
    """The peer's SJD sampler holding `pipe`'s weights (strictly: every key and shape)."""
    model_module, solver_module, sampler_module = modules
    c = pipe.model.config
    if c.class_rope == "identity":  # the class token unrotated, as the model was trained
        real = model_module.precompute_freqs_cis_2d

        def unrotated_class_rows(*a, **k):
            table = real(*a, **k)
            table[: a[3] if len(a) > 3 else k["cls_token_num"], :, 0] = 1
            return table
        model_module.precompute_freqs_cis_2d = unrotated_class_rows
    args = model_module.ModelArgs(dim=c.width, n_layer=c.depth, n_head=c.heads, n_kv_head=c.kv_heads or None,
                                  multiple_of=c.ffn_multiple, vocab_size=c.vocab_size, block_size=c.grid ** 2,
                                  num_classes=c.num_classes, cls_token_num=1, model_type="c2i", norm_eps=c.norm_eps,
                                  rope_base=c.rope_base, token_dropout_p=0.0, resid_dropout_p=0.0,
                                  ffn_dropout_p=0.0)
    gpt = model_module.Transformer(args)
    gpt.load_state_dict(pipe.model.state_dict(), strict=True)
    gpt.eval()
    gpt.__class__ = solver_module.renew_llamagen(gpt.__class__)
    gpt._init_new_params()
    gpt.__class__ = sampler_module.renew_sampler(gpt.__class__)
    gpt.img_vocab = torch.arange(c.vocab_size)  # every code is an image token (no Chameleon vocabulary)
    gpt._init_new_params(jacobi_loop_interval_l=1, jacobi_loop_interval_r=c.grid ** 2 - window - 2,
                         max_num_new_tokens=window, guidance_scale=cfg, seed=None, multi_token_init_scheme="random",
                         do_cfg=True, image_top_k=c.vocab_size, text_top_k=10,
                         prefix_token_sampler_scheme="speculative_jacobi", use_chameleon_tokenizer=False)
    return gpt, solver_module.LlamaGenSolver(model=gpt, image_top_k=c.vocab_size, image_top_p=1.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--peer", required=True, help="a checkout of github.com/tyshiwo1/Accelerating-T2I-AR-with-SJD")
    p.add_argument("--checkpoint", default="raster-mnist")
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--seeds", type=int, default=32)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_grad_enabled(False)
    modules = load_peer(args.peer)
    pipe = pargen.load(args.checkpoint)
    c = pipe.model.config
    cfg = pipe.settings("sjd").cfg
    gpt, solver = peer_model(modules, pipe, args.window, cfg)
    x = torch.randint(0, c.vocab_size, (2, c.grid ** 2), generator=torch.Generator().manual_seed(0))
    y = torch.tensor([3, 7])
    gpt.setup_caches(2, 1 + c.grid ** 2, torch.float32)  # parity: the same model on both sides
    theirs = gpt.inference(idx=x[:, :-1], cond_idx=y, input_pos=torch.arange(c.grid ** 2))
    parity = float((pipe.model.run(pipe.model.embed(y, x[:, :-1])) - theirs).abs().max())
    print(f"teacher-forced logits, pargen vs the peer's model: max abs difference {parity:.1e}")
    calls = {"n": 0}
    forward = gpt.forward

    def counting(*a, **k):
        calls["n"] += 1
        return forward(*a, **k)
    gpt.forward = counting

    def peer_run(seed: int):
        def go():
            calls["n"] = 0
            torch.manual_seed(seed)
            with contextlib.redirect_stdout(None):  # their sampler prints its timing and NFE every call
                tokens = solver.generate(pipe.labels([seed]), c.grid ** 2, None, cfg_scale=cfg, temperature=1.0,
                                         top_k=c.vocab_size, top_p=1.0, sample_logits=True)
            return tokens.float(), {"rounds": calls["n"], "nfe": None}
        return go

    ours = {m: pipe.settings(m, window=args.window) for m in ("sequential", "sjd")}

    def our_run(method: str, seed: int):
        return lambda: pipe.draw(pipe.labels([seed]), pipe.generator(seed), ours[method])

    seeds = list(range(args.seeds))
    peer_calls = [peer_run(s)()[1]["rounds"] for s in seeds]
    our_calls = [our_run("sjd", s)()[1]["rounds"] for s in seeds]
    print(f"{args.checkpoint}, {c.grid ** 2} tokens, window {args.window}, guidance {cfg:g}, {args.seeds} seeds: "
          f"sequential calls per image: pargen sjd {statistics.mean(our_calls):.1f}, "
          f"peer sjd {statistics.mean(peer_calls):.1f}")
    records = benchmod.run("raster", benchmod.Method("pargen sequential", our_run("sequential", 0)),
                           [benchmod.Method("pargen sjd", our_run("sjd", 0), compare=False),
                            benchmod.Method("peer sjd", peer_run(0), compare=False)],
                           batch=1, seed=0, repeats=args.repeats, progress=True)
    for r in records:
        print(f"{r['method']:18s} rounds {r['rounds']:3d}  {1e3 * r['wall_s_median']:7.1f} ms  "
              f"{r['speedup']:.2f}x pargen's sequential ({r['speedup_q1']:.2f}-{r['speedup_q3']:.2f})"
              + ("  NOISY" if r["noisy"] else ""))
    if args.json:
        benchmod.write_json({"checkpoint": args.checkpoint, "peer": "tyshiwo1/Accelerating-T2I-AR-with-SJD",
                             "window": args.window, "guidance": cfg, "seeds": args.seeds, "logits_parity": parity,
                             "calls_per_image": {"pargen sequential": c.grid ** 2,
                                                 "pargen sjd": statistics.mean(our_calls),
                                                 "peer sjd": statistics.mean(peer_calls)},
                             "calls_pargen_sjd": our_calls, "calls_peer_sjd": peer_calls, "records": records},
                            args.json)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
