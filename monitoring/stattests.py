"""The two-sample tests behind drift detection, each a small pure typed function plus a declarative record
(StatTest, in STAT_TESTS) the way Evidently's stattests are:

* "mmd" (embedding): RBF-kernel MMD^2 with a permutation p-value, all permutations in one GEMM;
* "ks" (numeric): two-sample Kolmogorov-Smirnov per column;
* "chisquare" (categorical): chi-square homogeneity of the predicted-class histogram, rare classes pooled.

monitoring.detectors combines them into one family with a family-wise false-alarm rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from scipy import stats

TestKind = Literal["embedding", "numeric", "categorical"]
TestOutcome = tuple[float, float]  # (statistic, p_value)

# Permuted MMD^2 within this of the observed count as ties (i.e. as exceedances, the conservative side): float32
# kernel sums carry ~1e-6 rounding, while real MMD^2 differences at these sample sizes are >= ~1e-4.
_TIE_TOLERANCE = 1e-5


# --------------------------------------------------------------------------------------------- kernel MMD


def _squared_distances(z: np.ndarray) -> np.ndarray:
    """All pairwise squared Euclidean distances of the rows of z, float32, in one GEMM (N^2 * d flops)."""
    z = np.asarray(z, dtype=np.float32)
    sq = np.einsum("ij,ij->i", z, z)
    d2 = z @ z.T
    d2 *= -2.0
    d2 += sq[:, None]
    d2 += sq[None, :]
    np.maximum(d2, 0.0, out=d2)  # cancellation can leave tiny negatives
    np.fill_diagonal(d2, 0.0)
    return d2


def median_bandwidth(z: np.ndarray, max_points: int = 500, rng: np.random.Generator | int | None = None) -> float:
    """Median heuristic: sigma with sigma^2 = median pairwise squared distance / 2, i.e. k = exp(-d^2 / median).

    Uses at most max_points random rows (125k pairs), which pins the median to ~0.5% at ~1 ms.
    """
    z = np.asarray(z, dtype=np.float32)
    if len(z) > max_points:
        z = z[np.random.default_rng(rng).choice(len(z), max_points, replace=False)]
    d2 = _squared_distances(z)[np.triu_indices(len(z), k=1)]
    median = float(np.median(d2)) if d2.size else 0.0
    if median <= 0.0:  # mostly identical points: fall back to the mean, then to a unit bandwidth
        median = float(d2.mean()) if d2.size and d2.mean() > 0 else 2.0
    return math.sqrt(median / 2.0)


def rbf_kernel_matrix(z: np.ndarray, bandwidth: float) -> np.ndarray:
    """k(x, y) = exp(-|x - y|^2 / (2 bandwidth^2)) for all pairs of rows, float32.

    Written as exp(g * (2 x.y - |x|^2 - |y|^2)) with g folded into x before the GEMM: four in-place passes over
    the N^2 matrix instead of seven; at d = 32 those memory-bound passes, not the GEMM, dominate (~3 ms, N=1500).
    """
    z = np.asarray(z, dtype=np.float32)
    gamma = np.float32(0.5 / bandwidth**2)
    sq = gamma * np.einsum("ij,ij->i", z, z)
    kernel = (z * (2.0 * gamma)) @ z.T
    kernel -= sq[:, None]
    kernel -= sq[None, :]
    np.minimum(kernel, 0.0, out=kernel)  # the exponent is -gamma * d^2 <= 0; rounding can overshoot
    np.exp(kernel, out=kernel)
    np.fill_diagonal(kernel, 1.0)
    return kernel


def _subset_indicators(n_total: int, n_first: int, n_perm: int, rng: np.random.Generator) -> np.ndarray:
    """(n_perm, n_total) float32 0/1 rows, each marking a uniformly random n_first-subset (argpartition of keys)."""
    picked = np.argpartition(rng.random((n_perm, n_total)), n_first - 1, axis=1)[:, :n_first]
    labels = np.zeros((n_perm, n_total), dtype=np.float32)
    np.put_along_axis(labels, picked, 1.0, axis=1)
    return labels


def _mmd2_per_labelling(kernel: np.ndarray, row_sums: np.ndarray, labels: np.ndarray, m: int) -> np.ndarray:
    """Unbiased MMD^2 for every labelling row at once (row_sums = kernel.sum(axis=1)).

    For group X of a labelling: a = sum_XX k, c = sum_XY k, b = total - a - 2c. One GEMM labels @ kernel
    (P * N^2 flops, the dominant cost of a check) gives a and c for all permutations; the RBF diagonal is 1.
    """
    n = kernel.shape[0] - m
    per_point = labels @ kernel  # (P, N): for each labelling, each point's kernel sum over group X
    # float32 sums along contiguous rows are pairwise (error ~1e-7 relative), far below the MMD^2 null spread.
    a = (labels * per_point).sum(axis=1).astype(np.float64)
    c = (labels @ row_sums).astype(np.float64) - a
    b = float(row_sums.sum(dtype=np.float64)) - a - 2.0 * c
    return (a - m) / (m * (m - 1)) + (b - n) / (n * (n - 1)) - 2.0 * c / (m * n)


def _permutation_p_value(
    kernel: np.ndarray, m: int, n_perm: int, rng: np.random.Generator, stop_after: int | None
) -> TestOutcome:
    """(observed MMD^2, p) with Besag-Clifford sequential stopping, in two GEMM batches (99, then the rest).

    Without stopping, p = (1 + #{permuted >= observed}) / (n_perm + 1). With stop_after = h, the run stops as
    soon as h permuted values reach the observed one, at permutation L, and p = h / L (Besag & Clifford 1991);
    both are exact under exchangeability. Clean windows usually stop after the first batch, cutting the
    dominant cost ~3x; a stop needs p >= stop_after / n_perm (10/399 = 0.025), so any decision at a level below
    that, such as the MMD's 0.005, is the same as with all n_perm permutations.
    """
    row_sums = kernel.sum(axis=1)
    observed_labels = np.zeros((1, len(kernel)), dtype=np.float32)
    observed_labels[0, :m] = 1.0
    observed = float(_mmd2_per_labelling(kernel, row_sums, observed_labels, m)[0])
    done, exceed = 0, 0
    for size in (min(99, n_perm), n_perm - min(99, n_perm)):
        if size == 0:
            break
        mmd2 = _mmd2_per_labelling(kernel, row_sums, _subset_indicators(len(kernel), m, size, rng), m)
        hits = np.flatnonzero(mmd2 >= observed - _TIE_TOLERANCE)
        if stop_after is not None and exceed + len(hits) >= stop_after:
            return observed, stop_after / (done + int(hits[stop_after - exceed - 1]) + 1)
        done, exceed = done + size, exceed + len(hits)
    return observed, (exceed + 1.0) / (n_perm + 1.0)


def mmd_test(
    ref: np.ndarray,
    cur: np.ndarray,
    n_perm: int = 399,
    rng: np.random.Generator | int | None = None,
    bandwidth: float | None = None,
    stop_after: int | None = 10,
) -> TestOutcome:
    """Two-sample RBF-kernel MMD test: (unbiased MMD^2, permutation p-value, floor 1/(n_perm + 1)).

    The pooled kernel matrix is computed once; permutations only relabel rows, so all of them cost one GEMM.
    n_perm is the maximum number of permutations; stop_after (None: never) stops early once the observed value
    is clearly unremarkable, see _permutation_p_value. bandwidth=None uses the median heuristic on the pooled
    sample (label-blind, so the test stays exact).
    """
    ref, cur = np.asarray(ref, dtype=np.float32), np.asarray(cur, dtype=np.float32)
    if ref.ndim != 2 or cur.ndim != 2 or ref.shape[1] != cur.shape[1] or min(len(ref), len(cur)) < 2:
        raise ValueError(f"mmd_test needs two (n, d) arrays with the same d and n >= 2, got {ref.shape} and "
                         f"{cur.shape}; reshape single samples to (1, d) and pass at least two rows each.")
    rng = np.random.default_rng(rng)
    pooled = np.concatenate([ref, cur])
    pooled -= pooled.mean(axis=0)  # centring is label-blind and reduces cancellation in the float32 GEMM
    if bandwidth is None:
        bandwidth = median_bandwidth(pooled, rng=rng)
    kernel = rbf_kernel_matrix(pooled, bandwidth)
    return _permutation_p_value(kernel, len(ref), n_perm, rng, stop_after)


# ------------------------------------------------------------------------------------- univariate tests


def ks_test(ref: np.ndarray, cur: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column-wise two-sample Kolmogorov-Smirnov: (D statistics, p-values), one entry per column.

    One scipy.stats.ks_2samp call with axis=0 (exact p-values for n <= 10k): ~2 ms for 8 columns of 1000,
    half the cost of a Python loop over columns. 1-d inputs are treated as a single column.
    """
    ref = np.asarray(ref, dtype=np.float64).reshape(len(ref), -1)
    cur = np.asarray(cur, dtype=np.float64).reshape(len(cur), -1)
    result = stats.ks_2samp(ref, cur, axis=0)
    return np.atleast_1d(result.statistic), np.atleast_1d(result.pvalue)


def ks_tests(
    ref_stats: np.ndarray, cur_stats: np.ndarray, names: Sequence[str], bonferroni: bool = True
) -> dict[str, TestOutcome]:
    """KS test per column: {name: (statistic, p_value)}; p-values Bonferroni-adjusted over the columns.

    DriftDetector does not use the adjustment here: it corrects over the whole family (MMD + KS + class) itself.
    """
    ref_stats, cur_stats = np.asarray(ref_stats), np.asarray(cur_stats)
    width = {arr.shape[1] if arr.ndim == 2 else -1 for arr in (ref_stats, cur_stats)}
    if width != {len(names)}:
        raise ValueError(f"got {len(names)} names for arrays of shapes {ref_stats.shape} and {cur_stats.shape}; "
                         "pass 2-d (n, k) arrays and one name per column.")
    statistics, p_values = ks_test(ref_stats, cur_stats)
    factor = len(names) if bonferroni else 1
    pairs = zip(names, statistics, p_values, strict=True)
    return {name: (float(d), min(1.0, float(p) * factor)) for name, d, p in pairs}


def _pool_rare_bins(expected: np.ndarray, min_expected: float) -> np.ndarray:
    """Bin index after pooling: classes expected < min_expected times go to one 'rare' bin (index 0).

    The chi-square approximation needs expected counts >= ~5 (Cochran); with hundreds of classes and a
    200-request window most classes are rare, and testing them separately would inflate false alarms.
    """
    rare = expected < min_expected
    if rare.any() and expected[rare].sum() < min_expected and (~rare).any():
        rare[np.flatnonzero(~rare)[np.argmin(expected[~rare])]] = True  # top up the rare bin with the smallest
    bins = np.zeros(len(expected), dtype=np.int64)
    bins[~rare] = np.arange(1, int((~rare).sum()) + 1)
    return bins


def class_shift_test(
    ref_classes: np.ndarray,
    cur_classes: np.ndarray,
    n_classes: int,
    min_expected: float = 5.0,
    pseudo_count: float = 0.5,
) -> TestOutcome:
    """Chi-square test that the window's predicted-class histogram matches the reference: (chi2, p-value).

    Expected window counts come from reference proportions smoothed with pseudo_count per class, so classes
    never seen in the reference still get a (small) expectation and are pooled rather than dividing by zero.
    The test itself is the 2 x bins homogeneity test, which also accounts for the reference being a sample.
    """
    ref_counts = np.bincount(np.asarray(ref_classes, dtype=np.int64), minlength=n_classes)
    cur_counts = np.bincount(np.asarray(cur_classes, dtype=np.int64), minlength=n_classes)
    if len(ref_counts) > n_classes or len(cur_counts) > n_classes:
        raise ValueError(f"class ids must be < n_classes={n_classes}; pass the classifier's number of classes.")
    proportions = (ref_counts + pseudo_count) / (ref_counts.sum() + pseudo_count * n_classes)
    bins = _pool_rare_bins(cur_counts.sum() * proportions, min_expected)
    table = np.stack([np.bincount(bins, weights=counts) for counts in (ref_counts, cur_counts)])
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2:
        return 0.0, 1.0  # everything fell into one bin: nothing to compare
    result = stats.chi2_contingency(table, correction=False)
    return float(result.statistic), float(result.pvalue)


# --------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class StatTest:
    """Declarative record of a drift test, in the style of Evidently's stattests.

    Calling conventions by kind: "embedding" func(ref, cur, n_perm=, rng=, bandwidth=) on (n, k) arrays and
    "categorical" func(ref, cur, n_classes=) on class ids return (statistic, p_value); "numeric"
    func(ref, cur) on (n, features) arrays tests every column and returns (statistics, p_values) arrays.
    default_threshold is the p-value threshold when a test is used on its own; DriftDetector instead gives each
    test its share of the family-wise alpha.
    """

    name: str
    kind: TestKind
    default_threshold: float
    func: Callable[..., tuple[Any, Any]]
    description: str


STAT_TESTS: dict[str, StatTest] = {
    "mmd": StatTest("mmd", "embedding", 0.05, mmd_test, "RBF-kernel MMD^2, median bandwidth, permutation p"),
    "ks": StatTest("ks", "numeric", 0.05, ks_test, "two-sample Kolmogorov-Smirnov"),
    "chisquare": StatTest("chisquare", "categorical", 0.05, class_shift_test, "chi-square homogeneity of classes"),
}
