"""Tests for asc_dist/table1/stats.py (loaded by path: the table1 package may not exist yet)."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterable
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location(
    "table1_stats", ROOT / "asc_dist" / "table1" / "stats.py"
)
stats = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(stats)

# scipy.stats.t.ppf(0.975, df), to 1e-9.
T975 = {
    1: 12.706204736,
    2: 4.302652730,
    4: 2.776445105,
    9: 2.262157163,
    29: 2.045229642,
    1000: 1.962339081,
}


def _simulate_row(
    rng: np.random.Generator,
    labels: np.ndarray,
    p_correct: np.ndarray | float,
    seeds: Iterable[int],
    num_classes: int,
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Seed -> (labels, preds): each clip right with probability p_correct, else a wrong class."""
    n = labels.size
    runs = {}
    for s in seeds:
        ok = rng.random(n) < p_correct
        wrong = (labels + rng.integers(1, num_classes, n)) % num_classes
        runs[s] = (labels, np.where(ok, labels, wrong))
    return runs


# --- t quantiles -------------------------------------------------------------------------------


@pytest.mark.parametrize("df", sorted(T975))
def test_t_quantile_known_values(df: int) -> None:
    assert stats.t_quantile(0.975, df) == pytest.approx(T975[df], abs=1e-6)


@pytest.mark.parametrize("p", [0.5, 0.6, 0.75, 0.9, 0.95, 0.99, 0.999, 0.9995])
def test_t_quantile_closed_forms(p: float) -> None:
    # df 1 is Cauchy; df 2 and 4 have closed-form quantiles (Hill 1970 / Shaw 2006).
    assert stats.t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), abs=1e-6)
    alpha = 4.0 * p * (1.0 - p)
    assert stats.t_quantile(p, 2) == pytest.approx(
        (2.0 * p - 1.0) * math.sqrt(2.0 / alpha), abs=1e-6
    )
    q = math.cos(math.acos(math.sqrt(alpha)) / 3.0) / math.sqrt(alpha)
    assert stats.t_quantile(p, 4) == pytest.approx(2.0 * math.sqrt(q - 1.0), abs=1e-6)


def test_t_quantile_symmetry_and_normal_limit() -> None:
    assert stats.t_quantile(0.025, 9) == pytest.approx(-T975[9], abs=1e-6)
    assert stats.t_quantile(0.5, 3) == 0.0
    z = NormalDist().inv_cdf(0.975)
    assert abs(stats.t_quantile(0.975, 1_000_000) - z) < 1e-5
    qs = [stats.t_quantile(0.975, df) for df in (1, 2, 3, 5, 10, 100)]
    assert qs == sorted(qs, reverse=True)


def test_t_quantile_matches_scipy_on_a_grid() -> None:
    sp = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 5, 7, 15, 30, 60, 200, 5000):
        for p in (0.5001, 0.55, 0.8, 0.9, 0.95, 0.975, 0.99, 0.995, 0.999, 0.9995):
            assert stats.t_quantile(p, df) == pytest.approx(sp.t.ppf(p, df), abs=1e-6)


@pytest.mark.parametrize(("p", "df"), [(0.0, 3), (1.0, 3), (0.975, 0)])
def test_t_quantile_rejects_bad_arguments(p: float, df: int) -> None:
    with pytest.raises(ValueError):
        stats.t_quantile(p, df)


# --- mean_ci ------------------------------------------------------------------------------------


def test_mean_ci_known_data() -> None:
    r = stats.mean_ci([0.7, 0.72, 0.74])
    half = T975[2] * 0.02 / math.sqrt(3)
    assert r["n"] == 3
    assert r["mean"] == pytest.approx(0.72)
    assert r["std"] == pytest.approx(0.02)
    assert r["ci95"] == pytest.approx([0.72 - half, 0.72 + half], abs=1e-9)


def test_mean_ci_other_level_uses_its_quantile() -> None:
    r = stats.mean_ci(np.array([0.7, 0.72, 0.74]), level=0.90)
    half = 2.919985580 * 0.02 / math.sqrt(3)  # t_{0.95, 2}
    assert r["ci95"] == pytest.approx([0.72 - half, 0.72 + half], abs=1e-8)
    assert r["level"] == 0.90


def test_mean_ci_single_value_has_undefined_interval() -> None:
    r = stats.mean_ci([0.81])
    assert r == {"n": 1, "mean": 0.81, "std": 0.0, "ci95": [None, None], "level": 0.95}


@pytest.mark.parametrize("values", [[], [0.7, float("nan")]])
def test_mean_ci_rejects_empty_and_nan(values: list[float]) -> None:
    with pytest.raises(ValueError):
        stats.mean_ci(values)


# --- classwise_accuracy -------------------------------------------------------------------------

# Class 0: 3/4 right, class 1: 1/2, class 2: no clips (skipped), class 3: 1/3.
LABELS = np.array([0, 0, 0, 0, 1, 1, 3, 3, 3])
PREDS = np.array([0, 0, 0, 1, 1, 2, 3, 0, 0])


def test_classwise_accuracy_hand_made_confusion() -> None:
    assert stats.classwise_accuracy(LABELS, PREDS, 4) == pytest.approx((3 / 4 + 1 / 2 + 1 / 3) / 3)
    assert stats.classwise_accuracy(LABELS, LABELS, 4) == 1.0
    # Not overall accuracy (5/9): the big class does not dominate.
    assert stats.classwise_accuracy(LABELS, PREDS, 4) != pytest.approx(5 / 9)


def test_classwise_accuracy_weights_equal_repeating_clips() -> None:
    w = np.array([2, 0, 1, 1, 3, 1, 1, 1, 2])
    repeated = stats.classwise_accuracy(np.repeat(LABELS, w), np.repeat(PREDS, w), 4)
    assert stats.classwise_accuracy(LABELS, PREDS, 4, weights=w) == pytest.approx(repeated)
    # Zero weight on every clip of class 1 drops the class instead of scoring it 0.
    w1 = np.where(LABELS == 1, 0, 1)
    assert stats.classwise_accuracy(LABELS, PREDS, 4, weights=w1) == pytest.approx(
        (3 / 4 + 1 / 3) / 2
    )


def test_classwise_accuracy_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="labels must lie"):
        stats.classwise_accuracy([0, 4], [0, 0], 4)
    with pytest.raises(ValueError, match="shape"):
        stats.classwise_accuracy([0, 1], [0], 4)
    with pytest.raises(ValueError, match="no class"):
        stats.classwise_accuracy([0, 1], [0, 1], 4, weights=[0, 0])


# --- verdict ------------------------------------------------------------------------------------


def test_verdict_wording() -> None:
    assert (
        stats.verdict(0.014, 0.002, 0.026, 5, 2518)
        == "+1.4 points, 95% CI [+0.2, +2.6]: better, distinguishable from 0"
    )
    assert stats.verdict(-0.003, -0.015, 0.009, 3, 2518) == (
        "-0.3 points, 95% CI [-1.5, +0.9]: not distinguishable from 0 at this n "
        "(3 seeds x 2518 clips)"
    )
    assert stats.verdict(-0.02, -0.03, -0.01, 1, 100) == (
        "-2.0 points, 95% CI [-3.0, -1.0]: worse, distinguishable from 0"
    )
    assert stats.verdict(-1e-5, -0.01, 0.01, 1, 100).startswith("+0.0 points")
    assert "(1 seed x 100 clips)" in stats.verdict(0.0, -0.01, 0.01, 1, 100)


# --- paired_bootstrap ---------------------------------------------------------------------------


def test_row_against_itself_is_exactly_zero() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 300)
    row = _simulate_row(rng, labels, 0.7, range(3), 10)
    r = stats.paired_bootstrap(row, row, 10, n_boot=500)
    assert r["mean_diff"] == 0.0
    assert r["ci95"] == [0.0, 0.0]
    assert "not distinguishable" in r["verdict"]
    assert (r["n_seeds"], r["n_clips"], r["n_boot"], r["unpaired_seeds"]) == (3, 300, 500, [])


def test_clearly_better_row() -> None:
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(10), 50)
    a = _simulate_row(rng, labels, 0.6, range(3), 10)
    b = _simulate_row(rng, labels, 0.9, range(3), 10)
    r = stats.paired_bootstrap(a, b, 10, n_boot=1000)
    lo, hi = r["ci95"]
    assert 0.0 < lo <= 0.3 <= hi
    assert lo <= r["mean_diff"] <= hi
    assert r["verdict"].endswith("better, distinguishable from 0")
    # Direction is "from a to b": swapping the rows flips the sign.
    back = stats.paired_bootstrap(b, a, 10, n_boot=1000)
    assert back["mean_diff"] == pytest.approx(-r["mean_diff"])
    assert back["ci95"][1] < 0.0
    assert "worse" in back["verdict"]


def test_small_difference_with_few_clips_is_not_distinguishable() -> None:
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(10), 6)
    a = _simulate_row(rng, labels, 0.70, range(3), 10)
    b = _simulate_row(rng, labels, 0.72, range(3), 10)
    r = stats.paired_bootstrap(a, b, 10, n_boot=1000)
    assert r["ci95"][0] < 0.0 < r["ci95"][1]
    assert "not distinguishable from 0 at this n (3 seeds x 60 clips)" in r["verdict"]


def test_bootstrap_is_reproducible_and_seed_dependent() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 5, 200)
    a = _simulate_row(rng, labels, 0.6, range(2), 5)
    b = _simulate_row(rng, labels, 0.65, range(2), 5)
    r1 = stats.paired_bootstrap(a, b, 5, n_boot=200, seed=7)
    assert stats.paired_bootstrap(a, b, 5, n_boot=200, seed=7) == r1
    assert stats.paired_bootstrap(a, b, 5, n_boot=200, seed=8)["ci95"] != r1["ci95"]


def test_coverage_of_a_known_difference() -> None:
    """The 95% interval holds the true difference in roughly 95% of repeated experiments.

    Each experiment draws fresh clips with shared difficulty (the same clips are hard for both
    rows), a per-(row, seed) accuracy shift (seed-to-seed variation), and per-clip noise; row b
    is 5 points better on every clip, so the true difference is exactly 0.05. Resampling seeds
    and clips both counts the per-clip noise twice (conservative) while 3 seeds understate the
    seed shift (liberal); with this mix the two roughly cancel. The band is wide enough for a
    binomial count of 200 and narrow enough to catch a CI that ignores a variance source.
    """
    rng = np.random.default_rng(4)
    num_classes, delta = 5, 0.05
    labels = np.repeat(np.arange(num_classes), 40)
    hits = 0
    for i in range(200):
        difficulty = 0.6 + 0.25 * (1.0 - 2.0 * rng.random(labels.size))
        rows = [
            {
                s: _simulate_row(rng, labels, p + rng.uniform(-0.07, 0.07), [s], num_classes)[s]
                for s in range(3)
            }
            for p in (difficulty, difficulty + delta)
        ]
        lo, hi = stats.paired_bootstrap(*rows, num_classes, n_boot=300, seed=i)["ci95"]
        hits += lo <= delta <= hi
    assert 0.88 <= hits / 200 <= 0.99


def test_pairing_narrows_the_interval() -> None:
    """Rows that fail on the same hard clips differ only where b fixes some of them."""
    rng = np.random.default_rng(5)
    num_classes, n, seeds = 10, 500, range(3)
    labels = rng.integers(0, num_classes, n)
    hard = rng.random(n) < 0.3
    fixed = hard & (rng.random(n) < 0.15)
    a = _simulate_row(rng, labels, np.where(hard, 0.0, 0.97), seeds, num_classes)
    b = _simulate_row(rng, labels, np.where(hard & ~fixed, 0.0, 0.97), seeds, num_classes)
    n_boot = 300
    paired = stats.paired_bootstrap(a, b, num_classes, n_boot=n_boot, seed=0)

    # Same seed resampling, but independent clip resamples for each row.
    boot_rng = np.random.default_rng(0)
    unpaired = []
    for _ in range(n_boot):
        picked = boot_rng.integers(0, len(seeds), len(seeds))
        wa = np.bincount(boot_rng.integers(0, n, n), minlength=n)
        wb = np.bincount(boot_rng.integers(0, n, n), minlength=n)
        unpaired.append(
            np.mean(
                [
                    stats.classwise_accuracy(*b[s], num_classes, weights=wb)
                    - stats.classwise_accuracy(*a[s], num_classes, weights=wa)
                    for s in picked
                ]
            )
        )
    lo_u, hi_u = np.percentile(unpaired, [2.5, 97.5])
    lo_p, hi_p = paired["ci95"]
    assert lo_p > 0.0
    assert lo_u < lo_p
    assert hi_p - lo_p < 0.5 * (hi_u - lo_u)


def test_missing_seeds() -> None:
    labels = np.array([0, 1, 2, 0])
    run = (labels, labels)
    with pytest.raises(ValueError, match=r"only in a: \[0, 1\], only in b: \[2, 3\]"):
        stats.paired_bootstrap({0: run, 1: run}, {2: run, 3: run}, 3)
    r = stats.paired_bootstrap({10: run, 1: run, 2: run}, {1: run, 2: run, 3: run}, 3, n_boot=10)
    assert r["n_seeds"] == 2
    assert r["unpaired_seeds"] == [3, 10]


def test_misaligned_runs_are_rejected() -> None:
    labels = np.array([0, 1, 2, 0])
    with pytest.raises(ValueError, match="not aligned"):
        stats.paired_bootstrap({0: (labels, labels)}, {0: (labels[::-1], labels)}, 3)
    with pytest.raises(ValueError, match="4 clips, row b 3"):
        stats.paired_bootstrap({0: (labels, labels)}, {0: (labels[:3], labels[:3])}, 3)
    with pytest.raises(ValueError, match=r"row a seed 1: .*expected \(4,\)"):
        stats.paired_bootstrap(
            {0: (labels, labels), 1: (labels, labels[:3])},
            {0: (labels, labels), 1: (labels, labels)},
            3,
        )


def test_full_size_run() -> None:
    """Table I's size (2518 clips x 5 seeds x 10 classes, n_boot 2000); a slowdown shows here."""
    rng = np.random.default_rng(6)
    labels = rng.integers(0, 10, 2518)
    a = _simulate_row(rng, labels, 0.65, range(5), 10)
    b = _simulate_row(rng, labels, 0.68, range(5), 10)
    r = stats.paired_bootstrap(a, b, 10)
    assert (r["n_seeds"], r["n_clips"], r["n_boot"]) == (5, 2518, 2000)
    assert r["ci95"][0] < r["mean_diff"] < r["ci95"][1]
