"""Low-rank VAR attention for the CLI: `pargen analyze var` (the criterion, per layer and head) and
`pargen bench lowrank` (cost model, measured scaling exponents, crossover, memory, output error and FID)."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ..models.var import VAR
from ..nn import lowrank as LR
from ..evaluation.bench import median_seconds, power_fit
from ..nn.attention import KVCache, attend

VAR_SCHEDULE = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # VAR-d16's scales for a 16 x 16 final map


def pyramid(n: int) -> list[int]:
    """VAR's 10-scale schedule stretched to a final side n (distinct, increasing)."""
    return sorted({max(1, round(p * n / 16)) for p in VAR_SCHEDULE} | {n})


def parse_layers(spec: str | None) -> list[int] | None:
    """'all' -> None (every layer), '0,2,3' -> [0, 2, 3] (the pipeline checks them against the model's depth)."""
    if spec is None or spec == "all":
        return None
    try:
        return [int(t) for t in spec.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"--lowrank-layers takes 'all' or layer numbers like 0,2,3, not {spec!r}") from None


def block_mask(blocks: list[int]) -> torch.Tensor:
    """VAR's block-causal mask (N, N) for scales of these token counts: True where a token sees a key (its own
    and every coarser scale)."""
    ids = torch.repeat_interleave(torch.arange(len(blocks)), torch.tensor(blocks))
    return ids[:, None] >= ids[None, :]


@torch.no_grad()
def attention_inputs(var: VAR, labels: torch.Tensor, inputs: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """(q, k, v) of every layer (B, H, L, Dh) on a teacher-forced exact forward pass."""
    got, hooks = [], []
    for b in var.blocks:
        hooks.append(b.attn.register_forward_pre_hook(lambda m, a: got.append(m.qkv(a[0]))))
    try:
        var(labels, inputs, cond_drop=0.0)
    finally:
        for h in hooks:
            h.remove()
    return got


def _rel(a: torch.Tensor, b: torch.Tensor, dims=(0, 2, 3)) -> torch.Tensor:
    return (a - b).square().sum(dims).sqrt() / b.square().sum(dims).sqrt().clamp_min(1e-30)


@torch.no_grad()
def analyze(var: VAR, tok, images: torch.Tensor, labels: torch.Tensor, specs: list[LR.PolySpec],
            max_err: float) -> dict[str, Any]:
    """Per layer and head: logit bound, max entries of Q and K, worst-case per-entry error of each polynomial on
    that interval and the measured attention-output error on these inputs; the layers that can go low-rank within
    `max_err` at the cheapest degree; teacher-forced loss exact vs with those layers low-rank, all on the
    tokenizer `tok`'s tokens of `images` (B, C, H, W in [-1, 1])."""
    idx = tok.img_to_indices(images)
    inputs, targets = tok.quantize.teacher_forcing_input(idx), torch.cat(idx, 1)
    c = var.config
    n = c.patch_nums[-1]
    blocks = [p * p for p in c.patch_nums]
    mask = block_mask(blocks)
    layers = []
    for li, (q, k, v) in enumerate(attention_inputs(var, labels, inputs)):
        scale = var.blocks[li].attn.scale
        beta = LR.head_bounds(q, k, scale)
        exact = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        row = {"layer": li, "logit_bound": beta.tolist(), "max_q": q.abs().amax((0, 2, 3)).tolist(),
               "max_k": k.abs().amax((0, 2, 3)).tolist(), "errors": {}}
        for spec in specs:
            approx = LR.poly_attention(q, k, v, scale, spec, blocks)
            row["errors"][f"{spec.kind}{spec.degree}"] = {
                "rank": spec.rank(q.shape[-1]),
                "entry_bound": [LR.exp_poly_error(spec, float(b)) for b in beta],
                "measured": _rel(approx, exact).tolist()}
        layers.append(row)
    chosen, best = [], None
    for spec in sorted(specs, key=lambda s: (s.rank(c.C // c.H), s.kind)):
        ok = [r["layer"] for r in layers if max(r["errors"][f"{spec.kind}{spec.degree}"]["measured"]) <= max_err]
        if len(ok) > len(chosen):
            chosen, best = ok, spec
    out = {"final_side": n, "tokens": c.L, "sqrt_log_n": math.sqrt(math.log(n)), "sqrt_log_L": math.sqrt(math.log(c.L)),
           "max_err": max_err, "layers": layers, "recommended_layers": chosen,
           "recommended": None if best is None else {"degree": best.degree, "kind": best.kind}}
    out["loss_exact"] = var.loss(var(labels, inputs, cond_drop=0.0), targets).item()
    if best is not None:
        var.set_lowrank(chosen, best)
        try:
            out["loss_lowrank"] = var.loss(var(labels, inputs, cond_drop=0.0), targets).item()
        finally:
            var.set_lowrank(None, None)
    return out


def print_analysis(rep: dict[str, Any]) -> None:
    print(f"final map {rep['final_side']}x{rep['final_side']}, {rep['tokens']} tokens: sqrt(log n) = "
          f"{rep['sqrt_log_n']:.2f}, sqrt(log L) = {rep['sqrt_log_L']:.2f}")
    keys = list(rep["layers"][0]["errors"])
    head = ["layer", "head", "logit bound", "max|q|", "max|k|"] + [f"{k} (bound/meas)" for k in keys]
    rows = [head]
    for r in rep["layers"]:
        for h, b in enumerate(r["logit_bound"]):
            rows.append([str(r["layer"]), str(h), f"{b:.2f}", f"{r['max_q'][h]:.2f}", f"{r['max_k'][h]:.2f}"]
                        + [f"{r['errors'][k]['entry_bound'][h]:.1e}/{r['errors'][k]['measured'][h]:.1e}"
                           for k in keys])
    w = [max(len(row[i]) for row in rows) for i in range(len(head))]
    print("\n".join("  ".join(v.rjust(x) for v, x in zip(row, w)) for row in rows))
    print("ranks: " + ", ".join(f"{k} r={rep['layers'][0]['errors'][k]['rank']}" for k in keys))
    if rep["recommended"] is None:
        print(f"no layer stays within attention-output error {rep['max_err']:g} at these degrees")
    else:
        r = rep["recommended"]
        layers = ",".join(map(str, rep["recommended_layers"]))
        print(f"recommended within error {rep['max_err']:g}: --lowrank-layers {layers} --lowrank-degree "
              f"{r['degree']} --lowrank-kind {r['kind']}")
        print(f"teacher-forced loss: exact {rep['loss_exact']:.4f}, with those layers low-rank "
              f"{rep['loss_lowrank']:.4f}")


def cost_model(n: int, head_dim: int, spec: LR.PolySpec) -> dict[str, Any]:
    """FLOPs and memory of one attention head over a whole KV-cached VAR pass with final side n (float32), in
    total and per scale."""
    r, d = spec.rank(head_dim), head_dim
    seen, per = 0, []
    for p in pyramid(n):
        b = p * p
        seen += b
        per.append({"side": p, "tokens": b, "exact_flops": 4 * b * seen * d,  # q k^T and (softmax) v
                    "lowrank_flops": 4 * b * r * d + 2 * b * r * spec.degree,  # state update, read, monomials
                    "kv_cache_bytes": KVCache.bytes_for(1, 1, seen, d), "state_bytes": (r * d + r) * 4})
    return {"tokens": seen, "exact_flops": sum(q["exact_flops"] for q in per),
            "lowrank_flops": sum(q["lowrank_flops"] for q in per), "kv_cache_bytes": per[-1]["kv_cache_bytes"],
            "state_bytes": per[-1]["state_bytes"], "rank": r, "per_scale": per}


@torch.no_grad()
def time_pyramid(n: int, head_dim: int, spec: LR.PolySpec, repeats: int, seed: int = 0) -> tuple[float, float, float]:
    """Median seconds of one attention head over a whole KV-cached pass, exact and low-rank (unit keys, queries of
    norm 1 as in a capped l2-normalised VAR head), and the low-rank output's relative error at the last scale."""
    blocks = [p * p for p in pyramid(n)]
    L = sum(blocks)
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(1, 1, L, head_dim, generator=g), dim=-1)
    k = F.normalize(torch.randn(1, 1, L, head_dim, generator=g), dim=-1)
    v = torch.randn(1, 1, L, head_dim, generator=g)
    bound = torch.ones(1)

    def exact():
        cache, cur = KVCache.empty(1, 1, 1, L, head_dim, like=q), 0
        for b in blocks:
            o = attend(q[..., cur: cur + b, :], k[..., cur: cur + b, :], v[..., cur: cur + b, :], cache, 0, 1.0,
                       causal=False)
            cache.commit(b)
            cur += b
        return o

    def low():
        st, cur = LR.PolyState(spec, 1.0, bound), 0
        for b in blocks:
            o = st.attend(q[..., cur: cur + b, :], k[..., cur: cur + b, :], v[..., cur: cur + b, :])
            cur += b
        return o

    err = _rel(low(), exact(), dims=(0, 1, 2, 3)).item()
    return median_seconds(exact, repeats)[1], median_seconds(low, repeats)[1], err


def fit_exponent(ns: list[int], ts: list[float]) -> tuple[float, float]:
    """Least-squares slope and intercept of log t against log n."""
    f = power_fit(ns, ts)
    return f["exponent"], f["log_prefactor"]


def scaling(sides: list[int], head_dim: int, spec: LR.PolySpec, repeats: int, fit_from: int,
            progress: bool = True) -> dict[str, Any]:
    rows = []
    for n in sides:
        te, tl, err = time_pyramid(n, head_dim, spec, repeats)
        rows.append({"n": n, **cost_model(n, head_dim, spec), "exact_s": te, "lowrank_s": tl, "rel_err": err})
        if progress:
            print(f"  n={n:3d}  L={rows[-1]['tokens']:6d}  exact {te * 1e3:9.2f} ms  low-rank {tl * 1e3:9.2f} ms  "
                  f"err {err:.1e}", flush=True)
    fit = [r for r in rows if r["n"] >= fit_from]
    if len(fit) < 2:
        raise ValueError(f"need at least two sides >= {fit_from} to fit exponents")
    out = {"head_dim": head_dim, "degree": spec.degree, "kind": spec.kind, "rank": spec.rank(head_dim),
           "fit_from": fit_from, "rows": rows}
    for key in ("exact_s", "lowrank_s", "exact_flops", "lowrank_flops"):
        out[f"exponent_{key}"], out[f"intercept_{key}"] = fit_exponent([r["n"] for r in fit], [r[key] for r in fit])
    a1, b1 = out["exponent_exact_s"], out["intercept_exact_s"]
    a2, b2 = out["exponent_lowrank_s"], out["intercept_lowrank_s"]
    out["crossover_n_fit"] = math.exp((b2 - b1) / (a1 - a2)) if a1 > a2 else None
    out["crossover_n_measured"] = next((r["n"] for r in rows if r["lowrank_s"] < r["exact_s"]), None)
    a1, b1 = out["exponent_exact_flops"], out["intercept_exact_flops"]
    a2, b2 = out["exponent_lowrank_flops"], out["intercept_lowrank_flops"]
    out["crossover_n_flops"] = math.exp((b2 - b1) / (a1 - a2)) if a1 > a2 else None
    return out


def plot_scaling(res: dict[str, Any], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["n"] for r in res["rows"]]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for key, label in (("exact_s", "exact (KV cache)"), ("lowrank_s", f"low-rank {res['kind']} g={res['degree']}")):
        ax.loglog(ns, [r[key] for r in res["rows"]], "o-", label=f"{label}: n^{res['exponent_' + key]:.2f}")
    ax.set_xlabel("final token-map side n")
    ax.set_ylabel("seconds per head, whole pass")
    ax.set_title(f"VAR attention cost, head dim {res['head_dim']}, rank {res['rank']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
