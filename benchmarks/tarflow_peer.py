"""pargen's TarFlow samplers beside the GS-Jacobi authors' own, side by side on the same trained model.

The peer is the reference code of Liu & Qin (arXiv 2505.12849, github.com/encoreus/GS-Jacobi_for_TarFlow): its
`GS_Jacobi_sampling.Model` is ml-tarflow's model with a GS-Jacobi `reverse`, so pargen's `tarflow-mnist` (ml-tarflow
key names) loads into it strictly. Both sides get the same noise, labels and guidance (the checkpoint's: 2,
annealed, on a and b), no denoising step (the peer's `reverse` has none), float32 on the CPU. Methods:

- pargen: sequential (KV cache, the baseline), the calibrated plan (`method="auto"`), Jacobi at tol 1e-5;
- peer: sequential (`num_GS` 0: its KV-cached loop), the paper's strategy [Stack-GS-J-Else] with the tough block
  (largest CRM, the first inverted) in GS-Jacobi segments of `--segments`, `--stack-iters` iterations each, the other
  blocks Jacobi with at most `--else-iters` (the paper's [.-8-32-10] on ImageNet / AFHQ), and Jacobi everywhere
  (cap T, its default stop `ebound` 1e-6); the last two again with the peer's [-3, 3] clamp of the iterates turned
  off (`unclamped`: the module's `torch.clamp` made the identity, its code untouched), and the strategy with one
  segment more, which does not divide T (the peer's last segment then leaves a position at its initial guess).

Rounds are the peer's denoiser calls counted by wrapping `MetaBlock.reverse_substep` (the conditional branch; the
unconditional one is a second call of the same size), pargen's the engine's count (both branches in one call).
Errors are against pargen's sequential answer; the peer's sequential loop is a parity check (same model, same
noise: equal to float32 rounding). Interleaved timing (`pargen.evaluation.bench.run`); each side's speed-up against
its own sequential sampler is the median of the per-round ratios.

    python benchmarks/tarflow_peer.py --peer PATH/TO/GS-Jacobi_for_TarFlow --json docs/bench_tarflow_peer.json
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import statistics
from pathlib import Path
from typing import Any

import torch

import pargen
from pargen import checkpoint
from pargen.evaluation import bench as benchmod
from pargen.evaluation import calibrate as cal
from pargen.samplers import flow


def load_peer(path: str | Path):
    """The peer's `GS_Jacobi_sampling` module, loaded from its checkout (nothing of it is copied here)."""
    f = Path(path) / "GS_Jacobi_sampling.py"
    if not f.exists():
        raise SystemExit(f"{path} is not a checkout of encoreus/GS-Jacobi_for_TarFlow (no GS_Jacobi_sampling.py)")
    spec = importlib.util.spec_from_file_location("GS_Jacobi_sampling", f)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def peer_model(module, model: torch.nn.Module) -> torch.nn.Module:
    """The peer's Model with pargen's weights (strict: every key and shape the same but the causal masks, a
    buffer of the peer's that pargen does not store)."""
    c = model.config
    if c.head_dim != 64 or c.expansion != 4 or not c.nvp:
        raise SystemExit("the peer's Model fixes head_dim 64, expansion 4 and the NVP form")
    ref = module.Model(in_channels=c.in_channels, img_size=c.img_size, patch_size=c.patch_size, channels=c.width,
                       num_blocks=c.num_blocks, layers_per_block=c.layers_per_block, num_classes=c.num_classes)
    ours = {k: v.float() for k, v in model.state_dict().items()}
    own = ref.state_dict()
    masks = {k: own[k] for k in own.keys() - ours.keys() if k.endswith(".attn_mask")}  # a constant pargen derives
    ref.load_state_dict({**ours, **masks}, strict=True)
    return ref.eval()


@contextlib.contextmanager
def counted(module):
    """Counts the peer's transformer calls (`MetaBlock.reverse_substep`) while the block is open."""
    seen = {"calls": 0, "rows": 0}
    real = module.MetaBlock.reverse_substep

    def wrapper(self, x, *a, **k):
        seen["calls"] += 1
        seen["rows"] += x.shape[1]
        return real(self, x, *a, **k)

    module.MetaBlock.reverse_substep = wrapper
    try:
        yield seen
    finally:
        module.MetaBlock.reverse_substep = real


class _NoClamp:
    """torch, as the peer's module sees it, with `clamp` the identity: the peer's Jacobi iterates are clamped to
    [-3, 3] (a safeguard that changes the fixed point wherever a latent leaves that range); this shows what the
    clamp costs without editing the peer's code."""

    def __getattr__(self, name):
        return (lambda x, *a, **k: x) if name == "clamp" else getattr(torch, name)


@contextlib.contextmanager
def unclamped(module):
    module.torch = _NoClamp()
    try:
        yield
    finally:
        module.torch = torch


def peer_strategy(n_blocks: int, tough: int, segments: int, stack_iters: int, else_iters: int) -> dict[str, list]:
    """[Stack-GS-J-Else] as the peer's per-block lists (sampling order): GS-Jacobi on block `tough`, Jacobi
    elsewhere."""
    num_gs, max_jacobi = [1] * n_blocks, [else_iters] * n_blocks
    num_gs[tough], max_jacobi[tough] = segments, stack_iters
    return {"num_GS_list": num_gs, "max_jacobi_list": max_jacobi, "guess_list": [0] * n_blocks}


def own_speedups(records: list[dict[str, Any]], baseline: str) -> None:
    """Adds `speedup_vs_own_sequential` to the records of the side whose sequential sampler is `baseline`: the
    median of the per-round ratios (the harness runs every method once per round)."""
    base = next(r for r in records if r["method"] == baseline)["wall_s"]
    side = baseline.split()[0]
    for r in records:
        if r["method"].split()[0] == side:
            r["speedup_vs_own_sequential"] = statistics.median(b / t for b, t in zip(base, r["wall_s"]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--peer", required=True, help="a checkout of github.com/encoreus/GS-Jacobi_for_TarFlow")
    p.add_argument("--checkpoint", default="tarflow-mnist")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--segments", type=int, default=7, help="peer: GS-Jacobi segments of the tough block")
    p.add_argument("--stack-iters", type=int, default=32, help="peer: iteration cap per segment of the tough block")
    p.add_argument("--else-iters", type=int, default=10, help="peer: Jacobi iteration cap of the other blocks")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_grad_enabled(False)
    module = load_peer(args.peer)
    pipe = pargen.load(args.checkpoint)
    model = pipe.model
    ref = peer_model(module, model)
    g = pipe.guidance()
    T = model.config.seq_len
    if T % args.segments:
        raise SystemExit(f"--segments {args.segments} does not divide T = {T}: the peer's last segment would leave "
                         "a position at its initial guess")
    guide = {"guidance": g.scale, "guide_what": "ac", "annealed_guidance": g.annealed, "attn_temp": g.attn_temp}
    doc, _ = checkpoint.read_record(pipe.path, cal.PLAN)
    if doc is None:
        raise SystemExit(f"{args.checkpoint} has no calibration record: run `pargen calibrate tarflow` first")
    crm = [r["crm"] for r in sorted(doc["diagnostics"], key=lambda r: r["sampling_index"])]
    tough = max(range(len(crm)), key=crm.__getitem__)  # the paper's rule: segment the block of largest CRM
    strategy = peer_strategy(model.config.num_blocks, tough, args.segments, args.stack_iters, args.else_iters)
    records = []
    for B in args.batch:
        seeds = list(range(args.seed, args.seed + B))
        z, y = pipe.noise(seeds), pipe.labels(seeds)
        auto = pipe.settings("auto", batch=B)
        jacobi = {"num_GS_list": [1] * model.config.num_blocks, "max_jacobi_list": [T] * model.config.num_blocks}

        def ours(plan, tol):
            def go():
                res = flow.sample(model, z, y, plan=plan, tol=tol, guidance=g)
                return res.x, {"rounds": res.rounds, "nfe": res.nfe,
                               "iters_per_block": [r.iters for r in res.blocks]}
            return go

        def peer(clamp: bool = True, **lists):
            def go():
                with counted(module) as seen, contextlib.nullcontext() if clamp else unclamped(module):
                    x = ref.reverse(z, y, **guide, **lists)
                calls = seen["calls"] // (2 if g.active else 1)
                return x, {"rounds": calls, "nfe": seen["rows"] // B}
            return go

        methods = [benchmod.Method("pargen auto", ours(auto.plan, auto.tol), {"tol": auto.tol}),
                   benchmod.Method("pargen jacobi", ours(flow.JACOBI, 1e-5), {"tol": 1e-5}),
                   benchmod.Method("peer sequential", peer()),
                   benchmod.Method("peer gs-jacobi", peer(**strategy), {"strategy": strategy}),
                   benchmod.Method("peer jacobi", peer(**jacobi)),
                   benchmod.Method("peer jacobi, clamp off", peer(clamp=False, **jacobi)),
                   benchmod.Method("peer gs-jacobi, clamp off", peer(clamp=False, **strategy))]
        if T % (args.segments + 1):  # the peer's segments must divide T: one more, to show what happens if not
            odd = peer_strategy(model.config.num_blocks, tough, args.segments + 1, args.stack_iters, args.else_iters)
            methods.append(benchmod.Method(f"peer gs-jacobi, {args.segments + 1} segments, clamp off",
                                           peer(clamp=False, **odd), {"strategy": odd}))
        recs = benchmod.run("tarflow", benchmod.Method("pargen sequential", ours(flow.SEQUENTIAL, 0.0)), methods,
                            batch=B, seed=args.seed, repeats=args.repeats, progress=True)
        own_speedups(recs, "pargen sequential")
        own_speedups(recs, "peer sequential")
        records += recs
        for r in recs:
            print(f"batch {B:3d} {r['method']:40s} rounds {r['rounds']:4d}  {r['wall_s_median'] * 1e3:8.1f} ms  "
                  f"vs pargen seq {r['speedup']:.2f}x  vs own seq {r['speedup_vs_own_sequential']:.2f}x  "
                  f"max abs err {r['max_abs_err']:.1e}  rel err {r['rel_err']:.1e}" + ("  NOISY" if r["noisy"] else ""))
    if args.json:
        benchmod.write_json({"checkpoint": args.checkpoint, "peer": "encoreus/GS-Jacobi_for_TarFlow",
                             "guidance": guide, "records": records}, args.json)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
