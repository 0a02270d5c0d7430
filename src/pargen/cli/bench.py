"""`pargen bench FAMILY`: argument handling and printing over the pipelines' `bench` (baseline and fast samplers
in one process, on the same model and noise, interleaved)."""
from __future__ import annotations

import time

import torch

from .. import checkpoint, data, distributed, pipelines
from ..errors import PargenError
from ..evaluation import bench as benchmod
from ..evaluation.bench import write_json

DEFAULT = {"tarflow": "tarflow-mnist", "diffusion": "denoiser-mnist", "var": "var-mnist",
           "lowrank": "var-mnist-lowrank", "ctf": "c2f-mnist", "raster": "raster-mnist"}
FAMILY = {"tarflow": ("tarflow",), "diffusion": ("denoiser",), "var": ("var",), "lowrank": ("var",),
          "ctf": ("c2f",), "raster": ("raster",)}


def _open(args) -> pipelines.Pipeline:
    name = args.checkpoint or DEFAULT[args.family]
    path = checkpoint.resolve(name)
    fam = checkpoint.read_meta(path)["family"]
    if fam not in FAMILY[args.family]:
        raise PargenError(f"{path.name} is a {fam} checkpoint; bench {args.family} takes "
                          f"{' or '.join(FAMILY[args.family])} checkpoints")
    return pipelines.load(path, args.device, args.dtype)


def cmd_bench(args) -> int:
    _, world = distributed.init()  # under torchrun: every batch and FID sample set is shared by the ranks
    if world > 1 and args.family not in ("tarflow", "diffusion"):
        raise PargenError(f"bench {args.family} runs in one process (its samplers draw for the whole batch from "
                          "one generator); torchrun shares the batch for bench tarflow and bench diffusion")
    if args.family == "lowrank":
        return _bench_lowrank(args)
    if args.diffusers:
        from ..pipelines import diffusers as PD

        if args.family != "diffusion" or args.checkpoint:
            raise PargenError("--diffusers DIR benches a diffusers pipeline: `pargen bench diffusion --diffusers DIR`")
        pipe = PD.load_pipeline(args.diffusers, args.device, args.scheduler)
        print(f"bench diffusers: {type(pipe).__name__} + {type(pipe.scheduler).__name__}, batches {args.batch}, "
              f"{args.repeats} repeats (interleaved), {torch.get_num_threads()} threads")
        return _report(PD.bench(args.diffusers, pipe, args.steps, args.cfg, args.batch, args.repeats, args.seed,
                                args.window, args.tol, args.prompt, args.labels, progress=True), args.json)
    pipe = _open(args)
    lead = distributed.world()[0] == 0
    log = print if lead else (lambda *_: None)
    print_ = log
    print_(f"bench {args.family}: {pipe.name}, batches {args.batch}, {args.repeats} repeats (interleaved), "
           f"{torch.get_num_threads()} threads, {str(pipe.dtype).replace('torch.', '')}")
    if args.family == "tarflow":
        records = pipe.bench(args.batch, args.repeats, tol=args.tol, cfg=args.cfg, seed=args.seed, fid=args.fid,
                             progress=lead)
    elif args.family == "diffusion":
        flags = dict(cfg=args.cfg, window=args.window, tol=args.tol, block=args.block, sweeps=args.sweeps,
                     anderson=args.anderson)
        records = pipe.bench(args.samplers, args.batch, args.repeats, args.seed, split_calls=args.split == "calls",
                             fid=args.fid, progress=lead, log=log, **{k: v for k, v in flags.items() if v is not None})
        if args.plot:
            pipe.plot_convergence(args.plot, args.seed, sampler=args.samplers[0],
                                  **{k: v for k, v in flags.items() if v is not None})
            print_(f"plot written to {args.plot}")
    elif args.family == "raster":
        c = pipe.model.config
        print_(f"raster AR: depth {c.depth}, width {c.width}, {c.tokens} tokens of {c.vocab_size}, cfg "
               f"{args.cfg if args.cfg is not None else pipe.settings().cfg:g}")
        records = pipe.bench(args.batch, args.repeats, args.seed, window=args.jacobi_window, cfg=args.cfg,
                             progress=True)
    elif args.family == "var":
        records = pipe.bench(args.batch, args.repeats, cfg=args.cfg, seed=args.seed,
                             raster=None if args.raster == "none" else args.raster, fid=args.fid, progress=True)
    else:
        return _bench_ctf(args, pipe)
    return _report(records, args.json)


def _report(records: list[dict], path: str | None) -> int:
    """Print a bench table and write its records as JSON when asked (rank 0 under torchrun)."""
    if distributed.world()[0]:
        return 0
    print(benchmod.table(records))
    if path:
        write_json(records, path)
        print(f"records written to {path}")
    return 0


def _bench_ctf(args, pipe) -> int:
    from ..evaluation import ctf

    if args.raster == "none":
        raise PargenError("bench ctf compares with a raster AR baseline; give --raster CKPT")
    c = pipe.model.config
    print(f"bench ctf: {c.coarse} {c.clusters} coarse labels of {c.vocab_size} codes vs raster AR, batches "
          f"{args.batch}, {args.repeats} repeats, {torch.get_num_threads()} threads")
    records = pipe.bench(args.batch, args.repeats, args.seed, raster=args.raster, window=args.jacobi_window,
                         progress=True)
    print(benchmod.table(records))
    out: dict = {"speed": records}
    if args.fid:
        base = pipelines.load(args.raster, args.device, args.dtype)
        pair = {"raster": base, "ctf": pipe}
        print(f"quality: {args.fid} samples per model and guidance {args.guidance}")
        out["quality"] = rows = [r for p in pair.values() for r in p.quality(args.guidance, args.fid, args.seed)]
        out["best"] = best = ctf.summary(rows)
        for k, v in best.items():
            print(f"{k}: best FID {v['fid']:.2f} (IS {v['is']:.2f}) at guidance {v['guidance']:g}")
        # speculative Jacobi decoding keeps the distribution: the same FID within noise, at the best guidance
        out["sjd"] = [r for k, v in best.items() for r in pair[k].quality([v["guidance"]], args.fid, args.seed,
                                                                          method="sjd")]
        if args.plot:
            ctf.plot(rows, args.plot)
            print(f"plot written to {args.plot}")
    if args.json:
        write_json(out, args.json)
        print(f"records written to {args.json}")
    return 0


def _bench_lowrank(args) -> int:
    """Exact vs polynomial attention: scaling over synthetic VAR pyramids, then the bundled capped model."""
    from ..evaluation import lowrank as lr
    from ..evaluation import metrics
    from ..nn.attention import KVCache
    from ..nn.lowrank import PolySpec

    spec = PolySpec(args.degree, args.kind)
    print(f"bench lowrank: {spec.kind} degree {spec.degree}, head dim {args.head_dim} (rank "
          f"{spec.rank(args.head_dim)}), sides {args.sides}, {args.repeats} repeats, {torch.get_num_threads()} threads")
    try:
        res = lr.scaling(args.sides, args.head_dim, spec, args.repeats, args.fit_from)
    except ValueError as e:
        raise PargenError(str(e)) from None
    print(f"fitted exponents of n (sides >= {args.fit_from}): exact {res['exponent_exact_s']:.2f} (FLOPs "
          f"{res['exponent_exact_flops']:.2f}), low-rank {res['exponent_lowrank_s']:.2f} (FLOPs "
          f"{res['exponent_lowrank_flops']:.2f})")
    fmt = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
    print(f"crossover n: measured {fmt(res['crossover_n_measured'])}, from the fitted lines "
          f"{fmt(res['crossover_n_fit'])}, FLOP model {fmt(res['crossover_n_flops'])}")
    last = res["rows"][-1]
    print(f"memory per head at n={last['n']}: KV cache {last['kv_cache_bytes'] / 2**20:.2f} MiB, running state "
          f"{last['state_bytes'] / 2**20:.2f} MiB")
    if args.plot:
        lr.plot_scaling(res, args.plot)
        print(f"plot written to {args.plot}")
    pipe = _open(args)
    model, meta, c = pipe.model, pipe.meta, pipe.model.config
    ds = data.load(meta.get("data") or "mnist", "test", meta.get("size"))
    rep = lr.analyze(model, pipe.tokenizer, ds.float(slice(0, 64)).to(pipe.device, pipe.dtype),
                     ds.labels[:64].to(pipe.device), [spec], 1.0)
    key = f"{spec.kind}{spec.degree}"
    errs = [max(r["errors"][key]["measured"]) for r in rep["layers"]]
    hd = c.C // c.H
    res["model"] = {"checkpoint": pipe.name, "head_scale_cap": c.attn_scale_cap,
                    "max_logit_bound": max(max(r["logit_bound"]) for r in rep["layers"]),
                    "attn_output_rel_err_per_layer": errs, "loss_exact": rep["loss_exact"],
                    "loss_lowrank": rep["loss_lowrank"],
                    "kv_cache_bytes_per_image": KVCache.bytes_for(c.depth, 2, c.L, c.C),  # both guidance branches
                    "state_bytes_per_image": 2 * c.depth * c.H * (spec.rank(hd) * hd + spec.rank(hd)) * 4}
    m = res["model"]
    print(f"{pipe.name}: head scales capped at {c.attn_scale_cap:g} (max logit bound {m['max_logit_bound']:.2f}); "
          f"attention-output error per layer {', '.join(f'{e:.1e}' for e in errs)}; teacher-forced loss exact "
          f"{m['loss_exact']:.4f}, low-rank {m['loss_lowrank']:.4f}")
    if args.fid:
        seeds = list(range(args.seed, args.seed + args.fid))
        for mode in ("exact", "lowrank"):
            extra = dict(lowrank_layers="all", lowrank_degree=spec.degree, lowrank_kind=spec.kind) \
                if mode == "lowrank" else {}
            t0 = time.perf_counter()
            out = pipe.sample(seeds, batch_size=50, cfg=args.cfg, **extra)
            m[f"sample_s_{mode}"] = time.perf_counter() - t0
            m[f"fid_{mode}"] = metrics.classifier_fid(out.signed)
        m["fid_n"], m["fid_increase"] = args.fid, m["fid_lowrank"] / m["fid_exact"] - 1
        print(f"FID of {args.fid} samples (cfg {out.settings['cfg']:g}): exact {m['fid_exact']:.2f}, low-rank "
              f"{m['fid_lowrank']:.2f} ({100 * m['fid_increase']:+.1f}%)")
    if args.json:
        write_json(res, args.json)
        print(f"records written to {args.json}")
    return 0
