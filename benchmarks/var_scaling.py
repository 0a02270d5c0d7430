"""VAR's scaling law at small scale: test loss and token error rate against parameters and training compute.

VAR (Tian et al., arXiv 2404.02905, Sec. 5.2) trains models of depth 12-30 (width 64 * depth) and reports power
laws in the parameter count N and the training compute C, with a linear correlation of about -0.998 between
log test loss and log N. Here: VAR at several depths (width `--width-per-depth` * depth, heads = depth) on the
bundled multi-scale tokenizer, every run with the same data order, the same seeds and the same token budget
(steps x batch), then the teacher-forced test cross-entropy and the token error rate (argmax != target, all
scales) on the MNIST test images, and least-squares fits of log L = a + b log N (and log C). Compute counts
6 N D with D the tokens seen (N: parameters outside the embeddings; attention FLOPs ignored, as in the paper's
count). Each depth's checkpoint is kept under `--out`, so a re-run evaluates it without training again.

    python benchmarks/var_scaling.py --depths 2 3 4 5 6 --steps 1000 --out runs/var-scaling \
        --json docs/var_scaling.json --plot docs/var_scaling.png
    python benchmarks/var_scaling.py --plot docs/var_scaling.png --from docs/var_scaling.json
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import time
from pathlib import Path

import torch

from pargen import checkpoint, data, registry
from pargen.pipelines import tokenizer_for
from pargen.training.loop import TrainConfig, train
from pargen.evaluation.bench import power_fit, write_json
from pargen.training.losses import var_loss


def model_config(depth: int, width_per_depth: int, base: str = "var-mnist"):
    _, cfg = registry.preset_config(base, [f"depth={depth}", f"width={width_per_depth * depth}",
                                           f"heads={depth}"])
    return cfg


def non_embedding_params(model: torch.nn.Module) -> int:
    """Parameters outside the class, position and level embeddings (the start token included)."""
    skip = ("class_emb", "pos_start", "pos_1LC", "lvl_embed")
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith(skip))


@torch.no_grad()
def evaluate(model, tok, test: data.ImageData, n: int, batch: int = 250) -> tuple[float, float]:
    """Mean teacher-forced cross-entropy (nats per token) and token error rate over the first n test images."""
    model.eval()
    loss_sum, err_sum, count = 0.0, 0.0, 0
    for lo in range(0, n, batch):
        idx = torch.arange(lo, min(n, lo + batch))
        x, y = test.float(idx), test.labels[idx]
        codes = tok.img_to_indices(x)
        target = torch.cat(codes, 1)
        logits = model(y, tok.quantize.teacher_forcing_input(codes), cond_drop=0.0)
        loss_sum += torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum").item()
        err_sum += (logits.argmax(-1) != target).sum().item()
        count += target.numel()
    return loss_sum / count, err_sum / count


def run(args) -> dict:
    tok = tokenizer_for(args.tokenizer, model_config(2, args.width_per_depth), "cpu")
    train_ds = data.load("mnist", "train", 32)
    test_ds = data.load("mnist", "test", 32)
    tcfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                       ckpt_every=args.steps)
    rows = []
    for depth in args.depths:
        cfg = model_config(depth, args.width_per_depth)
        out = Path(args.out) / f"d{depth}"
        torch.manual_seed(0)
        model = registry.build("var", cfg)
        seconds = None
        if checkpoint.exists(out) and checkpoint.read_meta(out).get("step") == args.steps:
            seconds = checkpoint.read_meta(out).get("train_seconds")
            print(f"depth {depth}: trained checkpoint found in {out}")
        else:
            print(f"depth {depth}: width {cfg.C}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
            res = train(model, train_ds, functools.partial(var_loss, tokenizer=tok), tcfg, out=out,
                        resume=checkpoint.exists(out),
                        meta={"preset": "var-mnist", "data": "mnist", "size": 32, "tokenizer": args.tokenizer})
            seconds = res.seconds
            checkpoint.write_meta(out, {**checkpoint.read_meta(out), "train_seconds": seconds})
        # the trained weights, not the EMA the checkpoint holds: a 0.999 EMA over 1000 steps is still 37% the
        # initialisation (0.999^1000), and more so the larger the model's early steps moved it
        checkpoint.load_state(model, checkpoint.load_state_file(out)["model"], f"{out}.state.pt")
        loss, err = evaluate(model, tok, test_ds, args.test_images)
        n = non_embedding_params(model)
        tokens = args.steps * args.batch_size * cfg.L
        rows.append({"depth": depth, "width": cfg.C, "params": sum(p.numel() for p in model.parameters()),
                     "non_embedding_params": n, "tokens": tokens, "compute_flops": 6.0 * n * tokens,
                     "test_loss": loss, "token_error": err, "train_seconds": seconds})
        print(f"  test loss {loss:.4f} nats/token, token error {err:.4f}")
    res = {"what": "VAR scaling at small scale (benchmarks/var_scaling.py)", "tokenizer": args.tokenizer,
           "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "test_images": args.test_images,
           "width_per_depth": args.width_per_depth, "rows": rows,
           "paper": {"pearson_r_loss_vs_params": -0.998, "source": "arXiv 2404.02905, Sec. 5.2 / Fig. 5"}}
    for key in ("test_loss", "token_error"):
        res[f"fit_{key}_vs_params"] = power_fit([r["non_embedding_params"] for r in rows], [r[key] for r in rows])
        res[f"fit_{key}_vs_compute"] = power_fit([r["compute_flops"] for r in rows], [r[key] for r in rows])
    return res


def plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    rows = res["rows"]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    panels = [("non_embedding_params", "test_loss", "parameters N", "test loss (nats / token)"),
              ("non_embedding_params", "token_error", "parameters N", "token error rate"),
              ("compute_flops", "test_loss", "training compute C (FLOPs)", "test loss (nats / token)"),
              ("compute_flops", "token_error", "training compute C (FLOPs)", "token error rate")]
    for ax, (xk, yk, xl, yl) in zip(axes, panels):
        xs, ys = [r[xk] for r in rows], [r[yk] for r in rows]
        f = res[f"fit_{yk}_vs_{'params' if xk == 'non_embedding_params' else 'compute'}"]
        ax.loglog(xs, ys, "o", color="C0")
        grid = torch.logspace(math.log10(min(xs)) - 0.05, math.log10(max(xs)) + 0.05, 50, dtype=torch.float64)
        ax.loglog(grid, (f["log_prefactor"] + f["exponent"] * grid.log()).exp(), "--", color="C1",
                  label=f"slope {f['exponent']:.3f}, r = {f['pearson_r']:.3f}")
        for r in rows:
            ax.annotate(f"d{r['depth']}", (r[xk], r[yk]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"VAR on MNIST (msvq-mnist tokens), {res['steps']} steps x {res['batch_size']} images each")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depths", type=int, nargs="+", default=[2, 3, 4, 5, 6])
    p.add_argument("--width-per-depth", type=int, default=32)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--tokenizer", default="msvq-mnist")
    p.add_argument("--test-images", type=int, default=2000)
    p.add_argument("--out", default="runs/var-scaling", help="one checkpoint per depth: OUT/dD")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument("--from", dest="source", default=None, help="plot an earlier --json instead of running")
    args = p.parse_args()
    if args.source:
        res = json.loads(Path(args.source).read_text())
    else:
        t0 = time.perf_counter()
        res = run(args)
        res["wall_minutes"] = round((time.perf_counter() - t0) / 60, 2)
        for key in ("test_loss", "token_error"):
            for x in ("params", "compute"):
                f = res[f"fit_{key}_vs_{x}"]
                print(f"{key} vs {x}: exponent {f['exponent']:.4f}, Pearson r {f['pearson_r']:.4f}")
        if args.json:
            write_json(res, args.json)
            print(f"json: {args.json}")
    if args.plot:
        plot(res, args.plot)


if __name__ == "__main__":
    main()
