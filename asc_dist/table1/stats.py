"""Statistics behind Table I: seed-level confidence intervals and paired bootstrap comparisons.

Pure numpy (no scipy) so the table can be built anywhere the trainer runs. Rows are compared by
class-wise accuracy (mean over classes that have test clips of per-class recall). A comparison
of two rows is paired twice over: the same seeds are matched, and one clip resample per
bootstrap replicate is shared by both rows and all seeds, so clips that are hard for every model
cancel out of the difference instead of widening its interval.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence

import numpy as np

RunData = tuple[Sequence[int] | np.ndarray, Sequence[int] | np.ndarray]

_CF_EPS = 1e-16
_CF_TINY = 1e-300
_CF_MAXIT = 100_000
# Replicates per chunk are sized so one chunk's (replicates x clips) arrays stay ~32 MB.
_CHUNK_ELEMENTS = 4_000_000


def _beta_cf(a: float, b: float, x: float) -> float:
    """Continued fraction of I_x(a, b) (modified Lentz); converges fast for x < (a+1)/(a+b+2)."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = 1.0
    d = 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _CF_TINY else _CF_TINY)
    h = d
    for m in range(1, _CF_MAXIT + 1):
        m2 = 2 * m
        for aa in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > _CF_TINY else _CF_TINY)
            c = 1.0 + aa / c
            c = c if abs(c) > _CF_TINY else _CF_TINY
            delta = d * c
            h *= delta
        if abs(delta - 1.0) < _CF_EPS:
            return h
    raise RuntimeError(f"incomplete beta continued fraction did not converge (a={a}, b={b})")


def _beta_inc(a: float, b: float, x: float, y: float) -> float:
    """Regularized I_x(a, b); y = 1 - x is passed in exactly so tails keep full precision."""
    if x <= 0.0:
        return 0.0
    if y <= 0.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(y)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_cf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_cf(b, a, y) / b


def _t_upper_tail(t: float, df: float) -> float:
    """P(T > t) for t >= 0, via P(|T| > t) = I_{df/(df+t^2)}(df/2, 1/2)."""
    s = df + t * t
    return 0.5 * _beta_inc(0.5 * df, 0.5, df / s, t * t / s)


def t_quantile(p: float, df: int) -> float:
    """Quantile of Student's t with ``df`` degrees of freedom (bisection on the exact tail).

    Bisection rather than Newton because the tail is monotone and the cost (a few ms) is
    irrelevant next to training; it is accurate to ~1e-12 relative.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    if p == 0.5:
        return 0.0
    tail = 1.0 - p
    lo, hi = 0.0, 1.0
    while _t_upper_tail(hi, df) > tail:
        lo, hi = hi, 2.0 * hi
    while hi - lo > 1e-13 * hi:
        mid = 0.5 * (lo + hi)
        if _t_upper_tail(mid, df) > tail:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def mean_ci(values: Sequence[float] | np.ndarray, level: float = 0.95) -> dict:
    """Mean over seeds with a t-interval, the spread a reader can expect from another seed set.

    Returns {"n", "mean", "std" (ddof=1), "ci95": [lo, hi], "level"}; "ci95" holds the interval
    at ``level`` (named for the usual 95%). With a single value the spread is unknown, so "std"
    is 0.0 and the interval is [None, None] (undefined) rather than a misleading zero width.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("mean_ci needs at least one value")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"mean_ci got non-finite values: {x.tolist()}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    n = int(x.size)
    mean = float(x.mean())
    if n == 1:
        return {"n": 1, "mean": mean, "std": 0.0, "ci95": [None, None], "level": level}
    std = float(x.std(ddof=1))
    half = t_quantile(0.5 * (1.0 + level), n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci95": [mean - half, mean + half], "level": level}


def _check_labels(labels: np.ndarray, num_classes: int) -> None:
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}"
        )


def classwise_accuracy(
    labels: Sequence[int] | np.ndarray,
    preds: Sequence[int] | np.ndarray,
    num_classes: int,
    weights: Sequence[float] | np.ndarray | None = None,
) -> float:
    """Mean per-class recall over classes with positive (weighted) count, the paper's metric.

    ``weights`` are per-clip multiplicities, so a bootstrap resample is a count vector instead
    of a copied index array. Classes without clips are skipped, not counted as 0.
    """
    y = np.asarray(labels, dtype=np.int64)
    yhat = np.asarray(preds, dtype=np.int64)
    _check_labels(y, num_classes)
    if yhat.shape != y.shape:
        raise ValueError(f"preds shape {yhat.shape} != labels shape {y.shape}")
    w = np.ones(y.shape, dtype=np.float64) if weights is None else np.asarray(weights, float)
    if w.shape != y.shape:
        raise ValueError(f"weights shape {w.shape} != labels shape {y.shape}")
    if np.any(w < 0):
        raise ValueError("weights must be non-negative")
    count = np.bincount(y, weights=w, minlength=num_classes)
    correct = np.bincount(y, weights=w * (y == yhat), minlength=num_classes)
    present = count > 0
    if not present.any():
        raise ValueError("no class has a positive count: class-wise accuracy is undefined")
    return float(np.mean(correct[present] / count[present]))


def verdict(
    mean_diff: float, lo: float, hi: float, n_seeds: int, n_clips: int, level: float = 0.95
) -> str:
    """One line a reader of the table can act on, in accuracy points (100 x difference)."""

    def pts(v: float) -> str:
        return f"{round(100.0 * v, 1) + 0.0:+.1f}"  # + 0.0 turns -0.0 into +0.0

    head = f"{pts(mean_diff)} points, {100.0 * level:g}% CI [{pts(lo)}, {pts(hi)}]"
    if lo > 0.0:
        return f"{head}: better, distinguishable from 0"
    if hi < 0.0:
        return f"{head}: worse, distinguishable from 0"
    seeds = f"{n_seeds} seed{'' if n_seeds == 1 else 's'}"
    return f"{head}: not distinguishable from 0 at this n ({seeds} x {n_clips} clips)"


def _stack_runs(
    runs: Mapping[Hashable, RunData], seeds: list[Hashable], name: str
) -> tuple[np.ndarray, np.ndarray]:
    """(labels, preds[seed, clip]) for ``seeds``; labels must agree, else clips are misaligned."""
    labels = np.asarray(runs[seeds[0]][0], dtype=np.int64)
    preds = []
    for s in seeds:
        y, yhat = (np.asarray(a, dtype=np.int64) for a in runs[s])
        if y.shape != labels.shape or yhat.shape != labels.shape:
            raise ValueError(
                f"row {name} seed {s!r}: labels {y.shape} / preds {yhat.shape}, "
                f"expected {labels.shape} (runs must share one aligned test set)"
            )
        if not np.array_equal(y, labels):
            raise ValueError(f"row {name} seed {s!r}: labels differ, clips are not aligned")
        preds.append(yhat)
    return labels, np.stack(preds)


def _sorted_seeds(seeds: list[Hashable]) -> list[Hashable]:
    """Numeric order for int seeds (10 after 2); repr order when seed types do not compare."""
    try:
        return sorted(seeds)
    except TypeError:
        return sorted(seeds, key=repr)


def _multiplicities(rng: np.random.Generator, reps: int, n: int) -> np.ndarray:
    """(reps, n) counts of a with-replacement resample of n items per replicate."""
    idx = rng.integers(0, n, size=(reps, n)) + (np.arange(reps) * n)[:, None]
    return np.bincount(idx.ravel(), minlength=reps * n).reshape(reps, n)


def paired_bootstrap(
    runs_a: Mapping[Hashable, RunData],
    runs_b: Mapping[Hashable, RunData],
    num_classes: int,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """Difference in class-wise accuracy from row a to row b, with a paired bootstrap CI.

    The statistic is the mean over common seeds of acc(b) - acc(a). Each replicate resamples
    seeds and clips with replacement; the clip resample is shared by both rows and all seeds, so
    the interval reflects how much the *difference* depends on which clips were drawn, not how
    hard the clips are. Seeds in only one row are left out and listed in "unpaired_seeds".
    Returns {"mean_diff", "ci95" (percentile interval at ``level``), "level", "n_seeds",
    "n_clips", "n_boot", "unpaired_seeds", "verdict"}.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    common = [s for s in runs_a if s in runs_b]
    only_a = _sorted_seeds([s for s in runs_a if s not in runs_b])
    only_b = _sorted_seeds([s for s in runs_b if s not in runs_a])
    if not common:
        raise ValueError(
            f"no seed is present in both rows: seeds only in a: {only_a}, only in b: {only_b}"
        )
    labels, preds_a = _stack_runs(runs_a, common, "a")
    labels_b, preds_b = _stack_runs(runs_b, common, "b")
    if labels.shape != labels_b.shape:
        raise ValueError(f"row a has {labels.size} clips, row b {labels_b.size}: not one test set")
    if not np.array_equal(labels, labels_b):
        raise ValueError("rows a and b have different labels: clips are not aligned")
    _check_labels(labels, num_classes)
    n_seeds, n_clips = preds_a.shape
    if n_clips == 0:
        raise ValueError("no test clips")

    onehot = np.eye(num_classes)[labels]  # (clips, classes)
    hits = np.concatenate([preds_a, preds_b]) == labels  # (2 * seeds, clips)
    # Column (run, class) of z marks that run's correct clips of that class. Counts are
    # integers, so w @ z is exact in float64 whatever the BLAS summation order, and a row
    # compared with itself gives a difference of exactly 0.
    z = (hits[:, :, None] * onehot[None]).transpose(1, 0, 2).reshape(n_clips, -1)

    def per_seed_diff(w: np.ndarray) -> np.ndarray:
        """(reps, seeds) acc(b) - acc(a) under clip multiplicities w (reps, clips)."""
        count = w @ onehot  # (reps, classes)
        correct = (w @ z).reshape(len(w), 2 * n_seeds, num_classes)
        present = count > 0
        acc = np.where(present[:, None], correct / np.maximum(count, 1.0)[:, None], 0.0)
        cw = acc.sum(axis=2) / present.sum(axis=1)[:, None]
        return cw[:, n_seeds:] - cw[:, :n_seeds]

    mean_diff = float(per_seed_diff(np.ones((1, n_clips)))[0].mean())
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_ELEMENTS // n_clips)
    stats = []
    for start in range(0, n_boot, chunk):
        reps = min(chunk, n_boot - start)
        clip_w = _multiplicities(rng, reps, n_clips).astype(np.float64)
        seed_w = _multiplicities(rng, reps, n_seeds)
        stats.append((per_seed_diff(clip_w) * seed_w).sum(axis=1) / n_seeds)
    lo, hi = np.percentile(np.concatenate(stats), [50.0 * (1.0 - level), 50.0 * (1.0 + level)])
    lo, hi = float(lo), float(hi)
    return {
        "mean_diff": mean_diff,
        "ci95": [lo, hi],
        "level": level,
        "n_seeds": n_seeds,
        "n_clips": n_clips,
        "n_boot": n_boot,
        "unpaired_seeds": _sorted_seeds(only_a + only_b),
        "verdict": verdict(mean_diff, lo, hi, n_seeds, n_clips, level),
    }
