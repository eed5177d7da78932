"""Retrain jobs at tiny scale: promotion (fresh and from a champion), the gate's rejections, rollback."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from models.registry import open_registry
from models.settings import SettingsError
from pipelines.data import digits_splits
from pipelines.gate import gate
from pipelines.label_trust import Trust
from pipelines.labels import LabelStore
from pipelines.retrain import RetrainConfig, RetrainError, retrain
from pipelines.runner import JobRunner
from pipelines.shifts import shift_set

pytestmark = pytest.mark.slow

CLASSES = [str(i) for i in range(10)]


def add_shifted_labels(
    home: Path, n: int, adapter: str = "site", shuffle: bool = False, trust: Trust = Trust.TRUSTED
) -> LabelStore:
    """`n` noisy digits (gaussian noise, severity 5) labelled for `adapter`, as a trusted labeller's feedback would
    store them (`trust`: untrusted ones never reach the gate's holdout)."""
    train = digits_splits(32, seed=0).train
    idx = np.random.default_rng(0).permutation(len(train))[:n]
    shifted = shift_set(train.subset(idx), "gaussian_noise", 5, seed=0)
    labels = np.random.default_rng(1).permutation(shifted.labels) if shuffle else shifted.labels
    store = LabelStore(home)
    for k, (image, y) in enumerate(zip(shifted.images, labels, strict=True)):
        store.add(
            adapter, image, CLASSES[int(y)], CLASSES, "feedback", prediction_id=f"p{k}", trust=trust,
            sender="token:labeller-1" if trust else "anonymous",
        )  # fmt: skip
    return store


def tiny(**overrides) -> RetrainConfig:
    defaults = {"epochs": 3, "min_labels": 20, "min_holdout": 10, "replay_ratio": 1.0, "seed": 0}
    return RetrainConfig(**(defaults | overrides))


@pytest.mark.parametrize(
    ("numbers", "passed", "reason"),
    [
        ((0.80, 0.90, 0.99, 0.985), True, "promoted: target holdout 90.0% vs champion 80.0% (+10.0 points"),
        ((0.80, 0.805, 0.99, 0.99), False, "rejected: target holdout 80.5% vs champion 80.0% (+0.5 points, needs >="),
        ((0.80, 0.90, 0.99, 0.97), False, "rejected: source holdout 97.0% vs champion 99.0% (-2.0 points, may lose"),
        ((0.90, 0.80, 0.99, 0.90), False, "; source holdout 90.0%"),
    ],
    ids=["passes", "gain-below-margin", "forgets-source", "fails-both"],
)
def test_gate(numbers: tuple[float, ...], passed: bool, reason: str) -> None:
    keys = ("champion_target_acc", "challenger_target_acc", "champion_source_acc", "challenger_source_acc")
    record = dict(zip(keys, numbers, strict=True))
    ok, why = gate(record, RetrainConfig(margin=1.0, max_source_drop=1.0))
    assert ok is passed
    assert reason in why
    assert record["target_gain_points"] == round(100 * (numbers[1] - numbers[0]), 2)


def test_zero_margin_still_needs_a_gain() -> None:
    keys = ("champion_target_acc", "challenger_target_acc", "champion_source_acc", "challenger_source_acc")
    record = dict(zip(keys, (0.9, 0.9, 1.0, 1.0), strict=True))
    assert gate(record, RetrainConfig(margin=0.0))[0] is False


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="unknown LoRA target policy 'most'; choose one of head, late, half, all"):
        RetrainConfig(lora_targets="most")
    with pytest.raises(ValueError, match="margin and max_source_drop are points"):
        RetrainConfig(margin=-1)
    with pytest.raises(ValueError) as err:
        RetrainConfig(holdout_trust="all")
    assert str(err.value) == (
        "unknown holdout_trust 'all'; choose trusted (the gate checks on trusted labels only) or any (on open "
        "feedback too)"
    )
    assert RetrainConfig().holdout_trust == "trusted"


def test_config_defaults_are_the_settings_and_from_env_reads_them(monkeypatch: pytest.MonkeyPatch) -> None:
    declared = RetrainConfig()
    assert (declared.margin, declared.max_source_drop, declared.min_labels, declared.min_holdout) == (1.0, 1.0, 50, 20)
    assert (declared.holdout_trust, declared.time_budget_s) == ("trusted", 120.0)
    assert RetrainConfig.from_env() == declared
    monkeypatch.setenv("ADAPTSERVE_RETRAIN_MARGIN", "2")
    monkeypatch.setenv("ADAPTSERVE_RETRAIN_MIN_TRAIN_LABELS", "7")
    monkeypatch.setenv("ADAPTSERVE_RETRAIN_HOLDOUT_TRUST", "any")
    env = RetrainConfig.from_env(seed=3)
    assert (env.margin, env.min_labels, env.holdout_trust, env.seed) == (2.0, 7, "any", 3)
    assert RetrainConfig().margin == 1.0, "the declared default does not read the environment"
    keys = ("champion_target_acc", "challenger_target_acc", "champion_source_acc", "challenger_source_acc")
    gain_of_1_5 = dict(zip(keys, (0.80, 0.815, 0.99, 0.99), strict=True))
    assert gate(dict(gain_of_1_5), declared)[0] is True
    passed, reason = gate(dict(gain_of_1_5), env)
    assert passed is False and "(+1.5 points, needs >= +2 and > 0)" in reason
    monkeypatch.setenv("ADAPTSERVE_RETRAIN_MARGIN", "-1")
    with pytest.raises(SettingsError) as err:
        RetrainConfig.from_env()
    assert str(err.value) == "ADAPTSERVE_RETRAIN_MARGIN='-1' must be >= 0.0 (default 1.0)"


def test_a_runner_started_with_retrain_settings_gates_its_jobs_with_them(
    tmp_path: Path, source_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_shifted_labels(tmp_path, 60, shuffle=True)
    for name, value in (("MARGIN", "2"), ("MAX_SOURCE_DROP", "3"), ("MIN_TRAIN_LABELS", "20"),
                        ("MIN_HOLDOUT_LABELS", "10"), ("TIME_BUDGET_S", "0.01")):  # fmt: skip
        monkeypatch.setenv(f"ADAPTSERVE_RETRAIN_{name}", value)  # the runner's environment, inherited by its job
    runner = JobRunner(tmp_path, base_dir=source_model, poll_s=0.05, policy_interval_s=None, known_adapters=["site"])
    runner.jobs.submit("site")
    [job] = runner.run_pending()  # the default job function, pipelines.retrain:retrain, in a child process
    assert job.state in ("succeeded", "rejected"), job.log
    n = job.result["numbers"]
    assert (n["margin"], n["max_source_drop"], n["epochs_run"], n["out_of_time"]) == (2.0, 3.0, 1, True)
    assert n["labels_train"] >= 20 and n["labels_holdout"] >= 10


def test_too_few_labels_is_a_clear_error(tmp_path: Path, source_model: Path) -> None:
    add_shifted_labels(tmp_path, 12)
    with pytest.raises(RetrainError, match=r"adapter 'site' has \d+ training and \d+ holdout labels; a retrain needs"):
        retrain(tmp_path, "site", base_dir=source_model, cfg=tiny(min_labels=50))
    assert open_registry(tmp_path).list_adapters() == []


def test_untrusted_labels_alone_leave_the_gate_without_a_holdout(tmp_path: Path, source_model: Path) -> None:
    store = add_shifted_labels(tmp_path, 60, trust=Trust.UNTRUSTED)
    moved = len(store.dataset("site", CLASSES)[1])  # what the old, trust-blind gate would have graded on
    with pytest.raises(RetrainError) as err:
        retrain(tmp_path, "site", base_dir=source_model, cfg=tiny())
    assert str(err.value) == (
        "adapter 'site' has 60 training and 0 holdout labels; a retrain needs at least 20 and 10 "
        "(ADAPTSERVE_RETRAIN_MIN_TRAIN_LABELS / ADAPTSERVE_RETRAIN_MIN_HOLDOUT_LABELS). The gate's holdout takes "
        f"trusted labels only (ADAPTSERVE_RETRAIN_HOLDOUT_TRUST=trusted; {moved} untrusted holdout-split label(s) "
        "went to training, 0 conflicted one(s) were left out): add trusted holdout labels with `adaptserve data add "
        "DIR --adapter site` "
        "(DIR/val/<class>/<image> all go to the holdout), or label with an admin or trusted-labeller token"
    )
    assert open_registry(tmp_path).list_adapters() == []


def test_base_without_samples_is_a_clear_error(tmp_path: Path, source_model: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(source_model, base, ignore=shutil.ignore_patterns("samples"))
    add_shifted_labels(tmp_path, 60)
    with pytest.raises(RetrainError, match=r"has no samples/holdout.npz: retraining needs its source replay"):
        retrain(tmp_path, "site", base_dir=base, cfg=tiny())


def test_new_adapter_is_trained_from_the_base_gated_and_promoted(tmp_path: Path, source_model: Path) -> None:
    add_shifted_labels(tmp_path, 150)
    seen: list[tuple[float, str]] = []
    # 3 epochs on ~100 labels: allow 3 points of forgetting (measured ~0.8); the benchmark checks the default 1 point
    cfg = tiny(max_source_drop=3.0)
    result = retrain(tmp_path, "site", base_dir=source_model, cfg=cfg, progress=lambda f, m: seen.append((f, m)))
    n = result.numbers
    assert result.status == "promoted", result.reason
    assert (result.version, result.parent) == (1, None)
    assert n["challenger_target_acc"] >= n["champion_target_acc"] + 0.01  # champion = the base model
    assert n["champion_source_acc"] - n["challenger_source_acc"] <= 0.03
    assert n["labels_train"] + n["labels_holdout"] == 150 and n["replay"] > 0
    assert (n["labels_holdout_trusted"], n["labels_train_untrusted"]) == (n["labels_holdout"], 0)
    assert n["holdout_trust"] == "trusted"
    registry = open_registry(tmp_path)
    champion = registry.champion("site")
    assert champion.version == 1
    assert {"model.onnx", "reference.npz", "samples/reference.npz"} <= set(champion.sha256)
    assert champion.metadata["metrics"]["target_test"]["accuracy"] == n["challenger_target_acc"]
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    assert seen[-1][1].startswith("promoted v1: target holdout")
    assert result.to_dict()["numbers"]["seconds"] > 0


def test_retrain_from_champion_promotes_and_rollback_restores_it(tmp_path: Path, source_model: Path) -> None:
    from pipelines.release import make_random_adapter, publish

    registry = open_registry(tmp_path)
    v1 = publish(registry, "site", make_random_adapter(source_model, tmp_path / "v1", seed=1), source_model, True)
    add_shifted_labels(tmp_path, 120)
    generation = registry.generation()
    result = retrain(tmp_path, "site", base_dir=source_model, cfg=tiny(epochs=2))
    assert result.status == "promoted", result.reason
    assert (result.version, result.parent) == (2, v1.version)
    assert registry.champion("site").version == 2
    assert registry.champion("site").metadata["parent"] == "site@v1"
    assert registry.generation() > generation  # what serving workers poll to hot-swap
    assert registry.rollback("site").version == 1
    assert registry.champion("site").version == 1


def test_gate_rejects_without_registering_and_the_time_budget_stops_training(
    tmp_path: Path, source_model: Path
) -> None:
    add_shifted_labels(tmp_path, 100, shuffle=True)  # garbage labels
    result = retrain(tmp_path, "site", base_dir=source_model, cfg=tiny(epochs=4, margin=100.0, time_budget_s=0.01))
    assert result.status == "rejected" and result.version is None
    assert result.reason.startswith("rejected: target holdout")
    assert "needs >= +100 and > 0" in result.reason
    n = result.numbers
    assert {"champion_target_acc", "challenger_target_acc", "champion_source_acc", "challenger_source_acc"} <= set(n)
    assert (n["epochs_run"], n["out_of_time"]) == (1, True)
    assert open_registry(tmp_path).list_adapters() == []
