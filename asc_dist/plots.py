"""Every figure asc-dist writes, as PNG files a person can read without W&B.

confusion matrix and per-class accuracy (evaluation reports), training curves (``curves.png``
from ``metrics.jsonl``), a log-mel picture (``python -m asc_dist.features --png``) and Table I
with confidence intervals. matplotlib's object API with the Agg canvas: no pyplot global
state, no display. Each file is written atomically.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from asc_dist import atomic
from asc_dist.metrics import fmt


def save(fig, path: str | Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    with atomic.writing(path, what="figure") as f:
        fig.savefig(f, format="png", dpi=100, bbox_inches="tight")
    return path


def plot_confusion(report: dict, classes: Sequence[str], path: str | Path) -> Path:
    """Row-normalised confusion matrix (true x predicted), each cell annotated with its count."""
    from matplotlib.figure import Figure

    counts = np.asarray(report["confusion"], dtype=np.int64)
    rows = counts.sum(axis=1, keepdims=True)
    norm = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    c = len(classes)
    size = max(4.0, 0.6 * c + 2)
    fig = Figure(figsize=(size, size))
    ax = fig.add_subplot()
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    for i in range(c):
        for j in range(c):
            if counts[i, j]:
                ax.text(
                    j,
                    i,
                    str(counts[i, j]),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if norm[i, j] > 0.5 else "black",
                )
    ax.set_xticks(range(c), classes, rotation=60, ha="right")
    ax.set_yticks(range(c), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(
        f"class-wise accuracy {fmt(report.get('classwise_accuracy'), 3)} (n={report.get('count')})"
    )
    return save(fig, path)


def plot_per_class(report: dict, classes: Sequence[str], path: str | Path) -> Path:
    """Horizontal bars of per-class accuracy with the class-wise mean as a line."""
    from matplotlib.figure import Figure

    accs = [report["per_class"].get(cls) for cls in classes]
    fig = Figure(figsize=(6, max(3.0, 0.35 * len(classes) + 1)))
    ax = fig.add_subplot()
    y = np.arange(len(classes))
    ax.barh(y, [a or 0.0 for a in accs], color="tab:blue")
    for yi, a in zip(y, accs):
        ax.text(min(a or 0.0, 1.0) + 0.01, yi, fmt(a, 3), va="center", fontsize=8)
    mean = report.get("classwise_accuracy")
    if mean is not None:
        ax.axvline(mean, color="tab:red", linestyle="--", label=f"class-wise mean {mean:.3f}")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_yticks(y, classes)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.12)
    ax.set_xlabel("accuracy")
    return save(fig, path)


def plot_logmel(feats: np.ndarray, path: str | Path, cfg_features: Any, title: str) -> Path:
    """One log-mel [1, n_mels, frames] in dB over time, low frequencies at the bottom."""
    from matplotlib.figure import Figure

    f = cfg_features
    seconds = feats.shape[-1] * f.hop_length / f.sample_rate
    fig = Figure(figsize=(10, 4), dpi=100)
    ax = fig.add_subplot()
    im = ax.imshow(feats[0], origin="lower", aspect="auto", cmap="magma",
                   extent=(0.0, seconds, -0.5, feats.shape[1] - 0.5))
    ax.set_xlabel("time (s)")
    ax.set_ylabel(f"mel bin ({f.f_min:g} Hz - {f.f_max:g} Hz)")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="dB")
    return save(fig, path)


def plot_curves(records: list[dict], path: str | Path, title: str = "") -> Path | None:
    """Training curves from metrics.jsonl records: train loss, lr, clips/s and test class-wise
    accuracy over steps. None when there is nothing to draw yet."""
    from matplotlib.figure import Figure

    def series(key: str) -> tuple[list[int], list[float]]:
        pts = sorted({r["step"]: r[key] for r in records
                      if r.get(key) is not None and "step" in r}.items())  # a resumed run's repeats
        return [p[0] for p in pts], [float(p[1]) for p in pts]

    panels = [("train/loss", "train loss", False), ("train/lr", "learning rate", True),
              ("train/clips_per_s", "clips/s", False),
              ("eval/classwise_accuracy", "test class-wise accuracy", False)]
    drawn = [(series(k), label, log) for k, label, log in panels]
    if not any(xs for (xs, _), _, _ in drawn):
        return None
    fig = Figure(figsize=(10, 7))
    for i, ((xs, ys), label, log) in enumerate(drawn):
        ax = fig.add_subplot(2, 2, i + 1)
        if xs:
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3)
            if log and min(ys) > 0:
                ax.set_yscale("log")
            if label.startswith("test"):
                best = int(np.argmax(ys))
                ax.annotate(f"best {ys[best]:.3f} @ {xs[best]}", (xs[best], ys[best]),
                            textcoords="offset points", xytext=(0, -14), fontsize=8,
                            ha="right" if best == len(xs) - 1 else "center")
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return save(fig, path)


def plot_table1(summary: dict, path: str | Path) -> Path:
    """Table I at a glance: per row our seeds, their mean with its 95 % CI, and the paper's value."""
    from matplotlib.figure import Figure

    rows = summary["rows"]
    fig = Figure(figsize=(8, 0.7 * len(rows) + 1.6))
    ax = fig.add_subplot()
    for y, row in enumerate(rows):
        seeds = [s["classwise"] for s in row["seeds"] if s["classwise"] is not None]
        ax.scatter(seeds, [y] * len(seeds), s=14, color="tab:blue", alpha=0.4,
                   label="ours: one seed" if y == 0 else None, zorder=2)
        if row["mean"] is not None:
            lo, hi = row["ci95"]
            err = None if lo is None else [[row["mean"] - lo], [hi - row["mean"]]]
            ax.errorbar([row["mean"]], [y], xerr=err, fmt="o", color="tab:blue", capsize=4,
                        label="ours: mean, 95 % CI" if y == 0 else None, zorder=3)
        ax.scatter([row["paper"]], [y], marker="D", color="tab:red", zorder=4,
                   label="paper (one run)" if y == 0 else None)
    ax.set_yticks(range(len(rows)), [r["row"] for r in rows])
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlim(0.0, 1.0)  # an interval from few seeds can pass 0 or 1; accuracy cannot
    ax.set_xlabel("class-wise accuracy")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14 - 0.3 / len(rows)), ncol=3, fontsize=8,
              frameon=False)
    ax.set_title("Table I: ours (seeds, mean, 95 % CI) vs. the paper", fontsize=10)
    return save(fig, path)
