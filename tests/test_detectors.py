"""Drift detectors: calibration on clean data, power and attribution on shifted data, config and I/O contracts.

Sizes are small (reference 400, window 200, 32-d embeddings) so the whole file runs in a few seconds; the
1000 x 512 timing lives in monitoring.detectors.time_check, called by the benchmarks, not here.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from monitoring.detectors import DriftConfig, DriftDetector, EmbeddingReducer, ReferenceSet, time_check
from monitoring.image_stats import STAT_NAMES
from monitoring.stattests import STAT_TESTS, class_shift_test, ks_tests, median_bandwidth, mmd_test, rbf_kernel_matrix

DIM = 32
SCALES = np.linspace(3.0, 0.5, DIM)  # anisotropic, so PCA has a real subspace to find
CLASS_P = np.array([0.3, 0.2, 0.15, 0.1, 0.08, 0.06, 0.05, 0.03, 0.02, 0.01])
SMALL = DriftConfig(pca_components=8)


def _records(
    rng: np.random.Generator,
    n: int,
    *,
    emb_shift: float = 0.0,
    conf: tuple[float, float] = (8.0, 2.0),
    class_p: np.ndarray = CLASS_P,
    brightness_shift: float = 0.0,
) -> ReferenceSet:
    """Synthetic records whose feature groups are independent, so each shift should move exactly one feature."""
    stats_ = np.column_stack([
        rng.beta(5, 5, n) + brightness_shift, rng.gamma(4, 0.05, n), rng.lognormal(0, 0.5, n),
        rng.gamma(2, 0.1, n), np.full(n, 224.0), np.full(n, 224.0),  # constant sizes, as after a resize
    ])
    return ReferenceSet(
        embeddings=rng.standard_normal((n, DIM)) * SCALES + emb_shift,
        stats=stats_,
        confidence=rng.beta(*conf, n),
        entropy=rng.gamma(3, 0.2, n),
        classes=rng.choice(len(class_p), n, p=class_p),
    )


def _moved(result) -> set[str]:
    return {name for name, feature in result.features.items() if feature["moved"]}


# ----------------------------------------------------------------------------------------------- MMD


def test_mmd_statistic_matches_direct_unbiased_formula() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((20, 3)), rng.standard_normal((30, 3)) + 0.3
    bandwidth = 1.7
    k = rbf_kernel_matrix(np.concatenate([x, y]), bandwidth).astype(np.float64)
    kxx, kyy, kxy = k[:20, :20], k[20:, 20:], k[:20, 20:]
    direct = ((kxx.sum() - 20) / (20 * 19) + (kyy.sum() - 30) / (30 * 29) - 2 * kxy.mean())
    # and the kernel itself against the textbook definition
    d2 = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    np.testing.assert_allclose(kxy, np.exp(-d2 / (2 * bandwidth**2)), rtol=1e-5, atol=1e-6)
    mmd2, _ = mmd_test(x, y, n_perm=19, rng=0, bandwidth=bandwidth)
    assert mmd2 == pytest.approx(direct, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize(
    ("shift", "max_p", "min_p"),
    [
        pytest.param(1.0, 1 / 200, 0.0, id="shifted-by-1sd"),  # every permutation below the observed: p floor
        pytest.param(0.0, 1.0, 0.05, id="same-distribution"),
    ],
)
def test_mmd_p_value_for_shifted_and_equal_gaussians(shift: float, max_p: float, min_p: float) -> None:
    rng = np.random.default_rng(7)
    x, y = rng.standard_normal((150, 8)), rng.standard_normal((150, 8))
    y[:, 0] += shift
    mmd2, p_value = mmd_test(x, y, n_perm=199, rng=rng)
    assert min_p <= p_value <= max_p
    assert (mmd2 > 0.01) == (shift > 0)


@pytest.mark.parametrize("stop_after", [None, 10], ids=["all-permutations", "sequential-stop"])
def test_mmd_p_values_are_uniform_under_the_null(stop_after: int | None) -> None:
    p_values = []
    for seed in range(80):
        rng = np.random.default_rng(seed)
        x, y = rng.standard_normal((30, 4)), rng.standard_normal((40, 4))
        p_values.append(mmd_test(x, y, n_perm=99, rng=rng, stop_after=stop_after)[1])
    p_values = np.array(p_values)
    assert stats.kstest(p_values, "uniform").pvalue > 0.01  # sequential p-values are discrete (atom at 1)
    assert np.mean(p_values <= 0.05) <= 0.1
    assert 0.35 <= np.median(p_values) <= 0.65


def test_sequential_stopping_keeps_the_small_level_decisions() -> None:
    """Early stops only happen once p > 10/399, so decisions at the MMD's level 0.005 match the full test."""
    for seed, shift in [(s, sh) for s in range(6) for sh in (0.0, 0.25, 0.5)]:
        rng = np.random.default_rng(seed)
        x, y = rng.standard_normal((60, 4)), rng.standard_normal((60, 4)) + shift
        full = mmd_test(x, y, n_perm=399, rng=seed + 100, bandwidth=2.0, stop_after=None)[1]
        seq = mmd_test(x, y, n_perm=399, rng=seed + 100, bandwidth=2.0, stop_after=10)[1]
        assert (full <= 0.005) == (seq <= 0.005), (seed, shift, full, seq)


def test_median_bandwidth_of_standard_normal() -> None:
    # |x - y|^2 ~ 2 chi2_d; median of chi2_8 is 7.344, so sigma^2 = median / 2 = 7.344
    z = np.random.default_rng(0).standard_normal((500, 8))
    assert median_bandwidth(z) ** 2 == pytest.approx(7.344, rel=0.03)


def test_mmd_test_rejects_mismatched_inputs() -> None:
    with pytest.raises(ValueError, match="same d"):
        mmd_test(np.zeros((5, 3)), np.zeros((5, 4)))


# ----------------------------------------------------------------------------------- KS and classes


def test_ks_tests_bonferroni_and_statistics() -> None:
    rng = np.random.default_rng(3)
    ref = rng.standard_normal((300, 3))
    cur = rng.standard_normal((200, 3))
    cur[:, 1] += 1.0
    names = ("a", "b", "c")
    raw = ks_tests(ref, cur, names, bonferroni=False)
    adjusted = ks_tests(ref, cur, names)
    for j, name in enumerate(names):
        expected = stats.ks_2samp(ref[:, j], cur[:, j])
        assert raw[name] == pytest.approx((expected.statistic, expected.pvalue))
        assert adjusted[name][1] == pytest.approx(min(1.0, 3 * expected.pvalue))
    assert raw["b"][0] > 0.3 and raw["b"][1] < 1e-10  # D ~ Phi(0.5) - Phi(-0.5) = 0.38
    assert adjusted["a"][1] > 0.01 and adjusted["c"][1] > 0.01


@pytest.mark.parametrize(
    ("cur_p", "n_classes", "max_p", "min_p"),
    [
        pytest.param(CLASS_P, 10, 1.0, 0.01, id="same-histogram"),
        pytest.param(CLASS_P[::-1], 10, 1e-12, 0.0, id="reversed-histogram"),
        pytest.param(CLASS_P, 1000, 1.0, 0.01, id="990-empty-bins"),
    ],
)
def test_class_shift_test(cur_p: np.ndarray, n_classes: int, max_p: float, min_p: float) -> None:
    rng = np.random.default_rng(5)
    ref, cur = rng.choice(10, 1000, p=CLASS_P), rng.choice(10, 200, p=cur_p)
    statistic, p_value = class_shift_test(ref, cur, n_classes)
    assert min_p <= p_value <= max_p
    assert statistic >= 0.0


def test_class_never_seen_in_reference_is_pooled_and_detected() -> None:
    rng = np.random.default_rng(6)
    ref = rng.choice(10, 1000, p=CLASS_P)
    cur = np.concatenate([rng.choice(10, 170, p=CLASS_P), np.full(30, 42)])  # 15% of a brand-new class
    _, p_value = class_shift_test(ref, cur, n_classes=50)
    assert p_value < 1e-6


def test_identical_histograms_give_zero_statistic() -> None:
    classes = np.repeat(np.arange(4), [40, 30, 20, 10])
    assert class_shift_test(classes, classes, 4) == pytest.approx((0.0, 1.0))


# ---------------------------------------------------------------------------------------------- PCA


@pytest.mark.parametrize("whiten", [False, True], ids=["plain", "whitened"])
def test_reducer_recovers_variances(whiten: bool) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4000, 6)) * np.array([5.0, 3.0, 1.0, 0.5, 0.2, 0.1])
    reducer = EmbeddingReducer(n_components=3, whiten=whiten).fit(x)
    np.testing.assert_allclose(reducer.explained_variance_, [25.0, 9.0, 1.0], rtol=0.06)
    z = reducer.transform(x)
    assert z.shape == (4000, 3) and z.dtype == np.float32
    expected = [1.0, 1.0, 1.0] if whiten else [25.0, 9.0, 1.0]
    np.testing.assert_allclose(z.var(axis=0, ddof=1), expected, rtol=0.06)


def test_reducer_must_be_fitted_and_caps_components() -> None:
    with pytest.raises(RuntimeError, match="call fit"):
        EmbeddingReducer().transform(np.zeros((2, 4)))
    assert EmbeddingReducer(n_components=32).fit(np.random.default_rng(0).random((10, 4))).components_.shape == (4, 4)


# ------------------------------------------------------------------------------------------- detector


def test_false_alarm_rate_on_clean_traffic() -> None:
    """100 independent clean (reference, window) pairs: family-wise alpha = 0.01 allows ~1 alarm."""
    alarms = 0
    for seed in range(100):
        # Data and detector need independent streams: default_rng(seed) for both would reuse the same random
        # bits for the data and the permutations, which inflates small MMD p-values.
        rng = np.random.default_rng(10_000 + seed)
        detector = DriftDetector(_records(rng, 400), dataclasses.replace(SMALL, seed=seed))
        alarms += detector.check(_records(rng, 200)).drift
    assert alarms <= 3


@pytest.mark.parametrize(
    ("shift", "moved"),
    [
        pytest.param({}, set(), id="clean"),
        pytest.param({"emb_shift": 1.0}, {"embedding"}, id="embedding-mean-shift"),
        pytest.param({"conf": (6.0, 3.0)}, {"confidence"}, id="confidence-drop"),
        pytest.param({"class_p": CLASS_P[::-1]}, {"predicted_class"}, id="class-histogram-change"),
        pytest.param({"brightness_shift": -0.1}, {"brightness"}, id="darker-images"),
    ],
)
def test_shift_is_detected_and_attributed(shift: dict, moved: set[str]) -> None:
    rng = np.random.default_rng(11)
    detector = DriftDetector(_records(rng, 400), SMALL)
    result = detector.check(_records(rng, 200, **shift))
    assert _moved(result) == moved
    assert result.drift == bool(moved)
    assert result.drift == (result.score >= result.threshold) == (result.p_value <= SMALL.alpha)
    assert result.threshold == pytest.approx(2.0)  # -log10(0.01)
    for name in moved:
        assert result.features[name]["p_adjusted"] <= SMALL.alpha
    if not moved:
        assert result.p_value > SMALL.alpha


def test_result_layout_and_levels_sum_to_alpha() -> None:
    rng = np.random.default_rng(2)
    detector = DriftDetector(_records(rng, 400), SMALL)
    result = detector.check(_records(rng, 150))
    expected = {"embedding", *STAT_NAMES, "confidence", "entropy", "predicted_class"}
    assert set(result.features) == expected
    assert sum(detector.levels.values()) == pytest.approx(SMALL.alpha)
    assert detector.levels["embedding"] == pytest.approx(0.005)
    assert detector.levels["brightness"] == pytest.approx(0.005 / 9)
    assert result.window_size == 150
    payload = json.loads(json.dumps(result.to_dict()))
    assert set(payload) == {"drift", "score", "threshold", "p_value", "window_size", "checked_at", "features"}
    assert set(payload["features"]["embedding"]) == {"test", "statistic", "p_value", "p_adjusted", "level", "moved"}
    assert payload["features"]["entropy"]["test"] == "ks"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", result.checked_at)


@pytest.mark.parametrize(
    ("p_value", "drift"),
    [pytest.param(2 / 400, True, id="p-equals-level"), pytest.param(3 / 400, False, id="p-above-level")],
)
def test_permutation_p_at_its_level_alarms_consistently(p_value: float, drift: bool) -> None:
    """With 399 permutations the MMD p-value can equal its level 0.005 exactly; rounding must not flip it."""
    rng = np.random.default_rng(2)
    detector = DriftDetector(_records(rng, 300), SMALL)  # MMD level = 0.01 * 0.5
    result = detector._combine({"embedding": ("mmd", 0.01, p_value)}, window_size=100)
    assert result.drift is drift
    assert (result.score >= result.threshold) is drift
    assert (result.p_value <= 0.01) is drift


@pytest.mark.parametrize(
    ("tests", "expected_features"),
    [
        pytest.param(("mmd",), {"embedding"}, id="mmd-only"),
        pytest.param(("ks", "chisquare"), {*STAT_NAMES, "confidence", "entropy", "predicted_class"}, id="no-mmd"),
    ],
)
def test_enabled_tests_select_features(tests: tuple[str, ...], expected_features: set[str]) -> None:
    rng = np.random.default_rng(4)
    config = DriftConfig(pca_components=8, tests=tests)
    detector = DriftDetector(_records(rng, 300), config)
    assert set(detector.check(_records(rng, 100)).features) == expected_features
    assert sum(detector.levels.values()) == pytest.approx(config.alpha)


def test_window_below_min_window_is_refused() -> None:
    rng = np.random.default_rng(0)
    detector = DriftDetector(_records(rng, 300), SMALL)
    with pytest.raises(ValueError, match=re.escape(
            "window has 99 records but min_window is 100; "
            "wait for more traffic or lower ADAPTSERVE_DRIFT_MIN_RECORDS.")):
        detector.check(_records(rng, 99))


def test_window_with_other_embedding_size_is_refused() -> None:
    rng = np.random.default_rng(0)
    detector = DriftDetector(_records(rng, 300), SMALL)
    window = _records(rng, 100)
    window.embeddings = window.embeddings[:, :16]
    with pytest.raises(ValueError, match="same model version"):
        detector.check(window)


def test_reference_smaller_than_min_window_is_refused() -> None:
    with pytest.raises(ValueError, match="reference has 50 records"):
        DriftDetector(_records(np.random.default_rng(0), 50), SMALL)


def test_check_is_reproducible_for_a_seed() -> None:
    rng = np.random.default_rng(9)
    reference, window = _records(rng, 300), _records(rng, 120, emb_shift=0.3)
    first = DriftDetector(reference, SMALL).check(window).features["embedding"]
    second = DriftDetector(reference, SMALL).check(window).features["embedding"]
    assert first == second


@pytest.mark.parametrize("drifted", [False, True], ids=["clean", "drifted"])
def test_time_check_returns_milliseconds(drifted: bool) -> None:
    assert 0.0 < time_check(n=120, d=16, repeats=1, drifted=drifted) < 5000.0


# --------------------------------------------------------------------------------------------- config

CONFIG_ERRORS = [
    pytest.param({"alpha": 0.0}, "alpha must be between 0 and 1 (exclusive), got 0.0; use e.g. 0.01 to allow at "
                 "most 1% false alarms per check.", id="alpha-zero"),
    pytest.param({"alpha": 1.5}, "alpha must be between 0 and 1 (exclusive), got 1.5;", id="alpha-above-one"),
    pytest.param({"pca_components": 0}, "pca_components must be at least 1, got 0; 32 keeps most of the signal "
                 "of a 512-d embedding.", id="pca-zero"),
    pytest.param({"n_permutations": 0}, "n_permutations must be at least 1, got 0; the default 399 resolves "
                 "p-values down to 0.0025.", id="permutations-zero"),
    pytest.param({"n_permutations": 150}, "n_permutations=150 cannot give an MMD p-value at or below its share "
                 "of alpha (0.005), so the embedding test could never alarm; set n_permutations to at least 199.",
                 id="permutations-too-few"),
    pytest.param({"min_window": 5}, "min_window must be at least 10, got 5; use 100 or more so that tiny "
                 "windows do not produce noisy checks.", id="min-window"),
    pytest.param({"reference_size": 3}, "reference_size must be at least 10, got 3;", id="reference-size"),
    pytest.param({"mmd_alpha_share": 1.0}, "mmd_alpha_share must be between 0 and 1 (exclusive), got 1.0; 0.5 "
                 "gives the embedding test half of alpha.", id="share"),
    pytest.param({"seed": -1}, "seed must be a non-negative integer, got -1; pick any value >= 0.", id="seed"),
    pytest.param({"tests": ("mmd", "psi")}, "tests must be a non-empty subset of ['chisquare', 'ks', 'mmd'], got "
                 "['mmd', 'psi']; remove the unknown names.", id="unknown-test"),
    pytest.param({"tests": ()}, "tests must be a non-empty subset of", id="no-tests"),
]


@pytest.mark.parametrize(("kwargs", "message"), CONFIG_ERRORS)
def test_config_rejects_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        DriftConfig(**kwargs)


def test_config_fields_document_themselves_and_accept_lists() -> None:
    for field in dataclasses.fields(DriftConfig):
        assert field.metadata.get("help"), field.name
    assert DriftConfig(tests=["mmd", "ks"]).tests == ("mmd", "ks")
    assert DriftConfig(n_permutations=199).n_permutations == 199  # exactly enough for 0.005
    assert DriftConfig(n_permutations=50, tests=("ks",)).n_permutations == 50  # no MMD, no constraint
    assert set(STAT_TESTS) == {"mmd", "ks", "chisquare"}
    assert {t.kind for t in STAT_TESTS.values()} == {"embedding", "numeric", "categorical"}


# ------------------------------------------------------------------------------------------- reference I/O


@pytest.mark.parametrize("filename", ["reference.npz", "reference.bin"], ids=["npz-suffix", "other-suffix"])
def test_reference_set_round_trip(tmp_path: Path, filename: str) -> None:
    original = _records(np.random.default_rng(0), 50)
    path = tmp_path / filename
    original.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [filename]  # exact path, no temp file left
    loaded = ReferenceSet.load(path)
    for field in dataclasses.fields(ReferenceSet):
        a, b = getattr(original, field.name), getattr(loaded, field.name)
        if isinstance(a, np.ndarray):
            assert a.dtype == b.dtype and np.array_equal(a, b), field.name
        else:
            assert a == b, field.name
    assert loaded.stat_names == STAT_NAMES
    assert loaded.embeddings.dtype == np.float32 and loaded.classes.dtype == np.int64


def test_load_rejects_incomplete_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.npz"
    np.savez(path, embeddings=np.zeros((3, 2), np.float32))
    with pytest.raises(ValueError, match=r"missing \['classes', 'confidence', 'entropy', 'stat_names', 'stats'\]"):
        ReferenceSet.load(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param({"confidence": np.ones(7)}, r"confidence must be \(n,\) = \(10,\)", id="length-mismatch"),
        pytest.param({"stats": np.zeros((10, 3))}, r"stats must be \(n, 6\)", id="stat-columns"),
        pytest.param({"entropy": np.full(10, np.nan)}, "entropy contains NaN", id="nan"),
        pytest.param({"classes": np.full(10, -1)}, "non-negative class ids", id="negative-class"),
        pytest.param({"stats": np.zeros((10, 1)), "stat_names": ("confidence",)}, "reserved names", id="reserved"),
    ],
)
def test_reference_set_validates(change: dict, message: str) -> None:
    base = dict(embeddings=np.zeros((10, 4)), stats=np.zeros((10, 6)), confidence=np.ones(10),
                entropy=np.zeros(10), classes=np.zeros(10, int))
    with pytest.raises(ValueError, match=message):
        ReferenceSet(**{**base, **change})
