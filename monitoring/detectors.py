"""Fast drift detection for the serving monitor: pure numpy/scipy, one check in tens of milliseconds.

Every prediction leaves a record (penultimate-layer embedding, image statistics, top-1 confidence, entropy,
predicted class). Each adapter version has a ReferenceSet of the same features. DriftDetector.check compares a
window of recent records with the reference using three kinds of test (monitoring.stattests):

* "mmd" (embedding): RBF-kernel MMD^2 with a permutation p-value on PCA-reduced embeddings;
* "ks" (numeric): two-sample Kolmogorov-Smirnov per image statistic, confidence and entropy;
* "chisquare" (categorical): chi-square homogeneity test of the predicted-class histogram.

The tests form one family whose family-wise false-alarm rate is held at DriftConfig.alpha by a weighted
Bonferroni correction, so on clean traffic at most alpha of the checks alarm. Evidently is far too slow for
this (~37 s for a 1000x512 window) and is kept for human-readable reports only.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from models.files import write_atomic
from monitoring.image_stats import STAT_NAMES
from monitoring.stattests import STAT_TESTS, median_bandwidth

REFERENCE_FILE = "reference.npz"  # a version's ReferenceSet on disk (monitoring/reference.py writes it)
EMBEDDING_FEATURE = "embedding"
CLASS_FEATURE = "predicted_class"
OUTPUT_FEATURES: tuple[str, ...] = ("confidence", "entropy")
_RESERVED_NAMES = frozenset((EMBEDDING_FEATURE, CLASS_FEATURE, *OUTPUT_FEATURES))
_MAX_FIT_POINTS = 2000  # PCA/bandwidth fit split cap: more points barely move a 32-d subspace, SVD cost grows.
_MIN_P = 1e-300  # p-values are floored here so the score stays finite (JSON has no inf).


# ---------------------------------------------------------------------------------------------- PCA


class EmbeddingReducer:
    """PCA fitted on reference embeddings with numpy SVD; transform() is one (n, d) x (d, k) float32 GEMM."""

    def __init__(self, n_components: int = 32, whiten: bool = False) -> None:
        self.n_components = n_components
        self.whiten = whiten
        self.mean_: np.ndarray | None = None
        self.components_: np.ndarray | None = None  # (k, d) float32, rows are unit principal axes
        self.explained_variance_: np.ndarray | None = None

    def fit(self, x: np.ndarray) -> EmbeddingReducer:
        """Fit on (n, d) embeddings; keeps min(n_components, n, d) components. ~30 ms for 500 x 512."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or len(x) < 2:
            raise ValueError(f"fit needs an (n, d) array with n >= 2, got shape {x.shape}.")
        self.mean_ = x.mean(axis=0)
        _, singular, vt = np.linalg.svd(x - self.mean_, full_matrices=False)
        k = min(self.n_components, len(singular))
        self.components_ = np.ascontiguousarray(vt[:k])
        self.explained_variance_ = (singular[:k] ** 2 / (len(x) - 1)).astype(np.float32)
        if self.whiten:  # fold 1/std into the axes so transform stays one GEMM; guard null directions
            scale = 1.0 / np.sqrt(np.maximum(self.explained_variance_, np.finfo(np.float32).tiny))
            self.components_ *= scale[:, None]
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Project (n, d) embeddings onto the fitted axes: (n, k) float32."""
        if self.components_ is None or self.mean_ is None:
            raise RuntimeError("EmbeddingReducer is not fitted; call fit(reference_embeddings) first.")
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.components_.shape[1]:
            raise ValueError(f"expected (n, {self.components_.shape[1]}) embeddings, got shape {x.shape}.")
        return (x - self.mean_) @ self.components_.T

    def fit_transform(self, x: np.ndarray) -> np.ndarray:
        return self.fit(x).transform(x)


# ------------------------------------------------------------------------------------------- config


def _mmd_alpha(alpha: float, tests: Sequence[str], share: float) -> float:
    """The MMD test's slice of alpha: `share` of it when other tests run too, all of it when alone."""
    return alpha if len(tests) == 1 else alpha * share


def _config_errors(cfg: DriftConfig) -> list[str]:
    """Every problem with a config as a sentence that says what to do (empty when the config is fine)."""
    checks = [
        (0.0 < cfg.alpha < 1.0, f"alpha must be between 0 and 1 (exclusive), got {cfg.alpha}; "
                                "use e.g. 0.01 to allow at most 1% false alarms per check."),
        (cfg.pca_components >= 1, f"pca_components must be at least 1, got {cfg.pca_components}; "
                                  "32 keeps most of the signal of a 512-d embedding."),
        (cfg.n_permutations >= 1, f"n_permutations must be at least 1, got {cfg.n_permutations}; "
                                  "the default 399 resolves p-values down to 0.0025."),
        (cfg.min_window >= 10, f"min_window must be at least 10, got {cfg.min_window}; "
                               "use 100 or more so that tiny windows do not produce noisy checks."),
        (cfg.reference_size >= 10, f"reference_size must be at least 10, got {cfg.reference_size}; "
                                   "the default 500 is enough for the MMD test and keeps a check under 100 ms."),
        (0.0 < cfg.mmd_alpha_share < 1.0, f"mmd_alpha_share must be between 0 and 1 (exclusive), got "
                                          f"{cfg.mmd_alpha_share}; 0.5 gives the embedding test half of alpha."),
        (cfg.seed >= 0, f"seed must be a non-negative integer, got {cfg.seed}; pick any value >= 0."),
    ]
    errors = [message for ok, message in checks if not ok]
    return errors or _tests_errors(cfg)


def _tests_errors(cfg: DriftConfig) -> list[str]:
    """Problems with the enabled tests, given otherwise valid numbers."""
    unknown = [name for name in cfg.tests if name not in STAT_TESTS]
    if not cfg.tests or unknown:
        return [f"tests must be a non-empty subset of {sorted(STAT_TESTS)}, got {list(cfg.tests)}; "
                "remove the unknown names."]
    kinds = [STAT_TESTS[name].kind for name in cfg.tests]
    if len(set(kinds)) != len(kinds):
        return [f"tests {list(cfg.tests)} enable two tests of the same kind; keep one test per kind."]
    level = _mmd_alpha(cfg.alpha, cfg.tests, cfg.mmd_alpha_share)
    if "mmd" in cfg.tests and 1.0 / (cfg.n_permutations + 1) > level * (1.0 + 1e-9):
        needed = math.ceil(1.0 / level - 1e-9) - 1
        return [f"n_permutations={cfg.n_permutations} cannot give an MMD p-value at or below its share of alpha "
                f"({level:g}), so the embedding test could never alarm; set n_permutations to at least {needed}."]
    return []


@dataclass(frozen=True)
class DriftConfig:
    """Settings of a DriftDetector; invalid values raise ValueError with a sentence saying what to do."""

    alpha: float = field(default=0.01, metadata={
        "help": "Family-wise false-alarm rate per check on clean traffic (0.01: at most 1% of checks alarm)."})
    pca_components: int = field(default=32, metadata={
        "help": "Principal components of the embedding kept for the MMD test (capped by the reference size)."})
    whiten: bool = field(default=False, metadata={
        "help": "Scale principal components to unit variance before the MMD (weights weak directions up)."})
    n_permutations: int = field(default=399, metadata={
        "help": "Permutations for the MMD p-value (resolution 1/(n+1)); the check's main cost, linear in it. "
                "399 makes alpha * mmd_alpha_share * (n + 1) = 2 an integer, so the test is exact at its level."})
    min_window: int = field(default=100, metadata={
        "help": "Smallest window (records) a check accepts; smaller windows raise ValueError."})
    reference_size: int = field(default=500, metadata={
        "help": "Reference records compared by the MMD test (random subsample; the rest fits PCA/bandwidth)."})
    tests: tuple[str, ...] = field(default=("mmd", "ks", "chisquare"), metadata={
        "help": "Enabled tests, names from STAT_TESTS: mmd (embedding), ks (image stats, confidence, entropy), "
                "chisquare (predicted class)."})
    mmd_alpha_share: float = field(default=0.5, metadata={
        "help": "Share of alpha given to the MMD test; the rest is split evenly over the other tests."})
    seed: int = field(default=0, metadata={
        "help": "Seed for subsampling and permutations, so checks are reproducible."})

    def __post_init__(self) -> None:
        object.__setattr__(self, "tests", tuple(self.tests))  # accept lists from YAML/CLI, stay hashable
        errors = _config_errors(self)
        if errors:
            raise ValueError(" ".join(errors))


# ------------------------------------------------------------------------------------------- records


def _check_shapes(rs: ReferenceSet) -> None:
    n = len(rs.embeddings)
    problems = [
        f"embeddings must be 2-d (n, d), got shape {rs.embeddings.shape}" if rs.embeddings.ndim != 2 else "",
        f"stats must be (n, {len(rs.stat_names)}), got {rs.stats.shape}"
        if rs.stats.shape != (n, len(rs.stat_names)) else "",
        *(f"{name} must be (n,) = ({n},), got {getattr(rs, name).shape}"
          for name in ("confidence", "entropy", "classes") if getattr(rs, name).shape != (n,)),
        f"stat_names may not use the reserved names {sorted(_RESERVED_NAMES)}"
        if _RESERVED_NAMES & set(rs.stat_names) else "",
        "classes must be non-negative class ids" if n and rs.classes.min() < 0 else "",
    ]
    problems = [p for p in problems if p]
    if problems:
        raise ValueError("; ".join(problems) + ". Build all arrays from the same n records.")
    for name in ("embeddings", "stats", "confidence", "entropy"):
        if not np.isfinite(getattr(rs, name)).all():
            raise ValueError(f"{name} contains NaN or inf; drop or repair those records before building the set.")


@dataclass
class ReferenceSet:
    """Per-record monitoring features of n predictions: a version's reference set, or a window of recent traffic.

    Arrays are coerced on construction: embeddings float32 (n, d), stats float64 (n, len(stat_names)),
    confidence/entropy float64 (n,), classes int64 (n,).
    """

    embeddings: np.ndarray
    stats: np.ndarray
    confidence: np.ndarray
    entropy: np.ndarray
    classes: np.ndarray
    stat_names: tuple[str, ...] = STAT_NAMES

    def __post_init__(self) -> None:
        self.embeddings = np.asarray(self.embeddings, dtype=np.float32)
        self.stats = np.asarray(self.stats, dtype=np.float64)
        self.confidence = np.asarray(self.confidence, dtype=np.float64)
        self.entropy = np.asarray(self.entropy, dtype=np.float64)
        self.classes = np.asarray(self.classes, dtype=np.int64)
        self.stat_names = tuple(str(name) for name in self.stat_names)
        _check_shapes(self)

    def __len__(self) -> int:
        return len(self.embeddings)

    def save(self, path: str | os.PathLike[str], extra: dict[str, np.ndarray] | None = None) -> None:
        """Write one uncompressed .npz at exactly `path`, atomically (models.files.write_atomic: a reader sees the
        old file or the new one, never a mix; concurrent writers each use their own temporary file). `extra`:
        more numeric arrays stored beside the set (the accuracy estimator's); load() ignores them."""
        buffer = io.BytesIO()  # a file object stops np.savez from appending ".npz"
        np.savez(buffer, embeddings=self.embeddings, stats=self.stats, confidence=self.confidence,
                 entropy=self.entropy, classes=self.classes, stat_names=np.array(self.stat_names, dtype=str),
                 **(extra or {}))
        write_atomic(path, buffer.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ReferenceSet:
        """Read a set written by save(); allow_pickle=False so a tampered file cannot run code."""
        with np.load(path, allow_pickle=False) as data:
            missing = {f.name for f in dataclasses.fields(cls)} - set(data.files)
            if missing:
                raise ValueError(f"{path} is missing {sorted(missing)}; re-create it with ReferenceSet.save().")
            arrays = {f.name: data[f.name] for f in dataclasses.fields(cls)}  # ignore unknown extra arrays
        arrays["stat_names"] = tuple(str(name) for name in arrays["stat_names"])
        return cls(**arrays)


@dataclass
class DriftResult:
    """Outcome of one check.

    p_value is the smallest Bonferroni-adjusted p-value over all features (adjusted p = p * alpha / level,
    where level is the feature's share of alpha). score = -log10(p_value) ("decades of evidence") and
    threshold = -log10(alpha), so drift == (score >= threshold) == (p_value <= alpha); the score is monotone,
    comparable across checks and adapters, and suits a Prometheus gauge. features maps each feature
    ("embedding", each stat name, "confidence", "entropy", "predicted_class") to test, statistic, p_value,
    p_adjusted, level and moved.
    """

    drift: bool
    score: float
    threshold: float
    p_value: float
    window_size: int
    checked_at: str
    features: dict[str, dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable dict (deep copy)."""
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------- detector


class DriftDetector:
    """Compares windows of recent records with one adapter version's ReferenceSet.

    Construction does the per-reference work once (~50 ms for 1000 x 512; the fit part is capped at 2000
    records, ~0.3 s): a seeded split of the reference into a
    comparison subsample (reference_size records, compared by the MMD) and a disjoint fit part (PCA axes and
    the median-heuristic bandwidth). Fitting PCA on the very records it then compares would shrink the
    reference's out-of-subspace variance relative to fresh traffic and make the MMD alarm on clean windows.
    """

    def __init__(self, reference: ReferenceSet, config: DriftConfig | None = None) -> None:
        self.reference = reference
        self.config = config or DriftConfig()
        if len(reference) < max(self.config.min_window, 20):
            raise ValueError(f"reference has {len(reference)} records but needs at least "
                             f"{max(self.config.min_window, 20)} (min_window); collect more reference data.")
        self._rng = np.random.default_rng(self.config.seed)
        self.numeric_names: tuple[str, ...] = reference.stat_names + OUTPUT_FEATURES
        self._ref_numeric = np.column_stack([reference.stats, reference.confidence, reference.entropy])
        self.reducer: EmbeddingReducer | None = None
        self.bandwidth: float | None = None
        if "mmd" in self.config.tests:
            self._fit_embedding_test()
        self.levels = self._alpha_levels()

    def _fit_embedding_test(self) -> None:
        order = self._rng.permutation(len(self.reference))
        n_compare = min(self.config.reference_size, len(order) // 2)
        fit_rows = self.reference.embeddings[np.sort(order[n_compare:][:_MAX_FIT_POINTS])]
        self.reducer = EmbeddingReducer(self.config.pca_components, self.config.whiten).fit(fit_rows)
        self.bandwidth = median_bandwidth(self.reducer.transform(fit_rows), rng=self._rng)
        self._ref_reduced = self.reducer.transform(self.reference.embeddings[np.sort(order[:n_compare])])

    def _features_by_test(self) -> dict[str, tuple[str, ...]]:
        by_kind = {"embedding": (EMBEDDING_FEATURE,), "numeric": self.numeric_names, "categorical": (CLASS_FEATURE,)}
        return {name: by_kind[STAT_TESTS[name].kind] for name in self.config.tests}

    def _alpha_levels(self) -> dict[str, float]:
        """Weighted Bonferroni: per-feature levels that sum to alpha, so P(any false alarm) <= alpha."""
        cfg = self.config
        features = self._features_by_test()
        mmd_level = _mmd_alpha(cfg.alpha, cfg.tests, cfg.mmd_alpha_share) if "mmd" in features else 0.0
        others = [f for name, fs in features.items() if name != "mmd" for f in fs]
        levels = {f: (cfg.alpha - mmd_level) / len(others) for f in others}
        if "mmd" in features:
            levels[EMBEDDING_FEATURE] = mmd_level
        return levels

    def _validate_window(self, window: ReferenceSet) -> None:
        if len(window) < self.config.min_window:
            raise ValueError(f"window has {len(window)} records but min_window is {self.config.min_window}; "
                             "wait for more traffic or lower ADAPTSERVE_DRIFT_MIN_RECORDS.")
        if window.embeddings.shape[1] != self.reference.embeddings.shape[1]:
            raise ValueError(f"window embeddings have {window.embeddings.shape[1]} dims, the reference has "
                             f"{self.reference.embeddings.shape[1]}; compare records of the same model version.")
        if window.stat_names != self.reference.stat_names:
            raise ValueError(f"window stat_names {window.stat_names} differ from the reference's "
                             f"{self.reference.stat_names}; record the same image statistics in the same order.")

    def _run_tests(self, window: ReferenceSet) -> dict[str, tuple[str, float, float]]:
        """{feature: (test name, statistic, raw p-value)} for every enabled test."""
        out: dict[str, tuple[str, float, float]] = {}
        for name in self.config.tests:
            test = STAT_TESTS[name]
            if test.kind == "embedding" and self.reducer is not None:
                cur = self.reducer.transform(window.embeddings)
                outcome = test.func(self._ref_reduced, cur, n_perm=self.config.n_permutations, rng=self._rng,
                                    bandwidth=self.bandwidth)
                out[EMBEDDING_FEATURE] = (name, *outcome)
            elif test.kind == "numeric":
                cur_numeric = np.column_stack([window.stats, window.confidence, window.entropy])
                statistics, p_values = test.func(self._ref_numeric, cur_numeric)
                for feature, statistic, p_value in zip(self.numeric_names, statistics, p_values, strict=True):
                    out[feature] = (name, float(statistic), float(p_value))
            elif test.kind == "categorical":
                n_classes = int(max(self.reference.classes.max(), window.classes.max())) + 1
                out[CLASS_FEATURE] = (name, *test.func(self.reference.classes, window.classes, n_classes=n_classes))
        return out

    def _combine(self, raw: dict[str, tuple[str, float, float]], window_size: int) -> DriftResult:
        alpha = self.config.alpha
        features: dict[str, dict[str, Any]] = {}
        for feature, (test, statistic, p_value) in raw.items():
            level = self.levels[feature]
            # tolerance: a permutation p-value can equal its level exactly (2/400 = 0.005), rounding must not flip it
            moved = p_value <= level * (1.0 + 1e-9)
            p_adjusted = min(1.0, p_value * alpha / level)
            features[feature] = {
                "test": test,
                "statistic": float(statistic),
                "p_value": float(p_value),
                "p_adjusted": min(p_adjusted, alpha) if moved else p_adjusted,  # keeps score >= threshold
                "level": level,
                "moved": bool(moved),
            }
        p_min = max(min(f["p_adjusted"] for f in features.values()), _MIN_P)
        return DriftResult(
            drift=any(f["moved"] for f in features.values()),
            score=-math.log10(p_min),
            threshold=-math.log10(alpha),
            p_value=p_min,
            window_size=window_size,
            checked_at=datetime.now(UTC).isoformat(timespec="milliseconds"),
            features=features,
        )

    def check(self, window: ReferenceSet) -> DriftResult:
        """Test a window of recent records against the reference; raises ValueError below min_window."""
        self._validate_window(window)
        return self._combine(self._run_tests(window), len(window))


# ------------------------------------------------------------------------------------------- timing


def _synthetic_set(n: int, d: int, rng: np.random.Generator) -> ReferenceSet:
    """Embedding-like records: 10 class clusters in a 64-d subspace plus isotropic noise."""
    classes = rng.integers(0, 10, n)
    basis = np.linalg.qr(np.random.default_rng(12345).standard_normal((d, min(64, d))))[0].T
    centres = np.random.default_rng(54321).standard_normal((10, basis.shape[0])) * 2.0
    embeddings = (centres[classes] + rng.standard_normal((n, basis.shape[0]))) @ basis
    embeddings += 0.3 * rng.standard_normal((n, d))
    confidence = rng.beta(8, 2, n)
    return ReferenceSet(embeddings, rng.random((n, len(STAT_NAMES))), confidence, rng.random(n), classes)


def time_check(
    n: int = 1000, d: int = 512, repeats: int = 7, config: DriftConfig | None = None, drifted: bool = False
) -> float:
    """Median wall time in ms of DriftDetector.check for an n x d reference and an n x d window.

    Measures one check as the service runs it: projecting the window onto the PCA axes, the MMD test
    (kernel over reference_size + n points, n_permutations permutations), the KS tests and the class test.
    The one-off per-reference setup (PCA fit, bandwidth) is done before timing; one warm-up check is dropped.
    A clean window lets the MMD stop after its first 99 permutations; drifted=True shifts the window's
    embeddings so it runs all 399 (the worst case, ~2x). On an oversubscribed CPU OPENBLAS_NUM_THREADS=1 is steadier.
    """
    rng = np.random.default_rng(20240601)  # not the detector's seed: shared streams correlate data and permutations
    detector = DriftDetector(_synthetic_set(n, d, rng), config)
    window = _synthetic_set(n, d, rng)
    if drifted:
        window.embeddings += np.float32(1.0)
    detector.check(window)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        detector.check(window)
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))
