"""Plots (matplotlib, PNG, no display needed): the paper's Fig. 3, per-layer SQNR, and the
error-vs-complexity Pareto front of a sweep. matplotlib is imported inside each function."""
from __future__ import annotations

from pathlib import Path

import torch

from fixq.algorithms.coeff_formats import weight_formats
from fixq.numerics.formats import QFormat

__all__ = ["plot_fig3", "plot_sqnr", "plot_pareto", "pareto_front"]


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_fig3(weight: torch.Tensor, layer: str, path: str | Path, T: int = 8, method: str = "maxabs") -> Path:
    """Paper Fig. 3: |coefficient| vs coefficient id, with the largest value each 4D, 3D
    and 2D format can represent drawn over it; one outlier sets the whole 4D range."""
    plt = _plt()
    w = weight.detach().double().cpu()
    mag = w.abs().reshape(-1)
    N, Mg = w.shape[0], (w.shape[1] if w.dim() > 1 else 1)
    per_filter = w[0].numel() // max(Mg, 1) if w.dim() > 1 else 1
    ids = torch.arange(mag.numel())
    fig, ax = plt.subplots(figsize=(9, 4.2), dpi=110)
    ax.plot(ids, mag, ".", ms=2, color="0.35", label="|coefficient|")
    styles = {"4D": ("tab:red", 2.0), "3D": ("tab:blue", 1.4), "2D": ("tab:green", 1.0)}
    for mode, (color, lw) in styles.items():
        f = weight_formats(w, T, mode, method)
        Fs = torch.tensor(f.F, dtype=torch.float64).reshape(f.shape) if f.shape else torch.tensor([f.F[0]])
        top = torch.tensor([QFormat(T, int(F)).max_value for F in Fs.reshape(-1).tolist()])
        if mode == "4D":
            ax.hlines(float(top[0]), 0, mag.numel(), colors=color, lw=lw, label="4D range (1 format)")
        else:
            span = w[0].numel() if mode == "3D" else per_filter
            edges = torch.arange(top.numel() + 1) * span
            ax.stairs(top, edges.double(), baseline=None, color=color, lw=lw, label=f"{mode} range ({top.numel()} formats)")
    ax.set_yscale("log")
    lo = float(mag[mag > 0].min()) if (mag > 0).any() else 1e-6
    ax.set_ylim(max(lo, float(mag.max()) * 1e-4), float(mag.max()) * 4)
    ax.set_xlabel("coefficient id (kernel-major, then filter, then tap)")
    ax.set_ylabel("magnitude (log scale)")
    ax.set_title(f"{layer}: {N}x{Mg} filters, <{T}b> largest representable value per format")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_sqnr(layers: list[dict], path: str | Path, title: str = "") -> Path:
    """Per-layer SQNR bars (dB) of every requantized tensor."""
    plt = _plt()
    rows = [(x["name"], x["sqnr_db"]) for x in layers if isinstance(x.get("sqnr_db"), (int, float))]
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(rows) + 2), 4.2), dpi=110)
    ax.bar(range(len(rows)), [min(v, 99.0) for _, v in rows], color="tab:blue")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([n for n, _ in rows], rotation=75, ha="right", fontsize=7)
    ax.set_ylabel("SQNR vs float [dB]")
    ax.set_xlabel("layer output (in execution order)")
    ax.set_title(title or "Per-layer SQNR")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both cost and error (lower is better).

    >>> pareto_front([(1, 5), (2, 3), (3, 4), (0.5, 9)])
    [3, 0, 1]
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], float("inf")
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def plot_pareto(rows: list[dict], path: str | Path, float_error: float | None = None, title: str = "") -> Path:
    """Top-1 error vs relative complexity for every sweep row, Pareto front marked."""
    plt = _plt()
    pts = [(r["rel_complexity_mmacs"], r["quant_top1_error"]) for r in rows]
    front = pareto_front(pts)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], color="0.5", s=18, label="configurations")
    fp = [pts[i] for i in front]
    ax.plot([p[0] for p in fp], [p[1] for p in fp], "o-", color="tab:red", label="Pareto front")
    for i, r in enumerate(rows):  # every point carries its row number (# in report.md / report.json)
        text = f"#{i + 1}" + (f" {r['format']} {r['coeff_mode']} {r['method']}" if i in front else "")
        ax.annotate(text, pts[i], fontsize=7, xytext=(4, 4), textcoords="offset points")
    if float_error is not None:
        ax.axhline(float_error, color="tab:green", ls="--", lw=1, label=f"float ({float_error:.2f}%)")
    ax.set_xlabel("relative complexity [M MACs in <8b,8b> units]")
    ax.set_ylabel("top-1 error [%]")
    ax.set_title((title or "Error vs complexity") + "\n(#n = row n of report.md; red: Pareto front)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
