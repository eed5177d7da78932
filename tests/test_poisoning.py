"""The label-poisoning attack, re-run: open feedback relabels inverted digits (true + 1) % 10.

Measured before labels carried trust: 1,200 such labels from an unauthenticated client started a retrain job, the
gate's target holdout came from the same poisoned labels, and the poisoned v2 was promoted (its source accuracy
stayed 0.99, so the source check could not see it). Here a champion v1 is first trained on a site's trusted,
correctly labelled inverted digits (`adaptserve data add` with a val/ folder: the trusted holdout); then the
attacker's untrusted labels arrive. The gate must reject the poisoned challenger; the control, with a holdout
open to any label (`holdout_trust="any"`), shows the attack still works without trust.

The retrain tests run on SQLite (they copy the home, database included); the label store's part of the attack runs
on both backends (`test_the_store_keeps_the_poison_out_of_the_trusted_holdout`).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from state_backend import use_backend

from models.registry import open_registry
from models.state import close_all
from pipelines.data import ImageSet, digits_splits
from pipelines.label_trust import Trust
from pipelines.labels import LabelStore
from pipelines.retrain import RetrainConfig, retrain
from pipelines.shifts import shift_set

pytestmark = pytest.mark.slow

CLASSES = [str(i) for i in range(10)]
N_TRUSTED_TRAIN, N_TRUSTED_HOLDOUT, N_POISON, N_RELABELLED = 100, 60, 300, 20


def cfg(holdout_trust: str) -> RetrainConfig:
    # a short job (3 epochs, ~10 s on 2 cores); v1 itself loses ~3 points of source accuracy in so few epochs
    return RetrainConfig(
        epochs=3, min_labels=20, min_holdout=20, max_source_drop=3.0, seed=0, holdout_trust=holdout_trust
    )


def _import_trusted(home: Path) -> tuple[LabelStore, ImageSet, ImageSet]:
    """The site's trusted, correctly labelled inverted digits (train/ and val/); (store, those images, the poison)."""
    digits = digits_splits(32, seed=0)
    clean = shift_set(digits.test.subset(range(N_TRUSTED_TRAIN + N_TRUSTED_HOLDOUT)), "invert", 5, seed=1)
    for k, (image, y) in enumerate(zip(clean.images, clean.labels, strict=True)):
        folder = home.parent / "site-labels" / ("train" if k < N_TRUSTED_TRAIN else "val") / CLASSES[y]
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{k}.png")
    store = LabelStore(home)
    report = store.import_folder("site", home.parent / "site-labels", CLASSES)  # TRUSTED, "cli:data-add"
    assert (report.added, report.per_split) == (160, {"train": 100, "val": 60})
    return store, clean, shift_set(digits.train.subset(range(N_POISON)), "invert", 5, seed=0)


def _poison(store: LabelStore, clean: ImageSet, poison: ImageSet) -> None:
    """The attacker's open feedback: every poison image labelled (true + 1) % 10, and relabels of trusted pixels."""
    for k, (image, y) in enumerate(zip(poison.images, poison.labels, strict=True)):
        wrong = CLASSES[(y + 1) % 10]
        assert store.add("site", image, wrong, CLASSES, f"feedback:p{k}", prediction_id=f"p{k}").outcome == "added"
    # the attacker also relabels pixels the trusted holdout holds: refused (outranked), the trusted label stays
    for k in range(N_TRUSTED_TRAIN, N_TRUSTED_TRAIN + N_RELABELLED):
        true, wrong = CLASSES[clean.labels[k]], CLASSES[(clean.labels[k] + 1) % 10]
        result = store.add("site", clean.images[k], wrong, CLASSES, "upload")
        assert (result.outcome, result.stored_label, result.conflicted) == ("conflict", true, False)


def _check_poison_is_kept_apart(store: LabelStore) -> None:
    summary = store.summary("site")
    assert (summary["trusted_holdout"], summary["per_trust"]["untrusted"]) == (N_TRUSTED_HOLDOUT, N_POISON)
    assert (summary["contradictions"], summary["conflicts"]) == (N_RELABELLED, 0)  # recorded; nothing left pending
    assert {c["resolution"] for c in store.conflicts("site", unresolved_only=False)} == {"outranked"}


@pytest.fixture(scope="module")
def attacked_home(source_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A site with champion v1 trained on trusted labels, then flooded with poisoned open feedback."""
    home = tmp_path_factory.mktemp("poisoned") / "home"
    store, clean, poison = _import_trusted(home)
    v1 = retrain(home, "site", base_dir=source_model, cfg=cfg("trusted"))
    assert v1.promoted, v1.reason
    _poison(store, clean, poison)
    return home


@pytest.fixture
def backend(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    use_backend(db_url, monkeypatch)
    yield db_url
    close_all()


def test_the_store_keeps_the_poison_out_of_the_trusted_holdout(backend: str, tmp_path: Path) -> None:
    """The store's part of the attack, on both backends: what the gate is graded on, and what trains."""
    store, clean, poison = _import_trusted(tmp_path / "home")
    _poison(store, clean, poison)
    _check_poison_is_kept_apart(store)
    counts = LabelStore(tmp_path / "home").load_split("site", CLASSES, holdout_trust=Trust.TRUSTED).counts()
    assert (counts["labels_holdout"], counts["labels_holdout_trusted"]) == (N_TRUSTED_HOLDOUT, N_TRUSTED_HOLDOUT)
    assert (counts["labels_train"], counts["labels_train_untrusted"]) == (N_TRUSTED_TRAIN + N_POISON, N_POISON)


def _copy(home: Path, tmp_path: Path) -> Path:
    close_all()  # the last pooled connection's close checkpoints state.db's WAL: the copy is one plain file
    shutil.copytree(home, tmp_path / "attacked")
    return tmp_path / "attacked"


def test_the_trusted_holdout_rejects_the_poisoned_challenger(attacked_home: Path, tmp_path: Path, source_model: Path):
    home = _copy(attacked_home, tmp_path)
    _check_poison_is_kept_apart(LabelStore(home))

    result = retrain(home, "site", base_dir=source_model, cfg=cfg("trusted"))
    n = result.numbers
    assert result.status == "rejected" and result.version is None, result.reason
    assert result.reason.startswith("rejected: target holdout") and "source holdout" not in result.reason
    assert n["labels_holdout"] == n["labels_holdout_trusted"] == N_TRUSTED_HOLDOUT  # graded on trusted labels only
    assert n["labels_train_untrusted"] == N_POISON  # the poison did train the challenger
    assert n["challenger_target_acc"] < n["champion_target_acc"] - 0.1  # it learnt the poison
    assert n["challenger_source_acc"] >= n["champion_source_acc"] - 0.03  # which the source check cannot see
    registry = open_registry(home)
    assert registry.champion("site").version == 1
    [info] = registry.list_adapters()
    assert [v.version for v in info.versions] == [1]  # a rejected challenger is not registered


def test_control_a_holdout_open_to_any_label_lets_the_poison_through(
    attacked_home: Path, tmp_path: Path, source_model: Path
):
    home = _copy(attacked_home, tmp_path)
    result = retrain(home, "site", base_dir=source_model, cfg=cfg("any"))
    n = result.numbers
    assert result.promoted and result.version == 2, result.reason  # the vulnerability, reproduced
    assert n["labels_holdout"] > n["labels_holdout_trusted"] == N_TRUSTED_HOLDOUT  # poison graded its own challenger
    assert n["challenger_target_acc"] > n["champion_target_acc"] + 0.1
    assert n["challenger_source_acc"] >= n["champion_source_acc"] - 0.03
    assert open_registry(home).champion("site").version == 2
