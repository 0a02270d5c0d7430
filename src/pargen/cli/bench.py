"""`pargen bench FAMILY`: the baseline and the fast samplers in one process, on the same model and noise."""
from __future__ import annotations

import dataclasses
import time

import torch

from .. import checkpoint, data
from ..errors import PargenError
from ..evaluation.bench import write_json
from ..nn.attention import KVCache
from .common import labels_for, load, raster_sampler, sample_in_chunks, shared, tokenizer_for


def cmd_bench(args) -> int:
    from .. import distributed
    from ..evaluation import metrics
    from . import tarflow as tf

    _, world = distributed.init()  # under torchrun: every batch and FID sample set is shared by the ranks
    if world > 1 and args.family not in ("tarflow", "diffusion"):
        raise PargenError(f"bench {args.family} runs in one process (its samplers draw for the whole batch from "
                          "one generator); torchrun shares the batch for bench tarflow and bench diffusion")
    if args.family == "diffusion":
        return _bench_diffusion(args)
    if args.family == "var":
        return _bench_var(args)
    if args.family == "lowrank":
        return _bench_lowrank(args)
    if args.family == "ctf":
        return _bench_ctf(args)
    model, meta, path = load(args.checkpoint or f"{args.family}-mnist", args.device)
    guidance = tf.default_guidance(meta, args.cfg, None, None)
    print(f"bench {args.family}: {path.name}, batches {args.batch}, {args.repeats} repeats, "
          f"{torch.get_num_threads()} threads, guidance {guidance.scale:g}")
    records = tf.bench(model, path, args.batch, args.repeats, args.tol, guidance, args.seed)
    if args.fid:
        clf, _ = checkpoint.load(checkpoint.resolve("classifier-mnist"))
        real = data.load("mnist", "test").float()
        seeds = list(range(args.seed, args.seed + args.fid))
        for method in ("sequential", "auto"):
            # the batch-1 plan is the most parallel one; results do not depend on the batch they run in
            plan, tol, _ = tf.resolve_plan(path, method, 1, args.tol, None, quiet=True)
            fake = shared(lambda s: tf.generate(model, s, labels_for(model, s, None), plan, tol, guidance, True, 16,
                                                args.device)[0], seeds)
            fid = metrics.scores(real, fake, metrics.classifier_features(clf))["fid"]
            for r in records:
                if r["method"] == ("sequential" if method == "sequential" else "gs-jacobi-auto"):
                    r["fid"], r["fid_n"] = fid, args.fid
    return _report(records, args.json)


def _report(records: list[dict], path: str | None) -> int:
    """Print a bench table and write its records as JSON when asked (rank 0 under torchrun)."""
    from .. import distributed
    from ..evaluation import bench as benchmod

    if distributed.world()[0]:
        return 0
    print(benchmod.table(records))
    if path:
        write_json(records, path)
        print(f"records written to {path}")
    return 0


def _bench_diffusion(args) -> int:
    from ..evaluation import metrics
    from . import diffusion as dm

    model, meta, path = load(args.checkpoint or "denoiser-mnist", args.device)
    if meta["family"] != "denoiser":
        raise PargenError(f"{path} is a {meta['family']} checkpoint, not a diffusion denoiser")
    print(f"bench diffusion: {path.name}, samplers {args.samplers}, batches {args.batch}, {args.repeats} repeats, "
          f"{torch.get_num_threads()} threads")
    flags = dict(cfg=args.cfg, window=args.window, tol=args.tol, block=args.block, sweeps=args.sweeps,
                 anderson=args.anderson)
    records = dm.bench(model, meta, args.samplers, args.batch, args.repeats, args.seed,
                       split_calls=args.split == "calls", **flags)
    if args.fid:
        clf, _ = checkpoint.load(checkpoint.resolve("classifier-mnist"))
        real = data.load("mnist", "test").float()
        feats = metrics.classifier_features(clf)
        seeds = list(range(args.seed, args.seed + args.fid))
        fids = {}
        for r in records:
            key = (r["sampler"], r["method"])
            if r["method"] not in ("sequential", "picard"):  # the others: see their error against sequential
                continue
            if key not in fids:
                st = dm.settings(meta, sampler=r["sampler"], **flags)
                method = "picard" if r["method"] == "picard+anderson" else r["method"]
                st = dm.dataclasses.replace(st, method=method, anderson=r.get("anderson", 0))
                print(f"  FID of {args.fid} images: {st.describe()}")
                # an image depends only on its seed, so any batch size gives the same images (up to float
                # rounding): the sequential sampler runs 50 at a time, the parallel one 16
                bs = 50 if method == "sequential" else 16
                fake = shared(lambda s: dm.generate(model, s, labels_for(model, s, None), st, bs, args.device)[0],
                              seeds)
                fids[key] = metrics.scores(real, fake, feats)["fid"]
            r["fid"], r["fid_n"] = fids[key], args.fid
    if args.plot:
        dm.plot_convergence(model, meta, args.plot, args.seed, sampler=args.samplers[0], **flags)
        print(f"plot written to {args.plot}")
    return _report(records, args.json)


def _bench_var(args) -> int:
    """KV-cached next-scale sampling against the same model re-running its prefix at every scale (same tokens),
    and against a raster-order AR model over the same final token grid (another model: the paper's ratio)."""
    from ..evaluation import bench as benchmod
    from ..evaluation import metrics
    from ..samplers import autoregressive as AR

    model, meta, path = load(args.checkpoint or "var-mnist", args.device)
    if meta["family"] != "var":
        raise PargenError(f"{path} is a {meta['family']} checkpoint, not a VAR model")
    tok = tokenizer_for(meta.get("tokenizer"), model.config, args.device)
    c = model.config
    cfg = meta.get("sample_defaults", {}).get("guidance", 1.5) if args.cfg is None else args.cfg
    raster = None
    if args.raster != "none":
        rmodel, rmeta, rpath = load(args.raster, args.device)
        if rmeta["family"] != "raster":
            raise PargenError(f"{rpath} is a {rmeta['family']} checkpoint, not a raster AR model")
        rtok = tokenizer_for(rmeta.get("tokenizer"), rmodel.config, args.device)
        raster = (rmodel, rmeta, rtok, rmeta.get("sample_defaults", {}).get("guidance", 1.0), rpath.name)
    print(f"bench var: {path.name}, {len(c.patch_nums)} scales (L = {c.L}), batches {args.batch}, cfg {cfg:g}"
          + (f"; raster AR {raster[4]} ({raster[0].config.tokens} tokens, cfg {raster[3]:g})" if raster else "")
          + f"; {torch.get_num_threads()} threads")
    records = []
    for B in args.batch:
        seeds = list(range(args.seed, args.seed + B))
        y = labels_for(model, seeds, None).to(args.device)

        def var_run(kv: bool):
            def go():
                r = AR.sample(model, tok, y, cfg=cfg, kv_cache=kv, generator=torch.Generator().manual_seed(args.seed))
                return r.img, {"rounds": r.rounds, "nfe": r.nfe,
                               "scale_ms": [round(1e3 * t, 2) for t in r.scale_seconds]}
            return go

        branches = 2  # VAR always runs the conditional and the unconditional branch
        var_kv = benchmod.Method("kv-cache", var_run(True),
                                 {"kv_cache_mib": KVCache.bytes_for(c.depth, branches * B, c.L, c.C) / 2**20})
        records += benchmod.run("var", benchmod.Method("no-kv-cache", var_run(False)), [var_kv],
                                batch=B, seed=args.seed, repeats=args.repeats)
        if raster:
            rmodel, rmeta, rtok, rcfg, _ = raster
            rc = rmodel.config

            def raster_run(method: str):
                fn = raster_sampler(rmodel, rmeta, rtok, method=method)

                def go():
                    r = fn(y, torch.Generator().manual_seed(args.seed))
                    return r.img, {"rounds": r.rounds, "nfe": r.nfe, "tokens_per_call": r.tokens_per_call}
                return go

            nb = 1 if rcfg == 1 else 2
            base = benchmod.Method("raster-ar", raster_run("sequential"),
                                   {"kv_cache_mib": KVCache.bytes_for(rc.depth, nb * B, rc.tokens, rc.width) / 2**20})
            records += benchmod.run("var", base, [
                benchmod.Method("raster-ar-jacobi", raster_run("jacobi")),  # same tokens, fewer calls?
                dataclasses.replace(var_kv, name="var-kv-cache", compare=False)],  # another model: a ratio only
                batch=B, seed=args.seed, repeats=args.repeats)
    if args.fid:
        clf, _ = checkpoint.load(checkpoint.resolve("classifier-mnist"))
        real = data.load("mnist", "test").float()
        feats = metrics.classifier_features(clf)
        seeds = list(range(args.seed, args.seed + args.fid))
        y = labels_for(model, seeds, None).to(args.device)
        fakes = {"kv-cache": sample_in_chunks(lambda yy, g: AR.sample(model, tok, yy, cfg=cfg, generator=g), y,
                                              args.seed)}
        if raster:
            fakes["raster-ar"] = sample_in_chunks(raster_sampler(*raster[:3]), y, args.seed)
        fid = {k: metrics.scores(real, v, feats)["fid"] for k, v in fakes.items()}
        for r in records:
            key = {"no-kv-cache": "kv-cache", "var-kv-cache": "kv-cache"}.get(r["method"], r["method"])
            if key in fid:
                r["fid"], r["fid_n"] = fid[key], args.fid
    return _report(records, args.json)


def _bench_lowrank(args) -> int:
    """Exact vs polynomial attention: scaling over synthetic VAR pyramids, then the bundled capped model."""
    from ..evaluation import metrics
    from ..nn.lowrank import PolySpec
    from ..samplers import autoregressive as AR
    from . import lowrank as lr

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
    name = args.checkpoint or "var-mnist-lowrank"
    model, meta, path = load(name, args.device)
    if meta["family"] != "var":
        raise PargenError(f"{path} is a {meta['family']} checkpoint, not a VAR model")
    model.eval()
    c = model.config
    tok = tokenizer_for(meta.get("tokenizer"), c, args.device)
    ds = data.load(meta.get("data") or "mnist", "test", meta.get("size"))
    rep = lr.analyze(model, tok, ds.float(slice(0, 64)), ds.labels[:64], [spec], 1.0)
    key = f"{spec.kind}{spec.degree}"
    errs = [max(r["errors"][key]["measured"]) for r in rep["layers"]]
    hd = c.C // c.H
    res["model"] = {"checkpoint": path.name, "head_scale_cap": c.attn_scale_cap,
                    "max_logit_bound": max(max(r["logit_bound"]) for r in rep["layers"]),
                    "attn_output_rel_err_per_layer": errs, "loss_exact": rep["loss_exact"],
                    "loss_lowrank": rep["loss_lowrank"],
                    "kv_cache_bytes_per_image": KVCache.bytes_for(c.depth, 2, c.L, c.C),  # both guidance branches
                    "state_bytes_per_image": 2 * c.depth * c.H * (spec.rank(hd) * hd + spec.rank(hd)) * 4}
    m = res["model"]
    print(f"{path.name}: head scales capped at {c.attn_scale_cap:g} (max logit bound {m['max_logit_bound']:.2f}); "
          f"attention-output error per layer {', '.join(f'{e:.1e}' for e in errs)}; teacher-forced loss exact "
          f"{m['loss_exact']:.4f}, low-rank {m['loss_lowrank']:.4f}")
    if args.fid:
        clf, _ = checkpoint.load(checkpoint.resolve("classifier-mnist"))
        real = data.load("mnist", "test").float()
        feats = metrics.classifier_features(clf)
        cfg = meta.get("sample_defaults", {}).get("guidance", 1.5) if args.cfg is None else args.cfg
        labels = labels_for(model, list(range(args.seed, args.seed + args.fid)), None)
        for mode in ("exact", "lowrank"):
            model.set_lowrank(None, spec if mode == "lowrank" else None)
            t0 = time.perf_counter()
            fake = sample_in_chunks(lambda yy, g: AR.sample(model, tok, yy, cfg=cfg, generator=g), labels, args.seed,
                                    f"FID {mode}")
            m[f"sample_s_{mode}"] = time.perf_counter() - t0
            m[f"fid_{mode}"] = metrics.scores(real, fake, feats)["fid"]
        model.set_lowrank(None, None)
        m["fid_n"], m["fid_increase"] = args.fid, m["fid_lowrank"] / m["fid_exact"] - 1
        print(f"FID of {args.fid} samples (cfg {cfg:g}): exact {m['fid_exact']:.2f}, low-rank {m['fid_lowrank']:.2f} "
              f"({100 * m['fid_increase']:+.1f}%)")
    if args.json:
        write_json(res, args.json)
        print(f"records written to {args.json}")
    return 0


def _bench_ctf(args) -> int:
    from ..evaluation import bench as benchmod
    from . import ctf

    models = ctf.load_pair(args.checkpoint or "c2f-mnist", args.raster, args.device)
    c = models["ctf"][0].config
    print(f"bench ctf: {c.coarse} {c.clusters} coarse labels of {c.vocab_size} codes vs raster AR, batches "
          f"{args.batch}, {args.repeats} repeats, {torch.get_num_threads()} threads")
    records = ctf.speed(models, args.batch, args.repeats, args.seed, args.jacobi_window)
    print(benchmod.table(records))
    out: dict = {"speed": records}
    if args.fid:
        print(f"quality: {args.fid} samples per model and guidance {args.guidance}")
        out["quality"] = rows = ctf.quality(models, args.guidance, args.fid, args.seed)
        out["best"] = best = ctf.summary(rows)
        for k, v in best.items():
            print(f"{k}: best FID {v['fid']:.2f} (IS {v['is']:.2f}) at guidance {v['guidance']:g}")
        # speculative Jacobi decoding keeps the distribution: the same FID within noise, at the best guidance
        out["sjd"] = [r for k, v in best.items()
                      for r in ctf.quality({k: models[k]}, [v["guidance"]], args.fid, args.seed, method="sjd")]
        if args.plot:
            ctf.plot(rows, args.plot)
            print(f"plot written to {args.plot}")
    if args.json:
        write_json(out, args.json)
        print(f"records written to {args.json}")
    return 0
