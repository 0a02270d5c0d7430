"""Regenerate the README's results and claims sections from the JSON in docs/ (`python docs/make_results.py`).

Every figure in the results section is read from a `pargen bench ... --json docs/...` file, every figure in the
claims section from the JSON of a `benchmarks/` script; `--check` exits 1 when the README differs from what the
files give (the test suite runs it)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
CHECKPOINTS = DOCS.parent / "src" / "pargen" / "checkpoints"
START, END = "<!-- results:start -->", "<!-- results:end -->"

# (file, what the baseline is) for the files that hold a list of bench records
SPEED = [("bench_tarflow.json", "TarFlow `tarflow-mnist`"), ("bench_diffusion.json", "diffusion `denoiser-mnist`"),
         ("bench_diffusion_ddpm.json", "diffusion `denoiser-mnist`"),
         ("bench_diffusion_lite.json", "diffusion `denoiser-mnist-lite`"),
         ("bench_diffusion_lite_ddpm.json", "diffusion `denoiser-mnist-lite`"),
         ("bench_diffusion_lite_ddpm_interleaved.json", "diffusion `denoiser-mnist-lite`, re-measured interleaved"),
         ("bench_var.json", "VAR `var-mnist` / raster AR `raster-mnist`"),
         ("bench_ctf_speed.json", "raster AR `raster-mnist` / CTF `c2f-mnist`"),  # `bench ctf` without --fid
         ("bench_unet_mnist_ddim50.json", "diffusers `unet-mnist`"),
         ("bench_unet_mnist_dpmpp20.json", "diffusers `unet-mnist`"),
         ("bench_unet_mnist_euler50.json", "diffusers `unet-mnist`"),
         ("bench_llamagen_b.json", "LlamaGen GPT-B (random weights, 256 tokens only)")]


SAME = 2e-3  # max abs error (images on [-1, 1]) within which a method counts as giving the baseline's output


def _num(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "0" if v == 0 else (f"{v:.{digits}g}" if abs(v) >= 1e-3 else f"{v:.1e}")
    return str(v)


def _fid(r: dict) -> str:
    return f"{r['fid']:.2f}" if r.get("fid") is not None else "-"


class Noisy(ValueError):
    """A bench file whose pair ratios say the machine was shared: its speed-ups are not shown."""


def _speed(r: dict) -> str:
    if "speedup_q1" in r:
        return f"**{r['speedup']:.2f}x** ({r['speedup_q1']:.2f}-{r['speedup_q3']:.2f})"
    return f"**{r['speedup']:.2f}x** *"


def speed_rows(records: list[dict], model: str, source: str) -> list[str]:
    """One row per (sampler, batch, baseline) group: the baseline against its fastest method with the same output
    (error within SAME; else its fastest method with an error), and every row without one (another model, or
    another draw from the same distribution)."""
    bad = [r["method"] for r in records if r.get("noisy")]
    if bad:
        raise Noisy(f"{source}: the speed-ups of {', '.join(sorted(set(bad)))} were measured on a noisy machine "
                    "(pair ratios too far apart); re-run the bench on a quiet one")
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r.get("sampler") or r.get("scheduler"), r.get("steps"), r["batch"], r["baseline"]),
                          []).append(r)
    rows = []
    for (sampler, steps, batch, base_name), rs in groups.items():
        base = next(r for r in rs if r["method"] == base_name)
        what = model + (f", {sampler} {steps}" if sampler else "")
        if base.get("processes", 1) > 1:
            what += f", {base['processes']} processes" + (", calls split" if base.get("split") == "calls" else "")
        same = [r for r in rs if r is not base and r["max_abs_err"] is not None and "no-cache" not in r["method"]]
        other = [r for r in rs if r["max_abs_err"] is None]
        close = [r for r in same if r["max_abs_err"] <= SAME] or same
        for r in ([max(close, key=lambda r: r["speedup"])] if close else []) + other:
            rows.append(f"| {what} | {batch} | {base_name}: {base['rounds']} calls, {base['wall_s_median']:.3g} s | "
                        f"{r['method']} | {r['rounds']} | {_speed(r)} | {_num(r['max_abs_err'])} | "
                        f"{_fid(base)} / {_fid(r)} | `{source}` |")
    return rows


def _doc(docs: Path, name: str):
    """The parsed JSON docs/NAME, or None when that file has not been made."""
    path = docs / name
    return json.loads(path.read_text()) if path.exists() else None


def quality_lines(docs: Path) -> list[str]:
    lines = ["| measure | baseline | pargen | source |", "|---|---|---|---|"]
    for name, label in [("bench_ctf.json", "K = 64"), ("bench_ctf_k16.json", "K = 16"),
                        ("bench_ctf_k256.json", "K = 256"),
                        ("bench_ctf_random_clusters.json", "random clusters")]:
        doc = _doc(docs, name)
        if doc is not None:
            b = doc["best"]
            lines.append(f"| FID / IS, raster AR vs coarse-to-fine ({label}), best guidance | "
                         f"{b['raster']['fid']:.2f} / {b['raster']['is']:.2f} (guidance {b['raster']['guidance']:g}) | "
                         f"{b['ctf']['fid']:.2f} / {b['ctf']['is']:.2f} (guidance {b['ctf']['guidance']:g}) | "
                         f"`{name}` |")
    doc = _doc(docs, "bench_ctf.json")
    if doc is not None:
        sjd = {r["model"]: r for r in doc["sjd"]}
        for m, seq in doc["best"].items():
            if m in sjd:
                lines.append(f"| FID, {m} sequential vs speculative Jacobi decoding | {seq['fid']:.2f} | "
                             f"{sjd[m]['fid']:.2f} | `bench_ctf.json` |")
    recs = _doc(docs, "bench_ctf_codebook.json")
    if recs is not None:
        for V in sorted({r["vocab"] for r in recs}):
            sp = {r["batch"]: r["speedup"] for r in recs if r["vocab"] == V and r["method"] == "ctf"}
            lines.append(f"| CTF sampling speed-up over raster AR, codebook V = {V} (bundled widths, random weights, "
                         f"tokens only), batch {' / '.join(map(str, sp))} | 1x | "
                         f"{' / '.join(f'{v:.2f}x' for v in sp.values())} | `bench_ctf_codebook.json` |")
    lr = _doc(docs, "bench_lowrank.json")
    if lr is not None:
        m = lr["model"]
        lines += [f"| VAR attention cost exponent in the final side n (n = {lr['fit_from']}..{lr['rows'][-1]['n']}) | "
                  f"{lr['exponent_exact_s']:.2f} (exact) | {lr['exponent_lowrank_s']:.2f} (low-rank, "
                  f"{lr['kind']} degree {lr['degree']}) | `bench_lowrank.json` |",
                  f"| VAR low-rank crossover (measured) | | n = {lr['crossover_n_measured']} | `bench_lowrank.json` |",
                  f"| FID of `{m['checkpoint']}`, exact vs low-rank attention ({m['fid_n']} samples) | "
                  f"{m['fid_exact']:.2f} | {m['fid_lowrank']:.2f} ({100 * m['fid_increase']:+.1f}%) | "
                  "`bench_lowrank.json` |"]
    return lines


def _quiet_records(docs: Path, name: str, key: str | None = None) -> tuple[dict | list | None, list[dict]]:
    """A side-by-side file (None and no records when absent) and its records, refused when they were measured on a
    noisy machine."""
    doc = _doc(docs, name)
    if doc is None:
        return None, []
    recs = doc[key] if key else doc
    bad = [r["method"] for r in recs if r.get("noisy")]
    if bad:
        raise Noisy(f"{name}: {', '.join(sorted(set(bad)))} measured on a noisy machine")
    return doc, recs


def _table(caption: str, header: list[str], rows: list[str]) -> list[str]:
    """A caption, then a markdown table of `header` over `rows` (each a finished `| ... |` line)."""
    return [caption, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header), *rows]


def peer_lines(docs: Path) -> list[str]:
    """pargen.diffusers against diffusers' StableDiffusionParadigmsPipeline (benchmarks/diffusers_peer.py): one
    table per scheduler."""
    _, recs = _quiet_records(docs, "bench_diffusers_peer.json")
    lines: list[str] = []
    for key in dict.fromkeys((r["scheduler"], r["steps"]) for r in recs):
        rs = [r for r in recs if (r["scheduler"], r["steps"]) == key]
        r0 = rs[0]
        rows = [f"| {'-' if r['method'] == 'sequential' else format(r['tol'], 'g')} | {r['method']} | {r['rounds']} | "
                f"{r['nfe']} | {_num(r['max_abs_err'])} | {r['wall_s_median']:.3g} | {_speed(r)} | "
                + (f"{r['overhead_s'] * 1e3:.2g} / {r['model_s_per_round'] * 1e3:.2g}" if "overhead_s" in r else "-") + " |"
                for r in rs]
        lines += ([""] if lines else []) + _table(
            f"pargen.diffusers vs diffusers' ParaDiGMS on the tiny Stable Diffusion pipeline ({r0['steps']} "
            f"`{r0['scheduler']}` steps, guidance, batch 1, window {r0['window']}, the same tolerance convention; "
            "errors against the sequential pipeline on [-1, 1]; `bench_diffusers_peer.json`):",
            ["tol", "method", "rounds", "model evaluations", "max abs err", "wall s", "speed-up",
             "ms per round: outside / in the model"], rows)
    return lines


def tarflow_peer_lines(docs: Path) -> list[str]:
    """pargen's TarFlow samplers against the GS-Jacobi authors' code on the same model (benchmarks/tarflow_peer.py)."""
    doc, recs = _quiet_records(docs, "bench_tarflow_peer.json", "records")
    if not recs:
        return []
    g = doc["guidance"]
    rows = [f"| {r['batch']} | {r['method']} | {r['rounds']} | {_num(r['max_abs_err'])} | {_num(r['rel_err'])} | "
            f"{1e3 * r['wall_s_median']:.3g} | {_speed(r)} | {r['speedup_vs_own_sequential']:.2f}x |" for r in recs]
    return _table(f"pargen's TarFlow samplers vs the GS-Jacobi authors' code (`{doc['peer']}`) on "
                  f"`{doc['checkpoint']}`, same noise, guidance {g['guidance']:g}"
                  f"{' annealed' if g['annealed_guidance'] else ''}, no denoising step; errors against pargen's "
                  "sequential answer on [-1, 1]; speed-ups against pargen's sequential sampler and against the "
                  "side's own (`bench_tarflow_peer.json`):",
                  ["batch", "method", "rounds", "max abs err", "rel err", "wall ms", "vs pargen sequential",
                   "vs own sequential"], rows)


def official_lines(docs: Path) -> list[str]:
    """pargen's samplers against the official VAR and LlamaGen ones on the same weights
    (benchmarks/official_samplers.py)."""
    _, recs = _quiet_records(docs, "bench_official_samplers.json")
    if not recs:
        return []
    rows = [f"| {r['model']} | {r['batch']} | {r['method']} | {r['rounds']} | {_num(r['max_abs_err'])} | "
            f"{r['wall_s_median']:.3g} | {_speed(r)} |" for r in recs]
    return _table("pargen's samplers vs the official ones on the same weights (random, official sizes), from the same "
                  "seed in the official protocol; max abs difference of the images on [0, 1] (VAR) or of the token "
                  "ids (LlamaGen: 0 = the same tokens); speed-up against the official sampler "
                  "(`bench_official_samplers.json`):",
                  ["model", "batch", "sampler", "sequential calls", "max abs diff", "wall s", "speed-up"], rows)


def sjd_peer_lines(docs: Path) -> list[str]:
    """pargen's speculative Jacobi decoding against the SJD authors' sampler (benchmarks/sjd_peer.py)."""
    doc, recs = _quiet_records(docs, "bench_sjd_peer.json", "records")
    if not recs:
        return []
    calls = doc["calls_per_image"]
    rows = [f"| {r['method']} | {calls[r['method']]:.1f} | {1e3 * r['wall_s_median']:.3g} | {_speed(r)} |"
            for r in recs]
    return _table(f"pargen's speculative Jacobi decoding vs the SJD authors' sampler (`{doc['peer']}`) on "
                  f"`{doc['checkpoint']}` (the same model: teacher-forced logits {_num(doc['logits_parity'])} apart), "
                  f"window {doc['window']}, guidance {doc['guidance']:g}; calls per image over {doc['seeds']} seeds, "
                  "wall time at batch 1 against pargen's sequential decoder (`bench_sjd_peer.json`):",
                  ["sampler", "calls per image (mean)", "wall ms", "speed-up"], rows)


def section(docs: Path = DOCS) -> str:
    head = ["| model | batch | baseline | method | calls | speed-up | max abs err | "
            "FID base / fast | source |", "|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for name, model in SPEED:
        doc = _doc(docs, name)
        if doc is not None:
            rows += speed_rows(doc["speed"] if isinstance(doc, dict) else doc, model, name)
    note = ("Per group, the fastest method with the same output (within 2e-3 max abs error of the baseline's; "
            "else the fastest with an error), then the others. Speed-up = the median over repeats of the pair ratio "
            "baseline time / method time, baseline and methods run interleaved in one process, with the quartiles "
            "of those ratios in brackets; `*`: measured before the harness interleaved its runs (baseline median "
            "/ method median). A file whose pair ratios disagree (the machine was shared) is refused. `-` as error: another model (VAR or CTF against raster AR) or another draw from the same "
            "distribution (speculative Jacobi decoding, `sjd`).")
    peer = peer_lines(docs) + [""] + tarflow_peer_lines(docs)
    for more in (official_lines(docs), sjd_peer_lines(docs)):
        if more:
            peer += [""] + more
    return "\n".join([START, "", *head, *rows, "", note, "", *quality_lines(docs), "", *(peer + [""] if peer else []),
                      END])


CLAIMS_START, CLAIMS_END = "<!-- claims:start -->", "<!-- claims:end -->"


def _fit(f: dict, key: str = "pearson_r") -> str:
    return f"slope {f['exponent']:.3f}, " + (f"r = {f[key]:.4f}" if key == "pearson_r" else f"R^2 = {f[key]:.3f}")


def claims_section(docs: Path = DOCS) -> str:
    """The papers' claims beside pargen's measurements, from the JSON of the `benchmarks/` scripts."""
    rows = []
    doc = _doc(docs, "picard_dimension.json")
    if doc is not None:
        names = {"ode": "probability-flow ODE, Heun", "ddim": "probability-flow ODE, Euler (DDIM)",
                 "ddpm": "SDE, ancestral (DDPM)"}
        for kind, s in doc["samplers"].items():
            a, b = s["rows"][0], s["rows"][-1]
            par = [r for r in s["rows"] if "picard_rounds" in r]
            upto = "" if par[-1] is b else f" (d <= {par[-1]['d']:,})"
            rows.append(
                f"| Picard rounds are poly-log in d (arXiv 2405.15986), {names.get(kind, kind)} | O~(poly log d) "
                f"rounds; sequential poly(d) | d = {a['d']} -> {b['d']:,} at KL <= {doc['kl_target']:g}: sequential "
                f"{a['sequential_calls']} -> {b['sequential_calls']:,} calls (~ d^"
                f"{s['fit_sequential_calls_vs_d']['exponent']:.2f}); block Picard ({doc['blocks']} blocks) "
                f"{par[0]['picard_rounds']} -> {par[-1]['picard_rounds']} rounds{upto} (~ (ln d)^"
                f"{s['fit_picard_rounds_vs_log_d']['exponent']:.2f}, R^2 "
                f"{s['fit_picard_rounds_vs_log_d']['r2']:.2f}) | `picard_dimension.json` |")
        mix = doc.get("mixture", {})
        for kind, s in mix.get("samplers", {}).items():
            a, b = s["rows"][0], s["rows"][-1]
            how = ("exact W2 of its law carried on a grid; two-sample estimates beside it" if kind == "ddpm" else
                   "exact W2 by quadrature")
            f = s["fit_picard_rounds_vs_log_d"]
            text = (f"d = {a['d']} -> {b['d']:,} at W2 <= {mix['w2_target']:g} ({how}): sequential "
                    f"{a['sequential_calls']} -> {b['sequential_calls']:,} calls (~ d^"
                    f"{s['fit_sequential_calls_vs_d']['exponent']:.2f}); block Picard ({doc['blocks']} blocks) "
                    f"{a['picard_rounds']} -> {b['picard_rounds']} rounds (~ (ln d)^{f['exponent']:.2f}, R^2 "
                    f"{f['r2']:.2f})")
            rows.append(f"| Picard rounds are poly-log in d (arXiv 2405.15986), {names.get(kind, kind)}, Gaussian "
                        f"mixture | O~(poly log d) rounds; sequential poly(d) | {text} | `picard_dimension.json` |")
    doc = _doc(docs, "var_scaling.json")
    if doc is not None:
        rs = doc["rows"]
        rows.append(
            f"| VAR test loss is a power law in parameters (arXiv 2404.02905) | r = "
            f"{doc['paper']['pearson_r_loss_vs_params']} (log loss vs log N) | depths "
            f"{', '.join(str(r['depth']) for r in rs)} ({rs[0]['non_embedding_params'] / 1e6:.2f}M -> "
            f"{rs[-1]['non_embedding_params'] / 1e6:.2f}M), {doc['steps']} steps x {doc['batch_size']}: loss vs N "
            f"{_fit(doc['fit_test_loss_vs_params'])}; vs compute {_fit(doc['fit_test_loss_vs_compute'])}; token "
            f"error vs N {_fit(doc['fit_token_error_vs_params'])} | `var_scaling.json` |")
    doc = _doc(docs, "lowrank_threshold.json")
    if doc is not None:
        turns = [c["turn_rho"] for c in doc["curves"] if c["turn_rho"] is not None]
        cs = doc["curves"]
        layers = ""
        for m in sorted({r["model"] for r in doc["layers"]}):
            rho = [r["rho"] for r in doc["layers"] if r["model"] == m]
            span = f"{min(rho):.2f}" + (f"-{max(rho):.2f}" if f"{max(rho):.2f}" != f"{min(rho):.2f}" else "")
            layers += f"; `{m}` layers at rho {span}"
        rows.append(
            f"| The low-rank criterion is a threshold (arXiv 2501.04377) | fast iff R = o(sqrt(log n)) | the rank "
            f"the Taylor degree for error 1/L costs overtakes L at rho = R / sqrt(ln L) = {min(turns):.2f}-"
            f"{max(turns):.2f} for n = {cs[0]['side']}-{cs[-1]['side']} (L = {cs[0]['tokens']:,}-"
            f"{cs[-1]['tokens']:,}){layers} | `lowrank_threshold.json` |")
    doc = _doc(docs, "bench_tarflow.json")
    if doc is not None:
        recs = doc["speed"] if isinstance(doc, dict) else doc
        fid = next((r for r in recs if r.get("fid") is not None), None)
        meta = json.loads(CHECKPOINTS.joinpath("tarflow-mnist.json").read_text())
        if fid is not None:
            d, sigma = meta.get("sample_defaults", {}), meta["config"]["noise_std"]
            how = (f"guidance {d.get('guidance', 0):g}{' annealed' if d.get('annealed') else ''}, temperature "
                   f"{d.get('temperature', 1):g}, denoising step")
            bpd = f"test bits/dim {meta['test_bpd']:.2f} (8-bit, uniform dequantisation)"
            if "test_bpd_noise" in meta:
                bpd += f", {meta['test_bpd_noise']:.2f} at the training noise (Gaussian std {sigma:g})"
            verdict = "reached" if fid["fid"] <= 15 else "not reached"
            rows.append(f"| A TarFlow worth sampling (arXiv 2412.06329; issue 20, part 4) | classifier FID <= 15 "
                        f"(the issue's bar) | {verdict}: `tarflow-mnist` ({meta['params'] / 1e6:.1f}M parameters, "
                        f"{meta['train_minutes']:.0f} min of training) at FID {fid['fid']:.2f} on {fid['fid_n']:,} "
                        f"samples ({how}); {bpd} | `bench_tarflow.json`, `tarflow-mnist.json` |")
    head = ["| claim | paper | pargen, measured here | source |", "|---|---|---|---|"]
    return "\n".join([CLAIMS_START, "", *head, *rows, "", CLAIMS_END])


def _replace(text: str, start: str, end: str, body: str) -> str:
    return text[: text.index(start)] + body + text[text.index(end) + len(end):]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--readme", default=str(DOCS.parent / "README.md"))
    p.add_argument("--check", action="store_true", help="only check that the README is up to date")
    args = p.parse_args()
    readme = Path(args.readme)
    text = readme.read_text()
    for start, end in ((START, END), (CLAIMS_START, CLAIMS_END)):
        if start not in text or end not in text:
            print(f"{readme} has no {start} ... {end} block", file=sys.stderr)
            return 1
    try:
        new = _replace(_replace(text, START, END, section()), CLAIMS_START, CLAIMS_END, claims_section())
    except Noisy as e:
        print(f"refused: {e}", file=sys.stderr)
        return 1
    if args.check:
        if new != text:
            print(f"{readme}: the results or claims section is out of date; run python docs/make_results.py",
                  file=sys.stderr)
            return 1
        return 0
    readme.write_text(new)
    print(f"results and claims sections of {readme} regenerated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
