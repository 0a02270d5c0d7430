"""Coarse-to-fine against its raster AR baseline: the best guidance per model and the quality-over-guidance plot
(`pargen bench ctf --fid N`; the timing and the FID rows come from `RasterPipeline.bench` / `.quality`)."""
from __future__ import annotations


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for key, label in (("raster", "raster AR (LlamaGen-style)"), ("ctf", "coarse-to-fine")):
        rs = [r for r in rows if r["model"] == key]
        for ax, metric in zip(axes, ("fid", "is")):
            ax.plot([r["guidance"] for r in rs], [r[metric] for r in rs], "o-", label=label)
    for ax, name in zip(axes, ("classifier FID (lower is better)", "Inception-style score (classifier)")):
        ax.set_xlabel("guidance scale")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary(rows: list[dict]) -> dict[str, dict]:
    """Each model at its best guidance (lowest FID)."""
    out = {}
    for k in ("raster", "ctf"):
        b = min((r for r in rows if r["model"] == k), key=lambda r: r["fid"])
        out[k] = {"guidance": b["guidance"], "fid": b["fid"], "is": b["is"]}
    return out
